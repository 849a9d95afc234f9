"""The load ``pysched bench`` applies: fleet, sessions, and the loops that drive them.

:func:`build_workload` makes the nodes, sessions and heartbeat arguments
every scenario of a run shares (same seed, same workload for every
implementation). A :class:`DispatchWorker` is one dispatching thread in a
closed loop over its share of the sessions; :class:`TableHeartbeats` is the
body of the paced heartbeat thread (:class:`~.harness.PacedHeartbeats`).
Each implementation is driven through the same calls
(:class:`BenchScheduler`).
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from pysched.tools.bench.config import BenchConfig
from pysched.tools.bench.harness import LatencyRecorder, Window

__all__ = [
    "LANGUAGE_SETS",
    "SERVICES",
    "BenchScheduler",
    "DispatchWorker",
    "Dispatched",
    "TableHeartbeats",
    "Workload",
    "build_workload",
    "language_sets",
]

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
_ENGLISH_CENTRIC = 0.7  # of the generated sets: English plus one or two others

#: services every node installs
SERVICES = ("asr", "nmt", "tts", "semantic")
_AUTO_FRACTION = 0.10  # of sessions: src="auto"
_HB_TABLE = 8192  # precomputed heartbeat arguments, cycled (a power of two: indexed by a mask)
_HB_FIGURE_MAX = 75.0  # cpu/gpu/mem figures stay 10 points under the 85% threshold: no node turns overloaded


# ------------------------------------------------------------------ what is driven
class Dispatched(Protocol):
    """What a successful dispatch returns, as far as the bench is concerned."""

    @property
    def job_id(self) -> str:
        """The job's id, to release it with."""


class BenchScheduler(Protocol):
    """The calls the bench makes: pysched's, the peer's and the legacy model's common shape."""

    def register_node(self, node_id: str, languages: Iterable[str], *, services: Iterable[str],
                      max_concurrency: int) -> object:
        """Register a ready node."""

    def dispatch(self, session_id: str, src: str, tgt: str) -> Dispatched:
        """Pick and reserve a node for one job; raise when none can take it."""

    def release(self, job_id: str) -> object:
        """Give a job's reservation back."""

    def heartbeat(self, node_id: str, *, running: int | None = ..., cpu: float | None = ...,
                  gpu: float | None = ..., mem: float | None = ...) -> object:
        """Apply a node's load report."""


# ------------------------------------------------------------------ the workload
def language_sets(n: int, seed: int = 1) -> list[tuple[str, ...]]:
    """``n`` distinct language sets: :data:`LANGUAGE_SETS` first, then generated ones.

    :param n: how many.
    :param seed: seeds the generated ones.
    """
    sets = [tuple(sorted(s)) for s in LANGUAGE_SETS[:n]]
    seen = set(sets)
    rng = random.Random(seed)
    while len(sets) < n:
        # English-heavy, 2-3 languages, like the curated ones
        k = rng.choice((2, 2, 3))
        if rng.random() < _ENGLISH_CENTRIC:
            langs = tuple(sorted({"en", *rng.sample(_EXTRA_LANGUAGES[1:], k - 1)}))
        else:
            langs = tuple(sorted(rng.sample(_EXTRA_LANGUAGES, k)))
        if langs not in seen:
            seen.add(langs)
            sets.append(langs)
    return sets


#: one heartbeat's arguments: (node id, running, cpu, gpu, mem)
HeartbeatArgs = tuple[str, int, float, float, float]


@dataclass(frozen=True)
class Workload:
    """The nodes, sessions and heartbeat arguments every scenario shares."""

    nodes: list[tuple[str, tuple[str, ...]]]  #: (node id, languages)
    sessions: list[tuple[str, str, str]]  #: (session id, src, tgt)
    heartbeats: list[HeartbeatArgs]  #: cycled by the heartbeat thread


def build_workload(config: BenchConfig) -> Workload:
    """The workload ``config`` describes (the same for every implementation and scenario).

    :param config: the run's configuration (nodes, pools, sessions, seed).
    """
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
    heartbeats = [
        (nodes[rng.randrange(len(nodes))][0], rng.randrange(4),
         round(rng.uniform(5, _HB_FIGURE_MAX), 1), round(rng.uniform(5, _HB_FIGURE_MAX), 1),
         round(rng.uniform(5, _HB_FIGURE_MAX), 1))
        for _ in range(_HB_TABLE)
    ]
    return Workload(nodes, sessions, heartbeats)


# ------------------------------------------------------------------ the threads' bodies
class DispatchWorker:
    """One dispatching thread: its share of the sessions, in a closed loop.

    Each ``dispatch(session, src, tgt)`` call is timed alone with
    ``perf_counter_ns``; the job is released ``hold_ns`` later, by the same
    loop (no sleeping per job). Refusals (the ``failures`` exceptions) are
    counted by kind.
    """

    def __init__(self, sched: BenchScheduler, share: list[tuple[str, str, str]], window: Window, hold_ns: int,
                 failures: dict[type[BaseException], str], latency: LatencyRecorder) -> None:
        """Drive ``sched`` with ``share`` in ``window``.

        :param sched: the implementation under test.
        :param share: this thread's sessions: (session id, src, tgt).
        :param window: the run's window (start, deadline, errors).
        :param hold_ns: how long a job is held before it is released.
        :param failures: exception class -> failure kind ("no_node", "no_pool").
        :param latency: where the call latencies go.
        """
        self.sched = sched
        self.share = share
        self.window = window
        self.hold_ns = hold_ns
        self.failure_kinds = failures
        self.latency = latency
        self.count = 0  #: successful dispatches (== latency samples offered)
        self.failures: dict[str, int] = {}
        self.end_ns = 0  #: when the loop ended
        self.cpu_ns = 0  #: CPU time this thread used in the window (time.thread_time_ns)

    def __call__(self) -> None:
        """The thread's body."""
        try:
            self._loop()
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
        rec = self.latency
        lat, cap, overflow = rec.buffer, rec.capacity, rec.overflow
        kinds = self.failure_kinds
        expected = tuple(kinds)
        failures = self.failures
        n = 0
        window = self.window
        errors = window.errors
        window.go.wait()
        deadline = window.deadline_ns
        cpu0 = time.thread_time_ns()
        t1 = perf()
        # At least one pass even when this thread first runs after the deadline
        # (a saturated machine): every thread makes a call, so every scenario
        # has a figure, and a late thread's end shows in the elapsed time.
        try:
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
                    if n < cap:
                        lat[n] = t1 - t0
                    else:
                        cap = overflow(n, t1 - t0)
                    n += 1
                    push_due(t1 + hold)
                    push_job(a.job_id)
                    if t1 >= deadline:
                        break
                if t1 >= deadline or errors:
                    break
        finally:
            self.cpu_ns = time.thread_time_ns() - cpu0
            self.end_ns = t1
            self.count = rec.count = n


class TableHeartbeats:
    """Sends heartbeats from a precomputed table, cycled: a burst per call.

    A heartbeat for a node the implementation does not know (``KeyError``)
    or refuses (``ValueError``) counts as an error, not a crash.
    """

    def __init__(self, sched: BenchScheduler, table: list[HeartbeatArgs]) -> None:
        """Send ``table``'s heartbeats to ``sched``.

        :param sched: the implementation under test.
        :param table: heartbeat arguments; its length a power of two.
        """
        if not table or len(table) & (len(table) - 1):
            raise ValueError(f"the table's length must be a power of two, got {len(table)}")
        self.heartbeat = sched.heartbeat
        self.table = table
        self._mask = len(table) - 1
        self._i = 0
        self.applied = 0  #: heartbeats the implementation accepted
        self.errors = 0  #: heartbeats it refused

    def __call__(self, now_ns: int, count: int) -> None:
        """Send the next ``count`` heartbeats of the table.

        :param now_ns: the pacer's clock (unused: the table says everything).
        :param count: how many.
        """
        heartbeat = self.heartbeat
        table = self.table
        mask = self._mask
        i = self._i
        errors = 0
        for _ in range(count):
            node_id, running, cpu, gpu, mem = table[i]
            i = (i + 1) & mask
            try:
                heartbeat(node_id, running=running, cpu=cpu, gpu=gpu, mem=mem)
            except (KeyError, ValueError):
                errors += 1
        self._i = i
        self.errors += errors
        self.applied += count - errors
