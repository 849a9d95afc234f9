"""The immutable runtime snapshot that dispatch reads without a lock.

The management layer builds a new :class:`RuntimeSnapshot` for every
structural change (registration, status, services, languages, pools,
removal) and publishes it with one reference assignment. Load figures
(running jobs, cpu/gpu/mem, heartbeat time) and in-flight reservation
counts are *not* part of the copy: they live in per-slot arrays written in
place, which every snapshot of the same capacity shares, so a heartbeat
never rebuilds anything and a dead node drops out of dispatch by its
heartbeat age alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pysched._layout import STATUS_ABSENT
from pysched.language_index import PoolLanguageIndex

__all__ = ["RuntimeSnapshot", "PoolMeta"]


@dataclass(frozen=True)
class PoolMeta:
    """What a snapshot knows of one pool."""

    pool_id: int
    name: str
    languages: frozenset[str]
    required_services: frozenset[str]
    auto: bool


class RuntimeSnapshot:
    """One published, immutable view of the fleet.

    Attributes:
        version: increases by one with every publication.
        nodes: node records by slot (``pysched._layout.NODE_DTYPE``), read-only.
        loads: the live load figures by slot (``LOAD_DTYPE``), a read-only view
            of memory heartbeats update in place.
        inflight: the live in-flight reservation counts by slot, read-only view.
        pool_ids: pool id of each pool index, in index order.
        pool_offsets, pool_members: pool membership in CSR form (slots), read-only.
        index: the :class:`PoolLanguageIndex` of these pools.
        pools: pool id -> :class:`PoolMeta`.
        unpooled: node ids that could not get a pool (auto mode, ``max_pools`` reached),
            with their language sets.
        kernel: the compiled kernel bound to these arrays.
    """

    __slots__ = ("version", "nodes", "loads", "inflight", "pool_ids", "pool_index", "pool_offsets",
                 "pool_members", "index", "pools", "unpooled", "kernel", "_node_ids", "_slot_of", "__weakref__")

    def __init__(
        self,
        version: int,
        recs: np.ndarray,
        loads: np.ndarray,
        inflight: np.ndarray,
        pool_offsets: np.ndarray,
        pool_members: np.ndarray,
        index: PoolLanguageIndex,
        pools: Mapping[int, PoolMeta],
        unpooled: tuple[tuple[str, frozenset[str]], ...],
        kernel: Any,
        node_ids: list,
        slot_of: Mapping[str, int],
    ) -> None:
        self.version = version
        self.nodes = _read_only(recs)
        self.loads = _read_only(loads)
        self.inflight = _read_only(inflight)
        self.pool_offsets = _read_only(pool_offsets)
        self.pool_members = _read_only(pool_members)
        self.index = index
        self.pool_ids = index.pool_ids
        self.pool_index = {pid: i for i, pid in enumerate(index.pool_ids)}
        self.pools = pools
        self.unpooled = unpooled
        self.kernel = kernel
        # slot -> node id and node id -> slot; both only ever grow (a slot belongs
        # to one node id for the scheduler's life), so sharing them is safe.
        self._node_ids = node_ids
        self._slot_of = slot_of

    def node_id(self, slot: int) -> str:
        """The node id that owns ``slot``."""
        return self._node_ids[slot]

    def slot(self, node_id: str) -> int | None:
        """The slot of a node live in this snapshot, else ``None``."""
        slot = self._slot_of.get(node_id)
        if slot is None or slot >= len(self.nodes) or self.nodes[slot]["status"] == STATUS_ABSENT:
            return None
        return slot

    def members(self, pool_id: int) -> tuple[str, ...]:
        """Node ids of one pool, in member (slot) order."""
        i = self.pool_index[pool_id]
        return tuple(self._node_ids[s] for s in self.pool_members[self.pool_offsets[i]: self.pool_offsets[i + 1]])

    def __repr__(self) -> str:
        live = int(np.count_nonzero(self.nodes["status"] != STATUS_ABSENT))
        return f"<RuntimeSnapshot version={self.version} nodes={live} pools={len(self.pool_ids)}>"


def _read_only(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view
