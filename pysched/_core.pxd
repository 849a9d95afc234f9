# cython: language_level=3
"""C-level declarations of pysched's compiled kernel.

The node record and the load record are declared here exactly once; the
numpy dtypes used by the management layer are derived from these structs
(``_core.NODE_DTYPE`` / ``_core.LOAD_DTYPE``) and their item sizes are
checked against ``sizeof`` at import.
"""

from cpython.object cimport PyObject
from cpython.pythread cimport PyThread_type_lock
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


# One record per node slot, immutable once a snapshot is published.
ctypedef struct node_rec:
    uint64_t service_mask      # bit i set: the node runs service i (ids from the scheduler's service registry)
    uint32_t max_concurrency   # jobs the node may hold at once (>= 1 for a live node)
    uint8_t status             # STATUS_* code; STATUS_ABSENT for a slot without a live node
    uint8_t flags              # FLAG_HAS_GPU | FLAG_PUBLIC
    uint16_t pad_              # explicit padding, always zero (keeps the layout identical to numpy's)


# One record per node slot, written in place by heartbeats (never copied). The
# figures are doubles: kept, compared with the threshold and returned exactly as given.
ctypedef struct node_load:
    double last_heartbeat      # clock() time of the last heartbeat (or registration)
    double cpu                 # cpu use in percent [0, 100]
    double gpu                 # gpu use in percent [0, 100]
    double mem                 # memory use in percent [0, 100]
    int32_t running            # jobs the node itself reported running
    int32_t pad_               # explicit padding, always zero (keeps the layout identical to numpy's)


cdef enum:
    STATUS_READY = 0
    STATUS_REGISTERING = 1
    STATUS_DEGRADED = 2
    STATUS_DRAINING = 3
    STATUS_OFFLINE = 4         # marked offline by the operator or the fleet
    STATUS_ABSENT = 5          # no live node in this slot

    FLAG_HAS_GPU = 1
    FLAG_PUBLIC = 2

    # "need" bits of a request
    NEED_GPU = 1               # the job needs a GPU node
    NEED_PUBLIC = 2            # a public job: only nodes accepting public jobs
    NEED_UNKNOWN_SERVICE = 4   # a required service no node has ever announced

    # reason codes, in eligibility order (the first failing check wins)
    R_OK = 0
    R_OFFLINE = 1
    R_NOT_READY = 2
    R_NO_GPU = 3
    R_NOT_PUBLIC = 4
    R_MISSING_SERVICE = 5
    R_EXCLUDED = 6
    R_FULL = 7
    R_OVERLOADED = 8
    N_REASONS = 9


# One record per job handle of the in-process job table (_jobs.pxi).
ctypedef struct job_rec:
    double expires_at          # TTL end while uncommitted, lease end once committed
    int64_t pool_id            # the pool that served the job
    int32_t slot               # node slot whose capacity the job holds; -1 for a free handle
    int32_t heap_pos           # position in the expiry heap; -1 for a free handle
    int64_t seq                # the number of a job id written prefix + number (JobTable._seq_of), else 0
    uint64_t order             # JobTable.n_set when expires_at was last set: equal expiries go in this order
    uint32_t gen               # bumped each time the record is reused: the high half of a public job handle
    uint8_t committed          # 1 once the node accepted the job
    uint8_t named              # 1 while the record is filed under a job id (JobTable.job_ids[h] is not None)
    int32_t group              # the batch group holding its session id and pair (JobTable.groups), or -1
    int32_t at                 # its place in that group (its index in the batch)


cdef enum:
    JOB_FULL = -1              # JobTable.reserve: the node has no free capacity
    JOB_GONE = -2              # no live node owns the slot
    JOB_HELD = -3              # the job id already holds a reservation
    JOB_NO_ROOM = -5           # JobTable.c_claim: no free handle (the caller grows the table; -4 means an error)


# The per-request parameters every kernel entry point shares.
ctypedef struct request_t:
    uint64_t service_mask      # services the job needs
    int need                   # NEED_* bits
    double now                 # clock() time of the decision
    const int32_t* exclude     # slots the caller excluded (sorted not required)
    Py_ssize_t n_exclude
    const int32_t* inflight    # in-flight counts to score with: the live array, or a batch's scratch copy


# The per-pool ordering (_ordering.pxi): a tournament tree per pool over its members, and per slot
# its key, compared by the trees (16 bytes, four to a cache line: a tree repair compares the keys of
# other slots), and its brief: copies of what a decision checks and a count change reads of the
# slot's node and load records, so that in a big fleet those read two cold lines of the slot (key
# and brief) instead of five (key, node record, load record, leaf link, eviction flag). Every change
# of what they copy refreshes them (Ordering._key_update).
ctypedef struct order_key:
    int32_t eff                # max(in-flight, reported running); -1: not a candidate
    uint32_t max_concurrency   # the node record's: the key's divisor, and the reservation's limit
    double gpu                 # reported GPU use: the key's second criterion

ctypedef struct slot_brief:
    double last_heartbeat      # the load record's: a decision checks staleness against it
    uint64_t service_mask      # the node record's
    int64_t head               # the slot's first leaf (tree id << 32 | position), or -1
    int32_t running            # the load record's: a count change recomputes eff from it
    uint8_t flags              # the node record's FLAG_* bits
    uint8_t live               # ready, not overloaded, not evicted: a candidate unless it is full
    uint16_t pad_              # always zero (32 bytes: the array is aligned to 32, a brief is in one line)

ctypedef struct session_entry:
    Py_hash_t hash             # the session id's hash
    PyObject* state            # its SessionState (held by Dispatcher.sindex_held); NULL: empty

ctypedef struct order_node:
    int32_t win                # slot of a best candidate below (leftmost of the tied ones); -1: none
    int32_t ties               # candidates below whose key equals win's
    int32_t left               # how many of those are in the left half (they come first in member order)

# A tree of at most FLAT_TREE leaves may be flat (_ordering.pxi): then only its root and leaves are kept,
# and masks stand for the rest. Member i is bit i & 63 of mask word i >> 6. ``masks`` and ``counts`` lie in
# the tree's own block, right after it; a bigger tree, never flat, has none (NULL).
ctypedef struct pool_tree:
    int32_t size               # leaves: a power of two >= n
    int32_t n                  # members
    int32_t* slots             # member slots, in member order
    int64_t* next              # per member: the next leaf of the same slot (tree id << 32 | position), or -1
    order_node* nodes          # 2 * size; nodes[1] is the root, member i's leaf is nodes[size + i]
    uint64_t* masks            # while flat: words [0, words) the members in, [words, 2 words) the best
    uint16_t* counts           # while flat: the best per word, then per group of 16 words (none: one word)
    int32_t words              # the masks' words: size / 64 rounded up
    int32_t first              # while flat: the position of the first best member, -1 when none is in
    int32_t streak             # changes in a row that spoke for the other shape (see FLAT_TREE)
    uint8_t flat               # 1: flat (masks), 0: inner nodes


cdef class SnapshotKernel


# A scheduler's guard of its reservation state while a batch places jobs
# without the GIL (_gate.pxi). Both fields change only with the GIL held.
cdef class Gate:
    cdef PyThread_type_lock lock       # held by the batch for its pass without the GIL
    cdef bint busy                     # that pass is running
    cdef Py_ssize_t active             # entry points under way (a batch then keeps the GIL)
    cdef int wait(self) except -1
    cdef int begin_pass(self) except -1
    cdef void end_pass(self, bint free) noexcept


cdef class Ordering:
    cdef order_key* keys               # slot -> key as of the slot's last change
    cdef slot_brief* briefs            # slot -> brief, in step with the key (aligned to 32 bytes)
    cdef void* briefs_mem              # the allocation briefs lies in
    cdef uint8_t* evicted              # slot -> 1 once a decision found its heartbeat stale
    cdef Py_ssize_t n_slots
    cdef pool_tree** trees             # by tree id (stable while the tree's member list is)
    cdef Py_ssize_t n_trees
    cdef int32_t* pool_tree            # pool index of the current target -> tree id
    cdef Py_ssize_t n_pools
    cdef const node_rec* recs          # the current target's arrays
    cdef const node_load* loads
    cdef const int32_t* counts
    cdef const int32_t* pool_off
    cdef const int32_t* pool_members
    cdef double threshold
    cdef object target                 # keeps the target's arrays alive
    cdef Gate gate                     # the counts' gate (set by the kernel that attaches this ordering)
    cdef uint8_t** retired             # replaced evicted-flag arrays (freed at dealloc, see _resize)
    cdef Py_ssize_t n_retired
    cdef readonly uint64_t epoch       # bumped by every retarget; a kernel uses the trees only at its own
    cdef readonly bint ready           # the trees describe the current target
    cdef readonly double horizon       # latest heartbeat deadline of an evicted node
    cdef bint shared_slots             # some slot has leaves in two trees (overlapping manual pools)

    cdef order_key _key_of(self, Py_ssize_t s, slot_brief* b) noexcept nogil
    cdef int _key_update(self, Py_ssize_t s) noexcept nogil
    cdef int _count_update(self, Py_ssize_t s) noexcept nogil
    cdef void _refresh(self, Py_ssize_t s, int rel) noexcept nogil
    cdef void _rekey(self, Py_ssize_t s) noexcept nogil
    cdef void prefetch(self, Py_ssize_t slot) noexcept nogil
    cdef void on_count(self, Py_ssize_t slot) noexcept nogil
    cdef void on_load(self, Py_ssize_t slot) noexcept nogil
    cdef void evict(self, Py_ssize_t slot, double deadline) noexcept nogil
    cdef void suspend(self) noexcept nogil
    cdef Py_ssize_t leaf_in(self, Py_ssize_t slot, int32_t tree_id) noexcept nogil
    cdef int _resize(self, Py_ssize_t n) except -1
    cdef int32_t _new_tree_id(self, pool_tree* t) noexcept nogil
    cdef pool_tree* tree_of(self, Py_ssize_t pool) noexcept nogil
    cdef pool_tree* _tree_build(self, Py_ssize_t pool) noexcept nogil
    cdef pool_tree* _tree_checked(self, Py_ssize_t pool) except NULL
    cdef void _link(self, int32_t tree_id) noexcept nogil
    cdef void _drop_tree(self, int32_t tree_id) noexcept nogil
    cdef int _match_trees(self, const int32_t* pool_off, const int32_t* members, Py_ssize_t n_pools,
                          bint reuse) except -1
    cdef int retarget(self, SnapshotKernel k, const int32_t* changed, Py_ssize_t n_changed) except -1


cdef class Rng:
    cdef uint64_t seed
    cdef readonly uint64_t decisions   # decisions made so far; each one draws from its own stream
    cdef uint64_t next_stream(self) noexcept nogil


cdef class Counters:
    cdef int64_t values[16]


cdef class LoadTable:
    cdef readonly object array         # numpy array of LOAD_DTYPE, one record per slot
    cdef node_load* loads
    cdef Py_ssize_t n
    cdef readonly Ordering ordering    # notified of every update (None until a kernel attaches one)
    cdef Gate _gate(self)


cdef class SlotCounts:
    cdef readonly object array         # numpy int32, one in-flight count per slot
    cdef int32_t* counts
    cdef Py_ssize_t n
    cdef SlotCounts successor          # set once grown: every update goes there
    cdef readonly Ordering ordering    # notified of every count change (None until a kernel attaches one)
    cdef readonly Gate gate            # the scheduler's (shared with its successor)
    cdef object __weakref__
    cdef SlotCounts _live(self)
    cdef SlotCounts _live_for(self, Py_ssize_t slot)
    # C-level API for compiled callers (the job table): the slot is already
    # validated against len(); every change of a count goes through these two.
    cdef bint c_try_add(self, Py_ssize_t slot, int64_t limit, int64_t running) noexcept nogil
    cdef void c_add(self, Py_ssize_t slot, int32_t delta) noexcept nogil


cdef class SnapshotKernel:
    cdef const node_rec* recs
    cdef const node_load* loads
    cdef int32_t* inflight
    cdef const int32_t* pool_off
    cdef const int32_t* pool_members
    cdef const int32_t* pair_off
    cdef const int32_t* pair_pools
    cdef Py_ssize_t n_slots
    cdef Py_ssize_t n_pools
    cdef Py_ssize_t n_langs
    cdef double heartbeat_timeout
    cdef double threshold
    cdef Py_ssize_t nogil_min_pool
    cdef Rng rng
    cdef object refs                     # keeps every array above alive
    cdef list node_ids                   # slot -> node id (shared, append-only)
    cdef Ordering ordering               # the per-pool ordering of these arrays, or None
    cdef uint64_t ordering_epoch         # the ordering's epoch when this kernel retargeted it

    cdef Py_ssize_t _pair_key(self, Py_ssize_t src_id, Py_ssize_t tgt_id) except -2
    cdef int _check_pool(self, Py_ssize_t pool) except -1
    cdef int _attach(self, LoadTable loads, object inflight, object changed) except -1
    cdef int32_t scan_pool(self, Py_ssize_t pool, const request_t* req, uint64_t* state) noexcept nogil
    cdef int32_t _scan(self, Py_ssize_t pool, const request_t* req, uint64_t* state) noexcept
    cdef int32_t _choose(self, Py_ssize_t pool, const request_t* req, uint64_t* state) noexcept nogil
    cdef bint _ordered(self) noexcept nogil
    cdef bint _orders(self, const request_t* req) noexcept nogil
    cdef void _capacity(self, Py_ssize_t slot, int64_t* limit, int64_t* running) noexcept nogil
    cdef int32_t _choose_ordered(self, Py_ssize_t pool, const request_t* req, uint64_t* state,
                                 Ordering o) noexcept nogil
    cdef int32_t _choose_scan(self, Py_ssize_t pool, const request_t* req, uint64_t* state, Ordering o) noexcept
    cdef Py_ssize_t _collect_best(self, Py_ssize_t pool, const request_t* req, const uint8_t* evicted,
                                  Py_ssize_t n_evicted, const int32_t* rejected, Py_ssize_t n_rejected,
                                  int32_t* tied) noexcept nogil
    cdef int64_t _free(self, Py_ssize_t pool, const request_t* req) noexcept nogil
    cdef int64_t _select_pair(self, Py_ssize_t src_id, Py_ssize_t tgt_id, Py_ssize_t preferred, Py_ssize_t tenant,
                              uint64_t service_mask, int need, double now, object exclude) except? -3
    cdef bint _serves(self, Py_ssize_t key, Py_ssize_t pool) noexcept nogil
    cdef int64_t _select(self, Py_ssize_t key, Py_ssize_t bound, Py_ssize_t tenant, const request_t* req,
                         uint64_t* state) noexcept nogil
    cdef int64_t _select_new(self, Py_ssize_t key, Py_ssize_t bound, Py_ssize_t tenant, const request_t* req,
                             uint64_t* state) noexcept nogil
    cdef Gate _gate(self)
    cdef int32_t _most_free(self, Py_ssize_t key, const request_t* req) noexcept nogil


cdef class JobTable:
    cdef SlotCounts counts             # the in-flight counts a reservation adds to
    cdef dict index                    # job id -> handle, for ids that are not numbered (see below)
    cdef str prefix                    # numbered job ids are prefix + a canonical decimal (None: none are)
    cdef int32_t* by_seq               # ring: number & seq_mask -> handle of the live job with that number, or -1
    cdef Py_ssize_t seq_mask
    cdef dict seq_spill                # number -> handle, for a number whose ring entry another job holds
    cdef list job_ids                  # handle -> job id (None when free)
    cdef list session_ids              # handle -> session id (None when free)
    cdef list pairs                    # handle -> what the caller stored with the job ((src, tgt) for dispatch)
    # A batch files its jobs' session ids and pairs once for all of them, as a group, instead of one
    # list entry each (see _jobs.pxi): a job of group g has session id groups[g][0][at] and pair
    # groups[g][1][group_pairs[g][at]], and its session_ids / pairs entries stay None.
    cdef list groups                   # group -> (session ids, pairs, pair numbers as bytes), None when free
    cdef int32_t* group_live           # group -> its live jobs (the last one's release makes the group dead)
    cdef const int32_t** group_pairs   # group -> its jobs' pair numbers (the data of groups[g][2])
    cdef int32_t* spare_groups         # free group numbers (a stack)
    cdef int32_t* dead_groups          # groups whose last job went without the GIL: _reap frees them
    cdef Py_ssize_t n_groups, n_spare, n_dead
    cdef job_rec* recs                 # handle -> record
    cdef int32_t* heap                 # min-heap of live handles by (expires_at, order), those not in the ring
    cdef int32_t* fifo                 # ring of live handles by (expires_at, order): order & fifo_mask -> handle, or -1
    cdef Py_ssize_t fifo_mask
    cdef uint64_t fifo_head, fifo_end  # the ring's span of orders, [head, end): both ends hold a live handle
    cdef Py_ssize_t fifo_n             # live handles in the ring (0: an empty span)
    cdef int32_t* free_list            # free handles, next one on top
    cdef uint8_t* bound                # slot -> 1 while a live node owns it
    cdef Py_ssize_t cap, n_free, heap_n, n_bound
    cdef Py_ssize_t n_live, n_committed, n_expired
    cdef uint64_t n_set                # expiries set so far (the next job_rec.order)

    cdef int _grow_bound(self, Py_ssize_t n) except -1
    cdef int _grow_jobs(self) except -1
    cdef int _grow_to(self, Py_ssize_t total) except -1
    cdef void _sift_up(self, Py_ssize_t pos) noexcept nogil
    cdef void _heap_push(self, int32_t h) noexcept nogil
    cdef void _heap_remove(self, int32_t h) noexcept nogil
    cdef void _queue_push(self, int32_t h) noexcept nogil
    cdef void _queue_remove(self, int32_t h) noexcept nogil
    cdef int32_t _queue_first(self) noexcept nogil
    cdef bint _fifo_room(self, uint64_t order) noexcept nogil
    cdef void _fifo_pop_head(self) noexcept nogil
    cdef void _fifo_pop_tail(self) noexcept nogil
    cdef bint _fifo_tail_after(self, double expires_at) noexcept nogil
    cdef int64_t _seq_of(self, str job_id) noexcept
    cdef int32_t _find(self, str job_id, int64_t seq) except -2
    cdef int _claim(self, str job_id, int64_t seq, int32_t h) except -1
    cdef int _unclaim(self, int32_t h, object job_id) except -1
    cdef int _grow_ring(self, Py_ssize_t n) except -1
    cdef int number_ids(self, str prefix) except -1
    cdef int32_t _live(self, str job_id, double now) except -2
    cdef bint _owned(self, int32_t h, Py_ssize_t slot) noexcept
    cdef bint _drop(self, int32_t h) noexcept nogil
    cdef int _group_room(self) except -1
    cdef int32_t _new_group(self, tuple filed) noexcept
    cdef int _free_group(self, int32_t g) except -1
    cdef int _reap(self) except -1
    cdef object _session_of(self, int32_t h)
    cdef object _pair_of(self, int32_t h)
    cdef int _forget(self, int32_t h) except -1
    cdef void _commit(self, int32_t h, double expires_at) noexcept
    cdef void _expire_at(self, int32_t h, double expires_at) noexcept
    cdef double next_expiry_c(self) noexcept
    cdef int32_t c_reserve(self, str job_id, Py_ssize_t slot, int64_t limit, int64_t running, object pool_id,
                           str session_id, double expires_at, object pair) except -4
    cdef int32_t _reserve(self, str job_id, int64_t seq, Py_ssize_t slot, int64_t limit, int64_t running,
                          object pool_id, str session_id, double expires_at, object pair) except -4
    cdef bint c_commit(self, str job_id, Py_ssize_t slot, double expires_at, double now) except -1
    cdef bint c_release(self, str job_id, Py_ssize_t slot, double now) except -1
    cdef int32_t _of_handle(self, int64_t handle, double now) noexcept nogil
    cdef Py_ssize_t _release_pass(self, const int64_t* handles, Py_ssize_t n, double now,
                                  int32_t* released, Py_ssize_t* n_filed) noexcept nogil
    cdef int64_t c_claim(self, Py_ssize_t slot, int64_t limit, int64_t running, int64_t pool_id,
                         double expires_at) noexcept nogil
    cdef int64_t c_reserve_handle(self, Py_ssize_t slot, int64_t limit, int64_t running, int64_t pool_id,
                                  object session_id, double expires_at, object pair) except -4
    cdef Gate _gate(self)


cdef class Assignment:
    cdef readonly str node_id          # the node that runs the job
    cdef readonly object pool_id       # the pool that served it (int)
    cdef readonly str job_id
    cdef readonly str session_id
    cdef readonly str src              # normalised source code ("auto" for any)
    cdef readonly str tgt              # normalised target code


cdef class SessionState:
    cdef readonly object lock          # threading.Lock: the Python path decides the binding under it
    cdef public object binding         # ((src, tgt), pool_id) or None
    cdef public double last_used       # clock() time of the session's last dispatch
    # set while the Python path decides the binding (it holds ``lock`` from reading the binding to recording
    # its choice); a compiled dispatch that finds it set hands its job to the Python path, which waits
    cdef public bint deciding
    # set while a batch's pass has read the binding and not yet written it back (from numbering the session in
    # pass ``batch`` until the pass ends, or, if the pass bound it anew, until that binding is written back
    # after the pass): every other decision of the binding waits for it
    # to clear (public as ``deciding`` is: tests stand in for a batch with it). Next to ``deciding``: it takes
    # the padding before the next pointer, so the state is no bigger for it
    cdef public bint held
    # memo of the compiled calls: the pool index and pair key of ``seen_binding`` in snapshot ``seen_snap``
    cdef object seen_binding
    cdef object seen_pair              # seen_binding[0]: a memo hit reads no binding tuple
    cdef object seen_snap
    cdef Py_ssize_t seen_index         # -1: the bound pool is not in that snapshot
    cdef Py_ssize_t seen_key           # -1: no pool of that snapshot speaks the bound pair
    # the raw code objects of the last dispatch that asked for the bound pair (None: not known)
    cdef object seen_src
    cdef object seen_tgt
    # scratch of Dispatcher.batch: the session's number in batch ``batch`` (a batch holds the GIL)
    cdef uint64_t batch
    cdef Py_ssize_t batch_k
    # the id the Dispatcher's session index files it under (None: not filed)
    cdef str indexed_id


cdef class Dispatcher:
    cdef object mgmt                   # the ManagementRegistry: .snapshot is read once per call
    cdef Gate gate                     # the job table's (see _gate.pxi)
    cdef readonly uint64_t passes_without_gil  # batch placement passes that released the GIL
    cdef readonly uint64_t resolved_in_pass  # batch jobs whose session the pass itself resolved (_resolved_run)
    cdef Py_ssize_t pass_jobs          # jobs per placement pass of a batch (pass_size)
    cdef JobTable jobs
    cdef Counters outcomes
    cdef dict sessions                 # session id -> SessionState (shared with the SessionManager)
    cdef dict languages                # raw code -> normalised code (the language cache)
    cdef object clock
    cdef bint c_clock                  # clock is time.monotonic, read in C (_now)
    cdef str prefix                    # job id prefix
    cdef double ttl, session_ttl, lease
    cdef int64_t seq                   # job ids issued (shared with the Python path)
    cdef uint64_t batches              # batch passes run: each marks its sessions with its own number
    # the session index: the session table's states by their id's hash, open addressing (see _session_find)
    cdef session_entry* sindex
    cdef Py_ssize_t sindex_cap         # entries: 0 or a power of two, at least twice sindex_n
    cdef Py_ssize_t sindex_n
    cdef list sindex_held              # entry i's state at i (None where empty): the index's references
    cdef public int64_t default_mask   # the default services' mask; -1 until every one has a bit
    cdef public double next_sweep      # the session table's next sweep: the Python path runs it
    cdef object snap                   # the snapshot the cached fields below come from
    cdef SnapshotKernel kernel
    cdef dict lang_ids
    cdef dict codes                    # raw code -> (normalised code, language id) in this snapshot
    cdef object scratch_code           # keeps the last unmemoised entry alive
    cdef Py_ssize_t n_langs
    cdef tuple pool_ids
    cdef dict pool_index

    cdef object slow_dispatch, slow_release, slow_commit, no_node, default_services, normalize
    cdef dict slots                    # node id -> slot, the backend's (for node-checked release/commit)
    cdef object assignment_type        # the process's Assignment type (see connect)
    cdef bint own_assignment           # it is this module's: build it directly
    cdef double _now(self) except? -1.0
    cdef int _refresh(self, object snap) except -1
    cdef object _dispatch(self, object session_id, object src, object tgt)
    cdef Py_ssize_t _slot_of(self, object node_id) except -3
    cdef PyObject* _code(self, str code) except? NULL
    cdef PyObject* _code_checked(self, object code, str name, Py_ssize_t i) except NULL
    cdef int _seen(self, SessionState state, tuple binding, Py_ssize_t key) except -1
    cdef void _memo(self, SessionState state, tuple binding, Py_ssize_t index, Py_ssize_t key) noexcept
    cdef str _job_id(self, int64_t seq)
    cdef PyObject* _session_find(self, str session_id) except? NULL
    cdef PyObject* _session_at(self, PyObject* session_id, Py_hash_t h) noexcept nogil
    cdef Py_ssize_t _resolved_run(self, Py_ssize_t i, Py_ssize_t hi, PyObject** sids, PyObject* snap, double now,
                                  uint64_t mark, int32_t* session_of, int32_t* bound_key, int32_t* bound_index,
                                  PyObject** state_of, Py_ssize_t* n_sessions) noexcept nogil
    cdef int _session_file(self, str session_id, SessionState state) except -1
    cdef int _await_unheld(self, SessionState state) except -1
    cdef SessionState _state_of(self, object session_id, double now, list created)
    cdef int _release_sessions(self, list states, list created) except -1
    cdef void _session_put(self, Py_hash_t h, PyObject* state) noexcept
    cdef Py_ssize_t _batch(self, list session_ids, object src, object tgt, uint64_t service_mask, int need,
                           object tenant_pool, double now, int32_t[::1] out_slot, int64_t[::1] out_pool,
                           int64_t[::1] out_handle, int64_t[::1] out_key, Py_ssize_t start,
                           Py_ssize_t* done) except -1
    cdef Py_ssize_t _place(self, SnapshotKernel kernel, Py_ssize_t lo, Py_ssize_t hi, const int64_t* keys,
                           const int32_t* session_of, int32_t* bound_key, int32_t* bound_index, uint8_t* rebound,
                           const int64_t* pool_ids, Py_ssize_t tenant, request_t* req, double expires_at,
                           int32_t group, int32_t* out_slot, int64_t* out_pool, int64_t* out_handle) noexcept nogil
