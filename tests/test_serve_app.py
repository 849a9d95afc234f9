"""``create_app`` in-process, through Starlette's TestClient: the fast paths of the service.

Everything here goes through the real ASGI application (routing, auth,
decoding, the scheduler, WebSocket handlers); only the network is replaced by
the TestClient's in-memory transport. The real-process tests are
``tests/test_serve_process.py``.
"""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import pysched
from pysched.serve import ServeConfig, create_app
from pysched.serve.protocol import CloseCode

NODE, CLIENT, ADMIN = "node-secret", "client-secret", "admin-secret"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def sched():
    s = pysched.Scheduler(seed=7, heartbeat_timeout=3600.0)
    yield s
    s.close()


@pytest.fixture
def client(sched):
    config = ServeConfig(node_token=NODE, client_token=CLIENT, admin_token=ADMIN, max_message_bytes=4096,
                         default_timeout=60.0)
    with TestClient(create_app(sched, config)) as c:
        yield c


def register(ws, node_id="n1", languages=("zh", "en"), max_concurrency=2, **extra):
    ws.send_text(json.dumps({"type": "register", "node_id": node_id, "languages": list(languages),
                             "max_concurrency": max_concurrency, **extra}))
    msg = ws.receive_json()
    assert msg["type"] == "registered" and msg["node_id"] == node_id
    return msg


# ------------------------------------------------------------------ configuration
def test_create_app_refuses_to_start_without_tokens(sched):
    with pytest.raises(ValueError, match="client_token"):
        create_app(sched, ServeConfig(node_token="a", admin_token="b"))
    with pytest.raises(ValueError, match="node_token, client_token, admin_token"):
        create_app(sched, ServeConfig())
    create_app(sched, ServeConfig(insecure=True))  # allowed, explicitly


@pytest.mark.parametrize("bad", [{"guarantee": "exactly_once"}, {"max_attempts": 0}, {"default_timeout": -1.0},
                                 {"max_wait": -1.0}, {"node_token": ""}])
def test_config_validation_names_the_setting(sched, bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        create_app(sched, ServeConfig(insecure=True, **bad))


def test_create_app_is_mountable(sched):
    from starlette.applications import Starlette
    from starlette.routing import Mount

    host = Starlette(routes=[Mount("/sched", app=create_app(sched, ServeConfig(insecure=True)))])
    with TestClient(host) as c:
        assert c.get("/sched/healthz").json() == {"status": "ok"}
        r = c.post("/sched/v1/dispatch", json={"session_id": "s", "src": "zh", "tgt": "en"})
        assert r.status_code == 404 and r.json()["error"] == "no_pool"


# ------------------------------------------------------------------ auth
@pytest.mark.parametrize("path,method", [("/v1/jobs", "post"), ("/v1/dispatch", "post"), ("/v1/stats", "get"),
                                         ("/v1/explain?src=zh&tgt=en", "get"), ("/v1/nodes", "get"),
                                         ("/v1/jobs/j/release", "post")])
def test_client_endpoints_need_the_client_or_admin_token(client, path, method):
    call = getattr(client, method)
    r = call(path)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert call(path, headers=bearer("wrong")).status_code == 401
    assert call(path, headers={"Authorization": "Basic abc"}).status_code == 401
    r = call(path, headers=bearer(NODE))
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert call(path, headers=bearer(CLIENT)).status_code not in (401, 403)
    assert call(path, headers=bearer(ADMIN)).status_code not in (401, 403)


def test_admin_endpoints_need_the_admin_token(client, sched):
    sched.register_node("n1", ["zh", "en"])
    for token, status in ((None, 401), ("nope", 401), (NODE, 403), (CLIENT, 403)):
        headers = bearer(token) if token else {}
        assert client.post("/v1/nodes/n1/drain", headers=headers).status_code == status
        assert client.delete("/v1/nodes/n1", headers=headers).status_code == status
    assert sched.node("n1")["status"] == "ready"  # nothing changed
    r = client.post("/v1/nodes/n1/drain", headers=bearer(ADMIN))
    assert r.status_code == 200 and r.json() == {"node_id": "n1", "status": "draining"}
    assert client.post("/v1/nodes/n1/resume", headers=bearer(ADMIN)).json()["status"] == "ready"
    r = client.post("/v1/nodes/ghost/drain", headers=bearer(ADMIN))
    assert r.status_code == 404 and r.json()["error"] == "unknown_node"
    assert client.delete("/v1/nodes/n1", headers=bearer(ADMIN)).json() == {"node_id": "n1", "status": "removed"}
    with pytest.raises(KeyError):
        sched.node("n1")


@pytest.mark.parametrize("token,status", [(None, 401), ("wrong", 401), (CLIENT, 403), (ADMIN, 403)])
def test_node_socket_refuses_other_tokens_at_the_handshake(client, sched, token, status):
    headers = bearer(token) if token else {}
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/v1/nodes", headers=headers):
        pass
    assert sched.stats()["nodes_total"] == 0


def test_session_socket_refuses_a_node_token(client):
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/v1/sessions/s1", headers=bearer(NODE)):
        pass


def test_probes_and_metrics_need_no_token(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/metrics").status_code == 200


# ------------------------------------------------------------------ bad input over HTTP
def test_bad_bodies_name_the_field_and_change_nothing(client, sched):
    sched.register_node("n1", ["zh", "en"])
    before = sched.stats()
    h = bearer(CLIENT)
    cases = [
        (b"{not json", 400, "bad_message", None),
        (b"[1, 2]", 400, "bad_message", None),
        (json.dumps({"src": "zh", "tgt": "en"}), 422, "invalid", "session_id"),
        (json.dumps({"session_id": "", "src": "zh", "tgt": "en"}), 422, "invalid", "session_id"),
        (json.dumps({"session_id": "s", "src": 5, "tgt": "en"}), 422, "invalid", "src"),
        (json.dumps({"session_id": "s", "src": "zh!", "tgt": "en"}), 422, "invalid", "src"),
        (json.dumps({"session_id": "s", "src": "zh", "tgt": "auto"}), 422, "invalid", "tgt"),
        (json.dumps({"session_id": "s", "src": "zh", "tgt": "en", "services": "asr"}), 422, "invalid", "services"),
        (json.dumps({"session_id": "s", "src": "zh", "tgt": "en", "tenant": ""}), 422, "invalid", "tenant"),
    ]
    for body, status, code, field in cases:
        for path in ("/v1/jobs", "/v1/dispatch"):
            r = client.post(path, content=body, headers=h)
            assert r.status_code == status, (path, body, r.text)
            assert r.json()["error"] == code
            assert r.json().get("field") == field, (body, r.json())
    r = client.post("/v1/jobs", json={"session_id": "s", "src": "zh", "tgt": "en", "timeout": 0}, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "timeout"
    r = client.post("/v1/dispatch", json={"session_id": "s", "src": "zh", "tgt": "en", "exclude": "n1"}, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "exclude"
    r = client.post("/v1/jobs", content=b"x" * 5000, headers=h)
    assert r.status_code == 413 and r.json()["error"] == "too_big"
    after = sched.stats()
    assert after["reservations"] == before["reservations"] == 0
    assert after["sessions"] == before["sessions"]
    assert after["dispatch"] == before["dispatch"]


def test_no_pool_is_404_naming_the_pair(client, sched):
    sched.register_node("n1", ["zh", "en"])
    r = client.post("/v1/jobs", json={"session_id": "s", "src": "fr", "tgt": "de"}, headers=bearer(CLIENT))
    assert r.status_code == 404
    body = r.json()
    assert body["error"] == "no_pool" and body["src"] == "fr" and body["tgt"] == "de"
    assert "'fr' -> 'de'" in body["message"]


def test_no_capacity_is_503_at_once_with_breakdown_and_retry_after(client, sched):
    sched.register_node("n1", ["zh", "en"], max_concurrency=1)
    sched.register_node("n2", ["zh", "en"], max_concurrency=1)
    sched.drain_node("n2")
    held = client.post("/v1/dispatch", json={"session_id": "a", "src": "zh", "tgt": "en"}, headers=bearer(CLIENT))
    assert held.status_code == 200 and held.json()["node_id"] == "n1"
    for path in ("/v1/jobs", "/v1/dispatch"):
        r = client.post(path, json={"session_id": "b", "src": "zh", "tgt": "en"}, headers=bearer(CLIENT))
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        body = r.json()
        assert body["error"] == "no_node"
        assert body["breakdown"] == {"full": 1, "not_ready": 1}
        assert body["best_reason"] in ("full", "not_ready")
    assert sched.stats()["reservations"] == 1


def test_dispatch_commit_release_renew(client, sched):
    sched.register_node("n1", ["zh", "en"], max_concurrency=2)
    sched.register_node("n2", ["zh", "en"], max_concurrency=2)
    h = bearer(CLIENT)
    a = client.post("/v1/dispatch", json={"session_id": "s", "src": "zh-CN", "tgt": "en-US"}, headers=h).json()
    assert set(a) == {"job_id", "node_id", "pool_id", "session_id", "src", "tgt"}
    assert (a["src"], a["tgt"], a["session_id"]) == ("zh", "en", "s")
    other = "n2" if a["node_id"] == "n1" else "n1"
    job = a["job_id"]
    # a retry with the same job id returns the same assignment
    again = client.post("/v1/dispatch", json={"session_id": "s", "src": "zh", "tgt": "en", "job_id": job},
                        headers=h).json()
    assert again == a
    r = client.post(f"/v1/jobs/{job}/commit", json={"node_id": other}, headers=h)
    assert r.status_code == 409 and r.json()["error"] == "wrong_node"
    assert client.post(f"/v1/jobs/{job}/commit", json={"node_id": a["node_id"]}, headers=h).json() == {
        "job_id": job, "committed": True}
    assert client.post(f"/v1/jobs/{job}/renew", headers=h).json() == {"job_id": job, "renewed": True}
    assert client.post(f"/v1/jobs/{job}/release", json={"node_id": other}, headers=h).json()["released"] is False
    assert sched.stats()["reservations"] == 1
    assert client.post(f"/v1/jobs/{job}/release", headers=h).json() == {"job_id": job, "released": True}
    assert client.post(f"/v1/jobs/{job}/release", headers=h).json()["released"] is False
    r = client.post(f"/v1/jobs/{job}/commit", headers=h)
    assert r.status_code == 404 and r.json()["error"] == "unknown_job"
    # exclude and prefer reach the scheduler
    b = client.post("/v1/dispatch", json={"session_id": "t", "src": "zh", "tgt": "en", "exclude": ["n1"]},
                    headers=h).json()
    assert b["node_id"] == "n2"
    assert client.post("/v1/jobs/x/renew", json={"lease": -1}, headers=h).json()["field"] == "lease"


def test_explain_and_stats(client, sched):
    sched.register_node("n1", ["zh", "en"])
    sched.register_node("n2", ["zh", "en"])
    sched.drain_node("n2")
    h = bearer(CLIENT)
    ex = client.get("/v1/explain?src=zh&tgt=en", headers=h).json()
    assert ex["nodes"] == {"n1": "ok", "n2": "not_ready"} and ex["breakdown"] == {"ok": 1, "not_ready": 1}
    ex = client.get("/v1/explain?src=zh&tgt=en&exclude=n1", headers=h).json()
    assert ex["nodes"]["n1"] == "excluded"
    r = client.get("/v1/explain?src=zh", headers=h)
    assert r.status_code == 422 and r.json()["field"] == "tgt"
    r = client.get("/v1/explain?src=zh&tgt=e!", headers=h)
    assert r.status_code == 422 and r.json()["field"] == "tgt"
    stats = client.get("/v1/stats", headers=h).json()
    assert stats["nodes_total"] == 2 and stats["server"]["guarantee"] == "at_least_once"
    assert stats["backend"]["name"] == "local"
    nodes = client.get("/v1/nodes", headers=h).json()
    assert set(nodes) == {"n1", "n2"} and nodes["n1"]["connected"] is False


# ------------------------------------------------------------------ nodes over the WebSocket
def test_node_registers_heartbeats_and_goes_offline_when_it_closes(client, sched):
    with client.websocket_connect("/v1/nodes", headers=bearer(NODE)) as ws:
        reg = register(ws, "n1", ("zh-CN", "en"), 3, services=["asr", "nmt"])
        assert reg["heartbeat_interval"] > 0 and reg["version"] == 1 and reg["guarantee"] == "at_least_once"
        info = sched.node("n1")
        assert info["languages"] == frozenset({"zh", "en"}) and info["max_concurrency"] == 3
        assert info["services"] == frozenset({"asr", "nmt"})
        ws.send_text(json.dumps({"type": "heartbeat", "running": 1, "cpu": 12.5, "gpu": 40, "mem": 30}))
        ws.send_text(json.dumps({"type": "heartbeat", "healthy": True}))  # flush marker
        # a heartbeat has no reply: poll the scheduler (the TestClient runs the app in another thread)
        _poll(lambda: sched.node("n1")["cpu"] == 12.5)
        assert sched.node("n1")["running"] == 1 and sched.node("n1")["gpu"] == 40.0
        assert client.get("/v1/nodes", headers=bearer(CLIENT)).json()["n1"]["connected"] is True
        ws.send_text(json.dumps({"type": "drain"}))
        _poll(lambda: sched.node("n1")["status"] == "draining")
    _poll(lambda: sched.node("n1")["status"] == "offline")
    metrics = client.get("/metrics").text
    assert 'pysched_heartbeats_total{result="applied"} 2.0' in metrics


def _poll(cond, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_node_bad_messages_get_errors_then_a_close(client, sched):
    with client.websocket_connect("/v1/nodes", headers=bearer(NODE)) as ws:
        register(ws, "n1")
        ws.send_text("{nope")
        err = ws.receive_json()
        assert err["type"] == "error" and err["code"] == "bad_message"
        ws.send_text(json.dumps({"type": "heartbeat", "cpu": 500}))
        err = ws.receive_json()
        assert err["code"] == "invalid" and err["field"] == "cpu"
        assert sched.node("n1")["cpu"] == 0.0  # unchanged
        ws.send_text(json.dumps({"type": "hello"}))
        err = ws.receive_json()
        assert err["code"] == "unknown_type"
        with pytest.raises(WebSocketDisconnect) as info:
            ws.receive_json()
        assert info.value.code == CloseCode.BAD_MESSAGES
    _poll(lambda: sched.node("n1")["status"] == "offline")


def test_node_oversized_messages_get_too_big_then_close_1009(client, sched):
    with client.websocket_connect("/v1/nodes", headers=bearer(NODE)) as ws:
        register(ws, "n1")
        big = json.dumps({"type": "heartbeat", "services": ["x" * 60] * 64})
        assert len(big) > 4096
        for _ in range(3):
            ws.send_text(big)
            err = ws.receive_json()
            assert err["code"] == "too_big"
        with pytest.raises(WebSocketDisconnect) as info:
            ws.receive_json()
        assert info.value.code == CloseCode.MESSAGE_TOO_BIG
    assert sched.node("n1")["services"] == frozenset({"asr", "nmt", "tts", "semantic"})


def test_node_must_register_first_and_cannot_change_its_id(client, sched):
    with client.websocket_connect("/v1/nodes", headers=bearer(NODE)) as ws:
        ws.send_text(json.dumps({"type": "heartbeat", "cpu": 1}))
        assert ws.receive_json()["code"] == "not_registered"
        ws.send_text(json.dumps({"type": "register", "node_id": "n1", "languages": []}))
        err = ws.receive_json()
        assert err["code"] == "invalid" and err["field"] == "languages"
        assert sched.stats()["nodes_total"] == 0
        register(ws, "n1")
        ws.send_text(json.dumps({"type": "register", "node_id": "n2", "languages": ["zh"]}))
        with pytest.raises(WebSocketDisconnect) as info:
            ws.receive_json()
        assert info.value.code == CloseCode.WRONG_NODE
    assert sched.stats()["nodes_total"] == 1  # n2 never registered


def test_a_new_connection_replaces_the_old_one(client, sched):
    with client.websocket_connect("/v1/nodes", headers=bearer(NODE)) as old:
        register(old, "n1")
        with client.websocket_connect("/v1/nodes", headers=bearer(NODE)) as new:
            register(new, "n1")
            with pytest.raises(WebSocketDisconnect) as info:
                old.receive_json()
            assert info.value.code == CloseCode.REPLACED
            assert sched.node("n1")["status"] == "ready"  # the node stays: the new connection holds it


def test_answers_for_jobs_not_in_flight_are_refused_without_closing(client, sched):
    with client.websocket_connect("/v1/nodes", headers=bearer(NODE)) as ws:
        register(ws, "n1")
        for i in range(5):
            ws.send_text(json.dumps({"type": "result", "job_id": f"j{i}", "ok": True}))
            err = ws.receive_json()
            assert err["code"] == "unknown_job" and err["field"] == "job_id"
        ws.send_text(json.dumps({"type": "accept", "job_id": "zz"}))
        assert ws.receive_json()["code"] == "unknown_job"


# ------------------------------------------------------------------ jobs end to end
def test_job_round_trip_and_session_stream(client, sched):
    h = bearer(CLIENT)
    with client.websocket_connect("/v1/nodes", headers=bearer(NODE)) as node:
        register(node, "n1", max_concurrency=4)
        with client.websocket_connect("/v1/sessions/s1", headers=h) as stream:
            stream.send_text(json.dumps([
                {"type": "job", "request_id": 1, "src": "zh", "tgt": "en", "payload": {"text": "a"}},
                {"type": "job", "request_id": "two", "src": "zh", "tgt": "en", "payload": [1, 2]},
            ]))
            jobs = [node.receive_json(), node.receive_json()]
            assert [j["type"] for j in jobs] == ["job", "job"]
            assert {j["session_id"] for j in jobs} == {"s1"} and {j["attempt"] for j in jobs} == {1}
            assert sched.stats()["reservations"] == 2
            # answer in reverse order: results come back in completion order
            for j in reversed(jobs):
                node.send_text(json.dumps({"type": "accept", "job_id": j["job_id"]}))
                node.send_text(json.dumps({"type": "result", "job_id": j["job_id"], "ok": True,
                                           "payload": {"echo": j["payload"]}}))
            first, second = stream.receive_json(), stream.receive_json()
            assert (first["request_id"], second["request_id"]) == ("two", 1)
            assert first["payload"] == {"echo": [1, 2]} and second["payload"] == {"echo": {"text": "a"}}
            assert first["node_id"] == "n1" and first["ok"] is True and first["attempts"] == 1
            # duplicate request id while in flight, then a cancel
            stream.send_text(json.dumps({"type": "job", "request_id": 3, "src": "zh", "tgt": "en"}))
            job = node.receive_json()
            stream.send_text(json.dumps({"type": "job", "request_id": 3, "src": "zh", "tgt": "en"}))
            err = stream.receive_json()
            assert err["code"] == "duplicate_request" and err["request_id"] == 3
            stream.send_text(json.dumps({"type": "cancel", "request_id": 3}))
            err = stream.receive_json()
            assert err["code"] == "cancelled" and err["request_id"] == 3 and err["status"] == 499
            cancel = node.receive_json()
            assert cancel == {"type": "cancel", "job_id": job["job_id"], "reason": "cancelled"}
            # no pool / no capacity answers on the stream
            stream.send_text(json.dumps({"type": "job", "request_id": 4, "src": "fr", "tgt": "de"}))
            err = stream.receive_json()
            assert err["code"] == "no_pool" and err["status"] == 404 and err["request_id"] == 4
        _poll(lambda: sched.stats()["reservations"] == 0)


def test_post_job_with_ok_false_is_the_answer_and_retry_fails_over(client, sched):
    """A node's own error is the job's answer; ``retry: true`` sends it to another node."""
    import concurrent.futures

    h = bearer(CLIENT)
    with client.websocket_connect("/v1/nodes", headers=bearer(NODE)) as n1, \
            client.websocket_connect("/v1/nodes", headers=bearer(NODE)) as n2:
        register(n1, "n1")
        register(n2, "n2")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(client.post, "/v1/jobs", json={"session_id": "s", "src": "zh", "tgt": "en",
                                                              "prefer": "n1"}, headers=h)
            job = n1.receive_json()
            assert job["attempt"] == 1
            n1.send_text(json.dumps({"type": "result", "job_id": job["job_id"], "ok": False, "retry": True,
                                     "error": "gpu busy"}))
            job2 = n2.receive_json()
            assert job2["job_id"] == job["job_id"] and job2["attempt"] == 2
            n2.send_text(json.dumps({"type": "result", "job_id": job2["job_id"], "ok": False,
                                     "error": "bad audio"}))
            r = fut.result(60)
        assert r.status_code == 200
        assert r.json() == {"job_id": job["job_id"], "node_id": "n2", "ok": False, "payload": None,
                            "error": "bad audio", "attempts": 2}
    assert sched.stats()["reservations"] == 0


def test_metrics_content(client, sched):
    with client.websocket_connect("/v1/nodes", headers=bearer(NODE)) as node:
        register(node, "n1")
        client.post("/v1/jobs", json={"session_id": "s", "src": "fr", "tgt": "en"}, headers=bearer(CLIENT))
        text = client.get("/metrics").text
    for line in ('pysched_nodes{status="ready"} 1.0', 'pysched_pool_capacity{pool="en-zh"} 2.0',
                 'pysched_pool_in_flight{pool="en-zh"} 0.0', 'pysched_connections{kind="node"} 1.0',
                 'pysched_dispatches_total{outcome="no_pool",reason=""} 1.0',
                 'pysched_http_refused_total{code="no_pool",status="404"} 1.0',
                 'pysched_backend_available{backend="local"} 1.0', "pysched_dispatch_seconds_bucket",
                 'pysched_failovers_total{reason="node_lost"} 0.0', "pysched_jobs_in_flight 0.0"):
        assert line in text, line


def test_session_stream_in_flight_limit(sched):
    config = ServeConfig(insecure=True, max_session_in_flight=2, default_timeout=60.0)
    with TestClient(create_app(sched, config)) as c, c.websocket_connect("/v1/nodes") as node:
        register(node, "n1", max_concurrency=8)
        with c.websocket_connect("/v1/sessions/s") as stream:
            for rid in range(3):
                stream.send_text(json.dumps({"type": "job", "request_id": rid, "src": "zh", "tgt": "en"}))
            err = stream.receive_json()
            assert (err["code"], err["status"], err["request_id"]) == ("too_many_in_flight", 429, 2)
            jobs = [node.receive_json(), node.receive_json()]
            assert sched.stats()["reservations"] == 2  # the refused job reserved nothing
            for job in jobs:
                node.send_text(json.dumps({"type": "result", "job_id": job["job_id"], "ok": True}))
            assert {stream.receive_json()["request_id"], stream.receive_json()["request_id"]} == {0, 1}
            stream.send_text(json.dumps({"type": "job", "request_id": 2, "src": "zh", "tgt": "en"}))
            assert node.receive_json()["type"] == "job"  # room again


def test_every_metric_the_readme_lists_is_exposed(client):
    text = client.get("/metrics").text
    for name in ("pysched_dispatches_total", "pysched_dispatch_seconds_bucket", "pysched_job_seconds_bucket",
                 "pysched_jobs_total", "pysched_failovers_total", "pysched_heartbeats_total", "pysched_nodes",
                 "pysched_pool_capacity", "pysched_pool_in_flight", "pysched_connections",
                 "pysched_messages_refused_total", "pysched_http_refused_total"):
        assert f"\n# TYPE {name.removesuffix('_bucket')} " in text, name


def test_one_bad_job_in_a_batch_frame_does_not_sink_the_others(client, sched):
    with client.websocket_connect("/v1/nodes", headers=bearer(NODE)) as node:
        register(node, "n1", max_concurrency=4)
        with client.websocket_connect("/v1/sessions/s1", headers=bearer(CLIENT)) as stream:
            stream.send_text(json.dumps([
                {"type": "job", "request_id": 1, "src": "zh", "tgt": "en"},
                {"type": "job", "request_id": 2, "src": 5, "tgt": "en"},  # bad: src is not a str
                {"type": "job", "request_id": 3, "src": "zh", "tgt": "en"},
            ]))
            err = stream.receive_json()
            assert err["type"] == "error" and err["request_id"] == 2 and err["field"] == "src"
            jobs = [node.receive_json(), node.receive_json()]
            for j in jobs:
                node.send_text(json.dumps({"type": "result", "job_id": j["job_id"], "ok": True}))
            got = {stream.receive_json()["request_id"], stream.receive_json()["request_id"]}
            assert got == {1, 3}
        _poll(lambda: sched.stats()["reservations"] == 0)
