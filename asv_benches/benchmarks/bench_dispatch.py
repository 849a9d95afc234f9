"""``Scheduler.dispatch`` end to end (validation, session lock, kernel, reservation)."""

from __future__ import annotations

from .common import build_fleet, sessions_for


class Dispatch:
    """dispatch + release at 1,000 and 10,000 nodes (50 pools), 10,000 sessions."""

    params = [1000, 10000]
    param_names = ["nodes"]
    timeout = 300

    def setup(self, n_nodes):
        self.sched, _, pairs = build_fleet(n_nodes)
        self.requests = sessions_for(pairs, 10_000)
        for sid, src, tgt in self.requests:  # warm: every session bound once
            self.sched.release(self.sched.dispatch(sid, src, tgt).job_id)
        self.i = 0

    def time_dispatch_release(self, n_nodes):
        sid, src, tgt = self.requests[self.i % 10_000]
        self.i += 1
        self.sched.release(self.sched.dispatch(sid, src, tgt).job_id)

    def time_dispatch_1000_sessions_then_release(self, n_nodes):
        dispatch = self.sched.dispatch
        jobs = [dispatch(sid, src, tgt).job_id for sid, src, tgt in self.requests[:1000]]
        release = self.sched.release
        for job in jobs:
            release(job)
