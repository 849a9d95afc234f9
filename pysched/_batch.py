"""Batch planning: :meth:`Scheduler.dispatch_many` in compiled passes, and the reasons of :meth:`dispatch_batch`.

``dispatch_many`` places its requests in *passes*. A :class:`BatchPass`
validates each request as it is added (a bad one gets its exception in its
result slot at once) and collects the ones the kernel can place together
in one :class:`PassRequests` record. :meth:`BatchPass.flush` then places
them with one ``select_batch`` call (its arguments are one
:class:`KernelBatch` record), reserves them together, binds the sessions
and fills the result slots. A request the kernel cannot decide inside a
pass (a ``prefer``, or a ``job_id`` seen earlier in the batch) ends the
pass and is dispatched on its own, in its place, so the batch places
exactly as the same requests dispatched one by one would.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, TypeAlias, cast

import numpy as np

from pysched._layout import NEED_GPU, NEED_PUBLIC
from pysched._outcomes import (
    OUTCOME_BACKEND_UNAVAILABLE,
    OUTCOME_NO_POOL,
    OUTCOME_OK,
    best_reason,
    no_node_error,
    node_reasons,
    reason_outcome,
)
from pysched._validate import REQUEST_ERRORS, unpack_request
from pysched.errors import NoPoolForLanguagePair, ReservationBackendUnavailable
from pysched.language_index import split_pair_key
from pysched.languages import AUTO, DEFAULT_SERVICES
from pysched.languages import _language_cache as _LANGUAGE_CACHE
from pysched.reservations import Reservation
from pysched.results import BATCH_REASON_CODES, Assignment

if TYPE_CHECKING:
    from pysched._core import Counters, SessionState, SnapshotKernel
    from pysched.scheduler import Scheduler
    from pysched.snapshot import RuntimeSnapshot

__all__ = ["BatchPass", "KernelBatch", "PassRequests", "batch_failures", "dispatch_many"]

#: the need bits of a public job that requires a GPU (the common request)
_NEED_PUBLIC_GPU = NEED_GPU | NEED_PUBLIC

#: what a request's result slot holds once it is decided
RequestResult: TypeAlias = Assignment | Exception


@dataclass(slots=True)
class PassRequests:
    """The requests of one pass the kernel places together: one entry per request, in request order.

    :ivar row: the request's position in the caller's list (its result slot).
    :ivar pair: its normalised ``(src, tgt)``.
    :ivar session_id: its session id.
    :ivar key: the kernel's :func:`~pysched.language_index.pair_key` of ``pair``.
    :ivar session: its session's number in this pass (``session_no``).
    :ivar mask: its required-service bits.
    :ivar need: its need bits (``pysched._layout.NEED_*``).
    :ivar job_id: the caller's job id, or ``None`` until the job is numbered once placed.
    :ivar extras: position -> ``(tenant, excluded slots)`` for the requests with either.
    :ivar session_no: session id -> its number in this pass, in first-seen order.
    """

    row: list[int] = field(default_factory=list)
    pair: list[tuple[str, str]] = field(default_factory=list)
    session_id: list[str] = field(default_factory=list)
    key: list[int] = field(default_factory=list)
    session: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    need: list[int] = field(default_factory=list)
    job_id: list[str | None] = field(default_factory=list)
    extras: dict[int, tuple[str | None, tuple[int, ...]]] = field(default_factory=dict)
    session_no: dict[str, int] = field(default_factory=dict)


class KernelBatch(NamedTuple):
    """The arrays of one ``SnapshotKernel.select_batch`` call, in its parameter order.

    Per request: ``src_ids``, ``tgt_ids``, ``service_masks``, ``needs``,
    ``tenant_pools`` (the tenant's pool index, -1 for none), ``session_of``
    (the session's number), ``exclude_off`` (n + 1 offsets into
    ``exclude``) and ``out`` (``pool_index << 32 | slot`` where placed, -2
    for no pool, -1 for no node). Per session: ``bound_key`` and
    ``bound_pool`` (the binding's pair key and pool index, -1 for none),
    which the kernel updates as the batch binds. ``scratch`` is the
    in-flight counts the batch adds its placements to.
    """

    src_ids: np.ndarray
    tgt_ids: np.ndarray
    service_masks: np.ndarray
    needs: np.ndarray
    tenant_pools: np.ndarray
    session_of: np.ndarray
    bound_key: np.ndarray
    bound_pool: np.ndarray
    exclude_off: np.ndarray
    exclude: np.ndarray
    scratch: np.ndarray
    now: float
    out: np.ndarray


class _Bindings(NamedTuple):
    """The sessions of a pass as the pass found them, by session number."""

    states: list[SessionState]
    keys: list[int]  # the binding's pair key, -1 for none
    pool_indices: list[int]  # the binding's pool index, -1 for none


class _Written(NamedTuple):
    """A binding a pass wrote: taken back if the backend placed none of the pass's jobs."""

    session_id: str
    state: SessionState
    before: tuple[tuple[str, str], int] | None  # the binding it replaced
    binding: tuple[tuple[str, str], int]
    created: bool  # the pass made the session's state


def dispatch_many(sched: Scheduler, requests: Iterable[object]) -> list[RequestResult]:
    """:meth:`Scheduler.dispatch_many`: place ``requests`` in passes; an outcome per request, in order.

    :param sched: the scheduler.
    :param requests: the requests (see :data:`pysched.results.Request`).
    """
    reqs = requests if isinstance(requests, list) else list(requests)
    results: list[RequestResult | None] = [None] * len(reqs)
    batch = BatchPass(sched, reqs, results)
    for i, req in enumerate(reqs):
        if not batch.add(i, req):
            batch.flush()
            try:
                sid, src, tgt, kw = unpack_request(req)
                results[i] = sched.dispatch(sid, src, tgt, **kw)
            except REQUEST_ERRORS as exc:
                results[i] = exc
            batch = BatchPass(sched, reqs, results)
    batch.flush()
    # every slot is filled: each request was decided when added, placed by a pass, or dispatched alone
    return cast("list[RequestResult]", results)


class BatchPass:
    """One compiled pass of :meth:`Scheduler.dispatch_many`: the requests it can place together.

    :param sched: the scheduler.
    :param reqs: every request of the batch.
    :param results: the batch's result slots, filled as requests are decided.
    """

    __slots__ = ("now", "pair_keys", "reqs", "requests", "results", "sched", "seen_jobs", "snap")

    def __init__(self, sched: Scheduler, reqs: list[object], results: list[RequestResult | None]) -> None:
        self.sched = sched
        self.reqs = reqs
        self.results = results
        self.snap: RuntimeSnapshot = sched._mgmt.snapshot
        self.now: float = sched._clock()
        self.pair_keys: dict[tuple[str, str], int] = {}  # pair -> its pair key, -1 when not served
        self.requests = PassRequests()
        self.seen_jobs: set[str] = set()

    def add(self, i: int, req: object) -> bool:
        """Take request ``i`` into this pass; False when it must be dispatched on its own.

        :param i: the request's position in the batch.
        :param req: the request.
        """
        sched = self.sched
        tenant: str | None = None
        excl: tuple[int, ...] = ()
        job_id: str | None = None
        pair: tuple[str, str] | None = None
        mask = need = 0
        if type(req) is tuple and len(req) == 3:  # noqa: PLR2004  (session_id, src, tgt)
            sid, src, tgt = req
            s = _LANGUAGE_CACHE.get(src) if type(src) is str else None
            t = _LANGUAGE_CACHE.get(tgt) if type(tgt) is str else None
            default_mask = sched._default_mask
            if (s is not None and t is not None and t != AUTO and default_mask is not None
                    and type(sid) is str and sid != ""):
                pair = (s, t)
                mask, need = default_mask, _NEED_PUBLIC_GPU
        if pair is None:
            try:
                sid, src, tgt, kw = unpack_request(req)
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
            except REQUEST_ERRORS as exc:
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
            key = self.pair_keys[pair] = self.snap.index.key(pair)
        if key < 0:
            sched._outcomes.add(OUTCOME_NO_POOL)
            self.results[i] = NoPoolForLanguagePair(*pair)
            return True
        r = self.requests
        k = r.session_no.get(sid)
        if k is None:
            k = r.session_no[sid] = len(r.session_no)
        if tenant is not None or excl:
            r.extras[len(r.row)] = (tenant, excl)
        r.row.append(i)
        r.pair.append(pair)
        r.session_id.append(sid)
        r.key.append(key)
        r.session.append(k)
        r.mask.append(mask)
        r.need.append(need)
        r.job_id.append(job_id)
        return True

    def flush(self) -> None:
        """Place and reserve everything added, in one compiled pass."""
        if self.requests.row:
            reservations = self.sched._reservations
            if self.now >= reservations.due_at:
                reservations.expire_due(self.now)
            self._place()
            self.requests = PassRequests()

    # -- the pass, step by step ------------------------------------------------
    def _place(self) -> None:
        """Select, number, reserve and bind the pass's requests; fill their result slots.

        The pass's sessions are held (:mod:`pysched._holding`) from reading
        their bindings until the pass's choices are written back as their
        bindings (tentatively, as the Python path does), so each binding is
        decided one call at a time. The reservation comes after, with no
        session held (in Redis mode it is a round trip); if the backend
        places nothing, the pass takes its bindings back.
        """
        snap, sched = self.snap, self.sched
        holds = sched._holds
        held, created = holds.hold(self.requests.session_no, self.now)
        try:
            bindings = self._read_bindings(held)
            batch = self._kernel_batch(bindings)
            kernel: SnapshotKernel = snap.kernel
            kernel.select_batch(*batch)
            written = self._bind_sessions(batch, bindings, {sid for sid, _ in created})
        finally:
            holds.let_go(held, created)
        out = batch.out
        placed = np.flatnonzero(out >= 0)
        placed_positions = placed.tolist()
        # job ids in request order for the placed requests, as one-by-one dispatch numbers them
        job_ids = self.requests.job_id
        new_job_id = self.sched._new_job_id
        for j in placed_positions:
            if job_ids[j] is None:
                job_ids[j] = new_job_id()
        try:
            retry = self._reserve(out[placed], placed_positions)
        except BaseException:
            self._unbind(written)
            raise
        if retry is None:
            self._unbind(written)
        self._unplaced(batch)
        for j in retry or ():
            self._dispatch_alone(j)

    def _read_bindings(self, held: dict[str, SessionState]) -> _Bindings:
        """Each held session's binding at the start of the pass (forgetting idle ones, as dispatch does)."""
        r = self.requests
        snap, now = self.snap, self.now
        pool_index = snap.pool_index
        keys = [-1] * len(r.session_no)
        pool_indices = [-1] * len(r.session_no)
        states: list[SessionState] = []
        own_keys = dict(zip(r.pair, r.key, strict=False))  # columns of one record: equal by construction
        idle_before = now - self.sched.session_ttl
        for sid, k in r.session_no.items():  # (in session-number order)
            state = held[sid]
            states.append(state)
            if state.last_used < idle_before:
                state.binding = None  # idle past its TTL: forgotten at lookup, as in dispatch
            state.last_used = now
            binding = state.binding
            if binding is None:
                continue
            key = own_keys.get(binding[0])
            if key is None:
                key = snap.index.key(binding[0])
            if key >= 0:
                keys[k] = key
                pool_indices[k] = pool_index.get(binding[1], -1)
        return _Bindings(states, keys, pool_indices)

    def _kernel_batch(self, bindings: _Bindings) -> KernelBatch:
        """The ``select_batch`` arrays of this pass."""
        r = self.requests
        snap = self.snap
        n = len(r.row)
        src_ids, tgt_ids = split_pair_key(np.array(r.key, dtype=np.int64), snap.index.n_langs)
        tenants = np.full(n, -1, dtype=np.int32)
        excl_off = np.zeros(n + 1, dtype=np.int32)
        excl_flat: list[int] = []
        if r.extras:
            tenant_pools = self.sched._tenant_pools
            pool_index = snap.pool_index
            for j in range(n):
                extra = r.extras.get(j)
                if extra is not None:
                    tenant, excl = extra
                    if tenant is not None and tenant in tenant_pools:
                        # the kernel uses it only where it serves the pair, as in dispatch
                        tenants[j] = pool_index.get(tenant_pools[tenant], -1)
                    excl_flat.extend(excl)
                excl_off[j + 1] = len(excl_flat)
        return KernelBatch(
            src_ids=src_ids.astype(np.int32),
            tgt_ids=tgt_ids.astype(np.int32),
            service_masks=np.array(r.mask, dtype=np.uint64),
            needs=np.array(r.need, dtype=np.int32),
            tenant_pools=tenants,
            session_of=np.array(r.session, dtype=np.int32),
            bound_key=np.array(bindings.keys, dtype=np.int64),
            bound_pool=np.array(bindings.pool_indices, dtype=np.int32),
            exclude_off=excl_off,
            exclude=np.array(excl_flat, dtype=np.int32),
            scratch=np.array(snap.inflight, dtype=np.int32),  # a writable copy
            now=self.now,
            out=np.empty(n, dtype=np.int64),
        )

    def _reserve(self, placements: np.ndarray, positions: list[int]) -> list[int] | None:
        """Reserve the placed requests together; the positions to dispatch alone, or None if the backend is down.

        :param placements: the kernel's ``out`` of each placed request (``pool_index << 32 | slot``).
        :param positions: the placed requests' positions in the pass.
        """
        r = self.requests
        rows, pairs = r.row, r.pair  # locals: read per request below
        job_ids = cast("list[str]", r.job_id)  # every placed request was numbered
        snap, sched, results = self.snap, self.sched, self.results
        pool_ids = snap.pool_ids
        slots = (placements & 0xFFFFFFFF).astype(np.int32)
        pool_indices = (placements >> 32).tolist()
        all_session_ids = r.session_id
        session_ids = [all_session_ids[j] for j in positions]
        try:
            refused = sched._reservations.reserve_placed(
                [job_ids[j] for j in positions], slots, snap.nodes["max_concurrency"][slots],
                snap.loads["running"][slots], [pool_ids[p] for p in pool_indices], session_ids, snap.node_id,
                self.now, [pairs[j] for j in positions],
            )
        except ReservationBackendUnavailable as exc:
            sched._outcomes.add(OUTCOME_BACKEND_UNAVAILABLE, len(positions))
            for j in positions:
                results[rows[j]] = exc
            return None
        retry: list[int] = []
        node_ids = snap._node_ids
        slot_list = slots.tolist()
        served = 0
        for pos, j in enumerate(positions):
            result = refused[pos] if refused else None
            s, t = pairs[j]
            if result is None:
                results[rows[j]] = Assignment(node_ids[slot_list[pos]], pool_ids[pool_indices[pos]], job_ids[j],
                                              session_ids[pos], s, t)
                served += 1
            elif isinstance(result, Reservation):
                results[rows[j]] = Assignment(result.node_id, result.pool_id, job_ids[j], session_ids[pos], s, t)
                served += 1
            else:
                retry.append(j)
        sched._outcomes.add(OUTCOME_OK, served)
        return retry

    def _bind_sessions(self, batch: KernelBatch, before: _Bindings, created: set[str]) -> list[_Written]:
        """Bind each held session to the pool that last served it in the pass; what was written."""
        r = self.requests
        pool_ids = self.snap.pool_ids
        key_pair = dict(zip(r.key, r.pair, strict=False))  # columns of one record: equal by construction
        final_keys, final_pool_indices = batch.bound_key.tolist(), batch.bound_pool.tolist()
        written: list[_Written] = []
        for sid, k in r.session_no.items():
            key, pool_index = final_keys[k], final_pool_indices[k]
            if ((key == before.keys[k] and pool_index == before.pool_indices[k]) or pool_index < 0
                    or key not in key_pair):
                continue  # unchanged by this pass
            binding = (key_pair[key], pool_ids[pool_index])
            state = before.states[k]
            if state.binding == binding:
                continue
            written.append(_Written(sid, state, state.binding, binding, sid in created))
            state.binding = binding
        return written

    def _unbind(self, written: list[_Written]) -> None:
        """Take back the bindings a pass wrote and placed no job under (the backend was down).

        Each binding still the pass's goes back to what it was, decided as
        the Python path decides (the session's lock, ``deciding``, no batch
        holding it); a session the pass made and left unbound goes again.
        """
        sched = self.sched
        for w in written:
            with w.state.lock:
                w.state.deciding = True
                try:
                    sched._holds.await_unheld(w.state)
                    if w.state.binding is w.binding:
                        w.state.binding = w.before
                    if w.created and w.state.binding is None:
                        sched._sessions.discard(w.session_id, w.state)
                finally:
                    w.state.deciding = False

    def _unplaced(self, batch: KernelBatch) -> None:
        """The error of each request the kernel did not place: no pool, or why no node."""
        r = self.requests
        outcomes: Counters = self.sched._outcomes
        kernel: SnapshotKernel = self.snap.kernel
        out = batch.out
        for j in np.flatnonzero(out < 0).tolist():
            i = r.row[j]
            s, t = r.pair[j]
            if out[j] == -2:  # noqa: PLR2004  the kernel's "no pool serves the pair"
                outcomes.add(OUTCOME_NO_POOL)
                self.results[i] = NoPoolForLanguagePair(s, t)
            else:
                excl = r.extras.get(j, (None, ()))[1]
                reasons = node_reasons(kernel, int(batch.src_ids[j]), int(batch.tgt_ids[j]), r.mask[j], r.need[j],
                                       self.now, excl=excl)
                self.results[i] = no_node_error(outcomes, s, t, reasons)

    def _dispatch_alone(self, j: int) -> None:
        """Dispatch request ``j`` of the pass one by one: the backend refused its placement after all."""
        i = self.requests.row[j]
        try:
            sid, src, tgt, kw = unpack_request(self.reqs[i])
            kw["job_id"] = self.requests.job_id[j]
            self.results[i] = self.sched.dispatch(sid, src, tgt, **kw)
        except REQUEST_ERRORS as exc:
            self.results[i] = exc


def batch_failures(snap: RuntimeSnapshot, outcomes: Counters, keys: np.ndarray, mask: int, need: int,
                   now: float) -> np.ndarray:
    """Reason codes of the jobs a :meth:`Scheduler.dispatch_batch` did not place; counts their outcomes.

    Each is what one-by-one dispatch would have raised. Every job of a pair
    that failed saw the same nodes for the same reasons (load only grows
    within the batch, and a node once ineligible takes no later job), so the
    reason is worked out once per pair, over the nodes as they are after
    the batch.

    :param snap: the snapshot after the batch.
    :param outcomes: the scheduler's outcome counters.
    :param keys: the pair key of each job (-1 where no language id exists).
    :param mask: the batch's required-service bits.
    :param need: the batch's need bits.
    :param now: the batch's clock reading.
    """
    kernel: SnapshotKernel = snap.kernel
    n_langs = snap.index.n_langs
    out = np.empty(len(keys), dtype=np.uint8)
    memo: dict[int, str] = {}
    for j, key in enumerate(keys.tolist()):
        name = memo.get(key)
        if name is None:
            if key < 0:
                name = "no_pool"
            else:
                src_id, tgt_id = split_pair_key(key, n_langs)
                if not kernel.pools_for(src_id, tgt_id):
                    name = "no_pool"
                else:
                    reasons = node_reasons(kernel, src_id, tgt_id, mask, need, now)
                    name = best_reason(reasons)[1]
            memo[key] = name
        out[j] = BATCH_REASON_CODES[name]
        outcomes.add(OUTCOME_NO_POOL if name == "no_pool" else reason_outcome(name))
    return out
