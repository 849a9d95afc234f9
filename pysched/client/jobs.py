"""The job side of the SDK: :class:`JobClient` and its session streams.

One client has a synchronous face (``submit``, ``dispatch``, ``commit``,
``release``, ``renew``, on :class:`httpx.Client`) and an asynchronous one
(the same names prefixed with ``a``: ``asubmit``, ``adispatch``, ``acommit``,
``arelease``, ``arenew``, on :class:`httpx.AsyncClient`); each underlying HTTP client is
made on first use and keeps its connections alive. Session streams are
asyncio only::

    with JobClient("http://127.0.0.1:8000", token=CLIENT_TOKEN) as client:
        r = client.submit("session-1", "zh", "en", {"text": "..."})
        print(r.node_id, r.payload)

    async with JobClient(url, token=CLIENT_TOKEN) as client:
        r = await client.asubmit("session-1", "zh", "en", {"text": "..."})
        async with client.session("session-2") as s:
            for chunk in chunks:
                await s.send("zh", "en", chunk)
            async for result in s:         # in order of completion
                print(result.request_id, result.job_id, result.ok, result.payload)

Error answers raise the typed exceptions of :mod:`pysched.client.errors`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

import httpx
import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from pysched.client import _wire as wire
from pysched.client._url import bearer, http_base, quote_segment, ws_url
from pysched.client.errors import (
    BadRequest,
    JobFailed,
    ServeError,
    ServeUnavailable,
    error_from_body,
)

__all__ = ["JobClient", "JobResult", "SessionStream"]

P = wire.P
_JSON = {"Content-Type": "application/json"}
_decode_job: Callable[[bytes], P.JobResponse] = msgspec.json.Decoder(P.JobResponse).decode
_decode_dispatch: Callable[[bytes], P.DispatchResponse] = msgspec.json.Decoder(P.DispatchResponse).decode
_decode_any: Callable[[bytes], Any] = msgspec.json.Decoder().decode


class JobResult:
    """The answer to one job: the node's result, or (on a session stream only) an error the server reported for it.

    On a session stream a job the server could not run arrives as a
    ``JobResult`` with ``ok=False``, ``code`` (``no_node``, ``timeout``,
    ...), ``status`` and ``exception``, the typed error :meth:`unwrap`
    raises; results from nodes have ``code`` ``None``.

    :param job_id: the job's id (None when the server refused it before giving one).
    :param node_id: the node that answered (None for a server error).
    :param ok: the node's verdict.
    :param payload: the node's answer.
    :param error: the node's message when not ok (or the server's error message).
    :param attempts: deliveries it took.
    :param request_id: the session stream's request (None over HTTP).
    :param code: the server's error code, or None for a node's answer.
    :param status: the server error's HTTP status, or None.
    :param exception: the server error as the typed exception :meth:`unwrap` raises.
    """

    __slots__ = (
        "attempts",
        "code",
        "error",
        "exception",
        "job_id",
        "node_id",
        "ok",
        "payload",
        "request_id",
        "status",
    )

    def __init__(  # noqa: PLR0917  the public constructor: positional callers exist (the stream reader)
        self, job_id: str | None, node_id: str | None, ok: bool, payload: Any = None, error: str | None = None,
        attempts: int = 1, request_id: int | str | None = None, code: str | None = None, status: int | None = None,
        exception: ServeError | None = None,
    ) -> None:
        self.job_id = job_id
        self.node_id = node_id
        self.ok = ok
        self.payload = payload
        self.error = error
        self.attempts = attempts
        self.request_id = request_id
        self.code = code
        self.status = status
        self.exception = exception

    def __repr__(self) -> str:
        rid = f"request_id={self.request_id!r}, " if self.request_id is not None else ""
        if self.code is not None:
            return f"JobResult({rid}job_id={self.job_id!r}, ok=False, code={self.code!r}, error={self.error!r})"
        return (f"JobResult({rid}job_id={self.job_id!r}, node_id={self.node_id!r}, ok={self.ok}, "
                f"payload={self.payload!r}, error={self.error!r}, attempts={self.attempts})")

    def unwrap(self) -> Any:
        """Return the payload, or raise the job's failure.

        :raises ServeError: :attr:`exception`, for a server error.
        :raises JobFailed: the node answered not ok.
        """
        if self.exception is not None:
            raise self.exception
        if not self.ok:
            raise JobFailed(self.error or "the node failed the job", code="node_error",
                            body={"job_id": self.job_id, "node_id": self.node_id, "attempts": self.attempts})
        return self.payload

    @classmethod
    def _from_response(cls, r: P.JobResponse, request_id: int | str | None = None) -> JobResult:
        return cls(r.job_id, r.node_id, r.ok, r.payload, r.error, r.attempts, request_id)

    @classmethod
    def _from_error(cls, err: P.Error, src: str = "", tgt: str = "") -> JobResult:
        exc = error_from_body(err.status or 0, wire.error_fields(err), src=src, tgt=tgt, job_id=err.job_id)
        return cls(err.job_id, None, False, None, err.message, err.attempts or 0, err.request_id, err.code,
                   err.status, exc)


def _check_id(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _list_or_none(value: object, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be an iterable of strings, got {value!r}")
    return list(value)


def _prefer(value: object) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    return _list_or_none(value, "prefer")


class JobClient:
    """A client of a ``pysched serve`` server's job endpoints.

    :param url: the server's base URL (``http://127.0.0.1:8000``).
    :param token: the client token.
    :param timeout: bounds each HTTP request, seconds; for ``submit`` a job's
        own ``timeout`` (per attempt, on the server) is added to it.
    :param max_connections: bounds the keep-alive pool of each face.
    :param headers: extra headers for every request.
    :raises ValueError: a bad ``url``, ``timeout``, ``max_connections`` or ``token``.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", *, token: str | None = None, timeout: float = 60.0,
                 max_connections: int = 100, headers: dict[str, str] | None = None) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"timeout must be a positive number, got {timeout!r}")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections must be an int >= 1, got {max_connections!r}")
        self.url = http_base(url)
        self.token = token
        self.timeout = float(timeout)
        self.max_connections = max_connections
        self._headers = {**(headers or {}), **bearer(token)}
        self._sync: httpx.Client | None = None
        self._async: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"JobClient({self.url!r})"

    # ------------------------------------------------------------------ plumbing
    def _limits(self) -> httpx.Limits:
        return httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)

    @property
    def http(self) -> httpx.Client:
        """The synchronous :class:`httpx.Client` (made on first use)."""
        if self._sync is None:
            self._sync = httpx.Client(base_url=self.url, headers=self._headers, timeout=self.timeout,
                                      limits=self._limits(), trust_env=False)
        return self._sync

    @property
    def ahttp(self) -> httpx.AsyncClient:
        """The asynchronous :class:`httpx.AsyncClient` (made on first use)."""
        if self._async is None:
            self._async = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self.timeout,
                                            limits=self._limits(), trust_env=False)
        return self._async

    def close(self) -> None:
        """Close the synchronous face's connections."""
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def aclose(self) -> None:
        """Close both faces' connections."""
        if self._async is not None:
            await self._async.aclose()
            self._async = None
        self.close()

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> JobClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @staticmethod
    def _check(resp: httpx.Response, src: str = "", tgt: str = "", job_id: str | None = None,
               node_id: str | None = None) -> None:
        if resp.status_code < HTTPStatus.MULTIPLE_CHOICES:  # 1xx, 2xx
            return
        body = wire.decode_error_body(resp.content)
        raise error_from_body(resp.status_code, body, src=src, tgt=tgt, job_id=job_id, node_id=node_id,
                              retry_after=resp.headers.get("Retry-After"))

    def _request_timeout(self, job_timeout: float | None) -> float:
        # The server may run up to max-attempts attempts of `timeout` each; the
        # HTTP wait must not give up before the server does.
        return self.timeout if job_timeout is None else self.timeout + 3 * float(job_timeout)

    # ------------------------------------------------------------------ bodies
    @staticmethod
    def _job_body(session_id: str, src: str, tgt: str, payload: Any, *, tenant: str | None,
                  services: Iterable[str] | None, prefer: str | Iterable[str] | None, timeout: float | None,
                  require_gpu: bool) -> bytes:
        _check_id(session_id, "session_id")
        _check_id(src, "src")
        _check_id(tgt, "tgt")
        try:
            return wire.encode(P.JobRequest(session_id=session_id, src=src, tgt=tgt, payload=payload, tenant=tenant,
                                            services=_list_or_none(services, "services"), prefer=_prefer(prefer),
                                            timeout=timeout, require_gpu=require_gpu))
        except TypeError as exc:  # payload not JSON-encodable
            raise BadRequest(f"payload is not JSON-encodable: {exc}", code="invalid", field="payload") from None

    @staticmethod
    def _dispatch_body(session_id: str, src: str, tgt: str, *, job_id: str | None, tenant: str | None,
                       services: Iterable[str] | None, prefer: str | Iterable[str] | None,
                       exclude: Iterable[str] | None, require_gpu: bool) -> bytes:
        _check_id(session_id, "session_id")
        _check_id(src, "src")
        _check_id(tgt, "tgt")
        return wire.encode(P.DispatchRequest(session_id=session_id, src=src, tgt=tgt, job_id=job_id, tenant=tenant,
                                             services=_list_or_none(services, "services"), prefer=_prefer(prefer),
                                             exclude=_list_or_none(exclude, "exclude"), require_gpu=require_gpu))

    @staticmethod
    def _settle_body(node_id: str | None) -> bytes:
        return wire.encode(P.SettleRequest(node_id=node_id))

    @staticmethod
    def _renew_body(lease: float | None, node_id: str | None) -> bytes:
        return wire.encode(P.RenewRequest(lease=lease, node_id=node_id))

    @staticmethod
    def _job_path(job_id: str, action: str) -> str:
        return f"/v1/jobs/{quote_segment(_check_id(job_id, 'job_id'))}/{action}"

    # ------------------------------------------------------------------ sync face
    def submit(self, session_id: str, src: str, tgt: str, payload: Any = None, *, tenant: str | None = None,
               services: Iterable[str] | None = None, prefer: str | Iterable[str] | None = None,
               timeout: float | None = None, require_gpu: bool = True) -> JobResult:
        """Run one job (``POST /v1/jobs``): the server picks a node and delivers it.

        :param session_id: the job's session (its jobs stay on one pool).
        :param src: source language code.
        :param tgt: target language code.
        :param payload: any JSON value, handed to the node as is.
        :param tenant: the job's tenant; None: a public job.
        :param services: services the node must offer (default: the server's).
        :param prefer: a node id, or node ids in order of preference.
        :param timeout: seconds a node has for one attempt (default: the server's).
        :param require_gpu: whether only GPU nodes may take it.
        :returns: the node's answer (``ok`` may be False: the node's own error).
        :raises NoNodeAvailable: no node can take the job now (503).
        :raises NoPoolForLanguagePair: no pool serves the pair (404).
        :raises JobFailed: the server took the job but got no result.
        :raises BadRequest: the request was malformed.
        :raises ServeUnavailable: no answer from the server, or it is draining.
        """
        body = self._job_body(session_id, src, tgt, payload, tenant=tenant, services=services, prefer=prefer,
                              timeout=timeout, require_gpu=require_gpu)
        try:
            resp = self.http.post("/v1/jobs", content=body, headers=_JSON, timeout=self._request_timeout(timeout))
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc
        self._check(resp, src, tgt)
        return JobResult._from_response(_decode_job(resp.content))

    def dispatch(self, session_id: str, src: str, tgt: str, *, job_id: str | None = None, tenant: str | None = None,
                 services: Iterable[str] | None = None, prefer: str | Iterable[str] | None = None,
                 exclude: Iterable[str] | None = None, require_gpu: bool = True) -> P.DispatchResponse:
        """Reserve room on a node, a decision only (``POST /v1/dispatch``).

        The caller delivers the job, then calls :meth:`commit` and :meth:`release`.

        :param session_id: the job's session.
        :param src: source language code.
        :param tgt: target language code.
        :param job_id: the job's id, to retry a dispatch safely (default: the server numbers it).
        :param tenant: the job's tenant; None: a public job.
        :param services: services the node must offer.
        :param prefer: a node id, or node ids in order of preference.
        :param exclude: node ids not to choose.
        :param require_gpu: whether only GPU nodes may take it.
        :returns: ``job_id``, ``node_id``, ``pool_id``, ``session_id``, ``src``, ``tgt``.
        :raises NoNodeAvailable: no node can take the job now (503).
        :raises NoPoolForLanguagePair: no pool serves the pair (404).
        :raises BadRequest: the request was malformed.
        :raises ServeUnavailable: no answer from the server, or it is draining.
        """
        body = self._dispatch_body(session_id, src, tgt, job_id=job_id, tenant=tenant, services=services,
                                   prefer=prefer, exclude=exclude, require_gpu=require_gpu)
        try:
            resp = self.http.post("/v1/dispatch", content=body, headers=_JSON)
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc
        self._check(resp, src, tgt, job_id)
        return _decode_dispatch(resp.content)

    def commit(self, job_id: str, *, node_id: str | None = None) -> None:
        """Commit a dispatched job (the node took it).

        :param job_id: the job.
        :param node_id: the node it must be held on (refused otherwise).
        :raises UnknownJob: the server holds no reservation for it.
        :raises WrongNode: it is held on another node than ``node_id``.
        """
        try:
            resp = self.http.post(self._job_path(job_id, "commit"), content=self._settle_body(node_id), headers=_JSON)
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc
        self._check(resp, job_id=job_id, node_id=node_id)

    def release(self, job_id: str, *, node_id: str | None = None) -> bool:
        """Release a dispatched job's capacity.

        :param job_id: the job.
        :param node_id: the node it must be held on (not released otherwise).
        :returns: False when nothing was held (or it is held on another node than ``node_id``).
        """
        try:
            resp = self.http.post(self._job_path(job_id, "release"), content=self._settle_body(node_id), headers=_JSON)
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc
        self._check(resp, job_id=job_id, node_id=node_id)
        return bool(_decode_any(resp.content).get("released"))

    def renew(self, job_id: str, *, lease: float | None = None, node_id: str | None = None) -> None:
        """Extend a dispatched job's hold to now + ``lease`` seconds.

        :param job_id: the job.
        :param lease: seconds (default: the server's lease for committed jobs, its reservation TTL otherwise).
        :param node_id: the node it must be held on (refused otherwise).
        :raises UnknownJob: the server holds no reservation for it.
        :raises WrongNode: it is held on another node than ``node_id``.
        """
        try:
            resp = self.http.post(self._job_path(job_id, "renew"), content=self._renew_body(lease, node_id),
                                  headers=_JSON)
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc
        self._check(resp, job_id=job_id, node_id=node_id)

    # ------------------------------------------------------------------ async face
    async def asubmit(self, session_id: str, src: str, tgt: str, payload: Any = None, *, tenant: str | None = None,
                      services: Iterable[str] | None = None, prefer: str | Iterable[str] | None = None,
                      timeout: float | None = None, require_gpu: bool = True) -> JobResult:
        """Do :meth:`submit`, asynchronously (same parameters, same answers)."""
        body = self._job_body(session_id, src, tgt, payload, tenant=tenant, services=services, prefer=prefer,
                              timeout=timeout, require_gpu=require_gpu)
        try:
            resp = await self.ahttp.post("/v1/jobs", content=body, headers=_JSON,
                                         timeout=self._request_timeout(timeout))
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc
        self._check(resp, src, tgt)
        return JobResult._from_response(_decode_job(resp.content))

    async def adispatch(self, session_id: str, src: str, tgt: str, *, job_id: str | None = None,
                        tenant: str | None = None, services: Iterable[str] | None = None,
                        prefer: str | Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                        require_gpu: bool = True) -> P.DispatchResponse:
        """Do :meth:`dispatch`, asynchronously (same parameters, same answers)."""
        body = self._dispatch_body(session_id, src, tgt, job_id=job_id, tenant=tenant, services=services,
                                   prefer=prefer, exclude=exclude, require_gpu=require_gpu)
        try:
            resp = await self.ahttp.post("/v1/dispatch", content=body, headers=_JSON)
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc
        self._check(resp, src, tgt, job_id)
        return _decode_dispatch(resp.content)

    async def acommit(self, job_id: str, *, node_id: str | None = None) -> None:
        """Do :meth:`commit`, asynchronously (same parameters, same answers)."""
        try:
            resp = await self.ahttp.post(self._job_path(job_id, "commit"), content=self._settle_body(node_id),
                                         headers=_JSON)
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc
        self._check(resp, job_id=job_id, node_id=node_id)

    async def arelease(self, job_id: str, *, node_id: str | None = None) -> bool:
        """Do :meth:`release`, asynchronously (same parameters, same answers)."""
        try:
            resp = await self.ahttp.post(self._job_path(job_id, "release"), content=self._settle_body(node_id),
                                         headers=_JSON)
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc
        self._check(resp, job_id=job_id, node_id=node_id)
        return bool(_decode_any(resp.content).get("released"))

    async def arenew(self, job_id: str, *, lease: float | None = None, node_id: str | None = None) -> None:
        """Do :meth:`renew`, asynchronously (same parameters, same answers)."""
        try:
            resp = await self.ahttp.post(self._job_path(job_id, "renew"), content=self._renew_body(lease, node_id),
                                         headers=_JSON)
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc
        self._check(resp, job_id=job_id, node_id=node_id)

    # ------------------------------------------------------------------ session streams
    def session(self, session_id: str, *, max_size: int | None = 4 * 1024 * 1024, open_timeout: float = 10.0,
                max_message_bytes: int = P.DEFAULT_MAX_MESSAGE_BYTES) -> SessionStream:
        """Open a stream of jobs of one session over one WebSocket (``/v1/sessions/{session_id}``).

        Use it with ``async with``.

        :param session_id: the session of every job on the stream.
        :param max_size: the largest frame accepted from the server, bytes (None: no limit).
        :param open_timeout: seconds the WebSocket handshake may take.
        :param max_message_bytes: the server's message size limit (``--max-message-bytes``): no frame sent is larger.
        """
        _check_id(session_id, "session_id")
        url = ws_url(self.url, f"/v1/sessions/{quote_segment(session_id)}") + "?batch=1"
        return SessionStream(url, session_id, bearer(self.token), max_size=max_size, open_timeout=open_timeout,
                             max_message_bytes=max_message_bytes)


def _unavailable(url: str, exc: BaseException) -> ServeUnavailable:
    return ServeUnavailable(f"no answer from {url}: {type(exc).__name__}: {exc}", code="unavailable")


class _End(enum.Enum):
    END = enum.auto()  # wakes an iterator (one member: a sentinel mypy can tell from a JobResult)


_END = _End.END


class SessionStream:
    """Many jobs of one session over one WebSocket; answers come in order of completion.

    :meth:`send` queues a job and returns its ``request_id`` at once
    (consecutive integers unless given); answers are read with
    ``async for result in stream`` or :meth:`recv`, each a
    :class:`JobResult` carrying the ``request_id`` and ``job_id``. Iteration
    ends when every job sent so far has been answered (a producer sending
    concurrently should loop on :meth:`recv` instead). :meth:`request`
    sends one job and waits for its own answer, raising its error. Jobs go
    out in batches: everything sent between two writes of the connection
    becomes one frame. Made by :meth:`JobClient.session`.

    :param url: the stream's WebSocket URL.
    :param session_id: the session of every job on the stream.
    :param headers: the handshake's headers (``Authorization``).
    :param max_size: the largest frame accepted from the server, bytes (None: no limit).
    :param open_timeout: seconds the WebSocket handshake may take.
    :param max_outbox: jobs queued unsent after which :meth:`send` waits.
    :param max_message_bytes: the server's message size limit: no frame sent is larger.
    """

    def __init__(self, url: str, session_id: str, headers: dict[str, str], *, max_size: int | None = 4 * 1024 * 1024,
                 open_timeout: float = 10.0, max_outbox: int = 1024,
                 max_message_bytes: int = P.DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.url = url
        self.session_id = session_id
        self._headers = headers
        self._max_size = max_size
        self._open_timeout = open_timeout
        self._max_outbox = max_outbox
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        #: request_id -> (src, tgt) of jobs sent and not yet answered
        self._pending: dict[int | str, tuple[str, str]] = {}
        self._waiters: dict[int | str, asyncio.Future[JobResult]] = {}
        self._results: asyncio.Queue[JobResult | _End] = asyncio.Queue()
        self._outbox: list[bytes] = []
        #: frame size limit: the server's (``--max-message-bytes``, 1 MiB by default)
        self.max_message_bytes = max_message_bytes
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._error: ServeError | None = None
        #: the latest frames the server sent about no job (a message of ours it could not read)
        self.errors: collections.deque[wire.Error | wire.ProtocolError] = collections.deque(maxlen=50)

    def __repr__(self) -> str:
        return f"SessionStream({self.session_id!r}, pending={self.pending})"

    @property
    def pending(self) -> int:
        """Jobs sent and not yet answered."""
        return len(self._pending)

    async def __aenter__(self) -> SessionStream:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the WebSocket (``async with`` does it).

        :raises AuthError: the token was refused.
        :raises BadRequest: the URL is not valid.
        :raises ServeUnavailable: the server could not be reached, or it is draining.
        """
        try:
            self._ws = await connect(self.url, additional_headers=self._headers, open_timeout=self._open_timeout,
                                     max_size=self._max_size, compression=None, proxy=None, close_timeout=5)
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise error_from_body(status, wire.decode_error_body(exc.response.body)) from None
        except InvalidURI as exc:
            raise BadRequest(str(exc), code="bad_url", field="url") from None
        except (OSError, asyncio.TimeoutError) as exc:
            raise _unavailable(self.url, exc) from exc
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._reader(self._ws)), loop.create_task(self._writer(self._ws))]

    async def close(self) -> None:
        """Send what is queued, then close the stream (the server cancels jobs still in flight)."""
        if self._closed:
            return
        ws = self._ws
        if ws is not None and self._error is None:
            with contextlib.suppress(ConnectionClosed):  # nothing left to send it on
                await self._flush(ws)
        self._closed = True
        if ws is not None:
            await ws.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_pending(ServeUnavailable(f"session stream {self.session_id!r} closed", code="closed"))

    # ------------------------------------------------------------------ sending
    async def send(self, src: str, tgt: str, payload: Any = None, *, request_id: int | str | None = None,
                   tenant: str | None = None, services: Iterable[str] | None = None,
                   prefer: str | Iterable[str] | None = None, timeout: float | None = None,
                   require_gpu: bool = True) -> int | str:
        """Queue one job; wait only while ``max_outbox`` jobs are queued unsent.

        :param src: source language code.
        :param tgt: target language code.
        :param payload: any JSON value, handed to the node as is.
        :param request_id: the job's id on this stream (default: the next integer).
        :param tenant: the job's tenant; None: a public job.
        :param services: services the node must offer.
        :param prefer: a node id, or node ids in order of preference.
        :param timeout: seconds a node has for one attempt (default: the server's).
        :param require_gpu: whether only GPU nodes may take it.
        :returns: the job's ``request_id``.
        :raises BadRequest: what the server would refuse (nothing is sent).
        :raises ValueError: ``request_id`` is in flight already.
        :raises ServeUnavailable: the stream is closed.
        """
        while not self._room.is_set():
            self._check_open()
            await self._room.wait()
        return self.send_nowait(src, tgt, payload, request_id=request_id, tenant=tenant, services=services,
                                prefer=prefer, timeout=timeout, require_gpu=require_gpu)

    def send_nowait(self, src: str, tgt: str, payload: Any = None, *, request_id: int | str | None = None,
                    tenant: str | None = None, services: Iterable[str] | None = None,
                    prefer: str | Iterable[str] | None = None, timeout: float | None = None,
                    require_gpu: bool = True) -> int | str:
        """Do :meth:`send` without waiting (same parameters, same answers).

        The caller bounds how much it queues (the server answers jobs beyond
        its in-flight limit with ``too_many_in_flight``).
        """
        self._check_open()
        _check_id(src, "src")
        _check_id(tgt, "tgt")
        if request_id is None:
            request_id = next(self._ids)
        elif request_id in self._pending:
            raise ValueError(f"request_id {request_id!r} is already in flight on this stream")
        try:
            msg = wire.session_job(request_id, src, tgt, payload, tenant=tenant,
                                   services=_list_or_none(services, "services"), prefer=_prefer(prefer),
                                   timeout=timeout, require_gpu=require_gpu, limit=self.max_message_bytes)
        except wire.ProtocolError as exc:
            raise BadRequest(exc.message, code=exc.code, field=exc.field) from None
        self._pending[request_id] = (src, tgt)
        self._outbox.append(msg)
        if len(self._outbox) >= self._max_outbox:
            self._room.clear()
        self._wake.set()
        return request_id

    def next_request_id(self) -> int:
        """The request id :meth:`send` would pick next (consumed)."""
        return next(self._ids)

    async def request(self, src: str, tgt: str, payload: Any = None, **options: Any) -> JobResult:
        """Send one job and wait for its answer.

        :param src: source language code.
        :param tgt: target language code.
        :param payload: any JSON value.
        :param options: the keywords of :meth:`send`.
        :returns: the node's answer (its own ``ok=False`` answer included).
        :raises ServeError: the typed exception of the server's error for the job.
        """
        request_id = await self.send(src, tgt, payload, **options)
        fut: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = fut
        result = await fut
        if result.exception is not None:
            raise result.exception
        return result

    async def cancel(self, request_id: int | str) -> None:
        """Cancel a job in flight; it is answered with code ``cancelled``.

        :param request_id: the job's ``request_id``.
        :raises ServeUnavailable: the stream is closed.
        """
        self._check_open()
        self._outbox.append(wire.session_cancel(request_id))
        self._wake.set()

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed or self._ws is None:
            raise ServeUnavailable(f"session stream {self.session_id!r} is not open", code="closed")

    async def _writer(self, ws: ClientConnection) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush(ws)

    async def _flush(self, ws: ClientConnection) -> None:
        while self._outbox:
            batch, self._outbox = self._outbox, []
            self._room.set()
            for frame in wire.frames(batch, self.max_message_bytes):
                await ws.send(frame, text=True)

    # ------------------------------------------------------------------ receiving
    async def _reader(self, ws: ClientConnection) -> None:
        pending, waiters, results = self._pending, self._waiters, self._results
        SessionResult, Error = wire.SessionResult, wire.Error
        try:
            while True:
                raw = await ws.recv(decode=False)
                try:
                    messages = wire.decode_session_frame(raw)
                except wire.ProtocolError as exc:
                    self.errors.append(exc)
                    continue
                for msg in messages:
                    if type(msg) is SessionResult:
                        rid = msg.request_id
                        pending.pop(rid, None)
                        result = JobResult(msg.job_id, msg.node_id, msg.ok, msg.payload, msg.error, msg.attempts,
                                           rid)
                    elif type(msg) is Error:
                        if msg.request_id is None:
                            self.errors.append(msg)
                            continue
                        rid = msg.request_id
                        src, tgt = pending.pop(rid, ("", ""))
                        result = JobResult._from_error(msg, src, tgt)
                    else:
                        continue
                    fut = waiters.pop(rid, None)
                    if fut is not None:
                        if not fut.done():
                            fut.set_result(result)
                    else:
                        results.put_nowait(result)
                if not pending:
                    results.put_nowait(_END)  # wakes an iterator waiting with nothing pending
        except ConnectionClosed as exc:
            if not self._closed:
                rcvd = exc.rcvd
                why = f"code {rcvd.code} {rcvd.reason!r}" if rcvd is not None else "no close frame"
                self._error = ServeUnavailable(f"session stream {self.session_id!r} closed by the server ({why})",
                                               code="closed", status=0)
                self._fail_pending(self._error)
        finally:
            self._room.set()
            results.put_nowait(_END)

    def _fail_pending(self, error: ServeError) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(error)
        self._waiters.clear()

    async def recv(self) -> JobResult:
        """Wait for the next answer (in order of completion).

        :raises ServeUnavailable: the stream is closed and nothing is left to read.
        """
        while True:
            if self._results.empty() and (self._error is not None or self._closed):
                raise self._error or ServeUnavailable(f"session stream {self.session_id!r} is closed", code="closed")
            item = await self._results.get()
            if item is not _END:
                return item

    def __aiter__(self) -> SessionStream:
        return self

    async def __anext__(self) -> JobResult:
        while True:
            if self._results.empty():
                if not self._pending or (len(self._pending) == len(self._waiters)):
                    raise StopAsyncIteration
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise StopAsyncIteration
            item = await self._results.get()
            if item is not _END:
                return item
