"""The programs behind ``pysched nodes`` and ``pysched load`` (their options are in :mod:`pysched.client.demo`).

Loaded only when one of the two commands runs: building the ``pysched``
command's parser imports :mod:`pysched.client.demo` alone, which needs
neither asyncio nor the serve extra.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import msgspec

from pysched.client import _wire as wire
from pysched.client._url import bearer
from pysched.client.errors import ServeError, error_from_body
from pysched.client.jobs import JobClient, SessionStream
from pysched.client.node import Job, NodeClient
from pysched.tools.console import StatusLine

__all__ = ["load_main", "nodes_main"]

#: A summary as printed and written with ``--json``: JSON values by name.
Summary = dict[str, Any]


class _Progress(StatusLine):
    """One line a second on ``stream``: redrawn in place on a terminal, plain lines otherwise."""


def _stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (so the summary is still printed)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            loop.add_signal_handler(sig, stop.set)
    return stop


def _write_json(path: str | None, summary: Summary) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")


# ====================================================================== nodes
class _SimNode:
    """The behaviour of one simulated node: answer each job after a simulated time."""

    __slots__ = ("accept", "fail_rate", "latency", "loop", "rng")

    def __init__(self, loop: asyncio.AbstractEventLoop, rng: random.Random, latency: float, fail_rate: float,
                 accept: bool) -> None:
        self.loop = loop
        self.rng = rng
        self.latency = latency
        self.fail_rate = fail_rate
        self.accept = accept

    def on_job(self, job: Job) -> None:
        if self.accept:
            job.accept_nowait()
        if self.latency > 0:
            self.loop.call_later(self.latency * (0.5 + self.rng.random()), self.answer, job)
        else:
            self.answer(job)

    def answer(self, job: Job) -> None:
        if self.fail_rate and self.rng.random() < self.fail_rate:
            job.fail_nowait("simulated failure")
        else:
            job.reply_nowait(job.payload)


async def nodes_main(args: argparse.Namespace) -> int:
    """Run ``pysched nodes`` until ``--duration`` ends or a signal comes.

    :param args: the options of :func:`pysched.client.demo.add_nodes_arguments`.
    :returns: the exit status: 0 when every node registered and none stopped on an error.
    """
    token = args.token if args.token is not None else os.environ.get("PYSCHED_NODE_TOKEN")
    services = [s.strip() for s in args.services.split(",") if s.strip()] if args.services else None
    loop = asyncio.get_running_loop()
    stop = _stop_event()
    rng = random.Random(args.seed)
    width = max(4, len(str(args.count)))
    nodes: list[NodeClient] = []
    for i in range(args.count):
        sim = _SimNode(loop, random.Random(rng.random()), args.latency_ms / 1000.0, args.fail_rate, args.accept)
        max_concurrency = args.max_concurrency

        def load(node_ref: list[NodeClient] = nodes, i: int = i, max_concurrency: int = max_concurrency
                 ) -> dict[str, float]:
            # Figures that follow the node's own count (below the default 85 % threshold).
            share = node_ref[i].running / max_concurrency
            return {"cpu": round(5.0 + 60.0 * share, 1), "gpu": round(10.0 + 60.0 * share, 1), "mem": 40.0}

        nodes.append(NodeClient(args.url, f"{args.prefix}{i + 1:0{width}d}", token=token,
                                languages=args.languages[i % len(args.languages)], services=services,
                                max_concurrency=max_concurrency, load=load,
                                heartbeat_interval=args.heartbeat_interval, on_job=sim.on_job,
                                backoff_initial=0.2, backoff_max=5.0))
    progress = None if args.quiet else _Progress(sys.stderr)
    out = sys.stderr
    started = time.monotonic()

    # Connect in waves, so hundreds of handshakes do not all time out together on a busy machine.
    gate = asyncio.Semaphore(50)
    failures: dict[str, int] = {}

    async def connect(node: NodeClient) -> None:
        async with gate:
            try:
                await node.connect(timeout=args.connect_timeout)
            except ServeError as exc:
                failures[exc.code] = failures.get(exc.code, 0) + 1
                if not failures.get("_shown"):
                    failures["_shown"] = 1
                    print(f"node {node.node_id}: {exc}", file=out, flush=True)

    connecting = asyncio.gather(*(connect(n) for n in nodes))
    stop_wait = asyncio.ensure_future(stop.wait())
    first: set[asyncio.Future[Any]] = {connecting, stop_wait}
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    failures.pop("_shown", None)
    connected_at = time.monotonic()
    registered = sum(1 for n in nodes if n.connected)
    print(f"{registered:,} of {args.count:,} nodes registered at {nodes[0].url} in {connected_at - started:.1f} s"
          + (f"; failures: {failures}" if failures else ""), file=out, flush=True)
    deadline = None if args.duration is None else started + args.duration

    def totals() -> dict[str, int]:
        t: dict[str, int] = {}
        for n in nodes:
            for k, v in n.counters.items():
                t[k] = t.get(k, 0) + v
        return t

    last = totals()
    last_t = time.monotonic()
    try:
        while not stop.is_set() and not (failures and registered == 0):
            timeout = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if timeout <= 0:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(stop_wait), timeout)
            now = time.monotonic()
            t = totals()
            if progress is not None:
                dt = max(now - last_t, 1e-9)
                connected = sum(1 for n in nodes if n.connected)
                running = sum(n.running for n in nodes)
                progress.line(f"{now - started:6.1f} s  {connected:>5,} connected  {t['jobs']:>10,} jobs  "
                              f"{(t['jobs'] - last['jobs']) / dt:>8,.0f}/s  {running:>5,} running  "
                              f"{t['failures']:>7,} failed  {t['cancels'] + t['lost']:>6,} cancelled  "
                              f"{t['heartbeats']:>8,} heartbeats  {t['disconnects']:>4,} reconnects")
            last, last_t = t, now
    finally:
        if progress is not None:
            progress.finish()
        stop_wait.cancel()
        if not connecting.done():
            connecting.cancel()
        await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)
    elapsed = max(time.monotonic() - connected_at, 1e-9)
    total_elapsed = max(time.monotonic() - started, 1e-9)
    t = totals()
    fatal = sum(1 for n in nodes if n._fatal is not None)
    summary: Summary = {
        "nodes": args.count,
        "registered": registered,
        "seconds": round(elapsed, 3),
        "jobs": t["jobs"],
        "jobs_per_s": round(t["jobs"] / elapsed, 1),
        "replies": t["replies"],
        "failed": t["failures"],
        "cancelled": t["cancels"],
        "lost_on_disconnect": t["lost"],
        "heartbeats": t["heartbeats"],
        # heartbeats start with each node's registration: rate over the whole run
        "heartbeats_per_s": round(t["heartbeats"] / total_elapsed, 1),
        "connects": t["connects"],
        "disconnects": t["disconnects"],
        "server_errors": t["errors"],
        "stopped_on_error": fatal,
        "connect_failures": failures,
    }
    print(_format_nodes_summary(summary), flush=True)
    _write_json(args.json, summary)
    return 0 if registered == args.count and fatal == 0 else 1


def _format_nodes_summary(s: Summary) -> str:
    lines = [
        f"pysched nodes: {s['registered']:,} of {s['nodes']:,} nodes registered, ran {s['seconds']:.1f} s",
        f"  jobs         {s['jobs']:>12,}  ({s['jobs_per_s']:,.0f}/s)",
        f"  answered ok  {s['replies']:>12,}",
        f"  failed       {s['failed']:>12,}  (simulated)",
        f"  cancelled    {s['cancelled']:>12,}  by the server; {s['lost_on_disconnect']:,} lost on disconnect",
        f"  heartbeats   {s['heartbeats']:>12,}  ({s['heartbeats_per_s']:,.0f}/s)",
        f"  connections  {s['connects']:>12,}  ({s['disconnects']:,} dropped; {s['server_errors']:,} error frames)",
    ]
    if s["stopped_on_error"] or s["connect_failures"]:
        lines.append(f"  errors       {s['stopped_on_error']:>12,}  nodes stopped; connect failures "
                     f"{s['connect_failures']}")
    return "\n".join(lines)


# ====================================================================== load
class _Tally:
    """Outcomes and latencies of the measured window."""

    def __init__(self, warmup_until: float) -> None:
        self.warmup_until = warmup_until
        self.sent = 0
        self.answered = 0
        self.ok = 0
        self.codes: dict[str, int] = {}
        self.latencies: list[float] = []
        self.skipped = 0
        self.all_answered = 0
        self.first_at: float | None = None
        self.last_at = 0.0

    def record(self, sent_at: float, now: float, code: str | None) -> None:
        self.all_answered += 1
        if sent_at < self.warmup_until:
            return
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.answered += 1
        if code is None:
            self.ok += 1
            self.latencies.append(now - sent_at)
        else:
            self.codes[code] = self.codes.get(code, 0) + 1


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    n = len(values)

    def at(q: float) -> float:
        return round(values[min(n - 1, int(q * n))] * 1000.0, 3)

    return {"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "p999_ms": at(0.999),
            "max_ms": round(values[-1] * 1000.0, 3)}


class _LoadRun:
    """One ``pysched load`` run: its settings, its client, its tally; a method per mode.

    Made inside the running event loop (it installs the signal handlers).

    :param args: the options of :func:`pysched.client.demo.add_load_arguments`.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.decode_job: Callable[[bytes], wire.P.JobResponse] = msgspec.json.Decoder(wire.P.JobResponse).decode
        self.token: str | None = args.token if args.token is not None else os.environ.get("PYSCHED_CLIENT_TOKEN")
        concurrency: int | None = args.concurrency if args.rate is None else None
        if args.rate is None and concurrency is None:
            concurrency = 64
        #: closed loop: jobs in flight, all sessions together; None: open loop at ``--rate``
        self.concurrency = concurrency
        self.client = JobClient(args.url, token=self.token,
                                max_connections=max(concurrency or 0, min(args.max_in_flight, 512)))
        self.stop = _stop_event()
        self.payload = "x" * max(0, args.payload_bytes)
        #: (session id, src, tgt) of each session
        self.sessions: list[tuple[str, str, str]] = [
            (f"load-{os.getpid()}-{i + 1}", *args.pairs[i % len(args.pairs)]) for i in range(args.sessions)]
        self.started = time.perf_counter()
        self.end_at = self.started + args.duration
        self.tally = _Tally(self.started + args.warmup)
        #: the error that stopped the run (the first one only)
        self.fatal: list[BaseException] = []
        self.progress = None if args.quiet else _Progress(sys.stderr)

    async def run(self) -> int:
        """Send load in the chosen mode, print the summary; return the exit status."""
        args, tally, client, progress, fatal = self.args, self.tally, self.client, self.progress, self.fatal
        reporter = asyncio.ensure_future(self.report())
        try:
            await (self.stream_mode() if args.mode == "stream" else self.jobs_mode())
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            if progress is not None:
                progress.finish()
            await client.aclose()
        window = (tally.last_at - tally.first_at) if tally.first_at is not None else 0.0
        summary: Summary = {
            "mode": args.mode,
            "url": client.url,
            "sessions": args.sessions,
            "rate": args.rate,
            "concurrency": self.concurrency,
            "seconds": round(time.perf_counter() - self.started, 3),
            "measured_seconds": round(window, 3),
            "sent": tally.sent,
            "answered": tally.answered,
            "ok": tally.ok,
            "jobs_per_s": round(tally.ok / window, 1) if window > 0 else 0.0,
            "errors": dict(sorted(tally.codes.items(), key=lambda kv: -kv[1])),
            "skipped": tally.skipped,
            "latency": _percentiles(tally.latencies),
            "fatal": str(fatal[0]) if fatal else None,
        }
        print(_format_load_summary(summary), flush=True)
        _write_json(args.json, summary)
        return 0 if tally.ok > 0 and not fatal else 1

    async def pace(self, send_one: Callable[[int], None]) -> None:
        """Call ``send_one(i)`` at ``args.rate`` per second (open loop) until the end."""
        stop, end_at, started, rate = self.stop, self.end_at, self.started, self.args.rate
        i = 0
        tick = 0.002
        while not stop.is_set():
            now = time.perf_counter()
            if now >= end_at:
                return
            due = int((now - started) * rate)
            while i < due:
                send_one(i)
                i += 1
            await asyncio.sleep(tick)

    def _fail(self, exc: BaseException) -> None:
        """Stop the run on its first fatal error."""
        if not self.fatal:
            self.fatal.append(exc)
            self.stop.set()

    # ------------------------------------------------------------ stream mode
    async def stream_mode(self) -> None:
        """Send over one session stream per session."""
        args, tally, stop, fatal = self.args, self.tally, self.stop, self.fatal
        sessions, concurrency, end_at = self.sessions, self.concurrency, self.end_at
        streams: list[SessionStream] = []
        try:
            for sid, _, _ in sessions:
                s = self.client.session(sid)
                await s.open()
                streams.append(s)
        except ServeError as exc:
            fatal.append(exc)
            for s in streams:
                await s.close()
            return
        sent_at: list[dict[int | str, float]] = [{} for _ in streams]
        in_flight = [0]

        dead: set[int] = set()

        async def reader(k: int) -> None:
            s = streams[k]
            times = sent_at[k]
            try:
                while True:
                    r = await s.recv()
                    now = time.perf_counter()
                    t0 = times.pop(r.request_id, None) if r.request_id is not None else None
                    in_flight[0] -= 1
                    if t0 is not None:
                        tally.record(t0, now, r.code if r.code is not None else (None if r.ok else "node_error"))
                    if concurrency is not None and now < end_at and not stop.is_set():
                        submit(k)
            except ServeError as exc:
                # the server closed this stream: its jobs in flight get no answer; count them, go on
                # with the other streams
                dead.add(k)
                now = time.perf_counter()
                for t0 in times.values():
                    tally.record(t0, now, "stream_closed")
                lost = len(times)
                in_flight[0] -= lost
                times.clear()
                if concurrency is not None and now < end_at and not stop.is_set():
                    for _ in range(lost):  # keep the window full on the streams still open
                        submit(k)
                print(f"session stream {s.session_id}: {exc}", file=sys.stderr, flush=True)
                if len(dead) == len(streams) and not fatal:
                    fatal.append(exc)
                    stop.set()

        def submit(k: int) -> None:
            if k in dead:
                live = [i for i in range(len(streams)) if i not in dead]
                if not live:
                    return
                k = live[k % len(live)]
            _, src, tgt = sessions[k]
            s = streams[k]
            rid = s.next_request_id()
            try:
                # bounded by the caller: `concurrency` or `--max-in-flight` jobs at most
                s.send_nowait(src, tgt, self.payload, request_id=rid, timeout=args.timeout)
            except ServeError as exc:
                self._fail(exc)
                return
            sent_at[k][rid] = time.perf_counter()
            in_flight[0] += 1
            tally.sent += 1

        def submit_open(i: int) -> None:
            if in_flight[0] >= args.max_in_flight:
                tally.skipped += 1
                return
            submit(i % len(streams))

        readers = [asyncio.ensure_future(reader(k)) for k in range(len(streams))]
        try:
            if concurrency is not None:
                for j in range(concurrency):
                    submit(j % len(streams))
                await _until(stop, end_at, lambda: bool(fatal))
            else:
                await self.pace(submit_open)
            # let answers to jobs already sent come in (bounded)
            await _drain(lambda: in_flight[0] <= 0, 10.0 + (args.timeout or 0))
        finally:
            for r in readers:
                r.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            for s in streams:
                await s.close()

    # ------------------------------------------------------------ jobs mode
    async def jobs_mode(self) -> None:
        """Send ``POST /v1/jobs`` requests."""
        args, tally, stop, client = self.args, self.tally, self.stop, self.client
        sessions, concurrency, end_at, decode_job = self.sessions, self.concurrency, self.end_at, self.decode_job
        in_flight = [0]
        fast = None
        if args.http != "httpx":
            try:
                from pysched.client._fasthttp import FastHTTP
            except ImportError:
                if args.http == "fast":
                    raise
            else:
                fast = FastHTTP(client.url, bearer(self.token), client.max_connections)
        # every job of a session has the same body: encode each once
        bodies = [wire.encode(wire.P.JobRequest(session_id=sid, src=src, tgt=tgt, payload=self.payload,
                                                timeout=args.timeout)) for sid, src, tgt in sessions]

        async def submit_sdk(i: int) -> str | None:
            sid, src, tgt = sessions[i % len(sessions)]
            r = await client.asubmit(sid, src, tgt, self.payload, timeout=args.timeout)
            return None if r.ok else "node_error"

        submit: Callable[[int], Awaitable[str | None]] = submit_sdk
        if fast is not None:
            post = fast.post

            async def submit_fast(i: int) -> str | None:
                status, headers, content = await post("/v1/jobs", bodies[i % len(bodies)])
                if status == HTTPStatus.OK:
                    return None if decode_job(content).ok else "node_error"
                _, src, tgt = sessions[i % len(sessions)]
                raise error_from_body(status, wire.decode_error_body(content), src=src, tgt=tgt,
                                      retry_after=headers.get(b"retry-after"))

            submit = submit_fast

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            tally.sent += 1
            in_flight[0] += 1
            try:
                code = await submit(i)
            except OSError as exc:  # ConnectionError of the fast client
                code = "unavailable"
                self._fail(exc)
            except ServeError as exc:
                code = exc.code
                if exc.code in ("unavailable", "unauthorized", "forbidden"):
                    self._fail(exc)
            finally:
                in_flight[0] -= 1
            tally.record(t0, time.perf_counter(), code)

        if concurrency is not None:
            window = concurrency

            async def worker(w: int) -> None:
                i = w
                while not stop.is_set() and time.perf_counter() < end_at:
                    await one(i)
                    i += window

            await asyncio.gather(*(worker(w) for w in range(window)))
        else:
            tasks: set[asyncio.Task[None]] = set()

            def send_one(i: int) -> None:
                if in_flight[0] >= args.max_in_flight:
                    tally.skipped += 1
                    return
                t = asyncio.ensure_future(one(i))
                tasks.add(t)
                t.add_done_callback(tasks.discard)

            await self.pace(send_one)
            await _drain(lambda: not tasks, 10.0 + 3 * (args.timeout or 30.0))
            for t in list(tasks):
                t.cancel()
        if fast is not None:
            await fast.aclose()

    async def report(self) -> None:
        """Print a progress line a second (with ``--quiet``: only keep the count)."""
        tally, progress, started = self.tally, self.progress, self.started
        last_n, last_t = 0, time.perf_counter()
        while True:
            await asyncio.sleep(1.0)
            now = time.perf_counter()
            n = tally.all_answered
            errors = sum(tally.codes.values())
            if progress is not None:
                progress.line(f"{now - started:6.1f} s  {tally.sent:>10,} sent  {n:>10,} answered  "
                              f"{(n - last_n) / (now - last_t):>8,.0f}/s  {errors:>7,} errors"
                              + (f"  {tally.skipped:,} skipped" if tally.skipped else ""))
            last_n, last_t = n, now


async def load_main(args: argparse.Namespace) -> int:
    """Run ``pysched load`` for ``--duration`` seconds (or until a signal).

    :param args: the options of :func:`pysched.client.demo.add_load_arguments`.
    :returns: the exit status: 0 when at least one job was answered and no transport error stopped it.
    """
    return await _LoadRun(args).run()


async def _until(stop: asyncio.Event, end_at: float, failed: Callable[[], bool]) -> None:
    while not stop.is_set() and not failed():
        left = end_at - time.perf_counter()
        if left <= 0:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), min(left, 0.25))


async def _drain(done: Callable[[], bool], limit: float) -> None:
    end = time.perf_counter() + limit
    while not done() and time.perf_counter() < end:
        await asyncio.sleep(0.01)


def _format_load_summary(s: Summary) -> str:
    pace = f"rate {s['rate']:,.0f}/s" if s["rate"] else f"concurrency {s['concurrency']}"
    lat = s["latency"]
    lines = [
        f"pysched load: mode {s['mode']}, {s['sessions']} sessions, {pace}, {s['seconds']:.1f} s against {s['url']}",
        f"  sent         {s['sent']:>12,}"
        + (f"  ({s['skipped']:,} skipped: too many in flight)" if s["skipped"] else ""),
        f"  answered     {s['answered']:>12,}  in the measured {s['measured_seconds']:.1f} s",
        f"  ok           {s['ok']:>12,}  ({s['jobs_per_s']:,.0f} jobs/s)",
    ]
    if lat:
        lines.append(f"  latency ms   p50 {lat['p50_ms']:.2f}  p90 {lat['p90_ms']:.2f}  p99 {lat['p99_ms']:.2f}  "
                     f"p99.9 {lat['p999_ms']:.2f}  max {lat['max_ms']:.2f}")
    if s["errors"]:
        lines.append("  errors       " + ", ".join(f"{k} {v:,}" for k, v in s["errors"].items()))
    if s["fatal"]:
        lines.append(f"  stopped on   {s['fatal']}")
    return "\n".join(lines)
