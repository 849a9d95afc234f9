"""The ``pysched serve`` wire protocol: message schemas, codes and limits.

One module for both ends: the server (:mod:`pysched.serve.app`) and the
clients (:mod:`pysched.client`) import it, so it depends on msgspec only
(no Starlette, no uvicorn). ``docs/protocol.md`` is the reference text;
the two are kept in step.

Every WebSocket message is one JSON object whose ``"type"`` names it; each
``type`` is one :class:`msgspec.Struct` below, tagged by that field. HTTP
bodies are the same kind of structs, untagged. Fields with a default may be
omitted; unknown fields are ignored (so either side can add optional fields
without breaking the other), unknown ``type`` values are an error.

Decoding::

    msg = decode_node_message(frame)      # Register | Heartbeat | Accept | Result | Drain, or a list
    msg = decode_session_message(frame)   # SessionJob | SessionCancel, or a list
    frame = encode(Job(...))              # bytes, UTF-8 JSON
    frame = encode([job1, job2])          # a batch (only to peers that asked for batches)

A message that fails to decode raises :class:`ProtocolError`, whose ``code``,
``message`` and ``field`` are what the server puts in its ``error`` frame.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

import msgspec

__all__ = [
    # versions and limits
    "PROTOCOL_VERSION", "MAX_ID_LENGTH", "MAX_LIST_LENGTH", "DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_MAX_BAD_MESSAGES",
    "MAX_TIMEOUT",
    # codes
    "ErrorCode", "CloseCode", "GUARANTEES",
    # node <-> server
    "Register", "Heartbeat", "Accept", "Result", "Drain", "Registered", "Job", "Cancel", "Error",
    # client <-> server
    "SessionJob", "SessionCancel", "SessionResult",
    "JobRequest", "JobResponse", "DispatchRequest", "DispatchResponse", "SettleRequest", "RenewRequest",
    "ErrorBody",
    # helpers
    "NodeMessage", "ServerNodeMessage", "SessionMessage", "ServerSessionMessage",
    "ProtocolError", "encode", "decode_node_message", "decode_session_message", "decode_server_node_message",
    "decode_server_session_message", "decode_session_items", "decode_body",
]

#: Bumped on an incompatible change; sent in ``registered`` so a node can check it.
PROTOCOL_VERSION = 1

#: Longest id (node, session, job, request, tenant) in characters.
MAX_ID_LENGTH = 256
#: Most items in one list field (languages, services, prefer, exclude).
MAX_LIST_LENGTH = 64
#: Default per-connection (and per-request-body) message size limit, bytes.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
#: Default number of bad messages (malformed, unknown type, invalid,
#: oversized) after which the server closes a WebSocket.
DEFAULT_MAX_BAD_MESSAGES = 3
#: Largest ``timeout`` a job may ask for, seconds.
MAX_TIMEOUT = 3600.0

#: The delivery guarantee setting (``ServeConfig.guarantee``).
GUARANTEES = ("at_least_once", "at_most_once")

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
Code = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Codes = Annotated[list[Code], msgspec.Meta(max_length=MAX_LIST_LENGTH)]
Ids = Annotated[list[Id], msgspec.Meta(max_length=MAX_LIST_LENGTH)]
Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Concurrency = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
Timeout = Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT)]
RequestId = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | Id


class ErrorCode:
    """The ``code`` of an ``error`` frame, or ``error`` of an HTTP error body."""

    # malformed input (never changes any state)
    BAD_MESSAGE = "bad_message"        #: not JSON, or not a JSON object
    UNKNOWN_TYPE = "unknown_type"      #: missing or unknown "type"
    INVALID = "invalid"                #: a field has a bad value; "field" names it
    TOO_BIG = "too_big"                #: message larger than the connection's limit
    # auth
    UNAUTHORIZED = "unauthorized"      #: no or wrong bearer token
    FORBIDDEN = "forbidden"            #: a valid token of another kind
    # node protocol
    NOT_REGISTERED = "not_registered"  #: a node message before "register"
    WRONG_NODE = "wrong_node"          #: the job is not this node's (or not this node's attempt)
    UNKNOWN_JOB = "unknown_job"        #: no such job in flight (finished, cancelled or never sent)
    UNKNOWN_NODE = "unknown_node"      #: admin call naming an unknown node
    # dispatch outcomes
    NO_POOL = "no_pool"                #: no pool serves the language pair (404)
    NO_NODE = "no_node"                #: pools serve it, no node can take it now (503, Retry-After)
    BACKEND_UNAVAILABLE = "backend_unavailable"  #: Redis unreachable (503, Retry-After)
    DRAINING = "draining"              #: the server is shutting down (503)
    TOO_MANY_IN_FLIGHT = "too_many_in_flight"    #: session stream over its in-flight limit (429)
    DUPLICATE_REQUEST = "duplicate_request"      #: request_id already in flight on this stream
    # delivery outcomes
    TIMEOUT = "timeout"                #: the last attempt missed its deadline (504)
    NODE_LOST = "node_lost"            #: the last attempt's node disconnected or failed it (502)
    CANCELLED = "cancelled"            #: cancelled by the client, an admin or shutdown
    INTERNAL = "internal"              #: a server bug; reported, never silent (500)


class CloseCode:
    """WebSocket close codes the server uses (4000-4999 are application codes)."""

    NORMAL = 1000                 #: the peer asked to close
    GOING_AWAY = 1001             #: server shutdown, after draining
    MESSAGE_TOO_BIG = 1009        #: repeated oversized messages, or one over the hard frame limit
    BAD_MESSAGES = 4400           #: too many malformed / unknown / invalid messages
    UNAUTHORIZED = 4401           #: token refused (only when the handshake cannot carry an HTTP 401)
    WRONG_NODE = 4403             #: the connection tried to speak for another node id
    REGISTER_TIMEOUT = 4408       #: no "register" within the register timeout
    REPLACED = 4409               #: another connection registered the same node id
    REMOVED = 4410                #: an admin removed the node; do not reconnect automatically


class _Tagged(msgspec.Struct, tag_field="type", kw_only=True):
    pass


# ---------------------------------------------------------------- node -> server
class Register(_Tagged, tag="register"):
    """First message of a node connection: the arguments of ``Scheduler.register_node``."""

    node_id: Id
    languages: Annotated[list[Code], msgspec.Meta(min_length=1, max_length=MAX_LIST_LENGTH)]
    services: Codes = msgspec.field(default_factory=lambda: ["asr", "nmt", "tts", "semantic"])
    max_concurrency: Concurrency = 4
    has_gpu: bool = True
    accept_public_jobs: bool = True
    #: the node also reads batches (JSON arrays of messages) from the server
    batch: bool = False


class Heartbeat(_Tagged, tag="heartbeat"):
    """Load figures and health; every field optional (omitted = unchanged)."""

    running: Count | None = None
    cpu: Percent | None = None
    gpu: Percent | None = None
    mem: Percent | None = None
    healthy: bool | None = None
    services: Codes | None = None
    languages: Annotated[list[Code], msgspec.Meta(min_length=1, max_length=MAX_LIST_LENGTH)] | None = None
    max_concurrency: Concurrency | None = None


class Accept(_Tagged, tag="accept"):
    """The node takes the job (send it before starting work on it)."""

    job_id: Id


class Result(_Tagged, tag="result"):
    """The job's outcome. ``ok=false`` is final unless ``retry=true`` asks for another node."""

    job_id: Id
    ok: bool
    payload: Any = None
    error: str | None = None
    retry: bool = False


class Drain(_Tagged, tag="drain"):
    """The node wants no new jobs (running ones finish)."""


# ---------------------------------------------------------------- server -> node
class Registered(_Tagged, tag="registered"):
    """The answer to ``register``: the node is registered; the settings it should follow."""

    node_id: str
    heartbeat_interval: float
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    guarantee: str = "at_least_once"
    version: int = PROTOCOL_VERSION


class Job(_Tagged, tag="job", kw_only=True):
    """A job for the node. ``deadline`` is unix time; ``timeout`` the same as seconds from sending."""

    job_id: str
    session_id: str
    src: str
    tgt: str
    payload: Any = None
    deadline: float
    timeout: float
    attempt: int = 1
    tenant: str | None = None


class Cancel(_Tagged, tag="cancel"):
    """Stop working on a job: its result is no longer wanted (reason: an ErrorCode)."""

    job_id: str
    reason: str


class Error(_Tagged, tag="error", omit_defaults=True):
    """Something the peer sent was refused. On session streams it carries the request's outcome."""

    code: str
    message: str
    field: str | None = None
    # session streams
    request_id: int | str | None = None
    status: int | None = None
    job_id: str | None = None
    attempts: int | None = None
    breakdown: dict[str, int] | None = None
    best_reason: str | None = None


# ---------------------------------------------------------------- session stream
class SessionJob(_Tagged, tag="job"):
    """One job on ``/v1/sessions/{session_id}``; ``request_id`` is echoed in its answer."""

    request_id: RequestId
    src: Code
    tgt: Code
    payload: Any = None
    tenant: Id | None = None
    services: Codes | None = None
    prefer: Id | Ids | None = None
    timeout: Timeout | None = None
    require_gpu: bool = True


class SessionCancel(_Tagged, tag="cancel"):
    """Cancel an in-flight job of this stream; it ends with an ``error`` of code ``cancelled``."""

    request_id: RequestId


class SessionResult(_Tagged, tag="result"):
    """A job of the stream ended with the node's answer (``ok=false``: the node's own failure)."""

    request_id: int | str
    job_id: str
    node_id: str
    ok: bool
    payload: Any = None
    error: str | None = None
    attempts: int = 1


# ---------------------------------------------------------------- HTTP bodies
class _Body(msgspec.Struct, kw_only=True):
    pass


class JobRequest(_Body):
    """``POST /v1/jobs``."""

    session_id: Id
    src: Code
    tgt: Code
    payload: Any = None
    tenant: Id | None = None
    services: Codes | None = None
    prefer: Id | Ids | None = None
    timeout: Timeout | None = None
    require_gpu: bool = True


class JobResponse(_Body):
    """``POST /v1/jobs``: the node's answer, after ``attempts`` deliveries."""

    job_id: str
    node_id: str
    ok: bool
    payload: Any = None
    error: str | None = None
    attempts: int = 1


class DispatchRequest(_Body):
    """``POST /v1/dispatch``: a decision only; the caller delivers the job."""

    session_id: Id
    src: Code
    tgt: Code
    job_id: Id | None = None
    tenant: Id | None = None
    services: Codes | None = None
    prefer: Id | Ids | None = None
    exclude: Ids | None = None
    require_gpu: bool = True


class DispatchResponse(_Body):
    """``POST /v1/dispatch``: the node chosen; its capacity is reserved under ``job_id``."""

    job_id: str
    node_id: str
    pool_id: int
    session_id: str
    src: str
    tgt: str


class SettleRequest(_Body):
    """``POST /v1/jobs/{job_id}/commit`` and ``/release`` (body optional)."""

    node_id: Id | None = None


class RenewRequest(_Body):
    """``POST /v1/jobs/{job_id}/renew`` (body optional)."""

    lease: Timeout | None = None
    node_id: Id | None = None


class ErrorBody(_Body, omit_defaults=True):
    """Every HTTP error response."""

    error: str
    message: str
    field: str | None = None
    breakdown: dict[str, int] | None = None
    best_reason: str | None = None
    src: str | None = None
    tgt: str | None = None
    job_id: str | None = None
    attempts: int | None = None


NodeMessage = Register | Heartbeat | Accept | Result | Drain
ServerNodeMessage = Registered | Job | Cancel | Error
SessionMessage = SessionJob | SessionCancel
ServerSessionMessage = SessionResult | Error


# ---------------------------------------------------------------- encoding
class ProtocolError(ValueError):
    """A message or body that cannot be accepted.

    :param code: an :class:`ErrorCode`.
    :param message: what is wrong, for people.
    :param field: the top-level field at fault, or None.
    """

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


_encoder = msgspec.json.Encoder()
#: One message (or a list of them: a batch) as UTF-8 JSON bytes.
encode = _encoder.encode
# A frame is one message object or a batch: a JSON array of message objects.
_node_decoder: msgspec.json.Decoder[NodeMessage | list[NodeMessage]] = msgspec.json.Decoder(
    NodeMessage | list[NodeMessage])
_session_decoder: msgspec.json.Decoder[SessionMessage | list[SessionMessage]] = msgspec.json.Decoder(
    SessionMessage | list[SessionMessage])
_server_node_decoder: msgspec.json.Decoder[ServerNodeMessage | list[ServerNodeMessage]] = msgspec.json.Decoder(
    ServerNodeMessage | list[ServerNodeMessage])
_server_session_decoder: msgspec.json.Decoder[ServerSessionMessage | list[ServerSessionMessage]] = (
    msgspec.json.Decoder(ServerSessionMessage | list[ServerSessionMessage]))
# one decoder per body type, made on first use
_body_decoders: dict[type[msgspec.Struct], msgspec.json.Decoder[Any]] = {}

_BodyT = TypeVar("_BodyT", bound=msgspec.Struct)
_T = TypeVar("_T")

_AT = re.compile(r" - at `\$((?:\.[A-Za-z_][A-Za-z_0-9]*|\[\d+\])*)`$")
_MISSING = re.compile(r"Object missing required field `([^`]+)`")


def _protocol_error(exc: msgspec.DecodeError) -> ProtocolError:
    """Turn msgspec's error into (code, message, field)."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return ProtocolError(ErrorCode.BAD_MESSAGE, f"malformed JSON: {text}")
    field = None
    m = _AT.search(text)
    if m:
        # "$.languages[2]" -> "languages": the top-level field is what a caller can fix
        first = re.match(r"(?:\[\d+\])?\.([A-Za-z_][A-Za-z_0-9]*)", m.group(1))
        field = first.group(1) if first else None
        text = text[:m.start()]
    m = _MISSING.search(text)
    if m:
        if m.group(1) == "type" and field is None:
            return ProtocolError(ErrorCode.UNKNOWN_TYPE, "message has no \"type\"", "type")
        field = m.group(1) if field is None else field
        return ProtocolError(ErrorCode.INVALID, f"missing required field {m.group(1)!r}", field)
    if field == "type":
        return ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type: {text}", "type")
    if text.startswith("Expected `object`"):
        return ProtocolError(ErrorCode.BAD_MESSAGE, f"a message must be a JSON object: {text}")
    where = f" (field {field!r})" if field else ""
    return ProtocolError(ErrorCode.INVALID, f"{text}{where}", field)


def _decode(decoder: msgspec.json.Decoder[_T], data: bytes | str) -> _T:
    """``decoder.decode(data)``, its error turned into a :class:`ProtocolError`."""
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise _protocol_error(exc) from None


def decode_node_message(data: bytes | str) -> NodeMessage | list[NodeMessage]:
    """Decode a node's frame.

    A batch is decoded whole: one bad element refuses all of it.

    :param data: the frame, JSON.
    :returns: one message, or a list of them for a batch.
    :raises ProtocolError: the frame is not a valid message or batch.
    """
    return _decode(_node_decoder, data)


def decode_session_message(data: bytes | str) -> SessionMessage | list[SessionMessage]:
    """Decode a session-stream client's frame, whole.

    :param data: the frame, JSON.
    :returns: one message, or a list of them for a batch.
    :raises ProtocolError: the frame is not a valid message or batch.
    """
    return _decode(_session_decoder, data)


def decode_session_items(data: bytes | str) -> Sequence[SessionMessage | tuple[ProtocolError, int | str | None]]:
    """Decode a session-stream frame element by element.

    A batch with one bad element must not sink its good ones (their answers
    would never come), and the answer to a bad one should carry its
    ``request_id`` when it has one.

    :param data: the frame, JSON.
    :returns: for each element, its message, or ``(error, request_id)`` for a bad
        one (``request_id`` None when the element has none).
    :raises ProtocolError: the frame is not JSON, or holds neither an object nor an array.
    """
    try:
        decoded = _session_decoder.decode(data)
        return decoded if isinstance(decoded, list) else [decoded]
    except msgspec.DecodeError as exc:
        whole = _protocol_error(exc)
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError:
        raise whole from None
    if not isinstance(raw, (list, dict)):
        raise whole
    out: list[SessionMessage | tuple[ProtocolError, int | str | None]] = []
    for item in raw if isinstance(raw, list) else [raw]:
        request_id = item.get("request_id") if isinstance(item, dict) else None
        if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
            request_id = None
        try:
            out.append(msgspec.convert(item, SessionMessage))
        except msgspec.ValidationError as exc:
            out.append((_protocol_error(exc), request_id))
    return out


def decode_server_node_message(data: bytes | str) -> ServerNodeMessage | list[ServerNodeMessage]:
    """Decode what the server sends a node (for node implementations).

    :param data: the frame, JSON.
    :returns: one message, or a list of them for a batch.
    :raises ProtocolError: the frame is not a valid message or batch.
    """
    return _decode(_server_node_decoder, data)


def decode_server_session_message(data: bytes | str) -> ServerSessionMessage | list[ServerSessionMessage]:
    """Decode what the server sends a session stream (for client implementations).

    :param data: the frame, JSON.
    :returns: one message, or a list of them for a batch.
    :raises ProtocolError: the frame is not a valid message or batch.
    """
    return _decode(_server_session_decoder, data)


def decode_body(data: bytes | str, kind: type[_BodyT]) -> _BodyT:
    """Decode an HTTP body.

    :param data: the body, JSON.
    :param kind: the body's struct type (:class:`JobRequest`, ...).
    :raises ProtocolError: the body is not a valid ``kind``.
    """
    decoder: msgspec.json.Decoder[_BodyT] | None = _body_decoders.get(kind)
    if decoder is None:
        decoder = _body_decoders[kind] = msgspec.json.Decoder(kind)
    return _decode(decoder, data)
