"""Tests for :mod:`pysched.tools.bench.peer`, the pure-Python indexed peer ``pysched bench`` compares against.

Both index designs (lazy-deletion heap, SortedList) run every test: picks
(least load ratio, then GPU, ties among equals), superset language matching,
re-keying on reserve/release/heartbeat, TTL and commit, bad input, and no
over-commit under threads (an invariant, never a timing). Time is a fake
clock wherever it matters.
"""

from __future__ import annotations

import os
import random
import threading

import pytest

from pysched.tools.bench.peer import (
    INDEXES,
    HeapPeer,
    PeerAssignment,
    PeerNoNodeAvailable,
    PeerNoPool,
    PeerScheduler,
    PeerUnknownJob,
    PeerUnknownNode,
    SortedListPeer,
)

JOIN_TIMEOUT = 300.0  # only a deadlock gets near this; the work itself is a fixed count of calls


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def _need_sortedcontainers() -> None:
    """SortedListPeer needs sortedcontainers (the bench extra): skipped without it, failed under CI."""
    try:
        import sortedcontainers  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("sortedcontainers is not installed (pip install '.[bench]')")
        pytest.skip("sortedcontainers is not installed")


@pytest.fixture(params=sorted(INDEXES))
def peer_cls(request):
    if request.param == "sortedlist":
        _need_sortedcontainers()
    return INDEXES[request.param]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make(peer_cls, clock):
    def build(**kw):
        kw.setdefault("clock", clock)
        kw.setdefault("seed", 7)
        return peer_cls(**kw)

    return build


def test_bench_runs_the_heap():
    assert PeerScheduler is HeapPeer and {"heap": HeapPeer, "sortedlist": SortedListPeer} == INDEXES


# ------------------------------------------------------------------ picks
def test_least_load_ratio_wins(make):
    p = make()
    p.register_node("big", ["en", "zh"], max_concurrency=8)
    p.register_node("small", ["en", "zh"], max_concurrency=2)
    p.register_node("busy", ["en", "zh"], max_concurrency=4)
    p.heartbeat("big", running=2)  # 2/8 = 0.25
    p.heartbeat("small", running=1)  # 1/2 = 0.5
    p.heartbeat("busy", running=3)  # 3/4 = 0.75
    a = p.dispatch("s", "zh", "en")
    assert isinstance(a, PeerAssignment) and (a.node_id, a.session_id, a.src, a.tgt) == ("big", "s", "zh", "en")
    # big: max(2 running, 1 held) = 2/8 still: the load is max(reported, held), over max_concurrency
    assert p.inflight("big") == 1
    assert p.dispatch("s", "zh", "en").node_id == "big"  # max(2, 2) = 2/8
    assert p.dispatch("s", "zh", "en").node_id == "big"  # 2/8 -> 3/8
    assert p.dispatch("s", "zh", "en").node_id == "big"  # 3/8 < small's 1/2 -> 4/8
    assert p.dispatch("s", "zh", "en").node_id in {"big", "small"}  # 4/8 ties 1/2, both gpu 0
    p.check_invariants()


def test_gpu_breaks_load_ties(make):
    p = make()
    for nid, gpu in (("hot", 60.0), ("cool", 10.0), ("warm", 30.0)):
        p.register_node(nid, ["en", "ja"])
        p.heartbeat(nid, gpu=gpu)
    assert p.dispatch("s", "ja", "en").node_id == "cool"
    # cool now holds one (1/4): the others are less loaded, warm has less GPU than hot
    assert p.dispatch("s", "ja", "en").node_id == "warm"
    assert p.dispatch("s", "ja", "en").node_id == "hot"
    p.check_invariants()


def test_ties_among_equals_are_shared(peer_cls, clock):
    """With equal load and GPU the pick is one of the equals, seeded, and not always the same one."""
    picks = set()
    for seed in range(40):
        p = peer_cls(clock=clock, seed=seed)
        for nid in ("a", "b", "c"):
            p.register_node(nid, ["en", "fr"])
        p.register_node("loaded", ["en", "fr"])
        p.heartbeat("loaded", running=1)
        first = p.dispatch("s", "fr", "en").node_id
        assert first in {"a", "b", "c"}
        picks.add(first)
        # the same seed and calls give the same decision
        q = peer_cls(clock=clock, seed=seed)
        for nid in ("a", "b", "c"):
            q.register_node(nid, ["en", "fr"])
        q.register_node("loaded", ["en", "fr"])
        q.heartbeat("loaded", running=1)
        assert q.dispatch("s", "fr", "en").node_id == first
    assert picks == {"a", "b", "c"}


def test_equal_nodes_fill_evenly(make):
    p = make()
    for i in range(4):
        p.register_node(f"n{i}", ["en", "zh"], max_concurrency=3)
    held = [p.dispatch(f"s{k}", "zh", "en") for k in range(8)]
    counts = {f"n{i}": p.inflight(f"n{i}") for i in range(4)}
    assert counts == {"n0": 2, "n1": 2, "n2": 2, "n3": 2}, counts  # least load first: round after round
    assert len({a.job_id for a in held}) == 8
    p.check_invariants()


def test_pick_is_always_a_best_node_random_walk(peer_cls, clock):
    """Against a brute-force oracle: every pick has the least (load ratio, gpu) among eligible nodes."""
    rng = random.Random(3)
    p = peer_cls(clock=clock, seed=11)
    ids = [f"n{i}" for i in range(12)]
    for nid in ids:
        p.register_node(nid, ["de", "en"], max_concurrency=rng.choice((2, 3, 5)))
    held: list[str] = []
    for _ in range(600):
        op = rng.random()
        if op < 0.45:
            figures = {nid: p.node(nid) for nid in ids}
            eligible = {nid: (max(f["inflight"], f["running"]) / f["max_concurrency"], f["gpu"])
                        for nid, f in figures.items()
                        if f["status"] == "ready" and max(f["inflight"], f["running"]) < f["max_concurrency"]
                        and f["cpu"] < 85 and f["gpu"] < 85 and f["mem"] < 85}
            try:
                a = p.dispatch("sess", "de", "en")
            except PeerNoNodeAvailable:
                assert not eligible
                continue
            best = min(eligible.values())
            assert eligible[a.node_id] == best, (a.node_id, eligible)
            held.append(a.job_id)
        elif op < 0.8 and held:
            assert p.release(held.pop(rng.randrange(len(held)))) is True
        else:
            p.heartbeat(rng.choice(ids), running=rng.randrange(4), gpu=float(rng.choice((5, 20, 20, 50, 90))),
                        cpu=float(rng.choice((5, 30, 86))) if rng.random() < 0.2 else 5.0)
        if rng.random() < 0.05:
            p.check_invariants()
    p.check_invariants()


def test_both_indexes_decide_alike(clock):
    """The heap and the SortedList are two orders over the same keys: same seed, same calls, same picks."""
    _need_sortedcontainers()
    peers = [HeapPeer(clock=clock, seed=5), SortedListPeer(clock=clock, seed=5)]
    rng = random.Random(9)
    sets = (["en", "zh"], ["de", "en", "zh"], ["en", "ja"], ["en", "ja", "zh"])
    for i in range(30):
        for p in peers:
            p.register_node(f"n{i}", sets[i % len(sets)], max_concurrency=4)
    held: list[list[str]] = [[], []]
    script = []
    for _ in range(1500):
        r = rng.random()
        if r < 0.5:
            script.append(("d", f"s{rng.randrange(40)}", *rng.choice((("zh", "en"), ("ja", "en"), ("auto", "zh")))))
        elif r < 0.8:
            script.append(("r", rng.random()))
        else:
            script.append(("h", f"n{rng.randrange(30)}", rng.randrange(5), float(rng.randrange(0, 90, 10))))
    for step in script:
        outcomes = []
        for k, p in enumerate(peers):
            if step[0] == "d":
                try:
                    a = p.dispatch(step[1], step[2], step[3])
                    held[k].append(a.job_id)
                    outcomes.append((a.node_id, a.pool_id))
                except PeerNoNodeAvailable:
                    outcomes.append("full")
            elif step[0] == "r" and held[k]:
                outcomes.append(p.release(held[k].pop(int(step[1] * len(held[k])))))
            elif step[0] == "h":
                p.heartbeat(step[1], running=step[2], gpu=step[3])
        assert len(set(map(repr, outcomes))) <= 1, (step, outcomes)
    for p in peers:
        p.check_invariants()


# ------------------------------------------------------------------ language matching and pools
def test_superset_matching_most_specific_first(make):
    p = make()
    p.register_node("tri", ["de", "en", "zh"])
    p.register_node("pair", ["en", "zh"])
    p.register_node("ja", ["en", "ja"])
    pools = {langs: pid for pid, (langs, _) in p.pools().items()}
    assert len(pools) == 3
    # zh->en: both {en,zh} and {de,en,zh} serve it; the most specific ({en,zh}) is tried first
    # (a new session prefers the pool with the most free capacity; equal here, so the most specific)
    a = p.dispatch("s1", "zh", "en")
    assert (a.node_id, a.pool_id) == ("pair", pools[frozenset({"en", "zh"})])
    # only the superset serves de->zh
    assert p.dispatch("s2", "de", "zh").node_id == "tri"
    # src=auto: every pool containing the target
    assert p.dispatch("s3", "auto", "ja").node_id == "ja"
    # codes are normalised
    assert p.dispatch("s4", "JA", " en").node_id == "ja"
    for src, tgt in (("ja", "zh"), ("auto", "fr"), ("fr", "en")):
        with pytest.raises(PeerNoPool):
            p.dispatch("s", src, tgt)


def test_falls_back_to_another_pool_and_rebinds(make):
    p = make()
    p.register_node("pair", ["en", "zh"], max_concurrency=1)
    p.register_node("tri", ["de", "en", "zh"], max_concurrency=1)
    first = p.dispatch("s", "zh", "en")
    second = p.dispatch("s", "zh", "en")  # its bound pool is full: the other pool serves it
    assert {first.node_id, second.node_id} == {"pair", "tri"}
    assert first.pool_id != second.pool_id
    with pytest.raises(PeerNoNodeAvailable):
        p.dispatch("s", "zh", "en")
    p.check_invariants()


def test_session_stays_on_its_pool(make):
    p = make()
    for i in range(3):
        p.register_node(f"pair{i}", ["en", "zh"], max_concurrency=10)
        p.register_node(f"tri{i}", ["de", "en", "zh"], max_concurrency=10)
    pool = p.dispatch("s", "zh", "en").pool_id
    for _ in range(12):
        assert p.dispatch("s", "zh", "en").pool_id == pool
    assert p.close_session("s") and not p.close_session("s")


def test_max_pools_cap(make):
    p = make(max_pools=1)
    p.register_node("a", ["en", "zh"])
    p.register_node("b", ["en", "ja"])  # over the cap: no pool, never picked
    assert p.node("b")["pool_id"] is None and not p.node("b")["indexed"]
    with pytest.raises(PeerNoPool):
        p.dispatch("s", "ja", "en")


# ------------------------------------------------------------------ capacity and re-keying
def test_never_more_than_max_and_release_rekeys(make):
    p = make()
    p.register_node("a", ["en", "zh"], max_concurrency=2)
    p.register_node("b", ["en", "zh"], max_concurrency=2)
    jobs = [p.dispatch("s", "zh", "en") for _ in range(4)]
    assert sorted(a.node_id for a in jobs) == ["a", "a", "b", "b"]
    with pytest.raises(PeerNoNodeAvailable):
        p.dispatch("s", "zh", "en")
    p.check_invariants()
    freed = next(a for a in jobs if a.node_id == "b")
    assert p.release(freed.job_id) is True
    assert p.release(freed.job_id) is False  # idempotent
    assert p.dispatch("s", "zh", "en").node_id == "b"  # release re-keyed b to the front
    with pytest.raises(PeerNoNodeAvailable):
        p.dispatch("s", "zh", "en")
    assert p.inflight("a") == 2 and p.inflight("b") == 2
    p.check_invariants()


def test_reported_running_counts(make):
    p = make()
    p.register_node("a", ["en", "zh"], max_concurrency=3)
    p.heartbeat("a", running=3)
    with pytest.raises(PeerNoNodeAvailable):
        p.dispatch("s", "zh", "en")
    p.heartbeat("a", running=2)
    # the reported figure is a floor: held jobs count once they exceed it
    for held in (1, 2, 3):
        assert p.dispatch("s", "zh", "en").node_id == "a"
        assert p.inflight("a") == held
    with pytest.raises(PeerNoNodeAvailable):
        p.dispatch("s", "zh", "en")
    p.check_invariants()


def test_heartbeat_rekeys_running_and_gpu(make):
    p = make()
    p.register_node("a", ["en", "zh"], max_concurrency=4)
    p.register_node("b", ["en", "zh"], max_concurrency=4)
    p.heartbeat("a", running=1)
    assert p.dispatch("s", "zh", "en").node_id == "b"  # b 1/4 now, a 1/4
    p.heartbeat("b", gpu=50.0)
    p.heartbeat("a", gpu=10.0)
    assert p.dispatch("s", "zh", "en").node_id == "a"  # tie on load, a has less GPU
    p.heartbeat("b", running=0, gpu=5.0)  # b: max(0, 1 held) = 1/4 < a's 2/4
    assert p.dispatch("s", "zh", "en").node_id == "b"
    p.check_invariants()


def test_overloaded_degraded_drained_offline_leave_the_index(make):
    p = make()
    p.register_node("x", ["en", "zh"])
    p.register_node("y", ["en", "zh"])
    p.heartbeat("x", cpu=85.0)  # at the threshold: overloaded (pysched compares >=)
    assert {p.dispatch("s", "zh", "en").node_id for _ in range(3)} == {"y"}
    p.heartbeat("x", cpu=10.0)
    assert p.node("x")["indexed"]
    for _ in range(3):
        p.heartbeat("y", healthy=False)
    assert p.node("y")["status"] == "degraded" and not p.node("y")["indexed"]
    assert p.dispatch("s", "zh", "en").node_id == "x"
    p.heartbeat("y", healthy=True)
    assert p.node("y")["status"] == "ready" and p.node("y")["indexed"]
    p.drain_node("y")
    p.mark_offline("x")
    with pytest.raises(PeerNoNodeAvailable):
        p.dispatch("s", "zh", "en")
    p.resume_node("y")
    p.heartbeat("x")  # a heartbeat brings a node marked offline back
    assert p.node("x")["status"] == "ready"
    p.check_invariants()


def test_silent_node_is_skipped_and_comes_back(make, clock):
    p = make(heartbeat_timeout=30.0)
    p.register_node("quiet", ["en", "zh"])
    p.register_node("chatty", ["en", "zh"])
    p.heartbeat("chatty", running=2)  # quiet is the better node while it is heard from
    assert p.dispatch("s", "zh", "en").node_id == "quiet"
    clock.advance(20.0)
    p.heartbeat("chatty", running=2)
    clock.advance(15.0)  # quiet: 35 s without a heartbeat; chatty: 15 s
    for _ in range(2):
        assert p.dispatch("s", "zh", "en").node_id == "chatty"
    assert not p.node("quiet")["indexed"]
    p.heartbeat("quiet")
    assert p.dispatch("s", "zh", "en").node_id == "quiet"
    p.check_invariants()


def test_request_filters_walk_the_order(make):
    p = make()
    p.register_node("best", ["en", "zh"], services=("asr", "nmt", "tts"))
    p.register_node("gpuless", ["en", "zh"], has_gpu=False)
    p.register_node("private", ["en", "zh"], accept_public_jobs=False)
    p.register_node("worst", ["en", "zh"])
    p.heartbeat("gpuless", gpu=1.0)
    p.heartbeat("private", gpu=2.0)
    p.heartbeat("best", gpu=0.0)
    p.heartbeat("worst", gpu=40.0)
    # the default job: asr+nmt+tts, GPU, public -> "best" (gpuless lacks a GPU, private is not public)
    assert p.dispatch("s", "zh", "en").node_id == "best"
    assert p.dispatch("s", "zh", "en", services=("asr", "semantic")).node_id == "worst"
    assert p.dispatch("s", "zh", "en", require_gpu=False, exclude=["best"]).node_id == "gpuless"
    assert p.dispatch("s", "zh", "en", tenant="acme", exclude=["best", "gpuless"]).node_id == "private"
    with pytest.raises(PeerNoNodeAvailable):
        p.dispatch("s", "zh", "en", services=("ocr",))
    p.check_invariants()


# ------------------------------------------------------------------ reservations
def test_ttl_commit_and_release(make, clock):
    p = make(reservation_ttl=10.0)
    p.register_node("a", ["en", "zh"], max_concurrency=2)
    kept = p.dispatch("s", "zh", "en")
    lost = p.dispatch("s", "zh", "en")
    p.commit(kept.job_id)
    with pytest.raises(PeerNoNodeAvailable):
        p.dispatch("s", "zh", "en")
    clock.advance(10.5)  # lost's TTL ended; a committed job does not expire
    third = p.dispatch("s", "zh", "en")
    assert third.node_id == "a" and p.inflight("a") == 2
    assert p.release(lost.job_id) is False  # swept already
    with pytest.raises(PeerUnknownJob):
        p.commit(lost.job_id)
    clock.advance(10.5)  # third expired but not swept yet (no dispatch since)
    assert p.release(third.job_id) is False  # gone all the same, and its capacity is back
    assert p.inflight("a") == 1
    assert p.release(kept.job_id) is True and p.inflight("a") == 0
    p.check_invariants()


def test_reregister_keeps_held_jobs_and_removed_node_releases(make):
    p = make()
    p.register_node("a", ["en", "zh"], max_concurrency=2)
    a1 = p.dispatch("s", "zh", "en")
    p.register_node("a", ["en", "zh"], max_concurrency=2)
    assert p.inflight("a") == 1
    p.check_invariants()
    p.remove_node("a")
    with pytest.raises(PeerUnknownNode):
        p.inflight("a")
    with pytest.raises(PeerNoNodeAvailable):
        p.dispatch("s", "zh", "en")
    assert p.release(a1.job_id) is True
    p.check_invariants()


def test_heartbeat_moves_node_between_pools(make):
    p = make()
    p.register_node("a", ["en", "zh"])
    p.register_node("b", ["en", "ja"])
    p.heartbeat("a", languages=["en", "ja"])
    assert p.dispatch("s", "ja", "en").node_id in {"a", "b"}
    assert {p.dispatch(f"s{i}", "ja", "en").node_id for i in range(4)} == {"a", "b"}
    with pytest.raises(PeerNoNodeAvailable):  # the {en,zh} pool is empty now
        p.dispatch("t", "zh", "en")
    p.check_invariants()


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, exc, word", [
    (lambda p: p.dispatch("", "zh", "en"), ValueError, "session_id"),
    (lambda p: p.dispatch(5, "zh", "en"), TypeError, "session_id"),
    (lambda p: p.dispatch("s", None, "en"), TypeError, "src"),
    (lambda p: p.dispatch("s", "zh", "auto"), ValueError, "tgt"),
    (lambda p: p.dispatch("s", "zh", "en", exclude="a"), TypeError, "exclude"),
    (lambda p: p.dispatch("s", "zh", "en", tenant=""), ValueError, "tenant"),
    (lambda p: p.dispatch("s", "zh", "en", require_gpu=1), TypeError, "require_gpu"),
    (lambda p: p.heartbeat("a", cpu=float("nan")), ValueError, "cpu"),
    (lambda p: p.heartbeat("a", gpu="5"), TypeError, "gpu"),
    (lambda p: p.heartbeat("a", running=-1), ValueError, "running"),
    (lambda p: p.heartbeat("a", max_concurrency=0), ValueError, "max_concurrency"),
    (lambda p: p.heartbeat("nope", cpu=1.0), PeerUnknownNode, "nope"),
    (lambda p: p.register_node("b", []), ValueError, "languages"),
    (lambda p: p.register_node("b", ["en"], max_concurrency=True), ValueError, "max_concurrency"),
    (lambda p: p.commit("nope"), PeerUnknownJob, "nope"),
])
def test_bad_input_names_the_field_and_changes_nothing(make, call, exc, word):
    p = make()
    p.register_node("a", ["en", "zh"])
    held = p.dispatch("s0", "zh", "en")
    before = (p.node("a"), p.stats(), p.pools())
    with pytest.raises(exc, match=word):
        call(p)
    assert (p.node("a"), p.stats(), p.pools()) == before
    assert p.release(held.job_id)


def test_constructor_rejects_bad_settings(peer_cls):
    for kw, word in (({"heartbeat_timeout": 0}, "heartbeat_timeout"), ({"reservation_ttl": -1}, "reservation_ttl"),
                     ({"resource_threshold": 101}, "resource_threshold"), ({"max_pools": 0}, "max_pools")):
        with pytest.raises(ValueError, match=word):
            peer_cls(**kw)
    with pytest.raises(TypeError, match="clock"):
        peer_cls(clock=5)


# ------------------------------------------------------------------ threads
def test_no_over_commit_under_threads(peer_cls):
    """4 dispatching threads, a heartbeat thread and a churn thread on a tiny fleet: at no moment does
    any node hold more jobs than its max. Checked independently of the peer's own bookkeeping (a job
    is counted from dispatch's return until just before its release, so the test's count never exceeds
    what the peer holds) and with the peer's invariant check. Every thread does a fixed number of calls:
    nothing depends on how fast threads are scheduled."""
    p = peer_cls(seed=3)  # real clock: heartbeat_timeout (45 s) is far beyond the run
    max_c = 2
    ids = [f"n{i}" for i in range(6)]
    for nid in ids:
        p.register_node(nid, ["en", "zh"], max_concurrency=max_c)
    counted = {nid: 0 for nid in ids}
    peak = {nid: 0 for nid in ids}
    guard = threading.Lock()
    errors: list[BaseException] = []
    placed = [0]

    def dispatcher(k: int) -> None:
        rng = random.Random(k)
        mine: list = []
        try:
            for i in range(3000):
                if mine and (len(mine) >= 3 or rng.random() < 0.5):
                    a = mine.pop(rng.randrange(len(mine)))
                    with guard:
                        counted[a.node_id] -= 1
                    assert p.release(a.job_id) is True
                    continue
                try:
                    a = p.dispatch(f"s{k}-{i % 7}", "zh", "en")
                except PeerNoNodeAvailable:
                    continue
                with guard:
                    counted[a.node_id] += 1
                    peak[a.node_id] = max(peak[a.node_id], counted[a.node_id])
                    placed[0] += 1
                mine.append(a)
            for a in mine:
                with guard:
                    counted[a.node_id] -= 1
                p.release(a.job_id)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def heartbeats() -> None:
        rng = random.Random(99)
        try:
            for _ in range(3000):
                p.heartbeat(rng.choice(ids), running=rng.randrange(max_c + 1), gpu=float(rng.randrange(80)))
        except BaseException as exc:
            errors.append(exc)

    def churn() -> None:
        rng = random.Random(7)
        try:
            for _ in range(300):
                nid = rng.choice(ids)
                action = rng.randrange(3)
                if action == 0:
                    p.drain_node(nid)
                    p.resume_node(nid)
                elif action == 1:
                    p.heartbeat(nid, healthy=True, cpu=float(rng.choice((10, 90))))
                else:
                    p.check_invariants()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=dispatcher, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=heartbeats), threading.Thread(target=churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"
    assert not errors, errors
    assert max(peak.values()) <= max_c, peak
    assert all(v == 0 for v in counted.values())
    assert placed[0] > 0
    assert p.stats()["jobs"] == 0 and p.stats()["inflight"] == 0  # nothing leaked
    p.check_invariants()
