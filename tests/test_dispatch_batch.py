"""``Scheduler.dispatch_batch``: arrays in, arrays out, the same decisions as one-by-one dispatch."""

from __future__ import annotations

import contextlib
import sys
import threading

import numpy as np
import pytest

import pysched
from pysched.results import BATCH_REASONS, BatchResult

SETS = [["zh", "en"], ["de", "en", "zh"], ["en", "ja"], ["en", "ja", "ko"], ["en", "es", "pt"]]
PAIRS = [("zh", "en"), ("ja", "en"), ("auto", "en"), ("de", "zh"), ("ko", "ja"), ("fr", "en"), ("es", "pt")]


def fleet(make_scheduler, **kw):
    sched = make_scheduler(**kw)
    for i in range(25):
        sched.register_node(f"n{i}", SETS[i % len(SETS)], max_concurrency=1 + i % 4,
                            accept_public_jobs=i % 11 != 0)
    sched.drain_node("n7")
    sched.heartbeat("n3", gpu=90.0)
    return sched


def jobs(seed, n=150):
    rng = np.random.default_rng(seed)
    sids = [f"s{int(rng.integers(0, 23))}" for _ in range(n)]
    pairs = [PAIRS[int(rng.integers(0, len(PAIRS)))] for _ in range(n)]
    return sids, [p[0] for p in pairs], [p[1] for p in pairs]


def one_by_one(sched, sids, srcs, tgts, **kw):
    out = []
    for sid, s, t in zip(sids, srcs, tgts, strict=True):
        try:
            out.append(sched.dispatch(sid, s, t, **kw))
        except pysched.SchedulerError as exc:
            out.append(exc)
    return out


def _reason_of(x):
    if isinstance(x, pysched.NoPoolForLanguagePair):
        return "no_pool"
    if isinstance(x, pysched.NoNodeAvailable):
        return x.best_reason
    return "ok"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kw", [{}, {"tenant": "acme"}, {"require_gpu": False, "services": ("asr",)}])
def test_batch_places_exactly_as_sequential_dispatch(make_scheduler, seed, kw):
    seq = fleet(make_scheduler, tenant_pools={"acme": 2})
    bat = fleet(make_scheduler, tenant_pools={"acme": 2})
    warm = [(f"s{i}", "zh", "en") for i in range(6)]  # earlier traffic binds some sessions, in both
    for sched in (seq, bat):
        for w in warm:
            sched.dispatch(*w)
    sids, srcs, tgts = jobs(seed)
    expected = one_by_one(seq, sids, srcs, tgts, **kw)
    got = bat.dispatch_batch(sids, srcs, tgts, **kw)
    assert isinstance(got, BatchResult) and len(got) == len(sids)
    assert got.node_ids() == [x.node_id if isinstance(x, pysched.Assignment) else None for x in expected]
    assert got.pool_id.tolist() == [x.pool_id if isinstance(x, pysched.Assignment) else -1 for x in expected]
    assert got.reasons() == [_reason_of(x) for x in expected]
    assert got.placed == sum(isinstance(x, pysched.Assignment) for x in expected) > 0
    assert "full" in got.reasons() and "no_pool" in got.reasons()
    # the same state afterwards: loads, bindings, counters, and the next job id
    assert seq.reservations.inflight.tolist() == bat.reservations.inflight.tolist()
    for sid in set(sids):
        assert getattr(seq._sessions.get(sid), "binding", None) == getattr(bat._sessions.get(sid), "binding", None)
    assert seq.stats()["dispatch"] == bat.stats()["dispatch"]
    seq.register_node("late", ["zh", "en"], max_concurrency=50)
    bat.register_node("late", ["zh", "en"], max_concurrency=50)
    assert seq.dispatch("z", "zh", "en").job_id == bat.dispatch("z", "zh", "en").job_id


def test_handles_release_and_commit_one_by_one_and_in_batches(make_scheduler, clock):
    sched = make_scheduler(reservation_ttl=10.0, commit_lease=100.0)
    sched.register_node("a", ["zh", "en"], max_concurrency=10)
    got = sched.dispatch_batch([f"s{i}" for i in range(6)], "zh", "en")
    h = got.handle
    assert got.placed == 6 and len(set(h.tolist())) == 6 and (h >= 0).all()
    assert sched.release(int(h[0])) is True and sched.release(int(h[0])) is False
    sched.commit(int(h[1]))
    assert sched.commit_batch(h[2:4]) == 2
    assert sched.release_batch(h) == 5  # h[0] is gone already; committed jobs release too
    assert sched.stats()["reservations"] == 0
    # a stale handle never names a newer job that reuses the record
    again = sched.dispatch_batch(["t"], "zh", "en").handle
    assert sched.release(int(h[5])) is False and sched.stats()["reservations"] == 1
    assert sched.release_batch(again) == 1
    with pytest.raises(pysched.UnknownJob):
        sched.commit(int(h[1]))


def test_uncommitted_batch_jobs_expire_with_an_event(make_scheduler, clock):
    sched = make_scheduler(reservation_ttl=5.0)
    seen = []
    sched.add_listener(lambda e, n, f: seen.append((e, n, f)))
    sched.register_node("a", ["zh", "en"], max_concurrency=4)
    got = sched.dispatch_batch(["s1", "s2"], "zh", "en")
    sched.commit(int(got.handle[0]))
    clock.advance(5.0)
    assert sched.reservations.expire() == 1
    (event,) = [e for e in seen if e[0] == "job_expired"]
    assert event[1] == "a" and event[2]["job_id"] == int(got.handle[1]) and event[2]["committed"] is False


def test_batch_jobs_keep_their_session_and_pair_until_the_last_one_goes(make_scheduler, clock):
    """A batch files its jobs' session ids and pairs once for all (a group): each job still reports its own,
    through release one by one, release in batches, commit and expiry, and the last job to go takes every
    reference the batch held with it (nothing leaks, nothing is freed early)."""
    sched = make_scheduler(reservation_ttl=5.0, commit_lease=100.0)
    seen = []
    sched.add_listener(lambda e, n, f: seen.append(f) if e == "job_expired" else None)
    sched.register_node("a", ["zh", "en"], max_concurrency=100)
    sched.register_node("b", ["ja", "en"], max_concurrency=100)
    sids = ["".join(("q", str(i))) for i in range(30)]  # this test's own objects: their counts are its own
    for sid in sids:  # the sessions exist, keyed by these very objects, before the counts are taken
        sched.release(sched.dispatch(sid, "zh", "en").job_id)
    # and the compiled calls' session index has each one's state (it holds the id it files a state
    # under for the session's life, as the table holds its key)
    sched.release_batch(sched.dispatch_batch(sids, "zh", "en").handle)
    srcs = [("zh", "ja", "ko")[i % 3] for i in range(30)]  # ko: no pool, that job is not placed
    before = [sys.getrefcount(sid) for sid in sids]
    got = sched.dispatch_batch(sids, srcs, "en")
    placed = [i for i in range(30) if got.handle[i] >= 0]
    assert len(placed) == 20
    table = sched.reservations._table
    for i in placed:
        info = table.get_handle(int(got.handle[i]), clock())
        assert info[2] is sids[i] and info[5] == (srcs[i], "en")
    by_job = {r.job_id: r.session_id for r in sched.reservations.jobs()}
    assert {by_job[int(got.handle[i])] for i in placed} == {sids[i] for i in placed}
    del by_job, info  # they hold session ids too
    # a second batch from the same list while the first one's jobs live: two groups, each its own
    again = sched.dispatch_batch(sids[:3], "ja", "en")
    assert [table.get_handle(int(h), clock())[2] for h in again.handle] == sids[:3]
    assert sched.release_batch(again.handle) == 3
    one, rest = placed[:5], placed[5:]
    for i in one:
        assert sched.release(int(got.handle[i])) is True
    assert sched.commit_batch(got.handle[rest[:5]]) == 5
    assert sched.release_batch(got.handle[rest[5:10]]) == 5
    assert [table.get_handle(int(got.handle[i]), clock())[2] for i in rest[:5]] == [sids[i] for i in rest[:5]]
    assert any(sys.getrefcount(sid) > b for sid, b in zip(sids, before, strict=True))  # still held
    clock.advance(5.0)
    assert sched.reservations.expire() == 5  # the uncommitted rest, each with its own session id
    assert sorted(f["session_id"] for f in seen) == sorted(sids[i] for i in rest[10:])
    seen.clear()
    assert sched.release_batch(got.handle[rest[:5]]) == 5  # the committed ones, last
    assert sched.stats()["reservations"] == 0
    assert [sys.getrefcount(sid) for sid in sids] == before  # the batch's references went with its last job
    nothing = sched.dispatch_batch(sids[:4], "ko", "en")  # no job placed: nothing is kept either
    assert nothing.placed == 0 and [sys.getrefcount(sid) for sid in sids] == before


def test_numpy_arrays_in(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en", "ja"], max_concurrency=100)
    got = sched.dispatch_batch(np.array(["s1", "s2", "s3"]), np.array(["zh", "ja", "zh"]), "en")
    assert got.node_ids() == ["a", "a", "a"] and got.ok.all()
    assert got.reason.dtype == np.uint8 and got.handle.dtype == np.int64 and got.slot.dtype == np.int32


def _fresh(code, k):
    """A new str object equal to ``code``, spelled in case variant ``k`` (codes are normalised case-blind)."""
    spelled = "".join(c.upper() if (k >> i) & 1 else c for i, c in enumerate(code))
    return "".join(list(spelled))  # never the interned object


@pytest.mark.parametrize("seed", range(3))
def test_per_job_codes_as_hundreds_of_distinct_objects_place_as_sequential_dispatch(make_scheduler, seed):
    """The batch's per-job code memo (by object identity, 64 entries a direction) may collide and forget:

    600 jobs whose codes are ~500 distinct str objects (equal strings, other
    case spellings, aliases, a code no pool speaks) place exactly as one-by-one dispatch.
    """
    seq = fleet(make_scheduler)
    bat = fleet(make_scheduler)
    rng = np.random.default_rng(seed)
    codes = ["zh", "en", "ja", "de", "ko", "es", "pt", "fr", "zh-CN", "en_US", "auto"]
    objects = {c: [_fresh(c, k) for k in range(40)] for c in codes}
    sids, srcs, tgts = [], [], []
    for _ in range(600):
        s, t = codes[int(rng.integers(0, len(codes)))], codes[int(rng.integers(0, len(codes) - 1))]
        sids.append(f"s{int(rng.integers(0, 40))}")
        srcs.append(objects[s][int(rng.integers(0, 40))])
        tgts.append(objects[t][int(rng.integers(0, 40))])
    assert len({id(x) for x in srcs + tgts}) > 400
    expected = one_by_one(seq, sids, srcs, tgts)
    got = bat.dispatch_batch(sids, srcs, tgts)
    assert got.node_ids() == [x.node_id if isinstance(x, pysched.Assignment) else None for x in expected]
    assert got.reasons() == [_reason_of(x) for x in expected]
    assert got.placed > 0 and "no_pool" in got.reasons()
    assert seq.reservations.inflight.tolist() == bat.reservations.inflight.tolist()
    for sid in set(sids):
        assert getattr(seq._sessions.get(sid), "binding", None) == getattr(bat._sessions.get(sid), "binding", None)
    # an invalid code after hundreds of memoised ones is still named by its index, and nothing changes
    before = bat.reservations.inflight.tolist()
    with pytest.raises(ValueError, match=r"tgt\[599\]"):
        bat.dispatch_batch(sids, srcs, tgts[:-1] + ["not a code!"])
    assert bat.reservations.inflight.tolist() == before


@pytest.mark.parametrize("args, error, match", [
    ((["s1", ""], "zh", "en"), TypeError, r"session_ids\[1\]"),
    ((["s1", 5], "zh", "en"), TypeError, r"session_ids\[1\]"),
    ((["s1", "s2"], ["zh", "not a code!"], "en"), ValueError, r"src\[1\]"),
    ((["s1", "s2"], "zh", ["en"]), ValueError, "tgt must be one code or one per job"),
    ((["s1"], "zh", "auto"), ValueError, "tgt"),
])
def test_bad_batches_change_nothing(make_scheduler, args, error, match):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    with pytest.raises(error, match=match):
        sched.dispatch_batch(*args)
    assert sched.reservations.count() == 0 and sched.stats()["sessions"] == 0



BIG = 3000  # jobs: a batch this big checks its jobs in runs without the GIL (1,024 or more)


@pytest.mark.parametrize(("at", "change", "error", "match"), [
    (2100, lambda a: a[0].__setitem__(2100, ""), TypeError, r"session_ids\[2100\]"),
    (2999, lambda a: a[0].__setitem__(2999, 7), TypeError, r"session_ids\[2999\]"),
    (1500, lambda a: a[1].__setitem__(1500, "not a code!"), ValueError, r"src\[1500\]"),
    (2500, lambda a: a[2].__setitem__(2500, "auto"), ValueError, r"tgt\[2500\]"),
    (1024, lambda a: a[2].__setitem__(1024, 3.5), TypeError, r"tgt\[1024\]"),
])
def test_a_bad_job_deep_in_a_big_batch_is_named_and_changes_nothing(make_scheduler, at, change, error, match):
    sched = fleet(make_scheduler)
    sids, srcs, tgts = jobs(9, n=BIG)
    sched.dispatch_batch(sids[:50], srcs[:50], tgts[:50])  # some load and bindings to keep
    before = (sched.reservations.inflight.tolist(), sched.stats()["dispatch"],
              {sid: getattr(sched._sessions.get(sid), "binding", None) for sid in set(sids)})
    args = (list(sids), list(srcs), list(tgts))
    change(args)
    with pytest.raises(error, match=match):
        sched.dispatch_batch(*args)
    assert (sched.reservations.inflight.tolist(), sched.stats()["dispatch"],
            {sid: getattr(sched._sessions.get(sid), "binding", None) for sid in set(sids)}) == before


def test_a_big_batch_with_new_pairs_and_codes_along_the_way_places_as_sequential_dispatch(make_scheduler):
    """Per-job codes, a distinct object now and then and pairs first seen deep in the batch: the
    runs checked without the GIL stop at each and go on, and the batch equals one-by-one dispatch."""
    seq = fleet(make_scheduler)
    bat = fleet(make_scheduler)
    rng = np.random.default_rng(4)
    sids, srcs, tgts = [], [], []
    # the first 1,000 jobs ask for zh-en and ja-zh only; after that (ja, en), a new pair of codes already
    # memoised, and pairs that appear one by one
    early = [("zh", "en"), ("ja", "zh")]
    for i in range(BIG):
        if i < 1000:
            s, t = early[i % 2]
        else:
            s, t = [("ja", "en"), *PAIRS][min(int(rng.integers(0, len(PAIRS) + 1)), (i - 1000) // 250)]
        sids.append(f"s{int(rng.integers(0, 60))}")
        srcs.append(_fresh(s, i) if i % 500 == 7 else s)  # (a new object now and then: runs stay long)
        tgts.append(t)
    expected = one_by_one(seq, sids, srcs, tgts)
    got = bat.dispatch_batch(sids, srcs, tgts)
    assert got.node_ids() == [x.node_id if isinstance(x, pysched.Assignment) else None for x in expected]
    assert got.reasons() == [_reason_of(x) for x in expected]
    assert seq.reservations.inflight.tolist() == bat.reservations.inflight.tolist()
    assert seq.stats()["dispatch"] == bat.stats()["dispatch"]
    for sid in set(sids):  # bindings name each pair, as filed by the batch
        assert getattr(seq._sessions.get(sid), "binding", None) == getattr(bat._sessions.get(sid), "binding", None)
    table, now = bat.reservations._table, bat._clock()
    assert [table.get_handle(int(got.handle[i]), now)[5] for i in np.flatnonzero(got.ok)] == [
        (x.src, x.tgt) for x in expected if isinstance(x, pysched.Assignment)]


def test_batch_needs_the_local_backend(kernel_name):
    class Custom(pysched.LocalReservations):
        pass

    sched = pysched.Scheduler(kernel=kernel_name, reservations=Custom())
    with pytest.raises(TypeError, match="LocalReservations"):
        sched.dispatch_batch(["s"], "zh", "en")


def test_batches_and_dispatches_from_threads_never_over_commit(kernel_name):
    sched = pysched.Scheduler(kernel=kernel_name, seed=4)
    for i in range(6):
        sched.register_node(f"n{i}", ["zh", "en"], max_concurrency=5)
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def batcher(k):
        try:
            barrier.wait(timeout=60)
            for _ in range(40):
                # sessions shared with the other batcher and the single dispatcher, repeated in the batch
                got = sched.dispatch_batch([f"x{(k + i) % 9}" for i in range(12)],
                                           ["zh-CN" if i % 5 == 0 else "zh" for i in range(12)], "en")
                assert (sched.reservations.inflight[:6] <= 5).all()
                sched.release_batch(got.handle[got.ok])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def single():
        try:
            barrier.wait(timeout=60)
            for i in range(300):
                with contextlib.suppress(pysched.NoNodeAvailable):
                    sched.release(sched.dispatch(f"x{i % 9}", "zh", "en").job_id)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=batcher, args=(k,)) for k in range(2)] + [threading.Thread(target=single)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads) and not errors, errors[:3]
    assert sched.reservations.count() == 0 and int(sched.reservations.inflight[:6].sum()) == 0


def test_batches_and_dispatches_of_the_same_new_sessions_decide_each_binding_once(kernel_name):
    """Two batches (in many passes), the one-call dispatch, the Python path and ``dispatch_many`` place jobs
    of the same new sessions at once. A session's binding is decided one thread at a time, so every job of a
    session lands in one pool, the one it is bound to, although a thread deciding alone would often pick the
    other pool (the loads move with every job)."""
    sched = pysched.Scheduler(kernel=kernel_name, seed=11)
    for i in range(2):
        sched.register_node(f"a{i}", ["zh", "en"], max_concurrency=100_000)
        sched.register_node(f"b{i}", ["de", "en", "zh"], max_concurrency=100_000)
    sched._fast.pass_size = 2  # many passes: a session is read and written back in different ones
    rounds, per_round = 60, 12
    placed: list[tuple[str, int]] = []  # (session id, pool id) of every job placed
    errors: list[BaseException] = []
    barrier = threading.Barrier(5)

    def batcher(k):
        rng = np.random.default_rng(k)
        try:
            for r in range(rounds):
                sids = [f"r{r}-{int(j)}" for j in rng.integers(0, per_round, 3 * per_round)]
                barrier.wait(timeout=60)
                got = sched.dispatch_batch(sids, "zh", "en")
                placed.extend((sid, p) for sid, p in zip(sids, got.pool_id.tolist(), strict=True) if p >= 0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def single(kwargs):
        try:
            for r in range(rounds):
                barrier.wait(timeout=60)
                for j in range(per_round):
                    placed.append((f"r{r}-{j}", sched.dispatch(f"r{r}-{j}", "zh", "en", **kwargs).pool_id))
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    def many():
        try:
            for r in range(rounds):
                barrier.wait(timeout=60)
                reqs = [(f"r{r}-{j % per_round}", "zh", "en") for j in range(per_round - 1, -per_round, -1)]
                for (sid, _, _), got in zip(reqs, sched.dispatch_many(reqs), strict=True):
                    placed.append((sid, got.pool_id))
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=batcher, args=(k,)) for k in range(2)]
    threads += [threading.Thread(target=single, args=(kw,)) for kw in ({}, {"exclude": []})]
    threads.append(threading.Thread(target=many))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads) and not errors, errors[:3]
    pools_of: dict[str, set[int]] = {}
    for sid, pool in placed:
        pools_of.setdefault(sid, set()).add(pool)
    assert len(pools_of) == rounds * per_round
    split = {sid: pools for sid, pools in pools_of.items() if len(pools) > 1}
    assert not split, f"{len(split)} sessions placed in two pools, e.g. {list(split.items())[:3]}"
    for sid, pools in pools_of.items():
        assert sched._session_map[sid].binding[1] in pools and not sched._session_map[sid].held
    assert len({pool for pools in pools_of.values() for pool in pools}) == 2  # both pools were chosen
    assert sched.reservations.count() == len(placed)


def test_reason_names():
    assert BATCH_REASONS[0] == "ok" and BATCH_REASONS[-2:] == ("no_pool", "no_nodes")


def _mixed_run(kernel, seed):
    """A random mix of every dispatch path, heartbeats and time passing; returns everything observable."""
    from conftest import FakeClock

    clock = FakeClock()
    rng = np.random.default_rng(seed)
    sched = pysched.Scheduler(clock=clock, seed=seed, kernel=kernel, reservation_ttl=5.0, commit_lease=20.0,
                              session_ttl=30.0, tenant_pools={"acme": 2})
    for i in range(18):
        sched.register_node(f"n{i}", SETS[i % len(SETS)], max_concurrency=1 + i % 3)
    seen, held, handles = [], [], []
    for _ in range(160):
        op = int(rng.integers(0, 9))
        sid = f"s{int(rng.integers(0, 9))}"
        src, tgt = PAIRS[int(rng.integers(0, len(PAIRS)))]
        try:
            if op <= 2:
                a = sched.dispatch(sid, src, tgt)
                held.append(a.job_id)
                seen.append((a.node_id, a.pool_id, a.job_id))
            elif op == 3:
                got = sched.dispatch_batch([sid, f"{sid}b", sid], [src, "zh", src], [tgt, "en", tgt])
                handles.extend(got.handle[got.ok].tolist())
                seen.append((got.node_ids(), got.reasons(), got.handle.tolist()))
            elif op == 4 and held:
                seen.append(sched.release(held.pop(int(rng.integers(0, len(held))))))
            elif op == 5 and handles:
                seen.append(sched.release(handles.pop()))
            elif op == 6 and held:
                sched.commit(held[-1])
                seen.append("committed")
            elif op == 7:
                sched.heartbeat(f"n{int(rng.integers(0, 18))}", running=int(rng.integers(0, 3)),
                                gpu=float(rng.integers(0, 90)))
                clock.advance(float(rng.integers(0, 4)))
            else:
                out = sched.dispatch_many([(sid, src, tgt), {"session_id": sid, "src": src, "tgt": tgt,
                                                             "tenant": "acme"}])
                seen.append([x.node_id if isinstance(x, pysched.Assignment) else type(x).__name__ for x in out])
        except (pysched.NoNodeAvailable, pysched.NoPoolForLanguagePair, pysched.UnknownJob) as exc:
            seen.append((type(exc).__name__, getattr(exc, "breakdown", None)))
    seen.append(sched.reservations.inflight.tolist())
    seen.append(sched.stats()["dispatch"])
    return seen


@pytest.mark.parametrize("seed", range(6))
def test_compiled_and_twin_agree_on_every_path(seed):
    pytest.importorskip("pysched._core")
    assert _mixed_run("compiled", seed) == _mixed_run("python", seed)


@pytest.mark.parametrize("seed", range(3))
def test_batches_across_fleet_changes_place_as_sequential_dispatch(make_scheduler, clock, seed):
    """Bindings read by a batch stay exact when pools move between batches (a new pool, a removed
    node, a new pool layout) and when sessions idle past their TTL: the same nodes and pools as
    one-by-one dispatch, round after round."""
    seq = fleet(make_scheduler, session_ttl=10.0)
    bat = fleet(make_scheduler, session_ttl=10.0)
    changes = [
        lambda s: s.register_node("x1", ["ja", "en", "fr"], max_concurrency=3),
        lambda s: s.remove_node("n1"),
        lambda s: clock.advance(11.0) if s is bat else None,  # one shared clock: advance it once
        lambda s: s.set_pools([pysched.PoolConfig(40 + i, f"p{i}", langs) for i, langs in enumerate(SETS)]),
        lambda s: s.register_node("x2", ["zh", "en"], max_concurrency=2),
    ]
    for round_, change in enumerate([None, *changes]):
        if change is not None:
            for sched in (seq, bat):
                change(sched)
        sids, srcs, tgts = jobs(seed * 100 + round_, n=80)
        expected = one_by_one(seq, sids, srcs, tgts)
        got = bat.dispatch_batch(sids, srcs, tgts)
        assert got.node_ids() == [x.node_id if isinstance(x, pysched.Assignment) else None for x in expected]
        assert got.pool_id.tolist() == [x.pool_id if isinstance(x, pysched.Assignment) else -1 for x in expected]
        assert got.reasons() == [_reason_of(x) for x in expected]
        for sid in set(sids):
            assert getattr(seq._sessions.get(sid), "binding", None) == getattr(bat._sessions.get(sid), "binding", None)
        for x in expected:  # free the capacity again, so that every round places jobs
            if isinstance(x, pysched.Assignment):
                seq.release(x.job_id)
        bat.release_batch(got.handle[got.ok])
        assert seq.reservations.inflight.tolist() == bat.reservations.inflight.tolist()


def test_a_sessions_memo_of_its_codes_never_outlives_its_binding(make_scheduler):
    """A session's dispatch memo (the code objects it sent last, for its bound pair) is only used for
    the binding it was checked against: after a batch, a retry path or a new snapshot rebinds the
    session elsewhere, the same code objects still mean their own pair."""
    sched = make_scheduler()
    for i in range(3):
        sched.register_node(f"z{i}", ["zh", "en"], max_concurrency=100)
        sched.register_node(f"j{i}", ["ja", "en"], max_concurrency=100)
    zh, ja, en = "zh", "ja", "en"

    def on_zh(a):
        return (a.src, a.tgt) == ("zh", "en") and a.node_id.startswith("z")

    first = sched.dispatch("s", zh, en)
    assert on_zh(first) and on_zh(sched.dispatch("s", zh, en))  # the second one from the memo
    got = sched.dispatch_batch(["s"], ja, en)  # the batch rebinds s to ja -> en
    assert got.node_ids()[0].startswith("j")
    assert on_zh(sched.dispatch("s", zh, en))
    sched.dispatch("s", ja, en, exclude=["j0"])  # the Python path rebinds it
    assert on_zh(sched.dispatch("s", zh, en))
    sched.dispatch("s", ja, en)
    sched.register_node("z9", ["zh", "en"], max_concurrency=100)  # a new snapshot
    assert on_zh(sched.dispatch("s", zh, en))
    assert sched._sessions.get("s").binding[0] == ("zh", "en")


# -- the pass without the GIL (compiled kernel; see pysched/_gate.pxi) ----------------------------------------



@pytest.mark.parametrize("pass_size", [1, 3, 7, 64])
def test_a_batch_in_many_passes_places_exactly_as_sequential_dispatch(make_scheduler, pass_size):
    """A big batch is placed in passes of ``pass_size`` jobs; sessions bound in one pass (new ones
    included) keep their binding in the next, and the whole equals one-by-one dispatch."""
    seq = fleet(make_scheduler, tenant_pools={"acme": 2})
    bat = fleet(make_scheduler, tenant_pools={"acme": 2})
    bat._fast.pass_size = pass_size
    assert bat._fast.pass_size == pass_size
    for sched in (seq, bat):
        sched.dispatch("s1", "zh", "en")
    sids, srcs, tgts = jobs(5, n=140)
    sids = [*sids[:70], *[f"new{i % 9}" for i in range(70)]]  # sessions that first appear mid-batch
    expected = one_by_one(seq, sids, srcs, tgts)
    before = getattr(bat._fast, "passes_without_gil", 0)  # (the compiled kernel counts its passes)
    got = bat.dispatch_batch(sids, srcs, tgts)
    assert got.node_ids() == [x.node_id if isinstance(x, pysched.Assignment) else None for x in expected]
    assert got.reasons() == [_reason_of(x) for x in expected]
    assert seq.reservations.inflight.tolist() == bat.reservations.inflight.tolist()
    for sid in set(sids):
        assert getattr(seq._sessions.get(sid), "binding", None) == getattr(bat._sessions.get(sid), "binding", None)
    assert seq.stats()["dispatch"] == bat.stats()["dispatch"]
    if hasattr(bat._fast, "passes_without_gil"):  # compiled: a pass (GIL released: nothing else runs) per pass_size
        # jobs at most, and one more where a pass stopped at a session that needs Python (resolved with the GIL)
        assert bat._fast.passes_without_gil >= before + -(-len(sids) // pass_size)
    assert bat.release_batch(got.handle[got.ok]) == got.placed
    assert bat.reservations.count() == seq.reservations.count() - got.placed


@pytest.mark.parametrize("pass_size", [0, -1])
def test_pass_size_below_one_is_refused(make_scheduler, pass_size):
    sched = make_scheduler()
    with pytest.raises(ValueError, match="pass_size"):
        sched._fast.pass_size = pass_size
    assert sched._fast.pass_size == 2048


def test_a_fleet_change_between_two_passes_is_seen_from_the_next_pass_on():
    """Between two passes the batch holds the GIL and runs no Python code of its own, but the session
    table may run some: a key's ``__eq__`` (here a key put in only for this, whose hash is session s4's,
    so that reading s4's state in the second pass calls it). A snapshot published there is used from
    the next pass on, exactly as by dispatch calls made after the change."""

    def make():
        sched = pysched.Scheduler(kernel="compiled", seed=8)
        for i in range(4):
            sched.register_node(f"n{i}", ["zh", "en"], max_concurrency=3)
        return sched

    sched, twin = make(), make()
    fast = sched._fast
    fast.pass_size = 4
    sids = [f"s{i % 6}" for i in range(20)]
    first = fast.passes_without_gil
    changed: list[int] = []

    class Hook:
        def __hash__(self):
            return hash("s4")

        def __eq__(self, other):
            if not changed and fast.passes_without_gil == first + 1:
                changed.append(1)  # after the first pass (jobs 0-3), before the second (s4 is job 4)
                sched.register_node("late", ["zh", "en"], max_concurrency=50)
            return False

    table = sched._sessions.entries
    table[Hook()] = None
    try:
        got = sched.dispatch_batch(sids, "zh", "en")
    finally:
        for key in [k for k in table if isinstance(k, Hook)]:
            del table[key]
    assert changed
    expected = [twin.dispatch(sid, "zh", "en").node_id for sid in sids[:4]]
    twin.register_node("late", ["zh", "en"], max_concurrency=50)
    expected += [twin.dispatch(sid, "zh", "en").node_id for sid in sids[4:]]
    assert got.node_ids() == expected
    assert "late" in expected[4:]
    assert sched.reservations.inflight.tolist() == twin.reservations.inflight.tolist()
    sched.snapshot.kernel.ordering.check()


def _gate(sched):
    return sched.reservations._counts.gate


def test_a_batch_alone_places_without_the_gil_and_leaves_the_gate_open():
    sched = pysched.Scheduler(kernel="compiled", seed=3)
    for i in range(8):
        sched.register_node(f"n{i}", ["zh", "en"], max_concurrency=4)
    fast = sched._fast
    before = fast.passes_without_gil
    got = sched.dispatch_batch([f"s{i % 5}" for i in range(20)], "zh", "en")
    assert got.ok.sum() == 20 and fast.passes_without_gil == before + 1
    assert _gate(sched).state == (False, 0)
    assert sched.release_batch(got.handle) == 20
    assert _gate(sched).state == (False, 0)
    assert sched.reservations.count() == 0 and int(sched.reservations.inflight[:8].sum()) == 0


def test_a_batch_started_inside_another_entry_keeps_the_gil_and_does_not_wait_on_itself():
    """The injected clock runs inside the dispatcher's entries: a batch started from it never blocks."""
    inner: list[BatchResult] = []
    armed: list[bool] = []

    def clock():
        if armed:
            armed.clear()  # once (the batch reads the clock too)
            inner.append(sched.dispatch_batch(["inner-a", "inner-b"], "zh", "en"))
        return 100.0

    sched = pysched.Scheduler(kernel="compiled", seed=3, clock=clock)
    for i in range(4):
        sched.register_node(f"n{i}", ["zh", "en"], max_concurrency=4)
    job = sched.dispatch("outer", "zh", "en")
    fast = sched._fast
    before = fast.passes_without_gil
    armed.append(True)
    assert sched.release(job.job_id) is True  # the clock, read inside the release, runs the batch
    assert len(inner) == 1 and inner[0].ok.all()
    assert fast.passes_without_gil == before  # an entry was under way: the pass kept the GIL
    assert _gate(sched).state == (False, 0)
    assert sched.release_batch(inner[0].handle) == 2 and sched.reservations.count() == 0


@pytest.mark.parametrize("kernel_name", ["compiled", "python"])
def test_batches_without_the_gil_race_dispatch_heartbeats_and_fleet_changes(kernel_name):
    """Two batchers, the one-call dispatch, the Python path, ``dispatch_many``, heartbeats, fleet changes and
    sessions closed and swept on one scheduler: no node above its max at any check, nothing leaked, no
    session left held, the ordering and the session index whole, no deadlock (joins bounded at 300 s)."""
    sched = pysched.Scheduler(kernel=kernel_name, seed=11, reservation_ttl=1e6, heartbeat_timeout=1e6)
    sched._fast.pass_size = 16  # batches of up to 120 jobs in several passes: other calls run in between
    cap = {f"n{i}": 2 + i % 3 for i in range(24)}
    for node, c in cap.items():
        sched.register_node(node, SETS[int(node[1:]) % len(SETS)], max_concurrency=c)
    errors: list[BaseException] = []
    stop = threading.Event()
    barrier = threading.Barrier(8)
    # rounds per thread: the compiled calls run ten times as many as the twin's, to overlap the other threads
    # as long, and the twin's are kept to what a CI run affords
    scale = 10 if kernel_name == "compiled" else 0.6

    def over_max(where):
        snap = sched.snapshot
        for node, c in cap.items():
            slot = snap.slot(node)
            if slot is not None and sched.reservations.count(node) > c:
                errors.append(AssertionError(f"{where}: {node} above its max {c}"))

    def guarded(body):
        def run():
            try:
                barrier.wait(timeout=120)
                body()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                stop.set()
        return run

    def batcher(k):
        rng = np.random.default_rng(k)
        for r in range(int(150 * scale)):
            n = int(rng.integers(1, 120))
            sids = [f"b{(k * 7 + j) % 31}" for j in range(n)]
            pairs = [PAIRS[int(rng.integers(0, len(PAIRS)))] for _ in range(n)]
            got = sched.dispatch_batch(sids, [p[0] for p in pairs], [p[1] for p in pairs])
            over_max(f"batcher {k} round {r}")
            placed = got.handle[got.ok]
            if r % 3 == 0:
                sched.commit_batch(placed)
            assert sched.release_batch(placed) == len(placed)

    def single():
        for i in range(int(1500 * scale)):
            with contextlib.suppress(pysched.NoNodeAvailable, pysched.NoPoolForLanguagePair):
                a = sched.dispatch(f"b{i % 31}", *PAIRS[i % 3])
                assert sched.release(a.job_id) is True

    def slow():  # the Python path (an exclude list), deciding under the session's lock
        for i in range(int(300 * scale)):
            with contextlib.suppress(pysched.NoNodeAvailable, pysched.NoPoolForLanguagePair):
                a = sched.dispatch(f"b{(5 * i) % 31}", *PAIRS[i % 3], exclude=["n0"])
                assert sched.release(a.job_id) is True

    def many():  # passes that hold their sessions
        for i in range(int(80 * scale)):
            reqs = [(f"b{(3 * i + j) % 31}", *PAIRS[(i + j) % 3]) for j in range(8)]
            for a in sched.dispatch_many(reqs):
                if isinstance(a, pysched.Assignment):
                    assert sched.release(a.job_id) is True
                elif not isinstance(a, (pysched.NoNodeAvailable, pysched.NoPoolForLanguagePair)):
                    raise a

    def heartbeats():
        rng = np.random.default_rng(99)
        while not stop.is_set():
            node = f"n{int(rng.integers(0, 24))}"
            sched.heartbeat(node, running=int(rng.integers(0, cap[node] + 1)), gpu=float(rng.integers(0, 90)))

    def fleet_changes():
        k = 0
        while not stop.is_set():
            k += 1
            extra = f"x{k % 4}"
            sched.register_node(extra, SETS[k % len(SETS)] + (["fr"] if k % 2 else []), max_concurrency=3)
            sched.drain_node(f"n{k % 24}")
            sched.resume_node(f"n{k % 24}")
            sched.remove_node(extra)

    def closer():  # sessions dropped while batches resolve them (in their passes, the known ones)
        rng = np.random.default_rng(7)
        while not stop.is_set():
            sched.close_session(f"b{int(rng.integers(0, 31))}")
            if rng.integers(0, 50) == 0:
                sched.sweep_sessions()

    workers = [threading.Thread(target=guarded(lambda k=k: batcher(k))) for k in range(2)]
    workers += [threading.Thread(target=guarded(body)) for body in (single, slow, many)]
    background = [threading.Thread(target=guarded(heartbeats)), threading.Thread(target=guarded(fleet_changes)),
                  threading.Thread(target=guarded(closer))]
    for t in workers + background:
        t.start()
    for t in workers:
        t.join(timeout=300)
    stop.set()
    for t in background:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in workers + background), "a thread is stuck (deadlock?)"
    assert not errors, errors[:3]
    assert sched.reservations.count() == 0
    assert int(np.asarray(sched.reservations.inflight).sum()) == 0
    assert not any(state.held or state.deciding for state in sched._session_map.values())
    if kernel_name == "compiled":
        assert _gate(sched).state == (False, 0)
        sched.snapshot.kernel.ordering.check()
        sched._fast.check_session_index()


@pytest.mark.parametrize(("tenant", "fresh"), [(None, "zH_tW"), ("acme", "zH-Tw")])
def test_a_fleet_change_while_a_batch_validates_is_seen_by_the_whole_batch(monkeypatch, tenant, fresh):
    """Validation can run Python code (an unseen code is normalised); a snapshot published meanwhile
    makes the batch start over on it, so it places exactly as dispatch calls made after the change."""
    from pysched import languages

    real = languages.normalize_language
    changed: list[bool] = []

    def normalize(code, *args, **kwargs):
        if code == fresh and not changed and batching:
            changed.append(True)
            sched.register_node("late", ["zh", "en", "ja"], max_concurrency=50)
        return real(code, *args, **kwargs)

    monkeypatch.setattr(languages, "normalize_language", normalize)
    batching: list[bool] = []
    sched = pysched.Scheduler(kernel="compiled", seed=8, tenant_pools={"acme": 2})
    twin = pysched.Scheduler(kernel="compiled", seed=8, tenant_pools={"acme": 2})
    for s in (sched, twin):
        for i in range(4):  # pool 1: zh-en, pool 2: de-en-zh (the tenant's)
            s.register_node(f"n{i}", ["zh", "en"] + (["de"] if i % 2 else []), max_concurrency=3,
                            accept_public_jobs=not (i % 2))
    twin.register_node("late", ["zh", "en", "ja"], max_concurrency=50)
    sids = [f"s{i % 5}" for i in range(12)]
    srcs = ["zh", fresh] + ["zh"] * 10  # a code no other test sends: normalised here, not cached
    batching.append(True)
    got = sched.dispatch_batch(sids, srcs, "en", tenant=tenant)
    assert changed  # the fleet changed in the middle of the call
    kw = {} if tenant is None else {"tenant": tenant}
    expected = one_by_one(twin, sids, srcs, ["en"] * 12, **kw)
    assert [n if n else None for n in got.node_ids()] == [getattr(a, "node_id", None) for a in expected]
    assert ("late" in got.node_ids()) == (tenant is None)  # the tenant's jobs go to its pool first


@pytest.mark.parametrize("seed", range(3))
def test_the_session_index_follows_the_session_table(seed):
    """The compiled calls find a session's state through an index of their own (by the id's hash), kept
    exact with the session table through every way a session comes and goes: dispatch and batches make and
    find sessions (with id objects other than the table's keys), close_session and sweeps drop them, and
    the index grows past its first size and loses entries in the middle of probe runs. After every step
    it is checked against the table, and both kernels decide alike throughout (a state the index kept
    after its session was dropped would keep the old binding, which the twin, finding none, does not)."""
    from conftest import FakeClock

    results = []
    for kernel in ("compiled", "python"):
        clock = FakeClock(1000.0)
        rng = np.random.default_rng(seed)
        sched = pysched.Scheduler(seed=seed, kernel=kernel, clock=clock, session_ttl=50.0)
        for i in range(6):
            sched.register_node(f"n{i}", ["zh", "en", "ja"] if i % 2 else ["zh", "en"], max_concurrency=10_000)
        fast = sched._fast
        out = []
        held = []
        peak = 0
        for _ in range(120):
            r = rng.random()
            if r < 0.35:  # a batch over sessions old and new, each id a fresh object
                ids = ["".join(("s", str(int(k)))) for k in rng.integers(0, 3000, size=int(rng.integers(1, 600)))]
                got = sched.dispatch_batch(ids, "zh", "en")
                out.append(got.pool_id.tolist())
                held.extend(int(h) for h in got.handle if h >= 0)
            elif r < 0.6:
                for k in rng.integers(0, 1500, size=40):
                    a = sched.dispatch("".join(("s", str(int(k)))), "zh", str(rng.choice(["en", "ja"])))
                    out.append((a.pool_id, a.node_id))
                    held.append(a.job_id)
            elif r < 0.8:
                for k in rng.integers(0, 1500, size=int(rng.integers(1, 200))):
                    out.append(sched.close_session("".join(("s", str(int(k))))))
            elif r < 0.9:
                clock.advance(float(rng.choice([10.0, 30.0, 60.0])))
                for i in range(6):  # (the nodes stay online)
                    sched.heartbeat(f"n{i}", running=0, gpu=float(i))
                out.append(sched.sweep_sessions())
            else:
                sched.release_batch([h for h in held if isinstance(h, int)])
                for job in held:
                    if isinstance(job, str):
                        sched.release(job)
                held = []
            if kernel == "compiled":
                filed = fast.check_session_index()
                assert filed <= len(sched._sessions)
                peak = max(peak, filed)
        if kernel == "compiled":
            assert peak > 1024  # it grew twice past its first size (1,024 entries, at most half in use)
        results.append(out)
    assert results[0] == results[1]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pass_size", [5, 2048])
def test_batch_after_batch_places_exactly_as_sequential_dispatch(make_scheduler, clock, seed, pass_size):
    """A batch whose sessions the compiled calls know resolves them in the pass itself (without the GIL);
    the ones that need Python (a session new, dropped, past its TTL, rebound by the Python path, or named
    by another str object with the same id) are resolved holding it. Round after round, with such changes
    in between made alike on both, the batches place exactly as one-by-one dispatch."""
    seq = fleet(make_scheduler, tenant_pools={"acme": 2}, session_ttl=30.0)
    bat = fleet(make_scheduler, tenant_pools={"acme": 2}, session_ttl=30.0)
    bat._fast.pass_size = pass_size
    rng = np.random.default_rng(seed)
    for rnd in range(5):
        if rnd:
            clock.advance(float(rng.choice([1.0, 20.0, 40.0])))  # some sessions outlive their TTL
            picks = [f"s{int(k)}" for k in rng.integers(0, 23, size=5)]
            for sched in (seq, bat):
                for i in range(25):
                    sched.heartbeat(f"n{i}", gpu=90.0 if i == 3 else 10.0)
                for sid in picks[:3]:
                    sched.close_session(sid)
                for sid in picks[3:]:
                    with contextlib.suppress(pysched.SchedulerError):  # the Python path rebinds it
                        sched.dispatch(sid, "ja", "en", tenant="acme")
        sids, srcs, tgts = jobs(seed * 10 + rnd, n=300)
        sids = [sid if i % 2 else "".join(("s", sid[1:])) for i, sid in enumerate(sids)]  # other objects too
        expected = one_by_one(seq, sids, srcs, tgts)
        got = bat.dispatch_batch(sids, srcs, tgts)
        assert got.node_ids() == [x.node_id if isinstance(x, pysched.Assignment) else None for x in expected]
        assert got.reasons() == [_reason_of(x) for x in expected]
        assert seq.reservations.inflight.tolist() == bat.reservations.inflight.tolist()
        for sid in {f"s{k}" for k in range(23)}:
            assert getattr(seq._sessions.get(sid), "binding", None) == getattr(bat._sessions.get(sid), "binding", None)
        for i in range(0, len(sids), 2):  # half of the jobs end, alike
            if isinstance(expected[i], pysched.Assignment):
                assert seq.release(expected[i].job_id) is True
                assert bat.release(int(got.handle[i])) is True
        bat._fast.check_session_index()
    if hasattr(bat._fast, "resolved_in_pass"):
        assert bat._fast.resolved_in_pass > 0  # (compiled: the passes did resolve sessions themselves)


def test_a_batch_resolves_known_sessions_in_its_pass_exactly(make_scheduler, clock):
    """Round by round, a batch of known sessions against one-by-one dispatch on a twin fleet: sessions bound
    earlier and unchanged (resolved in the pass itself, on the compiled kernel), after a publication that
    moves every pool's index (their memo must be looked up again), kept by a sweep because a pass marked
    them used, past their TTL at lookup (they must rebind as new ones), and a session whose binding an
    earlier job of the same pass changed."""
    scheds = [make_scheduler(session_ttl=30.0), make_scheduler(session_ttl=30.0)]
    ids = [f"s{i}" for i in range(8)]

    def both(fn):
        for sched in scheds:
            fn(sched)

    gone = set()

    def beat(sched):
        for node in ("x0", "j0", "a0", "a1", "b0", "b1"):
            if node not in gone:
                sched.heartbeat(node, gpu=10.0)

    def setup(sched):
        sched.register_node("x0", ["en", "ko"], max_concurrency=100)  # the first pool: it goes in round 4
        sched.register_node("j0", ["en", "ja"], max_concurrency=100)
        for node in ("a0", "a1"):
            sched.register_node(node, ["zh", "en"], max_concurrency=100)
        for node in ("b0", "b1"):
            sched.register_node(node, ["de", "en", "zh"], max_concurrency=100)
        beat(sched)
        sched.drain_node("b0")
        sched.drain_node("b1")
        for sid in ids:  # every session bound to pool {zh, en}
            sched.dispatch(sid, "zh", "en")
        for k in range(60):  # and that pool busy: a new binding prefers {de, en, zh}
            sched.dispatch(f"load{k}", "zh", "en")
        sched.resume_node("b0")
        sched.resume_node("b1")

    both(setup)
    others = [("o1", "zh", "en"), ("o2", "zh", "en")]
    rounds = [
        (1.0, None, [(sid, "zh", "en") for sid in ids]),  # the batch reads each binding (memo) with the GIL
        (1.0, None, [(sid, "zh", "en") for sid in ids * 2]),  # now in the pass
        (1.0, "x0", [(sid, "zh", "en") for sid in ids]),  # pool indices move: each memo is looked up again
        (10.0, None, [(sid, "zh", "en") for sid in ids]),  # in the pass again (it marks the sessions used)
        (25.0, None, others),  # a sweep runs: the sessions were used 25 s ago, under the TTL (30 s)
        (2.0, None, [(sid, "zh", "en") for sid in ids]),  # still bound
        (29.0, None, others),  # a sweep, 29 s after
        (2.0, None, [(sid, "zh", "en") for sid in ids]),  # 31 s: past the TTL, found so before a sweep
        (1.0, None, [job for sid in ids for job in ((sid, "ja", "en"), (sid, "zh", "en"))]),  # rebound in a pass
    ]
    for advance, removed, requests in rounds:
        clock.advance(advance)
        both(beat)
        if removed is not None:
            both(lambda sched, node=removed: sched.remove_node(node))
            gone.add(removed)
        sids = [r[0] for r in requests]
        srcs = [r[1] for r in requests]
        tgts = [r[2] for r in requests]
        expected = one_by_one(scheds[0], sids, srcs, tgts)
        got = scheds[1].dispatch_batch(sids, srcs, tgts)
        assert got.node_ids() == [x.node_id if isinstance(x, pysched.Assignment) else None for x in expected]
        for sid in ids:
            assert scheds[0]._sessions.get(sid).binding == scheds[1]._sessions.get(sid).binding
            # the batch let go of every session: those its passes bound anew once written back, the others as
            # their pass ended
            assert not scheds[1]._sessions.get(sid).held
    if hasattr(scheds[1]._fast, "resolved_in_pass"):
        assert scheds[1]._fast.resolved_in_pass >= 16  # round 2, at least, was resolved in the pass
