"""``Scheduler.dispatch_many``: one compiled pass, the same decisions as one-by-one dispatch."""

from __future__ import annotations

import numpy as np
import pytest

import pysched

SETS = [["zh", "en"], ["de", "en", "zh"], ["en", "ja"], ["en", "ja", "ko"], ["en", "es", "pt"]]
PAIRS = [("zh", "en"), ("ja", "en"), ("auto", "en"), ("de", "zh"), ("ko", "ja"), ("fr", "en"), ("es", "pt")]


def fleet(make_scheduler, **kw):
    sched = make_scheduler(**kw)
    for i in range(25):
        sched.register_node(f"n{i}", SETS[i % len(SETS)], max_concurrency=1 + i % 3,
                            accept_public_jobs=i % 11 != 0)
    sched.drain_node("n7")
    sched.heartbeat("n3", gpu=90.0)
    return sched


def outcome(x):
    if isinstance(x, pysched.Assignment):
        return ("ok", x.node_id, x.pool_id, x.job_id, x.session_id, x.src, x.tgt)
    return (type(x).__name__, getattr(x, "breakdown", None), getattr(x, "best_reason", None))


def requests(seed, n=120):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sid = f"s{int(rng.integers(0, 17))}"
        src, tgt = PAIRS[int(rng.integers(0, len(PAIRS)))]
        kind = int(rng.integers(0, 4))
        if kind == 0:
            out.append((sid, src, tgt))
        elif kind == 1:
            out.append({"session_id": sid, "src": src, "tgt": tgt, "tenant": "acme"})
        elif kind == 2:
            out.append({"session_id": sid, "src": src, "tgt": tgt, "exclude": [f"n{int(rng.integers(0, 25))}"]})
        else:
            out.append(pysched.DispatchRequest(sid, src, tgt, job_id=f"job-{i}"))
    return out


def one_by_one(sched, reqs):
    results = []
    for r in reqs:
        if isinstance(r, tuple):
            args, kw = r, {}
        elif isinstance(r, dict):
            kw = dict(r)
            args = (kw.pop("session_id"), kw.pop("src"), kw.pop("tgt"))
        else:
            args, kw = (r.session_id, r.src, r.tgt), {"job_id": r.job_id}
        try:
            results.append(sched.dispatch(*args, **kw))
        except Exception as exc:  # noqa: BLE001 - the result list holds exceptions
            results.append(exc)
    return results


@pytest.mark.parametrize("seed", range(4))
def test_batch_spreads_exactly_as_sequential_dispatch(make_scheduler, seed):
    reqs = requests(seed)
    seq_sched = fleet(make_scheduler, tenant_pools={"acme": 2})
    bat_sched = fleet(make_scheduler, tenant_pools={"acme": 2})
    # earlier traffic binds some sessions first, in both
    warm = [(f"s{i}", "zh", "en") for i in range(5)]
    one_by_one(seq_sched, warm)
    one_by_one(bat_sched, warm)
    sequential = one_by_one(seq_sched, reqs)
    batched = bat_sched.dispatch_many(reqs)
    assert [outcome(x) for x in batched] == [outcome(x) for x in sequential]
    assert any(isinstance(x, pysched.Assignment) for x in batched)
    assert any(isinstance(x, pysched.NoNodeAvailable) for x in batched)  # the fleet fills up
    assert any(isinstance(x, pysched.NoPoolForLanguagePair) for x in batched)
    # the same bindings and the same reservations afterwards
    for sid in {f"s{i}" for i in range(17)}:
        a, b = seq_sched._sessions.get(sid), bat_sched._sessions.get(sid)
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.pair, a.pool_id) == (b.pair, b.pool_id)
    assert np.array_equal(seq_sched.snapshot.inflight, bat_sched.snapshot.inflight)
    assert seq_sched.reservations.count() == bat_sched.reservations.count()


def test_batch_reports_errors_in_place(make_scheduler):
    sched = fleet(make_scheduler)
    out = sched.dispatch_many([
        ("s1", "zh", "en"),
        ("s2", "zh", "??"),
        {"session_id": "s3", "src": "zh"},
        {"session_id": "s3", "src": "zh", "tgt": "en", "colour": "red"},
        ("s4", "zh", "xx"),
        42,
    ])
    assert isinstance(out[0], pysched.Assignment)
    assert isinstance(out[1], ValueError) and "tgt" in str(out[1])
    assert isinstance(out[2], ValueError)
    assert isinstance(out[3], TypeError)
    assert isinstance(out[4], pysched.NoPoolForLanguagePair)
    assert isinstance(out[5], TypeError)
    assert sched.reservations.count() == 1


def test_batch_job_ids_are_idempotent(make_scheduler):
    sched = fleet(make_scheduler)
    first = sched.dispatch("s", "zh", "en", job_id="j1")
    out = sched.dispatch_many([
        {"session_id": "s", "src": "zh", "tgt": "en", "job_id": "j1"},
        {"session_id": "s", "src": "zh", "tgt": "en", "job_id": "j2"},
        {"session_id": "s", "src": "zh", "tgt": "en", "job_id": "j2"},
    ])
    assert out[0] == first
    assert out[1] == out[2] and out[1].job_id == "j2"
    assert sched.reservations.count() == 2


def test_batch_falls_back_when_the_backend_refuses(make_scheduler, kernel_name):
    from pysched._impl import resolve
    from pysched.reservations import REFUSED_FULL, LocalReservations

    class RefuseOnce(LocalReservations):
        refused = False

        def reserve_one(self, job_id, candidate, pool_id, session_id, now):
            if not self.refused:
                self.refused = True
                return REFUSED_FULL
            return super().reserve_one(job_id, candidate, pool_id, session_id, now)

    sched = fleet(make_scheduler, reservations=RefuseOnce(core=resolve(kernel_name)))
    out = sched.dispatch_many([("a", "zh", "en"), ("b", "zh", "en")])
    assert all(isinstance(x, pysched.Assignment) for x in out)
    assert sched.reservations.count() == 2


def test_a_pass_the_backend_places_nothing_of_takes_its_bindings_back(make_scheduler, kernel_name):
    """``dispatch_many`` writes a pass's bindings before it reserves (no session is held through the
    reservation); when the backend is down, the bindings are taken back and the sessions it made go."""
    from pysched._impl import resolve
    from pysched.reservations import LocalReservations

    class Down(LocalReservations):
        down = False

        def reserve_placed(self, *args, **kwargs):
            if self.down:
                raise pysched.ReservationBackendUnavailable("down for the test")
            return super().reserve_placed(*args, **kwargs)

    backend = Down(core=resolve(kernel_name))
    sched = make_scheduler(reservations=backend)
    sched.register_node("a", ["zh", "en"], max_concurrency=8)
    sched.register_node("b", ["de", "en", "zh"], max_concurrency=8)
    sched.heartbeat("b", running=4)
    pools = {p.name: p.pool_id for p in sched.pools()}
    assert sched.dispatch("old", "zh", "en").pool_id == pools["en-zh"]
    sched.heartbeat("a", running=7)  # a new decision would now take b's pool
    sessions_before = sorted(sched._session_map)
    binding = sched._session_map["old"].binding
    backend.down = True
    out = sched.dispatch_many([("new", "zh", "en"), ("old", "zh", "en"), ("old", "de", "zh")])
    assert all(isinstance(x, pysched.ReservationBackendUnavailable) for x in out), out
    assert sorted(sched._session_map) == sessions_before
    assert sched._session_map["old"].binding is binding and not sched._session_map["old"].held
    assert sched.reservations.count() == 1
    backend.down = False
    assert [x.pool_id for x in sched.dispatch_many([("new", "zh", "en"), ("old", "zh", "en")])] == [
        pools["de-en-zh"], pools["en-zh"]]


def test_a_batch_that_places_no_job_of_a_new_session_leaves_no_session(make_scheduler, kernel_name):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], max_concurrency=1)
    sched.dispatch("first", "zh", "en")  # a is full from here on
    got = sched.dispatch_batch(["new", "first", "new", "other"], "zh", "en")
    assert got.placed == 0 and got.reasons() == ["full"] * 4
    assert sorted(sched._session_map) == ["first"]
    assert not sched._session_map["first"].held
    assert sched._fast.check_session_index() == (0 if kernel_name == "python" else 1)  # (the twin has none)
    assert [type(x).__name__ for x in sched.dispatch_many([("new", "zh", "en")])] == ["NoNodeAvailable"]
    assert sorted(sched._session_map) == ["first"]


def test_empty_batch(make_scheduler):
    assert fleet(make_scheduler).dispatch_many([]) == []
