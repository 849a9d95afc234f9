"""How dispatches end, and why a job found no node: the outcome counters and the reason tally.

Every dispatch ends in one *outcome*, counted in the kernel's ``Counters``
(``Scheduler.stats()["dispatch"]``): index 0 is ``"ok"``, the eligibility
reason codes 1-8 of :data:`pysched._layout.REASONS` keep their own index
(the best reason of a :class:`NoNodeAvailable`), then ``"no_pool"``,
``"no_nodes"`` and ``"backend_unavailable"``. The compiled dispatch counts
``"ok"`` (index 0) itself; every other outcome is counted here or by the
Python paths with these indices.

A job no node can take is explained by a *tally*: the reason code of every
distinct node of every pool serving the pair (:func:`node_reasons`), counted
per reason, and the *best* reason, the most frequent one
(:func:`best_reason`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from pysched._layout import REASONS
from pysched.errors import NoNodeAvailable

if TYPE_CHECKING:
    from pysched._core import Counters, SnapshotKernel

__all__ = [
    "OUTCOME_BACKEND_UNAVAILABLE",
    "OUTCOME_NAMES",
    "OUTCOME_NO_NODES",
    "OUTCOME_NO_POOL",
    "OUTCOME_OK",
    "REASON_INDEX",
    "best_reason",
    "no_node_error",
    "node_reasons",
    "outcome_counts",
    "reason_outcome",
    "tally",
]

#: outcome counter of a placed job
OUTCOME_OK = 0
#: outcome counter of a pair no pool serves (:class:`pysched.NoPoolForLanguagePair`)
OUTCOME_NO_POOL = 9
#: outcome counter of a :class:`NoNodeAvailable` whose best reason is no eligibility reason
OUTCOME_NO_NODES = 10
#: outcome counter of a :class:`pysched.ReservationBackendUnavailable`
OUTCOME_BACKEND_UNAVAILABLE = 11

#: outcome counter index -> its name in ``stats()["dispatch"]``
OUTCOME_NAMES: dict[int, str] = {
    OUTCOME_OK: "ok",
    **{i: REASONS[i] for i in range(1, len(REASONS))},
    OUTCOME_NO_POOL: "no_pool",
    OUTCOME_NO_NODES: "no_nodes",
    OUTCOME_BACKEND_UNAVAILABLE: "backend_unavailable",
}

#: no backend refusals (:func:`node_reasons`' default; a plain dict: ``get`` on it is the cheapest)
_NO_REFUSALS: Mapping[int, str] = {}

#: eligibility reason name -> its code (its index in ``REASONS``)
REASON_INDEX: dict[str, int] = {name: i for i, name in enumerate(REASONS)}


def reason_outcome(reason: str) -> int:
    """The outcome counter of a :class:`NoNodeAvailable` whose best reason is ``reason``.

    :param reason: an eligibility reason name, or a backend's refusal reason
        (counted as ``"no_nodes"``).
    """
    return REASON_INDEX.get(reason, OUTCOME_NO_NODES)


def outcome_counts(outcomes: Counters) -> dict[str, int]:
    """Outcome name -> how many dispatches ended so, in counter order (``stats()["dispatch"]``).

    :param outcomes: the scheduler's outcome counters.
    """
    values = outcomes.to_list()
    return {name: values[i] for i, name in sorted(OUTCOME_NAMES.items())}


def tally(reasons: Iterable[str]) -> dict[str, int]:
    """Reason code -> how many nodes have it, in first-seen order.

    :param reasons: one reason code per node.
    """
    out: dict[str, int] = {}
    for reason in reasons:
        out[reason] = out.get(reason, 0) + 1
    return out


def best_reason(reasons: Mapping[int, str]) -> tuple[dict[str, int], str]:
    """``(breakdown, best reason)`` of per-node reasons, as :class:`NoNodeAvailable` reports them.

    The best is the most frequent reason; ties go to the earliest check in
    eligibility order. ``"ok"`` (capacity that came back during the call)
    never "wins"; with no blocking reason at all it is ``"no_nodes"``.

    :param reasons: slot -> reason code, as :func:`node_reasons` gives them.
    """
    breakdown = tally(reasons.values())
    blocking = [r for r in breakdown if r != "ok"]
    if not blocking:
        return breakdown, "no_nodes"
    return breakdown, min(blocking, key=lambda r: (-breakdown[r], REASON_INDEX.get(r, len(REASONS))))


def node_reasons(
    kernel: SnapshotKernel,
    src_id: int,
    tgt_id: int,
    mask: int,
    need: int,
    now: float,
    *,
    excl: Sequence[int] = (),
    refused: Mapping[int, str] = _NO_REFUSALS,
) -> dict[int, str]:
    """Slot -> reason code over every distinct node of every pool serving the pair.

    :param kernel: the snapshot's kernel.
    :param src_id: the pair's source language id (``n_langs`` for ``"auto"``).
    :param tgt_id: the pair's target language id.
    :param mask: the job's required-service bits.
    :param need: the job's need bits (``pysched._layout.NEED_*``).
    :param now: the scheduler's clock reading.
    :param excl: slots the job excludes.
    :param refused: slot -> the reservation backend's refusal reason, which
        replaces the kernel's reason for that node.
    """
    out: dict[int, str] = {}
    for pool_index in kernel.pools_for(src_id, tgt_id):
        codes = kernel.reasons(pool_index, mask, need, now, excl)
        # one code per member by construction; strict=True would cost a check per node
        for slot, code in zip(kernel.members(pool_index), codes, strict=False):
            if slot not in out:
                out[slot] = refused.get(slot) or REASONS[code]
    return out


def no_node_error(outcomes: Counters, src: str, tgt: str, reasons: Mapping[int, str]) -> NoNodeAvailable:
    """The :class:`NoNodeAvailable` for these per-node reasons; counts its outcome.

    :param outcomes: the scheduler's outcome counters.
    :param src: the normalised source code.
    :param tgt: the normalised target code.
    :param reasons: slot -> reason code (:func:`node_reasons`).
    """
    breakdown, best = best_reason(reasons)
    outcomes.add(reason_outcome(best))
    return NoNodeAvailable(src, tgt, breakdown, best)
