"""Benchmark of ``pysched serve``: jobs/s, added latency, heartbeats applied, the scheduler's CPU share.

Runs every part in a process of its own on loopback, like a real deployment
squeezed onto one machine::

    server   create_app() under uvicorn (uvloop + httptools), its Scheduler
             wrapped so the time spent inside scheduler calls is summed
    nodes    N raw WebSocket nodes in one process (batch mode: one frame
             carries a job's accept and result), answering at once, with
             heartbeats every --heartbeat-interval seconds each
    load     session streams (?batch=1) or POST /v1/jobs (httpx), closed loop
             (a window of jobs in flight) or open loop (--rate)

The orchestrator reads each process's CPU time from /proc at the start and
end of the measured window, so the report says how much CPU the server used
per job whatever else the machine was doing.

    python benchmarks/serve_bench.py                       # the issue's scenarios
    python benchmarks/serve_bench.py --scenario stream --nodes 200 --duration 10
    python benchmarks/serve_bench.py --redis redis://127.0.0.1:6379/0

Scenarios: ``stream`` (closed loop, 200 nodes), ``jobs`` (POST, closed loop),
``latency`` (open loop at a fixed rate: p99 of the added latency; the nodes
answer at once, so the end-to-end time is what the server, the loopback and
the two clients add), ``heartbeats`` (1,000 nodes at 2 heartbeats/s while a
stream runs). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve()
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """CPU seconds (utime + stime) of a process, from /proc."""
    user, system = cpu_split(pid)
    return user + system


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process in seconds, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    n = len(values)
    return {f"p{q}": round(values[min(n - 1, int(q / 100 * n))] * 1e3, 3) for q in (50, 90, 99, 99.9)} | {
        "max": round(values[-1] * 1e3, 3)}


# ====================================================================== server role
def run_server(args: argparse.Namespace) -> None:
    import uvicorn

    import pysched
    from pysched.serve import ServeConfig, create_app

    spent: dict[str, float] = {}
    calls: dict[str, int] = {}
    # A call that took longer than this was preempted by the OS (the machine is
    # shared): its time is not the scheduler's work. process_time() (the
    # denominator) does not count preemption either.
    preempted_after = 200e-6
    dropped: dict[str, int] = {}

    base = pysched.Scheduler

    def timed(name: str):
        method = getattr(base, name)
        spent[name] = 0.0
        calls[name] = 0
        dropped[name] = 0
        # perf_counter, not thread_time: the latter is a real syscall here (microseconds),
        # which would inflate what it measures. Calls the OS preempted are left out below.
        clock = time.perf_counter

        def wrapper(self, *a, **kw):
            t0 = clock()
            try:
                return method(self, *a, **kw)
            finally:
                took = clock() - t0
                calls[name] += 1
                if took < preempted_after:
                    spent[name] += took
                else:
                    dropped[name] += 1

        return wrapper

    names = ("dispatch", "heartbeat", "commit", "release", "renew", "register_node", "mark_offline", "stats",
             "explain", "node")
    TimedScheduler = type("TimedScheduler", (base,), {n: timed(n) for n in names})
    kw = dict(heartbeat_timeout=30.0, seed=1)
    fleet = None
    if args.redis:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(args.redis, socket_timeout=0.5, socket_connect_timeout=0.5,
                                      retry=Retry(NoBackoff(), 0))
        client.flushdb()
        sched = TimedScheduler(reservations=pysched.RedisReservations(client, namespace="bench"), **kw)
        fleet = pysched.RedisFleet(sched, client, "bench").start()
    else:
        sched = TimedScheduler(**kw)
    app = create_app(sched, ServeConfig(insecure=True, max_session_in_flight=100_000))
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                            ws_per_message_deflate=False, ws_max_size=4 << 20, lifespan="on")
    server = uvicorn.Server(config)
    marks: dict[str, tuple[float, dict, dict, dict]] = {}
    out = Path(args.out)

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()

    def mark(label: str) -> None:
        marks[label] = (time.process_time(), dict(spent), dict(calls), dict(dropped))
        if profiler is not None:
            if label == "start":
                profiler.enable()
            else:
                profiler.disable()
                profiler.dump_stats(args.profile)
        if label == "end":
            c0, s0, n0, d0 = marks["start"]
            c1, s1, n1, d1 = marks["end"]
            report = {"cpu": c1 - c0, "sched": {k: s1[k] - s0[k] for k in s1},
                      "calls": {k: n1[k] - n0[k] for k in n1}, "preempted": {k: d1[k] - d0[k] for k in d1}}
            out.write_text(json.dumps(report))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, mark, "start")
        loop.add_signal_handler(signal.SIGUSR2, mark, "end")
        await server.serve()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    if fleet is not None:
        fleet.stop()


# ====================================================================== nodes role
def run_nodes(args: argparse.Namespace) -> None:
    import random

    import msgspec
    import websockets

    enc = msgspec.json.encode
    dec = msgspec.json.decode
    sent = [0]
    answered = [0]
    stop_at = time.monotonic() + args.seconds

    async def node(i: int, ready: asyncio.Queue) -> None:
        rng = random.Random(i)
        async with websockets.connect(f"ws://127.0.0.1:{args.port}/v1/nodes", max_size=None,
                                      compression=None, open_timeout=120) as ws:
            await ws.send(enc({"type": "register", "node_id": f"node-{i:05d}", "languages": ["zh", "en"],
                               "max_concurrency": args.max_concurrency, "batch": True}))
            await ws.recv()
            ready.put_nowait(i)

            async def beat() -> None:
                await asyncio.sleep(rng.random() * args.heartbeat_interval)
                while time.monotonic() < stop_at:
                    await ws.send(enc({"type": "heartbeat", "running": 0, "cpu": rng.uniform(5, 60),
                                       "gpu": rng.uniform(5, 60), "mem": 40.0}))
                    sent[0] += 1
                    await asyncio.sleep(args.heartbeat_interval)

            beater = asyncio.ensure_future(beat())
            try:
                async for frame in ws:
                    msg = dec(frame)
                    out = []
                    for m in (msg if type(msg) is list else (msg,)):
                        if m["type"] == "job":
                            out.append({"type": "accept", "job_id": m["job_id"]})
                            out.append({"type": "result", "job_id": m["job_id"], "ok": True, "payload": m["payload"]})
                    if out:
                        answered[0] += len(out) // 2
                        await ws.send(enc(out))
            finally:
                beater.cancel()

    async def main() -> None:
        ready: asyncio.Queue = asyncio.Queue()
        tasks = []
        for i in range(args.count):
            tasks.append(asyncio.ensure_future(node(i, ready)))
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        for _ in range(args.count):
            await ready.get()
        Path(args.out + ".ready").write_text("ready")
        while time.monotonic() < stop_at:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        Path(args.out).write_text(json.dumps({"heartbeats_sent": sent[0], "answered": answered[0]}))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# ====================================================================== load roles
def run_load(args: argparse.Namespace) -> None:  # noqa: PLR0915  one role of the script: its modes share its tally
    import msgspec

    enc = msgspec.json.encode
    dec = msgspec.json.decode
    lat: list[float] = []
    errors: dict[str, int] = {}
    done = [0]
    t_start = time.monotonic() + args.warmup
    t_end = t_start + args.seconds
    payload = "x" * 32

    def record(t0: float, code: str | None) -> None:
        now = time.perf_counter()
        if t_start <= time.monotonic() <= t_end:
            if code is None:
                done[0] += 1
                lat.append(now - t0)
            else:
                errors[code] = errors.get(code, 0) + 1

    async def stream(k: int, rate: float | None) -> None:
        import websockets

        async with websockets.connect(f"ws://127.0.0.1:{args.port}/v1/sessions/bench-{os.getpid()}-{k}?batch=1",
                                      max_size=None, compression=None, open_timeout=120) as ws:
            sent_at: dict[int, float] = {}
            seq = [0]
            in_flight = [0]

            def jobs(n: int) -> bytes:
                now = time.perf_counter()
                out = []
                for _ in range(n):
                    seq[0] += 1
                    sent_at[seq[0]] = now
                    out.append({"type": "job", "request_id": seq[0], "src": "zh", "tgt": "en", "payload": payload})
                in_flight[0] += n
                return enc(out)

            async def reader() -> None:
                async for frame in ws:
                    msg = dec(frame)
                    n = 0
                    for m in (msg if type(msg) is list else (msg,)):
                        t0 = sent_at.pop(m.get("request_id"), None)
                        if t0 is None:
                            continue
                        n += 1
                        record(t0, None if m["type"] == "result" and m["ok"] else m.get("code", "node_error"))
                    in_flight[0] -= n
                    if rate is None and n and time.monotonic() < t_end:
                        await ws.send(jobs(n))  # closed loop: refill the window

            r = asyncio.ensure_future(reader())
            if rate is None:
                await ws.send(jobs(args.window))
                while time.monotonic() < t_end:
                    await asyncio.sleep(0.1)
            else:
                t0, sent = time.monotonic(), 0
                while time.monotonic() < t_end:
                    due = int((time.monotonic() - t0) * rate) - sent
                    if due > 0:
                        await ws.send(jobs(due))
                        sent += due
                    await asyncio.sleep(0.002)
            deadline = time.monotonic() + 10
            while in_flight[0] > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            r.cancel()

    async def post_worker(client, k: int) -> None:
        body = {"session_id": f"bench-{os.getpid()}-{k}", "src": "zh", "tgt": "en", "payload": payload}
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            r = await client.post("/v1/jobs", content=enc(body), headers={"content-type": "application/json"})
            record(t0, None if r.status_code == 200 else dec(r.content).get("error", str(r.status_code)))

    async def posts_open(client, rate: float) -> None:
        tasks: set[asyncio.Task] = set()
        body = {"src": "zh", "tgt": "en", "payload": payload}
        t0, sent = time.monotonic(), 0

        async def one(i: int) -> None:
            t = time.perf_counter()
            r = await client.post("/v1/jobs", content=enc({**body, "session_id": f"b{i % 64}"}),
                                  headers={"content-type": "application/json"})
            record(t, None if r.status_code == 200 else dec(r.content).get("error", str(r.status_code)))

        while time.monotonic() < t_end:
            due = int((time.monotonic() - t0) * rate) - sent
            for _ in range(max(0, due)):
                task = asyncio.ensure_future(one(sent))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.002)
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    async def raw_worker(k: int, rate: float | None) -> None:
        """POST /v1/jobs over one keep-alive HTTP/1.1 connection, one request at a time.

        A minimal client on purpose: httpx spends more CPU per request than
        the server does, so it cannot load the server on a 2-core machine.
        """
        reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
        body = enc({"session_id": f"bench-{os.getpid()}-{k}", "src": "zh", "tgt": "en", "payload": payload})
        request = (f"POST /v1/jobs HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                   f"content-length: {len(body)}\r\n\r\n").encode() + body
        # open loop: the connections take turns (phase k / total rate), not all at once
        t_next = time.monotonic() + (k / (rate * args.sessions) if rate else 0.0)
        try:
            while time.monotonic() < t_end:
                if rate:
                    t_next += 1.0 / rate
                    delay = t_next - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                data = await reader.readexactly(length)
                record(t0, None if status == 200 else dec(data).get("error", str(status)))
        finally:
            writer.close()

    async def main() -> None:
        if args.mode == "stream":
            rate = args.rate / args.sessions if args.rate else None
            await asyncio.gather(*(stream(k, rate) for k in range(args.sessions)))
        elif args.http_client == "raw":
            rate = args.rate / args.sessions if args.rate else None
            await asyncio.gather(*(raw_worker(k, rate) for k in range(args.sessions)))
        else:
            import httpx

            limits = httpx.Limits(max_connections=args.sessions, max_keepalive_connections=args.sessions)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.port}", limits=limits,
                                         timeout=60) as client:
                if args.rate:
                    await posts_open(client, args.rate)
                else:
                    await asyncio.gather(*(post_worker(client, k) for k in range(args.sessions)))
        Path(args.out).write_text(json.dumps({"ok": done[0], "errors": errors, "latency_ms": percentiles(lat)}))

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# ====================================================================== orchestrator
def spawn(role: str, tmp: Path, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    out = tmp / f"{name}.json"
    root = str(HERE.parent.parent)  # run from a checkout: the pysched next to this file
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}
    log = open(tmp / f"{name}.log", "ab")  # noqa: SIM115  the child writes it; it lives as long as the child
    proc = subprocess.Popen([sys.executable, str(HERE), "--role", role, "--out", str(out), *extra],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, out


def wait_file(path: Path, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: no {path.name} (exit {proc.poll()}); see {path.with_suffix('.log')}")
        time.sleep(0.1)


def histogram(port: int, name: str, labels: str = "") -> dict[float, float]:
    """Read one histogram from /metrics: bucket bound (``le``) -> cumulative count."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{") and labels in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def bucket_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, str]:
    """Quantiles of the observations between two scrapes, as 'at most <bucket bound>'."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0
    out = {}
    for q in (50, 90, 99, 99.9):
        for b, c in zip(bounds, counts, strict=True):
            if total and c >= total * q / 100:
                out[f"p{q}"] = f"<= {b * 1e3:g} ms"
                break
    return out


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def scenario(name: str, *, nodes: int, mode: str, sessions: int, window: int = 0, rate: float = 0.0,
             heartbeat_interval: float = 1.0, duration: float, warmup: float, redis: str | None,
             loaders: int = 1, profile: str | None = None, http_client: str = "raw") -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"serve-bench-{name}-"))
    port = free_port()
    server, server_out = spawn("server", tmp, "server", "--port", str(port), *(["--redis", redis] if redis else []),
                               *(["--profile", profile] if profile else []))
    procs = [server]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start; see {tmp}/server.log") from None
                time.sleep(0.1)
        seconds = warmup + duration + 2
        node_proc, node_out = spawn("nodes", tmp, "nodes", "--port", str(port), "--count", str(nodes),
                                    "--heartbeat-interval", str(heartbeat_interval), "--seconds", str(seconds + 30))
        procs.append(node_proc)
        wait_file(Path(str(node_out) + ".ready"), node_proc, 180, "nodes")
        loads = []
        for i in range(loaders):
            extra = ["--port", str(port), "--mode", mode, "--sessions", str(sessions), "--window", str(window),
                     "--warmup", str(warmup), "--seconds", str(duration), "--http-client", http_client]
            if rate:
                extra += ["--rate", str(rate / loaders)]
            loads.append(spawn(f"load-{mode}", tmp, f"load{i}", *extra))
        procs += [p for p, _ in loads]
        time.sleep(warmup)
        pids = {"server": server.pid, "nodes": node_proc.pid, **{f"load{i}": p.pid for i, (p, _) in enumerate(loads)}}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        split0 = cpu_split(server.pid)
        hb0 = metric(port, 'pysched_heartbeats_total{result="applied"}')
        endpoint = 'endpoint="sessions"' if mode == "stream" else 'endpoint="jobs"'
        h0 = histogram(port, "pysched_job_seconds", endpoint)
        server.send_signal(signal.SIGUSR1)
        t0 = time.monotonic()
        time.sleep(duration)
        server.send_signal(signal.SIGUSR2)
        wall = time.monotonic() - t0
        cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
        split1 = cpu_split(server.pid)
        hb1 = metric(port, 'pysched_heartbeats_total{result="applied"}')
        h1 = histogram(port, "pysched_job_seconds", endpoint)
        for p, _ in loads:
            p.wait(60)
        results = [json.loads(out.read_text()) for _, out in loads]
        wait_file(node_out, node_proc, seconds + 60, "nodes summary")
        applied_total = metric(port, 'pysched_heartbeats_total{result="applied"}')
        node_sum = json.loads(node_out.read_text())
        wait_file(server_out, server, 30, "server marks")
        srv = json.loads(server_out.read_text())
        ok = sum(r["ok"] for r in results)
        errors: dict[str, int] = {}
        for r in results:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        sched_time = sum(srv["sched"].values())
        report = {
            "scenario": name, "nodes": nodes, "mode": mode, "sessions": sessions * loaders, "window": window,
            "rate": rate or None, "redis": bool(redis), "http_client": http_client if mode == "jobs" else None,
            "jobs_per_s": round(ok / duration, 1), "errors": errors,
            "latency_ms": results[0]["latency_ms"] if loaders == 1 else [r["latency_ms"] for r in results],
            "server_side_latency": bucket_quantiles(h0, h1),
            "cpu_percent": {k: round(100 * (cpu1[k] - cpu0[k]) / wall, 1) for k in pids},
            "server_cpu_us_per_job": round(1e6 * (cpu1["server"] - cpu0["server"]) / ok, 1) if ok else None,
            "server_user_sys_percent": [round(100 * (split1[i] - split0[i]) / wall, 1) for i in (0, 1)],
            "heartbeats_per_s": round((hb1 - hb0) / wall, 1),
            "heartbeats_applied_percent": round(100 * applied_total / max(1, node_sum["heartbeats_sent"]), 2),
            "scheduler_percent_of_server_cpu": round(100 * sched_time / srv["cpu"], 2) if srv["cpu"] else None,
            "scheduler_seconds": {k: round(v, 4) for k, v in srv["sched"].items() if v},
            "scheduler_calls": {k: v for k, v in srv["calls"].items() if v},
            "scheduler_calls_preempted": {k: v for k, v in srv["preempted"].items() if v},
            "scheduler_us_per_call": {k: round(1e6 * srv["sched"][k] / max(1, v - srv["preempted"][k]), 2)
                                      for k, v in srv["calls"].items() if v},
        }
        return report
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=("server", "nodes", "load-stream", "load-jobs"))
    p.add_argument("--out")
    p.add_argument("--port", type=int)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--mode", default="stream")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--http-client", choices=("raw", "httpx"), default="raw",
                   help="POST load: a minimal keep-alive client (default) or httpx")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--redis")
    p.add_argument("--profile", help="server role: cProfile the measured window into this file")
    p.add_argument("--scenario", default="all", choices=("all", "stream", "jobs", "latency", "heartbeats"))
    p.add_argument("--nodes", type=int, default=200)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--stream-rate", type=float, default=5000.0, help="latency scenario: stream jobs/s")
    p.add_argument("--jobs-rate", type=float, default=1500.0, help="latency scenario: POST jobs/s")
    p.add_argument("--json", help="write the reports to this file")
    args = p.parse_args()
    if args.role == "server":
        return run_server(args)
    if args.role == "nodes":
        return run_nodes(args)
    if args.role in ("load-stream", "load-jobs"):
        args.mode = args.role.split("-")[1]
        return run_load(args)

    common = {"duration": args.duration, "warmup": 2.0, "redis": args.redis, "profile": args.profile,
              "http_client": args.http_client}
    plans = {
        "stream": [("stream", dict(nodes=args.nodes, mode="stream", sessions=16, window=64))],
        "jobs": [("jobs", dict(nodes=args.nodes, mode="jobs", sessions=64))],
        "latency": [("latency-stream", dict(nodes=args.nodes, mode="stream", sessions=16, rate=args.stream_rate)),
                    ("latency-jobs", dict(nodes=args.nodes, mode="jobs", sessions=64, rate=args.jobs_rate))],
        "heartbeats": [("heartbeats", dict(nodes=1000, mode="stream", sessions=16, window=16,
                                           heartbeat_interval=0.5))],
    }
    chosen = [x for k in (plans if args.scenario == "all" else [args.scenario]) for x in plans[k]]
    reports = []
    for name, kw in chosen:
        report = scenario(name, **kw, **common)
        reports.append(report)
        print(json.dumps(report), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
