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
from collections import deque
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
    """In-process reservations: one lock, exact, nothing leaks.

    A node's effective load is ``max(in-flight, reported running)``; a
    reservation succeeds only while that is below the node's max
    concurrency. Expired uncommitted reservations are swept lazily: the TTL
    is constant and the clock monotonic, so expiry times arrive in order and
    a FIFO queue replaces a heap.
    """

    def __init__(
        self,
        reservation_ttl: float | None = None,
        clock: Callable[[], float] | None = None,
        *,
        core=default_core,
    ) -> None:
        self._lock = threading.Lock()
        self._ttl = reservation_ttl
        self._clock = clock
        self._jobs: dict[str, Reservation] = {}
        self._expiry: deque[tuple[float, Reservation]] = deque()
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
                # One reference swap: the kernel of an older snapshot keeps
                # reading the old array, which only makes its scores stale.
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
    def try_reserve(
        self,
        job_id: str,
        candidates: Sequence[Candidate],
        pool_id: int,
        session_id: str,
    ) -> Reservation | list[str]:
        with self._lock:
            # read under the lock: the expiry queue relies on arriving in time order
            now = self._clock()
            expiry = self._expiry
            if expiry and expiry[0][0] <= now:
                self._expire_locked(now)
            existing = self._jobs.get(job_id)
            if existing is not None:
                return existing
            counts = self._counts
            owners = self._owners
            reasons: list[str] = []
            for slot, node_id, max_concurrency, running in candidates:
                if owners.get(slot) != node_id:
                    reasons.append(REFUSED_GONE)
                elif counts.try_add(slot, max_concurrency, running):
                    expires = now + self._ttl
                    res = Reservation(job_id, node_id, slot, pool_id, session_id, expires)
                    self._jobs[job_id] = res
                    expiry.append((expires, res))
                    return res
                else:
                    reasons.append(REFUSED_FULL)
            return reasons

    def get(self, job_id: str) -> Reservation | None:
        res = self._jobs.get(job_id)
        if res is not None and not res.committed and res.expires_at <= self._clock():
            self.expire()
            return self._jobs.get(job_id)
        return res

    def commit(self, job_id: str) -> bool:
        now = self._clock()
        with self._lock:
            if self._expiry and self._expiry[0][0] <= now:
                self._expire_locked(now)
            res = self._jobs.get(job_id)
            if res is None:
                return False
            res.committed = True
            return True

    def release(self, job_id: str) -> bool:
        with self._lock:
            res = self._jobs.pop(job_id, None)
            if res is None:
                return False
            self._drop_locked(res)
            expiry = self._expiry
            if len(expiry) > 2 * len(self._jobs) + 4096:
                # Released jobs linger in the queue until their expiry time;
                # compact it so a high dispatch rate cannot grow it unboundedly.
                jobs = self._jobs
                self._expiry = deque(e for e in expiry if not e[1].committed and jobs.get(e[1].job_id) is e[1])
            return True

    def expire(self) -> int:
        with self._lock:
            return self._expire_locked(self._clock())

    def expire_due(self, now: float) -> None:
        expiry = self._expiry
        if expiry and expiry[0][0] <= now:
            with self._lock:
                self._expire_locked(now)

    def count(self, node_id: str | None = None) -> int:
        if node_id is None:
            return len(self._jobs)
        slot = self._slots.get(node_id)
        return 0 if slot is None else self._counts.get(slot)

    # -- internals ---------------------------------------------------------
    def _drop_locked(self, res: Reservation) -> None:
        self._counts.add(res.slot, -1)

    def _expire_locked(self, now: float) -> int:
        expiry = self._expiry
        jobs = self._jobs
        dropped = 0
        while expiry and expiry[0][0] <= now:
            _, res = expiry.popleft()
            # Entries of released or committed jobs are skipped; identity (not
            # the job id) tells a later reservation under a reused id apart.
            if res.committed or jobs.get(res.job_id) is not res:
                continue
            del jobs[res.job_id]
            self._drop_locked(res)
            dropped += 1
        return dropped
