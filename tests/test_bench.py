"""``pysched bench`` and :mod:`pysched.bench`.

Every run here is a real, tiny benchmark (threads, heartbeats, all three
implementations) with scenarios of about 0.1 s, so the file takes a few
seconds; the figures themselves are not asserted, only that each
implementation dispatched and the report is complete.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pysched import bench
from pysched.bench import BenchConfig, BenchReport, format_table, run_bench

REPO_ROOT = Path(__file__).resolve().parents[1]
LEGACY = REPO_ROOT / "benchmarks" / "legacy.py"
COMPILED = bench._compiled_available()


def _tiny(**overrides) -> BenchConfig:
    # max_concurrency: a pool of 5 nodes holds 5,000,000 jobs, more than any implementation can dispatch
    # in a 0.15 s scenario, so no refusal is possible however the threads are scheduled (a thread
    # descheduled on a busy machine keeps its held jobs until it runs again).
    values = dict(nodes=30, pools=6, sessions=80, rates=(0.0, 2000.0), threads=(1, 2), duration=0.1,
                  warmup=0.05, legacy_path=str(LEGACY), goal_rate=2000.0, quick=True, max_concurrency=1_000_000)
    values.update(overrides)
    return BenchConfig(**values)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pysched bench")
    bench.add_arguments(parser)
    return parser


@pytest.fixture(scope="module")
def report() -> BenchReport:
    """One tiny run of all three implementations, shared by the structure tests."""
    assert LEGACY.is_file(), "the tests expect a source checkout with benchmarks/legacy.py"
    lines: list[str] = []
    rep = run_bench(_tiny(), progress=lines.append)
    rep.progress_lines = lines  # type: ignore[attr-defined]
    return rep


def test_every_implementation_dispatches(report):
    expected = ["compiled", "python", "legacy"] if COMPILED else ["python", "legacy"]
    assert report.missing == ({} if COMPILED else {"compiled": report.missing["compiled"]})
    assert report.legacy_path == str(LEGACY)
    assert not report.errors
    assert len(report.results) == len(expected) * 2 * 2
    for r in report.results:
        assert r.impl in expected
        assert r.dispatches > 0, r
        assert r.throughput > 0 and r.elapsed > 0
        assert set(r.latency_us) == {"p50", "p99", "p99.9", "max", "mean"}
        lat = r.latency_us
        assert 0 < lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
        assert r.samples == r.dispatches and not r.sampled
        # capacity beyond anything a scenario can dispatch: nothing is refused
        assert r.failed == 0
        if r.rate > 0:
            # not > 0 per scenario: on a saturated machine the heartbeat thread
            # may not be scheduled at all within a 0.1 s window (a real result)
            assert r.heartbeat_elapsed >= r.elapsed * 0.5 and r.heartbeat_ratio is not None
            assert r.heartbeat_errors == 0
        else:
            assert r.heartbeats == 0 and r.heartbeat_ratio is None
    assert sum(r.heartbeats for r in report.results if r.rate > 0) > 0
    # progress: a start and an end line per scenario
    assert len(report.progress_lines) == 2 * len(report.results)


def test_ratios_and_goals(report):
    pysched_impls = ["compiled", "python"] if COMPILED else ["python"]
    assert len(report.ratios) == len(pysched_impls) * 2 * 2
    for row in report.ratios:
        assert row["impl"] in pysched_impls
        for key in ("throughput", "p50", "p99", "p99.9", "max"):
            assert row[key] is not None and row[key] > 0, (key, row)
        if row["rate"] == 0:
            assert row["heartbeats"] is None
    # three goals per thread count plus the p50 goal, all measurable at goal_rate=2000
    assert len(report.goals) == 3 * 2 + 1
    if COMPILED:
        assert all(g.verdict in ("PASS", "MISS") and g.measured is not None for g in report.goals)
        compiled = report.result("compiled", 2000, 1)
        p50_goal = report.goals[-1]
        assert p50_goal.measured == pytest.approx(compiled.latency_us["p50"])
        assert p50_goal.passed == (compiled.latency_us["p50"] <= 3.0)
        ratio = next(r for r in report.ratios if (r["impl"], r["rate"], r["threads"]) == ("compiled", 2000.0, 1))
        legacy = report.result("legacy", 2000, 1)
        assert ratio["throughput"] == pytest.approx(compiled.throughput / legacy.throughput)
        assert ratio["p99"] == pytest.approx(legacy.latency_us["p99"] / compiled.latency_us["p99"])


def test_table_and_json(report, tmp_path):
    table = format_table(report)
    assert table.startswith("pysched bench: 30 nodes in 6 auto pools")
    assert "machine: " in table and "Python " in table
    for rate, threads in (("0", "1 dispatching thread"), ("2,000", "2 dispatching threads")):
        assert f"== {rate} heartbeats/s requested, {threads}" in table
    assert "legacy (multi-lock)" in table and "pysched (python twin)" in table
    assert "python vs legacy" in table
    assert "GOALS" in table and ("[PASS]" in table or "[MISS]" in table)

    data = json.loads(json.dumps(report.to_dict()))  # plain JSON types throughout
    assert data["config"]["nodes"] == 30
    assert data["machine"]["python"] and data["machine"]["cores"]
    assert len(data["scenarios"]) == len(report.results)
    assert {"throughput", "latency_us", "heartbeat_rate", "failures"} <= set(data["scenarios"][0])
    assert len(data["ratios"]) == len(report.ratios)
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
    assert {s["impl"] for s in data["scenarios"]} == ({"compiled", "python"} if COMPILED else {"python"})
    assert all(s["dispatches"] > 0 for s in data["scenarios"])
    assert data["ratios"] == []
    assert all(g["verdict"] == "N/A" for g in data["goals"] if "legacy" in g["goal"])


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
    assert len(data["goals"]) == 7


def test_config_from_args():
    cfg = bench.config_from_args(_parser().parse_args([]))
    assert (cfg.nodes, cfg.pools, cfg.sessions, cfg.duration, cfg.hold_ms) == (1000, 50, 10_000, 2.0, 2.0)
    assert cfg.rates == (0.0, 2000.0, 20_000.0) and cfg.threads == (1, 4)
    assert cfg.impls == ("compiled", "python", "legacy") and not cfg.quick
    quick = bench.config_from_args(_parser().parse_args(["--quick", "--nodes", "300", "--impl", "legacy,compiled"]))
    assert quick.quick and quick.nodes == 300 and quick.duration == 0.25
    assert quick.impls == ("compiled", "legacy")  # canonical order
    assert bench.config_from_args(_parser().parse_args(["--nodes", "10"])).pools == 10


@pytest.mark.parametrize("argv", [["--impl", "rust"], ["--rates", "-5"], ["--threads", "0"], ["--duration", "0"]])
def test_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2


def test_bad_config():
    with pytest.raises(ValueError, match="pools"):
        BenchConfig(nodes=5, pools=10)
    with pytest.raises(ValueError, match="impls"):
        BenchConfig(impls=())


def test_language_sets_are_distinct_and_realistic():
    sets = bench.language_sets(50)
    assert len(sets) == len(set(sets)) == 50
    assert all(2 <= len(s) <= 5 for s in sets)
    more = bench.language_sets(120)
    assert len(set(more)) == 120 and more[:50] == sets


def test_legacy_loader(tmp_path):
    found, looked = bench.locate_legacy(LEGACY)
    assert found == LEGACY and looked == [LEGACY]
    module = bench.load_legacy(LEGACY)
    assert hasattr(module, "LegacyScheduler")
    bad = tmp_path / "legacy.py"
    bad.write_text("x = 1\n", encoding="utf-8")
    with pytest.raises(ImportError, match="LegacyScheduler"):
        bench.load_legacy(bad)
