"""The public facade: :class:`Scheduler`.

Dispatch follows the design's ten steps and takes no management lock:

1. read the published snapshot (one attribute read);
2. take the session's own lock;
3. decide the language pair and the preferred pool;
4. release it;
5. look the pair up in the language index;
6. take the candidates from the pool members in the snapshot;
7. filter and score them in the compiled kernel;
8. reserve the best candidate;
9. if that fails, reserve the next candidate, then try the next eligible pool;
10. bind the session to the pool that served it.

Lock order, always: snapshot read -> session lock -> reservation. The
management layer (registration, heartbeats, pools) never touches sessions.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pysched._kernel import core as default_core
from pysched._kernel import resolve
from pysched._layout import NEED_GPU, NEED_PUBLIC, NEED_UNKNOWN_SERVICE, REASONS
from pysched.errors import (
    NoNodeAvailable,
    NoPoolForLanguagePair,
    ReservationBackendUnavailable,
    SchedulerError,
    UnknownJob,
    WrongNode,
)
from pysched.languages import _language_cache as _LANGUAGE_CACHE
from pysched.languages import AUTO, DEFAULT_SERVICES, normalize_language, normalize_languages, normalize_services
from pysched.management import ManagementRegistry
from pysched.pools import PoolConfig, PoolInfo
from pysched.reservations import LocalReservations, Reservation, ReservationBackend
from pysched.sessions import SessionManager, SessionState
from pysched.snapshot import RuntimeSnapshot

__all__ = ["Scheduler", "Assignment", "Explanation", "DispatchRequest", "BatchResult", "BATCH_REASONS"]

# Indices of the dispatch outcome counters (reason codes 1..8 keep their own index).
_OUT_OK = 0
_OUT_NO_POOL = 9
_OUT_NO_NODES = 10
_OUT_BACKEND = 11
_OUTCOME_NAMES = {_OUT_OK: "ok", _OUT_NO_POOL: "no_pool", _OUT_NO_NODES: "no_nodes",
                  _OUT_BACKEND: "backend_unavailable"}
_OUTCOME_NAMES.update({i: REASONS[i] for i in range(1, len(REASONS))})
_REASON_INDEX = {name: i for i, name in enumerate(REASONS)}


#: Where a job goes: ``node_id`` in ``pool_id``, under ``job_id`` (also ``session_id``,
#: ``src``, ``tgt``). One type per process, made by the compiled kernel when it is
#: built (the compiled dispatch creates it directly), else by the pure-Python twin.
Assignment = default_core.Assignment


@dataclass(frozen=True)
class Explanation:
    """Why each node could or could not take a job for a language pair.

    ``pools`` are the eligible pool ids in dispatch order; ``nodes`` maps
    every distinct node of those pools to its reason code (``"ok"`` when it
    is eligible), plus ``"no_pool"`` for nodes that speak the pair but could
    not get a pool; ``unpooled`` lists every node without a pool.
    ``preferred`` (with ``explain(..., prefer=)``) maps each preferred node,
    in order, to what a new session's dispatch would make of it: ``"ok"``
    (it is chosen; later ones are not listed), its reason code,
    ``"not_in_pool"``, ``"load"`` (eligible, but loaded more than
    ``prefer_slack`` above the best candidate) or ``"unknown"``.
    """

    src: str
    tgt: str
    pools: tuple[int, ...]
    nodes: dict[str, str] = field(default_factory=dict)
    unpooled: tuple[str, ...] = ()
    preferred: dict[str, str] = field(default_factory=dict)

    @property
    def breakdown(self) -> dict[str, int]:
        """Reason -> number of nodes."""
        return _tally(self.nodes.values())


def _best_reason(reasons: Mapping[int, str]) -> tuple[dict[str, int], str]:
    """(breakdown, best reason) of per-node reasons, as :class:`NoNodeAvailable` reports them.

    The best is the most frequent reason; ties go to the earliest check in
    eligibility order. "ok" (capacity that came back during the call) never
    "wins"; with no blocking reason at all it is "no_nodes".
    """
    breakdown = _tally(reasons.values())
    blocking = [r for r in breakdown if r != "ok"]
    if not blocking:
        return breakdown, "no_nodes"
    return breakdown, min(blocking, key=lambda r: (-breakdown[r], _REASON_INDEX.get(r, len(REASONS))))


def _tally(reasons: Iterable[str]) -> dict[str, int]:
    """Reason code -> how many nodes have it, in first-seen order."""
    out: dict[str, int] = {}
    for reason in reasons:
        out[reason] = out.get(reason, 0) + 1
    return out


@dataclass(frozen=True)
class DispatchRequest:
    """A validated request, as :meth:`Scheduler.dispatch_many` sees it."""

    session_id: str
    src: str
    tgt: str
    job_id: str | None = None
    exclude: tuple[str, ...] = ()
    tenant: str | None = None
    services: tuple[str, ...] = DEFAULT_SERVICES


#: reason codes of :attr:`BatchResult.reason`: 0 is "ok", 1-8 the eligibility reasons in order,
#: then "no_pool" and "no_nodes" (pools serve the pair but hold no node)
BATCH_REASONS: tuple[str, ...] = (*REASONS, "no_pool", "no_nodes")
_BATCH_REASON = {name: i for i, name in enumerate(BATCH_REASONS)}


class BatchResult:
    """What :meth:`Scheduler.dispatch_batch` placed, one entry per job, as numpy arrays.

    Attributes:
        slot: the node's slot (``int32``, -1 where the job was not placed);
            :meth:`node_ids` turns them into node ids.
        pool_id: the pool that served each job (``int64``, -1 where none).
        handle: each placed job's integer handle (``int64``, -1 where none):
            :meth:`Scheduler.release_batch`, :meth:`Scheduler.commit_batch`,
            and :meth:`Scheduler.release`/:meth:`Scheduler.commit` one by one, take it.
        reason: ``uint8`` code per job, 0 where placed, else its
            :data:`BATCH_REASONS` index: the reason a one-by-one dispatch's
            :class:`NoNodeAvailable` would give as ``best_reason``, or ``no_pool``.
    """

    __slots__ = ("slot", "pool_id", "handle", "reason", "_node_ids")

    def __init__(self, slot: np.ndarray, pool_id: np.ndarray, handle: np.ndarray, reason: np.ndarray,
                 node_ids: list[str]) -> None:
        self.slot = slot
        self.pool_id = pool_id
        self.handle = handle
        self.reason = reason
        self._node_ids = node_ids

    def __len__(self) -> int:
        return len(self.slot)

    @property
    def ok(self) -> np.ndarray:
        """Where each job was placed (bool array)."""
        return self.reason == 0

    @property
    def placed(self) -> int:
        """How many jobs were placed."""
        return int(np.count_nonzero(self.reason == 0))

    def node_ids(self) -> list[str | None]:
        """The node id of each job (``None`` where it was not placed)."""
        names = self._node_ids
        return [names[s] if s >= 0 else None for s in self.slot.tolist()]

    def reasons(self) -> list[str]:
        """The reason name of each job (``"ok"`` where placed)."""
        return [BATCH_REASONS[r] for r in self.reason.tolist()]

    def __repr__(self) -> str:
        return f"<BatchResult jobs={len(self)} placed={self.placed}>"


def _check_positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_str(value: object, name: str) -> str:
    if type(value) is not str:
        raise TypeError(f"{name} must be a str, got {type(value).__name__}: {value!r}")
    if not value:
        raise ValueError(f"{name} must be a non-empty str, got {value!r}")
    return value


_NEED_PUBLIC_GPU = NEED_GPU | NEED_PUBLIC
_REQUEST_KEYWORDS = frozenset({"job_id", "exclude", "tenant", "services", "require_gpu", "prefer"})
#: what a batch request's result slot may hold instead of an Assignment (one set, everywhere)
_REQUEST_ERRORS = (SchedulerError, ValueError, TypeError)


def _unpack_request(req: object) -> tuple[object, object, object, dict]:
    """``(session_id, src, tgt, keywords)`` of one :meth:`Scheduler.dispatch_many` request."""
    if isinstance(req, DispatchRequest):
        return req.session_id, req.src, req.tgt, {
            "job_id": req.job_id, "exclude": req.exclude or None, "tenant": req.tenant, "services": req.services,
        }
    if isinstance(req, Mapping):
        kw = dict(req)
        try:
            sid, src, tgt = kw.pop("session_id"), kw.pop("src"), kw.pop("tgt")
        except KeyError as exc:
            raise ValueError(f"request {req!r} is missing {exc.args[0]!r}") from None
        unknown = set(kw) - _REQUEST_KEYWORDS
        if unknown:
            raise TypeError(f"request has unknown keywords {sorted(unknown)!r}")
        return sid, src, tgt, kw
    if isinstance(req, tuple) and len(req) == 3:
        return req[0], req[1], req[2], {}
    raise TypeError(f"a request must be (session_id, src, tgt), a mapping or a DispatchRequest, got {req!r}")


class _BatchBuilder:
    """One compiled pass of :meth:`Scheduler.dispatch_many`: the requests it can place together.

    Requests are validated as they are added; a bad one gets its exception
    in its result slot at once. One entry per request the kernel will
    place, in request order, lives in the parallel lists below (the kernel
    takes them as arrays).
    """

    __slots__ = ("sched", "reqs", "results", "snap", "now", "pair_keys", "session_no", "rows", "pairs", "sids",
                 "keys", "sessions", "masks", "needs", "job_ids", "extras", "seen_jobs")

    def __init__(self, sched: Scheduler, reqs: list, results: list) -> None:
        self.sched = sched
        self.reqs = reqs
        self.results = results
        self.snap = sched._mgmt.snapshot
        self.now = sched._clock()
        self.pair_keys: dict[tuple[str, str], int] = {}  # pair -> kernel pair key, -1 when not served
        self.session_no: dict[str, int] = {}
        self.rows: list[int] = []
        self.pairs: list[tuple[str, str]] = []
        self.sids: list[str] = []
        self.keys: list[int] = []
        self.sessions: list[int] = []
        self.masks: list[int] = []
        self.needs: list[int] = []
        self.job_ids: list[str | None] = []
        self.extras: dict[int, tuple] = {}  # row -> (tenant, excluded slots) where either is set
        self.seen_jobs: set[str] = set()

    def add(self, i: int, req: object) -> bool:
        """Take request ``i`` into this pass; False when it must be dispatched on its own (see dispatch_many)."""
        sched = self.sched
        tenant = None
        excl: tuple[int, ...] = ()
        job_id = None
        fast = False
        if type(req) is tuple and len(req) == 3:
            sid, src, tgt = req
            s = _LANGUAGE_CACHE.get(src) if type(src) is str else None
            t = _LANGUAGE_CACHE.get(tgt) if type(tgt) is str else None
            fast = (s is not None and t is not None and t != AUTO and sched._default_mask is not None
                    and type(sid) is str and sid != "")
        if fast:
            mask, need = sched._default_mask, _NEED_PUBLIC_GPU
        else:
            try:
                sid, src, tgt, kw = _unpack_request(req)
                if kw.get("prefer") is not None:
                    return False
                job_id = kw.get("job_id")
                if job_id is not None and job_id in self.seen_jobs:
                    return False
                tenant = kw.get("tenant")
                s, t, existing, mask, need, excl = sched._prepare(
                    self.snap, sid, src, tgt, job_id, kw.get("exclude"), tenant,
                    kw.get("services", DEFAULT_SERVICES), kw.get("require_gpu", True),
                )
            except _REQUEST_ERRORS as exc:
                self.results[i] = exc
                return True
            if existing is not None:
                self.results[i] = existing
                return True
            if job_id is not None:
                self.seen_jobs.add(job_id)
        pair = (s, t)
        key = self.pair_keys.get(pair)
        if key is None:
            key = self.pair_keys[pair] = sched._pair_key(self.snap, pair)
        if key < 0:
            sched._outcomes.add(_OUT_NO_POOL)
            self.results[i] = NoPoolForLanguagePair(s, t)
            return True
        k = self.session_no.get(sid)
        if k is None:
            k = self.session_no[sid] = len(self.session_no)
        if tenant is not None or excl:
            self.extras[len(self.rows)] = (tenant, excl)
        self.rows.append(i)
        self.pairs.append(pair)
        self.sids.append(sid)
        self.keys.append(key)
        self.sessions.append(k)
        self.masks.append(mask)
        self.needs.append(need)
        self.job_ids.append(job_id)
        return True

    def flush(self) -> None:
        """Place and reserve everything added, in one compiled pass."""
        if self.rows:
            reservations = self.sched._reservations
            if self.now >= reservations.due_at:
                reservations.expire_due(self.now)
            self.sched._place_batch(self)
            self.rows = []


class Scheduler:
    """Decides which worker node runs each job.

    Args:
        pools: ``"auto"`` (one pool per distinct node language set) or a
            sequence of :class:`PoolConfig` (manual pools).
        heartbeat_timeout: seconds without a heartbeat after which a node is offline.
        reservation_ttl: seconds an uncommitted reservation holds capacity.
        resource_threshold: cpu/gpu/mem percentage at which a node is overloaded.
        max_pools: the most pools auto mode creates (and manual mode accepts).
        session_ttl: seconds after which an idle session is forgotten.
        tenant_pools: tenant -> pool id that a new session of that tenant prefers.
        clock: monotonic time source in seconds (inject one in tests).
        seed: seed of the random tie-break; the same seed and calls give the same decisions.
        reservations: a :class:`ReservationBackend`; in-process
            :class:`LocalReservations` by default.
        kernel: ``"auto"`` (the compiled kernel unless ``PYSCHED_PURE_PYTHON``
            is set), ``"compiled"``, or ``"python"`` (the pure-Python twin,
            for comparison and debugging).
        commit_lease: seconds a committed job holds its node's capacity
            without a :meth:`release` or :meth:`renew`; then it expires (event
            ``"job_expired"``), so a lost release cannot hold capacity forever.
        forget_after: seconds after which an offline node that holds nothing
            is removed (event ``"forget"``); ``None`` never forgets.
        prefer_slack: how much higher (as a fraction of max concurrency) a
            preferred node's effective load may be than the best candidate's
            for ``dispatch(..., prefer=)`` to still choose it.
    """

    def __init__(
        self,
        pools: str | Sequence[PoolConfig] = "auto",
        heartbeat_timeout: float = 45.0,
        reservation_ttl: float = 90.0,
        resource_threshold: float = 85.0,
        max_pools: int = 50,
        session_ttl: float = 3600.0,
        tenant_pools: Mapping[str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
        *,
        reservations: ReservationBackend | None = None,
        kernel: str = "auto",
        commit_lease: float = 3600.0,
        forget_after: float | None = 3600.0,
        prefer_slack: float = 0.25,
    ) -> None:
        heartbeat_timeout = _check_positive(heartbeat_timeout, "heartbeat_timeout")
        reservation_ttl = _check_positive(reservation_ttl, "reservation_ttl")
        session_ttl = _check_positive(session_ttl, "session_ttl")
        commit_lease = _check_positive(commit_lease, "commit_lease")
        if forget_after is not None:
            forget_after = _check_positive(forget_after, "forget_after")
        if isinstance(prefer_slack, bool) or not isinstance(prefer_slack, (int, float)):
            raise TypeError(f"prefer_slack must be a number, got {type(prefer_slack).__name__}: {prefer_slack!r}")
        if not 0 <= prefer_slack <= 1:
            raise ValueError(f"prefer_slack must be in [0, 1], got {prefer_slack!r}")
        if isinstance(resource_threshold, bool) or not isinstance(resource_threshold, (int, float)):
            raise TypeError(f"resource_threshold must be a number, got {resource_threshold!r}")
        if not 0 < resource_threshold <= 100:
            raise ValueError(f"resource_threshold must be in (0, 100], got {resource_threshold!r}")
        if type(max_pools) is not int or max_pools < 1:
            raise ValueError(f"max_pools must be an int >= 1, got {max_pools!r}")
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        self._tenant_pools = self._check_tenant_pools(tenant_pools)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        elif type(seed) is not int:
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}: {seed!r}")
        core = resolve(kernel)
        if reservations is None:
            reservations = LocalReservations(core=core)
        elif not isinstance(reservations, ReservationBackend):
            raise TypeError(f"reservations must be a ReservationBackend, got {type(reservations).__name__}")
        reservations.configure(reservation_ttl, clock, commit_lease=commit_lease, on_expired=self._jobs_expired)

        self.heartbeat_timeout = heartbeat_timeout
        self.reservation_ttl = reservation_ttl
        self.resource_threshold = float(resource_threshold)
        self.max_pools = max_pools
        self.session_ttl = session_ttl
        self.commit_lease = commit_lease
        self.forget_after = forget_after
        self.prefer_slack = float(prefer_slack)
        self.seed = seed
        self._clock = clock
        self._reservations = reservations
        self._rng = core.Rng(seed)
        self._outcomes = core.Counters()
        self._mgmt = ManagementRegistry(
            pools=pools,
            heartbeat_timeout=heartbeat_timeout,
            resource_threshold=float(resource_threshold),
            max_pools=max_pools,
            clock=clock,
            rng=self._rng,
            reservations=reservations,
            core=core,
            forget_after=forget_after,
        )
        self._core = core
        self._sessions = SessionManager(session_ttl, clock, core=core)
        self._session_map = self._sessions.entries  # read-only fast path for dispatch
        # Job ids must not collide between processes sharing a Redis namespace,
        # even with the same seed: the process id is part of the prefix.
        self._job_prefix = f"{random.Random(seed).getrandbits(32):08x}{os.getpid():x}-"
        # The common dispatch, release and commit in one compiled call each,
        # when the reservations are the plain in-process table (a subclass may
        # change what reserving means, and Redis decides remotely).
        table = getattr(reservations, "_table", None)
        self._fast = None
        if type(reservations) is LocalReservations and isinstance(table, core.JobTable):
            self._fast = core.Dispatcher(self._mgmt, table, self._outcomes, self._session_map, _LANGUAGE_CACHE,
                                         clock, self._job_prefix, reservations._ttl, session_ttl,
                                         reservations.commit_lease)
            self._fast.next_sweep = self._sessions.next_sweep
            self._sessions.on_next_sweep = self._set_next_sweep
            self._mgmt.on_publish = self._fast.publish
            self._fast.publish(self._mgmt.snapshot)
            self._fast.connect(self, DEFAULT_SERVICES)
            # The public entry points become the compiled ones on this instance
            # (same signatures and rules; they call _*_slow for what they don't
            # finish), saving the Python frame of the methods below per call.
            # A subclass that overrides one keeps its own.
            cls = type(self)
            if cls.dispatch is Scheduler.dispatch:
                self.dispatch = self._fast.call  # type: ignore[method-assign]
            if cls.release is Scheduler.release:
                self.release = self._fast.call_release  # type: ignore[method-assign]
            if cls.commit is Scheduler.commit:
                self.commit = self._fast.call_commit  # type: ignore[method-assign]
            self._new_job_id = self._fast.new_job_id
        else:
            seq = itertools.count(1)
            prefix = self._job_prefix
            self._new_job_id = lambda: f"{prefix}{next(seq)}"
        self._mask_cache: dict[object, int] = {}
        self._default_mask: int | None = None  # set once every default service is known
        self._shortlist = max(1, int(getattr(reservations, "shortlist", 1)))
        self._listeners: list[Callable[[str, str, dict], None]] = []

    # ------------------------------------------------------------ properties
    @property
    def snapshot(self) -> RuntimeSnapshot:
        """The current immutable :class:`RuntimeSnapshot`."""
        return self._mgmt.snapshot

    @property
    def reservations(self) -> ReservationBackend:
        return self._reservations

    @property
    def compiled(self) -> bool:
        """True when the compiled kernel (not the pure-Python twin) is in use."""
        return self._core.COMPILED

    # ------------------------------------------------------------ listeners
    def add_listener(self, listener: Callable[[str, str, dict], None]) -> None:
        """Call ``listener(event, node_id, fields)`` after every successful node change.

        Events: ``"register"`` (fields: the register_node arguments),
        ``"heartbeat"`` (the keywords given), ``"drain"``, ``"offline"``,
        ``"resume"``, ``"remove"``, ``"forget"`` (an offline node removed
        after ``forget_after``; fields ``{"offline_for"}``), and
        ``"job_expired"`` (a reservation's TTL or a committed job's lease
        ended without a release; fields ``{"job_id", "session_id", "pool_id",
        "committed"}``: fail the job over). Listeners run on the caller's thread,
        after the management lock is released; they must be quick (queue
        the work) and must not raise. :class:`pysched.RedisFleet` uses this
        to share node events between processes.
        """
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {listener!r}")
        self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: Callable[[str, str, dict], None]) -> None:
        """Stop calling a listener added with :meth:`add_listener`."""
        # ==, not is: a bound method is a new object at every attribute access
        self._listeners = [x for x in self._listeners if x != listener]

    def _notify(self, event: str, node_id: str, fields: dict) -> None:
        for listener in self._listeners:
            listener(event, node_id, fields)

    def set_pool_id_allocator(self, allocator: Callable[[frozenset[str]], int] | None) -> None:
        """Auto mode: have ``allocator(language_set)`` pick each new pool id.

        Several processes sharing a fleet install one backed by shared
        storage so the same language set gets the same id everywhere. It is
        called under the management lock, once per new language set; its
        ids must be unique and are kept for life.
        """
        if allocator is not None and not callable(allocator):
            raise TypeError(f"allocator must be callable or None, got {allocator!r}")
        self._mgmt.pool_id_allocator = allocator

    # ------------------------------------------------------------ management
    def register_node(
        self,
        node_id: str,
        languages: Iterable[str],
        services: Iterable[str] = ("asr", "nmt", "tts", "semantic"),
        max_concurrency: int = 4,
        has_gpu: bool = True,
        accept_public_jobs: bool = True,
        ready: bool = True,
    ) -> None:
        """Register (or re-register) a node; it starts with no load.

        It starts ``ready``; with ``ready=False`` it starts ``registering``
        (never chosen, reason ``not_ready``) until its first
        ``healthy=True`` heartbeat (or :meth:`resume_node`), e.g. while it
        loads its models. A re-registration is a fresh start.
        """
        self._mgmt.register(node_id, languages, services, max_concurrency, has_gpu, accept_public_jobs, ready)
        if self._listeners:
            info = self._mgmt.node_info(node_id)
            self._notify("register", node_id, {
                "languages": sorted(info["languages"]), "services": sorted(info["services"]),
                "max_concurrency": info["max_concurrency"], "has_gpu": info["has_gpu"],
                "accept_public_jobs": info["accept_public_jobs"], "ready": bool(ready),
            })

    def heartbeat(
        self,
        node_id: str,
        *,
        running: int | None = None,
        cpu: float | None = None,
        gpu: float | None = None,
        mem: float | None = None,
        services: Iterable[str] | None = None,
        languages: Iterable[str] | None = None,
        healthy: bool | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        """Record a heartbeat. Load-only heartbeats publish nothing.

        Three consecutive ``healthy=False`` make a ready node ``degraded``; a
        ``healthy=True`` makes it ready again, and makes a ``registering``
        node ready. A heartbeat from a node marked offline brings it back.
        A change of ``languages`` or ``services`` moves the node into
        exactly the pools the rules give it. Raises :class:`UnknownNode`.
        """
        if self._mgmt.heartbeat(node_id, running, cpu, gpu, mem, services, languages, healthy, max_concurrency):
            self.forget_offline_nodes()  # some node could be due
        if self._listeners:
            fields = {k: v for k, v in (("running", running), ("cpu", cpu), ("gpu", gpu), ("mem", mem),
                                        ("healthy", healthy), ("max_concurrency", max_concurrency))
                      if v is not None}
            if services is not None:
                fields["services"] = sorted(normalize_services(services))
            if languages is not None:
                fields["languages"] = sorted(normalize_languages(languages))
            self._notify("heartbeat", node_id, fields)

    def drain_node(self, node_id: str) -> None:
        """Stop sending new jobs to a node (running ones are unaffected)."""
        self._mgmt.set_status(node_id, "draining")
        if self._listeners:
            self._notify("drain", node_id, {})

    def mark_offline(self, node_id: str) -> None:
        """Mark a node offline until it heartbeats or is resumed."""
        self._mgmt.set_status(node_id, "offline")
        if self._listeners:
            self._notify("offline", node_id, {})

    def resume_node(self, node_id: str) -> None:
        """Return a drained, degraded, registering or offline node to ``ready``.

        Resuming counts as a sign of life, like a heartbeat: a node offline
        by heartbeat age (silent for longer than ``heartbeat_timeout``) is
        eligible again too, until it stays silent for ``heartbeat_timeout``
        once more. Raises :class:`UnknownNode`.
        """
        self._mgmt.set_status(node_id, "ready")
        if self._listeners:
            self._notify("resume", node_id, {})

    def remove_node(self, node_id: str) -> None:
        """Forget a node. Its outstanding reservations can still be released."""
        self._mgmt.remove(node_id)
        if self._listeners:
            self._notify("remove", node_id, {})

    def node_ids(self) -> list[str]:
        """The ids of every registered node, in registration order."""
        return self._mgmt.node_ids()

    def node(self, node_id: str) -> dict:
        """Management's view of one node."""
        return self._mgmt.node_info(node_id)

    def set_pools(self, pools: str | Sequence[PoolConfig]) -> None:
        """Replace the pool configuration (manual pools), or ``"auto"``."""
        self._mgmt.set_pools(pools)

    def forget_offline_nodes(self) -> list[str]:
        """Remove the nodes offline for ``forget_after`` seconds that hold nothing; their ids.

        A node is offline from its mark (:meth:`mark_offline`) or from
        ``heartbeat_timeout`` after its last heartbeat, whichever is
        earlier; one with reservations or committed jobs is kept until they
        are gone. Each removal fires a ``"forget"`` event (fields
        ``{"offline_for": seconds}``), not ``"remove"``. Cheap to call
        often: nothing happens until the earliest time a node could be due.
        """
        forgotten = self._mgmt.forget_offline(self._clock())
        if forgotten and self._listeners:
            for node_id, offline_for in forgotten:
                self._notify("forget", node_id, {"offline_for": offline_for})
        return [node_id for node_id, _ in forgotten]

    def pools(self) -> list[PoolInfo]:
        """The active pools, by id, with their member node ids."""
        return [
            PoolInfo(meta.pool_id, meta.name, meta.languages, meta.required_services, members, meta.auto)
            for meta, members in self._mgmt.pool_configs()
        ]

    def close_session(self, session_id: str) -> bool:
        """Forget a session's binding; False if it was not known."""
        return self._sessions.close(session_id)

    def sweep_sessions(self) -> int:
        """Forget idle sessions now (dispatch also does it periodically)."""
        return self._sessions.sweep()

    # ------------------------------------------------------------ reservations
    def _held_error(self, job_id: str, node_id: str | None) -> UnknownJob:
        """Why a commit or renew was refused: unknown, or held on another node."""
        if node_id is not None:
            held = self._reservations.get(job_id)
            if held is not None and held.node_id != node_id:
                return WrongNode(job_id, node_id, held.node_id)
        return UnknownJob(job_id)

    def commit(self, job_id: str, *, node_id: str | None = None) -> None:
        """The node accepted the job: it now holds capacity until released or its lease ends.

        The lease is ``commit_lease`` seconds (renew it with :meth:`renew`).
        With ``node_id``, a job held on another node is refused
        (:class:`WrongNode`). Raises :class:`UnknownJob` if the job holds no
        reservation. Nothing changes when it raises.
        """
        if node_id is None and self._fast is not None:
            done = self._fast.commit(job_id)
            if done is not None:
                if not done:
                    raise UnknownJob(job_id)
                return
        self._commit_slow(job_id, node_id=node_id)

    def _commit_slow(self, job_id: str | int, *, node_id: str | None = None) -> None:
        if type(job_id) is int and self._fast is not None:  # a dispatch_batch handle
            if node_id is not None:
                _check_str(node_id, "node_id")
            if not self._reservations.commit_handle(job_id, node_id):  # type: ignore[attr-defined]
                raise self._held_error(job_id, node_id)  # type: ignore[arg-type]
            return
        _check_str(job_id, "job_id")
        if node_id is not None:
            _check_str(node_id, "node_id")
        if not self._reservations.commit(job_id, node_id):
            raise self._held_error(job_id, node_id)

    def release(self, job_id: str, *, node_id: str | None = None) -> bool:
        """The job is done, failed or cancelled: return its capacity.

        Idempotent; returns False when nothing was held (never dispatched,
        already released, or expired). With ``node_id``, a job held on
        another node is not touched and False is returned: a late result from
        the node a job was moved away from cannot free the new node's capacity.
        """
        if node_id is None and self._fast is not None:
            done = self._fast.release(job_id)
            if done is not None:
                return done
        return self._release_slow(job_id, node_id=node_id)

    def _release_slow(self, job_id: str | int, *, node_id: str | None = None) -> bool:
        if type(job_id) is int and self._fast is not None:  # a dispatch_batch handle
            if node_id is not None:
                _check_str(node_id, "node_id")
            return self._reservations.release_handle(job_id, node_id)  # type: ignore[attr-defined]
        _check_str(job_id, "job_id")
        if node_id is not None:
            _check_str(node_id, "node_id")
        return self._reservations.release(job_id, node_id)

    def renew(self, job_id: str, *, lease: float | None = None, node_id: str | None = None) -> None:
        """Extend a job's hold: it now expires ``lease`` seconds from now.

        The default ``lease`` is ``commit_lease`` for a committed job and
        ``reservation_ttl`` for an uncommitted one. Long jobs renew before
        their lease ends. Raises :class:`UnknownJob` (or :class:`WrongNode`
        with ``node_id``), changing nothing.
        """
        _check_str(job_id, "job_id")
        if lease is not None:
            lease = _check_positive(lease, "lease")
        if node_id is not None:
            _check_str(node_id, "node_id")
        if not self._reservations.renew(job_id, lease, node_id):
            raise self._held_error(job_id, node_id)

    def _set_next_sweep(self, when: float) -> None:
        self._fast.next_sweep = when

    def _jobs_expired(self, expired: list[Reservation]) -> None:
        """Backend callback: tell the listeners about jobs whose TTL or lease ended."""
        if self._listeners:
            for res in expired:
                self._notify("job_expired", res.node_id, {
                    "job_id": res.job_id, "session_id": res.session_id, "pool_id": res.pool_id,
                    "committed": res.committed,
                })

    # ------------------------------------------------------------ dispatch
    def _required(self, services: object) -> tuple[int, int]:
        """(service mask, need bits) of a ``services`` argument."""
        hashable = isinstance(services, (tuple, frozenset))
        if hashable:
            try:
                mask = self._mask_cache.get(services)
            except TypeError:  # a tuple holding a list: normalize_services names the problem below
                hashable = False
                mask = None
            if mask is not None:
                return mask, 0
        servs = normalize_services(services, "services")
        mask = self._mgmt.service_mask(servs)
        if mask is None:
            # a service nobody announced yet; not cached, it may appear later
            return 0, NEED_UNKNOWN_SERVICE
        if hashable and len(self._mask_cache) < 1024:
            # bits are never reassigned, so a known mask stays valid for life
            self._mask_cache[services] = mask
            if services is DEFAULT_SERVICES:
                self._default_mask = mask
                if self._fast is not None:
                    self._fast.default_mask = mask
        return mask, 0

    def _exclude_slots(self, snap: RuntimeSnapshot, exclude: object) -> tuple[int, ...]:
        if exclude is None:
            return ()
        if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):
            raise TypeError(f"exclude must be an iterable of node ids, got {type(exclude).__name__}: {exclude!r}")
        slots = []
        for node_id in exclude:
            if type(node_id) is not str:
                raise TypeError(f"exclude must hold node id strs, got {type(node_id).__name__}: {node_id!r}")
            slot = snap.slot(node_id)
            if slot is not None:
                slots.append(slot)
        return tuple(slots)

    def dispatch(
        self,
        session_id: str,
        src: str,
        tgt: str,
        *,
        job_id: str | None = None,
        exclude: Iterable[str] | None = None,
        tenant: str | None = None,
        services: Iterable[str] = DEFAULT_SERVICES,
        require_gpu: bool = True,
        prefer: str | Iterable[str] | None = None,
    ) -> Assignment:
        """Pick a node for one job of ``session_id`` and reserve capacity on it.

        ``src`` may be ``"auto"`` (any source). A ``job_id`` that already holds
        a reservation returns exactly its assignment (safe retries); a retry
        that names another session or language pair than the held job raises
        ``ValueError``. Jobs without a ``tenant`` are public: only nodes
        accepting public jobs take them. ``prefer`` (a node id, or ids in
        order of preference) places the job on the first preferred node that
        is eligible and whose effective load is within ``prefer_slack`` of
        the best candidate's; otherwise the job is placed normally. Raises
        :class:`NoPoolForLanguagePair`, :class:`NoNodeAvailable`,
        :class:`ReservationBackendUnavailable`, or ``ValueError``/``TypeError``
        for bad arguments; a failed call changes nothing.
        """
        # With the in-process backend an instance attribute replaces this
        # method by the compiled Dispatcher.call, which does the common job in
        # one call and hands everything else to _dispatch_slow: the same rules.
        if (job_id is None and exclude is None and tenant is None and services is DEFAULT_SERVICES
                and require_gpu is True and prefer is None):
            fast = self._fast
            if fast is not None:
                done = fast.dispatch(session_id, src, tgt)
                if done is not None:
                    if type(done) is tuple:  # no eligible node at that moment: say why
                        raise self._no_node_now(*done)
                    return done
        return self._dispatch_slow(session_id, src, tgt, job_id=job_id, exclude=exclude, tenant=tenant,
                                   services=services, require_gpu=require_gpu, prefer=prefer)

    def _dispatch_slow(
        self,
        session_id: str,
        src: str,
        tgt: str,
        *,
        job_id: str | None = None,
        exclude: Iterable[str] | None = None,
        tenant: str | None = None,
        services: Iterable[str] = DEFAULT_SERVICES,
        require_gpu: bool = True,
        prefer: str | Iterable[str] | None = None,
    ) -> Assignment:
        """:meth:`dispatch` in Python: every case the compiled call does not finish itself."""
        # Step 1: the snapshot, one attribute read, no lock.
        snap = self._mgmt.snapshot
        if (job_id is None and exclude is None and tenant is None and services is DEFAULT_SERVICES
                and require_gpu is True and prefer is None and type(session_id) is str and session_id):
            # The common job, validated with a few identity checks and two
            # cache lookups (every code seen before is in the cache).
            s = _LANGUAGE_CACHE.get(src) if type(src) is str else None
            t = _LANGUAGE_CACHE.get(tgt) if type(tgt) is str else None
            mask = self._default_mask
            if s is not None and t is not None and t != AUTO and mask is not None:
                return self._place(snap, session_id, s, t, None, (), None, mask, _NEED_PUBLIC_GPU, self._clock())
        pref = () if prefer is None else self._prefer_slots(snap, prefer)
        s, t, existing, mask, need, excl = self._prepare(
            snap, session_id, src, tgt, job_id, exclude, tenant, services, require_gpu
        )
        if existing is not None:
            return existing
        return self._place(snap, session_id, s, t, job_id, excl, tenant, mask, need, self._clock(), pref)

    def _no_node_now(self, s: str, t: str, now: float) -> SchedulerError:
        """The error of a common job the compiled dispatch found no node for (it selected once already)."""
        snap = self._mgmt.snapshot
        ids = snap.index.pair_ids((s, t))
        if ids is None:
            self._outcomes.add(_OUT_NO_POOL)
            return NoPoolForLanguagePair(s, t)
        reasons = self._node_reasons(snap, ids[0], ids[1], self._default_mask, _NEED_PUBLIC_GPU, now, (), {})
        return self._no_node_error(s, t, reasons)

    def _prefer_slots(self, snap: RuntimeSnapshot, prefer: object) -> tuple[int, ...]:
        """Slots of the live preferred nodes, in order (unknown ids are skipped, like ``exclude``)."""
        if type(prefer) is str:
            ids: Iterable[object] = (_check_str(prefer, "prefer"),)
        elif isinstance(prefer, bytes) or not isinstance(prefer, Iterable):
            raise TypeError(f"prefer must be a node id or an iterable of node ids, got "
                            f"{type(prefer).__name__}: {prefer!r}")
        else:
            ids = list(prefer)
        slots: list[int] = []
        for node_id in ids:
            if type(node_id) is not str or not node_id:
                raise TypeError(f"prefer must hold node id strs, got {type(node_id).__name__}: {node_id!r}")
            slot = snap.slot(node_id)
            if slot is not None and slot not in slots:
                slots.append(slot)
        return tuple(slots)

    def _prepare(
        self,
        snap: RuntimeSnapshot,
        session_id: object,
        src: object,
        tgt: object,
        job_id: object,
        exclude: object,
        tenant: object,
        services: object,
        require_gpu: object,
    ) -> tuple[str, str, Assignment | None, int, int, tuple[int, ...]]:
        """Validate and normalise one request: ``(src, tgt, existing, mask, need, excluded slots)``.

        Every argument is validated, retries included. ``existing`` is the
        assignment a ``job_id`` already holds (a retry), exactly as it was
        made. The common cases (cached codes, default services) cost one dict
        lookup each: this runs on every job.
        """
        if type(session_id) is not str or not session_id:
            _check_str(session_id, "session_id")
        s = _LANGUAGE_CACHE.get(src) if type(src) is str else None
        if s is None:
            s = normalize_language(src, "src", allow_auto=True)
        t = _LANGUAGE_CACHE.get(tgt) if type(tgt) is str else None
        if t is None or t == AUTO:
            t = normalize_language(tgt, "tgt")
        if tenant is not None:
            _check_str(tenant, "tenant")
        if type(require_gpu) is not bool:
            raise TypeError(f"require_gpu must be a bool, got {type(require_gpu).__name__}: {require_gpu!r}")
        if services is DEFAULT_SERVICES and self._default_mask is not None:
            mask, need = self._default_mask, 0
        else:
            mask, need = self._required(services)
        if require_gpu:
            need |= NEED_GPU
        if tenant is None:
            need |= NEED_PUBLIC
        excl = () if exclude is None else self._exclude_slots(snap, exclude)
        if job_id is not None:
            _check_str(job_id, "job_id")
            held = self._reservations.get(job_id)
            if held is not None:
                return s, t, self._held_assignment(held, session_id, s, t), 0, 0, ()
        return s, t, None, mask, need, excl

    @staticmethod
    def _held_assignment(held: Reservation, session_id: str, s: str, t: str) -> Assignment:
        """The assignment a retried ``job_id`` holds; a retry for another job is refused."""
        if held.session_id != session_id or (held.src is not None and (held.src, held.tgt) != (s, t)):
            held_pair = "" if held.src is None else f" for {held.src!r} -> {held.tgt!r}"
            raise ValueError(
                f"job_id {held.job_id!r} is held by session {held.session_id!r}{held_pair}: a retry must repeat "
                f"the held job's session and language pair, got session {session_id!r}, {s!r} -> {t!r}"
            )
        return Assignment(held.node_id, held.pool_id, held.job_id, held.session_id, s, t)

    def _place(
        self,
        snap: RuntimeSnapshot,
        session_id: str,
        s: str,
        t: str,
        job_id: str | None,
        excl: tuple[int, ...],
        tenant: str | None,
        mask: int,
        need: int,
        now: float,
        prefer: tuple[int, ...] = (),
    ) -> Assignment:
        pair = (s, t)
        ids = snap.index.pair_ids(pair)
        if ids is None:
            self._outcomes.add(_OUT_NO_POOL)
            raise NoPoolForLanguagePair(s, t)
        src_id, tgt_id = ids
        kernel = snap.kernel

        # Steps 2-4: the session's binding, read under its own lock.
        session = self._session_map.get(session_id)
        bound = None
        if session is not None:
            lock = session.lock
            lock.acquire()  # cheaper than `with` (~50 ns a dispatch) and nothing in here can raise
            binding = session.binding
            if session.last_used < now - self.session_ttl:
                # idle past its TTL: forgotten at lookup, even before a sweep removes it
                binding = session.binding = None
            session.last_used = now
            lock.release()
            if binding is not None and binding[0] == pair:
                bound = binding[1]
        bound_index = -1 if bound is None else snap.pool_index.get(bound, -1)
        tenant_index = -1
        if tenant is not None:
            pid = self._tenant_pools.get(tenant)
            if pid is not None:
                tenant_index = snap.pool_index.get(pid, -1)

        # Steps 5-9: kernel selection, then the reservation decides.
        reservations = self._reservations
        if now >= reservations.due_at:
            reservations.expire_due(now)
        supplied = job_id is not None
        refused: dict[int, str] = {}  # slot -> the backend's refusal, for the breakdown
        shortlist = self._shortlist
        retries = 0
        while True:
            found = kernel.select_candidate(src_id, tgt_id, bound_index, mask, need, now, excl, tenant_index)
            if type(found) is int:
                if supplied:
                    # A concurrent retry of the same job may have taken the last
                    # slot since the caller's check: answer with its assignment.
                    existing = reservations.get(job_id)
                    if existing is not None:
                        return self._held_assignment(existing, session_id, s, t)
                if found == -2:
                    self._outcomes.add(_OUT_NO_POOL)
                    raise NoPoolForLanguagePair(s, t)
                reasons = self._node_reasons(snap, src_id, tgt_id, mask, need, now, excl, refused)
                if "ok" in reasons.values() and retries < 3:
                    # capacity came back between the scan and now: look again
                    retries += 1
                    continue
                raise self._no_node_error(s, t, reasons)
            if prefer:
                found = self._preferred(snap, found, prefer, src_id, tgt_id, bound_index, mask, need, now, excl)
            if job_id is None:
                job_id = self._new_job_id()  # numbered once a node is found, as the compiled path does
            pool_index = found[4]
            pool_id = snap.pool_ids[pool_index]
            try:
                if shortlist == 1:
                    result = reservations.reserve_one(job_id, found, pool_id, session_id, now, pair)
                    if result is None:
                        node_id = found[1]
                        break
                    if type(result) is str:
                        refused[found[0]] = result
                        excl = excl + (found[0],)
                        prefer = tuple(p for p in prefer if p != found[0])
                        continue
                else:
                    slots = kernel.rank(pool_index, mask, need, now, excl, shortlist)
                    if prefer and found[0] not in slots[:1]:
                        slots = [found[0], *[c for c in slots if c != found[0]]][:shortlist]
                    candidates = [kernel.candidate(c) for c in slots]
                    result = reservations.try_reserve(job_id, candidates, pool_id, session_id)
                    if not isinstance(result, Reservation):
                        for cand, reason in zip(candidates, result):
                            refused[cand[0]] = reason
                        excl = excl + tuple(c[0] for c in candidates)
                        prefer = tuple(p for p in prefer if p not in excl)
                        continue
            except ReservationBackendUnavailable:
                self._outcomes.add(_OUT_BACKEND)
                raise
            # a Reservation: fresh from the backend, or the one job_id already held
            if supplied and result.session_id != session_id:
                return self._held_assignment(result, session_id, s, t)
            node_id, pool_id = result.node_id, result.pool_id
            break

        # Step 10: bind the session to the pool that served it.
        if session is None or pool_id != bound:
            if session is None:
                session = self._sessions.entry(session_id, now)
            with session.lock:
                session.binding = (pair, pool_id)
                session.last_used = now
        if now >= self._sessions.next_sweep:
            self._sessions.maybe_sweep(now)
        self._outcomes.add(_OUT_OK)
        return Assignment(node_id, pool_id, job_id, session_id, s, t)

    def _preferred(self, snap: RuntimeSnapshot, found: tuple, prefer: tuple[int, ...], src_id: int, tgt_id: int,
                   bound_index: int, mask: int, need: int, now: float, excl: tuple[int, ...]) -> tuple:
        """The candidate to reserve when the caller prefers some nodes.

        The first preferred node that is eligible for this job in a pool
        serving the pair, with an effective load ratio at most
        ``prefer_slack`` above the kernel's best candidate (``found``), wins;
        its pool is the session's bound pool when the node is a member, else
        the first serving pool (index order) that has it. Otherwise ``found``.
        """
        verdicts = self._prefer_verdicts(snap, prefer, found[0], src_id, tgt_id, bound_index, mask, need, now, excl)
        for slot, (verdict, pool) in verdicts.items():
            if verdict == "ok":
                return snap.kernel.candidate(slot) + (pool,)
        return found

    def _prefer_verdicts(self, snap: RuntimeSnapshot, prefer: tuple[int, ...], best: int | None, src_id: int,
                         tgt_id: int, bound_index: int, mask: int, need: int, now: float,
                         excl: tuple[int, ...]) -> dict[int, tuple[str, int]]:
        """slot -> (verdict, pool index) for each preferred node, up to the first ``"ok"``.

        A verdict is ``"ok"``, the node's reason code, ``"not_in_pool"`` (no
        pool serving the pair has it) or ``"load"`` (eligible, but loaded
        beyond ``prefer_slack`` over the best candidate ``best``).
        """
        kernel = snap.kernel
        pools = kernel.pools_for(src_id, tgt_id)
        order = ([bound_index] if bound_index in pools else []) + [p for p in pools if p != bound_index]
        inflight, loads, recs = snap.inflight, snap.loads, snap.nodes

        def ratio(slot: int) -> float:
            eff = max(int(inflight[slot]), int(loads["running"][slot]))
            return eff / int(recs["max_concurrency"][slot])

        best_ratio = None if best is None else ratio(best)
        out: dict[int, tuple[str, int]] = {}
        for slot in prefer:
            pool = next((p for p in order if kernel.is_member(p, slot)), -1)
            if pool < 0:
                out[slot] = ("not_in_pool", -1)
                continue
            reason = REASONS[kernel.reason(slot, mask, need, now, excl)]
            if reason != "ok":
                out[slot] = (reason, pool)
            elif best_ratio is not None and ratio(slot) > best_ratio + self.prefer_slack:
                out[slot] = ("load", pool)
            else:
                out[slot] = ("ok", pool)
                break
        return out

    def dispatch_many(
        self, requests: Iterable[tuple[str, str, str] | Mapping[str, object] | DispatchRequest]
    ) -> list[Assignment | Exception]:
        """Dispatch a batch; return, in order, an :class:`Assignment` or the exception.

        Each request is ``(session_id, src, tgt)``, a mapping with the
        keywords of :meth:`dispatch`, or a :class:`DispatchRequest`. Nothing is
        raised for a request: its result slot holds the exception
        :meth:`dispatch` would have raised (any :class:`SchedulerError`,
        ``ValueError`` or ``TypeError``, :class:`ReservationBackendUnavailable`
        included). Language pairs are looked up once per distinct pair, then
        the batch is placed in compiled passes that add each placement to a
        scratch copy of the in-flight counts and track session bindings as
        they go, so the batch places exactly as the same requests dispatched
        one by one (same seed, same calls) would. One rule keeps that exact:
        a request the compiled pass cannot decide alone (a ``job_id`` already
        seen earlier in the batch, whose outcome depends on the earlier one's
        reservation, or a ``prefer``) ends the current pass; it is dispatched
        on its own, in its place, and the next pass starts after it. A
        request the backend refuses after all (capacity taken by another
        thread meanwhile) falls back to :meth:`dispatch`.
        """
        reqs = requests if isinstance(requests, list) else list(requests)
        results: list = [None] * len(reqs)
        batch = _BatchBuilder(self, reqs, results)
        for i, req in enumerate(reqs):
            if not batch.add(i, req):
                batch.flush()
                try:
                    sid, src, tgt, kw = _unpack_request(req)
                    results[i] = self.dispatch(sid, src, tgt, **kw)
                except _REQUEST_ERRORS as exc:
                    results[i] = exc
                batch = _BatchBuilder(self, reqs, results)
        batch.flush()
        return results

    def dispatch_batch(
        self,
        session_ids: Sequence[str] | np.ndarray,
        src: str | Sequence[str] | np.ndarray,
        tgt: str | Sequence[str] | np.ndarray,
        *,
        tenant: str | None = None,
        services: Iterable[str] = DEFAULT_SERVICES,
        require_gpu: bool = True,
    ) -> BatchResult:
        """Place a batch of jobs in one compiled call, with arrays out and integer job handles.

        ``session_ids`` is a sequence (or numpy array) of session ids;
        ``src``/``tgt`` one code for every job or one per job. ``tenant``,
        ``services`` and ``require_gpu`` apply to every job. The jobs are
        placed in order exactly as that many :meth:`dispatch` calls with the
        same seed would place them (sessions' bindings and every earlier
        job's load included); instead of job id strings each placed job gets
        an integer handle. Bad input raises ``ValueError``/``TypeError``
        naming the job and changes nothing. Needs the in-process reservations
        (``TypeError`` with any other backend). The pass holds the GIL: like
        every reservation change it is atomic against other threads.
        """
        fast = self._fast
        if fast is None:
            raise TypeError("dispatch_batch needs the in-process LocalReservations backend; "
                            "use dispatch_many with other backends")
        sids = session_ids.tolist() if isinstance(session_ids, np.ndarray) else list(session_ids)
        srcs = src if type(src) is str else (src.tolist() if isinstance(src, np.ndarray) else list(src))
        tgts = tgt if type(tgt) is str else (tgt.tolist() if isinstance(tgt, np.ndarray) else list(tgt))
        if tenant is not None:
            _check_str(tenant, "tenant")
        if type(require_gpu) is not bool:
            raise TypeError(f"require_gpu must be a bool, got {type(require_gpu).__name__}: {require_gpu!r}")
        mask, need = self._required(services)
        need |= (NEED_GPU if require_gpu else 0) | (NEED_PUBLIC if tenant is None else 0)
        snap = self._mgmt.snapshot
        tenant_index = -1
        if tenant is not None and tenant in self._tenant_pools:
            tenant_index = snap.pool_index.get(self._tenant_pools[tenant], -1)
        now = self._clock()
        if now >= self._reservations.due_at:
            self._reservations.expire_due(now)
        if now >= self._sessions.next_sweep:
            self._sessions.maybe_sweep(now)
        n = len(sids)
        slot = np.empty(n, dtype=np.int32)
        pool_id = np.empty(n, dtype=np.int64)
        handle = np.empty(n, dtype=np.int64)
        keys = np.empty(n, dtype=np.int64)
        fast.batch(sids, srcs, tgts, mask, need, tenant_index, now, slot, pool_id, handle, keys)
        reason = np.zeros(n, dtype=np.uint8)
        failed = np.flatnonzero(slot < 0)
        if len(failed):
            reason[failed] = self._batch_failures(self._mgmt.snapshot, keys[failed], mask, need, now)
        return BatchResult(slot, pool_id, handle, reason, snap._node_ids)

    def _batch_failures(self, snap: RuntimeSnapshot, keys: np.ndarray, mask: int, need: int,
                        now: float) -> np.ndarray:
        """Reason codes of the jobs a batch did not place: what one-by-one dispatch would have raised.

        Every job of a pair that failed saw the same nodes for the same
        reasons (load only grows within the batch, and a node once
        ineligible takes no later job), so the reason is worked out once
        per pair, over the nodes as they are after the batch.
        """
        out = np.empty(len(keys), dtype=np.uint8)
        memo: dict[int, str] = {}
        n_langs = snap.index.n_langs
        for j, key in enumerate(keys.tolist()):
            name = memo.get(key)
            if name is None:
                if key < 0 or not snap.kernel.pools_for(key // n_langs, key % n_langs):
                    name = "no_pool"
                else:
                    reasons = self._node_reasons(snap, key // n_langs, key % n_langs, mask, need, now, (), {})
                    name = _best_reason(reasons)[1]
                memo[key] = name
            out[j] = _BATCH_REASON[name]
            self._outcomes.add(_OUT_NO_POOL if name == "no_pool" else _REASON_INDEX.get(name, _OUT_NO_NODES))
        return out

    def release_batch(self, handles: Sequence[int] | np.ndarray) -> int:
        """Release the jobs of these :meth:`dispatch_batch` handles; how many held something."""
        return self._handles_backend().release_handles(self._handle_array(handles))

    def commit_batch(self, handles: Sequence[int] | np.ndarray) -> int:
        """Commit the jobs of these :meth:`dispatch_batch` handles; how many were live."""
        return self._handles_backend().commit_handles(self._handle_array(handles))

    def _handles_backend(self) -> LocalReservations:
        if self._fast is None:
            raise TypeError("job handles need the in-process LocalReservations backend")
        return self._reservations  # type: ignore[return-value]

    @staticmethod
    def _handle_array(handles: object) -> np.ndarray:
        arr = np.asarray(handles)
        if arr.dtype.kind not in "iu" and not (arr.size == 0):
            raise TypeError(f"handles must be integers, got an array of {arr.dtype}")
        return np.ascontiguousarray(arr, dtype=np.int64).reshape(-1)

    def _place_batch(self, b: _BatchBuilder) -> None:
        """Place, reserve and bind one pass of :meth:`dispatch_many` (see :class:`_BatchBuilder`)."""
        snap, reqs, results, now, rows = b.snap, b.reqs, b.results, b.now, b.rows
        pairs, sids, keys, sessions, masks, needs = b.pairs, b.sids, b.keys, b.sessions, b.masks, b.needs
        job_ids, extras, session_no = b.job_ids, b.extras, b.session_no
        kernel = snap.kernel
        n = len(rows)
        n_langs = snap.index.n_langs
        pool_index = snap.pool_index
        pool_ids = snap.pool_ids
        key_arr = np.array(keys, dtype=np.int64)
        src_ids = (key_arr // n_langs).astype(np.int32)
        tgt_ids = (key_arr % n_langs).astype(np.int32)
        # Each session's binding is read with one attribute load (a consistent
        # tuple); decisions are written back under the session's lock below.
        keys_init = [-1] * len(session_no)
        pools_init = [-1] * len(session_no)
        session_map = self._session_map
        states: list[SessionState | None] = []
        own_keys = dict(zip(pairs, keys))
        idle_before = now - self.session_ttl
        for sid, k in session_no.items():
            state = session_map.get(sid)
            states.append(state)
            if state is None:
                continue
            if state.last_used < idle_before:
                with state.lock:  # idle past its TTL: forgotten at lookup, as in dispatch
                    if state.last_used < idle_before:
                        state.binding = None
            state.last_used = now
            binding = state.binding
            if binding is None:
                continue
            key = own_keys.get(binding[0])
            if key is None:
                key = self._pair_key(snap, binding[0])
            if key >= 0:
                keys_init[k] = key
                pools_init[k] = pool_index.get(binding[1], -1)
        bound_key = np.array(keys_init, dtype=np.int64)
        bound_pool = np.array(pools_init, dtype=np.int32)
        tenants = np.full(n, -1, dtype=np.int32)
        excl_off = np.zeros(n + 1, dtype=np.int32)
        excl_flat: list[int] = []
        if extras:
            tenant_pools = self._tenant_pools
            for j in range(n):
                extra = extras.get(j)
                if extra is not None:
                    tenant, excl = extra
                    if tenant is not None and tenant in tenant_pools:
                        # the kernel uses it only where it serves the pair, as in dispatch
                        tenants[j] = pool_index.get(tenant_pools[tenant], -1)
                    excl_flat.extend(excl)
                excl_off[j + 1] = len(excl_flat)
        scratch = np.array(snap.inflight, dtype=np.int32)  # a writable copy
        out = np.empty(n, dtype=np.int64)
        kernel.select_batch(
            src_ids, tgt_ids, np.array(masks, dtype=np.uint64), np.array(needs, dtype=np.int32), tenants,
            np.array(sessions, dtype=np.int32), bound_key, bound_pool, excl_off, np.array(excl_flat, dtype=np.int32),
            scratch, now, out,
        )

        # job ids in request order for the placed requests, as one-by-one dispatch numbers them
        new_job_id = self._new_job_id
        for j in np.flatnonzero(out >= 0).tolist():
            if job_ids[j] is None:
                job_ids[j] = new_job_id()

        # the reservations, together
        placed = np.flatnonzero(out >= 0)
        placed_rows = placed.tolist()
        slots = (out[placed] & 0xFFFFFFFF).astype(np.int32)
        pools = (out[placed] >> 32).tolist()
        session_ids = [sids[j] for j in placed_rows]
        try:
            refused: list | None = self._reservations.reserve_placed(
                [job_ids[j] for j in placed_rows], slots, snap.nodes["max_concurrency"][slots],
                snap.loads["running"][slots], [pool_ids[p] for p in pools], session_ids, snap.node_id, now,
                [pairs[j] for j in placed_rows],
            )
        except ReservationBackendUnavailable as exc:
            self._outcomes.add(_OUT_BACKEND, len(placed_rows))
            for j in placed_rows:
                results[rows[j]] = exc
            refused = None
        retry: list[int] = []
        if refused is not None:
            node_ids = snap._node_ids
            slot_list = slots.tolist()
            served = 0
            for pos, j in enumerate(placed_rows):
                result = refused[pos] if refused else None
                s, t = pairs[j]
                if result is None:
                    results[rows[j]] = Assignment(node_ids[slot_list[pos]], pool_ids[pools[pos]], job_ids[j],
                                                  session_ids[pos], s, t)
                    served += 1
                elif isinstance(result, Reservation):
                    results[rows[j]] = Assignment(result.node_id, result.pool_id, job_ids[j], session_ids[pos], s, t)
                    served += 1
                else:
                    retry.append(j)
            self._outcomes.add(_OUT_OK, served)

            # bind each session to the pool that last served it in the batch, under its lock
            key_pair = dict(zip(keys, pairs))
            final_keys, final_pools = bound_key.tolist(), bound_pool.tolist()
            for sid, k in session_no.items():
                key, pool = final_keys[k], final_pools[k]
                if key == keys_init[k] and pool == pools_init[k] or pool < 0 or key not in key_pair:
                    continue  # unchanged by this batch
                binding = (key_pair[key], pool_ids[pool])
                state = states[k]
                if state is not None and state.binding == binding:
                    continue
                if state is None:
                    state = self._sessions.entry(sid, now)
                with state.lock:
                    state.binding = binding
                    state.last_used = now

        for j in np.flatnonzero(out < 0).tolist():
            i = rows[j]
            s, t = pairs[j]
            if out[j] == -2:
                self._outcomes.add(_OUT_NO_POOL)
                results[i] = NoPoolForLanguagePair(s, t)
            else:
                excl = extras.get(j, (None, ()))[1]
                reasons = self._node_reasons(snap, int(src_ids[j]), int(tgt_ids[j]), masks[j], needs[j], now, excl,
                                             {})
                results[i] = self._no_node_error(s, t, reasons)
        for j in retry:
            try:
                sid, src, tgt, kw = _unpack_request(reqs[rows[j]])
                kw["job_id"] = job_ids[j]
                results[rows[j]] = self.dispatch(sid, src, tgt, **kw)
            except _REQUEST_ERRORS as exc:
                results[rows[j]] = exc

    @staticmethod
    def _pair_key(snap: RuntimeSnapshot, pair: tuple[str, str]) -> int:
        """The kernel's key of a language pair in ``snap``, or -1."""
        n_langs = snap.index.n_langs
        tgt_id = snap.index.lang_ids.get(pair[1])
        src_id = n_langs if pair[0] == AUTO else snap.index.lang_ids.get(pair[0])
        return -1 if src_id is None or tgt_id is None else src_id * n_langs + tgt_id

    def _choose_pool(self, snap: RuntimeSnapshot, tenant: str | None, src_id: int, tgt_id: int, mask: int,
                     need: int, now: float, excl: tuple[int, ...]) -> int:
        """A new binding: the tenant's pool if eligible, else the one with the most free capacity."""
        if tenant is not None:
            pid = self._tenant_pools.get(tenant)
            if pid is not None:
                index = snap.pool_index.get(pid, -1)
                if index >= 0 and index in snap.kernel.pools_for(src_id, tgt_id):
                    return index
        return snap.kernel.most_free_pool(src_id, tgt_id, mask, need, now, excl)

    def _no_node_error(self, s: str, t: str, reasons: Mapping[int, str]) -> NoNodeAvailable:
        """The :class:`NoNodeAvailable` for these per-node reasons (and count the outcome)."""
        breakdown, best = _best_reason(reasons)
        self._outcomes.add(_REASON_INDEX.get(best, _OUT_NO_NODES))
        return NoNodeAvailable(s, t, breakdown, best)

    def _node_reasons(self, snap: RuntimeSnapshot, src_id: int, tgt_id: int, mask: int, need: int, now: float,
                      excl: tuple[int, ...], refused: Mapping[int, str]) -> dict[int, str]:
        """slot -> reason code over every distinct node of every eligible pool."""
        kernel = snap.kernel
        out: dict[int, str] = {}
        for pool in kernel.pools_for(src_id, tgt_id):
            codes = kernel.reasons(pool, mask, need, now, excl)
            for slot, code in zip(kernel.members(pool), codes):
                if slot not in out:
                    out[slot] = refused.get(slot) or REASONS[code]
        return out

    # ------------------------------------------------------------ inspection
    def explain(
        self,
        src: str,
        tgt: str,
        *,
        exclude: Iterable[str] | None = None,
        tenant: str | None = None,
        services: Iterable[str] = DEFAULT_SERVICES,
        require_gpu: bool = True,
        prefer: str | Iterable[str] | None = None,
    ) -> Explanation:
        """Eligible pools for the pair, and each candidate node's reason code, as a dispatch now would see them.

        Reservations and leases that have expired by now count as gone, as
        they do for dispatch. Draws no random numbers: explaining never
        changes a later decision.
        """
        snap = self._mgmt.snapshot
        s = normalize_language(src, "src", allow_auto=True)
        t = normalize_language(tgt, "tgt")
        if tenant is not None:
            _check_str(tenant, "tenant")
        if type(require_gpu) is not bool:
            raise TypeError(f"require_gpu must be a bool, got {type(require_gpu).__name__}: {require_gpu!r}")
        mask, need = self._required(services)
        need |= (NEED_GPU if require_gpu else 0) | (NEED_PUBLIC if tenant is None else 0)
        excl = self._exclude_slots(snap, exclude)
        pref = () if prefer is None else self._prefer_slots(snap, prefer)
        now = self._clock()
        reservations = self._reservations
        if now >= reservations.due_at:
            reservations.expire_due(now)
        nodes: dict[str, str] = {}
        preferred: dict[str, str] = {}
        ids = snap.index.kernel_ids(s, t)
        if ids is not None:
            reasons = self._node_reasons(snap, ids[0], ids[1], mask, need, now, excl, {})
            nodes = {snap.node_id(slot): reason for slot, reason in reasons.items()}
            if pref:
                tenant_index = snap.pool_index.get(self._tenant_pools.get(tenant, -1), -1) if tenant else -1
                best = self._best_for_new_session(snap, ids[0], ids[1], tenant_index, mask, need, now, excl)
                verdicts = self._prefer_verdicts(snap, pref, best, ids[0], ids[1], -1, mask, need, now, excl)
                preferred = {snap.node_id(slot): verdict for slot, (verdict, _) in verdicts.items()}
        if prefer is not None:
            named = (prefer,) if type(prefer) is str else tuple(prefer)
            for node_id in named:
                if node_id in preferred and preferred[node_id] == "ok":
                    break
                preferred.setdefault(node_id, "unknown" if snap.slot(node_id) is None else "not_in_pool")
            preferred = {n: preferred[n] for n in named if n in preferred}
        for node_id, langs in snap.unpooled:
            if t in langs and (s == AUTO or s in langs):
                nodes.setdefault(node_id, "no_pool")
        return Explanation(s, t, snap.index.lookup(s, t), nodes, tuple(n for n, _ in snap.unpooled), preferred)

    def _best_for_new_session(self, snap: RuntimeSnapshot, src_id: int, tgt_id: int, tenant_index: int, mask: int,
                              need: int, now: float, excl: tuple[int, ...]) -> int | None:
        """A best candidate a new session's dispatch would pick (ties aside), without drawing randomness."""
        kernel = snap.kernel
        pools = kernel.pools_for(src_id, tgt_id)
        first = tenant_index if tenant_index in pools else kernel.most_free_pool(src_id, tgt_id, mask, need, now, excl)
        for pool in ([first] if first >= 0 else []) + [p for p in pools if p != first]:
            ok = [slot for slot, code in zip(kernel.members(pool), kernel.reasons(pool, mask, need, now, excl))
                  if code == 0]
            if ok:
                inflight, running, mx = snap.inflight, snap.loads["running"], snap.nodes["max_concurrency"]
                return min(ok, key=lambda x: (max(int(inflight[x]), int(running[x])) / int(mx[x]),
                                              float(snap.loads["gpu"][x])))
        return None

    def stats(self) -> dict:
        """The figures a dashboard wants, from local state only.

        Nodes by status, pools with member counts, capacity (sum of max
        concurrency) and in-flight reservations, unpooled nodes, sessions,
        snapshot version, jobs held (``reservations``; ``jobs``: held,
        committed, expired so far), dispatch outcomes by reason, and
        ``backend``: the reservation backend's own figures, with
        ``available``/``error`` saying whether it answered its last call.
        Never raises because a backend (Redis) is down, and makes no network
        call per metric.
        """
        now = self._clock()
        self.forget_offline_nodes()
        try:
            if now >= self._reservations.due_at:
                self._reservations.expire_due(now)
        except ReservationBackendUnavailable:
            pass  # reported through the backend's figures below
        out = self._mgmt.stats()
        snap = self._mgmt.snapshot
        offsets, members = snap.pool_offsets, snap.pool_members
        limits, inflight = snap.nodes["max_concurrency"], snap.inflight
        for i, pid in enumerate(snap.pool_ids):
            entry = out["pools"].get(pid)
            if entry is not None:
                slots = members[offsets[i]:offsets[i + 1]]
                entry["capacity"] = int(limits[slots].sum())
                entry["inflight"] = int(inflight[slots].sum())
        backend = dict(self._reservations.stats())
        values = self._outcomes.to_list()
        out["sessions"] = len(self._sessions)
        out["reservations"] = backend.get("held", 0)
        out["jobs"] = {k: backend.get(k, 0) for k in ("held", "committed", "expired")}
        out["backend"] = backend
        out["dispatch"] = {name: values[i] for i, name in sorted(_OUTCOME_NAMES.items())}
        out["compiled"] = self._core.COMPILED
        return out

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _check_tenant_pools(tenant_pools: object) -> dict[str, int]:
        if tenant_pools is None:
            return {}
        if not isinstance(tenant_pools, Mapping):
            raise TypeError(f"tenant_pools must be a mapping tenant -> pool id, got {type(tenant_pools).__name__}")
        out = {}
        for tenant, pid in tenant_pools.items():
            _check_str(tenant, "tenant_pools key")
            if type(pid) is not int or pid < 0:
                raise ValueError(f"tenant_pools[{tenant!r}] must be a pool id (int >= 0), got {pid!r}")
            out[tenant] = pid
        return out

    def close(self) -> None:
        """Release the reservation backend's resources."""
        self._reservations.close()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

