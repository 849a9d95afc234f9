"""The job lifecycle and the dispatch-side defects of issue 10, on both kernels.

Each test names the issue item it covers. Time is the injected fake clock
everywhere; the threaded tests assert invariants, never timing.
"""

from __future__ import annotations

import contextlib
import threading

import pytest

import pysched
from pysched import (
    LocalReservations,
    NoNodeAvailable,
    ReservationBackendUnavailable,
    UnknownJob,
    WrongNode,
)
from pysched._validate import unpack_request
from pysched.reservations import Reservation


def _events(sched):
    seen: list[tuple[str, str, dict]] = []
    sched.add_listener(lambda event, node_id, fields: seen.append((event, node_id, fields)))
    return seen


# ---------------------------------------------------------------- item 4: explain after expiry
def test_explain_counts_expired_reservations_as_gone(make_scheduler, clock):
    sched = make_scheduler(reservation_ttl=5.0)
    sched.register_node("a", ["zh", "en"], max_concurrency=1)
    sched.dispatch("s", "zh", "en")
    assert sched.explain("zh", "en").nodes == {"a": "full"}
    clock.advance(5.0)  # exactly the TTL: the reservation is gone
    sched.heartbeat("a")
    assert sched.explain("zh", "en").nodes == {"a": "ok"}
    assert sched.dispatch("s2", "zh", "en").node_id == "a"  # and dispatch agrees


# ---------------------------------------------------------------- item 6: one answer for an expired job
def test_expired_reservation_is_gone_for_every_call(make_scheduler, clock):
    sched = make_scheduler(reservation_ttl=5.0)
    sched.register_node("a", ["zh", "en"], max_concurrency=2)
    job = sched.dispatch("s", "zh", "en").job_id
    clock.advance(6.0)
    # before any sweep: get, commit, release, renew all say "gone"
    assert sched.reservations.get(job) is None
    assert sched.release(job) is False
    with pytest.raises(UnknownJob):
        sched.commit(job)
    with pytest.raises(UnknownJob):
        sched.renew(job)
    assert sched.stats()["reservations"] == 0
    assert sched.reservations.count("a") == 0


# ---------------------------------------------------------------- item 7: session TTL and rebinding
def test_idle_session_is_forgotten_at_lookup_before_any_sweep(make_scheduler, clock):
    sched = make_scheduler(session_ttl=100.0, heartbeat_timeout=1000.0)
    sched.register_node("a", ["zh", "en"], max_concurrency=10)
    sched.register_node("b", ["de", "en", "zh"], max_concurrency=10)
    first = sched.dispatch("s", "zh", "en")
    sched.release(first.job_id)
    sched.heartbeat(first.node_id, running=9)  # the bound pool is now the busier one
    assert sched.dispatch("s", "zh", "en").node_id == first.node_id  # bound: it stays
    sched._sessions.next_sweep = float("inf")  # no periodic sweep: the lookup alone must forget
    clock.advance(150.0)
    again = sched.dispatch("s", "zh", "en")
    assert again.node_id != first.node_id, "an idle session must rebind as a new session would"
    assert sched._sessions.get("s").binding == (("zh", "en"), again.pool_id)


def test_session_whose_pool_has_no_eligible_node_rebinds_like_a_new_session(make_scheduler):
    # three pools serve zh->en; index order is smallest set first: en-zh, then de-en-zh, then en-fr-zh
    sched = make_scheduler()
    sched.register_node("p1", ["zh", "en"], max_concurrency=1)
    sched.register_node("p2", ["de", "en", "zh"], max_concurrency=1)
    sched.register_node("p3", ["en", "fr", "zh"], max_concurrency=5)
    ids = {p.name: p.pool_id for p in sched.pools()}
    a = sched.dispatch("s", "zh", "en", prefer="p1")  # binds en-zh (p1 is within the slack of the best)
    assert a.node_id == "p1" and a.pool_id == ids["en-zh"]
    # p1 is now full: the next job must go where a new session would go, the pool with the most free
    # capacity (en-fr-zh: 5 free), not the next pool in index order (de-en-zh: 1 free)
    b = sched.dispatch("s", "zh", "en")
    assert b.pool_id == ids["en-fr-zh"] and b.node_id == "p3"


def test_rebinding_prefers_the_tenant_pool(make_scheduler):
    sched = make_scheduler(tenant_pools={"acme": 2})
    sched.register_node("p1", ["zh", "en"], max_concurrency=1)
    sched.register_node("p2", ["de", "en", "zh"], max_concurrency=1)
    sched.register_node("p3", ["en", "fr", "zh"], max_concurrency=5)
    ids = {p.name: p.pool_id for p in sched.pools()}
    assert ids["de-en-zh"] == 2
    a = sched.dispatch("s", "zh", "en", tenant="acme", prefer="p1")
    assert a.node_id == "p1"
    b = sched.dispatch("s", "zh", "en", tenant="acme")
    assert b.pool_id == 2 and b.node_id == "p2"


# ---------------------------------------------------------------- item 8: races in the local backend
@pytest.mark.parametrize("threads", [4])
def test_local_reservations_stay_exact_under_threads(kernel_name, threads):
    """Reserve, release, commit, renew and sweep from several threads over a shared fake clock.

    Whatever the interleaving: no node above its max, every count equals the
    jobs held on it, no exception escapes, and once the clock passes every
    expiry nothing is held.
    """
    clock_lock = threading.Lock()
    now = [1000.0]

    def clock() -> float:
        return now[0]

    sched = pysched.Scheduler(clock=clock, seed=3, kernel=kernel_name, reservation_ttl=0.5, commit_lease=2.0)
    for i in range(6):
        sched.register_node(f"n{i}", ["zh", "en"], max_concurrency=3)
    res = sched.reservations
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def worker(k: int) -> None:
        try:
            barrier.wait(timeout=60)
            for i in range(400):
                job = f"w{k}-{i % 7}"  # ids are reused: re-reserve races release and expiry
                try:
                    a = sched.dispatch(f"s-{job}", "zh", "en", job_id=job)
                except NoNodeAvailable:
                    a = None
                if a is not None and i % 3 == 0:
                    with contextlib.suppress(UnknownJob):  # expired or released by another thread meanwhile
                        sched.commit(job, node_id=a.node_id)
                if i % 4 == 0:
                    sched.release(job)
                if i % 5 == 0:
                    sched.stats()  # sweeps
                if i % 11 == 0:
                    with clock_lock:
                        now[0] += 0.1
                for slot in range(6):
                    held = int(res.inflight[slot])
                    assert 0 <= held <= 3, f"slot {slot} holds {held}"
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in pool), "deadlock"
    assert not errors, errors[:3]
    jobs = res.jobs()
    for slot in range(6):
        assert int(res.inflight[slot]) == sum(1 for j in jobs if j.slot == slot)
    now[0] += 10.0
    assert res.expire() == len(jobs)
    assert res.count() == 0 and int(res.inflight[:6].sum()) == 0


def test_reservation_made_during_a_sweep_keeps_its_expiry(make_scheduler, clock):
    """The expiry heap is changed only inside single atomic calls: a reservation made
    right after a sweep (or between two) still expires at its own TTL."""
    sched = make_scheduler(reservation_ttl=1.0)
    sched.register_node("a", ["zh", "en"], max_concurrency=1)
    sched.dispatch("s", "zh", "en", job_id="old")
    clock.advance(1.0)
    res = sched.reservations

    original = res._table.expire
    made = []

    def expire_then_reserve(now):
        out = original(now)
        if not made:  # another thread reserves right after the sweep's atomic step
            made.append(sched.dispatch("t", "zh", "en", job_id="new"))
        return out

    res._table = _Proxy(res._table, expire=expire_then_reserve)
    assert res.expire() == 1
    res._table = res._table.target
    assert made and res.get("new").expires_at == clock.now + 1.0
    assert sched.explain("zh", "en").nodes == {"a": "full"}
    clock.advance(1.0)
    assert sched.explain("zh", "en").nodes == {"a": "ok"}  # not full forever


class _Proxy:
    def __init__(self, target, **overrides):
        self.target = target
        self.overrides = overrides

    def __getattr__(self, name):
        return self.overrides.get(name) or getattr(self.target, name)

    def __contains__(self, item):
        return item in self.target

    def __len__(self):
        return len(self.target)


def test_same_job_id_reserved_again_after_release_counts_once(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], max_concurrency=2)
    for _ in range(50):
        sched.dispatch("s", "zh", "en", job_id="J")
        assert sched.release("J") is True
    sched.dispatch("s", "zh", "en", job_id="J")
    assert int(sched.reservations.inflight[0]) == 1 and sched.reservations.count() == 1


# ---------------------------------------------------------------- item 11: retries validate and match
@pytest.mark.parametrize("kwargs, error", [
    ({"exclude": [None]}, TypeError),
    ({"services": [1]}, TypeError),
    ({"tenant": ""}, ValueError),
    ({"require_gpu": "yes"}, TypeError),
    ({"prefer": [3]}, TypeError),
])
def test_retry_with_a_held_job_id_is_validated(make_scheduler, kwargs, error):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    sched.dispatch("s", "zh", "en", job_id="J")
    with pytest.raises(error):
        sched.dispatch("s", "zh", "en", job_id="J", **kwargs)


def test_retry_returns_exactly_the_held_assignment_or_refuses(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en", "de"])
    first = sched.dispatch("s", "zh-CN", "en", job_id="J")
    assert sched.dispatch("s", "zh", "en-US", job_id="J") == first
    with pytest.raises(ValueError, match="'J'.*held by session 's'"):
        sched.dispatch("s", "de", "en", job_id="J")  # another pair
    with pytest.raises(ValueError, match="session"):
        sched.dispatch("other", "zh", "en", job_id="J")  # another session
    assert sched.reservations.count() == 1
    results = sched.dispatch_many([{"session_id": "s", "src": "de", "tgt": "en", "job_id": "J"}])
    assert isinstance(results[0], ValueError)


# ---------------------------------------------------------------- item 12: dispatch_many, one rule
class _DownFor(LocalReservations):
    """A local backend that is 'unreachable' for one job id's lookups."""

    def __init__(self, bad: str, **kw):
        super().__init__(**kw)
        self.bad = bad

    def get(self, job_id):
        if job_id == self.bad:
            raise ReservationBackendUnavailable("down")
        return super().get(job_id)


def test_dispatch_many_puts_backend_errors_in_the_request_slot(kernel_name, clock):
    sched = pysched.Scheduler(clock=clock, seed=1, kernel=kernel_name, reservations=_DownFor("X"))
    sched.register_node("a", ["zh", "en"])
    out = sched.dispatch_many([("s1", "zh", "en"), {"session_id": "s2", "src": "zh", "tgt": "en", "job_id": "X"},
                               ("s3", "zh", "en")])
    assert isinstance(out[0], pysched.Assignment) and isinstance(out[2], pysched.Assignment)
    assert isinstance(out[1], ReservationBackendUnavailable)


def _requests_with_repeats():
    return [
        {"session_id": "s1", "src": "zh", "tgt": "en", "job_id": "J1"},
        ("s2", "zh", "en"),
        {"session_id": "s1", "src": "zh", "tgt": "en", "job_id": "J1"},  # retry of a placed job
        {"session_id": "s3", "src": "zh", "tgt": "en", "job_id": "J2"},  # refused (full) ...
        ("s4", "zh", "en"),
        {"session_id": "s3", "src": "zh", "tgt": "en", "job_id": "J2"},  # ... and repeated
        {"session_id": "s5", "src": "zh", "tgt": "en", "prefer": "b"},
        ("s6", "zh", "en"),
    ]


def _outcome(x):
    if isinstance(x, Exception):
        return (type(x).__name__, getattr(x, "breakdown", None))
    return (x.node_id, x.pool_id, x.job_id, x.session_id, x.src, x.tgt)


def test_dispatch_many_places_exactly_as_one_by_one_with_repeats_and_prefer(kernel_name, clock):
    def fleet():
        sched = pysched.Scheduler(clock=clock, seed=9, kernel=kernel_name)
        sched.register_node("a", ["zh", "en"], max_concurrency=2)
        sched.register_node("b", ["zh", "en"], max_concurrency=1)
        return sched

    one, many = fleet(), fleet()
    sequential = []
    for req in _requests_with_repeats():
        sid, src, tgt, kw = unpack_request(req)
        try:
            sequential.append(one.dispatch(sid, src, tgt, **kw))
        except Exception as exc:  # noqa: BLE001 - compared below
            sequential.append(exc)
    batch = many.dispatch_many(_requests_with_repeats())
    assert [_outcome(x) for x in batch] == [_outcome(x) for x in sequential]
    assert list(one.reservations.inflight[:2]) == list(many.reservations.inflight[:2])
    assert one.stats()["dispatch"] == many.stats()["dispatch"]


# ---------------------------------------------------------------- lifecycle: release/commit by node
def test_release_and_commit_are_checked_against_the_reporting_node(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"], max_concurrency=1)
    sched.register_node("b", ["zh", "en"], max_concurrency=1)
    job = sched.dispatch("s", "zh", "en")
    other = "b" if job.node_id == "a" else "a"
    with pytest.raises(WrongNode) as info:
        sched.commit(job.job_id, node_id=other)
    assert isinstance(info.value, UnknownJob) and info.value.holder == job.node_id
    assert sched.reservations.get(job.job_id).committed is False  # nothing changed
    assert sched.release(job.job_id, node_id=other) is False
    assert sched.release(job.job_id, node_id="never-registered") is False
    assert sched.reservations.count(job.node_id) == 1
    with pytest.raises(WrongNode):
        sched.renew(job.job_id, node_id=other)
    sched.commit(job.job_id, node_id=job.node_id)
    assert sched.release(job.job_id, node_id=job.node_id) is True
    assert sched.reservations.count() == 0


@pytest.mark.parametrize("call", ["commit", "release", "renew"])
@pytest.mark.parametrize("node_id, error", [([1], TypeError), ("", ValueError), (5, TypeError)])
def test_node_id_argument_is_validated(make_scheduler, call, node_id, error):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    job = sched.dispatch("s", "zh", "en").job_id
    with pytest.raises(error, match="node_id"):
        getattr(sched, call)(job, node_id=node_id)
    assert sched.reservations.get(job).committed is False and sched.reservations.count() == 1


# ---------------------------------------------------------------- lifecycle: leases and job_expired
def test_committed_job_lease_ends_with_a_job_expired_event(make_scheduler, clock):
    sched = make_scheduler(reservation_ttl=5.0, commit_lease=60.0)
    seen = _events(sched)
    sched.register_node("a", ["zh", "en"], max_concurrency=1)
    job = sched.dispatch("s", "zh", "en")
    sched.commit(job.job_id)
    clock.advance(30.0)
    sched.heartbeat("a")
    with pytest.raises(NoNodeAvailable):
        sched.dispatch("s2", "zh", "en")  # the committed job still holds the node
    clock.advance(30.0)  # the lease ends: its release was lost
    sched.heartbeat("a")
    again = sched.dispatch("s2", "zh", "en")
    assert again.node_id == "a"
    expired = [e for e in seen if e[0] == "job_expired"]
    assert expired == [("job_expired", "a", {"job_id": job.job_id, "session_id": "s", "pool_id": job.pool_id,
                                             "committed": True})]
    assert sched.stats()["jobs"]["expired"] == 1


def test_uncommitted_reservation_expiry_is_an_event_too(make_scheduler, clock):
    sched = make_scheduler(reservation_ttl=5.0)
    seen = _events(sched)
    sched.register_node("a", ["zh", "en"])
    job = sched.dispatch("s", "zh", "en")
    clock.advance(5.0)
    assert sched.reservations.expire() == 1
    assert [e[:2] for e in seen if e[0] == "job_expired"] == [("job_expired", "a")]
    assert seen[-1][2]["committed"] is False and seen[-1][2]["job_id"] == job.job_id


def test_renew_extends_a_long_job(make_scheduler, clock):
    sched = make_scheduler(reservation_ttl=5.0, commit_lease=10.0)
    sched.register_node("a", ["zh", "en"], max_concurrency=1)
    job = sched.dispatch("s", "zh", "en").job_id
    sched.commit(job)
    for _ in range(5):
        clock.advance(8.0)
        sched.renew(job)  # default: another commit_lease from now
    assert sched.reservations.get(job).expires_at == clock.now + 10.0
    sched.renew(job, lease=100.0)
    clock.advance(99.0)
    assert sched.reservations.get(job) is not None
    clock.advance(1.0)
    assert sched.reservations.get(job) is None
    with pytest.raises(UnknownJob):
        sched.renew(job)


def test_renew_of_an_uncommitted_reservation_uses_the_ttl(make_scheduler, clock):
    sched = make_scheduler(reservation_ttl=5.0)
    sched.register_node("a", ["zh", "en"])
    job = sched.dispatch("s", "zh", "en").job_id
    clock.advance(4.0)
    sched.renew(job)
    assert sched.reservations.get(job).expires_at == clock.now + 5.0


@pytest.mark.parametrize("lease, error", [(0, ValueError), (-1.0, ValueError), ("5", TypeError),
                                          (float("nan"), ValueError), (True, TypeError)])
def test_renew_rejects_bad_leases(make_scheduler, clock, lease, error):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    job = sched.dispatch("s", "zh", "en").job_id
    before = sched.reservations.get(job).expires_at
    with pytest.raises(error, match="lease"):
        sched.renew(job, lease=lease)
    assert sched.reservations.get(job).expires_at == before


@pytest.mark.parametrize("kwargs, error", [
    ({"commit_lease": 0}, ValueError), ({"commit_lease": "x"}, TypeError),
    ({"forget_after": -1}, ValueError), ({"prefer_slack": 1.5}, ValueError), ({"prefer_slack": None}, TypeError),
])
def test_lifecycle_settings_are_validated(kernel_name, kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        pysched.Scheduler(kernel=kernel_name, **kwargs)


# ---------------------------------------------------------------- lifecycle: preferred node
def _three(make_scheduler, **kw):
    sched = make_scheduler(**kw)
    for n in ("a", "b", "c"):
        sched.register_node(n, ["zh", "en"], max_concurrency=4)
    return sched


def test_prefer_places_on_the_preferred_node_within_the_slack(make_scheduler):
    sched = _three(make_scheduler, prefer_slack=0.25)
    assert sched.dispatch("s", "zh", "en", prefer="b").node_id == "b"  # 0/4 vs best 0/4
    assert sched.dispatch("s", "zh", "en", prefer="b").node_id == "b"  # 1/4 vs 0/4: within 0.25
    # 2/4 vs best 0/4 is beyond the slack: placed normally, on an idle node
    third = sched.dispatch("s", "zh", "en", prefer="b")
    assert third.node_id in ("a", "c")
    assert sched.explain("zh", "en", prefer="b").preferred == {"b": "load"}


def test_prefer_takes_the_first_eligible_in_order_and_explains_the_rest(make_scheduler):
    sched = _three(make_scheduler)
    sched.drain_node("a")
    ex = sched.explain("zh", "en", prefer=["ghost", "a", "c", "b"])
    assert ex.preferred == {"ghost": "unknown", "a": "not_ready", "c": "ok"}
    assert sched.dispatch("s", "zh", "en", prefer=["ghost", "a", "c", "b"]).node_id == "c"


def test_prefer_of_a_node_outside_the_pairs_pools_is_ignored(make_scheduler):
    sched = _three(make_scheduler)
    sched.register_node("d", ["de", "fr"])
    assert sched.explain("zh", "en", prefer="d").preferred == {"d": "not_in_pool"}
    assert sched.dispatch("s", "zh", "en", prefer="d").node_id in ("a", "b", "c")


def test_prefer_is_deterministic_and_the_same_on_both_kernels(clock):
    def run(kernel):
        sched = pysched.Scheduler(clock=clock, seed=7, kernel=kernel, prefer_slack=0.5)
        for i in range(8):
            sched.register_node(f"n{i}", ["zh", "en"], max_concurrency=3)
        out = []
        for i in range(30):
            try:
                out.append(sched.dispatch(f"s{i % 4}", "zh", "en", prefer=[f"n{i % 3}", "n7"]).node_id)
            except NoNodeAvailable:
                out.append(None)
        return out

    assert run("compiled") == run("python") == run("python")


@pytest.mark.parametrize("prefer", [b"a", 3, [None], [""]])
def test_prefer_is_validated(make_scheduler, prefer):
    sched = _three(make_scheduler)
    with pytest.raises(TypeError, match="prefer"):
        sched.dispatch("s", "zh", "en", prefer=prefer)
    assert sched.reservations.count() == 0 and sched.stats()["sessions"] == 0


# ---------------------------------------------------------------- stats
def test_stats_gives_dashboard_counts_from_local_state(make_scheduler, clock):
    sched = _three(make_scheduler, reservation_ttl=5.0)
    jobs = [sched.dispatch(f"s{i}", "zh", "en").job_id for i in range(5)]
    sched.commit(jobs[0])
    clock.advance(5.0)
    st = sched.stats()
    assert st["jobs"] == {"held": 1, "committed": 1, "expired": 4}
    (pool,) = st["pools"].values()
    assert pool["capacity"] == 12 and pool["inflight"] == 1
    assert st["backend"] == {"name": "local", "available": True, "error": None, "held": 1, "committed": 1,
                             "expired": 4}


def test_reservation_view_carries_the_pair(make_scheduler):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    job = sched.dispatch("s", "zh-TW", "en").job_id
    held = sched.reservations.get(job)
    assert isinstance(held, Reservation) and (held.src, held.tgt, held.session_id) == ("zh", "en", "s")


# ---------------------------------------------------------------- the job table itself, both implementations
def test_many_live_jobs_are_tracked_exactly(make_scheduler, clock):
    """Past the table's first growth (256 handles) every job is still found, counted and released."""
    sched = make_scheduler(reservation_ttl=50.0)
    for i in range(4):
        sched.register_node(f"n{i}", ["zh", "en"], max_concurrency=100_000)
    jobs = [sched.dispatch(f"s{i % 37}", "zh", "en").job_id for i in range(3000)]
    assert len(set(jobs)) == 3000 and sched.stats()["reservations"] == 3000
    assert sum(int(x) for x in sched.reservations.inflight[:4]) == 3000
    for job in jobs[::2]:
        assert sched.release(job) is True
    clock.advance(50.0)
    assert sched.reservations.expire() == 1500
    assert sched.reservations.count() == 0 and int(sched.reservations.inflight[:4].sum()) == 0


def test_a_callers_job_id_is_held_when_hundreds_of_generated_ones_are(make_scheduler):
    """Ids a caller chooses (filed in the dict) work at any table size, past the first 256 handles."""
    sched = make_scheduler()
    sched.register_node("n", ["zh", "en"], max_concurrency=10_000)
    made = [sched.dispatch(f"s{i % 13}", "zh", "en").job_id for i in range(600)]
    mine = sched.dispatch("s1", "zh", "en", job_id="caller-job")
    assert mine.job_id == "caller-job" and sched.dispatch("s1", "zh", "en", job_id="caller-job") == mine
    assert sched.reservations.count() == 601 == int(sched.reservations.inflight[0])
    assert sched.release("caller-job") and not sched.release("caller-job")
    for job in made:
        assert sched.release(job)
    assert sched.reservations.count() == 0


def _bound_table(core):
    """A job table of ``core`` over four slots, every one bound, with numbered ids ``j<n>``."""
    counts = core.SlotCounts(4)
    table = core.JobTable(counts, prefix="j")
    for slot in range(4):
        table.bind(slot)
    return counts, table


@pytest.mark.parametrize("expiries", ["distinct", "tied"])
def test_a_deep_expiry_heap_expires_exactly_as_the_twin(expiries):
    """Thousands of jobs with random expiries, released and renewed at random positions of the heap:
    every sweep returns the same jobs in the same order as the twin's heapq table. With ``tied``
    expiries (five values, as a batch's jobs share one), equal ones go in the order they were set."""
    import random

    from pysched import _core, _pycore

    rng = random.Random(7)

    def at():
        return rng.uniform(1.0, 100.0) if expiries == "distinct" else float(rng.choice((10, 30, 50, 70, 90)))

    plan = [("reserve", f"j{i}", at()) for i in range(3000)]
    plan += [("release", f"j{i}", 0.0) for i in rng.sample(range(3000), 1200)]
    plan += [("renew", f"j{i}", at()) for i in rng.sample(range(3000), 600)]
    rng.shuffle(plan)
    plan.sort(key=lambda op: op[0] != "reserve")  # every job exists before releases and renewals
    results = []
    for core in (_core, _pycore):
        counts, table = _bound_table(core)
        out = []
        for op, job, t in plan:
            if op == "reserve":
                out.append(table.reserve(job, hash(job) % 4, 10_000, 0, 1, "s", t))
            elif op == "release":
                out.append(table.release(job, -1, 0.0))
            else:
                out.append(table.renew(job, -1, t, 0.0))
        for now in range(0, 101, 5):
            out.append([rec[:2] + rec[4:] for rec in table.expire(float(now))])
        out.append((len(table), counts.array.tolist()))
        results.append(out)
    assert results[0] == results[1]
    assert results[0][-1] == (0, [0, 0, 0, 0])
    # the order itself: by expiry, then by when that expiry was set (the last reserve or renew)
    set_at = {}
    for k, (op, job, t) in enumerate(plan):
        if op == "release":
            set_at.pop(job, None)
        elif op == "reserve" or job in set_at:
            set_at[job] = (t, k)
    swept = [rec[0] for sweep in results[0][-22:-1] for rec in sweep]
    assert swept == sorted(set_at, key=set_at.__getitem__)


@pytest.mark.parametrize("seed", range(4))
def test_the_expiry_ring_and_heap_expire_exactly_as_the_twin(seed):
    """The compiled table keeps in-order expiries in a ring in front of its heap (``_jobs.pxi``).

    20,000 random steps drive both tables: jobs at ``now`` + a fixed TTL (the
    ring), long-lived ones that block its head while thousands pass (they move
    to the heap, or the ring grows), out-of-order expiries (the heap), commits
    and renewals, releases oldest-first and at random, handle jobs, sweeps.
    Every result, every sweep (jobs and order) and ``next_expiry`` agree.
    """
    import random

    from pysched import _core, _pycore

    rng = random.Random(seed)
    plan = []
    now, n = 0.0, 0
    for _ in range(20_000):
        x = rng.random()
        if x < 0.40:
            plan.append(("reserve", f"j{n}", now + 10.0))
            n += 1
        elif x < 0.42:
            plan.append(("reserve", f"j{n}", now + rng.choice((500.0, 1e6))))
            n += 1
        elif x < 0.47:
            plan.append(("reserve", f"j{n}", now + rng.uniform(0.0, 20.0)))
            n += 1
        elif x < 0.52:
            plan.append(("handle", None, now + 10.0))
        elif x < 0.72:
            plan.append(("release_random", rng.random(), 0.0))
        elif x < 0.85:
            plan.append(("release_oldest", None, 0.0))
        elif x < 0.90:
            plan.append(("commit", rng.random(), now + rng.choice((10.0, 60.0))))
        elif x < 0.93:
            plan.append(("renew", rng.random(), now + rng.uniform(5.0, 30.0)))
        else:
            now += rng.uniform(0.0, 0.4)
            plan.append(("expire", None, now))
    plan.append(("expire", None, 2e6))
    results = []
    for core in (_core, _pycore):
        counts, table = _bound_table(core)
        live = []  # job ids and handles, oldest first
        out = []
        t = 0.0
        for op, arg, at in plan:
            if op == "reserve":
                out.append(table.reserve(arg, int(arg[1:]) % 4, 1_000_000, 0, 1, "s", at))
                live.append(arg)
            elif op == "handle":
                h = table.reserve_handle(len(live) % 4, 1_000_000, 0, 1, "s", at)
                out.append(h)
                live.append(h)
            elif op in ("release_random", "release_oldest", "commit", "renew"):
                if not live:
                    continue
                job = live[0] if op == "release_oldest" else live[int(arg * len(live))]
                named = isinstance(job, str)
                if op.startswith("release"):
                    live.remove(job)
                    done = table.release(job, -1, t) if named else table.release_handle(job, -1, t)
                    out.append(done is not None and done is not False)
                elif op == "commit":
                    out.append(table.commit(job, -1, at, t) if named else table.commit_handle(job, -1, at, t))
                else:
                    out.append(table.renew(job, -1, at, t) if named else table.renew_handle(job, -1, at, t))
            else:
                t = at
                swept = table.expire(at)
                gone = {rec[0] for rec in swept}
                live = [job for job in live if job not in gone]
                out.append([rec[:2] + rec[4:] for rec in swept])
                out.append(table.next_expiry)
        out.append((len(table), counts.array.tolist()))
        results.append(out)
    assert results[0] == results[1]
    assert results[0][-1] == (0, [0, 0, 0, 0])


def test_numbered_job_ids_are_exact_past_ring_collisions_and_growth(make_scheduler, clock):
    """A job held while thousands of later ones come and go (their numbers wrap the compiled table's
    ring onto its entry, and the ring grows) is still found, and so is every later job."""
    sched = make_scheduler(reservation_ttl=1e6)
    sched.register_node("n", ["zh", "en"], max_concurrency=100_000)
    first = sched.dispatch("s", "zh", "en").job_id
    held = []
    for i in range(5000):
        job = sched.dispatch(f"s{i % 7}", "zh", "en").job_id
        if i % 3 == 0 or i % 500 == 1:
            held.append(job)  # ~1,700 held: the ring grows, and some numbers share ring entries
        else:
            assert sched.release(job) is True and sched.release(job) is False
    assert sched.reservations.count() == 1 + len(held) == int(sched.reservations.inflight[0])
    for job in [first, *held]:
        assert sched.reservations.get(job) is not None
        assert sched.commit(job) is None and sched.release(job) is True and sched.release(job) is False
    assert sched.reservations.count() == 0 and int(sched.reservations.inflight[0]) == 0


def test_a_callers_job_id_in_the_generated_form_is_the_same_id(make_scheduler):
    """An id a caller chose that reads like a generated one (prefix + number) is held once: the
    dispatcher's own job of that number gets another id, and look-alikes (a leading zero) are other ids."""
    sched = make_scheduler()
    sched.register_node("n", ["zh", "en"], max_concurrency=100)
    probe = sched.dispatch("s", "zh", "en").job_id
    prefix = probe.rstrip("0123456789")
    assert probe == prefix + "1" and sched.release(probe)
    mine = sched.dispatch("s", "zh", "en", job_id=prefix + "3")
    twin = sched.dispatch("s", "zh", "en", job_id=prefix + "03")
    assert mine.job_id == prefix + "3" and twin.job_id == prefix + "03"
    made = [sched.dispatch("s", "zh", "en").job_id for _ in range(3)]
    assert prefix + "3" not in made and len(set(made)) == 3
    assert sched.reservations.count() == 5 == int(sched.reservations.inflight[0])
    assert sched.release(prefix + "3") and sched.release(prefix + "03")
    assert not sched.release(prefix + "3") and not sched.release(prefix + "003")
    for job in made:
        assert sched.release(job)
    assert sched.reservations.count() == 0 == int(sched.reservations.inflight[0])


def test_generated_job_ids_are_the_prefix_and_the_decimal_number_at_every_width(kernel_name):
    """The compiled dispatcher writes its job ids itself, two digits at a time: every width, 1 to 19 digits,
    reads exactly as ``prefix + str(number)`` (the twin's f-string), and release finds each one by it."""
    sched = pysched.Scheduler(kernel=kernel_name)
    fast, prefix = sched._fast, sched._job_prefix
    numbers = set(range(0, 1200)) | {2**63 - 1, 2**62, 2**31, 2**32 + 7}
    for k in range(1, 19):
        numbers |= {10**k - 1, 10**k, 10**k + 1, 10**k + 10, 10**k + 99}
    for seq in sorted(numbers):
        assert fast.job_id_of(seq) == f"{prefix}{seq}"
    with pytest.raises(ValueError, match="seq must be >= 0"):
        fast.job_id_of(-1)
    sched.register_node("n", ["zh", "en"], max_concurrency=10)
    made = [sched.dispatch("s", "zh", "en").job_id for _ in range(3)]
    assert made == [f"{prefix}{k}" for k in (1, 2, 3)] and fast.new_job_id() == f"{prefix}4"
    assert all(sched.release(j) for j in made)


def test_the_default_clock_is_time_monotonic_to_the_bit(kernel_name):
    """With the default clock the compiled dispatcher reads CLOCK_MONOTONIC itself (on Linux): the
    values are time.monotonic()'s, in order with it, so both paths of one scheduler share one clock."""
    import time

    sched = pysched.Scheduler(kernel=kernel_name)
    now = sched._fast.now
    for _ in range(1000):
        before = time.monotonic()
        mine = now()
        after = time.monotonic()
        assert type(mine) is float and before <= mine <= after
    sched.close()


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_OPS = st.lists(st.tuples(st.sampled_from(["reserve", "commit", "renew", "release", "expire", "tick", "reserve_h",
                                           "release_h", "commit_h"]),
                          st.integers(0, 11), st.integers(0, 3), st.integers(-1, 3)), max_size=120)


@settings(max_examples=150, deadline=None)
@given(_OPS)
def test_job_table_twin_matches_the_compiled_table(ops):
    from pysched import _core, _pycore

    tables = []
    for core in (_core, _pycore):
        counts = core.SlotCounts(8)
        table = core.JobTable(counts, prefix="j")
        for slot in range(3):
            table.bind(slot)
        tables.append((table, counts))
    now = 0.0
    for op, j, slot, other in ops:
        # j1..j9 are numbered ids (the compiled table files them by number); j0, j010, j011 are not
        job = f"j{j}" if j < 10 else f"j0{j}"
        if op == "tick":
            now += 0.75
            continue
        results = []
        for table, counts in tables:
            if op == "reserve":
                results.append(table.reserve(job, slot, 2, 0, 7, "s", now + 1.0 + j % 3, ("zh", "en")))
            elif op == "commit":
                results.append(table.commit(job, other, now + 5.0, now))
            elif op == "renew":
                results.append(table.renew(job, other, now + 2.0, now))
            elif op == "release":
                results.append(table.release(job, other, now))
            elif op == "expire":
                results.append(table.expire(now))
            elif op == "reserve_h":
                results.append(table.reserve_handle(slot, 2, 0, 7, "s", now + 1.0 + j % 3))
            elif op == "release_h":
                results.append(table.release_handle((1 + j % 3) << 32 | j, other, now))
            elif op == "commit_h":
                results.append(table.commit_handle((1 + j % 3) << 32 | j, other, now + 5.0, now))
            results[-1] = (results[-1], len(table), table.committed, table.expired, table.next_expiry,
                           counts.array.tolist(), table.jobs(), table.get(job, now))
        assert results[0] == results[1], (op, job)


@pytest.mark.parametrize("services", [(["asr"],), frozenset({("asr",)}) and (("asr", ["x"]),)])
def test_unhashable_services_name_the_argument(make_scheduler, services):
    sched = make_scheduler()
    sched.register_node("a", ["zh", "en"])
    for call in (lambda: sched.dispatch("s", "zh", "en", services=services),
                 lambda: sched.explain("zh", "en", services=services)):
        with pytest.raises(TypeError, match="services"):
            call()
    assert sched.stats()["sessions"] == 0 and sched.reservations.count() == 0


def test_any_heartbeat_forgets_a_long_dead_node(make_scheduler, clock):
    sched = make_scheduler(heartbeat_timeout=10.0, forget_after=100.0)
    seen = _events(sched)
    sched.register_node("dead", ["zh", "en"])
    sched.register_node("alive", ["zh", "en"])
    clock.advance(50.0)
    sched.heartbeat("alive")
    assert "dead" in [n for p in sched.pools() for n in p.node_ids]
    clock.advance(61.0)  # dead: silent 111 s, offline for 101 s
    sched.heartbeat("alive")
    assert [p.node_ids for p in sched.pools()] == [("alive",)]
    assert [e[:2] for e in seen if e[0] == "forget"] == [("forget", "dead")]


def test_node_ids_lists_registered_nodes(make_scheduler):
    sched = make_scheduler()
    for n in ("b", "a", "c"):
        sched.register_node(n, ["zh", "en"])
    sched.remove_node("a")
    assert sched.node_ids() == ["b", "c"]
