"""Scheduler behaviour, rule by rule; every test runs on both kernels (``make_scheduler``)."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

import pysched
from pysched import PoolConfig
from pysched.reservations import REFUSED_FULL, LocalReservations

ALL = ("asr", "nmt", "tts", "semantic")


def node_count(sched, node_id):
    return sched.reservations.count(node_id)


# ---------------------------------------------------------------- languages
@pytest.mark.parametrize(
    "raw,expected",
    [("zh-CN", "zh"), (" zh_TW ", "zh"), ("zh-Hans", "zh"), ("ZH-HANT", "zh"), ("pt-BR", "pt"), ("pt-pt", "pt"),
     ("en-US", "en"), ("en-gb", "en"), ("in", "id"), ("iw", "he"), ("EN", "en"), ("yue", "yue"),
     ("sr-latn", "sr-latn")],
)
def test_language_normalisation(raw, expected):
    assert pysched.normalize_language(raw) == expected


@pytest.mark.parametrize("bad", ["", " ", "e", "english1", "en--us", "z@", "toolongcode"])
def test_malformed_language_codes_are_value_errors(bad):
    with pytest.raises(ValueError, match="language"):
        pysched.normalize_language(bad)


def test_language_type_errors_and_auto_rules(make_scheduler):
    sched = make_scheduler()
    sched.register_node("n1", ["zh", "en"])
    with pytest.raises(TypeError, match="src"):
        sched.dispatch("s", 5, "en")
    with pytest.raises(ValueError, match="tgt"):
        sched.dispatch("s", "zh", "auto")
    with pytest.raises(TypeError, match="languages"):
        sched.register_node("n2", "zh")  # a bare string is almost always a bug
    with pytest.raises(ValueError, match="languages"):
        sched.register_node("n2", [])


def test_aliases_fold_at_every_boundary(make_scheduler):
    sched = make_scheduler()
    sched.register_node("n1", ["zh-CN", "en-US"])
    assert [p.name for p in sched.pools()] == ["en-zh"]
    a = sched.dispatch("s", "zh-TW", "en-GB")
    assert (a.node_id, a.src, a.tgt) == ("n1", "zh", "en")


# ---------------------------------------------------------------- pools and index
def test_superset_matching_and_specific_pools_first(make_scheduler):
    sched = make_scheduler()
    sched.register_node("tri", ["de", "en", "zh"])
    sched.register_node("pair", ["zh", "en"])
    ids = {p.name: p.pool_id for p in sched.pools()}
    ex = sched.explain("zh", "en")
    assert ex.pools == (ids["en-zh"], ids["de-en-zh"])  # smallest set first
    assert sched.explain("de", "zh").pools == (ids["de-en-zh"],)
    sched.drain_node("pair")
    a = sched.dispatch("s", "zh", "en")
    assert a.node_id == "tri" and a.pool_id == ids["de-en-zh"]  # superset pool serves zh->en


def test_auto_source_matches_pools_containing_the_target(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["ja", "en"])
    sched.register_node("b", ["de", "fr"])
    assert sched.dispatch("s", "auto", "ja").node_id == "a"
    assert sched.explain("auto", "fr").pools == tuple(p.pool_id for p in sched.pools() if "fr" in p.languages)
    with pytest.raises(pysched.NoPoolForLanguagePair):
        sched.dispatch("s", "auto", "ko")


def test_no_pool_for_pair(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    with pytest.raises(pysched.NoPoolForLanguagePair) as info:
        sched.dispatch("s", "zh", "ja")
    assert (info.value.src, info.value.tgt) == ("zh", "ja")
    assert sched.stats()["dispatch"]["no_pool"] == 1


def test_language_index_structures(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    sched.register_node("b", ["de", "en", "zh"])
    index = sched.snapshot.index
    assert index.by_language_pair[("zh", "en")] == index.lookup("zh", "en")
    assert index.by_language_set[frozenset({"zh", "en"})] == (1,)
    assert index.by_mixed_pool["de"] == (2,)


def test_auto_pool_ids_are_stable_and_never_reused(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    sched.register_node("b", ["ja", "en"])
    assert {p.name: p.pool_id for p in sched.pools()} == {"en-zh": 1, "en-ja": 2}
    sched.remove_node("a")  # en-zh empties and retires
    assert [p.pool_id for p in sched.pools()] == [2]
    sched.register_node("c", ["ko", "en"])
    sched.register_node("a", ["en", "zh"])  # the set comes back: same id
    assert {p.name: p.pool_id for p in sched.pools()} == {"en-zh": 1, "en-ja": 2, "en-ko": 3}


def test_language_change_moves_the_node(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    sched.register_node("b", ["zh", "en"])
    version = sched.snapshot.version
    sched.heartbeat("a", languages=["ja", "en"])
    assert sched.snapshot.version == version + 1
    pools = {p.name: p.node_ids for p in sched.pools()}
    assert pools == {"en-zh": ("b",), "en-ja": ("a",)}
    assert sched.dispatch("s", "ja", "en").node_id == "a"


def test_max_pools_reports_unpooled_nodes_and_places_them_later(make_scheduler):
    sched = make_scheduler(max_pools=2)
    sched.register_node("a", ["zh", "en"])
    sched.register_node("b", ["ja", "en"])
    sched.register_node("c", ["ko", "en"])
    stats = sched.stats()
    assert stats["unpooled"] == ["c"] and len(stats["pools"]) == 2
    ex = sched.explain("ko", "en")
    assert ex.pools == () and ex.nodes == {"c": "no_pool"} and ex.unpooled == ("c",)
    sched.remove_node("b")  # a pool retires: c gets one
    assert sched.stats()["unpooled"] == []
    assert sched.dispatch("s", "ko", "en").node_id == "c"


def test_manual_pools_membership_by_languages_and_services(make_scheduler):
    sched = make_scheduler()
    sched.register_node("full", ["zh", "en", "ja"], services=ALL)
    sched.register_node("notts", ["zh", "en"], services=("asr", "nmt"))
    sched.set_pools([
        PoolConfig(pool_id=10, name="zh-en", languages={"zh", "en"}, required_services={"asr", "nmt", "tts"}),
        PoolConfig(pool_id=11, name="zh-en-any", languages={"zh", "en"}),
        PoolConfig(pool_id=12, name="ja", languages={"ja", "EN"}),
    ])
    members = {p.pool_id: p.node_ids for p in sched.pools()}
    assert members == {10: ("full",), 11: ("full", "notts"), 12: ("full",)}
    assert all(not p.auto for p in sched.pools())
    a = sched.dispatch("s", "zh", "en", services=("asr", "nmt"))
    assert a.pool_id in {10, 11}
    sched.set_pools("auto")
    assert {p.name for p in sched.pools()} == {"en-ja-zh", "en-zh"}


def test_manual_pool_validation_changes_nothing(make_scheduler):
    sched = make_scheduler(max_pools=2)
    sched.register_node("a", ["zh", "en"])
    version = sched.snapshot.version
    with pytest.raises(ValueError, match="duplicate pool_id"):
        sched.set_pools([PoolConfig(1, "a", {"en"}), PoolConfig(1, "b", {"zh"})])
    with pytest.raises(ValueError, match="max_pools"):
        sched.set_pools([PoolConfig(i, f"p{i}", {"en"}) for i in range(3)])
    with pytest.raises(TypeError):
        sched.set_pools([{"pool_id": 1}])
    with pytest.raises(ValueError, match="pool_id"):
        PoolConfig(-1, "x", {"en"})
    with pytest.raises(ValueError, match="languages"):
        PoolConfig(1, "x", {"e n"})
    assert sched.snapshot.version == version and [p.name for p in sched.pools()] == ["en-zh"]


# ---------------------------------------------------------------- eligibility reasons
def test_every_reason_code_through_explain(make_scheduler, clock):
    sched = make_scheduler(resource_threshold=80.0)
    for name in ["off", "stale", "drain", "degr", "nogpu", "private", "nosvc", "excl", "full", "hot", "ok"]:
        sched.register_node(name, ["zh", "en"], services=("asr", "nmt") if name == "nosvc" else ALL,
                            has_gpu=name != "nogpu", accept_public_jobs=name != "private", max_concurrency=1)
    clock.advance(30)
    for name in ["off", "drain", "degr", "nogpu", "private", "nosvc", "excl", "full", "hot", "ok"]:
        sched.heartbeat(name)
    clock.advance(20)  # "stale" is now 50 s silent > 45 s
    for name in ["off", "drain", "degr", "nogpu", "private", "nosvc", "excl", "full", "hot", "ok"]:
        sched.heartbeat(name, cpu=10.0, gpu=10.0, mem=10.0)
    sched.mark_offline("off")
    sched.drain_node("drain")
    for _ in range(3):
        sched.heartbeat("degr", healthy=False)
    sched.heartbeat("full", running=1)
    sched.heartbeat("hot", mem=80.0)
    ex = sched.explain("zh", "en", exclude=["excl"])
    assert ex.nodes == {
        "off": "offline", "stale": "offline", "drain": "not_ready", "degr": "not_ready", "nogpu": "no_gpu",
        "private": "not_public", "nosvc": "missing_service", "excl": "excluded", "full": "full",
        "hot": "overloaded", "ok": "ok",
    }
    assert sched.dispatch("s", "zh", "en", exclude=["excl"]).node_id == "ok"
    # a tenant job may use a node that does not take public jobs; a CPU-only job a node without a GPU
    assert sched.explain("zh", "en", tenant="t1").nodes["private"] == "ok"
    assert sched.explain("zh", "en", require_gpu=False).nodes["nogpu"] == "ok"
    assert sched.explain("zh", "en", services=("asr", "NMT")).nodes["nosvc"] == "ok"


def test_no_node_available_breakdown_and_best_reason(make_scheduler):
    sched = make_scheduler()
    for i in range(3):
        sched.register_node(f"f{i}", ["zh", "en"], max_concurrency=1)
    sched.register_node("d", ["de", "en", "zh"], max_concurrency=1)
    sched.drain_node("d")
    for i in range(3):
        sched.dispatch(f"s{i}", "zh", "en")
    with pytest.raises(pysched.NoNodeAvailable) as info:
        sched.dispatch("late", "zh", "en")
    assert info.value.breakdown == {"full": 3, "not_ready": 1}
    assert info.value.best_reason == "full"
    assert sched.stats()["dispatch"]["full"] == 1
    assert "late" not in sched._sessions  # a failed dispatch creates no session


def test_unknown_service_is_missing_service(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    with pytest.raises(pysched.NoNodeAvailable) as info:
        sched.dispatch("s", "zh", "en", services=("asr", "lipsync"))
    assert info.value.best_reason == "missing_service"
    sched.heartbeat("a", services=ALL + ("lipsync",))
    assert sched.dispatch("s", "zh", "en", services=("asr", "lipsync")).node_id == "a"


def test_empty_pools_report_no_nodes(make_scheduler):
    sched = make_scheduler(pools=[PoolConfig(1, "zh-en", {"zh", "en"})])
    with pytest.raises(pysched.NoNodeAvailable) as info:
        sched.dispatch("s", "zh", "en")
    assert info.value.breakdown == {} and info.value.best_reason == "no_nodes"


# ---------------------------------------------------------------- health and heartbeats
def test_degraded_after_three_unhealthy_heartbeats_and_back(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    sched.heartbeat("a", healthy=False)
    sched.heartbeat("a", healthy=False)
    assert sched.node("a")["status"] == "ready"
    sched.heartbeat("a", healthy=True)  # a healthy one resets the streak
    for _ in range(2):
        sched.heartbeat("a", healthy=False)
    assert sched.node("a")["status"] == "ready"
    sched.heartbeat("a", healthy=False)
    assert sched.node("a")["status"] == "degraded"
    with pytest.raises(pysched.NoNodeAvailable):
        sched.dispatch("s", "zh", "en")
    sched.heartbeat("a", healthy=True)
    assert sched.node("a")["status"] == "ready"
    assert sched.dispatch("s", "zh", "en").node_id == "a"


def test_marked_offline_node_returns_with_a_heartbeat_drained_does_not(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    sched.register_node("b", ["zh", "en"])
    sched.mark_offline("a")
    sched.drain_node("b")
    sched.heartbeat("a")
    sched.heartbeat("b")
    assert sched.node("a")["status"] == "ready" and sched.node("b")["status"] == "draining"
    sched.resume_node("b")
    assert sched.node("b")["status"] == "ready"


def test_load_only_heartbeats_do_not_publish_a_snapshot(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    snap = sched.snapshot
    for i in range(50):
        sched.heartbeat("a", running=i % 3, cpu=5.0, gpu=6.0, mem=7.0)
    assert sched.snapshot is snap
    slot = snap.slot("a")
    assert snap.loads[slot]["running"] == 49 % 3 and snap.loads[slot]["gpu"] == pytest.approx(6.0)
    sched.heartbeat("a", services=("asr", "nmt", "tts"))
    assert sched.snapshot.version == snap.version + 1
    with pytest.raises(ValueError):
        snap.nodes[slot] = snap.nodes[slot]  # published arrays are read-only


def test_dead_node_drops_out_by_heartbeat_age_without_a_rebuild(make_scheduler, clock):
    sched = make_scheduler(heartbeat_timeout=10.0)
    sched.register_node("a", ["zh", "en"])
    sched.register_node("b", ["zh", "en"])
    version = sched.snapshot.version
    clock.advance(8)
    sched.heartbeat("b")
    clock.advance(3)  # a: 11 s silent, b: 3 s
    assert sched.explain("zh", "en").nodes == {"a": "offline", "b": "ok"}
    assert {sched.dispatch(f"s{i}", "zh", "en").node_id for i in range(3)} == {"b"}
    assert sched.snapshot.version == version
    assert sched.stats()["nodes"]["offline"] == 1


def test_structural_changes_are_visible_to_the_very_next_dispatch(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    sched.drain_node("a")
    with pytest.raises(pysched.NoNodeAvailable):
        sched.dispatch("s", "zh", "en")
    sched.register_node("b", ["zh", "en"])
    assert sched.dispatch("s", "zh", "en").node_id == "b"
    sched.remove_node("b")
    with pytest.raises(pysched.NoNodeAvailable):
        sched.dispatch("s2", "zh", "en")


def test_unknown_node_is_a_key_error(make_scheduler):
    sched = make_scheduler()
    for call in (lambda: sched.heartbeat("ghost"), lambda: sched.drain_node("ghost"),
                 lambda: sched.remove_node("ghost"), lambda: sched.mark_offline("ghost")):
        with pytest.raises(pysched.UnknownNode) as info:
            call()
        assert isinstance(info.value, KeyError) and info.value.node_id == "ghost"


# ---------------------------------------------------------------- bad input changes nothing
@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(max_concurrency=0), ValueError, "max_concurrency"),
        (dict(max_concurrency=2.5), TypeError, "max_concurrency"),
        (dict(max_concurrency=True), TypeError, "max_concurrency"),
        (dict(has_gpu="yes"), TypeError, "has_gpu"),
        (dict(services=["asr", "bad name"]), ValueError, "services"),
        (dict(services="asr"), TypeError, "services"),
        (dict(languages=["zh", "??"]), ValueError, "languages"),
        (dict(node_id=""), ValueError, "node_id"),
        (dict(node_id=7), TypeError, "node_id"),
    ],
)
def test_bad_registration_changes_nothing(make_scheduler, kwargs, exc, word):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    before = (sched.snapshot.version, sched.stats()["nodes_total"], sched.node("a"))
    args = dict(node_id="b", languages=["zh", "en"])
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        sched.register_node(args.pop("node_id"), **args)
    assert (sched.snapshot.version, sched.stats()["nodes_total"], sched.node("a")) == before


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(cpu=101.0), ValueError, "cpu"),
        (dict(gpu=float("nan")), ValueError, "gpu"),
        (dict(mem="9"), TypeError, "mem"),
        (dict(running=-1), ValueError, "running"),
        (dict(healthy=1), TypeError, "healthy"),
        (dict(languages=["zh", ""]), ValueError, "languages"),
        (dict(services=["asr", 3]), TypeError, "services"),
        (dict(max_concurrency=0), ValueError, "max_concurrency"),
    ],
)
def test_bad_heartbeat_changes_nothing(make_scheduler, kwargs, exc, word):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    sched.heartbeat("a", running=1, cpu=10.0, gpu=20.0, mem=30.0)
    before = (sched.snapshot.version, sched.node("a"))
    with pytest.raises(exc, match=word):
        sched.heartbeat("a", **{"running": 2, "gpu": 11.0, **kwargs})
    assert (sched.snapshot.version, sched.node("a")) == before


def test_too_many_service_names_is_rejected_whole(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], services=[f"s{i}" for i in range(60)])
    with pytest.raises(ValueError, match="64"):
        sched.register_node("b", ["zh", "en"], services=[f"x{i}" for i in range(10)])
    assert sched.stats()["nodes_total"] == 1
    assert len(sched._mgmt.service_bits) == 60


@pytest.mark.parametrize(
    "call,exc,word",
    [
        (lambda s: s.dispatch("", "zh", "en"), ValueError, "session_id"),
        (lambda s: s.dispatch(None, "zh", "en"), TypeError, "session_id"),
        (lambda s: s.dispatch("s", "zh", "en", job_id=""), ValueError, "job_id"),
        (lambda s: s.dispatch("s", "zh", "en", exclude="a"), TypeError, "exclude"),
        (lambda s: s.dispatch("s", "zh", "en", services=["ASR", "no good"]), ValueError, "services"),
        (lambda s: s.dispatch("s", "zh", "en", tenant=5), TypeError, "tenant"),
        (lambda s: s.release(None), TypeError, "job_id"),
    ],
)
def test_bad_dispatch_arguments_change_nothing(make_scheduler, call, exc, word):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    with pytest.raises(exc, match=word):
        call(sched)
    assert sched.reservations.count() == 0 and len(sched._sessions) == 0


@pytest.mark.parametrize(
    "kwargs,word",
    [(dict(heartbeat_timeout=0), "heartbeat_timeout"), (dict(reservation_ttl=-1), "reservation_ttl"),
     (dict(resource_threshold=0), "resource_threshold"), (dict(max_pools=0), "max_pools"),
     (dict(session_ttl=float("nan")), "session_ttl"), (dict(tenant_pools={"t": -1}), "tenant_pools"),
     (dict(pools="sometimes"), "pools"), (dict(kernel="gpu"), "kernel")],
)
def test_bad_scheduler_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        pysched.Scheduler(**kwargs)


# ---------------------------------------------------------------- scoring and spreading
def test_least_loaded_then_lowest_gpu(make_scheduler):
    sched = make_scheduler()
    for name in ("a", "b", "c"):
        sched.register_node(name, ["zh", "en"], max_concurrency=4)
    sched.heartbeat("a", running=2)
    sched.heartbeat("b", gpu=50.0)
    sched.heartbeat("c", gpu=10.0)
    assert sched.dispatch("s", "zh", "en").node_id == "c"  # b and c at 0 load; c has less gpu


def test_load_is_relative_to_max_concurrency(make_scheduler):
    sched = make_scheduler()
    sched.register_node("big", ["zh", "en"], max_concurrency=8)
    sched.register_node("small", ["zh", "en"], max_concurrency=2)
    sched.heartbeat("big", running=3)  # 3/8 < 1/2
    sched.heartbeat("small", running=1)
    assert sched.dispatch("s", "zh", "en").node_id == "big"


def test_burst_spreads_over_idle_nodes(make_scheduler):
    sched = make_scheduler()
    for i in range(6):
        sched.register_node(f"n{i}", ["zh", "en"], max_concurrency=3)
    first = [sched.dispatch(f"s{i}", "zh", "en").node_id for i in range(6)]
    assert sorted(first) == [f"n{i}" for i in range(6)]
    counts = [node_count(sched, f"n{i}") for i in range(6)]
    assert counts == [1] * 6


def test_same_seed_same_decisions(make_scheduler, clock):
    def run(seed):
        sched = make_scheduler(seed=seed)
        for i in range(10):
            sched.register_node(f"n{i}", ["zh", "en"], max_concurrency=5)
        return [sched.dispatch(f"s{i % 4}", "zh", "en").node_id for i in range(30)]

    assert run(7) == run(7)
    assert run(7) != run(8)


# ---------------------------------------------------------------- sessions
def test_session_binds_its_pool_and_keeps_it(make_scheduler):
    sched = make_scheduler()
    sched.register_node("p", ["zh", "en"], max_concurrency=10)
    sched.register_node("t", ["de", "en", "zh"], max_concurrency=10)
    sched.heartbeat("p", running=9)  # en-zh is nearly full: the new session binds the freer pool
    a = sched.dispatch("s", "zh", "en")
    tri = {p.name: p.pool_id for p in sched.pools()}["de-en-zh"]
    assert a.pool_id == tri
    sched.heartbeat("p", running=0)  # now en-zh is emptier, but the session stays bound
    assert {sched.dispatch("s", "zh", "en").pool_id for _ in range(5)} == {tri}
    assert sched.dispatch("fresh", "zh", "en").pool_id != tri


def test_session_rebinds_on_pair_change_and_when_its_pool_has_no_eligible_node(make_scheduler):
    sched = make_scheduler()
    sched.register_node("zh", ["zh", "en"])
    sched.register_node("tri", ["de", "en", "zh"])
    sched.register_node("ja", ["ja", "en"])
    ids = {p.name: p.pool_id for p in sched.pools()}

    def pool_of(src, tgt):
        a = sched.dispatch("s", src, tgt)
        sched.release(a.job_id)  # keep every pool equally free: only the binding decides
        return a.pool_id

    assert pool_of("zh", "en") == ids["en-zh"]  # equal free capacity: the most specific pool
    assert pool_of("ja", "en") == ids["en-ja"]  # pair changed
    assert pool_of("zh", "en") == ids["en-zh"]
    sched.drain_node("zh")
    assert pool_of("zh", "en") == ids["de-en-zh"]  # fell over and rebound
    sched.resume_node("zh")
    assert pool_of("zh", "en") == ids["de-en-zh"]  # stays on its new pool


def test_tenant_pool_preferred_for_a_new_binding(make_scheduler):
    sched = make_scheduler(tenant_pools={"acme": 2})
    sched.register_node("a", ["zh", "en"])
    sched.register_node("b", ["de", "en", "zh"])
    assert sched.dispatch("s1", "zh", "en", tenant="acme").pool_id == 2
    assert sched.dispatch("s2", "zh", "en").pool_id == 1
    # the tenant's pool does not serve ja: falls back to the usual choice
    sched.register_node("c", ["ja", "en"])
    assert sched.dispatch("s3", "ja", "en", tenant="acme").pool_id == 3


def test_idle_sessions_are_forgotten(make_scheduler, clock):
    sched = make_scheduler(session_ttl=60.0)
    sched.register_node("a", ["zh", "en"], max_concurrency=10)
    for i in range(5):
        sched.dispatch(f"s{i}", "zh", "en")
    clock.advance(30)
    sched.dispatch("s0", "zh", "en")
    clock.advance(40)
    assert sched.sweep_sessions() == 4
    assert sched.stats()["sessions"] == 1
    assert sched.close_session("s0") is True and sched.close_session("s0") is False


def test_sessions_sweep_by_themselves(make_scheduler, clock):
    sched = make_scheduler(session_ttl=8.0)
    sched.register_node("a", ["zh", "en"], max_concurrency=100)
    for i in range(5):
        sched.dispatch(f"s{i}", "zh", "en")
    clock.advance(20)
    sched.dispatch("s0", "zh", "en")  # the periodic sweep runs from dispatch
    assert sched.stats()["sessions"] == 1


def test_two_dispatches_of_one_session_decide_its_binding_one_at_a_time(make_scheduler):
    """The Python path records its choice as the session's binding, under the session's lock, before it
    reserves: a second job of the session follows that binding instead of deciding on its own (here it
    would take the freer pool), even while the first one's reservation has let go of the GIL (as a Redis
    round trip does)."""
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], max_concurrency=4)
    sched.register_node("b", ["de", "en", "zh"], max_concurrency=4)
    sched.heartbeat("a", running=2)  # b is the freer node: a job deciding alone would take it
    out: dict[str, object] = {}

    def job(name: str, **kwargs) -> None:
        try:
            out[name] = sched.dispatch("s", "zh", "en", **kwargs)
        except BaseException as e:  # reported by the assertions below
            out[name] = e

    # the first job goes by the Python path (it excludes b) and stops in its reservation until let go
    first = threading.Thread(target=job, args=("first",), kwargs={"exclude": ["b"]})
    second = threading.Thread(target=job, args=("second",))
    reservations = sched._reservations
    reserve_one = reservations.reserve_one
    inside, go = threading.Event(), threading.Event()

    def held_reserve_one(*args, **kwargs):
        if threading.current_thread() is first and not inside.is_set():
            inside.set()
            assert go.wait(30), "the test never let the first reservation go on"
        return reserve_one(*args, **kwargs)

    reservations.reserve_one = held_reserve_one
    first.start()
    assert inside.wait(30), "the first dispatch never reached its reservation"
    second.start()
    second.join(0.2)  # room for the second to run ahead, were it not held back (nothing is asserted on it)
    go.set()
    first.join(30)
    second.join(30)
    assert not first.is_alive() and not second.is_alive()
    a, b = out["first"], out["second"]
    assert isinstance(a, pysched.Assignment) and isinstance(b, pysched.Assignment), out
    assert a.node_id == "a"
    assert b.pool_id == a.pool_id  # bound by the first job, kept by the second
    assert sched.dispatch("s", "zh", "en").pool_id == a.pool_id
    assert sched.reservations.count() == 3


def _bound_to_the_freer_pool(make_scheduler):
    """A scheduler with two pools serving zh-en, a's (busier) and b's, and session "s" bound to b's.

    Returns the scheduler, the pool ids by name and the session's state.
    """
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], max_concurrency=8)
    sched.register_node("b", ["de", "en", "zh"], max_concurrency=8)
    sched.heartbeat("a", running=2)
    sched.release(sched.dispatch("s", "zh", "en").job_id)  # bound to b's pool, the freer one
    pools = {p.name: p.pool_id for p in sched.pools()}
    assert sched._session_map["s"].binding == (("zh", "en"), pools["de-en-zh"])
    return sched, pools, sched._session_map["s"]


def test_the_one_call_dispatch_leaves_a_session_being_decided_to_the_python_path(make_scheduler):
    """While the Python path decides a session's binding (its lock held, ``deciding`` set), a plain dispatch
    of the session does not decide on its own: it waits for the lock, then follows that decision."""
    sched, pools, state = _bound_to_the_freer_pool(make_scheduler)
    out: list[object] = []
    worker = threading.Thread(target=lambda: out.append(sched.dispatch("s", "zh", "en")))
    assert state.lock.acquire(timeout=30)
    state.deciding = True  # what the Python path does while it decides
    try:
        worker.start()
        worker.join(0.2)  # room for the worker to run ahead, were it not held back (nothing is asserted on it)
        state.binding = (("zh", "en"), pools["en-zh"])  # the decision: a's pool
    finally:
        state.deciding = False
        state.lock.release()
    worker.join(30)
    assert not worker.is_alive()
    assert out[0].node_id == "a" and out[0].pool_id == pools["en-zh"]


@pytest.mark.parametrize("how", ["dispatch_batch", "dispatch_many"])
@pytest.mark.parametrize("first", [True, False], ids=["first-job", "later-job"])
def test_a_batch_leaves_a_session_being_decided_to_the_python_path(make_scheduler, first, how):
    """While the Python path decides a session's binding (its lock held, ``deciding`` set), a batch does not
    read that binding: it waits for the decision, then follows it."""
    sched, pools, state = _bound_to_the_freer_pool(make_scheduler)
    sids = ["s", "t", "s"] if first else ["t", "s", "s"]
    out: list[object] = []
    if how == "dispatch_batch":
        worker = threading.Thread(target=lambda: out.append(sched.dispatch_batch(sids, "zh", "en").node_ids()))
    else:
        worker = threading.Thread(target=lambda: out.append(
            [a.node_id for a in sched.dispatch_many([(sid, "zh", "en") for sid in sids])]))
    assert state.lock.acquire(timeout=30)
    state.deciding = True  # what the Python path does while it decides
    try:
        worker.start()
        worker.join(0.2)  # room for the batch to run ahead, were it not held back (nothing is asserted on it)
        state.binding = (("zh", "en"), pools["en-zh"])  # the decision: a's pool, the busier one
    finally:
        state.deciding = False
        state.lock.release()
    worker.join(30)
    assert not worker.is_alive()
    node_ids = out[0]
    assert None not in node_ids
    assert [node for node, sid in zip(node_ids, sids, strict=True) if sid == "s"] == ["a", "a"]
    assert state.binding == (("zh", "en"), pools["en-zh"]) and not state.held
    assert sched._session_map["t"].held is False


@pytest.mark.parametrize("path", ["python", "one-call"])
def test_a_dispatch_waits_for_a_batch_holding_the_session(make_scheduler, path):
    """While a batch holds a session (it has read its binding and not yet written it back), neither the
    Python path nor the one-call dispatch decides its binding: both wait, then follow the batch's."""
    sched, pools, state = _bound_to_the_freer_pool(make_scheduler)
    kwargs = {"exclude": []} if path == "python" else {}
    out: list[object] = []
    worker = threading.Thread(target=lambda: out.append(sched.dispatch("s", "zh", "en", **kwargs)))
    state.held = True  # what a batch's pass does from reading the binding to writing it back
    try:
        worker.start()
        worker.join(0.2)  # room for the dispatch to run ahead, were it not held back (nothing is asserted on it)
        state.binding = (("zh", "en"), pools["en-zh"])  # the batch's decision: a's pool, the busier one
    finally:
        state.held = False
    worker.join(30)
    assert not worker.is_alive()
    assert out[0].node_id == "a" and out[0].pool_id == pools["en-zh"]
    assert state.binding == (("zh", "en"), pools["en-zh"])


class _Trap:
    """Garbage in a reference cycle whose finalizer calls ``fire``: the collection that finds it runs Python
    code in the middle of whatever allocation started it."""

    def __init__(self, fire):
        self.fire = fire
        self.me = self

    def __del__(self):
        fire, self.fire = self.fire, None
        if fire is not None:
            fire()


def test_a_finalizer_run_inside_a_dispatch_cannot_split_a_session(make_scheduler, kernel_name):
    """A collection started by an allocation inside ``dispatch`` may run a finalizer, and a finalizer may let
    another thread run (here it waits for one). That thread's dispatch of the same new session decides its
    binding; the interrupted dispatch must then follow that decision, not write its own over it, so every
    job of the session is in one pool.

    The interrupted call prefers a's pool, the other thread b's (it first makes a busier). Where exactly the
    collection comes (or whether it does: Python 3.12 and later run collections between bytecodes, never
    inside a compiled call's allocation) decides only whether the race happens, never the assertions.
    """
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], max_concurrency=8)
    sched.register_node("b", ["de", "en", "zh"], max_concurrency=8)
    pools = {p.name: p.pool_id for p in sched.pools()}
    rounds = 8 if kernel_name == "compiled" else 2
    # the twin decides under locks: the other thread waits for them, and so would this finalizer, for the bound
    wait = 30.0 if kernel_name == "compiled" else 0.3
    for i in range(rounds):
        sid = f"new-{i}"
        sched.heartbeat("a", running=0)
        sched.heartbeat("b", running=2)  # the interrupted call prefers a's pool
        other: list[object] = []

        def race(sid=sid, other=other):
            sched.heartbeat("a", running=4)  # now b's pool is the freer one
            other.append(sched.dispatch(sid, "zh", "en"))

        def fire(race=race):
            worker = threading.Thread(target=race)
            worker.start()
            worker.join(wait)

        thresholds = gc.get_threshold()
        gc.collect()
        gc.set_threshold(1)  # the next allocation of a tracked object collects
        try:
            _Trap(fire)
            first = sched.dispatch(sid, "zh", "en")
        finally:
            gc.set_threshold(*thresholds)
        # no collection came inside dispatch (its allocations may all fall before the count's next step): the
        # trap fires now, and the other thread's dispatch comes after this one
        gc.collect()
        deadline = time.monotonic() + 30
        while not other and time.monotonic() < deadline:
            time.sleep(0.01)
        assert other, "the other thread's dispatch did not return"
        second = other[0]
        binding = sched._session_map[sid].binding
        assert first.pool_id == second.pool_id == binding[1], (i, first, second, binding, pools)
        sched.release(first.job_id)
        sched.release(second.job_id)
    assert sched.reservations.count() == 0


def test_try_hold_holds_every_session_or_none(make_scheduler, clock):
    """The quick hold of a batch's sessions (``Dispatcher.try_hold``) takes all of them or, when another call
    is deciding one, none: nothing held, no state left behind; ``let_go`` drops the states it made unbound."""
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], max_concurrency=4)
    sched.dispatch("old", "zh", "en")
    old = sched._session_map["old"]
    assert old.lock.acquire(timeout=30)
    old.deciding = True  # as the Python path, deciding its binding
    try:
        assert sched._fast.try_hold(["new", "old"], clock()) is None
    finally:
        old.deciding = False
        old.lock.release()
    assert sorted(sched._session_map) == ["old"] and not old.held
    held, created = sched._fast.try_hold(["new", "old"], clock())
    assert held == {"new": sched._session_map["new"], "old": old} and all(s.held for s in held.values())
    assert created == [("new", held["new"])]
    assert sched._fast.try_hold(["old"], clock()) is None  # held already
    sched._fast.let_go(held, created)
    assert sorted(sched._session_map) == ["old"] and not old.held and not held["new"].held


def test_a_scheduler_has_few_enough_attributes_for_the_fast_layout(kernel_name):
    """CPython 3.11 keeps an instance's attributes in its fast (shared-key) layout only while it has at most
    29 of them; with 30, every attribute read of the Python path is slower (measured: 3-4 % of a dispatch
    with ``exclude``). Not a timing test: it counts them, for the in-process and a custom backend."""
    from pysched._impl import resolve
    from pysched.reservations import LocalReservations

    class Custom(LocalReservations):
        pass

    for sched in (pysched.Scheduler(kernel=kernel_name),
                  pysched.Scheduler(kernel=kernel_name, reservations=Custom(core=resolve(kernel_name)))):
        assert len(vars(sched)) <= 29, sorted(vars(sched))


def test_a_sweep_skips_a_session_whose_lock_is_held_without_waiting(make_scheduler, clock):
    sched = make_scheduler(session_ttl=10.0)
    sched.register_node("a", ["zh", "en"], max_concurrency=4)
    sched.dispatch("s", "zh", "en")
    clock.advance(60)
    state = sched._session_map["s"]
    swept: list[int] = []
    sweeper = threading.Thread(target=lambda: swept.append(sched.sweep_sessions()))
    assert state.lock.acquire(timeout=30)  # as a dispatch deciding its binding holds it
    try:
        sweeper.start()
        sweeper.join(30)  # it does not wait for the lock: a session in use is not idle
        assert not sweeper.is_alive() and swept == [0]
    finally:
        state.lock.release()
    assert sched.sweep_sessions() == 1


def test_a_dispatch_waiting_for_a_closed_session_decides_on_a_fresh_one(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], max_concurrency=4)
    sched.dispatch("s", "zh", "en")
    state = sched._session_map["s"]
    out: dict[str, object] = {}
    assert state.lock.acquire(timeout=30)  # another dispatch is deciding the session's binding
    try:
        worker = threading.Thread(target=lambda: out.setdefault("job", sched.dispatch("s", "zh", "en", exclude=["x"])))
        worker.start()
        worker.join(0.2)  # room for the worker to reach the session's lock (nothing is asserted on it)
        assert sched.close_session("s") is True  # the state leaves the table meanwhile
    finally:
        state.lock.release()
    worker.join(30)
    assert not worker.is_alive()
    assert out["job"].node_id == "a"
    # the worker found its state gone once it had the lock, and bound a fresh one: the table has it
    assert sched.stats()["sessions"] == 1 and sched._session_map["s"] is not state
    assert sched._session_map["s"].binding == (("zh", "en"), out["job"].pool_id)


def test_a_failed_dispatch_takes_back_the_binding_it_recorded(make_scheduler):
    """The Python path records its choice as the binding before reserving; when the reservation is
    refused and nothing else is eligible, the call fails and the session is bound as it was."""
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], max_concurrency=4)
    sched.register_node("b", ["de", "en", "zh"], max_concurrency=4)
    pools = {p.name: p.pool_id for p in sched.pools()}
    sched.release(sched.dispatch("s", "zh", "en", exclude=["b"]).job_id)
    state = sched._session_map["s"]
    before = state.binding
    assert before == (("zh", "en"), pools["en-zh"])
    reservations = sched._reservations
    reserve_one = reservations.reserve_one
    seen: list[object] = []

    def refusing(job_id, found, *args, **kwargs):
        seen.append(state.binding)  # what the session is bound to while the reservation is under way
        return REFUSED_FULL  # the final word: b is full after all

    reservations.reserve_one = refusing
    try:
        with pytest.raises(pysched.NoNodeAvailable):
            sched.dispatch("s", "zh", "en", exclude=["a"])
    finally:
        reservations.reserve_one = reserve_one
    assert seen == [(("zh", "en"), pools["de-en-zh"])]  # recorded before the reservation
    assert state.binding is before and sched._session_map["s"] is state
    assert sched.dispatch("s", "zh", "en").pool_id == pools["en-zh"]


def test_a_failed_dispatch_of_a_new_session_leaves_no_session(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], max_concurrency=1)
    sched.dispatch("s", "zh", "en")
    with pytest.raises(pysched.NoNodeAvailable):
        sched.dispatch("new", "zh", "en")  # the one-call path
    with pytest.raises(pysched.NoNodeAvailable):
        sched.dispatch("new", "zh", "en", exclude=["a"])  # the Python path, which holds a state while deciding
    with pytest.raises(pysched.NoPoolForLanguagePair):
        sched.dispatch("new", "zh", "de")
    assert sched.stats()["sessions"] == 1
    assert sched.close_session("new") is False


# ---------------------------------------------------------------- reservations
def test_job_id_retry_returns_the_same_assignment(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], max_concurrency=1)
    sched.register_node("b", ["zh", "en"], max_concurrency=1)
    first = sched.dispatch("s", "zh", "en", job_id="job-1")
    again = sched.dispatch("s", "zh", "en", job_id="job-1")
    assert again == first and sched.reservations.count() == 1
    sched.dispatch("s", "zh", "en")  # both nodes now full
    assert sched.dispatch("s", "zh", "en", job_id="job-1") == first  # a retry still answers


def test_uncommitted_reservations_expire_committed_do_not(make_scheduler, clock):
    sched = make_scheduler(reservation_ttl=90.0)
    sched.register_node("a", ["zh", "en"], max_concurrency=2)
    j1 = sched.dispatch("s", "zh", "en").job_id
    j2 = sched.dispatch("s", "zh", "en").job_id
    sched.commit(j2)
    with pytest.raises(pysched.NoNodeAvailable):
        sched.dispatch("s", "zh", "en")
    clock.advance(90.5)
    sched.heartbeat("a")
    a3 = sched.dispatch("s", "zh", "en")  # j1 expired: its capacity came back
    assert sched.reservations.get(j1) is None and sched.reservations.get(j2) is not None
    assert node_count(sched, "a") == 2
    assert sched.release(j1) is False
    assert sched.release(j2) is True and sched.release(j2) is False
    assert sched.release(a3.job_id) is True
    assert node_count(sched, "a") == 0 and int(np.sum(sched.snapshot.inflight)) == 0


def test_commit_unknown_job(make_scheduler):
    sched = make_scheduler()
    with pytest.raises(pysched.UnknownJob):
        sched.commit("nope")
    assert isinstance(pysched.UnknownJob("x"), KeyError)


def test_removed_node_reservations_can_still_be_released(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], max_concurrency=2)
    job = sched.dispatch("s", "zh", "en").job_id
    sched.remove_node("a")
    assert sched.release(job) is True
    sched.register_node("a", ["zh", "en"], max_concurrency=2)
    assert node_count(sched, "a") == 0


class RefuseFirst(LocalReservations):
    """Refuses each node the first time it is offered (as another process's load would)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = set()
        self.offered = []

    def reserve_one(self, job_id, candidate, pool_id, session_id, now, pair=None):
        if candidate[1] not in self.seen:
            self.seen.add(candidate[1])
            self.offered.append(candidate[1])
            return REFUSED_FULL
        return super().reserve_one(job_id, candidate, pool_id, session_id, now, pair)


def test_refused_reservation_falls_back_to_next_candidate_then_pool(make_scheduler, kernel_name):
    from pysched._impl import resolve

    backend = RefuseFirst(core=resolve(kernel_name))
    sched = make_scheduler(reservations=backend)
    sched.register_node("a", ["zh", "en"])
    sched.register_node("b", ["zh", "en"])
    sched.register_node("c", ["de", "en", "zh"])
    with pytest.raises(pysched.NoNodeAvailable) as info:
        sched.dispatch("s", "zh", "en")
    assert sorted(backend.offered) == ["a", "b", "c"]  # every candidate of every pool was tried
    assert info.value.breakdown == {"full": 3}
    a = sched.dispatch("s", "zh", "en")  # now accepted
    assert a.node_id in {"a", "b"}


def test_stats_shape(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    sched.dispatch("s", "zh", "en")
    st = sched.stats()
    assert st["nodes"]["ready"] == 1
    assert st["pools"] == {1: {"name": "en-zh", "members": 1, "capacity": 4, "inflight": 1}}
    assert st["sessions"] == 1 and st["reservations"] == 1 and st["dispatch"]["ok"] == 1
    assert st["jobs"] == {"held": 1, "committed": 0, "expired": 0}
    assert st["backend"]["name"] == "local" and st["backend"]["available"] is True
    assert st["snapshot_version"] == sched.snapshot.version
    assert set(st["dispatch"]) >= {"ok", "no_pool", "no_nodes", "full", "offline", "overloaded"}


def test_snapshot_is_immutable_and_versioned(make_scheduler):
    sched = make_scheduler()
    s0 = sched.snapshot
    sched.register_node("a", ["zh", "en"])
    s1 = sched.snapshot
    assert s1.version == s0.version + 1 and s1 is not s0
    assert s1.members(1) == ("a",) and s1.slot("a") == 0 and s1.node_id(0) == "a"
    for arr in (s1.nodes, s1.loads, s1.inflight, s1.pool_offsets, s1.pool_members):
        assert not arr.flags.writeable
    assert s0.slot("a") is None  # the old snapshot never sees the new node
