"""``Scheduler.dispatch`` end to end (validation, session lock, kernel, reservation).

``time_dispatch_release`` makes ``INNER`` (1,000) dispatch+release pairs per
sample and ``time_dispatch`` 1,000 dispatches: divide by 1,000 for one.
"""

from __future__ import annotations

from .common import INNER, build_fleet, cached, sessions_for


def _fleet(n_nodes):
    sched, _, pairs = build_fleet(n_nodes)
    requests = sessions_for(pairs, 10_000)
    for sid, src, tgt in requests:  # warm: every session bound once
        sched.release(sched.dispatch(sid, src, tgt).job_id)
    return sched, requests


class Dispatch:
    """1,000 nodes or 10,000 nodes in 50 pools, 10,000 bound sessions."""

    params = [1000, 10000]
    param_names = ["nodes"]
    timeout = 300
    number = 1  # one timed call per setup/teardown: the jobs a sample holds are released before the next

    def setup(self, n_nodes):
        self.sched, self.requests = cached(("dispatch", n_nodes), lambda: _fleet(n_nodes))
        self.jobs = []

    def teardown(self, n_nodes):
        release = self.sched.release
        for job in self.jobs:
            release(job)

    def time_dispatch_release(self, n_nodes):
        dispatch, release = self.sched.dispatch, self.sched.release
        for sid, src, tgt in self.requests[:INNER]:
            release(dispatch(sid, src, tgt).job_id)

    def time_dispatch(self, n_nodes):
        dispatch = self.sched.dispatch
        self.jobs = [dispatch(sid, src, tgt).job_id for sid, src, tgt in self.requests[INNER: 2 * INNER]]


class DispatchPythonPath:
    """``dispatch`` with an ``exclude`` list: the rules in Python (``Scheduler._place``), not the one call.

    The path every job of Redis mode takes, and any job with ``exclude``,
    ``tenant``, ``prefer`` or a ``job_id``: the session's lock held while its
    binding is read, a pool chosen and recorded, then the reservation.
    1,000 nodes in 50 pools, 10,000 bound sessions; ``INNER`` (1,000)
    dispatch+release pairs per sample.
    """

    timeout = 300
    number = 1

    def setup(self):
        self.sched, self.requests = cached(("dispatch", 1000), lambda: _fleet(1000))

    def time_dispatch_release(self):
        dispatch, release = self.sched.dispatch, self.sched.release
        exclude = ["no-such-node"]
        for sid, src, tgt in self.requests[:INNER]:
            release(dispatch(sid, src, tgt, exclude=exclude).job_id)
