"""The fleet's publisher: sends this process's node events to Redis.

See :mod:`pysched.redis.fleet` for the protocol; the script is
``pysched/redis/lua/fleet_publish.lua``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pysched.errors import ReservationBackendUnavailable, UnknownNode
from pysched.management import UNHEALTHY_LIMIT
from pysched.redis._fleet_shared import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    HEARTBEAT_FIELDS,
    LOAD_FIELDS,
    REGISTER_FIELDS,
    Fields,
    FleetContext,
    Queued,
    dumps,
    log,
)
from pysched.redis._scripts import text

__all__ = ["Publisher", "coalesce", "state_events"]

#: how long a removal is remembered in Redis (a heartbeat published meanwhile
#: by a process that has not applied the removal yet must not resurrect it)
_REMOVED_MS = 3_600_000
#: events sent in one pipeline at most
_BATCH = 5000


class Publisher:
    """Sends the queued local node events, one pipeline per batch.

    Thread: :meth:`run` is the publisher thread (``pysched-fleet-publish-<namespace>``).
    It owns the outgoing queue and what it has sent (``_sending``,
    ``_published_seq``). Other threads only append: the scheduler's listener
    (:meth:`enqueue`, on the caller's thread, never waiting for the network),
    and the applier (:meth:`enqueue_state` after a data loss); a deque's
    append and popleft are atomic. :meth:`flush` waits on the condition the
    thread signals. The ``overflowed`` flag (events were dropped: re-publish
    the full state) is raised here or by a listener, and taken by the
    applier (:meth:`take_overflow`) when it re-publishes.

    :param ctx: the fleet's shared parts.
    :param publish_interval: seconds to wait after the first queued event, to
        send more in the same pipeline.
    :param stream_maxlen: approximate length the stream is trimmed to.
    :param max_queue: events kept while Redis is unreachable (the oldest are dropped).
    """

    def __init__(self, ctx: FleetContext, *, publish_interval: float, stream_maxlen: int, max_queue: int) -> None:
        self._ctx = ctx
        self.publish_interval = publish_interval
        self.stream_maxlen = stream_maxlen
        self._queue: deque[Queued] = deque(maxlen=max_queue)
        self._seq = itertools.count(1)  # next() is atomic in CPython: listeners on many threads
        self._published_seq = 0
        self._sending = 0  # highest seq of the batch the thread holds
        self._published_cond = threading.Condition()
        self._wake = threading.Event()
        #: events were dropped (queue full, or a batch Redis refused): the
        #: applier re-publishes this process's nodes' full state
        self.overflowed = False

    # -- any thread ------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Events queued, not yet sent."""
        return len(self._queue)

    def enqueue(self, event: str, node_id: str, fields: Fields) -> None:
        """Queue one local event (the listener; runs on the caller's thread, never blocks)."""
        if len(self._queue) == self._queue.maxlen:
            # The deque drops the oldest event: re-publish full state later.
            self._ctx.stats.count("dropped")
            self.overflowed = True
        self._queue.append(Queued(next(self._seq), event, node_id, fields))
        self._wake.set()

    def enqueue_state(self, node_ids: Iterable[str]) -> None:
        """Queue events that rebuild these nodes' current state in every process."""
        sched = self._ctx.sched
        for node_id in node_ids:
            try:
                info = sched.node(node_id)
            except UnknownNode:
                continue
            for event, node, fields in state_events(node_id, info):
                self._queue.append(Queued(next(self._seq), event, node, fields))
        self._wake.set()

    def take_overflow(self) -> bool:
        """Whether events were dropped since the last call (the applier then re-publishes)."""
        overflowed, self.overflowed = self.overflowed, False
        return overflowed

    def wake(self) -> None:
        """Make the thread look at the queue (and at the stop event) now."""
        self._wake.set()

    def flush(self, timeout: float, running: Callable[[], bool]) -> bool:
        """Wait until every event queued before this call has been published.

        :param timeout: seconds to wait at most.
        :param running: whether the fleet still runs (stop waiting when not).
        :returns: False if that did not happen within ``timeout``.
        """
        try:
            target = self._queue[-1].seq
        except IndexError:  # empty (or emptied meanwhile by the publisher)
            target = 0
        target = max(target, self._sending)
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._published_cond:
            while self._published_seq < target:
                left = deadline - time.monotonic()
                if left <= 0 or not running():
                    return self._published_seq >= target
                self._published_cond.wait(left)
        return True

    # -- the publisher thread ------------------------------------------------------
    def run(self) -> None:
        """The thread: send batches until stopped; never dies of a Redis error."""
        ctx = self._ctx
        stop, stats = ctx.stop, ctx.stats
        backoff = BACKOFF_MIN
        while True:
            self._wake.wait(0.5)
            # Clear before looking at the queue: an event queued after the
            # look sets the flag again, so no wake-up is lost.
            self._wake.clear()
            stopping = stop.is_set()
            if not self._queue:
                if stopping:
                    return
                continue
            if self.publish_interval and not stopping:
                # Gather what arrives meanwhile into the same pipeline.
                stop.wait(self.publish_interval)
            batch: list[Queued] = []
            while self._queue and len(batch) < _BATCH:
                batch.append(self._queue.popleft())
            events = coalesce(batch)
            self._sending = max(self._sending, *(e.seq for e in events))
            try:
                ctx.redis.call(self._send, events)
            except ReservationBackendUnavailable as exc:
                # Put the events back in front, in order, and retry later. A
                # full queue keeps the newest: the oldest are dropped, and the
                # full state is re-published once Redis answers.
                room = (self._queue.maxlen or 0) - len(self._queue)
                if len(events) > room:
                    stats.count("dropped", len(events) - max(room, 0))
                    self.overflowed = True
                    events = events[len(events) - room :] if room > 0 else []
                self._queue.extendleft(reversed(events))
                stats.error("publish", exc, loop=True)
                ctx.recheck.set()
                if stopping:
                    stats.count("dropped", len(self._queue))
                    return
                stop.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                self._wake.set()
                continue
            except Exception as exc:  # not an outage: retrying would loop forever
                stats.error("publish (batch dropped)", exc)
                stats.count("dropped", len(events))
                self.overflowed = True  # re-publish our nodes' full state instead
                continue
            backoff = BACKOFF_MIN
            if stats.failing:
                stats.ok("publish")
            stats.count("published", len(events))
            with self._published_cond:
                self._published_seq = max(self._published_seq, *(e.seq for e in events))
                self._published_cond.notify_all()
            if self._queue:
                self._wake.set()

    def _publish_args(self, event: str, node_id: str, fields: Fields) -> tuple[list[str], list[Any]]:
        ctx = self._ctx
        keys = [ctx.keys.events, ctx.keys.nodes, ctx.keys.node(node_id), ctx.backend._k_max(node_id),
                ctx.keys.removed(node_id)]
        healthy = fields.get("healthy")
        args: list[Any] = [self.stream_maxlen, ctx.process_id, event, node_id, dumps(fields),
                           "" if healthy is None else ("1" if healthy else "0")]
        record: tuple[str, ...]
        if event == "register":
            max_concurrency = fields.get("max_concurrency")
            args += ("" if max_concurrency is None else int(max_concurrency),
                     '"registering"' if fields.get("ready") is False else '"ready"', _REMOVED_MS)
            # readiness lives in the record's status, not as a register field
            record = tuple(f for f in REGISTER_FIELDS if f != "ready")
        else:
            args += ("", "", _REMOVED_MS)
            record = tuple(f for f in HEARTBEAT_FIELDS if f != "healthy") if event == "heartbeat" else ()
        for name in record:
            if name in fields:
                args += (name, dumps(fields[name]))
        return keys, args

    def _send(self, events: list[Queued]) -> None:
        """One pipeline: one publish script call per event (NOSCRIPT: load, resend those)."""
        ctx = self._ctx
        sent: list[Queued] = []
        calls: list[tuple[Sequence[str], Sequence[Any]]] = []
        for item in events:
            try:
                calls.append(self._publish_args(item.event, item.node_id, item.fields))
            except (TypeError, ValueError) as exc:  # fields JSON cannot carry: skip the event
                ctx.stats.error(f"encode {item.event} {item.node_id!r}", exc)
                continue
            sent.append(item)
        if not sent:
            return
        lost = []
        for item, result in zip(sent, ctx.redis.eval_each(ctx.scripts.publish, calls), strict=True):
            if isinstance(result, BaseException):
                # A bad event (cannot happen with our own encoder): skip it, keep the rest.
                ctx.stats.error("publish script", result)
            elif isinstance(result, (list, tuple)) and len(result) > 1 and text(result[1]) == "lost":
                lost.append(item.node_id)
        if lost:
            self._adopt_lost(lost)

    def _adopt_lost(self, node_ids: Iterable[str]) -> None:
        """Nodes Redis has no record of, though nobody removed them (it lost its data).

        This process just heard from them (the event came from its own
        scheduler), so it re-publishes their full state, which writes their
        capacity back, and owns them from now on (it re-publishes them after
        the next data loss). That heals the nodes of a process that died: a
        heartbeat reaching any live process brings them back.
        """
        nodes = sorted(set(node_ids))
        self._ctx.owners.mine(nodes)
        self.enqueue_state(nodes)
        self._ctx.stats.count("adopted", len(nodes))
        log.warning("pysched fleet: re-published %d node(s) Redis had lost: %s", len(nodes), ", ".join(nodes))


def coalesce(batch: Sequence[Queued]) -> list[Queued]:
    """Merge heartbeats of one node within a batch (later fields win).

    Only consecutive heartbeats of a node merge (any other event of that
    node closes the run, as order matters: a heartbeat revives an offline
    node), and never across an unhealthy one (each counts toward the
    degraded streak).
    """
    out: list[Queued] = []
    open_hb: dict[str, int] = {}
    for seq, event, node, fields in batch:
        if event == "heartbeat":
            i = open_hb.get(node)
            if i is not None and fields.get("healthy") is not False and out[i].fields.get("healthy") is not False:
                out[i] = Queued(seq, event, node, {**out[i].fields, **fields})
                continue
            out.append(Queued(seq, event, node, fields))
            open_hb[node] = len(out) - 1
        else:
            open_hb.pop(node, None)
            out.append(Queued(seq, event, node, fields))
    return out


def state_events(node_id: str, info: dict[str, Any]) -> list[tuple[str, str, Fields]]:
    """Events that rebuild a node's current state elsewhere (``info``: :meth:`Scheduler.node`)."""
    events: list[tuple[str, str, Fields]] = [("register", node_id, {
        "languages": sorted(info["languages"]), "services": sorted(info["services"]),
        "max_concurrency": int(info["max_concurrency"]), "has_gpu": bool(info["has_gpu"]),
        "accept_public_jobs": bool(info["accept_public_jobs"]),
        "ready": info.get("status") != "registering",
    })]
    load: Fields = {}
    for name in LOAD_FIELDS:
        value = info.get(name)
        if value is None or value != value:  # noqa: PLR0124  NaN (never reported) is the one value unequal to itself
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
