"""Capacity reservations shared by every scheduler process through Redis.

:class:`RedisReservations` implements :class:`~pysched.reservations.ReservationBackend`
with the semantics of :class:`~pysched.reservations.LocalReservations`, but
the decision lives in Redis so that several scheduler processes (or hosts)
never oversell a node between them.

Design, and the reference defects it avoids
-------------------------------------------
* **No counters.** Per node there is a sorted set of uncommitted
  reservations and a sorted set of committed jobs, each scored by its
  expiry time (server time, ms). Load is counted by pruning dead entries
  first (``ZREMRANGEBYSCORE``), so a scheduler that crashed between
  dispatch and commit leaks nothing: its reservations drop out by
  themselves. There is no ``reserved`` counter that could leak on expiry,
  and nothing a heartbeat could reset (:meth:`RedisReservations.bind_node`
  only writes the node's *max*), so heartbeats never wipe live
  reservations.
* **A shortlist, not a single node.** One script call receives the ordered
  candidates and takes the first that has room; if none has, it returns one
  refusal reason per candidate. That is one round trip per dispatch
  attempt (:attr:`RedisReservations.round_trips` lets a benchmark check);
  only a process's first call, and its first after Redis lost its data,
  cost more: the answer ``epoch``, then one call per 200 jobs held to
  join the dataset (see below), then the call itself.
* **Redis Cluster ready.** Every key of a namespace starts with the same
  hash tag (``{<namespace>}:``), so all keys of one call hash to one slot,
  and every key a script touches is passed in ``KEYS``.
* **Server time.** Scripts read ``TIME``; the hosts' clocks never decide
  whether a reservation is alive.

Key layout (``T`` = ``{<namespace>}``)::

    T:max:<node>      string  max concurrency (written by bind_node, no TTL)
    T:resv:<node>     zset    uncommitted job ids, score = reservation expiry
    T:lease:<node>    zset    committed job ids, score = lease expiry
    T:job:<job>       hash    node, pool, session, committed, exp, holder
    T:jobs            zset    every live job of the namespace, score = expiry
    T:epoch           hash    id, born: names this dataset (no TTL)
    T:holders         zset    processes holding jobs, score = liveness deadline
    T:recovering      zset    holders awaited after a data loss, score = deadline
    T:inbox:<holder>  hash    job -> what another process did to it (gone / commit, renewal)
    T:tombs           zset    jobs released shortly after a data loss, score = end

Zsets, job records, inboxes and tombstones carry a Redis TTL a little longer
than their newest entry, so a node or process nobody touches any more
leaves nothing behind.

Faults
------
A connection failure or timeout (or a server still loading its data, a
read-only replica after a failover, a cluster that is down) raises
:class:`~pysched.errors.ReservationBackendUnavailable` with the redis error
chained, and changes no local state: the ``inflight`` mirror is only
updated after the server confirmed. If the *reply* was lost (a timeout
after the script ran), the reservation may exist in Redis; it expires by
itself, and retrying ``try_reserve`` with the same job id returns it (and
this process tracks it again). Writes of a node's max concurrency
(:meth:`~RedisReservations.bind_node`, :meth:`~RedisReservations.unbind_node`)
never raise: during an outage they are queued and sent before the next
reservation or refresh.

**Redis losing its data** (restart without persistence, failover to an empty
replica) while the processes holding jobs live on. Every script checks the
dataset's epoch first; a process that has not joined the current one gets
``epoch`` back and *recovers* before doing anything else: one script call
(per 200 jobs) writes back every job it holds, uncommitted or committed,
with its remaining lifetime. If it knew an earlier dataset and this one is
young (born less than ``recovery_grace`` ago), it also names every holder
it saw alive at its last refresh (``T:holders``, kept up to date by every
reservation and refresh): reservations are refused with ``"recovering"``
until each of them has re-asserted too, or ``recovery_grace`` seconds have
passed for one that does not (presumed dead). Whoever has re-asserted,
reservations are also refused until the dataset is ``recovery_quiet``
seconds old: a holder whose first reservation came after every other
process's last refresh is in nobody's list, but it finds the loss at its own
next refresh, well within that period. Meanwhile :meth:`refresh_inflight`
never lowers the in-flight mirror (Redis's zeros are not the truth yet).
Releases, commits and renewals a process made of *other* processes' jobs
reach their holder through its inbox at its next refresh; those made in the
last ``recovery_grace`` seconds are replayed by the process that made them
when it recovers (a release becomes a tombstone that stops the holder's
re-assertion), so a job released just before the loss does not come back.

What is left (the README's "Faults" section lists it): a holder that cannot
reach Redis within ``recovery_grace`` of the loss, or that is in nobody's
list of holders and cannot reach Redis within ``recovery_quiet``, is not
waited for, and its jobs are not counted until it re-asserts; a process
that never saw the namespace (started after the loss) and makes the very
first call creates the new dataset without waiting, until
the first process that knew the old one arrives (at most one refresh
interval later). A failover to a replica that lags (has the epoch, lacks the
latest writes) is not detected: the lost reservations are not counted until
released or expired.

Timeouts belong to the client: build it with ``socket_timeout`` and
``socket_connect_timeout`` (and, for fail-fast dispatch, with its retries
turned down, e.g. ``retry=Retry(NoBackoff(), 0)``: redis-py retries
connection errors by default, and :attr:`round_trips` only counts the
calls this object makes). :meth:`RedisReservations.from_url` builds such a
client.

``redis`` (redis-py) is an optional dependency, imported only when a
:class:`RedisReservations` is constructed: ``pip install "pysched[redis]"``.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from pysched.errors import ReservationBackendUnavailable
from pysched.redis._scripts import RedisClient, Script, ScriptClient, import_redis, shipped, text
from pysched.reservations import Candidate, CandidateTuple, Reservation, ReservationBackend

__all__ = ["REFUSED_RECOVERING", "RedisReservations"]

log = logging.getLogger(__name__)

#: Refusal reason: Redis lost its data and not every process holding jobs has
#: written them back yet, so no node's load can be trusted.
REFUSED_RECOVERING = "recovering"

#: Extra lifetime (ms) given to keys beyond their newest entry (reserve.lua
#: and settle.lua hold the same constant). The exact liveness test uses the
#: stored expiry, never the key TTL, so this only needs to cover the gap
#: between two commands inside one script.
_KEY_MARGIN_MS = 5000

#: jobs written back per recovery call (each is 3 keys and 7 arguments)
_RECOVER_CHUNK = 200

_INF = math.inf
#: the expiry heap is rebuilt once it holds this many entries and 4x the live jobs
_HEAP_MIN_REBUILD = 64
def _job_id(res: Reservation) -> str:
    """A Redis job's id: always a string (integer handles exist only in-process)."""
    return res.job_id  # type: ignore[return-value]  # made here from str ids only


#: locks that order one job's round trips (see RedisReservations.__init__)
_JOB_LOCK_STRIPES = 256


class _Foreign(NamedTuple):
    """A settle this process made of another process's job, replayed by :meth:`RedisReservations._recover`."""

    at: float  #: local time of the settle
    kind: str  #: "gone" (released) or "held" (committed or renewed)
    node: str
    pool: int
    session: str
    committed: bool
    expires_at: float  #: local estimate
    holder: str  #: the process holding the job ("" when gone)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == _INF:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


class RedisReservations(ReservationBackend):
    """Reservations held in Redis, shared by every scheduler of a namespace.

    :param client: a constructed ``redis.Redis`` (``decode_responses`` either
        way). It is shared, never closed here; redis-py clients are
        thread-safe through their connection pool. Set its
        ``socket_timeout``/``socket_connect_timeout``: they bound how long a
        dispatch waits before :class:`ReservationBackendUnavailable`.
    :param namespace: isolates independent fleets on one server; it becomes
        the hash tag of every key, so it must not contain ``{`` or ``}``.
    :param reservation_ttl: seconds an uncommitted reservation lives; when
        ``None``, :meth:`configure` supplies the scheduler's value.
    :param commit_lease: seconds a committed job holds its capacity unless
        :meth:`renew` extends it, so a node that dies mid-job, or a lost
        ``release``, frees the capacity eventually; when ``None``,
        :meth:`configure` supplies the scheduler's ``commit_lease``.
    :param shortlist: how many candidates one script call tries. A caller
        passing at most this many gets exactly one round trip per attempt;
        longer lists are tried in further calls of this size, only while
        every earlier candidate refused.
    :param recovery_grace: seconds, after Redis lost its data, that
        reservations wait for a process known to hold jobs to write them
        back; also how long a holder stays known without a reservation or a
        :meth:`refresh_inflight` (call that well within this period:
        :class:`~pysched.RedisFleet` does it every ``refresh_interval``).
    :param recovery_quiet: seconds, from the moment Redis lost its data
        (the new dataset's birth), during which every reservation is refused
        with ``"recovering"`` whoever has re-asserted: a process whose first
        job came after every other process's last refresh is in nobody's
        list of holders, and finds the loss only at its own next refresh.
        Keep it above the longest refresh period of any process in the
        namespace; :class:`~pysched.RedisFleet` raises it to twice its
        ``refresh_interval``. ``0`` turns the quiet period off.
    :param holder_id: names this process in Redis (default: host, pid and a
        random suffix); unique per process, printable.

    Differences from :class:`~pysched.reservations.LocalReservations`:

    * a node's capacity is the max written to Redis by :meth:`bind_node`
      (by any process); ``Candidate.max_concurrency`` is not consulted.
      A node absent from Redis (never bound, or unbound) refuses with
      ``"offline"``; while Redis recovers from a data loss every node
      refuses with ``"recovering"``;
    * :attr:`inflight` counts reservations this process made, and
      :meth:`refresh_inflight` overwrites it with the fleet-wide counts
      (the fleet sync calls it about once a second);
    * ``Reservation.expires_at`` is an estimate in the local clock's frame,
      never earlier than Redis's (local time at the reply + the remaining
      lifetime): the authoritative expiry is in Redis;
    * expiry: :meth:`expire_due` (called by dispatch) moves this process's
      jobs past their local expiry out of the mirror at once, with no
      network call; :meth:`refresh_inflight` or :meth:`expire` then confirm
      in Redis that nobody renewed them elsewhere and report them to
      ``on_expired``. Without :class:`~pysched.RedisFleet`, call
      :meth:`refresh_inflight` periodically.

    Threads: any (dispatch threads call the reservation methods; the
    scheduler's management calls :meth:`bind_node`; the fleet's applier
    thread calls :meth:`refresh_inflight`). The local tables (the mirror of
    this process's jobs, :attr:`inflight`, the node slots, queued writes)
    are guarded by one lock, never held across a round trip; one job's
    round trips are ordered by a striped per-job lock, capacity writes by a
    write lock. The scripts live in ``pysched/redis/lua``; every Redis call
    goes through one :class:`~pysched.redis._scripts.ScriptClient`.
    """

    def __init__(
        self,
        client: RedisClient,
        namespace: str = "pysched",
        reservation_ttl: float | None = None,
        commit_lease: float | None = None,
        shortlist: int = 4,
        *,
        recovery_grace: float = 5.0,
        recovery_quiet: float = 2.0,
        holder_id: str | None = None,
    ) -> None:
        # First: without redis-py, say which extra to install before anything else.
        calls = ScriptClient(client, "reservation backend unavailable", "RedisReservations")
        if not isinstance(namespace, str) or not namespace or "{" in namespace or "}" in namespace:
            raise ValueError(f"namespace must be a non-empty string without braces, got {namespace!r}")
        if reservation_ttl is not None and not reservation_ttl > 0:
            raise ValueError(f"reservation_ttl must be > 0 seconds, got {reservation_ttl!r}")
        if commit_lease is not None and not commit_lease > 0:
            raise ValueError(f"commit_lease must be > 0 seconds, got {commit_lease!r}")
        if isinstance(shortlist, bool) or not isinstance(shortlist, int) or shortlist < 1:
            raise ValueError(f"shortlist must be an int >= 1, got {shortlist!r}")
        recovery_grace = _positive(recovery_grace, "recovery_grace")
        if isinstance(recovery_quiet, bool) or not isinstance(recovery_quiet, (int, float)) \
                or not 0 <= recovery_quiet < _INF:
            raise ValueError(f"recovery_quiet must be a number of seconds >= 0, got {recovery_quiet!r}")
        if holder_id is None:
            holder_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        elif not isinstance(holder_id, str) or not holder_id or not holder_id.isprintable():
            # printable: the recovery script's quiet-period entry is a name no holder can have
            raise ValueError(f"holder_id must be a non-empty printable str, got {holder_id!r}")

        self._client = client
        self.namespace = namespace
        self.holder_id = holder_id
        self._tag = "{" + namespace + "}:"
        self._ttl: float | None = None if reservation_ttl is None else float(reservation_ttl)
        self._lease_given = commit_lease is not None
        self.commit_lease = 3600.0 if commit_lease is None else float(commit_lease)
        self.shortlist = shortlist
        self.recovery_grace = recovery_grace
        self.recovery_quiet = float(recovery_quiet)
        self._clock: Callable[[], float] = time.monotonic
        self._clock_configured = False
        self._on_expired: Callable[[list[Reservation]], None] | None = None

        # Every call goes through here: classified errors (an outage becomes
        # ReservationBackendUnavailable), NOSCRIPT fallback, round trips counted.
        self._redis = calls

        self._reserve = shipped("reserve")
        self._settle = shipped("settle")
        self._get = shipped("get")
        self._counts = shipped("counts")
        self._refresh = shipped("refresh")
        self._recover_script = shipped("recover")

        self._lock = threading.Lock()  # the local tables below
        self._recover_lock = threading.Lock()  # one recovery at a time
        self._write_lock = threading.Lock()  # capacity writes (max concurrency), in order
        # One job's round trips apply to the local tables in the order Redis ran
        # them: a commit whose reply is read after a concurrent release (run
        # later in Redis) would bring the released job back into the mirror.
        # Striped by job id so unrelated jobs never wait on each other's calls.
        self._job_locks = tuple(threading.Lock() for _ in range(_JOB_LOCK_STRIPES))
        # job id -> live reservation *this* process holds (what the mirror counts)
        self._jobs: dict[str, Reservation] = {}
        # jobs past their local expiry, out of the mirror, not yet confirmed dead in Redis
        self._suspects: dict[str, Reservation] = {}
        self._heap: list[tuple[float, str]] = []
        self.due_at = _INF
        self._slot_node: dict[int, str] = {}
        self._node_slot: dict[str, int] = {}
        # node id -> max concurrency (None: delete) still to be written (Redis was down)
        self._writes: dict[str, int | None] = {}
        # settles of other processes' jobs, replayed after a data loss
        self._foreign: dict[str, _Foreign] = {}
        self._epoch: str | None = None  # the dataset this process has joined
        self._joined_at = -_INF
        self._holders_seen: tuple[str, ...] = ()
        self._live_until = -_INF  # local time until which Redis lists this process as a holder
        self._recovering = False
        self._counters = dict.fromkeys(("expired", "recoveries", "reasserted", "queued_writes"), 0)
        self.inflight = np.zeros(0, dtype=np.int32)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 1.0,
        retries: int = 0,
        **kwargs: Any,
    ) -> RedisReservations:
        """Build a client for ``url`` that fails fast, and a backend on it.

        ``timeout`` becomes the client's ``socket_timeout`` and
        ``socket_connect_timeout``; ``retries`` is how many times redis-py
        retries a failed call by itself (0: fail fast and let the scheduler
        decide). Other keyword arguments go to :class:`RedisReservations`.
        """
        redis = import_redis("RedisReservations")
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), retries),
        )
        return cls(client, **kwargs)

    # -- keys ----------------------------------------------------------------
    def _k_max(self, node_id: str) -> str:
        return f"{self._tag}max:{node_id}"

    def _k_resv(self, node_id: str) -> str:
        return f"{self._tag}resv:{node_id}"

    def _k_lease(self, node_id: str) -> str:
        return f"{self._tag}lease:{node_id}"

    def _k_job(self, job_id: str) -> str:
        return f"{self._tag}job:{job_id}"

    def _k_inbox(self, holder: str) -> str:
        return f"{self._tag}inbox:{holder}"

    @property
    def _k_jobs(self) -> str:
        return f"{self._tag}jobs"

    @property
    def _k_epoch(self) -> str:
        return f"{self._tag}epoch"

    @property
    def _k_pending(self) -> str:
        return f"{self._tag}recovering"

    @property
    def _k_holders(self) -> str:
        return f"{self._tag}holders"

    @property
    def _k_tombs(self) -> str:
        return f"{self._tag}tombs"

    # -- transport -------------------------------------------------------------
    @property
    def round_trips(self) -> int:
        """Network calls this object has made (settable, e.g. to reset to 0)."""
        return self._redis.round_trips

    @round_trips.setter
    def round_trips(self, value: int) -> None:
        self._redis.round_trips = value

    def _run(self, script: Script, keys: Sequence[str], tail: Sequence[Any]) -> Any:
        """Call a script whose first argument is this process's epoch.

        A script answering ``epoch`` refused to run in a dataset this
        process has not joined: recover (write back what it holds), then
        call again.
        """
        for _ in range(4):
            known = self._epoch or ""
            reply = self._redis.eval(script, keys, [known, *tail])
            if text(reply[0]) != "epoch":
                return reply
            self._recover(known)
        raise ReservationBackendUnavailable(
            "reservation backend unavailable (Redis kept losing its data while this process re-joined)")

    def load_scripts(self) -> None:
        """Cache every script on the server now (one call per script).

        Optional warm-up: otherwise the first use of each script after a
        server start or ``SCRIPT FLUSH`` costs one extra round trip
        (``NOSCRIPT``, then ``EVAL``).
        """
        for script in (self._reserve, self._settle, self._get, self._counts, self._refresh,
                       self._recover_script):
            self._redis.load(script)

    # -- management side -------------------------------------------------------
    def configure(
        self,
        reservation_ttl: float,
        clock: Callable[[], float],
        *,
        commit_lease: float = 3600.0,
        on_expired: Callable[[list[Reservation]], None] | None = None,
    ) -> None:
        """Take the scheduler's TTL, commit lease (unless given at construction), clock and expiry callback.

        The clock only dates the local estimates (``expires_at`` and the
        mirror's expiry); Redis decides by its own time. ``on_expired`` is
        called, with no lock held, with the jobs this process held whose TTL
        or lease ended (confirmed in Redis), from :meth:`refresh_inflight`
        or :meth:`expire`.
        """
        if self._ttl is None:
            if not reservation_ttl > 0:
                raise ValueError(f"reservation_ttl must be > 0 seconds, got {reservation_ttl!r}")
            self._ttl = float(reservation_ttl)
        if not self._lease_given:
            if not commit_lease > 0:
                raise ValueError(f"commit_lease must be > 0 seconds, got {commit_lease!r}")
            self.commit_lease = float(commit_lease)
        if not self._clock_configured:
            self._clock = clock
            self._clock_configured = True
        if on_expired is not None and not callable(on_expired):
            raise TypeError(f"on_expired must be callable or None, got {on_expired!r}")
        self._on_expired = on_expired

    def ensure_capacity(self, n_slots: int) -> npt.NDArray[np.int32]:
        """Make :attr:`inflight` hold at least ``n_slots`` entries; return it."""
        with self._lock:
            if n_slots > len(self.inflight):
                grown = np.zeros(max(n_slots, 2 * len(self.inflight), 64), dtype=np.int32)
                grown[: len(self.inflight)] = self.inflight
                # One reference swap: a kernel holding the old array keeps
                # reading valid (merely stale) counts.
                self.inflight = grown
            return self.inflight

    def bind_node(self, slot: int, node_id: str, max_concurrency: int) -> None:
        """Publish the node's max concurrency in Redis and remember its slot.

        Only the max is written: live reservations are never touched, so
        calling this on every heartbeat that changes the max is safe. Never
        raises for an outage: the write is queued and sent before the next
        reservation or refresh (until then reservations on the node refuse
        it as ``"offline"`` if Redis never had its max).
        """
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, (int, np.integer)) \
                or max_concurrency < 0:
            raise ValueError(f"max_concurrency must be an int >= 0, got {max_concurrency!r}")
        with self._lock:
            old = self._slot_node.get(slot)
            if old is not None and old != node_id and self._node_slot.get(old) == slot:
                del self._node_slot[old]
            self._slot_node[slot] = node_id
            self._node_slot[node_id] = slot
        self._write_max(node_id, int(max_concurrency))

    def unbind_node(self, slot: int, node_id: str) -> None:
        """Delete the node's max from Redis: later reserves answer ``"offline"``.

        Existing reservations stay until released or expired, as with
        :class:`~pysched.reservations.LocalReservations`. Queued, like
        :meth:`bind_node`, while Redis is unreachable.
        """
        with self._lock:
            if self._slot_node.get(slot) == node_id:
                del self._slot_node[slot]
            if self._node_slot.get(node_id) == slot:
                del self._node_slot[node_id]
        self._write_max(node_id, None)

    def _write_max(self, node_id: str, value: int | None) -> None:
        # One writer at a time: a queued (older) value sent by a flush must
        # never land after a newer one written here.
        with self._write_lock:
            try:
                if value is None:
                    self._redis.execute("DEL", self._k_max(node_id))
                else:
                    self._redis.execute("SET", self._k_max(node_id), value)
            except ReservationBackendUnavailable:
                with self._lock:
                    self._writes[node_id] = value
                    self._counters["queued_writes"] += 1
                return
            with self._lock:
                self._writes.pop(node_id, None)  # superseded

    def _flush_writes(self) -> None:
        """Send the capacity writes queued during an outage (one pipeline)."""
        with self._write_lock:
            self._flush_writes_locked()

    def _flush_writes_locked(self) -> None:
        with self._lock:
            writes = dict(self._writes)
        if not writes:
            return
        pipe = self._client.pipeline(transaction=False)
        for node, value in writes.items():
            if value is None:
                pipe.delete(self._k_max(node))
            else:
                pipe.set(self._k_max(node), value)
        self._redis.execute_pipeline(pipe)
        with self._lock:
            for node, value in writes.items():
                if node in self._writes and self._writes[node] == value:
                    del self._writes[node]

    # -- dispatch side ---------------------------------------------------------
    def try_reserve(
        self,
        job_id: str,
        candidates: Sequence[CandidateTuple],
        pool_id: int,
        session_id: str,
    ) -> Reservation | list[str]:
        """Reserve the first candidate with room, in one round trip.

        Returns the :class:`Reservation`; the job's existing live
        reservation if it has one (on whichever node, made by whichever
        process: retries are safe); otherwise one reason per candidate,
        ``"full"``, ``"offline"`` or ``"recovering"``.
        """
        ttl = self._ttl
        if ttl is None:
            raise RuntimeError("reservation_ttl is not set: pass it to RedisReservations or call configure()")
        if self._writes:
            self._flush_writes()  # only after an outage
        with self._job_lock(job_id):
            return self._try_reserve(job_id, ttl, candidates, pool_id, session_id)

    def _job_lock(self, job_id: str) -> threading.Lock:
        return self._job_locks[hash(job_id) % _JOB_LOCK_STRIPES]

    def _try_reserve(
        self, job_id: str, ttl: float, candidates: Sequence[CandidateTuple], pool_id: int, session_id: str
    ) -> Reservation | list[str]:
        ttl_ms = _ms(ttl)
        # plain (slot, node_id, max, running) tuples are Candidates too
        cands = [c if isinstance(c, Candidate) else Candidate(*c[:4]) for c in candidates]
        reasons: list[str] = []
        step = self.shortlist
        start = 0
        # Renew this process's entry among the holders only when it is half
        # way to lapsing (a reservation made now must be waited for after a
        # data loss, and the entry may be gone if it held nothing).
        local_before = self._clock()
        grace = self.recovery_grace
        live_ms = _ms(grace) if local_before > self._live_until - grace / 2 else 0
        while True:
            chunk = cands[start : start + step]
            keys = [self._k_epoch, self._k_pending, self._k_holders, self._k_job(job_id), self._k_jobs]
            tail: list[Any] = [self.holder_id, live_ms, job_id, ttl_ms, int(pool_id), session_id]
            for cand in chunk:
                node = cand.node_id
                keys += (self._k_max(node), self._k_resv(node), self._k_lease(node))
                tail += (node, int(cand.running))
            reply = self._run(self._reserve, keys, tail)
            local_after = self._clock()
            kind = text(reply[0])
            if kind == "ok":
                if live_ms:
                    self._live_until = local_before + grace
                cand = chunk[int(reply[1]) - 1]
                expires_at = local_after + (int(reply[2]) - int(reply[3])) / 1000.0
                res = Reservation(job_id, cand.node_id, cand.slot, int(pool_id), session_id, expires_at)
                with self._lock:
                    # A stale local entry under the same id (its reservation
                    # died in Redis) must give its slot back first.
                    self._forget_locked(job_id)
                    self._track_locked(res)
                return res
            if kind == "existing":
                return self._adopt(job_id, reply[1:], local_after)
            reasons += [text(r) for r in reply[1:]]
            start += step
            if start >= len(cands):
                return reasons

    def get(self, job_id: str) -> Reservation | None:
        """The job's live reservation as Redis holds it, or ``None`` (never one past its expiry)."""
        with self._job_lock(job_id):
            reply = self._run(self._get, [self._k_epoch, self._k_job(job_id)], [])
            local_after = self._clock()
            if text(reply[0]) != "live":
                with self._lock:
                    self._forget_locked(job_id, suspects=False)
                return None
            return self._adopt(job_id, reply[1:], local_after)

    def commit(self, job_id: str, node_id: str | None = None) -> bool:
        """Move the reservation to the node's leases: it holds capacity for ``commit_lease``.

        Committing twice is fine (the lease is left alone; :meth:`renew`
        extends it). False, nothing changed, if the job holds no live
        reservation, or (with ``node_id``) holds it on another node.
        """
        return self._settle_job(job_id, "commit", node_id)

    def renew(self, job_id: str, lease: float | None = None, node_id: str | None = None) -> bool:
        """Move a live job's expiry to now + ``lease``.

        The default is ``commit_lease`` for a committed job, the
        reservation TTL for an uncommitted one. False, nothing changed, if
        the job is unknown or expired, or (with ``node_id``) held on another node.
        """
        return self._settle_job(job_id, "renew", node_id, lease)

    def release(self, job_id: str, node_id: str | None = None) -> bool:
        """Give the job's capacity back. Idempotent: False if nothing was held.

        With ``node_id``, a job held on another node is left alone (False).
        Works for jobs reserved by other processes too (then only Redis
        changes, and the holder hears of it at its next refresh; for them it
        costs one extra round trip to find the node).
        """
        return self._settle_job(job_id, "release", node_id)

    def expire_due(self, now: float) -> None:
        """Dispatch's cheap check: move this process's jobs past their local expiry out of the mirror.

        No network call. The local expiry is never earlier than Redis's, so
        the capacity is free in Redis by then (unless another process renewed
        the job: :meth:`refresh_inflight` / :meth:`expire` find that out
        before reporting the job expired).
        """
        if now >= self.due_at:
            with self._lock:
                self._sweep_locked(now)

    def expire(self) -> int:
        """Sweep, confirm in Redis, report (``on_expired``) and return how many of this process's jobs expired.

        One round trip when any is past its local expiry.
        """
        with self._lock:
            self._sweep_locked(self._clock())
            if not self._suspects:
                return 0
        return self._look({})[1]

    def count(self, node_id: str | None = None) -> int:
        """Live reservations plus committed leases, for one node or the namespace.

        Read from Redis (one round trip); entries past their expiry are not
        counted even before anything prunes them.
        """
        if node_id is not None:
            return self.node_counts([node_id])[node_id]
        reply = self._run(self._counts, [self._k_epoch, self._k_jobs], [])
        return int(reply[2])

    def node_counts(self, node_ids: Iterable[str]) -> dict[str, int]:
        """Each node's live count (reservations + leases), in one round trip."""
        nodes = list(dict.fromkeys(node_ids))
        if not nodes:
            return {}
        keys = [self._k_epoch]
        for node in nodes:
            keys += (self._k_resv(node), self._k_lease(node))
        reply = self._run(self._counts, keys, [])
        return {node: int(reply[2 + 2 * i]) + int(reply[3 + 2 * i]) for i, node in enumerate(nodes)}

    def refresh_inflight(self) -> dict[str, int]:
        """This process's periodic look at Redis, in one round trip.

        Overwrites :attr:`inflight` with the fleet-wide counts of the bound
        nodes (never lowering it while Redis recovers from a data loss);
        keeps this process known as a holder; applies what other processes
        did to its jobs; reports its expired jobs to ``on_expired``; sends
        capacity writes queued during an outage (one more round trip then).
        A reservation made or released by this process while the call is in
        flight may be missed or counted twice until the next refresh; the
        mirror only steers scoring, Redis decides. Returns the counts by node id.
        """
        if self._writes:
            self._flush_writes()
        with self._lock:
            self._sweep_locked(self._clock())
            bound = dict(self._node_slot)
        return self._look(bound)[0]

    def stats(self) -> dict[str, Any]:
        """Local figures, no network call.

        ``name``, ``available`` (the last Redis call succeeded), ``error``
        (the last failure while unavailable), ``held`` / ``committed`` (jobs
        this process holds), ``expired`` (jobs of this process reported
        expired so far), plus ``recovering`` (Redis is waiting for holders
        to write their jobs back, as of the last refresh), ``recoveries``
        (data losses this process re-asserted into), ``reasserted`` (jobs
        it wrote back), ``pending_writes`` (capacity writes queued during an
        outage), ``round_trips`` and ``holder_id``.
        """
        with self._lock:
            held = len(self._jobs)
            committed = sum(1 for r in self._jobs.values() if r.committed)
            pending = len(self._writes)
            counters = dict(self._counters)
        return {
            "name": "redis",
            "available": self._redis.available,
            "error": self._redis.error,
            "held": held,
            "committed": committed,
            "expired": counters["expired"],
            "recovering": self._recovering,
            "recoveries": counters["recoveries"],
            "reasserted": counters["reasserted"],
            "pending_writes": pending,
            "round_trips": self._redis.round_trips,
            "holder_id": self.holder_id,
        }

    def jobs(self) -> list[Reservation]:
        """The jobs this process holds, by job id (local view, no network)."""
        with self._lock:
            return [self._jobs[j] for j in sorted(self._jobs)]

    def close(self) -> None:
        """Nothing to release: the client belongs to the caller."""

    # -- internals -------------------------------------------------------------
    def _settle_job(self, job_id: str, action: str, node_id: str | None, lease: float | None = None) -> bool:
        if not isinstance(job_id, str):
            raise TypeError(f"job_id must be a str, got {type(job_id).__name__}: {job_id!r}")
        if node_id is not None and not isinstance(node_id, str):
            raise TypeError(f"node_id must be a str or None, got {type(node_id).__name__}: {node_id!r}")
        explicit = "" if lease is None else _ms(_positive(lease, "lease"))
        with self._job_lock(job_id):
            return self._settle_job_locked(job_id, action, node_id, lease, explicit)

    def _settle_job_locked(
        self, job_id: str, action: str, node_id: str | None, lease: float | None, explicit: Any
    ) -> bool:
        ttl_ms = _ms(self._ttl) if self._ttl is not None else _ms(self.commit_lease)
        lease_ms = _ms(self.commit_lease)
        me = self.holder_id
        with self._lock:
            mine = self._jobs.get(job_id) or self._suspects.get(job_id)
        strict = node_id is not None
        node = node_id if strict else (mine.node_id if mine is not None else None)
        holder = me if mine is not None else None
        # Shortly after a data loss a release that finds nothing leaves a
        # tombstone: the job's holder may not have written it back yet.
        tomb = _ms(self.recovery_grace) if action == "release" and \
            self._clock() - self._joined_at < self.recovery_grace else 0
        for _ in range(4):
            if node is None or holder is None:
                # Not ours (or unknown): ask which node and process hold it
                # (Redis Cluster needs the node's keys named before the script runs).
                found = self._run(self._get, [self._k_epoch, self._k_job(job_id)], [])
                if text(found[0]) != "live":
                    if not tomb:
                        with self._lock:
                            self._forget_locked(job_id, suspects=False)
                        return False
                    node = node if node is not None else ""
                    holder = holder if holder is not None else ""
                else:
                    if strict and text(found[1]) != node_id:
                        return False  # held on another node: nothing changed
                    node, holder = text(found[1]), text(found[7])
            keys = [self._k_epoch, self._k_job(job_id), self._k_jobs, self._k_resv(node), self._k_lease(node),
                    self._k_inbox(holder)]
            tail: list[Any] = [job_id, node, action, "1" if strict else "0", me, holder]
            if action != "release":
                tail += (lease_ms, ttl_ms, explicit)
            elif tomb:
                keys.append(self._k_tombs)
                tail.append(tomb)
            reply = self._run(self._settle, keys, tail)
            local_after = self._clock()
            kind = text(reply[0])
            if kind == "moved":
                node, holder = text(reply[1]), text(reply[2])
                continue
            if kind == "wrong":
                return False
            if kind == "gone":
                with self._lock:
                    # Ours expired (a suspect: reported by the next look) or
                    # was released elsewhere (a live one: forgotten now).
                    self._forget_locked(job_id, suspects=False)
                return False
            if kind == "released":
                with self._lock:
                    self._forget_locked(job_id)
                    if text(reply[1]) != me:
                        self._foreign[job_id] = _Foreign(local_after, "gone", node, -1, "", False, local_after, "")
                return True
            # "ok": committed or renewed
            expires_at = local_after + (int(reply[1]) - int(reply[2])) / 1000.0
            committed = int(reply[3]) == 1
            rec_holder = text(reply[6])
            with self._lock:
                if rec_holder == me:
                    res = self._jobs.get(job_id) or self._suspects.get(job_id)
                    if res is None or res.node_id != node:
                        self._forget_locked(job_id)
                        res = Reservation(job_id, node, self._node_slot.get(node, -1), _int(reply[4]),
                                          text(reply[5]), expires_at, committed)
                    self._hold_locked(res, committed, expires_at)
                else:
                    self._forget_locked(job_id)  # not ours (any more)
                    self._foreign[job_id] = _Foreign(local_after, "held", node, _int(reply[4]), text(reply[5]),
                                             committed, expires_at, rec_holder)
            return True
        return False  # pragma: no cover - the job kept moving between nodes

    def _adopt(self, job_id: str, fields: Sequence[Any], local_after: float) -> Reservation:
        """A live reservation reported by Redis, as a :class:`Reservation`.

        ``fields``: node, pool, session, committed, exp_ms, now_ms, holder.
        One this process holds (its own object is reused, so callers see one
        object per job, and one whose reply was lost is tracked again);
        another process's is returned untracked.
        """
        node, pool, session = text(fields[0]), _int(fields[1]), text(fields[2])
        committed = int(fields[3]) == 1
        expires_at = local_after + (int(fields[4]) - int(fields[5])) / 1000.0
        with self._lock:
            if text(fields[6]) == self.holder_id:
                res = self._jobs.get(job_id) or self._suspects.get(job_id)
                if res is None or res.node_id != node:
                    self._forget_locked(job_id)
                    res = Reservation(job_id, node, self._node_slot.get(node, -1), pool, session, expires_at,
                                      committed)
                self._hold_locked(res, committed, expires_at)
                return res
            # Ours under this id is dead (re-reserved elsewhere): forget it.
            self._forget_locked(job_id)
            slot = self._node_slot.get(node, -1)
        return Reservation(job_id, node, slot, pool, session, expires_at, committed)

    def _hold_locked(self, res: Reservation, committed: bool, expires_at: float) -> None:
        """Make ``res`` a live job of this process with this state (tracked, counted once)."""
        job_id = _job_id(res)
        changed = res.committed != committed or res.expires_at != expires_at
        res.committed, res.expires_at = committed, expires_at
        if self._jobs.get(job_id) is res:
            if changed:
                self._push_locked(expires_at, job_id)
            return
        self._suspects.pop(job_id, None)
        self._track_locked(res)

    def _track_locked(self, res: Reservation) -> None:
        job_id = _job_id(res)
        self._jobs[job_id] = res
        self._push_locked(res.expires_at, job_id)
        inflight = self.inflight
        if 0 <= res.slot < len(inflight):
            inflight[res.slot] += 1

    def _push_locked(self, expires_at: float, job_id: str) -> None:
        heap = self._heap
        heapq.heappush(heap, (expires_at, job_id))
        if len(heap) > _HEAP_MIN_REBUILD and len(heap) > 4 * len(self._jobs):
            # Released and re-dated jobs leave stale entries behind: rebuild.
            heap[:] = [(r.expires_at, j) for j, r in self._jobs.items()]
            heapq.heapify(heap)
        self.due_at = heap[0][0] if heap else _INF

    def _forget_locked(self, job_id: str, suspects: bool = True) -> Reservation | None:
        """This process no longer holds ``job_id`` (and, with ``suspects``, need not report it)."""
        res = self._jobs.pop(job_id, None)
        if res is not None:
            self._decrement_locked(res.slot)
        if suspects:
            self._suspects.pop(job_id, None)
        return res

    def _decrement_locked(self, slot: int) -> None:
        inflight = self.inflight
        # A refresh may already have written a lower fleet count: never go
        # below zero.
        if 0 <= slot < len(inflight) and inflight[slot] > 0:
            inflight[slot] -= 1

    def _sweep_locked(self, now: float) -> None:
        heap, jobs = self._heap, self._jobs
        while heap and heap[0][0] <= now:
            expires, job_id = heapq.heappop(heap)
            res = jobs.get(job_id)
            # Stale heap entries (released, renewed, re-reserved) are skipped.
            if res is None or res.expires_at != expires:
                continue
            del jobs[job_id]
            self._suspects[job_id] = res
            self._decrement_locked(res.slot)
        self.due_at = heap[0][0] if heap else _INF

    def _look(self, bound: dict[str, int]) -> tuple[dict[str, int], int]:
        """The refresh script: liveness, inbox, suspects, and ``bound`` nodes' counts.

        Returns the counts and how many jobs were reported expired.
        """
        with self._lock:
            suspects = list(self._suspects.items())
            holding = bool(self._jobs)
        nodes = list(bound)
        keys = [self._k_epoch, self._k_pending, self._k_holders, self._k_inbox(self.holder_id)]
        keys += [self._k_job(job_id) for job_id, _ in suspects]
        for node in nodes:
            keys += (self._k_resv(node), self._k_lease(node))
        tail = [self.holder_id, _ms(self.recovery_grace) if holding else 0, len(suspects)]
        local_before = self._clock()
        reply = self._run(self._refresh, keys, tail)
        local_after = self._clock()
        self._live_until = local_before + self.recovery_grace if holding else -_INF
        now_ms = int(reply[1])
        recovering = int(reply[2]) == 1
        holders = tuple(text(h) for h in reply[3])
        inbox, states, raw = reply[4], reply[5], reply[6:]
        counts = {node: int(raw[2 * i]) + int(raw[2 * i + 1]) for i, node in enumerate(nodes)}
        me = self.holder_id
        expired: list[Reservation] = []
        with self._lock:
            for i in range(0, len(inbox), 2):
                job_id, note = text(inbox[i]), text(inbox[i + 1])
                if note == "gone":
                    self._forget_locked(job_id)  # released elsewhere: neither held nor expired
                    continue
                flag, _, exp = note.partition(":")
                res = self._jobs.get(job_id) or self._suspects.get(job_id)
                if res is not None:
                    self._hold_locked(res, flag == "1", local_after + (int(exp) - now_ms) / 1000.0)
            for k, (job_id, res) in enumerate(suspects):
                if self._suspects.get(job_id) is not res:
                    continue  # settled or re-held meanwhile
                node, flag, exp, holder = states[4 * k : 4 * k + 4]
                if text(node) == res.node_id and text(holder) == me:
                    # Renewed or committed elsewhere before it ran out: still ours.
                    self._hold_locked(res, int(flag) == 1, local_after + (int(exp) - now_ms) / 1000.0)
                else:
                    del self._suspects[job_id]
                    expired.append(res)
            inflight = self.inflight
            for node, n in counts.items():
                slot = self._node_slot.get(node)
                if slot is not None and 0 <= slot < len(inflight):
                    # While Redis waits for holders to write their jobs back,
                    # its counts are too low: never lower the mirror then.
                    inflight[slot] = max(int(inflight[slot]), n) if recovering else n
            self._holders_seen = holders
            self._recovering = recovering
            self._counters["expired"] += len(expired)
            horizon = local_after - self.recovery_grace
            for job_id in [j for j, v in self._foreign.items() if v.at < horizon]:
                del self._foreign[job_id]
        if expired and self._on_expired is not None:
            try:
                self._on_expired(expired)
            except Exception:  # a listener's bug must not stall the refresh
                log.exception("pysched: on_expired callback failed")
        return counts, len(expired)

    def _recover(self, known: str) -> None:
        """Join the current dataset: write back every job this process holds.

        ``known`` is the epoch the caller used; if another thread has joined
        a newer one since, there is nothing to do. See the module docstring.
        """
        with self._recover_lock:
            if (self._epoch or "") != known:
                return
            me = self.holder_id
            local_now = self._clock()
            with self._lock:
                own = [r for r in self._jobs.values() if r.expires_at > local_now]
                horizon = local_now - self.recovery_grace
                recent = [(j, v) for j, v in self._foreign.items() if v.at >= horizon]
                holders = list(self._holders_seen)
            if own and me not in holders:
                holders.append(me)
            entries = [(_job_id(r), r.node_id, r.pool_id, r.session_id, r.committed, r.expires_at - local_now, me)
                       for r in own]
            entries += [(j, v.node, v.pool, v.session, v.committed, v.expires_at - local_now, v.holder)
                        for j, v in recent if v.kind == "held" and v.expires_at > local_now]
            tombs = [(j, v.node) for j, v in recent if v.kind == "gone"]
            token = secrets.token_hex(8)
            grace_ms = _ms(self.recovery_grace)
            n_calls = max(1, -(-len(entries) // _RECOVER_CHUNK))
            skipped: set[str] = set()
            epoch = known
            for c in range(n_calls):
                part = entries[c * _RECOVER_CHUNK : (c + 1) * _RECOVER_CHUNK]
                dead = tombs if c == 0 else []
                seen = holders if c == 0 else []
                keys = [self._k_epoch, self._k_pending, self._k_holders, self._k_jobs, self._k_tombs]
                args: list[Any] = [epoch, token, me, grace_ms, "1" if c == n_calls - 1 else "0", _KEY_MARGIN_MS,
                                   len(seen), len(part), len(dead), "1" if own else "0",
                                   round(self.recovery_quiet * 1000), *seen]
                for job_id, node, pool, session, committed, left, holder in part:
                    keys += (self._k_job(job_id), self._k_resv(node), self._k_lease(node))
                    args += (job_id, node, int(pool), session, "1" if committed else "0", _ms(left), holder)
                for job_id, node in dead:
                    keys += (self._k_job(job_id), self._k_resv(node), self._k_lease(node))
                    args += (job_id, node)
                reply = self._redis.eval(self._recover_script, keys, args)
                epoch = text(reply[1])
                skipped.update(text(x) for x in reply[2:])
            with self._lock:
                lost = [j for j in skipped if j in self._jobs]
                for job_id in lost:
                    self._forget_locked(job_id)
                self._epoch = epoch
                if known:  # a data loss, witnessed: its releases leave tombstones for a while
                    self._joined_at = self._clock()
                self._live_until = local_now + self.recovery_grace if own else -_INF
                if known:
                    self._counters["recoveries"] += 1
                    self._counters["reasserted"] += len(own) - len(lost)
        if known:
            log.warning("pysched: Redis lost its data (namespace %r); re-asserted %d held job(s)",
                        self.namespace, len(own) - len(lost))


def _int(value: Any) -> int:
    try:
        return int(text(value))
    except ValueError:  # pragma: no cover - written by a foreign client
        return -1
