"""Fleet sync: several scheduler processes share one fleet of nodes through Redis.

Each process runs its own :class:`~pysched.Scheduler` (own snapshots, own
compiled kernel) on a shared :class:`~pysched.redis.RedisReservations`.
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
back first (see :mod:`pysched.redis.reservations`: no node is over-committed
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

import os
import secrets
import socket
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pysched.errors import ReservationBackendUnavailable
from pysched.redis._applier import Applier
from pysched.redis._fleet_shared import (
    EVENTS,
    Fields,
    FleetContext,
    FleetKeys,
    FleetScripts,
    FleetStats,
    NodeOwners,
)
from pysched.redis._publisher import Publisher
from pysched.redis._scripts import RedisClient, ScriptClient
from pysched.redis.reservations import RedisReservations

if TYPE_CHECKING:  # pragma: no cover
    from pysched.scheduler import Scheduler

__all__ = ["RedisFleet"]


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
        (and Redis-restart checks). :meth:`start` raises the backend's
        ``recovery_quiet`` to at least twice this: after Redis lost its data,
        a holder finds the loss within one refresh.
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

    Threads: this facade runs on the caller's threads (the scheduler's
    listener, the pool id allocator, start / stop / flush / stats). It owns
    the lifecycle (the two threads) and the pool ids this process knows. The
    publisher thread (:class:`~pysched.redis._publisher.Publisher`) and the
    applier thread (:class:`~pysched.redis._applier.Applier`) each own the
    state they mutate; what they share is in :mod:`pysched.redis._fleet_shared`.
    """

    def __init__(
        self,
        sched: Scheduler,
        client: RedisClient,
        namespace: str = "pysched",
        *,
        process_id: str | None = None,
        refresh_interval: float = 1.0,
        publish_interval: float = 0.005,
        stream_maxlen: int = 100_000,
        blocking_client: RedisClient = None,
        block: float = 0.1,
        max_queue: int = 1_000_000,
    ) -> None:
        # First: without redis-py, say which extra to install before anything else.
        calls = ScriptClient(client, "fleet sync: redis unavailable", "RedisFleet")
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
        self.namespace = namespace
        self.process_id = process_id
        self._stop = threading.Event()
        self._ctx = FleetContext(
            sched=sched, backend=backend, redis=calls, keys=FleetKeys(namespace),
            # Scripts as attributes: tests swap in strict (#!lua) copies.
            scripts=FleetScripts(), stats=FleetStats(), owners=NodeOwners(), process_id=process_id,
            stop=self._stop, recheck=threading.Event(), outage=(ReservationBackendUnavailable, *calls.outage),
        )
        self._publisher = Publisher(self._ctx, publish_interval=float(publish_interval),
                                    stream_maxlen=stream_maxlen, max_queue=max_queue)
        self._applier = Applier(self._ctx, self._publisher, self._known_pool_ids,
                                refresh_interval=float(refresh_interval), block=float(block),
                                blocking_client=blocking_client)

        # One bound method object: remove_listener finds listeners by identity,
        # and every `self._on_event` access makes a new one.
        self._listener = self._on_event
        self._threads: list[threading.Thread] = []
        self._started_once = False
        self._checked_empty = False
        self._running = False
        self._lifecycle = threading.Lock()
        # language-set key -> pool id: written by the allocator (caller threads,
        # under the scheduler's management lock), read by the applier's heal
        self._known_pools: dict[str, int] = {}
        self._pools_lock = threading.Lock()

    # -- settings, as given (the threads hold their own copies) ---------------------------
    @property
    def refresh_interval(self) -> float:
        """Seconds between fleet-wide in-flight refreshes (and Redis-restart checks)."""
        return self._applier.refresh_interval

    @property
    def publish_interval(self) -> float:
        """Seconds the publisher waits after the first queued event."""
        return self._publisher.publish_interval

    @property
    def stream_maxlen(self) -> int:
        """Approximate length the event stream is trimmed to."""
        return self._publisher.stream_maxlen

    @property
    def block(self) -> float:
        """Seconds one ``XREAD`` waits for new events."""
        return self._applier.block

    # -- lifecycle (caller threads) ----------------------------------------------------------
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
            backend = self._ctx.backend
            backend.recovery_quiet = max(backend.recovery_quiet, 2 * self._applier.refresh_interval)
            self._sched.set_pool_id_allocator(self._allocate_pool_id)
            # Listen before loading, so a local change made meanwhile is
            # queued rather than lost (it is published once threads run).
            self._sched.add_listener(self._listener)
            call, applier = self._ctx.redis.call, self._applier
            try:
                if not self._started_once:
                    call(applier.adopt_epoch)
                    call(applier.load_fleet)
                else:
                    # Rejoining: read on from where this process stopped, so
                    # nothing published meanwhile (a removal) is missed; the
                    # check heals if Redis lost its data meanwhile, or reloads
                    # the records if the stream was trimmed past that point.
                    call(applier.check_epoch)
            except BaseException:
                # The allocator stays: records applied before the failure
                # already hold fleet ids, and later ones must agree with them.
                self._sched.remove_listener(self._listener)
                raise
            applier.connect()
            self._threads = [
                threading.Thread(target=applier.run, name=f"pysched-fleet-apply-{self.namespace}", daemon=True),
                threading.Thread(target=self._publisher.run, name=f"pysched-fleet-publish-{self.namespace}",
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
            self._publisher.wake()
            for thread in self._threads:
                thread.join(timeout)
            self._threads = []
            self._running = False
            self._applier.disconnect()

    def __enter__(self) -> RedisFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the fleet's threads run (between :meth:`start` and :meth:`stop`)."""
        return self._running

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every event queued before this call has been published.

        False if that did not happen within ``timeout`` seconds (e.g. Redis
        is down). Useful before handing work to another process.
        """
        return self._publisher.flush(timeout, lambda: self._running)

    def stats(self) -> dict[str, Any]:
        """Counters and state, local (no network call).

        Events ``published`` / ``applied`` / ``skipped`` (own), ``refreshes``,
        ``heals`` (Redis lost its data), ``resyncs`` (stream trimmed past
        us), ``adopted`` (nodes Redis had lost that this process re-published
        on hearing from them), ``errors`` and the ``last_error``, events
        ``dropped`` or ``pending``, node ownership (``own_nodes``,
        ``remote_nodes``), ``process_id``, ``running``, ``last_id``.
        """
        out = self._ctx.stats.snapshot()
        own, remote = self._ctx.owners.counts()
        out.update(
            process_id=self.process_id,
            running=self._running,
            pending=self._publisher.pending,
            own_nodes=own,
            remote_nodes=remote,
            last_id=self._applier.last_id,
        )
        return out

    # -- pool ids (caller threads) --------------------------------------------------------
    def _allocate_pool_id(self, languages: frozenset[str]) -> int:
        """The scheduler's allocator: the fleet-wide id of a language set.

        Called under the management lock before anything changes, so a Redis
        error here (raised as ReservationBackendUnavailable) leaves the
        registry untouched.
        """
        key = _set_key(languages)
        with self._pools_lock:
            floor = max(self._known_pools.values(), default=0)
        ctx = self._ctx
        pid = int(ctx.redis.eval(ctx.scripts.allocate, [ctx.keys.pool_ids, ctx.keys.pool_seq], [key, floor]))
        with self._pools_lock:
            self._known_pools[key] = pid
        ctx.stats.count("pool_id_lookups")
        return pid

    def _known_pool_ids(self) -> list[tuple[str, int]]:
        """The pool ids this process knows, by id (the applier re-seeds them after a data loss)."""
        with self._pools_lock:
            return sorted(self._known_pools.items(), key=lambda kv: kv[1])

    # -- the scheduler's listener (caller threads) ------------------------------------------
    def _on_event(self, event: str, node_id: str, fields: Fields) -> None:
        """The scheduler's listener: queue a local change. Runs on the caller's thread."""
        if self._applier.replaying:
            return  # a remote event being replayed here: do not echo it
        owners = self._ctx.owners
        if event not in EVENTS:
            if event == "forget":
                # Each process forgets a long-dead node by itself: nothing to publish.
                owners.forget(node_id)
            return  # "job_expired" and the like concern this process only
        if event == "register":
            owners.mine([node_id])
        elif event == "remove":
            owners.forget(node_id)
        self._publisher.enqueue(event, node_id, fields)
