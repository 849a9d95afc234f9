# The gate: how a batch places jobs without the GIL while every other
# reservation change keeps the GIL as its only lock. Included by _core.pyx.
#
# A scheduler's in-process reservation state (the in-flight counts, the
# per-pool ordering, the load table, the job table and the decision streams)
# is changed only by compiled code. Every change is atomic under the GIL:
# there is no Python-level call in the middle of one. ``dispatch_batch`` is
# the exception: its placement pass (select, count, order, file the record)
# runs with the GIL released, so the state needs another guard for that
# pass, and only for it.
#
# One Gate per scheduler (its SlotCounts makes it; the successor of a grown
# table, the ordering, the job table and the dispatcher share it). Every
# compiled entry point that reads or changes that state brackets its work
# with ``_enter`` / ``_leave``:
#
# * ``busy``: a batch's pass is running without the GIL. An entry that finds
#   it set releases the GIL and waits on ``lock``, which the batch holds for
#   the whole pass (``begin_pass`` / ``end_pass``);
# * ``active``: how many entries are under way. An entry can run Python code
#   (an allocation that starts the garbage collector, a finalizer), and
#   another thread can run meanwhile; a batch that finds ``active`` non-zero
#   does its pass holding the GIL instead, as every other change does (never
#   waiting: the entry under way may be its own thread's).
#
# The pass also reads the sessions of its jobs that the dispatcher's session
# index knows (their state's batch number, memo and last use): the index and
# those fields change only in compiled code that no pass overlaps, namely
# entries (dispatch), the index's own changes (which wait for a pass first)
# and a batch's GIL-held session work, which holds ``active`` too.
#
# Both fields are read and written only with the GIL held, so their own
# updates need no atomics. A free-threaded build would make ``busy`` and
# ``active`` a reader-writer lock (entries share it, a batch takes it alone)
# and give the counts and trees per-pool locks.

from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK, NOWAIT_LOCK)


@cython.final
cdef class Gate:
    """One scheduler's guard of its reservation state while a batch runs without the GIL (see above)."""

    def __cinit__(self):
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError()
        self.busy = 0
        self.active = 0

    def __dealloc__(self):
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    cdef int wait(self) except -1:
        """Wait, without the GIL, until no batch pass is running."""
        while self.busy:
            with nogil:
                PyThread_acquire_lock(self.lock, WAIT_LOCK)
                PyThread_release_lock(self.lock)
        return 0

    cdef int begin_pass(self) except -1:
        """A batch's pass starts (GIL held): 1 if it may run without the GIL, 0 if it must hold it.

        Waits for another pass first. 0 when an entry is under way, or a
        waiter holds the lock for an instant: the pass then counts as an
        entry itself. Either way :meth:`end_pass` ends it.
        """
        self.wait()
        if not self.active and PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            self.busy = 1
            return 1
        self.active += 1
        return 0

    cdef void end_pass(self, bint free) noexcept:
        """End of the pass that :meth:`begin_pass` started (GIL held): waiters go on."""
        if free:
            self.busy = 0
            PyThread_release_lock(self.lock)
        else:
            self.active -= 1

    @property
    def state(self) -> tuple:
        """``(busy, active)``: for tests and debugging."""
        return (bool(self.busy), self.active)


cdef inline int _enter(Gate g) except -1:
    """Start of an entry point's work on the reservation state (GIL held)."""
    if g is not None:
        g.wait()
        g.active += 1
    return 0


cdef inline void _leave(Gate g) noexcept:
    """End of that work."""
    if g is not None:
        g.active -= 1


@cython.final
@cython.freelist(8)
cdef class _Held:
    """One entry point's bracket, for entries with declarations to make: ``_hold`` is the ``_enter``,
    this object's deallocation (when the entry returns or raises) the ``_leave``."""

    cdef PyObject* gate  # borrowed: the gate outlives every entry into its state

    def __dealloc__(self):
        cdef Gate g
        if self.gate != NULL:
            g = <Gate>self.gate
            g.active -= 1


cdef inline _Held _hold(Gate g):
    cdef _Held held = _Held.__new__(_Held)  # made first: nothing can fail once entered
    if g is not None:
        _enter(g)
        held.gate = <PyObject*>g
    return held
