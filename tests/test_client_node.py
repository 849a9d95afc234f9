"""The node SDK (:class:`pysched.client.NodeClient`) against a real ``pysched serve`` process.

The server runs under uvicorn in a child process on a free loopback port
(:class:`pysched.client.testing.ServeProcess`); the nodes run in the test's
own event loop, the job clients too (or in threads). Every wait is a poll
or a blocking receive with a generous deadline; no assertion depends on
how fast anything runs.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import pysched
from pysched.client import (
    AuthError,
    Job,
    JobClient,
    JobFailed,
    NodeClient,
    NoNodeAvailable,
    ServeError,
)
from pysched.client.testing import ServeProcess

WAIT = 60.0  # the most any single event may take on a loaded 2-core machine


def run(coro, timeout: float = 4 * WAIT):
    """Run ``coro`` on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(cond, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


async def nodes_view(client: JobClient) -> dict:
    resp = await client.ahttp.get("/v1/nodes")
    resp.raise_for_status()
    return resp.json()


def node(server: ServeProcess, node_id: str, **kw) -> NodeClient:
    kw.setdefault("languages", ["zh", "en"])
    kw.setdefault("token", server.node_token)
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 1.0)
    return NodeClient(server.ws_url, node_id, **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServeProcess(["--heartbeat-timeout", "3600", "--default-timeout", "60"],
                       log_dir=str(tmp_path_factory.mktemp("serve")))
    srv.start(timeout=WAIT)
    yield srv
    srv.stop()


def jobs_client(server: ServeProcess, token: str | None = "client") -> JobClient:
    return JobClient(server.url, token=server.client_token if token == "client" else token, timeout=WAIT)


# ---------------------------------------------------------------- registration, heartbeats, round trip
def test_register_heartbeat_and_round_trip(server):
    async def main():
        load = {"cpu": 12.5, "gpu": 30.0, "mem": 40.0}
        async with node(server, "rt-1", max_concurrency=3, services=["asr", "nmt", "tts", "semantic"],
                        load=lambda: load, heartbeat_interval=0.2) as n, jobs_client(server) as c:
            assert n.connected and n.heartbeat_interval == 0.2
            view = await nodes_view(c)
            assert view["rt-1"]["connected"] is True
            assert view["rt-1"]["max_concurrency"] == 3
            # heartbeats carry the callback's figures, read fresh for every beat
            await until(lambda: n.counters["heartbeats"] >= 1, "a heartbeat")
            load["cpu"] = 22.5
            for _ in range(int(WAIT / 0.1)):
                if (await nodes_view(c))["rt-1"]["cpu"] == 22.5:
                    break
                await asyncio.sleep(0.1)
            view = await nodes_view(c)
            assert view["rt-1"]["cpu"] == 22.5 and view["rt-1"]["gpu"] == 30.0

            seen: list[Job] = []

            async def serve():
                async for job in n.jobs():
                    seen.append(job)
                    assert n.running == 1
                    assert await job.accept()
                    assert await job.reply({"text": job.payload["text"].upper(), "src": job.src})
                    assert not await job.reply("twice")  # answered once only
                    assert n.running == 0

            worker = asyncio.ensure_future(serve())
            result = await c.asubmit("rt-session", "zh-CN", "en-US", {"text": "ni hao"})
            assert result.ok and result.node_id == "rt-1" and result.attempts == 1
            assert result.payload == {"text": "NI HAO", "src": "zh"}
            job = seen[0]
            assert job.job_id == result.job_id and job.session_id == "rt-session"
            assert (job.src, job.tgt, job.attempt) == ("zh", "en", 1)
            assert job.deadline is not None and job.remaining is not None
            assert job.done and not job.cancelled
            assert n.counters["jobs"] == 1 and n.counters["replies"] == 1
            worker.cancel()
        # a clean close marks the node offline on the server
        async with jobs_client(server) as c:
            for _ in range(int(WAIT / 0.05)):
                view = await nodes_view(c)
                if not view["rt-1"]["connected"]:
                    break
                await asyncio.sleep(0.05)
            assert view["rt-1"]["connected"] is False
            assert view["rt-1"]["status"] == "offline"

    run(main())


def test_fail_and_retry_and_on_job_callback(server):
    async def main():
        # on_job: a plain callback answering synchronously (what `pysched nodes` does)
        def answer(job: Job) -> None:
            if job.payload == "bad":
                job.fail_nowait("model crashed")
            elif job.payload == "elsewhere" and job.attempt == 1:
                job.fail_nowait("out of memory", retry=True)
            else:
                job.reply_nowait({"attempt": job.attempt, "node": "cb-1"})

        async with node(server, "cb-1", on_job=answer, languages=["ja", "ko"]) as n1, \
                node(server, "cb-2", on_job=answer, languages=["ja", "ko"]) as n2, jobs_client(server) as c:
            with pytest.raises(RuntimeError, match="on_job"):
                async for _ in n1.jobs():
                    pass
            bad = await c.asubmit("cb-s", "ja", "ko", "bad")
            assert not bad.ok and bad.error == "model crashed"
            with pytest.raises(JobFailed):
                bad.unwrap()
            # retry=True fails over to the other node: second attempt answers
            r = await c.asubmit("cb-s", "ja", "ko", "elsewhere")
            assert r.ok and r.attempts == 2 and r.payload["attempt"] == 2
            assert n1.counters["failures"] + n2.counters["failures"] == 2
            assert n1.counters["replies"] + n2.counters["replies"] == 1

    run(main())


def test_cancel_on_deadline_reaches_the_node(server):
    async def main():
        cancelled: list[Job] = []
        async with node(server, "dl-1", languages=["fi", "sv"], on_cancel=cancelled.append) as n, \
                jobs_client(server) as c:
            got: list[Job] = []

            async def hold():
                async for job in n.jobs():
                    got.append(job)
                    await job.accept()  # ... and never answer

            worker = asyncio.ensure_future(hold())
            with pytest.raises((JobFailed, NoNodeAvailable)) as info:
                # one node only: the deadline passes, the failover finds no other node
                await c.asubmit("dl-s", "fi", "sv", "slow", timeout=0.5)
            assert info.value.status in (503, 504)
            job = got[0]
            reason = await asyncio.wait_for(job.wait_cancelled(), WAIT)
            assert reason == "timeout" and job.cancelled and cancelled == [job]
            assert n.running == 0
            assert not await job.reply("too late")  # nothing is sent for a cancelled job
            worker.cancel()

    run(main())


def test_drain_then_no_node_with_breakdown(server):
    async def main():
        async with node(server, "dr-1", languages=["nl", "da"]) as n, jobs_client(server) as c:
            await n.drain()
            for _ in range(int(WAIT / 0.05)):
                if (await nodes_view(c))["dr-1"]["status"] == "draining":
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(NoNodeAvailable) as info:
                await c.asubmit("dr-s", "nl", "da", 1)
            err = info.value
            assert isinstance(err, pysched.NoNodeAvailable) and isinstance(err, ServeError)
            assert err.status == 503 and err.code == "no_node"
            assert err.breakdown == {"not_ready": 1} and err.best_reason == "not_ready"
            assert err.retry_after is not None and err.retry_after >= 1
            # register again (what resume() does) and it takes jobs again
            await n.resume()
            await until(lambda: n.connected, "re-registered")

            async def serve():
                async for job in n.jobs():
                    await job.reply("back")

            worker = asyncio.ensure_future(serve())
            for _ in range(int(WAIT / 0.05)):
                try:
                    r = await c.asubmit("dr-s", "nl", "da", 1)
                    break
                except NoNodeAvailable:  # the re-registration is processed in order, but poll anyway
                    await asyncio.sleep(0.05)
            assert r.ok and r.payload == "back"
            worker.cancel()

    run(main())


# ---------------------------------------------------------------- auth and fatal closes
def test_auth_errors_are_not_retried(server):
    async def main():
        for token, status in (("wrong-token", 401), (server.client_token, 403), (None, 401)):
            n = node(server, "auth-1", token=token)
            with pytest.raises(AuthError) as info:
                await n.connect(timeout=WAIT)
            assert info.value.status == status
            assert n.closed and not n.connected
            with pytest.raises(AuthError):  # jobs() reports the same error
                async for _ in n.jobs():
                    pass
            await n.close()

    run(main())


def test_replaced_connection_stops_the_older_client(server):
    async def main():
        first = node(server, "dup-1")
        await first.connect(timeout=WAIT)
        async with node(server, "dup-1") as second:
            await until(lambda: first.closed, "the first connection closed as replaced")
            with pytest.raises(ServeError) as info:
                async for _ in first.jobs():
                    pass
            assert info.value.code == "replaced"
            assert second.connected
        await first.close()

    run(main())


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="node_id"):
        NodeClient("ws://127.0.0.1:1", "", languages=["zh"])
    with pytest.raises(ValueError, match="languages"):
        NodeClient("ws://127.0.0.1:1", "n", languages=[])
    with pytest.raises(TypeError, match="languages"):
        NodeClient("ws://127.0.0.1:1", "n", languages="zh")
    with pytest.raises(ValueError, match="max_concurrency"):
        NodeClient("ws://127.0.0.1:1", "n", languages=["zh"], max_concurrency=0)
    with pytest.raises(ValueError, match="url"):
        NodeClient("ftp://127.0.0.1:1", "n", languages=["zh"])
    with pytest.raises(ValueError, match="heartbeat_interval"):
        NodeClient("ws://127.0.0.1:1", "n", languages=["zh"], heartbeat_interval=-1)
    with pytest.raises(ValueError, match="load has unknown heartbeat fields"):
        NodeClient("ws://127.0.0.1:1", "n", languages=["zh"], load={"temperature": 3})


def test_connect_gives_up_after_its_timeout_when_nothing_listens():
    from pysched.client.testing import free_port

    async def main():
        n = NodeClient(f"ws://127.0.0.1:{free_port()}", "nobody", languages=["zh"], backoff_initial=0.05,
                       backoff_max=0.2)
        with pytest.raises(ServeError) as info:
            await n.connect(timeout=1.0)
        assert isinstance(info.value, ConnectionError)
        await n.close()
        n = NodeClient(f"ws://127.0.0.1:{free_port()}", "nobody", languages=["zh"], reconnect=False)
        with pytest.raises(ConnectionError):
            await n.connect(timeout=WAIT)
        await n.close()

    run(main())


# ---------------------------------------------------------------- reconnection
def test_reconnects_and_registers_again_after_a_server_restart(tmp_path):
    srv = ServeProcess(["--heartbeat-timeout", "3600", "--grace", "1"], log_dir=str(tmp_path))
    srv.start(timeout=WAIT)
    try:
        async def main():
            lost: list[Job] = []
            async with node(srv, "rc-1", on_cancel=lost.append) as n:
                held: list[Job] = []

                async def serve():
                    async for job in n.jobs():
                        if job.payload == "hold":
                            held.append(job)  # in flight when the server goes away
                        else:
                            await job.reply({"epoch": n.counters["connects"]})

                worker = asyncio.ensure_future(serve())
                async with jobs_client(srv) as c:
                    first = await c.asubmit("rc-s", "zh", "en", "before")
                    assert first.payload == {"epoch": 1}
                    holding = asyncio.ensure_future(c.asubmit("rc-s", "zh", "en", "hold"))
                    await until(lambda: held, "the held job delivered")
                # stop (SIGTERM drains; the held job is cancelled at the end of its grace) and start again
                await asyncio.to_thread(srv.restart, WAIT)
                await until(lambda: n.counters["connects"] >= 2 and n.connected, "re-registered", 2 * WAIT)
                assert held[0].cancelled and held[0].cancel_reason in ("disconnected", "draining", "cancelled")
                assert lost and lost[0] is held[0]
                assert not await held[0].reply("late")
                with pytest.raises(ServeError):
                    await holding
                async with jobs_client(srv) as c:
                    after = await c.asubmit("rc-s", "zh", "en", "after")
                assert after.ok and after.payload == {"epoch": n.counters["connects"]}
                assert n.counters["disconnects"] >= 1
                worker.cancel()

        run(main())
    finally:
        srv.stop()


def test_bad_answers_and_heartbeats_raise_locally_and_change_nothing(server):
    async def main():
        async with node(server, "bad-1", languages=["hu", "ro"]) as n, jobs_client(server) as c:
            with pytest.raises(ValueError, match="cpu"):
                await n.heartbeat(cpu=150.0)  # the server would refuse it (and the batch it rides in)
            with pytest.raises(ValueError, match="unknown heartbeat fields"):
                await n.heartbeat(temperature=3)
            await n.heartbeat(cpu=50.0, healthy=True)

            async def serve():
                async for job in n.jobs():
                    with pytest.raises(TypeError, match="payload"):
                        await job.reply(object())
                    with pytest.raises(ValueError, match="payload"):
                        await job.reply("x" * (n.max_message_bytes + 1))
                    assert job.live and n.running == 1  # still ours to answer
                    with pytest.raises(ValueError, match="error"):
                        await job.fail("")
                    assert await job.reply("fine")

            worker = asyncio.ensure_future(serve())
            r = await c.asubmit("bad-s", "hu", "ro", 1)
            assert r.ok and r.payload == "fine"
            assert n.counters["errors"] == 0  # the server never had anything to refuse
            worker.cancel()

    run(main())
