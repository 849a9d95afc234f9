"""Tests for :mod:`pysched.tools.bench.legacy`, the pure-Python model of the G0 "before" scheduler."""

from __future__ import annotations

import random
import threading
import time

import pytest

from pysched.tools.bench.legacy import (
    BREAKDOWN_KEYS,
    LegacyAssignment,
    LegacyNoNodeAvailable,
    LegacyNoPool,
    LegacyScheduler,
    RWLock,
)

TIMEOUT = 60.0  # waits for an event that must happen: only a bug gets near this on a busy machine


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def _wait_until(pred, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.001)
    return pred()


def _ready(sched: LegacyScheduler, node_id: str, langs, **kw) -> None:
    """Register a node and send the first healthy heartbeat (registering -> ready)."""
    reg_kw = {k: kw.pop(k) for k in ("services", "max_concurrency", "has_gpu", "accept_public_jobs") if k in kw}
    sched.register_node(node_id, langs, **reg_kw)
    sched.heartbeat(node_id, running=kw.pop("running", 0), cpu=10.0, gpu=10.0, mem=10.0, **kw)


# --------------------------------------------------------------------------
# RWLock
# --------------------------------------------------------------------------


def test_rwlock_readers_share():
    lock = RWLock()
    inside = threading.Barrier(3, timeout=TIMEOUT)

    def reader():
        with lock.read():
            inside.wait()  # all three hold the read lock at once

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    with lock.read():
        inside.wait()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert lock.readers == 0


def test_rwlock_new_reader_waits_behind_queued_writer():
    lock = RWLock()
    order: list[str] = []
    writer_in = threading.Event()
    let_writer_go = threading.Event()
    reader2_in = threading.Event()

    lock.acquire_read()  # reader 1 holds the lock

    def writer():
        with lock.write():
            order.append("writer")
            writer_in.set()
            let_writer_go.wait(TIMEOUT)

    def reader2():
        with lock.read():
            order.append("reader2")
            reader2_in.set()

    tw = threading.Thread(target=writer)
    tw.start()
    assert _wait_until(lambda: lock.writers_waiting == 1)  # writer queued behind reader 1

    tr = threading.Thread(target=reader2)
    tr.start()
    assert _wait_until(lambda: lock.readers_waiting == 1)  # reader 2 queued behind the writer
    # Reader 1 still holds the lock, so a non-fair lock would let reader 2 in now.
    assert not reader2_in.wait(0.05)
    assert not writer_in.is_set()

    lock.release_read()  # writer goes first...
    assert writer_in.wait(TIMEOUT)
    assert not reader2_in.wait(0.05)  # ...and reader 2 still waits while it holds
    let_writer_go.set()
    assert reader2_in.wait(TIMEOUT)  # then reader 2 is admitted
    tw.join(TIMEOUT)
    tr.join(TIMEOUT)
    assert order == ["writer", "reader2"]
    assert lock.readers == 0 and not lock.writer_active and lock.writers_waiting == 0


def test_rwlock_queued_readers_admitted_before_next_writer():
    lock = RWLock()
    order: list[str] = []
    lock.acquire_write()

    def reader():
        with lock.read():
            order.append("reader")

    def writer2():
        with lock.write():
            order.append("writer2")

    tr = threading.Thread(target=reader)
    tr.start()
    assert _wait_until(lambda: lock.readers_waiting == 1)
    tw = threading.Thread(target=writer2)
    tw.start()
    assert _wait_until(lambda: lock.writers_waiting == 1)
    lock.release_write()
    tr.join(TIMEOUT)
    tw.join(TIMEOUT)
    assert order == ["reader", "writer2"]  # phase-fair: no reader starvation


def test_rwlock_writers_exclusive_and_misuse():
    lock = RWLock()
    counter = [0]

    def bump():
        for _ in range(2000):
            with lock.write():
                v = counter[0]
                counter[0] = v + 1

    ts = [threading.Thread(target=bump) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in ts), "deadlock: a writer did not finish"
    assert counter[0] == 8000
    with pytest.raises(RuntimeError):
        lock.release_read()
    with pytest.raises(RuntimeError):
        lock.release_write()


# --------------------------------------------------------------------------
# Registration, pools, status
# --------------------------------------------------------------------------


def test_register_creates_one_pool_per_language_set():
    s = LegacyScheduler(clock=FakeClock())
    s.register_node("a", ["EN", "zh"])
    s.register_node("b", ["zh", "en"])
    s.register_node("c", ["de", "en", "zh"])
    st = s.stats()
    assert st["pools"] == 2
    assert st["pool_members"] == {"en-zh": 2, "de-en-zh": 1}
    assert st["nodes_by_status"] == {"registering": 3}


def test_node_needs_healthy_heartbeat_before_dispatch():
    s = LegacyScheduler(clock=FakeClock())
    s.register_node("a", ["en", "zh"])
    with pytest.raises(LegacyNoNodeAvailable) as ei:
        s.dispatch("s1", "zh", "en")
    assert ei.value.breakdown["status_not_ready"] == 1
    s.heartbeat("a", running=0, cpu=1, gpu=1, mem=1)
    assert s.node_status("a")["status"] == "ready"
    assert s.dispatch("s1", "zh", "en").node_id == "a"

    s2 = LegacyScheduler(clock=FakeClock(), ready_on_register=True)
    s2.register_node("a", ["en", "zh"])
    assert s2.dispatch("s1", "zh", "en").node_id == "a"


def test_pool_ids_max_plus_one_and_max_pools_cap():
    s = LegacyScheduler(clock=FakeClock(), max_pools=2)
    _ready(s, "a", ["en", "zh"])
    _ready(s, "b", ["en", "fr"])
    _ready(s, "c", ["en", "ja"])  # over the cap: no pool, unreachable
    assert s.dispatch("x", "zh", "en").pool_id == 1
    assert s.dispatch("x", "fr", "en").pool_id == 2
    with pytest.raises(LegacyNoPool):
        s.dispatch("x", "ja", "en")


# --------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------


def test_dispatch_picks_least_loaded():
    s = LegacyScheduler(clock=FakeClock())
    for nid, running in (("n1", 3), ("n2", 1), ("n3", 2)):
        _ready(s, nid, ["en", "zh"], running=running)
    a = s.dispatch("s1", "zh", "en", job_id="j1")
    assert isinstance(a, LegacyAssignment)
    assert (a.node_id, a.job_id, a.pool_id) == ("n2", "j1", 1)
    # n2 now has max(1 running, 1 reserved) = 1, still the least loaded.
    assert s.dispatch("s1", "zh", "en", job_id="j2").node_id == "n2"
    # n2 reports 3 running: max(3, 2) = 3 > n3's 2.
    s.heartbeat("n2", running=3)
    assert s.dispatch("s1", "zh", "en", job_id="j3").node_id == "n3"


def test_local_reservations_count_in_effective_load():
    s = LegacyScheduler(clock=FakeClock())
    _ready(s, "n1", ["en", "zh"], running=0)
    _ready(s, "n2", ["en", "zh"], running=1)
    first = s.dispatch("s", "zh", "en").node_id
    assert first == "n1"
    # n1: max(0, 1) = 1 == n2 -> either; but after another reservation on whichever,
    # the loads must stay balanced.
    s.dispatch("s", "zh", "en")
    assert s.reserved_counts() in ({"n1": 2}, {"n1": 1, "n2": 1})
    assert sum(s.reserved_counts().values()) == 2


def test_superset_pool_match_and_auto_source():
    s = LegacyScheduler(clock=FakeClock())
    _ready(s, "tri", ["de", "en", "zh"])
    _ready(s, "pair", ["en", "ja"])
    # A {de,en,zh} pool serves zh->en (superset), unlike the G1 exact-set index.
    a = s.dispatch("s", "zh", "EN")
    assert a.node_id == "tri"
    assert s.dispatch("s", "de", "zh").node_id == "tri"
    assert s.dispatch("s", "ja", "en").node_id == "pair"
    # src=auto: every pool containing tgt, in pool-config order.
    assert s.dispatch("s", "auto", "ja").node_id == "pair"
    assert s.dispatch("s", "auto", "en").pool_id == 1
    with pytest.raises(LegacyNoPool):
        s.dispatch("s", "ja", "zh")
    with pytest.raises(LegacyNoPool):
        s.dispatch("s", "auto", "fr")


def test_falls_back_to_next_eligible_pool():
    s = LegacyScheduler(clock=FakeClock())
    _ready(s, "p1", ["en", "zh"], running=4)  # full, pool 1
    _ready(s, "p2", ["de", "en", "zh"])  # pool 2
    a = s.dispatch("s", "zh", "en")
    assert (a.node_id, a.pool_id, a.preferred_pool, a.fallback_used) == ("p2", 2, 1, True)


def test_full_offline_degraded_excluded_with_breakdown():
    clock = FakeClock()
    s = LegacyScheduler(clock=clock, resource_threshold=85.0)
    langs = ["en", "zh"]
    _ready(s, "full", langs, running=4)
    _ready(s, "gone", langs)
    s.mark_offline("gone")
    _ready(s, "sick", langs)
    for _ in range(3):  # ready -> degraded after 3 consecutive failures
        s.heartbeat("sick", healthy=False)
    assert s.node_status("sick")["status"] == "degraded"
    _ready(s, "hot", langs)
    s.heartbeat("hot", cpu=85.0)  # exactly the threshold passes (strict >)
    s.heartbeat("hot", gpu=85.5)  # above it does not
    _ready(s, "nogpu", langs, has_gpu=False)  # health check fails: stays registering
    _ready(s, "nosem", langs, services=("asr", "nmt", "tts"))  # no semantic service
    need = ("asr", "nmt", "tts", "semantic")

    with pytest.raises(LegacyNoNodeAvailable) as ei:
        s.dispatch("s", "zh", "en", services=need)
    bd = ei.value.breakdown
    assert set(bd) == set(BREAKDOWN_KEYS)
    assert bd["total_nodes"] == 6
    assert bd["capacity_exceeded"] == 1
    assert bd["offline"] == 1
    assert bd["status_not_ready"] == 2  # degraded + registering(no gpu)
    assert bd["resource_threshold_exceeded"] == 1
    assert bd["model_not_available"] == 1
    assert ei.value.best_reason == "status_not_ready"
    assert ei.value.attempts == [(1, "status_not_ready", 6)]
    assert isinstance(ei.value, LookupError)

    excl = s.stats()["exclude_reasons"]
    assert excl["capacity_exceeded"] == {"count": 1, "examples": ["full"]}
    assert excl["status_not_ready"]["count"] == 2
    assert "offline" not in excl  # G0 does not record offline as an exclude reason

    # Heal the degraded node: degraded + healthy -> ready, and it is picked.
    s.heartbeat("sick", healthy=True)
    assert s.dispatch("s", "zh", "en", services=need).node_id == "sick"


def test_resource_threshold_is_strict_greater():
    s = LegacyScheduler(clock=FakeClock(), resource_threshold=85.0)
    _ready(s, "a", ["en", "zh"])
    s.heartbeat("a", cpu=85.0, gpu=85.0, mem=85.0)
    assert s.dispatch("s", "zh", "en").node_id == "a"  # == threshold passes (G0 uses >)
    s.heartbeat("a", mem=85.01)
    with pytest.raises(LegacyNoNodeAvailable) as ei:
        s.dispatch("s", "zh", "en")
    assert ei.value.best_reason == "resource_threshold_exceeded"


def test_stale_heartbeat_marked_offline_by_periodic_scan():
    clock = FakeClock()
    s = LegacyScheduler(clock=clock, heartbeat_timeout=45.0)
    _ready(s, "a", ["en", "zh"])
    _ready(s, "b", ["en", "zh"], running=2)
    clock.advance(40)
    s.heartbeat("b", running=2)
    clock.advance(10)  # a: 50 s silent; scan (every 30 s) is due
    assert s.dispatch("s", "zh", "en").node_id == "b"
    assert s.node_status("a")["status"] == "offline"
    s.heartbeat("a")  # offline is not revived by a heartbeat (§1.3)
    assert s.node_status("a")["status"] == "offline"
    s.register_node("a", ["en", "zh"])
    s.heartbeat("a", running=0)
    assert s.node_status("a")["status"] == "ready"


def test_quick_skip_when_pool_has_no_online_node():
    s = LegacyScheduler(clock=FakeClock())
    _ready(s, "a", ["en", "zh"])
    _ready(s, "b", ["en", "zh"])
    s.mark_offline("a")
    s.mark_offline("b")
    with pytest.raises(LegacyNoNodeAvailable) as ei:
        s.dispatch("s", "zh", "en")
    assert ei.value.breakdown["offline"] == 2
    assert ei.value.best_reason == "offline"
    assert ei.value.attempts == [(1, "offline", 2)]


def test_private_job_only_uses_private_nodes():
    s = LegacyScheduler(clock=FakeClock())
    _ready(s, "pub", ["en", "zh"])
    _ready(s, "priv", ["en", "zh"], accept_public_jobs=False, running=3)
    assert s.dispatch("s", "zh", "en").node_id == "pub"  # public jobs may use any node
    assert s.dispatch("s", "zh", "en", accept_public=False).node_id == "priv"


# --------------------------------------------------------------------------
# Reservation, commit, release
# --------------------------------------------------------------------------


def test_reservation_blocks_over_commit():
    clock = FakeClock()
    s = LegacyScheduler(clock=clock, reservation_ttl=90.0)
    _ready(s, "only", ["en", "zh"], max_concurrency=2)
    s.dispatch("s", "zh", "en", job_id="j1")
    s.dispatch("s", "zh", "en", job_id="j2")
    with pytest.raises(LegacyNoNodeAvailable) as ei:
        s.dispatch("s", "zh", "en", job_id="j3")
    assert ei.value.breakdown["capacity_exceeded"] == 1
    assert s.reserved_counts() == {"only": 2}
    # A retried job id returns its live assignment instead of reserving again.
    assert s.dispatch("s", "zh", "en", job_id="j1").job_id == "j1"
    assert s.reserved_counts() == {"only": 2}
    # Running jobs reported by the node take over via max(current, reserved).
    s.heartbeat("only", running=2)
    assert s.release("j1") is True
    with pytest.raises(LegacyNoNodeAvailable):
        s.dispatch("s", "zh", "en", job_id="j4")
    s.heartbeat("only", running=1)
    assert s.dispatch("s", "zh", "en", job_id="j4").node_id == "only"
    # Reservations expire after the TTL.
    clock.advance(91)
    s.heartbeat("only", running=0)
    assert s.reserved_counts() == {}


def test_reserve_failure_does_not_fall_back(monkeypatch):
    s = LegacyScheduler(clock=FakeClock())
    _ready(s, "a", ["en", "zh"], running=0)
    _ready(s, "b", ["en", "zh"], running=1)
    monkeypatch.setattr(s, "_reserve_job_slot", lambda node_id, job_id, now: None)
    with pytest.raises(LegacyNoNodeAvailable) as ei:
        s.dispatch("s", "zh", "en")
    assert ei.value.best_reason == "reserve_denied"
    assert s.stats()["reserve_denied"] == 1


def test_release_idempotent_and_commit():
    clock = FakeClock()
    s = LegacyScheduler(clock=clock)
    _ready(s, "a", ["en", "zh"])
    s.dispatch("s", "zh", "en", job_id="j1")
    assert s.commit("j1") is True
    assert s.commit("nope") is False
    assert s.release("j1") is True
    assert s.release("j1") is False
    assert s.release("never") is False
    assert s.commit("j1") is False
    assert s.reserved_counts() == {}
    st = s.stats()
    assert st["jobs"] == 0 and st["reservations"] == 0 and st["dispatched"] == 1
    # An expired reservation cannot be released or committed.
    s.dispatch("s", "zh", "en", job_id="j2")
    clock.advance(100)
    assert s.commit("j2") is False
    assert s.release("j2") is False


def test_sessions_tracked_and_stats_shape():
    s = LegacyScheduler(clock=FakeClock())
    _ready(s, "a", ["en", "zh"])
    s.dispatch("s1", "zh", "en")
    s.dispatch("s2", "en", "zh")
    s.dispatch("s1", "zh", "en")
    st = s.stats()
    assert st["sessions"] == 2
    assert st["nodes"] == 1 and st["pools"] == 1 and st["reservations"] == 3
    with pytest.raises(KeyError):
        s.heartbeat("ghost")


def test_language_change_moves_node_between_pools():
    s = LegacyScheduler(clock=FakeClock())
    _ready(s, "a", ["en", "zh"])
    s.heartbeat("a", languages=["en", "fr"])
    assert s.stats()["pool_members"] == {"en-zh": 0, "en-fr": 1}
    assert s.dispatch("s", "fr", "en").node_id == "a"
    with pytest.raises(LegacyNoNodeAvailable) as ei:
        s.dispatch("s", "zh", "en")
    assert ei.value.best_reason == "no_nodes"


# --------------------------------------------------------------------------
# Threaded smoke test
# --------------------------------------------------------------------------


def test_threaded_smoke_no_deadlock_no_overcommit():
    s = LegacyScheduler(reservation_ttl=60.0)
    langs = [["en", "zh"], ["de", "en", "zh"], ["en", "ja"]]
    node_ids = [f"n{i}" for i in range(12)]
    max_c = 3
    for i, nid in enumerate(node_ids):
        _ready(s, nid, langs[i % 3], max_concurrency=max_c)

    stop = threading.Event()
    errors: list[BaseException] = []
    counts = {"ok": 0, "fail": 0, "hb": 0}
    count_lock = threading.Lock()
    pairs = [("zh", "en"), ("en", "zh"), ("de", "en"), ("ja", "en"), ("auto", "en")]

    def dispatcher(seed: int) -> None:
        rng = random.Random(seed)
        held: list[str] = []
        try:
            while not stop.is_set():
                src, tgt = rng.choice(pairs)
                try:
                    a = s.dispatch(f"sess{rng.randrange(8)}", src, tgt)
                except LookupError:
                    with count_lock:
                        counts["fail"] += 1
                else:
                    held.append(a.job_id)
                    with count_lock:
                        counts["ok"] += 1
                    for nid, n in s.reserved_counts().items():
                        assert n <= max_c, (nid, n)
                if held and rng.random() < 0.45:
                    job = held.pop(rng.randrange(len(held)))
                    if rng.random() < 0.5:
                        s.commit(job)
                    s.release(job)
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)

    def heartbeater() -> None:
        rng = random.Random(99)
        try:
            while not stop.is_set():
                nid = rng.choice(node_ids)
                s.heartbeat(
                    nid,
                    running=0,
                    cpu=rng.uniform(0, 95),
                    gpu=rng.uniform(0, 95),
                    mem=rng.uniform(0, 60),
                    healthy=rng.random() > 0.05,
                )
                with count_lock:
                    counts["hb"] += 1
                time.sleep(0.0002)
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=dispatcher, args=(k,), daemon=True) for k in (1, 2)]
    threads.append(threading.Thread(target=heartbeater, daemon=True))
    for t in threads:
        t.start()
    # at least 0.3 s, and until every thread has done some work (on a busy machine that takes longer)
    time.sleep(0.3)

    def worked() -> bool:
        with count_lock:
            return counts["ok"] > 0 and counts["hb"] > 0

    _wait_until(lambda: worked() or bool(errors))
    stop.set()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "deadlock: a worker did not finish"
    assert not errors, errors
    assert counts["ok"] > 0 and counts["hb"] > 0
    for nid, n in s.reserved_counts().items():
        assert n <= max_c, (nid, n)
    st = s.stats()
    assert st["dispatched"] == counts["ok"]
    assert st["no_pool"] == 0
