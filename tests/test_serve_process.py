"""``pysched serve`` as a real process on loopback, spoken to over raw WebSockets and HTTP.

The server runs under uvicorn in a child process (``python -m pysched serve``
on a free port, via :class:`pysched.client.testing.ServeProcess`); nodes are
raw ``websockets`` connections in this process or node processes of their
own (killed with SIGKILL for the failover tests); clients are ``httpx``.
Nothing here depends on timing: every wait is a poll or a blocking receive
with a generous deadline, and deadlines the tests provoke are short only so
the test does not sit idle, never asserted upon.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from pysched.client.testing import ServeProcess

WAIT = 60.0  # seconds: the most any single event may take on a loaded 2-core machine


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def poll(cond, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.05)


class RawNode:
    """A node speaking the protocol by hand over a synchronous WebSocket."""

    def __init__(self, server: ServeProcess, node_id: str, languages=("zh", "en"), max_concurrency: int = 2,
                 token: str | None = None, **register) -> None:
        self.node_id = node_id
        self._connection = connect(f"{server.ws_url}/v1/nodes",
                                   additional_headers=bearer(token or server.node_token), open_timeout=WAIT,
                                   close_timeout=5)
        self.ws = self._connection.__enter__()
        self.send({"type": "register", "node_id": node_id, "languages": list(languages),
                   "max_concurrency": max_concurrency, **register})
        msg = self.recv()
        assert msg["type"] == "registered", msg
        self.registered = msg

    def send(self, obj) -> None:
        self.ws.send(json.dumps(obj))

    def recv(self, timeout: float = WAIT) -> dict:
        return json.loads(self.ws.recv(timeout=timeout))

    def recv_type(self, kind: str, timeout: float = WAIT) -> dict:
        """The next message of type ``kind`` (others, e.g. a cancel, are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.1, deadline - time.monotonic()))
            if msg["type"] == kind:
                return msg

    def answer(self, job: dict, ok: bool = True, **extra) -> None:
        self.send({"type": "accept", "job_id": job["job_id"]})
        self.send({"type": "result", "job_id": job["job_id"], "ok": ok, "payload": {"echo": job.get("payload")},
                   **extra})

    def close(self) -> None:
        self._connection.__exit__(None, None, None)

    def __enter__(self) -> RawNode:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# A node in a process of its own: accepts every job, answers after DELAY s
# ("echo") or never ("hold"), and logs what it sees as JSON lines, including
# how many jobs it ever held at once.
NODE_SCRIPT = textwrap.dedent('''
    import asyncio, json, sys, websockets
    url, token, node_id, mode, conc, log = sys.argv[1:7]
    delay = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
    active, peak = set(), 0
    out = open(log, "a", buffering=1)
    def note(**kw):
        out.write(json.dumps(kw) + "\\n")
    async def work(ws, job):
        await asyncio.sleep(delay)
        if job["job_id"] in active:
            active.discard(job["job_id"])
            await ws.send(json.dumps({"type": "result", "job_id": job["job_id"], "ok": True,
                                      "payload": {"node": node_id, "echo": job.get("payload")}}))
    async def main():
        global peak
        headers = {"Authorization": "Bearer " + token}
        async with websockets.connect(url + "/v1/nodes", additional_headers=headers) as ws:
            await ws.send(json.dumps({"type": "register", "node_id": node_id, "languages": ["zh", "en"],
                                      "max_concurrency": int(conc)}))
            note(event="registered", msg=json.loads(await ws.recv()))
            async def beat():
                while True:
                    await ws.send(json.dumps({"type": "heartbeat", "running": len(active)}))
                    await asyncio.sleep(0.5)
            asyncio.ensure_future(beat())
            async for raw in ws:
                msg = json.loads(raw)
                if msg["type"] == "job":
                    active.add(msg["job_id"])
                    peak = max(peak, len(active))
                    note(event="job", job_id=msg["job_id"], attempt=msg["attempt"], peak=peak)
                    await ws.send(json.dumps({"type": "accept", "job_id": msg["job_id"]}))
                    if mode == "echo":
                        asyncio.ensure_future(work(ws, msg))
                elif msg["type"] == "cancel":
                    active.discard(msg["job_id"])
                    note(event="cancel", job_id=msg["job_id"], reason=msg["reason"])
                else:
                    note(event=msg["type"], msg=msg)
    asyncio.run(main())
''')


class NodeProcess:
    def __init__(self, tmp: Path, server: ServeProcess, node_id: str, mode: str, conc: int = 2,
                 delay: float = 0.0) -> None:
        script = tmp / "node_script.py"
        if not script.exists():
            script.write_text(NODE_SCRIPT)
        self.log = tmp / f"{node_id}.jsonl"
        self.log.touch()
        self.proc = subprocess.Popen([sys.executable, str(script), server.ws_url, server.node_token or "-",
                                      node_id, mode, str(conc), str(self.log), str(delay)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(tmp / f"{node_id}.err", "ab"))  # noqa: SIM115  the child owns it
        poll(lambda: any(e["event"] == "registered" for e in self.events()), f"{node_id} registered")

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def jobs(self) -> list[dict]:
        return [e for e in self.events() if e["event"] == "job"]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def nodes(tmp):
    made: list[NodeProcess] = []
    yield made
    for n in made:
        n.stop()


def start_server(tmp: Path, *extra: str, **kw) -> ServeProcess:
    return ServeProcess(list(extra), log_dir=str(tmp), **kw).start(timeout=WAIT)


@pytest.fixture
def server(tmp):
    srv = start_server(tmp, "--heartbeat-timeout", "3600")
    yield srv
    srv.stop(signal.SIGKILL)


def http(server: ServeProcess, token: str | None = "client") -> httpx.Client:
    tok = {"client": server.client_token, "admin": server.admin_token, "node": server.node_token}.get(token, token)
    return httpx.Client(base_url=server.url, headers=bearer(tok), timeout=WAIT * 2)


def stats(server: ServeProcess) -> dict:
    with http(server) as c:
        return c.get("/v1/stats").json()


def node_view(server: ServeProcess) -> dict:
    with http(server) as c:
        return c.get("/v1/nodes").json()


def post_job_async(pool, server, **body):
    body.setdefault("session_id", "s1")
    body.setdefault("src", "zh")
    body.setdefault("tgt", "en")

    def call():
        with http(server) as c:
            return c.post("/v1/jobs", json=body)

    return pool.submit(call)


# ------------------------------------------------------------------ registration, heartbeats, round trip
def test_registration_heartbeats_and_job_round_trip(server):
    with RawNode(server, "gpu-1", ("zh-CN", "en"), 3, services=["asr", "nmt", "tts", "semantic"]) as node:
        assert node.registered["heartbeat_interval"] > 0
        node.send({"type": "heartbeat", "running": 1, "cpu": 33.0, "gpu": 44.0, "mem": 55.0})
        view = poll(lambda: (v := node_view(server)) and v.get("gpu-1", {}).get("cpu") == 33.0 and v,
                    "heartbeat applied")
        info = view["gpu-1"]
        assert info["status"] == "ready" and info["connected"] is True and info["max_concurrency"] == 3
        assert (info["gpu"], info["mem"], info["running"]) == (44.0, 55.0, 1)
        assert sorted(info["languages"]) == ["en", "zh"]

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            fut = post_job_async(pool, server, src="zh-TW", payload={"text": "你好"})
            job = node.recv_type("job")
            assert (job["session_id"], job["src"], job["tgt"], job["attempt"]) == ("s1", "zh", "en", 1)
            assert job["payload"] == {"text": "你好"} and job["deadline"] > time.time() - 3600
            assert stats(server)["reservations"] == 1
            node.answer(job)
            r = fut.result(WAIT)
        assert r.status_code == 200, r.text
        assert r.json() == {"job_id": job["job_id"], "node_id": "gpu-1", "ok": True,
                            "payload": {"echo": {"text": "你好"}}, "error": None, "attempts": 1}
        assert stats(server)["reservations"] == 0
    # the connection closed: offline at once
    poll(lambda: node_view(server)["gpu-1"]["status"] == "offline", "offline after close")
    with http(server) as c:
        r = c.post("/v1/jobs", json={"session_id": "s1", "src": "zh", "tgt": "en"})
    assert r.status_code == 503 and r.json()["breakdown"] == {"offline": 1}


def test_session_stream_answers_every_job_once(server):
    """Four nodes answering from threads; one stream sends 300 jobs in batches."""
    import threading

    stop = threading.Event()
    counts: dict[str, int] = {}

    def serve(node: RawNode) -> None:
        while not stop.is_set():
            try:
                msg = node.recv(timeout=0.5)
            except TimeoutError:
                continue
            except ConnectionClosed:
                return
            if msg["type"] == "job":
                counts[node.node_id] = counts.get(node.node_id, 0) + 1
                node.answer(msg)

    nodes = [RawNode(server, f"n{i}", max_concurrency=8) for i in range(4)]
    threads = [threading.Thread(target=serve, args=(n,), daemon=True) for n in nodes]
    for t in threads:
        t.start()
    try:
        h = bearer(server.client_token)
        with connect(f"{server.ws_url}/v1/sessions/stream-1?batch=1", additional_headers=h,
                     open_timeout=WAIT) as ws:
            sent = 0
            answers: dict = {}
            while sent < 300 or len(answers) < 300:
                if sent < 300 and sent - len(answers) < 16:
                    batch = [{"type": "job", "request_id": sent + i, "src": "zh", "tgt": "en", "payload": sent + i}
                             for i in range(min(8, 300 - sent))]
                    ws.send(json.dumps(batch))
                    sent += len(batch)
                    continue
                frame = json.loads(ws.recv(timeout=WAIT))
                for msg in frame if isinstance(frame, list) else [frame]:
                    assert msg["request_id"] not in answers, "answered twice"
                    answers[msg["request_id"]] = msg
        assert set(answers) == set(range(300))
        errors = [m for m in answers.values() if m["type"] != "result"]
        # 32 slots, at most 16 in flight: capacity never runs out
        assert not errors, errors[:3]
        assert all(m["payload"] == {"echo": rid} for rid, m in answers.items())
        assert len({m["job_id"] for m in answers.values()}) == 300
        assert sum(counts.values()) == 300
        poll(lambda: stats(server)["reservations"] == 0, "every reservation released")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for n in nodes:
            n.close()


# ------------------------------------------------------------------ failover
@pytest.mark.parametrize("how", ["kill", "close"])
def test_node_lost_mid_job_fails_over_without_over_commit(tmp, nodes, how):
    """A node dies (SIGKILL) or closes holding jobs: they finish on the other node, none lost or doubled.

    The other node has half the slots: with ``--max-wait`` the failed-over
    jobs wait (bounded) for its capacity instead of failing with 503.
    """
    server = start_server(tmp, "--max-wait", "60", "--heartbeat-timeout", "3600")
    nodes.append(server)
    holder = NodeProcess(tmp, server, "holder", "hold", conc=4)
    nodes.append(holder)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = [post_job_async(pool, server, session_id=f"s{i}", payload=i, prefer="holder") for i in range(4)]
        poll(lambda: len(holder.jobs()) == 4, "the holder got all four jobs")
        worker = NodeProcess(tmp, server, "worker", "echo", conc=2, delay=0.05)
        nodes.append(worker)
        if how == "kill":
            holder.kill()
        else:
            holder.proc.send_signal(signal.SIGTERM)  # the websockets client closes with 1000 on exit
            holder.proc.wait(30)
        results = [f.result(WAIT * 2) for f in futs]
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    bodies = [r.json() for r in results]
    assert [b["payload"] for b in bodies] == [{"node": "worker", "echo": i} for i in range(4)]
    assert {b["attempts"] for b in bodies} == {2} and {b["node_id"] for b in bodies} == {"worker"}
    worker_jobs = worker.jobs()
    assert sorted(j["job_id"] for j in worker_jobs) == sorted(b["job_id"] for b in bodies)  # each once
    assert {j["attempt"] for j in worker_jobs} == {2}
    assert max(j["peak"] for j in worker_jobs) <= 2, "the worker got more jobs than its max concurrency"
    assert node_view(server)["holder"]["status"] == "offline"
    poll(lambda: stats(server)["reservations"] == 0, "no reservation leaked")
    with http(server) as c:
        metrics = c.get("/metrics").text
    assert 'pysched_failovers_total{reason="node_lost"} 4.0' in metrics


def test_deadline_expiry_redelivers_then_answers_timeout(tmp):
    """Two nodes that never answer: each gets the job once, then a cancel; the client gets 504."""
    srv = start_server(tmp, "--max-attempts", "2", "--heartbeat-timeout", "3600")
    try:
        with RawNode(srv, "slow-1") as a, RawNode(srv, "slow-2") as b:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                r = post_job_async(pool, srv, timeout=0.5, payload="x").result(WAIT)
            assert r.status_code == 504, r.text
            body = r.json()
            assert body["error"] == "timeout" and body["attempts"] == 2 and body["job_id"]
            for node in (a, b):
                job = node.recv()
                assert job["type"] == "job" and job["job_id"] == body["job_id"]
                assert node.recv() == {"type": "cancel", "job_id": body["job_id"], "reason": "timeout"}
        assert stats(srv)["reservations"] == 0
        with httpx.Client(base_url=srv.url, timeout=WAIT) as c:
            assert 'pysched_failovers_total{reason="timeout"} 2.0' in c.get("/metrics").text
    finally:
        srv.stop(signal.SIGKILL)


def test_at_most_once_never_redelivers_an_accepted_job(tmp):
    srv = start_server(tmp, "--guarantee", "at_most_once", "--heartbeat-timeout", "3600")
    try:
        a = RawNode(srv, "a")
        assert a.registered["guarantee"] == "at_most_once"
        with RawNode(srv, "b") as b, concurrent.futures.ThreadPoolExecutor(2) as pool:
            # accepted, then the node disconnects: the job ends with node_lost
            fut = post_job_async(pool, srv, prefer="a", session_id="x")
            job = a.recv_type("job")
            a.send({"type": "accept", "job_id": job["job_id"]})
            poll(lambda: _committed(srv) == 1, "the accept committed the job")
            a.close()
            r = fut.result(WAIT)
            assert r.status_code == 502 and r.json()["error"] == "node_lost" and r.json()["attempts"] == 1
            # never accepted: redelivered to b
            a2 = RawNode(srv, "a")
            fut = post_job_async(pool, srv, prefer="a", session_id="y")
            job = a2.recv_type("job")
            a2.close()
            job_b = b.recv_type("job")
            assert job_b["job_id"] == job["job_id"] and job_b["attempt"] == 2
            b.answer(job_b)
            r = fut.result(WAIT)
            assert r.status_code == 200 and r.json()["node_id"] == "b" and r.json()["attempts"] == 2
        assert stats(srv)["reservations"] == 0
    finally:
        srv.stop(signal.SIGKILL)


def _committed(srv: ServeProcess) -> int:
    return stats(srv)["backend"]["committed"]


# ------------------------------------------------------------------ drain
def test_admin_and_node_drain(server):
    with RawNode(server, "a") as a, RawNode(server, "b") as b, http(server, "admin") as admin:
        r = admin.post("/v1/nodes/a/drain")
        assert r.status_code == 200 and r.json() == {"node_id": "a", "status": "draining"}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            for i in range(3):
                fut = post_job_async(pool, server, session_id=f"d{i}")
                b.answer(b.recv_type("job"))
                assert fut.result(WAIT).json()["node_id"] == "b"
            b.send({"type": "drain"})
            poll(lambda: node_view(server)["b"]["status"] == "draining", "b draining")
            with http(server) as c:
                r = c.post("/v1/jobs", json={"session_id": "d", "src": "zh", "tgt": "en"})
            assert r.status_code == 503 and r.json()["breakdown"] == {"not_ready": 2}
            assert admin.post("/v1/nodes/a/resume").json()["status"] == "ready"
            fut = post_job_async(pool, server, session_id="d9")
            a.answer(a.recv_type("job"))
            assert fut.result(WAIT).json()["node_id"] == "a"
        # admin removal closes the node's connection with 4410
        assert admin.delete("/v1/nodes/b").status_code == 200
        with pytest.raises(ConnectionClosed) as info:
            b.recv_type("never")
        assert info.value.rcvd.code == 4410
        assert "b" not in node_view(server)


# ------------------------------------------------------------------ auth
def test_each_token_kind_over_the_wire(server):
    url = server.ws_url
    for token, status in ((None, 401), ("wrong", 401), (server.client_token, 403), (server.admin_token, 403)):
        with pytest.raises(InvalidStatus) as info:
            connect(f"{url}/v1/nodes", additional_headers=bearer(token), open_timeout=WAIT)
        assert info.value.response.status_code == status
    for token, status in ((None, 401), (server.node_token, 403)):
        with pytest.raises(InvalidStatus) as info:
            connect(f"{url}/v1/sessions/s", additional_headers=bearer(token), open_timeout=WAIT)
        assert info.value.response.status_code == status
    body = {"session_id": "s", "src": "zh", "tgt": "en"}
    with httpx.Client(base_url=server.url, timeout=WAIT) as c:
        assert c.post("/v1/jobs", json=body).status_code == 401
        assert c.post("/v1/jobs", json=body, headers=bearer(server.node_token)).status_code == 403
        assert c.post("/v1/nodes/x/drain", headers=bearer(server.client_token)).status_code == 403
        assert c.post("/v1/nodes/x/drain", headers=bearer(server.admin_token)).status_code == 404
        assert c.post("/v1/jobs", json=body, headers=bearer(server.admin_token)).status_code == 404  # no pool
    assert stats(server)["nodes_total"] == 0


def test_refuses_to_start_without_tokens(tmp):
    from pysched.client.testing import PyschedProcess

    proc = PyschedProcess(["serve", "--port", "0"], log_dir=str(tmp), name="notoken",
                          env={"PYSCHED_NODE_TOKEN": "", "PYSCHED_CLIENT_TOKEN": "", "PYSCHED_ADMIN_TOKEN": ""})
    proc.spawn()
    assert proc.wait(WAIT) == 2
    assert "--insecure" in proc.output()


# ------------------------------------------------------------------ bad input over the wire
def test_malformed_and_oversized_messages_over_the_wire(tmp):
    srv = start_server(tmp, "--max-message-bytes", "2048", "--heartbeat-timeout", "3600")
    try:
        with RawNode(srv, "n1") as node:
            node.send({"type": "heartbeat", "cpu": 10.0})
            poll(lambda: node_view(srv)["n1"]["cpu"] == 10.0, "heartbeat")
            node.ws.send("not json")
            assert node.recv()["code"] == "bad_message"
            node.send({"type": "heartbeat", "cpu": -1})
            err = node.recv()
            assert (err["code"], err["field"]) == ("invalid", "cpu")
            assert node.registered["max_message_bytes"] == 2048
            node.ws.send(json.dumps({"type": "heartbeat", "cpu": 99.0, "pad": "x" * 4000}))
            assert node.recv()["code"] == "too_big"
            with pytest.raises(ConnectionClosed) as info:
                node.recv()
            assert info.value.rcvd.code == 1009
        info = poll(lambda: (v := node_view(srv)["n1"])["status"] == "offline" and v, "offline")
        assert info["cpu"] == 10.0  # no refused message changed anything

        h = bearer(srv.client_token)
        with connect(f"{srv.ws_url}/v1/sessions/s", additional_headers=h, open_timeout=WAIT) as ws:
            for frame in ("{", json.dumps({"type": "job"}), json.dumps({"type": "nope"})):
                ws.send(frame)
                err = json.loads(ws.recv(timeout=WAIT))
                assert err["type"] == "error" and "request_id" not in err
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=WAIT)
            assert info.value.rcvd.code == 4400
        with httpx.Client(base_url=srv.url, headers=h, timeout=WAIT) as c:
            r = c.post("/v1/jobs", content=b"{" + b" " * 3000 + b"}")
            assert r.status_code == 413 and r.json()["error"] == "too_big"
            r = c.post("/v1/jobs", content=b"{bad")
            assert r.status_code == 400 and r.json()["error"] == "bad_message"
            r = c.post("/v1/jobs", json={"session_id": "s", "src": "zh", "tgt": "en", "prefer": 5})
            assert r.status_code == 422 and r.json()["field"] == "prefer"
            r = c.post("/v1/jobs", json={"session_id": "s", "src": "zh", "tgt": "xx-"})
            assert r.status_code == 422 and r.json()["field"] == "tgt"
            r = c.post("/v1/jobs", json={"session_id": "s", "src": "de", "tgt": "fr"})
            assert r.status_code == 404 and r.json()["error"] == "no_pool"
            r = c.post("/v1/jobs", json={"session_id": "s", "src": "zh", "tgt": "en"})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"] == "no_node" and r.json()["breakdown"] == {"offline": 1}
        s = stats(srv)
        assert s["reservations"] == 0 and s["server"]["jobs_in_flight"] == 0
    finally:
        srv.stop(signal.SIGKILL)


def test_metrics_over_the_wire(server):
    with RawNode(server, "m1", max_concurrency=4) as node, concurrent.futures.ThreadPoolExecutor(1) as pool:
        node.send({"type": "heartbeat", "cpu": 5.0})
        fut = post_job_async(pool, server)
        node.answer(node.recv_type("job"))
        assert fut.result(WAIT).status_code == 200
        poll(lambda: node_view(server)["m1"]["cpu"] == 5.0, "heartbeat")
        with httpx.Client(base_url=server.url, timeout=WAIT) as c:
            r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
    for line in ('pysched_nodes{status="ready"} 1.0', 'pysched_pool_capacity{pool="en-zh"} 4.0',
                 'pysched_connections{kind="node"} 1.0', 'pysched_dispatches_total{outcome="ok",reason=""} 1.0',
                 'pysched_jobs_total{outcome="result"} 1.0', 'pysched_heartbeats_total{result="applied"} 1.0',
                 'pysched_job_seconds_count{endpoint="jobs"} 1.0', "pysched_dispatch_seconds_count 1.0"):
        assert line in text, line


# ------------------------------------------------------------------ SIGTERM
def test_sigterm_drains_in_flight_jobs_then_exits(tmp):
    srv = start_server(tmp, "--grace", "120", "--heartbeat-timeout", "3600")
    try:
        node = RawNode(srv, "n1", max_concurrency=2)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            fut = post_job_async(pool, srv)
            job = node.recv_type("job")
            srv.proc.send_signal(signal.SIGTERM)
            with httpx.Client(base_url=srv.url, timeout=WAIT) as c:
                poll(lambda: c.get("/readyz").status_code == 503, "readyz says draining")
                assert c.get("/readyz").json() == {"status": "draining"}
                r = c.post("/v1/jobs", json={"session_id": "late", "src": "zh", "tgt": "en"},
                           headers=bearer(srv.client_token))
                assert r.status_code == 503 and r.json()["error"] == "draining"
            with pytest.raises(InvalidStatus) as info:
                connect(f"{srv.ws_url}/v1/nodes", additional_headers=bearer(srv.node_token), open_timeout=WAIT)
            assert info.value.response.status_code == 503
            assert srv.proc.poll() is None  # still serving the job in flight
            node.answer(job)
            r = fut.result(WAIT)
        assert r.status_code == 200 and r.json()["job_id"] == job["job_id"]
        with pytest.raises(ConnectionClosed) as info:
            node.recv_type("never")
        assert info.value.rcvd.code == 1001
        code = srv.wait(WAIT)
        assert code in (0, -signal.SIGTERM), srv.output()[-2000:]
    finally:
        srv.stop(signal.SIGKILL)


def test_sigterm_cancels_what_outlives_the_grace_period(tmp):
    srv = start_server(tmp, "--grace", "1", "--heartbeat-timeout", "3600")
    try:
        node = RawNode(srv, "n1")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = post_job_async(pool, srv)
            job = node.recv_type("job")
            srv.proc.send_signal(signal.SIGTERM)
            cancel = node.recv_type("cancel")
            assert cancel == {"type": "cancel", "job_id": job["job_id"], "reason": "draining"}
            r = fut.result(WAIT)
        assert r.status_code == 503 and r.json()["error"] == "draining"
        srv.wait(WAIT)
    finally:
        srv.stop(signal.SIGKILL)


# ------------------------------------------------------------------ two instances over Redis
def test_two_instances_share_capacity_through_redis(tmp, redis_server):
    url = f"unix://{redis_server.unix_socket}"
    a = start_server(tmp, "--redis", url, "--namespace", "serve-test", "--heartbeat-timeout", "3600", name="a")
    b = start_server(tmp, "--redis", url, "--namespace", "serve-test", "--heartbeat-timeout", "3600", name="b")
    try:
        node = RawNode(a, "shared", max_concurrency=1)
        # b learns of the node through the fleet stream
        poll(lambda: node_view(b).get("shared", {}).get("status") == "ready", "b sees the node")
        assert node_view(b)["shared"]["connected"] is False and node_view(a)["shared"]["connected"] is True
        body = {"session_id": "s", "src": "zh", "tgt": "en"}
        with http(a) as ca, http(b) as cb:
            held = cb.post("/v1/dispatch", json=body)
            assert held.status_code == 200 and held.json()["node_id"] == "shared"
            # the one slot is taken through b: a cannot over-commit it
            r = ca.post("/v1/dispatch", json={**body, "session_id": "t"})
            assert r.status_code == 503 and r.json()["breakdown"] == {"full": 1}, r.text
            r = ca.post("/v1/jobs", json={**body, "session_id": "t"})
            assert r.status_code == 503
            # released through a, by job id: capacity is back for everyone
            job_id = held.json()["job_id"]
            assert ca.post(f"/v1/jobs/{job_id}/release").json() == {"job_id": job_id, "released": True}
            # b has no connection to the node: it answers 503 naming it, and holds nothing
            # (b's view of the fleet's in-flight counts catches up within a second)
            poll(lambda: cb.get("/v1/explain?src=zh&tgt=en").json()["nodes"] == {"shared": "ok"}, "b sees room")
            r = cb.post("/v1/jobs", json=body)
            assert r.status_code == 503 and r.json()["best_reason"] == "not_connected", r.text
            # a delivers to its own node
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                fut = pool.submit(ca.post, "/v1/jobs", json=body)
                node.answer(node.recv_type("job"))
                r = fut.result(WAIT)
            assert r.status_code == 200 and r.json()["node_id"] == "shared"
            # the node drops: both instances see it offline
            node.close()
            poll(lambda: node_view(b)["shared"]["status"] == "offline", "b sees it offline")
            assert stats(a)["backend"]["name"] == "redis"
        client = redis_server.client()
        try:
            keys = [k for k in client.keys("*") if b"res" in k or b"job" in k]
            held_now = stats(a)["reservations"]
        finally:
            client.close()
        assert held_now == 0, keys
    finally:
        a.stop(signal.SIGKILL)
        b.stop(signal.SIGKILL)


def test_failover_with_the_redis_backend(tmp, redis_server):
    """The Redis backend runs scheduler calls off the event loop: failover must still release, then re-place."""
    url = f"unix://{redis_server.unix_socket}"
    srv = start_server(tmp, "--redis", url, "--namespace", "serve-failover", "--heartbeat-timeout", "3600")
    try:
        with RawNode(srv, "b", max_concurrency=1) as b, concurrent.futures.ThreadPoolExecutor(4) as pool:
            a = RawNode(srv, "a", max_concurrency=1)
            futs = [post_job_async(pool, srv, session_id="x", prefer="a")]
            job = a.recv_type("job")
            a.send({"type": "accept", "job_id": job["job_id"]})
            a.close()  # accepted, then lost: at_least_once redelivers it to b
            moved = b.recv_type("job")
            assert moved["job_id"] == job["job_id"] and moved["attempt"] == 2
            # b is full now (max 1): another job gets 503, nothing over-committed
            with http(srv) as c:
                r = c.post("/v1/jobs", json={"session_id": "y", "src": "zh", "tgt": "en"})
            assert r.status_code == 503 and r.json()["breakdown"] == {"offline": 1, "full": 1}, r.text
            b.answer(moved)
            r = futs[0].result(WAIT)
            assert r.status_code == 200 and r.json()["node_id"] == "b" and r.json()["attempts"] == 2
        poll(lambda: stats(srv)["reservations"] == 0, "every reservation released in Redis")
    finally:
        srv.stop(signal.SIGKILL)
