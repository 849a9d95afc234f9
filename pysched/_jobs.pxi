# Included by _core.pyx (one compiled module, one file per concept, as msgpack's
# _cmsgpack.pyx includes its packer and unpacker).
"""The in-process job table: every live reservation, its expiry, and the node capacity it holds.

Atomicity. Every method below runs start to finish holding the GIL and makes
no Python-level call that could release it in the middle of a change: dict
and list operations on ``str``/``int`` keys run no Python code, the C arrays
are plain memory, and the only objects allocated before a change completes
are ints and strs, which the cyclic garbage collector does not track (so no
collection, and no finalizer, can run mid-change). Each call is therefore
atomic against every other Python thread, which is what makes the local
reservation backend exact with no lock: check-and-add of a node's count,
the job record and its place in the expiry heap change together or not at
all. On a free-threaded CPython build this guarantee is gone; the place to
take a real lock (one per table, or per slot for ``reserve``) is each
``def`` below.

Expiry. One binary min-heap of handles keyed by ``expires_at`` (the TTL end
of an uncommitted reservation, the lease end of a committed job), indexed
(each record knows its heap position) so that commit, renew and release
update or remove a job's entry in O(log n) and the heap never holds a dead
entry. ``next_expiry`` is the heap's top: a caller sweeps exactly when the
clock reaches it.
"""

from cpython.dict cimport PyDict_Contains
from cpython.object cimport PyObject


cdef extern from "Python.h":
    PyObject* PyDict_SetDefault(object d, object key, object default) except NULL
from cpython.mem cimport PyMem_Realloc, PyMem_Free

cdef double INF = float("inf")


cdef inline bint _heap_less(const job_rec* recs, int32_t a, int32_t b) noexcept nogil:
    return recs[a].expires_at < recs[b].expires_at or (
        recs[a].expires_at == recs[b].expires_at and a < b)


@cython.final
cdef class JobTable:
    """Live reservations by job id, with per-node counts and an exact expiry heap.

    ``counts`` is the :class:`SlotCounts` whose in-flight numbers the kernel
    scores with; a reservation adds one to its node's count and removing it
    (release or expiry) takes one off, in the same atomic call.
    Result codes of :meth:`reserve`: a handle ``>= 0``, or ``FULL`` (-1),
    ``GONE`` (-2: no live node at the slot) or ``HELD`` (-3: the job id
    already holds a reservation).
    """

    FULL = -1
    GONE = -2
    HELD = -3

    def __cinit__(self):
        self.recs = NULL
        self.heap = NULL
        self.free_list = NULL
        self.bound = NULL

    def __init__(self, SlotCounts counts not None):
        self.counts = counts
        self.index = {}
        self.job_ids = []
        self.session_ids = []
        self.pairs = []
        self.cap = 0
        self.n_free = 0
        self.heap_n = 0
        self.n_bound = 0
        self.n_live = 0
        self.n_committed = 0
        self.n_expired = 0

    def __dealloc__(self):
        PyMem_Free(self.recs)
        PyMem_Free(self.heap)
        PyMem_Free(self.free_list)
        PyMem_Free(self.bound)

    def __len__(self):
        return self.n_live

    def __contains__(self, job_id):
        """Whether ``job_id`` has a record (it may be past its expiry, not yet swept)."""
        return job_id in self.index

    @property
    def committed(self) -> int:
        """Live jobs that are committed."""
        return self.n_committed

    @property
    def expired(self) -> int:
        """Jobs dropped by expiry (TTL or lease) since the table was made."""
        return self.n_expired

    @property
    def next_expiry(self) -> float:
        """The earliest expiry of any live job (``inf`` when none)."""
        return self.next_expiry_c()

    cdef inline double next_expiry_c(self) noexcept:
        return self.recs[self.heap[0]].expires_at if self.heap_n else INF

    # -- slots ----------------------------------------------------------------
    def bind(self, Py_ssize_t slot):
        """A live node owns ``slot``: reservations there are accepted."""
        if slot < 0:
            raise IndexError(f"slot {slot} out of range")
        if slot >= self.n_bound:
            self._grow_bound(max(slot + 1, 2 * self.n_bound, 64))
        self.bound[slot] = 1

    def unbind(self, Py_ssize_t slot):
        """The node at ``slot`` is gone: refuse new reservations there (held ones stay releasable)."""
        if 0 <= slot < self.n_bound:
            self.bound[slot] = 0

    cdef int _grow_bound(self, Py_ssize_t n) except -1:
        cdef uint8_t* grown = <uint8_t*>PyMem_Realloc(self.bound, n * sizeof(uint8_t))
        if grown == NULL:
            raise MemoryError()
        memset(grown + self.n_bound, 0, (n - self.n_bound) * sizeof(uint8_t))
        self.bound = grown
        self.n_bound = n
        return 0

    cdef int _grow_to(self, Py_ssize_t total) except -1:
        """At least ``total`` handles in all (a batch makes room for all its jobs first)."""
        while self.cap < total:
            self._grow_jobs()
        return 0

    cdef int _grow_jobs(self) except -1:
        """Room for more handles (amortised doubling; the arrays move, handles stay)."""
        cdef Py_ssize_t n = max(2 * self.cap, 256), h
        cdef job_rec* recs = <job_rec*>PyMem_Realloc(self.recs, n * sizeof(job_rec))
        if recs == NULL:
            raise MemoryError()
        self.recs = recs
        cdef int32_t* heap = <int32_t*>PyMem_Realloc(self.heap, n * sizeof(int32_t))
        if heap == NULL:
            raise MemoryError()
        self.heap = heap
        cdef int32_t* free_list = <int32_t*>PyMem_Realloc(self.free_list, n * sizeof(int32_t))
        if free_list == NULL:
            raise MemoryError()
        self.free_list = free_list
        self.job_ids.extend([None] * (n - self.cap))
        self.session_ids.extend([None] * (n - self.cap))
        self.pairs.extend([None] * (n - self.cap))
        # new handles go on the free list highest first, so the lowest is used first
        for h in range(n - 1, self.cap - 1, -1):
            self.recs[h].slot = -1
            self.recs[h].heap_pos = -1
            self.recs[h].gen = 0
            self.free_list[self.n_free] = <int32_t>h
            self.n_free += 1
        self.cap = n
        return 0

    # -- the heap -------------------------------------------------------------
    cdef void _sift_up(self, Py_ssize_t pos) noexcept nogil:
        cdef int32_t h = self.heap[pos], parent_h
        cdef Py_ssize_t parent
        while pos > 0:
            parent = (pos - 1) >> 1
            parent_h = self.heap[parent]
            if not _heap_less(self.recs, h, parent_h):
                break
            self.heap[pos] = parent_h
            self.recs[parent_h].heap_pos = <int32_t>pos
            pos = parent
        self.heap[pos] = h
        self.recs[h].heap_pos = <int32_t>pos

    cdef void _sift_down(self, Py_ssize_t pos) noexcept nogil:
        cdef int32_t h = self.heap[pos], child_h
        cdef Py_ssize_t child, n = self.heap_n
        while True:
            child = 2 * pos + 1
            if child >= n:
                break
            if child + 1 < n and _heap_less(self.recs, self.heap[child + 1], self.heap[child]):
                child += 1
            child_h = self.heap[child]
            if not _heap_less(self.recs, child_h, h):
                break
            self.heap[pos] = child_h
            self.recs[child_h].heap_pos = <int32_t>pos
            pos = child
        self.heap[pos] = h
        self.recs[h].heap_pos = <int32_t>pos

    cdef void _heap_push(self, int32_t h) noexcept nogil:
        self.heap[self.heap_n] = h
        self.heap_n += 1
        self._sift_up(self.heap_n - 1)

    cdef void _heap_remove(self, int32_t h) noexcept nogil:
        cdef Py_ssize_t pos = self.recs[h].heap_pos
        cdef int32_t last
        self.heap_n -= 1
        self.recs[h].heap_pos = -1
        if pos == self.heap_n:
            return
        last = self.heap[self.heap_n]
        self.heap[pos] = last
        self.recs[last].heap_pos = <int32_t>pos
        self._sift_up(pos)
        self._sift_down(self.recs[last].heap_pos)

    cdef void _heap_rekey(self, int32_t h) noexcept nogil:
        cdef Py_ssize_t pos = self.recs[h].heap_pos
        self._sift_up(pos)
        self._sift_down(self.recs[h].heap_pos)

    # -- lookups --------------------------------------------------------------
    cdef int32_t _live(self, str job_id, double now) except -2:
        """The handle of a live, unexpired job, else -1."""
        cdef object found = self.index.get(job_id)
        cdef int32_t h
        if found is None:
            return -1
        h = <int32_t>found
        if self.recs[h].expires_at <= now:
            return -1  # expired, not yet swept: gone for every caller
        return h

    def handle(self, str job_id not None, double now) -> int:
        """The handle of ``job_id`` while it holds a reservation at ``now``, else -1."""
        return self._live(job_id, now)

    def get(self, str job_id not None, double now):
        """``(slot, pool_id, session_id, expires_at, committed, pair)`` of a live job, or None."""
        cdef int32_t h = self._live(job_id, now)
        if h < 0:
            return None
        cdef job_rec* r = &self.recs[h]
        return (r.slot, r.pool_id, self.session_ids[h], r.expires_at, bool(r.committed), self.pairs[h])

    # -- changes --------------------------------------------------------------
    def reserve(self, str job_id not None, Py_ssize_t slot, int64_t limit, int64_t running, int64_t pool_id,
                str session_id not None, double expires_at, object pair=None) -> int:
        """Take one unit of ``slot``'s capacity for ``job_id`` until ``expires_at``, atomically.

        ``pair`` is kept with the job as given (dispatch stores its ``(src, tgt)``).

        Succeeds only while ``max(count, running) < limit`` and a live node
        owns the slot. Returns the new handle, or FULL / GONE / HELD.
        """
        return self.c_reserve(job_id, slot, limit, running, pool_id, session_id, expires_at, pair)

    cdef int32_t c_reserve(self, str job_id, Py_ssize_t slot, int64_t limit, int64_t running, object pool_id,
                           str session_id, double expires_at, object pair) except -4:
        cdef int32_t h
        cdef job_rec* r
        cdef object handle
        if slot < 0 or slot >= self.n_bound or not self.bound[slot]:
            return JOB_HELD if PyDict_Contains(self.index, job_id) else JOB_GONE
        if self.n_free == 0:
            self._grow_jobs()  # before anything changes: a MemoryError leaves everything as it was
        h = self.free_list[self.n_free - 1]
        handle = h  # made before the first change (ints are not GC-tracked anyway)
        # one dict probe both checks for a held job id and claims it
        if <object>PyDict_SetDefault(self.index, job_id, handle) is not handle:
            return JOB_HELD
        if not self.counts.c_try_add(slot, limit, running):
            del self.index[job_id]
            return JOB_FULL
        self.n_free -= 1
        r = &self.recs[h]
        r.slot = <int32_t>slot
        r.pool_id = <int64_t>pool_id
        r.expires_at = expires_at
        r.committed = 0
        r.gen += 1
        self.job_ids[h] = job_id
        self.session_ids[h] = session_id
        self.pairs[h] = pair
        self._heap_push(h)
        self.n_live += 1
        return h

    cdef bint _owned(self, int32_t h, Py_ssize_t slot) noexcept:
        return slot < 0 or self.recs[h].slot == slot

    def commit(self, str job_id not None, Py_ssize_t slot, double expires_at, double now) -> bool:
        """Mark a live job accepted; it now expires at ``expires_at`` (its lease end).

        ``slot >= 0`` refuses a job held on another node. False, with
        nothing changed, when refused or unknown.
        """
        return self.c_commit(job_id, slot, expires_at, now)

    cdef bint c_commit(self, str job_id, Py_ssize_t slot, double expires_at, double now) except -1:
        cdef int32_t h = self._live(job_id, now)
        if h < 0 or not self._owned(h, slot):
            return False
        self._commit(h, expires_at)
        return True

    def renew(self, str job_id not None, Py_ssize_t slot, double expires_at, double now) -> bool:
        """Move a live job's expiry to ``expires_at``; False (nothing changed) if refused or unknown."""
        cdef int32_t h = self._live(job_id, now)
        if h < 0 or not self._owned(h, slot):
            return False
        self._expire_at(h, expires_at)
        return True

    cdef void _commit(self, int32_t h, double expires_at) noexcept:
        if not self.recs[h].committed:
            self.recs[h].committed = 1
            self.n_committed += 1
        self._expire_at(h, expires_at)

    cdef void _expire_at(self, int32_t h, double expires_at) noexcept:
        self.recs[h].expires_at = expires_at
        self._heap_rekey(h)

    cdef void _drop(self, int32_t h) noexcept:
        """Forget handle ``h`` and give its capacity back (no Python call can run in here)."""
        cdef job_rec* r = &self.recs[h]
        self.counts.c_add(r.slot, -1)
        self._heap_remove(h)
        if r.committed:
            self.n_committed -= 1
        r.slot = -1
        self.n_live -= 1
        self.free_list[self.n_free] = h
        self.n_free += 1

    def release(self, str job_id not None, Py_ssize_t slot, double now):
        """Give a live job's capacity back.

        Returns ``(slot, pool_id, session_id, committed)`` of what was
        released, or None (nothing changed) when the job is unknown, already
        expired, or (``slot >= 0``) held on another slot.
        """
        cdef int32_t h = self._live(job_id, now)
        if h < 0 or not self._owned(h, slot):
            return None
        cdef job_rec* r = &self.recs[h]
        out = (r.slot, r.pool_id, self.session_ids[h], bool(r.committed))
        self._forget(h)
        return out

    cdef bint c_release(self, str job_id, Py_ssize_t slot, double now) except -1:
        """:meth:`release` for compiled callers: whether something was released."""
        cdef int32_t h = self._live(job_id, now)
        if h < 0 or not self._owned(h, slot):
            return False
        self._forget(h)
        return True

    cdef int _forget(self, int32_t h) except -1:
        """Drop record ``h`` everywhere: its job id (if it has one), its capacity, its heap entry, its objects."""
        job_id = self.job_ids[h]
        if job_id is not None:
            del self.index[job_id]
            self.job_ids[h] = None
        self._drop(h)
        self.session_ids[h] = None
        self.pairs[h] = None
        return 0

    def expire(self, double now) -> list:
        """Drop every job whose expiry is ``<= now``; return them, earliest first.

        Each entry is ``(job_id, slot, pool_id, session_id, expires_at, committed)``.
        Each job is dropped completely (index, count, heap) before the next
        object is allocated, so even a collection triggered by building the
        result sees a consistent table.
        """
        cdef list out = []
        cdef int32_t h
        cdef job_rec* r
        while self.heap_n and self.recs[self.heap[0]].expires_at <= now:
            h = self.heap[0]
            r = &self.recs[h]
            job_id = self.job_ids[h]
            session_id = self.session_ids[h]
            slot, pool_id, expires_at, committed = r.slot, r.pool_id, r.expires_at, bool(r.committed)
            if job_id is None:
                job_id = (<int64_t>r.gen << 32) | h  # a batch job: named by its handle
            self._forget(h)
            self.n_expired += 1
            out.append((job_id, slot, pool_id, session_id, expires_at, committed))
        return out

    def jobs(self) -> list:
        """Every live job as ``(job_id, slot, pool_id, session_id, expires_at, committed)``, by job id."""
        cdef Py_ssize_t h
        out = []
        for h in range(self.cap):
            if self.recs[h].slot < 0:
                continue
            job_id = self.job_ids[h]
            if job_id is None:
                job_id = (<int64_t>self.recs[h].gen << 32) | h
            out.append((job_id, self.recs[h].slot, self.recs[h].pool_id, self.session_ids[h],
                        self.recs[h].expires_at, bool(self.recs[h].committed)))
        out.sort(key=_job_order)
        return out

    # -- jobs named by handle (array batches) ---------------------------------
    def reserve_handle(self, Py_ssize_t slot, int64_t limit, int64_t running, int64_t pool_id, object session_id,
                       double expires_at, object pair=None) -> int:
        """:meth:`reserve` for a job with no id: its public handle (``gen << 32 | record``), or FULL / GONE."""
        return self.c_reserve_handle(slot, limit, running, pool_id, session_id, expires_at, pair)

    cdef int64_t c_reserve_handle(self, Py_ssize_t slot, int64_t limit, int64_t running, int64_t pool_id,
                                  object session_id, double expires_at, object pair) except -4:
        cdef int32_t h
        cdef job_rec* r
        if slot < 0 or slot >= self.n_bound or not self.bound[slot]:
            return JOB_GONE
        if self.n_free == 0:
            self._grow_jobs()
        if not self.counts.c_try_add(slot, limit, running):
            return JOB_FULL
        self.n_free -= 1
        h = self.free_list[self.n_free]
        r = &self.recs[h]
        r.slot = <int32_t>slot
        r.pool_id = pool_id
        r.expires_at = expires_at
        r.committed = 0
        r.gen += 1
        self.session_ids[h] = session_id
        self.pairs[h] = pair
        self._heap_push(h)
        self.n_live += 1
        return (<int64_t>r.gen << 32) | h

    cdef int32_t _of_handle(self, int64_t handle, double now) noexcept:
        """The record of a live, unexpired handle job, else -1 (a stale handle never matches)."""
        cdef int64_t h = handle & 0xFFFFFFFF
        if handle < 0 or h >= self.cap:
            return -1
        cdef job_rec* r = &self.recs[h]
        if r.slot < 0 or r.gen != <uint32_t>(handle >> 32) or self.job_ids[h] is not None or r.expires_at <= now:
            return -1
        return <int32_t>h

    def release_handle(self, int64_t handle, Py_ssize_t slot, double now) -> bool:
        """Release a handle job (``slot >= 0``: only if held there); False, nothing changed, otherwise."""
        cdef int32_t h = self._of_handle(handle, now)
        if h < 0 or not self._owned(h, slot):
            return False
        self._forget(h)
        return True

    def commit_handle(self, int64_t handle, Py_ssize_t slot, double expires_at, double now) -> bool:
        """Commit a handle job until ``expires_at``; False, nothing changed, if unknown or refused."""
        cdef int32_t h = self._of_handle(handle, now)
        if h < 0 or not self._owned(h, slot):
            return False
        self._commit(h, expires_at)
        return True

    def renew_handle(self, int64_t handle, Py_ssize_t slot, double expires_at, double now) -> bool:
        """Move a handle job's expiry; False, nothing changed, if unknown or refused."""
        cdef int32_t h = self._of_handle(handle, now)
        if h < 0 or not self._owned(h, slot):
            return False
        self._expire_at(h, expires_at)
        return True

    def get_handle(self, int64_t handle, double now):
        """``(slot, pool_id, session_id, expires_at, committed, pair)`` of a live handle job, or None."""
        cdef int32_t h = self._of_handle(handle, now)
        if h < 0:
            return None
        cdef job_rec* r = &self.recs[h]
        return (r.slot, r.pool_id, self.session_ids[h], r.expires_at, bool(r.committed), self.pairs[h])

    def release_handles(self, const int64_t[::1] handles, double now) -> int:
        """Release every live handle job in ``handles``; how many were."""
        cdef Py_ssize_t i, done = 0
        cdef int32_t h
        for i in range(handles.shape[0]):
            h = self._of_handle(handles[i], now)
            if h >= 0:
                self._forget(h)
                done += 1
        return done

    def commit_handles(self, const int64_t[::1] handles, double expires_at, double now) -> int:
        """Commit every live handle job in ``handles`` until ``expires_at``; how many were."""
        cdef Py_ssize_t i, done = 0
        cdef int32_t h
        for i in range(handles.shape[0]):
            h = self._of_handle(handles[i], now)
            if h >= 0:
                self._commit(h, expires_at)
                done += 1
        return done


def _job_order(rec):
    """Job ids first (by id), then handles (by handle)."""
    return (type(rec[0]) is not str, rec[0])
