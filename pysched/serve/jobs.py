"""Delivery: dispatch a job, send it to the node, commit on accept, release on result, fail over.

One :class:`JobState` per job this server delivers, from submission to its
one answer. The life of an attempt::

    dispatch (reserves capacity) -> "job" to the node's link -> "accept" (commit)
        -> "result" (release) -> answer the client

An attempt fails when the node's link drops, the node answers ``ok: false,
retry: true``, the deadline passes, or the scheduler reports the job's
reservation expired; the capacity is released and, when the guarantee
allows, the job is dispatched again excluding every node that failed it,
up to ``max_attempts``. ``at_least_once`` redelivers any failed attempt;
``at_most_once`` only one the node never accepted (and never after a missed
deadline). Every submitted job gets exactly one answer through its
``reply`` callback.

Everything here runs on the event loop's thread. Scheduler calls are
microseconds with the in-process backend and run inline; with a Redis
backend they are network round trips, so they run on a small thread pool
(``blocking=True``) and the loop never waits on Redis. Calls on the pool
may then run in any order: a late commit or renew names its attempt's node,
so it cannot touch the hold of a later attempt; and a failed attempt's hold
is released on the same thread right before the job is dispatched again
(when that release cannot reach Redis, the job is answered
``backend_unavailable`` rather than dispatched while the old hold may remain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pysched.errors import (
    ReservationBackendUnavailable,
    SchedulerError,
    UnknownJob,
)
from pysched.scheduler import Assignment, Scheduler
from pysched.serve.config import ServeConfig
from pysched.serve.errors import ServeError, from_exception
from pysched.serve.metrics import Metrics
from pysched.serve.nodes import Link, NodeRegistry
from pysched.serve.protocol import Cancel, ErrorCode, Job, Result

if TYPE_CHECKING:  # pragma: no cover
    from pysched.serve.streams import SessionStream

__all__ = ["Delivery", "JobState"]

logger = logging.getLogger("pysched.serve")

_DISPATCH_FIELDS = frozenset({"session_id", "src", "tgt", "tenant", "services", "prefer", "exclude", "job_id",
                              "require_gpu"})
#: dispatches that may land on nodes registered but not connected here, per attempt, before giving up
_MAX_HOPS = 8
#: a waiting request re-checks capacity at least this often, seconds
_WAIT_POLL = 0.05
#: releases that failed on an unreachable backend are retried this many times, this far apart
_RELEASE_RETRIES = 20
_RELEASE_RETRY_DELAY = 0.5
#: node ids an error message names before it abbreviates the list with "..."
_NAMES_SHOWN = 5

#: ``reply(job, result, error)``: how a job's one answer reaches its requester
Reply = Callable[["JobState", Result | None, ServeError | None], None]


def _not_connected(err: ServeError, skipped: list[str]) -> None:
    """Report nodes excluded because they are not connected here as ``not_connected``, not ``excluded``."""
    breakdown = dict(err.breakdown or {})
    moved = min(len(set(skipped)), breakdown.get("excluded", 0))
    if moved:
        breakdown["excluded"] -= moved
        if not breakdown["excluded"]:
            del breakdown["excluded"]
        breakdown["not_connected"] = breakdown.get("not_connected", 0) + moved
        err.breakdown = breakdown
        if err.best_reason in ("excluded", None) or breakdown.get(err.best_reason, 0) < moved:
            err.best_reason = max(breakdown, key=breakdown.__getitem__)
    names = ", ".join(dict.fromkeys(skipped[:_NAMES_SHOWN]))
    more = " ..." if len(skipped) > _NAMES_SHOWN else ""
    err.message += f" (chosen but not connected to this server: {names}{more})"


class JobState:
    """One job in delivery, from submission to its one answer.

    ``reply(job, result, error)`` is called exactly once, with one of
    ``result`` and ``error`` set.

    :param session_id: the job's session.
    :param src: source language code.
    :param tgt: target language code.
    :param payload: the job's payload (any JSON value), sent to the node as is.
    :param tenant: the job's tenant, or None for a public job.
    :param services: services the node must offer, or None for the scheduler's default.
    :param prefer: a node id, or node ids in order of preference.
    :param timeout: seconds a node has for one attempt.
    :param require_gpu: whether only GPU nodes may take the job.
    :param reply: called with the job's answer.
    :param request_id: the session stream's ``request_id`` (None over HTTP).
    :param stream: the session stream the job came on (None over HTTP).
    """

    __slots__ = (
        "accepted",
        "attempts",
        "done",
        "failed",
        "job_id",
        "link",
        "node_id",
        "payload",
        "prefer",
        "received",
        "reply",
        "request_id",
        "require_gpu",
        "services",
        "session_id",
        "skipped",
        "src",
        "stream",
        "tenant",
        "tgt",
        "timeout",
        "timer",
        "to_release",
        "wait_until",
    )

    def __init__(self, session_id: str, src: str, tgt: str, payload: Any, *, tenant: str | None = None,
                 services: tuple[str, ...] | None = None, prefer: str | list[str] | None = None,
                 timeout: float, require_gpu: bool = True, reply: Reply,
                 request_id: int | str | None = None, stream: SessionStream | None = None) -> None:
        self.job_id: str | None = None
        self.session_id = session_id
        self.src = src
        self.tgt = tgt
        self.payload = payload
        self.tenant = tenant
        self.services = services
        self.prefer = prefer
        self.timeout = timeout
        self.require_gpu = require_gpu
        self.reply = reply
        self.received = time.perf_counter()
        self.attempts = 0
        self.failed: list[str] = []    # nodes whose attempt failed: excluded from now on
        self.skipped: list[str] = []   # nodes the scheduler chose but this instance cannot reach
        self.link: Link | None = None
        self.node_id: str | None = None  # the node of the latest attempt
        self.accepted = False
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.wait_until = 0.0
        self.to_release: str | None = None  # node whose reservation must go before the next dispatch
        self.request_id = request_id
        self.stream = stream

    def __repr__(self) -> str:
        node = self.link.node_id if self.link is not None else None
        return f"<JobState {self.job_id} session={self.session_id!r} node={node} attempt={self.attempts}>"


class Delivery:
    """Delivers jobs to nodes and answers each exactly once.

    :param scheduler: decides, reserves, commits and releases.
    :param registry: reaches the nodes connected to this server.
    :param config: delivery settings (guarantee, attempts, waiting).
    :param metrics: where outcomes are counted.
    :param blocking: whether scheduler calls may block (a network backend):
        they then run on a thread pool, never on the event loop.
    """

    #: the event loop everything here runs on (set by :meth:`start`)
    _loop: asyncio.AbstractEventLoop
    #: set when the last job in flight ends while draining (made by :meth:`start`)
    _idle: asyncio.Event

    def __init__(self, scheduler: Scheduler, registry: NodeRegistry, config: ServeConfig, metrics: Metrics, *,
                 blocking: bool = False) -> None:
        self.scheduler = scheduler
        self.registry = registry
        self.config = config
        self.metrics = metrics
        self.blocking = blocking
        #: job id -> job, for every job in flight (waiting, sent or between attempts)
        self.jobs: dict[str, JobState] = {}
        self.draining = False
        self._pending = 0  # jobs submitted that have no job id yet (waiting or dispatching off-loop)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool: ThreadPoolExecutor | None = None  # blocking only: where scheduler calls run
        self._at_most_once = config.guarantee == "at_most_once"

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind to the running event loop and listen for expired reservations."""
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        if self.blocking and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pysched-serve")
        self.scheduler.add_listener(self._listener)

    def close(self) -> None:
        """Stop listening; wait for the scheduler calls still on the pool."""
        self.scheduler.remove_listener(self._listener)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    @property
    def in_flight(self) -> int:
        """Jobs submitted and not answered yet."""
        return len(self.jobs) + self._pending

    async def drain(self, grace: float) -> int:
        """Stop taking jobs; wait for those in flight; cancel the rest.

        :param grace: seconds the jobs in flight get to finish.
        :returns: how many jobs were cancelled.
        """
        self.draining = True
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline:
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        left = list(self.jobs.values())
        for job in left:
            self.cancel(job, ErrorCode.DRAINING, reason="shutdown: the grace period ended")
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_result(None)
        return len(left)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ submission
    def submit(self, job: JobState) -> None:
        """Start delivering a job.

        :param job: the job; its ``reply`` is called exactly once, maybe before this returns.
        """
        self._pending += 1  # until it has a job id (or its answer)
        if self.draining:
            self._answer(job, None, ServeError(ErrorCode.DRAINING, "the server is shutting down"))
            return
        if self.config.max_wait > 0:
            job.wait_until = time.monotonic() + min(self.config.max_wait, job.timeout)
        if self.blocking:
            self._spawn(self._start_async(job))
        else:
            self._start(job)

    def _start(self, job: JobState) -> None:
        try:
            while not self._place(job, self._try_dispatch(job)):
                pass
        except Exception as exc:  # noqa: BLE001 - a bug: this job fails loudly (logged), the others go on
            self._internal(job, exc)

    async def _start_async(self, job: JobState) -> None:
        try:
            while not self._place(job, await self._dispatch_once(job)):
                pass
        except Exception as exc:  # noqa: BLE001 - logged by _internal
            self._internal(job, exc)

    async def _guarded(self, job: JobState, coro: Awaitable[None]) -> None:
        try:
            await coro
        except Exception as exc:  # noqa: BLE001 - logged by _internal
            self._internal(job, exc)

    def _internal(self, job: JobState, exc: BaseException) -> None:
        logger.error("job %s: delivery failed: %r", job.job_id, exc, exc_info=exc)
        self._answer(job, None, ServeError(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}",
                                           job_id=job.job_id, attempts=job.attempts or None))

    async def _dispatch_once(self, job: JobState) -> Assignment | ServeError:
        if self.blocking:
            return await self._loop.run_in_executor(self._pool, self._try_dispatch, job)
        return self._try_dispatch(job)

    def _try_dispatch(self, job: JobState) -> Assignment | ServeError:
        """One scheduler decision (any thread). Returns the assignment or the error to answer with."""
        sched = self.scheduler
        if job.to_release is not None:
            assert job.job_id is not None  # only a placed job has a hold to give back
            failed = self._release_now(job.job_id, job.to_release)
            job.to_release = None
            if failed is not None:
                # The old hold may still be there, and dispatch answers a job id that holds
                # a reservation with that reservation (a retry), excluded node or not: the
                # job would go back to the node that failed it, and the retry of this
                # release, already scheduled, would then free capacity it uses there.
                err = from_exception(failed)
                self.metrics.dispatches.labels(err.code, "").inc()
                return err
        exclude = job.failed + job.skipped if job.failed or job.skipped else None
        kw: dict[str, Any] = {}
        if job.job_id is not None:
            kw["job_id"] = job.job_id
        if exclude is not None:
            kw["exclude"] = exclude
        if job.tenant is not None:
            kw["tenant"] = job.tenant
        if job.services is not None:
            kw["services"] = job.services
        if job.prefer is not None:
            kw["prefer"] = job.prefer
        if not job.require_gpu:
            kw["require_gpu"] = False
        t0 = time.perf_counter()
        try:
            return sched.dispatch(job.session_id, job.src, job.tgt, **kw)
        except (SchedulerError, ValueError, TypeError) as exc:
            err = from_exception(exc, _DISPATCH_FIELDS)
            reason = err.best_reason or "" if err.code == ErrorCode.NO_NODE else ""
            self.metrics.dispatches.labels(err.code, reason).inc()
            return err
        finally:
            self.metrics.observe_dispatch(time.perf_counter() - t0)

    def _place(self, job: JobState, outcome: Assignment | ServeError, *, may_wait: bool = True) -> bool:
        """Loop side of one dispatch: send the job, or settle the error. False: dispatch again."""
        if job.done:  # cancelled while the dispatch ran off-loop
            if isinstance(outcome, Assignment):
                self._release(outcome.job_id, outcome.node_id)
            return True
        if isinstance(outcome, ServeError):
            if (may_wait and outcome.code == ErrorCode.NO_NODE and job.wait_until and not self.draining
                    and len(self._waiters) < self.config.max_waiters and time.monotonic() < job.wait_until):
                self._spawn(self._guarded(job, self._wait(job)))
                return True
            if job.skipped and outcome.code == ErrorCode.NO_NODE:
                _not_connected(outcome, job.skipped)
            if job.attempts:
                outcome.job_id = job.job_id
                outcome.attempts = job.attempts
                outcome.message = f"attempt {job.attempts} failed on {job.failed[-1]!r}, then: {outcome.message}"
            self._answer(job, None, outcome)
            return True
        self.metrics.dispatch_ok.inc()
        job_id = outcome.job_id  # the job's id from now on (a redelivery dispatches with it again)
        if job.job_id is None:
            job.job_id = job_id
            self._pending -= 1
            self.jobs[job_id] = job
        link = self.registry.route(outcome.node_id)
        if link is None:
            # Registered with the scheduler (another instance's node, or one that just
            # dropped) but not reachable from here: give the capacity back, choose again.
            job.skipped.append(outcome.node_id)
            job.to_release = outcome.node_id
            if len(job.skipped) > _MAX_HOPS * max(1, job.attempts + 1):
                self._release(job_id, outcome.node_id)
                job.to_release = None
                err = ServeError(ErrorCode.NO_NODE, f"no node connected to this server can take the job "
                                 f"(chosen but not connected here: {', '.join(job.skipped[:_NAMES_SHOWN])})",
                                 src=outcome.src, tgt=outcome.tgt, breakdown={"not_connected": len(job.skipped)},
                                 best_reason="not_connected")
                if job.attempts:
                    err.job_id, err.attempts = job_id, job.attempts
                self._answer(job, None, err)
                return True
            if self.blocking:
                return False
            self._release_now(job_id, outcome.node_id)
            job.to_release = None
            return False
        self._send(job, link, outcome)
        return True

    def _send(self, job: JobState, link: Link, a: Assignment) -> None:
        job_id = a.job_id  # == job.job_id
        job.attempts += 1
        job.link = link
        job.node_id = link.node_id
        job.accepted = False
        link.jobs[job_id] = job
        timeout = job.timeout
        job.timer = self._loop.call_later(timeout, self._on_deadline, job, job.attempts)
        if timeout > self.scheduler.reservation_ttl:
            # the uncommitted reservation must outlive the attempt's deadline
            self._settle(job_id, a.node_id, timeout + 5.0)
        link.put(Job(job_id=job_id, session_id=job.session_id, src=a.src, tgt=a.tgt, payload=job.payload,
                     deadline=time.time() + timeout, timeout=timeout, attempt=job.attempts, tenant=job.tenant))

    async def _wait(self, job: JobState) -> None:
        """No capacity now: wait (bounded) for some to return, then dispatch again."""
        loop = self._loop
        while True:
            left = job.wait_until - time.monotonic()
            if left > 0 and not self.draining:
                fut = loop.create_future()
                self._waiters.append(fut)  # woken by the next release, or polls
                try:
                    await asyncio.wait_for(fut, timeout=min(left, _WAIT_POLL))
                except asyncio.TimeoutError:
                    pass
                finally:
                    if not fut.done():
                        fut.cancel()
            if job.done:
                return
            outcome = await self._dispatch_once(job)
            final = self.draining or job.wait_until <= time.monotonic()
            if isinstance(outcome, ServeError) and outcome.code == ErrorCode.NO_NODE and not final:
                continue
            while not self._place(job, outcome, may_wait=False):
                outcome = await self._dispatch_once(job)
            return

    def _wake_waiter(self) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    # ------------------------------------------------------------ from nodes
    def on_accept(self, link: Link, job_id: str) -> None:
        """The node on ``link`` took a job: commit its reservation (once).

        :param link: the link the ``accept`` came on.
        :param job_id: the job it names; unknown on this link: refused.
        """
        job = link.jobs.get(job_id)
        if job is None:
            link.refuse_unknown(job_id)
            return
        if not job.accepted:
            job.accepted = True
            # Commit on the loop's next turn: a fast node sends accept and result in
            # one frame, and a job released in the same turn needs no commit (with
            # Redis that is one round trip in three saved).
            self._loop.call_soon(self._commit, job, link, job.attempts)

    def _commit(self, job: JobState, link: Link, attempt: int) -> None:
        job_id = job.job_id
        if job_id is not None and not job.done and job.link is link and job.attempts == attempt:
            self._settle(job_id, link.node_id)

    def on_result(self, link: Link, msg: Result) -> None:
        """The node on ``link`` answered a job: release its capacity, answer or redeliver it.

        :param link: the link the ``result`` came on.
        :param msg: the result; a job unknown on this link is refused.
        """
        job = link.jobs.pop(msg.job_id, None)
        if job is None:
            link.refuse_unknown(msg.job_id)
            return
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        job.link = None
        if not msg.ok and msg.retry:
            self._attempt_failed(job, link.node_id, "retry")
        else:
            self._release(msg.job_id, link.node_id)
            self._answer(job, msg, None)

    def link_lost(self, link: Link) -> None:
        """The link dropped (or was replaced / removed): every job on it fails over.

        :param link: the link that is gone.
        """
        jobs = list(link.jobs.values())
        link.jobs.clear()
        for job in jobs:
            if job.timer is not None:
                job.timer.cancel()
                job.timer = None
            job.link = None
            self._attempt_failed(job, link.node_id, "node_lost")

    def _on_deadline(self, job: JobState, attempt: int) -> None:
        link = job.link
        job_id = job.job_id
        if job.done or link is None or job_id is None or job.attempts != attempt:
            return
        job.timer = None
        link.jobs.pop(job_id, None)
        job.link = None
        link.put(Cancel(job_id=job_id, reason=ErrorCode.TIMEOUT))
        self._attempt_failed(job, link.node_id, "timeout")

    def _listener(self, event: str, node_id: str, fields: dict[str, Any]) -> None:
        # Any thread (the scheduler calls listeners on the caller's thread): hop to the loop.
        if event == "job_expired":
            loop = self._loop
            job_id = fields.get("job_id")
            # (a job_expired without a job id names no job of ours: nothing to do)
            if type(job_id) is str and not loop.is_closed():
                loop.call_soon_threadsafe(self._on_expired, job_id, node_id)

    def _on_expired(self, job_id: str, node_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.done:
            return
        link = job.link
        if link is None or link.node_id != node_id:
            return
        # the scheduler let the reservation go: the node holds no capacity for it any more
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        link.jobs.pop(job_id, None)
        job.link = None
        link.put(Cancel(job_id=job_id, reason=ErrorCode.TIMEOUT))
        self._attempt_failed(job, node_id, "expired", release=False)

    def _attempt_failed(self, job: JobState, node_id: str, reason: str, *, release: bool = True) -> None:
        """One attempt on ``node_id`` failed: free its capacity, then redeliver or answer the failure."""
        job_id = job.job_id
        assert job_id is not None  # only a job sent to a node has attempts that fail
        self.metrics.failovers.labels(reason).inc()
        job.failed.append(node_id)
        missed = reason in ("timeout", "expired")
        redeliver = job.attempts < self.config.max_attempts and not (
            self._at_most_once and (job.accepted or missed))
        if release:
            if redeliver and self.blocking:
                # The same job id is dispatched again: the old hold must be gone first, or
                # dispatch would answer with it (a retry). _try_dispatch releases it, in order.
                job.to_release = node_id
            else:
                self._release(job_id, node_id)
        if redeliver:
            logger.info("job %s: attempt %d on %s failed (%s), redelivering", job_id, job.attempts, node_id,
                        reason)
            job.accepted = False
            if self.config.max_wait > 0:  # a failover may wait for capacity too (bounded)
                job.wait_until = time.monotonic() + min(self.config.max_wait, job.timeout)
            if self.blocking:
                self._spawn(self._start_async(job))
            else:
                self._start(job)
            return
        code = ErrorCode.TIMEOUT if missed else ErrorCode.NODE_LOST
        what = {"timeout": "missed its deadline", "expired": "let its reservation expire",
                "node_lost": "disconnected", "retry": "failed it (retry requested)"}[reason]
        self._answer(job, None, ServeError(code, f"job {job_id}: node {node_id!r} {what} on attempt "
                                                 f"{job.attempts} of {self.config.max_attempts}",
                                           job_id=job_id, attempts=job.attempts))

    # ------------------------------------------------------------ cancel and answer
    def cancel(self, job: JobState, code: str = ErrorCode.CANCELLED, reason: str = "cancelled",
               *, answer: bool = True) -> None:
        """Stop a job: tell its node, free its capacity, answer it.

        :param job: the job; nothing happens when it has been answered already.
        :param code: the :class:`~pysched.serve.protocol.ErrorCode` of its answer (and of the node's ``cancel``).
        :param reason: why, for the answer's message.
        :param answer: False: end the job without answering it (nobody is waiting for the answer).
        """
        if job.done:
            return
        link = job.link
        if link is not None:
            job_id = job.job_id
            assert job_id is not None  # a job on a link has been placed
            link.jobs.pop(job_id, None)
            job.link = None
            if job.timer is not None:
                job.timer.cancel()
                job.timer = None
            link.put(Cancel(job_id=job_id, reason=code))
            self._release(job_id, link.node_id)
        err = ServeError(code, f"job {job.job_id or '(not placed)'}: {reason}", job_id=job.job_id,
                         attempts=job.attempts or None)
        if answer:
            self._answer(job, None, err)
        else:
            self._finish(job)

    def _finish(self, job: JobState) -> None:
        job.done = True
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        if job.job_id is None:
            self._pending -= 1
        else:
            self.jobs.pop(job.job_id, None)
        if self.draining and not self.in_flight:
            self._idle.set()

    def _answer(self, job: JobState, result: Result | None, error: ServeError | None) -> None:
        if job.done:
            return
        self._finish(job)
        metrics = self.metrics
        if error is None:
            metrics.job_result.inc()
        else:
            metrics.jobs.labels(error.code).inc()
        try:
            job.reply(job, result, error)
        except Exception:  # a bug in a reply path must not break delivery of the others
            logger.exception("reply of job %s failed", job.job_id)

    # ------------------------------------------------------------ capacity
    def _settle(self, job_id: str, node_id: str, lease: float | None = None) -> None:
        """Commit (``lease`` None) or renew the job's hold on ``node_id``, inline or on the pool."""
        pool = self._pool
        if pool is not None:
            pool.submit(self._settle_now, job_id, node_id, lease)
        else:
            self._settle_now(job_id, node_id, lease)

    def _settle_now(self, job_id: str, node_id: str, lease: float | None) -> None:
        # An unknown job (or one held on another node) only means this attempt's
        # reservation ended meanwhile: released, expired or redelivered elsewhere.
        what = "commit" if lease is None else "renew"
        try:
            if lease is None:
                self.scheduler.commit(job_id, node_id=node_id)
            else:
                self.scheduler.renew(job_id, lease=lease, node_id=node_id)
        except UnknownJob:
            logger.info("%s(%s): the reservation had already ended", what, job_id)
        except ReservationBackendUnavailable as exc:
            logger.warning("%s(%s): backend unavailable: %s", what, job_id, exc)

    def _release(self, job_id: str, node_id: str) -> None:
        pool = self._pool
        if pool is not None:
            pool.submit(self._release_now, job_id, node_id)
        else:
            self._release_now(job_id, node_id)
        if self._waiters:
            self._wake_waiter()

    def _release_now(self, job_id: str, node_id: str,
                     retries: int = _RELEASE_RETRIES) -> ReservationBackendUnavailable | None:
        """Release the job's hold on ``node_id`` (any thread).

        :returns: None, or the backend's error when it could not be reached: the
            hold may still be there, and a retry is scheduled (while retries are left).
        """
        try:
            self.scheduler.release(job_id, node_id=node_id)
        except ReservationBackendUnavailable as exc:
            # The capacity would stay held until the commit lease ends: try again later.
            loop = self._loop
            if retries > 0 and not loop.is_closed():
                logger.warning("release(%s): backend unavailable (%s); retrying", job_id, exc)
                loop.call_soon_threadsafe(loop.call_later, _RELEASE_RETRY_DELAY, self._retry_release,
                                          job_id, node_id, retries - 1)
            else:
                logger.error("release(%s) on %s failed for good: %s", job_id, node_id, exc)
            return exc
        return None

    def _retry_release(self, job_id: str, node_id: str, retries: int) -> None:
        if self._pool is not None:
            self._pool.submit(self._release_now, job_id, node_id, retries)
        else:
            self._release_now(job_id, node_id, retries)
