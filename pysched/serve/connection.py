"""What node connections and session streams share: one outbox, bad-message accounting, close.

Every message a connection sends goes through its :class:`Outbox`: handlers
put messages synchronously (no await on the hot path, order kept), and one
writer task sends them; a peer that asked for batches gets everything queued
since the writer's last turn as one JSON array. The outbox is bounded: a
peer that stops reading until ``max_send_queue`` messages pile up is closed,
so no queue grows without bound. What a connection can have queued is
bounded anyway by its jobs in flight (capacity or the stream's limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from pysched.serve.protocol import CloseCode, Error, ErrorCode, ProtocolError, encode

__all__ = ["Closed", "Connection"]

logger = logging.getLogger("pysched.serve")


class Closed(Exception):
    """The connection is closed (by the peer, or by the server).

    :param code: the WebSocket close code.
    """

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _uncounted(code: str) -> None:
    """Count nothing: the default of :attr:`Connection.on_bad_message`."""


class Connection:
    """One accepted WebSocket: sending, receiving with limits, closing.

    :param websocket: the accepted WebSocket.
    :param batch: whether the peer reads batches (a JSON array of messages in one frame).
    :param max_message_bytes: the largest frame accepted.
    :param max_bad_messages: bad messages after which the connection is closed.
    :param max_send_queue: messages queued unsent after which the peer is deemed stuck and closed.
    """

    #: "node" or "session": names the connection in metrics and logs
    kind = "connection"

    def __init__(self, websocket: WebSocket, *, batch: bool, max_message_bytes: int, max_bad_messages: int,
                 max_send_queue: int) -> None:
        self.websocket = websocket
        self.batch = batch
        self.max_message_bytes = max_message_bytes
        self.max_bad_messages = max_bad_messages
        self.max_send_queue = max_send_queue
        self.bad_messages = 0
        #: called with the code of every refused message that counts (metrics)
        self.on_bad_message: Callable[[str], None] = _uncounted
        self.closed = False
        self.close_code: int | None = None
        self._queue: deque[msgspec.Struct] = deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._send = websocket.send  # the raw ASGI send: one dict a frame

    # ------------------------------------------------------------ sending
    def start(self) -> None:
        """Start the writer task (on the running event loop)."""
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    def put(self, message: msgspec.Struct) -> None:
        """Queue one message for the writer (never blocks).

        :param message: the message; dropped when the connection is closed.
        """
        if self.closed:
            return
        queue = self._queue
        queue.append(message)
        if len(queue) == 1:
            self._wake.set()
        elif len(queue) > self.max_send_queue:
            logger.warning("%s: %d messages queued, peer not reading: closing", self, len(queue))
            self.close(CloseCode.GOING_AWAY)

    async def _write_loop(self) -> None:
        queue, wake, send = self._queue, self._wake, self._send
        try:
            while True:
                await wake.wait()
                wake.clear()
                while queue:
                    if self.batch and len(queue) > 1:
                        batch = list(queue)
                        queue.clear()
                        await send({"type": "websocket.send", "text": encode(batch).decode()})
                    else:
                        await send({"type": "websocket.send", "text": encode(queue.popleft()).decode()})
                if self.closed:
                    break
        except (WebSocketDisconnect, OSError, RuntimeError):
            # the peer went away (or the ASGI server closed the socket); the reader notices too
            self.closed = True
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: report it, and never leave the peer waiting on a dead writer
            logger.exception("%s: writer failed", self)
            self.closed = True
        finally:
            queue.clear()
        if self.close_code is not None:
            with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):  # already gone
                await send({"type": "websocket.close", "code": self.close_code})

    def close(self, code: int) -> None:
        """Close after what is queued has been sent (the writer sends the close frame).

        :param code: the WebSocket close code (a :class:`~pysched.serve.protocol.CloseCode`).
        """
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self._wake.set()

    async def finish(self) -> None:
        """Wait for the writer to finish (after :meth:`close` or a disconnect)."""
        self.closed = True
        self._wake.set()
        if self._writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), timeout=5.0)
            except asyncio.TimeoutError:
                self._writer.cancel()

    # ------------------------------------------------------------ receiving
    async def receive(self) -> str | bytes:
        """Wait for the next frame.

        An oversized frame is answered with an ``error`` (``too_big``) and
        counted as a bad message; the caller never sees it.

        :returns: the frame's data.
        :raises Closed: the connection ended.
        """
        receive = self.websocket.receive
        limit = self.max_message_bytes
        while True:
            if self.closed and self.close_code is not None:
                raise Closed(self.close_code)
            message = await receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                self.closed = True
                raise Closed(message.get("code", CloseCode.NORMAL))
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
                size = len(data)
            else:
                size = len(data)
                if size * 4 > limit and size <= limit:
                    size = len(data.encode())  # only worth measuring exactly near the limit
            if size > limit:
                self.refuse(ProtocolError(ErrorCode.TOO_BIG,
                                          f"message of {size} bytes is over the limit of {limit} bytes"),
                            oversized=True)
                continue
            return data

    def refuse(self, error: ProtocolError, *, oversized: bool = False, request_id: int | str | None = None,
               count: bool = True) -> None:
        """Answer a bad message with an ``error``; close after too many of them.

        :param error: what is wrong with the message.
        :param oversized: the message was too big (the close code says so).
        :param request_id: the session stream's request the message was, if known.
        :param count: False: answer without counting it as a bad message.
        """
        status = 413 if error.code == ErrorCode.TOO_BIG else 422 if error.code == ErrorCode.INVALID else 400
        self.put(Error(code=error.code, message=error.message, field=error.field, request_id=request_id,
                       status=status if self.kind == "session" else None))
        if not count:
            return
        self.bad_messages += 1
        self.on_bad_message(error.code)
        if self.bad_messages >= self.max_bad_messages:
            self.close(CloseCode.MESSAGE_TOO_BIG if oversized else CloseCode.BAD_MESSAGES)
