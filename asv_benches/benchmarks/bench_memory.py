"""Peak memory of a large fleet: 10,000 nodes and 100,000 bound sessions."""

from __future__ import annotations

from .common import build_fleet, sessions_for


class FleetMemory:
    timeout = 600

    def peakmem_10k_nodes(self):
        build_fleet(10_000)

    def peakmem_10k_nodes_100k_sessions(self):
        sched, _, pairs = build_fleet(10_000)
        for sid, src, tgt in sessions_for(pairs, 100_000):
            sched.release(sched.dispatch(sid, src, tgt).job_id)
