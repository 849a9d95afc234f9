"""The fleet's applier: replays the node events other processes published, and heals.

See :mod:`pysched.redis.fleet` for the protocol.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pysched.errors import UnknownNode
from pysched.management import UNHEALTHY_LIMIT
from pysched.redis._fleet_shared import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    EVENTS,
    HEARTBEAT_FIELDS,
    LOAD_FIELDS,
    REGISTER_FIELDS,
    FleetContext,
    log,
)
from pysched.redis._publisher import Publisher
from pysched.redis._scripts import RedisClient, import_redis, text

__all__ = ["Applier"]

#: how late Redis may end a blocking read (its timer runs every 1/hz s; hz=10 by default)
_BLOCK_SLACK = 0.11
#: stream entries read per XREAD
_READ_COUNT = 1000


def _stream_id(value: object) -> tuple[int, int]:
    """A stream entry id ``"<ms>-<seq>"`` as a comparable tuple."""
    ms, _, seq = text(value).partition("-")
    return int(ms), int(seq or 0)


class Applier:
    """Reads the event stream and replays other processes' events on the local scheduler.

    Thread: :meth:`run` is the applier thread (``pysched-fleet-apply-<namespace>``).
    It owns the stream position (:attr:`last_id`), the Redis dataset this
    process has joined (:attr:`epoch`), its blocking connection, and the
    "replaying" flag (thread-local: the scheduler's listener reads it, on
    the thread that replays, so a replayed event is not published again).
    :meth:`RedisFleet.start` also calls :meth:`adopt_epoch`,
    :meth:`load_fleet` and :meth:`check_epoch` on the caller's thread, and
    :meth:`connect` / :meth:`disconnect`: only while the thread does not
    run. It also keeps the backend's in-flight mirror fresh (one refresh
    every ``refresh_interval``) and heals after Redis lost its data.

    :param ctx: the fleet's shared parts.
    :param publisher: where the full state of this process's nodes is queued when it heals.
    :param known_pool_ids: the pool ids this process knows, ``(language-set key, id)`` by id.
    :param refresh_interval: seconds between refreshes and epoch checks.
    :param block: seconds one ``XREAD`` waits for new events.
    :param blocking_client: a client for ``XREAD``; None: :meth:`connect` builds one.
    """

    def __init__(
        self,
        ctx: FleetContext,
        publisher: Publisher,
        known_pool_ids: Callable[[], list[tuple[str, int]]],
        *,
        refresh_interval: float,
        block: float,
        blocking_client: RedisClient,
    ) -> None:
        self._ctx = ctx
        self._publisher = publisher
        self._known_pool_ids = known_pool_ids
        self.refresh_interval = refresh_interval
        self.block = block
        self._blocking_client = blocking_client
        self._own_blocking = blocking_client is None
        self._local = threading.local()
        #: the stream position: the last entry applied (or skipped)
        self.last_id = "0-0"
        #: the token naming the Redis dataset this process has joined
        self.epoch: str | None = None

    # -- read by the listener, on any thread -------------------------------------------
    @property
    def replaying(self) -> bool:
        """Whether this thread is replaying a remote event right now."""
        return bool(getattr(self._local, "applying", False))

    # -- the connection (caller's thread, thread not running) ----------------------------
    def connect(self) -> None:
        """Build the blocking client if none was given.

        It has the user client's settings; its socket timeout exceeds the
        block time, so an idle stream is not mistaken for an outage; a small
        pool keeps it from hoarding connections.
        """
        if self._blocking_client is not None:
            return
        redis = import_redis("RedisFleet")
        pool = self._ctx.redis.client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        base = kwargs.get("socket_timeout") or 1.0
        kwargs["socket_timeout"] = self.block + base
        self._blocking_client = redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, max_connections=4, **kwargs))

    def disconnect(self) -> None:
        """Close the blocking client if :meth:`connect` built it."""
        if self._own_blocking and self._blocking_client is not None:
            with contextlib.suppress(Exception):  # closing a dead connection
                self._blocking_client.close()
            self._blocking_client = None

    # -- the applier thread ------------------------------------------------------------
    def run(self) -> None:
        """The thread: refresh, check the epoch, apply events, until stopped; never dies of a Redis error."""
        ctx = self._ctx
        stop, stats, call = ctx.stop, ctx.stats, ctx.redis.call
        backoff = BACKOFF_MIN
        next_refresh = 0.0
        while not stop.is_set():
            try:
                now = time.monotonic()
                if ctx.recheck.is_set() or now >= next_refresh:
                    ctx.recheck.clear()
                    # The backend's refresh first: it is what marks the backend
                    # unavailable in stats() during an outage, and after a data
                    # loss it writes this process's jobs back before anything else.
                    call(ctx.backend.refresh_inflight)
                    stats.count("refreshes")
                    call(self.check_epoch)
                    next_refresh = time.monotonic() + self.refresh_interval
                # Redis times blocked reads out on its cron (every 1/hz s,
                # 100 ms by default), so a BLOCK may overrun by that much:
                # block only while the refresh is not due within that slack,
                # else poll, so refreshes keep their period.
                remaining = next_refresh - time.monotonic()
                if remaining > _BLOCK_SLACK + 0.01:
                    call(self.read_and_apply, min(self.block, remaining - _BLOCK_SLACK))
                elif not call(self.read_and_apply, None):
                    stop.wait(min(0.01, max(0.0, remaining)))
                if stats.failing:
                    stats.ok("apply")
                backoff = BACKOFF_MIN
            except Exception as exc:  # the thread must survive anything
                stats.error("apply", exc, loop=True)
                ctx.recheck.set()  # Redis may have restarted: check its epoch first
                stop.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)

    def read_and_apply(self, wait: float | None) -> int:
        """Apply the next events of the stream (waiting up to ``wait`` s; None: no wait).

        :returns: how many entries were read.
        """
        block = None if wait is None else max(1, int(wait * 1000))
        reply = self._blocking_client.xread({self._ctx.keys.events: self.last_id}, count=_READ_COUNT, block=block)
        if not reply:
            return 0
        # RESP2: [[stream, entries]]; RESP3: {stream: entries}
        entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        me = self._ctx.process_id
        for entry in entries:
            entry_id, raw = entry[0], entry[1]
            if not isinstance(raw, dict):  # a flat [field, value, ...] list
                raw = dict(zip(raw[::2], raw[1::2], strict=False))
            fields = {text(k): text(v) for k, v in raw.items()}
            if fields.get("p") == me:
                self._ctx.stats.count("skipped")
            else:
                # An outage raises out of here before the position moves on,
                # so the event is applied again after the retry.
                self.apply_event(fields.get("e", ""), fields.get("n", ""), fields.get("f", "{}"))
            self.last_id = text(entry_id)
        return len(entries)

    def apply_event(self, event: str, node_id: str, payload: str) -> None:
        """Replay one remote event through the scheduler's public methods.

        :param event: the event name (anything not shared is ignored).
        :param node_id: the node.
        :param payload: the event's fields, as JSON.
        """
        if event not in EVENTS or not node_id:
            return
        ctx = self._ctx
        try:
            fields = json.loads(payload) if payload else {}
        except ValueError as exc:
            ctx.stats.error(f"bad {event} event for {node_id!r}", exc)
            return
        sched = ctx.sched
        self._local.applying = True
        try:
            if event == "register":
                sched.register_node(node_id, **{k: fields[k] for k in REGISTER_FIELDS if k in fields})
                ctx.owners.theirs(node_id)  # last writer wins: the node now belongs to that process
            elif event == "heartbeat":
                sched.heartbeat(node_id, **{k: fields[k] for k in HEARTBEAT_FIELDS if k in fields})
            elif event == "drain":
                sched.drain_node(node_id)
            elif event == "offline":
                sched.mark_offline(node_id)
            elif event == "resume":
                sched.resume_node(node_id)
            elif event == "remove":
                ctx.owners.forget(node_id)
                sched.remove_node(node_id)
            ctx.stats.count("applied")
        except UnknownNode:
            if event != "remove":
                # An event about a node this process never saw (e.g. it
                # started after the register was trimmed): its compacted
                # record carries the whole current state.
                self._fetch_and_apply(node_id)
        except ctx.outage:
            raise
        except Exception as exc:
            # Refused here (e.g. this process's service limit): skip it. A
            # poison event must never stall the stream.
            ctx.stats.error(f"apply {event} {node_id!r}", exc)
        finally:
            self._local.applying = False

    def _fetch_and_apply(self, node_id: str) -> None:
        """Apply the node's compacted record, if it has one (else ignore the event)."""
        ctx = self._ctx
        try:
            pipe = ctx.redis.client.pipeline(transaction=True)
            pipe.hgetall(ctx.keys.node(node_id))
            pipe.time()
            record, server_time = ctx.redis.execute_pipeline(pipe)
        except ctx.outage:
            raise
        except Exception as exc:  # never stall the stream
            ctx.stats.error(f"fetch record {node_id!r}", exc)
            return
        if record:
            self._apply_record(node_id, record, server_time)

    def _apply_record(self, node_id: str, raw: dict[Any, Any], server_time: Sequence[Any]) -> None:
        """Bring a node to the state its compacted record describes."""
        ctx = self._ctx
        try:
            rec = {text(k): json.loads(text(v)) for k, v in raw.items() if text(k) != "by"}
        except ValueError as exc:
            ctx.stats.error(f"bad record of {node_id!r}", exc)
            return
        if "languages" not in rec:
            return  # not a complete record (should not happen: only a register starts one)
        now_ms = int(server_time[0]) * 1000 + int(server_time[1]) // 1000
        sched = ctx.sched
        self._local.applying = True
        try:
            status = rec.get("status", "ready")
            fields = {k: rec[k] for k in REGISTER_FIELDS if k in rec}
            fields["ready"] = status != "registering"
            sched.register_node(node_id, **fields)
            ctx.owners.theirs(node_id)
            load = {k: rec[k] for k in LOAD_FIELDS if rec.get(k) is not None}
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
            ctx.stats.count("applied")
        except ctx.outage:
            raise
        except Exception as exc:  # a bad record must not stall the fleet
            ctx.stats.error(f"apply record {node_id!r}", exc)
        finally:
            self._local.applying = False

    # -- fleet state ---------------------------------------------------------------------
    def adopt_epoch(self) -> str:
        """Name the current Redis dataset (the first process sets it) and remember it."""
        ctx = self._ctx
        pipe = ctx.redis.client.pipeline(transaction=True)
        pipe.set(ctx.keys.epoch, secrets.token_hex(8), nx=True)
        pipe.get(ctx.keys.epoch)
        self.epoch = text(ctx.redis.execute_pipeline(pipe)[1])
        return self.epoch

    def load_fleet(self, skip_own: bool = False) -> None:
        """Apply every compacted record, then continue the stream from before the load.

        The position is read first: events published during the load are
        read again afterwards (replaying them is harmless), none is missed.

        :param skip_own: a resync: leave this process's own nodes alone, and
            remove remote nodes that have no record any more.
        """
        ctx = self._ctx
        pipe = ctx.redis.client.pipeline(transaction=True)
        pipe.xrevrange(ctx.keys.events, count=1)
        pipe.smembers(ctx.keys.nodes)
        pipe.time()
        last, members, server_time = ctx.redis.execute_pipeline(pipe)
        position = text(last[0][0]) if last else "0-0"
        nodes = sorted(text(m) for m in members)
        own = set(ctx.owners.own())
        if nodes:
            pipe = ctx.redis.client.pipeline(transaction=False)
            for node in nodes:
                pipe.hgetall(ctx.keys.node(node))
            records = ctx.redis.execute_pipeline(pipe)
            for node, record in zip(nodes, records, strict=True):
                if record and not (skip_own and node in own):
                    self._apply_record(node, record, server_time)
        if skip_own:
            # A resync: a node learnt from another process that has no record
            # any more was removed in the events this process skipped.
            for node in ctx.owners.remote_except(set(nodes)):
                self.apply_event("remove", node, "{}")
        self.last_id = position

    def check_epoch(self) -> None:
        """Detect a Redis that lost its data (heal) or a stream trimmed past us (resync)."""
        ctx = self._ctx
        pipe = ctx.redis.client.pipeline(transaction=False)
        pipe.get(ctx.keys.epoch)
        pipe.xrange(ctx.keys.events, count=1)
        epoch, first = ctx.redis.execute_pipeline(pipe)
        if epoch is None or text(epoch) != self.epoch:
            self._heal()
            return
        if self._publisher.take_overflow():
            # Events were dropped during a long outage: send our nodes' full state.
            self._publisher.enqueue_state(ctx.owners.own())
        if self.last_id != "0-0" and (not first or _stream_id(first[0][0]) > _stream_id(self.last_id)):
            # Entries after our position may have been trimmed unread.
            ctx.stats.count("resyncs")
            self.load_fleet(skip_own=True)

    def _heal(self) -> None:
        """Redis lost the fleet (restart without persistence, flush): restore our share.

        Re-seeds the pool ids this process knows, re-writes the max of the
        nodes registered here (reservations refuse unknown nodes as
        offline), re-publishes their full state, then reads the new stream
        from its start (the other processes re-publish theirs). The epoch is
        adopted last, so a failure half-way repeats the whole heal.
        """
        ctx = self._ctx
        known = self._known_pool_ids()
        if known:
            ctx.redis.eval(ctx.scripts.seed, [ctx.keys.pool_ids, ctx.keys.pool_seq], [x for kv in known for x in kv])
        sched = ctx.sched
        own = ctx.owners.own()
        for node_id in own:
            slot = sched.snapshot.slot(node_id)
            try:
                max_concurrency = int(sched.node(node_id)["max_concurrency"])
            except UnknownNode:
                continue  # removed meanwhile
            if slot is not None:
                ctx.backend.bind_node(slot, node_id, max_concurrency)
        self._publisher.take_overflow()
        self._publisher.enqueue_state(own)
        self.adopt_epoch()
        self.last_id = "0-0"
        ctx.stats.count("heals")
        log.warning("pysched fleet: Redis lost the fleet state (restart?); re-published %d own nodes", len(own))
