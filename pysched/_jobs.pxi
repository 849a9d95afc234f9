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
all. The one exception, a batch's placement or release pass that runs
without the GIL (``c_claim``, ``_release_pass``), is kept apart from every
``def`` below by the scheduler's gate (``_gate.pxi``): each ``def`` holds it
for its whole call. On a free-threaded CPython build the GIL's guarantee is
gone; the place to take a real lock (one per table, or per slot for
``reserve``) is where each ``def`` takes the gate.

Expiry. Every live job is in one of two queues keyed by ``expires_at``
(the TTL end of an uncommitted reservation, the lease end of a committed
job), then by the order the expiries were set (``job_rec.order``, the
table's count of settings): a **ring** that takes a job whose expiry is
not earlier than the last one it holds (the common case: expiries are
``now`` plus a fixed TTL or lease, and a batch's jobs share one), and an
indexed binary **min-heap** for the rest. The ring is indexed by the
order itself, so a release leaves a hole in O(1) and its ends move past
holes; the heap's entries know their position, so commit, renew and
release update or remove them in O(log n). Neither ever holds a dead
entry. A job at the ring's end that expires later than a new one (a long
lease among short TTLs) moves to the heap, key and all, one at most per
push (if the one before it is later too, the new job is the odd one and
goes to the heap); a job at the ring's head that outlives the ones behind
it so long that the span outgrows the ring moves to the heap too, unless
the ring is half full, when it doubles. ``next_expiry`` is the lesser of
the two fronts: a caller sweeps exactly when the clock reaches it, and a
sweep takes jobs in (expiry, order) order, as the twin's single heap
does. (A single heap took O(log n) to remove its first entry, the common
release: jobs end roughly in the order they started.)

Batch groups. A job placed one at a time has its session id and pair in
the per-handle lists ``session_ids`` and ``pairs``; a batch's jobs share one
*group* instead: the batch's own list of session ids, its list of pairs and
each job's pair number, filed once before its placement passes (each pass
has a group of its own over the same three objects), which makes each
placed job a member (``job_rec.group``, ``job_rec.at``, its index in the
batch) with no Python object touched per job, with or without the GIL. A release (or expiry)
counts the member out, also without the GIL; the last one lists the group
dead, and the next call holding the GIL (``_reap``) drops its lists. So a
group's lists live exactly as long as its longest-lived job. The tuple and
bytes that file a group are made before the batch's last checks, so
nothing is allocated between those checks and the pass (a collection could
otherwise run code there).

Job ids. The ids the dispatcher makes are its prefix and a number, and a
job lives a short time: the table files those by number in a ring (number
modulo its size, twice the table's capacity), so reserving one neither
hashes the new string nor inserts into a dict, and releasing it is one
array probe. Which index a job id goes to depends only on the string
(``_seq_of``: the prefix, then a canonical decimal), never on who made it,
so a caller's ``job_id="<prefix>42"`` and the dispatcher's 42nd job are
the same id. Every other id is kept in a dict. A number whose ring entry
a longer-lived job still holds goes to a small spill dict.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_1BYTE_KIND, PyUnicode_DATA, PyUnicode_GET_LENGTH, PyUnicode_KIND
from libc.string cimport memcmp


cdef extern from "Python.h":
    PyObject* PyDict_SetDefault(object d, object key, object default) except NULL
    # Unlike PyDict_GetItem, it does not save and restore the exception state
    # on every call (~120 instructions each on CPython 3.11). A lookup of a
    # str or int key cannot raise, so NULL always means "absent" here.
    PyObject* PyDict_GetItemWithError(object d, object key)


cdef inline PyObject* _get(object d, object key) noexcept:
    return PyDict_GetItemWithError(d, key)

cdef double INF = float("inf")
cdef int32_t IN_FIFO = -2  # job_rec.heap_pos of a job in the ring


cdef inline bint _heap_less(const job_rec* recs, int32_t a, int32_t b) noexcept nogil:
    # equal expiries (a batch's jobs share one) go in the order they were set: a new entry is then
    # never less than the ones already in, and sinks no further than its own level
    return recs[a].expires_at < recs[b].expires_at or (
        recs[a].expires_at == recs[b].expires_at and recs[a].order < recs[b].order)


cdef inline int _file_seq(int32_t* ring, Py_ssize_t mask, dict spill, int64_t seq, int32_t h) except -1:
    """File number ``seq`` under handle ``h``: in its ring entry if that is free, else in ``spill``."""
    cdef Py_ssize_t pos = seq & mask
    if ring[pos] < 0:
        ring[pos] = h
    else:
        spill[seq] = h
    return 0


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
        self.fifo = NULL
        self.free_list = NULL
        self.bound = NULL
        self.by_seq = NULL
        self.group_live = NULL
        self.group_pairs = NULL
        self.spare_groups = NULL
        self.dead_groups = NULL
        self.n_groups = self.n_spare = self.n_dead = 0

    def __init__(self, SlotCounts counts not None, str prefix=None):
        """``prefix``: job ids written ``prefix`` + a number are filed by number (see the module notes)."""
        if prefix is not None and not (prefix and prefix.isascii()):
            raise ValueError(f"prefix must be a non-empty ASCII str, got {prefix!r}")
        self.counts = counts
        self.index = {}
        self.job_ids = []
        self.session_ids = []
        self.pairs = []
        self.groups = []
        self.prefix = None
        self.seq_spill = {}
        self.cap = 0
        self.n_free = 0
        self.heap_n = 0
        self.n_bound = 0
        self.n_live = 0
        self.n_committed = 0
        self.n_expired = 0
        self._grow_ring(64)
        self.fifo = <int32_t*>malloc(64 * sizeof(int32_t))  # libc: it may grow without the GIL
        if self.fifo == NULL:
            raise MemoryError()
        memset(self.fifo, 0xFF, 64 * sizeof(int32_t))
        self.fifo_mask = 63
        self.fifo_head = self.fifo_end = 1
        self.fifo_n = 0
        self.n_set = 0
        if prefix is not None:
            self.number_ids(prefix)

    def __dealloc__(self):
        PyMem_Free(self.recs)
        PyMem_Free(self.heap)
        free(self.fifo)
        PyMem_Free(self.free_list)
        PyMem_Free(self.bound)
        PyMem_Free(self.by_seq)
        PyMem_Free(self.group_live)
        PyMem_Free(self.group_pairs)
        PyMem_Free(self.spare_groups)
        PyMem_Free(self.dead_groups)

    def __len__(self):
        return self.n_live

    def __contains__(self, job_id):
        """Whether ``job_id`` has a record (it may be past its expiry, not yet swept)."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        return type(job_id) is str and self._find(job_id, self._seq_of(job_id)) >= 0

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
        cdef int32_t h = self._queue_first()
        return self.recs[h].expires_at if h >= 0 else INF

    # -- slots ----------------------------------------------------------------
    def bind(self, Py_ssize_t slot):
        """A live node owns ``slot``: reservations there are accepted."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        if slot < 0:
            raise IndexError(f"slot {slot} out of range")
        if slot >= self.n_bound:
            self._grow_bound(max(slot + 1, 2 * self.n_bound, 64))
        self.bound[slot] = 1

    def unbind(self, Py_ssize_t slot):
        """The node at ``slot`` is gone: refuse new reservations there (held ones stay releasable)."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
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
            self.recs[h].group = -1
            self.recs[h].heap_pos = -1
            self.recs[h].gen = 0
            self.recs[h].seq = 0
            self.recs[h].named = 0
            self.free_list[self.n_free] = <int32_t>h
            self.n_free += 1
        self.cap = n
        if self.seq_mask + 1 < 2 * n:
            self._grow_ring(2 * n)  # if this fails, the ring it had still files every job correctly
        return 0

    # -- job ids ---------------------------------------------------------------
    cdef int number_ids(self, str prefix) except -1:
        """File job ids written ``prefix`` + a number by number from now on (the dispatcher's ids)."""
        cdef Py_ssize_t h
        cdef int64_t seq
        self.prefix = prefix
        for h in range(self.cap):  # a live job whose id now counts as numbered moves to the ring
            job_id = self.job_ids[h]
            if self.recs[h].slot < 0 or job_id is None or self.recs[h].seq:
                continue
            seq = self._seq_of(job_id)
            if seq:
                del self.index[job_id]
                self._claim(job_id, seq, <int32_t>h)
        return 0

    cdef int64_t _seq_of(self, str job_id) noexcept:
        """The number of an id written ``prefix`` + a canonical decimal (1-18 digits, no leading zero), else 0."""
        cdef Py_ssize_t plen, n, i
        cdef const uint8_t* data
        cdef int64_t seq = 0
        cdef uint8_t digit
        if self.prefix is None or PyUnicode_KIND(job_id) != PyUnicode_1BYTE_KIND:
            return 0
        plen = PyUnicode_GET_LENGTH(self.prefix)
        n = PyUnicode_GET_LENGTH(job_id) - plen
        if n < 1 or n > 18:
            return 0
        data = <const uint8_t*>PyUnicode_DATA(job_id)
        if memcmp(data, PyUnicode_DATA(self.prefix), plen) != 0 or data[plen] == 48:
            return 0
        for i in range(plen, plen + n):
            digit = data[i] - 48  # wraps for anything below "0"
            if digit > 9:
                return 0
            seq = seq * 10 + digit
        return seq

    cdef int32_t _find(self, str job_id, int64_t seq) except -2:
        """The handle holding ``job_id`` (``seq``: its number, or 0), expired or not; -1 when none."""
        cdef PyObject* found
        cdef int32_t h
        if seq:
            h = self.by_seq[seq & self.seq_mask]
            if h >= 0 and self.recs[h].seq == seq:
                return h
            if len(self.seq_spill) == 0:
                return -1
            found = _get(self.seq_spill, seq)
        else:
            found = _get(self.index, job_id)
        return -1 if found == NULL else <int32_t><object>found

    cdef int _claim(self, str job_id, int64_t seq, int32_t h) except -1:
        """File ``job_id`` under handle ``h``: 1, or 0 (nothing changed) when another job holds the id."""
        if seq:
            if self._find(job_id, seq) >= 0:
                return 0
            _file_seq(self.by_seq, self.seq_mask, self.seq_spill, seq, h)
            self.recs[h].seq = seq
            return 1
        # One dict probe both checks for a held job id and claims it. The int object is made once:
        # the identity test below needs the very object the dict was given.
        cdef object handle = h
        return <object>PyDict_SetDefault(self.index, job_id, handle) is handle

    cdef int _unclaim(self, int32_t h, object job_id) except -1:
        """Forget that handle ``h`` holds ``job_id``."""
        cdef int64_t seq = self.recs[h].seq
        cdef Py_ssize_t pos
        if seq:
            pos = seq & self.seq_mask
            if self.by_seq[pos] == h:
                self.by_seq[pos] = -1
            else:
                del self.seq_spill[seq]
            self.recs[h].seq = 0
        else:
            del self.index[job_id]
        return 0

    cdef int _grow_ring(self, Py_ssize_t n) except -1:
        """A ring of ``n`` entries (a power of two) with every live numbered job filed again."""
        cdef int32_t* ring = <int32_t*>PyMem_Malloc(n * sizeof(int32_t))
        cdef Py_ssize_t h
        cdef int64_t seq
        if ring == NULL:
            raise MemoryError()
        memset(ring, 0xFF, n * sizeof(int32_t))
        spill = {}
        try:
            for h in range(self.cap):
                seq = self.recs[h].seq
                if self.recs[h].slot < 0 or not seq:
                    continue
                _file_seq(ring, n - 1, spill, seq, <int32_t>h)
        except BaseException:
            PyMem_Free(ring)
            raise
        PyMem_Free(self.by_seq)
        self.by_seq = ring
        self.seq_mask = n - 1
        self.seq_spill = spill
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

    cdef void _heap_push(self, int32_t h) noexcept nogil:
        self.heap[self.heap_n] = h
        self.heap_n += 1
        self._sift_up(self.heap_n - 1)

    cdef void _heap_remove(self, int32_t h) noexcept nogil:
        """Take ``h`` out: its hole goes down along the smaller children to a leaf, the last entry fills it.

        The last entry is one of the latest expiries, so it would sink most of
        the way anyway: this costs one comparison a level on the way down (not
        two) and usually none on the way back up.
        """
        cdef Py_ssize_t pos = self.recs[h].heap_pos, child, n
        cdef int32_t last
        self.heap_n -= 1
        self.recs[h].heap_pos = -1
        n = self.heap_n
        if pos == n:
            return
        last = self.heap[n]
        while True:
            child = 2 * pos + 1
            if child >= n:
                break
            if child + 1 < n and _heap_less(self.recs, self.heap[child + 1], self.heap[child]):
                child += 1
            self.heap[pos] = self.heap[child]
            self.recs[self.heap[pos]].heap_pos = <int32_t>pos
            pos = child
        self.heap[pos] = last
        self.recs[last].heap_pos = <int32_t>pos
        self._sift_up(pos)

    # -- the expiry queue: the ring in front of the heap (see the module notes) ---
    cdef void _queue_push(self, int32_t h) noexcept nogil:
        """File live job ``h`` (its ``expires_at`` set) under the next order: at the ring's end if it can go there.

        If the ring's last job expires later than ``h`` (a long lease or TTL
        among short ones), it moves to the heap, so that one such job does not
        keep the jobs after it out of the ring; if the one before it does too,
        ``h`` is the odd one and goes to the heap itself. One move at most.
        """
        cdef job_rec* r = &self.recs[h]
        cdef int32_t h_tail
        self.n_set += 1
        r.order = self.n_set
        if self.fifo_n and self._fifo_tail_after(r.expires_at):
            h_tail = self.fifo[(self.fifo_end - 1) & self.fifo_mask]
            self._fifo_pop_tail()
            self._heap_push(h_tail)
            if self.fifo_n and self._fifo_tail_after(r.expires_at):
                self._heap_push(h)
                return
        if (self.fifo_n and r.order - self.fifo_head <= <uint64_t>self.fifo_mask) or self._fifo_room(r.order):
            self.fifo[r.order & self.fifo_mask] = h
            r.heap_pos = IN_FIFO
            self.fifo_end = r.order + 1
            self.fifo_n += 1
        else:
            self._heap_push(h)

    cdef bint _fifo_room(self, uint64_t order) noexcept nogil:
        """Whether ``order`` fits in the ring's span: makes room by growing it or moving its head to the heap."""
        cdef Py_ssize_t size = self.fifo_mask + 1, new_size
        cdef uint64_t o
        cdef int32_t* ring
        cdef int32_t h
        if self.fifo_n == 0:
            self.fifo_head = self.fifo_end = order  # empty: the span starts here
            return True
        while order - self.fifo_head >= <uint64_t>size:
            if 2 * self.fifo_n >= size:
                # half full or more: double it (entries move to their order's place in the larger ring)
                new_size = 2 * size
                ring = <int32_t*>malloc(new_size * sizeof(int32_t))
                if ring == NULL:
                    return False  # the heap takes it
                memset(ring, 0xFF, new_size * sizeof(int32_t))
                for o in range(self.fifo_head, self.fifo_end):
                    h = self.fifo[o & self.fifo_mask]
                    if h >= 0:
                        ring[o & (new_size - 1)] = h
                free(self.fifo)
                self.fifo = ring
                self.fifo_mask = new_size - 1
                size = new_size
            else:
                # a job still live long after the ones behind it came and went holds the head (the span
                # outgrows the ring while it is mostly holes): it moves to the heap, key and all
                h = self.fifo[self.fifo_head & self.fifo_mask]
                self._fifo_pop_head()
                self._heap_push(h)
                if self.fifo_n == 0:
                    self.fifo_head = self.fifo_end = order
        return True

    cdef inline bint _fifo_tail_after(self, double expires_at) noexcept nogil:
        return self.recs[self.fifo[(self.fifo_end - 1) & self.fifo_mask]].expires_at > expires_at

    cdef void _fifo_pop_head(self) noexcept nogil:
        """Take the ring's first entry out; the head moves past the holes after it."""
        self.fifo[self.fifo_head & self.fifo_mask] = -1
        self.fifo_n -= 1
        self.fifo_head += 1
        if self.fifo_n == 0:
            self.fifo_head = self.fifo_end
            return
        while self.fifo[self.fifo_head & self.fifo_mask] < 0:
            self.fifo_head += 1

    cdef void _fifo_pop_tail(self) noexcept nogil:
        """Take the ring's last entry out; the end moves back past the holes before it."""
        self.fifo_end -= 1
        self.fifo[self.fifo_end & self.fifo_mask] = -1
        self.fifo_n -= 1
        if self.fifo_n == 0:
            self.fifo_end = self.fifo_head
            return
        while self.fifo[(self.fifo_end - 1) & self.fifo_mask] < 0:
            self.fifo_end -= 1

    cdef void _queue_remove(self, int32_t h) noexcept nogil:
        cdef job_rec* r = &self.recs[h]
        if r.heap_pos != IN_FIFO:
            self._heap_remove(h)
            return
        r.heap_pos = -1
        if r.order == self.fifo_head:
            self._fifo_pop_head()
        elif r.order + 1 == self.fifo_end:
            self._fifo_pop_tail()
        else:
            self.fifo[r.order & self.fifo_mask] = -1  # a hole: the ends never stop on one
            self.fifo_n -= 1

    cdef int32_t _queue_first(self) noexcept nogil:
        """The live job that expires first (by expiry, then order), or -1."""
        cdef int32_t a = self.fifo[self.fifo_head & self.fifo_mask] if self.fifo_n else -1
        cdef int32_t b = self.heap[0] if self.heap_n else -1
        if a < 0:
            return b
        if b < 0 or _heap_less(self.recs, a, b):
            return a
        return b

    # -- lookups --------------------------------------------------------------
    cdef int32_t _live(self, str job_id, double now) except -2:
        """The handle of a live, unexpired job, else -1."""
        cdef int32_t h = self._find(job_id, self._seq_of(job_id))
        if h < 0:
            return -1
        if self.recs[h].expires_at <= now:
            return -1  # expired, not yet swept: gone for every caller
        return h

    def handle(self, str job_id not None, double now) -> int:
        """The handle of ``job_id`` while it holds a reservation at ``now``, else -1."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        return self._live(job_id, now)

    def get(self, str job_id not None, double now):
        """``(slot, pool_id, session_id, expires_at, committed, pair)`` of a live job, or None."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        cdef int32_t h = self._live(job_id, now)
        if h < 0:
            return None
        cdef job_rec* r = &self.recs[h]
        return (r.slot, r.pool_id, self._session_of(h), r.expires_at, bool(r.committed), self._pair_of(h))

    # -- changes --------------------------------------------------------------
    def reserve(self, str job_id not None, Py_ssize_t slot, int64_t limit, int64_t running, int64_t pool_id,
                str session_id not None, double expires_at, object pair=None) -> int:
        """Take one unit of ``slot``'s capacity for ``job_id`` until ``expires_at``, atomically.

        ``pair`` is kept with the job as given (dispatch stores its ``(src, tgt)``).

        Succeeds only while ``max(count, running) < limit`` and a live node
        owns the slot. Returns the new handle, or FULL / GONE / HELD.
        """
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        return self.c_reserve(job_id, slot, limit, running, pool_id, session_id, expires_at, pair)

    cdef int32_t c_reserve(self, str job_id, Py_ssize_t slot, int64_t limit, int64_t running, object pool_id,
                           str session_id, double expires_at, object pair) except -4:
        return self._reserve(job_id, self._seq_of(job_id), slot, limit, running, pool_id, session_id, expires_at,
                             pair)

    cdef int32_t _reserve(self, str job_id, int64_t seq, Py_ssize_t slot, int64_t limit, int64_t running,
                          object pool_id, str session_id, double expires_at, object pair) except -4:
        """:meth:`reserve` with the job id's number (``_seq_of``) already known."""
        cdef int32_t h
        cdef job_rec* r
        if slot < 0 or slot >= self.n_bound or not self.bound[slot]:
            return JOB_HELD if self._find(job_id, seq) >= 0 else JOB_GONE
        if self.n_free == 0:
            self._grow_jobs()  # before anything changes: a MemoryError leaves everything as it was
        h = self.free_list[self.n_free - 1]
        if not self._claim(job_id, seq, h):
            return JOB_HELD
        if not self.counts.c_try_add(slot, limit, running):
            self._unclaim(h, job_id)
            return JOB_FULL
        self.n_free -= 1
        r = &self.recs[h]
        r.slot = <int32_t>slot
        r.pool_id = <int64_t>pool_id
        r.expires_at = expires_at
        r.committed = 0
        r.gen += 1
        r.named = 1
        self.job_ids[h] = job_id
        self.session_ids[h] = session_id
        self.pairs[h] = pair
        self._queue_push(h)
        self.n_live += 1
        return h

    cdef bint _owned(self, int32_t h, Py_ssize_t slot) noexcept:
        return slot < 0 or self.recs[h].slot == slot

    def commit(self, str job_id not None, Py_ssize_t slot, double expires_at, double now) -> bool:
        """Mark a live job accepted; it now expires at ``expires_at`` (its lease end).

        ``slot >= 0`` refuses a job held on another node. False, with
        nothing changed, when refused or unknown.
        """
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        return self.c_commit(job_id, slot, expires_at, now)

    cdef bint c_commit(self, str job_id, Py_ssize_t slot, double expires_at, double now) except -1:
        cdef int32_t h = self._live(job_id, now)
        if h < 0 or not self._owned(h, slot):
            return False
        self._commit(h, expires_at)
        return True

    def renew(self, str job_id not None, Py_ssize_t slot, double expires_at, double now) -> bool:
        """Move a live job's expiry to ``expires_at``; False (nothing changed) if refused or unknown."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
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
        self._queue_remove(h)
        self.recs[h].expires_at = expires_at
        self._queue_push(h)

    cdef bint _drop(self, int32_t h) noexcept nogil:
        """Forget handle ``h`` and give its capacity back (no Python call can run in here).

        Whether the job was a group's (then its session_ids / pairs entries
        are None already; a group left without jobs is listed dead, for
        ``_reap`` to free with the GIL).
        """
        cdef job_rec* r = &self.recs[h]
        cdef int32_t g = r.group
        self.counts.c_add(r.slot, -1)
        self._queue_remove(h)
        if r.committed:
            self.n_committed -= 1
        r.slot = -1
        self.n_live -= 1
        self.free_list[self.n_free] = h
        self.n_free += 1
        if g < 0:
            return False
        r.group = -1
        self.group_live[g] -= 1
        if self.group_live[g] == 0:
            self.dead_groups[self.n_dead] = g
            self.n_dead += 1
        return True

    # -- batch groups ---------------------------------------------------------
    cdef int _group_room(self) except -1:
        """Room for one more batch group (with the GIL; it may allocate, so before the batch's checks)."""
        cdef Py_ssize_t n, g
        cdef int32_t* live
        cdef const int32_t** by_group
        cdef int32_t* spare
        cdef int32_t* dead
        self._reap()
        if self.n_spare:
            return 0
        n = max(2 * self.n_groups, 8)
        live = <int32_t*>PyMem_Realloc(self.group_live, n * sizeof(int32_t))
        if live == NULL:
            raise MemoryError()
        self.group_live = live
        by_group = <const int32_t**>PyMem_Realloc(self.group_pairs, n * sizeof(int32_t*))
        if by_group == NULL:
            raise MemoryError()
        self.group_pairs = by_group
        spare = <int32_t*>PyMem_Realloc(self.spare_groups, n * sizeof(int32_t))
        if spare == NULL:
            raise MemoryError()
        self.spare_groups = spare
        dead = <int32_t*>PyMem_Realloc(self.dead_groups, n * sizeof(int32_t))  # each listed once between reaps
        if dead == NULL:
            raise MemoryError()
        self.dead_groups = dead
        self.groups.extend([None] * (n - self.n_groups))
        for g in range(n - 1, self.n_groups - 1, -1):
            self.group_live[g] = 0
            self.group_pairs[g] = NULL
            self.spare_groups[self.n_spare] = <int32_t>g
            self.n_spare += 1
        self.n_groups = n
        return 0

    cdef int32_t _new_group(self, tuple filed) noexcept:
        """A group for one batch's jobs, ``filed`` being ``(session ids, pairs, pair numbers)``: per job (by
        its index in the batch) its session id, and as an int32 in a bytes object its pair's index in
        ``pairs``. The lists become the table's: nobody changes them afterwards. The caller made room
        (``_group_room``), so nothing is allocated here; it then sets each placed job's ``group`` and
        ``at`` and counts it in ``group_live``, and frees it (``_free_group``) if no job joined.
        """
        self.n_spare -= 1
        cdef int32_t g = self.spare_groups[self.n_spare]
        self.groups[g] = filed
        self.group_pairs[g] = <const int32_t*><const char*>(<bytes>filed[2])
        self.group_live[g] = 0
        return g

    cdef int _free_group(self, int32_t g) except -1:
        """Free group ``g`` now (with the GIL): one no job joined."""
        self.dead_groups[self.n_dead] = g
        self.n_dead += 1
        return self._reap()

    cdef int _reap(self) except -1:
        """Free the groups listed dead that have no live job (their lists go with them)."""
        cdef Py_ssize_t i
        cdef int32_t g
        for i in range(self.n_dead):
            g = self.dead_groups[i]
            if self.group_live[g] == 0 and self.groups[g] is not None:
                self.groups[g] = None
                self.group_pairs[g] = NULL
                self.spare_groups[self.n_spare] = g
                self.n_spare += 1
        self.n_dead = 0
        return 0

    cdef object _session_of(self, int32_t h):
        cdef int32_t g = self.recs[h].group
        if g < 0:
            return self.session_ids[h]
        return (<list>(<tuple>self.groups[g])[0])[self.recs[h].at]

    cdef object _pair_of(self, int32_t h):
        cdef int32_t g = self.recs[h].group
        if g < 0:
            return self.pairs[h]
        return (<list>(<tuple>self.groups[g])[1])[self.group_pairs[g][self.recs[h].at]]

    def release(self, str job_id not None, Py_ssize_t slot, double now):
        """Give a live job's capacity back.

        Returns ``(slot, pool_id, session_id, committed)`` of what was
        released, or None (nothing changed) when the job is unknown, already
        expired, or (``slot >= 0``) held on another slot.
        """
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        cdef int32_t h = self._live(job_id, now)
        if h < 0 or not self._owned(h, slot):
            return None
        cdef job_rec* r = &self.recs[h]
        out = (r.slot, r.pool_id, self._session_of(h), bool(r.committed))
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
        if self.counts.ordering is not None:
            self.counts.ordering.prefetch(self.recs[h].slot)  # read by _drop, after the id work below
        job_id = self.job_ids[h]
        if job_id is not None:
            self._unclaim(h, job_id)
            self.job_ids[h] = None
            self.recs[h].named = 0
        if self._drop(h):
            if self.n_dead:
                self._reap()
        else:
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
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        cdef list out = []
        cdef int32_t h
        cdef job_rec* r
        while True:
            h = self._queue_first()
            if h < 0 or self.recs[h].expires_at > now:
                break
            r = &self.recs[h]
            job_id = self.job_ids[h]
            session_id = self._session_of(h)
            slot, pool_id, expires_at, committed = r.slot, r.pool_id, r.expires_at, bool(r.committed)
            if job_id is None:
                job_id = (<int64_t>r.gen << 32) | h  # a batch job: named by its handle
            self._forget(h)
            self.n_expired += 1
            out.append((job_id, slot, pool_id, session_id, expires_at, committed))
        return out

    def jobs(self) -> list:
        """Every live job as ``(job_id, slot, pool_id, session_id, expires_at, committed)``, by job id."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        cdef Py_ssize_t h
        out = []
        for h in range(self.cap):
            if self.recs[h].slot < 0:
                continue
            job_id = self.job_ids[h]
            if job_id is None:
                job_id = (<int64_t>self.recs[h].gen << 32) | h
            out.append((job_id, self.recs[h].slot, self.recs[h].pool_id, self._session_of(h),
                        self.recs[h].expires_at, bool(self.recs[h].committed)))
        out.sort(key=_job_order)
        return out

    # -- jobs named by handle (array batches) ---------------------------------
    def reserve_handle(self, Py_ssize_t slot, int64_t limit, int64_t running, int64_t pool_id, object session_id,
                       double expires_at, object pair=None) -> int:
        """:meth:`reserve` for a job with no id: its public handle (``gen << 32 | record``), or FULL / GONE."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        return self.c_reserve_handle(slot, limit, running, pool_id, session_id, expires_at, pair)

    cdef int64_t c_reserve_handle(self, Py_ssize_t slot, int64_t limit, int64_t running, int64_t pool_id,
                                  object session_id, double expires_at, object pair) except -4:
        cdef int64_t handle = self.c_claim(slot, limit, running, pool_id, expires_at)
        if handle == JOB_NO_ROOM:
            self._grow_jobs()
            handle = self.c_claim(slot, limit, running, pool_id, expires_at)
        if handle >= 0:
            self.session_ids[handle & <int64_t>0xFFFFFFFF] = session_id
            self.pairs[handle & <int64_t>0xFFFFFFFF] = pair
        return handle

    cdef int64_t c_claim(self, Py_ssize_t slot, int64_t limit, int64_t running, int64_t pool_id,
                         double expires_at) noexcept nogil:
        """The C half of a handle reservation: count, record, heap; the caller files the session id and pair.

        A batch's pass calls it without the GIL (see _gate.pxi). JOB_NO_ROOM
        when no handle is free (the caller grows the table and tries again).
        """
        cdef int32_t h
        cdef job_rec* r
        if slot < 0 or slot >= self.n_bound or not self.bound[slot]:
            return JOB_GONE
        if self.n_free == 0:
            return JOB_NO_ROOM
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
        r.named = 0
        self._queue_push(h)
        self.n_live += 1
        return (<int64_t>r.gen << 32) | h

    cdef Gate _gate(self):
        return self.counts.gate

    cdef int32_t _of_handle(self, int64_t handle, double now) noexcept nogil:
        """The record of a live, unexpired handle job, else -1 (a stale handle never matches)."""
        cdef int64_t h = handle & <int64_t>0xFFFFFFFF
        if handle < 0 or h >= self.cap:
            return -1
        cdef job_rec* r = &self.recs[h]
        if r.slot < 0 or r.gen != <uint32_t>(handle >> 32) or r.named or r.expires_at <= now:
            return -1
        return <int32_t>h

    def release_handle(self, int64_t handle, Py_ssize_t slot, double now) -> bool:
        """Release a handle job (``slot >= 0``: only if held there); False, nothing changed, otherwise."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        cdef int32_t h = self._of_handle(handle, now)
        if h < 0 or not self._owned(h, slot):
            return False
        self._forget(h)
        return True

    def commit_handle(self, int64_t handle, Py_ssize_t slot, double expires_at, double now) -> bool:
        """Commit a handle job until ``expires_at``; False, nothing changed, if unknown or refused."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        cdef int32_t h = self._of_handle(handle, now)
        if h < 0 or not self._owned(h, slot):
            return False
        self._commit(h, expires_at)
        return True

    def renew_handle(self, int64_t handle, Py_ssize_t slot, double expires_at, double now) -> bool:
        """Move a handle job's expiry; False, nothing changed, if unknown or refused."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        cdef int32_t h = self._of_handle(handle, now)
        if h < 0 or not self._owned(h, slot):
            return False
        self._expire_at(h, expires_at)
        return True

    def get_handle(self, int64_t handle, double now):
        """``(slot, pool_id, session_id, expires_at, committed, pair)`` of a live handle job, or None."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
        cdef int32_t h = self._of_handle(handle, now)
        if h < 0:
            return None
        cdef job_rec* r = &self.recs[h]
        return (r.slot, r.pool_id, self._session_of(h), r.expires_at, bool(r.committed), self._pair_of(h))

    def release_handles(self, const int64_t[::1] handles, double now) -> int:
        """Release every live handle job in ``handles``; how many were.

        The counts, heap and free list are given back in one pass that
        releases the GIL when no other entry is under way (as a batch's
        placement pass, see _gate.pxi); the objects of the released records
        are dropped afterwards, with the GIL.
        """
        cdef Py_ssize_t i, done = 0, n = handles.shape[0], n_filed = 0
        cdef Gate g = self._gate()
        cdef bint free_pass
        cdef int32_t* released = <int32_t*>malloc((n if n else 1) * sizeof(int32_t))
        if released == NULL:
            raise MemoryError()
        try:
            if n:
                free_pass = g.begin_pass()
                if free_pass:
                    with nogil:
                        done = self._release_pass(&handles[0], n, now, released, &n_filed)
                else:
                    done = self._release_pass(&handles[0], n, now, released, &n_filed)
                g.end_pass(free_pass)  # _release_pass raises nothing: no finally needed
            # no Python code runs here (str, tuple, list and bytes objects): atomic
            for i in range(n_filed):
                self.session_ids[released[i]] = None
                self.pairs[released[i]] = None
            if self.n_dead:
                self._reap()
        finally:
            free(released)
        return done

    cdef Py_ssize_t _release_pass(self, const int64_t* handles, Py_ssize_t n, double now,
                                  int32_t* released, Py_ssize_t* n_filed) noexcept nogil:
        """Give back every live handle job's capacity; how many. The released records that had their own
        session id and pair (no group's) go to ``released``, ``n_filed[0]`` of them."""
        cdef Py_ssize_t i, done = 0
        cdef int32_t h
        for i in range(n):
            h = self._of_handle(handles[i], now)
            if h >= 0:
                if not self._drop(h):
                    released[n_filed[0]] = h
                    n_filed[0] += 1
                done += 1
        return done

    def commit_handles(self, const int64_t[::1] handles, double expires_at, double now) -> int:
        """Commit every live handle job in ``handles`` until ``expires_at``; how many were."""
        cdef _Held _held = _hold(self._gate())  # the gate (_gate.pxi): released on return
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
