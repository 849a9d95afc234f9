"""``pysched bench``: one workload, several scheduler implementations, one process.

:func:`run_bench` drives the same workload against

1. ``compiled``: pysched with its compiled (Cython) kernel;
2. ``python``: pysched with the kernel's pure-Python twin;
3. ``peer``: a pure-Python indexed scheduler, the design a competent Python
   engineer writes in an afternoon (one lock, an ordered index per pool
   re-keyed on every change), in ``benchmarks/peer.py``;
4. ``legacy``: the pure-Python model of the old multi-lock design in
   ``benchmarks/legacy.py``.

The two baselines are not part of the installed package: each is loaded
from a path (``--peer PATH`` / ``--legacy PATH``, else ``benchmarks/<name>.py``
under the current directory, else under the source checkout this package
was imported from). Without one the others still run and its columns are
marked missing.

The scenario matrix is implementations x heartbeat rates x dispatching
threads. Each scenario builds a fresh scheduler with the same nodes and
sessions (same seed), binds every session once (untimed warm-up, capped in
time), then runs for ``duration`` seconds:

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

>>> from pysched.bench import BenchConfig, run_bench, format_table
>>> report = run_bench(BenchConfig(nodes=20, pools=4, sessions=50, rates=(0,), threads=(1,),
...                                duration=0.05, impls=("compiled",)))
>>> report.result("compiled", 0, 1).dispatches > 0
True
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import random
import sys
import threading
import time
import types
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import pysched
from pysched.cli import positive_int
from pysched.errors import NoNodeAvailable, NoPoolForLanguagePair
from pysched.scheduler import Scheduler

__all__ = [
    "IMPLEMENTATIONS",
    "LANGUAGE_SETS",
    "BenchConfig",
    "BenchReport",
    "GoalVerdict",
    "ScenarioResult",
    "add_arguments",
    "format_table",
    "language_sets",
    "load_legacy",
    "load_peer",
    "locate_legacy",
    "locate_peer",
    "machine_info",
    "run",
    "run_bench",
]

#: implementation name -> label in the table, in the order they are run and shown
IMPLEMENTATIONS: dict[str, str] = {
    "compiled": "pysched (compiled)",
    "python": "pysched (python twin)",
    "peer": "peer (indexed, 1 lock)",
    "legacy": "legacy (multi-lock)",
}
_PYSCHED_IMPLS = ("compiled", "python")
#: what pysched is compared with, in the order the ratio rows are shown
BASELINES = ("peer", "legacy")

#: Realistic node language sets (English-centric pairs, CJK, European and
#: regional groups). Auto pools are one per distinct set, so the first
#: ``pools`` of these become the pools; more are generated if asked for.
LANGUAGE_SETS: tuple[tuple[str, ...], ...] = (
    ("en", "zh"), ("en", "ja"), ("de", "en", "fr"), ("en", "es", "pt"), ("en", "ja", "ko", "zh"),
    ("en", "es"), ("en", "fr"), ("en", "ko"), ("de", "en"), ("en", "ru"),
    ("ar", "en"), ("en", "hi"), ("en", "fr", "it"), ("en", "th", "vi"), ("en", "id", "ms"),
    ("en", "tr"), ("en", "pl"), ("en", "nl"), ("en", "ru", "uk"), ("en", "pt"),
    ("en", "it"), ("en", "vi"), ("en", "th"), ("en", "id"), ("en", "yue", "zh"),
    ("ja", "zh"), ("ko", "zh"), ("ja", "ko"), ("de", "fr"), ("es", "fr"),
    ("es", "pt"), ("en", "he"), ("en", "fa"), ("en", "hi", "ur"), ("bn", "en", "hi"),
    ("en", "ta"), ("da", "en", "sv"), ("en", "fi"), ("cs", "en", "sk"), ("el", "en"),
    ("en", "ro"), ("en", "hu"), ("en", "tl"), ("en", "sw"), ("de", "en", "es", "fr", "it"),
    ("en", "es", "zh"), ("ar", "en", "fr"), ("en", "ms"), ("en", "es", "fr", "pt"), ("de", "en", "nl"),
    ("bg", "en", "ru"), ("en", "nb"), ("en", "ja", "zh"), ("ar", "en", "fa"), ("en", "km", "th"),
)
# languages the generator draws from once LANGUAGE_SETS is exhausted
_EXTRA_LANGUAGES = ("en", "zh", "es", "fr", "de", "ja", "ko", "pt", "ru", "ar", "hi", "it", "nl", "pl", "tr",
                    "vi", "th", "id", "uk", "sv", "he", "fa", "cs", "el", "ro", "hu", "da", "fi", "ms", "bn")

_SERVICES = ("asr", "nmt", "tts", "semantic")
_PEER_INDEXES = ("heap", "sortedlist")  # benchmarks/peer.py's INDEXES
_AUTO_FRACTION = 0.10  # of sessions: src="auto"
_HB_TABLE = 8192  # precomputed heartbeat arguments, cycled (power of two: index by mask)
_HB_BURST = 64  # most heartbeats per burst before looking at the clock again
_HB_SLEEP = 0.0005  # seconds between bursts once caught up
_GOAL_THROUGHPUT = 20.0  # pysched/legacy dispatch throughput, at least
_GOAL_P99 = 30.0  # legacy p99 / pysched p99, at least
_GOAL_HEARTBEATS = 0.95  # applied / requested heartbeat rate, at least
_GOAL_P50_US = 3.0  # compiled pysched p50, at most (µs)
_GOAL_PEER_P50 = 5.0  # peer p50 / pysched p50, at least (issue 7)
_GOAL_PEER_CPU = 3.0  # pysched / peer dispatches per dispatching CPU-second, at least (issue 7)
_PEER_GOAL_NODES = (1000, 10_000)  # node counts issue 7 states its peer goals at


# ------------------------------------------------------------------ config
@dataclass
class BenchConfig:
    """What :func:`run_bench` runs. The defaults are the issue's full run (about a minute)."""

    nodes: int = 1000
    pools: int = 50  #: distinct language sets, i.e. auto pools; nodes are spread evenly over them
    sessions: int = 10_000
    rates: tuple[float, ...] = (0.0, 2000.0, 20_000.0)  #: requested heartbeats/s (0: no heartbeat thread)
    threads: tuple[int, ...] = (1, 4)  #: dispatching threads
    duration: float = 2.0  #: measured seconds per scenario
    hold_ms: float = 2.0  #: simulated processing time before a job is released
    impls: tuple[str, ...] = ("compiled", "python", "peer", "legacy")
    legacy_path: str | None = None  #: benchmarks/legacy.py; None: look in the usual places
    peer_path: str | None = None  #: benchmarks/peer.py; None: look in the usual places
    peer_index: str | None = None  #: the peer's index ("heap", "sortedlist"); None: its default (the faster)
    seed: int = 1
    #: per node; large so the fleet never fills and throughput measures dispatch, not refusals
    max_concurrency: int = 64
    #: seconds at most spent binding sessions before each scenario (None: min(1, duration / 2))
    warmup: float | None = None
    max_samples: int = 2_000_000  #: latency samples kept per thread (reservoir-sampled beyond)
    goal_rate: float = 20_000.0  #: heartbeat rate the goals are evaluated at
    quick: bool = False  #: informational: the run was a ``--quick`` smoke run

    def __post_init__(self) -> None:
        for name in ("nodes", "pools", "sessions", "max_concurrency", "max_samples"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.pools > self.nodes:
            raise ValueError(f"pools ({self.pools}) must not exceed nodes ({self.nodes}): every pool needs a node")
        for name in ("duration", "goal_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not 0 <= self.hold_ms < math.inf:
            raise ValueError(f"hold_ms must be >= 0, got {self.hold_ms!r}")
        if self.warmup is not None and not 0 <= self.warmup < math.inf:
            raise ValueError(f"warmup must be >= 0 or None, got {self.warmup!r}")
        # duplicates dropped (order kept): one block per distinct scenario
        self.rates = tuple(dict.fromkeys(float(r) for r in self.rates))
        if not self.rates or any(not 0 <= r < math.inf for r in self.rates):
            raise ValueError(f"rates must be non-empty, each >= 0, got {self.rates!r}")
        self.threads = tuple(dict.fromkeys(self.threads))
        if not self.threads or any(type(t) is not int or t < 1 for t in self.threads):
            raise ValueError(f"threads must be non-empty ints >= 1, got {self.threads!r}")
        self.impls = tuple(self.impls)
        unknown = [i for i in self.impls if i not in IMPLEMENTATIONS]
        if unknown or not self.impls:
            raise ValueError(f"impls must name some of {', '.join(IMPLEMENTATIONS)}; got {self.impls!r}")
        # canonical order, duplicates dropped: the table's columns do not depend on how they were typed
        self.impls = tuple(i for i in IMPLEMENTATIONS if i in self.impls)
        if self.peer_index is not None and self.peer_index not in _PEER_INDEXES:
            raise ValueError(f"peer_index must be one of {', '.join(_PEER_INDEXES)} or None, "
                             f"got {self.peer_index!r}")

    @property
    def warmup_seconds(self) -> float:
        return min(1.0, self.duration / 2) if self.warmup is None else float(self.warmup)

    @classmethod
    def quick_config(cls, **overrides: Any) -> BenchConfig:
        """A smoke run of a few seconds: 200 nodes, 0.25 s scenarios, rates 0 and 20,000."""
        values: dict[str, Any] = dict(nodes=200, pools=20, sessions=2000, rates=(0.0, 20_000.0), threads=(1, 4),
                                      duration=0.25, quick=True)
        values.update(overrides)
        return cls(**values)


# ------------------------------------------------------------------ results
@dataclass
class ScenarioResult:
    """One implementation under one (heartbeat rate, dispatching threads) load."""

    impl: str
    rate: float  #: requested heartbeats/s
    threads: int
    elapsed: float = 0.0  #: seconds of the measured window
    dispatches: int = 0  #: successful dispatch() calls in the window
    failures: dict[str, int] = field(default_factory=dict)  #: failed calls: no_node / no_pool
    latency_us: dict[str, float] = field(default_factory=dict)  #: p50, p99, p99.9, max, mean
    samples: int = 0  #: latency samples the percentiles were computed from
    sampled: bool = False  #: a thread exceeded max_samples and kept a uniform sample
    #: CPU seconds the dispatching threads used in the window (time.thread_time), all threads together
    dispatch_cpu_s: float = 0.0
    heartbeats: int = 0  #: heartbeats applied in the window
    heartbeat_elapsed: float = 0.0  #: seconds the heartbeat thread ran
    heartbeat_errors: int = 0
    heartbeat_cpu_s: float = 0.0  #: CPU seconds the heartbeat thread used
    setup_s: float = 0.0  #: building the scheduler and registering the nodes
    warmup_s: float = 0.0
    warmed_sessions: int = 0  #: sessions bound before the window
    error: str | None = None  #: an unexpected exception in a worker thread

    @property
    def throughput(self) -> float:
        """Successful dispatches per second, all threads together."""
        return self.dispatches / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def throughput_per_cpu(self) -> float:
        """Successful dispatches per CPU-second of the dispatching threads."""
        return self.dispatches / self.dispatch_cpu_s if self.dispatch_cpu_s > 0 else 0.0

    @property
    def heartbeat_rate(self) -> float:
        """Heartbeats actually applied per second."""
        return self.heartbeats / self.heartbeat_elapsed if self.heartbeat_elapsed > 0 else 0.0

    @property
    def heartbeat_ratio(self) -> float | None:
        """Applied / requested heartbeat rate (None at rate 0)."""
        return self.heartbeat_rate / self.rate if self.rate > 0 else None

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(throughput=self.throughput, throughput_per_cpu=self.throughput_per_cpu,
                   heartbeat_rate=self.heartbeat_rate,
                   heartbeat_ratio=self.heartbeat_ratio, failed=self.failed)
        return out


@dataclass
class GoalVerdict:
    """One goal of the issue, checked in one scenario."""

    goal: str  #: what is required, in words
    scenario: str  #: where it was measured
    measured: float | None  #: the figure (a ratio, a fraction or µs)
    target: float
    unit: str  #: "x", "%" or "us"
    passed: bool | None  #: None: not measurable in this run
    note: str = ""

    def __post_init__(self) -> None:
        # plain Python types, so the verdict serialises to JSON whatever computed it
        if self.measured is not None:
            self.measured = float(self.measured)
        if self.passed is not None:
            self.passed = bool(self.passed)

    @property
    def verdict(self) -> str:
        return "N/A" if self.passed is None else ("PASS" if self.passed else "MISS")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["verdict"] = self.verdict
        return out


@dataclass
class BenchReport:
    """Everything :func:`run_bench` measured, with ratios and goal verdicts."""

    config: BenchConfig
    machine: dict[str, Any]
    results: list[ScenarioResult]
    ratios: list[dict[str, Any]]  #: per (rate, threads, pysched impl, baseline): figures relative to the baseline
    goals: list[GoalVerdict]
    missing: dict[str, str]  #: implementation -> why it did not run
    legacy_path: str | None  #: the legacy model that was loaded
    wall: float  #: seconds for the whole run
    peer_path: str | None = None  #: the peer that was loaded
    peer_kind: str | None = None  #: its index ("heap" or "sortedlist")

    def result(self, impl: str, rate: float, threads: int) -> ScenarioResult | None:
        """The result of one scenario, or None if it did not run."""
        for r in self.results:
            if r.impl == impl and r.rate == float(rate) and r.threads == threads:
                return r
        return None

    @property
    def errors(self) -> list[str]:
        """Unexpected worker exceptions, as "impl rate/threads: message"."""
        return [f"{r.impl} rate={r.rate:g} threads={r.threads}: {r.error}" for r in self.results if r.error]

    def to_dict(self) -> dict:
        """A JSON-serialisable view: config, machine, scenarios, ratios, goals."""
        return {
            "config": asdict(self.config),
            "machine": dict(self.machine),
            "legacy_path": self.legacy_path,
            "peer_path": self.peer_path,
            "peer_kind": self.peer_kind,
            "missing": dict(self.missing),
            "wall_s": self.wall,
            "scenarios": [r.to_dict() for r in self.results],
            "ratios": [dict(r) for r in self.ratios],
            "goals": [g.to_dict() for g in self.goals],
            "errors": self.errors,
        }


# ------------------------------------------------------------------ machine
def machine_info() -> dict[str, Any]:
    """CPU model, cores, Python, numpy, Cython, pysched, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        import Cython

        cython_version: str | None = Cython.__version__
    except ImportError:
        cython_version = None
    try:
        load = list(os.getloadavg())
    except (AttributeError, OSError):
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "numpy": np.__version__,
        "cython": cython_version,
        "pysched": pysched.__version__,
        "pysched_compiled_available": _compiled_available(),
        "switch_interval_s": sys.getswitchinterval(),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "load_average_at_start": load,
        "timer_overhead_ns": _timer_overhead_ns(),
    }


def _timer_overhead_ns(n: int = 20_000) -> int:
    """Median of back-to-back ``perf_counter_ns`` differences: what a latency sample costs by itself."""
    perf = time.perf_counter_ns
    deltas = array("q", bytes(8 * n))
    for i in range(n):
        t0 = perf()
        deltas[i] = perf() - t0
    return int(np.median(np.frombuffer(deltas, dtype=np.int64)))


def _compiled_available() -> bool:
    try:
        from pysched import _core  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ baselines (legacy model, peer)
def _locate(filename: str, path: str | os.PathLike[str] | None) -> tuple[Path | None, list[Path]]:
    if path is not None:
        candidates = [Path(path)]
    else:
        candidates = [Path.cwd() / "benchmarks" / filename]
        root = Path(pysched.__file__).resolve().parents[1]
        # only a source checkout (not site-packages, where some other
        # distribution may own a top-level "benchmarks" package)
        if (root / "pyproject.toml").is_file() or (root / "setup.py").is_file():
            candidates.append(root / "benchmarks" / filename)
    unique: list[Path] = []
    for c in candidates:
        if c not in unique:
            unique.append(c)
    for c in unique:
        if c.is_file():
            return c, unique
    return None, unique


def _load(path: str | os.PathLike[str], name: str, required: tuple[str, ...]) -> types.ModuleType:
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    # registered before exec so anything resolving the module by name (pickling,
    # dataclasses, typing) finds it
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        raise ImportError(f"{path} failed to import: {type(exc).__name__}: {exc}") from exc
    for attr in required:
        if not hasattr(module, attr):
            raise ImportError(f"{path} does not define {attr}")
    return module


def locate_legacy(path: str | os.PathLike[str] | None = None) -> tuple[Path | None, list[Path]]:
    """Find ``benchmarks/legacy.py``: (the file or None, the places looked at).

    An explicit ``path`` is the only candidate. Otherwise: under the current
    directory, then under the source checkout this package was imported
    from (``pysched/..``; absent from an installed wheel).
    """
    return _locate("legacy.py", path)


def load_legacy(path: str | os.PathLike[str]) -> types.ModuleType:
    """Import the legacy model from a file path (it is not an installed module).

    Raises ``ImportError`` if the file does not load or lacks the classes the
    bench drives.
    """
    return _load(path, "_pysched_bench_legacy", ("LegacyScheduler", "LegacyNoNodeAvailable", "LegacyNoPool"))


def locate_peer(path: str | os.PathLike[str] | None = None) -> tuple[Path | None, list[Path]]:
    """Find ``benchmarks/peer.py``, the pure-Python indexed peer, like :func:`locate_legacy`."""
    return _locate("peer.py", path)


def load_peer(path: str | os.PathLike[str]) -> types.ModuleType:
    """Import the peer from a file path; ``ImportError`` if it does not load or lacks what the bench drives."""
    return _load(path, "_pysched_bench_peer", ("PeerScheduler", "INDEXES", "PeerNoNodeAvailable", "PeerNoPool"))


# ------------------------------------------------------------------ workload
def language_sets(n: int, seed: int = 1) -> list[tuple[str, ...]]:
    """``n`` distinct language sets: :data:`LANGUAGE_SETS` first, then generated ones."""
    sets = [tuple(sorted(s)) for s in LANGUAGE_SETS[:n]]
    seen = set(sets)
    rng = random.Random(seed)
    while len(sets) < n:
        # English-heavy, 2-3 languages, like the curated ones
        k = rng.choice((2, 2, 3))
        if rng.random() < 0.7:
            langs = tuple(sorted({"en", *rng.sample(_EXTRA_LANGUAGES[1:], k - 1)}))
        else:
            langs = tuple(sorted(rng.sample(_EXTRA_LANGUAGES, k)))
        if langs not in seen:
            seen.add(langs)
            sets.append(langs)
    return sets


@dataclass(frozen=True)
class _Workload:
    """The nodes, sessions and heartbeat arguments every scenario shares."""

    nodes: list[tuple[str, tuple[str, ...]]]  #: (node id, languages)
    sessions: list[tuple[str, str, str]]  #: (session id, src, tgt)
    heartbeats: list[tuple[str, int, float, float, float]]  #: (node id, running, cpu, gpu, mem)


def _build_workload(config: BenchConfig) -> _Workload:
    rng = random.Random(config.seed)
    sets = language_sets(config.pools, config.seed)
    # even spread: every set (pool) gets nodes // pools nodes, the first few one more
    nodes = [(f"node-{i:05d}", sets[i % len(sets)]) for i in range(config.nodes)]
    sessions = []
    for i in range(config.sessions):
        # a set uniformly (demand follows the even node spread), then a pair it serves
        src, tgt = rng.sample(sets[rng.randrange(len(sets))], 2)
        if rng.random() < _AUTO_FRACTION:
            src = "auto"
        sessions.append((f"sess-{i:06d}", src, tgt))
    # Precomputed so the heartbeat thread spends its time in the scheduler, not
    # in the random module. ``running`` is a random small int, well below
    # max_concurrency: tracking each node's true held count would add shared
    # bookkeeping to the dispatch loop that belongs to neither scheduler.
    threshold = 85.0
    heartbeats = [
        (nodes[rng.randrange(len(nodes))][0], rng.randrange(4),
         round(rng.uniform(5, threshold - 10), 1), round(rng.uniform(5, threshold - 10), 1),
         round(rng.uniform(5, threshold - 10), 1))
        for _ in range(_HB_TABLE)
    ]
    return _Workload(nodes, sessions, heartbeats)


@dataclass(frozen=True)
class _Impl:
    """How to build one implementation and which exceptions mean a refused dispatch."""

    name: str
    build: Callable[[], Any]
    failures: dict[type[BaseException], str]  #: exception class -> failure kind


def _peer_class(config: BenchConfig, peer: types.ModuleType) -> Any:
    return peer.PeerScheduler if config.peer_index is None else peer.INDEXES[config.peer_index]


def _make_impls(config: BenchConfig, legacy: types.ModuleType | None,
                peer: types.ModuleType | None = None) -> dict[str, _Impl]:
    max_pools = max(50, config.pools)
    pysched_failures = {NoNodeAvailable: "no_node", NoPoolForLanguagePair: "no_pool"}
    impls = {
        "compiled": _Impl("compiled", lambda: Scheduler(seed=config.seed, max_pools=max_pools, kernel="compiled"),
                          pysched_failures),
        "python": _Impl("python", lambda: Scheduler(seed=config.seed, max_pools=max_pools, kernel="python"),
                        pysched_failures),
    }
    if peer is not None:
        cls = _peer_class(config, peer)
        impls["peer"] = _Impl("peer", lambda: cls(seed=config.seed, max_pools=max_pools),
                              {peer.PeerNoNodeAvailable: "no_node", peer.PeerNoPool: "no_pool"})
    if legacy is not None:
        impls["legacy"] = _Impl(
            "legacy",
            # ready_on_register: the model otherwise waits for a first healthy
            # heartbeat, which a rate-0 scenario never sends
            lambda: legacy.LegacyScheduler(seed=config.seed, max_pools=max_pools, ready_on_register=True),
            {legacy.LegacyNoNodeAvailable: "no_node", legacy.LegacyNoPool: "no_pool"},
        )
    return impls


# ------------------------------------------------------------------ threads
class _Run:
    """State shared by one scenario's threads."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.start_ns = 0
        self.deadline_ns = 0
        self.errors: list[str] = []


class _DispatchWorker:
    """One dispatching thread: its share of the sessions, in a closed loop."""

    def __init__(self, sched: Any, share: list[tuple[str, str, str]], run: _Run, hold_ns: int,
                 failures: dict[type[BaseException], str], cap: int, seed: int) -> None:
        self.sched = sched
        self.share = share
        self.run_state = run
        self.hold_ns = hold_ns
        self.failure_kinds = failures
        self.cap = cap
        self.seed = seed
        # preallocated so recording a sample is one array store in the loop
        self.latency = array("q", bytes(8 * cap))
        self.count = 0  # successful dispatches == samples offered
        self.overflow_max = 0  # largest sample not kept once reservoir sampling started
        self.failures: dict[str, int] = {}
        self.end_ns = 0
        self.cpu_ns = 0  # CPU time this thread used in the window (time.thread_time_ns)

    def __call__(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported in the result instead of killing the run
            self.run_state.errors.append(f"dispatch thread: {type(exc).__name__}: {exc}")
        finally:
            if not self.end_ns:
                self.end_ns = time.perf_counter_ns()

    def _loop(self) -> None:
        dispatch = self.sched.dispatch
        release = self.sched.release
        perf = time.perf_counter_ns
        # Jobs in processing, FIFO since the hold time is fixed. Two deques
        # rather than one of (due, job id) tuples: ints and strs are not
        # GC-tracked, so the harness adds no garbage-collector work of its
        # own to the latencies it measures.
        due_ns: deque[int] = deque()
        jobs: deque[str] = deque()
        push_due, pop_due, push_job, pop_job = due_ns.append, due_ns.popleft, jobs.append, jobs.popleft
        hold = self.hold_ns
        share = self.share
        lat = self.latency
        cap = self.cap
        kinds = self.failure_kinds
        expected = tuple(kinds)
        failures = self.failures
        randbelow = random.Random(self.seed).randrange
        n = 0
        overflow_max = 0
        run = self.run_state
        run.go.wait()
        deadline = run.deadline_ns
        cpu0 = time.thread_time_ns()
        t1 = perf()
        # At least one pass even when this thread first runs after the deadline
        # (a saturated machine): every thread makes a call, so every scenario
        # has a figure, and a late thread's end shows in the elapsed time.
        while share:
            for sid, src, tgt in share:
                while due_ns and due_ns[0] <= t1:
                    pop_due()
                    release(pop_job())
                t0 = perf()
                try:
                    a = dispatch(sid, src, tgt)
                except expected as exc:
                    t1 = perf()
                    kind = kinds.get(type(exc), type(exc).__name__)
                    failures[kind] = failures.get(kind, 0) + 1
                    if t1 >= deadline:
                        break
                    continue
                t1 = perf()
                dt = t1 - t0
                if n < cap:
                    lat[n] = dt
                else:
                    # reservoir sampling (algorithm R): a uniform sample of every call
                    if dt > overflow_max:
                        overflow_max = dt
                    j = randbelow(n + 1)
                    if j < cap:
                        lat[j] = dt
                n += 1
                push_due(t1 + hold)
                push_job(a.job_id)
                if t1 >= deadline:
                    break
            if t1 >= deadline or run.errors:
                break
        self.cpu_ns = time.thread_time_ns() - cpu0
        self.end_ns = t1
        self.count = n
        self.overflow_max = overflow_max

    def samples(self) -> np.ndarray:
        """The kept latency samples, in ns."""
        return np.frombuffer(self.latency, dtype=np.int64)[: min(self.count, self.cap)]


class _HeartbeatWorker:
    """Sends ``rate`` load-only heartbeats per second, paced against elapsed time."""

    def __init__(self, sched: Any, table: list[tuple[str, int, float, float, float]], rate: float,
                 run: _Run) -> None:
        self.sched = sched
        self.table = table
        self.rate = rate
        self.run_state = run
        self.applied = 0
        self.errors = 0
        self.elapsed_ns = 0
        self.cpu_ns = 0

    def __call__(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self.run_state.errors.append(f"heartbeat thread: {type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        heartbeat = self.sched.heartbeat
        table = self.table
        mask = len(table) - 1
        perf = time.perf_counter_ns
        sleep = time.sleep
        per_ns = self.rate / 1e9
        run = self.run_state
        run.go.wait()
        start = run.start_ns
        deadline = run.deadline_ns
        cpu0 = time.thread_time_ns()
        done = errors = i = 0
        now = perf()
        # The first heartbeat is due at the start: it is sent even when this
        # thread first runs after the deadline (a saturated machine).
        while True:
            # Due-count pacing: whatever fell behind (GIL waits, slow
            # heartbeats) is caught up, so the applied rate shows what the
            # scheduler could absorb, not how often this thread got to run.
            due = int((now - start) * per_ns) + 1 - done
            if due <= 0:
                sleep(_HB_SLEEP)
                now = perf()
                if now >= deadline:
                    break
                continue
            for _ in range(due if due < _HB_BURST else _HB_BURST):
                node_id, running, cpu, gpu, mem = table[i]
                i = (i + 1) & mask
                try:
                    heartbeat(node_id, running=running, cpu=cpu, gpu=gpu, mem=mem)
                except (KeyError, ValueError):
                    errors += 1
                done += 1
            now = perf()
            if now >= deadline or run.errors:
                break
        self.applied = done - errors
        self.errors = errors
        self.elapsed_ns = now - start
        self.cpu_ns = time.thread_time_ns() - cpu0


# ------------------------------------------------------------------ one scenario
def _run_scenario(impl: _Impl, workload: _Workload, rate: float, threads: int,
                  config: BenchConfig) -> ScenarioResult:
    result = ScenarioResult(impl.name, rate, threads)
    t = time.perf_counter()
    try:
        sched = impl.build()
        for node_id, langs in workload.nodes:
            sched.register_node(node_id, langs, services=_SERVICES, max_concurrency=config.max_concurrency)
    except Exception as exc:  # one broken implementation must not cost the others' results
        result.error = f"setup: {type(exc).__name__}: {exc}"
        return result
    result.setup_s = time.perf_counter() - t

    # Warm-up: bind sessions once, so the window measures steady-state
    # dispatch rather than first-contact session creation. Capped in time
    # because the pure-Python twin takes seconds for 10,000 sessions.
    t = time.perf_counter()
    limit = t + config.warmup_seconds
    warmed = 0
    expected = tuple(impl.failures)
    for sid, src, tgt in workload.sessions:
        if time.perf_counter() >= limit:
            break
        try:
            sched.release(sched.dispatch(sid, src, tgt).job_id)
        except expected:
            pass
        warmed += 1
    result.warmup_s = time.perf_counter() - t
    result.warmed_sessions = warmed

    run = _Run()
    hold_ns = int(config.hold_ms * 1e6)
    cap = config.max_samples
    workers = [
        _DispatchWorker(sched, workload.sessions[k::threads], run, hold_ns, impl.failures,
                        # never more than the thread could fill at 1.5 M calls/s
                        min(cap, int(config.duration * 1.5e6) + 1024), config.seed * 1000 + k)
        for k in range(threads)
    ]
    hb = _HeartbeatWorker(sched, workload.heartbeats, rate, run) if rate > 0 else None
    pool = [threading.Thread(target=w, name=f"bench-dispatch-{k}", daemon=True) for k, w in enumerate(workers)]
    if hb is not None:
        pool.append(threading.Thread(target=hb, name="bench-heartbeat", daemon=True))
    for th in pool:
        th.start()
    # a collection left over from setup would otherwise land in the window
    gc.collect()
    time.sleep(0.01)  # let every thread reach go.wait()
    run.start_ns = time.perf_counter_ns()
    run.deadline_ns = run.start_ns + int(config.duration * 1e9)
    run.go.set()
    for th in pool:
        th.join()

    end = max(w.end_ns for w in workers)
    result.elapsed = max(0, end - run.start_ns) / 1e9
    result.dispatches = sum(w.count for w in workers)
    result.dispatch_cpu_s = sum(w.cpu_ns for w in workers) / 1e9
    failures: dict[str, int] = {}
    for w in workers:
        for kind, n in w.failures.items():
            failures[kind] = failures.get(kind, 0) + n
    result.failures = failures
    if hb is not None:
        result.heartbeats = hb.applied
        result.heartbeat_errors = hb.errors
        result.heartbeat_elapsed = hb.elapsed_ns / 1e9
        result.heartbeat_cpu_s = hb.cpu_ns / 1e9
    samples = np.concatenate([w.samples() for w in workers]) if workers else np.empty(0, np.int64)
    result.samples = int(samples.size)
    result.sampled = any(w.count > w.cap for w in workers)
    if samples.size:
        p50, p99, p999 = np.percentile(samples, [50.0, 99.0, 99.9])
        top = max(int(samples.max()), max(w.overflow_max for w in workers))
        # plain floats: numpy scalars would leak numpy bools into the verdicts (not JSON-serialisable)
        result.latency_us = {"p50": float(p50) / 1e3, "p99": float(p99) / 1e3, "p99.9": float(p999) / 1e3,
                             "max": top / 1e3, "mean": float(samples.mean()) / 1e3}
    if run.errors:
        # the same failure in several threads is reported once, with how many threads raised it
        seen: dict[str, int] = {}
        for e in run.errors:
            seen[e] = seen.get(e, 0) + 1
        result.error = "; ".join(e if n == 1 else f"{e} (in {n} threads)" for e, n in seen.items())
    close = getattr(sched, "close", None)
    if close is not None:
        close()
    return result


# ------------------------------------------------------------------ ratios and goals
def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or a < 0:
        return None
    return float(a) / float(b)


def _ratios(results: list[ScenarioResult], config: BenchConfig) -> list[dict[str, Any]]:
    """pysched figures relative to each baseline, per (rate, threads), pysched implementation and baseline.

    Throughput, throughput per CPU-second and heartbeats are pysched/baseline;
    latencies are baseline/pysched, so every ratio reads "how many times
    better pysched is" (> 1 is better). ``baseline`` is "peer" or "legacy".
    A scenario that raised (see ``BenchReport.errors``) has no ratios: its
    figures are partial or zero.
    """
    by_key = {(r.impl, r.rate, r.threads): r for r in results if r.error is None}
    out = []
    for rate in config.rates:
        for threads in config.threads:
            for baseline in BASELINES:
                base = by_key.get((baseline, rate, threads))
                if base is None:
                    continue
                for impl in _PYSCHED_IMPLS:
                    mine = by_key.get((impl, rate, threads))
                    if mine is None:
                        continue
                    row: dict[str, Any] = {"impl": impl, "baseline": baseline, "rate": rate, "threads": threads,
                                           "throughput": _div(mine.throughput, base.throughput),
                                           "cpu_throughput": _div(mine.throughput_per_cpu, base.throughput_per_cpu)}
                    for q in ("p50", "p99", "p99.9", "max"):
                        row[q] = _div(base.latency_us.get(q), mine.latency_us.get(q))
                    row["heartbeats"] = _div(mine.heartbeat_rate, base.heartbeat_rate) if rate > 0 else None
                    out.append(row)
    return out


def _goals(results: list[ScenarioResult], ratios: list[dict[str, Any]], config: BenchConfig,
           missing: dict[str, str]) -> list[GoalVerdict]:
    """The goals, at ``goal_rate``, for each dispatching-thread count run.

    Per thread count: against legacy, dispatch throughput and p99; the share
    of requested heartbeats applied; against the peer (issue 7), p50 and
    dispatches per dispatching CPU-second. Then the absolute p50 goal.
    "pysched" in the goals is the compiled implementation (the product); the
    pure-Python twin is shown for comparison only.
    """
    rate = float(config.goal_rate)
    at = f"{config.nodes:,} nodes, {rate:,.0f} hb/s"
    legacy_note = "" if config.nodes == 1000 else f"goals are stated at 1,000 nodes; this run used {config.nodes:,}"
    peer_note = ("" if config.nodes in _PEER_GOAL_NODES
                 else f"peer goals are stated at 1,000 and 10,000 nodes; this run used {config.nodes:,}")
    by_key = {(r.impl, r.rate, r.threads): r for r in results if r.error is None}
    failed = {(r.impl, r.rate, r.threads): r.error for r in results if r.error is not None}
    ratio_of = {(r["impl"], r["baseline"], r["rate"], r["threads"]): r for r in ratios}
    goals: list[GoalVerdict] = []

    def joined(*parts: str) -> str:
        return "; ".join(x for x in parts if x)

    def compiled_missing(threads: int) -> str:
        if ("compiled", rate, threads) in failed:
            return "compiled raised: " + str(failed[("compiled", rate, threads)])
        return missing.get("compiled") or ("rate not in this run" if rate not in config.rates else "compiled not run")

    def baseline_missing(baseline: str, threads: int) -> str:
        if (baseline, rate, threads) in failed:
            return f"{baseline} raised: {failed[(baseline, rate, threads)]}"
        return f"{baseline} missing: {missing[baseline]}" if baseline in missing else f"{baseline} not run"

    def versus(baseline: str, threads: int, key: str, goal: str, target: float, where: str,
               note: str) -> GoalVerdict:
        compiled = by_key.get(("compiled", rate, threads))
        ratio = ratio_of.get(("compiled", baseline, rate, threads))
        value = None if ratio is None else ratio[key]
        if compiled is None:
            why = compiled_missing(threads)
        elif ratio is None:
            why = baseline_missing(baseline, threads)
        else:
            why = "" if value is not None else "no figure"
        return GoalVerdict(goal, where, value, target, "x", None if value is None else value >= target,
                           joined(why, note))

    for threads in config.threads:
        where = f"{at}, {threads} thread{'s' if threads > 1 else ''}"
        goals.append(versus("legacy", threads, "throughput", f"dispatch throughput >= {_GOAL_THROUGHPUT:g}x legacy",
                            _GOAL_THROUGHPUT, where, legacy_note))
        goals.append(versus("legacy", threads, "p99", f"p99 latency <= 1/{_GOAL_P99:g} of legacy's", _GOAL_P99,
                            where, legacy_note))
        compiled = by_key.get(("compiled", rate, threads))
        hb_ratio = None if compiled is None else compiled.heartbeat_ratio
        goals.append(GoalVerdict(f"heartbeats applied >= {_GOAL_HEARTBEATS:.0%} of requested", where,
                                 hb_ratio, _GOAL_HEARTBEATS, "%", None if hb_ratio is None
                                 else hb_ratio >= _GOAL_HEARTBEATS,
                                 joined("" if compiled is not None else compiled_missing(threads), legacy_note)))
        goals.append(versus("peer", threads, "p50", f"p50 latency <= 1/{_GOAL_PEER_P50:g} of the peer's",
                            _GOAL_PEER_P50, where, peer_note))
        goals.append(versus("peer", threads, "cpu_throughput",
                            f"dispatches per CPU-second >= {_GOAL_PEER_CPU:g}x the peer's", _GOAL_PEER_CPU, where,
                            peer_note))
    # p50 goal: compiled, one dispatching thread (the least GIL interference), at goal_rate
    threads = 1 if 1 in config.threads else min(config.threads)
    where = f"{at}, {threads} thread{'s' if threads > 1 else ''}"
    compiled = by_key.get(("compiled", rate, threads))
    p50 = None if compiled is None else compiled.latency_us.get("p50")
    why = "" if compiled is not None else compiled_missing(threads)
    goals.append(GoalVerdict(f"dispatch() p50 <= {_GOAL_P50_US:g} µs end to end", where,
                             p50, _GOAL_P50_US, "us", None if p50 is None else p50 <= _GOAL_P50_US,
                             joined(why, legacy_note)))
    return goals


# ------------------------------------------------------------------ the run
def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Run every scenario of ``config`` and return the report.

    ``progress``, if given, is called with one line of text as each scenario
    starts and ends. Implementations that cannot run (no legacy model, no
    compiled extension) are listed in ``report.missing``; the others still run.
    """
    wall = time.perf_counter()
    say = progress or (lambda line: None)
    machine = machine_info()
    missing: dict[str, str] = {}
    legacy_mod = None
    legacy_path = None
    if "legacy" in config.impls:
        found, looked = locate_legacy(config.legacy_path)
        if found is None:
            missing["legacy"] = "benchmarks/legacy.py not found (looked at: " + ", ".join(map(str, looked)) + ")"
        else:
            try:
                legacy_mod = load_legacy(found)
                legacy_path = str(found)
            except ImportError as exc:
                missing["legacy"] = str(exc)
    peer_mod = None
    peer_path = None
    if "peer" in config.impls:
        found, looked = locate_peer(config.peer_path)
        if found is None:
            missing["peer"] = "benchmarks/peer.py not found (looked at: " + ", ".join(map(str, looked)) + ")"
        else:
            try:
                peer_mod = load_peer(found)
                peer_path = str(found)
                _peer_class(config, peer_mod)(seed=config.seed)  # e.g. sortedcontainers missing
            except ImportError as exc:
                peer_mod = None
                missing["peer"] = str(exc)
    if "compiled" in config.impls and not _compiled_available():
        missing["compiled"] = ("the compiled extension pysched._core is not importable "
                               "(build it: python setup.py build_ext --inplace)")
    impls = _make_impls(config, legacy_mod, peer_mod)
    run_impls = [impls[name] for name in config.impls if name not in missing]
    workload = _build_workload(config)

    results: list[ScenarioResult] = []
    total = len(config.rates) * len(config.threads) * len(run_impls)
    done = 0
    # Implementations are interleaved within each (rate, threads) block so
    # every ratio compares runs made seconds apart, under the same machine load.
    for rate in config.rates:
        for threads in config.threads:
            for impl in run_impls:
                done += 1
                say(f"[{done}/{total}] {IMPLEMENTATIONS[impl.name]}, {rate:,.0f} heartbeats/s, "
                    f"{threads} dispatch thread{'s' if threads > 1 else ''} ...")
                r = _run_scenario(impl, workload, rate, threads, config)
                results.append(r)
                lat = r.latency_us
                say(f"    {r.throughput:,.0f} dispatches/s ({r.throughput_per_cpu:,.0f} per CPU-s), "
                    f"p50 {lat.get('p50', float('nan')):.1f} us, "
                    f"p99 {lat.get('p99', float('nan')):.1f} us, {r.heartbeat_rate:,.0f} heartbeats/s"
                    + (f"; ERROR {r.error}" if r.error else ""))
    ratios = _ratios(results, config)
    goals = _goals(results, ratios, config, missing)
    peer_kind = None if peer_mod is None else _peer_class(config, peer_mod).kind
    return BenchReport(config, machine, results, ratios, goals, missing, legacy_path, time.perf_counter() - wall,
                       peer_path, peer_kind)


# ------------------------------------------------------------------ the table
def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or value != value:
        return "-"
    return format(value, spec) + suffix


def _lat(value: float | None) -> str:
    """A latency in µs: one decimal while small, thousands separators once large."""
    if value is None or value != value:
        return "-"
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def _ratio_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}x" if value < 100 else f"{value:,.0f}x"


def format_table(report: BenchReport) -> str:
    """The human-readable report: machine, one block per (rate, threads), ratios, goals."""
    cfg = report.config
    m = report.machine
    lines = []
    lines.append(
        f"pysched bench: {cfg.nodes:,} nodes in {cfg.pools} auto pools, {cfg.sessions:,} sessions, "
        f"hold {cfg.hold_ms:g} ms, max_concurrency {cfg.max_concurrency}, {cfg.duration:g} s per scenario, "
        f"seed {cfg.seed}" + (" (--quick)" if cfg.quick else "")
    )
    load = m.get("load_average_at_start")
    lines.append(
        f"machine: {m.get('cpu')}, {m.get('cores')} cores ({m.get('usable_cores')} usable); "
        f"Python {m.get('python')}, numpy {m.get('numpy')}, Cython {m.get('cython') or 'not installed'}, "
        f"pysched {m.get('pysched')}" + (f"; load average {load[0]:.2f} at start" if load else "")
    )
    if report.peer_path:
        lines.append(f"peer: {report.peer_path} ({report.peer_kind} index)")
    if report.legacy_path:
        lines.append(f"legacy model: {report.legacy_path}")
    for impl, why in report.missing.items():
        lines.append(f"MISSING {IMPLEMENTATIONS[impl]}: {why}; its columns are marked missing")
    timer = m.get("timer_overhead_ns")
    lines.append("latency: each dispatch() call alone, µs"
                 + (f" (timer overhead {timer} ns, included)" if timer is not None else "")
                 + "; throughput: successful dispatches/s, all threads; per CPU-s: dispatches per CPU-second "
                 "of the dispatching threads (time.thread_time)")
    for impl in cfg.impls:
        cold = [r for r in report.results if r.impl == impl and r.warmed_sessions < cfg.sessions]
        if cold:
            least = min(r.warmed_sessions for r in cold)
            lines.append(f"note: the warm-up ({cfg.warmup_seconds:g} s at most) bound only {least:,} of "
                         f"{cfg.sessions:,} sessions for {IMPLEMENTATIONS[impl]} in some scenarios; "
                         "its window includes first-contact dispatches")

    head = (f"  {'implementation':<24}{'dispatch/s':>12}{'per CPU-s':>11}{'p50':>9}{'p99':>9}{'p99.9':>9}{'max':>10}"
            f"{'heartbeats/s':>14}{'(% req)':>9}{'failures':>10}")
    for rate in cfg.rates:
        for threads in cfg.threads:
            lines.append("")
            lines.append(f"== {rate:,.0f} heartbeats/s requested, {threads} dispatching "
                         f"thread{'s' if threads > 1 else ''}")
            lines.append(head)
            for impl in cfg.impls:
                label = IMPLEMENTATIONS[impl]
                r = report.result(impl, rate, threads)
                if r is None:
                    lines.append(f"  {label:<24}{'missing':>12}")
                    continue
                lat = r.latency_us
                hb = r.heartbeat_ratio
                lines.append(
                    f"  {label:<24}{r.throughput:>12,.0f}{r.throughput_per_cpu:>11,.0f}{_lat(lat.get('p50')):>9}"
                    f"{_lat(lat.get('p99')):>9}{_lat(lat.get('p99.9')):>9}{_lat(lat.get('max')):>10}"
                    f"{(_fmt(r.heartbeat_rate, ',.0f') if rate > 0 else '-'):>14}"
                    f"{(_fmt(None if hb is None else 100 * hb, '.1f', '%')):>9}{r.failed:>10,}"
                    + (f"  ERROR: {r.error}" if r.error else "")
                )
            for row in report.ratios:
                if row["rate"] != rate or row["threads"] != threads:
                    continue
                label = f"{row['impl']} vs {row['baseline']}"
                lines.append(
                    f"  {label:<24}{_ratio_text(row['throughput']):>12}{_ratio_text(row['cpu_throughput']):>11}"
                    f"{_ratio_text(row['p50']):>9}"
                    f"{_ratio_text(row['p99']):>9}{_ratio_text(row['p99.9']):>9}{_ratio_text(row['max']):>10}"
                    f"{_ratio_text(row['heartbeats']):>14}"
                )
            if any(row["rate"] == rate and row["threads"] == threads for row in report.ratios):
                lines.append("  (ratios: dispatch/s, per CPU-s and heartbeats/s are pysched/baseline; latencies "
                             "are baseline/pysched, so > 1x means pysched is better)")

    lines.append("")
    lines.append(f"GOALS (pysched = compiled kernel; at {cfg.goal_rate:,.0f} heartbeats/s)")
    for g in report.goals:
        if g.measured is None:
            measured = "n/a"
            margin = ""
        elif g.unit == "x":
            measured = f"{g.measured:,.1f}x"
            margin = (f"{g.measured / g.target:.2f} of the target" if not g.passed
                      else f"{g.measured / g.target:.1f}x the target")
        elif g.unit == "%":
            measured = f"{100 * g.measured:.1f}%"
            margin = f"{100 * (g.measured - g.target):+.1f} points"
        else:
            measured = f"{g.measured:.2f} µs"
            margin = f"{g.measured - g.target:+.2f} µs vs target"
        lines.append(f"  [{g.verdict:<4}] {g.goal:<48} {g.scenario:<36} measured {measured}"
                     + (f" ({margin})" if margin else "") + (f"; {g.note}" if g.note else ""))
    verdicts = [g.passed for g in report.goals if g.passed is not None]
    lines.append(f"  {sum(verdicts)} of {len(verdicts)} measurable goal checks pass"
                 + (f", {len(report.goals) - len(verdicts)} not measurable" if len(verdicts) < len(report.goals)
                    else ""))
    if report.errors:
        lines.append("")
        lines.append("ERRORS")
        lines.extend(f"  {e}" for e in report.errors)
    lines.append("")
    lines.append(f"wall time {report.wall:.1f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------ command line
def _rates(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated rates >= 0, got {text!r}")
    return values


def _thread_counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _impl_names(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in values if v not in IMPLEMENTATIONS]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(IMPLEMENTATIONS)}, got {text!r}")
    return values


def _float(minimum: float, strict: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = (value > minimum if strict else value >= minimum) and value < math.inf
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {minimum:g}, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``pysched bench``'s options to ``parser``.

    Sizing options default to None so ``--quick`` can supply its own defaults
    while anything given explicitly still wins.
    """
    d = BenchConfig()
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of a few seconds (200 nodes, 0.25 s scenarios, rates 0,20000)")
    parser.add_argument("--nodes", type=positive_int, default=None, help=f"nodes (default: {d.nodes})")
    parser.add_argument("--pools", type=positive_int, default=None,
                        help=f"distinct language sets, i.e. auto pools (default: {d.pools})")
    parser.add_argument("--sessions", type=positive_int, default=None, help=f"sessions (default: {d.sessions})")
    parser.add_argument("--rates", type=_rates, default=None,
                        help="heartbeats/s to request, comma-separated; 0 = no heartbeat thread "
                             "(default: 0,2000,20000)")
    parser.add_argument("--threads", type=_thread_counts, default=None,
                        help="dispatching thread counts, comma-separated (default: 1,4)")
    parser.add_argument("--duration", type=_float(0.0, True), default=None,
                        help=f"measured seconds per scenario (default: {d.duration:g})")
    parser.add_argument("--hold-ms", type=_float(0.0, False), default=None,
                        help=f"simulated processing time before a job is released (default: {d.hold_ms:g})")
    parser.add_argument("--impl", type=_impl_names, default=None,
                        help="implementations to run, comma-separated (default: compiled,python,peer,legacy)")
    parser.add_argument("--legacy", metavar="PATH", default=None,
                        help="the legacy model (default: benchmarks/legacy.py in the current directory, "
                             "else in the source checkout)")
    parser.add_argument("--peer", metavar="PATH", default=None,
                        help="the pure-Python indexed peer (default: benchmarks/peer.py in the current directory, "
                             "else in the source checkout)")
    parser.add_argument("--peer-index", choices=_PEER_INDEXES, default=None,
                        help="the peer's per-pool index (default: its PeerScheduler, the faster: heap)")
    parser.add_argument("--seed", type=int, default=None, help=f"seed of the workload (default: {d.seed})")
    parser.add_argument("--json", metavar="PATH", default="bench-results.json",
                        help="where to write the results as JSON (default: bench-results.json)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` an ``add_arguments`` namespace asks for."""
    overrides: dict[str, Any] = {}
    for arg, name in (("nodes", "nodes"), ("pools", "pools"), ("sessions", "sessions"), ("rates", "rates"),
                      ("threads", "threads"), ("duration", "duration"), ("hold_ms", "hold_ms"),
                      ("impl", "impls"), ("legacy", "legacy_path"), ("peer", "peer_path"),
                      ("peer_index", "peer_index"), ("seed", "seed")):
        value = getattr(args, arg, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "quick", False):
        if "nodes" in overrides and "pools" not in overrides:
            overrides["pools"] = min(20, overrides["nodes"])
        return BenchConfig.quick_config(**overrides)
    if "nodes" in overrides and "pools" not in overrides:
        overrides["pools"] = min(BenchConfig.pools, overrides["nodes"])
    return BenchConfig(**overrides)


def run(args: argparse.Namespace) -> int:
    """``pysched bench``: run, print the table, write the JSON.

    Exit status 0 when the benchmark ran (goal misses and a missing legacy
    model included: they are results, said so in the output), 1 when a worker
    raised unexpectedly or nothing could run, 2 for a bad configuration.
    """
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"pysched bench: {exc}", file=sys.stderr)
        return 2

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = run_bench(config, progress=None if getattr(args, "quiet", False) else progress)
    print(format_table(report), flush=True)
    if "legacy" in report.missing:
        print(f"pysched bench: legacy model not run: {report.missing['legacy']}. "
              "Pass --legacy PATH (benchmarks/legacy.py of a source checkout) to compare against it.",
              file=sys.stderr)
    if "peer" in report.missing:
        print(f"pysched bench: peer not run: {report.missing['peer']}. "
              "Pass --peer PATH (benchmarks/peer.py of a source checkout) to compare against it.",
              file=sys.stderr)
    if args.json:
        path = Path(args.json)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        print(f"pysched bench: results written to {path}", file=sys.stderr)
    if not report.results:
        print("pysched bench: no implementation could run", file=sys.stderr)
        return 1
    return 1 if report.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pysched.bench``: the subcommand on its own (before cli.py registers it)."""
    parser = argparse.ArgumentParser(prog="pysched bench",
                                     description="compare pysched with a pure-Python indexed peer and the legacy design")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
