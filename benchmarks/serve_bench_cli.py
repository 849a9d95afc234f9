"""End-to-end benchmark of ``pysched serve`` against the goals of its issue.

Everything runs on this machine over loopback: ``pysched serve`` (uvicorn),
``pysched nodes`` (simulated nodes answering at once, one process) and
``pysched load`` (the load generator), each a process of its own, sharing
the machine's cores. Phases, each bounded in time:

1. session streams, closed loop: the most jobs/s end to end
   (submit -> node -> result) with 200 connected nodes;
2. ``POST /v1/jobs``, closed loop: the most jobs/s;
3. both again open loop at half of those rates, and at 1,000 jobs/s:
   latency percentiles. With nodes answering in 0 ms the whole end-to-end
   latency is added latency (client, server, node and three processes'
   scheduling included). Open loop sends one job per frame, as a speech
   client does (one utterance at a time), while the closed loop's answers
   and refills coalesce into batches, so the half rate of phase 1 may be
   past what the unbatched path sustains;
4. 1,000 nodes sending 2 heartbeats/s each while a stream serves jobs:
   heartbeats the server applied / heartbeats the nodes sent, and an
   estimate of the scheduler's share of the server's CPU: wall time in
   ``Scheduler.dispatch`` (the server's own histogram) plus heartbeats
   applied x the cost of one ``Scheduler.heartbeat`` call measured here
   in-process, over the server's CPU time. Wall time includes waiting for
   the GIL and, with ``--redis``, for Redis, so this is an upper bound, and
   not a CPU share at all with Redis (``benchmarks/serve_bench.py`` times
   the scheduler's calls inside the server process);
5. with ``--redis``: phases 1-4 again with ``pysched serve --redis`` on a
   private ``redis-server`` (loopback TCP, free port, no persistence).

Usage::

    python benchmarks/serve_bench_cli.py [--seconds 8] [--no-redis] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pysched.client.testing import PyschedProcess, ServeProcess, free_port  # noqa: E402  after sys.path: this checkout

GOALS = {"stream_jobs_per_s": 10_000, "post_jobs_per_s": 3_000, "p99_added_ms": 2.0, "heartbeats_applied": 0.95,
         "scheduler_cpu_share": 0.05}


def _get(url: str, token: str | None) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
        return resp.read()


def metric(server: ServeProcess, name: str, labels: str = "") -> float:
    """The value of one sample of the server's /metrics (0 when absent)."""
    want = f"{name}{{{labels}}}" if labels else name
    for line in _get(f"{server.url}/metrics", None).decode().splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def cpu_seconds(pid: int) -> float:
    """CPU seconds (utime + stime) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connected_nodes(server: ServeProcess) -> int:
    stats = json.loads(_get(f"{server.url}/v1/stats", server.client_token))
    return int(stats["server"]["node_connections"])


def start_nodes(server: ServeProcess, count: int, logdir: str, seconds: float,
                *extra: str) -> tuple[PyschedProcess, Path]:
    """Start ``pysched nodes`` and wait until every node is connected; the process and its summary's path."""
    out = Path(logdir) / f"nodes-{count}.json"
    nodes = PyschedProcess(["nodes", "--url", server.ws_url, "--token", server.node_token, "--count", count,
                            "--latency-ms", "0", "--max-concurrency", "8", "--duration", seconds, "--quiet",
                            "--json", out, *extra], log_dir=logdir, name=f"nodes-{count}")
    nodes.spawn()
    deadline = time.monotonic() + 120
    while connected_nodes(server) < count:
        if not nodes.running:
            raise RuntimeError(f"pysched nodes exited:\n{nodes.output()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {connected_nodes(server)} of {count} nodes connected")
        time.sleep(0.2)
    return nodes, out


def load(server: ServeProcess, logdir: str, name: str, *args: str) -> dict:
    out = Path(logdir) / f"load-{name}.json"
    proc = PyschedProcess(["load", "--url", server.url, "--token", server.client_token, "--quiet", "--json", out,
                           *[str(a) for a in args]], log_dir=logdir, name=f"load-{name}")
    proc.spawn()
    proc.wait(600)
    if not out.exists():
        raise RuntimeError(f"pysched load {name} wrote no summary:\n{proc.output()[-2000:]}")
    return json.loads(out.read_text())


def heartbeat_cost(nodes: int = 1000, calls: int = 100_000) -> float:
    """Seconds per ``Scheduler.heartbeat`` with load figures, in this process."""
    import pysched

    sched = pysched.Scheduler(seed=1)
    ids = [f"n{i}" for i in range(nodes)]
    for node_id in ids:
        sched.register_node(node_id, languages=["zh", "en"], max_concurrency=8)
    hb = sched.heartbeat
    t0 = time.perf_counter()
    for i in range(calls):
        hb(ids[i % nodes], running=i & 7, cpu=20.0, gpu=30.0, mem=40.0)
    cost = (time.perf_counter() - t0) / calls
    sched.close()
    return cost


def run_backend(label: str, serve_args: list[str], seconds: float, logdir: str) -> dict:
    print(f"== {label}: pysched serve {' '.join(serve_args)}", flush=True)
    result: dict = {"backend": label}
    server = ServeProcess(["--log-level", "warning", *serve_args], log_dir=logdir, name=f"serve-{label}")
    server.start(timeout=120)
    try:
        warm = ["--warmup", "1.5", "--duration", seconds + 1.5]
        nodes, _ = start_nodes(server, 200, logdir, 10 * seconds + 120)
        try:
            s = load(server, logdir, f"{label}-stream-max", "--mode", "stream", "--sessions", 32,
                     "--concurrency", 1024, *warm)
            result["stream_max"] = s
            print(f"  streams, closed loop:   {s['jobs_per_s']:>9,.0f} jobs/s  p99 {s['latency'].get('p99_ms')} ms  "
                  f"errors {s['errors']}", flush=True)
            j = load(server, logdir, f"{label}-jobs-max", "--mode", "jobs", "--sessions", 32,
                     "--concurrency", 64, *warm)
            result["post_max"] = j
            print(f"  POST /v1/jobs, closed:  {j['jobs_per_s']:>9,.0f} jobs/s  p99 {j['latency'].get('p99_ms')} ms  "
                  f"errors {j['errors']}", flush=True)
            for key, mode, wanted in (("stream_half", "stream", s["jobs_per_s"] / 2),
                                      ("post_half", "jobs", j["jobs_per_s"] / 2),
                                      ("stream_1000", "stream", 1000.0), ("post_1000", "jobs", 1000.0)):
                rate = max(1.0, wanted)
                h = load(server, logdir, f"{label}-{key}", "--mode", mode, "--sessions", 32, "--rate", rate, *warm)
                result[key] = h
                lat = h["latency"]
                print(f"  {mode:>6} at {rate:>7,.0f}/s:   p50 {lat.get('p50_ms')} ms  p99 {lat.get('p99_ms')} ms  "
                      f"p99.9 {lat.get('p999_ms')} ms  ({h['jobs_per_s']:,.0f} jobs/s, errors {h['errors']})",
                      flush=True)
        finally:
            nodes.stop(signal.SIGINT)

        # 1,000 nodes x 2 heartbeats/s while a stream serves jobs
        hb_seconds = max(seconds, 10.0)
        applied0 = metric(server, "pysched_heartbeats_total", 'result="applied"')
        dispatch0 = metric(server, "pysched_dispatch_seconds_sum")
        assert server.proc is not None  # started above
        server_pid = server.proc.pid
        cpu0 = cpu_seconds(server_pid)
        t0 = time.monotonic()
        nodes, nodes_json = start_nodes(server, 1000, logdir, hb_seconds + 30, "--heartbeat-interval", "0.5")
        connected_in = time.monotonic() - t0
        rate = max(100.0, result["stream_max"]["jobs_per_s"] / 4)
        served = load(server, logdir, f"{label}-hb", "--mode", "stream", "--sessions", 32, "--rate", rate,
                      "--duration", hb_seconds)
        nodes.stop(signal.SIGINT)
        summary = json.loads(nodes_json.read_text())
        # the server may still be reading what the nodes wrote before they exited: wait until it settles
        applied, settle_deadline = -1.0, time.monotonic() + 30
        while time.monotonic() < settle_deadline:
            now_applied = metric(server, "pysched_heartbeats_total", 'result="applied"') - applied0
            if now_applied == applied:
                break
            applied = now_applied
            time.sleep(0.5)
        cpu = cpu_seconds(server_pid) - cpu0
        in_dispatch = metric(server, "pysched_dispatch_seconds_sum") - dispatch0
        per_beat = heartbeat_cost()
        sched_share = (in_dispatch + applied * per_beat) / cpu if cpu > 0 else float("nan")
        result["heartbeats"] = {
            "nodes": 1000, "requested_per_s": 2000, "seconds": summary["seconds"], "connect_seconds": connected_in,
            "sent": summary["heartbeats"], "sent_per_s": summary["heartbeats_per_s"], "applied": applied,
            "applied_fraction": applied / summary["heartbeats"] if summary["heartbeats"] else 0.0,
            "jobs_served": served["ok"], "jobs_per_s": served["jobs_per_s"], "errors": served["errors"],
            "server_cpu_seconds": cpu, "dispatch_seconds": in_dispatch, "heartbeat_call_us": per_beat * 1e6,
            "scheduler_cpu_share": sched_share,
        }
        h = result["heartbeats"]
        print(f"  1,000 nodes x 2 hb/s:   sent {h['sent']:,} ({h['sent_per_s']:,.0f}/s), applied {h['applied']:,.0f} "
              f"({100 * h['applied_fraction']:.1f} %), serving {h['jobs_per_s']:,.0f} jobs/s; scheduler "
              f"{100 * sched_share:.1f} % of the server's {cpu:.1f} s CPU", flush=True)
    finally:
        server.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per load phase (default: 8)")
    parser.add_argument("--no-redis", action="store_true", help="skip the --redis run")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON")
    args = parser.parse_args(argv)
    logdir = tempfile.mkdtemp(prefix="serve-bench-")
    results = [run_backend("local", [], args.seconds, logdir)]
    if not args.no_redis:
        binary = shutil.which("redis-server")
        if binary is None:
            print("redis-server not found: --redis run skipped", flush=True)
        else:
            port = free_port()
            redis = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", logdir], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.5)
                results.append(run_backend("redis", ["--redis", f"redis://127.0.0.1:{port}/0"], args.seconds, logdir))
            finally:
                redis.terminate()
                redis.wait(30)
    print()
    print("| goal | target | " + " | ".join(r["backend"] for r in results) + " |")
    print("|---|---:|" + "---:|" * len(results))
    rows = [
        ("session streams, jobs/s (200 nodes)", f"≥ {GOALS['stream_jobs_per_s']:,}",
         lambda r: f"{r['stream_max']['jobs_per_s']:,.0f}"),
        ("POST /v1/jobs, jobs/s", f"≥ {GOALS['post_jobs_per_s']:,}", lambda r: f"{r['post_max']['jobs_per_s']:,.0f}"),
        ("streams at half rate: p50 / p99 ms", f"p99 ≤ {GOALS['p99_added_ms']}",
         lambda r: f"{r['stream_half']['latency'].get('p50_ms')} / {r['stream_half']['latency'].get('p99_ms')}"),
        ("POST at half rate: p50 / p99 ms", f"p99 ≤ {GOALS['p99_added_ms']}",
         lambda r: f"{r['post_half']['latency'].get('p50_ms')} / {r['post_half']['latency'].get('p99_ms')}"),
        ("streams at 1,000/s: p50 / p99 ms", "",
         lambda r: f"{r['stream_1000']['latency'].get('p50_ms')} / {r['stream_1000']['latency'].get('p99_ms')}"),
        ("POST at 1,000/s: p50 / p99 ms", "",
         lambda r: f"{r['post_1000']['latency'].get('p50_ms')} / {r['post_1000']['latency'].get('p99_ms')}"),
        ("1,000 nodes x 2 hb/s: applied / sent", "≥ 95 %",
         lambda r: f"{100 * r['heartbeats']['applied_fraction']:.1f} % of {r['heartbeats']['sent_per_s']:,.0f}/s"),
        ("scheduler wall time / server CPU (upper bound; see doc)", "≤ 5 %",
         lambda r: f"{100 * r['heartbeats']['scheduler_cpu_share']:.1f} %"),
    ]
    for name, target, cell in rows:
        print(f"| {name} | {target} | " + " | ".join(cell(r) for r in results) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nlogs: {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
