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
  attempt (:attr:`RedisReservations.round_trips` lets a benchmark check).
* **Redis Cluster ready.** Every key of a namespace starts with the same
  hash tag (``{<namespace>}:``), so all keys of one call hash to one slot,
  and every key a script touches is passed in ``KEYS``.
* **Server time.** Scripts read ``TIME``; the hosts' clocks never decide
  whether a reservation is alive.

Key layout (``T`` = ``{<namespace>}``)::

    T:max:<node>     string   max concurrency (written by bind_node, no TTL)
    T:resv:<node>    zset     uncommitted job ids, score = reservation expiry
    T:lease:<node>   zset     committed job ids, score = lease expiry
    T:job:<job>      hash     node, pool, session, committed, exp
    T:jobs           zset     every live job of the namespace, score = expiry

Zsets and job records carry a Redis TTL a little longer than their newest
entry, so a node nobody touches any more leaves nothing behind.

Faults
------
A connection failure or timeout (or a server still loading its data, a
read-only replica after a failover, a cluster that is down) raises
:class:`~pysched.errors.ReservationBackendUnavailable` with the redis error
chained, and changes no local state: the ``inflight`` mirror is only
updated after the server confirmed. If the *reply* was lost (a timeout
after the script ran), the reservation may exist in Redis; it expires by
itself, and retrying ``try_reserve`` with the same job id returns it.

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

import hashlib
import heapq
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from typing import Any

import numpy as np

from .errors import ReservationBackendUnavailable
from .reservations import Candidate, Reservation, ReservationBackend

__all__ = ["RedisReservations"]

_EXTRA_HINT = 'RedisReservations needs the redis client library: pip install "pysched[redis]"'

#: Extra lifetime (ms) given to keys beyond their newest entry. The exact
#: liveness test uses the stored expiry, never the key TTL, so this only
#: needs to cover the gap between two commands inside one script.
_KEY_MARGIN_MS = 5000


class _Script:
    """One Lua script shipped in ``pysched/lua``, with its SHA1 precomputed.

    The SHA is computed locally, so constructing a backend makes no network
    call; the script reaches the server on its first ``NOSCRIPT`` fallback.
    """

    __slots__ = ("name", "body", "sha")

    def __init__(self, name: str) -> None:
        self.name = name
        # pysched/lua is plain package data (no __init__.py), so it is
        # reached through the pysched package rather than imported.
        self.body = (resources.files("pysched") / "lua" / f"{name}.lua").read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.body.encode("utf-8")).hexdigest()


_SCRIPTS: dict[str, _Script] = {}
_SCRIPTS_LOCK = threading.Lock()


def _script(name: str) -> _Script:
    with _SCRIPTS_LOCK:
        script = _SCRIPTS.get(name)
        if script is None:
            script = _SCRIPTS[name] = _Script(name)
        return script


def _text(value: Any) -> str:
    """A reply element as ``str`` (the client may or may not decode replies)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _import_redis() -> Any:
    try:
        import redis
        import redis.exceptions
    except ImportError as exc:  # pragma: no cover - exercised with redis hidden
        raise ImportError(_EXTRA_HINT) from exc
    return redis


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
        ``release``, frees the capacity eventually.
    :param shortlist: how many candidates one script call tries. A caller
        passing at most this many gets exactly one round trip per attempt;
        longer lists are tried in further calls of this size, only while
        every earlier candidate refused.

    Differences from :class:`~pysched.reservations.LocalReservations`:

    * a node's capacity is the max written to Redis by :meth:`bind_node`
      (by any process); ``Candidate.max_concurrency`` is not consulted.
      A node absent from Redis (never bound, or unbound) refuses with
      ``"offline"``;
    * committed jobs hold capacity for ``commit_lease`` seconds, then
      expire like reservations do;
    * :attr:`inflight` counts reservations this process made, and
      :meth:`refresh_inflight` overwrites it with the fleet-wide counts
      (the fleet sync calls it about once a second);
    * ``Reservation.expires_at`` is an estimate in the local clock's frame
      (local time at the call + TTL): the authoritative expiry is in Redis.
    """

    def __init__(
        self,
        client: Any,
        namespace: str = "pysched",
        reservation_ttl: float | None = None,
        commit_lease: float = 3600.0,
        shortlist: int = 4,
    ) -> None:
        redis = _import_redis()
        if not isinstance(namespace, str) or not namespace or "{" in namespace or "}" in namespace:
            raise ValueError(f"namespace must be a non-empty string without braces, got {namespace!r}")
        if reservation_ttl is not None and not reservation_ttl > 0:
            raise ValueError(f"reservation_ttl must be > 0 seconds, got {reservation_ttl!r}")
        if not commit_lease > 0:
            raise ValueError(f"commit_lease must be > 0 seconds, got {commit_lease!r}")
        if isinstance(shortlist, bool) or not isinstance(shortlist, int) or shortlist < 1:
            raise ValueError(f"shortlist must be an int >= 1, got {shortlist!r}")

        self._client = client
        self.namespace = namespace
        self._tag = "{" + namespace + "}:"
        self._ttl: float | None = None if reservation_ttl is None else float(reservation_ttl)
        self.commit_lease = float(commit_lease)
        self.shortlist = shortlist
        self._clock: Callable[[], float] = time.monotonic
        self._clock_configured = False

        exc = redis.exceptions
        # Transient "cannot be served right now" failures: the call may be
        # retried, so they become ReservationBackendUnavailable. Auth errors
        # are ConnectionError subclasses but a misconfiguration, not an
        # outage, so they propagate unchanged.
        self._unavailable: tuple[type[BaseException], ...] = tuple(
            cls
            for cls in (
                exc.ConnectionError,
                exc.TimeoutError,
                exc.BusyLoadingError,
                getattr(exc, "ReadOnlyError", None),
                getattr(exc, "TryAgainError", None),
                getattr(exc, "ClusterDownError", None),
            )
            if cls is not None
        )
        self._not_unavailable: tuple[type[BaseException], ...] = tuple(
            cls
            for cls in (getattr(exc, "AuthenticationError", None), getattr(exc, "AuthorizationError", None))
            if cls is not None
        )
        self._noscript: type[BaseException] = exc.NoScriptError

        self._reserve = _script("reserve")
        self._settle = _script("settle")
        self._get = _script("get")
        self._counts = _script("counts")

        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._round_trips = 0
        # job id -> reservation made by *this* process (what the mirror counts)
        self._jobs: dict[str, Reservation] = {}
        self._heap: list[tuple[float, str]] = []
        self._slot_node: dict[int, str] = {}
        self._node_slot: dict[str, int] = {}
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
        redis = _import_redis()
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

    @property
    def _k_jobs(self) -> str:
        return f"{self._tag}jobs"

    # -- transport -------------------------------------------------------------
    @property
    def round_trips(self) -> int:
        """Network calls this object has made (settable, e.g. to reset to 0)."""
        return self._round_trips

    @round_trips.setter
    def round_trips(self, value: int) -> None:
        with self._stats_lock:
            self._round_trips = int(value)

    def _execute(self, *args: Any) -> Any:
        with self._stats_lock:
            self._round_trips += 1
        try:
            return self._client.execute_command(*args)
        except self._not_unavailable:
            raise
        except self._unavailable as exc:
            raise ReservationBackendUnavailable(
                f"reservation backend unavailable ({type(exc).__name__}: {exc})"
            ) from exc

    def _eval(self, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return self._execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except self._noscript:
            # First use on this server (or after a restart / SCRIPT FLUSH):
            # EVAL sends the body once and caches it server-side.
            return self._execute("EVAL", script.body, len(keys), *keys, *args)

    def load_scripts(self) -> None:
        """Cache every script on the server now (one call per script).

        Optional warm-up: otherwise the first use of each script after a
        server start or ``SCRIPT FLUSH`` costs one extra round trip
        (``NOSCRIPT``, then ``EVAL``).
        """
        for script in (self._reserve, self._settle, self._get, self._counts):
            self._execute("SCRIPT", "LOAD", script.body)

    # -- management side -------------------------------------------------------
    def configure(self, reservation_ttl: float, clock: Callable[[], float]) -> None:
        """Take the scheduler's TTL (unless given at construction) and clock.

        The clock only dates the local estimates (``expires_at`` and the
        mirror's expiry); Redis decides by its own time.
        """
        if self._ttl is None:
            if not reservation_ttl > 0:
                raise ValueError(f"reservation_ttl must be > 0 seconds, got {reservation_ttl!r}")
            self._ttl = float(reservation_ttl)
        if not self._clock_configured:
            self._clock = clock
            self._clock_configured = True

    def ensure_capacity(self, n_slots: int) -> np.ndarray:
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
        calling this on every heartbeat that changes the max is safe.
        """
        if max_concurrency < 0:
            raise ValueError(f"max_concurrency must be >= 0, got {max_concurrency!r}")
        self._execute("SET", self._k_max(node_id), int(max_concurrency))
        with self._lock:
            old = self._slot_node.get(slot)
            if old is not None and old != node_id and self._node_slot.get(old) == slot:
                del self._node_slot[old]
            self._slot_node[slot] = node_id
            self._node_slot[node_id] = slot

    def unbind_node(self, slot: int, node_id: str) -> None:
        """Delete the node's max from Redis: later reserves answer ``"offline"``.

        Existing reservations stay until released or expired, as with
        :class:`~pysched.reservations.LocalReservations`.
        """
        self._execute("DEL", self._k_max(node_id))
        with self._lock:
            if self._slot_node.get(slot) == node_id:
                del self._slot_node[slot]
            if self._node_slot.get(node_id) == slot:
                del self._node_slot[node_id]

    # -- dispatch side ---------------------------------------------------------
    def try_reserve(
        self,
        job_id: str,
        candidates: Sequence[Candidate],
        pool_id: int,
        session_id: str,
    ) -> Reservation | list[str]:
        """Reserve the first candidate with room, in one round trip.

        Returns the :class:`Reservation`; the job's existing live
        reservation if it has one (on whichever node, made by whichever
        process: retries are safe); otherwise one reason per candidate,
        ``"full"`` or ``"offline"``.
        """
        ttl = self._ttl
        if ttl is None:
            raise RuntimeError("reservation_ttl is not set: pass it to RedisReservations or call configure()")
        ttl_ms = max(1, round(ttl * 1000))
        # plain (slot, node_id, max, running) tuples are Candidates too
        cands = [c if isinstance(c, Candidate) else Candidate(*c) for c in candidates]
        reasons: list[str] = []
        step = self.shortlist
        start = 0
        while True:
            chunk = cands[start : start + step]
            local_now = self._clock()
            keys = [self._k_job(job_id), self._k_jobs]
            args: list[Any] = [job_id, ttl_ms, int(pool_id), session_id, _KEY_MARGIN_MS]
            for cand in chunk:
                node = cand.node_id
                keys += (self._k_max(node), self._k_resv(node), self._k_lease(node))
                args += (node, int(cand.running))
            reply = self._eval(self._reserve, keys, args)
            kind = _text(reply[0])
            if kind == "ok":
                cand = chunk[int(reply[1]) - 1]
                res = Reservation(
                    job_id, cand.node_id, cand.slot, int(pool_id), session_id, local_now + ttl
                )
                with self._lock:
                    # A stale local entry under the same id (its reservation
                    # died in Redis) must give its slot back first.
                    self._forget_locked(job_id)
                    self._track_locked(res)
                    inflight = self.inflight
                    if 0 <= cand.slot < len(inflight):
                        inflight[cand.slot] += 1
                return res
            if kind == "existing":
                return self._adopt(job_id, reply[1:], local_now)
            reasons += [_text(r) for r in reply[1:]]
            start += step
            if start >= len(cands):
                return reasons

    def get(self, job_id: str) -> Reservation | None:
        """The job's live reservation as Redis holds it, or ``None``."""
        local_now = self._clock()
        reply = self._eval(self._get, [self._k_job(job_id)], [])
        if _text(reply[0]) != "live":
            with self._lock:
                self._forget_locked(job_id)
            return None
        return self._adopt(job_id, reply[1:], local_now)

    def commit(self, job_id: str) -> bool:
        """Move the reservation to the node's leases: it stops expiring.

        The job then holds its capacity for ``commit_lease`` seconds (see
        :meth:`renew`). Committing twice is fine. False if the job holds no
        live reservation.
        """
        return self._settle_job(job_id, "commit")

    def renew(self, job_id: str, lease: float | None = None) -> bool:
        """Extend a committed job's lease to ``lease`` (default ``commit_lease``) from now.

        False if the job is unknown, expired or not committed.
        """
        return self._settle_job(job_id, "renew", lease)

    def release(self, job_id: str) -> bool:
        """Give the job's capacity back. Idempotent: False if nothing was held.

        Works for jobs reserved by other processes too (then only Redis
        changes; for them it costs one extra round trip to find the node).
        """
        return self._settle_job(job_id, "release")

    def expire(self) -> int:
        """Drop this process's dead reservations and leases from the mirror.

        Makes no network call: Redis prunes dead entries itself whenever a
        node's load is counted, so only the local mirror needs sweeping.
        Returns how many reservations (and expired leases) were dropped.
        """
        with self._lock:
            return self._expire_locked(self._clock())

    def count(self, node_id: str | None = None) -> int:
        """Live reservations plus committed leases, for one node or the namespace.

        Read from Redis (one round trip); entries past their expiry are not
        counted even before anything prunes them.
        """
        if node_id is not None:
            return self.node_counts([node_id])[node_id]
        reply = self._eval(self._counts, [self._k_jobs], [])
        return int(reply[1])

    def node_counts(self, node_ids: Iterable[str]) -> dict[str, int]:
        """Each node's live count (reservations + leases), in one round trip."""
        nodes = list(dict.fromkeys(node_ids))
        if not nodes:
            return {}
        keys: list[str] = []
        for node in nodes:
            keys += (self._k_resv(node), self._k_lease(node))
        reply = self._eval(self._counts, keys, [])
        return {node: int(reply[1 + 2 * i]) + int(reply[2 + 2 * i]) for i, node in enumerate(nodes)}

    def refresh_inflight(self) -> dict[str, int]:
        """Overwrite :attr:`inflight` with the fleet-wide counts of the bound nodes.

        One round trip. A reservation made or released by this process
        while the call is in flight may be missed or counted twice until the
        next refresh; the mirror only steers scoring, Redis decides.
        Returns the counts by node id.
        """
        with self._lock:
            bound = dict(self._node_slot)
        counts = self.node_counts(bound)
        with self._lock:
            inflight = self.inflight
            for node, n in counts.items():
                slot = self._node_slot.get(node)
                if slot is not None and 0 <= slot < len(inflight):
                    inflight[slot] = n
        return counts

    def close(self) -> None:
        """Nothing to release: the client belongs to the caller."""

    # -- internals -------------------------------------------------------------
    def _settle_job(self, job_id: str, action: str, lease: float | None = None) -> bool:
        lease_s = self.commit_lease if lease is None else float(lease)
        if not lease_s > 0:
            raise ValueError(f"lease must be > 0 seconds, got {lease!r}")
        lease_ms = max(1, round(lease_s * 1000))
        with self._lock:
            mine = self._jobs.get(job_id)
        node = mine.node_id if mine is not None else None
        # A job reserved elsewhere: ask which node holds it (Redis Cluster
        # needs the node's keys named before the script runs). A "moved"
        # answer (the job was re-reserved on another node) retries once more.
        for _ in range(3):
            if node is None:
                found = self._execute("HGET", self._k_job(job_id), "node")
                if found is None:
                    with self._lock:
                        self._forget_locked(job_id)
                    return False
                node = _text(found)
            local_now = self._clock()
            reply = self._eval(
                self._settle,
                [self._k_job(job_id), self._k_jobs, self._k_resv(node), self._k_lease(node)],
                [job_id, node, action, lease_ms, _KEY_MARGIN_MS],
            )
            kind = _text(reply[0])
            if kind == "moved":
                node = _text(reply[1])
                continue
            with self._lock:
                if kind == "ok":
                    res = self._jobs.get(job_id)
                    if res is not None and res.node_id == node:
                        res.committed = True
                        res.expires_at = local_now + (int(reply[1]) - int(reply[2])) / 1000.0
                        heapq.heappush(self._heap, (res.expires_at, job_id))
                    elif res is not None:
                        # Our reservation died and the job was re-reserved
                        # elsewhere (by another process): stop counting ours.
                        self._forget_locked(job_id)
                    return True
                if kind == "uncommitted":
                    return False
                # released, or gone: either way this process holds nothing now
                self._forget_locked(job_id)
                return kind == "released"
        return False  # pragma: no cover - the job kept moving between nodes

    def _adopt(self, job_id: str, fields: Sequence[Any], local_now: float) -> Reservation:
        """A live reservation reported by Redis, as a :class:`Reservation`.

        Reuses (and refreshes) this process's own object when it is the same
        reservation, so callers see one object per job.
        """
        node, pool, session = _text(fields[0]), _text(fields[1]), _text(fields[2])
        committed = int(fields[3]) == 1
        expires_at = local_now + (int(fields[4]) - int(fields[5])) / 1000.0
        with self._lock:
            res = self._jobs.get(job_id)
            if res is not None and res.node_id == node:
                if committed and not res.committed:
                    res.committed = True
                    res.expires_at = expires_at
                    heapq.heappush(self._heap, (expires_at, job_id))
                return res
            # Ours under this id is dead (re-reserved elsewhere): forget it.
            self._forget_locked(job_id)
            slot = self._node_slot.get(node, -1)
        try:
            pool_id = int(pool)
        except ValueError:  # pragma: no cover - written by a foreign client
            pool_id = -1
        return Reservation(job_id, node, slot, pool_id, session, expires_at, committed)

    def _track_locked(self, res: Reservation) -> None:
        self._jobs[res.job_id] = res
        heapq.heappush(self._heap, (res.expires_at, res.job_id))

    def _forget_locked(self, job_id: str) -> Reservation | None:
        res = self._jobs.pop(job_id, None)
        if res is not None:
            self._decrement_locked(res.slot)
        return res

    def _decrement_locked(self, slot: int) -> None:
        inflight = self.inflight
        # A refresh may already have written a lower fleet count: never go
        # below zero.
        if 0 <= slot < len(inflight) and inflight[slot] > 0:
            inflight[slot] -= 1

    def _expire_locked(self, now: float) -> int:
        heap = self._heap
        jobs = self._jobs
        dropped = 0
        while heap and heap[0][0] <= now:
            expires, job_id = heapq.heappop(heap)
            res = jobs.get(job_id)
            # Stale heap entries (released, renewed, re-reserved) are skipped.
            if res is None or res.expires_at != expires:
                continue
            del jobs[job_id]
            self._decrement_locked(res.slot)
            dropped += 1
        return dropped
