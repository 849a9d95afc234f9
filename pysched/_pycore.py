"""Pure-Python twin of :mod:`pysched._core`: the reference oracle.

Same names, same arguments and the same results, random tie-breaks
included (the same splitmix64/xorshift64 streams). It is deliberately a
plain translation of the compiled code, not an optimised one: tests run
every kernel case against both, and ``PYSCHED_PURE_PYTHON=1`` makes the
scheduler use it (slowly) where the extension cannot be built.
"""

from __future__ import annotations

import heapq
import threading
import weakref
from collections.abc import Callable, Collection, Container, Iterable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
from numpy.typing import NDArray

from pysched._holding import Held, Holds, await_unheld
from pysched._layout import (
    FLAG_HAS_GPU,
    FLAG_PUBLIC,
    GOLDEN,
    LOAD_DTYPE,
    MASK64,
    NEED_GPU,
    NEED_PUBLIC,
    NEED_UNKNOWN_SERVICE,
    NODE_DTYPE,
    ORDER_DRAWS,
    R_EXCLUDED,
    R_FULL,
    R_MISSING_SERVICE,
    R_NO_GPU,
    R_NOT_PUBLIC,
    R_NOT_READY,
    R_OFFLINE,
    R_OK,
    R_OVERLOADED,
    REASONS,
    STATUS_CODES,
    STATUS_OFFLINE,
    STATUS_READY,
    check_record_arrays,
    validate_kernel_arrays,
)
from pysched.language_index import pair_key, split_pair_key

if TYPE_CHECKING:
    from pysched import _core
    from pysched.snapshot import RuntimeSnapshot

__all__ = ["COMPILED", "NODE_DTYPE", "LOAD_DTYPE", "REASONS", "STATUS_CODES", "Rng", "Counters", "LoadTable",
           "SlotCounts", "Ordering", "SnapshotKernel", "JobTable", "Assignment", "SessionState", "Dispatcher"]

COMPILED = False

#: outcome counters a Counters holds (the compiled one's fixed array)
_N_COUNTERS = 16
#: what _choose_candidates returns when ORDER_DRAWS candidates were rejected
_DRAWS_REJECTED = -2

# An ordering key: (effective load, max concurrency, gpu %); lower load ratio, then gpu, is better.
_Key = tuple[int, int, float]


def _splitmix64(x: int) -> int:
    x = (x + GOLDEN) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class _Stream:
    __slots__ = ("state",)

    def __init__(self, state: int) -> None:
        self.state = state

    def next(self) -> int:
        x = self.state
        x ^= (x << 13) & MASK64
        x ^= x >> 7
        x ^= (x << 17) & MASK64
        self.state = x
        return x


class Rng:
    """Seeded tie-break randomness: decision *k* draws from stream *k*."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed) & MASK64
        self.decisions = 0
        self._lock = threading.Lock()

    def next_stream(self) -> _Stream:
        with self._lock:
            k = self.decisions
            self.decisions += 1
        s = _splitmix64(self.seed ^ _splitmix64(k))
        return _Stream(s if s != 0 else GOLDEN)


class Counters:
    """Outcome counters (a lock stands in for the compiled version's GIL atomicity)."""

    def __init__(self) -> None:
        self._values = [0] * _N_COUNTERS
        self._lock = threading.Lock()

    def add(self, index: int, amount: int = 1) -> None:
        if index < 0 or index >= 16:  # noqa: PLR2004  _N_COUNTERS, a literal on the per-dispatch path
            raise IndexError(f"counter index {index} out of range")
        with self._lock:
            self._values[index] += amount

    def to_list(self) -> list[int]:
        return list(self._values)


# data address of a SlotCounts' array -> that SlotCounts (as in _ordering.pxi)
_COUNTS_BY_ADDRESS: weakref.WeakValueDictionary[int, SlotCounts] = weakref.WeakValueDictionary()


def _address(arr: NDArray[Any]) -> int:
    return int(arr.__array_interface__["data"][0])


class Ordering:
    """Twin of the compiled ``Ordering``: what a decision depends on, without the trees.

    The compiled ordering keeps per-pool tournament trees so a decision costs
    O(log n); the twin computes the same decisions by scanning
    (:meth:`SnapshotKernel._choose`), so all it keeps is the state decisions
    share: the evicted slots (found with a stale heartbeat, until their next
    heartbeat), the horizon (latest heartbeat deadline of an evicted node),
    and the same lifecycle (``epoch``, ``ready``). ``lock`` is the counts'
    lock: held by every count change and by each decision, it stands in for
    the GIL atomicity of the compiled calls.
    """

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.evicted: set[int] = set()
        self.n_slots = 0
        self.epoch = 0
        self.ready = False
        self.horizon = float("-inf")

    def evicted_slots(self) -> list[int]:
        with self.lock:  # a decision may evict meanwhile: never iterate the set unlocked
            return sorted(self.evicted)

    def check(self) -> None:
        """Nothing to check: the twin keeps no trees."""

    def on_load(self, slot: int) -> None:
        self.evicted.discard(slot)

    def evict(self, slot: int, deadline: float) -> None:
        if slot >= self.n_slots:
            return
        self.evicted.add(slot)
        self.horizon = max(self.horizon, deadline)

    def suspend(self) -> None:
        self.ready = False

    def retarget(self, kernel: SnapshotKernel) -> None:
        # A publication retargets while dispatching threads decide, and a decision
        # evicts (adds to the set) holding the lock: so must the copy below, or it
        # iterates a set that changes size under it (the compiled retarget is one
        # GIL-held call with no Python in it, so it cannot interleave with a decision).
        with self.lock:
            n = kernel.n_slots
            self.evicted = {s for s in self.evicted if s < n}
            self.n_slots = n
            self.epoch += 1
            self.ready = True


class LoadTable:
    """The mutable per-slot load figures, written in place by heartbeats."""

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.array: NDArray[np.void] = np.zeros(n, dtype=LOAD_DTYPE)
        self.ordering: Ordering | None = None

    def __len__(self) -> int:
        return len(self.array)

    def grown(self, n: int) -> LoadTable:
        bigger = LoadTable(max(n, len(self.array)))
        bigger.array[: len(self.array)] = self.array
        if self.ordering is not None:
            self.ordering.suspend()
            bigger.ordering, self.ordering = self.ordering, None
        return bigger

    def update(self, slot: int, now: float, cpu: float, gpu: float, mem: float, running: int) -> None:
        if slot < 0 or slot >= len(self.array):
            raise IndexError(f"slot {slot} out of range [0, {len(self.array)})")
        ordering = self.ordering
        with nullcontext() if ordering is None else ordering.lock:
            rec = self.array[slot]
            rec["last_heartbeat"] = now
            # x == x is False only for NaN ("not reported": keep the last figure), as in the compiled update
            if cpu == cpu:  # noqa: PLR0124  NaN test (see above)
                rec["cpu"] = cpu
            if gpu == gpu:  # noqa: PLR0124  NaN test
                rec["gpu"] = gpu
            if mem == mem:  # noqa: PLR0124  NaN test
                rec["mem"] = mem
            if running >= 0:
                rec["running"] = running
            self.array[slot] = rec
            if ordering is not None:
                ordering.on_load(slot)

    def get(self, slot: int) -> tuple[float, float, float, float, int]:
        if slot < 0 or slot >= len(self.array):
            raise IndexError(f"slot {slot} out of range [0, {len(self.array)})")
        r = self.array[slot]
        return (float(r["last_heartbeat"]), float(r["cpu"]), float(r["gpu"]), float(r["mem"]), int(r["running"]))


class SlotCounts:
    """Per-slot in-flight counts (the compiled version is atomic under the GIL; this one locks)."""

    def __init__(self, n: int, _lock: threading.Lock | None = None) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.array: NDArray[np.int32] = np.zeros(n, dtype=np.int32)
        self._lock = _lock or threading.Lock()  # shared with successors (and the ordering)
        self._successor: SlotCounts | None = None
        self.ordering: Ordering | None = None
        _COUNTS_BY_ADDRESS[_address(self.array)] = self

    def _live(self) -> SlotCounts:
        c = self
        while c._successor is not None:
            c = c._successor
        return c

    def __len__(self) -> int:
        return len(self._live().array)

    def _checked(self, slot: int) -> NDArray[np.int32]:
        arr = self._live().array
        if slot < 0 or slot >= len(arr):
            raise IndexError(f"slot {slot} out of range [0, {len(arr)})")
        return arr

    def grown(self, n: int) -> SlotCounts:
        with self._lock:
            live = self._live()
            bigger = SlotCounts(max(n, len(live.array)), self._lock)
            bigger.array[: len(live.array)] = live.array
            live._successor = bigger
            if live.ordering is not None:
                live.ordering.suspend()
                bigger.ordering, live.ordering = live.ordering, None
            return bigger

    def try_add(self, slot: int, limit: int, running: int) -> bool:
        with self._lock:
            arr = self._checked(slot)
            if max(int(arr[slot]), running) >= limit:
                return False
            arr[slot] += 1
            return True

    def try_add_many(
        self, slots: NDArray[np.int32], limits: NDArray[np.int64], running: NDArray[np.int64]
    ) -> NDArray[np.bool_]:
        if not len(slots) == len(limits) == len(running):
            raise ValueError("try_add_many: slots, limits and running must have the same length")
        with self._lock:
            for slot in slots:
                self._checked(int(slot))
            arr = self._live().array
            out = np.zeros(len(slots), dtype=np.bool_)
            for k, slot in enumerate(slots):
                if max(int(arr[slot]), int(running[k])) < int(limits[k]):
                    arr[slot] += 1
                    out[k] = True
            return out

    def add(self, slot: int, delta: int) -> int:
        with self._lock:
            arr = self._checked(slot)
            arr[slot] += delta
            return int(arr[slot])

    def set(self, slot: int, value: int) -> None:
        with self._lock:
            self._checked(slot)[slot] = value

    def get(self, slot: int) -> int:
        return int(self._checked(slot)[slot])


def _better(eff: int, mx: int, gpu: float, best_eff: int, best_max: int, best_gpu: float) -> int:
    lhs = eff * best_max
    rhs = best_eff * mx
    if lhs < rhs:
        return 1
    if lhs > rhs:
        return -1
    if gpu < best_gpu:
        return 1
    if gpu > best_gpu:
        return -1
    return 0


class SnapshotKernel:
    """Pure-Python twin of the compiled ``SnapshotKernel``."""

    def __init__(  # noqa: PLR0917  the compiled constructor's arguments, in its order
        self,
        recs: NDArray[np.void],
        loads: LoadTable,
        inflight: NDArray[np.int32],
        pool_off: NDArray[np.int32],
        pool_members: NDArray[np.int32],
        pair_off: NDArray[np.int32],
        pair_pools: NDArray[np.int32],
        n_langs: int,
        rng: Rng,
        heartbeat_timeout: float,
        threshold: float,
        nogil_min_pool: int = 4096,
        node_ids: list[str] | None = None,
        changed: Sequence[int] | None = None,
    ) -> None:
        validate_kernel_arrays(recs, len(loads), inflight, pool_off, pool_members, pair_off, pair_pools,
                               n_langs, heartbeat_timeout)
        self._recs = recs
        self._loads = loads.array
        self._inflight = inflight
        self._pool_off = pool_off
        self._pool_members = pool_members
        self._pair_off = pair_off
        self._pair_pools = pair_pools
        self.n_slots = len(recs)
        self.n_pools = len(pool_off) - 1
        self.n_langs = n_langs
        self._rng = rng
        self._node_ids = node_ids
        self._timeout = float(heartbeat_timeout)
        self._threshold = float(threshold)
        self._attach(loads, inflight, changed)

    def with_records(
        self, recs: NDArray[np.void], loads: LoadTable, inflight: NDArray[np.int32],
        changed: Sequence[int] | None = None,
    ) -> SnapshotKernel:
        check_record_arrays(recs, len(loads), inflight, self.n_slots)
        k = object.__new__(SnapshotKernel)
        k.__dict__.update(self.__dict__)
        k._recs, k._loads, k._inflight, k.n_slots = recs, loads.array, inflight, len(recs)
        k._attach(loads, inflight, changed)
        return k

    def _attach(self, loads: LoadTable, inflight: NDArray[np.int32], changed: Sequence[int] | None = None) -> None:
        """As the compiled kernel: find (or create) the ordering of these arrays and retarget it.

        ``changed`` (slots whose record changed) only saves the compiled kernel work: checked, then unused.
        """
        for slot in () if changed is None else changed:
            if not 0 <= slot < self.n_slots:
                raise ValueError(f"changed holds slot {slot!r}, outside [0, {self.n_slots})")
        self._ordering: Ordering | None = None
        self._ordering_epoch = 0
        counts = _COUNTS_BY_ADDRESS.get(_address(inflight))
        if counts is None or counts._successor is not None or len(counts.array) < self.n_slots:
            return
        o = counts.ordering
        if o is None or loads.ordering is not o:
            if o is not None:
                o.suspend()
            if loads.ordering is not None:
                loads.ordering.suspend()
            o = Ordering(counts._lock)
            counts.ordering = loads.ordering = o
        o.retarget(self)
        self._ordering, self._ordering_epoch = o, o.epoch

    @property
    def ordering(self) -> Ordering | None:
        return self._ordering

    @property
    def ordered(self) -> bool:
        o = self._ordering
        return o is not None and o.ready and o.epoch == self._ordering_epoch

    # -- helpers -------------------------------------------------------------
    def _pair_key(self, src_id: int, tgt_id: int) -> int:
        if src_id < 0 or src_id > self.n_langs or tgt_id < 0 or tgt_id >= self.n_langs:
            return -1
        return pair_key(src_id, tgt_id, self.n_langs)

    def _check_pool(self, pool: int) -> None:
        if pool < 0 or pool >= self.n_pools:
            raise IndexError(f"pool index {pool} out of range [0, {self.n_pools})")

    def _members(self, pool: int) -> list[int]:
        return [int(s) for s in self._pool_members[self._pool_off[pool]: self._pool_off[pool + 1]]]

    def _reason(  # noqa: PLR0917  a request's fields, which the compiled _reason takes as one struct
        self, slot: int, mask: int, need: int, now: float, exclude: Container[int],
        inflight: NDArray[np.int32] | None = None,
    ) -> int:
        rec = self._recs[slot]
        load = self._loads[slot]
        status = int(rec["status"])
        if status >= STATUS_OFFLINE or now - float(load["last_heartbeat"]) > self._timeout:
            return R_OFFLINE
        if status != STATUS_READY:
            return R_NOT_READY
        flags = int(rec["flags"])
        if need & NEED_GPU and not flags & FLAG_HAS_GPU:
            return R_NO_GPU
        if need & NEED_PUBLIC and not flags & FLAG_PUBLIC:
            return R_NOT_PUBLIC
        if need & NEED_UNKNOWN_SERVICE or (int(rec["service_mask"]) & mask) != mask:
            return R_MISSING_SERVICE
        if slot in exclude:
            return R_EXCLUDED
        if self._effective(slot, inflight) >= int(rec["max_concurrency"]):
            return R_FULL
        thr = self._threshold
        if float(load["cpu"]) >= thr or float(load["gpu"]) >= thr or float(load["mem"]) >= thr:
            return R_OVERLOADED
        return R_OK

    def _effective(self, slot: int, inflight: NDArray[np.int32] | None = None) -> int:
        held = (self._inflight if inflight is None else inflight)[slot]
        return max(int(held), int(self._loads[slot]["running"]))

    def _score(self, slot: int, inflight: NDArray[np.int32] | None = None) -> _Key:
        return (self._effective(slot, inflight), int(self._recs[slot]["max_concurrency"]),
                float(self._loads[slot]["gpu"]))

    # How a node is chosen in one pool: see "How a node is chosen" in _core.pyx.
    # The compiled kernel walks a tree for step 1 where it can; the twin always
    # carries the steps out by scanning (the compiled _choose_scan).
    # The private helpers below take a request's fields as separate positional
    # arguments where the compiled ones take a request struct: no packing per call.
    def _choose(  # noqa: PLR0917  a request's fields (see above)
        self, pool: int, mask: int, need: int, now: float, exclude: Container[int], stream: _Stream,
        inflight: NDArray[np.int32] | None = None,
    ) -> int:
        inflight = self._inflight if inflight is None else inflight
        o = self._ordering
        with nullcontext() if o is None else o.lock:
            if o is None or now > o.horizon:
                found = self._choose_candidates(pool, mask, need, now, exclude, stream, inflight, o)
                if found != -2:  # noqa: PLR2004  _DRAWS_REJECTED, a literal on the per-decision path
                    return found
            return self._scan_best(pool, mask, need, now, exclude, stream, inflight)

    def _choose_candidates(  # noqa: PLR0917  a request's fields
        self, pool: int, mask: int, need: int, now: float, exclude: Container[int], stream: _Stream,
        inflight: NDArray[np.int32], o: Ordering | None,
    ) -> int:
        """Step 1: ``_DRAWS_REJECTED`` when ORDER_DRAWS candidates were rejected (step 2 decides)."""
        evicted: Container[int] = () if o is None else o.evicted
        thr = self._threshold
        candidates: list[tuple[int, _Key]] = []  # (slot, key), member order
        for slot in self._members(pool):
            rec, load = self._recs[slot], self._loads[slot]
            eff = max(int(inflight[slot]), int(load["running"]))
            mx = int(rec["max_concurrency"])
            if (int(rec["status"]) != STATUS_READY or eff >= mx or float(load["cpu"]) >= thr
                    or float(load["gpu"]) >= thr or float(load["mem"]) >= thr or slot in evicted
                    or slot in exclude):
                continue
            candidates.append((slot, (eff, mx, float(load["gpu"]))))
        tied: list[tuple[int, _Key]] = []
        for _ in range(ORDER_DRAWS):
            if not tied:
                if not candidates:
                    return -1
                best = candidates[0][1]
                for _, key in candidates:
                    if _better(*key, *best) > 0:
                        best = key
                tied = [c for c in candidates if _better(*c[1], *best) == 0]
            r = ((stream.next() >> 32) * len(tied)) >> 32
            slot = tied[r][0]
            if self._reason(slot, mask, need, now, exclude, inflight) == R_OK:
                return slot
            last = float(self._loads[slot]["last_heartbeat"])
            if o is not None and now - last > self._timeout:
                o.evict(slot, last + self._timeout)
            candidates.remove(tied.pop(r))
        return -2  # _DRAWS_REJECTED

    def _scan_best(  # noqa: PLR0917  a request's fields
        self, pool: int, mask: int, need: int, now: float, exclude: Container[int], stream: _Stream,
        inflight: NDArray[np.int32],
    ) -> int:
        """Step 2: the r-th (one draw) of the eligible members with the best key, or -1."""
        eligible = [(s, self._score(s, inflight)) for s in self._members(pool)
                    if self._reason(s, mask, need, now, exclude, inflight) == R_OK]
        if not eligible:
            return -1
        best = eligible[0][1]
        for _, key in eligible:
            if _better(*key, *best) > 0:
                best = key
        tied = [s for s, key in eligible if _better(*key, *best) == 0]
        return tied[((stream.next() >> 32) * len(tied)) >> 32]

    # -- entry points ----------------------------------------------------------
    def pools_for(self, src_id: int, tgt_id: int) -> tuple[int, ...]:
        key = self._pair_key(src_id, tgt_id)
        if key < 0:
            return ()
        return tuple(int(p) for p in self._pair_pools[self._pair_off[key]: self._pair_off[key + 1]])

    def select(  # noqa: PLR0917  the compiled select's signature
        self, src_id: int, tgt_id: int, preferred: int, service_mask: int, need: int, now: float,
        exclude: Iterable[int] = (), tenant: int = -1,
    ) -> int:
        pools = self.pools_for(src_id, tgt_id)
        if not pools:
            return -2
        stream = self._rng.next_stream()
        return self._select(src_id, tgt_id, pools, preferred, tenant, service_mask, need, now, set(exclude), stream)

    def _select(  # noqa: PLR0917  a request's fields
        self, src_id: int, tgt_id: int, pools: tuple[int, ...], bound: int, tenant: int, mask: int, need: int,
        now: float, exclude: Container[int], stream: _Stream, inflight: NDArray[np.int32] | None = None,
    ) -> int:
        """Try the bound pool; failing that, the pool a new binding gets (tenant's, else most free), then index order.

        ``bound``, ``tenant`` and the result's high half are pool indices, not pool ids.

        ``inflight``: the counts to score with (a batch's scratch copy), default the live ones.
        """
        if bound >= 0 and bound in pools:
            found = self._choose(bound, mask, need, now, exclude, stream, inflight)
            if found >= 0:
                return (bound << 32) | found
        else:
            bound = -1
        pref = tenant if tenant >= 0 and tenant in pools else self._most_free(
            src_id, tgt_id, mask, need, now, exclude, inflight)
        # two int compares per pool, as the compiled loop makes (no tuple per pool)
        order = ([pref] if pref >= 0 and pref != bound else []) + [
            p for p in pools if p != pref and p != bound  # noqa: PLR1714  (see above)
        ]
        for pool in order:
            found = self._choose(pool, mask, need, now, exclude, stream, inflight)
            if found >= 0:
                return (pool << 32) | found
        return -1

    def select_batch(  # noqa: PLR0917  the compiled select_batch's signature
        self,
        src_ids: NDArray[np.int32],
        tgt_ids: NDArray[np.int32],
        service_masks: NDArray[np.uint64],
        needs: NDArray[np.int32],
        tenant_pools: NDArray[np.int32],
        session_of: NDArray[np.int32],
        bound_key: NDArray[np.int64],
        bound_pool: NDArray[np.int32],
        exclude_off: NDArray[np.int32],
        exclude: NDArray[np.int32],
        scratch: NDArray[np.int32],
        now: float,
        out: NDArray[np.int64],
    ) -> None:
        n = len(src_ids)
        if not all(len(a) == n for a in (tgt_ids, service_masks, needs, tenant_pools, session_of, out)) \
                or len(exclude_off) != n + 1:
            raise ValueError("select_batch: every per-request array must have one entry per request")
        if len(bound_key) != len(bound_pool):
            raise ValueError("select_batch: bound_key and bound_pool must have one entry per session")
        if len(scratch) < self.n_slots:
            raise ValueError("select_batch: scratch must cover every slot")
        if n and (exclude_off[0] != 0 or exclude_off[n] > len(exclude)):
            raise ValueError("select_batch: exclude_off must run from 0 to at most len(exclude)")
        for i in range(n):
            if not 0 <= session_of[i] < len(bound_key):
                raise ValueError(f"select_batch: session_of[{i}] out of range")
            if tenant_pools[i] >= self.n_pools or exclude_off[i] > exclude_off[i + 1]:
                raise ValueError(f"select_batch: request {i} has a bad tenant pool or exclude range")
        # The batch scores with its own running copy, passed down explicitly: the
        # kernel's live counts are never swapped, so a select made meanwhile by
        # another thread sees the live counts, never the batch's scratch ones.
        for i in range(n):
            src, tgt = int(src_ids[i]), int(tgt_ids[i])
            key = self._pair_key(src, tgt)
            pools = self.pools_for(src, tgt)
            if key < 0 or not pools:
                out[i] = -2
                continue
            mask, need = int(service_masks[i]), int(needs[i])
            excl = set(int(x) for x in exclude[exclude_off[i]:exclude_off[i + 1]])
            sess = int(session_of[i])
            pref = int(bound_pool[sess]) if int(bound_key[sess]) == key else -1
            stream = self._rng.next_stream()
            found = self._select(src, tgt, pools, pref, int(tenant_pools[i]), mask, need, now, excl, stream,
                                 scratch)
            out[i] = found
            if found >= 0:
                scratch[found & 0xFFFFFFFF] += 1
                bound_key[sess] = key
                bound_pool[sess] = found >> 32

    def select_candidate(  # noqa: PLR0917  the compiled select_candidate's signature
        self, src_id: int, tgt_id: int, preferred: int, service_mask: int, need: int, now: float,
        exclude: Iterable[int] = (), tenant: int = -1,
    ) -> int | tuple[int, str, int, int, int]:
        found = self.select(src_id, tgt_id, preferred, service_mask, need, now, exclude, tenant)
        if found < 0:
            return found
        return self.candidate(found & 0xFFFFFFFF) + (found >> 32,)

    def pick(self, pool: int, service_mask: int, need: int, now: float, exclude: Iterable[int] = ()) -> int:
        self._check_pool(pool)
        return self._choose(pool, service_mask, need, now, set(exclude), self._rng.next_stream())

    def noop(self, pool: int, service_mask: int, need: int, now: float, exclude: Iterable[int] = ()) -> int:
        return -1

    def rank(
        self, pool: int, service_mask: int, need: int, now: float, exclude: Iterable[int] = (), k: int = 4
    ) -> list[int]:
        self._check_pool(pool)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        stream = self._rng.next_stream()
        excluded = set(exclude)
        top: list[tuple[_Key, int, int]] = []  # (score, key, slot), best first
        for slot in self._members(pool):
            if self._reason(slot, service_mask, need, now, excluded) != R_OK:
                continue
            score = self._score(slot)
            key = stream.next()
            m = len(top)
            while m > 0:
                cmp = _better(*score, *top[m - 1][0])
                if cmp > 0 or (cmp == 0 and key < top[m - 1][1]):
                    m -= 1
                else:
                    break
            if m >= k:
                continue
            top.insert(m, (score, key, slot))
            del top[k:]
        return [slot for _, _, slot in top]

    def reasons(self, pool: int, service_mask: int, need: int, now: float, exclude: Iterable[int] = ()) -> bytes:
        self._check_pool(pool)
        excluded = set(exclude)
        return bytes(self._reason(s, service_mask, need, now, excluded) for s in self._members(pool))

    def capacity(self, slot: int) -> tuple[int, int]:
        if slot < 0 or slot >= self.n_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.n_slots})")
        return (int(self._recs[slot]["max_concurrency"]), int(self._loads[slot]["running"]))

    def candidate(self, slot: int) -> tuple[int, str, int, int]:
        mx, running = self.capacity(slot)
        # node_ids None (not given) fails here with TypeError, as in the compiled kernel
        return (slot, self._node_ids[slot], mx, running)  # type: ignore[index]

    def members(self, pool: int) -> list[int]:
        self._check_pool(pool)
        return self._members(pool)

    def _free(  # noqa: PLR0917  a request's fields
        self, pool: int, mask: int, need: int, now: float, exclude: Container[int],
        inflight: NDArray[np.int32] | None = None,
    ) -> int:
        return sum(
            int(self._recs[s]["max_concurrency"]) - self._effective(s, inflight)
            for s in self._members(pool)
            if self._reason(s, mask, need, now, exclude, inflight) == R_OK
        )

    def free_capacity(
        self, pool: int, service_mask: int, need: int, now: float, exclude: Iterable[int] = ()
    ) -> int:
        self._check_pool(pool)
        return self._free(pool, service_mask, need, now, set(exclude))

    def most_free_pool(
        self, src_id: int, tgt_id: int, service_mask: int, need: int, now: float, exclude: Iterable[int] = ()
    ) -> int:
        return self._most_free(src_id, tgt_id, service_mask, need, now, set(exclude))

    def _most_free(  # noqa: PLR0917  a request's fields
        self, src_id: int, tgt_id: int, mask: int, need: int, now: float, exclude: Container[int],
        inflight: NDArray[np.int32] | None = None,
    ) -> int:
        best, best_free = -1, -1
        for pool in self.pools_for(src_id, tgt_id):
            free_now = self._free(pool, mask, need, now, exclude, inflight)
            if free_now > best_free:
                best, best_free = pool, free_now
        return best

    def reason(self, slot: int, service_mask: int, need: int, now: float, exclude: Iterable[int] = ()) -> int:
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.n_slots})")
        return self._reason(slot, service_mask, need, now, set(exclude))

    def is_member(self, pool: int, slot: int) -> bool:
        self._check_pool(pool)
        return slot in self._members(pool)


# One job's record, by handle: [job_id (None for a batch job), slot, pool_id,
# session_id, expires_at, committed, version, pair]. A list indexed by position,
# the twin's stand-in for the compiled struct (list[Any]: its fields differ in type).
_JobRec = list[Any]
# What expire() and jobs() report per job: (job_id, or the handle of a batch
# job, slot, pool_id, session_id, expires_at, committed).
_JobRecord = tuple[str | int, int, int, object, float, bool]


class JobTable:
    """Twin of the compiled job table: live reservations, per-node counts, exact expiry.

    The compiled table is atomic because each call holds the GIL throughout;
    pure Python can be interrupted anywhere, so here one lock per table
    gives the same guarantee. Expiry uses ``heapq`` with lazy deletion (an
    entry is live only while its ``(expires_at, version)`` still matches the
    job), which returns the same jobs in the same order as the compiled
    table's ring and indexed heap: earliest expiry first, then the expiry
    set first (the version: every push takes the next one, as the compiled
    table numbers each setting of an expiry).
    """

    FULL = -1
    GONE = -2
    HELD = -3

    def __init__(self, counts: SlotCounts, prefix: str | None = None) -> None:
        """``prefix`` is checked as the compiled table checks it.

        One dict files every id here; the compiled table files numbered ids in
        a ring, which changes only how fast they are found.
        """
        if counts is None:
            raise TypeError("counts must be a SlotCounts")
        if prefix is not None and not (isinstance(prefix, str) and prefix and prefix.isascii()):
            raise ValueError(f"prefix must be a non-empty ASCII str, got {prefix!r}")
        self._lock = threading.Lock()
        self._counts = counts
        self._index: dict[str, int] = {}
        self._recs: list[_JobRec | None] = []  # handle -> record (_JobRec), None while the handle is free
        self._free: list[int] = []
        self._gen: list[int] = []  # handle -> times reused: the high half of a public job handle
        self._n_live = 0
        self._heap: list[tuple[float, int, int]] = []  # (expires_at, version, handle)
        self._bound: set[int] = set()
        self._committed = 0
        self._expired = 0
        self._version = 0

    def __len__(self) -> int:
        return self._n_live

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._index

    @property
    def committed(self) -> int:
        return self._committed

    @property
    def expired(self) -> int:
        return self._expired

    @property
    def next_expiry(self) -> float:
        with self._lock:
            self._prune_locked()
            return self._heap[0][0] if self._heap else float("inf")

    def bind(self, slot: int) -> None:
        if slot < 0:
            raise IndexError(f"slot {slot} out of range")
        with self._lock:
            self._bound.add(slot)

    def unbind(self, slot: int) -> None:
        with self._lock:
            self._bound.discard(slot)

    def _prune_locked(self) -> None:
        heap = self._heap
        while heap:
            at, version, h = heap[0]
            rec = self._recs[h]
            if rec is not None and rec[6] == version:
                return
            heapq.heappop(heap)

    def _push_locked(self, h: int, rec: _JobRec) -> None:
        # versions are unique for the table's life: a reused handle's stale entries never match
        self._version += 1
        rec[6] = self._version
        heapq.heappush(self._heap, (rec[4], rec[6], h))

    def _live_locked(self, job_id: str, now: float) -> int:
        h = self._index.get(job_id)
        # an indexed handle's record is set (None only while a handle is free)
        if h is None or self._recs[h][4] <= now:  # type: ignore[index]
            return -1
        return h

    def handle(self, job_id: str, now: float) -> int:
        with self._lock:
            return self._live_locked(job_id, now)

    def get(self, job_id: str, now: float) -> tuple[int, int, str, float, bool, object] | None:
        with self._lock:
            h = self._live_locked(job_id, now)
            if h < 0:
                return None
            rec: _JobRec = self._recs[h]  # type: ignore[assignment]  # h is live: its record is set
            return (rec[1], rec[2], rec[3], rec[4], rec[5], rec[7])

    def reserve(  # noqa: PLR0917  the compiled reserve's signature
        self, job_id: str, slot: int, limit: int, running: int, pool_id: int, session_id: str, expires_at: float,
        pair: object = None,
    ) -> int:
        if type(job_id) is not str or type(session_id) is not str:
            raise TypeError("job_id and session_id must be str")
        with self._lock:
            if job_id in self._index:
                return self.HELD
            if slot not in self._bound:
                return self.GONE
            if not self._counts.try_add(slot, limit, running):
                return self.FULL
            h = self._take_locked()
            rec = [job_id, slot, pool_id, session_id, expires_at, False, 0, pair]
            self._recs[h] = rec
            self._index[job_id] = h
            self._push_locked(h, rec)
            return h

    def _take_locked(self) -> int:
        if not self._free:
            # same handle order as the compiled table: lowest free handle first
            n = max(2 * len(self._recs), 256)
            self._free.extend(range(n - 1, len(self._recs) - 1, -1))
            self._recs.extend([None] * (n - len(self._recs)))
            self._gen.extend([0] * (n - len(self._gen)))
        h = self._free.pop()
        self._gen[h] = (self._gen[h] + 1) & 0xFFFFFFFF
        self._n_live += 1
        return h

    # -- jobs named by handle (array batches) ---------------------------------
    def reserve_handle(  # noqa: PLR0917  the compiled reserve_handle's signature
        self, slot: int, limit: int, running: int, pool_id: int, session_id: object, expires_at: float,
        pair: object = None,
    ) -> int:
        with self._lock:
            if slot not in self._bound:
                return self.GONE
            if not self._counts.try_add(slot, limit, running):
                return self.FULL
            h = self._take_locked()
            rec = [None, slot, pool_id, session_id, expires_at, False, 0, pair]
            self._recs[h] = rec
            self._push_locked(h, rec)
            return (self._gen[h] << 32) | h

    def _of_handle_locked(self, handle: int, now: float) -> int:
        h = handle & 0xFFFFFFFF
        if handle < 0 or h >= len(self._recs):
            return -1
        rec = self._recs[h]
        if rec is None or self._gen[h] != handle >> 32 or rec[0] is not None or rec[4] <= now:
            return -1
        return h

    def release_handle(self, handle: int, slot: int, now: float) -> bool:
        with self._lock:
            h = self._owned_locked(self._of_handle_locked(handle, now), slot)
            if h >= 0:
                self._drop_locked(h)
            return h >= 0

    def commit_handle(self, handle: int, slot: int, expires_at: float, now: float) -> bool:
        with self._lock:
            h = self._owned_locked(self._of_handle_locked(handle, now), slot)
            if h >= 0:
                self._commit_locked(h, expires_at)
            return h >= 0

    def renew_handle(self, handle: int, slot: int, expires_at: float, now: float) -> bool:
        with self._lock:
            h = self._owned_locked(self._of_handle_locked(handle, now), slot)
            if h >= 0:
                self._expire_at_locked(h, expires_at)
            return h >= 0

    def get_handle(self, handle: int, now: float) -> tuple[int, int, object, float, bool, object] | None:
        with self._lock:
            h = self._of_handle_locked(handle, now)
            if h < 0:
                return None
            rec: _JobRec = self._recs[h]  # type: ignore[assignment]  # h is live: its record is set
            return (rec[1], rec[2], rec[3], rec[4], rec[5], rec[7])

    def release_handles(self, handles: NDArray[np.int64], now: float) -> int:
        with self._lock:
            done = 0
            for handle in np.asarray(handles, dtype=np.int64).tolist():
                h = self._of_handle_locked(handle, now)
                if h >= 0:
                    self._drop_locked(h)
                    done += 1
            return done

    def commit_handles(self, handles: NDArray[np.int64], expires_at: float, now: float) -> int:
        with self._lock:
            done = 0
            for handle in np.asarray(handles, dtype=np.int64).tolist():
                h = self._of_handle_locked(handle, now)
                if h >= 0:
                    self._commit_locked(h, expires_at)
                    done += 1
            return done

    def _commit_locked(self, h: int, expires_at: float) -> None:
        rec: _JobRec = self._recs[h]  # type: ignore[assignment]  # callers pass live handles only
        if not rec[5]:
            rec[5] = True
            self._committed += 1
        self._expire_at_locked(h, expires_at)

    def _owned_locked(self, h: int, slot: int) -> int:
        """``h`` if it is a live record held on ``slot`` (any slot when ``slot < 0``), else -1."""
        # h >= 0 is a live handle: its record is set
        return h if h >= 0 and (slot < 0 or self._recs[h][1] == slot) else -1  # type: ignore[index]

    def _expire_at_locked(self, h: int, expires_at: float) -> None:
        rec: _JobRec = self._recs[h]  # type: ignore[assignment]  # callers pass live handles only
        rec[4] = expires_at
        self._push_locked(h, rec)

    def commit(self, job_id: str, slot: int, expires_at: float, now: float) -> bool:
        with self._lock:
            h = self._owned_locked(self._live_locked(job_id, now), slot)
            if h >= 0:
                self._commit_locked(h, expires_at)
            return h >= 0

    def renew(self, job_id: str, slot: int, expires_at: float, now: float) -> bool:
        with self._lock:
            h = self._owned_locked(self._live_locked(job_id, now), slot)
            if h >= 0:
                self._expire_at_locked(h, expires_at)
            return h >= 0

    def _drop_locked(self, h: int) -> _JobRec:
        rec: _JobRec = self._recs[h]  # type: ignore[assignment]  # callers pass live handles only
        if rec[0] is not None:
            del self._index[rec[0]]
        self._counts.add(rec[1], -1)
        if rec[5]:
            self._committed -= 1
        self._recs[h] = None
        self._free.append(h)
        self._n_live -= 1
        return rec

    def release(self, job_id: str, slot: int, now: float) -> tuple[int, int, str, bool] | None:
        with self._lock:
            h = self._owned_locked(self._live_locked(job_id, now), slot)
            if h < 0:
                return None
            rec = self._drop_locked(h)
            return (rec[1], rec[2], rec[3], rec[5])

    def expire(self, now: float) -> list[_JobRecord]:
        out: list[_JobRecord] = []
        with self._lock:
            heap = self._heap
            while True:
                self._prune_locked()
                if not heap or heap[0][0] > now:
                    break
                _, _, h = heapq.heappop(heap)
                rec = self._drop_locked(h)
                self._expired += 1
                job_id = rec[0] if rec[0] is not None else (self._gen[h] << 32) | h  # a batch job: its handle
                out.append((job_id, rec[1], rec[2], rec[3], rec[4], rec[5]))
        return out

    def jobs(self) -> list[_JobRecord]:
        with self._lock:
            out = [(r[0] if r[0] is not None else (self._gen[h] << 32) | h, r[1], r[2], r[3], r[4], r[5])
                   for h, r in enumerate(self._recs) if r is not None]
        return sorted(out, key=lambda rec: (type(rec[0]) is not str, rec[0]))


class Assignment:
    """Where a job goes: ``node_id`` in ``pool_id``, under ``job_id`` (twin of the compiled class)."""

    __slots__ = ("node_id", "pool_id", "job_id", "session_id", "src", "tgt")

    def __init__(self, node_id: str, pool_id: int, job_id: str, session_id: str, src: str, tgt: str) -> None:
        self.node_id = node_id
        self.pool_id = pool_id
        self.job_id = job_id
        self.session_id = session_id
        self.src = src
        self.tgt = tgt

    def __repr__(self) -> str:
        return (f"Assignment(node_id={self.node_id!r}, pool_id={self.pool_id}, job_id={self.job_id!r}, "
                f"session_id={self.session_id!r}, src={self.src!r}, tgt={self.tgt!r})")

    def __eq__(self, other: object) -> bool:
        if not all(hasattr(other, k) for k in self.__slots__):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[type[Assignment], tuple[str, int, str, str, str, str]]:
        return (type(self), (self.node_id, self.pool_id, self.job_id, self.session_id, self.src, self.tgt))


class SessionState:
    """One session's binding. Decide and write it only under ``lock`` (or inside one atomic compiled call).

    ``binding`` is one tuple ``((src, tgt), pool_id)`` (or ``None``), so a
    reader that only needs a consistent view gets it from one attribute read.
    ``deciding`` is set while the Python path decides under ``lock``, and
    ``held`` while a batch has read the binding and not yet written it back;
    the one-call dispatch then leaves the job to the Python path, which
    waits for both.
    """

    __slots__ = ("lock", "binding", "last_used", "deciding", "held")

    def __init__(self, now: float) -> None:
        self.lock = threading.Lock()
        self.binding: tuple[tuple[str, str], int] | None = None
        self.last_used = now
        #: set while the Python path decides the binding holding ``lock``; the one-call dispatch then
        #: hands its job to that path, which waits for the lock
        self.deciding = False
        #: set while a batch has read the binding and not yet written it back; every other decision of the
        #: binding waits for it to clear
        self.held = False

    @property
    def pair(self) -> tuple[str, str] | None:
        binding = self.binding
        return None if binding is None else binding[0]

    @property
    def pool_id(self) -> int | None:
        binding = self.binding
        return None if binding is None else binding[1]


_UNSET = object()  # "argument not given" (None is a value the Python path validates)


class _Published(Protocol):
    """What :class:`Dispatcher` reads from the management layer: its current snapshot."""

    @property
    def snapshot(self) -> RuntimeSnapshot: ...


# What dispatch reads from one snapshot: (kernel, language ids, language count,
# pool id by pool index, pool index by pool id).
_View = tuple[SnapshotKernel, dict[str, int], int, tuple[int, ...], dict[int, int]]


class Dispatcher:
    """The common dispatch, start to finish, in one call (twin of the compiled class).

    ``dispatch(session_id, src, tgt)`` handles the common job: default
    services, no tenant, job id, exclusion or preference, codes already in the
    language cache. It reads the current snapshot, looks up the pair, reads
    and updates the session's binding, selects (bound pool, else the pool a
    new binding gets, then index order), reserves in the job table, makes
    the job id and the :class:`Assignment`. It returns ``None``, having
    changed nothing but possibly drawn one decision stream, whenever the
    Python path must decide instead: an argument to validate, an expiry or
    session sweep due, no pool or node found (the error needs its
    breakdown), or the reservation refused. The compiled class does exactly
    the same, so both kernels make the same decisions.

    The twin serialises calls with one lock, standing in for the compiled
    call's atomicity under the GIL.
    """

    def __init__(  # noqa: PLR0917  the compiled constructor's signature
        self, mgmt: _Published, jobs: JobTable, outcomes: Counters, sessions: dict[str, SessionState],
        languages: dict[str, str], clock: Callable[[], float], prefix: str, reservation_ttl: float,
        session_ttl: float, lease: float,
    ) -> None:
        self._lock = threading.Lock()
        self._mgmt = mgmt
        self._jobs = jobs
        self._holds: Holds[SessionState] = Holds(sessions, SessionState)  # what a batch holds its sessions with
        self._outcomes = outcomes
        self._sessions = sessions
        self._languages = languages
        self._clock = clock
        self._prefix = prefix
        self._ttl = float(reservation_ttl)
        self._session_ttl = float(session_ttl)
        self._lease = float(lease)
        self._seq = 0
        self._snap: RuntimeSnapshot | None = None
        self._view: _View | None = None
        self.default_mask = -1  # unknown until every default service has a bit
        self.next_sweep = float("inf")
        self._pass_size = 2048
        # one Assignment type per process, whichever kernel made it (the compiled one when built)
        from pysched._impl import kernel as default_kernel

        self._assignment = default_kernel.Assignment

    def now(self) -> float:
        """The time dispatch, release and commit read: the scheduler's clock."""
        return self._clock()

    @property
    def pass_size(self) -> int:
        """Jobs per placement pass of a batch; >= 1, 2,048 unless set.

        The compiled batch places that many jobs per pass without the GIL;
        the twin places a whole batch under its lock, which gives the same
        decisions (passes decide nothing), so here it is only checked and kept.
        """
        return self._pass_size

    @pass_size.setter
    def pass_size(self, value: int) -> None:
        if type(value) is not int:
            raise TypeError(f"pass_size must be an int, got {type(value).__name__}: {value!r}")
        if value < 1:
            raise ValueError(f"pass_size must be >= 1, got {value}")
        self._pass_size = value

    def forget_session(self, state: SessionState) -> None:
        """The session table dropped ``state``: nothing to do here.

        The compiled class drops it from its index of states; the twin finds
        states in the table itself.
        """

    def check_session_index(self) -> int:
        """The compiled class checks its session index here (tests); the twin has none: 0."""
        return 0

    def await_session(self, state: SessionState) -> None:
        """Wait until no batch holds ``state`` (its caller holds the session's lock with ``deciding`` set)."""
        await_unheld(state)

    def try_hold(self, session_ids: Collection[str], now: float) -> Held[SessionState] | None:
        """Hold every session of ``session_ids`` at once if no other call is deciding any of them (else None).

        The compiled class checks and sets ``held`` in one step under the
        GIL; the twin takes each session's lock without waiting (``Holds.try_hold``).
        """
        return self._holds.try_hold(session_ids, now)

    def let_go(self, held: dict[str, SessionState], created: list[tuple[str, SessionState]]) -> None:
        """End a hold that :meth:`try_hold` (or ``Holds.hold``) took (``Holds.let_go``)."""
        self._holds.let_go(held, created)

    def new_job_id(self) -> str:
        with self._lock:
            self._seq += 1
            return f"{self._prefix}{self._seq}"

    def job_id_of(self, seq: int) -> str:
        """The job id numbered ``seq`` (``>= 0``): what ``new_job_id`` returns for that number."""
        if type(seq) is not int:
            raise TypeError(f"seq must be an int, got {type(seq).__name__}: {seq!r}")
        if seq < 0:
            raise ValueError(f"seq must be >= 0, got {seq}")
        return f"{self._prefix}{seq}"

    def publish(self, snap: RuntimeSnapshot) -> None:
        """Cache what dispatch reads from a new snapshot (management's ``on_publish`` hook)."""
        with self._lock:
            self._view_of(snap)

    def _view_of(self, snap: RuntimeSnapshot) -> _View:
        view = self._view
        if view is None or snap is not self._snap:
            # Typed as the compiled class (the stub types every kernel); the scheduler builds
            # this Dispatcher and the registry's kernels from one kernel module, so it is the twin's.
            kernel = cast(SnapshotKernel, snap.kernel)
            index = snap.index
            view = self._view = (kernel, index.lang_ids, index.n_langs, snap.pool_ids, snap.pool_index)
            self._snap = snap
        return view

    def dispatch(
        self, session_id: object, src: object, tgt: object
    ) -> _core.Assignment | tuple[str, str, float] | None:
        if type(session_id) is not str or not session_id or type(src) is not str or type(tgt) is not str:
            return None
        s = self._languages.get(src)
        t = self._languages.get(tgt)
        mask = self.default_mask
        if s is None or t is None or t == "auto" or mask < 0:
            return None
        with self._lock:
            now = self._clock()
            if now >= self._jobs.next_expiry or now >= self.next_sweep:
                return None
            kernel, lang_ids, n_langs, pool_ids, pool_index = self._view or self._view_of(self._mgmt.snapshot)
            tgt_id = lang_ids.get(t)
            src_id = n_langs if s == "auto" else lang_ids.get(s)
            if src_id is None or tgt_id is None:
                return None
            pools = kernel.pools_for(src_id, tgt_id)
            if not pools:
                return None
            # The compiled call decides the session's binding atomically under the GIL. Python code can
            # let another thread run between any two lines, so the twin takes the session's lock instead,
            # without waiting (a call deciding the session holds it: the Python path, which waits, takes
            # the job); a new session's state is made first, and dropped again if the job is not placed.
            state = self._sessions.get(session_id)
            created = state is None
            if state is None:
                fresh = SessionState(now)
                state = self._sessions.setdefault(session_id, fresh)
                created = state is fresh
            if not state.lock.acquire(blocking=False):
                return None
            try:
                if state.held or self._sessions.get(session_id) is not state:
                    return None  # a batch holds it, or it was closed meanwhile: the Python path waits and sees
                return self._decide(state, session_id, s, t, src_id, tgt_id, pools, kernel, pool_ids, pool_index,
                                    mask, now)
            finally:
                if created and state.binding is None and self._sessions.get(session_id) is state:
                    del self._sessions[session_id]
                state.lock.release()

    def _decide(  # noqa: PLR0913, PLR0917  the call's locals, handed over once
        self, state: SessionState, session_id: str, s: str, t: str, src_id: int, tgt_id: int, pools: tuple[int, ...],
        kernel: SnapshotKernel, pool_ids: tuple[int, ...], pool_index: dict[int, int], mask: int, now: float,
    ) -> _core.Assignment | tuple[str, str, float] | None:
        """:meth:`dispatch` with the session's lock held: binding, selection, reservation, binding."""
        bound = -1
        pair = None
        binding = state.binding
        if binding is not None and state.last_used < now - self._session_ttl:
            binding = state.binding = None  # idle past its TTL: forgotten at lookup
        state.last_used = now
        if binding is not None and binding[0][0] == s and binding[0][1] == t:
            pair = binding[0]
            bound = pool_index.get(binding[1], -1)
        stream = kernel._rng.next_stream()
        found = kernel._select(src_id, tgt_id, pools, bound, -1, mask, NEED_GPU | NEED_PUBLIC, now, set(), stream)
        if found < 0:
            return (s, t, now)  # no eligible node: the Python path builds the breakdown
        slot, pidx = found & 0xFFFFFFFF, found >> 32
        pool_id = pool_ids[pidx]
        if pair is None:
            pair = (s, t)
        self._seq += 1
        job_id = f"{self._prefix}{self._seq}"
        max_c, running = kernel.capacity(slot)
        if self._jobs.reserve(job_id, slot, max_c, running, pool_id, session_id, now + self._ttl, pair) < 0:
            return None
        if bound != pidx or state.binding is None:
            state.binding = (pair, pool_id)
        state.last_used = now
        self._outcomes.add(0)
        # the management layer always gives the kernel its node ids
        return self._assignment(kernel._node_ids[slot], pool_id, job_id, session_id, s, t)  # type: ignore[index]

    def release(self, job_id: object) -> bool | None:
        """Release a job held on any node; None when the Python path must answer (bad argument)."""
        if type(job_id) is not str or not job_id:
            return None
        return self._jobs.release(job_id, -1, self._clock()) is not None

    def commit(self, job_id: object) -> bool | None:
        """Commit a job held on any node; None when the Python path must answer."""
        if type(job_id) is not str or not job_id:
            return None
        now = self._clock()
        return self._jobs.commit(job_id, -1, now + self._lease, now)

    # -- array batches ----------------------------------------------------------
    def _code_checked(  # noqa: PLR0917  the compiled helper's (code, name, i), plus the view it keeps on self
        self, code: object, name: str, i: int, lang_ids: dict[str, int], n_langs: int
    ) -> tuple[str, int]:
        norm = self._languages.get(code) if type(code) is str else None
        if norm is None:
            from pysched.languages import normalize_language

            try:
                norm = normalize_language(code, name, allow_auto=name == "src")
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{name}[{i}]: {exc}") from None
        if norm == "auto":
            return norm, n_langs
        return norm, lang_ids.get(norm, -1)

    # One function, like the compiled batch it mirrors line for line: splitting
    # it would part the twins.
    def batch(  # noqa: PLR0912, PLR0915, PLR0917  (see above; the compiled signature)
        self, session_ids: Sequence[object], src: str | Sequence[object], tgt: str | Sequence[object],
        service_mask: int, need: int, tenant_pool: int | None, now: float, out_slot: NDArray[np.int32],
        out_pool: NDArray[np.int64], out_handle: NDArray[np.int64], out_key: NDArray[np.int64],
    ) -> int:
        n = len(session_ids)
        if not (len(out_slot) == n and len(out_pool) == n and len(out_handle) == n and len(out_key) == n):
            raise ValueError("batch: every output array must have one entry per job")
        one_src, one_tgt = type(src) is str, type(tgt) is str
        if not one_src and len(src) != n:
            raise ValueError(f"src must be one code or one per job ({n}), got {len(src)}")
        if not one_tgt and len(tgt) != n:
            raise ValueError(f"tgt must be one code or one per job ({n}), got {len(tgt)}")
        # The batch's sessions are held (pysched._holding) before the lock is taken and until the jobs are
        # placed and bound: any other decision of their bindings comes before or after the batch. A fleet
        # change while they were taken makes the batch check its jobs again over the new snapshot (the
        # compiled batch starts its pass again).
        while True:
            with self._lock:
                view = self._view or self._view_of(self._mgmt.snapshot)
                kernel, lang_ids, n_langs, pool_ids, pool_index = view
                # the tenant's pool in the snapshot this batch places with (-1: not in it)
                tenant = -1 if tenant_pool is None else pool_index.get(tenant_pool, -1)
                # (code, id) of the one src/tgt, else set per job below (the placeholder is never read)
                s_entry = self._code_checked(src, "src", 0, lang_ids, n_langs) if one_src else ("", -1)
                t_entry = self._code_checked(tgt, "tgt", 0, lang_ids, n_langs) if one_tgt else ("", -1)
                pair_number: dict[int, int] = {}
                pairs: list[tuple[str, str]] = []
                pair_of: list[int] = []
                number: dict[str, int] = {}
                session_of: list[int] = []
                for i in range(n):
                    sid = session_ids[i]
                    if type(sid) is not str or not sid:
                        raise TypeError(
                            f"session_ids[{i}] must be a non-empty str, got {type(sid).__name__}: {sid!r}")
                    if not one_src:
                        s_entry = self._code_checked(src[i], "src", i, lang_ids, n_langs)
                    if not one_tgt:
                        t_entry = self._code_checked(tgt[i], "tgt", i, lang_ids, n_langs)
                    if t_entry[1] == n_langs:
                        raise ValueError(f"tgt[{i}]: 'auto' is not a target language")
                    key = -1
                    if s_entry[1] >= 0 and t_entry[1] >= 0:
                        key = kernel._pair_key(s_entry[1], t_entry[1])
                    out_key[i] = key
                    p = -1
                    if key >= 0:
                        known_pair = pair_number.get(key)
                        if known_pair is None:
                            known_pair = pair_number[key] = len(pairs)
                            pairs.append((s_entry[0], t_entry[0]))
                        p = known_pair
                    pair_of.append(p)
                    k = number.get(sid)
                    if k is None:
                        k = number[sid] = len(number)
                    session_of.append(k)
            held, created = self._holds.hold(number, now)
            try:
                with self._lock:
                    if (self._view or self._view_of(self._mgmt.snapshot)) is not view:
                        continue  # (the finally lets go of the sessions first)
                    states = [held[sid] for sid in number]
                    bound_pair = [-1] * len(number)
                    bound_index = [-1] * len(number)
                    for k, state in enumerate(states):
                        if state.binding is not None and state.last_used < now - self._session_ttl:
                            state.binding = None
                        state.last_used = now
                        if state.binding is None:
                            continue
                        pair = state.binding[0]
                        bound_pair[k] = -2
                        for j, known in enumerate(pairs):
                            if known == pair:
                                bound_pair[k] = j
                                bound_index[k] = pool_index.get(state.binding[1], -1)
                                break
                    placed = 0
                    for i in range(n):
                        out_slot[i] = out_pool[i] = out_handle[i] = -1
                        key = int(out_key[i])
                        if key < 0:
                            continue
                        src_id, tgt_id = split_pair_key(key, n_langs)
                        pools = kernel.pools_for(src_id, tgt_id)
                        if not pools:
                            continue
                        k = session_of[i]
                        bound = bound_index[k] if bound_pair[k] == pair_of[i] else -1
                        stream = kernel._rng.next_stream()
                        found = kernel._select(src_id, tgt_id, pools, bound, tenant, service_mask, need, now, set(),
                                               stream)
                        if found < 0:
                            continue
                        slot, pidx = found & 0xFFFFFFFF, found >> 32
                        pool_id = pool_ids[pidx]
                        max_c, running = kernel.capacity(slot)
                        pair = pairs[pair_of[i]]
                        handle = self._jobs.reserve_handle(slot, max_c, running, pool_id, session_ids[i],
                                                           now + self._ttl, pair)
                        if handle < 0:
                            continue
                        out_slot[i], out_pool[i], out_handle[i] = slot, pool_id, handle
                        placed += 1
                        if bound != pidx or bound_pair[k] != pair_of[i]:
                            bound_pair[k] = pair_of[i]
                            bound_index[k] = pidx
                            states[k].binding = (pair, pool_id)
                    self._seq += placed
                    self._outcomes.add(0, placed)
                    return placed
            finally:
                self._holds.let_go(held, created)

    # -- the public entry points, as Scheduler methods on an instance ----------
    # ``sched`` is the Scheduler facade (Any: its private slow paths are looked
    # up by name, as the compiled connect does); what is taken from it is typed below.
    def connect(self, sched: Any, default_services: object) -> None:
        self._slots: dict[str, int] = sched._reservations._slots
        self._slow_dispatch: Callable[..., _core.Assignment] = sched._dispatch_slow
        self._slow_release: Callable[..., bool] = sched._release_slow
        self._slow_commit: Callable[..., None] = sched._commit_slow
        self._no_node: Callable[[str, str, float], Exception] = sched._no_node_now
        self._default_services = default_services

    def call(
        self, session_id: object, src: object, tgt: object, *, job_id: object = None, exclude: object = None,
        tenant: object = None, services: object = _UNSET, require_gpu: object = True, prefer: object = None,
    ) -> _core.Assignment:
        if services is _UNSET:
            services = self._default_services
        if (job_id is None and exclude is None and tenant is None and prefer is None and require_gpu is True
                and services is self._default_services):
            done = self.dispatch(session_id, src, tgt)
            if done is not None:
                if type(done) is tuple:
                    raise self._no_node(*done)
                return done  # type: ignore[return-value]  # an Assignment: the tuple was raised above
        return self._slow_dispatch(session_id, src, tgt, job_id=job_id, exclude=exclude, tenant=tenant,
                                   services=services, require_gpu=require_gpu, prefer=prefer)

    def _slot_of(self, node_id: object) -> int:
        """The node's slot; -1 for "any node", -2 for a node never registered, -4 for a bad node id."""
        if node_id is None:
            return -1
        if type(node_id) is not str or not node_id:
            return -4
        return self._slots.get(node_id, -2)

    def call_release(self, job_id: object, *, node_id: object = None) -> bool:
        if type(job_id) is str and job_id:
            slot = self._slot_of(node_id)
            if slot == -2:  # noqa: PLR2004  a node never registered (see _slot_of)
                return False
            if slot >= -1:
                return self._jobs.release(job_id, slot, self._clock()) is not None
        return self._slow_release(job_id, node_id=node_id)

    def call_commit(self, job_id: object, *, node_id: object = None) -> None:
        if type(job_id) is str and job_id:
            slot = self._slot_of(node_id)
            if slot >= -1:
                now = self._clock()
                if self._jobs.commit(job_id, slot, now + self._lease, now):
                    return None
        return self._slow_commit(job_id, node_id=node_id)

