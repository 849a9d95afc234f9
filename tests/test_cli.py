"""The ``pysched`` command line (:mod:`pysched.tools.cli`) and ``pysched simulate`` (:mod:`pysched.tools.simulate`).

Each test runs a short real simulation (about a second): threads, heartbeats
and the compiled kernel all take part, so these are integration tests.

A simulation runs for a fixed wall-clock budget that includes its setup, so
on a busy machine its threads may get little of it. Invariants (no
over-commit, consistent counts) are asserted on every run; what needs the
threads to have run (dispatches, heartbeats, a detected over-commit) is
awaited by running again until it happened, within a long deadline.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pysched.scheduler import Scheduler
from pysched.tools import cli
from pysched.tools.simulate import Progress, ProgressPrinter, SimulationConfig, SimulationReport, run_simulation

REPO_ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 120.0  # seconds to keep re-running a simulation until its threads did the work asserted
SUBPROCESS_TIMEOUT = 180.0  # a 1 s simulation in a fresh interpreter; only a hang gets near this


def _until(run, done, deadline: float = DEADLINE):
    """``run()`` again and again until ``done(result)``, at most ``deadline`` seconds; the last result."""
    end = time.monotonic() + deadline
    while True:
        result = run()
        if done(result) or time.monotonic() >= end:
            return result

SUMMARY_RE = re.compile(
    r"^pysched simulate: [\d,]+ dispatches in \d+\.\d s \([\d,]+/s\), "
    r"p50 [\d.]+ µs, p99 [\d.]+ µs, p99\.9 [\d.]+ µs, (\d+) over-commits$"
)


def test_run_simulation_invariants():
    config = SimulationConfig(duration=1.0, nodes=20, sessions=50, threads=2, progress_interval=0.25)

    def run():
        seen: list[Progress] = []
        report = run_simulation(config, progress=seen.append)
        # invariants, whatever the machine's load
        assert report.ok and report.overcommits == []
        assert all(peak <= mx for peak, mx in report.max_held.values())
        assert len(report.max_held) == 20
        assert report.attempts == report.dispatches + sum(report.failures.values())
        assert 0 < report.elapsed < report.wall
        u = report.utilisation
        assert 0 <= u["min"] <= u["mean"] <= u["max"] <= 1
        # every job was released at the end: nothing leaks
        assert report.stats["reservations"] == 0
        assert report.stats["nodes_total"] == 20
        # progress came from the calling thread, in order
        assert [p.elapsed for p in seen] == sorted(p.elapsed for p in seen)
        assert all(p.dispatches <= report.dispatches for p in seen)
        assert SUMMARY_RE.match(report.summary_line())
        json.dumps(report.to_dict())  # serialisable
        return report, seen

    report, seen = _until(run, lambda r: r[0].dispatches > 0 and r[0].heartbeats > 0 and r[1])
    assert report.dispatches > 0 and report.heartbeats > 0 and seen
    lat = report.latency_us
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]


def test_overcommit_is_detected(monkeypatch):
    # The scheduler is told each node takes two more jobs than the simulated
    # node really can: the simulator's own count must catch it.
    real_register = Scheduler.register_node

    def register(self, node_id, languages, services=("asr", "nmt", "tts", "semantic"), max_concurrency=4,
                 has_gpu=True, accept_public_jobs=True):
        real_register(self, node_id, languages, services, max_concurrency + 2, has_gpu, accept_public_jobs)

    monkeypatch.setattr(Scheduler, "register_node", register)
    # the first over-commit needs a few dozen dispatches: run until the threads got that far
    report = _until(lambda: run_simulation(SimulationConfig(duration=0.6, nodes=5, sessions=60, threads=2)),
                    lambda r: not r.ok)
    assert not report.ok
    assert report.overcommits and all(peak > mx for _, peak, mx in report.overcommits)
    summary = report.format_summary()
    assert f", {len(report.overcommits)} over-commits" in summary.splitlines()[0]
    assert "FAILED" in summary


def test_main_simulate_writes_json(tmp_path, capsys):
    out = tmp_path / "sim.json"
    rc = cli.main(["simulate", "--duration", "1", "--nodes", "20", "--sessions", "40", "--threads", "2",
                   "--json", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    first = stdout.splitlines()[0]
    assert SUMMARY_RE.match(first)
    assert "no node ever exceeded its max concurrency" in stdout

    data = json.loads(out.read_text(encoding="utf-8"))
    for key in ("summary", "ok", "config", "elapsed_s", "dispatches", "attempts", "dispatch_rate", "latency_us",
                "failures", "heartbeats", "utilisation", "overcommits", "max_held", "scheduler"):
        assert key in data, key
    assert data["summary"] == first
    assert data["ok"] is True and data["overcommits"] == []
    assert set(data["latency_us"]) >= {"p50", "p99", "p99.9"}
    # how many heartbeats the thread got to send depends on the machine; that they are sent is
    # test_run_simulation_invariants' business
    assert isinstance(data["heartbeats"]["applied"], int) and data["heartbeats"]["applied"] >= 0
    assert data["attempts"] == data["dispatches"] + sum(data["failures"].values())
    assert data["config"]["nodes"] == 20 and data["config"]["threads"] == 2


def test_main_exits_1_on_overcommit(monkeypatch, capsys):
    def fake_run(config, progress=None):
        return SimulationReport(
            config=config, elapsed=1.0, wall=1.0, setup=0.0, dispatches=10, failures={},
            latency_us={"p50": 1.0, "p99": 2.0, "p99.9": 3.0, "mean": 1.0, "max": 4.0}, heartbeats=5,
            utilisation={"min": 0.0, "mean": 0.5, "max": 1.0, "cv": 0.1, "nodes": 1.0, "samples": 1.0},
            max_held={"node-0000": (5, 4)}, overcommits=[("node-0000", 5, 4)], silences=0, unhealthy_streaks=0,
        )

    monkeypatch.setattr("pysched.tools.simulate.run_simulation", fake_run)
    assert cli.main(["simulate", "--duration", "1", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "1 over-commits" in out.splitlines()[0]
    assert "node-0000 held 5 > max 4" in out


def test_subcommand_table_and_usage(capsys):
    assert "simulate" in cli.SUBCOMMANDS
    assert cli.main([]) == 2  # no subcommand: usage, not a traceback
    with pytest.raises(SystemExit) as exc:
        cli.main(["simulate", "--nodes", "0"])
    assert exc.value.code == 2


def test_progress_printer_tty_and_plain():
    p = Progress(elapsed=1.0, dispatches=1234, rate=1234.0, failures=5, heartbeats=2000, in_flight=17)

    plain = io.StringIO()
    printer = ProgressPrinter(plain)
    printer(p)
    printer(p)
    printer.finish()
    text = plain.getvalue()
    assert "\r" not in text and text.count("\n") == 2 and "1,234 dispatches" in text

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    printer = ProgressPrinter(tty)
    printer(p)
    printer(p)
    printer.finish()
    text = tty.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1


def test_python_dash_m_subprocess():
    env = dict(os.environ)
    # the package may not be installed: run it from the checkout
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONIOENCODING"] = "utf-8"
    proc = subprocess.run(
        [sys.executable, "-m", "pysched", "simulate", "--duration", "1", "--nodes", "20", "--sessions", "40",
         "--threads", "2", "--seed", "7"],
        capture_output=True, text=True, encoding="utf-8", env=env, cwd=str(REPO_ROOT), timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    m = SUMMARY_RE.match(first)
    assert m, first
    assert m.group(1) == "0"
