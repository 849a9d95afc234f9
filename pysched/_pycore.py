"""Pure-Python twin of :mod:`pysched._core`: the reference oracle.

Same names, same arguments and the same results, random tie-breaks
included (the same splitmix64/xorshift64 streams). It is deliberately a
plain translation of the compiled code, not an optimised one: tests run
every kernel case against both, and ``PYSCHED_PURE_PYTHON=1`` makes the
scheduler use it (slowly) where the extension cannot be built.
"""

from __future__ import annotations

import threading

import numpy as np

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

__all__ = ["COMPILED", "NODE_DTYPE", "LOAD_DTYPE", "REASONS", "STATUS_CODES", "Rng", "Counters", "LoadTable", "SlotCounts",
           "SnapshotKernel"]

COMPILED = False


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
        self._values = [0] * 16
        self._lock = threading.Lock()

    def add(self, index: int, amount: int = 1) -> None:
        if index < 0 or index >= 16:
            raise IndexError(f"counter index {index} out of range")
        with self._lock:
            self._values[index] += amount

    def to_list(self) -> list:
        return list(self._values)


class LoadTable:
    """The mutable per-slot load figures, written in place by heartbeats."""

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.array = np.zeros(n, dtype=LOAD_DTYPE)

    def __len__(self) -> int:
        return len(self.array)

    def grown(self, n: int) -> "LoadTable":
        bigger = LoadTable(max(n, len(self.array)))
        bigger.array[: len(self.array)] = self.array
        return bigger

    def update(self, slot: int, now: float, cpu: float, gpu: float, mem: float, running: int) -> None:
        if slot < 0 or slot >= len(self.array):
            raise IndexError(f"slot {slot} out of range [0, {len(self.array)})")
        rec = self.array[slot]
        rec["last_heartbeat"] = now
        if cpu == cpu:
            rec["cpu"] = cpu
        if gpu == gpu:
            rec["gpu"] = gpu
        if mem == mem:
            rec["mem"] = mem
        if running >= 0:
            rec["running"] = running
        self.array[slot] = rec

    def get(self, slot: int) -> tuple:
        if slot < 0 or slot >= len(self.array):
            raise IndexError(f"slot {slot} out of range [0, {len(self.array)})")
        r = self.array[slot]
        return (float(r["last_heartbeat"]), float(r["cpu"]), float(r["gpu"]), float(r["mem"]), int(r["running"]))


class SlotCounts:
    """Per-slot in-flight counts (the compiled version is atomic under the GIL; this one locks)."""

    def __init__(self, n: int, _lock: threading.Lock | None = None) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.array = np.zeros(n, dtype=np.int32)
        self._lock = _lock or threading.Lock()  # shared with successors
        self._successor: SlotCounts | None = None

    def _live(self) -> "SlotCounts":
        c = self
        while c._successor is not None:
            c = c._successor
        return c

    def __len__(self) -> int:
        return len(self._live().array)

    def _checked(self, slot: int) -> np.ndarray:
        arr = self._live().array
        if slot < 0 or slot >= len(arr):
            raise IndexError(f"slot {slot} out of range [0, {len(arr)})")
        return arr

    def grown(self, n: int) -> "SlotCounts":
        with self._lock:
            live = self._live()
            bigger = SlotCounts(max(n, len(live.array)), self._lock)
            bigger.array[: len(live.array)] = live.array
            live._successor = bigger
            return bigger

    def try_add(self, slot: int, limit: int, running: int) -> bool:
        with self._lock:
            arr = self._checked(slot)
            if max(int(arr[slot]), running) >= limit:
                return False
            arr[slot] += 1
            return True

    def try_add_many(self, slots, limits, running) -> np.ndarray:
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

    def __init__(
        self,
        recs: np.ndarray,
        loads: LoadTable,
        inflight: np.ndarray,
        pool_off: np.ndarray,
        pool_members: np.ndarray,
        pair_off: np.ndarray,
        pair_pools: np.ndarray,
        n_langs: int,
        rng: Rng,
        heartbeat_timeout: float,
        threshold: float,
        nogil_min_pool: int = 4096,
        node_ids: list | None = None,
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
        # the compiled kernel compares in single precision
        self._threshold = float(np.float32(threshold))

    def with_records(self, recs: np.ndarray, loads: LoadTable, inflight: np.ndarray) -> "SnapshotKernel":
        check_record_arrays(recs, len(loads), inflight, self.n_slots)
        k = object.__new__(SnapshotKernel)
        k.__dict__.update(self.__dict__)
        k._recs, k._loads, k._inflight, k.n_slots = recs, loads.array, inflight, len(recs)
        return k

    # -- helpers -------------------------------------------------------------
    def _pair_key(self, src_id: int, tgt_id: int) -> int:
        if src_id < 0 or src_id > self.n_langs or tgt_id < 0 or tgt_id >= self.n_langs:
            return -1
        return src_id * self.n_langs + tgt_id

    def _check_pool(self, pool: int) -> None:
        if pool < 0 or pool >= self.n_pools:
            raise IndexError(f"pool index {pool} out of range [0, {self.n_pools})")

    def _members(self, pool: int) -> list:
        return [int(s) for s in self._pool_members[self._pool_off[pool]: self._pool_off[pool + 1]]]

    def _reason(self, slot: int, mask: int, need: int, now: float, exclude) -> int:
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
        if self._effective(slot) >= int(rec["max_concurrency"]):
            return R_FULL
        thr = self._threshold
        if float(load["cpu"]) >= thr or float(load["gpu"]) >= thr or float(load["mem"]) >= thr:
            return R_OVERLOADED
        return R_OK

    def _effective(self, slot: int) -> int:
        return max(int(self._inflight[slot]), int(self._loads[slot]["running"]))

    def _score(self, slot: int) -> tuple:
        return (self._effective(slot), int(self._recs[slot]["max_concurrency"]), float(self._loads[slot]["gpu"]))

    def _scan(self, pool: int, mask: int, need: int, now: float, exclude, stream: _Stream) -> int:
        best = -1
        best_score = (0, 1, 0.0)
        ties = 0
        for slot in self._members(pool):
            if self._reason(slot, mask, need, now, exclude) != R_OK:
                continue
            score = self._score(slot)
            cmp = 1 if best < 0 else _better(*score, *best_score)
            if cmp < 0:
                continue
            if cmp == 0:
                ties += 1  # reservoir sampling: the newcomer wins with probability 1/ties
                if ((stream.next() >> 32) * ties) >> 32 != 0:
                    continue
            else:
                ties = 1
            best = slot
            best_score = score
        return best

    # -- entry points ----------------------------------------------------------
    def pools_for(self, src_id: int, tgt_id: int) -> tuple:
        key = self._pair_key(src_id, tgt_id)
        if key < 0:
            return ()
        return tuple(int(p) for p in self._pair_pools[self._pair_off[key]: self._pair_off[key + 1]])

    def select(self, src_id: int, tgt_id: int, preferred: int, service_mask: int, need: int, now: float,
               exclude=()) -> int:
        pools = self.pools_for(src_id, tgt_id)
        if not pools:
            return -2
        stream = self._rng.next_stream()
        exclude = set(exclude)
        order = ([preferred] if preferred in pools else []) + [p for p in pools if p != preferred]
        for pool in order:
            found = self._scan(pool, service_mask, need, now, exclude, stream)
            if found >= 0:
                return (pool << 32) | found
        return -1

    def select_batch(self, src_ids, tgt_ids, service_masks, needs, tenant_pools, session_of, bound_key,
                     bound_pool, exclude_off, exclude, scratch, now, out) -> None:
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
        live = self._inflight
        self._inflight = scratch  # score with the batch's running copy
        try:
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
                if pref < 0:
                    pref = int(tenant_pools[i]) if tenant_pools[i] >= 0 else self.most_free_pool(
                        src, tgt, mask, need, now, tuple(excl))
                stream = self._rng.next_stream()
                found = -1
                order = ([pref] if pref in pools else []) + [p for p in pools if p != pref]
                for pool in order:
                    slot = self._scan(pool, mask, need, now, excl, stream)
                    if slot >= 0:
                        found = (pool << 32) | slot
                        break
                out[i] = found
                if found >= 0:
                    scratch[found & 0xFFFFFFFF] += 1
                    bound_key[sess] = key
                    bound_pool[sess] = found >> 32
        finally:
            self._inflight = live

    def select_candidate(self, src_id: int, tgt_id: int, preferred: int, service_mask: int, need: int,
                         now: float, exclude=()):
        found = self.select(src_id, tgt_id, preferred, service_mask, need, now, exclude)
        if found < 0:
            return found
        return self.candidate(found & 0xFFFFFFFF) + (found >> 32,)

    def pick(self, pool: int, service_mask: int, need: int, now: float, exclude=()) -> int:
        self._check_pool(pool)
        return self._scan(pool, service_mask, need, now, set(exclude), self._rng.next_stream())

    def noop(self, pool: int, service_mask: int, need: int, now: float, exclude=()) -> int:
        return -1

    def rank(self, pool: int, service_mask: int, need: int, now: float, exclude=(), k: int = 4) -> list:
        self._check_pool(pool)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        stream = self._rng.next_stream()
        exclude = set(exclude)
        top: list[tuple] = []  # (score, key, slot), best first
        for slot in self._members(pool):
            if self._reason(slot, service_mask, need, now, exclude) != R_OK:
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

    def reasons(self, pool: int, service_mask: int, need: int, now: float, exclude=()) -> bytes:
        self._check_pool(pool)
        exclude = set(exclude)
        return bytes(self._reason(s, service_mask, need, now, exclude) for s in self._members(pool))

    def capacity(self, slot: int) -> tuple:
        if slot < 0 or slot >= self.n_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.n_slots})")
        return (int(self._recs[slot]["max_concurrency"]), int(self._loads[slot]["running"]))

    def candidate(self, slot: int) -> tuple:
        mx, running = self.capacity(slot)
        return (slot, self._node_ids[slot], mx, running)

    def members(self, pool: int) -> list:
        self._check_pool(pool)
        return self._members(pool)

    def _free(self, pool: int, mask: int, need: int, now: float, exclude) -> int:
        return sum(
            int(self._recs[s]["max_concurrency"]) - self._effective(s)
            for s in self._members(pool)
            if self._reason(s, mask, need, now, exclude) == R_OK
        )

    def free_capacity(self, pool: int, service_mask: int, need: int, now: float, exclude=()) -> int:
        self._check_pool(pool)
        return self._free(pool, service_mask, need, now, set(exclude))

    def most_free_pool(self, src_id: int, tgt_id: int, service_mask: int, need: int, now: float,
                       exclude=()) -> int:
        best, best_free = -1, -1
        exclude = set(exclude)
        for pool in self.pools_for(src_id, tgt_id):
            free_now = self._free(pool, service_mask, need, now, exclude)
            if free_now > best_free:
                best, best_free = pool, free_now
        return best
