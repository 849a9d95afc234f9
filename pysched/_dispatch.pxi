# Included by _core.pyx, after _jobs.pxi.
"""The common dispatch in one compiled call: session, pair, selection, reservation, job id, result.

``Dispatcher.dispatch`` is what ``Scheduler.dispatch`` calls first for the
common job (default services, public, no job id, exclusion or preference,
language codes already normalised once). It reads the current snapshot,
looks the pair up, reads and updates the session's binding, selects in the
kernel, reserves in the job table, and builds the job id and the
:class:`Assignment`, all holding the GIL with no Python-level call in the
middle of a change (the clock is read first; dict and list operations on
str keys run no Python code). That makes the whole call atomic against
other threads: two threads on one session decide its binding one at a
time, and the reservation is exact. (A batch's placement pass, the one
change made without the GIL, is kept apart by the gate each entry here
takes: ``_gate.pxi``.) On a free-threaded build the session's
lock would be taken around the session part and the job table's around the
reservation, in that order (snapshot read -> session -> reservation).

Whenever the Python path must decide instead (an argument to validate, an
expiry or session sweep due, no pool for the pair, or the reservation
refused) it returns ``None`` having changed nothing except, possibly,
drawing one decision stream and one job number. When no node is eligible it
returns ``(src, tgt, now)``: the Python path then builds the
:class:`NoNodeAvailable` breakdown for that moment without selecting again,
exactly as a batch does. The pure-Python twin does the same in every case,
so both make the same decisions.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.sequence cimport PySequence_Fast_ITEMS
from cpython.unicode cimport PyUnicode_DATA, PyUnicode_GET_LENGTH


cdef extern from "Python.h":
    str PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    PyObject* PyList_GET_ITEM(object lst, Py_ssize_t i)  # borrowed, unchecked (the index is known valid)

cdef extern from *:
    """
    /* entry i of a list becomes o (a new reference), then its old item is let go: last, since that may
       free an object */
    static inline void pysched_list_put(PyObject* list, Py_ssize_t i, PyObject* o) {
        PyObject* old = PyList_GET_ITEM(list, i);
        Py_INCREF(o);
        PyList_SET_ITEM(list, i, o);
        Py_XDECREF(old);
    }
    """
    void pysched_list_put(object lst, Py_ssize_t i, PyObject* o)

cdef extern from *:
    """
    /* time.monotonic() without the call: the same clock and the same double
       (CPython's _PyTime_AsSecondsDouble), where CPython reads it with
       clock_gettime(CLOCK_MONOTONIC). Elsewhere the scheduler's clock is
       called (PYSCHED_C_MONOTONIC is 0). */
    #if defined(__linux__)
    #include <time.h>
    #define PYSCHED_C_MONOTONIC 1
    static double pysched_monotonic(void) {
        struct timespec ts;
        long long ns;
        if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) return -1.0;
        ns = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
        if (ns % 1000000000LL == 0) return (double)(ns / 1000000000LL);
        return (double)ns / 1e9;
    }
    #else
    #define PYSCHED_C_MONOTONIC 0
    static double pysched_monotonic(void) { return -1.0; }
    #endif
    """
    const bint PYSCHED_C_MONOTONIC
    double pysched_monotonic() noexcept nogil

cdef extern from *:
    """
    /* a batch checks its jobs' session ids without the GIL (its own list holds them) */
    #define pysched_is_str(o) (Py_TYPE(o) == &PyUnicode_Type)
    #define pysched_str_len(o) PyUnicode_GET_LENGTH(o)
    /* a str's hash as it keeps it (-1: not computed yet) */
    #define pysched_str_hash(o) (((PyASCIIObject*)(o))->hash)
    /* two str hold the same text (what str.__eq__ answers for two str; reads no Python state) */
    static inline int pysched_str_eq(PyObject* a, PyObject* b) {
        Py_ssize_t n = PyUnicode_GET_LENGTH(a);
        int kind = PyUnicode_KIND(a);
        return n == PyUnicode_GET_LENGTH(b) && kind == (int)PyUnicode_KIND(b)
               && memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)n * (size_t)kind) == 0;
    }
    """
    bint pysched_is_str(PyObject* o) noexcept nogil
    Py_ssize_t pysched_str_len(PyObject* o) noexcept nogil
    Py_hash_t pysched_str_hash(PyObject* o) noexcept nogil
    bint pysched_str_eq(PyObject* a, PyObject* b) noexcept nogil


cdef const char* _DIGIT_PAIRS = (b"00010203040506070809101112131415161718192021222324252627282930313233343536373839"
                                 b"40414243444546474849505152535455565758596061626364656667686970717273747576777879"
                                 b"8081828384858687888990919293949596979899")  # "00" .. "99", for _job_id

cdef object _UNSET = object()  # "argument not given" (None is a value the Python path validates)


@cython.final
@cython.freelist(256)  # one is made per dispatch and most live briefly: reuse them instead of the allocator
cdef class Assignment:
    """Where a job goes: ``node_id`` in ``pool_id``, under ``job_id``."""

    def __init__(self, str node_id, object pool_id, str job_id, str session_id, str src, str tgt):
        self.node_id = node_id
        self.pool_id = pool_id
        self.job_id = job_id
        self.session_id = session_id
        self.src = src
        self.tgt = tgt

    def __repr__(self):
        return (f"Assignment(node_id={self.node_id!r}, pool_id={self.pool_id}, job_id={self.job_id!r}, "
                f"session_id={self.session_id!r}, src={self.src!r}, tgt={self.tgt!r})")

    def __eq__(self, other):
        try:
            return (self.node_id == other.node_id and self.pool_id == other.pool_id and self.job_id == other.job_id
                    and self.session_id == other.session_id and self.src == other.src and self.tgt == other.tgt)
        except AttributeError:
            return NotImplemented

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None

    def __reduce__(self):
        return (Assignment, (self.node_id, self.pool_id, self.job_id, self.session_id, self.src, self.tgt))


cdef inline Assignment _assignment(str node_id, object pool_id, str job_id, str session_id, str src, str tgt):
    cdef Assignment a = Assignment.__new__(Assignment)
    a.node_id = node_id
    a.pool_id = pool_id
    a.job_id = job_id
    a.session_id = session_id
    a.src = src
    a.tgt = tgt
    return a


@cython.final
cdef class SessionState:
    """One session's binding. Decide and write it only under ``lock`` (or inside one atomic compiled call).

    ``binding`` is one tuple ``((src, tgt), pool_id)`` (or ``None``), so a
    reader that only needs a consistent view gets it from one attribute read.
    ``deciding`` is set while the Python path decides under ``lock``, and
    ``held`` while a batch has read the binding and not yet written it back;
    the compiled call, which takes no lock, then leaves the job to the
    Python path, which waits for both (see Dispatcher.await_session).
    """

    def __init__(self, double now):
        self.lock = threading.Lock()
        self.binding = None
        self.last_used = now
        self.deciding = False
        self.held = False

    @property
    def pair(self):
        return None if self.binding is None else self.binding[0]

    @property
    def pool_id(self):
        return None if self.binding is None else self.binding[1]


cdef inline int64_t _select_bound(SnapshotKernel kernel, Py_ssize_t key, Py_ssize_t bound, Py_ssize_t tenant,
                                  const request_t* req, uint64_t* state) noexcept nogil:
    """``kernel._select``, its calls taken apart for the common case: a session bound to a pool the ordering
    describes. A dispatch and a batch's job then call the ordered choice directly (the two calls' entries and
    exits in between were a tenth of a batch job's instructions, callgrind)."""
    cdef int32_t found
    if bound >= 0 and kernel._orders(req) and kernel._serves(key, bound):
        found = kernel._choose_ordered(bound, req, state, kernel.ordering)
        if found >= 0:
            return (<int64_t>bound << 32) | found
        return kernel._select_new(key, bound, tenant, req, state)
    return kernel._select(key, bound, tenant, req, state)


cdef inline SessionState _new_session(double now):
    """``SessionState(now)`` without the Python-level constructor call (the compiled paths' own)."""
    cdef SessionState state = SessionState.__new__(SessionState)
    state.lock = threading.Lock()
    state.binding = None
    state.last_used = now
    return state


cdef enum:
    # jobs per placement pass of a batch (Dispatcher.pass_size): between two passes the batch takes
    # the GIL back for its sessions' bookkeeping, and another thread's batch does its own then, while
    # this one's next pass runs without the GIL. (One pass for a whole big batch left another thread's
    # batch waiting for the GIL as long as this one's bookkeeping took.)
    PASS_SIZE = 2048
    CODE_MEMO = 64  # entries of a batch's per-job code memo, per direction (2 ** 6: see _memo_find)
    MEMO_PROBES = 4
    # a batch of this many jobs or more checks them without the GIL (_checked_run), so that another
    # thread's batch can start meanwhile; a smaller one is over before that would pay
    NOGIL_CHECKS = 1024
    CHECKS_WITH_GIL = 64  # after a short run without the GIL, jobs checked holding it before trying again
    SESSIONS_WITH_GIL = 64  # after a session that needs Python, the pass's next ones resolved holding the GIL


cdef inline Py_ssize_t _memo_find(PyObject** ptrs, PyObject* code) noexcept nogil:
    """Where ``code`` is in a batch's code memo (>= 0), or ``-1 - e`` for the entry ``e`` to file it in.

    Open addressing over CODE_MEMO entries from a multiplicative hash of the
    address (small strings sit 64 bytes apart in CPython's allocator, so its
    low bits alone would use a quarter of the entries), MEMO_PROBES entries
    at most; with none free the first is replaced (a memo may forget).
    """
    cdef Py_ssize_t j = <Py_ssize_t>((<uint64_t><size_t>code * <uint64_t>0x9E3779B97F4A7C15) >> 58)
    cdef Py_ssize_t e, probe
    for probe in range(MEMO_PROBES):
        e = (j + probe) & (CODE_MEMO - 1)
        if ptrs[e] == code:
            return e
        if ptrs[e] == NULL:
            return -1 - e
    return -1 - j


cdef Py_ssize_t _checked_run(Py_ssize_t i, Py_ssize_t n, PyObject** sids, PyObject** srcs, PyObject** tgts,
                             PyObject** memo_ptr, const Py_ssize_t* memo_id, Py_ssize_t src_id, Py_ssize_t tgt_id,
                             Py_ssize_t n_langs, int32_t* pair_number, int32_t* pair_of, int64_t* out_key,
                             int32_t* out_slot, int64_t* out_pool, int64_t* out_handle) noexcept nogil:
    """A batch's step 1 for jobs ``i`` on, as long as a job needs nothing but C; the first job that needs
    the GIL (or ``n``).

    A job needs the GIL when its session id is not a non-empty str (the
    error names it), a code object is not in the batch's memo yet, its
    target is "auto" (an error), or its pair is new to the batch (filed in
    ``pairs``); the caller checks that one holding the GIL, then calls this
    again from the next job. ``srcs`` / ``tgts`` are NULL when the batch has
    one code. The lists are the batch's own, and their items are held by them.
    """
    cdef Py_ssize_t at, key
    cdef PyObject* sid
    while i < n:
        sid = sids[i]
        if not pysched_is_str(sid) or pysched_str_len(sid) == 0:
            return i
        if srcs != NULL:
            at = _memo_find(memo_ptr, srcs[i])
            if at < 0:
                return i
            src_id = memo_id[at]
        if tgts != NULL:
            at = _memo_find(&memo_ptr[CODE_MEMO], tgts[i])
            if at < 0:
                return i
            tgt_id = memo_id[CODE_MEMO + at]
        if tgt_id == n_langs:
            return i
        key = _pair_key_of(n_langs, src_id, tgt_id)  # (-1 for a code no pool speaks)
        if key >= 0 and pair_number[key] < 0:
            return i
        _checked(i, key, pair_number, pair_of, out_key, out_slot, out_pool, out_handle)
        i += 1
    return n


cdef inline void _checked(Py_ssize_t i, Py_ssize_t key, const int32_t* pair_number, int32_t* pair_of,
                          int64_t* out_key, int32_t* out_slot, int64_t* out_pool, int64_t* out_handle) noexcept nogil:
    """Job ``i`` checked, its pair key ``key`` (-1: none) filed in this batch: its entries before the pass."""
    out_key[i] = key
    pair_of[i] = pair_number[key] if key >= 0 else -1
    out_slot[i] = -1
    out_pool[i] = -1
    out_handle[i] = -1


cdef inline void _let_go_unbound(PyObject** state_of, const uint8_t* rebound, Py_ssize_t k0,
                                 Py_ssize_t n) noexcept nogil:
    """End a pass's hold on the sessions it numbered itself (``k0`` on) and did not bind anew.

    Nothing of theirs is left to write back, so they are free as the pass
    ends; the ones it bound anew stay held until the batch, holding the GIL,
    has written their bindings (step 5). This runs before the pass ends, in
    it: every reader of ``held`` holds the GIL and waits for a running pass
    first (the gate), so it finds the flag as the pass left it. It also
    spares the batch, holding the GIL, a reference to each of these states
    and a walk to let go of them, each state cold again by then (measured:
    the GIL-held share of a 10,000-job batch's placement and release, perf
    samples of one thread, fell from 19-23 % to 14 %).
    """
    cdef Py_ssize_t k
    for k in range(k0, n):
        if k + 16 < n:
            _prefetch(state_of[k + 16])  # (``held`` is in the state's first line)
        if not rebound[k]:
            (<SessionState>state_of[k]).held = False


cdef inline bint _session_ready(PyObject* found, uint64_t mark, PyObject* snap, double stale) noexcept nogil:
    """A filed state a batch's pass can take as it is: numbered in this pass already, or unbound, or bound
    with a memo of its binding in this snapshot and used since ``stale`` (see Dispatcher._resolved_run)."""
    if (<SessionState>found).batch == mark:
        return True
    if (<SessionState>found).deciding or (<SessionState>found).held:
        return False  # another thread decides its binding: not this pass's (see Dispatcher.batch)
    if <PyObject*>(<SessionState>found).binding == <PyObject*>None:
        return True
    return ((<SessionState>found).last_used >= stale
            and <PyObject*>(<SessionState>found).seen_binding == <PyObject*>(<SessionState>found).binding
            and <PyObject*>(<SessionState>found).seen_snap == snap)


@cython.final
cdef class Dispatcher:
    """The common dispatch, start to finish, in one call (see the module notes)."""

    def __init__(self, object mgmt, JobTable jobs not None, Counters outcomes not None, dict sessions not None,
                 dict languages not None, object clock, str prefix not None, double reservation_ttl,
                 double session_ttl, double lease):
        if not prefix.isascii():
            raise ValueError(f"prefix must be ASCII, got {prefix!r}")
        self.mgmt = mgmt
        self.jobs = jobs
        self.gate = jobs._gate()
        self.outcomes = outcomes
        self.sessions = sessions
        self.languages = languages
        self.clock = clock
        # the default clock is read in C (the same value, without a call into Python)
        self.c_clock = PYSCHED_C_MONOTONIC and clock is time.monotonic
        self.prefix = prefix
        jobs.number_ids(prefix)  # the ids made here are filed by number (see _jobs.pxi)
        self.ttl = reservation_ttl
        self.session_ttl = session_ttl
        self.lease = lease
        self.seq = 0
        self.snap = None
        self.kernel = None
        self.default_mask = -1
        self.next_sweep = INF
        self.own_assignment = True
        self.assignment_type = Assignment
        self.pass_jobs = PASS_SIZE
        self.sindex_held = []

    def __dealloc__(self):
        free(self.sindex)  # (its references are sindex_held's, which goes with this object)

    @property
    def pass_size(self) -> int:
        """Jobs per placement pass of a batch (see :meth:`batch`); >= 1, 2,048 unless set."""
        return self.pass_jobs

    @pass_size.setter
    def pass_size(self, Py_ssize_t value):
        if value < 1:
            raise ValueError(f"pass_size must be >= 1, got {value}")
        self.pass_jobs = value

    cdef inline double _now(self) except? -1.0:
        cdef double now
        if self.c_clock:
            now = pysched_monotonic()
            if now >= 0.0:
                return now
        return self.clock()

    def now(self) -> float:
        """The time dispatch, release and commit read: the scheduler's clock."""
        return self._now()

    def new_job_id(self) -> str:
        """The next job id of this scheduler (shared with the Python path)."""
        self.seq += 1
        return self._job_id(self.seq)

    def job_id_of(self, int64_t seq) -> str:
        """The job id numbered ``seq`` (``>= 0``): what ``new_job_id`` returns for that number."""
        if seq < 0:
            raise ValueError(f"seq must be >= 0, got {seq}")
        return self._job_id(seq)

    cdef str _job_id(self, int64_t seq):
        """``prefix + str(seq)`` (``seq >= 0``) written straight into a new ASCII str (no intermediate objects).

        Two digits at a time, from a table, into their places: one division by
        100 a pair (which compilers make a multiplication), no reversal.
        """
        cdef uint64_t v = <uint64_t>seq, q = v
        cdef Py_ssize_t n = 1, plen = PyUnicode_GET_LENGTH(self.prefix)
        while q >= 10:
            q //= 10
            n += 1
        cdef str out = PyUnicode_New(plen + n, 127)
        cdef char* data = <char*>PyUnicode_DATA(out)
        memcpy(data, PyUnicode_DATA(self.prefix), plen)
        cdef char* end = data + plen + n
        while v >= 100:
            q = v % 100
            v //= 100
            end -= 2
            memcpy(end, &_DIGIT_PAIRS[2 * q], 2)
        if v >= 10:
            memcpy(end - 2, &_DIGIT_PAIRS[2 * v], 2)
        else:
            (end - 1)[0] = <char>(48 + v)
        return out

    # -- the session index ------------------------------------------------------
    # Every compiled dispatch, and a batch for each of its jobs, finds the
    # session's state in the session table, a dict shared with the Python
    # path. In a big table that probe misses the cache on the table's index,
    # its entry, and (for an id object other than the table's key) the key;
    # then on the state. The index files the states the compiled calls found
    # or made by their id's hash, in one 16-byte entry: a lookup reads that
    # entry and the state, whose ``indexed_id`` confirms the id. It is exact
    # because a state is filed only while the table holds it under that id,
    # the table never replaces a state (setdefault everywhere), and every
    # removal (SessionManager.close and sweep) calls forget_session just
    # after. (Between the two, a call on another thread may still find the
    # dropped state, as it may when it looked the session up just before the
    # removal; either way its binding is written to a state nobody finds
    # again, and the session starts afresh.) Read and changed with the GIL
    # only; its references are in ``sindex_held``, so the collector sees them.

    cdef PyObject* _session_find(self, str session_id) except? NULL:
        """The state filed under ``session_id`` (borrowed: the index holds it), or NULL."""
        cdef Py_hash_t h = pysched_str_hash(<PyObject*>session_id)
        if h == -1:
            h = hash(session_id)
        return self._session_at(<PyObject*>session_id, h)

    cdef PyObject* _session_at(self, PyObject* session_id, Py_hash_t h) noexcept nogil:
        """``_session_find`` for a str whose hash ``h`` is known; reads no Python state (a batch's pass
        calls it without the GIL: the index changes only when no pass runs, see forget_session)."""
        if self.sindex_cap == 0:
            return NULL
        cdef size_t mask = <size_t>self.sindex_cap - 1
        cdef size_t i = <size_t>h & mask
        cdef session_entry* e
        cdef PyObject* filed
        while True:
            e = &self.sindex[i]
            if e.state == NULL:
                return NULL
            if e.hash == h:
                filed = <PyObject*>(<SessionState>e.state).indexed_id
                if filed == session_id or pysched_str_eq(filed, session_id):
                    return e.state
            i = (i + 1) & mask

    cdef int _session_file(self, str session_id, SessionState state) except -1:
        """File ``state``, which the session table holds under ``session_id`` now (unless filed already)."""
        if state.indexed_id is not None:
            return 0
        # a batch's pass reads the index without the GIL: it changes between passes only (and the wait may
        # let another thread file this very state meanwhile)
        self.gate.wait()
        if state.indexed_id is not None:
            return 0
        cdef Py_hash_t h = hash(session_id)
        cdef Py_ssize_t cap = self.sindex_cap, old_cap = cap, i
        cdef session_entry* old
        cdef session_entry* grown
        cdef list old_held
        if 2 * (self.sindex_n + 1) > cap:  # at most half full: short probes
            cap = 1024 if cap == 0 else 2 * cap
            # everything that allocates first: a collection it starts may run a finalizer that drops a
            # session (forget_session), which must find the index whole
            grown = <session_entry*>calloc(cap, sizeof(session_entry))
            if grown == NULL:
                raise MemoryError()
            try:
                held = [None] * cap
            except BaseException:
                free(grown)
                raise
            old = self.sindex
            old_held = self.sindex_held
            self.sindex = grown
            self.sindex_cap = cap
            self.sindex_held = held
            self.sindex_n = 0
            for i in range(old_cap):
                if old[i].state != NULL:
                    self._session_put(old[i].hash, old[i].state)
            free(old)
            old_held = None  # (every state in it is in the new list too)
        state.indexed_id = session_id
        self._session_put(h, <PyObject*>state)
        return 0

    cdef void _session_put(self, Py_hash_t h, PyObject* state) noexcept:
        """An entry for ``state`` in the first free place from its hash's (there is one: half full at most)."""
        cdef size_t mask = <size_t>self.sindex_cap - 1
        cdef size_t i = <size_t>h & mask
        while self.sindex[i].state != NULL:
            i = (i + 1) & mask
        self.sindex[i].hash = h
        self.sindex[i].state = state
        self.sindex_n += 1
        pysched_list_put(self.sindex_held, i, state)  # (the item replaced is None)

    def forget_session(self, SessionState state not None):
        """The session table dropped ``state``: its entry goes (SessionManager's ``on_forget``)."""
        self.gate.wait()  # (as _session_file: never while a batch's pass reads the index)
        if state.indexed_id is None or self.sindex_cap == 0:
            return
        cdef Py_hash_t h = hash(state.indexed_id)
        cdef size_t mask = <size_t>self.sindex_cap - 1
        cdef size_t i = <size_t>h & mask, j, k
        state.indexed_id = None
        while self.sindex[i].state != <PyObject*>state:
            if self.sindex[i].state == NULL:
                return  # (not filed: nothing to do)
            i = (i + 1) & mask
        # Remove entry i and shift back each later entry of its run that may move (linear probing's
        # deletion: no tombstones, so a lookup still stops at the first free entry). ``state`` is held
        # by the caller meanwhile: the list updates below free nothing it needs.
        j = i
        while True:
            j = (j + 1) & mask
            if self.sindex[j].state == NULL:
                break
            k = <size_t>self.sindex[j].hash & mask  # where entry j's probe starts
            # entry j may fill i unless its start lies cyclically within (i, j]
            if (k <= i or k > j) if i <= j else (k <= i and k > j):
                self.sindex[i] = self.sindex[j]
                pysched_list_put(self.sindex_held, i, <PyObject*>self.sindex_held[j])
                i = j
        self.sindex[i].state = NULL
        self.sindex[i].hash = 0
        self.sindex_n -= 1
        pysched_list_put(self.sindex_held, i, <PyObject*>None)

    # -- a session's binding, decided one thread at a time ------------------------------------------------
    # Three kinds of call decide a session's binding. The one-call dispatch does it atomically (under the
    # GIL, no pass overlapping it). The Python path reads, decides and writes it holding the session's
    # lock, with ``deciding`` set. A batch's pass reads it when it numbers the session and writes it back
    # after the pass, possibly without the GIL in between, with ``held`` set meanwhile. Each leaves the
    # session to whichever other one is under way:
    #
    # * the one-call dispatch, finding ``deciding`` or ``held`` set, hands its job to the Python path;
    # * the Python path, holding the lock with ``deciding`` set, first waits for ``held`` to clear
    #   (await_session);
    # * a batch numbers no session with ``deciding`` set, or ``held`` by another batch: its pass ends
    #   before that job, and the next pass, before it holds any session, waits for it.
    #
    # No cycle of waits can form: a batch waits only while it holds no session, and the Python path waits
    # only for batches, which finish their pass and write back without waiting for anything.

    def await_session(self, SessionState state not None):
        """Wait until no batch holds ``state``. The caller holds the session's lock with ``deciding`` set,
        so no batch takes it anew: the binding it reads next is the session's until it writes it."""
        self._await_unheld(state)

    cdef int _await_unheld(self, SessionState state) except -1:
        """Wait, letting go of the GIL, until no batch holds ``state``."""
        # read with the GIL and no pass running: a pass that numbered the session has set ``held`` by then
        self.gate.wait()
        while state.held:
            time.sleep(HELD_POLL)  # (pysched._holding) the batch writes back right after its pass, and tells nobody
            self.gate.wait()
        return 0

    def try_hold(self, object session_ids, double now):
        """Hold every session of ``session_ids`` (distinct str ids) at once if no other call is deciding any
        of them: ``(held, created)`` as ``pysched._holding.Holds.hold`` returns, else None with nothing held.

        A session new to the table gets its state (listed in ``created``).
        Each check and its ``held`` are one step under the GIL, as in a
        batch's own numbering, and the gate's entry count is held meanwhile,
        so no pass numbers sessions without the GIL at the same time.
        """
        cdef dict held = {}
        cdef list created = []
        cdef SessionState state
        cdef PyObject* entry
        cdef bint free = True
        _enter(self.gate)
        try:
            for sid in session_ids:
                state = self._state_of(sid, now, created)
                if state.deciding or state.held:
                    free = False
                    break
                state.held = True
                held[sid] = state
        except BaseException:
            free = False
            raise
        finally:
            _leave(self.gate)
            if not free:
                self._release_sessions(list(held.values()), created)
        return (held, created) if free else None

    cdef SessionState _state_of(self, object session_id, double now, list created):
        """The session's state in the table; a new session's made now (setdefault, as dispatch: a state
        another thread made meanwhile is kept), and listed with its id in ``created``."""
        cdef PyObject* entry = _get(self.sessions, session_id)
        if entry != NULL:
            return <SessionState?>entry
        fresh = _new_session(now)
        state = <SessionState?>self.sessions.setdefault(session_id, fresh)
        if state is fresh:
            created.append((session_id, state))
        return state

    def let_go(self, dict held not None, list created not None):
        """End a hold that :meth:`try_hold` (or ``Holds.hold``) took: each state it made and left unbound
        leaves the table, then every held state is free."""
        self._release_sessions(list(held.values()), created)

    cdef int _release_sessions(self, list states, list created) except -1:
        """A batch's pass lets go of its sessions (their bindings written back, or the pass abandoned).

        A state the pass made (``created``: ``(id, state)`` pairs) that is still unbound leaves the
        table first, as a failed dispatch leaves no session; then every state in ``states`` is free.
        """
        cdef Py_ssize_t k
        cdef SessionState state
        for k in range(len(created)):
            sid, state = <tuple>created[k]
            if state.binding is None and _get(self.sessions, sid) == <PyObject*>state:
                del self.sessions[sid]
                self.forget_session(state)
        for k in range(len(states)):
            (<SessionState>PyList_GET_ITEM(states, k)).held = False
        return 0

    def check_session_index(self) -> int:
        """Check the session index against the session table; its number of entries (tests).

        AssertionError unless every entry holds a state the table holds under
        that entry's id and hash, lies in the probe run from its hash's place
        (nothing free in between), and is the one reference of ``sindex_held``
        at its place, with None at every free place.
        """
        cdef Py_ssize_t i, n = 0
        cdef size_t mask = <size_t>self.sindex_cap - 1, j
        cdef SessionState state
        if len(self.sindex_held) != self.sindex_cap:
            raise AssertionError("session index: its reference list is not its size")
        for i in range(self.sindex_cap):
            if self.sindex[i].state == NULL:
                if self.sindex_held[i] is not None:
                    raise AssertionError(f"session index: free entry {i} holds a reference")
                continue
            n += 1
            state = <SessionState>self.sindex[i].state
            if self.sindex_held[i] is not state:
                raise AssertionError(f"session index: entry {i} is not held")
            if state.indexed_id is None or self.sessions.get(state.indexed_id) is not state:
                raise AssertionError(f"session index: entry {i} ({state.indexed_id!r}) is not in the table")
            if hash(state.indexed_id) != self.sindex[i].hash:
                raise AssertionError(f"session index: entry {i} has another hash")
            j = <size_t>self.sindex[i].hash & mask
            while j != <size_t>i:
                if self.sindex[j].state == NULL:
                    raise AssertionError(f"session index: entry {i} is cut off from its place {j}")
                j = (j + 1) & mask
        if n != self.sindex_n:
            raise AssertionError(f"session index: {n} entries, {self.sindex_n} counted")
        return n

    def publish(self, snap):
        """Management's ``on_publish`` hook: cache what dispatch reads from the new snapshot."""
        self._refresh(snap)

    cdef PyObject* _code(self, str code) except? NULL:
        """Memoise ``code``'s (normalised code, language id) in this snapshot; NULL if either is unknown."""
        cdef PyObject* found = _get(self.languages, code)
        if found == NULL:
            return NULL
        norm = <str>found
        if norm == "auto":
            lang = self.n_langs
        else:
            found = _get(self.lang_ids, norm)
            if found == NULL:
                return NULL
            lang = <object>found
        if len(self.codes) < 4096:  # bounded: codes reaching here were normalised once already
            self.codes[code] = (norm, lang)
            return _get(self.codes, code)
        self.scratch_code = (norm, lang)
        return <PyObject*>self.scratch_code

    cdef int _refresh(self, object snap) except -1:
        index = snap.index
        self.codes = {}
        self.kernel = snap.kernel
        self.lang_ids = index.lang_ids
        self.n_langs = index.n_langs
        self.pool_ids = tuple(snap.pool_ids)
        self.pool_index = snap.pool_index
        self.snap = snap
        return 0

    # Every entry below brackets its work on the reservation state with the
    # gate (_gate.pxi): a batch's pass without the GIL never overlaps it.
    def dispatch(self, object session_id, object src, object tgt):
        """The common job's :class:`Assignment`; ``(src, tgt, now)`` when no node is eligible; else None."""
        _enter(self.gate)
        try:
            return self._dispatch(session_id, src, tgt)
        finally:
            _leave(self.gate)

    cdef object _dispatch(self, object session_id, object src, object tgt):
        cdef PyObject* found_s
        cdef PyObject* found_t
        cdef PyObject* entry
        cdef double now
        cdef Py_ssize_t src_id, tgt_id, key, bound = -1, slot, pidx
        cdef SnapshotKernel kernel
        cdef SessionState state = None
        cdef request_t req
        cdef uint64_t stream
        cdef int64_t found, limit, running
        cdef int32_t h
        cdef tuple binding, pair = None
        cdef object was = None, fresh
        cdef tuple rebinding
        cdef bint memo
        if (type(session_id) is not str or PyUnicode_GET_LENGTH(session_id) == 0 or type(src) is not str
                or type(tgt) is not str):
            return None
        if self.default_mask < 0:
            return None
        now = self._now()
        if now >= self.jobs.next_expiry_c() or now >= self.next_sweep:
            return None
        if self.snap is None:
            self._refresh(self.mgmt.snapshot)
        kernel = self.kernel
        entry = self._session_find(<str>session_id)
        if entry == NULL:
            entry = _get(self.sessions, session_id)
            if entry != NULL:
                self._session_file(<str>session_id, <SessionState?>entry)
        if entry != NULL:
            state = <SessionState?>entry
        # A session that sends the very code objects of its last dispatch to the pair it is bound to
        # (in this snapshot) has the pair's codes and key in its memo: no code probe. Read only.
        if (state is not None and state.seen_src is src and state.seen_tgt is tgt and state.binding is not None
                and state.seen_binding is state.binding and state.seen_snap is self.snap):
            pair = <tuple>state.seen_pair  # the binding's pair: the binding tuple itself is not read
            s = <str>pair[0]
            t = <str>pair[1]
            key = state.seen_key
            memo = True
        else:
            # raw code -> (normalised code, language id), memoised per snapshot: one probe per code
            entry = _get(self.codes, tgt)
            if entry == NULL:
                entry = self._code(tgt)
                if entry == NULL:
                    return None
            t = <str>(<tuple>entry)[0]
            tgt_id = <object>(<tuple>entry)[1]
            if tgt_id >= self.n_langs:
                return None  # "auto" is no target
            entry = _get(self.codes, src)
            if entry == NULL:
                entry = self._code(src)
                if entry == NULL:
                    return None
            s = <str>(<tuple>entry)[0]
            src_id = <object>(<tuple>entry)[1]
            key = kernel._pair_key(src_id, tgt_id)
            memo = False
        if key < 0 or kernel.pair_off[key] == kernel.pair_off[key + 1]:
            return None
        pair = None
        if state is not None:
            if state.deciding or state.held:
                # another thread is deciding this session's binding: the Python path (holding its lock,
                # under which it may have let go of the GIL) or a batch's pass. The Python path waits for
                # both, so the decisions come one at a time. (Checked here, after the code probes, which
                # may call into Python and so let another thread run; checked again, with the binding,
                # once everything below that allocates is done: see "read it back" below.)
                return None
            if state.binding is not None and state.last_used < now - self.session_ttl:
                state.binding = None  # idle past its TTL: forgotten at lookup
            state.last_used = now
            was = state.binding
            if state.binding is not None:
                if memo:
                    pair = <tuple>state.seen_pair
                    bound = state.seen_index  # memo: the binding's pool index in this snapshot
                else:
                    binding = <tuple>state.binding
                    pair = <tuple>binding[0]
                    if pair[0] == s and pair[1] == t:
                        if not (state.seen_binding is binding and state.seen_snap is self.snap):
                            self._seen(state, binding, key)
                        state.seen_src = src  # the next dispatch with these objects skips the code probes
                        state.seen_tgt = tgt
                        bound = state.seen_index
                    else:
                        pair = None
        req.service_mask = <uint64_t>self.default_mask
        req.need = NEED_GPU | NEED_PUBLIC
        req.now = now
        req.exclude = NULL
        req.n_exclude = 0
        req.inflight = kernel.inflight
        stream = kernel.rng.next_stream()
        found = _select_bound(kernel, key, bound, -1, &req, &stream)
        if found < 0:
            return (s, t, now)
        slot = <Py_ssize_t>(found & <int64_t>0xFFFFFFFF)
        pidx = <Py_ssize_t>(found >> 32)
        _prefetch(PyList_GET_ITEM(kernel.node_ids, slot))  # the node id, for the Assignment (cold in big fleets)
        pool_id = self.pool_ids[pidx]
        if pair is None:
            pair = (s, t)
        self.seq += 1
        job_id = self._job_id(self.seq)
        kernel._capacity(slot, &limit, &running)
        # Everything that may allocate a tracked object comes first: the new binding, a new session's
        # state, room in the job table. Such an allocation may start a collection, whose finalizers run
        # Python code and may let another thread run, and decide this very session meanwhile.
        fresh = None
        if state is None:
            fresh = _new_session(now)
            rebinding = (pair, pool_id)
        elif bound != pidx or was is None:
            rebinding = (pair, pool_id)
        else:
            rebinding = None
        if self.jobs.n_free == 0:
            self.jobs._grow_jobs()
        # Then read it back: from here to the binding written, no Python code runs (the reservation and the
        # session table's insert of a str key call none, and allocate no tracked object), so the session is
        # decided once, by this call. A session made, bound or being decided by another call meanwhile goes
        # to the Python path, which waits for that decision and follows it (the job id drawn is not used).
        if state is None:
            if _get(self.sessions, session_id) != NULL:
                return None
        elif state.deciding or state.held or state.binding is not was:
            return None
        h = self.jobs._reserve(job_id, self.seq, slot, limit, running, pool_id, session_id, now + self.ttl, pair)
        if h < 0:
            return None
        if state is None:
            state = <SessionState>fresh
            self.sessions[session_id] = state  # (a dict: PyDict_SetItem, no Python code for a str key)
        if rebinding is not None:
            state.binding = rebinding
        state.last_used = now
        if fresh is not None:
            self._session_file(<str>session_id, state)  # (may wait for a batch's pass: decided already)
        self.outcomes.values[0] += 1
        if self.own_assignment:
            return _assignment(<str>kernel.node_ids[slot], pool_id, job_id, <str>session_id, s, t)
        return self.assignment_type(kernel.node_ids[slot], pool_id, job_id, session_id, s, t)

    def release(self, object job_id):
        """Release a job held on any node; None when the Python path must answer (a bad argument)."""
        if type(job_id) is not str or not job_id:
            return None
        _enter(self.gate)
        try:
            return self.jobs.c_release(<str>job_id, -1, self._now())
        finally:
            _leave(self.gate)

    def commit(self, object job_id):
        """Commit a job held on any node; None when the Python path must answer."""
        if type(job_id) is not str or not job_id:
            return None
        cdef double now = self._now()
        _enter(self.gate)
        try:
            return self.jobs.c_commit(<str>job_id, -1, now + self.lease, now)
        finally:
            _leave(self.gate)

    # -- the public entry points, as Scheduler methods on an instance ----------
    def connect(self, object sched, object default_services):
        """Route what the compiled calls do not finish to ``sched``'s Python path."""
        from pysched._impl import kernel as default_kernel
        from pysched.languages import normalize_language

        self.normalize = normalize_language
        # One Assignment type per process: this module's, unless the process
        # runs the pure-Python twin by default (PYSCHED_PURE_PYTHON) and this
        # scheduler asked for the compiled kernel explicitly.
        self.assignment_type = default_kernel.Assignment
        self.own_assignment = self.assignment_type is Assignment
        self.slots = sched._reservations._slots  # node id -> slot (LocalReservations keeps it for life)
        self.slow_dispatch = sched._dispatch_slow
        self.slow_release = sched._release_slow
        self.slow_commit = sched._commit_slow
        self.no_node = sched._no_node_now
        self.default_services = default_services

    def call(self, session_id, src, tgt, *, job_id=None, exclude=None, tenant=None, services=_UNSET,
             require_gpu=True, prefer=None):
        """``Scheduler.dispatch``: the common job here, anything else in the Python path."""
        if services is _UNSET:
            services = self.default_services
        if (job_id is None and exclude is None and tenant is None and prefer is None and require_gpu is True
                and services is self.default_services):
            _enter(self.gate)
            try:
                done = self._dispatch(session_id, src, tgt)
            finally:
                _leave(self.gate)
            if done is not None:
                if type(done) is tuple:
                    raise self.no_node(*done)
                return done
        return self.slow_dispatch(session_id, src, tgt, job_id=job_id, exclude=exclude, tenant=tenant,
                                  services=services, require_gpu=require_gpu, prefer=prefer)

    cdef Py_ssize_t _slot_of(self, object node_id) except -3:
        """-1 for any node; the node's slot; -2 for one never registered; -3 (with no error) for a bad id."""
        cdef PyObject* entry
        if node_id is None:
            return -1
        if type(node_id) is not str or PyUnicode_GET_LENGTH(node_id) == 0:
            return -4  # the Python path names the problem
        entry = _get(self.slots, node_id)
        return -2 if entry == NULL else <object>entry

    def call_release(self, job_id, *, node_id=None):
        """``Scheduler.release``."""
        cdef Py_ssize_t slot
        if type(job_id) is str and PyUnicode_GET_LENGTH(job_id):
            slot = self._slot_of(node_id)
            if slot == -2:
                return False  # a node this scheduler never saw holds nothing
            if slot >= -1:
                _enter(self.gate)
                try:
                    return self.jobs.c_release(<str>job_id, slot, self._now())
                finally:
                    _leave(self.gate)
        return self.slow_release(job_id, node_id=node_id)

    def call_commit(self, job_id, *, node_id=None):
        """``Scheduler.commit``."""
        cdef double now
        cdef Py_ssize_t slot
        if type(job_id) is str and PyUnicode_GET_LENGTH(job_id):
            slot = self._slot_of(node_id)
            if slot >= -1:
                now = self._now()
                _enter(self.gate)
                try:
                    if self.jobs.c_commit(<str>job_id, slot, now + self.lease, now):
                        return None
                finally:
                    _leave(self.gate)
        return self.slow_commit(job_id, node_id=node_id)  # refused: the Python path says why

    # -- array batches ----------------------------------------------------------
    cdef PyObject* _code_checked(self, object code, str name, Py_ssize_t i) except NULL:
        """(normalised code, language id) of job ``i``'s code; validates codes not seen before.

        A code no pool speaks gets the id -1 (its jobs find no pool).
        """
        cdef PyObject* entry
        if type(code) is str:
            entry = _get(self.codes, code)
            if entry != NULL:
                return entry
            entry = self._code(<str>code)
            if entry != NULL:
                return entry
        try:
            norm = self.normalize(code, name, allow_auto=name == "src")
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}[{i}]: {exc}") from None
        entry = _get(self.lang_ids, norm)
        lang = self.n_langs if norm == "auto" else (-1 if entry == NULL else <object>entry)
        self.scratch_code = (norm, lang)
        if type(code) is str and len(self.codes) < 4096 and lang >= 0:
            self.codes[code] = self.scratch_code
        return <PyObject*>self.scratch_code

    cdef int _seen(self, SessionState state, tuple binding, Py_ssize_t key) except -1:
        """Memoise ``binding``'s pool index and pair key (``key``, or -2: look it up) in the current snapshot."""
        cdef PyObject* entry
        cdef PyObject* s_entry
        cdef PyObject* t_entry
        pair = <tuple>binding[0]
        entry = _get(self.pool_index, binding[1])
        if key == -2:
            key = -1
            s_entry = _get(self.codes, pair[0])
            if s_entry == NULL:
                s_entry = self._code(<str>pair[0])
            if s_entry != NULL:
                t_entry = _get(self.codes, pair[1])
                if t_entry == NULL:
                    t_entry = self._code(<str>pair[1])
                if t_entry != NULL and <Py_ssize_t>(<tuple>t_entry)[1] < self.n_langs:
                    key = self.kernel._pair_key((<tuple>s_entry)[1], (<tuple>t_entry)[1])
        self._memo(state, binding, -1 if entry == NULL else <object>entry, key)
        return 0

    cdef void _memo(self, SessionState state, tuple binding, Py_ssize_t index, Py_ssize_t key) noexcept:
        """Set ``state``'s memo: ``binding``'s pool index and pair key in the current snapshot.

        The raw codes of the memo are forgotten: only a dispatch that checked
        them against this binding's pair may set them again.
        """
        state.seen_binding = binding
        state.seen_pair = binding[0]
        state.seen_snap = self.snap
        state.seen_index = index
        state.seen_key = key
        state.seen_src = None
        state.seen_tgt = None

    def batch(self, list session_ids not None, object src, object tgt, uint64_t service_mask, int need,
              object tenant_pool, double now, int32_t[::1] out_slot, int64_t[::1] out_pool,
              int64_t[::1] out_handle, int64_t[::1] out_key):
        """Place and reserve a whole batch, in request order, exactly as that many dispatch calls would.

        ``session_ids`` is a list of str, which the job table keeps (the
        placed jobs' session ids, filed once for the batch: the caller hands
        over a list of its own and never changes it); ``src``/``tgt`` one code
        or a list of one per job, which nobody changes during the call either
        (a batch of NOGIL_CHECKS (1,024) jobs or more reads all three lists
        without the GIL while it checks them, so that another thread's batch
        can start meanwhile); ``tenant_pool`` the pool id of the jobs' tenant (a new
        binding prefers it), or None. Everything is validated first (a bad value raises,
        naming the job, before anything changes). Then each job reads its
        session's binding (bindings made earlier in the batch included),
        selects with the live counts (so it sees every reservation before
        it), reserves under a handle and binds its session, as ``dispatch``
        does; one decision stream is drawn per job whose pair has pools.
        Writes each job's node slot, pool id and handle (-1 each where none)
        and pair key (-1: no pool speaks both codes); returns the number
        placed.

        The jobs are placed in passes of up to ``pass_size`` (2,048) jobs. Each
        pass releases the GIL when no other entry into this scheduler's
        reservation state is under way (see _gate.pxi), and holds it
        otherwise; either way no other change of that state overlaps a pass.
        Each pass finds its jobs' sessions in the session index and reads
        their bindings itself; a session that needs Python (new to the index,
        past its TTL, its binding not memoised in this snapshot) is read
        before the pass, with the GIL, and the pass then ends at the next such
        job. Between passes, with the GIL, the batch binds the pass's
        sessions; other threads' calls may run there, exactly as between two
        of the equivalent dispatch calls.
        """
        cdef Py_ssize_t n = len(session_ids), placed = 0, done = 0
        if not (out_slot.shape[0] == n and out_pool.shape[0] == n and out_handle.shape[0] == n
                and out_key.shape[0] == n):
            raise ValueError("batch: every output array must have one entry per job")
        while True:
            # the jobs from ``done`` on; a call stops early (``done`` then names the first job not placed)
            # when a snapshot was published meanwhile: the next one goes on over the new snapshot
            placed += self._batch(session_ids, src, tgt, service_mask, need, tenant_pool, now, out_slot,
                                  out_pool, out_handle, out_key, done, &done)
            if done >= n:
                return placed

    cdef Py_ssize_t _batch(self, list session_ids, object src, object tgt, uint64_t service_mask, int need,
                           object tenant_pool, double now, int32_t[::1] out_slot, int64_t[::1] out_pool,
                           int64_t[::1] out_handle, int64_t[::1] out_key, Py_ssize_t start,
                           Py_ssize_t* done) except -1:
        """Jobs ``start`` on, all over one snapshot; sets ``done`` to the first job not handled (all of them,
        unless a publication came between two passes) and returns how many were placed."""
        cdef Py_ssize_t n = len(session_ids), i, k, key, placed = 0, n_pairs = 0, n_sessions, p, tenant = -1
        cdef Py_ssize_t lo = start, hi, m, got, nogil_at, gil_until, resolved, n_with_gil, at
        cdef bint force_gil = False
        cdef double stale = now - self.session_ttl
        cdef PyObject** sid_items
        cdef PyObject** src_items
        cdef PyObject** tgt_items
        cdef Py_ssize_t src_id = -1, tgt_id = -1  # the language ids of s_code / t_code
        cdef SnapshotKernel kernel
        cdef SessionState state
        cdef request_t req
        cdef int32_t group
        cdef tuple filed = None
        cdef PyObject* entry
        # each job's (normalised code, language id): held, not borrowed (a publication while a code is
        # normalised swaps the cache that owns them; so does the next unmemoised code)
        cdef tuple s_code = None, t_code = None
        cdef bint one_src = type(src) is str, one_tgt = type(tgt) is str, free_pass = False
        cdef list srcs = None if one_src else (src if type(src) is list else list(src))
        cdef list tgts = None if one_tgt else (tgt if type(tgt) is list else list(tgt))
        cdef Gate gate = self.gate
        if not one_src and len(srcs) != n:
            raise ValueError(f"src must be one code or one per job ({n}), got {len(srcs)}")
        if not one_tgt and len(tgts) != n:
            raise ValueError(f"tgt must be one code or one per job ({n}), got {len(tgts)}")
        if self.snap is None:
            self._refresh(self.mgmt.snapshot)
        # Everything below is read from this one snapshot; a publication meanwhile (validation runs
        # Python code, the gate may wait) makes the batch start again before anything changed.
        snap = self.snap
        kernel = self.kernel
        cdef tuple pool_ids = self.pool_ids
        if tenant_pool is not None:  # the tenant's pool in this snapshot (-1: not in it)
            entry = _get(self.pool_index, tenant_pool)
            if entry != NULL:
                tenant = <object>entry
        # per job: its pair's number in this batch, its session's; per session: the bound pair key and
        # pool, and whether the batch bound it anew; per pool: its id
        cdef int32_t* pair_of = <int32_t*>malloc((4 * n + 1) * sizeof(int32_t))
        cdef uint8_t* rebound = <uint8_t*>calloc(n + 1, sizeof(uint8_t))
        cdef int64_t* pool_c = <int64_t*>malloc((kernel.n_pools + 1) * sizeof(int64_t))
        # per session number the pass itself gave (from n_with_gil on): its state (borrowed, see _resolved_run)
        cdef PyObject** state_of = <PyObject**>malloc(
            ((self.pass_jobs if self.pass_jobs < n - start else n - start) + 1) * sizeof(PyObject*))
        # pair key -> its number in this batch (-1: none yet); keys are dense, (n_langs + 1) * n_langs of them
        cdef Py_ssize_t n_keys = (kernel.n_langs + 1) * kernel.n_langs
        cdef int32_t* pair_number = <int32_t*>malloc((n_keys if n_keys else 1) * sizeof(int32_t))
        if pair_of == NULL or rebound == NULL or pool_c == NULL or pair_number == NULL or state_of == NULL:
            free(pair_of)
            free(rebound)
            free(pool_c)
            free(pair_number)
            free(state_of)
            raise MemoryError()
        cdef int32_t* session_of = pair_of + n
        cdef int32_t* bound_key = pair_of + 2 * n
        cdef int32_t* bound_index = pair_of + 3 * n
        memset(pair_number, 0xFF, (n_keys if n_keys else 1) * sizeof(int32_t))
        cdef list pairs = []         # pair number -> (src, tgt)
        # session number -> its SessionState, which this pass holds (``held``) until it is bound; None: the
        # pass's sessions are released
        cdef list states = None
        cdef list created = None     # (id, state) of each state this pass made (dropped again if left unbound)
        cdef SessionState wait_for
        cdef uint64_t mark
        # per-job codes: a small memo by object identity, so a batch that repeats a few code objects probes
        # the code cache once per object (a dict probe and a PyLong conversion are ~150 instructions a job).
        # An entry's object is held in ``memo_hold`` (with its (normalised code, id)) for the batch: its
        # address cannot name another object meanwhile.
        # (set up only when a direction has per-job codes: one code each needs none)
        cdef PyObject* memo_ptr[2 * CODE_MEMO]  # [0, CODE_MEMO): src; [CODE_MEMO, 2 * CODE_MEMO): tgt
        cdef Py_ssize_t memo_id[2 * CODE_MEMO]
        cdef list memo_hold = None
        cdef Py_ssize_t s_at = -1, t_at = -1
        if not (one_src and one_tgt):
            memo_hold = [None] * (2 * CODE_MEMO)
            memset(memo_ptr, 0, sizeof(memo_ptr))
        try:
            for p in range(kernel.n_pools):
                pool_c[p] = <int64_t>pool_ids[p]
            # 1. validate everything (an unseen code runs Python code); nothing changes before this loop ends
            # (each entry's language id is read once: a PyLong conversion is a few dozen instructions).
            # Jobs before ``start`` were handled by an earlier call: only their pair numbers are filed (-1)
            memset(pair_of, 0xFF, start * sizeof(int32_t))
            if one_src:
                s_code = <tuple>self._code_checked(src, "src", 0)
                src_id = <Py_ssize_t>s_code[1]
            if one_tgt:
                t_code = <tuple>self._code_checked(tgt, "tgt", 0)
                tgt_id = <Py_ssize_t>t_code[1]
            # Runs of jobs that need nothing but C are checked by _checked_run: a big batch's without the
            # GIL (after a short run, the next CHECKS_WITH_GIL jobs' holding it); a job it stops at is
            # checked here, holding the GIL: an error naming it, or its codes and pair filed.
            sid_items = PySequence_Fast_ITEMS(session_ids)
            src_items = NULL if one_src else PySequence_Fast_ITEMS(srcs)
            tgt_items = NULL if one_tgt else PySequence_Fast_ITEMS(tgts)
            nogil_at = start if n - start >= NOGIL_CHECKS else n
            i = start
            while i < n:
                if i >= nogil_at:
                    with nogil:
                        k = _checked_run(i, n, sid_items, src_items, tgt_items, memo_ptr, memo_id, src_id, tgt_id,
                                         kernel.n_langs, pair_number, pair_of, &out_key[0], &out_slot[0],
                                         &out_pool[0], &out_handle[0])
                    nogil_at = k + 1 if k - i >= CHECKS_WITH_GIL else k + CHECKS_WITH_GIL
                else:
                    k = _checked_run(i, n, sid_items, src_items, tgt_items, memo_ptr, memo_id, src_id, tgt_id,
                                     kernel.n_langs, pair_number, pair_of, &out_key[0], &out_slot[0],
                                     &out_pool[0], &out_handle[0])
                i = k
                if i >= n:
                    break
                sid = session_ids[i]
                if type(sid) is not str or PyUnicode_GET_LENGTH(sid) == 0:
                    raise TypeError(f"session_ids[{i}] must be a non-empty str, got {type(sid).__name__}: {sid!r}")
                if not one_src:
                    code = srcs[i]
                    s_at = _memo_find(memo_ptr, <PyObject*>code)
                    if s_at < 0:
                        s_at = -1 - s_at
                        s_code = <tuple>self._code_checked(code, "src", i)
                        memo_id[s_at] = <Py_ssize_t>s_code[1]
                        memo_hold[s_at] = (code, s_code)
                        memo_ptr[s_at] = <PyObject*>code
                    src_id = memo_id[s_at]
                if not one_tgt:
                    code = tgts[i]
                    t_at = _memo_find(&memo_ptr[CODE_MEMO], <PyObject*>code)
                    if t_at >= 0:
                        t_at += CODE_MEMO
                    else:
                        t_at = CODE_MEMO - 1 - t_at
                        t_code = <tuple>self._code_checked(code, "tgt", i)
                        memo_id[t_at] = <Py_ssize_t>t_code[1]
                        memo_hold[t_at] = (code, t_code)
                        memo_ptr[t_at] = <PyObject*>code
                    tgt_id = memo_id[t_at]
                if tgt_id == self.n_langs:
                    raise ValueError(f"tgt[{i}]: 'auto' is not a target language")
                key = _pair_key_of(kernel.n_langs, src_id, tgt_id)
                if key >= 0 and pair_number[key] < 0:  # a pair new to the batch (its codes: this job's entries)
                    if not one_src:
                        s_code = <tuple>(<tuple>memo_hold[s_at])[1]
                    if not one_tgt:
                        t_code = <tuple>(<tuple>memo_hold[t_at])[1]
                    pair_number[key] = <int32_t>n_pairs
                    pairs.append((s_code[0], t_code[0]))
                    n_pairs += 1
                _checked(i, key, pair_number, pair_of, &out_key[0], &out_slot[0], &out_pool[0], &out_handle[0])
                i += 1
            # 2. room for every job (a pass grows the table only if other threads reserved meanwhile), and
            # the lists that file the jobs' session ids and pairs once for all of them (each pass's placed
            # jobs join a group over these lists; the job table owns them from then on)
            if self.jobs.n_free < n - start:
                self.jobs._grow_to(self.jobs.cap - self.jobs.n_free + n - start)
            if start < n:
                filed = (session_ids, pairs, PyBytes_FromStringAndSize(<char*>pair_of, n * sizeof(int32_t)))
            req.service_mask = service_mask
            req.need = need
            req.now = now
            req.exclude = NULL
            req.n_exclude = 0
            req.inflight = kernel.inflight
            while lo < n:
                hi = lo + self.pass_jobs if n - lo > self.pass_jobs else n
                m = hi - lo
                if self.jobs.n_free < m:  # other threads reserved between two passes
                    self.jobs._grow_to(self.jobs.cap - self.jobs.n_free + m)
                self.jobs._group_room()
                # 3. number the pass's sessions and read each one's binding once (forgotten past its TTL).
                # A job whose session needs Python (see _resolved_run) is resolved here, holding the GIL,
                # and so are the SESSIONS_WITH_GIL jobs after it (a few passes, not one per such job, when
                # they come mixed); from the first other job on, the pass resolves them itself. The gate's
                # entry count is held meanwhile: no other batch's pass runs without the GIL while these
                # states change (_gate.pxi).
                self.batches += 1
                mark = self.batches
                states = []
                created = []
                wait_for = None
                n_sessions = 0
                _enter(gate)
                try:
                    i = lo
                    gil_until = lo + 1 if force_gil else lo
                    force_gil = False
                    while i < hi:
                        sid = session_ids[i]
                        entry = self._session_find(<str>sid)
                        if i >= gil_until:
                            if entry != NULL and _session_ready(entry, mark, <PyObject*>snap, stale):
                                break  # this job on: the pass resolves them
                            gil_until = i + SESSIONS_WITH_GIL
                        if entry == NULL:
                            # a new session's state is made now, so that the pass holds it as any other
                            # (dropped again at the pass's end if no job bound it, as a failed dispatch
                            # leaves none)
                            state = self._state_of(sid, now, created)
                            self._session_file(<str>sid, state)
                        else:
                            state = <SessionState>entry
                        if state.batch == mark:
                            session_of[i] = <int32_t>state.batch_k
                            i += 1
                            continue
                        if state.deciding or state.held:
                            # another thread is deciding this session's binding (the Python path, or
                            # another batch's pass): the pass ends before this job, and the next one, which
                            # holds no session yet, waits for it first (see "one thread at a time" above)
                            if i == lo:
                                wait_for = state
                            hi = i
                            break
                        k = n_sessions
                        state.batch = mark
                        state.batch_k = k
                        state.held = True
                        states.append(state)
                        n_sessions += 1
                        session_of[i] = <int32_t>k
                        bound_key[k] = -1
                        bound_index[k] = -1
                        if state.binding is not None and state.last_used < stale:
                            state.binding = None  # idle past its TTL: forgotten at lookup
                        state.last_used = now
                        i += 1
                        if state.binding is None:
                            continue
                        if not (state.seen_binding is state.binding and state.seen_snap is snap):
                            self._seen(state, <tuple>state.binding, -2)
                        bound_key[k] = <int32_t>state.seen_key
                        bound_index[k] = <int32_t>state.seen_index
                finally:
                    _leave(gate)
                if wait_for is not None:
                    # (nothing numbered: ``states`` is empty, and a state made above is unbound)
                    self._release_sessions(states, created)
                    states = None
                    if wait_for.deciding:
                        wait_for.lock.acquire()  # the Python path decides holding it
                        wait_for.lock.release()
                    else:
                        self._await_unheld(wait_for)
                    continue  # (from ``lo`` again)
                resolved = i  # jobs from here on: resolved in the pass
                n_with_gil = n_sessions
                # 4. place and reserve, in order: without the GIL if no other entry is under way. What this
                # batch read must all come from one snapshot: after the wait (other threads run meanwhile)
                # the check below (the next call goes on from ``lo``), and from there to the pass no Python
                # code runs.
                gate.wait()
                if self.snap is not snap or self.jobs.n_spare == 0:  # (another batch took the spare group)
                    break
                group = self.jobs._new_group(filed)  # allocates nothing: no Python code runs before the pass
                free_pass = gate.begin_pass()
                if free_pass:
                    self.passes_without_gil += 1
                    with nogil:
                        hi = self._resolved_run(resolved, hi, sid_items, <PyObject*>snap, now, mark, session_of,
                                                bound_key, bound_index, state_of, &n_sessions)
                        got = self._place(kernel, lo, hi, &out_key[0], session_of, bound_key, bound_index,
                                          rebound, pool_c, tenant, &req, now + self.ttl, group, &out_slot[0],
                                          &out_pool[0], &out_handle[0])
                        _let_go_unbound(state_of, rebound, n_with_gil, n_sessions)
                else:
                    hi = self._resolved_run(resolved, hi, sid_items, <PyObject*>snap, now, mark, session_of,
                                            bound_key, bound_index, state_of, &n_sessions)
                    got = self._place(kernel, lo, hi, &out_key[0], session_of, bound_key, bound_index, rebound,
                                      pool_c, tenant, &req, now + self.ttl, group, &out_slot[0], &out_pool[0],
                                      &out_handle[0])
                    _let_go_unbound(state_of, rebound, n_with_gil, n_sessions)
                gate.end_pass(free_pass)  # _place raises nothing: no finally needed
                self.resolved_in_pass += hi - resolved
                if got == 0:
                    self.jobs._free_group(group)  # no job joined it
                # the states the pass numbered and bound anew, held until their bindings are written below:
                # referenced from here on, after ``states``' own (the index holds them until now: it changes
                # only between passes, and no Python code ran since this one). The pass let go of the others.
                for k in range(n_with_gil, n_sessions):
                    if rebound[k]:
                        states.append(<object>state_of[k])
                if hi == lo:
                    force_gil = True  # (a job found ready and then not: the next pass resolves it with the GIL)
                # 5. with the GIL: count and bind
                self.seq += got  # job numbers stay in step with one-by-one dispatch
                self.outcomes.values[0] += got
                placed += got
                _enter(gate)
                try:
                    at = n_with_gil  # where in ``states`` the next one the pass numbered is
                    for k in range(n_sessions):
                        if not rebound[k]:
                            continue
                        rebound[k] = 0  # (for the next pass's numbering)
                        if k < n_with_gil:
                            state = <SessionState>states[k]
                        else:
                            state = <SessionState>states[at]
                            at += 1
                        binding = (pairs[pair_number[bound_key[k]]], pool_ids[bound_index[k]])
                        state.binding = binding
                        if self.snap is snap:
                            self._memo(state, binding, bound_index[k], bound_key[k])  # as dispatch would set it
                    self._release_sessions(states, created)
                    states = None
                finally:
                    _leave(gate)
                lo = hi
            done[0] = lo
        finally:
            if states is not None:  # (a pass that did not get to its end: a new snapshot, an error)
                self._release_sessions(states, created)
            free(pair_of)
            free(rebound)
            free(pool_c)
            free(pair_number)
            free(state_of)
        return placed

    cdef Py_ssize_t _resolved_run(self, Py_ssize_t i, Py_ssize_t hi, PyObject** sids, PyObject* snap, double now,
                                  uint64_t mark, int32_t* session_of, int32_t* bound_key, int32_t* bound_index,
                                  PyObject** state_of, Py_ssize_t* n_sessions) noexcept nogil:
        """A batch's step 3 for jobs ``i`` on, as long as a job needs no Python: the first job that does
        (or ``hi``). It runs in the pass, without the GIL when the pass has none.

        A job needs nothing but C when its session is numbered in this pass
        already, or when the session index has its state, that state's memo
        is of its binding in this snapshot (``snap``), and the binding is not
        past its TTL. Otherwise (a session not filed yet, or new; a binding to
        forget, or to look up in this snapshot) the caller resolves it holding
        the GIL. Which is why this is safe without it: the index changes only
        between passes (_session_file, forget_session), and a state's memo and
        batch number only in compiled calls that no pass overlaps (dispatch
        waits for the pass; a batch resolves its sessions holding the gate's
        entry count, so that no other pass starts without the GIL meanwhile).
        The Python path may set a binding meanwhile: only its address is read,
        to compare it with the memo's.
        """
        cdef PyObject* sid
        cdef PyObject* found
        cdef Py_hash_t h
        cdef Py_ssize_t k
        cdef double stale = now - self.session_ttl
        cdef size_t mask = <size_t>self.sindex_cap - 1
        cdef const session_entry* e
        while i < hi:
            # A big batch's sessions are cold: the id, then its index entry, then its state, each found
            # through the one before. Ask for them a few jobs ahead, each once the one before has loaded, so
            # that the three chains of different jobs overlap instead of following one another.
            if i + 16 < hi:
                _prefetch(sids[i + 16])
            if i + 8 < hi and self.sindex_cap:
                h = pysched_str_hash(sids[i + 8])
                _prefetch(&self.sindex[<size_t>h & mask])
                if i + 4 < hi:
                    h = pysched_str_hash(sids[i + 4])
                    e = &self.sindex[<size_t>h & mask]
                    if e.hash == h and e.state != NULL:
                        _prefetch(e.state)
                        _prefetch(<char*>e.state + 64)
            sid = sids[i]
            h = pysched_str_hash(sid)
            if h == -1:
                return i
            found = self._session_at(sid, h)
            if found == NULL or not _session_ready(found, mark, snap, stale):
                return i
            if (<SessionState>found).batch == mark:
                session_of[i] = <int32_t>(<SessionState>found).batch_k
                i += 1
                continue
            k = n_sessions[0]
            n_sessions[0] = k + 1
            (<SessionState>found).batch = mark
            (<SessionState>found).batch_k = k
            (<SessionState>found).held = True
            (<SessionState>found).last_used = now
            state_of[k] = found
            session_of[i] = <int32_t>k
            if <PyObject*>(<SessionState>found).binding != <PyObject*>None:
                bound_key[k] = <int32_t>(<SessionState>found).seen_key
                bound_index[k] = <int32_t>(<SessionState>found).seen_index
            else:
                bound_key[k] = -1
                bound_index[k] = -1
            i += 1
        return hi

    cdef Py_ssize_t _place(self, SnapshotKernel kernel, Py_ssize_t lo, Py_ssize_t hi, const int64_t* keys,
                           const int32_t* session_of, int32_t* bound_key, int32_t* bound_index, uint8_t* rebound,
                           const int64_t* pool_ids, Py_ssize_t tenant, request_t* req, double expires_at,
                           int32_t group, int32_t* out_slot,
                           int64_t* out_pool, int64_t* out_handle) noexcept nogil:
        """One pass of a batch, jobs ``lo`` to ``hi``: select, count and file each in order; no Python object.

        (See _gate.pxi.) A placed job joins ``group`` (``JobTable._new_group``) at its index in the batch.

        Each session's binding lives in ``bound_key``/``bound_index`` for the
        length of the pass (``rebound`` marks those it changed), so a job sees
        the bindings its session's earlier jobs made.
        """
        cdef Py_ssize_t i, k, key, bound, slot, pidx, placed = 0
        cdef uint64_t stream
        cdef int64_t found, handle, limit, running
        cdef job_rec* rec
        cdef int32_t* live = &self.jobs.group_live[group]  # the group arrays move only in _group_room (GIL)
        for i in range(lo, hi):
            key = keys[i]
            if key < 0 or kernel.pair_off[key] == kernel.pair_off[key + 1]:
                continue
            k = session_of[i]
            bound = bound_index[k] if bound_key[k] == key else -1
            stream = kernel.rng.next_stream()
            found = _select_bound(kernel, key, bound, tenant, req, &stream)
            if found < 0:
                continue
            slot = <Py_ssize_t>(found & <int64_t>0xFFFFFFFF)
            pidx = <Py_ssize_t>(found >> 32)
            kernel._capacity(slot, &limit, &running)
            handle = self.jobs.c_claim(slot, limit, running, pool_ids[pidx], expires_at)
            if handle == JOB_NO_ROOM:  # only when the pass kept the GIL and a scan let others reserve
                with gil:
                    try:
                        self.jobs._grow_jobs()
                    except MemoryError:
                        pass
                handle = self.jobs.c_claim(slot, limit, running, pool_ids[pidx], expires_at)
            if handle < 0:
                continue  # refused at the last moment: reported like no node
            rec = &self.jobs.recs[handle & <int64_t>0xFFFFFFFF]
            rec.group = group
            rec.at = <int32_t>i
            live[0] += 1
            out_slot[i] = <int32_t>slot
            out_pool[i] = pool_ids[pidx]
            out_handle[i] = handle
            placed += 1
            if bound != pidx or bound_key[k] != key:
                bound_key[k] = <int32_t>key
                bound_index[k] = <int32_t>pidx
                rebound[k] = 1
        return placed
