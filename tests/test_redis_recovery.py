"""RedisReservations across a Redis data loss, and the job lifecycle, on a real redis-server.

Issue 10, item 1 (backend level): a Redis restarted without persistence
must not let a node be over-committed while the processes holding its jobs
live on. Each test restarts the private server (``tests/redis_server.py``)
for real; the "processes" are separate backends, each with its own holder
id, driven one call at a time, so every ordering below is deterministic.
Also: commit/release/renew checked against a node, what other processes do
to a holder's jobs, and expiry reports (``on_expired``).

Nothing asserts timing: every wait polls with a long deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from pysched.redis import REFUSED_RECOVERING, RedisReservations
from pysched.reservations import REFUSED_FULL, Candidate, Reservation

pytest_plugins = ["redis_server"]

DEADLINE = 30.0


def wait_until(pred: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Proc:
    """One scheduler process's backend (own client, own holder id), nodes bound at slots 0, 1, ..."""

    def __init__(self, server: Any, name: str, nodes: dict[str, int], **kwargs: Any) -> None:
        self.client = server.client()
        kwargs.setdefault("reservation_ttl", 30.0)
        # Each ordering below is driven call by call, so the quiet period
        # after a data loss is off unless a test is about it.
        kwargs.setdefault("recovery_quiet", 0)
        self.expired: list[Reservation] = []
        self.b = RedisReservations(self.client, holder_id=name, **kwargs)
        self.b.configure(30.0, time.monotonic, on_expired=self.expired.extend)
        self.b.ensure_capacity(8)
        self.nodes = nodes
        for slot, (node, cap) in enumerate(nodes.items()):
            self.b.bind_node(slot, node, cap)

    def cand(self, node: str) -> Candidate:
        return Candidate(self.b._node_slot[node], node, 99, 0)

    def reserve(self, job: str, node: str) -> Reservation | list[str]:
        return self.b.try_reserve(job, [self.cand(node)], 0, "s")

    def rebind(self) -> None:
        for slot, (node, cap) in enumerate(self.nodes.items()):
            self.b.bind_node(slot, node, cap)


@pytest.fixture
def procs(redis_server: Any) -> Any:
    made: list[Proc] = []

    def make(name: str, nodes: dict[str, int], **kwargs: Any) -> Proc:
        p = Proc(redis_server, name, nodes, **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.client.close()


def restart(server: Any) -> None:
    server.stop()
    server.start()  # same socket, empty dataset
    assert server.client().dbsize() == 0


# -- item 1: a data loss does not over-commit --------------------------------------


def test_one_holder_keeps_its_committed_job_counted_across_a_restart(redis_server: Any, procs: Any) -> None:
    a = procs("A", {"n": 1})
    assert isinstance(a.reserve("j", "n"), Reservation)
    assert a.b.commit("j")
    restart(redis_server)
    a.rebind()  # the node's max went with the data
    # Before anything else A wrote its committed job back: the node is full.
    assert a.reserve("k", "n") == [REFUSED_FULL]
    assert a.b.count("n") == 1
    got = a.b.get("j")
    assert got is not None and got.committed and got.node_id == "n"
    # The lease kept its remaining lifetime (30 s TTL -> 3600 s lease), not a fresh TTL.
    assert redis_server.client().zscore("{pysched}:lease:n", "j") is not None
    st = a.b.stats()
    assert (st["recoveries"], st["reasserted"], st["held"], st["committed"]) == (1, 1, 1, 1)
    assert a.b.release("j") is True
    assert isinstance(a.reserve("k", "n"), Reservation)


def test_uncommitted_reservations_are_written_back_too(redis_server: Any, procs: Any) -> None:
    a = procs("A", {"n": 2})
    assert isinstance(a.reserve("r1", "n"), Reservation)
    assert isinstance(a.reserve("r2", "n"), Reservation)
    restart(redis_server)
    a.rebind()
    assert a.reserve("k", "n") == [REFUSED_FULL]
    assert a.b.count("n") == 2 and a.b.count() == 2
    assert not a.b.get("r1").committed  # type: ignore[union-attr]
    assert a.b.commit("r1") and a.b.release("r2")
    assert isinstance(a.reserve("k", "n"), Reservation)


def test_many_jobs_are_written_back_in_several_calls(redis_server: Any, procs: Any) -> None:
    from pysched.redis.reservations import _RECOVER_CHUNK

    n = 2 * _RECOVER_CHUNK + 50  # three recovery calls
    a = procs("A", {"n": n})
    for i in range(n):
        assert isinstance(a.reserve(f"j{i}", "n"), Reservation)
        if i % 3 == 0:
            assert a.b.commit(f"j{i}")
    restart(redis_server)
    a.rebind()
    a.b.load_scripts()  # the restart emptied the script cache: count no NOSCRIPT fallbacks
    a.b.round_trips = 0
    assert a.reserve("one-more", "n") == [REFUSED_FULL]
    # "epoch", three recovery calls, the reserve again
    assert a.b.round_trips == 5
    assert a.b.count("n") == n and a.b.stats()["reasserted"] == n
    client = redis_server.client()
    assert client.zcard("{pysched}:lease:n") == len(range(0, n, 3))
    assert client.zcard("{pysched}:recovering") == 0


def test_capacity_waits_for_every_holder_it_knew(redis_server: Any, procs: Any) -> None:
    a = procs("A", {"n": 1})  # holds the node's only slot
    b = procs("B", {"n": 1})  # dispatches; holds nothing
    assert isinstance(a.reserve("j", "n"), Reservation) and a.b.commit("j")
    a.b.refresh_inflight()
    assert b.b.refresh_inflight() == {"n": 1}  # B saw A alive, holding
    assert b.b._holders_seen == ("A",)
    restart(redis_server)
    b.rebind()
    # A has not written its job back: Redis alone would call "n" empty.
    for _ in range(3):
        assert b.reserve("k", "n") == [REFUSED_RECOVERING]
    # B's own view is not overwritten by Redis's zeros meanwhile.
    assert b.b.refresh_inflight() == {"n": 0}
    assert b.b.inflight[0] == 1 and b.b.stats()["recovering"] is True
    a.b.refresh_inflight()  # A's periodic look: it re-asserts first
    assert b.reserve("k", "n") == [REFUSED_FULL]
    assert b.b.refresh_inflight() == {"n": 1} and b.b.stats()["recovering"] is False
    assert a.b.release("j") is True
    assert isinstance(b.reserve("k", "n"), Reservation)


def test_a_holder_that_never_returns_is_waited_for_at_most_the_grace(redis_server: Any, procs: Any) -> None:
    # A's liveness lasts long; B, the witness, waits at most 5 s for it.
    a = procs("A", {"n": 1}, recovery_grace=600.0)
    b = procs("B", {"n": 1}, recovery_grace=5.0)
    assert isinstance(a.reserve("j", "n"), Reservation)
    b.b.refresh_inflight()
    restart(redis_server)  # ... and A is gone for good (never calls again)
    b.rebind()
    assert b.reserve("k", "n") == [REFUSED_RECOVERING]
    got = wait_until(lambda: (r := b.reserve("k", "n")) != [REFUSED_RECOVERING] and r, what="the grace to end")
    assert isinstance(got, Reservation)


def _quiet_until(server: Any) -> float | None:
    """The end of the quiet period in Redis (server ms), None if none is set."""
    return server.client().zscore("{pysched}:recovering", "\0quiet")


def test_a_holder_nobody_knew_is_covered_by_the_quiet_period(redis_server: Any, procs: Any) -> None:
    """B's first job came after A's last refresh: A does not name B, the quiet period waits for it."""
    a = procs("A", {"n": 1}, recovery_quiet=600.0)
    b = procs("B", {"n": 1}, recovery_quiet=600.0)
    a.b.refresh_inflight()  # A's last look: nobody holds anything
    assert a.b._holders_seen == ()
    assert isinstance(b.reserve("j", "n"), Reservation) and b.b.commit("j")
    restart(redis_server)
    a.rebind()
    # A joins the new dataset first and knows no holder; without the quiet
    # period it would take B's slot.
    for k in range(3):
        assert a.reserve(f"k{k}", "n") == [REFUSED_RECOVERING]
    client = redis_server.client()
    born = int(client.hget("{pysched}:epoch", "born"))
    assert _quiet_until(redis_server) == born + 600_000
    assert client.zcard("{pysched}:resv:n") + client.zcard("{pysched}:lease:n") == 0
    assert a.b.refresh_inflight() == {"n": 0} and a.b.stats()["recovering"] is True
    b.b.refresh_inflight()  # B's periodic look: it finds the loss and writes its job back
    assert client.zcard("{pysched}:lease:n") == 1 and b.b.stats()["reasserted"] == 1
    # Still the quiet period (A cannot know B was the last): refused, never over.
    assert a.reserve("k", "n") == [REFUSED_RECOVERING]
    assert a.b.refresh_inflight() == {"n": 1}


def test_the_quiet_period_ends_by_itself(redis_server: Any, procs: Any) -> None:
    a = procs("A", {"n": 2}, recovery_quiet=0.5)
    assert isinstance(a.reserve("j", "n"), Reservation)
    restart(redis_server)
    a.rebind()
    first = a.reserve("k", "n")  # A re-asserts "j", then the quiet period (if not over yet) refuses
    got = first if isinstance(first, Reservation) else \
        wait_until(lambda: (r := a.reserve("k", "n")) != [REFUSED_RECOVERING] and r, what="the quiet period to end")
    assert isinstance(got, Reservation)
    client = redis_server.client()
    born = int(client.hget("{pysched}:epoch", "born"))
    assert _quiet_until(redis_server) in (None, born + 500)  # pruned by a refresh, or still listed
    secs, micros = client.time()
    assert secs * 1000 + micros // 1000 >= born + 500
    assert a.b.count("n") == 2 and a.b.stats()["reasserted"] == 1
    a.b.refresh_inflight()
    assert _quiet_until(redis_server) is None and a.b.stats()["recovering"] is False


def test_no_quiet_period_on_first_use_or_when_turned_off(redis_server: Any, procs: Any) -> None:
    a = procs("A", {"n": 1}, recovery_quiet=0)
    assert isinstance(a.reserve("j", "n"), Reservation)
    restart(redis_server)
    a.rebind()
    assert a.reserve("k", "n") == [REFUSED_FULL]  # "j" written back; nothing to wait for
    assert _quiet_until(redis_server) is None


def test_a_fresh_process_does_not_wait(redis_server: Any, procs: Any) -> None:
    """First use of a namespace: nobody held anything, nothing to wait for."""
    b = procs("B", {"n": 1})
    assert isinstance(b.reserve("k", "n"), Reservation)
    assert b.b.stats()["recoveries"] == 0


@pytest.mark.parametrize("first", ["holder", "releaser"])
def test_release_made_elsewhere_just_before_the_loss_stays_released(
        redis_server: Any, procs: Any, first: str) -> None:
    a = procs("A", {"n": 1})
    b = procs("B", {"n": 1})
    assert isinstance(a.reserve("j", "n"), Reservation) and a.b.commit("j")
    a.b.refresh_inflight()
    b.b.refresh_inflight()
    assert b.b.release("j") is True  # the node's result reached B; A has not heard yet
    assert a.b.stats()["held"] == 1
    restart(redis_server)
    order = [a, b] if first == "holder" else [b, a]
    for p in order:
        p.rebind()
        p.b.refresh_inflight()
    assert a.b.count("n") == 0
    assert a.b.get("j") is None and a.b.stats()["held"] == 0
    assert isinstance(b.reserve("k", "n"), Reservation)
    assert a.expired == []  # released, not expired


def test_commit_made_elsewhere_just_before_the_loss_keeps_the_lease(redis_server: Any, procs: Any) -> None:
    a = procs("A", {"n": 1}, reservation_ttl=5.0)
    b = procs("B", {"n": 1})
    assert isinstance(a.reserve("j", "n"), Reservation)
    a.b.refresh_inflight()
    assert b.b.commit("j")  # A has not heard yet: it still thinks "uncommitted, 5 s"
    restart(redis_server)
    a.b.refresh_inflight()  # A writes back its (stale) view first
    b.b.refresh_inflight()  # B replays the commit it made
    got = a.b.get("j")
    assert got is not None and got.committed
    assert got.expires_at > time.monotonic() + 1000  # the lease, not the 5 s TTL


# -- what other processes do to a holder's jobs ------------------------------------------


def test_holder_follows_commits_renewals_and_releases_made_elsewhere(procs: Any) -> None:
    a = procs("A", {"n": 2}, reservation_ttl=5.0)
    b = procs("B", {"n": 2}, commit_lease=50.0)
    res = a.reserve("j", "n")
    assert isinstance(res, Reservation)
    assert b.b.commit("j")
    a.b.refresh_inflight()
    assert res.committed and res.expires_at > time.monotonic() + 40
    assert b.b.renew("j", lease=500.0)
    a.b.refresh_inflight()
    assert res.expires_at > time.monotonic() + 400
    assert b.b.release("j")
    a.b.refresh_inflight()
    assert a.b.stats()["held"] == 0 and a.b.inflight[0] == 0
    assert a.expired == []


# -- commit / release / renew checked against the node ------------------------------------


def test_settle_with_node_id_refuses_a_job_held_on_another_node(redis_server: Any, procs: Any) -> None:
    a = procs("A", {"n": 2, "m": 2})
    b = procs("B", {"n": 2, "m": 2})
    assert isinstance(a.reserve("j", "n"), Reservation)
    client = redis_server.client()
    before = client.hgetall("{pysched}:job:j"), client.zrange("{pysched}:resv:n", 0, -1, withscores=True)
    for p in (a, b):  # the holder, and another process (which must look the job up first)
        assert p.b.release("j", node_id="m") is False
        assert p.b.commit("j", node_id="m") is False
        assert p.b.renew("j", lease=100.0, node_id="m") is False
        assert p.b.release("j", node_id="never-bound") is False
    assert (client.hgetall("{pysched}:job:j"), client.zrange("{pysched}:resv:n", 0, -1, withscores=True)) == before
    assert a.b.count("n") == 1 and a.b.inflight[0] == 1 and a.b.stats()["held"] == 1
    assert b.b.commit("j", node_id="n") is True
    assert a.b.release("j", node_id="n") is True
    assert a.b.count("n") == 0


def test_late_release_from_the_old_node_after_a_failover(procs: Any) -> None:
    a = procs("A", {"n": 1, "m": 1}, reservation_ttl=0.3)
    b = procs("B", {"n": 1, "m": 1})
    assert isinstance(a.reserve("j", "n"), Reservation)
    wait_until(lambda: a.b.get("j") is None, what="the reservation to expire")
    assert isinstance(b.reserve("j", "m"), Reservation)  # re-dispatched on "m"
    for p in (a, b):
        assert p.b.release("j", node_id="n") is False  # the old node's late result
    assert b.b.count("m") == 1
    assert a.b.release("j", node_id="m") is True


def test_expired_job_is_gone_everywhere(procs: Any) -> None:
    a = procs("A", {"n": 1}, reservation_ttl=0.3)
    assert isinstance(a.reserve("j", "n"), Reservation)
    wait_until(lambda: a.b.count("n") == 0, what="the TTL to end in Redis")
    assert a.b.get("j") is None
    assert a.b.release("j") is False and a.b.commit("j") is False and a.b.renew("j") is False


def test_bad_settle_arguments_are_refused_with_nothing_changed(procs: Any) -> None:
    a = procs("A", {"n": 1})
    assert isinstance(a.reserve("j", "n"), Reservation)
    with pytest.raises(TypeError, match="node_id"):
        a.b.release("j", node_id=["n"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="job_id"):
        a.b.commit(["j"])  # type: ignore[arg-type]
    for lease in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="lease"):
            a.b.renew("j", lease=lease)
    assert a.b.count("n") == 1 and not a.b.get("j").committed  # type: ignore[union-attr]


# -- expiry reports ---------------------------------------------------------------------


def test_expiries_are_reported_once_ttl_and_lease(procs: Any) -> None:
    # A TTL long enough for the commit to come first on a loaded machine;
    # "j"'s renewal (uncommitted: its TTL) then makes it short.
    a = procs("A", {"n": 2}, reservation_ttl=30.0, commit_lease=0.6)
    assert isinstance(a.reserve("j", "n"), Reservation) and a.b.renew("j", lease=0.3)
    assert isinstance(a.reserve("c", "n"), Reservation) and a.b.commit("c")

    def look() -> bool:
        a.b.expire_due(time.monotonic())  # what dispatch does: local, no network
        a.b.refresh_inflight()  # what the fleet does: confirms and reports
        return len(a.expired) == 2

    wait_until(look, what="both expiries to be reported")
    assert sorted((r.job_id, r.committed) for r in a.expired) == [("c", True), ("j", False)]
    a.b.refresh_inflight()
    assert a.b.expire() == 0 and len(a.expired) == 2  # once each
    assert a.b.stats()["expired"] == 2 and a.b.inflight[0] == 0


def test_expire_reports_synchronously(procs: Any) -> None:
    a = procs("A", {"n": 1}, reservation_ttl=0.3)
    res = a.reserve("j", "n")
    assert isinstance(res, Reservation)
    wait_until(lambda: time.monotonic() > res.expires_at, what="the local expiry")
    assert a.b.expire() == 1 and [r.job_id for r in a.expired] == ["j"]
    assert a.b.expire() == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_job_renewed_elsewhere_is_not_reported_expired(redis_server: Any, procs: Any) -> None:
    # A's clock only dates its local estimates: moving it past the TTL makes
    # A believe the job expired while Redis (real time) holds it for long.
    a = procs("A", {"n": 1}, reservation_ttl=30.0)
    clock = FakeClock()
    a.b._clock_configured = False
    a.b.configure(30.0, clock, on_expired=a.expired.extend)
    b = procs("B", {"n": 1}, commit_lease=600.0)
    res = a.reserve("j", "n")
    assert isinstance(res, Reservation)
    assert b.b.commit("j")  # A does not hear of it before its local TTL ends
    clock.now = res.expires_at + 1
    a.b.expire_due(clock.now)
    assert a.b.inflight[0] == 0  # out of the mirror at once...
    assert a.b.expire() == 0  # ...but Redis says it lives: not reported, held again
    assert a.expired == [] and res.committed and a.b.inflight[0] == 1
    assert a.b.stats()["held"] == 1 and res.expires_at > clock.now + 500
    # Released elsewhere meanwhile: neither held nor reported expired.
    assert b.b.release("j")
    clock.now = res.expires_at + 1
    a.b.expire_due(clock.now)
    assert a.b.expire() == 0 and a.expired == [] and a.b.stats()["held"] == 0
