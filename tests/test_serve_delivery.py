"""Delivery (``pysched.serve.jobs``) driven directly: the orderings of the blocking (Redis) path.

With a shared backend, delivery runs its scheduler calls on a thread pool,
so a commit, a renew and a release of one job may run in any order. These
tests put the calls in the order under test by hand (a scheduler call that
fails, a late commit run after the job moved on) instead of racing threads:
nothing here depends on thread timing. Every wait is a poll with a generous
deadline.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import pysched
from pysched.errors import ReservationBackendUnavailable
from pysched.serve import ServeConfig
from pysched.serve.jobs import Delivery, JobState
from pysched.serve.metrics import Metrics
from pysched.serve.nodes import Link, NodeRegistry
from pysched.serve.protocol import Job, Result

WAIT = 60.0  # seconds: the most any single event may take on a loaded 2-core machine


class FakeLink(Link):
    """A node reached without a network: records what delivery sends it."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.jobs = {}
        self.closed = False
        self.sent: list = []

    def put(self, message) -> None:
        self.sent.append(message)

    def refuse_unknown(self, job_id: str) -> None:
        self.sent.append(("unknown", job_id))

    def jobs_sent(self) -> list[Job]:
        return [m for m in self.sent if isinstance(m, Job)]


async def until(cond, what: str):
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def sched():
    s = pysched.Scheduler(seed=7, heartbeat_timeout=3600.0)
    for node_id in ("a", "b"):
        s.register_node(node_id, ["zh", "en"], max_concurrency=2)
    yield s
    s.close()


def delivery_for(sched, **config) -> tuple[Delivery, dict[str, FakeLink]]:
    registry = NodeRegistry()
    links = {node_id: FakeLink(node_id) for node_id in ("a", "b")}
    for link in links.values():
        registry.bind(link)  # the registry keys links by node id; any Link will do
    metrics = Metrics(sched, lambda: {"jobs_in_flight": 0, "draining": False})
    # blocking=True: the thread-pool path a Redis backend takes, here over the in-process backend
    return Delivery(sched, registry, ServeConfig(insecure=True, **config), metrics, blocking=True), links


def submit(delivery: Delivery) -> tuple[JobState, list]:
    answers: list = []
    job = JobState("s1", "zh", "en", {"text": "hi"}, timeout=WAIT,
                   reply=lambda job, result, error: answers.append((result, error)))
    delivery.submit(job)
    return job, answers


async def first_attempt(delivery: Delivery, links: dict[str, FakeLink]):
    """Submit one job and wait for its first attempt: the job, its answers, the attempt's node, the other, the id."""
    job, answers = submit(delivery)
    await until(lambda: any(link.jobs_sent() for link in links.values()), "the first attempt")
    first = next(link for link in links.values() if link.jobs_sent())
    other = links["b" if first.node_id == "a" else "a"]
    return job, answers, first, other, first.jobs_sent()[0].job_id


def test_a_redelivery_never_goes_back_over_a_hold_it_could_not_release(sched):
    """A failed release before a redelivery: the job is answered, not sent back to the node that failed it.

    The redelivery dispatches with the same job id; dispatch answers a job id
    that still holds a reservation with that reservation (a retry), so a
    dispatch after the failed release would put the job back on the node
    that just failed it, and the release's scheduled retry would later free
    capacity the job uses there.
    """
    async def main() -> None:
        delivery, links = delivery_for(sched)
        delivery.start()
        try:
            job, answers, first, _, job_id = await first_attempt(delivery, links)
            assert sched.reservations.get(job_id).node_id == first.node_id

            release = sched.release
            calls = []

            def unreachable_once(job_id: str, *, node_id: str | None = None) -> bool:
                calls.append((job_id, node_id))
                if len(calls) == 1:
                    raise ReservationBackendUnavailable("redis down (simulated)")
                return release(job_id, node_id=node_id)

            sched.release = unreachable_once
            # the node asks for another node: release (fails), then redeliver
            delivery.on_result(first, Result(job_id=job_id, ok=False, error="busy", retry=True))
            def sent() -> int:
                return sum(len(link.jobs_sent()) for link in links.values())

            await until(lambda: answers or sent() > 1, "the job's answer or another attempt")
            assert sent() == 1, f"attempt 2 went to {[link.node_id for link in links.values() if link.jobs_sent()]}"
            result, error = answers[0]
            assert result is None and error.code == "backend_unavailable"
            assert error.job_id == job_id and error.attempts == 1
            # the scheduled retry of the release frees the old hold
            await until(lambda: sched.reservations.get(job_id) is None, "the release's retry")
            assert calls[1] == (job_id, first.node_id)
            assert sched.stats()["reservations"] == 0
            assert not delivery.jobs and delivery.in_flight == 0
        finally:
            delivery.close()

    asyncio.run(main())


def test_a_redelivery_releases_the_old_hold_first_and_excludes_its_node(sched):
    """The path the test above guards: the release goes through, the job moves to the other node."""
    async def main() -> None:
        delivery, links = delivery_for(sched)
        delivery.start()
        try:
            job, answers, first, other, job_id = await first_attempt(delivery, links)
            delivery.on_result(first, Result(job_id=job_id, ok=False, error="busy", retry=True))
            await until(other.jobs_sent, "the second attempt")
            assert other.jobs_sent()[0].job_id == job_id and other.jobs_sent()[0].attempt == 2
            assert sched.reservations.get(job_id).node_id == other.node_id
            assert not answers
            delivery.on_result(other, Result(job_id=job_id, ok=True, payload="done"))
            await until(lambda: sched.reservations.get(job_id) is None, "the release")
            assert answers[0][0].payload == "done" and answers[0][1] is None
        finally:
            delivery.close()

    asyncio.run(main())


def test_a_late_commit_or_renew_of_an_earlier_attempt_changes_nothing(sched):
    """The pool may run an attempt's commit or renew after its release and the redelivery.

    Both name the attempt's node, so the scheduler refuses them once the job
    is held elsewhere (or not at all): the new attempt's hold stays as it was.
    """
    async def main() -> None:
        delivery, links = delivery_for(sched)
        delivery.start()
        try:
            job, answers, first, other, job_id = await first_attempt(delivery, links)
            delivery.on_result(first, Result(job_id=job_id, ok=False, error="busy", retry=True))
            await until(other.jobs_sent, "the second attempt")
            held = sched.reservations.get(job_id)
            assert held.node_id == other.node_id and not held.committed

            # what the pool would run late: attempt 1's commit and renew, on its node
            delivery._settle_now(job_id, first.node_id, None)
            delivery._settle_now(job_id, first.node_id, 600.0)
            now = sched.reservations.get(job_id)
            assert now.node_id == other.node_id and not now.committed and now.expires_at == held.expires_at

            # and after the release of the last attempt: nothing to commit any more
            delivery.on_result(other, Result(job_id=job_id, ok=True, payload="done"))
            await until(lambda: sched.reservations.get(job_id) is None, "the release")
            delivery._settle_now(job_id, other.node_id, None)
            delivery._settle_now(job_id, other.node_id, 600.0)
            assert sched.reservations.get(job_id) is None and sched.stats()["reservations"] == 0
        finally:
            delivery.close()

    asyncio.run(main())
