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
from typing import NamedTuple

import numpy as np

from pysched._kernel import core as default_core

__all__ = [
    "Candidate",
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


class Reservation:
    """One job's claim on one node's capacity."""

    __slots__ = ("job_id", "node_id", "slot", "pool_id", "session_id", "expires_at", "committed", "src", "tgt")

    def __init__(
        self,
        job_id: str,
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
        #: the language pair of the dispatch that made it (None where a backend does not keep it)
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
    inflight: np.ndarray

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

    def ensure_capacity(self, n_slots: int) -> np.ndarray:
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
        candidates: Sequence[Candidate],
        pool_id: int,
        session_id: str,
    ) -> Reservation | list[str]:
        """Reserve the first candidate with free capacity.

        Returns the :class:`Reservation` on success. If ``job_id`` already
        holds a reservation, returns that one unchanged (safe retries).
        Otherwise returns one refusal reason per candidate, in order.
        """
        raise NotImplementedError

    def reserve_one(
        self, job_id: str, candidate: Candidate, pool_id: int, session_id: str, now: float,
        pair: tuple[str, str] | None = None,
    ) -> Reservation | str | None:
        """Single-candidate fast path used by dispatch.

        ``candidate`` is ``(slot, node_id, max_concurrency, running, ...)``:
        extra trailing fields are ignored. Returns ``None`` when ``candidate`` was reserved for ``job_id``, a
        refusal reason string when it was not, or a :class:`Reservation`
        (the one ``job_id`` already held, or the new one) whose node and pool
        the caller then uses. ``now`` is the caller's reading of the
        scheduler's clock; ``pair`` the job's ``(src, tgt)``, which a backend
        may keep with the reservation. The default delegates to :meth:`try_reserve`.
        """
        result = self.try_reserve(job_id, [candidate], pool_id, session_id)
        if isinstance(result, Reservation):
            return result  # fresh or pre-existing: the caller takes node and pool from it
        return result[0]

    def reserve_placed(
        self,
        job_ids: Sequence[str],
        slots: np.ndarray,
        limits: np.ndarray,
        running: np.ndarray,
        pool_ids: Sequence[int],
        session_ids: Sequence[str],
        node_id: Callable[[int], str],
        now: float,
        pairs: Sequence[tuple[str, str]] | None = None,
    ) -> list[Reservation | str | None]:
        """Reserve a placed batch: job ``job_ids[k]`` on slot ``slots[k]`` (for ``pairs[k]``).

        Returns one result per job as :meth:`reserve_one` would, or an empty
        list when every job was reserved as placed (the common case, which a
        backend may answer without building a list). The default makes one
        :meth:`reserve_one` call per job.
        """
        pairs = pairs if pairs is not None else [None] * len(job_ids)
        results = [
            self.reserve_one(job_id, (int(slot), node_id(int(slot)), int(limit), int(run)), pool_id, session_id, now,
                             pair)
            for job_id, slot, limit, run, pool_id, session_id, pair in zip(
                job_ids, slots, limits, running, pool_ids, session_ids, pairs)
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
        """Move a live job's expiry to now + ``lease`` (default: the commit lease when
        committed, the reservation TTL otherwise). False, nothing changed, if refused."""
        raise NotImplementedError

    def expire(self) -> int:
        """Drop reservations past their TTL and jobs past their lease; return how many."""
        raise NotImplementedError

    def count(self, node_id: str | None = None) -> int:
        """Reservations held (for one node, or in total)."""
        raise NotImplementedError

    def stats(self) -> dict:
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
    """

    def __init__(
        self,
        reservation_ttl: float | None = None,
        clock: Callable[[], float] | None = None,
        *,
        commit_lease: float | None = None,
        core=default_core,
    ) -> None:
        self._lock = threading.Lock()  # management calls only (growth, binding)
        self._ttl = reservation_ttl
        self._lease = commit_lease
        self._clock = clock
        self._on_expired: Callable[[list[Reservation]], None] | None = None
        # slot <-> node id; a slot belongs to one node id for the scheduler's
        # life, so neither map ever loses an entry (held jobs of a removed node
        # still name it). Whether a live node owns a slot is the table's business.
        self._names: dict[int, str] = {}
        self._slots: dict[str, int] = {}
        self._counts = core.SlotCounts(0)
        self.inflight = self._counts.array
        self._table = core.JobTable(self._counts)

    # -- management side ---------------------------------------------------
    def configure(
        self,
        reservation_ttl: float,
        clock: Callable[[], float],
        *,
        commit_lease: float = 3600.0,
        on_expired: Callable[[list[Reservation]], None] | None = None,
    ) -> None:
        if self._ttl is None:
            self._ttl = float(reservation_ttl)
        if self._lease is None:
            self._lease = float(commit_lease)
        if self._clock is None:
            self._clock = clock
        self.commit_lease = self._lease
        self._on_expired = on_expired

    @property
    def due_at(self) -> float:  # type: ignore[override]
        """The earliest expiry of any held job: dispatch sweeps when the clock reaches it."""
        return self._table.next_expiry

    def ensure_capacity(self, n_slots: int) -> np.ndarray:
        with self._lock:
            if n_slots > len(self._counts):
                # grown() forwards the old table to the new one atomically, so a
                # job table or dispatch still holding the old one loses no update;
                # the kernel of an older snapshot keeps reading the old array (stale scores).
                self._counts = self._counts.grown(max(n_slots, 2 * len(self._counts), 64))
                self.inflight = self._counts.array
            return self.inflight

    def bind_node(self, slot: int, node_id: str, max_concurrency: int) -> None:
        with self._lock:
            self._names[slot] = node_id
            self._slots[node_id] = slot
            self._table.bind(slot)

    def unbind_node(self, slot: int, node_id: str) -> None:
        with self._lock:
            if self._names.get(slot) == node_id:
                self._table.unbind(slot)

    # -- dispatch side -----------------------------------------------------
    def reserve_one(
        self, job_id: str, candidate: Candidate, pool_id: int, session_id: str, now: float,
        pair: tuple[str, str] | None = None,
    ) -> Reservation | str | None:
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

    def reserve_placed(
        self,
        job_ids: Sequence[str],
        slots: np.ndarray,
        limits: np.ndarray,
        running: np.ndarray,
        pool_ids: Sequence[int],
        session_ids: Sequence[str],
        node_id: Callable[[int], str],
        now: float,
        pairs: Sequence[tuple[str, str]] | None = None,
    ) -> list[Reservation | str | None]:
        reserve = self._table.reserve
        expires = now + self._ttl
        results: list = []
        failed = False
        pairs = pairs if pairs is not None else [None] * len(job_ids)
        for job_id, slot, limit, run, pool_id, session_id, pair in zip(
                job_ids, slots.tolist(), limits.tolist(), running.tolist(), pool_ids, session_ids, pairs):
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
        candidates: Sequence[Candidate],
        pool_id: int,
        session_id: str,
    ) -> Reservation | list[str]:
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
        """-1 for "any node"; the node's slot; -2 for a node this backend never saw."""
        if node_id is None:
            return -1
        slot = self._slots.get(node_id)
        return -2 if slot is None else slot

    def get(self, job_id: str) -> Reservation | None:
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
        slot = self._slot_of(node_id)
        if slot == -2:
            return False
        now = self._clock()
        return self._table.commit(job_id, slot, now + self._lease, now)

    def renew(self, job_id: str, lease: float | None = None, node_id: str | None = None) -> bool:
        slot = self._slot_of(node_id)
        if slot == -2:
            return False
        now = self._clock()
        if lease is None:
            rec = self._table.get(job_id, now)
            if rec is None:
                return False
            lease = self._lease if rec[4] else self._ttl
        return self._table.renew(job_id, slot, now + lease, now)

    def release(self, job_id: str, node_id: str | None = None) -> bool:
        slot = self._slot_of(node_id)
        if slot == -2:
            return False
        return self._table.release(job_id, slot, self._clock()) is not None

    # -- jobs named by handle (Scheduler.dispatch_batch) ------------------
    def release_handle(self, handle: int, node_id: str | None = None) -> bool:
        """Release a batch job by its handle (only if held on ``node_id``, when given)."""
        slot = self._slot_of(node_id)
        return slot != -2 and self._table.release_handle(handle, slot, self._clock())

    def commit_handle(self, handle: int, node_id: str | None = None) -> bool:
        """Commit a batch job by its handle; it then holds capacity for the commit lease."""
        slot = self._slot_of(node_id)
        now = self._clock()
        return slot != -2 and self._table.commit_handle(handle, slot, now + self._lease, now)

    def release_handles(self, handles: np.ndarray) -> int:
        """Release every live batch job in ``handles``; how many were."""
        return self._table.release_handles(handles, self._clock())

    def commit_handles(self, handles: np.ndarray) -> int:
        """Commit every live batch job in ``handles``; how many were."""
        now = self._clock()
        return self._table.commit_handles(handles, now + self._lease, now)

    def expire(self) -> int:
        return self._sweep(self._clock())

    def expire_due(self, now: float) -> None:
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
        self.expire_due(self._clock())
        if node_id is None:
            return len(self._table)
        slot = self._slots.get(node_id)
        return 0 if slot is None else self._counts.get(slot)

    def stats(self) -> dict:
        table = self._table
        return {"name": "local", "available": True, "error": None, "held": len(table),
                "committed": table.committed, "expired": table.expired}

    def jobs(self) -> list[Reservation]:
        """Every job held, by job id (for inspection and tests)."""
        names = self._names
        return [Reservation(job_id, names[slot], slot, pool_id, session_id, expires_at, committed)
                for job_id, slot, pool_id, session_id, expires_at, committed in self._table.jobs()]


_FULL, _GONE = -1, -2
