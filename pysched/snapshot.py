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
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from numpy.typing import NDArray

from pysched._layout import STATUS_ABSENT
from pysched.language_index import PoolLanguageIndex

if TYPE_CHECKING:
    from pysched import _core

__all__ = ["RuntimeSnapshot", "PoolMeta"]


@dataclass(frozen=True)
class PoolMeta:
    """What a snapshot knows of one pool.

    :param pool_id: the pool id.
    :param name: the pool's name.
    :param languages: its language codes.
    :param required_services: services every member must run.
    :param auto: an automatic language-set pool (else a configured one).
    """

    pool_id: int
    name: str
    languages: frozenset[str]
    required_services: frozenset[str]
    auto: bool


class RuntimeSnapshot:
    """One published, immutable view of the fleet.

    Built only by the management layer, once per publication.

    :ivar version: increases by one with every publication.
    :ivar nodes: node records by slot (``pysched._layout.NODE_DTYPE``), read-only.
    :ivar loads: the live load figures by slot (``LOAD_DTYPE``), a read-only view
        of memory heartbeats update in place.
    :ivar inflight: the live in-flight reservation counts by slot, read-only view.
    :ivar pool_ids: the pool id at each pool index, in index order.
    :ivar pool_index: pool id -> pool index (the inverse of ``pool_ids``).
    :ivar pool_offsets: pool membership in CSR form: the members of pool index
        ``i`` are ``pool_members[pool_offsets[i]:pool_offsets[i + 1]]``, read-only.
    :ivar pool_members: the members' slots, pool index after pool index, read-only.
    :ivar index: the :class:`PoolLanguageIndex` of these pools.
    :ivar pools: pool id -> :class:`PoolMeta`.
    :ivar unpooled: node ids that could not get a pool (auto mode, ``max_pools``
        reached), with their language sets.
    :ivar kernel: the kernel's ``SnapshotKernel`` bound to these arrays.
    """

    __slots__ = ("version", "nodes", "loads", "inflight", "pool_ids", "pool_index", "pool_offsets",
                 "pool_members", "index", "pools", "unpooled", "kernel", "_node_ids", "_slot_of", "__weakref__")

    def __init__(  # noqa: PLR0917  one argument per published field, passed by its one caller in that order
        self,
        version: int,
        recs: NDArray[np.void],
        loads: NDArray[np.void],
        inflight: NDArray[np.int32],
        pool_offsets: NDArray[np.int32],
        pool_members: NDArray[np.int32],
        index: PoolLanguageIndex,
        pools: Mapping[int, PoolMeta],
        unpooled: tuple[tuple[str, frozenset[str]], ...],
        kernel: _core.SnapshotKernel,
        node_ids: list[str],
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
        """Node ids of one pool, in member (slot) order.

        :param pool_id: a pool id of this snapshot (``KeyError`` otherwise).
        """
        pool_index = self.pool_index[pool_id]
        members = self.pool_members[self.pool_offsets[pool_index]: self.pool_offsets[pool_index + 1]]
        return tuple(self._node_ids[s] for s in members)

    def __repr__(self) -> str:
        live = int(np.count_nonzero(self.nodes["status"] != STATUS_ABSENT))
        return f"<RuntimeSnapshot version={self.version} nodes={live} pools={len(self.pool_ids)}>"


_Scalar = TypeVar("_Scalar", bound=np.generic)


def _read_only(arr: NDArray[_Scalar]) -> NDArray[_Scalar]:
    """A read-only view: the snapshot's readers cannot write the arrays it shares."""
    view: NDArray[_Scalar] = arr.view()
    view.flags.writeable = False
    return view
