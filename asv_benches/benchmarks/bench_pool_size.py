"""``Scheduler.dispatch`` against the size of the pool that serves the pair.

One pool of N nodes (every node speaks en/zh), 1,000 bound sessions. The
goal (issue 7): decision time flat in the pool size, a 10,000-node pool
within 1.5x of a 10-node one. ``loads="idle"``: every node reports nothing,
so all of them tie and the random tie-break chooses among N; ``"varied"``:
each node reports 0-3 running jobs and 0-60 % GPU use.

Each ``time_*`` makes ``INNER`` (1,000) calls: divide by 1,000 for one.

Two classes, as what comes before a timed call matters at 10,000 nodes.
asv re-runs ``setup`` before every timed call, and ``DispatchPoolSize``'s
sends a heartbeat to every node there (its fleet must not time out): at
10,000 nodes that leaves the caches holding the heartbeats' data, so its
figure is dispatch right after a full round of heartbeats.
``DispatchPoolSizeWarm`` builds its fleet with a heartbeat timeout longer
than any run and sends none, so its timed calls follow one another: its
figure is dispatch's own cost against the pool size.
"""

from __future__ import annotations

import random
import time

import pysched

from .common import INNER, cached, median


def _fleet(n_nodes: int, loads: str, heartbeat_timeout: float = 45.0):
    sched = pysched.Scheduler(seed=1, heartbeat_timeout=heartbeat_timeout)
    rng = random.Random(3)
    for i in range(n_nodes):
        sched.register_node(f"node-{i}", languages=["en", "zh"], max_concurrency=1_000_000)
        if loads == "varied":
            sched.heartbeat(f"node-{i}", running=rng.randrange(4), gpu=float(rng.randrange(61)))
    requests = [(f"sess-{i:08x}", *(("en", "zh") if i % 2 else ("zh", "en"))) for i in range(2 * INNER)]
    for sid, src, tgt in requests:  # warm: every session bound once
        sched.release(sched.dispatch(sid, src, tgt).job_id)
    return sched, requests


class DispatchPoolSize:
    """dispatch (+ release) when one pool of ``pool_size`` nodes serves the pair."""

    params = ([10, 100, 1000, 10000], ["idle", "varied"])
    param_names = ["pool_size", "loads"]
    timeout = 300

    def setup(self, n_nodes, loads):
        # heartbeats "age" with the real clock: a fleet cached across samples
        # must not time out (heartbeat_timeout is 45 s), so refresh it
        self.sched, self.requests = cached(("pool_size", n_nodes, loads), lambda: _fleet(n_nodes, loads))
        heartbeat = self.sched.heartbeat
        for i in range(n_nodes):
            heartbeat(f"node-{i}")
        self.jobs = []

    def teardown(self, n_nodes, loads):
        release = self.sched.release
        for job in self.jobs:
            release(job)

    def time_dispatch_release(self, n_nodes, loads):
        dispatch, release = self.sched.dispatch, self.sched.release
        for sid, src, tgt in self.requests[:INNER]:
            release(dispatch(sid, src, tgt).job_id)

    def time_dispatch(self, n_nodes, loads):
        dispatch = self.sched.dispatch
        # asv may call this several times per sample: every job is kept and released in teardown
        self.jobs.extend([dispatch(sid, src, tgt).job_id for sid, src, tgt in self.requests[INNER: 2 * INNER]])


class DispatchPoolSizeWarm(DispatchPoolSize):
    """dispatch (+ release) as in :class:`DispatchPoolSize`, with no heartbeat round before each timed call."""

    def setup(self, n_nodes, loads):
        # a day's heartbeat timeout: the cached fleet stays online without a heartbeat in setup
        self.sched, self.requests = cached(("pool_size_warm", n_nodes, loads),
                                           lambda: _fleet(n_nodes, loads, heartbeat_timeout=86_400.0))
        self.jobs = []


class DispatchPoolSizeRatio:
    """The pool-size ratio itself: ``DispatchPoolSizeWarm.time_dispatch`` at 10,000 nodes over 10, side by side.

    Separate asv samples of the two sizes are taken minutes apart, while this
    kind of shared machine's speed drifts by 30-50 %: their ratio moves with
    the drift. Here rounds of ``INNER`` dispatches alternate between the
    10-node and the 10,000-node fleet (``DispatchPoolSizeWarm``'s), and the
    figure is the ratio of the two median rounds (the goal: at most 1.5).
    Before each round its fleet releases its previous round's jobs, as asv's
    teardown does before a ``DispatchPoolSizeWarm`` sample: what comes before
    a round is its own fleet's work, for both sizes.
    """

    params = [["idle", "varied"]]
    param_names = ["loads"]
    unit = "x"
    timeout = 600
    ROUNDS = 25

    def setup(self, loads):
        self.fleets = [cached(("pool_size_warm", n, loads),
                              lambda n=n: _fleet(n, loads, heartbeat_timeout=86_400.0)) for n in (10, 10_000)]

    def track_pool_size_ratio(self, loads):
        rounds: tuple[list[float], list[float]] = ([], [])
        jobs: list[list[str]] = [[], []]
        for _ in range(self.ROUNDS):
            for k, (sched, requests) in enumerate(self.fleets):
                release, dispatch = sched.release, sched.dispatch
                for job in jobs[k]:
                    release(job)
                t = time.perf_counter()
                jobs[k] = [dispatch(sid, src, tgt).job_id for sid, src, tgt in requests[INNER: 2 * INNER]]
                rounds[k].append(time.perf_counter() - t)
        for k, (sched, _) in enumerate(self.fleets):
            for job in jobs[k]:
                sched.release(job)
        return median(rounds[1]) / median(rounds[0])
