"""The compiled kernel and its pure-Python twin: layout, rules, and exact parity."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pytest
from numpy.typing import NDArray

import pysched
from pysched import _layout as L
from pysched import _pycore

if TYPE_CHECKING:
    from pysched import _core


def test_installed_package_uses_the_compiled_kernel() -> None:
    """Fails when a build silently fell back to the pure-Python twin."""
    if os.environ.get("PYSCHED_PURE_PYTHON"):
        pytest.skip("PYSCHED_PURE_PYTHON is set on purpose")
    from pysched import _impl

    assert _impl.COMPILED is True
    assert pysched.COMPILED is True
    assert _impl.kernel.__name__ == "pysched._core"
    assert pysched.Scheduler().compiled is True


def test_tests_run_against_the_installed_package() -> None:
    """CI sets PYSCHED_EXPECT_INSTALLED: the wheel, not the source tree, must be under test."""
    if not os.environ.get("PYSCHED_EXPECT_INSTALLED"):
        pytest.skip("only checked where the installed wheel is expected (CI)")
    assert "site-packages" in pysched.__file__, pysched.__file__


def test_struct_layout_matches_dtypes() -> None:
    from pysched import _core

    assert _core.NODE_DTYPE == L.NODE_DTYPE and L.NODE_DTYPE.itemsize == 16
    # float64 figures: a heartbeat's cpu/gpu/mem are kept and compared exactly as given
    assert _core.LOAD_DTYPE == L.LOAD_DTYPE and L.LOAD_DTYPE.itemsize == 40
    assert _core.REASONS == L.REASONS


# Public methods only the compiled kernel has, and why the twin has none.
_COMPILED_ONLY = {
    ("Ordering", "best"): "inspects the tournament trees, which the twin (deciding by scanning) does not keep",
    ("Ordering", "shape"): "the shape of a tournament tree (flat or of inner nodes): the twin keeps none",
    ("Ordering", "set_shape"): "gives a tournament tree a shape (tests): the twin keeps none",
}


def _parameters(func: Callable[..., object]) -> list[tuple[str, object, object]]:
    """Name, kind and default of each parameter; a sentinel default (a bare object()) as its type."""
    out: list[tuple[str, object, object]] = []
    for p in inspect.signature(func).parameters.values():
        default = p.default
        if type(default) is object:
            default = object
        out.append((p.name, p.kind, default))
    return out


def test_twin_has_the_compiled_surface() -> None:
    """The twin has every public name of the compiled module, each method with the same parameters."""
    from pysched import _core

    compiled_names: list[str] = vars(_core)["__all__"]
    assert sorted(_pycore.__all__) == sorted(compiled_names)
    for name in compiled_names:
        compiled, twin = getattr(_core, name), getattr(_pycore, name)
        if not isinstance(compiled, type):
            assert type(twin) is type(compiled), name
            continue
        for attr, member in vars(compiled).items():
            if attr.startswith("_") or (name, attr) in _COMPILED_ONLY:
                continue
            if type(member) is int:  # class constants (JobTable.FULL, ...)
                assert getattr(twin, attr) == member, f"{name}.{attr}"
            elif callable(member):
                assert callable(getattr(twin, attr, None)), f"{name}.{attr} is missing from the twin"
                assert _parameters(member) == _parameters(getattr(twin, attr)), f"{name}.{attr}"


# ---------------------------------------------------------------- fixtures
class Fleet:
    """A hand-made kernel input: one pool per entry of ``pools`` (lists of slots)."""

    def __init__(self, core: ModuleType, n: int, pools: list[list[int]], seed: int = 7, now: float = 100.0) -> None:
        self.core = core
        self.now = now
        self.recs = np.zeros(n, dtype=L.NODE_DTYPE)
        self.recs["service_mask"] = 0b111
        self.recs["max_concurrency"] = 4
        self.recs["flags"] = L.FLAG_HAS_GPU | L.FLAG_PUBLIC
        self.loads = core.LoadTable(n)
        for s in range(n):
            self.loads.update(s, now, 10.0, 10.0, 10.0, 0)
        self.inflight = np.zeros(n, dtype=np.int32)
        self.pools = pools
        self.seed = seed

    def kernel(self, pair_pools: list[int] | None = None, rng: _core.Rng | None = None) -> _core.SnapshotKernel:
        off = np.zeros(len(self.pools) + 1, dtype=np.int32)
        off[1:] = np.cumsum([len(p) for p in self.pools])
        members = np.array([s for p in self.pools for s in p], dtype=np.int32)
        # one language (id 0): pair (0, 0) and auto (1, 0) both list every pool
        order = list(range(len(self.pools))) if pair_pools is None else pair_pools
        pair_off = np.array([0, len(order), 2 * len(order)], dtype=np.int32)
        pp = np.array(order + order, dtype=np.int32)
        node_ids = [f"n{i}" for i in range(len(self.recs))]
        kernel: _core.SnapshotKernel = self.core.SnapshotKernel(
            self.recs, self.loads, self.inflight, off, members, pair_off, pp, 1, rng or self.core.Rng(self.seed), 45.0,
            85.0, 4096, node_ids)
        return kernel


MASK = 0b011
NEED = L.NEED_GPU | L.NEED_PUBLIC


def test_each_reason_code_in_eligibility_order(core: ModuleType) -> None:
    f = Fleet(core, 9, [list(range(9))])
    f.recs["status"][0] = L.STATUS_OFFLINE
    f.loads.update(1, f.now - 46.0, 10.0, 10.0, 10.0, 0)  # heartbeat too old
    f.recs["status"][2] = L.STATUS_DRAINING
    f.recs["flags"][3] = L.FLAG_PUBLIC  # no gpu
    f.recs["flags"][4] = L.FLAG_HAS_GPU  # not public
    f.recs["service_mask"][5] = 0b001
    f.inflight[6] = 4  # full through reservations
    f.loads.update(7, f.now, 10.0, 85.0, 10.0, 0)  # gpu at the threshold
    # node 8 is healthy; exclude node 6 too: "excluded" comes before "full"
    codes = f.kernel().reasons(0, MASK, NEED, f.now, (8,))
    assert [L.REASONS[c] for c in codes] == [
        "offline", "offline", "not_ready", "no_gpu", "not_public", "missing_service", "full", "overloaded",
        "excluded",
    ]


def test_status_codes_map_to_reasons(core: ModuleType) -> None:
    f = Fleet(core, 5, [list(range(5))])
    for slot, status in enumerate(("ready", "registering", "degraded", "draining", "offline")):
        f.recs["status"][slot] = L.STATUS_CODES[status]
    codes = [L.REASONS[c] for c in f.kernel().reasons(0, MASK, NEED, f.now)]
    assert codes == ["ok", "not_ready", "not_ready", "not_ready", "offline"]


def test_reported_running_counts_when_higher_than_reservations(core: ModuleType) -> None:
    f = Fleet(core, 2, [[0, 1]])
    f.loads.update(0, f.now, 1.0, 1.0, 1.0, 4)
    assert [L.REASONS[c] for c in f.kernel().reasons(0, MASK, NEED, f.now)] == ["full", "ok"]


def test_unknown_service_and_unneeded_gpu(core: ModuleType) -> None:
    f = Fleet(core, 1, [[0]])
    f.recs["flags"][0] = L.FLAG_PUBLIC
    k = f.kernel()
    assert k.pick(0, MASK, L.NEED_PUBLIC, f.now) == 0  # gpu not required
    assert k.pick(0, MASK, L.NEED_PUBLIC | L.NEED_UNKNOWN_SERVICE, f.now) == -1


def test_least_effective_load_then_gpu(core: ModuleType) -> None:
    f = Fleet(core, 4, [[0, 1, 2, 3]])
    f.recs["max_concurrency"] = [4, 8, 4, 4]
    f.inflight[:] = [2, 2, 1, 1]  # ratios .5, .25, .25, .25
    f.loads.update(1, f.now, 0.0, 30.0, 0.0, 0)
    f.loads.update(2, f.now, 0.0, 20.0, 0.0, 0)
    f.loads.update(3, f.now, 0.0, 40.0, 0.0, 0)
    k = f.kernel()
    assert k.pick(0, MASK, NEED, f.now) == 2
    assert k.rank(0, MASK, NEED, f.now, (), 4) == [2, 1, 3, 0]
    assert k.rank(0, MASK, NEED, f.now, (2,), 2) == [1, 3]


def test_ties_are_broken_at_random_but_reproducibly(core: ModuleType) -> None:
    f = Fleet(core, 8, [list(range(8))])
    k = f.kernel()
    picks = [k.pick(0, MASK, NEED, f.now) for _ in range(400)]
    assert set(picks) == set(range(8))  # every tied node gets picked
    counts = np.bincount(picks, minlength=8)
    assert counts.min() > 20  # roughly uniform (expected 50 each)
    again = Fleet(core, 8, [list(range(8))]).kernel()
    assert [again.pick(0, MASK, NEED, f.now) for _ in range(400)] == picks


def test_select_bound_pool_then_new_binding_then_index_order(core: ModuleType) -> None:
    f = Fleet(core, 4, [[0], [1], [2, 3]])
    k = f.kernel()
    assert k.select(0, 0, 2, MASK, NEED, f.now) >> 32 == 2  # the bound pool first
    # no binding: the pool a new binding gets, the most free capacity (pool 2: two idle nodes)
    assert k.select(0, 0, -1, MASK, NEED, f.now) >> 32 == 2
    # ... or the tenant's pool when it serves the pair
    assert k.select(0, 0, -1, MASK, NEED, f.now, (), 1) == (1 << 32) | 1
    # a bound pool without an eligible node rebinds like a new session, not to the next pool in index order
    f.inflight[0] = 4
    assert k.select(0, 0, 0, MASK, NEED, f.now) >> 32 == 2
    f.inflight[2] = f.inflight[3] = 4  # pool 2 full too: pool 1 has the most free capacity
    assert k.select(0, 0, 0, MASK, NEED, f.now) == (1 << 32) | 1
    assert k.select(0, 0, 0, MASK, NEED, f.now, (), 2) == (1 << 32) | 1  # a full tenant pool: index order
    assert k.select(1, 0, -1, MASK, NEED, f.now) == (1 << 32) | 1  # auto source
    f.inflight[:] = 4
    assert k.select(0, 0, -1, MASK, NEED, f.now) == -1
    assert k.select(0, 1, -1, MASK, NEED, f.now) == -2  # unknown target id
    assert k.pools_for(0, 0) == (0, 1, 2) and k.pools_for(5, 0) == ()


def test_free_capacity_and_most_free_pool(core: ModuleType) -> None:
    f = Fleet(core, 4, [[0, 1], [2, 3]])
    f.inflight[:] = [1, 3, 0, 4]
    k = f.kernel()
    assert k.free_capacity(0, MASK, NEED, f.now) == 3 + 1
    assert k.free_capacity(1, MASK, NEED, f.now) == 4  # node 3 is full: not eligible
    assert k.most_free_pool(0, 0, MASK, NEED, f.now) == 0  # tie -> earliest
    f.inflight[0] = 2
    assert k.most_free_pool(0, 0, MASK, NEED, f.now) == 1


def test_many_excluded_slots_use_the_heap_path(core: ModuleType) -> None:
    f = Fleet(core, 100, [list(range(100))])
    k = f.kernel()
    excl = tuple(range(99))
    assert k.pick(0, MASK, NEED, f.now, excl) == 99
    assert k.rank(0, MASK, NEED, f.now, excl, 3) == [99]
    assert k.reasons(0, MASK, NEED, f.now, excl).count(L.R_EXCLUDED) == 99


def test_candidate_and_capacity(core: ModuleType) -> None:
    f = Fleet(core, 2, [[0, 1]])
    f.loads.update(1, f.now, 1.0, 1.0, 1.0, 3)
    k = f.kernel()
    assert k.candidate(1) == (1, "n1", 4, 3)
    assert k.capacity(0) == (4, 0)
    with pytest.raises(IndexError):
        k.candidate(2)


def test_boundary_validation(core: ModuleType) -> None:
    f = Fleet(core, 2, [[0, 1]])
    good = dict(recs=f.recs, loads=f.loads, inflight=f.inflight, pool_off=np.array([0, 2], np.int32),
                pool_members=np.array([0, 1], np.int32), pair_off=np.array([0, 1, 2], np.int32),
                pair_pools=np.array([0, 0], np.int32))

    def build(**over: object) -> _core.SnapshotKernel:
        a = {**good, **over}
        kernel: _core.SnapshotKernel = core.SnapshotKernel(
            a["recs"], a["loads"], a["inflight"], a["pool_off"], a["pool_members"], a["pair_off"], a["pair_pools"], 1,
            core.Rng(1), 45.0, 85.0)
        return kernel

    build()
    with pytest.raises(TypeError, match="inflight"):
        build(inflight=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="contiguous"):
        build(pool_members=np.array([0, 9, 1, 9], np.int32)[::2])
    with pytest.raises(ValueError, match="pool_members"):
        build(pool_members=np.array([0, 5], np.int32))
    with pytest.raises(ValueError, match="pool_off"):
        build(pool_off=np.array([0, 1], np.int32))
    with pytest.raises(ValueError, match="pair_pools"):
        build(pair_pools=np.array([0, 3], np.int32))
    with pytest.raises(IndexError):
        build().pick(1, MASK, NEED, f.now)
    with pytest.raises(ValueError):
        build().rank(0, MASK, NEED, f.now, (), 0)


def test_load_table_update_keeps_unreported_figures(core: ModuleType) -> None:
    t = core.LoadTable(3)
    t.update(1, 5.0, 10.0, 20.0, 30.0, 2)
    t.update(1, 6.0, float("nan"), 25.0, float("nan"), -1)
    assert t.get(1) == (6.0, 10.0, 25.0, 30.0, 2)
    bigger = t.grown(10)
    assert len(bigger) == 10 and bigger.get(1) == t.get(1)
    with pytest.raises(IndexError):
        t.update(3, 0.0, 0.0, 0.0, 0.0, 0)


def test_slot_counts(core: ModuleType) -> None:
    c = core.SlotCounts(2)
    assert c.try_add(0, 2, 0) and c.try_add(0, 2, 0) and not c.try_add(0, 2, 0)
    assert not c.try_add(1, 2, 2)  # reported running counts too
    assert c.add(0, -1) == 1 and c.get(0) == 1
    assert len(c.grown(5)) == 5 and c.grown(5).get(0) == 1


# ---------------------------------------------------------------- parity
# recs, last heartbeat, cpu, gpu, running, inflight by slot; pool members; pair key -> pool indices
_FleetData = tuple[NDArray[np.void], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64],
                   NDArray[np.int64], NDArray[np.int32], list[list[int]], dict[int, list[int]]]


def _random_fleet(rng: np.random.Generator, n: int, n_pools: int, n_langs: int) -> _FleetData:
    recs = np.zeros(n, dtype=L.NODE_DTYPE)
    recs["service_mask"] = rng.integers(0, 16, n)
    recs["max_concurrency"] = rng.integers(1, 6, n)
    recs["status"] = rng.choice([0, 0, 0, 0, 0, 1, 2, 3, 4], n)
    recs["flags"] = rng.choice([3, 3, 3, 1, 2], n)
    last = 100.0 - rng.choice([0.0, 1.0, 30.0, 50.0], n, p=[0.5, 0.3, 0.15, 0.05])
    cpu = rng.choice([10.0, 50.0, 90.0], n, p=[0.6, 0.3, 0.1])
    gpu = rng.choice([0.0, 10.0, 20.0, 86.0], n)
    running = rng.integers(0, 4, n)
    inflight = rng.integers(0, 5, n).astype(np.int32)
    members = [sorted(rng.choice(n, rng.integers(0, n // 2 + 1), replace=False).tolist()) for _ in range(n_pools)]
    pairs: dict[int, list[int]] = {}
    for key in range((n_langs + 1) * n_langs):
        pairs[key] = rng.choice(n_pools, rng.integers(0, n_pools + 1), replace=False).tolist()
    return recs, last, cpu, gpu, running, inflight, members, pairs


def _kernel_from(core: ModuleType, data: _FleetData, n_langs: int, seed: int) -> _core.SnapshotKernel:
    recs, last, cpu, gpu, running, inflight, members, pairs = data
    loads = core.LoadTable(len(recs))
    for s in range(len(recs)):
        loads.update(s, float(last[s]), float(cpu[s]), float(gpu[s]), 10.0, int(running[s]))
    off = np.zeros(len(members) + 1, dtype=np.int32)
    off[1:] = np.cumsum([len(m) for m in members])
    flat = np.array([s for m in members for s in m], dtype=np.int32)
    pair_off = np.zeros(len(pairs) + 1, dtype=np.int32)
    pair_off[1:] = np.cumsum([len(pairs[k]) for k in range(len(pairs))])
    pair_pools = np.array([p for k in range(len(pairs)) for p in pairs[k]], dtype=np.int32)
    kernel: _core.SnapshotKernel = core.SnapshotKernel(
        recs.copy(), loads, inflight.copy(), off, flat, pair_off, pair_pools, n_langs, core.Rng(seed), 45.0, 85.0, 4096,
        [f"n{i}" for i in range(len(recs))])
    return kernel


@pytest.mark.parametrize("seed", range(12))
def test_compiled_and_twin_agree_exactly(seed: int) -> None:
    from pysched import _core

    rng = np.random.default_rng(seed)
    n, n_pools, n_langs = int(rng.integers(1, 60)), int(rng.integers(1, 6)), int(rng.integers(1, 4))
    data = _random_fleet(rng, n, n_pools, n_langs)
    kc = _kernel_from(_core, data, n_langs, seed)
    kp = _kernel_from(_pycore, data, n_langs, seed)
    now = 100.0
    for _ in range(40):
        mask = int(rng.integers(0, 16))
        need = int(rng.integers(0, 8))
        excl = tuple(int(x) for x in rng.choice(n, int(rng.integers(0, min(n, 40) + 1)), replace=False))
        pool = int(rng.integers(0, n_pools))
        src, tgt = int(rng.integers(0, n_langs + 2)), int(rng.integers(0, n_langs + 1))
        pref = int(rng.integers(-1, n_pools))
        assert kc.select(src, tgt, pref, mask, need, now, excl) == kp.select(src, tgt, pref, mask, need, now, excl)
        assert kc.select_candidate(src, tgt, pref, mask, need, now, excl) == kp.select_candidate(
            src, tgt, pref, mask, need, now, excl)
        assert kc.pick(pool, mask, need, now, excl) == kp.pick(pool, mask, need, now, excl)
        k = int(rng.integers(1, 8))
        assert kc.rank(pool, mask, need, now, excl, k) == kp.rank(pool, mask, need, now, excl, k)
        assert kc.reasons(pool, mask, need, now, excl) == kp.reasons(pool, mask, need, now, excl)
        assert kc.free_capacity(pool, mask, need, now, excl) == kp.free_capacity(pool, mask, need, now, excl)
        assert kc.most_free_pool(src, tgt, mask, need, now, excl) == kp.most_free_pool(src, tgt, mask, need, now,
                                                                                         excl)
        assert kc.pools_for(src, tgt) == kp.pools_for(src, tgt)


def test_scheduler_decisions_agree_between_kernels() -> None:
    """End to end: the same seed and calls give the same assignments on both kernels."""
    def clock() -> float:
        return 1000.0

    results = []
    for kernel in ("compiled", "python"):
        sched = pysched.Scheduler(seed=99, kernel=kernel, clock=clock)
        sets = [["zh", "en"], ["en", "ja"], ["de", "en", "zh"], ["en", "es", "pt"]]
        for i in range(24):
            sched.register_node(f"node-{i}", languages=sets[i % 4], max_concurrency=1 + i % 3)
        out: list[tuple[str, str | int]] = []
        jobs = []
        for j in range(150):
            pair = [("zh", "en"), ("en", "ja"), ("auto", "en"), ("de", "zh"), ("es", "en")][j % 5]
            try:
                a = sched.dispatch(f"s{j % 17}", *pair)
                out.append((a.node_id, a.pool_id))
                jobs.append(a.job_id)
            except pysched.NoNodeAvailable as e:
                out.append(("none", e.best_reason))
            if j % 3 == 0 and jobs:
                sched.release(jobs.pop(0))
        results.append(out)
    assert results[0] == results[1]


def test_large_pool_releases_the_gil_and_still_agrees() -> None:
    from pysched import _core

    n = 5000
    rng = np.random.default_rng(3)
    data = _random_fleet(rng, n, 1, 1)
    data = (*data[:6], [list(range(n))], {0: [0], 1: [0]})  # one pool of every node, serving every pair
    kc = _kernel_from(_core, data, 1, 5)
    kp = _kernel_from(_pycore, data, 1, 5)
    assert kc.pick(0, 3, 3, 100.0) == kp.pick(0, 3, 3, 100.0)


def test_rng_streams_are_per_decision(core: ModuleType) -> None:
    """Each decision consumes exactly one stream, whatever it scans."""
    rng = core.Rng(42)
    f = Fleet(core, 4, [[0, 1, 2, 3]])
    k = f.kernel(rng=rng)
    assert rng.decisions == 0
    k.pick(0, MASK, NEED, f.now)
    k.select(0, 0, -1, MASK, NEED, f.now)
    k.rank(0, MASK, NEED, f.now, (), 2)
    k.reasons(0, MASK, NEED, f.now)  # not a decision
    assert rng.decisions == 3


def test_with_records_shares_pools_and_checks_the_new_arrays(core: ModuleType) -> None:
    f = Fleet(core, 4, [[0, 1], [2, 3]])
    k = f.kernel()
    recs = f.recs.copy()
    recs["status"][0] = L.STATUS_DRAINING
    k2 = k.with_records(recs, f.loads, f.inflight)
    assert k2.pools_for(0, 0) == k.pools_for(0, 0) and k2.members(1) == [2, 3]
    assert k2.reasons(0, MASK, NEED, f.now) == bytes([L.R_NOT_READY, L.R_OK])
    assert k.reasons(0, MASK, NEED, f.now) == bytes([L.R_OK, L.R_OK])  # the old kernel is untouched
    with pytest.raises(ValueError, match="fewer"):
        k.with_records(recs[:3].copy(), f.loads, f.inflight)
    with pytest.raises(TypeError, match="recs"):
        k.with_records(np.zeros(4, dtype=np.int64), f.loads, f.inflight)
