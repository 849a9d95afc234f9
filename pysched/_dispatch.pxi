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
time, and the reservation is exact. On a free-threaded build the session's
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

from cpython.dict cimport PyDict_GetItem
from cpython.unicode cimport PyUnicode_DATA


cdef extern from "Python.h":
    str PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)

cdef object _UNSET = object()  # "argument not given" (None is a value the Python path validates)


@cython.final
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
    """

    def __init__(self, double now):
        self.lock = threading.Lock()
        self.binding = None
        self.last_used = now

    @property
    def pair(self):
        return None if self.binding is None else self.binding[0]

    @property
    def pool_id(self):
        return None if self.binding is None else self.binding[1]


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
        self.outcomes = outcomes
        self.sessions = sessions
        self.languages = languages
        self.clock = clock
        self.prefix = prefix
        self.ttl = reservation_ttl
        self.session_ttl = session_ttl
        self.lease = lease
        self.seq = 0
        self.snap = None
        self.kernel = None
        self.default_mask = -1
        self.next_sweep = INF

    def new_job_id(self) -> str:
        """The next job id of this scheduler (shared with the Python path)."""
        self.seq += 1
        return self._job_id(self.seq)

    cdef str _job_id(self, int64_t seq):
        """``prefix + str(seq)`` written straight into a new ASCII str (no intermediate objects)."""
        cdef char digits[24]
        cdef Py_ssize_t n = 0, i, plen = len(self.prefix)
        while True:
            digits[n] = <char>(48 + seq % 10)
            n += 1
            seq //= 10
            if seq == 0:
                break
        cdef str out = PyUnicode_New(plen + n, 127)
        cdef uint8_t* data = <uint8_t*>PyUnicode_DATA(out)
        memcpy(data, PyUnicode_DATA(self.prefix), plen)
        for i in range(n):
            data[plen + i] = digits[n - 1 - i]
        return out

    def publish(self, snap):
        """Management's ``on_publish`` hook: cache what dispatch reads from the new snapshot."""
        self._refresh(snap)

    cdef PyObject* _code(self, str code) except? NULL:
        """Memoise ``code``'s (normalised code, language id) in this snapshot; NULL if either is unknown."""
        cdef PyObject* found = PyDict_GetItem(self.languages, code)
        if found == NULL:
            return NULL
        norm = <str>found
        if norm == "auto":
            lang = self.n_langs
        else:
            found = PyDict_GetItem(self.lang_ids, norm)
            if found == NULL:
                return NULL
            lang = <object>found
        if len(self.codes) < 4096:  # bounded: codes reaching here were normalised once already
            self.codes[code] = (norm, lang)
            return PyDict_GetItem(self.codes, code)
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

    def dispatch(self, object session_id, object src, object tgt):
        """The common job's :class:`Assignment`; ``(src, tgt, now)`` when no node is eligible; else None."""
        cdef PyObject* found_s
        cdef PyObject* found_t
        cdef PyObject* entry
        cdef double now
        cdef Py_ssize_t src_id, tgt_id, key, bound = -1, slot, pidx
        cdef SnapshotKernel kernel
        cdef SessionState state = None
        cdef request_t req
        cdef uint64_t stream
        cdef int64_t found
        cdef int32_t h
        cdef tuple binding, pair = None
        if type(session_id) is not str or not session_id or type(src) is not str or type(tgt) is not str:
            return None
        if self.default_mask < 0:
            return None
        now = self.clock()
        if now >= self.jobs.next_expiry_c() or now >= self.next_sweep:
            return None
        if self.snap is None:
            self._refresh(self.mgmt.snapshot)
        kernel = self.kernel
        # raw code -> (normalised code, language id), memoised per snapshot: one probe per code
        entry = PyDict_GetItem(self.codes, tgt)
        if entry == NULL:
            entry = self._code(tgt)
            if entry == NULL:
                return None
        t = <str>(<tuple>entry)[0]
        tgt_id = <object>(<tuple>entry)[1]
        if tgt_id >= self.n_langs:
            return None  # "auto" is no target
        entry = PyDict_GetItem(self.codes, src)
        if entry == NULL:
            entry = self._code(src)
            if entry == NULL:
                return None
        s = <str>(<tuple>entry)[0]
        src_id = <object>(<tuple>entry)[1]
        key = kernel._pair_key(src_id, tgt_id)
        if key < 0 or kernel.pair_off[key] == kernel.pair_off[key + 1]:
            return None
        entry = PyDict_GetItem(self.sessions, session_id)
        if entry != NULL:
            state = <SessionState?>entry
            if state.binding is not None and state.last_used < now - self.session_ttl:
                state.binding = None  # idle past its TTL: forgotten at lookup
            state.last_used = now
            if state.binding is not None:
                binding = <tuple>state.binding
                pair = <tuple>binding[0]
                if pair[0] == s and pair[1] == t:
                    if state.seen_binding is binding and state.seen_snap is self.snap:
                        bound = state.seen_index  # memo: the binding's pool index in this snapshot
                    else:
                        entry = PyDict_GetItem(self.pool_index, binding[1])
                        bound = -1 if entry == NULL else <object>entry
                        state.seen_binding = binding
                        state.seen_snap = self.snap
                        state.seen_index = bound
                else:
                    pair = None
        req.service_mask = <uint64_t>self.default_mask
        req.need = NEED_GPU | NEED_PUBLIC
        req.now = now
        req.exclude = NULL
        req.n_exclude = 0
        req.inflight = kernel.inflight
        stream = kernel.rng.next_stream()
        found = kernel._select(key, bound, -1, &req, &stream)
        if found < 0:
            return (s, t, now)
        slot = <Py_ssize_t>(found & <int64_t>0xFFFFFFFF)
        pidx = <Py_ssize_t>(found >> 32)
        pool_id = self.pool_ids[pidx]
        if pair is None:
            pair = (s, t)
        self.seq += 1
        job_id = self._job_id(self.seq)
        h = self.jobs.c_reserve(job_id, slot, kernel.recs[slot].max_concurrency, kernel.loads[slot].running,
                                pool_id, session_id, now + self.ttl, pair)
        if h < 0:
            return None
        if state is None:
            state = SessionState.__new__(SessionState)
            state.lock = threading.Lock()
            state.binding = None
            state.last_used = now
            state = <SessionState>self.sessions.setdefault(session_id, state)
        if bound != pidx or state.binding is None:
            state.binding = (pair, pool_id)
        state.last_used = now
        self.outcomes.values[0] += 1
        return _assignment(<str>kernel.node_ids[slot], pool_id, job_id, <str>session_id, s, t)

    def release(self, object job_id):
        """Release a job held on any node; None when the Python path must answer (a bad argument)."""
        if type(job_id) is not str or not job_id:
            return None
        return self.jobs.c_release(<str>job_id, -1, self.clock())

    def commit(self, object job_id):
        """Commit a job held on any node; None when the Python path must answer."""
        if type(job_id) is not str or not job_id:
            return None
        cdef double now = self.clock()
        return self.jobs.c_commit(<str>job_id, -1, now + self.lease, now)

    # -- the public entry points, as Scheduler methods on an instance ----------
    def connect(self, object sched, object default_services):
        """Route what the compiled calls do not finish to ``sched``'s Python path."""
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
            done = self.dispatch(session_id, src, tgt)
            if done is not None:
                if type(done) is tuple:
                    raise self.no_node(*done)
                return done
        return self.slow_dispatch(session_id, src, tgt, job_id=job_id, exclude=exclude, tenant=tenant,
                                  services=services, require_gpu=require_gpu, prefer=prefer)

    def call_release(self, job_id, *, node_id=None):
        """``Scheduler.release``."""
        if node_id is None and type(job_id) is str and job_id:
            return self.jobs.c_release(<str>job_id, -1, self.clock())
        return self.slow_release(job_id, node_id=node_id)

    def call_commit(self, job_id, *, node_id=None):
        """``Scheduler.commit``."""
        cdef double now
        if node_id is None and type(job_id) is str and job_id:
            now = self.clock()
            if self.jobs.c_commit(<str>job_id, -1, now + self.lease, now):
                return None
        return self.slow_commit(job_id, node_id=node_id)
