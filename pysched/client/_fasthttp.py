"""A lean HTTP/1.1 keep-alive client for ``pysched load --mode jobs`` only.

Why not httpx here: measured on this 2-core machine, one ``httpx.AsyncClient``
request costs the caller 1.1-1.8 ms of CPU (its connection pool and anyio
layers), so a generator built on it saturates its own core at a few hundred
requests per second and measures itself, not the server. The SDK's
:class:`~pysched.client.JobClient` stays on httpx (correctness and features
first); the load generator, whose only job is to offer load, sends the same
bodies over plain asyncio connections and lets httptools (uvicorn's C
parser, part of the ``serve`` extra) read the answers.

Only what the generator needs: POST with a JSON body, ``Content-Length``
responses, keep-alive, a bounded pool. Anything else (a closed or broken
connection) raises ``ConnectionError``.
"""

from __future__ import annotations

import asyncio
from typing import cast
from urllib.parse import urlsplit

import httptools

__all__ = ["FastHTTP"]


#: ``(status, headers (lower-case bytes names), body)`` of one response
Response = tuple[int, dict[bytes, bytes], bytes]


class _Connection(asyncio.Protocol):
    __slots__ = ("transport", "parser", "waiter", "status", "headers", "body", "keep_alive", "closed")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.keep_alive = True
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a TCP connection's: a stream transport (uvloop's do not subclass asyncio.Transport: no isinstance)
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._fail(ConnectionError(f"connection closed: {exc}" if exc else "connection closed by the server"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.status, self.headers, b"".join(self.body)))
        self.headers, self.body = {}, []

    def _fail(self, exc: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def send(self, data: bytes) -> asyncio.Future[Response]:
        transport = self.transport
        assert transport is not None  # sent only on a connection made by create_connection
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.waiter = fut
        transport.write(data)
        return fut

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class FastHTTP:
    """POST JSON to one server over a bounded pool of keep-alive connections.

    :param url: the server's ``http://`` base URL.
    :param headers: sent with every request (``Authorization``).
    :param max_connections: connections open at most.
    :raises ValueError: ``url`` is not a plain ``http://`` URL.
    """

    def __init__(self, url: str, headers: dict[str, str], max_connections: int) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"the fast HTTP client speaks plain http:// only, got {url!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._head = f"Host: {parts.netloc}\r\nContent-Type: application/json\r\n{extra}".encode("latin-1")
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._all: set[_Connection] = set()

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
            self._all.discard(conn)
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        self._all.add(conn)
        return conn

    async def post(self, path: str, body: bytes) -> Response:
        """POST a JSON body.

        :param path: the endpoint, below the URL's path.
        :param body: the JSON body.
        :returns: ``(status, headers (lower-case bytes names), body)``.
        :raises ConnectionError: the connection broke or the answer was not HTTP.
        """
        request = b"".join((b"POST ", (self.prefix + path).encode("ascii"), b" HTTP/1.1\r\n", self._head,
                            b"Content-Length: ", str(len(body)).encode("ascii"), b"\r\n\r\n", body))
        async with self._slots:
            conn = await self._connection()
            try:
                answer = await conn.send(request)
            except BaseException:
                conn.close()
                self._all.discard(conn)
                raise
            if conn.keep_alive and not conn.closed:
                self._idle.append(conn)
            else:
                conn.close()
                self._all.discard(conn)
            return answer

    async def aclose(self) -> None:
        """Close every connection."""
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()
