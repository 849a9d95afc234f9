"""RedisReservations against a real, private redis-server (no fakes).

The server comes from the ``redis_server`` fixtures (tests/redis_server.py).
Tiny TTLs (0.2-1 s) keep the expiry tests fast while leaving enough slack
that a loaded CI machine does not turn them flaky: every sleep waits well
past the TTL, and nothing asserts that something is *still* alive after
more than half its TTL.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pysched.errors import ReservationBackendUnavailable
from pysched.redis import RedisReservations
from pysched.reservations import REFUSED_FULL, REFUSED_GONE, Candidate, Reservation, ReservationBackend

# Registered here so this module runs on its own; a conftest registering the
# same name makes this a no-op.
pytest_plugins = ["redis_server"]

ROOT = Path(__file__).resolve().parents[1]



def _poll(probe, what: str, timeout: float = 60.0, accept=bool):
    """Call ``probe`` until ``accept(result)``; fail naming ``what`` after ``timeout`` s (never a timing assert)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if accept(result):
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _swept(b: Any, n: int) -> None:
    """Sweep until ``n`` jobs were reported expired in all, then check it was exactly ``n``.

    A job's local deadline is set from the reply that made it (the server's
    remaining time, added to the local clock on arrival), so it trails
    Redis's own by up to that round trip: the local sweep may find the job
    a moment after Redis stopped counting it.
    """
    total = [0]

    def probe() -> int:
        total[0] += b.expire()
        return total[0]

    _poll(probe, f"the local sweep to report {n} expired job(s)", accept=lambda t: t >= n)
    assert total[0] == n


def make_backend(client: Any, nodes: dict[str, int] | None = None, **kwargs: Any) -> RedisReservations:
    """A configured backend with ``nodes`` (id -> max) bound at slots 0, 1, ..."""
    kwargs.setdefault("reservation_ttl", 30.0)
    backend = RedisReservations(client, **kwargs)
    backend.configure(30.0, time.monotonic)
    backend.ensure_capacity(8)
    for slot, (node, cap) in enumerate((nodes or {}).items()):
        backend.bind_node(slot, node, cap)
    return backend


def cand(backend: RedisReservations, node: str, running: int = 0, slot: int | None = None) -> Candidate:
    """A candidate for a bound node (its slot looked up in the backend)."""
    if slot is None:
        slot = backend._node_slot[node]
    return Candidate(slot, node, 99, running)  # max_concurrency is ignored: Redis holds the max


def zcard_sum(client: Any, node: str, namespace: str = "pysched") -> int:
    """Entries held for ``node`` straight from Redis (reserved + committed)."""
    tag = "{" + namespace + "}:"
    # MULTI/EXEC: a commit moving the job between the two sets must not be
    # seen half-done (counted twice) by a concurrent check.
    pipe = client.pipeline(transaction=True)
    pipe.zcard(f"{tag}resv:{node}")
    pipe.zcard(f"{tag}lease:{node}")
    return sum(int(n) for n in pipe.execute())


@pytest.fixture(params=[False, True], ids=["bytes", "decoded"])
def any_client(redis_server: Any, request: pytest.FixtureRequest) -> Any:
    """A client with ``decode_responses`` off, then on: both must work."""
    client = redis_server.client(decode_responses=request.param)
    yield client
    client.close()


# -- packaging ---------------------------------------------------------------


def test_import_and_construct_without_redis_installed() -> None:
    code = (
        "import sys\n"
        "sys.modules['redis'] = None  # as if redis-py were not installed\n"
        "import pysched, pysched.redis as m\n"
        "assert pysched.RedisReservations is m.RedisReservations and pysched.RedisFleet is m.RedisFleet\n"
        "for make in (lambda: m.RedisReservations(object()), lambda: m.RedisFleet(object(), object())):\n"
        "    try:\n"
        "        make()\n"
        "    except ImportError as exc:\n"
        "        print(exc)\n"
        "    else:\n"
        "        raise SystemExit('no ImportError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all('pip install "pysched[redis]"' in line for line in lines), lines


def test_from_url_builds_a_fail_fast_client(redis_server: Any) -> None:
    b = RedisReservations.from_url(f"unix://{redis_server.unix_socket}", timeout=0.3, reservation_ttl=5)
    try:
        kwargs = b._client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == 0.3 and kwargs["socket_connect_timeout"] == 0.3
        b.ensure_capacity(1)
        b.bind_node(0, "a", 1)
        assert isinstance(b.try_reserve("j", [Candidate(0, "a", 1, 0)], 0, "s"), Reservation)
        assert b.inflight[0] == 1
        assert b.release("j") is True and b.count() == 0 and b.inflight[0] == 0
    finally:
        b._client.close()


def test_is_a_reservation_backend_and_validates_arguments(redis_client: Any) -> None:
    assert isinstance(make_backend(redis_client), ReservationBackend)
    for bad in ("", "a{b", "a}b"):
        with pytest.raises(ValueError, match="namespace"):
            RedisReservations(redis_client, namespace=bad)
    with pytest.raises(ValueError, match="shortlist"):
        RedisReservations(redis_client, shortlist=0)
    with pytest.raises(ValueError, match="commit_lease"):
        RedisReservations(redis_client, commit_lease=0)
    for bad in (-1, True, "2", float("inf"), float("nan")):
        with pytest.raises(ValueError, match="recovery_quiet"):
            RedisReservations(redis_client, recovery_quiet=bad)
    for bad in ("", "a\x00b", "tab\there", 7):
        with pytest.raises(ValueError, match="holder_id"):
            RedisReservations(redis_client, holder_id=bad)
    unconfigured = RedisReservations(redis_client)
    with pytest.raises(RuntimeError, match="reservation_ttl"):
        unconfigured.try_reserve("j", [], 0, "s")


# -- reserving -----------------------------------------------------------------


def test_reserves_first_candidate_with_capacity(any_client: Any) -> None:
    b = make_backend(any_client, {"a": 1, "b": 2})
    first = b.try_reserve("j0", [cand(b, "a"), cand(b, "b")], 7, "sess")
    assert isinstance(first, Reservation)
    assert (first.node_id, first.slot, first.pool_id, first.session_id) == ("a", 0, 7, "sess")
    assert not first.committed

    # "a" is now full: the second candidate takes the job.
    second = b.try_reserve("j1", [cand(b, "a"), cand(b, "b")], 7, "sess")
    assert isinstance(second, Reservation) and second.node_id == "b"
    assert (b.count("a"), b.count("b"), b.count()) == (1, 1, 2)
    assert list(b.inflight[:2]) == [1, 1]
    assert b.get("j1") is second


def test_refusal_reasons_full_and_offline(redis_client: Any) -> None:
    b = make_backend(redis_client, {"a": 1, "zero": 0, "gone": 3})
    assert isinstance(b.try_reserve("j0", [cand(b, "a")], 0, "s"), Reservation)
    b.unbind_node(2, "gone")
    ghost = Candidate(5, "never-bound", 4, 0)
    reasons = b.try_reserve("j1", [cand(b, "a"), cand(b, "zero"), ghost, Candidate(2, "gone", 3, 0)], 0, "s")
    assert reasons == [REFUSED_FULL, REFUSED_FULL, REFUSED_GONE, REFUSED_GONE]
    assert b.get("j1") is None
    assert b.count() == 1
    assert list(b.inflight[:3]) == [1, 0, 0]
    # An empty shortlist is refused with no reasons (and still one trip).
    assert b.try_reserve("j2", [], 0, "s") == []


def test_reported_running_counts_toward_load(redis_client: Any) -> None:
    b = make_backend(redis_client, {"a": 2})
    # The node says it already runs 2 jobs (started by someone we do not track).
    assert b.try_reserve("j0", [cand(b, "a", running=2)], 0, "s") == [REFUSED_FULL]
    # Effective load is max(held, running): 1 running, 0 held -> room.
    assert isinstance(b.try_reserve("j1", [cand(b, "a", running=1)], 0, "s"), Reservation)
    # 1 running, 1 held -> max is 1 < 2 -> room (the running job may be ours).
    assert isinstance(b.try_reserve("j2", [cand(b, "a", running=1)], 0, "s"), Reservation)
    assert b.try_reserve("j3", [cand(b, "a", running=0)], 0, "s") == [REFUSED_FULL]


def test_same_job_id_returns_existing_reservation(any_client: Any) -> None:
    b = make_backend(any_client, {"a": 1, "b": 5})
    first = b.try_reserve("job", [cand(b, "b")], 3, "s")
    assert isinstance(first, Reservation)
    b.round_trips = 0
    again = b.try_reserve("job", [cand(b, "a"), cand(b, "b")], 3, "s")
    assert again is first
    assert b.round_trips == 1
    assert (b.count("a"), b.count("b")) == (0, 1)
    assert list(b.inflight[:2]) == [0, 1]

    # Another scheduler process (same namespace) retrying the job gets the
    # same node, with the fields stored in Redis.
    other = make_backend(any_client)
    other.bind_node(4, "b", 5)
    seen = other.try_reserve("job", [cand(other, "b")], 99, "other")
    assert isinstance(seen, Reservation)
    assert (seen.node_id, seen.slot, seen.pool_id, seen.session_id) == ("b", 4, 3, "s")
    assert b.count("b") == 1
    assert other.inflight[4] == 0  # not reserved by that process


def test_heartbeat_rebind_keeps_live_reservations(redis_client: Any) -> None:
    b = make_backend(redis_client, {"a": 2})
    for job in ("j0", "j1"):
        assert isinstance(b.try_reserve(job, [cand(b, "a")], 0, "s"), Reservation)
    b.bind_node(0, "a", 2)  # a heartbeat re-publishing the same max
    assert b.count("a") == 2
    assert b.try_reserve("j2", [cand(b, "a")], 0, "s") == [REFUSED_FULL]
    b.bind_node(0, "a", 3)  # max raised
    assert isinstance(b.try_reserve("j2", [cand(b, "a")], 0, "s"), Reservation)
    b.bind_node(0, "a", 1)  # max lowered below the load: nothing is evicted
    assert b.count("a") == 3
    assert b.try_reserve("j3", [cand(b, "a")], 0, "s") == [REFUSED_FULL]


# -- round trips ------------------------------------------------------------------


def test_one_round_trip_per_reservation_attempt(redis_client: Any) -> None:
    b = make_backend(redis_client, {"a": 1, "b": 1, "c": 1})
    assert isinstance(b.try_reserve("fill-a", [cand(b, "a")], 0, "s"), Reservation)
    assert isinstance(b.try_reserve("fill-b", [cand(b, "b")], 0, "s"), Reservation)

    b.round_trips = 0
    res = b.try_reserve("j", [cand(b, "a"), cand(b, "b"), cand(b, "c")], 0, "s")
    assert isinstance(res, Reservation) and res.node_id == "c"
    assert b.round_trips == 1

    b.round_trips = 0
    assert b.try_reserve("k", [cand(b, "a"), cand(b, "b"), cand(b, "c")], 0, "s") == [REFUSED_FULL] * 3
    assert b.round_trips == 1


def test_longer_lists_than_shortlist_are_tried_in_further_calls(redis_client: Any) -> None:
    b = make_backend(redis_client, {"a": 1, "b": 1, "c": 1}, shortlist=2)
    assert isinstance(b.try_reserve("fill", [cand(b, "a")], 0, "s"), Reservation)
    b.round_trips = 0
    res = b.try_reserve("j", [cand(b, "a"), cand(b, "b"), cand(b, "c")], 0, "s")
    assert isinstance(res, Reservation) and res.node_id == "b"
    assert b.round_trips == 1  # found within the first call's shortlist
    b.round_trips = 0
    res = b.try_reserve("k", [cand(b, "a"), cand(b, "b"), cand(b, "c")], 0, "s")
    assert isinstance(res, Reservation) and res.node_id == "c"
    assert b.round_trips == 2
    b.round_trips = 0
    assert b.try_reserve("l", [cand(b, "a"), cand(b, "b"), cand(b, "c")], 0, "s") == [REFUSED_FULL] * 3
    assert b.round_trips == 2


def test_script_cache_flush_falls_back_to_eval(redis_client: Any) -> None:
    b = make_backend(redis_client, {"a": 3})
    assert isinstance(b.try_reserve("j0", [cand(b, "a")], 0, "s"), Reservation)
    redis_client.script_flush()
    b.round_trips = 0
    assert isinstance(b.try_reserve("j1", [cand(b, "a")], 0, "s"), Reservation)
    assert b.round_trips == 2  # NOSCRIPT, then EVAL (which caches the script)
    b.round_trips = 0
    assert isinstance(b.try_reserve("j2", [cand(b, "a")], 0, "s"), Reservation)
    assert b.round_trips == 1


# -- expiry, commit, release ----------------------------------------------------


def test_uncommitted_reservations_expire_by_themselves(any_client: Any) -> None:
    # A TTL no stall of a loaded machine outlasts while the job is checked as
    # held; its renewal (uncommitted: its TTL) then makes it short.
    b = make_backend(any_client, {"a": 1}, reservation_ttl=30.0)
    res = b.try_reserve("j", [cand(b, "a")], 0, "s")
    assert isinstance(res, Reservation)
    assert b.count("a") == 1 and b.inflight[0] == 1
    assert b.renew("j", lease=0.3) is True
    # Redis stops counting it at its TTL, before anything prunes it.
    _poll(lambda: b.count("a") == 0, "Redis to drop the expired reservation")
    assert b.count() == 0
    assert b.node_counts(["a"]) == {"a": 0}
    _swept(b, 1)
    assert b.inflight[0] == 0
    assert b.get("j") is None
    assert b.commit("j") is False
    assert b.release("j") is False
    assert b.inflight[0] == 0
    # The capacity is back.
    assert isinstance(b.try_reserve("k", [cand(b, "a")], 0, "s"), Reservation)
    assert zcard_sum(any_client, "a") == 1  # the dead entry was pruned


def test_crashed_scheduler_capacity_comes_back(redis_client: Any) -> None:
    crashed = make_backend(redis_client, {"a": 1}, reservation_ttl=30.0)
    assert isinstance(crashed.try_reserve("lost", [cand(crashed, "a")], 0, "s"), Reservation)
    survivor = make_backend(redis_client, {"a": 1}, reservation_ttl=30)
    assert survivor.try_reserve("j", [cand(survivor, "a")], 0, "s") == [REFUSED_FULL]
    # Its last word (no stall can outlast the 30 s TTL before the check above):
    assert crashed.renew("lost", lease=0.3) is True
    del crashed  # never releases, never commits
    _poll(lambda: isinstance(survivor.try_reserve("j", [cand(survivor, "a")], 0, "s"), Reservation),
          "the crashed scheduler's capacity to come back")


def test_refresh_inflight_mirrors_fleet_counts(redis_client: Any) -> None:
    # TTLs no stall of a loaded machine outlasts before the counts are
    # checked; "mine"'s renewal then makes its own short.
    b = make_backend(redis_client, {"a": 4, "b": 4}, reservation_ttl=30)
    other = make_backend(redis_client, {"a": 4, "b": 4}, reservation_ttl=30)
    for job in ("o1", "o2"):
        assert isinstance(other.try_reserve(job, [cand(other, "b")], 0, "s"), Reservation)
    assert isinstance(b.try_reserve("mine", [cand(b, "a")], 0, "s"), Reservation)
    assert list(b.inflight[:2]) == [1, 0]
    b.load_scripts()
    b.round_trips = 0
    assert b.refresh_inflight() == {"a": 1, "b": 2}
    assert b.round_trips == 1
    assert list(b.inflight[:2]) == [1, 2]
    assert b.renew("mine", lease=0.3) is True
    # "mine" expires in Redis; a refresh also sweeps this process's expired jobs and reports them. Its
    # local deadline trails Redis's by up to the renewal's round trip (see _swept): a refresh may already
    # mirror Redis's count while the job is still this process's, and a later one reports it.
    _poll(lambda: b.refresh_inflight() is not None and list(b.inflight[:2]) == [0, 2]
          and b.stats()["expired"] == 1, "'mine' to expire, in Redis and in this process")
    assert b.stats()["expired"] == 1 and b.stats()["held"] == 0
    assert b.expire() == 0  # the sweep never drives the mirror negative
    assert list(b.inflight[:2]) == [0, 2]


def test_commit_stops_expiry_until_the_lease_ends(any_client: Any) -> None:
    ttl = 0.5
    b = make_backend(any_client, {"a": 1}, reservation_ttl=ttl, commit_lease=30.0)
    # The commit must come within the TTL. A stall that outlasts it (a loaded
    # machine) lets the job expire first: then try again with another job.
    for attempt in range(20):
        job = f"j{attempt}"
        reserved_at = time.monotonic()
        res = b.try_reserve(job, [cand(b, "a")], 0, "s")
        assert isinstance(res, Reservation)
        if b.commit(job):
            break
        assert time.monotonic() - reserved_at > ttl  # only a stall past the TTL explains a refused commit
        _poll(lambda: b.count("a") == 0, "the stalled job to expire")
    else:
        pytest.fail("no commit came within the reservation TTL in 20 attempts")
    assert b.commit(job) is True  # idempotent
    assert res.committed
    tag = "{pysched}:"
    assert any_client.zcard(tag + "resv:a") == 0 and any_client.zcard(tag + "lease:a") == 1
    time.sleep(max(0.0, reserved_at + ttl + 0.2 - time.monotonic()))  # past the TTL, well within the lease
    assert b.count("a") == 1
    assert b.expire() == 0
    got = b.get(job)
    assert got is res and got.committed
    assert b.try_reserve("k", [cand(b, "a")], 0, "s") == [REFUSED_FULL]
    assert b.renew(job, lease=0.3) is True  # committed: the lease, now short
    _poll(lambda: b.count("a") == 0, "the lease to end")  # a node that died mid-job frees its slot
    _swept(b, attempt + 1)  # with any stalled attempt's job
    assert b.inflight[0] == 0
    assert isinstance(b.try_reserve("k", [cand(b, "a")], 0, "s"), Reservation)
    assert b.commit("unknown") is False


def test_renew_extends_a_committed_lease(redis_client: Any) -> None:
    # TTL and lease long enough that no stall ends them between the steps;
    # the expiry scores (ms) show each renewal's effect.
    b = make_backend(redis_client, {"a": 2}, reservation_ttl=30, commit_lease=30)
    assert isinstance(b.try_reserve("j", [cand(b, "a")], 0, "s"), Reservation)
    # Uncommitted: a renewal extends the reservation's TTL (it stays uncommitted).
    tag = "{pysched}:"
    before = redis_client.zscore(tag + "resv:a", "j")
    assert b.renew("j", lease=60.0) is True
    assert redis_client.zscore(tag + "resv:a", "j") > before + 20_000
    assert not b.get("j").committed  # type: ignore[union-attr]
    assert b.commit("j")
    before = redis_client.zscore(tag + "lease:a", "j")
    assert b.renew("j", lease=60.0) is True  # committed: the lease
    assert redis_client.zscore(tag + "lease:a", "j") > before + 20_000
    assert redis_client.zscore(tag + "resv:a", "j") is None
    assert b.count("a") == 1
    assert b.expire() == 0
    assert b.renew("nope") is False


def test_release_is_idempotent_and_never_negative(any_client: Any) -> None:
    b = make_backend(any_client, {"a": 2})
    assert isinstance(b.try_reserve("j", [cand(b, "a")], 0, "s"), Reservation)
    assert b.release("j") is True
    assert b.release("j") is False
    assert b.release("never") is False
    assert b.count("a") == 0 and b.inflight[0] == 0
    assert zcard_sum(any_client, "a") == 0
    assert not any_client.exists("{pysched}:job:j")
    # Committed jobs release the same way.
    assert isinstance(b.try_reserve("c", [cand(b, "a")], 0, "s"), Reservation)
    assert b.commit("c")
    assert b.release("c") is True and b.release("c") is False
    assert b.count() == 0 and b.inflight[0] == 0


def test_a_release_racing_a_commit_leaves_nothing_held(redis_client: Any) -> None:
    """A commit's reply read after a concurrent release of the same job must not bring the job back.

    The commit runs first in Redis; a release from another thread is started
    between the commit's round trip and its local update (the serve
    failover race: accept commits on one worker thread while the lost link
    releases on another). Whatever order the threads get, nothing may stay
    held locally or in Redis.
    """
    b = make_backend(redis_client, {"a": 2})
    assert isinstance(b.try_reserve("j", [cand(b, "a")], 0, "s"), Reservation)
    run = b._run
    releaser: list[threading.Thread] = []
    released: list[bool] = []

    def run_then_race(script: Any, keys: Any, tail: Any) -> Any:
        reply = run(script, keys, tail)
        if script is b._settle and "commit" in tail and not releaser:
            t = threading.Thread(target=lambda: released.append(b.release("j", node_id="a")))
            releaser.append(t)
            t.start()
            # Give the release every chance to overtake this commit's local
            # update; it must wait for it instead (the test holds either way).
            t.join(0.3)
        return reply

    b._run = run_then_race  # type: ignore[method-assign]
    try:
        assert b.commit("j", node_id="a") is True
        releaser[0].join(60)
        assert not releaser[0].is_alive()
    finally:
        b._run = run  # type: ignore[method-assign]
    assert released == [True]
    assert b.stats()["held"] == 0 and b.get("j") is None
    assert b.count() == 0 and zcard_sum(redis_client, "a") == 0
    assert b.inflight[0] == 0


def test_release_of_a_job_reserved_by_another_process(redis_client: Any) -> None:
    mine = make_backend(redis_client, {"a": 1})
    other = make_backend(redis_client, {"a": 1})
    assert isinstance(mine.try_reserve("j", [cand(mine, "a")], 0, "s"), Reservation)
    assert other.release("j") is True  # e.g. the node's result arrived there
    assert mine.count("a") == 0
    assert mine.inflight[0] == 1  # only corrected by its own next look
    assert mine.release("j") is False
    assert mine.inflight[0] == 0


def test_job_re_reserved_on_another_node_is_followed(redis_client: Any) -> None:
    first = make_backend(redis_client, {"a": 1, "b": 1}, reservation_ttl=0.5)
    second = make_backend(redis_client, {"a": 1, "b": 1}, reservation_ttl=30)
    assert first.try_reserve("j", [cand(first, "a")], 0, "s").node_id == "a"  # type: ignore[union-attr]
    moved = _poll(lambda: second.try_reserve("j", [cand(second, "b")], 0, "s"), "the first reservation to expire",
                  accept=lambda r: isinstance(r, Reservation) and r.node_id == "b")
    assert moved.node_id == "b"
    # "first" still believes the job is on "a"; the script answers "moved".
    assert first.release("j") is True
    assert first.inflight[0] == 0
    assert second.count() == 0


# -- layout -----------------------------------------------------------------------


def test_namespaces_are_isolated(redis_client: Any) -> None:
    one = make_backend(redis_client, {"a": 1}, namespace="fleet-1")
    two = make_backend(redis_client, namespace="fleet-2")
    assert two.try_reserve("j", [Candidate(0, "a", 1, 0)], 0, "s") == [REFUSED_GONE]
    two.bind_node(0, "a", 1)
    assert isinstance(one.try_reserve("j", [cand(one, "a")], 0, "s"), Reservation)
    assert isinstance(two.try_reserve("j", [cand(two, "a")], 0, "s"), Reservation)
    assert isinstance(two.try_reserve("k", [cand(two, "a")], 0, "s"), list)
    assert (one.count(), two.count()) == (1, 1)
    assert one.release("j") and two.get("j") is not None


def test_every_key_shares_one_hash_tag(redis_client: Any) -> None:
    from redis.crc import key_slot

    b = make_backend(redis_client, {"node:1": 2, "{odd}": 2}, namespace="ns")
    for i in range(3):
        b.try_reserve(f"job:{{x}}:{i}", [cand(b, "node:1"), cand(b, "{odd}")], 0, "s")
    b.commit("job:{x}:0")
    b.release("job:{x}:1")
    keys = [k.decode() for k in redis_client.scan_iter(count=1000)]
    assert keys, "nothing was written"
    assert {k.split("}", 1)[0] + "}" for k in keys} == {"{ns}"}
    assert {key_slot(k.encode()) for k in keys} == {key_slot(b"ns")}
    # Every key expires by itself except the node maxes (removed by unbind)
    # and the dataset's epoch.
    for key in keys:
        ttl = redis_client.pttl(key)
        assert (ttl == -1) == (key.startswith("{ns}:max:") or key == "{ns}:epoch"), (key, ttl)


def test_scripts_touch_only_keys_passed_in_KEYS() -> None:
    """Static check: every command's key argument comes from KEYS.

    (A real server cannot check this: even a cluster only rejects keys of
    *another slot*, and every key of ours shares the namespace's slot.)
    """
    import re
    from importlib import resources

    # Names the scripts use for keys; each must be assigned from KEYS only.
    key_names = {"job_key", "jobs_key", "max_key", "resv_key", "lease_key", "epoch_key", "pending_key",
                 "holders_key", "inbox_key", "tombs_key", "key"}
    lua_dir = resources.files("pysched.redis") / "lua"
    scripts = {p.name: p.read_text() for p in lua_dir.iterdir() if p.name.endswith(".lua")}
    # the reservation scripts and the fleet's (tests/test_redis_fleet.py checks those more strictly)
    assert set(scripts) == {"reserve.lua", "settle.lua", "get.lua", "counts.lua", "refresh.lua", "recover.lua",
                            "fleet_allocate.lua", "fleet_seed.lua", "fleet_publish.lua"}
    keyless = {"TIME"}
    for name, body in scripts.items():
        code = "\n".join(line.split("--", 1)[0] for line in body.splitlines())
        for cmd, first in re.findall(r"redis\.call\(\s*'(\w+)'\s*(?:,\s*([^,)]+))?", code):
            if cmd in keyless:
                continue
            arg = first.strip()
            assert re.fullmatch(r"KEYS\[[^\]]+\]", arg) or arg in key_names, (name, cmd, arg)
        for lhs, rhs in re.findall(r"local\s+([\w\s,]+?)\s*=\s*([^\n]+)", code):
            names = {n.strip() for n in lhs.split(",")}
            if names & key_names:
                assert all(part.strip().startswith("KEYS[") for part in rhs.split(",")), (name, lhs, rhs)
        # "key" is only ever a loop variable or parameter fed with those names.
        for args in re.findall(r"(?<!function )keep_until\(([^,]+),", code):
            assert args.strip() in key_names - {"key"}, (name, args)
        for group in re.findall(r"ipairs\(\{([^}]*)\}\)", code):
            assert {g.strip() for g in group.split(",")} <= key_names - {"key"}, (name, group)


def test_runs_on_a_cluster_mode_server(redis_server_factory: Any) -> None:
    """The scripts run on a cluster-mode server, strictly single-slot.

    The shipped scripts have no shebang (so they also run on Redis < 7); the
    test runs ``#!lua`` copies, for which a cluster node rejects any access
    to a key outside the slot of the declared KEYS.
    """
    from redis_server import free_port

    server = redis_server_factory(
        port=free_port(),
        # An explicit bus port: the default (port + 10000) may be taken or
        # out of range.
        extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-port", str(free_port())],
    )
    client = server.client()
    client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
    deadline = time.monotonic() + 10
    while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
        assert time.monotonic() < deadline, "cluster did not become ready"
        time.sleep(0.05)
    b = make_backend(client, {"a": 1, "b": 1, "c": 1}, namespace="fleet")
    other = make_backend(client, {"a": 1}, namespace="fleet")
    for backend in (b, other):
        for attr in ("_reserve", "_settle", "_get", "_counts", "_refresh", "_recover_script"):
            # a #!lua shebang: Redis 7 then rejects cross-slot access
            setattr(backend, attr, getattr(backend, attr).strict())
    # The check does fire: a strict script touching another slot is refused.
    with pytest.raises(Exception, match="same slot"):
        client.eval("#!lua\nreturn redis.call('GET', 'elsewhere')", 1, "{fleet}:x")
    assert b.try_reserve("j0", [cand(b, "a")], 0, "s").node_id == "a"  # type: ignore[union-attr]
    res = b.try_reserve("j1", [cand(b, "a"), cand(b, "b"), cand(b, "c")], 0, "s")
    assert isinstance(res, Reservation) and res.node_id == "b"
    assert b.commit("j1") and b.renew("j1")
    assert b.get("j0") is not None
    assert b.node_counts(["a", "b", "c"]) == {"a": 1, "b": 1, "c": 0}
    assert b.count() == 2
    assert b.release("j0") and b.release("j1")
    assert isinstance(other.try_reserve("j2", [cand(other, "a")], 0, "s"), Reservation)
    assert b.release("j2")  # the foreign-job path (HGET, then the script)
    client.close()


def test_ensure_capacity_swaps_in_a_bigger_copy(redis_client: Any) -> None:
    b = make_backend(redis_client, {"a": 3})
    assert isinstance(b.try_reserve("j", [cand(b, "a")], 0, "s"), Reservation)
    old = b.inflight
    assert b.ensure_capacity(len(old)) is old
    new = b.ensure_capacity(len(old) + 1)
    assert new is b.inflight and new is not old and len(new) > len(old)
    assert new.dtype == np.int32 and new[0] == 1
    assert b.release("j") and new[0] == 0 and old[0] == 1


# -- concurrency and faults --------------------------------------------------------


def test_threads_never_oversell(redis_server: Any) -> None:
    nodes = {"n0": 2, "n1": 2, "n2": 2}
    client = redis_server.client(max_connections=32)
    checker = redis_server.client()
    # Two "scheduler processes" sharing the namespace, four threads each.
    backends = [make_backend(client, nodes), make_backend(client, nodes)]
    names = list(nodes)
    errors: list[str] = []
    peak = dict.fromkeys(names, 0)
    stop = threading.Event()
    reserved = [0]
    count_lock = threading.Lock()

    def monitor() -> None:
        while not stop.is_set():
            for node in names:
                held = zcard_sum(checker, node)
                peak[node] = max(peak[node], held)

    def worker(tid: int) -> None:
        b = backends[tid % 2]
        for i in range(150):
            order = names[i % 3 :] + names[: i % 3]
            job = f"t{tid}-{i}"
            res = b.try_reserve(job, [cand(b, n) for n in order], 0, "s")
            if isinstance(res, Reservation):
                with count_lock:
                    reserved[0] += 1
                if i % 3 == 0:
                    b.commit(job)
                if not b.release(job):
                    errors.append(f"release of {job} failed")
            elif res != [REFUSED_FULL] * 3:
                errors.append(f"{job}: {res}")

    mon = threading.Thread(target=monitor)
    mon.start()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    mon.join()

    assert not errors, errors[:5]
    assert reserved[0] > 0
    assert all(p <= 2 for p in peak.values()), peak
    for node in names:
        assert zcard_sum(checker, node) == 0
    for b in backends:
        assert b.count() == 0
        assert list(b.inflight[:3]) == [0, 0, 0]
        assert b.expire() == 0
    client.close()
    checker.close()


def test_server_outage_raises_unavailable_then_recovers(redis_server: Any) -> None:
    import redis

    client = redis_server.client(socket_timeout=0.5, socket_connect_timeout=0.5)
    # No quiet period after the data loss: the refusal right after it is the node's own.
    b = make_backend(client, {"a": 2, "b": 2}, recovery_quiet=0)
    held = b.try_reserve("held", [cand(b, "a")], 0, "s")
    assert isinstance(held, Reservation)
    before = b.inflight.copy()

    redis_server.stop()
    calls = [
        lambda: b.try_reserve("j", [cand(b, "a"), cand(b, "b")], 0, "s"),
        lambda: b.release("held"),
        lambda: b.commit("held"),
        lambda: b.get("held"),
        b.count,
        b.refresh_inflight,
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(ReservationBackendUnavailable) as info:
            call()
        assert time.monotonic() - started < 20.0  # the client's timeout, not a hang (generous under load)
        assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)
        assert isinstance(info.value, ConnectionError)  # catchable as the builtin too
    np.testing.assert_array_equal(b.inflight, before)
    assert b._jobs.keys() == {"held"}
    # Local figures answer without Redis, marked unavailable.
    st = b.stats()
    assert st["available"] is False and st["error"] and st["held"] == 1
    # A capacity write is queued, not refused: it is sent once Redis answers.
    b.bind_node(2, "c", 1)
    assert b._node_slot["c"] == 2 and b.stats()["pending_writes"] == 1

    redis_server.start()  # same socket, empty dataset (no persistence)
    # "a"'s max went with the data: offline until re-bound. Before that call
    # ran, this process wrote "held" back, and sent the queued write.
    assert b.try_reserve("j", [cand(b, "a")], 0, "s") == [REFUSED_GONE]
    st = b.stats()
    assert st["available"] is True and st["error"] is None and st["pending_writes"] == 0
    assert st["recoveries"] == 1 and st["reasserted"] == 1
    assert client.get("{pysched}:max:c") == b"1"
    assert b.get("held") is held
    b.bind_node(0, "a", 2)
    assert b.count("a") == 1  # "held" still counts
    res = b.try_reserve("j", [cand(b, "a")], 0, "s")
    assert isinstance(res, Reservation) and res.node_id == "a"
    assert b.inflight[0] == 2
    assert b.try_reserve("k", [cand(b, "a")], 0, "s") == [REFUSED_FULL]
    assert b.release("held") is True
    assert b.inflight[0] == 1
    client.close()


@pytest.mark.parametrize("many", [False, True], ids=["dispatch", "with-dispatch_many"])
def test_concurrent_jobs_of_a_new_session_share_one_pool_through_redis(redis_client: Any, many: bool) -> None:
    """Every reservation is a round trip that lets go of the GIL, and other sessions' jobs move the loads
    meanwhile: the session's lock still makes its jobs decide its binding one at a time, so all of them
    follow the first one's pool. With ``many``, half of them come two at a time through ``dispatch_many``,
    which holds its sessions while it decides (pysched._holding)."""
    import pysched

    sched = pysched.Scheduler(reservations=RedisReservations(redis_client, namespace="session-race"), seed=7)
    try:
        for i in range(4):
            sched.register_node(f"p{i}", ["zh", "en"], max_concurrency=1000)
            sched.register_node(f"t{i}", ["de", "en", "zh"], max_concurrency=1000)
        for round_no in range(5):
            start = threading.Barrier(16)
            out: list[Any] = []
            others: list[Any] = []

            def job(k: int, start: threading.Barrier = start, out: list[Any] = out,
                    session: str = f"s{round_no}") -> None:
                start.wait(30)
                try:
                    if many and k % 2:
                        out.extend(sched.dispatch_many([(session, "zh", "en")] * 2))
                    else:
                        out.append(sched.dispatch(session, "zh", "en"))
                except BaseException as e:  # reported below
                    out.append(e)

            def noise(k: int, start: threading.Barrier = start, others: list[Any] = others,
                      round_no: int = round_no) -> None:
                start.wait(30)
                for j in range(10):  # new sessions, each placed in the freer pool of the moment
                    try:
                        others.append(sched.dispatch(f"other-{round_no}-{k}-{j}", "zh", "en"))
                    except BaseException as e:  # reported below
                        others.append(e)

            threads = [threading.Thread(target=job, args=(k,)) for k in range(8)]
            threads += [threading.Thread(target=noise, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads)
            assert all(isinstance(a, pysched.Assignment) for a in out + others), out + others
            assert len({a.pool_id for a in out}) == 1, [(a.node_id, a.pool_id) for a in out]
            for a in out + others:
                sched.release(a.job_id)
    finally:
        sched.close()
