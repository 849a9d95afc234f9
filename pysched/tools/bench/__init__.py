"""``pysched bench``: one workload, several scheduler implementations, one process.

:func:`run_bench` drives the same workload against

1. ``compiled``: pysched with its compiled (Cython) kernel;
2. ``python``: pysched with the kernel's pure-Python twin;
3. ``peer``: a pure-Python indexed scheduler, the design a competent Python
   engineer writes in an afternoon (one lock, an ordered index per pool
   re-keyed on every change), :mod:`pysched.tools.bench.peer`;
4. ``legacy``: the pure-Python model of the old multi-lock design,
   :mod:`pysched.tools.bench.legacy`.

Each scenario (implementation x heartbeat rate x dispatching threads)
builds a fresh scheduler with the same nodes and sessions (same seed), binds
every session once (untimed warm-up, capped in time), then runs for
``duration`` seconds:

* ``threads`` dispatching threads, each looping over its share of the
  sessions: ``dispatch(session, src, tgt)`` timed with ``perf_counter_ns``
  (the call only), the job queued for release ``hold_ms`` later; due jobs are
  released in the same loop (no sleeping per job);
* one heartbeat thread (none at rate 0) sending load-only heartbeats for
  random nodes, paced by a due-count against elapsed time.

Per scenario it reports dispatch throughput, dispatches per CPU-second of
the dispatching threads (``time.thread_time``: the CPU a dispatching thread
spent in the window, its own loop and releases included), latency
p50/p99/p99.9/max, heartbeats actually applied per second, and failures; per
(rate, threads) the ratios of each pysched implementation to the peer and
to legacy; and the goals as PASS/MISS.

The modules: :mod:`~.config` (what a run measures), :mod:`~.workload` (the
fleet, the sessions, the loops driving them), :mod:`~.harness` (latency
recording, percentiles, threads, the paced heartbeat thread; shared with
``pysched simulate``), :mod:`~.implementations` (what is compared and how
each is built), :mod:`~.runner` (the scenarios), :mod:`~.report` (results,
ratios, the goals, the table), :mod:`~.command` (the subcommand's options).

>>> from pysched.tools.bench import BenchConfig, run_bench
>>> report = run_bench(BenchConfig(nodes=20, pools=4, sessions=50, rates=(0,), threads=(1,),
...                                duration=0.05, impls=("python",)))
>>> report.result("python", 0, 1).dispatches > 0
True
"""

from pysched.tools.bench.command import add_arguments, config_from_args, main, run
from pysched.tools.bench.config import IMPLEMENTATIONS, BenchConfig
from pysched.tools.bench.implementations import compiled_available, load_legacy, load_peer
from pysched.tools.bench.report import GOALS, BenchReport, Goal, GoalVerdict, ScenarioResult, format_table, machine_info
from pysched.tools.bench.runner import run_bench, run_scenario
from pysched.tools.bench.workload import LANGUAGE_SETS, language_sets

__all__ = [
    "GOALS",
    "IMPLEMENTATIONS",
    "LANGUAGE_SETS",
    "BenchConfig",
    "BenchReport",
    "Goal",
    "GoalVerdict",
    "ScenarioResult",
    "add_arguments",
    "compiled_available",
    "config_from_args",
    "format_table",
    "language_sets",
    "load_legacy",
    "load_peer",
    "machine_info",
    "main",
    "run",
    "run_bench",
    "run_scenario",
]
