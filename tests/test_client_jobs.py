"""The job SDK (:class:`pysched.client.JobClient`, sync and async, and session
streams) against a real ``pysched serve`` process.

Nodes are :class:`pysched.client.NodeClient` s, in the test's event loop or
in a thread with a loop of its own (for the synchronous face). Every wait is
bounded by a generous deadline; no assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

import pysched
from pysched.client import (
    AuthError,
    BadRequest,
    Job,
    JobClient,
    JobFailed,
    JobResult,
    NodeClient,
    NoNodeAvailable,
    NoPoolForLanguagePair,
    ServeError,
    ServeUnavailable,
    UnknownJob,
    WrongNode,
)
from pysched.client.testing import ServeProcess, free_port

WAIT = 60.0


def run(coro, timeout: float = 4 * WAIT):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServeProcess(["--heartbeat-timeout", "3600", "--default-timeout", "60"],
                       log_dir=str(tmp_path_factory.mktemp("serve")))
    srv.start(timeout=WAIT)
    yield srv
    srv.stop()


def node(server: ServeProcess, node_id: str, languages, **kw) -> NodeClient:
    return NodeClient(server.ws_url, node_id, token=server.node_token, languages=languages, **kw)


class NodeThread:
    """An echo node on an event loop of its own in a thread (for the synchronous client)."""

    def __init__(self, server: ServeProcess, node_id: str, languages, max_concurrency: int = 4) -> None:
        self.loop = asyncio.new_event_loop()
        self.node = node(server, node_id, languages, max_concurrency=max_concurrency,
                         on_job=lambda job: job.reply_nowait({"echo": job.payload, "node": node_id}))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> NodeThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.node.connect(timeout=WAIT), self.loop).result(WAIT + 5)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.node.close(), self.loop).result(WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


# ---------------------------------------------------------------- synchronous face
def test_sync_submit_dispatch_commit_release(server):
    with NodeThread(server, "sync-1", ["de", "en"]), \
            JobClient(server.url, token=server.client_token, timeout=WAIT) as c:
        r = c.submit("sync-s", "de", "en-GB", {"text": "hallo"}, services=["asr", "nmt"])
        assert isinstance(r, JobResult)
        assert r.ok and r.node_id == "sync-1" and r.payload == {"echo": {"text": "hallo"}, "node": "sync-1"}
        assert r.request_id is None and r.unwrap() == r.payload

        d = c.dispatch("sync-s", "de", "en", job_id="own-job-1")
        assert (d.job_id, d.node_id, d.session_id, d.src, d.tgt) == ("own-job-1", "sync-1", "sync-s", "de", "en")
        assert c.dispatch("sync-s", "de", "en", job_id="own-job-1").node_id == "sync-1"  # safe retry
        with pytest.raises(WrongNode) as info:
            c.commit("own-job-1", node_id="someone-else")
        assert isinstance(info.value, pysched.UnknownJob) and info.value.status == 409
        c.commit("own-job-1", node_id="sync-1")
        c.renew("own-job-1", lease=600.0, node_id="sync-1")
        with pytest.raises(BadRequest) as info:
            c.renew("own-job-1", lease=-1.0)
        assert info.value.field == "lease"
        assert c.release("own-job-1") is True
        assert c.release("own-job-1") is False  # idempotent: nothing held any more
        with pytest.raises(UnknownJob) as info:
            c.commit("own-job-1")
        assert isinstance(info.value, pysched.UnknownJob) and info.value.status == 404


def test_sync_error_mapping(server):
    with NodeThread(server, "err-1", ["ru", "uk"], max_concurrency=1), \
            JobClient(server.url, token=server.client_token, timeout=WAIT) as c:
        with pytest.raises(NoPoolForLanguagePair) as info:
            c.submit("err-s", "sw", "tl", 1)
        err = info.value
        assert isinstance(err, pysched.NoPoolForLanguagePair) and isinstance(err, ServeError)
        assert (err.status, err.code, err.src, err.tgt) == (404, "no_pool", "sw", "tl")

        with pytest.raises(BadRequest) as info:
            c.submit("err-s", "ru", "uk", 1, timeout=-1)
        assert isinstance(info.value, ValueError)
        assert info.value.status == 422 and info.value.field == "timeout"

        with pytest.raises(BadRequest) as info:
            c.submit("err-s", "ru", "uk", object())
        assert info.value.field == "payload"
        with pytest.raises(ValueError, match="session_id"):
            c.submit("", "ru", "uk", 1)

        # capacity: hold the node's only slot with a bare decision, then a job gets 503
        held = c.dispatch("err-s", "ru", "uk")
        with pytest.raises(NoNodeAvailable) as info:
            c.submit("err-s", "ru", "uk", 1)
        err = info.value
        assert isinstance(err, pysched.NoNodeAvailable)
        assert err.status == 503 and err.breakdown == {"full": 1} and err.best_reason == "full"
        assert err.retry_after is not None and err.retry_after >= 1
        assert c.release(held.job_id)
        assert c.submit("err-s", "ru", "uk", 2).ok

    for token, status in (("not-a-token", 401), (server.node_token, 403)):
        with JobClient(server.url, token=token) as c:
            with pytest.raises(AuthError) as info:
                c.submit("s", "ru", "uk", 1)
            assert info.value.status == status
    with JobClient(f"http://127.0.0.1:{free_port()}", timeout=5) as c:
        with pytest.raises(ServeUnavailable) as info:
            c.submit("s", "ru", "uk", 1)
        assert isinstance(info.value, ConnectionError)


# ---------------------------------------------------------------- asynchronous face
def test_async_submit_dispatch_commit_release(server):
    async def main():
        async with node(server, "async-1", ["es", "en"], max_concurrency=8,
                        on_job=lambda j: j.reply_nowait(j.payload * 2)), \
                JobClient(server.url, token=server.client_token, timeout=WAIT) as c:
            results = await asyncio.gather(*(c.asubmit(f"as-{i}", "es", "en", i) for i in range(8)))
            assert [r.payload for r in results] == [2 * i for i in range(8)]
            assert len({r.job_id for r in results}) == 8
            d = await c.adispatch("as-x", "es", "en")
            await c.acommit(d.job_id)
            await c.arenew(d.job_id)
            assert await c.arelease(d.job_id) is True
            with pytest.raises(UnknownJob):
                await c.arenew(d.job_id)
            assert await c.arelease(d.job_id) is False
            with pytest.raises(UnknownJob):
                await c.acommit(d.job_id)
            with pytest.raises(NoPoolForLanguagePair):
                await c.asubmit("as-x", "sw", "tl", 1)

    run(main())


# ---------------------------------------------------------------- session streams
def test_session_stream_answers_in_completion_order_with_job_ids(server):
    """The node answers the jobs in an order of its choosing; the stream
    delivers them in that (completion) order, each with its request id and job id."""

    async def main():
        got: dict[int, Job] = {}
        all_in = asyncio.Event()

        def collect(job: Job) -> None:
            got[job.payload["n"]] = job
            if len(got) == 4:
                all_in.set()

        async with node(server, "ord-1", ["pt", "it"], max_concurrency=4, on_job=collect), \
                JobClient(server.url, token=server.client_token) as c:
            async with c.session("ord-s") as s:
                rids = [await s.send("pt", "it", {"n": n}) for n in range(4)]
                assert rids == [1, 2, 3, 4] and s.pending == 4
                await asyncio.wait_for(all_in.wait(), WAIT)
                reply_order = [2, 0, 3, 1]
                for n in reply_order:
                    assert await got[n].reply({"n": n})
                results = [r async for r in s]  # ends once every job sent has its answer
                assert s.pending == 0
            assert [r.payload["n"] for r in results] == reply_order
            assert [r.request_id for r in results] == [rids[n] for n in reply_order]
            assert [r.job_id for r in results] == [got[n].job_id for n in reply_order]
            assert all(r.ok and r.node_id == "ord-1" and r.attempts == 1 for r in results)
            assert all(job.session_id == "ord-s" for job in got.values())

    run(main())


def test_session_stream_errors_and_cancel(server):
    async def main():
        held: list[Job] = []

        def on_job(job: Job) -> None:
            if job.payload == "hold":
                held.append(job)
            else:
                job.reply_nowait(job.payload)

        async with node(server, "ss-1", ["ko", "vi"], max_concurrency=2, on_job=on_job) as n, \
                JobClient(server.url, token=server.client_token) as c:
            async with c.session("ss-s") as s:
                ok = await s.request("ko", "vi", "fine")
                assert ok.ok and ok.payload == "fine" and ok.request_id == 1

                with pytest.raises(NoPoolForLanguagePair) as info:
                    await s.request("sw", "tl", 1)
                assert info.value.status == 404
                with pytest.raises(BadRequest) as info:
                    await s.request("ko", "vi", 1, timeout=-1)
                assert info.value.field == "timeout"

                # errors also arrive in the iteration, as results with a code and an exception
                rid = await s.send("sw", "tl", 2)
                [failed] = [r async for r in s]
                assert failed.request_id == rid and not failed.ok and failed.code == "no_pool"
                assert isinstance(failed.exception, NoPoolForLanguagePair)
                with pytest.raises(NoPoolForLanguagePair):
                    failed.unwrap()

                # cancel a job in flight: the node is told, the stream answers `cancelled`
                rid = await s.send("ko", "vi", "hold")
                for _ in range(int(WAIT / 0.02)):
                    if held:
                        break
                    await asyncio.sleep(0.02)
                await s.cancel(rid)
                cancelled = await asyncio.wait_for(s.recv(), WAIT)
                assert cancelled.request_id == rid and cancelled.code == "cancelled"
                assert isinstance(cancelled.exception, JobFailed)
                assert await asyncio.wait_for(held[0].wait_cancelled(), WAIT)
                assert n.counters["cancels"] == 1

            with pytest.raises(ServeUnavailable):
                await s.send("ko", "vi", 1)  # closed

    run(main())


def test_session_stream_auth_and_many_jobs(server):
    async def main():
        async with JobClient(server.url, token="wrong") as c:
            with pytest.raises(AuthError) as info:
                async with c.session("auth-s"):
                    pass
            assert info.value.status == 401
        async with node(server, "many-1", ["pl", "cs"], max_concurrency=8,
                        on_job=lambda j: j.reply_nowait(j.payload)), \
                node(server, "many-2", ["pl", "cs"], max_concurrency=8,
                     on_job=lambda j: j.reply_nowait(j.payload)), \
                JobClient(server.url, token=server.client_token) as c:
            async with c.session("many-s") as s:
                answered: list[JobResult] = []
                sent = 0
                # 300 jobs, never more than the 16 slots in flight: every one answered exactly once
                while len(answered) < 300:
                    while sent < 300 and sent - len(answered) < 16:
                        await s.send("pl", "cs", sent)
                        sent += 1
                    answered.append(await asyncio.wait_for(s.recv(), WAIT))
            assert sorted(r.payload for r in answered) == list(range(300))
            assert all(r.ok for r in answered)
            assert len({r.job_id for r in answered}) == 300
            assert {r.node_id for r in answered} <= {"many-1", "many-2"}

    run(main())


def test_job_client_arguments():
    with pytest.raises(ValueError, match="url"):
        JobClient("127.0.0.1:8000")
    with pytest.raises(ValueError, match="timeout"):
        JobClient("http://127.0.0.1:8000", timeout=0)
    with pytest.raises(ValueError, match="max_connections"):
        JobClient("http://127.0.0.1:8000", max_connections=0)
    with pytest.raises(ValueError, match="token"):
        JobClient("http://127.0.0.1:8000", token="")
    with pytest.raises(ValueError, match="session_id"):
        JobClient("http://127.0.0.1:8000").session("")
    c = JobClient("ws://127.0.0.1:8000/")
    assert c.url == "http://127.0.0.1:8000"
    assert c.session("a b/c").url == "ws://127.0.0.1:8000/v1/sessions/a%20b%2Fc?batch=1"
