"""The SDK's one door to the wire format: :mod:`pysched.serve.protocol`.

Every message the clients send or read goes through these functions, so the
clients never spell a JSON field themselves (msgspec only; no Starlette).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from pysched.serve import protocol as P

__all__ = [
    "FATAL_CLOSE_CODES",
    "Cancel",
    "DispatchResponse",
    "Error",
    "JobMsg",
    "JobResponse",
    "P",
    "Registered",
    "SessionResult",
    "decode_error_body",
    "decode_node_frame",
    "decode_session_frame",
    "encode",
    "accept",
    "frames",
    "DRAIN",
    "heartbeat",
    "result",
    "session_job",
    "session_cancel",
    "register_struct",
    "error_fields",
]

Registered = P.Registered
JobMsg = P.Job
Cancel = P.Cancel
Error = P.Error
SessionResult = P.SessionResult
JobResponse = P.JobResponse
DispatchResponse = P.DispatchResponse
ProtocolError = P.ProtocolError

#: Close codes after which reconnecting would not help (or would fight
#: another connection), with the error code the client reports.
FATAL_CLOSE_CODES: dict[int, str] = {
    P.CloseCode.UNAUTHORIZED: P.ErrorCode.UNAUTHORIZED,
    P.CloseCode.WRONG_NODE: P.ErrorCode.WRONG_NODE,
    P.CloseCode.REPLACED: "replaced",
    P.CloseCode.REMOVED: "removed",
}

_encode = P.encode
_ERROR_BODY = msgspec.json.Decoder(dict)


def register_struct(node_id: str, languages: Sequence[str], *, services: Sequence[str] | None, max_concurrency: int,
                    has_gpu: bool, accept_public_jobs: bool, batch: bool = True) -> P.Register:
    """Build a ``register``; ``batch=True``: the SDK reads batches (arrays of messages) from the server."""
    kwargs: dict[str, Any] = {}
    if services is not None:
        kwargs["services"] = list(services)
    return P.Register(node_id=node_id, languages=list(languages), max_concurrency=max_concurrency,
                      has_gpu=has_gpu, accept_public_jobs=accept_public_jobs, batch=batch, **kwargs)


def heartbeat(running: int, figures: Mapping[str, Any]) -> bytes:
    """A validated ``heartbeat``: ``ValueError`` naming the field the server would refuse.

    Checked here because the server refuses a whole batch for one bad
    message: a bad figure must not take the results queued with it down.
    """
    try:
        data = _encode(P.Heartbeat(running=running, **figures))
    except TypeError as exc:
        raise TypeError(f"heartbeat figures: {exc}") from None
    try:
        P.decode_node_message(data)
    except P.ProtocolError as exc:
        raise ValueError(f"heartbeat field {exc.field!r}: {exc.message}" if exc.field
                         else f"heartbeat: {exc.message}") from None
    return data


def accept(job_id: str) -> bytes:
    """Encode an ``accept``."""
    return _encode(P.Accept(job_id=job_id))


def result(job_id: str, ok: bool, payload: Any, error: str | None, retry: bool = False) -> bytes:
    """A ``result``; ``TypeError`` when ``payload`` is not JSON-encodable."""
    try:
        return _encode(P.Result(job_id=job_id, ok=ok, payload=payload, error=error, retry=retry))
    except TypeError as exc:
        raise TypeError(f"payload is not JSON-encodable: {exc}") from None


DRAIN = _encode(P.Drain())


def frames(messages: list[bytes], limit: int) -> list[bytes]:
    """Pack encoded messages into as few frames as possible, none above ``limit`` bytes.

    One message goes as itself, several as a JSON array (a batch).
    """
    if len(messages) == 1:
        return messages
    out: list[bytes] = []
    group: list[bytes] = []
    size = 2
    for m in messages:
        if group and size + len(m) + 1 > limit:
            out.append(group[0] if len(group) == 1 else b"[" + b",".join(group) + b"]")
            group, size = [], 2
        group.append(m)
        size += len(m) + 1
    if group:
        out.append(group[0] if len(group) == 1 else b"[" + b",".join(group) + b"]")
    return out


def session_job(request_id: int | str, src: str, tgt: str, payload: Any, *, tenant: str | None,
                services: list[str] | None, prefer: str | list[str] | None, timeout: float | None,
                require_gpu: bool, limit: int) -> bytes:
    """Encode a session ``job`` and check it as the server would.

    The server cannot tell which request an unreadable message was, and
    refuses a whole batch for one bad message, so bad jobs never leave here.

    :raises TypeError: the payload is not JSON-encodable.
    :raises ProtocolError: what the server would refuse (``code``, ``field``).
    """
    try:
        data = _encode(P.SessionJob(request_id=request_id, src=src, tgt=tgt, payload=payload, tenant=tenant,
                                    services=services, prefer=prefer, timeout=timeout, require_gpu=require_gpu))
    except TypeError as exc:
        raise TypeError(f"payload is not JSON-encodable: {exc}") from None
    if len(data) > limit:
        raise P.ProtocolError(P.ErrorCode.TOO_BIG, f"the job is {len(data)} bytes, over the {limit}-byte message limit",
                              "payload")
    P.decode_session_message(data)
    return data


def session_cancel(request_id: int | str) -> bytes:
    """Encode a session ``cancel``."""
    return _encode(P.SessionCancel(request_id=request_id))


def encode(message: msgspec.Struct) -> bytes:
    """Encode one message or body."""
    return _encode(message)


def decode_node_frame(data: bytes | str) -> list[P.ServerNodeMessage]:
    """Decode what the server sent a node: always a list of messages (a batch or one).

    :raises ProtocolError: the frame is not a valid message or batch.
    """
    msg = P.decode_server_node_message(data)
    return msg if isinstance(msg, list) else [msg]


def decode_session_frame(data: bytes | str) -> list[P.ServerSessionMessage]:
    """Decode what the server sent a session stream: always a list of messages.

    :raises ProtocolError: the frame is not a valid message or batch.
    """
    msg = P.decode_server_session_message(data)
    return msg if isinstance(msg, list) else [msg]


def decode_error_body(data: bytes | bytearray | str | None) -> dict[str, Any]:
    """Decode an HTTP error body as a dict (``{}`` when it is not a JSON object)."""
    if not data:
        return {}
    try:
        body = _ERROR_BODY.decode(data)
    except msgspec.DecodeError:
        text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else str(data)
        return {"message": text.strip()[:500]}
    return body if isinstance(body, dict) else {}


def error_fields(err: P.Error) -> dict[str, Any]:
    """An ``error`` frame as the dict :func:`pysched.client.errors.error_from_body` reads."""
    return {f: getattr(err, f) for f in err.__struct_fields__ if getattr(err, f) is not None}
