"""Runs ``pysched bench``'s scenarios: :func:`run_bench` and one :func:`run_scenario`.

The scenario matrix is implementations x heartbeat rates x dispatching
threads. Implementations are interleaved within each (rate, threads) block,
so every ratio compares runs made seconds apart, under the same machine load.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable

from pysched.tools.bench.config import IMPLEMENTATIONS, BenchConfig
from pysched.tools.bench.harness import LatencyRecorder, PacedHeartbeats, Threads, Window, summarise
from pysched.tools.bench.implementations import Implementation, prepare
from pysched.tools.bench.report import BenchReport, ScenarioResult, check_goals, machine_info, ratios
from pysched.tools.bench.workload import (
    SERVICES,
    BenchScheduler,
    DispatchWorker,
    TableHeartbeats,
    Workload,
    build_workload,
)

__all__ = ["run_bench", "run_scenario"]

#: latency samples a dispatching thread makes room for per second of window
#: (more than any implementation dispatches on one thread; the recorder grows beyond)
_SAMPLES_PER_SECOND = 1_500_000


def _warm_up(sched: BenchScheduler, impl: Implementation, workload: Workload, seconds: float) -> int:
    """Bind sessions once, so the window measures steady-state dispatch; how many were bound.

    Capped in time because the pure-Python twin takes seconds for 10,000 sessions.
    """
    limit = time.perf_counter() + seconds
    warmed = 0
    expected = tuple(impl.failures)
    for sid, src, tgt in workload.sessions:
        if time.perf_counter() >= limit:
            break
        with contextlib.suppress(*expected):
            sched.release(sched.dispatch(sid, src, tgt).job_id)
        warmed += 1
    return warmed


def run_scenario(impl: Implementation, workload: Workload, rate: float, threads: int,
                 config: BenchConfig) -> ScenarioResult:
    """Run one implementation under one (heartbeat rate, dispatching threads) load.

    A fresh scheduler, the workload's nodes registered, its sessions bound
    (warm-up), then ``config.duration`` seconds of ``threads`` dispatching
    threads and, at a rate above 0, the paced heartbeat thread.

    :param impl: the implementation.
    :param workload: nodes, sessions and heartbeats (:func:`~.workload.build_workload`).
    :param rate: heartbeats per second (0: no heartbeat thread).
    :param threads: dispatching threads.
    :param config: the run's configuration.
    """
    result = ScenarioResult(impl.name, rate, threads)
    t = time.perf_counter()
    try:
        sched = impl.build()
        for node_id, langs in workload.nodes:
            sched.register_node(node_id, langs, services=SERVICES, max_concurrency=config.max_concurrency)
    except Exception as exc:  # one broken implementation must not cost the others' results
        result.error = f"setup: {type(exc).__name__}: {exc}"
        return result
    result.setup_s = time.perf_counter() - t

    t = time.perf_counter()
    result.warmed_sessions = _warm_up(sched, impl, workload, config.warmup_seconds)
    result.warmup_s = time.perf_counter() - t

    window = Window()
    runner = Threads(window)
    hold_ns = int(config.hold_ms * 1e6)
    expected_samples = int(config.duration * _SAMPLES_PER_SECOND) + 1024
    workers = [
        DispatchWorker(sched, workload.sessions[k::threads], window, hold_ns, impl.failures,
                       LatencyRecorder(expected_samples, keep=config.max_samples, seed=config.seed * 1000 + k))
        for k in range(threads)
    ]
    for k, w in enumerate(workers):
        runner.add(w, f"bench-dispatch-{k}", "dispatch thread")
    beats = TableHeartbeats(sched, workload.heartbeats) if rate > 0 else None
    hb = None if beats is None else PacedHeartbeats(window, rate, beats)
    if hb is not None:
        runner.add(hb, "bench-heartbeat", "heartbeat thread")
    runner.start()
    # a collection left over from setup would otherwise land in the window
    gc.collect()
    time.sleep(0.01)  # let every thread reach go.wait()
    start = time.perf_counter_ns()
    window.open(start, start + int(config.duration * 1e9))
    runner.join()

    end = max(w.end_ns for w in workers)
    result.elapsed = max(0, end - window.start_ns) / 1e9
    result.dispatches = sum(w.count for w in workers)
    result.dispatch_cpu_s = sum(w.cpu_ns for w in workers) / 1e9
    failures: dict[str, int] = {}
    for w in workers:
        for kind, n in w.failures.items():
            failures[kind] = failures.get(kind, 0) + n
    result.failures = failures
    if hb is not None and beats is not None:
        result.heartbeats = beats.applied
        result.heartbeat_errors = beats.errors
        result.heartbeat_elapsed = hb.elapsed_ns / 1e9
        result.heartbeat_active = hb.active_ns / 1e9
        result.heartbeat_cpu_s = hb.cpu_ns / 1e9
    latency = summarise(w.latency for w in workers)
    result.samples = latency.samples
    result.sampled = latency.sampled
    result.latency_us = latency.us
    if window.errors:
        # the same failure in several threads is reported once, with how many threads raised it
        seen: dict[str, int] = {}
        for e in window.errors:
            seen[str(e)] = seen.get(str(e), 0) + 1
        result.error = "; ".join(e if n == 1 else f"{e} (in {n} threads)" for e, n in seen.items())
    close = getattr(sched, "close", None)
    if close is not None:
        close()
    return result


def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Run every scenario of ``config`` and return the report.

    Implementations that cannot run (a baseline that does not load, no
    compiled extension) are listed in ``report.missing``; the others still run.

    :param config: what to run.
    :param progress: called with one line of text as each scenario starts and ends.
    """
    wall = time.perf_counter()

    def say(line: str) -> None:
        if progress is not None:
            progress(line)

    machine = machine_info()
    found = prepare(config)
    workload = build_workload(config)

    results: list[ScenarioResult] = []
    total = len(config.rates) * len(config.threads) * len(found.runnable)
    done = 0
    for rate in config.rates:
        for threads in config.threads:
            for impl in found.runnable:
                done += 1
                say(f"[{done}/{total}] {IMPLEMENTATIONS[impl.name]}, {rate:,.0f} heartbeats/s, "
                    f"{threads} dispatch thread{'s' if threads > 1 else ''} ...")
                r = run_scenario(impl, workload, rate, threads, config)
                results.append(r)
                lat = r.latency_us
                say(f"    {r.throughput:,.0f} dispatches/s ({r.throughput_per_cpu:,.0f} per CPU-s), "
                    f"p50 {lat.get('p50', float('nan')):.1f} us, "
                    f"p99 {lat.get('p99', float('nan')):.1f} us, {r.heartbeat_rate:,.0f} heartbeats/s"
                    + (f"; ERROR {r.error}" if r.error else ""))
    ratio_rows = ratios(results, config)
    goals = check_goals(results, ratio_rows, config, found.missing)
    return BenchReport(config, machine, results, ratio_rows, goals, found.missing, found.legacy_path,
                       time.perf_counter() - wall, found.peer_path, found.peer_kind)
