"""The measuring harness ``pysched bench`` and ``pysched simulate`` share.

A run is a :class:`Window` (a start signal, a start time, a deadline, and the
errors of its threads) and the threads started by one :class:`Threads`;
each dispatching thread keeps its own :class:`LatencyRecorder`, merged by
:func:`summarise` into percentiles; heartbeats come from one
:class:`PacedHeartbeats` thread, paced to a target rate against elapsed
time. What the threads *do* (the workload) belongs to the tool using them.

Everything here is built so the harness adds as little as possible to what
it measures: a latency sample costs one array store, the recorders hold
machine ints (nothing for the garbage collector to track), and the
heartbeat pacing sleeps only when it is ahead of its schedule.
"""

from __future__ import annotations

import random
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = [
    "PERCENTILES",
    "Latency",
    "LatencyRecorder",
    "PacedHeartbeats",
    "Threads",
    "Window",
    "WorkerError",
    "summarise",
    "timer_overhead_ns",
]

#: (key, percentile) of the latency figures every tool reports, with "max" and "mean"
PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9))

#: Most heartbeats sent back to back before the pacer looks at the clock again.
_BURST = 64
#: Seconds the pacer sleeps once it has caught up with its schedule.
_IDLE_SLEEP = 0.0005


# ------------------------------------------------------------------ the window and its threads
@dataclass(frozen=True)
class WorkerError:
    """An exception a worker thread raised, and which kind of thread raised it."""

    thread: str  #: "dispatch thread", "heartbeat thread", "session thread", ...
    exc: BaseException

    def __str__(self) -> str:
        return f"{self.thread}: {type(self.exc).__name__}: {self.exc}"


class Window:
    """The measured window one run's threads share.

    Threads wait on :attr:`go`; :meth:`open` sets the start and the deadline
    first, so every thread reads both once the event is set. A thread that
    raises records it in :attr:`errors` (see :class:`Threads`); the others
    look at the list between calls and stop early.
    """

    def __init__(self) -> None:
        self.go = threading.Event()
        self.start_ns = 0  #: time.perf_counter_ns() at the start
        self.deadline_ns = 0  #: time.perf_counter_ns() at which the threads stop
        self.errors: list[WorkerError] = []

    def open(self, start_ns: int, deadline_ns: int) -> None:
        """Start the window: set its start and deadline, then release the waiting threads.

        :param start_ns: ``time.perf_counter_ns()`` the window starts at.
        :param deadline_ns: ``time.perf_counter_ns()`` the threads stop at.
        """
        self.start_ns = start_ns
        self.deadline_ns = deadline_ns
        self.go.set()


class Threads:
    """Runs the threads of one :class:`Window`: started together, joined together.

    Each target runs behind a guard: whatever it raises is recorded in the
    window's errors (with the kind of thread), never lost in a dead thread.
    """

    def __init__(self, window: Window) -> None:
        self.window = window
        self._threads: list[threading.Thread] = []

    def add(self, target: Callable[[], object], name: str, kind: str) -> None:
        """Add a thread; it starts with :meth:`start`.

        :param target: what the thread runs.
        :param name: the thread's name (shows in debuggers and tracebacks).
        :param kind: what an error report calls it ("dispatch thread", ...).
        """
        errors = self.window.errors

        def guarded() -> None:
            try:
                target()
            except BaseException as exc:  # reported by the run, instead of killing it silently
                errors.append(WorkerError(kind, exc))

        self._threads.append(threading.Thread(target=guarded, name=name, daemon=True))

    def start(self) -> None:
        """Start every thread added; they wait for the window to open."""
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        """Wait for every thread to finish."""
        for thread in self._threads:
            thread.join()


# ------------------------------------------------------------------ latency
class LatencyRecorder:
    """One thread's latency samples, in nanoseconds.

    The owning loop stores a sample itself while there is room (one array
    store, the cheapest thing Python can do with it) and calls
    :meth:`overflow` once the buffer is full::

        lat, cap = rec.buffer, rec.capacity
        ...
        if n < cap:
            lat[n] = dt
        else:
            cap = rec.overflow(n, dt)
        n += 1
        ...
        rec.count = n

    Up to ``keep`` samples the buffer grows and every call is kept; beyond
    it a uniform sample of every call is kept (reservoir sampling, algorithm
    R), and the largest sample not kept is remembered so the maximum stays
    exact.
    """

    def __init__(self, expected: int, keep: int | None = None, seed: int = 0) -> None:
        """Preallocate room for ``expected`` samples.

        :param expected: samples to make room for at once.
        :param keep: most samples ever kept (None: every one).
        :param seed: seeds the reservoir's choices.
        """
        if expected < 1 or (keep is not None and keep < 1):
            raise ValueError(f"expected and keep must be >= 1, got {expected!r} and {keep!r}")
        self.capacity = expected if keep is None else min(expected, keep)
        self.keep = keep
        #: the samples, machine ints: nothing for the garbage collector to track
        self.buffer = array("q", bytes(8 * self.capacity))
        self.count = 0  #: samples offered (set by the owning loop when it ends)
        self.overflow_max = 0  #: the largest sample not kept
        self._randbelow = random.Random(seed).randrange

    def overflow(self, n: int, dt: int) -> int:
        """Record sample number ``n`` (counted from 0) once the buffer is full; the new capacity.

        :param n: how many samples came before this one.
        :param dt: the sample, ns.
        """
        keep = self.keep
        if keep is None or self.capacity < keep:
            grow = self.capacity if keep is None else min(self.capacity, keep - self.capacity)
            self.buffer.frombytes(bytes(8 * grow))  # in place: the loop's reference stays valid
            self.capacity += grow
            self.buffer[n] = dt
            return self.capacity
        self.overflow_max = max(self.overflow_max, dt)
        j = self._randbelow(n + 1)
        if j < self.capacity:
            self.buffer[j] = dt
        return self.capacity

    @property
    def sampled(self) -> bool:
        """True once more samples came than were kept."""
        return self.count > self.capacity

    def samples(self) -> npt.NDArray[np.int64]:
        """The kept samples, ns (a view of the buffer: the recorder is done once this is called)."""
        return np.frombuffer(self.buffer, dtype=np.int64)[: min(self.count, self.capacity)]


@dataclass(frozen=True)
class Latency:
    """Latency figures merged from the recorders of one run."""

    samples: int  #: samples the figures were computed from
    sampled: bool  #: some recorder kept a uniform sample rather than every call
    #: p50, p99, p99.9 (:data:`PERCENTILES`), max and mean, µs; empty without samples
    us: dict[str, float] = field(default_factory=dict)


def summarise(recorders: Iterable[LatencyRecorder]) -> Latency:
    """Merge ``recorders`` into percentiles, max and mean.

    :param recorders: the run's recorders, each finished (``count`` set).
    """
    recs = list(recorders)
    parts = [r.samples() for r in recs]
    merged = np.concatenate(parts) if parts else np.empty(0, np.int64)
    if not merged.size:
        return Latency(0, any(r.sampled for r in recs))
    quantiles = np.percentile(merged, [q for _, q in PERCENTILES])
    top = max(int(merged.max()), *(r.overflow_max for r in recs))
    # plain floats: numpy scalars would leak into JSON and into comparisons
    us = {key: float(v) / 1e3 for (key, _), v in zip(PERCENTILES, quantiles, strict=True)}
    us["max"] = top / 1e3
    us["mean"] = float(merged.mean()) / 1e3
    return Latency(int(merged.size), any(r.sampled for r in recs), us)


# ------------------------------------------------------------------ heartbeats
class PacedHeartbeats:
    """One thread sending ``rate`` heartbeats a second, from the window's start to its deadline.

    Due-count pacing: at any moment ``elapsed * rate + 1`` heartbeats are
    due (the first at the start); whatever fell behind (GIL waits, slow
    heartbeats) is caught up in bursts of at most 64, so the rate applied
    shows what the scheduler could absorb, not how often this thread got to
    run. The first heartbeat is sent even when the thread first runs after
    the deadline (a saturated machine).

    For the same reason the rate is taken over ``active_ns``, from the
    window's start to the end of the last burst, not over the thread's whole
    span: after its last burst the thread only waited (for its sleep, then
    for the interpreter while the dispatching threads held it) and sent
    nothing, and no later burst came to catch that wait up. On a 2-core
    machine with four dispatching threads that wait was up to 80 ms, a third
    of a 0.25 s smoke scenario. A scheduler too slow for the rate still
    shows: its bursts fall behind what is due, and their end moves with
    them.

    ``send(now_ns, count)`` sends one burst: ``count`` heartbeats, with
    ``time.perf_counter_ns()`` read at the start of the burst. What a
    heartbeat is, and what it counts, is the tool's business; one call per
    burst keeps the pacing's own cost out of each heartbeat.
    """

    def __init__(self, window: Window, rate: float, send: Callable[[int, int], object]) -> None:
        """Pace ``send`` at ``rate`` heartbeats a second.

        :param window: the run's window (start, deadline, errors).
        :param rate: heartbeats per second, > 0.
        :param send: sends a burst; receives the current time (ns) and how many.
        """
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        self.window = window
        self.rate = float(rate)
        self.send = send
        self.sent = 0  #: heartbeats sent (in bursts that completed)
        self.elapsed_ns = 0  #: from the window's start to the thread's end
        self.active_ns = 0  #: from the window's start to the end of the last burst (the rate's time)
        self.cpu_ns = 0  #: CPU time the thread used (time.thread_time_ns)

    def __call__(self) -> None:
        """The thread's body."""
        send = self.send
        perf = time.perf_counter_ns
        sleep = time.sleep
        per_ns = self.rate / 1e9
        window = self.window
        errors = window.errors
        window.go.wait()
        start = window.start_ns
        deadline = window.deadline_ns
        cpu0 = time.thread_time_ns()
        done = 0
        now = perf()
        last = start  # the end of the last burst
        try:
            while True:
                due = int((now - start) * per_ns) + 1 - done
                if due <= 0:
                    sleep(_IDLE_SLEEP)
                    now = perf()
                    if now >= deadline:
                        break
                    continue
                burst = due if due < _BURST else _BURST
                send(now, burst)
                done += burst
                now = last = perf()
                if now >= deadline or errors:
                    break
        finally:
            self.sent = done
            self.active_ns = last - start
            self.elapsed_ns = now - start
            self.cpu_ns = time.thread_time_ns() - cpu0


def timer_overhead_ns(n: int = 20_000) -> int:
    """Median of back-to-back ``perf_counter_ns`` differences: what taking a latency sample costs by itself.

    :param n: pairs of readings.
    """
    perf = time.perf_counter_ns
    deltas = array("q", bytes(8 * n))
    for i in range(n):
        t0 = perf()
        deltas[i] = perf() - t0
    return int(np.median(np.frombuffer(deltas, dtype=np.int64)))
