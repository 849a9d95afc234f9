"""The per-pool ordering: exact decisions, kept in step with every change, same on both kernels.

The compiled kernel finds a pool's best candidates in a tournament tree kept
up to date by in-flight count changes (``SlotCounts``), heartbeats
(``LoadTable.update``) and publications (a new kernel retargets it); the
pure-Python twin makes the same decisions by scanning. These tests drive
both through random fleets and random sequences of operations and check,
after every decision, that they agree exactly and that the answer is one of
the equally best eligible nodes according to an independent brute force.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Container
from fractions import Fraction
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

import pysched
from pysched import _layout as L
from pysched import _pycore

if TYPE_CHECKING:
    from pysched import _core as _core_types

_core = pytest.importorskip("pysched._core", reason="the compiled kernel is not built")

TIMEOUT = 45.0
THRESHOLD = 85.0
CORES = (_core, _pycore)


# ---------------------------------------------------------------- a fleet driven on both kernels
class Twin:
    """The same fleet on one kernel implementation: records, load table, counts, pools, kernel.

    ``rng_cls``: the kernel's ``Rng`` or a subclass of it (default ``core.Rng``).
    """

    def __init__(self, core: ModuleType, n: int, pools: list[list[int]], recs: NDArray[np.void], seed: int,
                 rng_cls: Callable[[int], Any] | None = None) -> None:
        self.core = core
        self.counts: _core_types.SlotCounts = core.SlotCounts(n)
        self.loads: _core_types.LoadTable = core.LoadTable(n)
        self.recs = recs.copy()
        self.pools = [list(p) for p in pools]
        self.rng: _core_types.Rng = (rng_cls or core.Rng)(seed)
        self.kernel = self.build()

    def build(self) -> _core_types.SnapshotKernel:
        off = np.zeros(len(self.pools) + 1, dtype=np.int32)
        off[1:] = np.cumsum([len(p) for p in self.pools])
        members = np.array([s for p in self.pools for s in p], dtype=np.int32)
        order = list(range(len(self.pools)))
        pair_off = np.array([0, len(order), 2 * len(order)], dtype=np.int32)
        pair_pools = np.array(order + order, dtype=np.int32)
        recs = self.recs.copy()
        recs.flags.writeable = False
        kernel: _core_types.SnapshotKernel = self.core.SnapshotKernel(
            recs, self.loads, self.counts.array, off, members, pair_off, pair_pools, 1, self.rng, TIMEOUT, THRESHOLD,
            4096, [f"n{i}" for i in range(len(recs))])
        return kernel

    def republish(self, changed: list[int] | None = None) -> None:
        """A publication that changes records only (pools shared); ``changed``: the slots it changed."""
        recs = self.recs.copy()
        recs.flags.writeable = False
        self.kernel = self.kernel.with_records(recs, self.loads, self.counts.array, changed)


def _ordering(kernel: _core_types.SnapshotKernel) -> _core_types.Ordering:
    """The kernel's ordering, which the test expects it to have."""
    ordering = kernel.ordering
    assert ordering is not None
    return ordering


def _ordered(kernel: _core_types.SnapshotKernel) -> bool:
    """``kernel.ordered``, read afresh (a type checker keeps what an earlier assert established)."""
    return kernel.ordered


def _fleet(data: st.DataObject, n: int) -> NDArray[np.void]:
    draw = data.draw
    recs = np.zeros(n, dtype=L.NODE_DTYPE)
    recs["service_mask"] = draw(st.lists(st.sampled_from([0b11, 0b11, 0b11, 0b01, 0b10]), min_size=n, max_size=n))
    recs["max_concurrency"] = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    recs["status"] = draw(st.lists(st.sampled_from([0, 0, 0, 0, 1, 2, 3, 4]), min_size=n, max_size=n))
    recs["flags"] = draw(st.lists(st.sampled_from([3, 3, 3, 1, 2]), min_size=n, max_size=n))
    return recs


def _pools(data: st.DataObject, n: int, big: bool = False) -> list[list[int]]:
    """1-3 pools of random members; ``big``: the first has all but a few of the ``n`` nodes."""
    draw = data.draw
    n_pools = draw(st.integers(1, 3))
    # overlapping pools (manual mode) and empty ones happen too
    pools = [sorted(draw(st.sets(st.integers(0, n - 1), max_size=n))) for _ in range(n_pools)]
    if big:
        pools[0] = sorted(set(range(n)) - draw(st.sets(st.integers(0, n - 1), max_size=8)))
    return pools


# what an older kernel was built with: its pools and records
_View = tuple[list[list[int]], NDArray[np.void]]
# an older kernel of each fleet, and the view it was built with
_Old = tuple["_core_types.SnapshotKernel", "_core_types.SnapshotKernel", _View]


def _oracle(
    t: Twin, pool: int, mask: int, need: int, now: float, exclude: Container[int], view: _View | None = None
) -> tuple[set[int], set[int]]:
    """(eligible slots, the best of them) by brute force, independent of either kernel.

    ``view``: the (pools, records) an older kernel was built with.
    """
    pools, recs = view or (t.pools, t.recs)
    loads = t.loads.array
    elig: list[tuple[int, tuple[Fraction, float]]] = []
    for s in pools[pool]:
        rec, load = recs[s], loads[s]
        eff = max(int(t.counts.array[s]), int(load["running"]))
        ok = (int(rec["status"]) == L.STATUS_READY
              and now - float(load["last_heartbeat"]) <= TIMEOUT
              and not (need & L.NEED_GPU and not rec["flags"] & L.FLAG_HAS_GPU)
              and not (need & L.NEED_PUBLIC and not rec["flags"] & L.FLAG_PUBLIC)
              and not need & L.NEED_UNKNOWN_SERVICE
              and int(rec["service_mask"]) & mask == mask
              and s not in exclude
              and eff < int(rec["max_concurrency"])
              and max(float(load["cpu"]), float(load["gpu"]), float(load["mem"])) < THRESHOLD)
        if ok:
            elig.append((s, (Fraction(eff, int(rec["max_concurrency"])), float(load["gpu"]))))
    best = min((k for _, k in elig), default=None)
    return {s for s, k in elig}, {s for s, k in elig if k == best}


def _check_decision(
    fleets: tuple[Twin, Twin], pool: int, mask: int, need: int, now: float, exclude: tuple[int, ...],
    old: _Old | None = None,
) -> None:
    tc, tp = fleets
    view: _View | None
    kc, kp, view = old if old else (tc.kernel, tp.kernel, None)
    pool %= len(view[0] if view else tc.pools)
    got_c = kc.pick(pool, mask, need, now, exclude)
    got_p = kp.pick(pool, mask, need, now, exclude)
    assert got_c == got_p
    _, best = _oracle(tc, pool, mask, need, now, set(exclude), view)
    if best:
        assert got_c in best, (got_c, best)
    else:
        assert got_c == -1
    assert _ordering(tc.kernel).evicted_slots() == _ordering(tp.kernel).evicted_slots()
    assert _ordering(tc.kernel).horizon == _ordering(tp.kernel).horizon
    _ordering(tc.kernel).check()


@pytest.mark.parametrize("big", [False, True], ids=["small", "big"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_operations_keep_both_kernels_exact_and_equal(big: bool, data: st.DataObject) -> None:
    """Random changes and decisions on both kernels: the same decisions, each one of the best, trees exact.

    Trees start flat (masks of the members in and of the best ones) and take
    either shape at random points; ``big``: a pool of 65-96 members, whose
    masks are two words.
    """
    draw = data.draw
    n = draw(st.integers(73, 96) if big else st.integers(1, 24), label="nodes")
    recs = _fleet(data, n)
    pools = _pools(data, n, big)
    seed = draw(st.integers(0, 2**32))
    fleets = (Twin(_core, n, pools, recs, seed), Twin(_pycore, n, pools, recs, seed))
    now = 1000.0
    for t in fleets:
        for s in range(n):
            t.loads.update(s, now - 10.0, 10.0, 10.0, 10.0, 0)
    assert fleets[0].kernel.ordered and fleets[1].kernel.ordered
    old: _Old | None = None
    for _ in range(draw(st.integers(1, 60), label="operations")):
        op = draw(st.sampled_from(["reserve", "reserve", "release", "heartbeat", "heartbeat", "status",
                                   "members", "time", "decide", "decide", "decide", "old", "grow", "batch",
                                   "shape"]))
        if op == "reserve":
            s = draw(st.integers(0, n - 1))
            lim = int(fleets[0].recs[s]["max_concurrency"])
            run = int(fleets[0].loads.get(s)[4])
            assert fleets[0].counts.try_add(s, lim, run) == fleets[1].counts.try_add(s, lim, run)
        elif op == "release":
            s = draw(st.integers(0, n - 1))
            if fleets[0].counts.get(s) > 0:
                for t in fleets:
                    t.counts.add(s, -1)
        elif op == "heartbeat":
            s = draw(st.integers(0, n - 1))
            fig = st.one_of(st.just(float("nan")), st.sampled_from([0.0, 10.0, 20.0, 84.999999, 85.0, 99.0]))
            cpu, gpu, mem = draw(fig), draw(fig), draw(fig)
            run = draw(st.integers(-1, 5))
            for t in fleets:
                t.loads.update(s, now, cpu, gpu, mem, run)
        elif op == "status":
            s = draw(st.integers(0, n - 1))
            status = draw(st.sampled_from([0, 0, 2, 3, 4]))
            mx = draw(st.integers(1, 4))
            flags = draw(st.sampled_from([3, 1, 2]))
            services = draw(st.sampled_from([0b11, 0b01, 0b10, 0b00]))
            hint = draw(st.booleans())  # the publisher names the changed slot, or the kernel compares
            for t in fleets:
                t.recs[s]["status"], t.recs[s]["max_concurrency"], t.recs[s]["flags"] = status, mx, flags
                t.recs[s]["service_mask"] = services  # no part of the key: the slot's brief must follow it
                t.republish([s] if hint else None)
        elif op == "shape":
            # a tree changes shape by itself only after many changes in a row: here at any point, to drive
            # both shapes and the changes between them (the same answers either way)
            pool = draw(st.integers(0, len(fleets[0].pools) - 1))
            shape = draw(st.sampled_from(["flat", "tree"]))
            ordering = _ordering(fleets[0].kernel)
            ordering.set_shape(pool, shape)
            assert ordering.shape(pool) == shape
            ordering.check()
        elif op == "members":
            pools = _pools(data, n, big)
            for t in fleets:
                t.pools = [list(p) for p in pools]
                t.kernel = t.build()
        elif op == "time":
            # forward (past the heartbeat timeout at times), and a little backwards (threads read the
            # clock before they decide, so a decision can be "older" than the one before it)
            now += draw(st.sampled_from([0.5, 5.0, 20.0, 40.0, -3.0, -20.0]))
        elif op == "old":
            old = (fleets[0].kernel, fleets[1].kernel, ([list(p) for p in fleets[0].pools], fleets[0].recs.copy()))
        elif op == "grow":
            for t in fleets:
                t.counts = t.counts.grown(n)  # same size: still a new array, the old one forwards
                t.loads = t.loads.grown(n)
            assert not _ordered(fleets[0].kernel) and not _ordered(fleets[1].kernel)
            for t in fleets:
                t.kernel = t.build()
            old = None
        elif op == "batch":
            m = draw(st.integers(1, 6))
            src = np.zeros(m, dtype=np.int32)
            tgt = np.zeros(m, dtype=np.int32)
            masks = np.array([draw(st.sampled_from([0b01, 0b11])) for _ in range(m)], dtype=np.uint64)
            needs = np.array([draw(st.sampled_from([0, 1, 3])) for _ in range(m)], dtype=np.int32)
            tenant = np.full(m, -1, dtype=np.int32)
            session_of = np.array([draw(st.integers(0, 1)) for _ in range(m)], dtype=np.int32)
            excl_off = np.zeros(m + 1, dtype=np.int32)
            outs = []
            for t in fleets:
                scratch = np.array(t.counts.array, dtype=np.int32)
                out = np.zeros(m, dtype=np.int64)
                t.kernel.select_batch(src, tgt, masks, needs, tenant, session_of, np.full(2, -1, np.int64),
                                      np.full(2, -1, np.int32), excl_off, np.zeros(0, np.int32), scratch, now, out)
                outs.append((out.tolist(), scratch.tolist()))
            assert outs[0] == outs[1]
        else:  # decide
            pool = draw(st.integers(0, len(fleets[0].pools) - 1))
            mask = draw(st.sampled_from([0b00, 0b01, 0b11]))
            need = draw(st.sampled_from([0, L.NEED_GPU, L.NEED_PUBLIC, L.NEED_GPU | L.NEED_PUBLIC]))
            exclude = tuple(draw(st.lists(st.integers(0, n - 1), max_size=3)))
            _check_decision(fleets, pool, mask, need, now, exclude, old)
    assert fleets[0].rng.decisions == fleets[1].rng.decisions


# ---------------------------------------------------------------- the scheduler uses it, and it follows
def test_scheduler_kernel_decides_by_the_ordering() -> None:
    sched = pysched.Scheduler(seed=1, kernel="compiled")
    for i in range(20):
        sched.register_node(f"n{i}", languages=["en", "zh"], max_concurrency=3)
    kernel = sched.snapshot.kernel
    assert kernel.ordered, "the local backend's counts must be followed by the ordering"
    jobs = [sched.dispatch(f"s{i}", "en", "zh").job_id for i in range(25)]
    ordering = _ordering(sched.snapshot.kernel)
    ordering.check()
    assert ordering.best(0) == (ordering.best(0)[0], 15)  # 15 idle nodes tie for best
    for job in jobs[:5]:
        sched.release(job)
    sched.heartbeat("n3", running=2, gpu=40.0)
    sched.drain_node("n4")
    sched.register_node("n20", languages=["en", "zh"], max_concurrency=3)
    assert sched.snapshot.kernel.ordered
    _ordering(sched.snapshot.kernel).check()
    assert not kernel.ordered  # an older kernel decides by scanning: the same decisions, no trees


@pytest.mark.parametrize("kernel", ["compiled", "python"])
def test_a_silent_node_is_evicted_once_and_back_with_its_next_heartbeat(kernel: str) -> None:
    t = [1000.0]
    sched = pysched.Scheduler(seed=3, clock=lambda: t[0], heartbeat_timeout=30.0, kernel=kernel)
    for i in range(4):
        sched.register_node(f"n{i}", languages=["en", "zh"], max_concurrency=10)
    t[0] += 20.0
    for i in (1, 2, 3):
        sched.heartbeat(f"n{i}", running=1)  # n0 stays idle (the best) but goes silent
    t[0] += 15.0  # n0's last heartbeat is 35 s old
    a = sched.dispatch("s", "en", "zh")
    assert a.node_id != "n0"
    ordering = _ordering(sched.snapshot.kernel)
    assert ordering.evicted_slots() == [sched.snapshot.slot("n0")]
    assert ordering.horizon == 1000.0 + 30.0
    ordering.check()
    sched.heartbeat("n0")
    assert ordering.evicted_slots() == []
    assert sched.dispatch("s2", "en", "zh").node_id == "n0"


def test_a_decision_older_than_an_eviction_still_sees_the_evicted_node() -> None:
    """Threads read the clock before deciding: a decision "from before" an eviction must stay exact."""
    for core in CORES:
        f = Twin(core, 3, [[0, 1, 2]], np.zeros(3, dtype=L.NODE_DTYPE), 5)
        f.recs["service_mask"] = 0b11
        f.recs["max_concurrency"] = 4
        f.recs["flags"] = 3
        f.kernel = f.build()
        f.loads.update(0, 100.0, 1.0, 1.0, 1.0, 0)  # idle, heartbeat at 100
        f.loads.update(1, 140.0, 1.0, 1.0, 1.0, 1)
        f.loads.update(2, 140.0, 1.0, 1.0, 1.0, 1)
        assert f.kernel.pick(0, 0b11, 3, 150.0) in (1, 2)  # node 0 is 50 s silent: evicted
        assert _ordering(f.kernel).evicted_slots() == [0]
        assert f.kernel.pick(0, 0b11, 3, 144.0) == 0  # at 144 it was 44 s silent: still the best


def test_the_twin_retargets_only_between_decisions() -> None:
    """A publication's retarget copies the evicted set: it must wait for a decision, which may evict.

    Unlocked, the copy raised "Set changed size during iteration" when a
    dispatching thread evicted meanwhile (CI, the forget stress test). The
    compiled retarget is one GIL-held call and cannot interleave. Holding the
    ordering's lock stands for a decision in progress; the assertions hold
    however the threads are scheduled (the publication cannot end while the
    lock is held).
    """
    f = Twin(_pycore, 3, [[0, 1, 2]], np.zeros(3, dtype=L.NODE_DTYPE), 5)
    o = _ordering(f.kernel)
    epoch = o.epoch
    published: list[Any] = []
    publisher = threading.Thread(target=lambda: published.append(f.build()))
    with o.lock:
        publisher.start()
        publisher.join(0.2)
        assert publisher.is_alive() and not published and o.epoch == epoch
        o.evict(1, 200.0)  # what a decision may do meanwhile
    publisher.join(60)
    assert not publisher.is_alive() and o.epoch == epoch + 1
    assert _ordering(published[0]) is o and o.evicted_slots() == [1]


def test_excluded_and_filtered_candidates_are_skipped_exactly() -> None:
    for core in CORES:
        n = 64
        recs = np.zeros(n, dtype=L.NODE_DTYPE)
        recs["service_mask"] = 0b11
        recs["max_concurrency"] = 4
        recs["flags"] = [1 if s % 8 else 3 for s in range(n)]  # one node in 8 accepts public jobs
        f = Twin(core, n, [list(range(n))], recs, 9)
        for s in range(n):
            f.loads.update(s, 100.0, 1.0, float(s % 3), 1.0, 0)
        # public + gpu: only slots 0, 8, 16...; the best of them has gpu 0: slots 0, 24, 48
        picks = {f.kernel.pick(0, 0b11, 3, 100.0) for _ in range(60)}
        assert picks == {0, 24, 48}
        assert {f.kernel.pick(0, 0b11, 3, 100.0, (0, 24)) for _ in range(10)} == {48}
        # every candidate of the best class excluded: the next class, exactly
        best = {f.kernel.pick(0, 0b11, 0, 100.0, tuple(range(0, n, 3))) for _ in range(200)}
        assert best == {s for s in range(n) if s % 3 == 1}  # 21 ties, 200 draws: each one comes up


def test_a_single_best_candidate_filtered_out_is_skipped_and_put_back() -> None:
    """One best candidate: the kernel takes the root's best without a descent; rejected, it is hidden and restored."""
    for core in CORES:
        n = 40
        recs = np.zeros(n, dtype=L.NODE_DTYPE)
        recs["service_mask"] = [0b01 if s in (5, 17) else 0b11 for s in range(n)]
        recs["max_concurrency"] = 4
        recs["flags"] = 3
        f = Twin(core, n, [list(range(n)), list(range(0, n, 2))], recs, 4)
        for s in range(n):
            # every key distinct: the best is slot 5, then 17, then 6, then 7 ...
            gpu = {5: 0.0, 17: 0.5}.get(s, 1.0 + s)
            f.loads.update(s, 100.0, 1.0, gpu, 1.0, 0)
        assert f.kernel.pick(0, 0b01, 3, 100.0) == 5
        assert f.kernel.pick(0, 0b11, 3, 100.0) == 0  # 5 and 17 lack service 2: the next best, slot 0
        assert f.kernel.pick(1, 0b11, 3, 100.0) == 0  # the other pool's tree: 5 and 17 are not members
        assert f.kernel.pick(0, 0b11, 3, 100.0, (0,)) == 1
        if core is _core:
            _ordering(f.kernel).check()  # every hidden leaf is back
            assert _ordering(f.kernel).best(0) == (5, 1)
        assert f.kernel.pick(0, 0b01, 3, 100.0) == 5


@pytest.mark.parametrize("hint", [True, False], ids=["named", "compared"])
def test_changes_that_leave_the_key_alone_still_reach_the_decision(hint: bool) -> None:
    """Services, flags, heartbeat time: no part of the ordering key, all checked from the slot's brief.

    The best node's services, then its GPU flag, then its heartbeat's age
    change while its key (load, max, GPU use) stays the same, so its leaf is
    never touched; each decision must still see the change, on both kernels,
    whether the publication names the changed slot or the kernel compares.
    """
    n = 8
    recs = np.zeros(n, dtype=L.NODE_DTYPE)
    recs["service_mask"] = 0b11
    recs["max_concurrency"] = 4
    recs["flags"] = L.FLAG_HAS_GPU | L.FLAG_PUBLIC
    fleets = (Twin(_core, n, [list(range(n))], recs, 9), Twin(_pycore, n, [list(range(n))], recs, 9))
    for t in fleets:
        for s in range(n):
            t.loads.update(s, 100.0, 1.0, 10.0 + s, 1.0, 0)  # slot 0 the best, then 1, 2 ...
    need = L.NEED_GPU | L.NEED_PUBLIC

    def decide(mask: int, now: float = 100.0) -> int:
        got = {t.kernel.pick(0, mask, need, now) for t in fleets}
        assert len(got) == 1, got
        _ordering(fleets[0].kernel).check()  # every key and brief as recomputed from the arrays
        return got.pop()

    assert decide(0b11) == 0
    for t in fleets:
        t.recs[0]["service_mask"] = 0b01  # slot 0 loses service 2: same key
        t.republish([0] if hint else None)
    assert _ordering(fleets[0].kernel).best(0) == (0, 1)  # still the tree's best ...
    assert decide(0b11) == 1  # ... but not eligible for service 2
    assert decide(0b01) == 0
    for t in fleets:
        t.recs[1]["flags"] = L.FLAG_PUBLIC  # slot 1 loses its GPU: same key
        t.republish([1] if hint else None)
    assert decide(0b11) == 2
    for t in fleets:
        for s in range(1, n):
            t.loads.update(s, 130.0, 1.0, 10.0 + s, 1.0, 0)  # a heartbeat for all but slot 0
    assert decide(0b01, 130.0) == 0  # slot 0's last heartbeat is 30 s old: within the timeout
    assert decide(0b01, 100.0 + TIMEOUT + 1.0) == 2  # now past it: evicted; slot 1 has no GPU: slot 2
    assert _ordering(fleets[0].kernel).evicted_slots() == [0]


def test_ties_are_uniform_over_many_idle_nodes() -> None:
    sched = pysched.Scheduler(seed=11, kernel="compiled")
    for i in range(50):
        sched.register_node(f"n{i}", languages=["en", "zh"], max_concurrency=1000)
    counts: dict[str, int] = {}
    for i in range(5000):
        a = sched.dispatch(f"s{i % 7}", "en", "zh")
        counts[a.node_id] = counts.get(a.node_id, 0) + 1
        sched.release(a.job_id)
    assert len(counts) == 50 and min(counts.values()) > 50  # expected 100 each


def test_counts_and_loads_growing_suspend_the_ordering_until_the_next_kernel() -> None:
    for core in CORES:
        f = Twin(core, 4, [[0, 1, 2, 3]], np.zeros(4, dtype=L.NODE_DTYPE), 1)
        f.recs["max_concurrency"] = 2
        f.recs["flags"] = 3
        f.kernel = f.build()
        old = f.kernel
        assert old.ordered
        bigger = f.counts.grown(8)
        assert not _ordered(old) and bigger.ordering is old.ordering
        f.counts = bigger
        f.loads = f.loads.grown(8)
        assert f.loads.ordering is old.ordering
        f.recs = np.concatenate([f.recs, np.zeros(4, dtype=L.NODE_DTYPE)])
        f.kernel = f.build()
        assert f.kernel.ordered and f.kernel.ordering is old.ordering
        f.counts.add(2, 1)  # through the old table too: forwarded to the live one
        old_counts_slot = f.kernel.pick(0, 0, 0, 0.0)
        assert old_counts_slot in (0, 1, 3)


# ---------------------------------------------------------------- issue 10, item 10: figures as given
@pytest.mark.parametrize("kernel", ["compiled", "python"])
def test_load_figures_are_kept_and_compared_exactly(kernel: str) -> None:
    sched = pysched.Scheduler(resource_threshold=85, kernel=kernel)
    sched.register_node("a", languages=["en", "zh"])
    sched.heartbeat("a", cpu=84.999999, gpu=0.1, mem=33.3)
    assert sched.explain("en", "zh").nodes == {"a": "ok"}
    info = sched.node("a")
    assert (info["cpu"], info["gpu"], info["mem"]) == (84.999999, 0.1, 33.3)
    assert sched.dispatch("s", "en", "zh").node_id == "a"
    sched.heartbeat("a", cpu=85.0)
    assert sched.explain("en", "zh").nodes == {"a": "overloaded"}


# ---------------------------------------------------------------- issue 10, item 9: the twin's batch
def _batch_fleet(rng_cls: type[_pycore.Rng] | None = None) -> Twin:
    """Node 0 is strictly the best for live counts (lowest GPU); a batch fills it first."""
    n = 4
    recs = np.zeros(n, dtype=L.NODE_DTYPE)
    recs["service_mask"] = 0b11
    recs["max_concurrency"] = 100
    recs["flags"] = 3
    f = Twin(_pycore, n, [list(range(n))], recs, 2, rng_cls)
    for s in range(n):
        f.loads.update(s, 100.0, 1.0, 0.0 if s == 0 else 10.0, 1.0, 0)
    return f


def _run_batch(f: Twin, m: int, now: float = 100.0) -> NDArray[np.int64]:
    out = np.zeros(m, dtype=np.int64)
    scratch = np.array(f.counts.array, dtype=np.int32)
    f.kernel.select_batch(np.zeros(m, np.int32), np.zeros(m, np.int32), np.full(m, 0b11, np.uint64),
                          np.full(m, 3, np.int32), np.full(m, -1, np.int32), np.zeros(m, np.int32),
                          np.full(1, -1, np.int64), np.full(1, -1, np.int32), np.zeros(m + 1, np.int32),
                          np.zeros(0, np.int32), scratch, now, out)
    return out


def test_twin_batch_never_shows_its_scratch_counts_to_a_select_in_between() -> None:
    """Deterministic interleaving: a select runs inside the batch, between two of its requests."""
    seen = []
    holder: dict[str, _core_types.SnapshotKernel] = {}
    inside = [False]

    class Probe(_pycore.Rng):
        def next_stream(self) -> _pycore._Stream:
            k = holder.get("kernel")
            if k is not None and not inside[0]:
                inside[0] = True
                try:
                    seen.append(k.pick(0, 0b11, 3, 100.0))  # as another thread would, mid-batch
                finally:
                    inside[0] = False
            return super().next_stream()

    f = _batch_fleet(Probe)
    holder["kernel"] = f.kernel
    out = _run_batch(f, 20)
    assert {int(x) & 0xFFFFFFFF for x in out} > {0}  # the batch itself moved on from node 0
    assert len(seen) >= 20 and set(seen) == {0}  # live counts are all 0: node 0 is always the best
    assert f.counts.array.tolist() == [0, 0, 0, 0]


def test_twin_batch_and_concurrent_selects_keep_their_invariant() -> None:
    """Threads: every select made while batches run must answer by the live counts (node 0)."""
    f = _batch_fleet()
    stop = threading.Event()
    errors = []

    def batches() -> None:
        try:
            while not stop.is_set():
                _run_batch(f, 30)
        except Exception as exc:  # noqa: BLE001 - any failure is reported below
            errors.append(repr(exc))

    thread = threading.Thread(target=batches, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            assert f.kernel.pick(0, 0b11, 3, 100.0) == 0
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive() and not errors


# ---------------------------------------------------------------- exact parity through the scheduler
@pytest.mark.parametrize("seed", range(4))
def test_scheduler_with_silent_nodes_and_churn_agrees_between_kernels(seed: int) -> None:
    from conftest import FakeClock

    results = []
    for kernel in ("compiled", "python"):
        clock = FakeClock(1000.0)
        rng = np.random.default_rng(seed)
        sched = pysched.Scheduler(seed=seed, kernel=kernel, clock=clock, heartbeat_timeout=30.0)
        for i in range(30):
            sched.register_node(f"n{i}", languages=["en", "zh"] if i % 3 else ["en", "zh", "de"],
                                max_concurrency=1 + i % 4, accept_public_jobs=bool(i % 5))
        out: list[str | tuple[str, str]] = []
        jobs: list[str] = []
        for j in range(300):
            r = rng.random()
            if r < 0.1:
                clock.advance(float(rng.choice([1.0, 10.0, 25.0])))
            elif r < 0.35:
                i = int(rng.integers(0, 30))
                if i % 7:  # some nodes fall silent for good
                    sched.heartbeat(f"n{i}", running=int(rng.integers(0, 3)), gpu=float(rng.integers(0, 90)))
            elif r < 0.38:
                sched.drain_node(f"n{int(rng.integers(0, 30))}")
            elif r < 0.41:
                sched.resume_node(f"n{int(rng.integers(0, 30))}")
            elif r < 0.6 and jobs:
                sched.release(jobs.pop(int(rng.integers(0, len(jobs)))))
            else:
                tenant = "t1" if rng.random() < 0.2 else None  # None: as if not given
                try:
                    a = sched.dispatch(f"s{j % 9}", "en", str(rng.choice(["zh", "de"])), tenant=tenant)
                    out.append(a.node_id)
                    jobs.append(a.job_id)
                except pysched.NoNodeAvailable as e:
                    out.append(("none", e.best_reason))
        results.append(out)
    assert results[0] == results[1]


def _idle_pool(n: int, max_concurrency: int) -> tuple[Twin, _core_types.Ordering]:
    """One compiled pool of ``n`` idle candidates (heard from at 1000.0), and its ordering."""
    recs = np.zeros(n, dtype=L.NODE_DTYPE)
    recs["service_mask"], recs["max_concurrency"], recs["flags"] = 0b11, max_concurrency, 3
    t = Twin(_core, n, [list(range(n))], recs, 1)
    for s in range(n):
        t.loads.update(s, 1000.0, 10.0, 10.0, 10.0, 0)
    return t, _ordering(t.kernel)


def test_only_trees_of_at_most_16384_leaves_are_ever_flat() -> None:
    """A pool of 16,384 members starts flat; one more member makes 32,768 leaves, never flat."""
    for n, shape in ((16384, "flat"), (16385, "tree")):
        _, ordering = _idle_pool(n, 2)
        assert ordering.shape(0) == shape
        assert ordering.best(0) == (0, n)
        if shape == "tree":
            with pytest.raises(ValueError, match="too many for a flat tree"):
                ordering.set_shape(0, "flat")
        ordering.check()


def test_a_flat_tree_over_several_words_stays_exact() -> None:
    """Best members across three mask words: one getting better clears them all, the first best moves on."""
    n = 150
    t, ordering = _idle_pool(n, 4)
    assert ordering.shape(0) == "flat" and ordering.best(0) == (0, n)
    for s in range(n):
        assert t.counts.try_add(s, 4, 0)  # all at one job: still all tied
    assert ordering.best(0) == (0, n)
    t.counts.add(100, -1)  # better than every other: best alone, in the second word
    assert ordering.best(0) == (100, 1)
    ordering.check()
    assert t.counts.try_add(100, 4, 0)  # tied with all again (the masks are scanned again)
    assert ordering.best(0) == (0, n)
    for s in range(70):
        assert t.counts.try_add(s, 4, 0)  # the first best moves on, word by word
        assert ordering.best(0) == (s + 1, n - s - 1)
    ordering.check()
    assert {t.kernel.pick(0, 0b11, 3, 1000.0) for _ in range(200)} <= set(range(70, n))


def _dispatch_new_sessions(sched: pysched.Scheduler, k: int, out: list[object], jobs: list[str]) -> None:
    """``k`` dispatches en -> zh, each for a new session: nodes into ``out``, job ids into ``jobs``."""
    for _ in range(k):
        a = sched.dispatch(f"s{len(out)}", "en", "zh")
        out.append(a.node_id)
        jobs.append(a.job_id)


def test_a_small_pool_takes_the_shape_its_loads_speak_for() -> None:
    """A pool of at most 16,384 nodes is a flat tree while many of them tie, one of inner nodes once a single
    node is best scan after scan, and flat again when they tie again; the decisions stay the twin's."""
    results = []
    shapes: list[str] = []
    for kernel in ("compiled", "python"):
        sched = pysched.Scheduler(seed=5, kernel=kernel)
        names = [f"n{i}" for i in range(32)]
        for name in names:
            sched.register_node(name, languages=["en", "zh"], max_concurrency=1000)
        out: list[object] = []
        jobs: list[str] = []
        _dispatch_new_sessions(sched, 40, out, jobs)  # idle: all 32 tie, then the 24 with one job
        if kernel == "compiled":
            shapes.append(_ordering(sched.snapshot.kernel).shape(0))
        for i, name in enumerate(names):
            sched.heartbeat(name, gpu=float(i))  # one best at a time: each reservation of it, a scan
        _dispatch_new_sessions(sched, 40, out, jobs)
        if kernel == "compiled":
            _ordering(sched.snapshot.kernel).check()
            shapes.append(_ordering(sched.snapshot.kernel).shape(0))
        for name in names:
            sched.heartbeat(name, gpu=0.0)
        for job in jobs:
            sched.release(job)
        _dispatch_new_sessions(sched, 80, out, jobs)  # all tie again
        if kernel == "compiled":
            _ordering(sched.snapshot.kernel).check()
            shapes.append(_ordering(sched.snapshot.kernel).shape(0))
        results.append(out)
    assert shapes == ["flat", "tree", "flat"]
    assert results[0] == results[1]


@pytest.mark.parametrize(("gpu_step", "shape"), [(0.0, "flat"), (1.0, "tree")])
def test_a_new_tree_starts_in_the_shape_its_loads_speak_for(gpu_step: float, shape: str) -> None:
    """A pool's tree made anew (a node joins) starts flat only when enough of its members tie for best:
    with one node best alone (distinct GPU figures) it has inner nodes from the start, without first
    paying a flat tree's scans. Its decisions are the twin's either way."""
    picks = []
    for kernel in ("compiled", "python"):
        sched = pysched.Scheduler(seed=2, kernel=kernel)
        for i in range(200):
            sched.register_node(f"n{i}", languages=["en", "zh"], max_concurrency=1000)
            sched.heartbeat(f"n{i}", gpu=gpu_step * (i % 90))
        sched.register_node("late", languages=["en", "zh"], max_concurrency=1000)  # a new tree for the pool
        sched.heartbeat("late", gpu=gpu_step * 95)
        out: list[object] = []
        _dispatch_new_sessions(sched, 3, out, [])
        if kernel == "compiled":
            ordering = _ordering(sched.snapshot.kernel)
            assert ordering.shape(0) == shape
            ordering.check()
        picks.append(out)
    assert picks[0] == picks[1]


@pytest.mark.parametrize("seed", range(3))
def test_tied_pools_small_and_big_stay_exact_and_agree_between_kernels(seed: int) -> None:
    """Many ties (small maxima, integer loads, few GPU figures) in a 40-node and a 300-node pool.

    A tree repair settles most levels from its nodes' tie counts and reads
    keys only where the order between two halves changes, and the descent to
    the r-th tied leaf is computed without branches in small trees only: both
    sizes are driven through every kind of change (reserve, release,
    heartbeat, drain, exclusion, a node in or out), the compiled trees are
    checked against a rebuild after every step, and both kernels decide alike.
    """
    results = []
    for kernel in ("compiled", "python"):
        rng = np.random.default_rng(seed)
        sched = pysched.Scheduler(seed=seed, kernel=kernel)
        names = [f"n{i}" for i in range(340)]
        for i, name in enumerate(names):
            sched.register_node(name, languages=["en", "zh"] if i < 300 else ["en", "de"],
                                max_concurrency=1 + i % 3)
        out: list[object] = []
        jobs: list[str] = []
        for j in range(700):
            r = rng.random()
            if r < 0.25:
                i = int(rng.integers(0, 340))
                sched.heartbeat(names[i], running=int(rng.integers(0, 3)), gpu=float(rng.choice([0.0, 10.0, 20.0])))
            elif r < 0.28:
                i = int(rng.integers(0, 340))
                (sched.drain_node if rng.random() < 0.5 else sched.resume_node)(names[i])
            elif r < 0.5 and jobs:
                sched.release(jobs.pop(int(rng.integers(0, len(jobs)))))
            else:
                tgt = "zh" if rng.random() < 0.6 else "de"
                exclude = [names[int(k)] for k in rng.integers(0, 340, size=int(rng.integers(0, 3)))]
                try:
                    a = sched.dispatch(f"s{j % 11}", "en", tgt, exclude=exclude or None)
                    out.append(a.node_id)
                    jobs.append(a.job_id)
                except pysched.NoNodeAvailable as e:
                    out.append(("none", e.best_reason))
            if kernel == "compiled":
                _ordering(sched.snapshot.kernel).check()
        for job in jobs:
            sched.release(job)
        if kernel == "compiled":
            _ordering(sched.snapshot.kernel).check()
        assert int(np.asarray(sched.snapshot.inflight).sum()) == 0
        results.append(out)
    assert results[0] == results[1]
    assert len({o for o in results[0] if isinstance(o, str)}) > 50  # the ties really spread the jobs


@pytest.mark.parametrize("seed", [5, 11])
def test_a_big_varied_pool_descends_to_the_same_tied_node_on_both_kernels(seed: int) -> None:
    """A 1,000-node pool with varied loads: a few best among many, so its tree has inner nodes.

    A draw of the r-th tied leaf stops its descent at the first node where
    ``r`` is 0 (that node's own best); the twin counts the r-th tie in member
    order. Both kernels must pick the very same node every time, every pick
    one of the best, and every tie must come up.
    """
    results = []
    for kernel in ("compiled", "python"):
        rng = np.random.default_rng(seed)
        sched = pysched.Scheduler(seed=seed, kernel=kernel, heartbeat_timeout=86_400.0)
        names = [f"n{i}" for i in range(1000)]
        for name in names:
            sched.register_node(name, languages=["en", "zh"], max_concurrency=1_000)
            sched.heartbeat(name, running=int(rng.integers(0, 4)), gpu=float(rng.integers(0, 41)))
        out: list[str] = []
        jobs: list[str] = []
        for j in range(600):
            if jobs and rng.random() < 0.3:
                sched.release(jobs.pop(int(rng.integers(0, len(jobs)))))
            a = sched.dispatch(f"s{j % 7}", "en", "zh")
            out.append(a.node_id)
            jobs.append(a.job_id)
        if kernel == "compiled":
            o = _ordering(sched.snapshot.kernel)
            o.check()
            assert o.shape(0) == "tree"  # the one pool
        for job in jobs:
            sched.release(job)
        results.append(out)
    assert results[0] == results[1]
    assert len(set(results[0])) > 250  # the ties spread the jobs


# ---------------------------------------------------------------- concurrency: the trees stay exact
def test_trees_stay_exact_under_concurrent_dispatch_heartbeats_and_publications() -> None:
    """4 dispatching threads, 1 heartbeat thread, 1 thread publishing; then every tree is checked.

    Bounded by operation counts, not by time: nothing depends on how fast a thread runs.
    """
    sched = pysched.Scheduler(seed=5, kernel="compiled")
    for i in range(64):
        sched.register_node(f"n{i}", languages=["en", "zh"] if i % 4 else ["en", "zh", "de"], max_concurrency=3)
    errors = []

    def dispatcher(k: int) -> None:
        try:
            held = []
            for j in range(1500):
                with contextlib.suppress(pysched.NoNodeAvailable):
                    held.append(sched.dispatch(f"s{k}-{j % 13}", "en", "zh").job_id)
                if len(held) > 20 or (held and j % 3 == 0):
                    sched.release(held.pop(0))
            for job in held:
                sched.release(job)
        except Exception as exc:  # noqa: BLE001 - any failure is reported below
            errors.append(repr(exc))

    def heartbeats() -> None:
        try:
            for j in range(3000):
                sched.heartbeat(f"n{j % 64}", running=j % 3, gpu=float(j % 50))
        except Exception as exc:  # noqa: BLE001 - any failure is reported below
            errors.append(repr(exc))

    def publications() -> None:
        try:
            for j in range(150):
                node = f"n{j % 64}"
                sched.drain_node(node)
                sched.resume_node(node)
                if j % 10 == 0:
                    sched.register_node(f"extra{j}", languages=["en", "zh"], max_concurrency=2)
                    sched.remove_node(f"extra{j}")
        except Exception as exc:  # noqa: BLE001 - any failure is reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=dispatcher, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=heartbeats), threading.Thread(target=publications)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors, errors
    kernel = sched.snapshot.kernel
    assert kernel.ordered
    _ordering(kernel).check()
    assert int(np.asarray(sched.snapshot.inflight).sum()) == 0  # every job released: nothing leaked


@pytest.mark.parametrize("core", CORES, ids=["compiled", "python"])
def test_a_bad_changed_hint_is_refused_and_changes_nothing(core: ModuleType) -> None:
    f = Twin(core, 4, [[0, 1, 2, 3]], np.zeros(4, dtype=L.NODE_DTYPE), 1)
    f.recs["max_concurrency"] = 2
    f.recs["flags"] = 3
    f.kernel = f.build()
    epoch = _ordering(f.kernel).epoch
    with pytest.raises(ValueError, match="changed"):
        f.kernel.with_records(f.recs.copy(), f.loads, f.counts.array, [7])
    assert f.kernel.ordered and _ordering(f.kernel).epoch == epoch


def test_publications_that_name_their_changed_slots_keep_the_trees_exact() -> None:
    sched = pysched.Scheduler(seed=2, kernel="compiled")
    for i in range(40):
        sched.register_node(f"n{i}", languages=["en", "zh"], max_concurrency=2)
    mgmt = sched._mgmt
    mgmt._changed_slots = []  # what a publisher that tracks its writes hands over
    for i in range(0, 40, 3):
        slot = sched.snapshot.slot(f"n{i}")
        assert slot is not None
        mgmt._changed_slots.append(slot)
        sched.drain_node(f"n{i}")  # its own write is already listed
        _ordering(sched.snapshot.kernel).check()
    assert mgmt._changed_slots == []  # consumed by each publication
