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

    __slots__ = ("job_id", "node_id", "slot", "pool_id", "session_id", "expires_at", "committed")

    def __init__(
        self,
        job_id: str,
        node_id: str,
        slot: int,
        pool_id: int,
        session_id: str,
        expires_at: float,
        committed: bool = False,
    ) -> None:
        self.job_id = job_id
        self.node_id = node_id
        self.slot = slot
        self.pool_id = pool_id
        self.session_id = session_id
        self.expires_at = expires_at
        self.committed = committed

    def __repr__(self) -> str:
        state = "committed" if self.committed else f"expires_at={self.expires_at:.3f}"
        return f"Reservation({self.job_id!r} -> {self.node_id!r}, pool={self.pool_id}, {state})"


class ReservationBackend:
    """Interface every reservation backend implements.

    The scheduler calls :meth:`configure` once, :meth:`ensure_capacity`,
    :meth:`bind_node` and :meth:`unbind_node` from its management layer
    (under the management lock), and the rest from the dispatch path.
    Implementations must be safe to call from many threads at once.
    """

    #: per-slot in-flight counts read by the kernel; replaced (never resized
    #: in place) by :meth:`ensure_capacity`.
    inflight: np.ndarray

    #: dispatch calls :meth:`expire_due` only once the clock reaches this
    #: (a plain attribute read on the hot path); 0 means "always call".
    due_at: float = 0.0

    def configure(self, reservation_ttl: float, clock: Callable[[], float]) -> None:
        """Receive the scheduler's TTL and clock (called once, before use)."""
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
        self, job_id: str, candidate: Candidate, pool_id: int, session_id: str, now: float
    ) -> Reservation | str | None:
        """Single-candidate fast path used by dispatch.

        ``candidate`` is ``(slot, node_id, max_concurrency, running, ...)``:
        extra trailing fields are ignored. Returns ``None`` when ``candidate`` was reserved for ``job_id``, a
        refusal reason string when it was not, or a :class:`Reservation`
        (the one ``job_id`` already held, or the new one) whose node and pool
        the caller then uses. ``now`` is the caller's reading of the
        scheduler's clock. The default delegates to :meth:`try_reserve`.
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
    ) -> list[Reservation | str | None]:
        """Reserve a placed batch: job ``job_ids[k]`` on slot ``slots[k]``.

        Returns one result per job as :meth:`reserve_one` would, or an empty
        list when every job was reserved as placed (the common case, which a
        backend may answer without building a list). The default makes one
        :meth:`reserve_one` call per job.
        """
        results = [
            self.reserve_one(job_id, (int(slot), node_id(int(slot)), int(limit), int(run)), pool_id, session_id, now)
            for job_id, slot, limit, run, pool_id, session_id in zip(
                job_ids, slots, limits, running, pool_ids, session_ids)
        ]
        return results if any(r is not None for r in results) else []

    def get(self, job_id: str) -> Reservation | None:
        """The live reservation of ``job_id``, or ``None``."""
        raise NotImplementedError

    def commit(self, job_id: str) -> bool:
        """Mark a reservation accepted: it stops expiring. False if unknown."""
        raise NotImplementedError

    def release(self, job_id: str) -> bool:
        """Return the job's capacity. Idempotent: False if nothing was held."""
        raise NotImplementedError

    def expire(self) -> int:
        """Drop uncommitted reservations past their TTL; return how many."""
        raise NotImplementedError

    def count(self, node_id: str | None = None) -> int:
        """Reservations held (for one node, or in total)."""
        raise NotImplementedError

    def expire_due(self, now: float) -> None:
        """Cheap check, called before every dispatch: sweep if something expired by ``now``.

        Expired capacity must be visible to the kernel's scoring before it
        picks, or it would call a node full that has room again.
        """

    def close(self) -> None:
        """Release any resources held (threads, connections)."""


class LocalReservations(ReservationBackend):
    """In-process reservations, exact, with no lock on the dispatch path.

    A node's effective load is ``max(in-flight, reported running)``; a
    reservation succeeds only while that is below the node's max
    concurrency. The check-and-add is one call into the compiled
    ``SlotCounts`` (atomic under the GIL) and the job table is a dict whose
    ``setdefault``/``pop`` are atomic too, so reserving and releasing take no
    Python lock: with one, a thread preempted inside it made every other
    dispatching thread queue behind it (p50 went from ~7 to ~60 us with four
    threads). Commit and the expiry sweep share a small lock.

    Expiry: nothing is queued per reservation (most jobs are committed or
    released long before their TTL). The backend tracks the earliest expiry
    among uncommitted reservations; once the clock passes it, the next
    dispatch sweeps the live reservations (at most once per ``ttl/64``), so
    expired capacity returns at the TTL, or within ``ttl/64`` of it under a
    stream of staggered expiries. ``get``, ``commit`` and ``expire`` are exact.
    """

    def __init__(
        self,
        reservation_ttl: float | None = None,
        clock: Callable[[], float] | None = None,
        *,
        core=default_core,
    ) -> None:
        self._lock = threading.Lock()  # commit, expiry sweep and management calls
        self._ttl = reservation_ttl
        self._clock = clock
        # job id -> [node_id, slot, pool_id, session_id, expires_at, committed]
        self._jobs: dict[str, list] = {}
        self._earliest = float("inf")  # earliest expiry of an uncommitted reservation (a lower bound)
        self._last_sweep = float("-inf")
        self.due_at = float("inf")
        # slot -> node id bound there (refuses reservations on removed nodes),
        # and node id -> slot for counting
        self._owners: dict[int, str] = {}
        self._slots: dict[str, int] = {}
        self._counts = core.SlotCounts(0)
        self.inflight = self._counts.array

    # -- management side ---------------------------------------------------
    def configure(self, reservation_ttl: float, clock: Callable[[], float]) -> None:
        if self._ttl is None:
            self._ttl = float(reservation_ttl)
        if self._clock is None:
            self._clock = clock

    def ensure_capacity(self, n_slots: int) -> np.ndarray:
        with self._lock:
            if n_slots > len(self._counts):
                # grown() forwards the old table to the new one atomically, so a
                # dispatch still holding the old one loses no update; the kernel
                # of an older snapshot keeps reading the old array (stale scores).
                self._counts = self._counts.grown(max(n_slots, 2 * len(self._counts), 64))
                self.inflight = self._counts.array
            return self.inflight

    def bind_node(self, slot: int, node_id: str, max_concurrency: int) -> None:
        with self._lock:
            self._owners[slot] = node_id
            self._slots[node_id] = slot

    def unbind_node(self, slot: int, node_id: str) -> None:
        with self._lock:
            if self._owners.get(slot) == node_id:
                del self._owners[slot]

    # -- dispatch side -----------------------------------------------------
    def reserve_one(
        self, job_id: str, candidate: Candidate, pool_id: int, session_id: str, now: float
    ) -> Reservation | str | None:
        jobs = self._jobs
        existing = jobs.get(job_id)
        if existing is not None:
            return self._view(job_id, existing)
        slot = candidate[0]  # by index: a candidate may carry more fields (the pool index)
        node_id = candidate[1]
        if self._owners.get(slot) != node_id:
            return REFUSED_GONE
        if not self._counts.try_add(slot, candidate[2], candidate[3]):
            return REFUSED_FULL
        expires = now + self._ttl
        rec = [node_id, slot, pool_id, session_id, expires, False]
        held = jobs.setdefault(job_id, rec)
        if held is not rec:
            # another thread reserved the same job id a moment earlier: undo ours
            self._counts.add(slot, -1)
            return self._view(job_id, held)
        if expires < self._earliest:
            # Unlocked: a racing writer can only leave a later value, which the
            # ttl/64 sweep spacing bounds anyway.
            self._earliest = expires
            self.due_at = max(expires, self._last_sweep + self._ttl / 64)
        return None

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
    ) -> list[Reservation | str | None]:
        # One compiled call checks and adds every slot; records follow in one loop.
        ok = self._counts.try_add_many(slots, limits.astype(np.int64), running.astype(np.int64))
        jobs, owners = self._jobs, self._owners
        expires = now + self._ttl
        results: list = []
        failed = False
        for k, slot in enumerate(slots.tolist()):
            node = node_id(slot)
            if not ok[k] or owners.get(slot) != node:
                if ok[k]:
                    self._counts.add(slot, -1)
                results.append(REFUSED_FULL if not ok[k] else REFUSED_GONE)
                failed = True
                continue
            job_id = job_ids[k]
            rec = [node, slot, pool_ids[k], session_ids[k], expires, False]
            held = jobs.setdefault(job_id, rec)
            if held is not rec:
                self._counts.add(slot, -1)
                results.append(self._view(job_id, held))
                failed = True
                continue
            results.append(None)
        if expires < self._earliest and len(slots):
            self._earliest = expires
            self.due_at = max(expires, self._last_sweep + self._ttl / 64)
        return results if failed else []

    def try_reserve(
        self,
        job_id: str,
        candidates: Sequence[Candidate],
        pool_id: int,
        session_id: str,
    ) -> Reservation | list[str]:
        now = self._clock()
        reasons: list[str] = []
        for cand in candidates:
            result = self.reserve_one(job_id, cand, pool_id, session_id, now)
            if result is None:
                return self._view(job_id, self._jobs[job_id])
            if isinstance(result, Reservation):
                return result
            reasons.append(result)
        return reasons

    def get(self, job_id: str) -> Reservation | None:
        rec = self._jobs.get(job_id)
        if rec is None:
            return None
        if not rec[5] and rec[4] <= self._clock():
            with self._lock:
                self._drop_if_expired_locked(job_id, rec)
            return None
        return self._view(job_id, rec)

    def commit(self, job_id: str) -> bool:
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is None or self._drop_if_expired_locked(job_id, rec):
                return False
            rec[5] = True
            return True

    def release(self, job_id: str) -> bool:
        rec = self._jobs.pop(job_id, None)
        if rec is None:
            return False
        self._counts.add(rec[1], -1)
        return True

    def expire(self) -> int:
        with self._lock:
            return self._sweep_locked(self._clock())

    def expire_due(self, now: float) -> None:
        if now >= self.due_at:
            with self._lock:
                if now >= self.due_at:
                    self._sweep_locked(now)

    def count(self, node_id: str | None = None) -> int:
        self.expire_due(self._clock())
        if node_id is None:
            return len(self._jobs)
        slot = self._slots.get(node_id)
        return 0 if slot is None else self._counts.get(slot)

    # -- internals ---------------------------------------------------------
    @staticmethod
    def _view(job_id: str, rec: list) -> Reservation:
        return Reservation(job_id, rec[0], rec[1], rec[2], rec[3], rec[4], rec[5])

    def _drop_if_expired_locked(self, job_id: str, rec: list) -> bool:
        """Drop one uncommitted reservation past its TTL; True if it was (or already is) gone."""
        if rec[5] or rec[4] > self._clock():
            return False
        popped = self._jobs.pop(job_id, None)
        if popped is rec:
            self._counts.add(rec[1], -1)
        elif popped is not None:
            self._jobs.setdefault(job_id, popped)  # a newer reservation under the same id
        return True

    def _sweep_locked(self, now: float) -> int:
        jobs = self._jobs
        dropped = 0
        earliest = float("inf")
        for job_id, rec in list(jobs.items()):
            if rec[5]:
                continue
            if rec[4] > now:
                if rec[4] < earliest:
                    earliest = rec[4]
                continue
            popped = jobs.pop(job_id, None)
            if popped is rec:
                self._counts.add(rec[1], -1)
                dropped += 1
            elif popped is not None:
                # released and re-reserved under the same id meanwhile: keep it
                jobs.setdefault(job_id, popped)
        self._earliest = earliest
        self._last_sweep = now
        self.due_at = max(earliest, now + self._ttl / 64)
        return dropped
