"""Session lookup and binding with 100,000 live sessions."""

from __future__ import annotations

import random

from .common import build_fleet, sessions_for


class SessionLookup:
    params = [100_000]
    param_names = ["sessions"]
    timeout = 600

    def setup(self, n_sessions):
        self.sched, _, pairs = build_fleet(1000)
        self.requests = sessions_for(pairs, n_sessions)
        for sid, src, tgt in self.requests:
            self.sched.release(self.sched.dispatch(sid, src, tgt).job_id)
        rng = random.Random(3)
        self.order = [rng.randrange(n_sessions) for _ in range(10_000)]
        self.manager = self.sched._sessions
        self.i = 0

    def time_session_entry_lookup(self, n_sessions):
        self.i += 1
        self.manager.get(self.requests[self.order[self.i % 10_000]][0])

    def time_dispatch_random_session(self, n_sessions):
        self.i += 1
        sid, src, tgt = self.requests[self.order[self.i % 10_000]]
        self.sched.release(self.sched.dispatch(sid, src, tgt).job_id)
