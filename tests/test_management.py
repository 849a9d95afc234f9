"""The management side: pool placement, node lifecycle, bad input. Both kernels (``make_scheduler``)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import pysched
from pysched import PoolConfig
from pysched._impl import resolve
from pysched.pools import auto_pool_name
from pysched.reservations import LocalReservations

ALL = ("asr", "nmt", "tts", "semantic")


class FakeClock:
    """A manual clock (the ``clock`` fixture's kind) for tests that make several schedulers."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# a scheduler factory on the fake clock (the make_scheduler fixture)
MakeScheduler = Callable[..., pysched.Scheduler]
# an event's fields: register_node's or heartbeat's keywords, or {"offline_for": seconds}
Fields = dict[str, Any]


class Events:
    """A listener that records every node event."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, Fields]] = []

    def __call__(self, event: str, node_id: str, fields: Fields) -> None:
        self.seen.append((event, node_id, fields))

    def of(self, kind: str) -> list[tuple[str, Fields]]:
        return [(node_id, fields) for event, node_id, fields in self.seen if event == kind]


def members(sched: pysched.Scheduler) -> dict[str, tuple[str, ...]]:
    return {p.name: p.node_ids for p in sched.pools()}


# ====================================================================== item 3: placement
def test_heartbeat_adding_a_required_service_joins_the_manual_pool(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler(pools=[PoolConfig(10, "tts", {"zh", "en"}, {"asr", "tts"})])
    sched.register_node("a", ["zh", "en"], services=("asr", "nmt"))
    assert members(sched) == {"tts": ()} and sched.stats()["unpooled"] == ["a"]
    sched.heartbeat("a", services=("asr", "nmt", "tts"))
    assert members(sched) == {"tts": ("a",)}
    assert sched.stats()["unpooled"] == [] and sched.node("a")["pool_ids"] == (10,)
    assert sched.dispatch("s", "zh", "en", services=("asr", "tts")).node_id == "a"


def test_heartbeat_removing_a_required_service_leaves_the_manual_pool(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler(pools=[PoolConfig(10, "tts", {"zh", "en"}, {"tts"}),
                                  PoolConfig(11, "any", {"zh", "en"})])
    sched.register_node("a", ["zh", "en"], services=ALL)
    assert members(sched) == {"tts": ("a",), "any": ("a",)}
    sched.heartbeat("a", services=("asr", "nmt"))
    assert members(sched) == {"tts": (), "any": ("a",)}
    assert sched.node("a")["pool_ids"] == (11,)
    assert sched.explain("zh", "en", services=("asr",)).pools == (10, 11)
    sched.heartbeat("a", services=("asr",), languages=["zh", "de"])  # neither pool fits now
    assert members(sched) == {"tts": (), "any": ()} and sched.stats()["unpooled"] == ["a"]


def test_waiting_node_joins_when_a_heartbeat_opens_its_sets_pool(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler(max_pools=1)
    sched.register_node("a", ["de", "fr"])
    sched.register_node("b", ["en", "zh"])
    assert sched.stats()["unpooled"] == ["b"]
    sched.heartbeat("a", languages=["en", "zh"])  # de-fr retires, en-zh opens
    assert members(sched) == {"en-zh": ("a", "b")}
    assert sched.stats()["unpooled"] == [] and sched.node("b")["pool_ids"] == (sched.pools()[0].pool_id,)
    assert sched.explain("zh", "en").nodes == {"a": "ok", "b": "ok"}


def test_waiting_node_joins_when_a_reregistration_opens_its_sets_pool(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler(max_pools=1)
    sched.register_node("a", ["de", "fr"])
    sched.register_node("b", ["en", "zh"])
    sched.register_node("a", ["en", "zh"])
    assert members(sched) == {"en-zh": ("a", "b")} and sched.stats()["unpooled"] == []


def test_room_goes_to_the_longest_waiting_set_and_all_its_nodes(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler(max_pools=1)
    for name, langs in (("a", ["de", "fr"]), ("b", ["en", "zh"]), ("c", ["ja", "ko"]), ("d", ["zh", "en"])):
        sched.register_node(name, langs)
    assert sched.stats()["unpooled"] == ["b", "c", "d"]
    sched.remove_node("a")
    assert members(sched) == {"en-zh": ("b", "d")} and sched.stats()["unpooled"] == ["c"]
    assert sched.explain("ja", "ko").nodes == {"c": "no_pool"}


def test_status_changes_keep_pool_membership(make_scheduler: MakeScheduler, clock: FakeClock) -> None:
    sched = make_scheduler(heartbeat_timeout=10.0)
    sched.register_node("a", ["zh", "en"])
    sched.register_node("b", ["zh", "en"])
    sched.drain_node("a")
    sched.mark_offline("b")
    clock.advance(11)  # both aged out as well
    assert members(sched) == {"en-zh": ("a", "b")}
    sched.resume_node("a")
    assert members(sched) == {"en-zh": ("a", "b")}


# ---------------------------------------------------------------- the placement rules, by property
NODES = ("a", "b", "c")
LANGS = ("de", "en", "zh")
SERVICES = ("asr", "nmt", "tts")

lang_sets = st.frozensets(st.sampled_from(LANGS), min_size=2, max_size=3)
service_sets = st.frozensets(st.sampled_from(SERVICES), max_size=3)
node_ids = st.sampled_from(NODES)
configs = st.lists(st.tuples(lang_sets, service_sets), min_size=1, max_size=3)
register = st.tuples(st.just("register"), node_ids, lang_sets, service_sets, st.booleans())
services_change = st.tuples(st.just("services"), node_ids, service_sets)
operations = st.one_of(
    register,
    register,
    st.tuples(st.just("languages"), node_ids, lang_sets),
    services_change,
    services_change,
    st.tuples(st.just("both"), node_ids, lang_sets, service_sets),
    st.tuples(st.sampled_from(["remove", "drain", "offline", "resume", "healthy"]), node_ids),
    st.tuples(st.just("age"), st.sampled_from([1.0, 30.0, 200.0])),
    st.tuples(st.just("manual"), configs),
    st.tuples(st.just("auto")),
)


# node id -> [languages, services], as the test expects the scheduler to have them
Model = dict[str, list[frozenset[str]]]


def _apply(sched: pysched.Scheduler, clock: FakeClock, model: Model, forgotten: Events, op: tuple[Any, ...]) -> None:
    """Apply one operation (one of ``operations``: its fields vary by kind) to the scheduler and the model."""
    kind = op[0]

    def forget() -> None:  # whoever forgot a node (this call, or a periodic check inside another)
        for node_id, _ in forgotten.of("forget"):
            model.pop(node_id, None)
        forgotten.seen.clear()

    try:
        if kind == "register":
            sched.register_node(op[1], sorted(op[2]), services=sorted(op[3]), ready=op[4])
            model[op[1]] = [op[2], op[3]]
        elif kind == "languages":
            sched.heartbeat(op[1], languages=sorted(op[2]))
            model[op[1]][0] = op[2]
        elif kind == "services":
            sched.heartbeat(op[1], services=sorted(op[2]))
            model[op[1]][1] = op[2]
        elif kind == "both":
            sched.heartbeat(op[1], languages=sorted(op[2]), services=sorted(op[3]))
            model[op[1]] = [op[2], op[3]]
        elif kind == "remove":
            sched.remove_node(op[1])
            del model[op[1]]
        elif kind == "drain":
            sched.drain_node(op[1])
        elif kind == "offline":
            sched.mark_offline(op[1])
        elif kind == "resume":
            sched.resume_node(op[1])
        elif kind == "healthy":
            sched.heartbeat(op[1], healthy=True)
        elif kind == "age":
            clock.advance(op[1])
            sched.forget_offline_nodes()
        elif kind == "manual":
            cfgs = [PoolConfig(100 + i, f"m{i}", langs, servs) for i, (langs, servs) in enumerate(op[1])]
            sched.set_pools(cfgs[: sched.max_pools])
        elif kind == "auto":
            sched.set_pools("auto")
    except pysched.UnknownNode as exc:
        forget()
        assert exc.node_id not in model  # only ever for a node the model does not have either
    forget()


def _check_placement(sched: pysched.Scheduler, model: Model, set_ids: dict[frozenset[str], int]) -> None:
    """Every node is in exactly the pools the rules say; the unpooled list is exactly right."""
    pools = sched.pools()
    stats = sched.stats()
    snap = sched.snapshot
    unpooled = stats["unpooled"]
    assert {n for n in NODES if snap.slot(n) is not None} == set(model) and stats["nodes_total"] == len(model)
    assert sorted(stats["unpooled"]) == sorted(n for n in model if not sched.node(n)["pool_ids"])
    assert [n for n, _ in snap.unpooled] == unpooled and len(set(unpooled)) == len(unpooled)
    by_id = {p.pool_id: p for p in pools}
    # the snapshot dispatch reads agrees with management
    assert set(snap.pool_ids) == set(by_id)
    for p in pools:
        assert snap.members(p.pool_id) == p.node_ids
    for node_id in model:
        held = sched.node(node_id)["pool_ids"]
        assert tuple(sorted(held)) == tuple(sorted(set(held)))
        assert sorted(held) == sorted(p.pool_id for p in pools if node_id in p.node_ids)
    if stats["mode"] == "manual":
        for p in pools:
            expected = {n for n, (langs, servs) in model.items()
                        if p.languages <= langs and p.required_services <= servs}
            assert set(p.node_ids) == expected, p
        return
    # auto: one pool per language set, live while it has members, at most max_pools of them
    assert len(pools) <= sched.max_pools
    live_sets = {p.languages: p for p in pools}
    assert len(live_sets) == len(pools)
    for p in pools:
        assert p.auto and p.node_ids and p.name == auto_pool_name(p.languages)
        assert set(p.node_ids) == {n for n, (langs, _) in model.items() if langs == p.languages}
        assert set_ids.setdefault(p.languages, p.pool_id) == p.pool_id  # a set keeps its id for life
    assert len(set(set_ids.values())) == len(set_ids)
    for node_id in unpooled:
        langs = model[node_id][0]
        # waiting only while there is no room and no pool of its own set
        assert langs not in live_sets and len(pools) == sched.max_pools
        first, second = sorted(langs)[:2]
        assert sched.explain(first, second).nodes[node_id] == "no_pool"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operations, min_size=5, max_size=40), max_pools=st.sampled_from([1, 1, 2, 3]))
# the two reproductions of issue 10 item 3, always run besides the random ones
@example(ops=[("register", "a", frozenset({"de", "en"}), frozenset(SERVICES), True),
              ("register", "b", frozenset({"en", "zh"}), frozenset(SERVICES), True),
              ("languages", "a", frozenset({"en", "zh"})),
              ("register", "a", frozenset({"de", "zh"}), frozenset(SERVICES), True),
              ("remove", "a")], max_pools=1)
@example(ops=[("manual", [(frozenset({"de", "en"}), frozenset({"tts"}))]),
              ("register", "a", frozenset({"de", "en"}), frozenset({"asr"}), True),
              ("services", "a", frozenset({"asr", "tts"})),
              ("services", "a", frozenset({"nmt"}))], max_pools=1)
def test_placement_follows_every_change(kernel_name: str, ops: list[tuple[Any, ...]], max_pools: int) -> None:
    clock = FakeClock()
    sched = pysched.Scheduler(clock=clock, seed=1, kernel=kernel_name, max_pools=max_pools,
                              heartbeat_timeout=45.0, forget_after=100.0)
    model: Model = {}
    set_ids: dict[frozenset[str], int] = {}
    forgotten = Events()
    sched.add_listener(forgotten)
    try:
        for op in ops:
            _apply(sched, clock, model, forgotten, op)
            _check_placement(sched, model, set_ids)
    finally:
        sched.close()


# ====================================================================== item 13: resume
def test_resume_brings_back_a_node_offline_by_heartbeat_age(make_scheduler: MakeScheduler, clock: FakeClock) -> None:
    sched = make_scheduler(heartbeat_timeout=10.0)
    events = Events()
    sched.add_listener(events)
    sched.register_node("a", ["zh", "en"])
    clock.advance(11)
    assert sched.node("a")["status"] == "offline"
    assert sched.explain("zh", "en").nodes == {"a": "offline"}
    sched.resume_node("a")  # a sign of life, as for a node marked offline
    assert sched.node("a")["status"] == "ready" and sched.node("a")["last_heartbeat"] == clock.now
    assert sched.explain("zh", "en").nodes == {"a": "ok"}
    assert sched.dispatch("s", "zh", "en").node_id == "a"
    assert events.of("resume") == [("a", {})]
    clock.advance(11)  # and it ages out again like any node that stays silent
    assert sched.node("a")["status"] == "offline"


def test_resume_of_a_marked_offline_node_that_also_aged_out(make_scheduler: MakeScheduler, clock: FakeClock) -> None:
    sched = make_scheduler(heartbeat_timeout=10.0)
    sched.register_node("a", ["zh", "en"])
    sched.mark_offline("a")
    clock.advance(60)
    sched.resume_node("a")
    assert sched.explain("zh", "en").nodes == {"a": "ok"}


# ====================================================================== item 14: unhashable ids
@pytest.mark.parametrize("method", ["heartbeat", "drain_node", "mark_offline", "resume_node", "remove_node", "node"])
def test_unhashable_node_id_is_a_type_error_naming_node_id(make_scheduler: MakeScheduler, method: str) -> None:
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    before = (sched.snapshot.version, sched.node("a"), sched.stats())
    with pytest.raises(TypeError, match=r"node_id must be a str, got list: \['a'\]"):
        getattr(sched, method)(["a"])
    assert (sched.snapshot.version, sched.node("a"), sched.stats()) == before


@pytest.mark.parametrize(
    "call,word",
    [
        (lambda s: s.register_node("b", ["zh", "en"], services=("asr", ["nmt"])), "services"),
        (lambda s: s.register_node("b", ("zh", ["en"])), "languages"),
        (lambda s: s.register_node(["b"], ["zh", "en"]), "node_id"),
        (lambda s: s.heartbeat("a", services=[{"asr"}]), "services"),
        (lambda s: s.heartbeat("a", languages=("zh", ["en"])), "languages"),
        # deliberately bad input: a list among the codes
        (lambda s: s.set_pools([PoolConfig(1, "x", {"zh"}, ("asr", ["tts"]))]),  # type: ignore[arg-type]
         "required_services"),
        (lambda s: s.set_pools([PoolConfig(1, "x", ("zh", ["en"]))]), "languages"),  # type: ignore[arg-type]
    ],
)
def test_unhashable_entries_are_type_errors_naming_the_argument(
    make_scheduler: MakeScheduler, call: Callable[[pysched.Scheduler], object], word: str
) -> None:
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    before = (sched.snapshot.version, sched.node("a"), sched.stats())
    with pytest.raises(TypeError, match=word) as info:
        call(sched)
    assert "unhashable" not in str(info.value)
    assert (sched.snapshot.version, sched.node("a"), sched.stats()) == before


def test_dir_lists_the_lazy_redis_classes() -> None:
    assert {"RedisFleet", "RedisReservations"} <= set(dir(pysched))
    assert set(pysched.__all__) <= set(dir(pysched))
    # listing them does not import redis-py (``import pysched`` must work without it)
    code = ("import sys, pysched; names = dir(pysched); "
            "assert 'RedisFleet' in names and 'RedisReservations' in names; "
            "assert 'redis' not in sys.modules and 'pysched.redis' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ====================================================================== lifecycle: forget long-dead nodes
def test_forget_an_idle_node_offline_by_heartbeat_age(make_scheduler: MakeScheduler, clock: FakeClock) -> None:
    sched = make_scheduler(heartbeat_timeout=10.0, forget_after=100.0)
    events = Events()
    sched.add_listener(events)
    sched.register_node("a", ["zh", "en"])
    sched.register_node("b", ["zh", "en"])
    clock.advance(105)
    sched.heartbeat("b")
    clock.advance(4.5)  # a: silent 109.5 s, offline for 99.5 s; b: silent 4.5 s
    assert sched.forget_offline_nodes() == []
    clock.advance(0.5)
    assert sched.forget_offline_nodes() == ["a"]
    assert events.of("forget") == [("a", {"offline_for": 100.0})]
    assert events.of("remove") == []  # forgetting is its own event
    with pytest.raises(pysched.UnknownNode):
        sched.node("a")
    assert sched.stats()["nodes_total"] == 1 and members(sched) == {"en-zh": ("b",)}
    assert sched.explain("zh", "en").nodes == {"b": "ok"}
    assert sched.forget_offline_nodes() == []
    sched.register_node("a", ["zh", "en"])  # it may come back like any new node
    assert sched.explain("zh", "en").nodes == {"a": "ok", "b": "ok"}


def test_forget_a_marked_offline_node(make_scheduler: MakeScheduler, clock: FakeClock) -> None:
    sched = make_scheduler(heartbeat_timeout=1000.0, forget_after=100.0)
    events = Events()
    sched.add_listener(events)
    sched.register_node("a", ["zh", "en"])
    clock.advance(5)
    sched.mark_offline("a")
    clock.advance(99)
    assert sched.forget_offline_nodes() == []
    sched.mark_offline("a")  # marking it again does not restart the count
    clock.advance(1)
    assert sched.forget_offline_nodes() == ["a"]
    assert events.of("forget") == [("a", {"offline_for": 100.0})]


def test_a_node_back_in_time_is_kept(make_scheduler: MakeScheduler, clock: FakeClock) -> None:
    sched = make_scheduler(heartbeat_timeout=10.0, forget_after=100.0)
    sched.register_node("a", ["zh", "en"])
    sched.register_node("b", ["zh", "en"])
    sched.mark_offline("b")
    clock.advance(105)  # a: offline for 95 s, b: marked 105 s ago
    sched.heartbeat("b")  # back: it counts from scratch
    sched.resume_node("a")
    clock.advance(109)
    assert sched.forget_offline_nodes() == []
    clock.advance(1)
    assert sorted(sched.forget_offline_nodes()) == ["a", "b"]


def test_a_node_that_holds_jobs_is_not_forgotten(make_scheduler: MakeScheduler, clock: FakeClock) -> None:
    sched = make_scheduler(heartbeat_timeout=10.0, forget_after=100.0)
    events = Events()
    sched.add_listener(events)
    sched.register_node("a", ["zh", "en"])
    job = sched.dispatch("s", "zh", "en").job_id
    sched.commit(job)
    sched.mark_offline("a")
    clock.advance(500)
    assert sched.forget_offline_nodes() == []
    assert sched.node("a")["status"] == "offline"
    assert sched.release(job)
    # checked again within min(forget_after, heartbeat_timeout) once nothing is held
    clock.advance(10)
    assert sched.forget_offline_nodes() == ["a"]
    assert events.of("forget") == [("a", {"offline_for": 510.0})]


def test_forget_does_nothing_before_the_earliest_possible_time(make_scheduler: MakeScheduler, clock: FakeClock) -> None:
    sched = make_scheduler(heartbeat_timeout=10.0, forget_after=100.0)
    for name in ("a", "b", "c"):
        sched.register_node(name, ["zh", "en"])
    assert sched.forget_offline_nodes() == []  # a first look computes the earliest time: 110 s from now
    registry = sched._mgmt

    class CountingLock:
        def __init__(self, lock: threading.Lock) -> None:
            self.lock, self.taken = lock, 0

        def __enter__(self) -> bool:
            self.taken += 1
            return self.lock.__enter__()

        def __exit__(self, *exc: Any) -> None:
            self.lock.__exit__(*exc)

    lock = CountingLock(registry._lock)
    registry._lock = lock  # type: ignore[assignment]  # a stand-in that counts acquisitions
    for _ in range(100):
        clock.advance(1.0)
        assert sched.forget_offline_nodes() == []
    assert lock.taken == 0  # no lock, no scan: one comparison per call
    clock.advance(10.0)
    assert sorted(sched.forget_offline_nodes()) == ["a", "b", "c"]


def test_forget_after_none_keeps_dead_nodes(make_scheduler: MakeScheduler, clock: FakeClock) -> None:
    sched = make_scheduler(heartbeat_timeout=10.0, forget_after=None)
    sched.register_node("a", ["zh", "en"])
    sched.mark_offline("a")
    clock.advance(10**6)
    assert sched.forget_offline_nodes() == []
    assert sched.node("a")["status"] == "offline"


def test_a_heartbeat_landing_while_forget_checks_the_backend_wins(kernel_name: str, clock: FakeClock) -> None:
    """The backend is asked outside the management lock; a node back by then is kept."""
    core = resolve(kernel_name)
    hook: list[Callable[[], None]] = []

    class Backend(LocalReservations):
        def count(self, node_id: str | None = None) -> int:
            n = super().count(node_id)
            if node_id is not None and hook:
                # a heartbeat from another thread, between the check and the removal;
                # it would deadlock if the backend were asked under the management lock
                worker = threading.Thread(target=hook.pop())
                worker.start()
                worker.join(30)
                assert not worker.is_alive(), "heartbeat blocked: count() called under the management lock"
            return n

    sched = pysched.Scheduler(clock=clock, seed=1, kernel=kernel_name, heartbeat_timeout=10.0, forget_after=100.0,
                              reservations=Backend(core=core))
    try:
        events = Events()
        sched.add_listener(events)
        sched.register_node("a", ["zh", "en"])
        sched.register_node("b", ["zh", "en"])
        clock.advance(500)
        hook.append(lambda: sched.heartbeat("a"))
        assert sched.forget_offline_nodes() == ["b"]
        assert not hook  # the heartbeat did land in the window
        assert sched.node("a")["status"] == "ready" and sched.node("a")["last_heartbeat"] == clock.now
        assert events.of("forget") == [("b", {"offline_for": 490.0})]
        with pytest.raises(pysched.UnknownNode):
            sched.node("b")
    finally:
        sched.close()


def test_forget_under_concurrent_heartbeats_dispatches_and_releases(kernel_name: str) -> None:
    """Threads heartbeat, mark, resume, dispatch, release and forget at once: never a node holding jobs."""
    clock = FakeClock()
    sched = pysched.Scheduler(clock=clock, seed=3, kernel=kernel_name, heartbeat_timeout=5.0, forget_after=10.0,
                              reservation_ttl=10**6)
    names = [f"n{i}" for i in range(8)]
    for name in names:
        sched.register_node(name, ["zh", "en"], max_concurrency=2)
    # one job on every node, held until the client thread ends: no node may be forgotten before
    first = [sched.dispatch(f"first{i}", "zh", "en").job_id for i in range(len(names))]
    assert all(sched.reservations.count(name) == 1 for name in names)
    for job in first:
        sched.commit(job)
    held_at_forget: list[tuple[str, int]] = []
    errors: list[BaseException] = []

    def on_event(event: str, node_id: str, fields: Fields) -> None:
        if event == "forget":
            # nothing can reserve on a removed node, so what it holds now it held at removal
            held_at_forget.append((node_id, sched.reservations.count(node_id)))

    sched.add_listener(on_event)

    def run(body: Callable[[], None]) -> threading.Thread:
        def target() -> None:
            try:
                body()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
        return threading.Thread(target=target)

    def ticking() -> None:
        for _ in range(4000):
            clock.advance(0.05)
            sched.forget_offline_nodes()

    def node_side() -> None:
        for i in range(4000):
            name = names[i % 8]
            try:
                if i % 8 < 4:
                    sched.heartbeat(name, running=0)
                elif i % 97 == 5:
                    sched.mark_offline(name)
                elif i % 89 == 6:
                    sched.resume_node(name)
            except pysched.UnknownNode:
                pass  # forgotten meanwhile: fine, it stays gone

    def client_side() -> None:
        held: list[str] = []
        long_jobs: list[str] = list(first)  # held to the end, whatever happens to their node
        for i in range(4000):
            try:
                a = sched.dispatch(f"s{i % 5}", "zh", "en")
                sched.commit(a.job_id)
                (long_jobs if i % 7 == 0 else held).append(a.job_id)
            except (pysched.NoNodeAvailable, pysched.NoPoolForLanguagePair):
                pass
            if len(held) > 6 or (held and i % 3 == 0):
                sched.release(held.pop(0))
        for job in held + long_jobs:
            sched.release(job)

    threads = [run(ticking), run(node_side), run(client_side)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads finely (coverage only: no assertion depends on it)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        sys.setswitchinterval(interval)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert not errors, errors
        assert all(count == 0 for _, count in held_at_forget), held_at_forget
        assert sched.reservations.count() == 0
        left = set(sched._mgmt.node_ids())
        assert left == set(names) - {n for n, _ in held_at_forget}
        assert {n for p in sched.pools() for n in p.node_ids} == left
    finally:
        sys.setswitchinterval(interval)
        sched.close()


@pytest.mark.parametrize("value,exc", [(-1.0, ValueError), (0, ValueError), (float("nan"), ValueError),
                                       ("soon", TypeError), (True, TypeError)])
def test_bad_forget_after(value: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="forget_after"):
        pysched.Scheduler(forget_after=value)  # type: ignore[arg-type]  # deliberately bad input


# ====================================================================== lifecycle: registering
def test_a_node_registered_not_ready_waits_for_its_first_healthy_heartbeat(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], ready=False)
    assert sched.node("a")["status"] == "registering"
    assert sched.stats()["nodes"]["registering"] == 1 and sched.stats()["nodes"]["ready"] == 0
    assert sched.explain("zh", "en").nodes == {"a": "not_ready"}
    with pytest.raises(pysched.NoNodeAvailable) as info:
        sched.dispatch("s", "zh", "en")
    assert info.value.best_reason == "not_ready" and info.value.breakdown == {"not_ready": 1}
    sched.heartbeat("a", running=0, cpu=5.0, gpu=5.0, mem=5.0)  # load alone is not readiness
    sched.heartbeat("a")
    for _ in range(4):
        sched.heartbeat("a", healthy=False)
    assert sched.node("a")["status"] == "registering"
    sched.heartbeat("a", healthy=True)
    assert sched.node("a")["status"] == "ready"
    assert sched.stats()["nodes"]["registering"] == 0 and sched.stats()["nodes"]["ready"] == 1
    assert sched.dispatch("s", "zh", "en").node_id == "a"


def test_registering_survives_an_offline_mark_and_a_drain(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], ready=False)
    sched.mark_offline("a")
    sched.heartbeat("a")  # back from offline, but still not ready
    assert sched.node("a")["status"] == "registering"
    sched.drain_node("a")
    sched.heartbeat("a", healthy=True)  # healthy now, but drained: stays draining
    assert sched.node("a")["status"] == "draining"
    sched.mark_offline("a")
    sched.heartbeat("a")
    assert sched.node("a")["status"] == "ready"  # it had been healthy once


def test_reregistering_not_ready_and_resume(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    assert sched.node("a")["status"] == "ready"
    sched.register_node("a", ["zh", "en"], ready=False)  # a restart: warming up again
    assert sched.node("a")["status"] == "registering"
    sched.resume_node("a")  # the operator's word: ready now
    assert sched.node("a")["status"] == "ready"
    sched.mark_offline("a")
    sched.heartbeat("a")
    assert sched.node("a")["status"] == "ready"


def test_register_event_carries_ready(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler()
    events = Events()
    sched.add_listener(events)
    sched.register_node("a", ["zh", "en"], ready=False)
    sched.register_node("b", ["zh", "en"])
    assert [(n, f["ready"]) for n, f in events.of("register")] == [("a", False), ("b", True)]
    # the fields replay through the public API: the replica is registering too
    replica = make_scheduler()
    for node_id, fields in events.of("register"):
        replica.register_node(node_id, **fields)
    assert replica.node("a")["status"] == "registering" and replica.node("b")["status"] == "ready"


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_ready_is_a_type_error_and_changes_nothing(make_scheduler: MakeScheduler, value: object) -> None:
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    before = (sched.snapshot.version, sched.node("a"), sched.stats())
    with pytest.raises(TypeError, match="ready"):
        sched.register_node("a", ["de", "en"], ready=value)  # type: ignore[arg-type]  # deliberately bad input
    with pytest.raises(TypeError, match="ready"):
        sched.register_node("b", ["zh", "en"], ready=value)  # type: ignore[arg-type]  # deliberately bad input
    assert (sched.snapshot.version, sched.node("a"), sched.stats()) == before
