"""The public facade: :class:`Scheduler`.

Dispatch follows the design's ten steps and takes no management lock:

1. read the published snapshot (one attribute read);
2. take the session's own lock;
3. decide the language pair and the preferred pool (with steps 5-7 for the
   first candidate), and record that pool as the binding;
4. release it (no I/O happens under it);
5. look the pair up in the language index;
6. take the candidates from the pool members in the snapshot;
7. filter and score them in the compiled kernel;
8. reserve the best candidate;
9. if that fails, reserve the next candidate, then try the next eligible pool;
10. bind the session to the pool that served it, if step 3 recorded another
    (a call that places nothing takes step 3's binding back).

With the in-process reservations the common job does all ten in one call
into the compiled ``Dispatcher`` (``_dispatch.pxi``), installed as the
instance's ``dispatch``; :meth:`Scheduler._place` is the same rules in
Python, for everything else. Around the facade: :mod:`pysched.results`
(what it answers), :mod:`pysched._validate` (argument checks),
:mod:`pysched._batch` (``dispatch_many`` passes, ``dispatch_batch``
reasons), :mod:`pysched._outcomes` (outcome counters, why no node),
:mod:`pysched._impl` (which kernel).

Lock order, always: snapshot read -> session lock -> reservation. The
management layer (registration, heartbeats, pools) never touches sessions.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pysched import _batch
from pysched._holding import Holds, await_unheld
from pysched._impl import resolve
from pysched._layout import NEED_GPU, NEED_PUBLIC, NEED_UNKNOWN_SERVICE, REASONS
from pysched._outcomes import (
    OUTCOME_BACKEND_UNAVAILABLE,
    OUTCOME_NO_POOL,
    OUTCOME_OK,
    no_node_error,
    node_reasons,
    outcome_counts,
)
from pysched._validate import (
    check_bool,
    check_callable,
    check_in_range,
    check_positive,
    check_positive_int,
    check_seed,
    check_str,
    check_tenant_pools,
    exclude_slots,
    handle_array,
    prefer_slots,
)
from pysched.errors import (
    NoPoolForLanguagePair,
    ReservationBackendUnavailable,
    SchedulerError,
    UnknownJob,
    WrongNode,
)
from pysched.languages import AUTO, DEFAULT_SERVICES, normalize_language, normalize_languages, normalize_services
from pysched.languages import _language_cache as _LANGUAGE_CACHE
from pysched.management import ManagementRegistry
from pysched.pools import PoolConfig, PoolInfo
from pysched.reservations import LocalReservations, Reservation, ReservationBackend
from pysched.results import BATCH_REASONS, Assignment, BatchResult, DispatchRequest, Explanation, Request
from pysched.sessions import SessionManager, SessionState
from pysched.snapshot import RuntimeSnapshot

if TYPE_CHECKING:
    from types import ModuleType

    from pysched._core import Counters, Dispatcher, Rng, SnapshotKernel

# The result types are importable from here too (``from pysched.scheduler import Assignment``).
__all__ = ["BATCH_REASONS", "Assignment", "BatchResult", "DispatchRequest", "Explanation", "Scheduler"]

#: the need bits of a public job that requires a GPU (the common request)
_NEED_PUBLIC_GPU = NEED_GPU | NEED_PUBLIC

#: a listener of node and job events: ``listener(event, node_id, fields)``
Listener = Callable[[str, str, dict[str, Any]], None]

#: a kernel's selection: ``(slot, node_id, max_concurrency, running, pool_index)``
Found = tuple[int, str, int, int, int]


class Scheduler:
    """Decides which worker node runs each job.

    :param pools: ``"auto"`` (one pool per distinct node language set) or a
        sequence of :class:`PoolConfig` (manual pools).
    :param heartbeat_timeout: seconds without a heartbeat after which a node is offline.
    :param reservation_ttl: seconds an uncommitted reservation holds capacity.
    :param resource_threshold: cpu/gpu/mem percentage at which a node is overloaded.
    :param max_pools: the most pools auto mode creates (and manual mode accepts).
    :param session_ttl: seconds after which an idle session is forgotten.
    :param tenant_pools: tenant -> pool id that a new session of that tenant prefers.
    :param clock: monotonic time source in seconds (inject one in tests).
    :param seed: seed of the random tie-break; the same seed and calls give the same decisions.
    :param reservations: a :class:`ReservationBackend`; in-process
        :class:`LocalReservations` by default.
    :param kernel: ``"auto"`` (the compiled kernel unless ``PYSCHED_PURE_PYTHON``
        is set), ``"compiled"``, or ``"python"`` (the pure-Python twin,
        for comparison and debugging).
    :param commit_lease: seconds a committed job holds its node's capacity
        without a :meth:`release` or :meth:`renew`; then it expires (event
        ``"job_expired"``), so a lost release cannot hold capacity forever.
    :param forget_after: seconds after which an offline node that holds nothing
        is removed (event ``"forget"``); ``None`` never forgets.
    :param prefer_slack: how much higher (as a fraction of max concurrency) a
        preferred node's effective load may be than the best candidate's
        for ``dispatch(..., prefer=)`` to still choose it.
    :raises TypeError: for an argument of the wrong type.
    :raises ValueError: for an argument out of range, or an unknown ``kernel``.
    """

    def __init__(  # noqa: PLR0917  the public signature: these have been positional since the first release
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
        heartbeat_timeout = check_positive(heartbeat_timeout, "heartbeat_timeout")
        reservation_ttl = check_positive(reservation_ttl, "reservation_ttl")
        session_ttl = check_positive(session_ttl, "session_ttl")
        commit_lease = check_positive(commit_lease, "commit_lease")
        if forget_after is not None:
            forget_after = check_positive(forget_after, "forget_after")
        prefer_slack = check_in_range(prefer_slack, "prefer_slack", 0, 1)
        resource_threshold = check_in_range(resource_threshold, "resource_threshold", 0, 100, low_open=True)
        max_pools = check_positive_int(max_pools, "max_pools")
        check_callable(clock, "clock")
        self._tenant_pools = check_tenant_pools(tenant_pools)
        seed = check_seed(seed)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        #: the kernel module (``pysched._core`` or ``pysched._pycore``) this scheduler runs on
        self._kernel: ModuleType = resolve(kernel)
        if reservations is None:
            reservations = LocalReservations(core=self._kernel)
        elif not isinstance(reservations, ReservationBackend):
            raise TypeError(f"reservations must be a ReservationBackend, got {type(reservations).__name__}")
        reservations.configure(reservation_ttl, clock, commit_lease=commit_lease, on_expired=self._jobs_expired)

        self.heartbeat_timeout = heartbeat_timeout
        self.reservation_ttl = reservation_ttl
        self.resource_threshold = resource_threshold
        self.max_pools = max_pools
        self.session_ttl = session_ttl
        self.commit_lease = commit_lease
        self.forget_after = forget_after
        self.prefer_slack = prefer_slack
        self.seed = seed
        self._clock = clock
        self._reservations = reservations
        # (Attributes are few on purpose: CPython 3.11 keeps an instance's attributes in its fast
        # layout only while it has at most 29, and the Python path reads many. A test counts them.)
        rng: Rng = self._kernel.Rng(seed)
        self._outcomes: Counters = self._kernel.Counters()
        self._mgmt = ManagementRegistry(
            pools=pools,
            heartbeat_timeout=heartbeat_timeout,
            resource_threshold=resource_threshold,
            max_pools=max_pools,
            clock=clock,
            rng=rng,
            reservations=reservations,
            core=self._kernel,
            forget_after=forget_after,
        )
        self._sessions = SessionManager(session_ttl, clock, core=self._kernel)
        self._session_map = self._sessions.entries  # read-only fast path for dispatch
        # Job ids must not collide between processes sharing a Redis namespace,
        # even with the same seed: the process id is part of the prefix.
        self._job_prefix = f"{random.Random(seed).getrandbits(32):08x}{os.getpid():x}-"
        self._mask_cache: dict[object, int] = {}
        self._default_mask: int | None = None  # set once every default service is known
        self._shortlist = max(1, int(getattr(reservations, "shortlist", 1)))
        self._listeners: list[Listener] = []
        self._fast: Dispatcher | None = None
        #: the in-process reservations when the compiled calls own them (job handles need them)
        self._local: LocalReservations | None = None
        self._new_job_id: Callable[[], str]
        # The common dispatch, release and commit in one compiled call each,
        # when the reservations are the plain in-process table (a subclass may
        # change what reserving means, and Redis decides remotely).
        if type(reservations) is LocalReservations and isinstance(reservations._table, self._kernel.JobTable):
            self._connect_compiled(reservations)
        else:
            seq = itertools.count(1)
            prefix = self._job_prefix
            self._new_job_id = lambda: f"{prefix}{next(seq)}"
        #: how a batch holds its sessions, and how a decision waits for such a hold (pysched._holding)
        fast = self._fast
        self._holds: Holds[SessionState] = Holds(
            self._session_map, self._kernel.SessionState, await_unheld if fast is None else fast.await_session,
            None if fast is None else fast.try_hold, None if fast is None else fast.let_go,
        )

    def _connect_compiled(self, reservations: LocalReservations) -> None:
        """Route dispatch, release and commit of the common job through the compiled ``Dispatcher``."""
        fast = self._fast = self._kernel.Dispatcher(
            self._mgmt, reservations._table, self._outcomes, self._session_map, _LANGUAGE_CACHE, self._clock,
            self._job_prefix, reservations._ttl, self.session_ttl, reservations.commit_lease,
        )
        self._local = reservations
        fast.next_sweep = self._sessions.next_sweep
        self._sessions.on_next_sweep = self._set_next_sweep
        self._sessions.on_forget = fast.forget_session  # a dropped session leaves the compiled calls' index
        self._mgmt.on_publish = fast.publish
        fast.publish(self._mgmt.snapshot)
        fast.connect(self, DEFAULT_SERVICES)
        # The public entry points become the compiled ones on this instance
        # (same signatures and rules; they call _*_slow for what they don't
        # finish), saving the Python frame of the methods below per call.
        # A subclass that overrides one keeps its own.
        cls = type(self)
        if cls.dispatch is Scheduler.dispatch:
            self.dispatch = fast.call  # type: ignore[method-assign]  # the same signature, compiled
        if cls.release is Scheduler.release:
            self.release = fast.call_release  # type: ignore[method-assign]  # the same signature, compiled
        if cls.commit is Scheduler.commit:
            self.commit = fast.call_commit  # type: ignore[method-assign]  # the same signature, compiled
        self._new_job_id = fast.new_job_id

    # ------------------------------------------------------------ properties
    @property
    def snapshot(self) -> RuntimeSnapshot:
        """The current immutable :class:`RuntimeSnapshot`."""
        return self._mgmt.snapshot

    @property
    def reservations(self) -> ReservationBackend:
        """The reservation backend: the final word on capacity."""
        return self._reservations

    @property
    def compiled(self) -> bool:
        """True when the compiled kernel (not the pure-Python twin) is in use."""
        compiled: bool = self._kernel.COMPILED
        return compiled

    # ------------------------------------------------------------ listeners
    def add_listener(self, listener: Listener) -> None:
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

        :raises TypeError: if ``listener`` is not callable.
        """
        check_callable(listener, "listener")
        self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling a listener added with :meth:`add_listener`."""
        # ==, not is: a bound method is a new object at every attribute access
        self._listeners = [x for x in self._listeners if x != listener]

    def _notify(self, event: str, node_id: str, fields: dict[str, Any]) -> None:
        for listener in self._listeners:
            listener(event, node_id, fields)

    def set_pool_id_allocator(self, allocator: Callable[[frozenset[str]], int] | None) -> None:
        """Auto mode: have ``allocator(language_set)`` pick each new pool id.

        Several processes sharing a fleet install one backed by shared
        storage so the same language set gets the same id everywhere. It is
        called under the management lock, once per new language set; its
        ids must be unique and are kept for life.

        :raises TypeError: if ``allocator`` is neither callable nor ``None``.
        """
        if allocator is not None and not callable(allocator):
            raise TypeError(f"allocator must be callable or None, got {allocator!r}")
        self._mgmt.pool_id_allocator = allocator

    # ------------------------------------------------------------ management
    def register_node(  # noqa: PLR0917  the public signature: these have been positional since the first release
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
        exactly the pools the rules give it.

        :raises UnknownNode: if the node is not registered.
        """
        if self._mgmt.heartbeat(node_id, running, cpu, gpu, mem, services, languages, healthy, max_concurrency):
            self.forget_offline_nodes()  # some node could be due
        if self._listeners:
            fields: dict[str, Any] = {
                k: v for k, v in (("running", running), ("cpu", cpu), ("gpu", gpu), ("mem", mem),
                                  ("healthy", healthy), ("max_concurrency", max_concurrency))
                if v is not None
            }
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
        once more.

        :raises UnknownNode: if the node is not registered.
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

    def node(self, node_id: str) -> dict[str, Any]:
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
    def _held_error(self, job_id: str | int, node_id: str | None) -> UnknownJob:
        """Why a commit or renew was refused: unknown, or held on another node."""
        if node_id is not None and type(job_id) is str:  # a handle names no job the backend can look up
            held = self._reservations.get(job_id)
            if held is not None and held.node_id != node_id:
                return WrongNode(job_id, node_id, held.node_id)
        return UnknownJob(job_id)

    def commit(self, job_id: str, *, node_id: str | None = None) -> None:
        """The node accepted the job: it now holds capacity until released or its lease ends.

        The lease is ``commit_lease`` seconds (renew it with :meth:`renew`).
        Nothing changes when it raises.

        :param job_id: the job's id (or a :meth:`dispatch_batch` handle).
        :param node_id: the node reporting; a job held on another node is refused.
        :raises UnknownJob: if the job holds no reservation.
        :raises WrongNode: with ``node_id``, if the job is held on another node.
        """
        if node_id is None and self._fast is not None:
            done = self._fast.commit(job_id)
            if done is not None:
                if not done:
                    raise UnknownJob(job_id)
                return
        self._commit_slow(job_id, node_id=node_id)

    def _commit_slow(self, job_id: str | int, *, node_id: str | None = None) -> None:
        """:meth:`commit` in Python: every case the compiled call does not finish itself."""
        if type(job_id) is int and self._local is not None:  # a dispatch_batch handle
            if node_id is not None:
                check_str(node_id, "node_id")
            if not self._local.commit_handle(job_id, node_id):
                raise self._held_error(job_id, node_id)
            return
        job_id = check_str(job_id, "job_id")
        if node_id is not None:
            check_str(node_id, "node_id")
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
        """:meth:`release` in Python: every case the compiled call does not finish itself."""
        if type(job_id) is int and self._local is not None:  # a dispatch_batch handle
            if node_id is not None:
                check_str(node_id, "node_id")
            return self._local.release_handle(job_id, node_id)
        job_id = check_str(job_id, "job_id")
        if node_id is not None:
            check_str(node_id, "node_id")
        return self._reservations.release(job_id, node_id)

    def renew(self, job_id: str, *, lease: float | None = None, node_id: str | None = None) -> None:
        """Extend a job's hold: it now expires ``lease`` seconds from now.

        The default ``lease`` is ``commit_lease`` for a committed job and
        ``reservation_ttl`` for an uncommitted one. Long jobs renew before
        their lease ends. Nothing changes when it raises.

        :raises UnknownJob: if the job holds nothing.
        :raises WrongNode: with ``node_id``, if the job is held on another node.
        """
        check_str(job_id, "job_id")
        if lease is not None:
            lease = check_positive(lease, "lease")
        if node_id is not None:
            check_str(node_id, "node_id")
        if not self._reservations.renew(job_id, lease, node_id):
            raise self._held_error(job_id, node_id)

    def _set_next_sweep(self, when: float) -> None:
        """The session manager's ``on_next_sweep``: the compiled dispatch reads the time itself."""
        if self._fast is not None:
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
        if hashable and len(self._mask_cache) < 1024:  # noqa: PLR2004  a bound, not a rule
            # bits are never reassigned, so a known mask stays valid for life
            self._mask_cache[services] = mask
            if services is DEFAULT_SERVICES:
                self._default_mask = mask
                if self._fast is not None:
                    self._fast.default_mask = mask
        return mask, 0

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
        the best candidate's; otherwise the job is placed normally. A failed
        call changes nothing.

        :raises NoPoolForLanguagePair: if no pool serves the pair.
        :raises NoNodeAvailable: if no node of those pools can take the job now.
        :raises ReservationBackendUnavailable: if the backend cannot be reached.
        :raises ValueError: for a bad argument value (or a retry of another job).
        :raises TypeError: for an argument of the wrong type.
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
                    return done  # type: ignore[return-value]  # an Assignment: the tuple case raised above
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
        pref = () if prefer is None else prefer_slots(snap, prefer)
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
            self._outcomes.add(OUTCOME_NO_POOL)
            return NoPoolForLanguagePair(s, t)
        mask = self._default_mask
        # the compiled dispatch only handles the common job once the default mask is known
        assert mask is not None
        reasons = node_reasons(snap.kernel, ids[0], ids[1], mask, _NEED_PUBLIC_GPU, now)
        return no_node_error(self._outcomes, s, t, reasons)

    def _prepare(  # noqa: PLR0917  runs per job: positional arguments are the cheapest call
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
            check_str(session_id, "session_id")
        s = _LANGUAGE_CACHE.get(src) if type(src) is str else None
        if s is None:
            s = normalize_language(src, "src", allow_auto=True)
        t = _LANGUAGE_CACHE.get(tgt) if type(tgt) is str else None
        if t is None or t == AUTO:
            t = normalize_language(tgt, "tgt")
        if tenant is not None:
            check_str(tenant, "tenant")
        if type(require_gpu) is not bool:
            check_bool(require_gpu, "require_gpu")
        default_mask = self._default_mask
        if services is DEFAULT_SERVICES and default_mask is not None:
            mask, need = default_mask, 0
        else:
            mask, need = self._required(services)
        if require_gpu:
            need |= NEED_GPU
        if tenant is None:
            need |= NEED_PUBLIC
        excl = () if exclude is None else exclude_slots(snap, exclude)
        if job_id is not None:
            job_id = check_str(job_id, "job_id")
            held = self._reservations.get(job_id)
            if held is not None:
                return s, t, self._held_assignment(held, job_id, session_id, s, t), 0, 0, ()
        return s, t, None, mask, need, excl

    @staticmethod
    def _held_assignment(held: Reservation, job_id: str, session_id: object, s: str, t: str) -> Assignment:
        """The assignment ``held``, the reservation of ``job_id``, makes; a retry for another job is refused."""
        if held.session_id != session_id or (held.src is not None and (held.src, held.tgt) != (s, t)):
            held_pair = "" if held.src is None else f" for {held.src!r} -> {held.tgt!r}"
            raise ValueError(
                f"job_id {held.job_id!r} is held by session {held.session_id!r}{held_pair}: a retry must repeat "
                f"the held job's session and language pair, got session {session_id!r}, {s!r} -> {t!r}"
            )
        return Assignment(held.node_id, held.pool_id, job_id, held.session_id, s, t)

    def _place(  # noqa: PLR0912, PLR0915, PLR0917  steps 2-10 in one frame: this runs per job
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
        """Steps 2-10 of a validated job: session binding, selection, reservation, binding.

        :param snap: the snapshot read in step 1.
        :param session_id: the job's session.
        :param s: the normalised source code.
        :param t: the normalised target code.
        :param job_id: the caller's job id, or ``None`` to number the job once a node is found.
        :param excl: the slots the job excludes.
        :param tenant: the job's tenant, or ``None`` for a public job.
        :param mask: the job's required-service bits.
        :param need: the job's need bits.
        :param now: the scheduler's clock reading.
        :param prefer: the slots of the preferred nodes, in order.
        """
        pair = (s, t)
        ids = snap.index.pair_ids(pair)
        if ids is None:
            self._outcomes.add(OUTCOME_NO_POOL)
            raise NoPoolForLanguagePair(s, t)
        src_id, tgt_id = ids
        kernel: SnapshotKernel = snap.kernel

        reservations = self._reservations
        if now >= reservations.due_at:
            reservations.expire_due(now)  # before the session's lock: a listener told of expiries may dispatch

        # Steps 2-4 and the first selection, under the session's own lock: the binding is read, the pool
        # chosen and written at once (tentatively: step 10 moves it if the reservation lands elsewhere), so
        # the session's next job, in whichever thread, sees this decision instead of making its own. Nothing
        # in here does I/O (the reservation, a Redis round trip in Redis mode, comes after). ``deciding``
        # tells the one-call dispatch, which takes no lock, to hand the session's job to this path (and so
        # wait for the lock) meanwhile, and a batch to leave the session alone; a batch's pass that holds the
        # session already writes its binding back first (await_session). A session this call creates and
        # does not bind is dropped again, and a tentative binding is undone if the call fails: a failed call
        # leaves the session as it was.
        sessions, session_map, await_session = self._sessions, self._session_map, self._holds.await_unheld
        session = session_map.get(session_id)
        created = False
        while True:
            if session is None:
                session, created = sessions.claim(session_id, now)
            lock = session.lock
            lock.acquire()
            session.deciding = True
            try:
                await_session(session)
                current = session_map.get(session_id) is session
            except BaseException:
                session.deciding = False
                lock.release()
                if created:
                    self._undo_binding(session_id, session, None, None, created)
                raise
            if current:
                break
            session.deciding = False
            lock.release()  # closed or swept while this call waited (for the lock or a batch): look again
            session, created = None, False
        binding = tentative = None
        try:
            try:
                binding = session.binding
                if session.last_used < now - self.session_ttl:
                    # idle past its TTL: forgotten at lookup, even before a sweep removes it
                    binding = session.binding = None
                session.last_used = now
                bound_id = None  # the pool id the session is bound to for this pair
                if binding is not None and binding[0] == pair:
                    bound_id = binding[1]
                bound_index = -1 if bound_id is None else snap.pool_index.get(bound_id, -1)
                tenant_index = -1
                if tenant is not None:
                    tenant_pool_id = self._tenant_pools.get(tenant)
                    if tenant_pool_id is not None:
                        tenant_index = snap.pool_index.get(tenant_pool_id, -1)
                first: Found | int | None = kernel.select_candidate(src_id, tgt_id, bound_index, mask, need, now, excl,
                                                                    tenant_index)
                if type(first) is tuple:
                    if prefer:
                        first = self._preferred(snap, first, prefer, src_id, tgt_id, bound_index, mask, need, now,
                                                excl)
                    if snap.pool_ids[first[4]] != bound_id:
                        tentative = session.binding = (pair, snap.pool_ids[first[4]])
            finally:
                session.deciding = False
                lock.release()

            # Steps 5-9: the selection, then the reservation decides.
            supplied = job_id is not None
            refused: dict[int, str] = {}  # slot -> the backend's refusal, for the breakdown
            shortlist = self._shortlist
            retries = 0
            while True:
                if first is not None:
                    found, first = first, None  # made (and preferences applied) under the session's lock
                else:
                    found = kernel.select_candidate(src_id, tgt_id, bound_index, mask, need, now, excl,
                                                    tenant_index)
                    if prefer and type(found) is tuple:
                        found = self._preferred(snap, found, prefer, src_id, tgt_id, bound_index, mask, need,
                                                now, excl)
                if type(found) is not tuple:  # -1: no eligible node, -2: no pool serves the pair
                    if supplied and job_id is not None:
                        # A concurrent retry of the same job may have taken the last
                        # slot since the caller's check: answer with its assignment.
                        existing = reservations.get(job_id)
                        if existing is not None:
                            self._undo_binding(session_id, session, tentative, binding, created)
                            return self._held_assignment(existing, job_id, session_id, s, t)
                    if found == -2:  # noqa: PLR2004  the kernel's "no pool serves the pair"
                        self._outcomes.add(OUTCOME_NO_POOL)
                        raise NoPoolForLanguagePair(s, t)
                    reasons = node_reasons(kernel, src_id, tgt_id, mask, need, now, excl=excl, refused=refused)
                    if "ok" in reasons.values() and retries < 3:  # noqa: PLR2004  a bound, not a rule
                        # capacity came back between the scan and now: look again
                        retries += 1
                        continue
                    raise no_node_error(self._outcomes, s, t, reasons)
                if job_id is None:
                    job_id = self._new_job_id()  # numbered once a node is found, as the compiled path does
                pool_index = found[4]
                pool_id = snap.pool_ids[pool_index]
                try:
                    # one variable for both answers: every local slot costs each call a little
                    result: Reservation | str | list[str] | None
                    if shortlist == 1:
                        result = reservations.reserve_one(job_id, found, pool_id, session_id, now, pair)
                        if result is None:
                            node_id = found[1]
                            break
                        if isinstance(result, str):
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
                            for cand, reason in zip(candidates, result, strict=False):
                                refused[cand[0]] = reason
                            excl = excl + tuple(c[0] for c in candidates)
                            prefer = tuple(p for p in prefer if p not in excl)
                            continue
                except ReservationBackendUnavailable:
                    self._outcomes.add(OUTCOME_BACKEND_UNAVAILABLE)
                    raise
                # a Reservation: fresh from the backend, or the one job_id already held
                if supplied and result.session_id != session_id:
                    self._undo_binding(session_id, session, tentative, binding, created)
                    return self._held_assignment(result, job_id, session_id, s, t)
                node_id, pool_id = result.node_id, result.pool_id
                break

        except BaseException:
            self._undo_binding(session_id, session, tentative, binding, created)
            raise

        # Step 10: bind the session to the pool that served it (unless step 4 did): decided as step 4's.
        if pool_id != (bound_id if tentative is None else tentative[1]):
            with lock:
                session.deciding = True
                try:
                    await_session(session)
                    session.binding = (pair, pool_id)
                finally:
                    session.deciding = False
        if now >= sessions.next_sweep:
            sessions.maybe_sweep(now)
        self._outcomes.add(OUTCOME_OK)
        return Assignment(node_id, pool_id, job_id, session_id, s, t)

    def _undo_binding(self, session_id: str, session: SessionState, tentative: tuple[tuple[str, str], int] | None,
                      before: tuple[tuple[str, str], int] | None, created: bool) -> None:
        """Take back what a call that placed no job wrote.

        Its tentative binding, if still the session's, and the session
        itself if this call created it and it is still unbound.
        """
        with session.lock:
            session.deciding = True  # the one-call dispatch and batches wait: they see the session before or after
            try:
                self._holds.await_unheld(session)
                if tentative is not None and session.binding is tentative:
                    session.binding = before
                if created and session.binding is None:
                    self._sessions.discard(session_id, session)
            finally:
                session.deciding = False

    def _preferred(self, snap: RuntimeSnapshot, found: Found, prefer: tuple[int, ...], src_id: int,  # noqa: PLR0917
                   tgt_id: int, bound_index: int, mask: int, need: int, now: float,
                   excl: tuple[int, ...]) -> Found:
        """The candidate to reserve when the caller prefers some nodes.

        The first preferred node that is eligible for this job in a pool
        serving the pair, with an effective load ratio at most
        ``prefer_slack`` above the kernel's best candidate (``found``), wins;
        its pool is the session's bound pool when the node is a member, else
        the first serving pool (index order) that has it. Otherwise ``found``.
        """
        verdicts = self._prefer_verdicts(snap, prefer, found[0], src_id, tgt_id, bound_index, mask, need, now, excl)
        for slot, (verdict, pool_index) in verdicts.items():
            if verdict == "ok":
                kernel: SnapshotKernel = snap.kernel
                return (*kernel.candidate(slot), pool_index)
        return found

    def _prefer_verdicts(self, snap: RuntimeSnapshot, prefer: tuple[int, ...], best: int | None,  # noqa: PLR0917
                         src_id: int, tgt_id: int, bound_index: int, mask: int, need: int, now: float,
                         excl: tuple[int, ...]) -> dict[int, tuple[str, int]]:
        """Slot -> ``(verdict, pool index)`` for each preferred node, up to the first ``"ok"``.

        A verdict is ``"ok"``, the node's reason code, ``"not_in_pool"`` (no
        pool serving the pair has it) or ``"load"`` (eligible, but loaded
        beyond ``prefer_slack`` over the best candidate ``best``).
        """
        kernel: SnapshotKernel = snap.kernel
        serving = kernel.pools_for(src_id, tgt_id)
        order = ([bound_index] if bound_index in serving else []) + [p for p in serving if p != bound_index]
        inflight, loads, recs = snap.inflight, snap.loads, snap.nodes

        def ratio(slot: int) -> float:
            eff = max(int(inflight[slot]), int(loads["running"][slot]))
            return eff / int(recs["max_concurrency"][slot])

        best_ratio = None if best is None else ratio(best)
        out: dict[int, tuple[str, int]] = {}
        for slot in prefer:
            pool_index = next((p for p in order if kernel.is_member(p, slot)), -1)
            if pool_index < 0:
                out[slot] = ("not_in_pool", -1)
                continue
            reason = REASONS[kernel.reason(slot, mask, need, now, excl)]
            if reason != "ok":
                out[slot] = (reason, pool_index)
            elif best_ratio is not None and ratio(slot) > best_ratio + self.prefer_slack:
                out[slot] = ("load", pool_index)
            else:
                out[slot] = ("ok", pool_index)
                break
        return out

    def dispatch_many(self, requests: Iterable[Request]) -> list[Assignment | Exception]:
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
        thread meanwhile) falls back to :meth:`dispatch`. Each pass holds
        its sessions (:mod:`pysched._holding`) from reading their bindings
        until it has written them back, before it reserves: any other call
        deciding one of those bindings comes before or after, never between.
        The passes are :mod:`pysched._batch`.
        """
        return _batch.dispatch_many(self, requests)

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
        an integer handle. The jobs are placed in passes of up to 2,048, each
        without the GIL (unless another call into this scheduler's
        reservations is under way, then holding it); either way no other
        reservation change overlaps a pass: they wait for it. A pass reads
        the sessions the compiled calls know itself; one that needs Python
        (new, past its TTL, or bound in an earlier snapshot) is read holding
        the GIL before a pass, which then ends at the next such job. Between
        two passes the batch holds the GIL to bind the sessions of one; other
        calls may run there, as they could between two of the equivalent
        :meth:`dispatch` calls. A pass holds each of its sessions from
        reading its binding until it has bound it, or, when the pass keeps
        the binding, until the pass ends (``SessionState.held``):
        another call deciding that binding waits for it, and a pass meeting
        a session another call is deciding ends before that job (the next
        one waits for the decision). Batches on different schedulers run in
        parallel.
        The scheduler keeps its copy of ``session_ids`` (and the batch's
        pairs) while any of the batch's jobs is held, for each job's
        session id and pair: one list for the batch instead of one entry
        per job.

        :raises ValueError: for a bad value, naming the job; nothing changes.
        :raises TypeError: for a wrong type, or with any backend but the
            in-process :class:`LocalReservations`.
        """
        fast = self._fast
        if fast is None:
            raise TypeError("dispatch_batch needs the in-process LocalReservations backend; "
                            "use dispatch_many with other backends")
        sids = session_ids.tolist() if isinstance(session_ids, np.ndarray) else list(session_ids)
        srcs = src if type(src) is str else (src.tolist() if isinstance(src, np.ndarray) else list(src))
        tgts = tgt if type(tgt) is str else (tgt.tolist() if isinstance(tgt, np.ndarray) else list(tgt))
        if tenant is not None:
            check_str(tenant, "tenant")
        check_bool(require_gpu, "require_gpu")
        mask, need = self._required(services)
        need |= (NEED_GPU if require_gpu else 0) | (NEED_PUBLIC if tenant is None else 0)
        snap = self._mgmt.snapshot
        # the dispatcher finds the tenant's pool in the snapshot it places with (a publication may come first)
        tenant_pool = None if tenant is None else self._tenant_pools.get(tenant)
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
        fast.batch(sids, srcs, tgts, mask, need, tenant_pool, now, slot, pool_id, handle, keys)
        reason = np.zeros(n, dtype=np.uint8)
        failed = np.flatnonzero(slot < 0)
        if len(failed):
            # the reasons are the nodes' as they are after the batch
            reason[failed] = _batch.batch_failures(self._mgmt.snapshot, self._outcomes, keys[failed], mask, need, now)
        return BatchResult(slot, pool_id, handle, reason, snap._node_ids)

    def release_batch(self, handles: Sequence[int] | np.ndarray) -> int:
        """Release the jobs of these :meth:`dispatch_batch` handles; how many held something."""
        return self._handles_backend().release_handles(handle_array(handles))

    def commit_batch(self, handles: Sequence[int] | np.ndarray) -> int:
        """Commit the jobs of these :meth:`dispatch_batch` handles; how many were live."""
        return self._handles_backend().commit_handles(handle_array(handles))

    def _handles_backend(self) -> LocalReservations:
        """The in-process reservations, which alone know job handles."""
        if self._local is None:
            raise TypeError("job handles need the in-process LocalReservations backend")
        return self._local

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

        :raises ValueError: for a bad argument value.
        :raises TypeError: for an argument of the wrong type.
        """
        snap = self._mgmt.snapshot
        s = normalize_language(src, "src", allow_auto=True)
        t = normalize_language(tgt, "tgt")
        if tenant is not None:
            check_str(tenant, "tenant")
        check_bool(require_gpu, "require_gpu")
        mask, need = self._required(services)
        need |= (NEED_GPU if require_gpu else 0) | (NEED_PUBLIC if tenant is None else 0)
        excl = exclude_slots(snap, exclude)
        pref = () if prefer is None else prefer_slots(snap, prefer)
        now = self._clock()
        reservations = self._reservations
        if now >= reservations.due_at:
            reservations.expire_due(now)
        nodes: dict[str, str] = {}
        preferred: dict[str, str] = {}
        ids = snap.index.kernel_ids(s, t)
        if ids is not None:
            reasons = node_reasons(snap.kernel, ids[0], ids[1], mask, need, now, excl=excl)
            nodes = {snap.node_id(slot): reason for slot, reason in reasons.items()}
            if pref:
                tenant_index = -1
                if tenant:
                    tenant_index = snap.pool_index.get(self._tenant_pools.get(tenant, -1), -1)
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

    def _best_for_new_session(self, snap: RuntimeSnapshot, src_id: int, tgt_id: int,  # noqa: PLR0917
                              tenant_index: int, mask: int, need: int, now: float,
                              excl: tuple[int, ...]) -> int | None:
        """A best candidate a new session's dispatch would pick (ties aside), without drawing randomness."""
        kernel: SnapshotKernel = snap.kernel
        serving = kernel.pools_for(src_id, tgt_id)
        first = (tenant_index if tenant_index in serving
                 else kernel.most_free_pool(src_id, tgt_id, mask, need, now, excl))
        for pool_index in ([first] if first >= 0 else []) + [p for p in serving if p != first]:
            codes = kernel.reasons(pool_index, mask, need, now, excl)
            ok = [slot for slot, code in zip(kernel.members(pool_index), codes, strict=False) if code == 0]
            if ok:
                inflight, running, limits = snap.inflight, snap.loads["running"], snap.nodes["max_concurrency"]
                gpu = snap.loads["gpu"]
                best: int = min(ok, key=lambda x: (max(int(inflight[x]), int(running[x])) / int(limits[x]),
                                                   float(gpu[x])))
                return best
        return None

    def stats(self) -> dict[str, Any]:
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
        for pool_index, pool_id in enumerate(snap.pool_ids):
            entry = out["pools"].get(pool_id)
            if entry is not None:
                slots = members[offsets[pool_index]:offsets[pool_index + 1]]
                entry["capacity"] = int(limits[slots].sum())
                entry["inflight"] = int(inflight[slots].sum())
        backend = dict(self._reservations.stats())
        out["sessions"] = len(self._sessions)
        out["reservations"] = backend.get("held", 0)
        out["jobs"] = {k: backend.get(k, 0) for k in ("held", "committed", "expired")}
        out["backend"] = backend
        out["dispatch"] = outcome_counts(self._outcomes)
        out["compiled"] = self.compiled
        return out

    # ------------------------------------------------------------ helpers
    def close(self) -> None:
        """Release the reservation backend's resources."""
        self._reservations.close()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
