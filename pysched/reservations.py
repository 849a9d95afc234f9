"""Capacity reservations: the final word on whether a node takes a job.

The compiled kernel *ranks* nodes from a snapshot; a reservation *decides*.
Every backend implements :class:`ReservationBackend`:

* ``try_reserve`` atomically checks a node's capacity and takes one slot, trying
  an ordered shortlist of candidates and stopping at the first that has room;
* ``commit`` marks the job accepted by the node (it stops expiring);
* ``release`` gives the capacity back (idempotent).

Uncommitted reservations expire after ``reservation_ttl`` seconds, so a
client that vanishes between dispatch and commit leaks nothing.

Besides deciding, a backend keeps a per-slot ``int32`` array of in-flight
counts (:attr:`ReservationBackend.inflight`) that the kernel reads for
scoring: the count changes the moment a reservation is made, so a burst of
dispatches spreads over the fleet instead of piling onto one node.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

import numpy as np
from numpy.typing import NDArray

from pysched._impl import kernel as default_kernel

if TYPE_CHECKING:
    from pysched import _core

__all__ = [
    "Candidate",
    "CandidateTuple",
    "Reservation",
    "ReservationBackend",
    "LocalReservations",
    "REFUSED_FULL",
    "REFUSED_GONE",
]

#: Refusal reason: the node has no free capacity left.
REFUSED_FULL = "full"
#: Refusal reason: the node is not (or no longer) registered with the backend.
REFUSED_GONE = "offline"


class Candidate(NamedTuple):
    """One node offered to :meth:`ReservationBackend.try_reserve`."""

    slot: int  #: the node's slot in the scheduler's per-node arrays
    node_id: str
    max_concurrency: int
    running: int  #: jobs the node itself last reported running


#: A candidate as the reserve calls take it: a :class:`Candidate`, or a plain tuple
#: that starts with its fields (the kernel's ``candidate()`` and
#: ``select_candidate()`` tuples; the latter's fifth field, the pool index, is ignored).
CandidateTuple: TypeAlias = tuple[int, str, int, int] | tuple[int, str, int, int, int]


class Reservation:
    """One job's claim on one node's capacity.

    :param job_id: the job: its id, or the integer handle of a
        :meth:`~pysched.Scheduler.dispatch_batch` job.
    :param node_id: the node whose capacity it holds.
    :param slot: that node's slot in the scheduler's per-node arrays.
    :param pool_id: the pool id the job was dispatched through.
    :param session_id: the session that dispatched it.
    :param expires_at: when it lapses unless committed, renewed or released
        (the scheduler's clock).
    :param committed: accepted by the node (it then lapses at the end of its lease).
    :param src: the source language of the dispatch that made it (``None``
        where a backend does not keep it).
    :param tgt: its target language (likewise).
    """

    __slots__ = ("job_id", "node_id", "slot", "pool_id", "session_id", "expires_at", "committed", "src", "tgt")

    def __init__(  # noqa: PLR0917  public record: its fields in order, which callers pass positionally
        self,
        job_id: str | int,
        node_id: str,
        slot: int,
        pool_id: int,
        session_id: str,
        expires_at: float,
        committed: bool = False,
        src: str | None = None,
        tgt: str | None = None,
    ) -> None:
        self.job_id = job_id
        self.node_id = node_id
        self.slot = slot
        self.pool_id = pool_id
        self.session_id = session_id
        self.expires_at = expires_at
        self.committed = committed
        self.src = src
        self.tgt = tgt

    def __repr__(self) -> str:
        state = "committed" if self.committed else f"expires_at={self.expires_at:.3f}"
        return f"Reservation({self.job_id!r} -> {self.node_id!r}, pool={self.pool_id}, {state})"


class ReservationBackend:
    """Interface every reservation backend implements.

    The scheduler calls :meth:`configure` once, :meth:`ensure_capacity`,
    :meth:`bind_node` and :meth:`unbind_node` from its management layer
    (under the management lock), and the rest from the dispatch path.
    Implementations must be safe to call from many threads at once.

    Job lifecycle: a reservation holds one unit of its node's capacity until
    it is released, or until it expires: ``reservation_ttl`` after dispatch
    while uncommitted, ``commit_lease`` after commit (or after the last
    :meth:`renew`) once committed. ``commit``, ``release`` and ``renew``
    take an optional ``node_id``: when given, a job held on another node is
    refused (False) with nothing changed, so a late report from a node the
    job has moved away from cannot touch the new node's capacity.
    """

    #: per-slot in-flight counts read by the kernel; replaced (never resized
    #: in place) by :meth:`ensure_capacity`.
    inflight: NDArray[np.int32]

    #: dispatch calls :meth:`expire_due` only once the clock reaches this
    #: (a plain attribute read on the hot path); 0 means "always call".
    due_at: float = 0.0

    #: the scheduler's commit lease, set by :meth:`configure`
    commit_lease: float = 3600.0

    def configure(
        self,
        reservation_ttl: float,
        clock: Callable[[], float],
        *,
        commit_lease: float = 3600.0,
        on_expired: Callable[[list[Reservation]], None] | None = None,
    ) -> None:
        """Receive the scheduler's TTL, clock, commit lease and expiry callback (once, before use).

        ``on_expired(reservations)`` is called, with no lock held, with the
        jobs a sweep found expired (TTL or lease), so the scheduler can tell
        its listeners (event ``"job_expired"``).
        """
        raise NotImplementedError

    def ensure_capacity(self, n_slots: int) -> NDArray[np.int32]:
        """Make :attr:`inflight` hold at least ``n_slots`` entries; return it."""
        raise NotImplementedError

    def bind_node(self, slot: int, node_id: str, max_concurrency: int) -> None:
        """A node was registered at ``slot`` (or its max concurrency changed)."""
        raise NotImplementedError

    def unbind_node(self, slot: int, node_id: str) -> None:
        """The node at ``slot`` was removed: refuse new reservations on it."""
        raise NotImplementedError

    def try_reserve(
        self,
        job_id: str,
        candidates: Sequence[CandidateTuple],
        pool_id: int,
        session_id: str,
    ) -> Reservation | list[str]:
        """Reserve the first candidate with free capacity.

        :param job_id: the job to reserve for.
        :param candidates: the nodes to try, in order (:data:`CandidateTuple`).
        :param pool_id: the pool id the job is dispatched through.
        :param session_id: the session dispatching it.
        :returns: the :class:`Reservation` on success. If ``job_id`` already
            holds a reservation, that one unchanged (safe retries). Otherwise
            one refusal reason per candidate, in order.
        """
        raise NotImplementedError

    def reserve_one(
        self, job_id: str, candidate: CandidateTuple, pool_id: int, session_id: str, now: float,
        pair: tuple[str, str] | None = None,
    ) -> Reservation | str | None:
        """Single-candidate fast path used by dispatch.

        The default delegates to :meth:`try_reserve`.

        :param job_id: the job to reserve for.
        :param candidate: ``(slot, node_id, max_concurrency, running, ...)``:
            extra trailing fields are ignored.
        :param pool_id: the pool id the job is dispatched through.
        :param session_id: the session dispatching it.
        :param now: the caller's reading of the scheduler's clock.
        :param pair: the job's ``(src, tgt)``, which a backend may keep with the reservation.
        :returns: ``None`` when ``candidate`` was reserved for ``job_id``, a
            refusal reason string when it was not, or a :class:`Reservation`
            (the one ``job_id`` already held, or the new one) whose node and
            pool the caller then uses.
        """
        result = self.try_reserve(job_id, [candidate], pool_id, session_id)
        if isinstance(result, Reservation):
            return result  # fresh or pre-existing: the caller takes node and pool from it
        return result[0]

    def reserve_placed(  # noqa: PLR0917  the batch's parallel arrays, one per field, in the order of reserve_one's
        self,
        job_ids: Sequence[str],
        slots: NDArray[np.integer],
        limits: NDArray[np.integer],
        running: NDArray[np.integer],
        pool_ids: Sequence[int],
        session_ids: Sequence[str],
        node_id: Callable[[int], str],
        now: float,
        pairs: Sequence[tuple[str, str]] | None = None,
    ) -> list[Reservation | str | None]:
        """Reserve a placed batch: job ``job_ids[k]`` on slot ``slots[k]`` (for ``pairs[k]``).

        The default makes one :meth:`reserve_one` call per job.

        :param job_ids: the jobs, in batch order.
        :param slots: each job's node slot.
        :param limits: each node's max concurrency.
        :param running: the jobs each node last reported running.
        :param pool_ids: each job's pool id.
        :param session_ids: each job's session.
        :param node_id: slot -> node id.
        :param now: the caller's reading of the scheduler's clock.
        :param pairs: each job's ``(src, tgt)``.
        :returns: one result per job as :meth:`reserve_one` would, or an empty
            list when every job was reserved as placed (the common case, which
            a backend may answer without building a list).
        """
        job_pairs: Sequence[tuple[str, str] | None] = pairs if pairs is not None else [None] * len(job_ids)
        results = [
            self.reserve_one(job_id, (int(slot), node_id(int(slot)), int(limit), int(run)), pool_id, session_id, now,
                             pair)
            for job_id, slot, limit, run, pool_id, session_id, pair in zip(
                job_ids, slots, limits, running, pool_ids, session_ids, job_pairs, strict=True)
        ]
        return results if any(r is not None for r in results) else []

    def get(self, job_id: str) -> Reservation | None:
        """The live reservation of ``job_id``, or ``None`` (never one past its expiry)."""
        raise NotImplementedError

    def commit(self, job_id: str, node_id: str | None = None) -> bool:
        """Mark a reservation accepted: it now expires at the end of its lease.

        False, with nothing changed, if the job holds nothing (or, with
        ``node_id``, holds it on another node).
        """
        raise NotImplementedError

    def release(self, job_id: str, node_id: str | None = None) -> bool:
        """Return the job's capacity. Idempotent: False if nothing was held (on ``node_id``)."""
        raise NotImplementedError

    def renew(self, job_id: str, lease: float | None = None, node_id: str | None = None) -> bool:
        """Move a live job's expiry to now + ``lease``.

        :param job_id: the job.
        :param lease: seconds; default: the commit lease when committed, the
            reservation TTL otherwise.
        :param node_id: when given, a job held on another node is refused.
        :returns: False, with nothing changed, if refused.
        """
        raise NotImplementedError

    def expire(self) -> int:
        """Drop reservations past their TTL and jobs past their lease; return how many."""
        raise NotImplementedError

    def count(self, node_id: str | None = None) -> int:
        """Reservations held (for one node, or in total)."""
        raise NotImplementedError

    def stats(self) -> dict[str, object]:
        """Local figures for monitoring, with no network call.

        ``{"name", "available", "error", "held", "committed", "expired"}``:
        whether the backend answered its last call, the error if not, jobs
        held (by this process), how many of them are committed, and jobs
        dropped by expiry so far.
        """
        raise NotImplementedError

    def expire_due(self, now: float) -> None:
        """Cheap check, called before every dispatch: sweep if something expired by ``now``.

        Expired capacity must be visible to the kernel's scoring before it
        picks, or it would call a node full that has room again.
        """

    def close(self) -> None:
        """Release any resources held (threads, connections)."""


class LocalReservations(ReservationBackend):
    """In-process reservations, exact, with no Python lock on any path.

    A node's effective load is ``max(in-flight, reported running)``; a
    reservation succeeds only while that is below the node's max
    concurrency. Every change (reserve, commit, renew, release, expiry) is
    one call into the compiled ``JobTable``, which holds the GIL from start
    to finish: the node count, the job record and its expiry change
    together, atomically against every other thread, with no lock for a
    preempted thread to hold (a lock here made four dispatching threads
    convoy behind a preempted holder: p50 went from ~7 to ~60 us).

    Expiry is exact: the table keeps one heap of expiries (TTL ends of
    uncommitted reservations, lease ends of committed jobs); dispatch sweeps
    the moment the clock reaches the earliest, so expired capacity returns at
    the TTL to the microsecond, and ``get``/``commit``/``release`` treat a
    job past its expiry as gone even before the sweep. Expired jobs are
    reported through the ``on_expired`` callback.

    :param reservation_ttl: seconds an uncommitted reservation lives; default:
        the scheduler's (:meth:`configure`).
    :param clock: default: the scheduler's.
    :param commit_lease: seconds a committed job holds capacity after its
        commit or last renewal; default: the scheduler's.
    :param core: the kernel module (``pysched._core`` or ``pysched._pycore``)
        whose ``SlotCounts`` and ``JobTable`` hold the reservations.
    """

    # Set by the constructor when given there (they then win over what
    # configure() passes), else by configure(): the backend is unusable until
    # one of the two has set them.
    _ttl: float
    _lease: float
    _clock: Callable[[], float]

    def __init__(
        self,
        reservation_ttl: float | None = None,
        clock: Callable[[], float] | None = None,
        *,
        commit_lease: float | None = None,
        core: ModuleType = default_kernel,
    ) -> None:
        self._lock = threading.Lock()  # management calls only (growth, binding)
        if reservation_ttl is not None:
            self._ttl = reservation_ttl
        if commit_lease is not None:
            self._lease = commit_lease
        if clock is not None:
            self._clock = clock
        self._on_expired: Callable[[list[Reservation]], None] | None = None
        # slot <-> node id; a slot belongs to one node id for the scheduler's
        # life, so neither map ever loses an entry (held jobs of a removed node
        # still name it). Whether a live node owns a slot is the table's business.
        self._names: dict[int, str] = {}
        self._slots: dict[str, int] = {}
        self._counts: _core.SlotCounts = core.SlotCounts(0)
        self.inflight = self._counts.array
        self._table: _core.JobTable = core.JobTable(self._counts)

    # -- management side ---------------------------------------------------
    def configure(
        self,
        reservation_ttl: float,
        clock: Callable[[], float],
        *,
        commit_lease: float = 3600.0,
        on_expired: Callable[[list[Reservation]], None] | None = None,
    ) -> None:
        """Take the scheduler's TTL, clock and lease where the constructor was not given them."""
        if not hasattr(self, "_ttl"):
            self._ttl = float(reservation_ttl)
        if not hasattr(self, "_lease"):
            self._lease = float(commit_lease)
        if not hasattr(self, "_clock"):
            self._clock = clock
        self.commit_lease = self._lease
        self._on_expired = on_expired

    @property
    def due_at(self) -> float:  # type: ignore[override]
        """The earliest expiry of any held job: dispatch sweeps when the clock reaches it."""
        return self._table.next_expiry

    def ensure_capacity(self, n_slots: int) -> NDArray[np.int32]:
        """Grow the counts (to at least double) when ``n_slots`` exceeds them; the in-flight array."""
        with self._lock:
            if n_slots > len(self._counts):
                # grown() forwards the old table to the new one atomically, so a
                # job table or dispatch still holding the old one loses no update;
                # the kernel of an older snapshot keeps reading the old array (stale scores).
                self._counts = self._counts.grown(max(n_slots, 2 * len(self._counts), 64))
                self.inflight = self._counts.array
            return self.inflight

    def bind_node(self, slot: int, node_id: str, max_concurrency: int) -> None:
        """Let reservations on ``slot`` succeed; its limit comes with each reservation."""
        with self._lock:
            self._names[slot] = node_id
            self._slots[node_id] = slot
            self._table.bind(slot)

    def unbind_node(self, slot: int, node_id: str) -> None:
        """Refuse new reservations on ``slot`` (``"offline"``) if ``node_id`` still owns it."""
        with self._lock:
            if self._names.get(slot) == node_id:
                self._table.unbind(slot)

    # -- dispatch side -----------------------------------------------------
    def reserve_one(
        self, job_id: str, candidate: CandidateTuple, pool_id: int, session_id: str, now: float,
        pair: tuple[str, str] | None = None,
    ) -> Reservation | str | None:
        """One call into the job table; see :meth:`ReservationBackend.reserve_one`."""
        # candidate by index: it may carry more fields (the pool index)
        code = self._table.reserve(job_id, candidate[0], candidate[2], candidate[3], pool_id, session_id,
                                   now + self._ttl, pair)
        if code >= 0:
            return None
        if code == _FULL:
            return REFUSED_FULL
        if code == _GONE:
            return REFUSED_GONE
        held = self._view(job_id, now)
        if held is not None:
            return held
        # held only by a reservation past its expiry at ``now``, not yet swept:
        # report it, then try once more (the sweep at ``now`` removes it)
        self._sweep(now)
        code = self._table.reserve(job_id, candidate[0], candidate[2], candidate[3], pool_id, session_id,
                                   now + self._ttl, pair)
        if code >= 0:
            return None
        if code == _GONE:
            return REFUSED_GONE
        return self._view(job_id, now) or REFUSED_FULL

    def reserve_placed(  # noqa: PLR0917  as ReservationBackend.reserve_placed, which it overrides
        self,
        job_ids: Sequence[str],
        slots: NDArray[np.integer],
        limits: NDArray[np.integer],
        running: NDArray[np.integer],
        pool_ids: Sequence[int],
        session_ids: Sequence[str],
        node_id: Callable[[int], str],
        now: float,
        pairs: Sequence[tuple[str, str]] | None = None,
    ) -> list[Reservation | str | None]:
        """One job-table call per job, no Python lock; see :meth:`ReservationBackend.reserve_placed`."""
        reserve = self._table.reserve
        expires = now + self._ttl
        results: list[Reservation | str | None] = []
        failed = False
        job_pairs: Sequence[tuple[str, str] | None] = pairs if pairs is not None else [None] * len(job_ids)
        for job_id, slot, limit, run, pool_id, session_id, pair in zip(
                job_ids, slots.tolist(), limits.tolist(), running.tolist(), pool_ids, session_ids, job_pairs,
                strict=True):
            code = reserve(job_id, slot, limit, run, pool_id, session_id, expires, pair)
            if code >= 0:
                results.append(None)
                continue
            failed = True
            if code == _FULL:
                results.append(REFUSED_FULL)
            elif code == _GONE:
                results.append(REFUSED_GONE)
            else:
                results.append(self.get(job_id) or REFUSED_FULL)
        return results if failed else []

    def try_reserve(
        self,
        job_id: str,
        candidates: Sequence[CandidateTuple],
        pool_id: int,
        session_id: str,
    ) -> Reservation | list[str]:
        """:meth:`reserve_one` on each candidate in turn; see :meth:`ReservationBackend.try_reserve`."""
        now = self._clock()
        self.expire_due(now)
        reasons: list[str] = []
        for cand in candidates:
            result = self.reserve_one(job_id, cand, pool_id, session_id, now)
            if result is None:
                held = self.get(job_id)
                if held is not None:
                    return held
                reasons.append(REFUSED_FULL)  # expired at once (a zero-length TTL): nothing is held
                continue
            if isinstance(result, Reservation):
                return result
            reasons.append(result)
        return reasons

    def _slot_of(self, node_id: str | None) -> int:
        """``_ANY_NODE`` for "any node"; the node's slot; ``_NEVER_SEEN`` for a node this backend never saw."""
        if node_id is None:
            return _ANY_NODE
        slot = self._slots.get(node_id)
        return _NEVER_SEEN if slot is None else slot

    def get(self, job_id: str) -> Reservation | None:
        """The job's live reservation, or ``None``."""
        if job_id not in self._table:
            return None  # the common answer, without reading the clock
        return self._view(job_id, self._clock())

    def _view(self, job_id: str, now: float) -> Reservation | None:
        rec = self._table.get(job_id, now)
        if rec is None:
            return None
        slot, pool_id, session_id, expires_at, committed, pair = rec
        src, tgt = pair if pair is not None else (None, None)
        return Reservation(job_id, self._names[slot], slot, pool_id, session_id, expires_at, committed, src, tgt)

    def commit(self, job_id: str, node_id: str | None = None) -> bool:
        """Commit in the job table; see :meth:`ReservationBackend.commit`."""
        slot = self._slot_of(node_id)
        if slot == _NEVER_SEEN:
            return False
        now = self._clock()
        return self._table.commit(job_id, slot, now + self._lease, now)

    def renew(self, job_id: str, lease: float | None = None, node_id: str | None = None) -> bool:
        """Renew in the job table; see :meth:`ReservationBackend.renew`."""
        slot = self._slot_of(node_id)
        if slot == _NEVER_SEEN:
            return False
        now = self._clock()
        if lease is None:
            rec = self._table.get(job_id, now)
            if rec is None:
                return False
            lease = self._lease if rec[4] else self._ttl
        return self._table.renew(job_id, slot, now + lease, now)

    def release(self, job_id: str, node_id: str | None = None) -> bool:
        """Release from the job table; see :meth:`ReservationBackend.release`."""
        slot = self._slot_of(node_id)
        if slot == _NEVER_SEEN:
            return False
        return self._table.release(job_id, slot, self._clock()) is not None

    # -- jobs named by handle (Scheduler.dispatch_batch) ------------------
    def release_handle(self, handle: int, node_id: str | None = None) -> bool:
        """Release a batch job by its handle (only if held on ``node_id``, when given)."""
        slot = self._slot_of(node_id)
        return slot != _NEVER_SEEN and self._table.release_handle(handle, slot, self._clock())

    def commit_handle(self, handle: int, node_id: str | None = None) -> bool:
        """Commit a batch job by its handle; it then holds capacity for the commit lease."""
        slot = self._slot_of(node_id)
        now = self._clock()
        return slot != _NEVER_SEEN and self._table.commit_handle(handle, slot, now + self._lease, now)

    def release_handles(self, handles: NDArray[np.int64]) -> int:
        """Release every live batch job in ``handles``; how many were."""
        return self._table.release_handles(handles, self._clock())

    def commit_handles(self, handles: NDArray[np.int64]) -> int:
        """Commit every live batch job in ``handles``; how many were."""
        now = self._clock()
        return self._table.commit_handles(handles, now + self._lease, now)

    def expire(self) -> int:
        """Sweep now; how many jobs expired."""
        return self._sweep(self._clock())

    def expire_due(self, now: float) -> None:
        """Sweep once ``now`` reaches the earliest expiry of any held job."""
        if now >= self._table.next_expiry:
            self._sweep(now)

    def _sweep(self, now: float) -> int:
        # The table drops the expired jobs atomically, each exactly once; the
        # callback runs with no lock held (a listener may dispatch a failover).
        expired = self._table.expire(now)
        if expired and self._on_expired is not None:
            names = self._names
            self._on_expired([
                Reservation(job_id, names[slot], slot, pool_id, session_id, expires_at, committed)
                for job_id, slot, pool_id, session_id, expires_at, committed in expired
            ])
        return len(expired)

    def count(self, node_id: str | None = None) -> int:
        """Jobs held, after a due sweep (for one node, or in total)."""
        self.expire_due(self._clock())
        if node_id is None:
            return len(self._table)
        slot = self._slots.get(node_id)
        return 0 if slot is None else self._counts.get(slot)

    def stats(self) -> dict[str, object]:
        """See :meth:`ReservationBackend.stats`; ``name`` is ``"local"``, always available."""
        table = self._table
        return {"name": "local", "available": True, "error": None, "held": len(table),
                "committed": table.committed, "expired": table.expired}

    def jobs(self) -> list[Reservation]:
        """Every job held, by job id (for inspection and tests)."""
        names = self._names
        return [Reservation(job_id, names[slot], slot, pool_id, session_id, expires_at, committed)
                for job_id, slot, pool_id, session_id, expires_at, committed in self._table.jobs()]


# JobTable.reserve's refusal codes (JobTable.FULL, JobTable.GONE), as constants
_FULL, _GONE = -1, -2
# _slot_of's answers besides a slot: any node, and a node this backend never saw
_ANY_NODE, _NEVER_SEEN = -1, -2
