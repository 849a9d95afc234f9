"""Pure-Python model of the reference scheduler's "before" design (G0).

This is the baseline for the side-by-side benchmark. It models **G0**, the
node registry of the reference scheduler (the public repository
``TinoTau/lingua_1``, directory ``central_server/scheduler/``, in Rust) at
commit ``da5aaa0``, plus the automatic language-set pools and the O(pools)
superset pool match that commit ``ad7085e`` ("before refactoring") added.
Names below that are not this module's are the reference's (``NodeRegistry``
and its locks, ``JobDispatcher``, ``reserve_job_slot``,
``reserved_counts_snapshot``, ``best_reason_label``,
``NoAvailableNodeBreakdown``, ``try_create_pool_for_node``,
``phase3_upsert_node_to_pool_index_with_runtime``, ``NodeHealthConfig``),
and file paths are relative to that directory. No reference code is
reproduced. The model keeps the original's algorithm and lock structure,
written as ordinary Python with ``threading`` primitives. It is not a
deliberately slowed-down strawman.

Locks (``NodeRegistry``)
    There is one readers-writer lock per structure, as in G0's
    ``NodeRegistry``. ``nodes`` guards the node map. ``reserved_jobs`` guards
    local reservations. ``phase3`` guards the pool config. ``pool_index``
    guards pool -> members, ``node_pool`` guards node -> pools, and
    ``core_cache`` guards the per-pool core cache. ``core_services`` guards
    the core-service config, and ``exclude_stats`` guards the exclusion
    statistics. Outside the registry there are the ``JobDispatcher``'s
    ``jobs`` table, which doubles as the request binding, and the global
    ``sessions`` map. The ``sessions`` map is one RwLock'd
    dict with no per-session lock, and each dispatch write-locks it to
    create or update its session's entry.

    :class:`RWLock` is write-preferring, like ``tokio::sync::RwLock``, which
    is fair: once a writer is queued, **new readers wait behind it**. When a
    writer releases the lock, every reader queued at that moment is admitted
    before the next writer (phase-fair). So neither side starves.

Dispatch hot path (two-level selection)
    1. ``sessions.write``: create or update the session entry.
    2. ``phase3.read``: take the pool list. Eligible pools are then found by
       scanning **every** pool, O(pools). A pool qualifies by superset match,
       meaning its language set contains both src and tgt.
       ``src == "auto"`` selects the pools that contain tgt.
    3. ``reserved_jobs.write``: prune expired reservations and count the live
       ones per node (``reserved_counts_snapshot``).
    4. ``pool_index.read``: prefetch the members of each eligible pool.
    5. ``core_cache.read``: copy the per-pool core counters.
    6. ``nodes.read`` is held for the **whole multi-pool candidate scan**.
       Every excluded node takes ``exclude_stats.write``, which bumps a
       per-reason counter and keeps up to 5 distinct example node ids
       (``exclude_reason_stats``).
    7. ``reserve_job_slot``: ``nodes.read``, then release, then
       ``reserved_jobs.write``. Only the single chosen node is reserved. If
       that fails the dispatch fails, with no fallback to another candidate,
       as in the reference.
    8. ``jobs.write``: record the job.

Per-pool selection (G0's rules)
    Pools are visited in configuration order. The pool-level quick skip uses
    the core cache. The per-node filters run in this order:

    * ``status != ready``: ``status_not_ready``. Only ``ready`` passes, so
      ``degraded`` is excluded.
    * ``not online``: ``offline``. This is counted but not recorded in the
      stats.
    * the public rule: ``not_in_public_pool``.
    * no GPU: ``gpu_unavailable``.
    * installed services not a superset of the required ones:
      ``model_not_available``.
    * ``max(current_jobs, local reserved) >= max``: ``capacity_exceeded``.
    * ``cpu > thr or gpu > thr or mem > thr``: ``resource_threshold_exceeded``.
      The comparison is strict ``>``, as in G0.

    The survivor with the strictly lowest effective job count wins, and the
    scan of a pool stops early at 0. The first pool that yields a node wins.
    There is no language filter inside a pool.

Heartbeat
    1. ``nodes.write``: update the node in place and apply the health
       transition (registering -> ready, ready -> degraded after 3 failures,
       degraded -> ready).
    2. Pool reassignment: ``phase3.read``, then ``node_pool.write``, then
       ``pool_index.write``. The node joins the one pool whose language set
       equals its own (``phase3_upsert_node_to_pool_index_with_runtime``).
       If no pool has that set, a pool is created
       under ``phase3.write`` with id max + 1, capped at ``max_pools``
       (``try_create_pool_for_node``).
    3. Core cache: ``phase3.read``, then ``core_services.read``, then
       ``node_pool.read``, then ``core_cache.write``.

Node status (``managers/node_status_manager.rs``)
    ``register_node`` puts a node in ``registering``. Its first healthy
    heartbeat makes it ``ready``, because ``health_check_count`` is 1. A real
    node sends that heartbeat within 15 s; a harness must send it too, or
    pass ``ready_on_register=True``. The 30 s periodic status scan (stale
    heartbeat -> ``offline``, warm-up timeout -> ``degraded``) has no thread
    of its own. It runs inside the first dispatch that finds it due, under
    ``nodes.write``, just as the real background task would. As in the
    reference, a heartbeat does not revive an ``offline`` status; the node
    has to re-register.

Known simplifications, each documented where it occurs
    * Capacity comes from ``max_concurrency``. The reference hard-codes 4.
    * Installed services count as running and capability-ready.
    * There is no Redis, no hash-bucket or manual-capability pool mode, and
      no session "spread" rule, which is disabled by default in G0.
    * There is no second selection attempt. The reference's retry
      differs from the first attempt only by dropping the spread exclusion.
      With spread off, it would repeat an identical scan.
    * A pool skipped by the quick skip adds its member count to
      ``total_nodes``, so its breakdown never reads ``no_nodes``.
    * ``commit`` only marks the job accepted. G0 has no commit step: the
      reservation keeps its TTL, and the node's reported ``running_jobs``
      takes over through ``max(current_jobs, reserved)``.

Standard library only.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "RWLock",
    "LegacyScheduler",
    "LegacyAssignment",
    "LegacyNoNodeAvailable",
    "LegacyNoPool",
    "BREAKDOWN_KEYS",
]

# --------------------------------------------------------------------------
# Readers-writer lock
# --------------------------------------------------------------------------


class _ReadGuard:
    """``with lock.read():``. The uncontended path is inlined to save a call."""

    __slots__ = ("_lock",)

    def __init__(self, lock: RWLock) -> None:
        self._lock = lock

    def __enter__(self) -> RWLock:
        lock = self._lock
        with lock._mutex:
            if not lock._writer and not lock._writers_waiting:
                lock._readers += 1
                return lock
        lock.acquire_read()  # contended: queue (re-checks under the mutex)
        return lock

    def __exit__(self, *exc: object) -> None:
        self._lock.release_read()


class _WriteGuard:
    """``with lock.write():``. The uncontended path is inlined to save a call."""

    __slots__ = ("_lock",)

    def __init__(self, lock: RWLock) -> None:
        self._lock = lock

    def __enter__(self) -> RWLock:
        lock = self._lock
        with lock._mutex:
            if not lock._writer and not lock._readers and not lock._writers_waiting:
                lock._writer = True
                return lock
        lock.acquire_write()
        return lock

    def __exit__(self, *exc: object) -> None:
        self._lock.release_write()


class RWLock:
    """A fair (write-preferring, phase-fair) readers-writer lock.

    It behaves like ``tokio::sync::RwLock``, the lock G0 used for all of its
    locks:

    * any number of readers, or exactly one writer;
    * while a writer holds **or waits for** the lock, a newly arriving reader
      queues behind it;
    * when a writer releases, all readers queued at that moment are admitted
      together (counted as holders immediately, so the next writer cannot
      overtake them); the next writer runs after they leave.

    It is not reentrant. Use it as ``with lock.read(): ...`` or
    ``with lock.write(): ...``.
    """

    __slots__ = (
        "_mutex",
        "_rcond",
        "_wcond",
        "_readers",
        "_writer",
        "_writers_waiting",
        "_readers_waiting",
        "_read_gen",
        "_rguard",
        "_wguard",
    )

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._rcond = threading.Condition(self._mutex)
        self._wcond = threading.Condition(self._mutex)
        self._readers = 0  # active readers (including granted-but-not-yet-running)
        self._writer = False
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._read_gen = 0  # bumped each time queued readers are admitted
        self._rguard = _ReadGuard(self)
        self._wguard = _WriteGuard(self)

    # -- context managers ---------------------------------------------------
    def read(self) -> _ReadGuard:
        """Context manager holding the lock shared."""
        return self._rguard

    def write(self) -> _WriteGuard:
        """Context manager holding the lock exclusively."""
        return self._wguard

    # -- primitives -----------------------------------------------------------
    def acquire_read(self) -> None:
        """Hold the lock shared; wait behind a writer holding or waiting for it."""
        with self._mutex:
            if not self._writer and not self._writers_waiting:
                self._readers += 1
                return
            # Queue behind the holding or waiting writer; the writer's release
            # admits us (increments _readers on our behalf) and bumps _read_gen.
            self._readers_waiting += 1
            gen = self._read_gen
            while self._read_gen == gen:
                self._rcond.wait()

    def release_read(self) -> None:
        """Let go of a shared hold; the last reader out wakes a waiting writer."""
        with self._mutex:
            if self._readers <= 0:
                raise RuntimeError("release_read() without a matching acquire_read()")
            self._readers -= 1
            if self._readers == 0 and self._writers_waiting:
                self._wcond.notify()

    def acquire_write(self) -> None:
        """Hold the lock exclusively; new readers queue behind this writer meanwhile."""
        with self._mutex:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._wcond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        """Let go of the exclusive hold, admitting every queued reader at once, else the next writer."""
        with self._mutex:
            if not self._writer:
                raise RuntimeError("release_write() without a matching acquire_write()")
            self._writer = False
            if self._readers_waiting:
                # Hand the lock to every reader queued behind this writer.
                self._readers += self._readers_waiting
                self._readers_waiting = 0
                self._read_gen += 1
                self._rcond.notify_all()
            elif self._writers_waiting:
                self._wcond.notify()

    # -- introspection (tests, diagnostics) ---------------------------------
    @property
    def readers(self) -> int:
        """Readers currently holding the lock."""
        return self._readers

    @property
    def writer_active(self) -> bool:
        """A writer holds the lock."""
        return self._writer

    @property
    def writers_waiting(self) -> int:
        """Writers queued for the lock."""
        return self._writers_waiting

    @property
    def readers_waiting(self) -> int:
        """Readers queued behind a writer."""
        return self._readers_waiting


# --------------------------------------------------------------------------
# Results and errors
# --------------------------------------------------------------------------

#: Breakdown counters kept by G0 selection (``NoAvailableNodeBreakdown``, minus the language counters
#: that only single-level G1 selection fills).
BREAKDOWN_KEYS = (
    "total_nodes",
    "offline",
    "status_not_ready",
    "not_in_public_pool",
    "gpu_unavailable",
    "model_not_available",
    "capacity_exceeded",
    "resource_threshold_exceeded",
)
_TOTAL, _OFFLINE, _STATUS, _PUBLIC, _GPU, _MODEL, _CAPACITY, _RESOURCE = range(8)
_N_COUNTERS = len(BREAKDOWN_KEYS)
# Order used by best_reason_label: every counter but total_nodes.
_LABEL_ORDER = tuple(range(_OFFLINE, _N_COUNTERS))


def _best_reason(counts: list[int]) -> str:
    """``best_reason_label``: the largest counter; earliest wins ties."""
    if counts[_TOTAL] == 0:
        return "no_nodes"
    best, best_n = "unknown", 0
    for i in _LABEL_ORDER:
        if counts[i] > best_n:
            best, best_n = BREAKDOWN_KEYS[i], counts[i]
    return best


def _as_dict(counts: list[int]) -> dict[str, int]:
    return dict(zip(BREAKDOWN_KEYS, counts, strict=True))


class LegacyAssignment:
    """Result of a successful :meth:`LegacyScheduler.dispatch`."""

    __slots__ = ("node_id", "pool_id", "job_id", "session_id", "preferred_pool", "expires_at")

    def __init__(
        self,
        node_id: str,
        pool_id: int,
        job_id: str,
        session_id: str,
        preferred_pool: int,
        expires_at: float,
    ) -> None:
        self.node_id = node_id
        self.pool_id = pool_id
        self.job_id = job_id
        self.session_id = session_id
        self.preferred_pool = preferred_pool
        self.expires_at = expires_at

    @property
    def fallback_used(self) -> bool:
        """The job went to another pool than the first eligible one."""
        return self.pool_id != self.preferred_pool

    def __repr__(self) -> str:
        return f"LegacyAssignment(job={self.job_id!r}, node={self.node_id!r}, pool={self.pool_id})"


class LegacyNoPool(LookupError):
    """No configured pool's language set contains the requested pair."""

    def __init__(self, src: str, tgt: str) -> None:
        super().__init__(f"no pool serves the language pair {src!r} -> {tgt!r}")
        self.src = src
        self.tgt = tgt


class LegacyNoNodeAvailable(LookupError):
    """Eligible pools exist, but no node could be selected or reserved.

    ``breakdown`` sums the counters of every pool scanned. ``preferred_breakdown``
    holds the first pool's counters, which is what the reference reports.
    ``best_reason`` is ``best_reason_label`` of ``breakdown``, or
    ``"reserve_denied"`` when a node was chosen but its reservation failed.
    ``attempts`` lists ``(pool_id, label, candidates)`` per pool.
    """

    def __init__(
        self,
        src: str,
        tgt: str,
        breakdown: dict[str, int],
        best_reason: str,
        preferred_breakdown: dict[str, int] | None = None,
        attempts: list[tuple[int, str, int]] | None = None,
    ) -> None:
        parts = ", ".join(f"{k}={v}" for k, v in breakdown.items() if v) or "no candidate nodes"
        super().__init__(f"no node available for {src!r} -> {tgt!r} ({best_reason}: {parts})")
        self.src = src
        self.tgt = tgt
        self.breakdown = breakdown
        self.best_reason = best_reason
        self.preferred_breakdown = preferred_breakdown if preferred_breakdown is not None else dict(breakdown)
        self.attempts = attempts or []


# --------------------------------------------------------------------------
# Registry records
# --------------------------------------------------------------------------

REGISTERING = "registering"
READY = "ready"
DEGRADED = "degraded"
DRAINING = "draining"
OFFLINE = "offline"

_CORE_TYPES = ("asr", "nmt", "tts")
_CORE_SET = frozenset(_CORE_TYPES)

# Health constants (``NodeHealthConfig`` defaults).
_HEALTH_CHECK_COUNT = 1
_FAILURE_WINDOW = 5
_FAILURE_COUNT = 3
_CONSECUTIVE_FAILURES = 3
_WARMUP_TIMEOUT = 60.0
_STATUS_SCAN_INTERVAL = 30.0
_EXAMPLES_PER_REASON = 5


#: What the pool and core-cache updates read of a node: (online, status, services, languages).
_View = tuple[bool, str, frozenset[str], frozenset[str]]


class _Node:
    """The scheduler's record of one node (``node_registry/types.rs``); mutated in place under nodes.write."""

    __slots__ = (
        "node_id",
        "languages",
        "services",
        "max_concurrency",
        "has_gpu",
        "accept_public_jobs",
        "status",
        "online",
        "current_jobs",
        "cpu",
        "gpu",
        "mem",
        "last_heartbeat",
        "registered_at",
        "health_ok",
        "fail_window",
        "consecutive_failures",
    )

    def __init__(
        self,
        node_id: str,
        languages: frozenset[str],
        services: frozenset[str],
        max_concurrency: int,
        *,
        has_gpu: bool,
        accept_public_jobs: bool,
        now: float,
        status: str,
    ) -> None:
        self.node_id = node_id
        self.languages = languages
        self.services = services
        self.max_concurrency = max_concurrency
        self.has_gpu = has_gpu
        self.accept_public_jobs = accept_public_jobs
        self.status = status
        self.online = True
        self.current_jobs = 0
        self.cpu = 0.0
        self.gpu = 0.0  # Some(0.0) initially; a None report is stored as 0.0
        self.mem = 0.0
        self.last_heartbeat = now
        self.registered_at = now
        self.health_ok = 0
        self.fail_window: list[float] = []
        self.consecutive_failures = 0


class _Pool:
    """One auto-generated language-set pool (``try_create_pool_for_node``); immutable."""

    __slots__ = ("pool_id", "name", "languages", "required_services")

    def __init__(self, pool_id: int, languages: frozenset[str]) -> None:
        self.pool_id = pool_id
        self.languages = languages
        self.name = "-".join(sorted(languages))
        self.required_services = ("asr", "nmt", "tts", "semantic")


class _Session:
    __slots__ = ("session_id", "src", "tgt", "requests", "last_seen")

    def __init__(self, session_id: str, src: str, tgt: str, now: float) -> None:
        self.session_id = session_id
        self.src = src
        self.tgt = tgt
        self.requests = 0
        self.last_seen = now


class _Job:
    __slots__ = ("assignment", "accepted")

    def __init__(self, assignment: LegacyAssignment) -> None:
        self.assignment = assignment
        self.accepted = False


def _norm_langs(languages: Iterable[str] | str) -> frozenset[str]:
    if isinstance(languages, str):
        languages = (languages,)
    return frozenset(str(lang).lower() for lang in languages if str(lang))


def _norm_services(services: Iterable[str] | str) -> frozenset[str]:
    if isinstance(services, str):
        services = (services,)
    return frozenset(str(s).lower() for s in services)


# --------------------------------------------------------------------------
# The scheduler
# --------------------------------------------------------------------------


class LegacyScheduler:
    """G0 ``NodeRegistry`` + ``JobDispatcher`` + ``SessionManager``, in-process.

    Thread-safe. It has the same call shape as pysched's scheduler, so one
    benchmark harness can drive both.
    """

    def __init__(
        self,
        heartbeat_timeout: float = 45.0,
        reservation_ttl: float = 90.0,
        resource_threshold: float = 85.0,
        max_pools: int = 50,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        ready_on_register: bool = False,
        status_scan_interval: float = _STATUS_SCAN_INTERVAL,
    ) -> None:
        if heartbeat_timeout <= 0 or reservation_ttl <= 0 or status_scan_interval <= 0:
            raise ValueError("heartbeat_timeout, reservation_ttl and status_scan_interval must be > 0")
        if max_pools < 1:
            raise ValueError(f"max_pools must be >= 1, got {max_pools!r}")
        self._hb_timeout = float(heartbeat_timeout)
        self._ttl = float(reservation_ttl)
        self._thr = float(resource_threshold)
        self._max_pools = int(max_pools)
        self._clock = clock
        self._ready_on_register = bool(ready_on_register)
        self._scan_interval = float(status_scan_interval)
        # G0 language-set selection has no randomness: candidates come out in
        # set order. The seed only namespaces generated job ids.
        self._rng = random.Random(seed)
        self._job_prefix = f"{self._rng.getrandbits(32):08x}"
        self._job_seq = itertools.count(1)

        # --- NodeRegistry: one RwLock per structure ------------------------
        self._nodes_lock = RWLock()
        self._nodes: dict[str, _Node] = {}
        self._reserved_lock = RWLock()
        self._reserved: dict[str, dict[str, float]] = {}  # node -> {job: expire_at}
        self._reserved_job_node: dict[str, str] = {}  # job -> node (for release by job id)
        self._phase3_lock = RWLock()
        self._pools: list[_Pool] = []  # replaced, never mutated in place
        self._pool_index_lock = RWLock()
        self._pool_index: dict[int, set[str]] = {}
        self._node_pool_lock = RWLock()
        self._node_pool: dict[str, frozenset[int]] = {}
        self._core_cache_lock = RWLock()
        # pool -> (online_nodes, ready_nodes, asr_ready, nmt_ready, tts_ready)
        self._core_cache: dict[int, tuple[int, ...]] = {}
        self._core_contrib: dict[str, tuple[frozenset[int], tuple[int, ...]]] = {}
        self._core_services_lock = RWLock()
        self._core_services = {"asr": "node-inference", "nmt": "nmt-m2m100", "tts": "piper-tts"}
        self._exclude_stats_lock = RWLock()
        # reason -> [count, [example ids]] (a list, updated in place: its items are Any)
        self._exclude_stats: dict[str, list[Any]] = {}

        # --- JobDispatcher / SessionManager --------------------------------
        self._jobs_lock = RWLock()
        self._jobs: dict[str, _Job] = {}
        self._sessions_lock = RWLock()
        self._sessions: dict[str, _Session] = {}

        # Periodic status scan, run lazily from dispatch.
        self._scan_guard = threading.Lock()
        self._next_scan = clock() + self._scan_interval

        # Prometheus-style counters.
        self._metrics_lock = threading.Lock()
        self._dispatched = 0
        self._no_pool = 0
        self._no_node = 0
        self._reserve_denied = 0

    # ------------------------------------------------------------------ nodes
    def register_node(
        self,
        node_id: str,
        languages: Iterable[str],
        services: Iterable[str] = ("asr", "nmt", "tts", "semantic"),
        max_concurrency: int = 4,
        has_gpu: bool = True,
        accept_public_jobs: bool = True,
    ) -> None:
        """Register or re-register a node and put it in its language-set pool."""
        if not isinstance(node_id, str) or not node_id:
            raise ValueError(f"node_id must be a non-empty str, got {node_id!r}")
        if int(max_concurrency) < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency!r}")
        now = self._clock()
        node = _Node(
            node_id,
            _norm_langs(languages),
            _norm_services(services),
            int(max_concurrency),
            has_gpu=bool(has_gpu),
            accept_public_jobs=bool(accept_public_jobs),
            now=now,
            status=READY if self._ready_on_register else REGISTERING,
        )
        with self._nodes_lock.write():
            self._nodes[node_id] = node
            view = (node.online, node.status, node.services, node.languages)
        self._assign_node_to_pool(node_id, view)
        self._update_core_cache(node_id, view)

    def heartbeat(
        self,
        node_id: str,
        *,
        running: int | None = None,
        cpu: float | None = None,
        gpu: float | None = None,
        mem: float | None = None,
        healthy: bool | None = None,
        services: Iterable[str] | None = None,
        languages: Iterable[str] | None = None,
    ) -> None:
        """Apply a node heartbeat. A ``None`` argument leaves that field unchanged.

        ``healthy`` overrides the reference's health check; if it is ``None`` the check
        is computed from the node's GPU, GPU usage and services.
        """
        now = self._clock()
        new_services = _norm_services(services) if services is not None else None
        new_langs = _norm_langs(languages) if languages is not None else None
        # Step 1: nodes.write, in-place update and status transition.
        with self._nodes_lock.write():
            node = self._nodes.get(node_id)
            if node is None:
                raise KeyError(node_id)
            if running is not None:
                node.current_jobs = int(running)
            if cpu is not None:
                node.cpu = float(cpu)
            if gpu is not None:
                node.gpu = float(gpu)
            if mem is not None:
                node.mem = float(mem)
            if new_services is not None:
                node.services = new_services
            if new_langs is not None:
                node.languages = new_langs
            node.online = True
            node.last_heartbeat = now
            self._on_heartbeat_health(node, self._health_check(node) if healthy is None else bool(healthy), now)
            view = (node.online, node.status, node.services, node.languages)
        # Step 2: pool reassignment. Step 3: core cache.
        self._assign_node_to_pool(node_id, view)
        self._update_core_cache(node_id, view)

    def mark_offline(self, node_id: str) -> bool:
        """Connection closed (``mark_node_offline``): ``online = False``, refresh the core cache."""
        with self._nodes_lock.write():
            node = self._nodes.get(node_id)
            if node is None:
                return False
            node.online = False
            view = (node.online, node.status, node.services, node.languages)
        self._update_core_cache(node_id, view)
        return True

    def scan_node_status(self, now: float | None = None) -> int:
        """Run the periodic status scan now; return how many nodes changed."""
        if now is None:
            now = self._clock()
        changed = 0
        with self._nodes_lock.write():
            for node in self._nodes.values():
                if node.status != OFFLINE and now - node.last_heartbeat > self._hb_timeout:
                    node.status = OFFLINE
                    changed += 1
                elif node.status == REGISTERING and now - node.registered_at > _WARMUP_TIMEOUT:
                    node.status = DEGRADED
                    changed += 1
        self._next_scan = now + self._scan_interval
        return changed

    # -- helpers run under nodes.write --------------------------------------
    @staticmethod
    def _health_check(node: _Node) -> bool:
        if not node.has_gpu or not 0.0 <= node.gpu <= 100.0:  # noqa: PLR2004  (a percentage)
            return False
        if node.status == REGISTERING:
            return not _CORE_SET.isdisjoint(node.services)
        return bool(node.services)

    @staticmethod
    def _on_heartbeat_health(node: _Node, ok: bool, now: float) -> None:
        status = node.status
        if status == REGISTERING:
            if ok:
                node.health_ok += 1
                if node.health_ok >= _HEALTH_CHECK_COUNT:
                    node.status = READY
                    node.health_ok = 0
            else:
                node.health_ok = 0
        elif status == READY:
            if ok:
                node.fail_window.clear()
                node.consecutive_failures = 0
            else:
                node.fail_window.append(now)
                if len(node.fail_window) > _FAILURE_WINDOW:
                    del node.fail_window[0]
                node.consecutive_failures += 1
                if (
                    node.consecutive_failures >= _CONSECUTIVE_FAILURES
                    or len(node.fail_window) >= _FAILURE_COUNT
                ):
                    node.status = DEGRADED
        elif status == DEGRADED and ok:
            node.status = READY
            node.fail_window.clear()
            node.consecutive_failures = 0
        # draining / offline: ignored

    # -- pools ----------------------------------------------------------------
    def _assign_node_to_pool(self, node_id: str, view: _View) -> None:
        """Auto mode (``phase3_upsert_node_to_pool_index_with_runtime``), with the locks of the heartbeat's step 2."""
        online, _status, services, langs = view
        with self._phase3_lock.read():
            pools = self._pools
        desired: frozenset[int] = frozenset()
        if online and services >= _CORE_SET and langs:
            pid = None
            for pool in pools:  # the first pool whose set (name) equals the node's
                if pool.languages == langs:
                    pid = pool.pool_id
                    break
            if pid is None:
                pid = self._try_create_pool(langs)
            if pid is not None:
                desired = frozenset((pid,))
        with self._node_pool_lock.write():
            old = self._node_pool.get(node_id, frozenset())
            if old == desired:
                return
            if desired:
                self._node_pool[node_id] = desired
            else:
                self._node_pool.pop(node_id, None)
        with self._pool_index_lock.write():
            for pid in old - desired:
                members = self._pool_index.get(pid)
                if members is not None:
                    members.discard(node_id)
                    if not members:
                        del self._pool_index[pid]
            for pid in desired - old:
                self._pool_index.setdefault(pid, set()).add(node_id)

    def _try_create_pool(self, langs: frozenset[str]) -> int | None:
        """``try_create_pool_for_node`` without Redis: append a pool with id max+1 unless capped."""
        with self._phase3_lock.write():
            for pool in self._pools:
                if pool.languages == langs:
                    return pool.pool_id
            if len(self._pools) >= self._max_pools:
                return None
            new_id = min(max((p.pool_id for p in self._pools), default=0) + 1, 65535)
            self._pools = [*self._pools, _Pool(new_id, langs)]
            return new_id

    def _update_core_cache(self, node_id: str, view: _View) -> None:
        """Incremental core-cache update, with the locks of the heartbeat's step 3."""
        online, status, services, _langs = view
        with self._phase3_lock.read():
            _ = self._pools  # the reference re-reads the config here
        with self._core_services_lock.read():
            core = self._core_services
        with self._node_pool_lock.read():
            pids = self._node_pool.get(node_id, frozenset())
        ready = online and status == READY
        flags = (
            1 if online else 0,
            1 if ready else 0,
            1 if ready and "asr" in core and "asr" in services else 0,
            1 if ready and "nmt" in core and "nmt" in services else 0,
            1 if ready and "tts" in core and "tts" in services else 0,
        )
        with self._core_cache_lock.write():
            cache = self._core_cache
            old = self._core_contrib.get(node_id)
            if old is not None:
                old_pids, old_flags = old
                for pid in old_pids:
                    cur = cache.get(pid)
                    if cur is not None:
                        cache[pid] = tuple(max(0, c - f) for c, f in zip(cur, old_flags, strict=True))
            for pid in pids:
                cur = cache.get(pid, (0, 0, 0, 0, 0))
                cache[pid] = tuple(c + f for c, f in zip(cur, flags, strict=True))
            if pids:
                self._core_contrib[node_id] = (pids, flags)
            else:
                self._core_contrib.pop(node_id, None)

    # ---------------------------------------------------------------- dispatch
    def dispatch(
        self,
        session_id: str,
        src: str,
        tgt: str,
        job_id: str | None = None,
        services: Iterable[str] = ("asr", "nmt", "tts"),
        accept_public: bool = True,
    ) -> LegacyAssignment:
        """Select and reserve one node for a job (the hot path of the module docstring).

        ``accept_public`` follows the reference's public rule. A public job (the default, and what
        every reference caller passes) may use any node. A private job may
        use only nodes with ``accept_public_jobs=False``.

        Raises :class:`LegacyNoPool` if no pool's language set contains the
        pair, and :class:`LegacyNoNodeAvailable` if the scan finds no node or
        the chosen node's reservation is refused.
        """
        now = self._clock()
        if now >= self._next_scan and self._scan_guard.acquire(blocking=False):
            try:
                if now >= self._next_scan:
                    self.scan_node_status(now)
            finally:
                self._scan_guard.release()
        src = str(src).lower()
        tgt = str(tgt).lower()
        required = _norm_services(services)
        if job_id is None:
            job_id = f"{session_id}:{self._job_prefix}:{next(self._job_seq)}"
        else:
            # Request binding: a retried job id gets its live assignment back.
            with self._jobs_lock.read():
                job = self._jobs.get(job_id)
            if job is not None and job.assignment.expires_at > now:
                return job.assignment

        # Session entry: global sessions map, write-locked per dispatch.
        with self._sessions_lock.write():
            sess = self._sessions.get(session_id)
            if sess is None:
                sess = self._sessions[session_id] = _Session(session_id, src, tgt, now)
            sess.src, sess.tgt = src, tgt
            sess.requests += 1
            sess.last_seen = now

        # Level 1: O(pools) superset scan of the pool config.
        with self._phase3_lock.read():
            pools = self._pools
        if src == "auto":
            eligible = [p.pool_id for p in pools if tgt in p.languages]
        else:
            eligible = [p.pool_id for p in pools if tgt in p.languages and src in p.languages]
        if not eligible:
            with self._metrics_lock:
                self._no_pool += 1
            raise LegacyNoPool(src, tgt)

        chosen, counts, preferred_counts, attempts = self._select(eligible, required, accept_public, now)
        if chosen is None:
            with self._metrics_lock:
                self._no_node += 1
            raise LegacyNoNodeAvailable(
                src, tgt, _as_dict(counts), _best_reason(counts), _as_dict(preferred_counts), attempts
            )
        node_id, pool_id = chosen

        expires_at = self._reserve_job_slot(node_id, job_id, now)
        if expires_at is None:  # no fallback to another candidate
            with self._metrics_lock:
                self._reserve_denied += 1
            raise LegacyNoNodeAvailable(
                src, tgt, _as_dict(counts), "reserve_denied", _as_dict(preferred_counts), attempts
            )

        assignment = LegacyAssignment(node_id, pool_id, job_id, session_id, eligible[0], expires_at)
        with self._jobs_lock.write():
            self._jobs[job_id] = _Job(assignment)
            self._dispatched += 1
        return assignment

    # One function on purpose: G0's scan is one loop under nodes.read, and a
    # helper call per pool or per node would slow the model below the original.
    def _select(  # noqa: PLR0912, PLR0915
        self,
        eligible: list[int],
        required: frozenset[str],
        accept_public: bool,
        now: float,
    ) -> tuple[tuple[str, int] | None, list[int], list[int], list[tuple[int, str, int]]]:
        """Level 2 over the eligible pools, in order (G0's rules)."""
        # reserved_counts_snapshot (write lock: prunes expired entries).
        with self._reserved_lock.write():
            reserved_counts = self._reserved_counts_locked(now)
        # Prefetch pool members.
        with self._pool_index_lock.read():
            index = self._pool_index
            members = [tuple(index.get(pid, ())) for pid in eligible]
        # Snapshot the core cache.
        with self._core_cache_lock.read():
            cache = self._core_cache
            core = [cache.get(pid) for pid in eligible]

        need_asr = "asr" in required
        need_nmt = "nmt" in required
        need_tts = "tts" in required
        thr = self._thr
        record = self._record_exclusion
        total_counts = [0] * _N_COUNTERS
        preferred_counts: list[int] | None = None
        attempts: list[tuple[int, str, int]] = []
        chosen: tuple[str, int] | None = None

        # nodes.read held for the whole multi-pool scan.
        with self._nodes_lock.read():
            nodes = self._nodes
            for pid, cands, entry in zip(eligible, members, core, strict=True):
                bd = [0] * _N_COUNTERS
                n_cands = len(cands)
                skip = None
                if n_cands and entry is not None:  # pool-level quick skip
                    if entry[0] == 0:
                        skip, slot = "offline", _OFFLINE
                    elif entry[1] == 0:
                        skip, slot = "status_not_ready", _STATUS
                    elif need_asr and entry[2] == 0:
                        skip, slot = "missing_core_asr_not_ready", _MODEL
                    elif need_nmt and entry[3] == 0:
                        skip, slot = "missing_core_nmt_not_ready", _MODEL
                    elif need_tts and entry[4] == 0:
                        skip, slot = "missing_core_tts_not_ready", _MODEL
                if skip is not None:
                    bd[_TOTAL] = n_cands
                    bd[slot] = n_cands
                    label = skip
                else:
                    best = None
                    best_eff = 1 << 62
                    for nid in cands:
                        node = nodes.get(nid)
                        if node is None:
                            continue  # missing from the map: skipped silently
                        bd[_TOTAL] += 1
                        if node.status != READY:
                            reason = _STATUS
                        elif not node.online:
                            bd[_OFFLINE] += 1  # counted, not recorded as a reason
                            continue
                        elif not accept_public and node.accept_public_jobs:
                            reason = _PUBLIC
                        elif not node.has_gpu:
                            reason = _GPU
                        elif not required <= node.services:
                            reason = _MODEL
                        else:
                            cur = node.current_jobs
                            res = reserved_counts.get(nid, 0)
                            eff = cur if cur >= res else res
                            if eff >= node.max_concurrency:
                                reason = _CAPACITY
                            elif node.cpu > thr or node.gpu > thr or node.mem > thr:
                                reason = _RESOURCE
                            else:
                                if eff < best_eff:
                                    best, best_eff = nid, eff
                                    if eff == 0:
                                        break  # early stop: cannot do better
                                continue
                        bd[reason] += 1
                        record(reason, nid)
                    label = "ok" if best is not None else _best_reason(bd)
                    if best is not None:
                        chosen = (best, pid)
                attempts.append((pid, label, n_cands))
                if preferred_counts is None:
                    preferred_counts = bd
                for i in range(_N_COUNTERS):
                    total_counts[i] += bd[i]
                if chosen is not None:
                    break
        return chosen, total_counts, preferred_counts or [0] * _N_COUNTERS, attempts

    def _record_exclusion(self, reason: int, node_id: str) -> None:
        """Global exclusion stats: a write lock per excluded node."""
        key = BREAKDOWN_KEYS[reason]
        with self._exclude_stats_lock.write():
            entry = self._exclude_stats.get(key)
            if entry is None:
                entry = self._exclude_stats[key] = [0, []]
            entry[0] += 1
            examples = entry[1]
            if len(examples) < _EXAMPLES_PER_REASON and node_id not in examples:
                examples.append(node_id)

    # ------------------------------------------------------------ reservations
    def _reserved_counts_locked(self, now: float) -> dict[str, int]:
        """Prune every expired entry and count live ones (caller holds reserved.write)."""
        counts: dict[str, int] = {}
        job_node = self._reserved_job_node
        emptied = []
        for node_id, jobs in self._reserved.items():
            for j in [j for j, exp in jobs.items() if exp <= now]:
                del jobs[j]
                job_node.pop(j, None)
            if jobs:
                counts[node_id] = len(jobs)
            else:
                emptied.append(node_id)
        for node_id in emptied:
            del self._reserved[node_id]
        return counts

    def _reserve_job_slot(self, node_id: str, job_id: str, now: float) -> float | None:
        """``reserve_job_slot``, without Redis; returns the expiry time, or None if refused."""
        with self._nodes_lock.read():
            node = self._nodes.get(node_id)
            if node is None or not node.online or node.status != READY:
                return None
            max_jobs = node.max_concurrency
            current = node.current_jobs
        with self._reserved_lock.write():
            jobs = self._reserved.get(node_id)
            if jobs is None:
                jobs = self._reserved[node_id] = {}
            expired = [j for j, exp in jobs.items() if exp <= now]
            for j in expired:
                del jobs[j]
                self._reserved_job_node.pop(j, None)
            live = len(jobs)
            effective = current if current >= live else live
            if effective >= max_jobs:
                return None
            expires_at = now + self._ttl
            jobs[job_id] = expires_at
            self._reserved_job_node[job_id] = node_id
            return expires_at

    def commit(self, job_id: str) -> bool:
        """Mark a job accepted by its node. Returns False if it holds no live reservation.

        G0 has no commit step. The reservation keeps its TTL, and the node's
        reported ``running_jobs`` takes over through ``max(current, reserved)``.
        """
        now = self._clock()
        with self._reserved_lock.read():
            node_id = self._reserved_job_node.get(job_id)
            live = node_id is not None and self._reserved.get(node_id, {}).get(job_id, now) > now
        if not live:
            return False
        with self._jobs_lock.write():
            job = self._jobs.get(job_id)
            if job is not None:
                job.accepted = True
        return True

    def release(self, job_id: str) -> bool:
        """Give the job's reservation back. Idempotent: False if nothing was held."""
        now = self._clock()
        with self._reserved_lock.write():
            node_id = self._reserved_job_node.pop(job_id, None)
            released = False
            if node_id is not None:
                jobs = self._reserved.get(node_id)
                if jobs is not None:
                    exp = jobs.pop(job_id, None)
                    released = exp is not None and exp > now
                    if not jobs:
                        del self._reserved[node_id]
        with self._jobs_lock.write():
            self._jobs.pop(job_id, None)
        return released

    # ------------------------------------------------------------------- stats
    def reserved_counts(self) -> dict[str, int]:
        """Live reservations per node (``reserved_counts_snapshot``)."""
        now = self._clock()
        with self._reserved_lock.write():
            return self._reserved_counts_locked(now)

    def node_status(self, node_id: str) -> dict[str, object]:
        """A copy of one node's record (for tests and diagnostics)."""
        with self._nodes_lock.read():
            n = self._nodes.get(node_id)
            if n is None:
                raise KeyError(node_id)
            return {
                "node_id": n.node_id,
                "status": n.status,
                "online": n.online,
                "current_jobs": n.current_jobs,
                "max_concurrency": n.max_concurrency,
                "cpu": n.cpu,
                "gpu": n.gpu,
                "mem": n.mem,
                "languages": sorted(n.languages),
                "services": sorted(n.services),
            }

    def stats(self) -> dict[str, object]:
        """A point-in-time summary. Each structure is read under its own lock."""
        now = self._clock()
        with self._nodes_lock.read():
            n_nodes = len(self._nodes)
            by_status: dict[str, int] = {}
            for n in self._nodes.values():
                by_status[n.status] = by_status.get(n.status, 0) + 1
            online = sum(1 for n in self._nodes.values() if n.online)
        with self._phase3_lock.read():
            pools = self._pools
        with self._pool_index_lock.read():
            sizes = {pid: len(m) for pid, m in self._pool_index.items()}
        with self._reserved_lock.write():
            reserved = self._reserved_counts_locked(now)
        with self._exclude_stats_lock.read():
            excl = {k: {"count": v[0], "examples": list(v[1])} for k, v in self._exclude_stats.items()}
        with self._sessions_lock.read():
            n_sessions = len(self._sessions)
        with self._jobs_lock.read():
            n_jobs = len(self._jobs)
            dispatched = self._dispatched
        with self._metrics_lock:
            no_pool, no_node, denied = self._no_pool, self._no_node, self._reserve_denied
        return {
            "design": "G0 legacy (lingua_1 da5aaa0/ad7085e)",
            "nodes": n_nodes,
            "nodes_online": online,
            "nodes_by_status": by_status,
            "pools": len(pools),
            "pool_members": {p.name: sizes.get(p.pool_id, 0) for p in pools},
            "reservations": sum(reserved.values()),
            "reserved_by_node": reserved,
            "sessions": n_sessions,
            "jobs": n_jobs,
            "dispatched": dispatched,
            "no_pool": no_pool,
            "no_node_available": no_node,
            "reserve_denied": denied,
            "exclude_reasons": excl,
        }
