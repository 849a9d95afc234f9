"""What the fleet's facade, publisher and applier share.

:class:`~pysched.redis.RedisFleet` (caller threads), its publisher thread
(:mod:`pysched.redis._publisher`) and its applier thread
(:mod:`pysched.redis._applier`) each own the state they mutate. What more
than one of them touches lives here, each piece behind a lock of its own:
the counters (:class:`FleetStats`), which nodes this process re-publishes
(:class:`NodeOwners`), plus the read-only parts handed to both threads
(:class:`FleetContext`: key names, scripts, the event vocabulary).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from pysched.redis._scripts import Script, ScriptClient, shipped

if TYPE_CHECKING:  # pragma: no cover
    from pysched.redis.reservations import RedisReservations
    from pysched.scheduler import Scheduler

#: one logger for the fleet's three parts
log = logging.getLogger("pysched.redis.fleet")

#: the register_node / heartbeat keywords an event may carry (anything else is dropped)
REGISTER_FIELDS = ("languages", "services", "max_concurrency", "has_gpu", "accept_public_jobs", "ready")
HEARTBEAT_FIELDS = ("running", "cpu", "gpu", "mem", "healthy", "max_concurrency", "services", "languages")
LOAD_FIELDS = ("running", "cpu", "gpu", "mem")
STATUS_EVENTS = ("drain", "offline", "resume")
#: the events shared through Redis; any other listener event ("job_expired",
#: "forget") is this process's own business and is never published
EVENTS = frozenset(("register", "heartbeat", "remove", *STATUS_EVENTS))

# Exponential back-off of both threads after a Redis error (seconds).
BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0

#: the fleet's Lua scripts (``pysched/redis/lua/<name>.lua``)
SCRIPT_NAMES = ("fleet_allocate", "fleet_seed", "fleet_publish")

Fields = dict[str, Any]
"""An event's keyword arguments (JSON-encodable)."""


class Queued(NamedTuple):
    """One local node event waiting to be published."""

    seq: int  #: queue order (flush waits for a sequence number)
    event: str
    node_id: str
    fields: Fields


@dataclass
class FleetScripts:
    """The fleet's scripts; attributes, not constants, so a test can swap in strict (``#!lua``) copies."""

    allocate: Script = field(default_factory=lambda: shipped("fleet_allocate"))
    seed: Script = field(default_factory=lambda: shipped("fleet_seed"))
    publish: Script = field(default_factory=lambda: shipped("fleet_publish"))


class FleetKeys:
    """The fleet's Redis keys (``T`` = ``{<namespace>}``, RedisReservations' hash tag; see :mod:`pysched.redis.fleet`).

    :param namespace: the shared namespace.
    """

    __slots__ = ("epoch", "events", "node_prefix", "nodes", "pool_ids", "pool_seq", "removed_prefix")

    def __init__(self, namespace: str) -> None:
        tag = "{" + namespace + "}:fleet:"
        self.events = tag + "events"
        self.nodes = tag + "nodes"
        self.node_prefix = tag + "node:"
        self.pool_ids = tag + "pool_ids"
        self.pool_seq = tag + "pool_seq"
        self.epoch = tag + "epoch"
        self.removed_prefix = tag + "removed:"

    def node(self, node_id: str) -> str:
        """The node's compacted record."""
        return self.node_prefix + node_id

    def removed(self, node_id: str) -> str:
        """The node's removal mark."""
        return self.removed_prefix + node_id


class FleetStats:
    """Counters and the last error; any thread adds to them (one lock)."""

    NAMES = ("published", "applied", "skipped", "refreshes", "heals", "resyncs", "errors", "dropped",
             "pool_id_lookups", "adopted")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(self.NAMES, 0)
        self._last_error: str | None = None
        # the loops ("publish", "apply") whose last round failed: warned once per outage
        self._failing: set[str] = set()

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        with self._lock:
            self._counters[name] += n

    def error(self, where: str, exc: BaseException, *, loop: bool = False) -> None:
        """Count an error. ``loop``: a thread's failed round, retried (warn once per outage)."""
        first = True
        with self._lock:
            self._counters["errors"] += 1
            self._last_error = f"{where}: {type(exc).__name__}: {exc}"
            if loop:
                first = where not in self._failing
                self._failing.add(where)
        log.log(logging.WARNING if first else logging.DEBUG, "pysched fleet %s: %s", where, exc)

    def ok(self, where: str) -> None:
        """A loop's round succeeded: say so once if it was failing."""
        if where in self._failing:
            with self._lock:
                self._failing.discard(where)
            log.warning("pysched fleet %s: Redis reachable again", where)

    @property
    def failing(self) -> bool:
        """Some loop's last round failed (a cheap unlocked read: a hint, :meth:`ok` decides)."""
        return bool(self._failing)

    def snapshot(self) -> dict[str, Any]:
        """The counters and ``last_error``."""
        with self._lock:
            out: dict[str, Any] = dict(self._counters)
            out["last_error"] = self._last_error
        return out


class NodeOwners:
    """Which nodes this process re-publishes after a data loss, and which it learnt from others.

    Listeners run on any thread, the applier and publisher on theirs: one lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._own: set[str] = set()  # nodes registered (or adopted) through this process
        self._remote: set[str] = set()  # nodes learnt from other processes

    def mine(self, node_ids: list[str]) -> None:
        """These nodes are this process's from now on."""
        with self._lock:
            for node_id in node_ids:
                self._own.add(node_id)
                self._remote.discard(node_id)

    def theirs(self, node_id: str) -> None:
        """Another process published this node's registration (last writer wins)."""
        with self._lock:
            self._remote.add(node_id)
            self._own.discard(node_id)

    def forget(self, node_id: str) -> None:
        """The node is gone (removed, or forgotten by this process)."""
        with self._lock:
            self._own.discard(node_id)
            self._remote.discard(node_id)

    def own(self) -> list[str]:
        """This process's nodes, sorted."""
        with self._lock:
            return sorted(self._own)

    def remote_except(self, node_ids: set[str]) -> list[str]:
        """Nodes learnt from others that are not in ``node_ids``, sorted."""
        with self._lock:
            return sorted(self._remote - node_ids)

    def counts(self) -> tuple[int, int]:
        """How many nodes are own and remote."""
        with self._lock:
            return len(self._own), len(self._remote)


@dataclass(frozen=True)
class FleetContext:
    """What the facade hands to both threads (the objects are shared; each guards itself)."""

    sched: Scheduler
    backend: RedisReservations
    redis: ScriptClient  #: the user's client, classified (outages: "fleet sync: redis unavailable")
    keys: FleetKeys
    scripts: FleetScripts
    stats: FleetStats
    owners: NodeOwners
    process_id: str
    #: set by :meth:`RedisFleet.stop`: both loops end
    stop: threading.Event
    #: set by the publisher after a failed send: the applier checks Redis's epoch at once
    recheck: threading.Event
    #: errors an apply step re-raises so its loop retries (an outage, never a poison event):
    #: ReservationBackendUnavailable and redis-py's outage classes
    outage: tuple[type[BaseException], ...]


def _json_default(value: Any) -> Any:
    """Encode numpy scalars and sets (which heartbeat callers may pass) as JSON."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value)
    raise TypeError(f"cannot encode {type(value).__name__} in a fleet event")


def dumps(value: object) -> str:
    """Compact JSON, numpy scalars and sets included."""
    return json.dumps(value, separators=(",", ":"), default=_json_default)
