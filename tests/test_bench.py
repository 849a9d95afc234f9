"""``pysched bench`` and :mod:`pysched.tools.bench`.

Every run here is a real, tiny benchmark (threads, heartbeats, all four
implementations) with scenarios of about 0.1 s, so the file takes a few
seconds; the figures themselves are not asserted, only that each
implementation dispatched and the report is complete and consistent. No
assertion depends on how fast the machine is or how threads are scheduled:
capacity is beyond anything a scenario can dispatch (no refusal), every
worker thread makes at least one call even if it first runs after its
window, and the pacing of the workers is checked on a fake clock.
"""

from __future__ import annotations

import argparse
import json
import os
import types
from pathlib import Path

import pytest

from pysched.tools import bench
from pysched.tools.bench import BenchConfig, BenchReport, format_table, harness, run_bench, workload
from pysched.tools.bench import legacy as legacy_module
from pysched.tools.bench import peer as peer_module
from pysched.tools.bench import report as report_mod
from pysched.tools.bench.config import PEER_INDEXES

# the baselines are modules of the package: where they were imported from (a checkout or an installed wheel)
LEGACY = Path(legacy_module.__file__)
PEER = Path(peer_module.__file__)
COMPILED = bench.compiled_available()


def _tiny(**overrides) -> BenchConfig:
    # max_concurrency: a pool of 5 nodes holds 5,000,000 jobs, more than any implementation can dispatch
    # in a 0.15 s scenario, so no refusal is possible however the threads are scheduled (a thread
    # descheduled on a busy machine keeps its held jobs until it runs again).
    values = dict(nodes=30, pools=6, sessions=80, rates=(0.0, 2000.0), threads=(1, 2), duration=0.1,
                  warmup=0.05, goal_rate=2000.0, quick=True, max_concurrency=1_000_000)
    values.update(overrides)
    return BenchConfig(**values)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pysched bench")
    bench.add_arguments(parser)
    return parser


@pytest.fixture(scope="module")
def report() -> BenchReport:
    """One tiny run of all four implementations (the baselines imported as modules), shared by the structure tests."""
    lines: list[str] = []
    rep = run_bench(_tiny(), progress=lines.append)
    rep.progress_lines = lines  # type: ignore[attr-defined]
    return rep


def test_every_implementation_dispatches(report):
    cfg = report.config
    expected = ["compiled", "python", "peer", "legacy"] if COMPILED else ["python", "peer", "legacy"]
    assert report.missing == ({} if COMPILED else {"compiled": report.missing["compiled"]})
    assert report.legacy_path == str(LEGACY)
    assert report.peer_path == str(PEER) and report.peer_kind == "heap"
    assert not report.errors
    assert len(report.results) == len(expected) * 2 * 2
    for r in report.results:
        assert r.impl in expected
        # every dispatching thread makes at least one call, however late it first runs
        assert r.dispatches >= r.threads, r
        assert r.throughput > 0 and r.elapsed >= cfg.duration * 0.999
        assert set(r.latency_us) == {"p50", "p99", "p99.9", "max", "mean"}
        lat = r.latency_us
        assert 0 < lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
        # every call is a sample until a thread's buffer is full, then a uniform sample of them
        assert 0 < r.samples <= r.dispatches and (r.sampled or r.samples == r.dispatches)
        # capacity beyond anything a scenario can dispatch: nothing is refused
        assert r.failed == 0
        # CPU time of the dispatching threads: each thread's is within its own part of the window
        assert 0 <= r.dispatch_cpu_s <= r.threads * r.elapsed + 0.05
        assert r.throughput_per_cpu == (r.dispatches / r.dispatch_cpu_s if r.dispatch_cpu_s > 0 else 0.0)
        if r.rate > 0:
            # the heartbeat thread runs until the deadline and sends at least the first heartbeat
            assert r.heartbeat_elapsed >= cfg.duration * 0.999 and r.heartbeat_ratio is not None
            # the rate's time ends with the last burst, which began before the deadline
            assert 0 < r.heartbeat_active <= r.heartbeat_elapsed
            assert r.heartbeats >= 1 and r.heartbeat_errors == 0
            assert r.heartbeat_cpu_s >= 0
        else:
            assert r.heartbeats == 0 and r.heartbeat_ratio is None
    assert sum(r.dispatch_cpu_s for r in report.results) > 0
    # progress: a start and an end line per scenario
    assert len(report.progress_lines) == 2 * len(report.results)


def test_ratios_and_goals(report):
    pysched_impls = ["compiled", "python"] if COMPILED else ["python"]
    assert len(report.ratios) == len(pysched_impls) * 2 * 2 * 2  # x baselines x rates x threads
    assert {(row["impl"], row["baseline"]) for row in report.ratios} == {
        (impl, base) for impl in pysched_impls for base in ("peer", "legacy")}
    for row in report.ratios:
        for key in ("throughput", "cpu_throughput", "p50", "p99", "p99.9", "max"):
            assert row[key] is not None and row[key] > 0, (key, row)
        if row["rate"] == 0:
            assert row["heartbeats"] is None
    # per thread count: 2 vs legacy, heartbeats, 2 vs the peer; then the two p50 goals; all measurable at goal_rate
    assert len(report.goals) == 5 * 2 + 2
    assert sum("the peer's" in g.goal for g in report.goals) == 2 * 2
    if COMPILED:
        assert all(g.verdict in ("PASS", "MISS") and g.measured is not None for g in report.goals)
        compiled = report.result("compiled", 2000, 1)
        for p50_goal, target in zip(report.goals[-2:], (3.0, 0.6), strict=True):
            assert p50_goal.measured == pytest.approx(compiled.latency_us["p50"])
            assert p50_goal.passed == (compiled.latency_us["p50"] <= target)

        def ratio(baseline):
            return next(r for r in report.ratios
                        if (r["impl"], r["baseline"], r["rate"], r["threads"]) == ("compiled", baseline, 2000.0, 1))

        legacy = report.result("legacy", 2000, 1)
        assert ratio("legacy")["throughput"] == pytest.approx(compiled.throughput / legacy.throughput)
        assert ratio("legacy")["p99"] == pytest.approx(legacy.latency_us["p99"] / compiled.latency_us["p99"])
        peer = report.result("peer", 2000, 1)
        assert ratio("peer")["p50"] == pytest.approx(peer.latency_us["p50"] / compiled.latency_us["p50"])
        assert ratio("peer")["cpu_throughput"] == pytest.approx(compiled.throughput_per_cpu / peer.throughput_per_cpu)
        p50_peer, cpu_peer = [g for g in report.goals if "the peer's" in g.goal][:2]
        assert p50_peer.measured == pytest.approx(ratio("peer")["p50"])
        assert p50_peer.passed == (ratio("peer")["p50"] >= 5.0) and p50_peer.target == 5.0
        assert cpu_peer.measured == pytest.approx(ratio("peer")["cpu_throughput"])
        assert cpu_peer.passed == (ratio("peer")["cpu_throughput"] >= 3.0) and cpu_peer.target == 3.0
        # 30 nodes: the notes say where the goals are stated
        assert "1,000 and 10,000 nodes" in p50_peer.note and "1,000 nodes" in report.goals[0].note


def test_table_and_json(report, tmp_path):
    table = format_table(report)
    assert table.startswith("pysched bench: 30 nodes in 6 auto pools")
    assert "machine: " in table and "Python " in table
    assert f"peer: {PEER} (heap index)" in table
    for rate, threads in (("0", "1 dispatching thread"), ("2,000", "2 dispatching threads")):
        assert f"== {rate} heartbeats/s requested, {threads}" in table
    assert "legacy (multi-lock)" in table and "pysched (python twin)" in table and "peer (indexed, 1 lock)" in table
    assert "python vs legacy" in table and "python vs peer" in table and "per CPU-s" in table
    assert "GOALS" in table and ("[PASS]" in table or "[MISS]" in table)

    data = json.loads(json.dumps(report.to_dict()))  # plain JSON types throughout
    assert data["config"]["nodes"] == 30
    assert data["machine"]["python"] and data["machine"]["cores"]
    assert data["peer_path"] == str(PEER) and data["peer_kind"] == "heap"
    assert len(data["scenarios"]) == len(report.results)
    assert {"throughput", "throughput_per_cpu", "dispatch_cpu_s", "heartbeat_cpu_s", "latency_us", "heartbeat_rate",
            "failures"} <= set(data["scenarios"][0])
    assert len(data["ratios"]) == len(report.ratios)
    assert {r["baseline"] for r in data["ratios"]} == {"peer", "legacy"}
    assert all("cpu_throughput" in r for r in data["ratios"])
    assert {g["verdict"] for g in data["goals"]} <= {"PASS", "MISS", "N/A"}


def test_missing_legacy_still_runs_pysched(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = _parser().parse_args(["--quick", "--duration", "0.05", "--nodes", "20", "--sessions", "40",
                                 "--rates", "1000", "--threads", "1", "--legacy", str(tmp_path / "nope.py"),
                                 "--json", str(out), "--quiet"])
    assert bench.run(args) == 0
    captured = capsys.readouterr()
    assert "MISSING legacy (multi-lock)" in captured.out
    assert "legacy model not run" in captured.err and "nope.py" in captured.err
    data = json.loads(out.read_text(encoding="utf-8"))
    assert "legacy" in data["missing"]
    expected = {"compiled", "python", "peer"} if COMPILED else {"python", "peer"}
    assert {s["impl"] for s in data["scenarios"]} == expected
    assert all(s["dispatches"] > 0 for s in data["scenarios"])
    assert data["ratios"] and {r["baseline"] for r in data["ratios"]} == {"peer"}
    assert all(g["verdict"] == "N/A" for g in data["goals"] if "legacy" in g["goal"])


def test_missing_peer_still_runs_the_rest(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = _parser().parse_args(["--quick", "--duration", "0.05", "--nodes", "20", "--sessions", "40",
                                 "--rates", "20000", "--threads", "1", "--impl", "compiled,peer,legacy",
                                 "--peer", str(tmp_path / "nope.py"), "--legacy", str(LEGACY),
                                 "--json", str(out), "--quiet"])
    assert bench.run(args) == 0
    captured = capsys.readouterr()
    assert "MISSING peer (indexed, 1 lock)" in captured.out
    assert "peer not run" in captured.err and "nope.py" in captured.err
    data = json.loads(out.read_text(encoding="utf-8"))
    assert "peer" in data["missing"] and data["peer_path"] is None
    assert data["legacy_path"] == str(LEGACY)  # --legacy PATH loads that file
    assert "peer" not in {s["impl"] for s in data["scenarios"]}
    assert {r["baseline"] for r in data["ratios"]} <= {"legacy"}
    peer_goals = [g for g in data["goals"] if "the peer's" in g["goal"]]
    assert len(peer_goals) == 2 and all(g["verdict"] == "N/A" for g in peer_goals)
    if COMPILED:
        assert all("peer missing" in g["note"] for g in peer_goals)


def test_sortedlist_peer_runs(tmp_path):
    """The issue's SortedList design is selectable, so the choice of the heap can be checked."""
    try:
        import sortedcontainers  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("sortedcontainers is not installed (the bench extra)")
    rep = run_bench(_tiny(impls=("peer",), rates=(2000.0,), threads=(1,), peer_index="sortedlist"))
    assert rep.peer_kind == "sortedlist" and not rep.errors and not rep.missing
    (r,) = rep.results
    assert r.impl == "peer" and r.dispatches >= 1 and r.failed == 0
    assert rep.ratios == []


def test_run_quick_via_argparse(tmp_path, capsys):
    out = tmp_path / "quick.json"
    args = _parser().parse_args(["--quick", "--duration", "0.1", "--threads", "1,2", "--legacy", str(LEGACY),
                                 "--json", str(out)])
    assert bench.run(args) == 0
    captured = capsys.readouterr()
    assert "pysched bench: 200 nodes in 20 auto pools" in captured.out and "(--quick)" in captured.out
    assert "== 20,000 heartbeats/s requested, 2 dispatching threads" in captured.out
    assert "[1/" in captured.err and "results written to" in captured.err
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["config"]["quick"] is True and data["config"]["rates"] == [0.0, 20000.0]
    assert all(s["dispatches"] > 0 for s in data["scenarios"])
    assert {s["impl"] for s in data["scenarios"]} >= {"python", "peer", "legacy"}
    assert len(data["goals"]) == 5 * 2 + 2  # five goals per thread count (1 and 4), two once


def test_config_from_args():
    cfg = bench.config_from_args(_parser().parse_args([]))
    assert (cfg.nodes, cfg.pools, cfg.sessions, cfg.duration, cfg.hold_ms) == (1000, 50, 10_000, 2.0, 2.0)
    assert cfg.rates == (0.0, 2000.0, 20_000.0) and cfg.threads == (1, 4)
    assert cfg.impls == ("compiled", "python", "peer", "legacy") and not cfg.quick
    assert cfg.peer_path is None and cfg.peer_index is None
    quick = bench.config_from_args(_parser().parse_args(["--quick", "--nodes", "300", "--impl", "legacy,compiled,peer",
                                                         "--peer", "p.py", "--peer-index", "sortedlist"]))
    assert quick.quick and quick.nodes == 300 and quick.duration == 0.25
    assert quick.impls == ("compiled", "peer", "legacy")  # canonical order
    assert quick.peer_path == "p.py" and quick.peer_index == "sortedlist"
    assert bench.config_from_args(_parser().parse_args(["--nodes", "10"])).pools == 10


@pytest.mark.parametrize("argv", [["--impl", "rust"], ["--rates", "-5"], ["--threads", "0"], ["--duration", "0"],
                                  ["--peer-index", "avl"]])
def test_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2


def test_bad_config():
    with pytest.raises(ValueError, match="pools"):
        BenchConfig(nodes=5, pools=10)
    with pytest.raises(ValueError, match="impls"):
        BenchConfig(impls=())
    with pytest.raises(ValueError, match="peer_index"):
        BenchConfig(peer_index="avl")


def test_language_sets_are_distinct_and_realistic():
    sets = bench.language_sets(50)
    assert len(sets) == len(set(sets)) == 50
    assert all(2 <= len(s) <= 5 for s in sets)
    more = bench.language_sets(120)
    assert len(set(more)) == 120 and more[:50] == sets


def test_legacy_loader(tmp_path):
    # the default: the module of the package (so `pysched bench` runs from an installed wheel)
    assert bench.load_legacy() is legacy_module
    # --legacy PATH: another file stands in for it
    module = bench.load_legacy(LEGACY)
    assert module is not legacy_module and hasattr(module, "LegacyScheduler") and module.__file__ == str(LEGACY)
    bad = tmp_path / "legacy.py"
    bad.write_text("x = 1\n", encoding="utf-8")
    with pytest.raises(ImportError, match="LegacyScheduler"):
        bench.load_legacy(bad)
    with pytest.raises(ImportError, match="nope.py not found"):
        bench.load_legacy(tmp_path / "nope.py")


def test_peer_loader(tmp_path):
    assert bench.load_peer() is peer_module
    assert set(PEER_INDEXES) == set(peer_module.INDEXES)  # what --peer-index offers is what the peer has
    module = bench.load_peer(PEER)
    assert module.PeerScheduler is module.INDEXES["heap"]
    bad = tmp_path / "peer.py"
    bad.write_text("x = 1\n", encoding="utf-8")
    with pytest.raises(ImportError, match="PeerScheduler"):
        bench.load_peer(bad)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n", encoding="utf-8")
    with pytest.raises(ImportError, match="boom"):
        bench.load_peer(broken)


def test_bench_needs_no_checkout(tmp_path):
    """The baselines are importable modules: nothing is looked up relative to the current directory."""
    import subprocess
    import sys

    import pysched

    code = ("from pysched.tools.bench import load_legacy, load_peer; "
            "print(load_legacy().__name__, load_peer().__name__)")
    env = {**os.environ, "PYTHONPATH": str(Path(pysched.__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pysched.tools.bench.legacy", "pysched.tools.bench.peer"]


# ------------------------------------------------------------------ workers on a fake clock
class _FakeTime:
    """Stands in for the ``time`` module inside the bench's harness and workload: time moves only when
    the code under test calls the scheduler (``step_ns`` per call) or sleeps, so the pacing is checked exactly."""

    def __init__(self) -> None:
        self.ns = 0
        self.thread_ns = 0

    def perf_counter_ns(self) -> int:
        return self.ns

    def thread_time_ns(self) -> int:
        return self.thread_ns

    def sleep(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


class _CountingScheduler:
    def __init__(self, fake: _FakeTime, step_ns: int, unknown: frozenset = frozenset()) -> None:
        self.fake, self.step_ns, self.unknown = fake, step_ns, unknown
        self.heartbeats = 0
        self.dispatches = 0
        self.released: list[str] = []

    def heartbeat(self, node_id, **figures):
        self.fake.ns += self.step_ns
        self.fake.thread_ns += self.step_ns
        if node_id in self.unknown:
            raise KeyError(node_id)
        self.heartbeats += 1

    def dispatch(self, session_id, src, tgt):
        self.fake.ns += self.step_ns
        self.fake.thread_ns += self.step_ns
        self.dispatches += 1
        return types.SimpleNamespace(job_id=f"j{self.dispatches}")

    def release(self, job_id):
        self.released.append(job_id)
        return True


def test_heartbeat_pacing_on_a_fake_clock(monkeypatch):
    fake = _FakeTime()
    monkeypatch.setattr(harness, "time", fake)
    sched = _CountingScheduler(fake, step_ns=100_000, unknown=frozenset({"gone"}))  # 100 µs a heartbeat
    table = [("gone" if k % 10 == 0 else f"n{k}", 0, 1.0, 1.0, 1.0) for k in range(8192)]
    window = harness.Window()
    window.open(0, 100_000_000)  # a 0.1 s window
    beats = workload.TableHeartbeats(sched, table)
    pacer = harness.PacedHeartbeats(window, 2000.0, beats)
    pacer()
    assert not window.errors
    sent = beats.applied + beats.errors
    assert sent == pacer.sent
    # due-count pacing: one due at the start, then 2,000/s for 0.1 s
    assert 200 <= sent <= 202, sent
    assert beats.applied == sched.heartbeats and beats.errors == sent // 10 + (sent % 10 > 0)
    assert pacer.elapsed_ns >= window.deadline_ns and pacer.cpu_ns == sent * 100_000
    assert window.deadline_ns - 600_000 <= pacer.active_ns <= pacer.elapsed_ns


class _StarvedTime(_FakeTime):
    """A sleep from ``after_ns`` on lasts ``stall_ns``: the thread waits for the interpreter past the deadline."""

    def __init__(self, after_ns: int, stall_ns: int) -> None:
        super().__init__()
        self.after_ns, self.stall_ns = after_ns, stall_ns

    def sleep(self, seconds: float) -> None:
        self.ns += self.stall_ns if self.ns >= self.after_ns else int(seconds * 1e9)


def _paced(monkeypatch, fake: _FakeTime, step_ns: int, rate: float) -> tuple[harness.PacedHeartbeats, int]:
    """Pace heartbeats costing ``step_ns`` each at ``rate`` over a 0.1 s window on ``fake``.

    Returns the pacer and how many heartbeats it got applied.
    """
    monkeypatch.setattr(harness, "time", fake)
    sched = _CountingScheduler(fake, step_ns=step_ns)
    window = harness.Window()
    window.open(0, 100_000_000)
    beats = workload.TableHeartbeats(sched, [(f"n{k}", 0, 1.0, 1.0, 1.0) for k in range(1024)])
    pacer = harness.PacedHeartbeats(window, rate, beats)
    pacer()
    return pacer, beats.applied


def test_a_wait_after_the_last_burst_is_not_the_rates_time(monkeypatch):
    """A thread that waits past the deadline after its last burst applied everything due until then: 100 %."""
    pacer, applied = _paced(monkeypatch, _StarvedTime(after_ns=70_000_000, stall_ns=40_000_000), 10_000, 2000.0)
    assert pacer.elapsed_ns >= 110_000_000  # it ran past the deadline...
    assert 70_000_000 <= pacer.active_ns < 71_000_000  # ...but its last burst ended at 70 ms
    rate = applied / (pacer.active_ns / 1e9)
    assert 0.99 * 2000 <= rate <= 1.01 * 2000, rate


def test_a_scheduler_slower_than_the_rate_shows_in_it(monkeypatch):
    """Heartbeats costing 1 ms at 2,000/s: half of what is due gets applied, and the rate says so."""
    pacer, applied = _paced(monkeypatch, _FakeTime(), 1_000_000, 2000.0)
    assert pacer.active_ns >= 100_000_000  # the last burst ends at or after the deadline
    rate = applied / (pacer.active_ns / 1e9)
    assert 0.45 * 2000 <= rate <= 0.55 * 2000, rate


def _recorder(cap: int, seed: int = 1) -> harness.LatencyRecorder:
    return harness.LatencyRecorder(cap, keep=cap, seed=seed)


def test_late_threads_still_make_one_call(monkeypatch):
    """A worker that first runs after its window closed (a saturated machine) still makes one call."""
    fake = _FakeTime()
    monkeypatch.setattr(harness, "time", fake)
    monkeypatch.setattr(workload, "time", fake)
    fake.ns = 500_000_000  # 0.5 s late for a window that ended at 0.1 s
    sched = _CountingScheduler(fake, step_ns=1000)
    window = harness.Window()
    window.open(0, 100_000_000)
    beats = workload.TableHeartbeats(sched, [("n", 0, 1.0, 1.0, 1.0)] * 8192)
    harness.PacedHeartbeats(window, 2000.0, beats)()
    assert 1 <= beats.applied <= 64 and beats.applied == sched.heartbeats  # one burst of what was due
    worker = workload.DispatchWorker(sched, [("s1", "en", "zh"), ("s2", "en", "zh")], window, 2_000_000, {},
                                     _recorder(16))
    worker()
    assert worker.count == 1 == sched.dispatches and worker.end_ns >= window.deadline_ns
    assert worker.cpu_ns == 1000 and list(worker.latency.samples()) == [1000]
    # a thread without sessions (more threads than sessions) ends at once instead of spinning
    idle = workload.DispatchWorker(sched, [], window, 2_000_000, {}, _recorder(16, 2))
    idle()
    assert idle.count == 0 and sched.dispatches == 1


def test_dispatch_worker_window_on_a_fake_clock(monkeypatch):
    fake = _FakeTime()
    monkeypatch.setattr(workload, "time", fake)
    sched = _CountingScheduler(fake, step_ns=10_000)  # 10 µs a dispatch
    window = harness.Window()
    window.open(0, 1_000_000)  # 1 ms
    worker = workload.DispatchWorker(sched, [("s1", "en", "zh"), ("s2", "en", "zh"), ("s3", "en", "zh")], window,
                                     300_000, {}, _recorder(1000))  # jobs held 0.3 ms
    worker()
    assert worker.count == sched.dispatches == 100  # 1 ms / 10 µs
    assert worker.end_ns == 1_000_000 and worker.cpu_ns == 100 * 10_000
    assert set(worker.latency.samples()) == {10_000}
    # jobs are released in order once their hold time passed; the last 0.3 ms of jobs are still held
    assert sched.released == [f"j{k}" for k in range(1, len(sched.released) + 1)]
    assert 100 - 31 <= len(sched.released) <= 100 - 29


def test_latency_recorder_grows_then_samples():
    """Every sample is kept up to ``keep`` (the buffer grows), a uniform sample of them beyond; max stays exact."""
    rec = harness.LatencyRecorder(4, keep=8, seed=3)
    lat, cap = rec.buffer, rec.capacity
    n = 0
    for dt in range(1, 101):
        if n < cap:
            lat[n] = dt
        else:
            cap = rec.overflow(n, dt)
        n += 1
    rec.count = n
    kept = list(rec.samples())
    assert cap == rec.capacity == 8 and len(kept) == 8 and rec.sampled
    assert set(kept) != set(range(1, 9))  # the reservoir replaced some of the first eight
    assert set(kept) <= set(range(1, 101)) and len(set(kept)) == 8
    summary = harness.summarise([rec])
    assert summary.samples == 8 and summary.sampled
    assert summary.us["max"] == 0.1  # 100 ns: the largest sample, kept or not
    unbounded = harness.LatencyRecorder(2)
    lat, cap = unbounded.buffer, unbounded.capacity
    for n, dt in enumerate((5, 6, 7, 8, 9)):
        if n < cap:
            lat[n] = dt
        else:
            cap = unbounded.overflow(n, dt)
    unbounded.count = 5
    assert list(unbounded.samples()) == [5, 6, 7, 8, 9] and not unbounded.sampled
    assert harness.summarise([]).us == {} and harness.summarise([]).samples == 0


def test_threads_report_what_a_worker_raised():
    window = harness.Window()
    runner = harness.Threads(window)

    def boom() -> None:
        raise RuntimeError("boom")

    runner.add(boom, "t-boom", "dispatch thread")
    runner.add(window.go.wait, "t-wait", "heartbeat thread")
    runner.start()
    window.open(0, 1)
    runner.join()
    assert [str(e) for e in window.errors] == ["dispatch thread: RuntimeError: boom"]


def test_a_failed_scenario_has_no_ratios_or_verdicts(tmp_path):
    """An implementation whose setup raises is reported as an error; its zeros make no ratio or goal."""
    cfg = _tiny(rates=(2000.0,), threads=(1,), impls=("python", "peer"))
    good = bench.ScenarioResult("peer", 2000.0, 1, elapsed=0.1, dispatches=10, dispatch_cpu_s=0.05,
                                latency_us={"p50": 2.0, "p99": 3.0, "p99.9": 4.0, "max": 5.0, "mean": 2.0})
    broken = bench.ScenarioResult("python", 2000.0, 1, error="setup: AttributeError: boom")
    ratios = report_mod.ratios([broken, good], cfg)
    assert ratios == []
    broken_c = bench.ScenarioResult("compiled", 2000.0, 1, error="setup: AttributeError: boom")
    cfg_c = _tiny(rates=(2000.0,), threads=(1,), impls=("compiled", "peer"))
    goals = report_mod.check_goals([broken_c, good], report_mod.ratios([broken_c, good], cfg_c), cfg_c, {})
    assert len(goals) == len(bench.GOALS) and all(g.verdict == "N/A" and g.measured is None for g in goals)
    assert all("compiled raised: setup: AttributeError: boom" in g.note for g in goals)


def test_goals_are_data():
    """The goals the table reports are the GOALS records, in order, with their targets."""
    cfg = _tiny(rates=(2000.0,), threads=(1, 2))
    goals = report_mod.check_goals([], [], cfg, {})
    per_thread = [g for g in bench.GOALS if g.per_thread_count]
    once = [g for g in bench.GOALS if not g.per_thread_count]
    assert [g.goal for g in goals] == [g.text for g in per_thread] * 2 + [g.text for g in once]
    assert [g.target for g in goals[:len(per_thread)]] == [g.target for g in per_thread]
    assert goals[0].goal == "dispatch throughput >= 20x legacy" and goals[2].goal.endswith(">= 95% of requested")
