"""Session streams: WebSocket ``/v1/sessions/{session_id}``, many jobs of one session on one connection.

Each ``job`` message becomes one :class:`~pysched.serve.jobs.JobState`; its
answer (``result`` or ``error``, with the client's ``request_id``) is queued
on the stream the moment the job ends, so answers leave in order of
completion. A stream holds at most ``max_session_in_flight`` jobs; when it
closes, its jobs still in flight are cancelled (their nodes get ``cancel``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.websockets import WebSocket

from pysched.serve.connection import Closed, Connection
from pysched.serve.errors import ServeError
from pysched.serve.jobs import JobState
from pysched.serve.protocol import (
    CloseCode,
    ErrorCode,
    ProtocolError,
    Result,
    SessionJob,
    SessionResult,
    decode_session_items,
)

if TYPE_CHECKING:  # pragma: no cover
    from pysched.serve.app import Service

__all__ = ["SessionStream", "serve_session"]


class SessionStream(Connection):
    """One client's stream of jobs of one session.

    :param websocket: the accepted WebSocket.
    :param session_id: the session every job of the stream belongs to.
    :param batch: whether the client reads batches.
    :param limits: the :class:`~pysched.serve.connection.Connection` limits.
    """

    kind = "session"

    def __init__(self, websocket: WebSocket, session_id: str, *, batch: bool, **limits: int) -> None:
        super().__init__(websocket, batch=batch, **limits)
        self.session_id = session_id
        #: records a job's end-to-end time (the metrics histogram)
        self.metrics_observe: Callable[[float], None] = lambda seconds: None
        #: request id -> its job, while in flight
        self.requests: dict[int | str, JobState] = {}

    def __repr__(self) -> str:
        return f"<SessionStream {self.session_id!r} in_flight={len(self.requests)}>"


def _reply(job: JobState, result: Result | None, error: ServeError | None) -> None:
    stream, rid = job.stream, job.request_id
    assert stream is not None and rid is not None  # a stream's jobs carry both
    stream.requests.pop(rid, None)
    stream.metrics_observe(time.perf_counter() - job.received)
    if error is not None or result is None:
        stream.put((error or ServeError(ErrorCode.INTERNAL, "no result")).frame(rid))
    else:
        assert job.job_id is not None and job.node_id is not None  # a result comes from a node
        stream.put(SessionResult(request_id=rid, job_id=job.job_id, node_id=job.node_id, ok=result.ok,
                                 payload=result.payload, error=result.error, attempts=job.attempts))


async def serve_session(websocket: WebSocket, session_id: str, batch: bool, service: Service) -> None:
    """Run one accepted session stream until it closes.

    :param websocket: the accepted WebSocket.
    :param session_id: the stream's session.
    :param batch: whether the client reads batches (``?batch=1``).
    :param service: the application's state.
    """
    config = service.config
    stream = SessionStream(websocket, session_id, batch=batch, max_message_bytes=config.max_message_bytes,
                           max_bad_messages=config.max_bad_messages, max_send_queue=config.max_send_queue)
    metrics = service.metrics
    observe = metrics.job_seconds.labels("sessions").observe
    stream.metrics_observe = observe
    stream.on_bad_message = lambda code: metrics.refused.labels("session", code).inc()
    gauge = metrics.connections.labels("session")
    gauge.inc()
    metrics.connections_total.labels("session").inc()
    service.streams.add(stream)
    stream.start()
    code = CloseCode.NORMAL
    try:
        await _session_loop(stream, service)
    except Closed as exc:
        code = exc.code
    finally:
        gauge.dec()
        service.streams.discard(stream)
        if stream.close_code is not None:
            code = stream.close_code
        metrics.closes.labels("session", str(code)).inc()
        # The client is gone: nobody wants these answers any more.
        for job in list(stream.requests.values()):
            service.delivery.cancel(job, ErrorCode.CANCELLED, "the session stream closed", answer=False)
        stream.requests.clear()
        await stream.finish()


async def _session_loop(stream: SessionStream, service: Service) -> None:
    delivery = service.delivery
    config = service.config
    default_timeout = config.default_timeout
    limit = config.max_session_in_flight
    requests = stream.requests
    session_id = stream.session_id
    receive = stream.receive
    while True:
        data = await receive()
        try:
            messages = decode_session_items(data)
        except ProtocolError as exc:
            stream.refuse(exc)
            if stream.closed:
                raise Closed(stream.close_code or CloseCode.BAD_MESSAGES) from None
            continue
        for msg in messages:
            if isinstance(msg, tuple):  # one bad element: answered on its own, the others go on
                stream.refuse(msg[0], request_id=msg[1])
                if stream.closed:
                    raise Closed(stream.close_code or CloseCode.BAD_MESSAGES) from None
                continue
            rid = msg.request_id
            if isinstance(msg, SessionJob):
                if rid in requests:
                    stream.put(ServeError(ErrorCode.DUPLICATE_REQUEST,
                                          f"request_id {rid!r} is already in flight on this stream",
                                          field="request_id").frame(rid))
                    continue
                if len(requests) >= limit:
                    stream.put(ServeError(ErrorCode.TOO_MANY_IN_FLIGHT,
                                          f"{len(requests)} jobs in flight on this stream (limit {limit})"
                                          ).frame(rid))
                    continue
                job = JobState(session_id, msg.src, msg.tgt, msg.payload, tenant=msg.tenant,
                               services=None if msg.services is None else tuple(msg.services), prefer=msg.prefer,
                               timeout=msg.timeout or default_timeout, require_gpu=msg.require_gpu, reply=_reply,
                               request_id=rid, stream=stream)
                requests[rid] = job
                delivery.submit(job)
            else:  # SessionCancel
                held = requests.get(rid)
                if held is None:
                    stream.put(ServeError(ErrorCode.UNKNOWN_JOB, f"no job with request_id {rid!r} in flight",
                                          field="request_id").frame(rid))
                else:
                    delivery.cancel(held, ErrorCode.CANCELLED, "cancelled by the client")
