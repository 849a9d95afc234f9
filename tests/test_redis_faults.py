"""Issue 10 through Scheduler + RedisFleet, on a real redis-server: restarts, kills, outages.

* item 1: a Redis restart without persistence never lets a node be
  over-committed while the processes holding its jobs survive (one process;
  three spawned processes with a node-side counter);
* item 2: the nodes of a process killed with SIGKILL come back after a Redis
  restart as soon as a heartbeat reaches any live process;
* item 5: ``stats()`` answers while Redis is down, and the calls that need
  Redis are exactly the documented ones (capacity writes are queued);
* items 4/6 and the lifecycle, Redis side: ``explain`` answers what dispatch
  would do once a reservation expired; ``job_expired`` and ``forget`` are
  never published; ``ready=False`` travels.

The server comes from ``tests/redis_server.py`` (fails, not skips, when CI is
set). No assertion depends on timing: waits poll with long deadlines, and
the invariants are checked on counters.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pysched
from pysched import NoNodeAvailable, ReservationBackendUnavailable
from pysched.redis import RedisFleet, RedisReservations
from pysched.reservations import Candidate, Reservation

pytest_plugins = ["redis_server"]

NS = "pysched"
DEADLINE = 30.0


def wait_until(pred: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(0.01)


class Member:
    """One in-process "scheduler process": its own client, backend, scheduler and fleet."""

    def __init__(self, server: Any, name: str, *, ttl: float = 30.0, timeout: float = 0.3,
                 sched_kwargs: dict | None = None, backend_kwargs: dict | None = None) -> None:
        self.client = server.client(socket_timeout=timeout, socket_connect_timeout=timeout)
        self.backend = RedisReservations(self.client, namespace=NS, holder_id=name, **(backend_kwargs or {}))
        self.sched = pysched.Scheduler(reservations=self.backend, reservation_ttl=ttl, **(sched_kwargs or {}))
        self.fleet = RedisFleet(self.sched, self.client, NS, process_id=name, refresh_interval=0.2)
        self.fleet.start()
        self.events: list[tuple[str, str, dict]] = []
        self.sched.add_listener(lambda e, n, f: self.events.append((e, n, f)))

    def close(self) -> None:
        self.fleet.stop()
        self.client.close()


@pytest.fixture
def members(redis_server: Any) -> Iterator[Callable[..., Member]]:
    made: list[Member] = []

    def make(name: str, **kwargs: Any) -> Member:
        m = Member(redis_server, name, **kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def try_dispatch(sched: pysched.Scheduler, src: str = "zh", tgt: str = "en") -> pysched.Assignment | None:
    try:
        return sched.dispatch(f"probe-{time.monotonic_ns()}", src, tgt)
    except (NoNodeAvailable, ReservationBackendUnavailable):
        return None


def refusal_past_the_quiet(sched: pysched.Scheduler, job_id: str, src: str = "zh", tgt: str = "en") -> dict:
    """The refusal breakdown of a dispatch once the quiet period after a data loss is over.

    Until then every attempt is refused with ``recovering`` only.
    """
    while True:
        with pytest.raises(NoNodeAvailable) as info:
            sched.dispatch(job_id, src, tgt)
        if info.value.breakdown != {"recovering": 1}:
            return info.value.breakdown
        time.sleep(0.01)


def restart(server: Any) -> None:
    server.stop()
    server.start()  # the same socket, an empty dataset


# -- item 1 -----------------------------------------------------------------------------


def test_one_process_restart_keeps_the_running_job_counted(redis_server: Any, members: Any) -> None:
    """The issue's reproduction: max_concurrency=1, dispatch + commit, restart empty, dispatch again."""
    a = members("A")
    a.sched.register_node("n", ["zh", "en"], max_concurrency=1)
    first = a.sched.dispatch("s1", "zh", "en")
    a.sched.commit(first.job_id)
    slot = a.sched.snapshot.slot("n")
    heals = a.fleet.stats()["heals"]
    restart(redis_server)
    # Until the fleet has healed and refreshed a few times, and afterwards,
    # every attempt is refused; Redis itself (asked directly, whatever the
    # local view says) never grants the slot.
    direct = Candidate(slot, "n", 1, 0)
    refreshes = None
    attempts = 0
    while True:
        attempts += 1
        with pytest.raises(NoNodeAvailable) as info:
            a.sched.dispatch(f"again-{attempts}", "zh", "en")
        assert set(info.value.breakdown) <= {"full", "offline", "recovering"}, info.value.breakdown
        try:
            got = a.backend.try_reserve(f"direct-{attempts}", [direct], 1, "s")
        except ReservationBackendUnavailable:
            got = ["unavailable"]
        assert not isinstance(got, Reservation), got
        st = a.fleet.stats()
        if refreshes is None and st["heals"] > heals:
            refreshes = st["refreshes"]
        if refreshes is not None and st["refreshes"] >= refreshes + 3 and got == ["full"]:
            break
        assert attempts < 100_000
        time.sleep(0.005)
    # The first job is still counted, committed, on its node, and in the mirror.
    assert a.backend.node_counts(["n"]) == {"n": 1}
    held = a.backend.get(first.job_id)
    assert held is not None and held.committed and held.node_id == "n"
    assert a.sched.snapshot.inflight[slot] == 1
    assert a.sched.explain("zh", "en").nodes == {"n": "full"}
    assert a.sched.stats()["backend"]["recoveries"] == 1
    assert a.sched.release(first.job_id) is True
    assert a.sched.dispatch("s3", "zh", "en").node_id == "n"


def test_the_fleet_keeps_the_quiet_period_above_two_refreshes(redis_server: Any) -> None:
    """After a data loss a holder finds it within one refresh: the quiet period covers two."""
    client = redis_server.client()
    for interval, quiet, expected in ((0.2, 2.0, 2.0), (3.0, 2.0, 6.0), (0.5, 0.0, 1.0)):
        backend = RedisReservations(client, namespace=NS, recovery_quiet=quiet)
        sched = pysched.Scheduler(reservations=backend)
        fleet = RedisFleet(sched, client, NS, refresh_interval=interval)
        assert backend.recovery_quiet == quiet  # constructing changes nothing
        fleet.start()
        try:
            assert backend.recovery_quiet == expected
        finally:
            fleet.stop()


NODES = [  # node id, languages, max concurrency, registering process
    ("n0", ["zh", "en"], 2, 0),
    ("n1", ["en", "ja"], 2, 1),
    ("n2", ["de", "en"], 2, 2),
    ("n3", ["en", "de"], 3, 0),
    ("n4", ["en", "zh"], 2, 1),
    ("n5", ["en", "ja", "zh"], 3, 2),
]
CAPS = {n: cap for n, _, cap, _ in NODES}
PAIRS = [("zh", "en"), ("en", "ja"), ("de", "en"), ("en", "zh"), ("auto", "en")]


def _redis_counts(server: Any) -> dict[str, int] | None:
    """Each node's held jobs straight from Redis (reserved + committed), None while it is down."""
    client = server.client(socket_timeout=0.3, socket_connect_timeout=0.3)
    try:
        pipe = client.pipeline(transaction=True)
        for node in CAPS:
            pipe.zcard(f"{{{NS}}}:resv:{node}")
            pipe.zcard(f"{{{NS}}}:lease:{node}")
        raw = pipe.execute()
    except Exception:  # noqa: BLE001 - stopped under us
        return None
    finally:
        client.close()
    return {node: raw[2 * i] + raw[2 * i + 1] for i, node in enumerate(CAPS)}


def test_three_processes_holding_jobs_survive_a_redis_restart(redis_server: Any) -> None:
    """Every slot held (committed and uncommitted), Redis killed and restarted empty, others keep dispatching."""
    import fleet_worker

    ctx = multiprocessing.get_context("spawn")
    counters = fleet_worker.NodeCounters(ctx, len(NODES))
    reports = ctx.Queue()
    go, done = ctx.Event(), ctx.Event()
    signals = {"restarted": ctx.Event(), "stop_probe": ctx.Event(), "release": ctx.Event(),
               "probes": ctx.Value("i", 0)}
    procs = []
    for p in range(3):
        cfg = {"name": f"proc{p}", "socket": redis_server.unix_socket, "namespace": NS, "seed": p,
               "nodes": [(n, langs, cap) for n, langs, cap, owner in NODES if owner == p],
               "expect_nodes": len(NODES), "pairs": PAIRS, "mode": "fill",
               "node_index": {n: i for i, (n, *_rest) in enumerate(NODES)},
               "total_capacity": sum(CAPS.values()), "ttl": 600.0, "timeout": 0.3,
               # A holder nobody had in its list yet (the fill is quicker than a
               # refresh) is covered by the quiet period: long, so that a
               # process stalled on a busy machine still finds the loss in it.
               "refresh_interval": 0.2, "recovery_grace": 120.0, "recovery_quiet": 60.0}
        procs.append(ctx.Process(target=fleet_worker.run, name=cfg["name"], daemon=True,
                                 args=(cfg, counters, reports, go, done, signals)))

    def collect(kind: str, timeout: float = 60.0) -> dict[str, dict]:
        out: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        while len(out) < 3:
            try:
                msg = reports.get(timeout=0.5)
            except queue.Empty:
                dead = [p.name for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    pytest.fail(f"only {sorted(out)} reported {kind!r} ({dead} died)")
                continue
            if msg["kind"] == "error":
                pytest.fail(f"{msg['name']} failed: {msg['error']}\n{msg['trace']}")
            assert msg["kind"] == kind, msg
            out[msg["name"]] = msg
        return out

    # A Redis-side monitor, as in test_redis_fleet: no node ever holds more than its max.
    redis_peak = dict.fromkeys(CAPS, 0)
    stop_monitor = threading.Event()

    def watch() -> None:
        while not stop_monitor.is_set():
            counts = _redis_counts(redis_server)
            if counts is None:
                time.sleep(0.02)
                continue
            for node, n in counts.items():
                redis_peak[node] = max(redis_peak[node], n)
            time.sleep(0.002)

    monitor = threading.Thread(target=watch, daemon=True)
    try:
        for proc in procs:
            proc.start()
        collect("synced")
        monitor.start()
        go.set()
        holding = collect("holding")
        assert sum(h["jobs"] for h in holding.values()) == sum(CAPS.values())
        assert _redis_counts(redis_server) == CAPS  # full, in Redis too
        assert list(counters.held[:]) == [CAPS[n] for n, *_ in NODES]

        redis_server.stop()  # SIGKILL: a crash
        redis_server.start()  # empty
        signals["restarted"].set()
        recovered = collect("recovered")
        assert all(r["recoveries"] >= 1 for r in recovered.values()), recovered
        # Every holder wrote its jobs back: Redis counts every slot again...
        wait_until(lambda: _redis_counts(redis_server) == CAPS, what="every job re-asserted")
        # ... and the others went on dispatching for a while after that.
        base = signals["probes"].value
        wait_until(lambda: signals["probes"].value >= base + 300, what="more probes")
        signals["stop_probe"].set()
        signals["release"].set()
        done_reports = collect("done")
    finally:
        stop_monitor.set()
        for proc in procs:
            if proc.is_alive():
                proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        monitor.join(5)

    peaks = dict(zip(CAPS, counters.peak[:], strict=True))
    assert peaks == CAPS, ("node-side over-commit", peaks, CAPS)  # full, never above
    assert all(redis_peak[n] <= CAPS[n] for n in CAPS), ("Redis over-commit", redis_peak)
    assert sum(d["successes"] for d in done_reports.values()) == 0, done_reports
    assert sum(d["probes"] for d in done_reports.values()) >= 300
    for name, d in done_reports.items():
        backend = d["backend"]
        assert backend["recoveries"] >= 1 and backend["reasserted"] == holding[name]["jobs"], (name, backend)
        assert d["release_false"] == 0, (name, d)  # every job was still held when released
        assert set(d["reasons"]) <= {"full", "offline", "recovering"}, d["reasons"]
    assert list(counters.held[:]) == [0] * len(NODES)
    assert _redis_counts(redis_server) == dict.fromkeys(CAPS, 0)


# -- item 2 -----------------------------------------------------------------------------


def test_nodes_of_a_killed_process_heal_after_a_restart(redis_server: Any, members: Any) -> None:
    import fleet_worker

    a, b = members("A"), members("B")
    ctx = multiprocessing.get_context("spawn")
    reports, go, done = ctx.Queue(), ctx.Event(), ctx.Event()
    cfg = {"name": "victim", "socket": redis_server.unix_socket, "namespace": NS, "mode": "idle",
           "nodes": [("d0", ["zh", "en"], 2)], "expect_nodes": 1, "pairs": [("zh", "en")]}
    victim = ctx.Process(target=fleet_worker.run, args=(cfg, None, reports, go, done), daemon=True)
    victim.start()
    try:
        msg = reports.get(timeout=60)
        assert msg["kind"] == "synced", msg
        wait_until(lambda: all(m.sched.stats()["nodes_total"] == 1 for m in (a, b)), what="A and B see d0")
        victim.kill()  # SIGKILL
        victim.join(10)
        assert victim.exitcode == -signal.SIGKILL
    finally:
        if victim.is_alive():
            victim.kill()
    # Its node lives on (its max is in Redis): heartbeats reach A, dispatch works everywhere.
    a.sched.heartbeat("d0", running=0)
    for m in (a, b):
        got = wait_until(lambda m=m: try_dispatch(m.sched), what="dispatch on d0")
        assert got.node_id == "d0" and m.sched.release(got.job_id)
    assert a.fleet.flush()  # that heartbeat is published before the restart

    heals = (a.fleet.stats()["heals"], b.fleet.stats()["heals"])
    restart(redis_server)
    wait_until(lambda: a.fleet.stats()["heals"] > heals[0] and b.fleet.stats()["heals"] > heals[1],
               what="both survivors heal")
    # Nobody owns d0 any more: Redis refuses it (the view still says ok, the
    # window the README names) ...
    assert a.backend.node_counts(["d0"]) == {"d0": 0}
    assert redis_server.client().exists(f"{{{NS}}}:max:d0") == 0
    assert refusal_past_the_quiet(b.sched, "before-heartbeat") == {"offline": 1}
    # ... until its next heartbeat reaches a live process, which re-publishes it.
    a.sched.heartbeat("d0", running=0)
    got = wait_until(lambda: try_dispatch(b.sched), what="d0 dispatchable through B")
    assert got.node_id == "d0" and b.sched.release(got.job_id)
    assert a.fleet.stats()["adopted"] == 1
    assert int(redis_server.client().get(f"{{{NS}}}:max:d0")) == 2
    # Its record is back too: a process started now sees it.
    assert a.fleet.flush()
    c = members("C")
    assert c.sched.node("d0")["max_concurrency"] == 2 and c.sched.explain("zh", "en").nodes == {"d0": "ok"}
    # A owns it now: after another restart, A re-publishes it by itself.
    heals_a = a.fleet.stats()["heals"]
    restart(redis_server)
    wait_until(lambda: a.fleet.stats()["heals"] > heals_a, what="A heals again")
    got = wait_until(lambda: try_dispatch(c.sched), what="d0 back with no heartbeat")
    assert got.node_id == "d0"


def test_a_removed_node_is_not_resurrected_by_a_late_heartbeat(redis_server: Any, members: Any) -> None:
    a, b = members("A"), members("B")
    a.sched.register_node("n", ["zh", "en"], max_concurrency=2)
    wait_until(lambda: b.sched.stats()["nodes_total"] == 1, what="B sees n")
    a.sched.remove_node("n")
    assert a.fleet.flush()
    # A heartbeat B heard before it replayed the removal, published after it.
    b.fleet._on_event("heartbeat", "n", {"running": 0})
    assert b.fleet.flush()
    wait_until(lambda: b.sched.stats()["nodes_total"] == 0, what="B applies the removal")
    client = redis_server.client()
    assert client.exists(f"{{{NS}}}:max:n", f"{{{NS}}}:fleet:node:n") == 0
    assert a.fleet.stats()["adopted"] == b.fleet.stats()["adopted"] == 0


def test_a_fleet_restarted_later_applies_the_removals_it_missed(members: Any) -> None:
    a, b = members("A"), members("B")
    a.sched.register_node("n", ["zh", "en"])
    a.sched.register_node("m", ["de", "en"])
    wait_until(lambda: b.sched.stats()["nodes_total"] == 2, what="B sees both")
    b.fleet.stop()
    a.sched.remove_node("n")
    assert a.fleet.flush()
    b.fleet.start()
    wait_until(lambda: b.sched.stats()["nodes_total"] == 1, what="B applies the removal it missed")
    assert b.sched.node("m")["status"] == "ready"


# -- item 5: outages ----------------------------------------------------------------------


def test_stats_answer_while_redis_is_down_and_capacity_writes_queue(redis_server: Any, members: Any) -> None:
    a, b = members("A"), members("B")
    a.sched.register_node("n", ["zh", "en"], max_concurrency=2)
    a.sched.register_node("x", ["de", "en"], max_concurrency=2)
    wait_until(lambda: b.sched.stats()["nodes_total"] == 2, what="B sees n and x")
    job = a.sched.dispatch("s", "zh", "en")
    a.sched.commit(job.job_id)
    assert a.sched.stats()["backend"]["available"] is True

    os.kill(redis_server._proc.pid, signal.SIGSTOP)  # hung: every call times out, the data stays
    try:
        # stats() always answers; the backend's figures say unavailable once a
        # call failed (the fleet's next refresh does).
        stats = wait_until(lambda: (s := a.sched.stats())["backend"]["available"] is False and s,
                           what="the backend to be marked unavailable")
        assert stats["backend"]["error"] and stats["backend"]["name"] == "redis"
        assert stats["jobs"]["held"] == 1 and stats["jobs"]["committed"] == 1
        assert stats["nodes_total"] == 2
        assert a.fleet.stats()["running"] is True
        # Calls that need Redis raise, and change nothing:
        version = a.sched.snapshot.version
        for call in (lambda: a.sched.dispatch("t", "zh", "en"),
                     lambda: a.sched.release(job.job_id),
                     lambda: a.sched.commit(job.job_id),
                     lambda: a.sched.renew(job.job_id),
                     lambda: a.backend.get(job.job_id),
                     a.backend.count,
                     lambda: a.sched.register_node("new-set", ["fr", "en"]),  # a new pool id
                     lambda: a.sched.heartbeat("n", languages=["ko", "en"])):  # a new pool id
            with pytest.raises(ReservationBackendUnavailable):
                call()
        assert a.sched.snapshot.version == version
        [batch] = a.sched.dispatch_many([("t", "zh", "en")])
        assert isinstance(batch, ReservationBackendUnavailable)
        # Calls that only write a node's capacity do not: the write is queued.
        a.sched.register_node("m", ["zh", "en"], max_concurrency=3)  # a known language set
        a.sched.heartbeat("n", max_concurrency=1)
        a.sched.remove_node("x")
        assert a.sched.stats()["backend"]["pending_writes"] == 3
        # Local calls answer.
        a.sched.heartbeat("n", running=1, cpu=10.0)
        a.sched.drain_node("m")
        a.sched.resume_node("m")
        assert a.sched.node("m")["max_concurrency"] == 3 and len(a.sched.pools()) == 1
        assert a.sched.explain("zh", "en").nodes == {"n": "full", "m": "ok"}
    finally:
        os.kill(redis_server._proc.pid, signal.SIGCONT)
    # Once Redis answers, the queued writes land (no data was lost: no heal).
    wait_until(lambda: a.sched.stats()["backend"]["pending_writes"] == 0, what="the queued writes")
    client = redis_server.client()
    assert int(client.get(f"{{{NS}}}:max:m")) == 3 and int(client.get(f"{{{NS}}}:max:n")) == 1
    assert client.exists(f"{{{NS}}}:max:x") == 0
    assert a.fleet.stats()["heals"] == 0
    st = a.sched.stats()["backend"]
    assert st["available"] is True and st["error"] is None
    wait_until(lambda: sorted(n for p in b.sched.pools() for n in p.node_ids) == ["m", "n"],
               what="B sees m, and x removed")
    got = wait_until(lambda: try_dispatch(b.sched), what="dispatch on m")
    assert got.node_id == "m"
    assert a.sched.release(job.job_id) is True


# -- items 4/6 and the lifecycle, Redis side -----------------------------------------------


def test_explain_answers_what_dispatch_does_once_a_reservation_expired(members: Any) -> None:
    a = members("A", ttl=1.0)
    a.sched.register_node("n", ["zh", "en"], max_concurrency=1)
    first = a.sched.dispatch("s", "zh", "en")  # never committed
    res = a.backend.jobs()[0]
    assert res.job_id == first.job_id
    nodes = a.sched.explain("zh", "en").nodes
    if time.monotonic() < res.expires_at:  # (a loaded machine may already be past it)
        assert nodes == {"n": "full"}
    wait_until(lambda: time.monotonic() > res.expires_at, what="the local expiry")
    assert a.sched.explain("zh", "en").nodes == {"n": "ok"}
    assert a.sched.dispatch("s2", "zh", "en").node_id == "n"
    assert a.sched.release(first.job_id) is False  # expired: gone everywhere
    assert a.backend.get(first.job_id) is None


def test_job_expired_is_reported_locally_and_never_published(redis_server: Any, members: Any) -> None:
    a, b = members("A", ttl=0.3), members("B")
    a.sched.register_node("n", ["zh", "en"], max_concurrency=1)
    wait_until(lambda: b.sched.stats()["nodes_total"] == 1, what="B sees n")
    job = a.sched.dispatch("s", "zh", "en")
    expired = wait_until(lambda: [f for e, n, f in a.events if e == "job_expired"], what="job_expired")
    assert expired == [{"job_id": job.job_id, "session_id": "s", "pool_id": job.pool_id, "committed": False}]
    assert a.sched.stats()["jobs"]["expired"] == 1
    assert a.fleet.flush() and b.fleet.flush()
    stream = redis_server.client().xrange(f"{{{NS}}}:fleet:events")
    assert {fields[b"e"] for _, fields in stream} == {b"register"}
    assert not [e for e, _, _ in b.events if e == "job_expired"]


def test_forget_stays_local_and_a_heartbeat_elsewhere_keeps_the_capacity(redis_server: Any,
                                                                          members: Any) -> None:
    a = members("A", sched_kwargs={"forget_after": 0.2})
    b = members("B")
    a.sched.register_node("n", ["zh", "en"], max_concurrency=2)
    wait_until(lambda: b.sched.stats()["nodes_total"] == 1, what="B sees n")
    a.fleet.stop()  # A's offline mark stays local too: only A forgets
    a.sched.mark_offline("n")
    wait_until(lambda: a.sched.forget_offline_nodes() == ["n"], what="A forgets n")
    assert ("forget", "n") in [(e, n) for e, n, _ in a.events]
    a.fleet.start()
    assert a.fleet.flush()
    stream = redis_server.client().xrange(f"{{{NS}}}:fleet:events")
    assert not {fields[b"e"] for _, fields in stream} & {b"forget", b"remove", b"offline"}, stream
    # A's forget removed the node's capacity from Redis; B, still hearing
    # from the node, writes it back with its next heartbeat.
    b.sched.heartbeat("n", running=0)
    got = wait_until(lambda: try_dispatch(b.sched), what="dispatch on n through B")
    assert got.node_id == "n" and b.sched.release(got.job_id)
    wait_until(lambda: a.sched.stats()["nodes_total"] == 1, what="A learns n again from B's heartbeat")


def test_a_node_registered_not_ready_stays_registering_everywhere(members: Any) -> None:
    a, b = members("A"), members("B")
    a.sched.register_node("r", ["zh", "en"], ready=False)
    wait_until(lambda: b.sched.stats()["nodes_total"] == 1, what="B sees r")
    assert b.sched.node("r")["status"] == "registering"
    assert a.fleet.flush()
    c = members("C")  # from the compacted record
    assert c.sched.node("r")["status"] == "registering"
    a.sched.heartbeat("r", healthy=True)
    for m in (b, c):
        wait_until(lambda m=m: m.sched.node("r")["status"] == "ready", what="ready everywhere")
    assert a.fleet.flush()
    d = members("D")
    assert d.sched.node("r")["status"] == "ready"
