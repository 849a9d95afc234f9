# cython: language_level=3
"""C-level declarations of pysched's compiled kernel.

The node record and the load record are declared here exactly once; the
numpy dtypes used by the management layer are derived from these structs
(``_core.NODE_DTYPE`` / ``_core.LOAD_DTYPE``) and their item sizes are
checked against ``sizeof`` at import.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


# One record per node slot, immutable once a snapshot is published.
ctypedef struct node_rec:
    uint64_t service_mask      # bit i set: the node runs service i (ids from the scheduler's service registry)
    uint32_t max_concurrency   # jobs the node may hold at once (>= 1 for a live node)
    uint8_t status             # STATUS_* code; STATUS_ABSENT for a slot without a live node
    uint8_t flags              # FLAG_HAS_GPU | FLAG_PUBLIC
    uint16_t pad_              # explicit padding, always zero (keeps the layout identical to numpy's)


# One record per node slot, written in place by heartbeats (never copied).
ctypedef struct node_load:
    double last_heartbeat      # clock() time of the last heartbeat (or registration)
    float cpu                  # cpu use in percent [0, 100]
    float gpu                  # gpu use in percent [0, 100]
    float mem                  # memory use in percent [0, 100]
    int32_t running            # jobs the node itself reported running


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


# The per-request parameters every kernel entry point shares.
ctypedef struct request_t:
    uint64_t service_mask      # services the job needs
    int need                   # NEED_* bits
    double now                 # clock() time of the decision
    const int32_t* exclude     # slots the caller excluded (sorted not required)
    Py_ssize_t n_exclude
    const int32_t* inflight    # in-flight counts to score with: the live array, or a batch's scratch copy


cdef class Rng:
    cdef uint64_t seed
    cdef readonly uint64_t decisions   # decisions made so far; each one draws from its own stream
    cdef uint64_t next_stream(self) noexcept


cdef class Counters:
    cdef int64_t values[16]


cdef class LoadTable:
    cdef readonly object array         # numpy array of LOAD_DTYPE, one record per slot
    cdef node_load* loads
    cdef Py_ssize_t n


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
    cdef float threshold
    cdef Py_ssize_t nogil_min_pool
    cdef Rng rng
    cdef object refs                     # keeps every array above alive
    cdef list node_ids                   # slot -> node id (shared, append-only)

    cdef Py_ssize_t _pair_key(self, Py_ssize_t src_id, Py_ssize_t tgt_id) except -2
    cdef int _check_pool(self, Py_ssize_t pool) except -1
    cdef int32_t scan_pool(self, Py_ssize_t pool, const request_t* req, uint64_t* state) noexcept nogil
    cdef int32_t _scan(self, Py_ssize_t pool, const request_t* req, uint64_t* state) noexcept
    cdef int64_t _free(self, Py_ssize_t pool, const request_t* req) noexcept nogil
    cdef int64_t _select_pair(self, Py_ssize_t src_id, Py_ssize_t tgt_id, Py_ssize_t preferred,
                              uint64_t service_mask, int need, double now, object exclude) except? -3
    cdef int64_t _select(self, Py_ssize_t key, Py_ssize_t preferred, const request_t* req, uint64_t* state) noexcept
    cdef int32_t _most_free(self, Py_ssize_t key, const request_t* req) noexcept nogil
