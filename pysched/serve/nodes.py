"""Node connections: the ``/v1/nodes`` WebSocket and the registry of who is connected where.

A :class:`Link` is how delivery reaches a node: ``put`` a ``job`` or a
``cancel``, and the node's ``accept``/``result`` come back to
:class:`pysched.serve.jobs.Delivery` with the link they arrived on. Today
every link is a :class:`NodeConnection` on this instance. The
:class:`NodeRegistry` maps node ids to links through :meth:`NodeRegistry.route`
only, so forwarding a job to a node connected to another instance is one more
``Link`` kind (e.g. a Redis stream to the owning instance, with results coming
back the same way) and one more lookup in ``route``; delivery does not change.

A connection speaks for exactly one node id, fixed by its first
``register``; nothing it sends can touch another node or another node's jobs
(its ``accept``/``result`` are looked up among *its own* jobs in flight).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import msgspec
from starlette.websockets import WebSocket

from pysched.errors import UnknownNode
from pysched.serve.connection import Closed, Connection
from pysched.serve.errors import field_of
from pysched.serve.protocol import (
    Accept,
    CloseCode,
    Drain,
    Error,
    ErrorCode,
    Heartbeat,
    ProtocolError,
    Register,
    Registered,
    Result,
    decode_node_message,
)

if TYPE_CHECKING:  # pragma: no cover
    from pysched.serve.app import Service
    from pysched.serve.jobs import JobState

__all__ = ["Link", "NodeConnection", "NodeRegistry", "serve_node"]

logger = logging.getLogger("pysched.serve")

_REGISTER_FIELDS = frozenset({"node_id", "languages", "services", "max_concurrency", "has_gpu",
                              "accept_public_jobs"})
_HEARTBEAT_FIELDS = frozenset({"running", "cpu", "gpu", "mem", "healthy", "services", "languages",
                               "max_concurrency"})


class Link:
    """Where delivery sends a node's jobs. ``jobs``: this link's jobs in flight, by job id."""

    node_id: str
    jobs: dict[str, JobState]
    closed: bool

    def put(self, message: msgspec.Struct) -> None:  # pragma: no cover - interface
        """Send a message to the node (never blocks).

        :param message: a ``job`` or a ``cancel``.
        """
        raise NotImplementedError

    def refuse_unknown(self, job_id: str) -> None:  # pragma: no cover - interface
        """Tell the node that a job it answered is not in flight on this link (a late or foreign answer).

        :param job_id: the job the node named.
        """
        raise NotImplementedError


class NodeConnection(Connection, Link):
    """One node's WebSocket on this instance.

    :param websocket: the accepted WebSocket.
    :param limits: the :class:`~pysched.serve.connection.Connection` limits.
    """

    kind = "node"

    def __init__(self, websocket: WebSocket, **limits: int) -> None:
        super().__init__(websocket, batch=False, **limits)  # batch is decided by "register"
        self.node_id = ""
        self.jobs = {}
        self.connected_at = time.time()
        self.replaced = False
        self.removed = False

    def refuse_unknown(self, job_id: str) -> None:
        """Answer ``unknown_job`` (not counted as a bad message).

        :param job_id: the job the node named.
        """
        # Not a bad message: answers racing a cancel or a failover are normal.
        self.put(Error(code=ErrorCode.UNKNOWN_JOB, field="job_id",
                       message=f"job {job_id!r} is not in flight on this connection"))

    def __repr__(self) -> str:
        return f"<NodeConnection {self.node_id or '(unregistered)'} jobs={len(self.jobs)}>"


class NodeRegistry:
    """node id -> the :class:`Link` that reaches it, for nodes connected to this instance."""

    def __init__(self) -> None:
        self._local: dict[str, NodeConnection] = {}

    def route(self, node_id: str) -> Link | None:
        """Find the link that reaches a node.

        The one place to add forwarding to other instances.

        :param node_id: the node.
        :returns: its link, or None when it is not reachable from here.
        """
        link = self._local.get(node_id)
        return None if link is None or link.closed else link

    def bind(self, conn: NodeConnection) -> NodeConnection | None:
        """Make a connection its node's link.

        :param conn: the connection, registered (its ``node_id`` set).
        :returns: the connection it replaces, if any.
        """
        old = self._local.get(conn.node_id)
        self._local[conn.node_id] = conn
        return old if old is not conn else None

    def unbind(self, conn: NodeConnection) -> bool:
        """Forget a connection if it is still its node's link (not replaced meanwhile).

        :param conn: the connection.
        :returns: whether it was the node's link.
        """
        if self._local.get(conn.node_id) is conn:
            del self._local[conn.node_id]
            return True
        return False

    def connections(self) -> list[NodeConnection]:
        """Every node connection of this instance."""
        return list(self._local.values())

    def __len__(self) -> int:
        return len(self._local)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._local


async def serve_node(websocket: WebSocket, service: Service) -> None:
    """Run one accepted node connection until it closes.

    :param websocket: the accepted WebSocket.
    :param service: the application's state.
    """
    config = service.config
    conn = NodeConnection(websocket, max_message_bytes=config.max_message_bytes,
                          max_bad_messages=config.max_bad_messages, max_send_queue=config.max_send_queue)
    metrics = service.metrics
    conn.on_bad_message = lambda code: metrics.refused.labels("node", code).inc()
    conn.start()
    gauge = metrics.connections.labels("node")
    gauge.inc()
    metrics.connections_total.labels("node").inc()
    code = CloseCode.NORMAL
    try:
        await _node_loop(conn, service)
    except Closed as exc:
        code = exc.code
    finally:
        gauge.dec()
        if conn.close_code is not None:
            code = conn.close_code
        metrics.closes.labels("node", str(code)).inc()
        service.node_gone(conn)
        await conn.finish()


async def _node_loop(conn: NodeConnection, service: Service) -> None:
    sched = service.scheduler
    delivery = service.delivery
    metrics = service.metrics
    applied = metrics.heartbeat_applied
    refused = metrics.heartbeat_refused
    heartbeat = sched.heartbeat
    receive = conn.receive
    try:
        first = await asyncio.wait_for(receive(), timeout=service.config.register_timeout)
    except asyncio.TimeoutError:
        conn.close(CloseCode.REGISTER_TIMEOUT)
        raise Closed(CloseCode.REGISTER_TIMEOUT) from None
    data: str | bytes | None = first
    while True:
        if data is None:
            data = await receive()
        try:
            decoded = decode_node_message(data)
        except ProtocolError as exc:
            conn.refuse(exc)
            data = None
            continue
        data = None
        messages = decoded if isinstance(decoded, list) else (decoded,)
        for msg in messages:
            try:
                if not conn.node_id and not isinstance(msg, Register):
                    conn.refuse(ProtocolError(ErrorCode.NOT_REGISTERED, "send \"register\" first"))
                    break
                if isinstance(msg, Heartbeat):
                    try:
                        heartbeat(conn.node_id, running=msg.running, cpu=msg.cpu, gpu=msg.gpu, mem=msg.mem,
                                  services=msg.services, languages=msg.languages, healthy=msg.healthy,
                                  max_concurrency=msg.max_concurrency)
                    except UnknownNode:
                        # removed by an admin meanwhile: the connection is on its way out
                        refused.inc()
                        conn.refuse(ProtocolError(ErrorCode.UNKNOWN_NODE, f"node {conn.node_id!r} was removed"),
                                    count=False)
                    except (ValueError, TypeError) as exc:
                        refused.inc()
                        conn.refuse(ProtocolError(ErrorCode.INVALID, str(exc), field_of(exc, _HEARTBEAT_FIELDS)))
                    else:
                        applied.inc()
                elif isinstance(msg, Result):
                    delivery.on_result(conn, msg)
                elif isinstance(msg, Accept):
                    delivery.on_accept(conn, msg.job_id)
                elif isinstance(msg, Register):
                    _register(conn, msg, service)
                elif isinstance(msg, Drain):
                    _drain(conn, service)
            except Closed:
                raise
            except Exception as exc:  # a bug: report it on this message, keep the connection
                logger.error("node %r: %s failed: %r", conn.node_id, type(msg).__name__, exc, exc_info=exc)
                conn.refuse(ProtocolError(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}"),
                            count=False)

        if conn.closed and conn.close_code is not None:
            raise Closed(conn.close_code)


# The messages a node sends once or seldom; heartbeats, accepts and results stay inline above.
def _register(conn: NodeConnection, msg: Register, service: Service) -> None:
    """``register``: the first on a connection binds it to the node id; later ones update the node."""
    if conn.node_id and msg.node_id != conn.node_id:
        logger.warning("node %r tried to register as %r: closing", conn.node_id, msg.node_id)
        conn.close(CloseCode.WRONG_NODE)
        raise Closed(CloseCode.WRONG_NODE)
    try:
        service.scheduler.register_node(msg.node_id, msg.languages, msg.services, msg.max_concurrency, msg.has_gpu,
                                        msg.accept_public_jobs)
    except (ValueError, TypeError) as exc:
        conn.refuse(ProtocolError(ErrorCode.INVALID, str(exc), field_of(exc, _REGISTER_FIELDS)))
        return
    conn.batch = msg.batch
    if not conn.node_id:
        conn.node_id = msg.node_id
        service.node_bound(conn)
    config = service.config
    conn.put(Registered(node_id=msg.node_id, heartbeat_interval=config.heartbeat_interval,
                        max_message_bytes=config.max_message_bytes, guarantee=config.guarantee))


def _drain(conn: NodeConnection, service: Service) -> None:
    """``drain``: the node wants no new jobs."""
    try:
        service.scheduler.drain_node(conn.node_id)
    except UnknownNode:
        conn.refuse(ProtocolError(ErrorCode.UNKNOWN_NODE, f"node {conn.node_id!r} was removed"), count=False)
