"""What the scheduler answers: assignments, explanations, batch results, and the requests they answer.

:class:`Assignment` (one placed job) is made by the kernel; the rest are
plain Python records. Everything here is importable from :mod:`pysched`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

from pysched._impl import kernel as _default_kernel
from pysched._layout import REASONS
from pysched._outcomes import tally
from pysched.languages import DEFAULT_SERVICES

__all__ = [
    "Assignment",
    "BATCH_REASONS",
    "BATCH_REASON_CODES",
    "BatchResult",
    "DispatchRequest",
    "Explanation",
    "Request",
]

#: Where a job goes: ``node_id`` in ``pool_id``, under ``job_id`` (also ``session_id``,
#: ``src``, ``tgt``). One type per process, made by the compiled kernel when it is
#: built (the compiled dispatch creates it directly), else by the pure-Python twin.
Assignment = _default_kernel.Assignment


@dataclass(frozen=True)
class Explanation:
    """Why each node could or could not take a job for a language pair.

    :ivar src: the normalised source code (``"auto"`` for any source).
    :ivar tgt: the normalised target code.
    :ivar pools: the eligible pool ids, in dispatch order.
    :ivar nodes: every distinct node of those pools -> its reason code
        (``"ok"`` when it is eligible), plus ``"no_pool"`` for nodes that
        speak the pair but could not get a pool.
    :ivar unpooled: every node without a pool.
    :ivar preferred: with ``explain(..., prefer=)``, each preferred node, in
        order, -> what a new session's dispatch would make of it: ``"ok"``
        (it is chosen; later ones are not listed), its reason code,
        ``"not_in_pool"``, ``"load"`` (eligible, but loaded more than
        ``prefer_slack`` above the best candidate) or ``"unknown"``.
    """

    src: str
    tgt: str
    pools: tuple[int, ...]
    nodes: dict[str, str] = field(default_factory=dict)
    unpooled: tuple[str, ...] = ()
    preferred: dict[str, str] = field(default_factory=dict)

    @property
    def breakdown(self) -> dict[str, int]:
        """Reason -> number of nodes."""
        return tally(self.nodes.values())


@dataclass(frozen=True)
class DispatchRequest:
    """A validated request, as :meth:`Scheduler.dispatch_many` sees it.

    :ivar session_id: the session the job belongs to.
    :ivar src: the source language code (``"auto"`` for any source).
    :ivar tgt: the target language code.
    :ivar job_id: the caller's job id (a retry answers with what it holds).
    :ivar exclude: node ids the job must not go to.
    :ivar tenant: the job's tenant; ``None`` for a public job.
    :ivar services: the services the node must run.
    """

    session_id: str
    src: str
    tgt: str
    job_id: str | None = None
    exclude: tuple[str, ...] = ()
    tenant: str | None = None
    services: tuple[str, ...] = DEFAULT_SERVICES


#: one request of :meth:`Scheduler.dispatch_many`: ``(session_id, src, tgt)``, a mapping
#: with the keywords of :meth:`Scheduler.dispatch`, or a :class:`DispatchRequest`
Request: TypeAlias = tuple[str, str, str] | Mapping[str, object] | DispatchRequest

#: reason codes of :attr:`BatchResult.reason`: 0 is "ok", 1-8 the eligibility reasons in order,
#: then "no_pool" and "no_nodes" (pools serve the pair but hold no node)
BATCH_REASONS: tuple[str, ...] = (*REASONS, "no_pool", "no_nodes")

#: reason name -> its code in :attr:`BatchResult.reason`
BATCH_REASON_CODES: dict[str, int] = {name: i for i, name in enumerate(BATCH_REASONS)}


class BatchResult:
    """What :meth:`Scheduler.dispatch_batch` placed, one entry per job, as numpy arrays.

    :ivar slot: the node's slot (``int32``, -1 where the job was not placed);
        :meth:`node_ids` turns them into node ids.
    :ivar pool_id: the pool that served each job (``int64``, -1 where none).
    :ivar handle: each placed job's integer handle (``int64``, -1 where none):
        :meth:`Scheduler.release_batch`, :meth:`Scheduler.commit_batch`,
        and :meth:`Scheduler.release`/:meth:`Scheduler.commit` one by one, take it.
    :ivar reason: ``uint8`` code per job, 0 where placed, else its
        :data:`BATCH_REASONS` index: the reason a one-by-one dispatch's
        :class:`NoNodeAvailable` would give as ``best_reason``, or ``no_pool``.
    """

    __slots__ = ("_node_ids", "handle", "pool_id", "reason", "slot")

    def __init__(self, slot: np.ndarray, pool_id: np.ndarray, handle: np.ndarray, reason: np.ndarray,
                 node_ids: list[str]) -> None:
        self.slot = slot
        self.pool_id = pool_id
        self.handle = handle
        self.reason = reason
        self._node_ids = node_ids

    def __len__(self) -> int:
        return len(self.slot)

    @property
    def ok(self) -> np.ndarray:
        """Where each job was placed (bool array)."""
        placed: np.ndarray = self.reason == 0
        return placed

    @property
    def placed(self) -> int:
        """How many jobs were placed."""
        return int(np.count_nonzero(self.reason == 0))

    def node_ids(self) -> list[str | None]:
        """The node id of each job (``None`` where it was not placed)."""
        names = self._node_ids
        return [names[s] if s >= 0 else None for s in self.slot.tolist()]

    def reasons(self) -> list[str]:
        """The reason name of each job (``"ok"`` where placed)."""
        return [BATCH_REASONS[r] for r in self.reason.tolist()]

    def __repr__(self) -> str:
        return f"<BatchResult jobs={len(self)} placed={self.placed}>"
