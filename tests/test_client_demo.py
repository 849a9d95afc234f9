"""``pysched nodes`` and ``pysched load`` as a user runs them: real processes against a real server.

Each command runs for a few seconds; the tests check their exit status,
that they print a summary, and the summary's figures (every job sent was
answered, none failed), never how fast anything went.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import pytest

from pysched.client.testing import PyschedProcess, ServeProcess

WAIT = 120.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServeProcess(["--heartbeat-timeout", "3600"], log_dir=str(tmp_path_factory.mktemp("serve")))
    srv.start(timeout=WAIT)
    yield srv
    srv.stop()


def connected(server: ServeProcess) -> int:
    req = urllib.request.Request(f"{server.url}/v1/stats",
                                 headers={"Authorization": f"Bearer {server.client_token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())["server"]["node_connections"]


def test_nodes_and_load_run_and_summarise(server, tmp_path):
    nodes_json = tmp_path / "nodes.json"
    nodes = PyschedProcess(["nodes", "--url", server.ws_url, "--token", server.node_token, "--count", "20",
                            "--languages", "zh,en;ja,en", "--latency-ms", "5", "--fail-rate", "0.1",
                            "--json", nodes_json], log_dir=str(tmp_path), name="nodes")
    nodes.spawn()
    try:
        deadline = time.monotonic() + WAIT
        while connected(server) < 20:
            assert nodes.running, nodes.output()
            assert time.monotonic() < deadline, "20 nodes did not connect"
            time.sleep(0.2)
        runs = {}
        for mode, http in (("stream", "auto"), ("jobs", "fast"), ("jobs", "httpx")):
            out = tmp_path / f"load-{mode}-{http}.json"
            load = PyschedProcess(["load", "--url", server.url, "--token", server.client_token, "--mode", mode,
                                   "--http", http, "--duration", "2", "--sessions", "4", "--pairs", "zh:en,ja:en",
                                   "--concurrency", "8", "--json", out], log_dir=str(tmp_path),
                                  name=f"load-{mode}-{http}")
            load.spawn()
            assert load.wait(WAIT) == 0, load.output()
            text = load.output()
            assert f"pysched load: mode {mode}" in text and "jobs/s" in text and "latency ms" in text
            summary = json.loads(out.read_text())
            # closed loop: every job sent was answered; the nodes fail ~10 % on purpose
            assert summary["sent"] > 0 and summary["answered"] == summary["sent"]
            assert summary["ok"] > 0 and summary["ok"] + summary["errors"].get("node_error", 0) == summary["sent"]
            assert set(summary["errors"]) <= {"node_error"}
            assert summary["latency"]["p50_ms"] <= summary["latency"]["p99_ms"] <= summary["latency"]["max_ms"]
            runs[(mode, http)] = summary
    finally:
        code = nodes.stop(signal.SIGINT, timeout=WAIT)  # Ctrl-C: summary, then exit
    text = nodes.output()
    assert code == 0, text
    assert "20 of 20 nodes registered" in text and "pysched nodes:" in text
    summary = json.loads(nodes_json.read_text())
    assert summary["registered"] == 20 and summary["stopped_on_error"] == 0
    sent = sum(r["sent"] for r in runs.values())
    assert summary["jobs"] == sent  # every job each load run sent reached a simulated node once
    assert summary["replies"] + summary["failed"] == summary["jobs"]
    assert summary["failed"] == sum(r["errors"].get("node_error", 0) for r in runs.values())
    assert summary["heartbeats"] > 0


def test_open_loop_rate_and_bad_token(server, tmp_path):
    # a wrong node token: every node is refused at once, the command says so and exits 1
    nodes = PyschedProcess(["nodes", "--url", server.ws_url, "--token", "wrong", "--count", "3"],
                           log_dir=str(tmp_path), name="bad-nodes")
    nodes.spawn()
    assert nodes.wait(WAIT) == 1
    assert "unauthorized" in nodes.output() and "0 of 3 nodes registered" in nodes.output()

    # no nodes at all for the pair: open loop at a fixed rate, every job answered with no_pool
    out = tmp_path / "load.json"
    load = PyschedProcess(["load", "--url", server.url, "--token", server.client_token, "--pairs", "sw:tl",
                           "--rate", "50", "--duration", "1", "--json", out], log_dir=str(tmp_path), name="load")
    load.spawn()
    assert load.wait(WAIT) == 1  # nothing answered ok
    summary = json.loads(out.read_text())
    assert summary["sent"] > 0 and summary["answered"] == summary["sent"]
    assert summary["errors"] == {"no_pool": summary["sent"]} and summary["ok"] == 0
    assert "no_pool" in load.output()

    # a wrong client token stops the generator with the error
    load = PyschedProcess(["load", "--url", server.url, "--token", "wrong", "--duration", "1"],
                          log_dir=str(tmp_path), name="bad-load")
    load.spawn()
    assert load.wait(WAIT) == 1
    assert "unauthorized" in load.output()


def test_building_the_parser_loads_no_serve_extra():
    """`pysched simulate` must work without the serve extra: building the
    parser (which adds the `nodes` and `load` arguments) imports none of it."""
    import subprocess
    import sys
    from pathlib import Path

    import pysched

    code = ("import sys, pysched.tools.cli as c; c.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'websockets', 'httpx', 'msgspec', 'starlette', 'uvicorn', 'httptools', 'uvloop'}))")
    env = {**os.environ, "PYTHONPATH": str(Path(pysched.__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=WAIT,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
