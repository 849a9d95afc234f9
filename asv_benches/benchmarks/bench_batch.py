"""``Scheduler.dispatch_many``: a batch placed in one compiled pass, reservations made together."""

from __future__ import annotations

from .common import build_fleet, cached, sessions_for


def _fleet(n_nodes):
    sched, _, pairs = build_fleet(n_nodes)
    requests = sessions_for(pairs, 10_000)
    for a in sched.dispatch_many(requests):  # warm: bind every session
        sched.release(a.job_id)
    return sched, requests


class DispatchMany:
    """Assignments per second of 10,000-request batches (divide 10,000 by the time)."""

    params = [1000, 10000]
    param_names = ["nodes"]
    repeat = 10
    timeout = 600

    def setup(self, n_nodes):
        self.sched, self.requests = cached(("batch", n_nodes), lambda: _fleet(n_nodes))
        self.jobs = []

    def teardown(self, n_nodes):
        release = self.sched.release
        for a in self.jobs:
            release(a.job_id)
        self.jobs = []

    def time_dispatch_many_10k(self, n_nodes):
        self.jobs = self.sched.dispatch_many(self.requests)

    def time_dispatch_one_by_one_10k(self, n_nodes):
        dispatch = self.sched.dispatch
        self.jobs = [dispatch(sid, src, tgt) for sid, src, tgt in self.requests]
