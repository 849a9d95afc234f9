"""Exceptions raised by pysched's public API.

Bad arguments raise the built-in ``ValueError`` / ``TypeError`` with a
message naming the argument and the offending value; a failed call never
changes any state.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "SchedulerError",
    "NoPoolForLanguagePair",
    "NoNodeAvailable",
    "UnknownNode",
    "UnknownJob",
    "WrongNode",
    "ReservationBackendUnavailable",
]


class SchedulerError(Exception):
    """Base class of pysched's dispatch errors."""


class NoPoolForLanguagePair(SchedulerError, LookupError):
    """No pool serves the requested (source, target) language pair.

    :param src: the source language code, as normalised.
    :param tgt: the target language code, as normalised.
    """

    def __init__(self, src: str, tgt: str) -> None:
        super().__init__(f"no pool serves the language pair {src!r} -> {tgt!r}")
        self.src = src
        self.tgt = tgt


class NoNodeAvailable(SchedulerError, LookupError):
    """Pools serve the pair, but no node in them can take the job now.

    :param src: the source language code, as normalised.
    :param tgt: the target language code, as normalised.
    :param breakdown: reason code (``"offline"``, ``"full"``, ...) -> the
        number of distinct candidate nodes, over every eligible pool, that
        failed with that reason (kept as a copy in ``breakdown``).
    :param best_reason: the most frequent reason (the earliest in eligibility
        order on ties, ``"no_nodes"`` when the pools are empty).
    """

    def __init__(self, src: str, tgt: str, breakdown: Mapping[str, int], best_reason: str) -> None:
        parts = ", ".join(f"{k}={v}" for k, v in breakdown.items()) or "no candidate nodes"
        super().__init__(f"no node available for {src!r} -> {tgt!r} ({best_reason}: {parts})")
        self.src = src
        self.tgt = tgt
        self.breakdown = dict(breakdown)
        self.best_reason = best_reason


class UnknownNode(SchedulerError, KeyError):
    """The node id is not registered.

    :param node_id: the id asked for (whatever was passed).
    """

    def __init__(self, node_id: object) -> None:
        super().__init__(node_id)
        self.node_id = node_id

    def __str__(self) -> str:
        return f"unknown node {self.node_id!r}"


class UnknownJob(SchedulerError, KeyError):
    """The job id holds no reservation (never dispatched, released or expired).

    :param job_id: the id asked for (whatever was passed).
    """

    def __init__(self, job_id: object) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"unknown job {self.job_id!r}"


class WrongNode(UnknownJob):
    """The job holds a reservation, but on another node than the one named.

    Raised by :meth:`Scheduler.commit` (and :meth:`Scheduler.renew`) given
    ``node_id``: a late report from a node the job has moved away from (after
    a failover) must not touch the new node's job. Nothing is changed. It is
    an :class:`UnknownJob` (the job is unknown *on that node*).

    :param job_id: the job asked for.
    :param node_id: the node the caller named.
    :param holder: the node that holds the job.
    """

    def __init__(self, job_id: object, node_id: object, holder: object) -> None:
        super().__init__(job_id)
        self.node_id = node_id
        self.holder = holder

    def __str__(self) -> str:
        return f"job {self.job_id!r} is held on node {self.holder!r}, not on {self.node_id!r}"


class ReservationBackendUnavailable(SchedulerError, ConnectionError):
    """The shared reservation backend (Redis) could not be reached in time.

    Nothing was reserved and no local state changed; the call may be retried.
    """
