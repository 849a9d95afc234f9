"""Layouts and codes shared by the compiled kernel and its pure-Python twin.

The C structs in ``_core.pxd`` are the source of truth; ``_core`` checks at
import that the dtypes below match them byte for byte.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

#: one record per node slot, immutable once published (``node_rec`` in _core.pxd)
NODE_DTYPE = np.dtype(
    [("service_mask", "<u8"), ("max_concurrency", "<u4"), ("status", "u1"), ("flags", "u1"), ("pad_", "<u2")]
)
#: one record per node slot, written in place by heartbeats (``node_load``); the figures are
#: float64 so that a node's cpu/gpu/mem are kept, compared and returned exactly as given
LOAD_DTYPE = np.dtype(
    [("last_heartbeat", "<f8"), ("cpu", "<f8"), ("gpu", "<f8"), ("mem", "<f8"), ("running", "<i4"),
     ("pad_", "<i4")]
)

STATUS_READY = 0
STATUS_REGISTERING = 1
STATUS_DEGRADED = 2
STATUS_DRAINING = 3
STATUS_OFFLINE = 4
STATUS_ABSENT = 5
STATUS_CODES = {
    "ready": STATUS_READY,
    "registering": STATUS_REGISTERING,
    "degraded": STATUS_DEGRADED,
    "draining": STATUS_DRAINING,
    "offline": STATUS_OFFLINE,
    "absent": STATUS_ABSENT,
}

FLAG_HAS_GPU = 1
FLAG_PUBLIC = 2

NEED_GPU = 1
NEED_PUBLIC = 2
NEED_UNKNOWN_SERVICE = 4

#: reason codes, in eligibility order: a node's reason is its first failing check
REASONS = (
    "ok",
    "offline",
    "not_ready",
    "no_gpu",
    "not_public",
    "missing_service",
    "excluded",
    "full",
    "overloaded",
)
R_OK, R_OFFLINE, R_NOT_READY, R_NO_GPU, R_NOT_PUBLIC, R_MISSING_SERVICE, R_EXCLUDED, R_FULL, R_OVERLOADED = range(9)

#: draws a decision makes among a pool's best-ordered candidates before it falls back to
#: scanning the eligible nodes (see ``SnapshotKernel`` in _core.pyx, "How a node is chosen")
ORDER_DRAWS = 16

MASK64 = 0xFFFFFFFFFFFFFFFF
GOLDEN = 0x9E3779B97F4A7C15


def _check_array(arr: object, dtype: np.dtype[Any], name: str) -> None:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {arr.dtype}")
    if arr.ndim != 1 or not arr.flags.c_contiguous or not arr.flags.aligned:
        raise ValueError(f"{name} must be a one-dimensional, aligned, C-contiguous array")


def check_record_arrays(recs: NDArray[np.void], n_loads: int, inflight: NDArray[np.int32], min_slots: int = 0) -> None:
    """Check the per-slot arrays: node records, and load/in-flight tables covering them.

    :param recs: node records (:data:`NODE_DTYPE`).
    :param n_loads: slots the load table covers.
    :param inflight: in-flight counts by slot (``int32``).
    :param min_slots: slots the pool membership refers to (``recs`` must cover them).
    :raises TypeError: an array of the wrong type or dtype.
    :raises ValueError: an array of the wrong shape or length.
    """
    _check_array(recs, NODE_DTYPE, "recs")
    _check_array(inflight, np.dtype(np.int32), "inflight")
    if len(recs) < min_slots:
        raise ValueError(f"recs has {len(recs)} slots, fewer than the {min_slots} the pools refer to")
    if n_loads < len(recs) or len(inflight) < len(recs):
        raise ValueError("loads and inflight must cover every slot of recs")


def validate_kernel_arrays(  # noqa: PLR0917  the SnapshotKernel constructors of both kernels pass these in order
    recs: NDArray[np.void],
    n_loads: int,
    inflight: NDArray[np.int32],
    pool_off: NDArray[np.int32],
    pool_members: NDArray[np.int32],
    pair_off: NDArray[np.int32],
    pair_pools: NDArray[np.int32],
    n_langs: int,
    heartbeat_timeout: float,
) -> None:
    """Check once, at the boundary, everything the kernel will trust blindly.

    :param recs: node records (:data:`NODE_DTYPE`), one per slot.
    :param n_loads: slots the load table covers.
    :param inflight: in-flight counts by slot.
    :param pool_off: pool membership offsets by pool index (CSR, ``n_pools + 1`` entries).
    :param pool_members: the members' slots, pool after pool.
    :param pair_off: pair-key offsets into ``pair_pools`` (``(n_langs + 1) * n_langs + 1`` entries).
    :param pair_pools: the pool indices serving each pair key.
    :param n_langs: distinct languages in the index.
    :param heartbeat_timeout: seconds without a heartbeat before a node counts as offline.
    :raises TypeError: an array of the wrong type or dtype.
    :raises ValueError: inconsistent arrays, or a timeout that is not positive.
    """
    check_record_arrays(recs, n_loads, inflight)
    for arr, name in ((pool_off, "pool_off"), (pool_members, "pool_members"), (pair_off, "pair_off"),
                      (pair_pools, "pair_pools")):
        _check_array(arr, np.dtype(np.int32), name)
    n_slots = len(recs)
    if len(pool_off) < 1 or pool_off[0] != 0 or pool_off[len(pool_off) - 1] != len(pool_members):
        raise ValueError("pool_off must start at 0 and end at len(pool_members)")
    if np.any(np.diff(pool_off) < 0):
        raise ValueError("pool_off must be non-decreasing")
    if len(pool_members) and (pool_members.min() < 0 or pool_members.max() >= n_slots):
        raise ValueError("pool_members holds a slot outside recs")
    if n_langs < 0 or len(pair_off) != (n_langs + 1) * n_langs + 1:
        raise ValueError(f"pair_off must have (n_langs+1)*n_langs+1 entries for n_langs={n_langs}")
    if pair_off[0] != 0 or pair_off[len(pair_off) - 1] != len(pair_pools) or np.any(np.diff(pair_off) < 0):
        raise ValueError("pair_off must be non-decreasing from 0 to len(pair_pools)")
    if len(pair_pools) and (pair_pools.min() < 0 or pair_pools.max() >= len(pool_off) - 1):
        raise ValueError("pair_pools holds a pool index outside pool_off")
    if not heartbeat_timeout > 0:
        raise ValueError(f"heartbeat_timeout must be > 0, got {heartbeat_timeout!r}")
