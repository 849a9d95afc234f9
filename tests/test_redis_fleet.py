"""RedisFleet: node state and pool ids shared by scheduler processes, on a real redis-server.

No fakes: every test runs against the private server of ``tests/redis_server.py``
(skipped locally without ``redis-server``, failing in CI). The
multi-process tests spawn real scheduler processes (``tests/fleet_worker.py``)
that share one server and one fleet; the nodes are simulated by a shared,
Redis-independent counter of jobs held at once.

Timing: the fleets refresh every 0.2 s, reservations live 1 s where expiry
matters, and every wait polls with a deadline well past what it waits for,
so a loaded machine slows the tests down rather than failing them.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pysched
from pysched import NoNodeAvailable, ReservationBackendUnavailable
from pysched.redis import RedisFleet, RedisReservations
from pysched.redis._fleet_shared import SCRIPT_NAMES
from pysched.redis._publisher import coalesce
from pysched.redis._scripts import shipped

pytest_plugins = ["redis_server"]

NS = "pysched"
PAIRS = [("zh", "en"), ("en", "ja"), ("de", "en"), ("en", "zh"), ("auto", "en")]


def wait_until(pred: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``pred`` until it is truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Member:
    """One in-process "scheduler process": its own client, backend, scheduler and fleet."""

    def __init__(self, server: Any, name: str, *, ttl: float = 30.0, namespace: str = NS,
                 timeout: float = 2.0, start: bool = True, **fleet_kwargs: Any) -> None:
        self.client = server.client(socket_timeout=timeout, socket_connect_timeout=timeout)
        self.backend = RedisReservations(self.client, namespace=namespace)
        # No fixed seed: job ids derive from it, and they must not collide
        # between schedulers sharing one Redis namespace.
        self.sched = pysched.Scheduler(reservations=self.backend, reservation_ttl=ttl)
        fleet_kwargs.setdefault("refresh_interval", 0.2)
        self.fleet = RedisFleet(self.sched, self.client, namespace, process_id=name, **fleet_kwargs)
        if start:
            self.fleet.start()

    def close(self) -> None:
        self.fleet.stop()
        self.client.close()


@pytest.fixture
def members(redis_server: Any) -> Iterator[Callable[..., Member]]:
    """Factory of in-process fleet members on the (emptied) test server, all closed afterwards."""
    made: list[Member] = []

    def make(name: str, **kwargs: Any) -> Member:
        m = Member(redis_server, name, **kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def view(sched: pysched.Scheduler) -> dict:
    stats = sched.stats()
    return {
        "pools": {pid: (p["name"], p["members"]) for pid, p in stats["pools"].items()},
        "explain": {f"{s}>{t}": sched.explain(s, t).pools for s, t in PAIRS},
    }


def node_count(sched: pysched.Scheduler) -> int:
    return sched.stats()["nodes_total"]


# -- construction -------------------------------------------------------------------


def test_requires_redis_reservations_on_the_same_namespace(redis_server: Any) -> None:
    client = redis_server.client()
    with pytest.raises(TypeError, match="RedisReservations"):
        RedisFleet(pysched.Scheduler(), client)
    sched = pysched.Scheduler(reservations=RedisReservations(client, namespace="a"))
    with pytest.raises(ValueError, match="namespace"):
        RedisFleet(sched, client, "b")
    with pytest.raises(ValueError, match="refresh_interval"):
        RedisFleet(sched, client, "a", refresh_interval=0)
    sched.register_node("early", ["en", "zh"])
    with pytest.raises(ValueError, match="before registering nodes"):
        RedisFleet(sched, client, "a").start()
    client.close()


def test_exported_from_pysched() -> None:
    assert pysched.RedisFleet is RedisFleet
    assert issubclass(pysched.ReservationBackendUnavailable, ConnectionError)


# -- sharing ----------------------------------------------------------------------------


def test_pool_ids_and_index_agree_across_members(members: Callable[..., Member]) -> None:
    a, b = members("A"), members("B")
    # Different sets in different orders, the same set through both members.
    a.sched.register_node("a1", ["zh", "en"], max_concurrency=2)
    b.sched.register_node("b1", ["ja", "en"], max_concurrency=2)
    b.sched.register_node("b2", ["en", "zh-CN"], max_concurrency=2)  # alias of zh: the same set
    a.sched.register_node("a2", ["de", "en"], max_concurrency=2)
    b.sched.register_node("b3", ["en", "de"], max_concurrency=2)
    a.sched.register_node("a3", ["zh", "ja", "en"], max_concurrency=2)
    wait_until(lambda: node_count(a.sched) == node_count(b.sched) == 6, what="both members see 6 nodes")
    wait_until(lambda: view(a.sched) == view(b.sched), what="identical views")
    pools = a.sched.stats()["pools"]
    assert sorted(p["name"] for p in pools.values()) == ["de-en", "en-ja", "en-ja-zh", "en-zh"]
    assert sorted(pools) == [1, 2, 3, 4]
    # Redis holds the same table: one id per set, the sequence at the top.
    table = {k.decode(): int(v) for k, v in a.client.hgetall("{pysched}:fleet:pool_ids").items()}
    assert {",".join(sorted(p["name"].split("-"))): pid for pid, p in pools.items()} == table
    assert int(a.client.get("{pysched}:fleet:pool_seq")) == 4
    assert a.sched.explain("zh", "en").pools == b.sched.explain("zh", "en").pools != ()


def test_events_propagate_without_echo(members: Callable[..., Member]) -> None:
    a, b = members("A"), members("B")
    a.sched.register_node("n1", ["zh", "en"], max_concurrency=3)
    wait_until(lambda: node_count(b.sched) == 1, what="register")
    assert b.sched.node("n1")["max_concurrency"] == 3

    a.sched.heartbeat("n1", running=2, cpu=40.0, max_concurrency=5, services=["asr", "nmt", "tts", "x"])
    wait_until(lambda: b.sched.node("n1")["running"] == 2, what="heartbeat")
    info = b.sched.node("n1")
    assert info["cpu"] == 40.0 and info["max_concurrency"] == 5 and "x" in info["services"]
    assert b.sched.reservations.node_counts(["n1"]) == {"n1": 0}
    assert int(a.client.get("{pysched}:max:n1")) == 5

    for action, status in (("drain_node", "draining"), ("resume_node", "ready"), ("mark_offline", "offline")):
        getattr(a.sched, action)("n1")
        wait_until(lambda status=status: b.sched.node("n1")["status"] == status, what=action)
    a.sched.heartbeat("n1", running=0)  # a heartbeat brings an offline node back, everywhere
    wait_until(lambda: b.sched.node("n1")["status"] == "ready", what="revival")
    for _ in range(3):
        a.sched.heartbeat("n1", healthy=False)  # each counts: coalescing must not merge them
    wait_until(lambda: b.sched.node("n1")["status"] == "degraded", what="degraded")
    # A change made through B travels the other way.
    b.sched.drain_node("n1")
    wait_until(lambda: a.sched.node("n1")["status"] == "draining", what="drain from B")

    a.sched.remove_node("n1")
    wait_until(lambda: node_count(b.sched) == 0, what="remove")
    assert a.client.exists("{pysched}:fleet:node:n1") == 0
    assert a.client.smembers("{pysched}:fleet:nodes") == set()
    assert a.fleet.flush() and b.fleet.flush()
    sa, sb = a.fleet.stats(), b.fleet.stats()
    # B only published its own drain; nothing it applied was echoed back.
    assert sb["published"] == 1 and sa["applied"] == 1
    assert sa["errors"] == sb["errors"] == 0 and sa["dropped"] == 0


def test_late_starter_sees_the_whole_fleet(members: Callable[..., Member]) -> None:
    a, b = members("A"), members("B")
    a.sched.register_node("a1", ["zh", "en"], max_concurrency=2)
    a.sched.register_node("a2", ["de", "en"], max_concurrency=3, has_gpu=False)
    b.sched.register_node("b1", ["ja", "en"], max_concurrency=4, accept_public_jobs=False)
    b.sched.register_node("b2", ["zh", "en"])
    b.sched.register_node("gone", ["fr", "en"])
    a.sched.drain_node("a2")
    for _ in range(3):
        b.sched.heartbeat("b1", healthy=False, running=1, gpu=50.0)
    b.sched.mark_offline("b2")
    b.sched.remove_node("gone")
    wait_until(lambda: node_count(a.sched) == node_count(b.sched) == 4, what="A and B agree")
    assert a.fleet.flush() and b.fleet.flush()

    c = members("C")  # reads the compacted records, not the whole stream
    assert node_count(c.sched) == 4
    assert {n: c.sched.node(n)["status"] for n in ("a1", "a2", "b1", "b2")} == {
        "a1": "ready", "a2": "draining", "b1": "degraded", "b2": "offline"}
    b1 = c.sched.node("b1")
    assert (b1["max_concurrency"], b1["accept_public_jobs"], b1["running"], b1["gpu"]) == (4, False, 1, 50.0)
    assert c.sched.node("a2")["has_gpu"] is False
    wait_until(lambda: view(c.sched) == view(a.sched) == view(b.sched), what="identical views")
    assert "de-en" in {p["name"] for p in c.sched.stats()["pools"].values()}
    assert c.fleet.stats()["published"] == 0


def test_event_for_an_unknown_node_loads_its_record(members: Callable[..., Member]) -> None:
    a, b = members("A"), members("B")
    a.sched.register_node("n1", ["zh", "en"], max_concurrency=2)
    wait_until(lambda: node_count(b.sched) == 1, what="register")
    # B forgets n1 behind its fleet's back (as if it had missed the register).
    b.fleet.stop()
    b.sched.remove_node("n1")
    b.fleet._applier.apply_event("heartbeat", "n1", json.dumps({"running": 1}))
    assert b.sched.node("n1")["max_concurrency"] == 2  # rebuilt from the compacted record
    b.fleet._applier.apply_event("drain", "ghost", "{}")  # no record anywhere: ignored
    with pytest.raises(pysched.UnknownNode):
        b.sched.node("ghost")


def test_refresh_shows_load_made_by_other_members(members: Callable[..., Member]) -> None:
    a, b = members("A"), members("B")
    a.sched.register_node("n1", ["zh", "en"], max_concurrency=4)
    wait_until(lambda: node_count(b.sched) == 1, what="register")
    jobs = [a.sched.dispatch(f"s{i}", "zh", "en").job_id for i in range(3)]
    slot = b.sched.snapshot.slot("n1")
    wait_until(lambda: b.sched.snapshot.inflight[slot] == 3, timeout=60, what="B sees A's 3 reservations")
    # The refreshes keep coming (one round trip each: test_refresh_inflight_mirrors_fleet_counts).
    before_refresh = b.fleet.stats()["refreshes"]
    wait_until(lambda: b.fleet.stats()["refreshes"] >= before_refresh + 2, timeout=60, what="two more refreshes")
    for job in jobs:
        a.sched.release(job)
    wait_until(lambda: b.sched.snapshot.inflight[slot] == 0, timeout=60, what="B sees the releases")


def test_fleet_restart_keeps_own_and_remote_nodes(members: Callable[..., Member]) -> None:
    a, b = members("A"), members("B")
    a.sched.register_node("a1", ["zh", "en"])
    b.sched.register_node("b1", ["de", "en"])
    wait_until(lambda: node_count(a.sched) == node_count(b.sched) == 2, what="sync")
    b.fleet.stop()
    a.sched.register_node("a2", ["ja", "en"])  # published while B is away
    a.fleet.flush()
    b.fleet.start()
    wait_until(lambda: node_count(b.sched) == 3, what="B catches up")
    assert view(a.sched) == view(b.sched)


# -- faults -------------------------------------------------------------------------------


def test_outage_raises_fast_changes_nothing_and_heals(redis_server: Any, members: Callable[..., Member]) -> None:
    a, b = members("A"), members("B")
    a.sched.register_node("a1", ["zh", "en"], max_concurrency=2)
    b.sched.register_node("b1", ["de", "en"], max_concurrency=2)
    wait_until(lambda: node_count(a.sched) == node_count(b.sched) == 2, what="sync")
    held = a.sched.dispatch("keep", "zh", "en")
    wait_until(lambda: b.fleet.stats()["refreshes"] >= 2, what="a refresh")
    before = (a.sched.snapshot.inflight.copy(), a.sched.stats()["sessions"], a.sched.snapshot.version)

    redis_server.stop()
    for call in (lambda: a.sched.dispatch("new-session", "zh", "en"),
                 lambda: a.sched.dispatch("keep", "zh", "en"),
                 lambda: a.sched.register_node("a9", ["fr", "en"])):  # a pool id needs Redis too
        started = time.monotonic()
        with pytest.raises(ReservationBackendUnavailable):
            call()
        # fails fast (the client's timeout), instead of hanging; generous for a loaded machine
        assert time.monotonic() - started < 20.0
    # Nothing changed locally: the mirror, the snapshot (the failed register
    # left no trace) and, checked once Redis is back, the sessions.
    assert (a.sched.snapshot.inflight == before[0]).all()
    assert a.sched.snapshot.version == before[2]
    # Local changes keep being queued; the threads count errors and live on.
    a.sched.drain_node("a1")
    wait_until(lambda: a.fleet.stats()["errors"] >= 1 and b.fleet.stats()["errors"] >= 1, what="errors counted")
    assert a.fleet.stats()["pending"] >= 1

    redis_server.start()  # the same socket, an empty dataset
    stats = a.sched.stats()
    assert stats["sessions"] == before[1] and stats["dispatch"]["backend_unavailable"] == 2
    wait_until(lambda: a.fleet.stats()["heals"] >= 1 and b.fleet.stats()["heals"] >= 1, what="both heal")
    # Each member re-wrote its own nodes: reservations work again, by themselves.
    a.sched.resume_node("a1")
    assignment = wait_until(lambda: _try_dispatch(b.sched, "zh", "en"), what="dispatch on a1 through B")
    assert assignment.node_id == "a1"
    assert wait_until(lambda: _try_dispatch(a.sched, "de", "en"), what="dispatch on b1").node_id == "b1"
    assert int(a.client.get("{pysched}:max:a1")) == 2 and int(a.client.get("{pysched}:max:b1")) == 2
    # The compacted records are back, so a late starter sees the fleet.
    assert a.fleet.flush() and b.fleet.flush()
    c = members("C")
    assert node_count(c.sched) == 2 and view(c.sched) == view(a.sched)
    # Pool ids were re-seeded: a new language set gets a fresh id, not 1 or 2.
    a.sched.register_node("a9", ["fr", "en"])
    assert set(a.sched.stats()["pools"]) == {1, 2, 3}
    # A wrote its reservation back after the restart: still held, released once.
    assert a.sched.release(held.job_id) is True
    assert a.sched.release(held.job_id) is False


def _try_dispatch(sched: pysched.Scheduler, src: str, tgt: str) -> pysched.Assignment | None:
    try:
        return sched.dispatch(f"probe-{time.monotonic_ns()}", src, tgt)
    except (NoNodeAvailable, ReservationBackendUnavailable):
        return None


def test_threads_survive_and_publish_after_outage(redis_server: Any, members: Callable[..., Member]) -> None:
    a, b = members("A"), members("B")
    redis_server.stop()
    time.sleep(0.3)
    redis_server.start()
    # A change made after the outage still reaches B.
    a.sched.register_node("late", ["zh", "en"])
    wait_until(lambda: node_count(b.sched) == 1, what="B applies after the outage")
    assert all(t.is_alive() for t in a.fleet._threads + b.fleet._threads)


def test_queue_overflow_during_outage_republishes_state(redis_server: Any, members: Callable[..., Member]) -> None:
    import os
    import signal

    a, b = members("A", max_queue=2), members("B")
    a.sched.register_node("n1", ["zh", "en"])
    wait_until(lambda: node_count(b.sched) == 1, what="register")
    # A hung server (timeouts, data kept), rather than a restart: no heal.
    os.kill(redis_server._proc.pid, signal.SIGSTOP)
    try:
        a.sched.drain_node("n1")  # dropped from the full queue below
        for i in range(3):
            a.sched.heartbeat("n1", running=i)
        assert a.fleet.stats()["dropped"] >= 1
        wait_until(lambda: a.fleet.stats()["errors"] >= 1, what="the publisher notices")
    finally:
        os.kill(redis_server._proc.pid, signal.SIGCONT)
    # The drain was lost with the queue's head; the re-published state has it.
    wait_until(lambda: b.sched.node("n1")["status"] == "draining", what="state re-published")
    wait_until(lambda: b.sched.node("n1")["running"] == 2, what="last load")
    assert a.fleet.stats()["heals"] == 0


# -- multi-process ------------------------------------------------------------------------

NODES = [  # node id, languages, max concurrency, registering process
    ("n0", ["zh", "en"], 2, 0),
    ("n1", ["en", "ja"], 2, 1),
    ("n2", ["de", "en"], 2, 2),
    ("n3", ["en", "de"], 3, 0),
    ("n4", ["en", "zh"], 2, 1),
    ("n5", ["en", "ja", "zh"], 3, 2),
]
CAPS = {n: cap for n, _, cap, _ in NODES}


class Fleet3:
    """Three spawned scheduler processes sharing the test server, plus a Redis monitor."""

    def __init__(self, server: Any, *, jobs_per_thread: int, threads: int = 2, burst: int = 4,
                 hold_s: float = 0.003) -> None:
        import fleet_worker

        self.server = server
        self.ctx = multiprocessing.get_context("spawn")
        self.counters = fleet_worker.NodeCounters(self.ctx, len(NODES))
        self.reports = self.ctx.Queue()
        self.go, self.done = self.ctx.Event(), self.ctx.Event()
        self.total_jobs = 3 * threads * jobs_per_thread
        self.procs = []
        for p in range(3):
            # Each process registers its own nodes, in its own order.
            own = [(n, langs, cap) for n, langs, cap, owner in NODES if owner == p]
            cfg = {
                "name": f"proc{p}", "socket": server.unix_socket, "namespace": NS, "seed": p,
                "nodes": own if p % 2 else own[::-1], "expect_nodes": len(NODES), "pairs": PAIRS,
                "node_index": {n: i for i, (n, *_rest) in enumerate(NODES)}, "mode": "burst",
                "threads": threads, "jobs_per_thread": jobs_per_thread, "burst": burst, "hold_s": hold_s,
                "ttl": 5.0, "timeout": 0.3,
            }
            proc = self.ctx.Process(target=fleet_worker.run, name=cfg["name"], daemon=True,
                                    args=(cfg, self.counters, self.reports, self.go, self.done))
            self.procs.append(proc)
        self.redis_peak = dict.fromkeys(CAPS, 0)
        self.redis_samples = 0
        self._stop_monitor = threading.Event()
        self._monitor = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        """Sample every node's Redis holdings (reserved + committed, one MULTI) until stopped."""
        client = self.server.client(socket_timeout=0.2, socket_connect_timeout=0.2)
        while not self._stop_monitor.is_set():
            try:
                pipe = client.pipeline(transaction=True)
                for node in CAPS:
                    pipe.zcard(f"{{{NS}}}:resv:{node}")
                    pipe.zcard(f"{{{NS}}}:lease:{node}")
                counts = pipe.execute()
            except Exception:  # the outage test stops the server under us
                time.sleep(0.02)
                continue
            for i, node in enumerate(CAPS):
                self.redis_peak[node] = max(self.redis_peak[node], counts[2 * i] + counts[2 * i + 1])
            self.redis_samples += 1
            time.sleep(0.001)
        client.close()

    def collect(self, kind: str, timeout: float = 40.0) -> dict[str, dict]:
        out: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        while len(out) < 3:
            try:
                msg = self.reports.get(timeout=0.5)
            except queue.Empty:
                dead = [p.name for p in self.procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    pytest.fail(f"only {sorted(out)} reported {kind!r} ({dead} died)")
                continue
            if msg["kind"] == "error":
                pytest.fail(f"{msg['name']} failed: {msg['error']}\n{msg['trace']}")
            assert msg["kind"] == kind, msg
            out[msg["name"]] = msg
        return out

    def alive(self) -> bool:
        """True while no worker died; fails the test with the dead worker's report otherwise."""
        if all(p.exitcode in (None, 0) for p in self.procs):
            return True
        try:
            while True:
                msg = self.reports.get(timeout=1)
                if msg["kind"] == "error":
                    pytest.fail(f"{msg['name']} failed: {msg['error']}\n{msg['trace']}")
        except queue.Empty:
            pytest.fail(f"workers died: {[(p.name, p.exitcode) for p in self.procs]}")

    def start(self) -> dict[str, dict]:
        for proc in self.procs:
            proc.start()
        synced = self.collect("synced")
        self._monitor.start()
        self.go.set()
        return synced

    def finish(self) -> tuple[dict[str, dict], dict[str, dict]]:
        done = self.collect("done")
        self.done.set()
        final = self.collect("final")
        for proc in self.procs:
            proc.join(10)
        self._stop_monitor.set()
        self._monitor.join(5)
        return done, final

    def kill(self) -> None:
        self._stop_monitor.set()
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)

    def check_invariants(self, done: dict[str, dict], final: dict[str, dict]) -> None:
        peaks = dict(zip(CAPS, self.counters.peak[:], strict=True))
        assert all(peaks[n] <= CAPS[n] for n in CAPS), ("node-side over-commit", peaks, CAPS)
        assert all(self.redis_peak[n] <= CAPS[n] for n in CAPS), ("Redis over-commit", self.redis_peak)
        assert self.redis_samples > 20
        assert sum(peaks.values()) > len(CAPS), peaks  # the nodes really were loaded
        # Every job completed, and nothing is held anywhere afterwards.
        assert sum(d["completed"] for d in done.values()) == self.total_jobs
        assert all(d["completed"] == d["dispatched"] for d in done.values()), done
        assert self.counters.completed.value == self.total_jobs
        assert list(self.counters.held[:]) == [0] * len(NODES)
        client = self.server.client()
        backend = RedisReservations(client, namespace=NS)
        assert backend.node_counts(CAPS) == dict.fromkeys(CAPS, 0)
        assert backend.count() == 0
        client.close()
        for name, f in final.items():
            assert f["count"] == 0, name
            assert f["inflight"] == dict.fromkeys(CAPS, 0), (name, f["inflight"])
            assert f["fleet"]["dropped"] == 0, (name, f["fleet"])


@pytest.fixture
def fleet3(redis_server: Any) -> Iterator[Callable[..., Fleet3]]:
    made: list[Fleet3] = []

    def make(**kwargs: Any) -> Fleet3:
        f = Fleet3(redis_server, **kwargs)
        made.append(f)
        return f

    yield make
    for f in made:
        f.kill()


def _assert_views_agree(views: dict[str, dict]) -> None:
    first = next(iter(views.values()))
    for name, v in views.items():
        assert v["pools"] == first["pools"], (name, v["pools"], first["pools"])
        assert v["explain"] == first["explain"], (name, v["explain"], first["explain"])
    names = sorted(name for name, _members in first["pools"].values())
    assert names == ["de-en", "en-ja", "en-ja-zh", "en-zh"], names
    assert sorted(first["pools"]) == [1, 2, 3, 4]
    assert first["nodes"] == sorted(CAPS)


def test_three_processes_never_over_commit(fleet3: Callable[..., Fleet3]) -> None:
    f = fleet3(jobs_per_thread=150)
    synced = f.start()
    _assert_views_agree(synced)  # pool ids and the language index agree across processes
    done, final = f.finish()
    f.check_invariants(done, final)
    assert all(d["unavailable"] == 0 for d in done.values()), done
    _assert_views_agree(final)
    for name, fin in final.items():
        assert fin["fleet"]["errors"] == 0, (name, fin["fleet"])


def test_redis_restart_mid_run(fleet3: Callable[..., Fleet3], redis_server: Any) -> None:
    f = fleet3(jobs_per_thread=150)
    f.start()
    # Mid-run: a third of the jobs done, then 1.5 s without Redis.
    wait_until(lambda: f.alive() and f.counters.completed.value >= f.total_jobs // 3, timeout=30,
               what="a third of the jobs")
    redis_server.stop()
    time.sleep(1.5)
    redis_server.start()  # empty: the fleets heal by themselves
    done, final = f.finish()
    f.check_invariants(done, final)
    # Every process saw the outage in some Redis call, and each dispatch that
    # saw it raised quickly (client timeout 0.3 s). Whether any dispatch saw
    # it is timing: a process whose own view shows no free node (its
    # releases wait for Redis too) answers NoNodeAvailable without asking
    # Redis. That dispatch raises ReservationBackendUnavailable during an
    # outage is checked call by call in test_redis_faults.py (item 5).
    for name, d in done.items():
        assert d["unavailable"] + d["release_retries"] + d["commit_failed"] >= 1, (name, d)
        assert d["unavailable_max_s"] < 20.0, (name, d)  # bounded by the client timeout, not hung
    for name, fin in final.items():
        assert fin["fleet"]["heals"] >= 1, (name, fin["fleet"])
        assert fin["fleet"]["errors"] >= 1, (name, fin["fleet"])
    _assert_views_agree(final)


def test_sigkill_mid_dispatch_returns_capacity(redis_server: Any, members: Callable[..., Member]) -> None:
    import fleet_worker

    a, b = members("A"), members("B")
    a.sched.register_node("n0", ["zh", "en"], max_concurrency=2)
    b.sched.register_node("n1", ["en", "zh"], max_concurrency=2)
    wait_until(lambda: node_count(a.sched) == node_count(b.sched) == 2, what="sync")

    ctx = multiprocessing.get_context("spawn")
    reports, go, done = ctx.Queue(), ctx.Event(), ctx.Event()
    ttl = 1.0
    cfg = {"name": "victim", "socket": redis_server.unix_socket, "namespace": NS, "nodes": [],
           "expect_nodes": 2, "pairs": [("zh", "en")], "mode": "hog", "hog": 4, "ttl": ttl}
    victim = ctx.Process(target=fleet_worker.run, args=(cfg, None, reports, go, done), daemon=True)
    victim.start()
    try:
        msg = reports.get(timeout=30)
        assert msg["kind"] == "synced", msg
        go.set()
        msg = reports.get(timeout=30)
        assert msg["kind"] == "holding" and len(msg["jobs"]) == 4, msg
        # The victim holds everything (uncommitted) and keeps dispatching.
        assert a.backend.node_counts(["n0", "n1"]) == {"n0": 2, "n1": 2}
        with pytest.raises(NoNodeAvailable):
            a.sched.dispatch("s", "zh", "en")
        victim.kill()  # SIGKILL, mid-run
        killed = time.monotonic()
        victim.join(60)
        assert victim.exitcode == -9
    finally:
        if victim.is_alive():
            victim.kill()
    # Within the TTL (plus a margin) the survivors get all the capacity back.
    first = wait_until(lambda: _try_dispatch(a.sched, "zh", "en"), timeout=ttl + 3, what="capacity back")
    assert time.monotonic() - killed < ttl + 3
    got = [first] + [wait_until(lambda s=s: _try_dispatch(s, "zh", "en"), timeout=60, what="more capacity")
                     for s in (b.sched, a.sched, b.sched)]
    assert sorted(x.node_id for x in got) == ["n0", "n0", "n1", "n1"]
    for x, s in zip(got, (a.sched, b.sched, a.sched, b.sched), strict=True):
        assert s.release(x.job_id)
    assert a.backend.count() == 0


# -- Redis Cluster readiness ------------------------------------------------------------


def test_scripts_touch_only_keys_passed_in_KEYS() -> None:
    """Static check: every command's key argument is a KEYS entry."""
    keyless = {"TIME"}
    for script in map(shipped, SCRIPT_NAMES):
        code = "\n".join(line.split("--", 1)[0] for line in script.body.splitlines())
        calls = re.findall(r"redis\.call\(\s*'(\w+)'\s*(?:,\s*([^,)]+))?", code)
        assert calls, script.name
        for cmd, first in calls:
            if cmd not in keyless:
                assert re.fullmatch(r"KEYS\[\d\]", first.strip()), (script.name, cmd, first)


def test_runs_on_a_cluster_mode_server(redis_server_factory: Any) -> None:
    """Strict (``#!lua``) copies of the scripts run on a cluster node: one slot per call."""
    from redis.crc import key_slot
    from redis_server import free_port

    server = redis_server_factory(
        port=free_port(),
        extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-port", str(free_port())],
    )
    admin = server.client()
    admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
    wait_until(lambda: b"cluster_state:ok" in admin.execute_command("CLUSTER", "INFO"), what="cluster ready")

    def strict(member: Member) -> None:
        scripts = member.fleet._ctx.scripts
        for attr in ("allocate", "seed", "publish"):
            setattr(scripts, attr, getattr(scripts, attr).strict())

    a = Member(server, "A", namespace="fl", start=False)
    b = Member(server, "B", namespace="fl", start=False)
    try:
        for m in (a, b):
            strict(m)
            m.fleet.start()
        a.sched.register_node("a1", ["zh", "en"])
        b.sched.register_node("b1", ["de", "en"])
        wait_until(lambda: node_count(a.sched) == node_count(b.sched) == 2, what="sync on a cluster node")
        assert view(a.sched) == view(b.sched)
        assert a.fleet.stats()["errors"] == b.fleet.stats()["errors"] == 0
        keys = list(admin.scan_iter(count=1000))
        assert keys and {key_slot(k) for k in keys} == {key_slot(b"fl")}
        # And the check does fire on a strict script touching another slot.
        with pytest.raises(Exception, match="same slot"):
            admin.eval("#!lua\nreturn redis.call('GET', 'elsewhere')", 1, "{fl}:x")
    finally:
        a.close()
        b.close()
        admin.close()


# -- the documentation's example ------------------------------------------------------

DOC_URL = "redis://127.0.0.1:6379/0"


def _doc_examples() -> list[str]:
    """Python blocks using RedisFleet in README.md and docs/several-processes.md (deduplicated)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    blocks: list[str] = []
    for path in (root / "README.md", root / "docs" / "several-processes.md"):
        if path.exists():
            for block in re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
                if "RedisFleet" in block and block not in blocks:
                    blocks.append(block)
    return blocks


@pytest.mark.parametrize("index", range(len(_doc_examples())))
def test_documented_example_runs(index: int, redis_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """README's test skips Redis examples: they run here, against the private server."""
    block = _doc_examples()[index]
    assert DOC_URL in block
    exec(compile(block.replace(DOC_URL, f"unix://{redis_server.unix_socket}"), "several-processes example",
                 "exec"), {})
    assert "{1: {'name': 'en-zh', 'members': 1" in capsys.readouterr().out


# -- units -------------------------------------------------------------------------------


def test_heartbeats_coalesce_per_node_but_keep_order_and_health() -> None:
    batch = [
        (1, "heartbeat", "a", {"running": 1}),
        (2, "heartbeat", "b", {"running": 5}),
        (3, "heartbeat", "a", {"cpu": 10.0, "running": 2}),
        (4, "heartbeat", "a", {"healthy": False}),
        (5, "heartbeat", "a", {"healthy": False}),
        (6, "offline", "b", {}),
        (7, "heartbeat", "b", {"running": 0}),
        (8, "heartbeat", "b", {"mem": 3.0}),
    ]
    assert coalesce(batch) == [
        (3, "heartbeat", "a", {"running": 2, "cpu": 10.0}),
        (2, "heartbeat", "b", {"running": 5}),
        (4, "heartbeat", "a", {"healthy": False}),
        (5, "heartbeat", "a", {"healthy": False}),
        (6, "offline", "b", {}),
        (8, "heartbeat", "b", {"running": 0, "mem": 3.0}),
    ]


def test_language_set_key_is_unambiguous() -> None:
    from pysched.redis.fleet import _set_key

    # Joined by "-", both would read "en-sr-latn".
    assert _set_key({"en", "sr-latn"}) != _set_key({"en-sr-latn"})
    assert len({shipped(name).sha for name in SCRIPT_NAMES}) == len(SCRIPT_NAMES)
