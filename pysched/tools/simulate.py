"""A simulated speech-translation fleet driving a real :class:`Scheduler`.

:func:`run_simulation` registers an embedded fleet of nodes with realistic
language sets, then runs, for a fixed wall-clock time:

* one heartbeat thread sending heartbeats for every node at a target total
  rate, reporting the jobs each node currently holds, random-walking
  cpu/gpu/mem, with occasional ``healthy=False`` streaks (the node turns
  ``degraded`` and recovers) and rare silences long enough for the node to
  go offline by ``heartbeat_timeout`` before it comes back;
* ``threads`` session threads, each driving its share of the sessions:
  ``dispatch`` -> ``commit`` -> hold for a short simulated processing time
  -> ``release``, with every ``dispatch`` call timed.

Every simulated node counts the jobs it holds at once, and the run records
the highest count ever seen per node: the **over-commit check** is that no
node ever held more than its ``max_concurrency``.

>>> from pysched.tools.simulate import SimulationConfig, run_simulation
>>> report = run_simulation(SimulationConfig(duration=0.5, nodes=10, sessions=20, threads=1))
>>> report.dispatches > 0 and not report.overcommits
True
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pysched.errors import NoNodeAvailable, NoPoolForLanguagePair
from pysched.scheduler import Scheduler
from pysched.tools.argtypes import positive_float, positive_int
from pysched.tools.bench.harness import LatencyRecorder, PacedHeartbeats, Threads, Window, summarise
from pysched.tools.console import StatusLine

__all__ = [
    "LANGUAGE_SETS",
    "Progress",
    "ProgressPrinter",
    "SimNode",
    "SimulationConfig",
    "SimulationReport",
    "add_arguments",
    "build_fleet",
    "run",
    "run_simulation",
]

#: Language sets a node may serve, with their relative frequency in the fleet.
#: Auto pools group nodes by language set, so these become the pools.
LANGUAGE_SETS: tuple[tuple[tuple[str, ...], int], ...] = (
    (("zh", "en"), 20),
    (("en", "ja"), 10),
    (("de", "en", "fr"), 10),
    (("en", "es", "pt"), 10),
    (("zh", "en", "ja", "ko"), 8),
    (("en", "es"), 8),
    (("en", "fr"), 6),
    (("en", "ko"), 6),
    (("de", "en"), 5),
    (("en", "ru"), 4),
    (("ar", "en"), 4),
    (("en", "hi"), 3),
    (("en", "fr", "it"), 3),
    (("en", "th", "vi"), 3),
)

#: Pairs no node serves: a few stray requests exercise ``NoPoolForLanguagePair``.
EXOTIC_PAIRS: tuple[tuple[str, str], ...] = (("fi", "sw"), ("pl", "uk"), ("el", "tr"))

ALL_SERVICES = ("asr", "nmt", "tts", "semantic")

# Fleet shape: small fractions of nodes that dispatch's default job
# (asr+nmt+tts, GPU, public) cannot use, so those reason codes show up.
_P_NO_TTS = 0.04
_P_NO_GPU = 0.04
_P_PRIVATE = 0.04

# Session behaviour, per job.
_P_AUTO_SRC = 0.08  # of sessions: source language "auto"
_P_SWITCH = 0.005  # the session switches to another language pair
_P_STRAY = 0.001  # one job asks for a pair nobody serves
# A client retries a failed dispatch with exponential backoff (10 ms doubling
# up to 320 ms, jittered by x0.5-1.5): retrying a full pool every few ms would
# mostly measure the cost of refusals, not of dispatch.
_RETRY_BASE_NS = 10_000_000
_RETRY_MAX_DOUBLINGS = 5

# Node misbehaviour, as fleet-wide events per second (independent of the heartbeat rate).
_UNHEALTHY_EVENTS_PER_S = 2.0  # start of a healthy=False streak somewhere in the fleet
_UNHEALTHY_STREAK = (3, 8)  # heartbeats; 3 in a row make a ready node degraded
_SILENCE_EVENTS_PER_S = 0.4  # a node stops heartbeating ...
_SILENCE_SECONDS = (1.5, 3.5)  # ... for this much longer than heartbeat_timeout, then returns

_UTIL_SAMPLE_NS = 200_000_000  # between utilisation samples
_OVERCOMMITS_LISTED = 10  # over-committed nodes the summary names
_TEARDOWN_RESERVE = 0.15  # seconds of the wall-clock budget kept for teardown and percentiles


@dataclass
class SimulationConfig:
    """What to simulate. The defaults finish in about ``duration`` seconds."""

    duration: float = 10.0  #: total wall time in seconds, setup and teardown included
    nodes: int = 200
    sessions: int = 2000
    threads: int = 4  #: session threads
    heartbeat_rate: float = 2000.0  #: heartbeats per second, all nodes together
    seed: int = 1
    heartbeat_timeout: float = 2.0  #: short, so silent nodes visibly go offline within a run
    hold_ms: tuple[float, float] = (1.0, 20.0)  #: simulated processing time of one job
    progress_interval: float = 1.0  #: seconds between progress callbacks
    kernel: str = "auto"
    #: heartbeats report ``running`` (the jobs the node holds). The scheduler
    #: counts ``max(in-flight, reported running)``, so with 10 ms jobs and a
    #: heartbeat per node every 100 ms a report pins capacity after the jobs
    #: end; False shows what that costs.
    report_running: bool = True

    def __post_init__(self) -> None:
        for name in ("nodes", "sessions", "threads"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("duration", "heartbeat_rate", "heartbeat_timeout", "progress_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if type(self.seed) is not int:
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        lo, hi = self.hold_ms
        if not 0 <= lo <= hi:
            raise ValueError(f"hold_ms must be (min, max) with 0 <= min <= max, got {self.hold_ms!r}")


@dataclass(frozen=True)
class SimNode:
    """One simulated worker node, as registered with the scheduler."""

    node_id: str
    languages: tuple[str, ...]
    services: tuple[str, ...]
    max_concurrency: int
    has_gpu: bool
    accept_public_jobs: bool


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives, about once per ``progress_interval``."""

    elapsed: float  #: seconds since the dispatch phase started
    dispatches: int  #: successful dispatches so far
    rate: float  #: successful dispatches per second over the last interval
    failures: int  #: failed dispatches so far
    heartbeats: int  #: heartbeats applied so far
    in_flight: int  #: jobs held by simulated nodes right now


@dataclass
class SimulationReport:
    """The outcome of :func:`run_simulation`."""

    config: SimulationConfig
    elapsed: float  #: seconds of the dispatch phase
    wall: float  #: seconds of the whole run, setup and teardown included
    setup: float  #: seconds spent building the scheduler and registering nodes
    dispatches: int  #: successful dispatch calls
    failures: dict[str, int]  #: failed dispatch calls by reason
    latency_us: dict[str, float]  #: p50/p99/p99.9/mean/max of successful dispatch calls, µs
    heartbeats: int  #: heartbeats applied
    utilisation: dict[str, float]  #: per-node mean held/max_concurrency: min/mean/max/cv
    max_held: dict[str, tuple[int, int]]  #: node id -> (most jobs ever held at once, max_concurrency)
    overcommits: list[tuple[str, int, int]]  #: (node id, peak held, max_concurrency) of violators
    silences: int  #: nodes that went silent during the run
    unhealthy_streaks: int  #: healthy=False streaks sent
    #: ``sched.stats()`` at the end (Any: the scheduler's JSON-like figures, nested)
    stats: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no node ever held more jobs than its max concurrency."""
        return not self.overcommits

    @property
    def attempts(self) -> int:
        """Dispatch calls made, successful or not."""
        return self.dispatches + sum(self.failures.values())

    @property
    def dispatch_rate(self) -> float:
        """Successful dispatches per second of the dispatch phase."""
        return self.dispatches / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def heartbeat_rate(self) -> float:
        """Heartbeats applied per second of the dispatch phase."""
        return self.heartbeats / self.elapsed if self.elapsed > 0 else 0.0

    def summary_line(self) -> str:
        """One greppable line: throughput, latency percentiles, over-commits."""
        lat = self.latency_us
        return (
            f"pysched simulate: {self.dispatches:,} dispatches in {self.elapsed:.1f} s "
            f"({self.dispatch_rate:,.0f}/s), p50 {lat['p50']:.1f} µs, p99 {lat['p99']:.1f} µs, "
            f"p99.9 {lat['p99.9']:.1f} µs, {len(self.overcommits)} over-commits"
        )

    def format_summary(self) -> str:
        """The full human-readable summary; the first line is :meth:`summary_line`."""
        cfg = self.config
        lat = self.latency_us
        failed = sum(self.failures.values())
        attempts = self.attempts
        lines = [self.summary_line()]
        lines.append(
            f"  fleet        {cfg.nodes:,} nodes, {cfg.sessions:,} sessions on {cfg.threads} threads, "
            f"seed {cfg.seed}, {'compiled' if self.stats.get('compiled') else 'pure-Python'} kernel, "
            f"setup {self.setup * 1000:.0f} ms, wall {self.wall:.1f} s"
        )
        share = 100.0 * failed / attempts if attempts else 0.0
        lines.append(f"  dispatch     {attempts:,} attempts: {self.dispatches:,} ok, {failed:,} failed ({share:.2f}%)")
        lines.append(
            f"  latency      p50 {lat['p50']:.1f} µs, p99 {lat['p99']:.1f} µs, p99.9 {lat['p99.9']:.1f} µs, "
            f"mean {lat['mean']:.1f} µs, max {lat['max']:,.0f} µs (successful dispatch() calls)"
        )
        if self.failures:
            parts = ", ".join(f"{k} {v:,}" for k, v in sorted(self.failures.items(), key=lambda kv: -kv[1]))
            lines.append(f"  failures     {parts}")
        else:
            lines.append("  failures     none")
        requested = cfg.heartbeat_rate
        lines.append(
            f"  heartbeats   {self.heartbeats:,} applied, {self.heartbeat_rate:,.0f}/s "
            f"(requested {requested:,.0f}/s, {100.0 * self.heartbeat_rate / requested:.1f}%); "
            f"{self.unhealthy_streaks} unhealthy streaks, {self.silences} silent nodes"
        )
        u = self.utilisation
        lines.append(
            f"  utilisation  per-node mean held/max: min {u['min']:.2f}, mean {u['mean']:.2f}, "
            f"max {u['max']:.2f}, cv {u['cv']:.2f} ({int(u['nodes'])} nodes able to take the jobs, "
            f"{int(u['samples'])} samples)"
        )
        if self.overcommits:
            shown = self.overcommits[:_OVERCOMMITS_LISTED]
            worst = ", ".join(f"{n} held {p} > max {m}" for n, p, m in shown)
            more = f" (+{len(self.overcommits) - len(shown)} more)" if len(self.overcommits) > len(shown) else ""
            lines.append(
                f"  over-commit  FAILED: {len(self.overcommits)} nodes exceeded their max concurrency: {worst}{more}"
            )
        else:
            full = sum(1 for peak, mx in self.max_held.values() if peak == mx)
            lines.append(
                f"  over-commit  no node ever exceeded its max concurrency "
                f"({full} of {len(self.max_held)} nodes reached it)"
            )
        st = self.stats
        if st:
            statuses = ", ".join(f"{k} {v}" for k, v in st.get("nodes", {}).items() if v)
            lines.append(
                f"  scheduler    nodes: {statuses}; {len(st.get('pools', {}))} pools, "
                f"{len(st.get('unpooled', []))} unpooled; snapshot version {st.get('snapshot_version')}; "
                f"{st.get('sessions', 0):,} sessions; {st.get('reservations', 0)} reservations left"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable view of the report."""
        return {
            "summary": self.summary_line(),
            "ok": self.ok,
            "config": asdict(self.config),
            "elapsed_s": self.elapsed,
            "wall_s": self.wall,
            "setup_s": self.setup,
            "dispatches": self.dispatches,
            "attempts": self.attempts,
            "dispatch_rate": self.dispatch_rate,
            "latency_us": dict(self.latency_us),
            "failures": dict(self.failures),
            "heartbeats": {
                "applied": self.heartbeats,
                "rate": self.heartbeat_rate,
                "requested_rate": self.config.heartbeat_rate,
                "unhealthy_streaks": self.unhealthy_streaks,
                "silences": self.silences,
            },
            "utilisation": dict(self.utilisation),
            "overcommits": [{"node_id": n, "max_held": p, "max_concurrency": m} for n, p, m in self.overcommits],
            "max_held": {n: {"max_held": p, "max_concurrency": m} for n, (p, m) in self.max_held.items()},
            # JSON object keys must be strings (pool ids are ints)
            "scheduler": _jsonable(self.stats),
        }


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------- the fleet
def build_fleet(n: int, rng: random.Random) -> list[SimNode]:
    """``n`` nodes with language sets drawn from :data:`LANGUAGE_SETS`."""
    sets = [s for s, _ in LANGUAGE_SETS]
    weights = [w for _, w in LANGUAGE_SETS]
    nodes = []
    for i in range(n):
        langs = rng.choices(sets, weights)[0]
        services = tuple(s for s in ALL_SERVICES if s != "tts") if rng.random() < _P_NO_TTS else ALL_SERVICES
        nodes.append(SimNode(
            node_id=f"node-{i:04d}",
            languages=langs,
            services=services,
            max_concurrency=rng.randint(2, 8),
            has_gpu=rng.random() >= _P_NO_GPU,
            accept_public_jobs=rng.random() >= _P_PRIVATE,
        ))
    return nodes


class _PairPicker:
    """Draws session language pairs with demand proportional to fleet capacity."""

    def __init__(self, fleet: list[SimNode]) -> None:
        self._sets = [node.languages for node in fleet]
        self._weights = list(itertools.accumulate(node.max_concurrency for node in fleet))

    def pick(self, rng: random.Random) -> tuple[str, str]:
        langs = rng.choices(self._sets, cum_weights=self._weights)[0]
        src, tgt = rng.sample(langs, 2)
        if rng.random() < _P_AUTO_SRC:
            src = "auto"
        return src, tgt


# ---------------------------------------------------------------- shared state
class _Fleet:
    """The simulated nodes' side of the run, shared by the simulator's threads."""

    def __init__(self, sched: Scheduler, fleet: list[SimNode]) -> None:
        self.sched = sched
        self.fleet = fleet
        self.index = {node.node_id: i for i, node in enumerate(fleet)}
        self.max_conc = [node.max_concurrency for node in fleet]
        # Jobs each simulated node holds now, and the most it ever held at once,
        # each node's pair guarded by its own lock: a global one would be
        # contended whenever the GIL preempts a thread inside it, and a
        # blocked acquire costs a GIL hand-off, i.e. milliseconds.
        self.held = [0] * len(fleet)
        self.peak = [0] * len(fleet)
        self.locks = [threading.Lock() for _ in fleet]


class _SessionWorker:
    """One session thread: dispatch, commit, hold, release for its sessions."""

    def __init__(self, fleet: _Fleet, window: Window, sessions: list[int], picker: _PairPicker,
                 config: SimulationConfig, seed: int) -> None:
        self.fleet = fleet
        self.window = window
        self.rng = random.Random(seed)
        self.picker = picker
        self.session_ids = [f"sess-{i:05d}" for i in sessions]
        self.pairs = [picker.pick(self.rng) for _ in sessions]
        lo, hi = config.hold_ms
        self.hold_lo_ns = int(lo * 1e6)
        self.hold_span_ns = int((hi - lo) * 1e6)
        # room for the calls a thread makes at 200,000 a second; grows beyond
        self.latency = LatencyRecorder(max(4096, int(config.duration * 200_000 / config.threads)))
        self.dispatches = 0  #: successful dispatches so far (read by the progress loop)
        self.failed = 0
        self.failures: dict[str, int] = {}

    def __call__(self) -> None:
        """The thread's body."""
        fl = self.fleet
        sched = fl.sched
        dispatch, commit, release = sched.dispatch, sched.commit, sched.release
        index, held, peak, locks = fl.index, fl.held, fl.peak, fl.locks
        rnd = self.rng.random
        pairs, session_ids = self.pairs, self.session_ids
        hold_lo, hold_span = self.hold_lo_ns, self.hold_span_ns
        perf = time.perf_counter_ns
        heappush, heappop = heapq.heappush, heapq.heappop
        rec = self.latency
        lat, cap, overflow = rec.buffer, rec.capacity, rec.overflow
        n = 0
        due: list[tuple[int, str, int, int]] = []  # (due ns, job id, node, session): jobs in processing
        retry: list[tuple[int, int]] = []  # (ready ns, session): failed sessions backing off
        idle = deque(range(len(session_ids)))
        streak = [0] * len(session_ids)  # consecutive failed dispatches per session
        window = self.window
        errors = window.errors  # another thread failed: stop early
        window.go.wait()
        end = window.deadline_ns
        now = perf()
        reason: str
        while now < end and not errors:
            while due and due[0][0] <= now:
                _, job_id, node, s = heappop(due)
                # The node lets go of the job *before* the scheduler hears of
                # it, so the node's count never lags a freed reservation.
                with locks[node]:
                    held[node] -= 1
                release(job_id)
                idle.append(s)
            while retry and retry[0][0] <= now:
                idle.append(heappop(retry)[1])
            if not idle:
                nxt = min(due[0][0] if due else end, retry[0][0] if retry else end, end)
                # sleeping releases the GIL to the other threads
                time.sleep(max(0, nxt - now) / 1e9)
                now = perf()
                continue
            s = idle.popleft()
            src, tgt = pairs[s]
            r = rnd()
            if r < _P_SWITCH:
                src, tgt = pairs[s] = self.picker.pick(self.rng)
            elif r < _P_SWITCH + _P_STRAY:
                src, tgt = EXOTIC_PAIRS[int(r * 1e6) % len(EXOTIC_PAIRS)]
            t0 = perf()
            try:
                a = dispatch(session_ids[s], src, tgt)
            except NoNodeAvailable as e:
                reason = e.best_reason
            except NoPoolForLanguagePair:
                reason = "no_pool"
            else:
                now = perf()
                if n < cap:
                    lat[n] = now - t0
                else:
                    cap = overflow(n, now - t0)
                n += 1
                self.dispatches = n
                commit(a.job_id)
                node = index[a.node_id]
                with locks[node]:
                    h = held[node] = held[node] + 1
                    if h > peak[node]:  # noqa: PLR1730  (cheaper than a max() call, once per dispatch)
                        peak[node] = h
                heappush(due, (now + hold_lo + int(rnd() * hold_span), a.job_id, node, s))
                streak[s] = 0
                continue
            now = perf()
            self.failed += 1
            self.failures[reason] = self.failures.get(reason, 0) + 1
            k = streak[s]
            streak[s] = k + 1 if k < _RETRY_MAX_DOUBLINGS else k
            heappush(retry, (now + int((_RETRY_BASE_NS << k) * (0.5 + rnd())), s))
        rec.count = n
        # Time is up: finish every job still held so the scheduler ends clean.
        for _, job_id, node, _s in due:
            with locks[node]:
                held[node] -= 1
            release(job_id)


class _FleetHeartbeats:
    """The fleet's heartbeats, a burst per call (what the paced heartbeat thread sends).

    Nodes take turns; each heartbeat reports the jobs the node holds and
    random-walking cpu/gpu/mem, sometimes ``healthy=False`` for a streak;
    now and then a node falls silent for longer than ``heartbeat_timeout``
    (its turns go to the next node, so the rate holds). Every
    ``_UTIL_SAMPLE_NS`` the per-node utilisation is sampled.
    """

    def __init__(self, fleet: _Fleet, window: Window, config: SimulationConfig, seed: int) -> None:
        self.fleet = fleet
        self.window = window
        rate = float(config.heartbeat_rate)
        self.rng = rng = random.Random(seed)
        n = len(fleet.fleet)
        self.node_ids = [node.node_id for node in fleet.fleet]
        self.max_conc_arr = np.array(fleet.max_conc, dtype=np.float64)
        self.base = [rng.uniform(15.0, 55.0) for _ in range(n)]
        self.cpu = list(self.base)
        self.gpu = [rng.uniform(10.0, 60.0) for _ in range(n)]
        self.mem = [rng.uniform(20.0, 60.0) for _ in range(n)]
        self.unhealthy_left = [0] * n
        self.silent_until = [0] * n  # perf_counter_ns; 0 = talking
        self.silent_now = 0
        self.p_unhealthy = _UNHEALTHY_EVENTS_PER_S / rate
        self.p_silence = _SILENCE_EVENTS_PER_S / rate
        self.max_silent = max(1, n // 50)
        lo, hi = (int((config.heartbeat_timeout + s) * 1e9) for s in _SILENCE_SECONDS)
        self.silence_lo_ns, self.silence_span_ns = lo, hi - lo
        self.report_running = config.report_running
        self.i = 0  # the node whose turn it was last
        self.applied = 0
        self.unhealthy_streaks = 0
        self.silences = 0
        self.util_sum = np.zeros(n)
        self.util_samples = 0
        self.next_sample = 0  # perf_counter_ns of the next utilisation sample; set at the first beat

    def __call__(self, now: int, count: int) -> None:
        """Send ``count`` heartbeats, node after node (a turn may silence its node instead).

        :param now: ``time.perf_counter_ns()``, from the pacer.
        :param count: how many turns.
        """
        fl = self.fleet
        held, max_conc = fl.held, fl.max_conc
        if now >= self.next_sample:
            if self.next_sample:
                # per-node utilisation, sampled: the mean over the run shows the spread
                self.util_sum += np.array(held, dtype=np.float64) / self.max_conc_arr
                self.util_samples += 1
                self.next_sample += _UTIL_SAMPLE_NS
            else:
                self.next_sample = self.window.start_ns + _UTIL_SAMPLE_NS
        heartbeat = fl.sched.heartbeat
        node_ids = self.node_ids
        rng = self.rng
        rnd, gauss = rng.random, rng.gauss
        cpu, gpu, mem, base = self.cpu, self.gpu, self.mem, self.base
        unhealthy_left, silent_until = self.unhealthy_left, self.silent_until
        report_running = self.report_running
        n = len(silent_until)
        i = self.i
        for _ in range(count):
            # a silent node is skipped, the next one takes its turn, so the rate holds
            for _skip in range(n):
                i = i + 1 if i + 1 < n else 0
                if not silent_until[i]:
                    break
                if now >= silent_until[i]:
                    silent_until[i] = 0
                    self.silent_now -= 1
                    break
            else:
                break  # the whole fleet is silent
            r = rnd()
            if r < self.p_silence and self.silent_now < self.max_silent:
                silent_until[i] = now + self.silence_lo_ns + int(rnd() * self.silence_span_ns)
                self.silent_now += 1
                self.silences += 1
                continue
            if r > 1.0 - self.p_unhealthy and not unhealthy_left[i]:
                unhealthy_left[i] = rng.randint(*_UNHEALTHY_STREAK)
                self.unhealthy_streaks += 1
            healthy = True
            if unhealthy_left[i]:
                unhealthy_left[i] -= 1
                healthy = False
            h = held[i]
            util = h / max_conc[i]
            # mean-reverting walks; load follows the jobs held, so a busy node may read overloaded
            c = cpu[i] = min(100.0, max(0.0, cpu[i] + 0.2 * (base[i] - cpu[i]) + gauss(0.0, 3.0)))
            g = gpu[i] = min(100.0, max(0.0, gpu[i] + 0.2 * (40.0 - gpu[i]) + gauss(0.0, 3.0)))
            m = mem[i] = min(100.0, max(0.0, mem[i] + 0.1 * (45.0 - mem[i]) + gauss(0.0, 1.0)))
            heartbeat(
                node_ids[i],
                running=h if report_running else None,
                cpu=min(100.0, c + 30.0 * util),
                gpu=min(100.0, g + 35.0 * util),
                mem=m,
                healthy=healthy,
            )
            self.applied += 1
        self.i = i


# ---------------------------------------------------------------- the run
def _utilisation(fleet: list[SimNode], hb: _FleetHeartbeats) -> dict[str, float]:
    """Spread of per-node mean held/max_concurrency over the nodes that can take the sessions' jobs.

    Those are the GPU, public, tts nodes: the others get none by design and
    would only blur how evenly dispatch spreads load.
    """
    eligible = np.array([n.has_gpu and n.accept_public_jobs and "tts" in n.services for n in fleet])
    if not eligible.any():
        eligible[:] = True
    samples = max(1, hb.util_samples)
    per_node = (hb.util_sum / samples)[eligible]
    mean = float(per_node.mean())
    return {
        "min": float(per_node.min()),
        "mean": mean,
        "max": float(per_node.max()),
        "cv": float(per_node.std() / mean) if mean > 0 else 0.0,
        "nodes": float(len(per_node)),
        "samples": float(hb.util_samples),
    }


def _progress_loop(window: Window, config: SimulationConfig, workers: list[_SessionWorker], fleet: _Fleet,
                   hb: _FleetHeartbeats, progress: Callable[[Progress], None] | None) -> None:
    """Wait for the window to close, reporting progress about once per ``progress_interval``."""
    step = int(config.progress_interval * 1e9)
    next_tick = window.start_ns + step
    last_ns, last_count = window.start_ns, 0
    while True:
        now = time.perf_counter_ns()
        if now >= window.deadline_ns or window.errors:
            return
        time.sleep(max(0, min(next_tick, window.deadline_ns) - now) / 1e9)
        now = time.perf_counter_ns()
        if now >= next_tick:
            next_tick += step
            count = sum(w.dispatches for w in workers)
            if progress is not None:
                progress(Progress(
                    elapsed=(now - window.start_ns) / 1e9,
                    dispatches=count,
                    rate=(count - last_count) * 1e9 / max(1, now - last_ns),
                    failures=sum(w.failed for w in workers),
                    heartbeats=hb.applied,
                    in_flight=sum(fleet.held),
                ))
            last_ns, last_count = now, count


def run_simulation(config: SimulationConfig | None = None,
                   progress: Callable[[Progress], None] | None = None) -> SimulationReport:
    """Run the simulation described by ``config`` and return its report.

    The run takes about ``config.duration`` seconds of wall time, setup included.

    :param config: what to simulate (default: :class:`SimulationConfig`'s defaults).
    :param progress: called from the calling thread about once per
        ``config.progress_interval`` with a :class:`Progress`.
    :raises BaseException: what a simulator thread raised, if one did.
    """
    config = config or SimulationConfig()
    wall_start = time.perf_counter_ns()
    deadline = wall_start + int(config.duration * 1e9)
    rng = random.Random(config.seed)

    sched = Scheduler(heartbeat_timeout=config.heartbeat_timeout, seed=config.seed, kernel=config.kernel)
    try:
        nodes = build_fleet(config.nodes, rng)
        for node in nodes:
            sched.register_node(node.node_id, node.languages, node.services, node.max_concurrency,
                                node.has_gpu, node.accept_public_jobs)
        fleet = _Fleet(sched, nodes)
        picker = _PairPicker(nodes)
        window = Window()
        workers = [
            _SessionWorker(fleet, window, list(range(t, config.sessions, config.threads)), picker, config,
                           rng.getrandbits(64))
            for t in range(min(config.threads, config.sessions))
        ]
        beats = _FleetHeartbeats(fleet, window, config, rng.getrandbits(64))
        hb = PacedHeartbeats(window, config.heartbeat_rate, beats)
        runner = Threads(window)
        for k, w in enumerate(workers):
            runner.add(w, f"pysched-sim-sessions-{k}", "session thread")
        runner.add(hb, "pysched-sim-heartbeats", "heartbeat thread")
        runner.start()

        start = time.perf_counter_ns()
        setup = (start - wall_start) / 1e9
        # keep a little of the budget for joining, draining and percentiles
        window.open(start, max(start + int(0.05e9), deadline - int(_TEARDOWN_RESERVE * 1e9)))
        _progress_loop(window, config, workers, fleet, beats, progress)
        runner.join()
        if window.errors:
            raise window.errors[0].exc
        elapsed = (window.deadline_ns - window.start_ns) / 1e9

        latency = summarise(w.latency for w in workers)
        failures: dict[str, int] = {}
        for w in workers:
            for reason, count in w.failures.items():
                failures[reason] = failures.get(reason, 0) + count
        max_held = {node.node_id: (fleet.peak[i], node.max_concurrency) for i, node in enumerate(nodes)}
        return SimulationReport(
            config=config,
            elapsed=elapsed,
            wall=(time.perf_counter_ns() - wall_start) / 1e9,
            setup=setup,
            dispatches=sum(w.dispatches for w in workers),
            failures=failures,
            latency_us=latency.us or dict.fromkeys(("p50", "p99", "p99.9", "max", "mean"), 0.0),
            heartbeats=beats.applied,
            utilisation=_utilisation(nodes, beats),
            max_held=max_held,
            overcommits=[(nid, p, m) for nid, (p, m) in max_held.items() if p > m],
            silences=beats.silences,
            unhealthy_streaks=beats.unhealthy_streaks,
            stats=sched.stats(),
        )
    finally:
        sched.close()


# ---------------------------------------------------------------- the command
class ProgressPrinter(StatusLine):
    r"""Prints simulation progress to ``stream``.

    One line a second, redrawn in place with ``\r`` on a terminal, as plain
    lines otherwise (logs, CI).
    """

    def __call__(self, p: Progress) -> None:
        """Print one progress line.

        :param p: what to print.
        """
        self.line(f"{p.elapsed:5.1f} s  {p.dispatches:>11,} dispatches  {p.rate:>9,.0f}/s  "
                  f"{p.failures:>8,} failures  {p.heartbeats:>9,} heartbeats  {p.in_flight:>6,} in flight")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``pysched simulate``'s options to ``parser``.

    :param parser: the subcommand's parser.
    """
    parser.add_argument("--duration", type=positive_float, default=10.0,
                        help="total wall time in seconds, setup included (default: 10)")
    parser.add_argument("--nodes", type=positive_int, default=200, help="simulated nodes (default: 200)")
    parser.add_argument("--sessions", type=positive_int, default=2000, help="sessions in total (default: 2000)")
    parser.add_argument("--threads", type=positive_int, default=4,
                        help="session threads sharing the sessions (default: 4)")
    parser.add_argument("--heartbeat-rate", type=positive_float, default=2000.0,
                        help="heartbeats per second, all nodes together (default: 2000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fleet and the traffic (default: 1)")
    parser.add_argument("--kernel", choices=("auto", "compiled", "python"), default="auto",
                        help="dispatch kernel (default: auto, the compiled one when built)")
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    """``pysched simulate``: run, print the summary, write the JSON; exit status 1 if a node was over-committed.

    :param args: the parsed options (:func:`add_arguments`).
    """
    config = SimulationConfig(
        duration=args.duration,
        nodes=args.nodes,
        sessions=args.sessions,
        threads=args.threads,
        heartbeat_rate=args.heartbeat_rate,
        seed=args.seed,
        kernel=args.kernel,
    )
    printer = None if args.quiet else ProgressPrinter(sys.stderr)
    try:
        report = run_simulation(config, progress=printer)
    finally:
        if printer is not None:
            printer.finish()
    print(report.format_summary(), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")
    return 0 if report.ok else 1
