"""Fleet sync: several scheduler processes share one fleet of nodes through Redis.

Each process runs its own :class:`~pysched.Scheduler` (own snapshots, own
compiled kernel) on a shared :class:`~pysched.redis_reservations.RedisReservations`.
:class:`RedisFleet` makes their *views* of the fleet agree:

* **Node events.** Whatever a process's own nodes report (registrations,
  heartbeats, drains, offline marks, resumes, removals) reaches the
  scheduler's listener, which only appends it to a local queue (it runs on
  the caller's thread and must never wait for the network). A publisher
  thread sends the queue every ``publish_interval`` seconds as one pipeline;
  each event is one script call that appends it to the stream
  ``T:fleet:events`` and folds it into the node's compacted record
  ``T:fleet:node:<id>`` in the same atomic step.
* **Applying.** An applier thread reads the stream (``XREAD BLOCK`` on a
  connection of its own) and replays the events other processes published
  through the local scheduler's public methods, with a thread-local flag
  set so that this fleet's listener does not publish them again.
* **Late starters.** :meth:`RedisFleet.start` notes the stream position,
  then loads every compacted record (``T:fleet:nodes`` lists them) and then
  reads the stream from the noted position, so nothing published in
  between is missed (events already folded into a record replay harmlessly).
* **Pool ids.** In auto mode, a script allocates the id of a new language
  set atomically in ``T:fleet:pool_ids`` / ``T:fleet:pool_seq``, so pool
  ``en-zh`` has the same id in every process.
* **Load of others.** At least once per ``refresh_interval`` the applier
  calls :meth:`RedisReservations.refresh_inflight` (one round trip), so
  scoring sees reservations other processes made.

Key layout (``T`` = ``{<namespace>}``, the hash tag RedisReservations uses;
every script names all its keys in ``KEYS``, so Redis Cluster can route it)::

    T:fleet:events     stream  p=process id, e=event, n=node id, f=JSON fields
    T:fleet:nodes      set     node ids that have a compacted record
    T:fleet:node:<id>  hash    compacted record: register fields, last load,
                               status, unhealthy streak, seen (server ms), by
    T:fleet:pool_ids   hash    language-set key -> pool id
    T:fleet:pool_seq   string  highest pool id handed out
    T:fleet:epoch      string  random token naming this Redis dataset
    T:fleet:removed:<id>  string  a node removed within the last hour (expires)

The publish script also writes ``T:max:<id>`` (RedisReservations' key) on a
register, and writes it back from the record when it is missing on any
later event of a live node.

Only node events are shared: ``"job_expired"`` and ``"forget"`` (a process
forgetting a long-dead node on its own) are never published. A node
registered with ``ready=False`` travels as ``registering``.

Faults
------
Neither thread ever dies of a Redis error: it counts it (:meth:`RedisFleet.stats`),
backs off (50 ms doubling to 1 s) and retries; unsent events stay queued.
Dispatch itself fails fast with :class:`~pysched.ReservationBackendUnavailable`
(RedisReservations) after the client's ``socket_timeout`` and changes
nothing locally. A Redis restart without persistence loses everything: the
backend's refresh (every ``refresh_interval``) writes this process's jobs
back first (see :mod:`pysched.redis_reservations`: no node is over-committed
meanwhile); the applier notices that the epoch token changed (checked every
``refresh_interval`` and right after any error) and heals: it re-seeds the
pool ids it knows, re-writes the max concurrency of the nodes registered
through *this* process (``bind_node``), re-publishes their full state, and
reads the new stream from its start. Every live process does the same for
its own nodes, so the fleet heals without a coordinator. The nodes of a
process that died are healed by their next event (a heartbeat) reaching any
live process: its publish finds no record of a node nobody removed, and
that process re-publishes the node's full state and owns it from then on.
A fleet stopped and started again reads on from where it stopped (a removal
published meanwhile is applied), or reloads the records if the stream was
trimmed past that point (remote nodes without a record are removed).

Consistency is eventual and last-writer-wins per node; Redis, not these
views, decides capacity, so a stale view can only cost a refusal, never an
over-commit. (A process replaying another's ``register`` re-writes the
same max it carries; a max changed meanwhile is corrected by the next
event of the same batch.)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ReservationBackendUnavailable, UnknownNode
from .management import UNHEALTHY_LIMIT
from .redis_reservations import RedisReservations, _import_redis, _text

if TYPE_CHECKING:  # pragma: no cover
    from .scheduler import Scheduler

__all__ = ["RedisFleet"]

log = logging.getLogger(__name__)

#: the register_node / heartbeat keywords an event may carry (anything else is dropped)
_REGISTER_FIELDS = ("languages", "services", "max_concurrency", "has_gpu", "accept_public_jobs", "ready")
_HEARTBEAT_FIELDS = ("running", "cpu", "gpu", "mem", "healthy", "max_concurrency", "services", "languages")
_LOAD_FIELDS = ("running", "cpu", "gpu", "mem")
_STATUS_EVENTS = ("drain", "offline", "resume")
#: the events shared through Redis; any other listener event ("job_expired",
#: "forget") is this process's own business and is never published
_EVENTS = frozenset(("register", "heartbeat", "remove", *_STATUS_EVENTS))
#: how long a removal is remembered in Redis (a heartbeat published meanwhile
#: by a process that has not applied the removal yet must not resurrect it)
_REMOVED_MS = 3_600_000

# Exponential back-off after a Redis error (seconds).
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 1.0
#: how late Redis may end a blocking read (its timer runs every 1/hz s; hz=10 by default)
_BLOCK_SLACK = 0.11


class _Lua:
    """A Lua script shipped in this module, with its SHA1 computed locally."""

    __slots__ = ("name", "body", "sha")

    def __init__(self, name: str, body: str) -> None:
        self.name = name
        self.body = body
        self.sha = hashlib.sha1(body.encode("utf-8")).hexdigest()


# KEYS[1] pool id hash   KEYS[2] pool id sequence
# ARGV[1] language-set key   ARGV[2] floor: the caller's highest known pool id
# HSETNX semantics: the first caller allocates, everybody else reads its id.
# The floor keeps a fresh id above every id the caller already uses (after a
# Redis restart the sequence may be behind the ids processes still hold).
_ALLOCATE = _Lua("fleet_allocate", """\
local id = redis.call('HGET', KEYS[1], ARGV[1])
if id then return tonumber(id) end
local floor = tonumber(ARGV[2]) or 0
local seq = tonumber(redis.call('GET', KEYS[2])) or 0
if seq < floor then redis.call('SET', KEYS[2], floor) end
id = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], id)
return id
""")

# KEYS[1] pool id hash   KEYS[2] pool id sequence
# ARGV: key_1, id_1, key_2, id_2, ...: ids a process holds, written back after
# Redis lost them (existing entries win). The sequence ends above every id.
_SEED = _Lua("fleet_seed", """\
for i = 1, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
local top = tonumber(redis.call('GET', KEYS[2])) or 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  local n = tonumber(v)
  if n and n > top then top = n end
end
redis.call('SET', KEYS[2], top)
return top
""")

# KEYS[1] event stream   KEYS[2] set of recorded nodes   KEYS[3] the node's record
# KEYS[4] the node's max concurrency (RedisReservations' key)   KEYS[5] the node's removal mark
# ARGV[1] stream MAXLEN (approximate)   ARGV[2] process id   ARGV[3] event
# ARGV[4] node id   ARGV[5] event fields (JSON, opaque here)
# ARGV[6] heartbeat health: '' (not given), '0' (unhealthy) or '1' (healthy)
# ARGV[7] register: the max concurrency ('' otherwise)
# ARGV[8] register: the initial status (JSON: "ready" or "registering")
# ARGV[9] how long a removal mark lives (ms)
# ARGV[10..] record field/value pairs to write (JSON values)
# Appends the event and folds it into the record in one atomic step, so the
# record never lags the stream. Returns {stream entry id, flag}: flag 'lost'
# when the node has no record although nobody removed it (Redis lost its
# data): the publisher then re-publishes the node's full state, which writes
# its capacity back, so a node whose registering process died is healed by a
# heartbeat reaching any live process.
_PUBLISH = _Lua("fleet_publish", """\
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ev, node = ARGV[3], ARGV[4]
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                      'p', ARGV[2], 'e', ev, 'n', node, 'f', ARGV[5])
if ev == 'remove' then
  redis.call('DEL', KEYS[3])
  redis.call('SREM', KEYS[2], node)
  redis.call('DEL', KEYS[4])
  redis.call('SET', KEYS[5], 1, 'PX', ARGV[9])
  return {id, ''}
end
if ev == 'register' then
  -- a (re-)registration is a fresh start, as in the scheduler itself
  redis.call('DEL', KEYS[3])
  redis.call('DEL', KEYS[5])
  redis.call('SADD', KEYS[2], node)
  redis.call('HSET', KEYS[3], 'status', ARGV[8], 'streak', 0, 'seen', now)
  if ARGV[7] ~= '' then
    redis.call('SET', KEYS[4], ARGV[7])
  end
elseif redis.call('EXISTS', KEYS[3]) == 0 then
  -- only a register starts a record: the node was removed (marked), or
  -- Redis lost its data and the publisher re-publishes the node in full
  if redis.call('EXISTS', KEYS[5]) == 1 then
    return {id, ''}
  end
  return {id, 'lost'}
elseif ev == 'heartbeat' then
  redis.call('HSET', KEYS[3], 'seen', now)
  local status = redis.call('HGET', KEYS[3], 'status')
  if status == '"offline"' then
    redis.call('HSET', KEYS[3], 'status', '"ready"')
  elseif status == '"registering"' and ARGV[6] == '1' then
    redis.call('HSET', KEYS[3], 'status', '"ready"')
  end
  if ARGV[6] == '0' then
    redis.call('HINCRBY', KEYS[3], 'streak', 1)
  elseif ARGV[6] == '1' then
    redis.call('HSET', KEYS[3], 'streak', 0)
  end
elseif ev == 'drain' then
  redis.call('HSET', KEYS[3], 'status', '"draining"', 'streak', 0)
elseif ev == 'offline' then
  redis.call('HSET', KEYS[3], 'status', '"offline"', 'streak', 0)
elseif ev == 'resume' then
  redis.call('HSET', KEYS[3], 'status', '"ready"', 'streak', 0, 'seen', now)
end
redis.call('HSET', KEYS[3], 'by', ARGV[2])
for i = 10, #ARGV, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
if ev ~= 'register' and redis.call('EXISTS', KEYS[4]) == 0 then
  -- A live node whose capacity is gone (a process forgot it, or removed it
  -- and the node registered again elsewhere): write it back from the record.
  local max = tonumber(redis.call('HGET', KEYS[3], 'max_concurrency'))
  if max then
    redis.call('SET', KEYS[4], max)
  end
end
return {id, ''}
""")

_SCRIPTS = (_ALLOCATE, _SEED, _PUBLISH)


def _json_default(value: Any) -> Any:
    """numpy scalars and sets, which heartbeat callers may pass, as JSON."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value)
    raise TypeError(f"cannot encode {type(value).__name__} in a fleet event")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=_json_default)


def _stream_id(value: Any) -> tuple[int, int]:
    """A stream entry id ``"<ms>-<seq>"`` as a comparable tuple."""
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


def _set_key(languages: Iterable[str]) -> str:
    """The Redis field naming a language set.

    Sorted codes joined by ``,``: codes may contain ``-`` (``sr-latn``), so
    the pool *name* (joined by ``-``) is ambiguous and cannot be the key.
    """
    return ",".join(sorted(languages))


class RedisFleet:
    """Share node state and pool ids between scheduler processes through Redis.

    :param sched: the local :class:`~pysched.Scheduler`; its reservation
        backend must be a :class:`RedisReservations` on ``namespace``, and
        no node may be registered before the first :meth:`start` (auto pool
        ids must come from Redis from the first one on).
    :param client: a ``redis.Redis`` (the one the backend uses is fine;
        ``decode_responses`` either way). Never closed here.
    :param namespace: the backend's namespace (shared hash tag).
    :param process_id: names this process in the stream; unique per process
        (default: host, pid and a random suffix).
    :param refresh_interval: seconds between fleet-wide in-flight refreshes
        (and Redis-restart checks).
    :param publish_interval: seconds the publisher waits after the first
        queued event, to send more in the same pipeline.
    :param stream_maxlen: approximate length the event stream is trimmed to;
        a process lagging further behind reloads the compacted records.
    :param blocking_client: a client for the blocking ``XREAD`` (it holds a
        connection for up to ``block`` seconds); by default one is built
        from ``client``'s connection settings with a small private pool.
    :param block: seconds one ``XREAD`` waits for new events.
    :param max_queue: events kept while Redis is unreachable; the oldest are
        dropped beyond it (counted in ``stats()["dropped"]``), and once Redis
        answers again the full state of this process's nodes is re-published.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        sched: Scheduler,
        client: Any,
        namespace: str = "pysched",
        *,
        process_id: str | None = None,
        refresh_interval: float = 1.0,
        publish_interval: float = 0.005,
        stream_maxlen: int = 100_000,
        blocking_client: Any = None,
        block: float = 0.1,
        max_queue: int = 1_000_000,
    ) -> None:
        redis = _import_redis()
        backend = getattr(sched, "reservations", None)
        if not isinstance(backend, RedisReservations):
            raise TypeError(
                "RedisFleet needs a Scheduler whose reservations are a RedisReservations, got "
                f"{type(backend).__name__}: pass reservations=RedisReservations(client, namespace)"
            )
        if backend.namespace != namespace:
            raise ValueError(
                f"namespace {namespace!r} differs from the reservation backend's {backend.namespace!r}: "
                "the fleet and the reservations must share one namespace"
            )
        for name, value in (("refresh_interval", refresh_interval), ("block", block)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if isinstance(publish_interval, bool) or not isinstance(publish_interval, (int, float)) \
                or not publish_interval >= 0:
            raise ValueError(f"publish_interval must be >= 0 seconds, got {publish_interval!r}")
        for name, value in (("stream_maxlen", stream_maxlen), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if process_id is None:
            process_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        elif not isinstance(process_id, str) or not process_id:
            raise ValueError(f"process_id must be a non-empty str, got {process_id!r}")

        self._sched = sched
        self._backend = backend
        self._client = client
        self._blocking_client = blocking_client
        self._own_blocking = blocking_client is None
        self.namespace = namespace
        self.process_id = process_id
        self.refresh_interval = float(refresh_interval)
        self.publish_interval = float(publish_interval)
        self.stream_maxlen = stream_maxlen
        self.block = float(block)

        tag = "{" + namespace + "}:fleet:"
        self._k_events = tag + "events"
        self._k_nodes = tag + "nodes"
        self._k_node_prefix = tag + "node:"
        self._k_pool_ids = tag + "pool_ids"
        self._k_pool_seq = tag + "pool_seq"
        self._k_epoch = tag + "epoch"
        self._k_removed_prefix = tag + "removed:"

        exc = redis.exceptions
        # Same classification as RedisReservations: transient outages are
        # retried; auth errors are misconfiguration and are not swallowed.
        self._unavailable: tuple[type[BaseException], ...] = tuple(
            cls for cls in (exc.ConnectionError, exc.TimeoutError, exc.BusyLoadingError,
                            getattr(exc, "ReadOnlyError", None), getattr(exc, "TryAgainError", None),
                            getattr(exc, "ClusterDownError", None), ReservationBackendUnavailable)
            if cls is not None
        )
        self._not_unavailable: tuple[type[BaseException], ...] = tuple(
            cls for cls in (getattr(exc, "AuthenticationError", None), getattr(exc, "AuthorizationError", None))
            if cls is not None
        )
        self._noscript: type[BaseException] = exc.NoScriptError
        # Scripts as instance attributes: tests swap in strict (#!lua) copies.
        self._allocate_script, self._seed_script, self._publish_script = _ALLOCATE, _SEED, _PUBLISH

        # One bound method object: remove_listener finds listeners by identity,
        # and every `self._on_event` access makes a new one.
        self._listener = self._on_event
        # Set while the applier replays remote events on its thread: this
        # fleet's listener must not publish them again.
        self._local = threading.local()
        self._queue: deque[tuple[int, str, str, dict]] = deque(maxlen=max_queue)
        self._seq = itertools.count(1)  # next() is atomic in CPython: listeners on many threads
        self._published_seq = 0
        self._sending = 0  # highest seq of the batch the publisher holds
        self._published_cond = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started_once = False
        self._checked_empty = False
        self._running = False
        self._lifecycle = threading.Lock()

        self._own: set[str] = set()  # nodes registered through this process
        self._remote: set[str] = set()  # nodes learnt from other processes
        self._nodes_lock = threading.Lock()  # guards both sets (listeners run on any thread)
        self._overflowed = False
        self._known_pools: dict[str, int] = {}  # language-set key -> pool id
        self._pools_lock = threading.Lock()
        self._epoch: str | None = None
        self._last_id = "0-0"
        self._check_now = False

        self._stats_lock = threading.Lock()
        self._counters = dict.fromkeys(
            ("published", "applied", "skipped", "refreshes", "heals", "resyncs", "errors", "dropped",
             "pool_id_lookups", "adopted"), 0)
        self._last_error: str | None = None
        self._failing: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> RedisFleet:
        """Join the fleet: install the pool id allocator, load the fleet, start the threads.

        Raises :class:`ReservationBackendUnavailable` if Redis cannot be
        reached (nothing is started then), ``ValueError`` if the scheduler
        already has nodes on the first start.
        """
        with self._lifecycle:
            if self._running:
                return self
            if not self._started_once and not self._checked_empty:
                stats = self._sched.stats()
                # Auto mode: any registration so far (even one since removed)
                # gave a language set a local pool id the fleet does not know.
                if stats["nodes_total"] or (stats["mode"] == "auto" and self._sched.snapshot.version > 1):
                    raise ValueError(
                        "start the RedisFleet before registering nodes: pool ids allocated locally "
                        "would not agree with the fleet's"
                    )
                self._checked_empty = True
            self._stop.clear()
            self._sched.set_pool_id_allocator(self._allocate_pool_id)
            # Listen before loading, so a local change made meanwhile is
            # queued rather than lost (it is published once threads run).
            self._sched.add_listener(self._listener)
            try:
                if not self._started_once:
                    self._call(self._adopt_epoch)
                    self._call(self._load_fleet)
                else:
                    # Rejoining: read on from where this process stopped, so
                    # nothing published meanwhile (a removal) is missed; the
                    # check heals if Redis lost its data meanwhile, or reloads
                    # the records if the stream was trimmed past that point.
                    self._call(self._check_epoch)
            except BaseException:
                # The allocator stays: records applied before the failure
                # already hold fleet ids, and later ones must agree with them.
                self._sched.remove_listener(self._listener)
                raise
            if self._blocking_client is None:
                self._blocking_client = self._make_blocking_client()
            self._threads = [
                threading.Thread(target=self._apply_loop, name=f"pysched-fleet-apply-{self.namespace}",
                                 daemon=True),
                threading.Thread(target=self._publish_loop, name=f"pysched-fleet-publish-{self.namespace}",
                                 daemon=True),
            ]
            for thread in self._threads:
                thread.start()
            self._running = True
            self._started_once = True
            return self

    def stop(self, timeout: float = 5.0) -> None:
        """Leave the fleet: stop listening, send what is queued (one attempt), stop the threads.

        The pool id allocator stays installed, so ids keep agreeing with
        Redis if nodes are registered after the fleet stopped.
        """
        with self._lifecycle:
            if not self._running:
                return
            self._sched.remove_listener(self._listener)
            self._stop.set()
            self._wake.set()
            for thread in self._threads:
                thread.join(timeout)
            self._threads = []
            self._running = False
            if self._own_blocking and self._blocking_client is not None:
                try:
                    self._blocking_client.close()
                except Exception:  # pragma: no cover - closing a dead connection
                    pass
                self._blocking_client = None

    def __enter__(self) -> RedisFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._running

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every event queued before this call has been published.

        False if that did not happen within ``timeout`` seconds (e.g. Redis
        is down). Useful before handing work to another process.
        """
        try:
            target = self._queue[-1][0]
        except IndexError:  # empty (or emptied meanwhile by the publisher)
            target = 0
        target = max(target, self._sending)
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._published_cond:
            while self._published_seq < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._running:
                    return self._published_seq >= target
                self._published_cond.wait(left)
        return True

    def stats(self) -> dict:
        """Counters: events published / applied / skipped (own), refreshes,
        heals (Redis lost its data), resyncs (stream trimmed past us),
        adopted (nodes Redis had lost that this process re-published on
        hearing from them), errors and the last one, events dropped or
        pending, node ownership. Local: no network call."""
        with self._stats_lock:
            out: dict[str, Any] = dict(self._counters)
            out["last_error"] = self._last_error
        with self._nodes_lock:
            own, remote = len(self._own), len(self._remote)
        out.update(
            process_id=self.process_id,
            running=self._running,
            pending=len(self._queue),
            own_nodes=own,
            remote_nodes=remote,
            last_id=self._last_id,
        )
        return out

    # ------------------------------------------------------------------ helpers
    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._counters[name] += n

    def _error(self, where: str, exc: BaseException, *, loop: bool = False) -> None:
        """Count an error. ``loop``: a thread's failed round, retried (warn once per outage)."""
        first = True
        with self._stats_lock:
            self._counters["errors"] += 1
            self._last_error = f"{where}: {type(exc).__name__}: {exc}"
            if loop:
                first = where not in self._failing
                self._failing.add(where)
        log.log(logging.WARNING if first else logging.DEBUG, "pysched fleet %s: %s", where, exc)

    def _ok(self, where: str) -> None:
        if where in self._failing:
            with self._stats_lock:
                self._failing.discard(where)
            log.warning("pysched fleet %s: Redis reachable again", where)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn``; redis outages become :class:`ReservationBackendUnavailable`."""
        try:
            return fn(*args)
        except ReservationBackendUnavailable:
            raise
        except self._not_unavailable:
            raise
        except self._unavailable as exc:
            raise ReservationBackendUnavailable(f"fleet sync: redis unavailable ({type(exc).__name__}: {exc})") \
                from exc

    def _eval(self, client: Any, script: _Lua, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except self._noscript:
            return client.execute_command("EVAL", script.body, len(keys), *keys, *args)

    def _make_blocking_client(self) -> Any:
        """A client of its own for the blocking XREAD, with the user client's settings.

        Its socket timeout exceeds the block time, so an idle stream is not
        mistaken for an outage; a small pool keeps it from hoarding connections.
        """
        redis = _import_redis()
        pool = self._client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        base = kwargs.get("socket_timeout") or 1.0
        kwargs["socket_timeout"] = self.block + base
        return redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, max_connections=4, **kwargs))

    def _node_key(self, node_id: str) -> str:
        return self._k_node_prefix + node_id

    # ------------------------------------------------------------------ pool ids
    def _allocate_pool_id(self, languages: frozenset[str]) -> int:
        """The scheduler's allocator: the fleet-wide id of a language set.

        Called under the management lock before anything changes, so a Redis
        error here (raised as ReservationBackendUnavailable) leaves the
        registry untouched.
        """
        key = _set_key(languages)
        with self._pools_lock:
            floor = max(self._known_pools.values(), default=0)
        pid = int(self._call(self._eval, self._client, self._allocate_script,
                             [self._k_pool_ids, self._k_pool_seq], [key, floor]))
        with self._pools_lock:
            self._known_pools[key] = pid
        self._count("pool_id_lookups")
        return pid

    # ------------------------------------------------------------------ listener
    def _on_event(self, event: str, node_id: str, fields: dict) -> None:
        """The scheduler's listener: queue a local change. Runs on the caller's thread."""
        if getattr(self._local, "applying", False):
            return  # a remote event being replayed here: do not echo it
        if event not in _EVENTS:
            if event == "forget":
                # Each process forgets a long-dead node by itself: nothing to publish.
                with self._nodes_lock:
                    self._own.discard(node_id)
                    self._remote.discard(node_id)
            return  # "job_expired" and the like concern this process only
        if event == "register":
            with self._nodes_lock:
                self._own.add(node_id)
                self._remote.discard(node_id)
        elif event == "remove":
            with self._nodes_lock:
                self._own.discard(node_id)
                self._remote.discard(node_id)
        if len(self._queue) == self._queue.maxlen:
            # The deque drops the oldest event: re-publish full state later.
            self._count("dropped")
            self._overflowed = True
        self._queue.append((next(self._seq), event, node_id, fields))
        self._wake.set()

    # ------------------------------------------------------------------ publisher
    def _publish_loop(self) -> None:
        backoff = _BACKOFF_MIN
        while True:
            self._wake.wait(0.5)
            # Clear before looking at the queue: an event queued after the
            # look sets the flag again, so no wake-up is lost.
            self._wake.clear()
            stopping = self._stop.is_set()
            if not self._queue:
                if stopping:
                    return
                continue
            if self.publish_interval and not stopping:
                # Gather what arrives meanwhile into the same pipeline.
                self._stop.wait(self.publish_interval)
            batch: list[tuple[int, str, str, dict]] = []
            while self._queue and len(batch) < 5000:
                batch.append(self._queue.popleft())
            events = self._coalesce(batch)
            self._sending = max(self._sending, max(e[0] for e in events))
            try:
                self._call(self._send, events)
            except ReservationBackendUnavailable as exc:
                # Put the events back in front, in order, and retry later. A
                # full queue keeps the newest: the oldest are dropped, and the
                # full state is re-published once Redis answers.
                room = (self._queue.maxlen or 0) - len(self._queue)
                if len(events) > room:
                    self._count("dropped", len(events) - max(room, 0))
                    self._overflowed = True
                    events = events[len(events) - room:] if room > 0 else []
                self._queue.extendleft(reversed(events))
                self._error("publish", exc, loop=True)
                self._check_now = True
                if stopping:
                    self._count("dropped", len(self._queue))
                    return
                self._stop.wait(backoff)
                backoff = min(_BACKOFF_MAX, backoff * 2)
                self._wake.set()
                continue
            except Exception as exc:  # noqa: BLE001 - not an outage: retrying would loop forever
                self._error("publish (batch dropped)", exc)
                self._count("dropped", len(events))
                self._overflowed = True  # re-publish our nodes' full state instead
                continue
            backoff = _BACKOFF_MIN
            if self._failing:
                self._ok("publish")
            self._count("published", len(events))
            with self._published_cond:
                self._published_seq = max(self._published_seq, max(e[0] for e in events))
                self._published_cond.notify_all()
            if self._queue:
                self._wake.set()

    @staticmethod
    def _coalesce(batch: list[tuple[int, str, str, dict]]) -> list[tuple[int, str, str, dict]]:
        """Merge heartbeats of one node within a batch (later fields win).

        Only consecutive heartbeats of a node merge (any other event of that
        node closes the run, as order matters: a heartbeat revives an
        offline node), and never across an unhealthy one (each counts
        toward the degraded streak).
        """
        out: list[tuple[int, str, str, dict]] = []
        open_hb: dict[str, int] = {}
        for seq, event, node, fields in batch:
            if event == "heartbeat":
                i = open_hb.get(node)
                if i is not None and fields.get("healthy") is not False and out[i][3].get("healthy") is not False:
                    out[i] = (seq, event, node, {**out[i][3], **fields})
                    continue
                out.append((seq, event, node, fields))
                open_hb[node] = len(out) - 1
            else:
                open_hb.pop(node, None)
                out.append((seq, event, node, fields))
        return out

    def _publish_args(self, event: str, node_id: str, fields: dict) -> tuple[list[str], list[Any]]:
        keys = [self._k_events, self._k_nodes, self._node_key(node_id), self._backend._k_max(node_id),
                self._k_removed_prefix + node_id]
        healthy = fields.get("healthy")
        args: list[Any] = [self.stream_maxlen, self.process_id, event, node_id, _dumps(fields),
                           "" if healthy is None else ("1" if healthy else "0")]
        if event == "register":
            max_concurrency = fields.get("max_concurrency")
            args += ("" if max_concurrency is None else int(max_concurrency),
                     '"registering"' if fields.get("ready") is False else '"ready"', _REMOVED_MS)
            # readiness lives in the record's status, not as a register field
            record = tuple(f for f in _REGISTER_FIELDS if f != "ready")
        else:
            args += ("", "", _REMOVED_MS)
            record = tuple(f for f in _HEARTBEAT_FIELDS if f != "healthy") if event == "heartbeat" else ()
        for name in record:
            if name in fields:
                args += (name, _dumps(fields[name]))
        return keys, args

    def _send(self, events: list[tuple[int, str, str, dict]]) -> None:
        """One pipeline: one publish script call per event (NOSCRIPT: load, resend those)."""
        todo = events
        for _attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            sent = []
            for item in todo:
                try:
                    keys, args = self._publish_args(item[1], item[2], item[3])
                except (TypeError, ValueError) as exc:  # fields JSON cannot carry: skip the event
                    self._error(f"encode {item[1]} {item[2]!r}", exc)
                    continue
                pipe.execute_command("EVALSHA", self._publish_script.sha, len(keys), *keys, *args)
                sent.append(item)
            todo = sent
            if not todo:
                return
            results = pipe.execute(raise_on_error=False)
            retry = []
            lost = []
            for item, result in zip(todo, results):
                if isinstance(result, self._noscript):
                    retry.append(item)
                elif isinstance(result, BaseException):
                    if isinstance(result, self._unavailable):
                        raise result
                    # A bad event (cannot happen with our own encoder): skip it, keep the rest.
                    self._error("publish script", result)
                elif isinstance(result, (list, tuple)) and len(result) > 1 and _text(result[1]) == "lost":
                    lost.append(item[2])
            if lost:
                self._adopt_lost(lost)
            if not retry:
                return
            self._client.execute_command("SCRIPT", "LOAD", self._publish_script.body)
            todo = retry

    # ------------------------------------------------------------------ applier
    def _apply_loop(self) -> None:
        backoff = _BACKOFF_MIN
        next_refresh = 0.0
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if self._check_now or now >= next_refresh:
                    self._check_now = False
                    # The backend's refresh first: it is what marks the backend
                    # unavailable in stats() during an outage, and after a data
                    # loss it writes this process's jobs back before anything else.
                    self._call(self._backend.refresh_inflight)
                    self._count("refreshes")
                    self._call(self._check_epoch)
                    next_refresh = time.monotonic() + self.refresh_interval
                # Redis times blocked reads out on its cron (every 1/hz s,
                # 100 ms by default), so a BLOCK may overrun by that much:
                # block only while the refresh is not due within that slack,
                # else poll, so refreshes keep their period.
                remaining = next_refresh - time.monotonic()
                if remaining > _BLOCK_SLACK + 0.01:
                    self._call(self._read_and_apply, min(self.block, remaining - _BLOCK_SLACK))
                elif not self._call(self._read_and_apply, None):
                    self._stop.wait(min(0.01, max(0.0, remaining)))
                if self._failing:
                    self._ok("apply")
                backoff = _BACKOFF_MIN
            except Exception as exc:  # noqa: BLE001 - the thread must survive anything
                self._error("apply", exc, loop=True)
                self._check_now = True  # Redis may have restarted: check its epoch first
                self._stop.wait(backoff)
                backoff = min(_BACKOFF_MAX, backoff * 2)

    def _read_and_apply(self, wait: float | None) -> int:
        """Apply the next events of the stream (waiting up to ``wait`` s; None: no wait).

        Returns how many entries were read.
        """
        block = None if wait is None else max(1, int(wait * 1000))
        reply = self._blocking_client.xread({self._k_events: self._last_id}, count=1000, block=block)
        if not reply:
            return 0
        # RESP2: [[stream, entries]]; RESP3: {stream: entries}
        entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        for entry in entries:
            entry_id, raw = entry[0], entry[1]
            if not isinstance(raw, dict):  # a flat [field, value, ...] list
                raw = dict(zip(raw[::2], raw[1::2]))
            fields = {_text(k): _text(v) for k, v in raw.items()}
            if fields.get("p") == self.process_id:
                self._count("skipped")
            else:
                # An outage raises out of here before the position moves on,
                # so the event is applied again after the retry.
                self._apply_event(fields.get("e", ""), fields.get("n", ""), fields.get("f", "{}"))
            self._last_id = _text(entry_id)
        return len(entries)

    def _apply_event(self, event: str, node_id: str, payload: str) -> None:
        """Replay one remote event through the scheduler's public methods."""
        if event not in _EVENTS or not node_id:
            return
        try:
            fields = json.loads(payload) if payload else {}
        except ValueError as exc:
            self._error(f"bad {event} event for {node_id!r}", exc)
            return
        sched = self._sched
        self._local.applying = True
        try:
            if event == "register":
                sched.register_node(node_id, **{k: fields[k] for k in _REGISTER_FIELDS if k in fields})
                self._mark_remote(node_id)  # last writer wins: the node now belongs to that process
            elif event == "heartbeat":
                sched.heartbeat(node_id, **{k: fields[k] for k in _HEARTBEAT_FIELDS if k in fields})
            elif event == "drain":
                sched.drain_node(node_id)
            elif event == "offline":
                sched.mark_offline(node_id)
            elif event == "resume":
                sched.resume_node(node_id)
            elif event == "remove":
                with self._nodes_lock:
                    self._remote.discard(node_id)
                    self._own.discard(node_id)
                sched.remove_node(node_id)
            self._count("applied")
        except UnknownNode:
            if event != "remove":
                # An event about a node this process never saw (e.g. it
                # started after the register was trimmed): its compacted
                # record carries the whole current state.
                self._fetch_and_apply(node_id)
        except self._unavailable:
            raise
        except Exception as exc:  # noqa: BLE001
            # Refused here (e.g. this process's service limit): skip it. A
            # poison event must never stall the stream.
            self._error(f"apply {event} {node_id!r}", exc)
        finally:
            self._local.applying = False

    def _mark_remote(self, node_id: str) -> None:
        with self._nodes_lock:
            self._remote.add(node_id)
            self._own.discard(node_id)

    def _own_nodes(self) -> list[str]:
        with self._nodes_lock:
            return sorted(self._own)

    def _fetch_and_apply(self, node_id: str) -> None:
        """Apply the node's compacted record, if it has one (else ignore the event)."""
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.hgetall(self._node_key(node_id))
            pipe.time()
            record, server_time = pipe.execute()
        except self._unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - never stall the stream
            self._error(f"fetch record {node_id!r}", exc)
            return
        if record:
            self._apply_record(node_id, record, server_time)

    def _apply_record(self, node_id: str, raw: dict, server_time: Sequence[Any]) -> None:
        """Bring a node to the state its compacted record describes."""
        try:
            rec = {_text(k): json.loads(_text(v)) for k, v in raw.items() if _text(k) != "by"}
        except ValueError as exc:
            self._error(f"bad record of {node_id!r}", exc)
            return
        if "languages" not in rec:
            return  # not a complete record (should not happen: only a register starts one)
        now_ms = int(server_time[0]) * 1000 + int(server_time[1]) // 1000
        sched = self._sched
        self._local.applying = True
        try:
            status = rec.get("status", "ready")
            fields = {k: rec[k] for k in _REGISTER_FIELDS if k in rec}
            fields["ready"] = status != "registering"
            sched.register_node(node_id, **fields)
            self._mark_remote(node_id)
            load = {k: rec[k] for k in _LOAD_FIELDS if rec.get(k) is not None}
            if load:
                sched.heartbeat(node_id, **load)
            for _ in range(min(int(rec.get("streak", 0)), UNHEALTHY_LIMIT)):
                sched.heartbeat(node_id, healthy=False)
            # The record's last sign of life is in server time; a node silent
            # for longer than the timeout is offline for the late starter too
            # (registering it just made it look fresh).
            stale = now_ms - int(rec.get("seen", now_ms)) > sched.heartbeat_timeout * 1000
            if status == "draining":
                sched.drain_node(node_id)
            elif status == "offline" or stale:
                sched.mark_offline(node_id)
            self._count("applied")
        except self._unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a bad record must not stall the fleet
            self._error(f"apply record {node_id!r}", exc)
        finally:
            self._local.applying = False

    # ------------------------------------------------------------------ fleet state
    def _adopt_epoch(self) -> str:
        """Name the current Redis dataset (first process sets it) and remember it."""
        pipe = self._client.pipeline(transaction=True)
        pipe.set(self._k_epoch, secrets.token_hex(8), nx=True)
        pipe.get(self._k_epoch)
        self._epoch = _text(pipe.execute()[1])
        return self._epoch

    def _load_fleet(self, skip_own: bool = False) -> None:
        """Apply every compacted record, then continue the stream from before the load.

        The position is read first: events published during the load are
        read again afterwards (replaying them is harmless), none is missed.
        """
        pipe = self._client.pipeline(transaction=True)
        pipe.xrevrange(self._k_events, count=1)
        pipe.smembers(self._k_nodes)
        pipe.time()
        last, members, server_time = pipe.execute()
        position = _text(last[0][0]) if last else "0-0"
        nodes = sorted(_text(m) for m in members)
        own = set(self._own_nodes())
        if nodes:
            pipe = self._client.pipeline(transaction=False)
            for node in nodes:
                pipe.hgetall(self._node_key(node))
            records = pipe.execute()
            for node, record in zip(nodes, records):
                if record and not (skip_own and node in own):
                    self._apply_record(node, record, server_time)
        if skip_own:
            # A resync: a node learnt from another process that has no record
            # any more was removed in the events this process skipped.
            with self._nodes_lock:
                gone = sorted(self._remote - set(nodes))
            for node in gone:
                self._apply_event("remove", node, "{}")
        self._last_id = position

    def _check_epoch(self) -> None:
        """Detect a Redis that lost its data (heal) or a stream trimmed past us (resync)."""
        pipe = self._client.pipeline(transaction=False)
        pipe.get(self._k_epoch)
        pipe.xrange(self._k_events, count=1)
        epoch, first = pipe.execute()
        if epoch is None or _text(epoch) != self._epoch:
            self._heal()
            return
        if self._overflowed:
            # Events were dropped during a long outage: send our nodes' full state.
            self._overflowed = False
            self._enqueue_state(self._own_nodes())
        if self._last_id != "0-0" and (not first or _stream_id(first[0][0]) > _stream_id(self._last_id)):
            # Entries after our position may have been trimmed unread.
            self._count("resyncs")
            self._load_fleet(skip_own=True)

    def _heal(self) -> None:
        """Redis lost the fleet (restart without persistence, flush): restore our share.

        Re-seeds the pool ids this process knows, re-writes the max of the
        nodes registered here (reservations refuse unknown nodes as
        offline), re-publishes their full state, then reads the new stream
        from its start (the other processes re-publish theirs). The epoch is
        adopted last, so a failure half-way repeats the whole heal.
        """
        with self._pools_lock:
            known = sorted(self._known_pools.items(), key=lambda kv: kv[1])
        if known:
            self._eval(self._client, self._seed_script, [self._k_pool_ids, self._k_pool_seq],
                       [x for kv in known for x in kv])
        sched = self._sched
        own = self._own_nodes()
        for node_id in own:
            slot = sched.snapshot.slot(node_id)
            try:
                max_concurrency = int(sched.node(node_id)["max_concurrency"])
            except UnknownNode:
                continue  # removed meanwhile
            if slot is not None:
                self._backend.bind_node(slot, node_id, max_concurrency)
        self._overflowed = False
        self._enqueue_state(own)
        self._adopt_epoch()
        self._last_id = "0-0"
        self._count("heals")
        log.warning("pysched fleet: Redis lost the fleet state (restart?); re-published %d own nodes", len(own))

    def _adopt_lost(self, node_ids: Iterable[str]) -> None:
        """Nodes Redis has no record of, though nobody removed them (it lost its data).

        This process just heard from them (the event came from its own
        scheduler), so it re-publishes their full state, which writes their
        capacity back, and owns them from now on (it re-publishes them after
        the next data loss). That heals the nodes of a process that died: a
        heartbeat reaching any live process brings them back.
        """
        nodes = sorted(set(node_ids))
        with self._nodes_lock:
            for node_id in nodes:
                self._own.add(node_id)
                self._remote.discard(node_id)
        self._enqueue_state(nodes)
        self._count("adopted", len(nodes))
        log.warning("pysched fleet: re-published %d node(s) Redis had lost: %s", len(nodes), ", ".join(nodes))

    def _enqueue_state(self, node_ids: Iterable[str]) -> None:
        """Queue events that rebuild these nodes' current state in every process."""
        for node_id in node_ids:
            try:
                info = self._sched.node(node_id)
            except UnknownNode:
                continue
            for event, node, fields in self._state_events(node_id, info):
                self._queue.append((next(self._seq), event, node, fields))
        self._wake.set()

    @staticmethod
    def _state_events(node_id: str, info: dict) -> list[tuple[str, str, dict]]:
        """Events that rebuild a node's current state elsewhere."""
        events: list[tuple[str, str, dict]] = [("register", node_id, {
            "languages": sorted(info["languages"]), "services": sorted(info["services"]),
            "max_concurrency": int(info["max_concurrency"]), "has_gpu": bool(info["has_gpu"]),
            "accept_public_jobs": bool(info["accept_public_jobs"]),
            "ready": info.get("status") != "registering",
        })]
        load: dict[str, Any] = {}
        for name in _LOAD_FIELDS:
            value = info.get(name)
            if value is None or value != value:  # NaN: never reported
                continue
            if name == "running":
                if int(value) < 0:
                    continue
                value = int(value)
            else:
                value = float(value)
            load[name] = value
        if load:
            events.append(("heartbeat", node_id, load))
        status = info.get("status")
        if status == "draining":
            events.append(("drain", node_id, {}))
        elif status == "offline":
            events.append(("offline", node_id, {}))
        elif status == "degraded":
            events += [("heartbeat", node_id, {"healthy": False})] * UNHEALTHY_LIMIT
        return events
