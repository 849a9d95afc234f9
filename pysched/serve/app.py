"""``create_app(scheduler, config)``: the ASGI application (Starlette) of ``pysched serve``.

Routes (reference: ``docs/protocol.md``)::

    WebSocket /v1/nodes                     node token      nodes register, heartbeat, answer jobs
    WebSocket /v1/sessions/{session_id}     client token    a stream of jobs of one session
    POST /v1/jobs                           client token    one job, answered with the node's result
    POST /v1/dispatch                       client token    a decision only
    POST /v1/jobs/{job_id}/commit|release|renew
    GET  /v1/explain, /v1/stats, /v1/nodes  client token
    POST /v1/nodes/{node_id}/drain|resume   admin token
    DELETE /v1/nodes/{node_id}              admin token
    GET  /metrics, /healthz, /readyz        no token

The application can run on its own (``pysched serve``, or any ASGI server)
or be mounted in another Starlette app (``Mount("/sched", app=create_app(...))``).
Its state lives in one :class:`Service` (``app.state.service``). The service
starts with the application's lifespan, or on its first request when the
host application does not forward lifespan events to mounted apps; call
``await app.state.service.shutdown()`` to drain it from the host's own
shutdown then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any, ParamSpec, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from pysched.errors import SchedulerError, UnknownNode
from pysched.scheduler import Scheduler
from pysched.serve.auth import ADMIN, CLIENT, NODE, Auth
from pysched.serve.config import ServeConfig
from pysched.serve.errors import ServeError, from_exception
from pysched.serve.jobs import Delivery, JobState
from pysched.serve.metrics import CONTENT_TYPE, Metrics
from pysched.serve.nodes import NodeConnection, NodeRegistry, serve_node
from pysched.serve.protocol import (
    MAX_ID_LENGTH,
    CloseCode,
    DispatchRequest,
    DispatchResponse,
    ErrorCode,
    JobRequest,
    JobResponse,
    ProtocolError,
    RenewRequest,
    Result,
    SettleRequest,
    decode_body,
    encode,
)
from pysched.serve.streams import SessionStream, serve_session

__all__ = ["Service", "create_app"]

logger = logging.getLogger("pysched.serve")

_JSON = "application/json"
#: what a request may raise that is the caller's to fix (or capacity): answered, never a 500
_REQUEST_ERRORS = (ProtocolError, SchedulerError, ValueError, TypeError)
_DISPATCH_FIELDS = frozenset({"session_id", "src", "tgt", "tenant", "services", "prefer", "exclude", "job_id",
                              "require_gpu"})
_EXPLAIN_FIELDS = frozenset({"src", "tgt", "tenant", "services", "prefer", "exclude", "require_gpu"})

_P = ParamSpec("_P")
_T = TypeVar("_T")
_BodyT = TypeVar("_BodyT", bound=msgspec.Struct)


class Service:
    """Everything one application holds: scheduler, connections, delivery, metrics, shutdown state.

    :param scheduler: the scheduler the application serves.
    :param config: the settings; validated here.
    :raises TypeError: ``scheduler`` or ``config`` is of another type.
    :raises ValueError: a setting is invalid (see :meth:`ServeConfig.validate`).
    """

    def __init__(self, scheduler: Scheduler, config: ServeConfig) -> None:
        if not isinstance(scheduler, Scheduler):
            raise TypeError(f"scheduler must be a pysched.Scheduler, got {type(scheduler).__name__}")
        if not isinstance(config, ServeConfig):
            raise TypeError(f"config must be a ServeConfig, got {type(config).__name__}")
        self.scheduler = scheduler
        self.config = config.validate()
        self.auth = Auth(config)
        self.registry = NodeRegistry()
        self.metrics = Metrics(scheduler, self.server_stats)
        backend = type(scheduler.reservations).__name__
        # a shared backend answers over the network: keep its calls off the event loop
        self.delivery = Delivery(scheduler, self.registry, config, self.metrics,
                                 blocking=backend != "LocalReservations")
        self.streams: set[SessionStream] = set()
        self.draining = False
        self.started = False
        self._stopped = False

    # ------------------------------------------------------------ lifecycle
    def ensure_started(self) -> None:
        """Start delivery (once), on the running event loop."""
        if not self.started:
            self.started = True
            self.delivery.start()

    async def drain(self, grace: float | None = None) -> int:
        """Stop taking jobs (503 ``draining``) and let those in flight finish.

        :param grace: seconds they get (default: the configured ``grace``).
        :returns: how many jobs were still in flight at the end (they are cancelled).
        """
        self.ensure_started()
        self.draining = True
        grace = self.config.grace if grace is None else grace
        logger.info("draining: %d jobs in flight, grace %.1f s", self.delivery.in_flight, grace)
        left = await self.delivery.drain(grace)
        if left:
            logger.warning("drain: %d jobs still in flight after %.1f s were cancelled", left, grace)
        return left

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain, then close every connection with 1001 (going away). Idempotent.

        :param grace: as for :meth:`drain`.
        """
        if self._stopped:
            return
        if not self.delivery.draining:
            await self.drain(grace)
        self._stopped = True
        conns = [*self.streams, *self.registry.connections()]
        for conn in conns:
            conn.close(CloseCode.GOING_AWAY)
        # let the writers send their close frames
        for conn in conns:
            await conn.finish()
        self.delivery.close()

    # ------------------------------------------------------------ node links
    def node_bound(self, conn: NodeConnection) -> None:
        """Make a connection that just registered its node's link; an older one of the node is replaced.

        :param conn: the connection.
        """
        old = self.registry.bind(conn)
        if old is not None:
            logger.warning("node %r connected again: closing its previous connection", conn.node_id)
            old.replaced = True
            old.close(CloseCode.REPLACED)
            self.delivery.link_lost(old)

    def node_gone(self, conn: NodeConnection) -> None:
        """A node connection closed: its node is offline at once, its jobs fail over.

        :param conn: the connection.
        """
        if conn.node_id and self.registry.unbind(conn) and not conn.removed:
            with contextlib.suppress(UnknownNode):  # removed by an admin meanwhile
                self.scheduler.mark_offline(conn.node_id)
        self.delivery.link_lost(conn)

    # ------------------------------------------------------------ figures
    def server_stats(self) -> dict[str, Any]:
        """The server's own figures (``server`` in ``GET /v1/stats``)."""
        return {
            "node_connections": len(self.registry),
            "session_streams": len(self.streams),
            "jobs_in_flight": self.delivery.in_flight,
            "draining": self.draining,
            "guarantee": self.config.guarantee,
            "max_attempts": self.config.max_attempts,
        }


# ---------------------------------------------------------------- responses
def _json(obj: msgspec.Struct | dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(encode(obj), status_code=status, headers=headers, media_type=_JSON)


def _error(err: ServeError, service: Service | None = None) -> Response:
    headers = None
    if err.status == HTTPStatus.SERVICE_UNAVAILABLE:
        headers = {"Retry-After": str(service.config.retry_after if service is not None else 1)}
    elif err.status == HTTPStatus.UNAUTHORIZED:
        headers = {"WWW-Authenticate": "Bearer"}
    if service is not None:
        service.metrics.http_refused.labels(str(err.status), err.code).inc()
    return _json(err.body(), err.status, headers)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) beyond ``limit`` bytes without reading it all."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ServeError(ErrorCode.TOO_BIG, f"body of {length} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(ErrorCode.TOO_BIG, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _service(request: Request | WebSocket) -> Service:
    service: Service = request.app.state.service
    if not service.started:
        service.ensure_started()
    return service


def _id_param(value: str, name: str) -> str:
    if not 0 < len(value) <= MAX_ID_LENGTH:
        raise ServeError(ErrorCode.INVALID, f"{name} must be 1-{MAX_ID_LENGTH} characters, got {len(value)}",
                         field=name)
    return value


def _list_param(request: Request, name: str) -> list[str] | None:
    values = request.query_params.getlist(name)
    if not values:
        return None
    return [v for value in values for v in value.split(",") if v]


# ---------------------------------------------------------------- jobs
async def post_job(request: Request) -> Response:
    """``POST /v1/jobs``: deliver one job, answer with the node's result."""
    service = _service(request)
    try:
        service.auth.check(request.headers, CLIENT, ADMIN)
        if service.draining:
            raise ServeError(ErrorCode.DRAINING, "the server is shutting down")
        req = decode_body(await _body(request, service.config.max_message_bytes), JobRequest)
    except ServeError as err:
        return _error(err, service)
    except _REQUEST_ERRORS as exc:
        return _error(from_exception(exc), service)
    fut: asyncio.Future[tuple[Result | None, ServeError | None]] = asyncio.get_running_loop().create_future()

    def reply(job: JobState, result: Result | None, error: ServeError | None) -> None:
        if not fut.done():
            fut.set_result((result, error))

    job = JobState(req.session_id, req.src, req.tgt, req.payload, tenant=req.tenant,
                   services=None if req.services is None else tuple(req.services), prefer=req.prefer,
                   timeout=req.timeout or service.config.default_timeout, require_gpu=req.require_gpu, reply=reply)
    service.delivery.submit(job)
    result, error = await fut
    service.metrics.observe_job("jobs", time.perf_counter() - job.received)
    if error is not None:
        return _error(error, service)
    assert result is not None and job.job_id is not None and job.node_id is not None  # answered with a result
    return _json(JobResponse(job_id=job.job_id, node_id=job.node_id, ok=result.ok, payload=result.payload,
                             error=result.error, attempts=job.attempts))


async def post_dispatch(request: Request) -> Response:
    """``POST /v1/dispatch``: a decision only; the caller delivers the job."""
    service = _service(request)
    delivery = service.delivery
    try:
        service.auth.check(request.headers, CLIENT, ADMIN)
        if service.draining:
            raise ServeError(ErrorCode.DRAINING, "the server is shutting down")
        req = decode_body(await _body(request, service.config.max_message_bytes), DispatchRequest)
        kw: dict[str, Any] = {}
        if req.job_id is not None:
            kw["job_id"] = req.job_id
        if req.tenant is not None:
            kw["tenant"] = req.tenant
        if req.services is not None:
            kw["services"] = tuple(req.services)
        if req.prefer is not None:
            kw["prefer"] = req.prefer
        if req.exclude is not None:
            kw["exclude"] = req.exclude
        if not req.require_gpu:
            kw["require_gpu"] = False
        t0 = time.perf_counter()
        try:
            a = await _call(service, service.scheduler.dispatch, req.session_id, req.src, req.tgt, **kw)
        finally:
            service.metrics.observe_dispatch(time.perf_counter() - t0)
    except ServeError as err:
        return _error(err, service)
    except _REQUEST_ERRORS as exc:
        failure = from_exception(exc, _DISPATCH_FIELDS)
        if failure.code in (ErrorCode.NO_NODE, ErrorCode.NO_POOL, ErrorCode.BACKEND_UNAVAILABLE):
            service.metrics.dispatches.labels(failure.code, failure.best_reason or "").inc()
        return _error(failure, service)
    delivery.metrics.dispatch_ok.inc()
    return _json(DispatchResponse(job_id=a.job_id, node_id=a.node_id, pool_id=a.pool_id, session_id=a.session_id,
                                  src=a.src, tgt=a.tgt))


async def _call(service: Service, fn: Callable[_P, _T], *args: _P.args, **kw: _P.kwargs) -> _T:
    """A scheduler call: inline, or on a thread when the backend is across the network."""
    if service.delivery.blocking:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kw))
    return fn(*args, **kw)


async def _settle_body(request: Request, service: Service, kind: type[_BodyT]) -> _BodyT:
    data = await _body(request, service.config.max_message_bytes)
    if not data.strip():
        return kind()
    return decode_body(data, kind)


async def post_commit(request: Request) -> Response:
    """``POST /v1/jobs/{job_id}/commit``: the node took a job dispatched with ``/v1/dispatch``."""
    service = _service(request)
    try:
        service.auth.check(request.headers, CLIENT, ADMIN)
        job_id = _id_param(request.path_params["job_id"], "job_id")
        body = await _settle_body(request, service, SettleRequest)
        await _call(service, service.scheduler.commit, job_id, node_id=body.node_id)
    except ServeError as err:
        return _error(err, service)
    except _REQUEST_ERRORS as exc:
        return _error(from_exception(exc, {"job_id", "node_id"}), service)
    return _json({"job_id": job_id, "committed": True})


async def post_release(request: Request) -> Response:
    """``POST /v1/jobs/{job_id}/release``: give a dispatched job's capacity back."""
    service = _service(request)
    try:
        service.auth.check(request.headers, CLIENT, ADMIN)
        job_id = _id_param(request.path_params["job_id"], "job_id")
        body = await _settle_body(request, service, SettleRequest)
        released = await _call(service, service.scheduler.release, job_id, node_id=body.node_id)
    except ServeError as err:
        return _error(err, service)
    except _REQUEST_ERRORS as exc:
        return _error(from_exception(exc, {"job_id", "node_id"}), service)
    if released:
        service.delivery._wake_waiter()
    return _json({"job_id": job_id, "released": bool(released)})


async def post_renew(request: Request) -> Response:
    """``POST /v1/jobs/{job_id}/renew``: extend a dispatched job's hold."""
    service = _service(request)
    try:
        service.auth.check(request.headers, CLIENT, ADMIN)
        job_id = _id_param(request.path_params["job_id"], "job_id")
        body = await _settle_body(request, service, RenewRequest)
        await _call(service, service.scheduler.renew, job_id, lease=body.lease, node_id=body.node_id)
    except ServeError as err:
        return _error(err, service)
    except _REQUEST_ERRORS as exc:
        return _error(from_exception(exc, {"job_id", "node_id", "lease"}), service)
    return _json({"job_id": job_id, "renewed": True})


# ---------------------------------------------------------------- inspection
async def get_explain(request: Request) -> Response:
    """``GET /v1/explain``: why each node could or could not take a job of the pair."""
    service = _service(request)
    try:
        service.auth.check(request.headers, CLIENT, ADMIN)
        q = request.query_params
        src, tgt = q.get("src") or "", q.get("tgt") or ""
        for name, value in (("src", src), ("tgt", tgt)):
            if not value:
                raise ServeError(ErrorCode.INVALID, f"query parameter {name} is required", field=name)
        kw: dict[str, Any] = {}
        if q.get("tenant"):
            kw["tenant"] = q["tenant"]
        services = _list_param(request, "services")
        if services is not None:
            kw["services"] = services
        exclude = _list_param(request, "exclude")
        if exclude is not None:
            kw["exclude"] = exclude
        prefer = _list_param(request, "prefer")
        if prefer is not None:
            kw["prefer"] = prefer
        if q.get("require_gpu") in ("0", "false", "no"):
            kw["require_gpu"] = False
        ex = service.scheduler.explain(src, tgt, **kw)
    except ServeError as err:
        return _error(err, service)
    except _REQUEST_ERRORS as exc:
        return _error(from_exception(exc, _EXPLAIN_FIELDS), service)
    return _json({"src": ex.src, "tgt": ex.tgt, "pools": list(ex.pools), "nodes": ex.nodes,
                  "unpooled": list(ex.unpooled), "breakdown": ex.breakdown})


def _plain(obj: Any) -> Any:
    """stats() values as JSON: sets become sorted lists."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return obj


async def get_stats(request: Request) -> Response:
    """``GET /v1/stats``: the scheduler's figures and the server's."""
    service = _service(request)
    try:
        service.auth.check(request.headers, CLIENT, ADMIN)
    except ServeError as err:
        return _error(err, service)
    out = _plain(service.scheduler.stats())
    out["server"] = service.server_stats()
    return _json(out)


async def get_nodes(request: Request) -> Response:
    """``GET /v1/nodes``: every node, with its connection and jobs in flight."""
    service = _service(request)
    try:
        service.auth.check(request.headers, CLIENT, ADMIN)
    except ServeError as err:
        return _error(err, service)
    snap = service.scheduler.snapshot
    out: dict[str, dict[str, Any]] = {}
    for node_id in service.scheduler.node_ids():
        slot = snap.slot(node_id)
        if slot is None:
            continue  # registered after this snapshot was read
        try:
            info = service.scheduler.node(node_id)
        except UnknownNode:
            continue
        link = service.registry.route(node_id)
        info = _plain(info)
        info["connected"] = link is not None
        info["in_flight"] = int(snap.inflight[slot])
        info["delivering"] = len(link.jobs) if link is not None else 0
        out[node_id] = info
    return _json(out)


# ---------------------------------------------------------------- admin
async def _admin_node(request: Request, action: str) -> Response:
    service = _service(request)
    try:
        service.auth.check(request.headers, ADMIN)
        node_id = _id_param(request.path_params["node_id"], "node_id")
        sched = service.scheduler
        if action == "drain":
            sched.drain_node(node_id)
        elif action == "resume":
            sched.resume_node(node_id)
        else:
            sched.remove_node(node_id)
            link = service.registry.route(node_id)
            if isinstance(link, NodeConnection):
                link.removed = True
                link.close(CloseCode.REMOVED)
                service.delivery.link_lost(link)
            return _json({"node_id": node_id, "status": "removed"})
        status = sched.node(node_id)["status"]
    except ServeError as err:
        return _error(err, service)
    except UnknownNode as exc:
        return _error(ServeError(ErrorCode.UNKNOWN_NODE, str(exc), field="node_id"), service)
    except _REQUEST_ERRORS as exc:
        return _error(from_exception(exc, {"node_id"}), service)
    return _json({"node_id": node_id, "status": status})


async def post_drain_node(request: Request) -> Response:
    """``POST /v1/nodes/{node_id}/drain`` (admin): no new jobs for the node."""
    return await _admin_node(request, "drain")


async def post_resume_node(request: Request) -> Response:
    """``POST /v1/nodes/{node_id}/resume`` (admin): the node takes jobs again."""
    return await _admin_node(request, "resume")


async def delete_node(request: Request) -> Response:
    """``DELETE /v1/nodes/{node_id}`` (admin): remove the node, close its connection."""
    return await _admin_node(request, "remove")


# ---------------------------------------------------------------- operations
async def get_metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text format."""
    service = _service(request)
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)


async def get_healthz(request: Request) -> Response:
    """``GET /healthz``: the process answers."""
    return _json({"status": "ok"})


async def get_readyz(request: Request) -> Response:
    """``GET /readyz``: 503 while draining or while the reservation backend is unreachable."""
    service = _service(request)
    if service.draining:
        return _json({"status": "draining"}, 503)
    backend = service.scheduler.stats().get("backend")
    if isinstance(backend, dict) and not backend.get("available", True):
        return _json({"status": "backend_unavailable", "error": backend.get("error")}, 503)
    return _json({"status": "ready"})


# ---------------------------------------------------------------- WebSockets
async def _deny(websocket: WebSocket, err: ServeError, service: Service) -> None:
    """Refuse a handshake with an HTTP status; close with 4401 when the server cannot send one."""
    service.metrics.http_refused.labels(str(err.status), err.code).inc()
    headers = {"WWW-Authenticate": "Bearer"} if err.status == HTTPStatus.UNAUTHORIZED else None
    try:
        await websocket.send_denial_response(
            Response(encode(err.body()), status_code=err.status, headers=headers, media_type=_JSON))
    except RuntimeError:  # no "websocket.http.response" extension
        await websocket.accept()
        refused = err.status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN)
        await websocket.close(CloseCode.UNAUTHORIZED if refused else CloseCode.GOING_AWAY)


async def ws_nodes(websocket: WebSocket) -> None:
    """WebSocket ``/v1/nodes``: one node's connection."""
    service = _service(websocket)
    try:
        service.auth.check(websocket.headers, NODE)
        if service.draining:
            raise ServeError(ErrorCode.DRAINING, "the server is shutting down")
    except ServeError as err:
        await _deny(websocket, err, service)
        return
    await websocket.accept()
    await serve_node(websocket, service)


async def ws_session(websocket: WebSocket) -> None:
    """WebSocket ``/v1/sessions/{session_id}``: a stream of jobs of one session."""
    service = _service(websocket)
    try:
        service.auth.check(websocket.headers, CLIENT, ADMIN)
        session_id = _id_param(websocket.path_params["session_id"], "session_id")
        if service.draining:
            raise ServeError(ErrorCode.DRAINING, "the server is shutting down")
    except ServeError as err:
        await _deny(websocket, err, service)
        return
    batch = websocket.query_params.get("batch", "") in ("1", "true", "yes")
    await websocket.accept()
    await serve_session(websocket, session_id, batch, service)


# ---------------------------------------------------------------- the app
def create_app(scheduler: Scheduler, config: ServeConfig | None = None) -> Starlette:
    """Build the ASGI application serving a scheduler.

    :param scheduler: the scheduler to serve.
    :param config: the settings (default: ``ServeConfig()``), validated here:
        without tokens it must say ``insecure=True``.
    :returns: the Starlette application; its :class:`Service` is ``app.state.service``.
    :raises ValueError: a setting is invalid, or tokens are missing without ``insecure=True``.
    :raises TypeError: ``scheduler`` is not a :class:`pysched.Scheduler`, or ``config`` not a :class:`ServeConfig`.
    """
    service = Service(scheduler, ServeConfig() if config is None else config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.ensure_started()
        try:
            yield
        finally:
            await service.shutdown()

    routes = [
        WebSocketRoute("/v1/nodes", ws_nodes),
        WebSocketRoute("/v1/sessions/{session_id:path}", ws_session),
        Route("/v1/jobs", post_job, methods=["POST"]),
        Route("/v1/dispatch", post_dispatch, methods=["POST"]),
        Route("/v1/jobs/{job_id:path}/commit", post_commit, methods=["POST"]),
        Route("/v1/jobs/{job_id:path}/release", post_release, methods=["POST"]),
        Route("/v1/jobs/{job_id:path}/renew", post_renew, methods=["POST"]),
        Route("/v1/explain", get_explain, methods=["GET"]),
        Route("/v1/stats", get_stats, methods=["GET"]),
        Route("/v1/nodes", get_nodes, methods=["GET"]),
        Route("/v1/nodes/{node_id:path}/drain", post_drain_node, methods=["POST"]),
        Route("/v1/nodes/{node_id:path}/resume", post_resume_node, methods=["POST"]),
        Route("/v1/nodes/{node_id:path}", delete_node, methods=["DELETE"]),
        Route("/metrics", get_metrics, methods=["GET"]),
        Route("/healthz", get_healthz, methods=["GET"]),
        Route("/readyz", get_readyz, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    return app

