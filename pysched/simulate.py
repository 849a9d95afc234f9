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

>>> from pysched.simulate import SimulationConfig, run_simulation
>>> report = run_simulation(SimulationConfig(duration=0.5, nodes=10, sessions=20, threads=1))
>>> report.dispatches > 0 and not report.overcommits
True
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from pysched.errors import NoNodeAvailable, NoPoolForLanguagePair
from pysched.scheduler import Scheduler

__all__ = [
    "LANGUAGE_SETS",
    "Progress",
    "SimNode",
    "SimulationConfig",
    "SimulationReport",
    "build_fleet",
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

_UTIL_SAMPLE_INTERVAL = 0.2  # seconds between utilisation samples
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
    stats: dict = field(default_factory=dict)  #: ``sched.stats()`` at the end

    @property
    def ok(self) -> bool:
        """True when no node ever held more jobs than its max concurrency."""
        return not self.overcommits

    @property
    def attempts(self) -> int:
        return self.dispatches + sum(self.failures.values())

    @property
    def dispatch_rate(self) -> float:
        return self.dispatches / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def heartbeat_rate(self) -> float:
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
            worst = ", ".join(f"{n} held {p} > max {m}" for n, p, m in self.overcommits[:10])
            more = f" (+{len(self.overcommits) - 10} more)" if len(self.overcommits) > 10 else ""
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

    def to_dict(self) -> dict:
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
class _Shared:
    """State the simulator owns, shared by its threads."""

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
        self.go = threading.Event()
        self.start_ns = 0
        self.end_ns = 0
        self.errors: list[BaseException] = []


class _SessionWorker:
    """One session thread: dispatch, commit, hold, release for its sessions."""

    def __init__(self, shared: _Shared, sessions: list[int], picker: _PairPicker, config: SimulationConfig,
                 seed: int) -> None:
        self.shared = shared
        self.rng = random.Random(seed)
        self.picker = picker
        self.session_ids = [f"sess-{i:05d}" for i in sessions]
        self.pairs = [picker.pick(self.rng) for _ in sessions]
        lo, hi = config.hold_ms
        self.hold_lo_ns = int(lo * 1e6)
        self.hold_span_ns = int((hi - lo) * 1e6)
        # Preallocated so timing a call costs one array store; grown by
        # doubling in the unlikely case the estimate is short.
        self.latency = np.empty(max(4096, int(config.duration * 200_000 / config.threads)), dtype=np.int64)
        self.dispatches = 0
        self.failed = 0
        self.failures: dict[str, int] = {}

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaced by run_simulation after join
            self.shared.errors.append(exc)

    def _run(self) -> None:
        sh = self.shared
        sched = sh.sched
        dispatch, commit, release = sched.dispatch, sched.commit, sched.release
        index, held, peak, locks = sh.index, sh.held, sh.peak, sh.locks
        rnd = self.rng.random
        pairs, session_ids = self.pairs, self.session_ids
        hold_lo, hold_span = self.hold_lo_ns, self.hold_span_ns
        perf = time.perf_counter_ns
        heappush, heappop = heapq.heappush, heapq.heappop
        lat = self.latency
        cap = len(lat)
        n = 0
        due: list[tuple[int, str, int, int]] = []  # (due ns, job id, node, session): jobs in processing
        retry: list[tuple[int, int]] = []  # (ready ns, session): failed sessions backing off
        idle = deque(range(len(session_ids)))
        streak = [0] * len(session_ids)  # consecutive failed dispatches per session
        errors = sh.errors  # another thread failed: stop early
        sh.go.wait()
        end = sh.end_ns
        now = perf()
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
                if n == cap:
                    lat = self.latency = np.concatenate([lat, np.empty_like(lat)])
                    cap = len(lat)
                lat[n] = now - t0
                n += 1
                self.dispatches = n
                commit(a.job_id)
                node = index[a.node_id]
                with locks[node]:
                    h = held[node] = held[node] + 1
                    if h > peak[node]:
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
        # Time is up: finish every job still held so the scheduler ends clean.
        for _, job_id, node, _s in due:
            with locks[node]:
                held[node] -= 1
            release(job_id)
        self.latency = lat[:n]


class _HeartbeatWorker:
    """The one heartbeat thread for the whole fleet, paced to a target rate."""

    def __init__(self, shared: _Shared, config: SimulationConfig, seed: int) -> None:
        self.shared = shared
        self.rate = float(config.heartbeat_rate)
        self.rng = random.Random(seed)
        n = len(shared.fleet)
        rng = self.rng
        self.base = [rng.uniform(15.0, 55.0) for _ in range(n)]
        self.cpu = list(self.base)
        self.gpu = [rng.uniform(10.0, 60.0) for _ in range(n)]
        self.mem = [rng.uniform(20.0, 60.0) for _ in range(n)]
        self.unhealthy_left = [0] * n
        self.silent_until = [0] * n  # perf_counter_ns; 0 = talking
        self.p_unhealthy = _UNHEALTHY_EVENTS_PER_S / self.rate
        self.p_silence = _SILENCE_EVENTS_PER_S / self.rate
        self.max_silent = max(1, n // 50)
        lo, hi = (int((config.heartbeat_timeout + s) * 1e9) for s in _SILENCE_SECONDS)
        self.silence_lo_ns, self.silence_span_ns = lo, hi - lo
        self.report_running = config.report_running
        self.applied = 0
        self.unhealthy_streaks = 0
        self.silences = 0
        self.util_sum = np.zeros(n)
        self.util_samples = 0

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.shared.errors.append(exc)

    def _run(self) -> None:
        sh = self.shared
        heartbeat = sh.sched.heartbeat
        fleet, held, max_conc = sh.fleet, sh.held, sh.max_conc
        max_conc_arr = np.array(max_conc, dtype=np.float64)
        errors = sh.errors
        n = len(fleet)
        node_ids = [node.node_id for node in fleet]
        rng = self.rng
        rnd, gauss = rng.random, rng.gauss
        cpu, gpu, mem, base = self.cpu, self.gpu, self.mem, self.base
        unhealthy_left, silent_until = self.unhealthy_left, self.silent_until
        perf = time.perf_counter_ns
        report_running = self.report_running
        sh.go.wait()
        start, end = sh.start_ns, sh.end_ns
        ns_per_hb = 1e9 / self.rate
        sample_every = int(_UTIL_SAMPLE_INTERVAL * 1e9)
        next_sample = start + sample_every
        silent_now = 0
        i = 0
        sent = 0
        now = perf()
        while now < end and not errors:
            if now >= next_sample:
                # per-node utilisation, sampled: the mean over the run shows the spread
                self.util_sum += np.array(held, dtype=np.float64) / max_conc_arr
                self.util_samples += 1
                next_sample += sample_every
            # Catch up to the schedule: the GIL may have kept us waiting.
            owed = int((now - start) / ns_per_hb) - sent
            if owed <= 0:
                time.sleep(min(0.005, max(ns_per_hb - (now - start - sent * ns_per_hb), 0) / 1e9 + 0.0005))
                now = perf()
                continue
            for _ in range(min(owed, 1000)):
                sent += 1
                # a silent node is skipped, the next one takes its turn, so the rate holds
                for _skip in range(n):
                    i = i + 1 if i + 1 < n else 0
                    if not silent_until[i]:
                        break
                    if now >= silent_until[i]:
                        silent_until[i] = 0
                        silent_now -= 1
                        break
                else:
                    break  # the whole fleet is silent
                r = rnd()
                if r < self.p_silence and silent_now < self.max_silent:
                    silent_until[i] = now + self.silence_lo_ns + int(rnd() * self.silence_span_ns)
                    silent_now += 1
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
            now = perf()


# ---------------------------------------------------------------- the run
def _utilisation(fleet: list[SimNode], hb: _HeartbeatWorker) -> dict[str, float]:
    """Spread of per-node mean held/max_concurrency over the nodes that can
    take the sessions' jobs (GPU, public, tts): the others get none by
    design and would only blur how evenly dispatch spreads load."""
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


def run_simulation(config: SimulationConfig | None = None,
                   progress: Callable[[Progress], None] | None = None) -> SimulationReport:
    """Run the simulation described by ``config`` and return its report.

    ``progress``, if given, is called from the calling thread about once per
    ``config.progress_interval`` with a :class:`Progress`. The run takes
    about ``config.duration`` seconds of wall time, setup included.
    """
    config = config or SimulationConfig()
    wall_start = time.perf_counter_ns()
    deadline = wall_start + int(config.duration * 1e9)
    rng = random.Random(config.seed)

    sched = Scheduler(heartbeat_timeout=config.heartbeat_timeout, seed=config.seed, kernel=config.kernel)
    try:
        fleet = build_fleet(config.nodes, rng)
        for node in fleet:
            sched.register_node(node.node_id, node.languages, node.services, node.max_concurrency,
                                node.has_gpu, node.accept_public_jobs)
        shared = _Shared(sched, fleet)
        picker = _PairPicker(fleet)
        workers = [
            _SessionWorker(shared, list(range(t, config.sessions, config.threads)), picker, config,
                           rng.getrandbits(64))
            for t in range(min(config.threads, config.sessions))
        ]
        hb = _HeartbeatWorker(shared, config, rng.getrandbits(64))
        threads = [threading.Thread(target=w.run, name=f"pysched-sim-sessions-{k}", daemon=True)
                   for k, w in enumerate(workers)]
        threads.append(threading.Thread(target=hb.run, name="pysched-sim-heartbeats", daemon=True))
        for t in threads:
            t.start()

        shared.start_ns = time.perf_counter_ns()
        setup = (shared.start_ns - wall_start) / 1e9
        # keep a little of the budget for joining, draining and percentiles
        shared.end_ns = max(shared.start_ns + int(0.05e9), deadline - int(_TEARDOWN_RESERVE * 1e9))
        shared.go.set()

        step = int(config.progress_interval * 1e9)
        next_tick = shared.start_ns + step
        last_ns, last_count = shared.start_ns, 0
        while True:
            now = time.perf_counter_ns()
            if now >= shared.end_ns or shared.errors:
                break
            time.sleep(max(0, min(next_tick, shared.end_ns) - now) / 1e9)
            now = time.perf_counter_ns()
            if now >= next_tick:
                next_tick += step
                count = sum(w.dispatches for w in workers)
                if progress is not None:
                    progress(Progress(
                        elapsed=(now - shared.start_ns) / 1e9,
                        dispatches=count,
                        rate=(count - last_count) * 1e9 / max(1, now - last_ns),
                        failures=sum(w.failed for w in workers),
                        heartbeats=hb.applied,
                        in_flight=sum(shared.held),
                    ))
                last_ns, last_count = now, count
        for t in threads:
            t.join()
        if shared.errors:
            raise shared.errors[0]
        elapsed = (shared.end_ns - shared.start_ns) / 1e9

        latencies = np.concatenate([w.latency for w in workers]) if workers else np.empty(0, np.int64)
        if len(latencies):
            p50, p99, p999 = np.percentile(latencies, [50.0, 99.0, 99.9]) / 1000.0
            latency_us = {"p50": float(p50), "p99": float(p99), "p99.9": float(p999),
                          "mean": float(latencies.mean() / 1000.0), "max": float(latencies.max() / 1000.0)}
        else:
            latency_us = {"p50": 0.0, "p99": 0.0, "p99.9": 0.0, "mean": 0.0, "max": 0.0}

        failures: dict[str, int] = {}
        for w in workers:
            for reason, count in w.failures.items():
                failures[reason] = failures.get(reason, 0) + count

        utilisation = _utilisation(fleet, hb)

        max_held = {node.node_id: (shared.peak[i], node.max_concurrency) for i, node in enumerate(fleet)}
        overcommits = [(nid, p, m) for nid, (p, m) in max_held.items() if p > m]
        stats = sched.stats()
        return SimulationReport(
            config=config,
            elapsed=elapsed,
            wall=(time.perf_counter_ns() - wall_start) / 1e9,
            setup=setup,
            dispatches=int(len(latencies)),
            failures=failures,
            latency_us=latency_us,
            heartbeats=hb.applied,
            utilisation=utilisation,
            max_held=max_held,
            overcommits=overcommits,
            silences=hb.silences,
            unhealthy_streaks=hb.unhealthy_streaks,
            stats=stats,
        )
    finally:
        sched.close()

