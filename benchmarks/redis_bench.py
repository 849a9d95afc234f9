"""Benchmark: dispatch through Redis (RedisReservations + RedisFleet) over loopback TCP.

Run from the repository root::

    python benchmarks/redis_bench.py                 # table on stdout
    python benchmarks/redis_bench.py --json out.json # and the numbers as JSON

It starts a private ``redis-server`` (loopback TCP on a free port, plus a
unix socket for the optional ``--unix`` row; no persistence), registers
``--nodes`` nodes through a fleet, and measures:

1. **Redis round trips per dispatch**: ``RedisReservations.round_trips``
   over ``--dispatches`` calls of ``Scheduler.dispatch``, with the fleet
   paused so its once-a-second refresh is not counted. Cross-checked with
   the fleet running by a client wrapper that counts commands sent from the
   dispatching thread only.
2. **Dispatch latency** p50/p99 (``perf_counter_ns`` around each
   ``dispatch``; the ``release`` that follows is not timed) through the
   loopback TCP Redis, the fleet running; the in-process
   ``LocalReservations`` latency is shown for scale.
3. **Throughput**: 1 process, then ``--procs`` processes together, each a
   separate ``python`` running ``--threads`` threads that dispatch and
   release for ``--seconds``; every process has its own scheduler, client
   and fleet on the shared server.

This is a benchmark, not a test: nothing here asserts timings. Numbers
depend on the machine; the core count is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NAMESPACE = "bench"
LANGUAGE_SETS = [["zh", "en"], ["en", "ja"], ["de", "en"], ["en", "fr"], ["en", "ja", "zh"]]
PAIRS = [("zh", "en"), ("en", "ja"), ("de", "en"), ("en", "fr"), ("ja", "zh"), ("auto", "en")]


# -- the private server ------------------------------------------------------------


class Server:
    """A throw-away ``redis-server`` on 127.0.0.1:<free port> and a unix socket."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server is not on PATH")
        self.dir = Path(tempfile.mkdtemp(prefix="pysched-bench-"))
        self.unix_socket = str(self.dir / "redis.sock")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--unixsocket", self.unix_socket,
             "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.2)
                self.version = client.info("server")["redis_version"]
                client.close()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- one member of the fleet ---------------------------------------------------------


class _CountingClient:
    """Wraps a ``redis.Redis``: counts ``execute_command`` calls per thread.

    Given to :class:`RedisReservations` only, so what it counts is exactly
    the network calls a dispatch makes on the calling thread.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._local = threading.local()

    @property
    def calls(self) -> int:
        return getattr(self._local, "calls", 0)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self._local.calls = self.calls + 1
        return self._client.execute_command(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def make_member(url: str | None = None, unix_socket: str | None = None, name: str = "main") -> dict:
    """A scheduler with a RedisReservations backend and a started RedisFleet."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    import pysched
    from pysched.redis import RedisReservations

    options = dict(socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))
    if unix_socket:
        client = redis.Redis(unix_socket_path=unix_socket, **options)
    else:
        client = redis.Redis.from_url(url, **options)
    counting = _CountingClient(client)
    backend = RedisReservations(counting, namespace=NAMESPACE)
    sched = pysched.Scheduler(reservations=backend)
    fleet = pysched.RedisFleet(sched, client, NAMESPACE, process_id=f"{name}-{os.getpid()}")
    fleet.start()
    backend.load_scripts()  # no NOSCRIPT fallback inside the measurement
    return {"client": client, "counting": counting, "backend": backend, "sched": sched, "fleet": fleet}


def register_nodes(sched: Any, n: int) -> None:
    for i in range(n):
        sched.register_node(f"node-{i:04d}", LANGUAGE_SETS[i % len(LANGUAGE_SETS)], max_concurrency=4)


def heartbeats(sched: Any, n: int, stop: threading.Event, every: float = 5.0) -> None:
    while not stop.wait(every):
        for i in range(n):
            sched.heartbeat(f"node-{i:04d}", cpu=10.0)


def wait_for_nodes(sched: Any, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while sched.stats()["nodes_total"] < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"saw {sched.stats()['nodes_total']} of {n} nodes")
        time.sleep(0.02)


# -- measurements ------------------------------------------------------------------


def measure_round_trips(m: dict, n: int) -> dict:
    """RedisReservations.round_trips per dispatch, the fleet paused (its refresh is not ours)."""
    sched, backend, fleet = m["sched"], m["backend"], m["fleet"]
    rng = random.Random(1)
    fleet.stop()
    try:
        rt = 0
        for _ in range(n):
            before = backend.round_trips
            a = sched.dispatch(f"rt-{rng.randrange(1000)}", *rng.choice(PAIRS))
            rt += backend.round_trips - before
            sched.release(a.job_id)
    finally:
        fleet.start()
    return {"dispatches": n, "round_trips": rt, "per_dispatch": rt / n}


def measure_latency(m: dict, n: int) -> dict:
    """perf_counter_ns around each dispatch, the fleet running."""
    sched, counting = m["sched"], m["counting"]
    rng = random.Random(2)
    for i in range(200):  # warm-up: connections, caches
        sched.release(sched.dispatch(f"w-{i}", *rng.choice(PAIRS)).job_id)
    samples = []
    calls = 0
    for _ in range(n):
        pair = rng.choice(PAIRS)
        session = f"lat-{rng.randrange(1000)}"
        c0 = counting.calls
        t0 = time.perf_counter_ns()
        a = sched.dispatch(session, *pair)
        t1 = time.perf_counter_ns()
        calls += counting.calls - c0
        samples.append(t1 - t0)
        sched.release(a.job_id)
    return _summary(samples) | {"round_trips_per_dispatch": calls / n}


def measure_local_latency(n_nodes: int, n: int) -> dict:
    """The same dispatches on in-process LocalReservations, for scale."""
    import pysched

    sched = pysched.Scheduler()
    register_nodes(sched, n_nodes)
    rng = random.Random(2)
    samples = []
    for i in range(n + 200):
        pair = rng.choice(PAIRS)
        t0 = time.perf_counter_ns()
        a = sched.dispatch(f"lat-{rng.randrange(1000)}", *pair)
        t1 = time.perf_counter_ns()
        if i >= 200:
            samples.append(t1 - t0)
        sched.release(a.job_id)
    return _summary(samples)


def _summary(samples_ns: list[int]) -> dict:
    s = sorted(samples_ns)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] / 1000.0  # noqa: E731
    return {"n": len(s), "p50_us": pick(0.50), "p99_us": pick(0.99), "mean_us": statistics.fmean(s) / 1000.0,
            "max_us": s[-1] / 1000.0}


def throughput(url: str, procs: int, threads: int, seconds: float, n_nodes: int) -> dict:
    """``procs`` worker processes dispatching+releasing together; ops/s summed."""
    start_at = time.time() + 3.0 + 0.5 * procs  # time for every worker to import and join the fleet
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--url", url, "--threads", str(threads),
           "--seconds", str(seconds), "--start-at", repr(start_at), "--nodes", str(n_nodes)]
    children = [subprocess.Popen(cmd + ["--name", f"w{i}"], env=env, stdout=subprocess.PIPE, text=True)
                for i in range(procs)]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=seconds + 120)
        if child.returncode != 0:
            raise RuntimeError(f"worker failed with {child.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    late = max(r["started"] - start_at for r in results)
    return {
        "processes": procs, "threads_per_process": threads, "seconds": seconds,
        "dispatches": sum(r["dispatches"] for r in results),
        "dispatches_per_s": sum(r["dispatches"] / r["elapsed"] for r in results),
        "no_node": sum(r["no_node"] for r in results),
        "p50_us": statistics.median(r["p50_us"] for r in results),
        "p99_us": max(r["p99_us"] for r in results),
        "latest_start_s": late,
    }


def worker(args: argparse.Namespace) -> None:
    """One throughput process: join the fleet, wait for the common start, dispatch+release."""
    import pysched

    m = make_member(url=args.url, name=args.name)
    sched = m["sched"]
    wait_for_nodes(sched, args.nodes)
    counts = []
    lat: list[int] = []
    lock = threading.Lock()

    def loop(tid: int) -> None:
        rng = random.Random(hash((args.name, tid)))
        n = no_node = 0
        samples = []
        end = args.start_at + args.seconds
        while time.time() < end:
            pair = rng.choice(PAIRS)
            t0 = time.perf_counter_ns()
            try:
                a = sched.dispatch(f"{args.name}-{tid}-{rng.randrange(500)}", *pair)
            except pysched.NoNodeAvailable:
                no_node += 1
                continue
            samples.append(time.perf_counter_ns() - t0)
            sched.release(a.job_id)
            n += 1
        with lock:
            counts.append((n, no_node))
            lat.extend(samples)

    delay = args.start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    started = time.time()
    ts = [threading.Thread(target=loop, args=(t,)) for t in range(args.threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.time() - started
    m["fleet"].stop()
    summary = _summary(lat) if lat else {"p50_us": 0.0, "p99_us": 0.0}
    print(json.dumps({"name": args.name, "started": started, "elapsed": elapsed,
                      "dispatches": sum(c[0] for c in counts), "no_node": sum(c[1] for c in counts),
                      "p50_us": summary["p50_us"], "p99_us": summary["p99_us"]}))


# -- main ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--dispatches", type=int, default=5000, help="for round trips and latency")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput run length")
    parser.add_argument("--threads", type=int, default=2, help="threads per throughput process")
    parser.add_argument("--procs", type=int, default=3, help="processes of the multi-process run")
    parser.add_argument("--unix", action="store_true", help="also measure latency over the unix socket")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    # internal: one throughput worker
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--name", default="w", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import redis

    import pysched

    server = Server()
    main_member = None
    stop_heartbeats = threading.Event()
    try:
        main_member = make_member(url=server.url)
        register_nodes(main_member["sched"], args.nodes)
        main_member["fleet"].flush()
        # The nodes report every 5 s, as live nodes do (through the fleet to
        # every process); silent ones would go offline after 45 s.
        threading.Thread(target=heartbeats, args=(main_member["sched"], args.nodes, stop_heartbeats),
                         daemon=True).start()
        results: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(), "redis_server": server.version,
                        "redis_py": redis.__version__, "compiled_kernel": pysched.COMPILED},
            "nodes": args.nodes,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
        results["round_trips"] = measure_round_trips(main_member, args.dispatches)
        results["latency_tcp"] = measure_latency(main_member, args.dispatches)
        if args.unix:
            unix_member = make_member(unix_socket=server.unix_socket, name="unix")
            wait_for_nodes(unix_member["sched"], args.nodes)
            results["latency_unix"] = measure_latency(unix_member, args.dispatches)
            unix_member["fleet"].stop()
        results["latency_local"] = measure_local_latency(args.nodes, args.dispatches)
        one = throughput(server.url, 1, args.threads, args.seconds, args.nodes)
        many = throughput(server.url, args.procs, args.threads, args.seconds, args.nodes)
        results["throughput"] = {"1": one, str(args.procs): many, "ratio": many["dispatches_per_s"] /
                                 one["dispatches_per_s"]}
        results["fleet_stats"] = main_member["fleet"].stats()
    finally:
        if main_member is not None:
            stop_heartbeats.set()
            main_member["fleet"].stop()
        server.close()
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def report(r: dict, args: argparse.Namespace) -> None:
    m = r["machine"]
    print(f"pysched Redis benchmark: {r['command']}")
    print(f"machine: {m['cpus']} CPU cores, Python {m['python']}, redis-server {m['redis_server']}, "
          f"redis-py {m['redis_py']}, compiled kernel: {m['compiled_kernel']}")
    print(f"         ({m['cpus']} cores are shared by redis-server and every scheduler process)")
    print(f"fleet:   {r['nodes']} nodes, max concurrency 4, {len(LANGUAGE_SETS)} language sets\n")
    rt = r["round_trips"]
    print(f"Redis round trips per dispatch   {rt['per_dispatch']:.2f}   "
          f"({rt['round_trips']} over {rt['dispatches']} dispatches, RedisReservations.round_trips)")
    lt = r["latency_tcp"]
    print(f"  cross-check, fleet running     {lt['round_trips_per_dispatch']:.2f}   "
          "(commands sent from the dispatching thread)\n")
    print(f"{'dispatch latency (us)':<34}{'p50':>8}{'p99':>9}{'mean':>9}")
    rows = [("Redis, loopback TCP 127.0.0.1", lt)]
    if "latency_unix" in r:
        rows.append(("Redis, unix socket", r["latency_unix"]))
    rows.append(("in-process LocalReservations", r["latency_local"]))
    for label, x in rows:
        print(f"  {label:<32}{x['p50_us']:>8.1f}{x['p99_us']:>9.1f}{x['mean_us']:>9.1f}")
    t = r["throughput"]
    one, many = t["1"], t[str(args.procs)]
    print(f"\n{'throughput (dispatch + release)':<34}{'dispatch/s':>11}{'p50 us':>9}{'p99 us':>9}")
    for x in (one, many):
        label = f"{x['processes']} process{'es' if x['processes'] > 1 else ''} x {x['threads_per_process']} threads"
        print(f"  {label:<32}{x['dispatches_per_s']:>11.0f}{x['p50_us']:>9.1f}{x['p99_us']:>9.1f}")
    print(f"  {args.procs} processes / 1 process: {t['ratio']:.2f}x   ({args.seconds:g} s each, "
          f"loopback TCP, on {m['cpus']} cores)")


if __name__ == "__main__":
    main()
