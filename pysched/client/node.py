"""The worker-node side of the SDK: :class:`NodeClient`.

A node connects out to the server's ``/v1/nodes`` WebSocket with its node
token, registers, sends heartbeats in the background and receives jobs::

    async with NodeClient("ws://127.0.0.1:8000", "gpu-7", token=NODE_TOKEN,
                          languages=["zh", "en"], max_concurrency=4) as node:
        async for job in node.jobs():
            await job.accept()                 # optional: the server commits the job
            text = await translate(job.src, job.tgt, job.payload)
            await job.reply({"text": text})    # or: await job.fail("model crashed")

One connection, one reader task, one writer task and one heartbeat task per
node; any number of nodes share one event loop (``pysched nodes`` runs
hundreds). A dropped connection is retried with exponential backoff and full
jitter, and the node registers again on every new connection; the server
fails over the jobs that were in flight on the old one, so those are marked
cancelled (reason ``"disconnected"``) and their late replies are dropped.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from pysched.client import _wire as wire
from pysched.client._url import bearer, ws_url
from pysched.client.errors import (
    AuthError,
    BadRequest,
    ServeError,
    ServeUnavailable,
    error_from_body,
)

__all__ = ["Job", "LoadSource", "NodeClient"]

log = logging.getLogger("pysched.client.node")

#: Figures a heartbeat may carry besides ``running`` (which the client counts itself).
HEARTBEAT_FIELDS = ("cpu", "gpu", "mem", "healthy", "services", "languages", "max_concurrency")

#: A node's load: a mapping of :data:`HEARTBEAT_FIELDS` sent with every
#: heartbeat, or a callable returning one (called once per heartbeat; it may be
#: a coroutine function), or ``None`` for heartbeats with ``running`` only.
LoadSource = Mapping[str, Any] | Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]] | None

class _End(enum.Enum):
    END = enum.auto()  # ends jobs() iterators (one member: a sentinel mypy can tell from a Job)


_END = _End.END


class Job:
    """One job delivered to a node.

    Answer it once with :meth:`reply` or :meth:`fail`. A job the server
    cancels (``cancel`` message), or that belonged to a connection that has
    since dropped, has ``cancelled`` set and ``cancel_reason`` saying why;
    answering it then sends nothing and returns ``False``.

    :ivar job_id: the job's id, given by the server.
    :ivar session_id: the session the job belongs to.
    :ivar src: source language code.
    :ivar tgt: target language code.
    :ivar payload: any JSON value, opaque to the server.
    :ivar deadline: unix seconds by which the server wants the answer.
    :ivar attempt: 1 for the first delivery, more after a failover.
    """

    __slots__ = (
        "_cancel_waiters",
        "_epoch",
        "_node",
        "accepted",
        "attempt",
        "cancel_reason",
        "cancelled",
        "deadline",
        "done",
        "job_id",
        "payload",
        "received_at",
        "session_id",
        "src",
        "tgt",
    )

    def __init__(self, node: NodeClient, epoch: int, msg: wire.JobMsg) -> None:
        self.job_id: str = msg.job_id
        self.session_id: str = msg.session_id
        self.src: str = msg.src
        self.tgt: str = msg.tgt
        self.payload: Any = msg.payload
        self.deadline: float | None = msg.deadline
        self.attempt: int = msg.attempt
        #: ``time.monotonic()`` when the job arrived
        self.received_at = time.monotonic()
        self.accepted = False
        self.done = False
        self.cancelled = False
        self.cancel_reason: str | None = None
        self._node = node
        self._epoch = epoch
        self._cancel_waiters: list[asyncio.Future[str]] | None = None

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "done" if self.done else "accepted" if self.accepted else "new"
        return (f"Job(job_id={self.job_id!r}, session_id={self.session_id!r}, src={self.src!r}, "
                f"tgt={self.tgt!r}, attempt={self.attempt}, {state})")

    @property
    def remaining(self) -> float | None:
        """Seconds left before the job's deadline (negative once passed), or ``None`` without one."""
        return None if self.deadline is None else self.deadline - time.time()

    @property
    def live(self) -> bool:
        """True while an answer would still be sent (not answered, not cancelled)."""
        return not (self.done or self.cancelled)

    async def accept(self) -> bool:
        """Tell the server the node has taken the job (it commits the reservation).

        Optional; sent once.

        :returns: False when the job is no longer live (nothing sent).
        """
        return self.accept_nowait()

    def accept_nowait(self) -> bool:
        """Do :meth:`accept` from synchronous callbacks (queued for the writer task).

        :returns: False when the job is no longer live (nothing sent).
        """
        if self.accepted or not self.live:
            return False
        self.accepted = True
        return self._node._send_for(self, wire.accept(self.job_id))

    async def reply(self, payload: Any = None) -> bool:
        """Send the job's result.

        :param payload: the answer, any JSON value.
        :returns: False (and nothing sent) when the job was already answered or cancelled.
        :raises TypeError: ``payload`` is not JSON-encodable (the job stays live).
        :raises ValueError: the result is over the server's message size limit (the job stays live).
        """
        return self.reply_nowait(payload)

    def reply_nowait(self, payload: Any = None) -> bool:
        """Do :meth:`reply` from synchronous callbacks (queued for the writer task).

        A payload that cannot be sent leaves the job live: answer it with :meth:`fail` then.

        :param payload: the answer, any JSON value.
        :returns: False (and nothing sent) when the job was already answered or cancelled.
        :raises TypeError: ``payload`` is not JSON-encodable.
        :raises ValueError: the result is over the server's message size limit.
        """
        if not self.live:
            return False
        data = self._node._checked(wire.result(self.job_id, True, payload, None))
        self._finish("replies")
        return self._node._send_for(self, data)

    async def fail(self, error: str, *, retry: bool = False) -> bool:
        """Report that the node could not do the job.

        :param error: why, a non-empty string.
        :param retry: ask the server to try another node; otherwise the failure is the job's answer.
        :returns: False (and nothing sent) when the job is not live.
        :raises ValueError: ``error`` is not a non-empty string.
        """
        return self.fail_nowait(error, retry=retry)

    def fail_nowait(self, error: str, *, retry: bool = False) -> bool:
        """Do :meth:`fail` from synchronous callbacks (queued for the writer task).

        :param error: why, a non-empty string.
        :param retry: ask the server to try another node.
        :returns: False (and nothing sent) when the job is not live.
        :raises ValueError: ``error`` is not a non-empty string.
        """
        if not isinstance(error, str) or not error:
            raise ValueError(f"error must be a non-empty string, got {error!r}")
        if not self.live:
            return False
        data = self._node._checked(wire.result(self.job_id, False, None, error, bool(retry)))
        self._finish("failures")
        return self._node._send_for(self, data)

    async def wait_cancelled(self) -> str:
        """Wait until the job is cancelled.

        Use it with ``asyncio.wait_for``, or as a task racing the work.

        :returns: the reason.
        """
        if self.cancelled:
            return self.cancel_reason or "cancelled"
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self._cancel_waiters is None:
            self._cancel_waiters = []
        self._cancel_waiters.append(fut)
        return await fut

    def _finish(self, counter: str) -> None:
        self.done = True
        self._node._job_finished(self, counter)

    def _cancel(self, reason: str) -> None:
        if self.cancelled or self.done:
            return
        self.cancelled = True
        self.cancel_reason = reason
        if self._cancel_waiters:
            for fut in self._cancel_waiters:
                if not fut.done():
                    fut.set_result(reason)
            self._cancel_waiters = None


def _check_load(load: object) -> LoadSource:
    if load is None or callable(load):
        return load
    if isinstance(load, Mapping):
        unknown = set(load) - set(HEARTBEAT_FIELDS)
        if unknown:
            raise ValueError(f"load has unknown heartbeat fields {sorted(unknown)!r}; "
                             f"allowed: {', '.join(HEARTBEAT_FIELDS)}")
        return dict(load)
    raise TypeError(f"load must be a mapping, a callable or None, got {type(load).__name__}")


class NodeClient:
    """A worker node connected to a ``pysched serve`` server (asyncio).

    The registration arguments (``node_id`` to ``accept_public_jobs``) are
    those of :meth:`pysched.Scheduler.register_node`, sent in the
    ``register`` message on every (re)connection. Heartbeats carry
    ``running`` (jobs delivered and not yet answered or cancelled, counted
    here) and the figures of ``load``. Jobs arrive through :meth:`jobs` (an
    async iterator) or, with ``on_job``, are handed to that callback as they
    arrive.

    Reconnection: a failed or dropped connection is retried after
    ``min(backoff_max, backoff_initial * 2**n)`` seconds times a random
    factor in [0.5, 1) (``n`` counts failures since the last registration).
    A refused token (HTTP 401/403 or the unauthorized close code), a
    registration the server rejects, or a close for speaking for another
    node id are not retried: :meth:`connect` and :meth:`jobs` raise the
    :class:`~pysched.client.errors.ServeError`.

    :param url: the server's base URL (``ws://host:port``; ``http://`` works too) or the full ``/v1/nodes`` URL.
    :param node_id: the node's id.
    :param languages: language codes the node serves.
    :param token: the node token.
    :param services: services the node offers (default: the server's).
    :param max_concurrency: jobs the node runs at once.
    :param has_gpu: whether the node has a GPU.
    :param accept_public_jobs: whether the node takes jobs without a tenant.
    :param load: the heartbeat figures: a mapping or a callable, see :data:`LoadSource`.
    :param heartbeat_interval: seconds between heartbeats (default: the interval the server asks for).
    :param on_job: called with each job as it arrives (a plain function, or a coroutine function run as a task).
    :param on_cancel: called with a job the server cancels.
    :param auto_accept: accept every job on arrival.
    :param reconnect: retry failed and dropped connections.
    :param backoff_initial: seconds before the first retry (before the random factor).
    :param backoff_max: the longest wait between retries.
    :param open_timeout: seconds the connection and registration may take.
    :param max_size: the largest frame accepted from the server, bytes (None: no limit).
    :param compression: the WebSocket compression (``"deflate"`` or None).
    :raises ValueError: a bad argument, named.
    :raises TypeError: ``languages`` or ``services`` is not an iterable of strings.
    """

    def __init__(
        self,
        url: str,
        node_id: str,
        *,
        languages: Iterable[str],
        token: str | None = None,
        services: Iterable[str] | None = None,
        max_concurrency: int = 4,
        has_gpu: bool = True,
        accept_public_jobs: bool = True,
        load: LoadSource = None,
        heartbeat_interval: float | None = None,
        on_job: Callable[[Job], Any] | None = None,
        on_cancel: Callable[[Job], Any] | None = None,
        auto_accept: bool = False,
        reconnect: bool = True,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        open_timeout: float = 10.0,
        max_size: int | None = 4 * 1024 * 1024,
        compression: str | None = None,
    ) -> None:
        if not isinstance(node_id, str) or not node_id:
            raise ValueError(f"node_id must be a non-empty string, got {node_id!r}")
        if isinstance(languages, str) or not isinstance(languages, Iterable):
            raise TypeError(f"languages must be an iterable of language codes, got {languages!r}")
        languages = list(languages)
        if not languages:
            raise ValueError("languages must name at least one language, got []")
        if services is not None:
            if isinstance(services, str) or not isinstance(services, Iterable):
                raise TypeError(f"services must be an iterable of service names, got {services!r}")
            services = list(services)
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
        for name, value in (("heartbeat_interval", heartbeat_interval), ("backoff_initial", backoff_initial),
                            ("backoff_max", backoff_max), ("open_timeout", open_timeout)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < float("inf")):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.url = ws_url(url, "/v1/nodes")
        self.node_id = node_id
        self._headers = bearer(token)
        # sent on every connection (and by resume())
        self._register = wire.encode(wire.register_struct(
            node_id, languages, services=services, max_concurrency=max_concurrency, has_gpu=bool(has_gpu),
            accept_public_jobs=bool(accept_public_jobs)))
        self.languages = languages
        self.services = services
        self.max_concurrency = max_concurrency
        self._load = _check_load(load)
        self._interval_override = heartbeat_interval
        #: heartbeat interval in use (the server's, unless overridden)
        self.heartbeat_interval: float | None = heartbeat_interval
        self._on_job = on_job
        self._on_job_async = on_job is not None and inspect.iscoroutinefunction(on_job)
        self._on_cancel = on_cancel
        self.auto_accept = auto_accept
        self.reconnect = reconnect
        self.backoff_initial = float(backoff_initial)
        self.backoff_max = float(backoff_max)
        self.open_timeout = float(open_timeout)
        self._max_size = max_size
        self._compression = compression

        self._ws: ClientConnection | None = None
        self._epoch = 0
        self._in_flight: dict[str, Job] = {}
        self._queue: asyncio.Queue[Job | _End] = asyncio.Queue()
        self._outbox: list[bytes] = []
        self._queued_beats = 0  # heartbeats in the outbox
        #: the server's message size limit (from ``registered``)
        self.max_message_bytes: int = wire.P.DEFAULT_MAX_MESSAGE_BYTES
        # Events bind to a loop on first use (Python >= 3.10), so they can be made here.
        self._outbox_wake = asyncio.Event()  # something to write
        self._registered = asyncio.Event()  # registered on the current connection
        self._run_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # on_job / on_cancel coroutines
        self._closing = False
        self._draining = False
        self._fatal: BaseException | None = None
        self._failures = 0
        #: the most recent ``error`` frames from the server (code, message, field)
        self.errors: collections.deque[wire.Error] = collections.deque(maxlen=50)
        #: counters: connects, disconnects, jobs, replies, failures, cancels, lost (on a dropped
        #: connection), heartbeats (written to the connection), errors (error frames received)
        self.counters: dict[str, int] = dict.fromkeys(
            ("connects", "disconnects", "jobs", "replies", "failures", "cancels", "lost", "heartbeats", "errors"), 0)

    # ------------------------------------------------------------------ state
    def __repr__(self) -> str:
        return f"NodeClient({self.node_id!r}, url={self.url!r}, connected={self.connected}, running={self.running})"

    @property
    def running(self) -> int:
        """Jobs delivered on the current connection and not yet answered or cancelled."""
        return len(self._in_flight)

    @property
    def connected(self) -> bool:
        """True while registered on an open connection."""
        return self._ws is not None and self._registered.is_set()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or a fatal error stopped the client."""
        return self._closing or self._fatal is not None

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> NodeClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float | None = None) -> None:
        """Connect and register; return once the server confirmed the registration.

        Failed connection attempts are retried with backoff (when
        ``reconnect`` is on); refused tokens and rejected registrations raise
        at once.

        :param timeout: seconds to wait (None: as long as it takes).
        :raises ServeUnavailable: not registered within ``timeout``, or the connection failed for good.
        :raises ServeError: the error that stopped the client (refused token, rejected registration).
        :raises RuntimeError: the client is closed.
        """
        if self._closing:
            raise RuntimeError(f"NodeClient {self.node_id!r} is closed")
        if self._fatal is not None:
            raise self._fatal
        if self._run_task is None:
            self._run_task = asyncio.get_running_loop().create_task(self._run(), name=f"pysched-node-{self.node_id}")
        waiter = asyncio.ensure_future(self._registered.wait())
        try:
            await asyncio.wait({waiter, self._run_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self._fatal is not None:
            raise self._fatal
        if not self.connected:
            if self._run_task.done():
                raise ServeUnavailable(f"node {self.node_id!r} could not connect to {self.url}",
                                       code="unavailable")
            raise ServeUnavailable(f"node {self.node_id!r} not registered at {self.url} within {timeout} s",
                                   code="timeout")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection cleanly and stop reconnecting; :meth:`jobs` iterators end.

        Jobs still in flight are not answered; the server fails them over.

        :param code: the WebSocket close code.
        :param reason: the close reason.
        """
        if self._closing:
            if self._run_task is not None:
                await asyncio.gather(self._run_task, return_exceptions=True)
            return
        self._closing = True
        ws = self._ws
        if ws is not None:
            try:
                await self._flush(ws)  # answers already given go out before the close frame
                await ws.close(code, reason)
            except Exception:  # noqa: BLE001 - closing a broken connection: nothing left to save
                pass
        if self._run_task is not None:
            self._run_task.cancel()
            await asyncio.gather(self._run_task, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._end_iterators()

    async def drain(self) -> None:
        """Ask the server to send no new jobs to this node (the ``drain`` message).

        Jobs in flight may still be answered. Close afterwards.
        """
        self._draining = True
        self._enqueue(wire.DRAIN)

    async def resume(self) -> None:
        """Take jobs again after :meth:`drain`.

        Sends ``register`` again on the same connection (the server makes the node ready).
        """
        self._draining = False
        self._enqueue(self._register)

    async def heartbeat(self, **fields: Any) -> None:
        """Send one heartbeat now, with ``running`` and the figures of ``load``.

        :param fields: :data:`HEARTBEAT_FIELDS` to send instead of ``load``'s, e.g. ``healthy=False``.
        :raises ValueError: a field is not one of :data:`HEARTBEAT_FIELDS`.
        :raises ServeUnavailable: the node is not connected.
        """
        unknown = set(fields) - set(HEARTBEAT_FIELDS)
        if unknown:
            raise ValueError(f"unknown heartbeat fields {sorted(unknown)!r}; allowed: {', '.join(HEARTBEAT_FIELDS)}")
        figures = dict(await self._figures())
        figures.update(fields)
        self._enqueue(wire.heartbeat(self.running, figures))
        self._queued_beats += 1

    async def jobs(self) -> AsyncIterator[Job]:
        """Yield the jobs sent to this node, as they arrive, across reconnections.

        Ends when the client is closed. Not available with ``on_job``.

        :raises ServeError: the error that stopped the client (refused token, rejected registration).
        :raises RuntimeError: ``on_job`` is set.
        """
        if self._on_job is not None:
            raise RuntimeError("jobs() is not available when on_job is set: jobs go to the callback")
        while True:
            item = await self._queue.get()
            if item is _END:
                self._queue.put_nowait(_END)  # every other iterator ends too
                if self._fatal is not None:
                    raise self._fatal
                return
            if item.live:
                yield item

    # ------------------------------------------------------------------ sending
    def _checked(self, data: bytes) -> bytes:
        if len(data) > self.max_message_bytes:
            raise ValueError(f"payload: the message is {len(data)} bytes, over the server's limit of "
                             f"{self.max_message_bytes} bytes")
        return data

    def _enqueue(self, message: bytes) -> None:
        if self._ws is None:
            raise ServeUnavailable(f"node {self.node_id!r} is not connected", code="not_connected")
        self._outbox.append(message)
        self._outbox_wake.set()

    def _send_for(self, job: Job, message: bytes) -> bool:
        """Queue ``message`` for the writer task if ``job`` belongs to the current connection."""
        if job._epoch != self._epoch or self._ws is None:
            return False
        self._outbox.append(message)
        self._outbox_wake.set()
        return True

    async def _writer(self, ws: ClientConnection) -> None:
        wake = self._outbox_wake
        while True:
            await wake.wait()
            wake.clear()
            await self._flush(ws)

    async def _flush(self, ws: ClientConnection) -> None:
        # Everything queued since the last write goes out as one frame (a
        # batch when there are several messages): one system call for a
        # burst of results instead of one each.
        while self._outbox:
            batch, self._outbox = self._outbox, []
            beats, self._queued_beats = self._queued_beats, 0
            for frame in wire.frames(batch, self.max_message_bytes):
                await ws.send(frame, text=True)
            # counted once written: a beat still queued when the connection drops was never sent
            self.counters["heartbeats"] += beats

    async def _figures(self) -> Mapping[str, Any]:
        load = self._load
        if load is None:
            return {}
        if callable(load):
            figures = load()
            if inspect.isawaitable(figures):
                figures = await figures
            return figures or {}
        return load

    async def _heartbeats(self, ws: ClientConnection, interval: float) -> None:
        # A random first delay spreads the heartbeats of many nodes that
        # connected together over the whole interval.
        await asyncio.sleep(random.uniform(0.0, interval))
        next_at = time.monotonic()
        while True:
            try:
                beat = wire.heartbeat(self.running, await self._figures())
            except Exception:  # a user callback failed: skip this beat, keep the node alive
                log.exception("node %s: load callback failed or gave bad figures; beat skipped", self.node_id)
            else:
                if self._closing:
                    return
                self._outbox.append(beat)
                self._queued_beats += 1
                self._outbox_wake.set()
            next_at += interval
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (a stalled loop): skip beats rather than burst
                next_at = time.monotonic()
                delay = 0.0
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------ jobs
    def _job_finished(self, job: Job, counter: str) -> None:
        if self._in_flight.pop(job.job_id, None) is not None:
            self.counters[counter] += 1

    def _deliver(self, job: Job) -> None:
        if self.auto_accept:
            job.accept_nowait()
        if self._on_job is None:
            self._queue.put_nowait(job)
        elif self._on_job_async:
            task = asyncio.get_running_loop().create_task(self._on_job(job))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        else:
            try:
                self._on_job(job)
            except Exception:
                log.exception("node %s: on_job failed for job %s", self.node_id, job.job_id)
                if job.live:
                    job.fail_nowait("on_job callback raised")

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("node %s: on_job task failed", self.node_id, exc_info=task.exception())

    def _lose_jobs(self, reason: str) -> None:
        jobs, self._in_flight = self._in_flight, {}
        self._outbox.clear()
        self._queued_beats = 0
        for job in jobs.values():
            job._cancel(reason)
            self.counters["lost"] += 1
            self._notify_cancel(job)

    def _notify_cancel(self, job: Job) -> None:
        if self._on_cancel is None:
            return
        try:
            result = self._on_cancel(job)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._task_done)
        except Exception:
            log.exception("node %s: on_cancel failed for job %s", self.node_id, job.job_id)

    def _end_iterators(self) -> None:
        self._queue.put_nowait(_END)

    # ------------------------------------------------------------------ connection loop
    def _backoff(self) -> float:
        base = min(self.backoff_max, self.backoff_initial * (2.0 ** min(self._failures, 30)))
        return base * random.uniform(0.5, 1.0)

    async def _run(self) -> None:
        try:
            while not self._closing:
                try:
                    await self._session()
                except _Fatal as exc:
                    self._fatal = exc.error
                    log.error("node %s: %s; not reconnecting", self.node_id, exc.error)
                    return
                except (OSError, ConnectionClosed, InvalidStatus, asyncio.TimeoutError, ServeUnavailable,
                        websockets.exceptions.InvalidHandshake, websockets.exceptions.InvalidMessage) as exc:
                    if self._closing:
                        return  # type: ignore[unreachable]  # close() sets it while _session() is awaited
                    self._failures += 1
                    if not self.reconnect:
                        self._fatal = ServeUnavailable(f"node {self.node_id!r}: connection to {self.url} failed: "
                                                       f"{exc}", code="unavailable")
                        return
                    delay = self._backoff()
                    log.info("node %s: connection failed or lost (%s); retrying in %.2f s", self.node_id, exc, delay)
                    await asyncio.sleep(delay)
        finally:
            self._ws = None
            self._lose_jobs("closed" if self._closing else "disconnected")
            if self._closing or self._fatal is not None:
                self._end_iterators()

    async def _session(self) -> None:
        """One connection: connect, register, then read until it drops."""
        try:
            ws = await connect(self.url, additional_headers=self._headers, open_timeout=self.open_timeout,
                               max_size=self._max_size, compression=self._compression, proxy=None,
                               ping_interval=20, ping_timeout=20, close_timeout=5)
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = wire.decode_error_body(exc.response.body)
            if status in (401, 403):
                raise _Fatal(error_from_body(status, body)) from None
            if (HTTPStatus.BAD_REQUEST <= status < HTTPStatus.INTERNAL_SERVER_ERROR
                    and status not in (HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS)):
                raise _Fatal(error_from_body(status, body)) from None
            raise
        except InvalidURI as exc:
            raise _Fatal(BadRequest(str(exc), code="bad_url", field="url")) from None
        self._epoch += 1
        epoch = self._epoch
        tasks: list[asyncio.Task[None]] = []
        try:
            await ws.send(self._register, text=True)
            try:
                frame = wire.decode_node_frame(await asyncio.wait_for(ws.recv(decode=False), self.open_timeout))
                first = frame[0]
            except (wire.ProtocolError, IndexError) as exc:
                raise _Fatal(ServeError(f"unreadable answer to 'register': {exc}", code="protocol")) from None
            if isinstance(first, wire.Error):
                raise _Fatal(error_from_body(400, wire.error_fields(first)))
            if not isinstance(first, wire.Registered):
                raise _Fatal(ServeError(f"expected a 'registered' message, got {first!r}", code="protocol"))
            interval = self._interval_override or first.heartbeat_interval or 5.0
            self.heartbeat_interval = interval
            self.max_message_bytes = first.max_message_bytes
            self._ws = ws
            self._failures = 0
            self.counters["connects"] += 1
            self._registered.set()
            loop = asyncio.get_running_loop()
            tasks.append(loop.create_task(self._writer(ws)))
            tasks.append(loop.create_task(self._heartbeats(ws, interval)))
            if self._draining:
                self._enqueue(wire.DRAIN)
            self._handle(frame[1:], epoch)  # a batch may carry jobs right behind 'registered'
            await self._read(ws, epoch, tasks)
        except ConnectionClosed as exc:
            fatal = _fatal_close(exc, self.node_id)
            if fatal is not None:
                raise _Fatal(fatal) from None
            raise
        finally:
            self._registered.clear()
            self._ws = None
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if not self._closing:
                self.counters["disconnects"] += 1
                self._lose_jobs("disconnected")
            if ws.state is not websockets.protocol.State.CLOSED:
                await ws.close()

    async def _read(self, ws: ClientConnection, epoch: int, tasks: list[asyncio.Task[None]]) -> None:
        decode = wire.decode_node_frame
        handle = self._handle
        counters = self.counters
        while True:
            raw = await ws.recv(decode=False)
            try:
                messages = decode(raw)
            except wire.ProtocolError as exc:
                counters["errors"] += 1
                log.warning("node %s: unreadable message from the server (%s): %.200r", self.node_id, exc, raw)
                continue
            handle(messages, epoch)
            for task in tasks:
                if task.done():
                    task.result()  # a writer or heartbeat failure (connection closed) surfaces here

    def _handle(self, messages: Sequence[wire.P.ServerNodeMessage], epoch: int) -> None:
        in_flight = self._in_flight
        counters = self.counters
        JobMsg, Cancel, Error = wire.JobMsg, wire.Cancel, wire.Error
        for msg in messages:
            if type(msg) is JobMsg:
                job = Job(self, epoch, msg)
                in_flight[job.job_id] = job
                counters["jobs"] += 1
                self._deliver(job)
            elif type(msg) is Cancel:
                cancelled = in_flight.pop(msg.job_id, None)
                if cancelled is not None:
                    counters["cancels"] += 1
                    cancelled._cancel(msg.reason or "cancelled")
                    self._notify_cancel(cancelled)
            elif type(msg) is Error:
                counters["errors"] += 1
                self.errors.append(msg)
                log.warning("node %s: server error %s: %s", self.node_id, msg.code, msg.message)
            # a repeated 'registered' is ignored


class _Fatal(Exception):
    """Raised inside the connection loop for errors that reconnecting cannot fix."""

    def __init__(self, error: ServeError) -> None:
        super().__init__(str(error))
        self.error = error


def _fatal_close(exc: ConnectionClosed, node_id: str) -> ServeError | None:
    """The error for a close code that reconnecting would not fix, else None."""
    rcvd = exc.rcvd
    if rcvd is None:
        return None
    kind = wire.FATAL_CLOSE_CODES.get(rcvd.code)
    if kind is None:
        return None
    message = f"node {node_id!r}: server closed the connection with code {rcvd.code} ({rcvd.reason or kind})"
    if kind in ("unauthorized", "forbidden"):
        return AuthError(message, status=401, code=kind)
    return ServeError(message, code=kind)
