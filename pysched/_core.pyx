# cython: language_level=3
"""pysched's compiled kernel: eligibility, scoring and ranking over a snapshot.

Everything here works on raw pointers captured once, when a snapshot is
published (:class:`SnapshotKernel`); a typed memoryview of a structured
array costs ~0.44 us to acquire, more than a whole 100-node scan, so no
entry point takes arrays. Arguments are validated once at the boundary,
then ``noexcept nogil`` helpers do the work.

A decision in a pool does not scan it: a per-pool ordering
(``_ordering.pxi``), kept in step with every count change, heartbeat and
publication, gives the best candidates in O(log n), and each one drawn is
checked for eligibility (see "How a node is chosen" below). Kernels the
ordering does not describe (an older snapshot, a batch's scratch counts,
counts no ``SlotCounts`` owns) make the same decisions by scanning; a scan
holds the GIL for ordinary pools (releasing it for one small decision costs
more than it saves) and releases it for pools of at least
``nogil_min_pool`` members.

``pysched._pycore`` is the pure-Python twin of this module: same names,
same results (including the random tie-breaks), used as the test oracle.
"""

cimport cython
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, malloc, free
from libc.string cimport memcpy, memmove, memset

import threading
import time

import numpy as np

cnp.import_array()

from pysched import _layout
from pysched._holding import HELD_POLL
from pysched._layout import LOAD_DTYPE, NODE_DTYPE, REASONS, STATUS_CODES, check_record_arrays, validate_kernel_arrays

# The same public names as the pure-Python twin (pysched._pycore).
__all__ = ["COMPILED", "NODE_DTYPE", "LOAD_DTYPE", "REASONS", "STATUS_CODES", "Rng", "Counters", "LoadTable",
           "SlotCounts", "Ordering", "SnapshotKernel", "JobTable", "Assignment", "SessionState", "Dispatcher"]

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define PYSCHED_PREFETCH(p) __builtin_prefetch((const void*)(p))
    #else
    #define PYSCHED_PREFETCH(p) ((void)0)
    #endif
    """
    # a hint to start loading a cache line the call will need soon (no effect on results)
    void _prefetch "PYSCHED_PREFETCH"(const void* p) noexcept nogil

cdef extern from *:
    """
    static inline const void* pysched_item_address(PyObject* list, Py_ssize_t i) {
        return list == Py_None ? NULL : (const void*)(((PyListObject*)list)->ob_item + i);
    }
    """
    # where item i of a list lies (NULL for None): to prefetch it without loading it
    const void* _item_address "pysched_item_address"(PyObject* lst, Py_ssize_t i) noexcept nogil

cdef extern from *:
    """
    static inline int pysched_ctz64(uint64_t x) {
    #if defined(__GNUC__) || defined(__clang__)
        return __builtin_ctzll(x);
    #else
        int n = 0;
        while (!(x & 1)) { x >>= 1; n++; }
        return n;
    #endif
    }
    """
    # the position of the lowest set bit of x (x != 0)
    int _ctz64 "pysched_ctz64"(uint64_t x) noexcept nogil


cdef enum:
    MAX_STACK_EXCLUDE = 32
    ORDER_DRAWS = 16           # _layout.ORDER_DRAWS: candidates a decision tries before it scans
    MAX_STACK_CLASS = 256      # best candidates collected on the stack by a scanning decision

cdef uint64_t GOLDEN = 0x9E3779B97F4A7C15ULL


cdef node_rec _rec_probe
cdef node_load _load_probe


def _check_layout():
    """Fail at import if the numpy dtypes drift from the C structs."""
    cdef char* base = <char*>&_rec_probe
    rec_offsets = {
        "service_mask": <char*>&_rec_probe.service_mask - base,
        "max_concurrency": <char*>&_rec_probe.max_concurrency - base,
        "status": <char*>&_rec_probe.status - base,
        "flags": <char*>&_rec_probe.flags - base,
        "pad_": <char*>&_rec_probe.pad_ - base,
    }
    base = <char*>&_load_probe
    load_offsets = {
        "last_heartbeat": <char*>&_load_probe.last_heartbeat - base,
        "cpu": <char*>&_load_probe.cpu - base,
        "gpu": <char*>&_load_probe.gpu - base,
        "mem": <char*>&_load_probe.mem - base,
        "running": <char*>&_load_probe.running - base,
        "pad_": <char*>&_load_probe.pad_ - base,
    }
    for dtype, size, offsets in (
        (NODE_DTYPE, sizeof(node_rec), rec_offsets),
        (LOAD_DTYPE, sizeof(node_load), load_offsets),
    ):
        if dtype.itemsize != size:
            raise ImportError(f"pysched._core: dtype itemsize {dtype.itemsize} != sizeof {size}")
        for name, off in offsets.items():
            if dtype.fields[name][1] != off:
                raise ImportError(f"pysched._core: field {name} at {dtype.fields[name][1]}, C has {off}")
    if sizeof(order_key) != 16 or sizeof(slot_brief) != 32:  # four keys, two briefs a line (_ordering.pxi)
        raise ImportError(f"pysched._core: sizeof(order_key) {sizeof(order_key)}, sizeof(slot_brief) "
                          f"{sizeof(slot_brief)}: 16 and 32 expected")
    c_codes = (STATUS_READY, STATUS_REGISTERING, STATUS_DEGRADED, STATUS_DRAINING, STATUS_OFFLINE, STATUS_ABSENT,
               FLAG_HAS_GPU, FLAG_PUBLIC, NEED_GPU, NEED_PUBLIC, NEED_UNKNOWN_SERVICE,
               R_OK, R_OFFLINE, R_NOT_READY, R_NO_GPU, R_NOT_PUBLIC, R_MISSING_SERVICE, R_EXCLUDED, R_FULL,
               R_OVERLOADED, N_REASONS)
    py_codes = (_layout.STATUS_READY, _layout.STATUS_REGISTERING, _layout.STATUS_DEGRADED, _layout.STATUS_DRAINING,
                _layout.STATUS_OFFLINE, _layout.STATUS_ABSENT, _layout.FLAG_HAS_GPU, _layout.FLAG_PUBLIC,
                _layout.NEED_GPU, _layout.NEED_PUBLIC, _layout.NEED_UNKNOWN_SERVICE,
                _layout.R_OK, _layout.R_OFFLINE, _layout.R_NOT_READY, _layout.R_NO_GPU, _layout.R_NOT_PUBLIC,
                _layout.R_MISSING_SERVICE, _layout.R_EXCLUDED, _layout.R_FULL, _layout.R_OVERLOADED,
                len(_layout.REASONS))
    if c_codes != py_codes:
        raise ImportError("pysched._core: C codes differ from pysched._layout")
    if GOLDEN != _layout.GOLDEN:
        raise ImportError("pysched._core: GOLDEN differs from pysched._layout")
    if ORDER_DRAWS != _layout.ORDER_DRAWS:
        raise ImportError("pysched._core: ORDER_DRAWS differs from pysched._layout")


_check_layout()

COMPILED = True


cdef inline uint64_t _splitmix64(uint64_t x) noexcept nogil:
    x += GOLDEN
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL
    return x ^ (x >> 31)


cdef inline uint64_t _xorshift64(uint64_t* state) noexcept nogil:
    cdef uint64_t x = state[0]
    x ^= x << 13
    x ^= x >> 7
    x ^= x << 17
    state[0] = x
    return x


cdef inline int64_t _draw(uint64_t* state, int64_t n) noexcept nogil:
    """The next draw of a decision's stream, as an index in [0, n) (multiply-shift, no modulo)."""
    return <int64_t>(((_xorshift64(state) >> 32) * <uint64_t>n) >> 32)


include "_gate.pxi"
include "_ordering.pxi"


@cython.final
cdef class Rng:
    """Seeded tie-break randomness: decision *k* draws from stream *k*.

    Each decision derives its own stream from ``(seed, k)`` instead of
    consuming a shared sequence, so a batch that visits requests grouped
    differently still makes exactly the decisions of one-by-one dispatch.
    """

    def __init__(self, seed: int = 0):
        self.seed = <uint64_t>(int(seed) & 0xFFFFFFFFFFFFFFFF)
        self.decisions = 0

    cdef uint64_t next_stream(self) noexcept nogil:
        cdef uint64_t s = _splitmix64(self.seed ^ _splitmix64(self.decisions))
        self.decisions += 1
        return s if s != 0 else GOLDEN


@cython.final
cdef class Counters:
    """Outcome counters; an increment is one C statement, atomic under the GIL."""

    def __init__(self):
        cdef int i
        for i in range(16):
            self.values[i] = 0

    def add(self, int index, int64_t amount=1):
        if index < 0 or index >= 16:
            raise IndexError(f"counter index {index} out of range")
        self.values[index] += amount

    def to_list(self) -> list:
        return [self.values[i] for i in range(16)]


@cython.final
cdef class LoadTable:
    """The mutable per-slot load figures, written in place by heartbeats.

    Only the management layer writes (under its lock); the kernel reads.
    Growing returns a new table and leaves this one untouched, so a kernel
    holding the old pointer keeps reading valid (if stale) memory; the
    ordering (if any) moves to the new table and waits, suspended, for the
    next kernel to retarget it.
    """

    def __init__(self, Py_ssize_t n):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.array = np.zeros(n, dtype=LOAD_DTYPE)
        self.loads = <node_load*>cnp.PyArray_DATA(self.array)
        self.n = n
        self.ordering = None

    cdef Gate _gate(self):
        return self.ordering.gate if self.ordering is not None else None

    def __len__(self):
        return self.n

    def grown(self, Py_ssize_t n) -> LoadTable:
        cdef LoadTable bigger = LoadTable(max(n, self.n))
        cdef Gate g = self._gate()
        _enter(g)
        try:
            if self.n:
                memcpy(bigger.loads, self.loads, self.n * sizeof(node_load))
            if self.ordering is not None:
                self.ordering.suspend()
                bigger.ordering = self.ordering
                self.ordering = None
        finally:
            _leave(g)
        return bigger

    def update(self, Py_ssize_t slot, double now, double cpu, double gpu, double mem, int32_t running):
        """Write one heartbeat; a NaN (or running < 0) keeps the old figure.

        The figures are stored as given (doubles). The ordering is told in
        the same call: atomic under the GIL, no Python-level call between.
        """
        if slot < 0 or slot >= self.n:
            raise IndexError(f"slot {slot} out of range [0, {self.n})")
        cdef node_load* rec = &self.loads[slot]
        cdef Gate g = self._gate()
        if g is not None:  # C only from here on: no entry bracket needed, only the wait
            g.wait()
        rec.last_heartbeat = now
        if cpu == cpu:  # NaN: not reported, keep the last figure
            rec.cpu = cpu
        if gpu == gpu:
            rec.gpu = gpu
        if mem == mem:
            rec.mem = mem
        if running >= 0:
            rec.running = running
        if self.ordering is not None:
            self.ordering.on_load(slot)

    def get(self, Py_ssize_t slot) -> tuple:
        if slot < 0 or slot >= self.n:
            raise IndexError(f"slot {slot} out of range [0, {self.n})")
        cdef node_load* rec = &self.loads[slot]
        return (rec.last_heartbeat, rec.cpu, rec.gpu, rec.mem, rec.running)


@cython.final
cdef class SlotCounts:
    """Per-slot in-flight counts with check-and-add in one C call.

    Every method runs start to finish without releasing the GIL, so each is
    atomic against other Python threads (a batch's pass without the GIL is
    kept apart by the scheduler's gate, :class:`Gate`, which these methods
    wait on): the local reservation backend needs
    no lock on its hot path. Growing copies the counts into a bigger table
    and forwards this one to it in the same atomic step, so a thread still
    holding the old table keeps updating the live counts.
    """

    def __init__(self, Py_ssize_t n):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.array = np.zeros(n, dtype=np.int32)
        self.counts = <int32_t*>cnp.PyArray_DATA(self.array)
        self.n = n
        self.successor = None
        self.ordering = None
        self.gate = Gate()
        # a kernel handed this array finds these counts (and their ordering) by its address
        _COUNTS_BY_ADDRESS[<Py_ssize_t>self.counts] = self

    # Every change of a count goes through c_try_add or c_add, which tell the
    # ordering in the same call: C only, no Python-level call, so the count
    # and the ordering change together, atomically under the GIL.
    # (nogil: a batch's pass calls them without the GIL; the tables are walked
    # through borrowed pointers, which no reference count change needs)
    cdef bint c_try_add(self, Py_ssize_t slot, int64_t limit, int64_t running) noexcept nogil:
        cdef PyObject* c = <PyObject*>self
        while (<SlotCounts>c).successor is not None:
            c = <PyObject*>(<SlotCounts>c).successor
        cdef int32_t* counts = (<SlotCounts>c).counts
        cdef int64_t held = counts[slot]
        if (held if held > running else running) >= limit:
            return False
        counts[slot] += 1
        if (<SlotCounts>c).ordering is not None:
            (<SlotCounts>c).ordering.on_count(slot)
        return True

    cdef void c_add(self, Py_ssize_t slot, int32_t delta) noexcept nogil:
        cdef PyObject* c = <PyObject*>self
        while (<SlotCounts>c).successor is not None:
            c = <PyObject*>(<SlotCounts>c).successor
        cdef int32_t* counts = (<SlotCounts>c).counts
        counts[slot] += delta
        if (<SlotCounts>c).ordering is not None:
            (<SlotCounts>c).ordering.on_count(slot)

    cdef SlotCounts _live(self):
        cdef SlotCounts c = self
        while c.successor is not None:
            c = c.successor
        return c

    cdef SlotCounts _live_for(self, Py_ssize_t slot):
        """The live table, once ``slot`` is known to be inside it."""
        cdef SlotCounts c = self._live()
        if slot < 0 or slot >= c.n:
            raise IndexError(f"slot {slot} out of range [0, {c.n})")
        return c

    def __len__(self):
        return self._live().n

    def grown(self, Py_ssize_t n) -> SlotCounts:
        cdef SlotCounts live = self._live()
        cdef SlotCounts bigger = SlotCounts(max(n, live.n))
        bigger.gate = self.gate
        _enter(self.gate)
        try:
            if live.n:
                memcpy(bigger.counts, live.counts, live.n * sizeof(int32_t))  # nothing between: atomic
            live.successor = bigger
            if live.ordering is not None:
                # the ordering follows the live counts, suspended until a kernel over the new array retargets it
                live.ordering.suspend()
                bigger.ordering = live.ordering
                live.ordering = None
        finally:
            _leave(self.gate)
        return bigger

    def try_add(self, Py_ssize_t slot, int64_t limit, int64_t running) -> bool:
        """Add one if ``max(count, running) < limit``; report whether it did."""
        self.gate.wait()  # C only from here on: the wait is the whole bracket
        self._live_for(slot)
        return self.c_try_add(slot, limit, running)

    def try_add_many(self, const int32_t[::1] slots, const int64_t[::1] limits, const int64_t[::1] running):
        """:meth:`try_add` for every slot in order, in one atomic call; a bool array of successes."""
        cdef SlotCounts c = self._live()
        cdef Py_ssize_t k, n = slots.shape[0]
        if limits.shape[0] != n or running.shape[0] != n:
            raise ValueError("try_add_many: slots, limits and running must have the same length")
        for k in range(n):
            if slots[k] < 0 or slots[k] >= c.n:
                raise IndexError(f"slot {slots[k]} out of range [0, {c.n})")
        out = np.zeros(n, dtype=np.bool_)
        cdef cnp.npy_bool* ok = <cnp.npy_bool*>cnp.PyArray_DATA(out)
        self.gate.wait()
        for k in range(n):
            ok[k] = c.c_try_add(slots[k], limits[k], running[k])
        return out

    def add(self, Py_ssize_t slot, int32_t delta) -> int:
        self.gate.wait()
        cdef SlotCounts c = self._live_for(slot)
        self.c_add(slot, delta)
        return c.counts[slot]

    def set(self, Py_ssize_t slot, int32_t value) -> None:
        self.gate.wait()
        cdef SlotCounts c = self._live_for(slot)
        c.c_add(slot, value - c.counts[slot])

    def get(self, Py_ssize_t slot) -> int:
        cdef SlotCounts c = self._live_for(slot)
        return c.counts[slot]


cdef inline int _reason(
    const node_rec* rec,
    const node_load* load,
    int32_t inflight,
    int32_t slot,
    const request_t* req,
    double heartbeat_timeout,
    double threshold,
) noexcept nogil:
    cdef Py_ssize_t i
    cdef int32_t effective
    if rec.status >= STATUS_OFFLINE or req.now - load.last_heartbeat > heartbeat_timeout:
        return R_OFFLINE
    if rec.status != STATUS_READY:
        return R_NOT_READY
    if (req.need & NEED_GPU) and not (rec.flags & FLAG_HAS_GPU):
        return R_NO_GPU
    if (req.need & NEED_PUBLIC) and not (rec.flags & FLAG_PUBLIC):
        return R_NOT_PUBLIC
    if (req.need & NEED_UNKNOWN_SERVICE) or (rec.service_mask & req.service_mask) != req.service_mask:
        return R_MISSING_SERVICE
    for i in range(req.n_exclude):
        if req.exclude[i] == slot:
            return R_EXCLUDED
    effective = inflight if inflight > load.running else load.running
    if effective >= <int64_t>rec.max_concurrency:
        return R_FULL
    if load.cpu >= threshold or load.gpu >= threshold or load.mem >= threshold:
        return R_OVERLOADED
    return R_OK


cdef inline bint _eligible(
    const node_rec* rec,
    const node_load* load,
    int32_t held,
    int32_t slot,
    const request_t* req,
    double heartbeat_timeout,
    double threshold,
) noexcept nogil:
    """``_reason(...) == R_OK``, computed without telling the reasons apart.

    NEED_GPU/NEED_PUBLIC share their bits with FLAG_HAS_GPU/FLAG_PUBLIC, so
    both flag checks are one mask test; the hot scan pays for ~6 branches
    per node instead of ~12.
    """
    cdef int32_t effective = held if held > load.running else load.running
    if (rec.status != STATUS_READY
            or effective >= <int64_t>rec.max_concurrency
            or req.now - load.last_heartbeat > heartbeat_timeout
            or load.cpu >= threshold or load.gpu >= threshold or load.mem >= threshold):
        return False
    return _wanted(rec.flags, rec.service_mask, slot, req)


cdef inline bint _wanted(uint8_t flags, uint64_t service_mask, int32_t slot, const request_t* req) noexcept nogil:
    """The request's own part of eligibility: its needs, its services, its exclusions."""
    cdef Py_ssize_t i
    if (req.need & ~flags & (NEED_GPU | NEED_PUBLIC | NEED_UNKNOWN_SERVICE)) or (req.service_mask & ~service_mask):
        return False
    for i in range(req.n_exclude):
        if req.exclude[i] == slot:
            return False
    return True


cdef inline bint _eligible_key(const order_key* k, const slot_brief* b, int32_t slot, const request_t* req,
                               double heartbeat_timeout) noexcept nogil:
    """``_eligible`` for a leaf of a pool's tree, from its key and brief (``_ordering.pxi``) alone.

    Both are up to date with the slot's records, load and count (the
    ordering follows every change of them), and ``eff >= 0`` says what
    ``_eligible`` checks of them that no request changes: ready, below its max
    counting in-flight and reported jobs, not overloaded. What is left is the
    request's part (``_wanted``, as there) and the heartbeat's age, from the
    brief's copies. In a big fleet this reads two cache lines of the slot
    (key, brief) instead of three (node record, load record, count).
    """
    if k.eff < 0 or req.now - b.last_heartbeat > heartbeat_timeout:
        return False
    return _wanted(b.flags, b.service_mask, slot, req)


cdef int _fill_request(
    request_t* req, uint64_t service_mask, int need, double now, object exclude, int32_t* stack,
    const int32_t* inflight
) except -1:
    """Boundary conversion of (mask, need, now, exclude) into a request_t.

    Up to MAX_STACK_EXCLUDE excluded slots go into the caller's stack
    buffer; more are malloc'ed, and the caller frees ``req.exclude`` when it
    is not ``stack``.
    """
    cdef Py_ssize_t n, i
    cdef int32_t* buf = stack
    req.service_mask = service_mask
    req.need = need
    req.now = now
    req.exclude = stack
    req.n_exclude = 0
    req.inflight = inflight
    if not exclude:
        return 0
    n = len(exclude)
    if n > MAX_STACK_EXCLUDE:
        buf = <int32_t*>malloc(n * sizeof(int32_t))
        if buf == NULL:
            raise MemoryError()
    try:
        for i in range(n):
            buf[i] = exclude[i]
    except BaseException:
        if buf != stack:
            free(buf)
        raise
    req.exclude = buf
    req.n_exclude = n
    return 0


cdef inline void _free_request(request_t* req, int32_t* stack) noexcept:
    if req.exclude != stack:
        free(<void*>req.exclude)
        req.exclude = stack


cdef inline void _free_top(int32_t* top_slot, int64_t* top_eff, int64_t* top_max, double* top_gpu,
                           uint64_t* top_key) noexcept nogil:
    # rank()'s scratch columns; free(NULL) is a no-op, so a partial allocation is fine
    free(top_slot)
    free(top_eff)
    free(top_max)
    free(top_gpu)
    free(top_key)


cdef inline int _better(int64_t eff, int64_t mx, double gpu,
                        int64_t best_eff, int64_t best_max, double best_gpu) noexcept nogil:
    """1 if (eff/mx, gpu) is strictly lower than the best, 0 on a tie, -1 if worse."""
    cdef int64_t lhs = eff * best_max
    cdef int64_t rhs = best_eff * mx
    if lhs < rhs:
        return 1
    if lhs > rhs:
        return -1
    if gpu < best_gpu:
        return 1
    if gpu > best_gpu:
        return -1
    return 0


cdef inline Py_ssize_t _pair_key_of(Py_ssize_t n_langs, Py_ssize_t src_id, Py_ssize_t tgt_id) noexcept nogil:
    """pysched.language_index.pair_key in C (the one definition), -1 for ids out of range."""
    if src_id < 0 or src_id > n_langs or tgt_id < 0 or tgt_id >= n_langs:
        return -1
    return src_id * n_langs + tgt_id


@cython.final
cdef class SnapshotKernel:
    """Raw-pointer view of one published snapshot, plus the kernel entry points.

    Pools and languages are addressed by dense indices; the management
    layer maps pool ids and language codes to them. Slots index the node
    record, load and in-flight arrays.
    """

    def __init__(
        self,
        cnp.ndarray recs,
        LoadTable loads,
        cnp.ndarray inflight,
        cnp.ndarray pool_off,
        cnp.ndarray pool_members,
        cnp.ndarray pair_off,
        cnp.ndarray pair_pools,
        Py_ssize_t n_langs,
        Rng rng,
        double heartbeat_timeout,
        double threshold,
        Py_ssize_t nogil_min_pool=4096,
        list node_ids=None,
        changed=None,
    ):
        validate_kernel_arrays(recs, len(loads), inflight, pool_off, pool_members, pair_off, pair_pools,
                               n_langs, heartbeat_timeout)
        n_slots = recs.shape[0]
        n_pools = pool_off.shape[0] - 1
        self.recs = <const node_rec*>cnp.PyArray_DATA(recs)
        self.loads = loads.loads
        self.inflight = <int32_t*>cnp.PyArray_DATA(inflight)
        self.pool_off = <const int32_t*>cnp.PyArray_DATA(pool_off)
        self.pool_members = <const int32_t*>cnp.PyArray_DATA(pool_members)
        self.pair_off = <const int32_t*>cnp.PyArray_DATA(pair_off)
        self.pair_pools = <const int32_t*>cnp.PyArray_DATA(pair_pools)
        self.n_slots = n_slots
        self.n_pools = n_pools
        self.n_langs = n_langs
        self.heartbeat_timeout = heartbeat_timeout
        self.threshold = threshold
        self.nogil_min_pool = nogil_min_pool
        self.rng = rng
        self.node_ids = node_ids
        self.refs = (recs, loads, inflight, pool_off, pool_members, pair_off, pair_pools)
        self._attach(loads, inflight, changed)

    cdef Gate _gate(self):
        return self.ordering.gate if self.ordering is not None else None

    def with_records(self, cnp.ndarray recs, LoadTable loads, cnp.ndarray inflight, changed=None) -> SnapshotKernel:
        """A kernel over new node records (and tables), sharing this one's pools and index.

        For publications that change nodes but not pools: only the arrays
        that changed are checked, not the membership and index arrays this
        kernel already validated (slots never shrink, so those stay valid).
        ``changed``: the slots whose record differs from this kernel's, when
        the caller knows them (it saves comparing every record); None: compare.
        """
        check_record_arrays(recs, len(loads), inflight, self.n_slots)
        cdef SnapshotKernel k = SnapshotKernel.__new__(SnapshotKernel)
        k.recs = <const node_rec*>cnp.PyArray_DATA(recs)
        k.loads = loads.loads
        k.inflight = <int32_t*>cnp.PyArray_DATA(inflight)
        k.pool_off = self.pool_off
        k.pool_members = self.pool_members
        k.pair_off = self.pair_off
        k.pair_pools = self.pair_pools
        k.n_slots = recs.shape[0]
        k.n_pools = self.n_pools
        k.n_langs = self.n_langs
        k.heartbeat_timeout = self.heartbeat_timeout
        k.threshold = self.threshold
        k.nogil_min_pool = self.nogil_min_pool
        k.rng = self.rng
        k.node_ids = self.node_ids
        k.refs = (recs, loads, inflight) + tuple(self.refs[3:])
        k._attach(loads, inflight, changed)
        return k

    cdef int _attach(self, LoadTable loads, object inflight, object changed) except -1:
        """Find the ordering of these arrays (creating it if need be) and retarget it to this kernel.

        Only in-flight counts that a live :class:`SlotCounts` owns can be
        followed (every change of theirs notifies the ordering); over any
        other array the kernel decides by scanning. One ordering serves one
        (counts, load table) pair: a kernel over another pair gets a new one.
        """
        cdef SlotCounts counts = _COUNTS_BY_ADDRESS.get(<Py_ssize_t>self.inflight)
        cdef Ordering o
        cdef Py_ssize_t n_changed = -1, i
        cdef int32_t* slots = NULL
        cdef Gate g = counts.gate if counts is not None else None
        self.ordering = None
        if changed is not None:
            n_changed = len(changed)
            slots = <int32_t*>malloc((n_changed if n_changed > 0 else 1) * sizeof(int32_t))
            if slots == NULL:
                raise MemoryError()
            try:
                for i in range(n_changed):
                    slots[i] = changed[i]
                    if slots[i] < 0 or slots[i] >= self.n_slots:
                        raise ValueError(f"changed holds slot {changed[i]!r}, outside [0, {self.n_slots})")
            except BaseException:
                free(slots)
                raise
        _enter(g)
        try:
            if counts is None or counts.successor is not None or counts.n < self.n_slots:
                return 0
            o = counts.ordering
            if o is None or loads.ordering is not o:
                if o is not None:
                    o.suspend()
                if loads.ordering is not None:
                    loads.ordering.suspend()
                o = Ordering()
                o.gate = g
                counts.ordering = o
                loads.ordering = o
            o.retarget(self, slots, n_changed)
            self.ordering = o
            self.ordering_epoch = o.epoch
            return 0
        finally:
            _leave(g)
            free(slots)

    @property
    def ordering(self):
        """The :class:`Ordering` of this kernel's arrays, or None (decisions then scan)."""
        return self.ordering

    @property
    def ordered(self) -> bool:
        """Whether decisions use the ordering now (this kernel is its current target)."""
        cdef Ordering o = self.ordering
        return o is not None and o.ready and o.epoch == self.ordering_epoch

    @property
    def n_pools(self) -> int:
        return self.n_pools

    @property
    def n_langs(self) -> int:
        return self.n_langs

    @property
    def n_slots(self) -> int:
        return self.n_slots

    # -- helpers -----------------------------------------------------------
    cdef Py_ssize_t _pair_key(self, Py_ssize_t src_id, Py_ssize_t tgt_id) except -2:
        return _pair_key_of(self.n_langs, src_id, tgt_id)

    cdef int _check_pool(self, Py_ssize_t pool) except -1:
        if pool < 0 or pool >= self.n_pools:
            raise IndexError(f"pool index {pool} out of range [0, {self.n_pools})")
        return 0

    # -- How a node is chosen in one pool -------------------------------------
    #
    # A decision in a pool is defined by the following procedure; the ordered
    # path (_choose_ordered), the scanning path (_choose_scan) and the pure-Python
    # twin each carry it out, so they agree exactly (the tests check it).
    #
    # Candidates: members that are ready, below their max, not overloaded, not
    # evicted (see _ordering.pxi) and not excluded by the request. Key:
    # (max(in-flight, running) / max_concurrency, gpu), compared exactly.
    #  1. Unless ``now`` is at or before the ordering's horizon: up to
    #     ORDER_DRAWS times, take the candidates with the best key (not yet
    #     rejected), draw r in [0, their number) from the decision's stream,
    #     and look at the r-th of them in member order. If it is eligible for
    #     the request (services, GPU, public, heartbeat age...), it is the
    #     answer; otherwise it is rejected for this decision (and evicted,
    #     when its heartbeat is stale). No candidate left: no node (-1).
    #  2. Otherwise: among the eligible members, the ones with the best key,
    #     one draw, the r-th of them in member order (the exact scan).
    # Any answer is therefore one of the equally best eligible nodes: a
    # candidate found in step 1 has the best key of a set that holds every
    # eligible node; each step picks uniformly among the ties.

    cdef int32_t scan_pool(self, Py_ssize_t pool, const request_t* req, uint64_t* state) noexcept nogil:
        """Step 2: the r-th (one draw) of the eligible members with the best key, or -1."""
        # Everything the loops touch is copied to locals first: CPython builds
        # with -fno-strict-aliasing, so otherwise every store would force the
        # compiler to reload each field from ``self``.
        cdef const node_rec* recs = self.recs
        cdef const node_load* loads = self.loads
        cdef const int32_t* inflight = req.inflight
        cdef const int32_t* members = self.pool_members
        cdef double timeout = self.heartbeat_timeout
        cdef double threshold = self.threshold
        cdef Py_ssize_t j, begin = self.pool_off[pool], end = self.pool_off[pool + 1]
        cdef int32_t slot, best = -1, held
        cdef int64_t eff, mx, best_eff = 0, best_max = 1, ties = 0, lhs, rhs, r
        cdef double gpu, best_gpu = 0
        cdef const node_rec* rec
        cdef const node_load* load
        for j in range(begin, end):
            slot = members[j]
            rec = &recs[slot]
            load = &loads[slot]
            held = inflight[slot]
            if not _eligible(rec, load, held, slot, req, timeout, threshold):
                continue
            eff = held if held > load.running else load.running
            mx = rec.max_concurrency
            gpu = load.gpu
            if best >= 0:
                # compare eff/mx with best_eff/best_max exactly, by cross-multiplying
                lhs = eff * best_max
                rhs = best_eff * mx
                if lhs > rhs or (lhs == rhs and gpu > best_gpu):
                    continue
                if lhs == rhs and gpu == best_gpu:
                    ties += 1
                    continue
            best = slot
            best_eff = eff
            best_max = mx
            best_gpu = gpu
            ties = 1
        if best < 0:
            return -1
        r = _draw(state, ties)
        for j in range(begin, end):
            slot = members[j]
            rec = &recs[slot]
            load = &loads[slot]
            held = inflight[slot]
            if not _eligible(rec, load, held, slot, req, timeout, threshold):
                continue
            eff = held if held > load.running else load.running
            if eff * best_max == best_eff * <int64_t>rec.max_concurrency and load.gpu == best_gpu:
                if r == 0:
                    return slot
                r -= 1
        return best  # the counts changed between the passes (a concurrent thread, GIL released)

    cdef int32_t _scan(self, Py_ssize_t pool, const request_t* req, uint64_t* state) noexcept:
        """Step 2, without the GIL for large pools."""
        cdef int32_t found
        if self.pool_off[pool + 1] - self.pool_off[pool] >= self.nogil_min_pool:
            with nogil:
                found = self.scan_pool(pool, req, state)
            return found
        return self.scan_pool(pool, req, state)

    # _choose, _choose_ordered and _select run with or without the GIL (a
    # batch's pass calls them without it, see _gate.pxi); the scanning
    # fallbacks take the GIL, since they may release it themselves.
    cdef inline bint _ordered(self) noexcept nogil:
        """The ordering describes this kernel's arrays (its keys are this kernel's records, loads, counts)."""
        return self.ordering is not None and self.ordering.ready and self.ordering.epoch == self.ordering_epoch

    cdef inline bint _orders(self, const request_t* req) noexcept nogil:
        """The ordering decides ``req``: it describes this kernel, and the request counts this kernel's
        in-flight jobs (a batch's scratch counts are scanned)."""
        return self._ordered() and req.inflight == self.inflight

    cdef inline void _capacity(self, Py_ssize_t slot, int64_t* limit, int64_t* running) noexcept nogil:
        """``slot``'s max and reported running jobs, what reserving on it checks against.

        From the ordering's key and brief when it describes this kernel: the
        decision just read those lines, while the node and load records would be two
        more cold ones in a big fleet. The values are the same (copies).
        """
        if self._ordered():
            limit[0] = self.ordering.keys[slot].max_concurrency
            running[0] = self.ordering.briefs[slot].running
        else:
            limit[0] = self.recs[slot].max_concurrency
            running[0] = self.loads[slot].running

    cdef int32_t _choose(self, Py_ssize_t pool, const request_t* req, uint64_t* state) noexcept nogil:
        """The decision in one pool: by the ordering when it describes this kernel, else by scanning."""
        cdef int32_t found
        if self._orders(req):
            return self._choose_ordered(pool, req, state, self.ordering)
        with gil:
            found = self._choose_scan(pool, req, state, self.ordering)
        return found

    cdef int32_t _choose_ordered(self, Py_ssize_t pool, const request_t* req, uint64_t* state,
                                 Ordering o) noexcept nogil:
        """Step 1 on the pool's tree: O(log n) a draw.

        Excluded slots and rejected candidates are left out of the tree for the
        length of this call and put back before it returns; everything happens
        holding the GIL (or the gate, in a batch's pass) with no Python-level call (step 2, which may release the
        GIL, runs only once the tree is whole again), so no other thread ever
        sees a tree with leaves left out.
        """
        cdef int32_t found = -2
        if req.now <= o.horizon:
            with gil:
                found = self._scan(pool, req, state)
            return found
        cdef pool_tree* t = o.tree_of(pool)
        if t == NULL:
            with gil:  # out of memory for the tree: the same answer, scanning
                found = self._choose_scan(pool, req, state, o)
            return found
        cdef int32_t tree_id = o.pool_tree[pool]
        cdef const order_key* keys = o.keys
        cdef int32_t hidden[ORDER_DRAWS]
        cdef Py_ssize_t n_hidden = 0, i, pos
        cdef int64_t r
        cdef int32_t slot
        cdef const slot_brief* b
        for i in range(req.n_exclude):
            pos = o.leaf_in(req.exclude[i], tree_id)
            if pos >= 0 and t.nodes[t.size + pos].win >= 0:
                _tree_set(t, keys, pos, -1, 1)
        while n_hidden < ORDER_DRAWS:
            if t.nodes[1].win < 0:
                found = -1
                break
            r = _draw(state, t.nodes[1].ties)
            if r == 0:
                # the first of the tied leaves is the root's own best: no descent (with a
                # single best, the common case under varied loads, always so)
                slot = t.nodes[1].win
                pos = -1
            else:
                # a tied leaf is in, so it holds its slot: the descent has (or has asked for) its line,
                # while t.slots would be one more cold line in a big tree
                slot = _tree_nth(t, r, &pos)
                if pos >= 0:
                    _prefetch_path(t, pos)
            # what the check below and reserving it read (its key, brief and count): in a big fleet
            # these lines are cold, and this loads them in parallel instead of one after another
            o.prefetch(slot)
            # and where its node id lies, which the Assignment reads: in a big fleet the list's line is
            # cold too, and the caller's prefetch of the id would wait for it
            _prefetch(_item_address(<PyObject*>self.node_ids, slot))
            b = &o.briefs[slot]
            if _eligible_key(&keys[slot], b, slot, req, self.heartbeat_timeout):
                found = slot
                break
            if pos < 0:
                pos = o.leaf_in(slot, tree_id)
            if req.now - b.last_heartbeat > self.heartbeat_timeout:
                o.evict(slot, b.last_heartbeat + self.heartbeat_timeout)  # takes its leaves out for good
            else:
                _tree_set(t, keys, pos, -1, 1)
            hidden[n_hidden] = <int32_t>pos
            n_hidden += 1
        for i in range(n_hidden):
            pos = hidden[i]
            _tree_set(t, keys, pos, _leaf_of(keys, t.slots[pos]), 0)
        for i in range(req.n_exclude):
            pos = o.leaf_in(req.exclude[i], tree_id)
            if pos >= 0:
                _tree_set(t, keys, pos, _leaf_of(keys, t.slots[pos]), 0)
        if found == -2:
            with gil:
                found = self._scan(pool, req, state)
        return found

    cdef int32_t _choose_scan(self, Py_ssize_t pool, const request_t* req, uint64_t* state, Ordering o) noexcept:
        """Steps 1 and 2 by scanning: the same answer as the ordered path, in O(n).

        Used by kernels the ordering does not (or no longer) describe, and for
        a batch's scratch counts. One pass collects the best candidates (member
        order) and each draw indexes them; a pass is repeated only when every
        one of them was rejected. Without an ordering nothing is evicted: a
        stale candidate is only rejected for this decision.
        """
        cdef const uint8_t* evicted = NULL
        cdef Py_ssize_t n_evicted = 0, n_rej = 0, m = self.pool_off[pool + 1] - self.pool_off[pool], ties = 0, r
        cdef int32_t rejected[ORDER_DRAWS]
        cdef int32_t stack[MAX_STACK_CLASS]
        cdef int32_t* tied = stack
        cdef int32_t slot
        cdef bint big = m >= self.nogil_min_pool
        cdef const node_load* load
        if o is not None:
            if req.now <= o.horizon:
                return self._scan(pool, req, state)
            evicted = o.evicted
            n_evicted = o.n_slots
        if m > MAX_STACK_CLASS:
            tied = <int32_t*>malloc(m * sizeof(int32_t))
            if tied == NULL:
                return self._scan(pool, req, state)  # out of memory: still an exact answer (step 2)
        slot = -2
        while n_rej < ORDER_DRAWS:
            if ties == 0:
                if big:
                    with nogil:
                        ties = self._collect_best(pool, req, evicted, n_evicted, rejected, n_rej, tied)
                else:
                    ties = self._collect_best(pool, req, evicted, n_evicted, rejected, n_rej, tied)
                if ties == 0:
                    slot = -1
                    break
            r = _draw(state, ties)
            slot = tied[r]
            load = &self.loads[slot]
            if _eligible(&self.recs[slot], load, req.inflight[slot], slot, req, self.heartbeat_timeout,
                         self.threshold):
                break
            if o is not None and req.now - load.last_heartbeat > self.heartbeat_timeout:
                o.evict(slot, load.last_heartbeat + self.heartbeat_timeout)
            rejected[n_rej] = slot
            n_rej += 1
            ties -= 1
            memmove(&tied[r], &tied[r + 1], (ties - r) * sizeof(int32_t))  # keeps member order
            slot = -2
        if tied != stack:
            free(tied)
        if slot == -2:
            slot = self._scan(pool, req, state)
        return slot

    cdef Py_ssize_t _collect_best(self, Py_ssize_t pool, const request_t* req, const uint8_t* evicted,
                                  Py_ssize_t n_evicted, const int32_t* rejected, Py_ssize_t n_rejected,
                                  int32_t* tied) noexcept nogil:
        """Write the best candidates not yet rejected to ``tied`` (member order); return how many."""
        cdef const node_rec* recs = self.recs
        cdef const node_load* loads = self.loads
        cdef const int32_t* inflight = req.inflight
        cdef const int32_t* members = self.pool_members
        cdef double threshold = self.threshold
        cdef Py_ssize_t j, i, ties = 0
        cdef int32_t slot, held
        cdef int64_t eff, mx, best_eff = 0, best_max = 1, lhs, rhs
        cdef double gpu, best_gpu = 0.0
        cdef const node_rec* rec
        cdef const node_load* load
        for j in range(self.pool_off[pool], self.pool_off[pool + 1]):
            slot = members[j]
            rec = &recs[slot]
            load = &loads[slot]
            held = inflight[slot]
            eff = held if held > load.running else load.running
            mx = rec.max_concurrency
            if (rec.status != STATUS_READY or eff >= mx
                    or load.cpu >= threshold or load.gpu >= threshold or load.mem >= threshold
                    or (slot < n_evicted and evicted[slot])):
                continue
            gpu = load.gpu
            if ties:
                lhs = eff * best_max
                rhs = best_eff * mx
                if lhs > rhs or (lhs == rhs and gpu > best_gpu):
                    continue
            for i in range(req.n_exclude):
                if req.exclude[i] == slot:
                    break
            else:
                for i in range(n_rejected):
                    if rejected[i] == slot:
                        break
                else:
                    if ties and lhs == rhs and gpu == best_gpu:
                        tied[ties] = slot
                        ties += 1
                    else:
                        best_eff = eff
                        best_max = mx
                        best_gpu = gpu
                        tied[0] = slot
                        ties = 1
        return ties

    # -- entry points --------------------------------------------------------
    def pools_for(self, Py_ssize_t src_id, Py_ssize_t tgt_id) -> tuple:
        """Pool indices serving (src, tgt), most specific first; ``src_id == n_langs`` is "auto"."""
        cdef Py_ssize_t key = self._pair_key(src_id, tgt_id), j
        if key < 0:
            return ()
        return tuple([self.pair_pools[j] for j in range(self.pair_off[key], self.pair_off[key + 1])])

    def select(
        self,
        Py_ssize_t src_id,
        Py_ssize_t tgt_id,
        Py_ssize_t preferred,
        uint64_t service_mask,
        int need,
        double now,
        exclude=(),
        Py_ssize_t tenant=-1,
    ) -> int:
        """Best eligible node for the pair.

        ``preferred`` is the session's bound pool (-1: none): it is tried
        first. If it has no eligible node, the pool a new binding would get
        is tried next (``tenant``'s pool when it serves the pair, else the
        one with the most free capacity), then the others in index order.
        Returns ``pool_index << 32 | slot``; -1 when pools serve the pair but
        none has an eligible node; -2 when no pool serves the pair.
        """
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        return self._select_pair(src_id, tgt_id, preferred, tenant, service_mask, need, now, exclude)

    def select_candidate(
        self,
        Py_ssize_t src_id,
        Py_ssize_t tgt_id,
        Py_ssize_t preferred,
        uint64_t service_mask,
        int need,
        double now,
        exclude=(),
        Py_ssize_t tenant=-1,
    ):
        """:meth:`select`, answered as ``(slot, node_id, max_concurrency, running, pool_index)``.

        Dispatch needs exactly this to make its reservation, and getting it
        in the same call saves a second trip into the kernel per job. Returns
        the same negative codes as :meth:`select` when nothing is found.
        """
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        cdef int64_t found = self._select_pair(src_id, tgt_id, preferred, tenant, service_mask, need, now, exclude)
        cdef int32_t slot
        if found < 0:
            return found
        slot = <int32_t>(found & <int64_t>0xFFFFFFFF)
        return (slot, self.node_ids[slot], self.recs[slot].max_concurrency, self.loads[slot].running,
                <int32_t>(found >> 32))

    cdef int64_t _select_pair(self, Py_ssize_t src_id, Py_ssize_t tgt_id, Py_ssize_t preferred, Py_ssize_t tenant,
                              uint64_t service_mask, int need, double now, object exclude) except? -3:
        """What :meth:`select` answers; shared with :meth:`select_candidate` without a Python-level call."""
        cdef Py_ssize_t key = self._pair_key(src_id, tgt_id)
        cdef request_t req
        cdef int32_t stack[MAX_STACK_EXCLUDE]
        cdef uint64_t state
        cdef int64_t found
        if key < 0 or self.pair_off[key] == self.pair_off[key + 1]:
            return -2
        _fill_request(&req, service_mask, need, now, exclude, stack, self.inflight)
        state = self.rng.next_stream()
        found = self._select(key, preferred, tenant, &req, &state)
        _free_request(&req, stack)
        return found

    cdef inline bint _serves(self, Py_ssize_t key, Py_ssize_t pool) noexcept nogil:
        cdef Py_ssize_t j
        for j in range(self.pair_off[key], self.pair_off[key + 1]):
            if self.pair_pools[j] == pool:
                return True
        return False

    cdef int64_t _select(self, Py_ssize_t key, Py_ssize_t bound, Py_ssize_t tenant, const request_t* req,
                         uint64_t* state) noexcept nogil:
        """The session's bound pool; failing that, the pool a new binding gets, then index order.

        A session whose pool has no eligible node rebinds exactly as a new
        session would (the tenant's pool, else the most free capacity), not
        to whichever pool happens to come next in the index.
        """
        cdef int32_t found
        if bound >= 0 and self._serves(key, bound):
            found = self._choose(bound, req, state)
            if found >= 0:
                return (<int64_t>bound << 32) | found
            return self._select_new(key, bound, tenant, req, state)
        return self._select_new(key, -1, tenant, req, state)

    cdef int64_t _select_new(self, Py_ssize_t key, Py_ssize_t bound, Py_ssize_t tenant, const request_t* req,
                             uint64_t* state) noexcept nogil:
        """``_select`` past the bound pool (``bound``, -1 for none: already tried and left out)."""
        cdef Py_ssize_t j, begin = self.pair_off[key], end = self.pair_off[key + 1], pref
        cdef int32_t pool, found
        if tenant >= 0 and self._serves(key, tenant):
            pref = tenant
        elif end - begin == 1:
            pref = self.pair_pools[begin]  # the only pool: it is the most free one, no need to scan it
        else:
            pref = self._most_free(key, req)
        if pref >= 0 and pref != bound:
            found = self._choose(pref, req, state)
            if found >= 0:
                return (<int64_t>pref << 32) | found
        for j in range(begin, end):
            pool = self.pair_pools[j]
            if pool == pref or pool == bound:
                continue
            found = self._choose(pool, req, state)
            if found >= 0:
                return (<int64_t>pool << 32) | found
        return -1

    def select_batch(
        self,
        const int32_t[::1] src_ids,
        const int32_t[::1] tgt_ids,
        const uint64_t[::1] service_masks,
        const int32_t[::1] needs,
        const int32_t[::1] tenant_pools,
        const int32_t[::1] session_of,
        int64_t[::1] bound_key,
        int32_t[::1] bound_pool,
        const int32_t[::1] exclude_off,
        const int32_t[::1] exclude,
        int32_t[::1] scratch,
        double now,
        int64_t[::1] out,
    ):
        """Place a whole batch in one pass, exactly as one-by-one dispatch would.

        Requests are visited in order. Each one: its session's binding (from
        ``bound_key``/``bound_pool``, indexed by ``session_of``) is the
        bound pool when it was made for the same pair, ``tenant_pools`` (-1
        for none) the tenant's pool. It then draws the next decision stream,
        selects like :meth:`select`, and on success adds one to ``scratch``
        (a copy of the in-flight counts) and rebinds the session, so later
        requests see the load and bindings earlier ones created. ``out[i]``
        gets what ``select`` would return. ``exclude_off`` (n+1 offsets) and
        ``exclude`` hold each request's excluded slots.
        """
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        cdef Py_ssize_t n = src_ids.shape[0], i, key, sess
        cdef request_t req
        cdef uint64_t state
        cdef int64_t found
        cdef Py_ssize_t pref
        if not (tgt_ids.shape[0] == n and service_masks.shape[0] == n and needs.shape[0] == n
                and tenant_pools.shape[0] == n and session_of.shape[0] == n and out.shape[0] == n
                and exclude_off.shape[0] == n + 1):
            raise ValueError("select_batch: every per-request array must have one entry per request")
        if bound_key.shape[0] != bound_pool.shape[0]:
            raise ValueError("select_batch: bound_key and bound_pool must have one entry per session")
        if scratch.shape[0] < self.n_slots:
            raise ValueError("select_batch: scratch must cover every slot")
        if n and (exclude_off[0] != 0 or exclude_off[n] > exclude.shape[0]):
            raise ValueError("select_batch: exclude_off must run from 0 to at most len(exclude)")
        for i in range(n):
            if session_of[i] < 0 or session_of[i] >= bound_key.shape[0]:
                raise ValueError(f"select_batch: session_of[{i}] out of range")
            if tenant_pools[i] >= self.n_pools or exclude_off[i] > exclude_off[i + 1]:
                raise ValueError(f"select_batch: request {i} has a bad tenant pool or exclude range")
        for i in range(n):
            key = self._pair_key(src_ids[i], tgt_ids[i])
            if key < 0 or self.pair_off[key] == self.pair_off[key + 1]:
                out[i] = -2
                continue
            req.service_mask = service_masks[i]
            req.need = needs[i]
            req.now = now
            req.exclude = &exclude[exclude_off[i]] if exclude_off[i + 1] > exclude_off[i] else NULL
            req.n_exclude = exclude_off[i + 1] - exclude_off[i]
            req.inflight = &scratch[0]
            sess = session_of[i]
            pref = bound_pool[sess] if bound_key[sess] == key else -1
            state = self.rng.next_stream()
            found = self._select(key, pref, tenant_pools[i], &req, &state)
            out[i] = found
            if found >= 0:
                scratch[found & <int64_t>0xFFFFFFFF] += 1
                bound_key[sess] = key
                bound_pool[sess] = <int32_t>(found >> 32)

    def pick(self, Py_ssize_t pool, uint64_t service_mask, int need, double now, exclude=()) -> int:
        """Best eligible slot of one pool, or -1."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        self._check_pool(pool)
        cdef request_t req
        cdef int32_t stack[MAX_STACK_EXCLUDE]
        _fill_request(&req, service_mask, need, now, exclude, stack, self.inflight)
        cdef uint64_t state = self.rng.next_stream()
        cdef int32_t found = self._choose(pool, &req, &state)
        _free_request(&req, stack)
        return found

    def noop(self, Py_ssize_t pool, uint64_t service_mask, int need, double now, exclude=()) -> int:
        """Same signature as :meth:`pick`, does nothing: the call-overhead baseline."""
        return -1

    def rank(self, Py_ssize_t pool, uint64_t service_mask, int need, double now, exclude=(), Py_ssize_t k=4) -> list:
        """Up to ``k`` eligible slots of one pool, best first (ties in random order)."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        self._check_pool(pool)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        cdef request_t req
        cdef int32_t stack[MAX_STACK_EXCLUDE]
        _fill_request(&req, service_mask, need, now, exclude, stack, self.inflight)
        cdef uint64_t state = self.rng.next_stream()
        cdef Py_ssize_t j, j2, m, n = 0
        cdef int32_t slot
        cdef int64_t eff
        cdef uint64_t key
        cdef const node_rec* rec
        cdef const node_load* load
        cdef int cmp
        cdef int32_t* top_slot = <int32_t*>malloc(k * sizeof(int32_t))
        cdef int64_t* top_eff = <int64_t*>malloc(k * sizeof(int64_t))
        cdef int64_t* top_max = <int64_t*>malloc(k * sizeof(int64_t))
        cdef double* top_gpu = <double*>malloc(k * sizeof(double))
        cdef uint64_t* top_key = <uint64_t*>malloc(k * sizeof(uint64_t))
        if not (top_slot and top_eff and top_max and top_gpu and top_key):
            _free_top(top_slot, top_eff, top_max, top_gpu, top_key)
            _free_request(&req, stack)
            raise MemoryError()
        try:
            for j in range(self.pool_off[pool], self.pool_off[pool + 1]):
                slot = self.pool_members[j]
                rec = &self.recs[slot]
                load = &self.loads[slot]
                if not _eligible(rec, load, req.inflight[slot], slot, &req, self.heartbeat_timeout, self.threshold):
                    continue
                eff = req.inflight[slot] if req.inflight[slot] > load.running else load.running
                key = _xorshift64(&state)
                # insertion into the sorted top-k; position m = first entry we beat
                m = n
                while m > 0:
                    cmp = _better(eff, rec.max_concurrency, load.gpu, top_eff[m - 1], top_max[m - 1], top_gpu[m - 1])
                    if cmp > 0 or (cmp == 0 and key < top_key[m - 1]):
                        m -= 1
                    else:
                        break
                if m >= k:
                    continue
                if n < k:
                    n += 1
                for j2 in range(n - 1, m, -1):
                    top_slot[j2] = top_slot[j2 - 1]
                    top_eff[j2] = top_eff[j2 - 1]
                    top_max[j2] = top_max[j2 - 1]
                    top_gpu[j2] = top_gpu[j2 - 1]
                    top_key[j2] = top_key[j2 - 1]
                top_slot[m] = slot
                top_eff[m] = eff
                top_max[m] = rec.max_concurrency
                top_gpu[m] = load.gpu
                top_key[m] = key
            return [top_slot[j] for j in range(n)]
        finally:
            _free_top(top_slot, top_eff, top_max, top_gpu, top_key)
            _free_request(&req, stack)

    def reasons(self, Py_ssize_t pool, uint64_t service_mask, int need, double now, exclude=()) -> bytes:
        """One reason code per member of ``pool``, in member order."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        self._check_pool(pool)
        cdef request_t req
        cdef int32_t stack[MAX_STACK_EXCLUDE]
        _fill_request(&req, service_mask, need, now, exclude, stack, self.inflight)
        cdef Py_ssize_t begin = self.pool_off[pool], n = self.pool_off[pool + 1] - begin, j
        cdef bytearray out = bytearray(n)
        cdef int32_t slot
        for j in range(n):
            slot = self.pool_members[begin + j]
            out[j] = _reason(&self.recs[slot], &self.loads[slot], self.inflight[slot], slot, &req,
                             self.heartbeat_timeout, self.threshold)
        _free_request(&req, stack)
        return bytes(out)

    def capacity(self, Py_ssize_t slot) -> tuple:
        """(max_concurrency, reported running) of a slot: what a reservation checks."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        if slot < 0 or slot >= self.n_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.n_slots})")
        return (self.recs[slot].max_concurrency, self.loads[slot].running)

    def candidate(self, Py_ssize_t slot) -> tuple:
        """``(slot, node_id, max_concurrency, running)``: a reservation candidate, in one call."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        if slot < 0 or slot >= self.n_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.n_slots})")
        return (slot, self.node_ids[slot], self.recs[slot].max_concurrency, self.loads[slot].running)

    def members(self, Py_ssize_t pool) -> list:
        """The slots of ``pool``, in member order."""
        self._check_pool(pool)
        cdef Py_ssize_t j
        return [self.pool_members[j] for j in range(self.pool_off[pool], self.pool_off[pool + 1])]

    def free_capacity(self, Py_ssize_t pool, uint64_t service_mask, int need, double now, exclude=()) -> int:
        """Sum of (max - effective load) over the eligible nodes of ``pool``."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        self._check_pool(pool)
        cdef request_t req
        cdef int32_t stack[MAX_STACK_EXCLUDE]
        _fill_request(&req, service_mask, need, now, exclude, stack, self.inflight)
        cdef int64_t total = self._free(pool, &req)
        _free_request(&req, stack)
        return total

    cdef int64_t _free(self, Py_ssize_t pool, const request_t* req) noexcept nogil:
        cdef Py_ssize_t j
        cdef int32_t slot, held
        cdef int64_t total = 0, eff
        for j in range(self.pool_off[pool], self.pool_off[pool + 1]):
            slot = self.pool_members[j]
            held = req.inflight[slot]
            if not _eligible(&self.recs[slot], &self.loads[slot], held, slot, req,
                             self.heartbeat_timeout, self.threshold):
                continue
            eff = held if held > self.loads[slot].running else self.loads[slot].running
            total += <int64_t>self.recs[slot].max_concurrency - eff
        return total

    cdef int32_t _most_free(self, Py_ssize_t key, const request_t* req) noexcept nogil:
        cdef Py_ssize_t j
        cdef int32_t pool, best = -1
        cdef int64_t free_now, best_free = -1
        for j in range(self.pair_off[key], self.pair_off[key + 1]):
            pool = self.pair_pools[j]
            free_now = self._free(pool, req)
            if free_now > best_free:
                best_free = free_now
                best = pool
        return best

    def most_free_pool(
        self, Py_ssize_t src_id, Py_ssize_t tgt_id, uint64_t service_mask, int need, double now, exclude=()
    ) -> int:
        """The pool serving the pair with the most free capacity (earliest on ties); -1 if none."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        cdef Py_ssize_t key = self._pair_key(src_id, tgt_id)
        cdef request_t req
        cdef int32_t stack[MAX_STACK_EXCLUDE]
        cdef int32_t best
        if key < 0:
            return -1
        _fill_request(&req, service_mask, need, now, exclude, stack, self.inflight)
        best = self._most_free(key, &req)
        _free_request(&req, stack)
        return best

    def reason(self, Py_ssize_t slot, uint64_t service_mask, int need, double now, exclude=()) -> int:
        """The reason code of one slot for a request (``R_OK`` when eligible)."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        if slot < 0 or slot >= self.n_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.n_slots})")
        cdef request_t req
        cdef int32_t stack[MAX_STACK_EXCLUDE]
        _fill_request(&req, service_mask, need, now, exclude, stack, self.inflight)
        cdef int code = _reason(&self.recs[slot], &self.loads[slot], self.inflight[slot], <int32_t>slot, &req,
                                self.heartbeat_timeout, self.threshold)
        _free_request(&req, stack)
        return code

    def is_member(self, Py_ssize_t pool, Py_ssize_t slot) -> bool:
        """Whether ``slot`` is a member of ``pool``."""
        self._check_pool(pool)
        cdef Py_ssize_t j
        for j in range(self.pool_off[pool], self.pool_off[pool + 1]):
            if self.pool_members[j] == slot:
                return True
        return False


include "_jobs.pxi"
include "_dispatch.pxi"
