"""Management: load-only heartbeats, and structural changes with their snapshot publication.

``time_load_only_heartbeat`` sends ``INNER`` (1,000) heartbeats per sample;
divide by 1,000 for one.
"""

from __future__ import annotations

from .common import INNER, build_fleet, cached


class Heartbeat:
    """A heartbeat that only carries load figures (publishes nothing)."""

    params = [1000, 10000]
    param_names = ["nodes"]
    timeout = 300

    def setup(self, n_nodes):
        self.sched, _, _ = cached(("fleet", n_nodes), lambda: build_fleet(n_nodes))
        self.ids = [f"node-{i % n_nodes}" for i in range(0, 7 * INNER, 7)]

    def time_load_only_heartbeat(self, n_nodes):
        heartbeat = self.sched.heartbeat
        for i, node_id in enumerate(self.ids):
            heartbeat(node_id, running=i % 3, cpu=20.0, gpu=30.0, mem=40.0)


class StructuralChange:
    """Register + remove, a drain/resume status change, and a manual pool change: each publishes."""

    params = [1000, 10000]
    param_names = ["nodes"]
    timeout = 600

    def setup(self, n_nodes):
        self.sched, self.sets, _ = cached(("fleet", n_nodes), lambda: build_fleet(n_nodes))

    def time_register_then_remove(self, n_nodes):
        self.sched.register_node("extra", languages=self.sets[0], max_concurrency=4)
        self.sched.remove_node("extra")

    def time_drain_then_resume(self, n_nodes):
        self.sched.drain_node("node-7")
        self.sched.resume_node("node-7")

    def time_language_change_moves_pool(self, n_nodes):
        self.sched.heartbeat("node-3", languages=self.sets[1])
        self.sched.heartbeat("node-3", languages=self.sets[3])


class PoolChange:
    """``set_pools``: switch between manual pools and auto (rebuilds membership and the index)."""

    params = [1000, 10000]
    param_names = ["nodes"]
    timeout = 600

    def setup(self, n_nodes):
        import pysched

        self.sched, sets, _ = cached(("fleet", n_nodes), lambda: build_fleet(n_nodes))
        self.manual = [pysched.PoolConfig(100 + i, "-".join(s), set(s)) for i, s in enumerate(sets[:20])]

    def time_set_pools_manual_then_auto(self, n_nodes):
        self.sched.set_pools(self.manual)
        self.sched.set_pools("auto")
