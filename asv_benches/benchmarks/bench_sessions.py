"""Session lookup and binding with 100,000 live sessions."""

from __future__ import annotations

import random

from .common import INNER, build_fleet, cached, sessions_for


def _sessions(n_sessions):
    sched, _, pairs = build_fleet(1000)
    requests = sessions_for(pairs, n_sessions)
    for sid, src, tgt in requests:
        sched.release(sched.dispatch(sid, src, tgt).job_id)
    rng = random.Random(3)
    picked = [requests[rng.randrange(n_sessions)] for _ in range(INNER)]
    return sched, picked


class SessionLookup:
    """``INNER`` (1,000) random sessions out of 100,000 per sample: divide by 1,000 for one."""

    params = [100_000]
    param_names = ["sessions"]
    timeout = 600

    def setup(self, n_sessions):
        self.sched, self.picked = cached(("sessions", n_sessions), lambda: _sessions(n_sessions))
        self.ids = [sid for sid, _, _ in self.picked]

    def time_session_entry_lookup(self, n_sessions):
        get = self.sched._sessions.get
        for sid in self.ids:
            get(sid)

    def time_dispatch_random_session(self, n_sessions):
        dispatch, release = self.sched.dispatch, self.sched.release
        for sid, src, tgt in self.picked:
            release(dispatch(sid, src, tgt).job_id)
