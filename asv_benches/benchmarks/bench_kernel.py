"""The compiled kernel alone: one decision over a pool of N nodes, against an empty call.

Each ``time_*`` makes ``INNER`` (1,000) calls: divide by 1,000 for one decision.
"""

from __future__ import annotations

import time

import numpy as np

from pysched import _layout
from pysched._kernel import resolve

from .common import INNER, cached


def _kernel(n: int, kernel: str):
    core = resolve(kernel)
    rng = np.random.default_rng(0)
    recs = np.zeros(n, dtype=_layout.NODE_DTYPE)
    recs["service_mask"] = 0b1111
    recs["max_concurrency"] = 8
    recs["flags"] = _layout.FLAG_HAS_GPU | _layout.FLAG_PUBLIC
    recs["status"] = rng.choice([0] * 9 + [2], n)  # 10 % degraded
    loads = core.LoadTable(n)
    now = time.monotonic() + 1e6  # heartbeats "from the future": nobody goes offline mid-run
    for s in range(n):
        loads.update(s, now, 20.0, float(rng.integers(0, 60)), 30.0, int(rng.integers(0, 4)))
    inflight = rng.integers(0, 4, n).astype(np.int32)
    k = core.SnapshotKernel(
        recs, loads, inflight, np.array([0, n], np.int32), np.arange(n, dtype=np.int32),
        np.array([0, 1, 2], np.int32), np.array([0, 0], np.int32), 1, core.Rng(1), 45.0, 85.0,
        4096, [f"n{i}" for i in range(n)],
    )
    return k, now


class KernelPick:
    """``SnapshotKernel.pick`` on one pool of ``n`` nodes with varied loads, 1,000 decisions per sample."""

    params = ([10, 100, 1000, 10000], ["compiled"])
    param_names = ["pool_size", "kernel"]

    def setup(self, n, kernel):
        self.kernel, self.now = cached(("kernel", n, kernel), lambda: _kernel(n, kernel))

    def time_pick(self, n, kernel):
        pick, now = self.kernel.pick, self.now
        for _ in range(INNER):
            pick(0, 0b111, 3, now)

    def time_select(self, n, kernel):
        select, now = self.kernel.select, self.now
        for _ in range(INNER):
            select(0, 0, -1, 0b111, 3, now)

    def time_rank4(self, n, kernel):
        rank, now = self.kernel.rank, self.now
        for _ in range(INNER):
            rank(0, 0b111, 3, now, (), 4)

    def time_empty_call(self, n, kernel):
        """Baseline: a compiled method with the same arguments that does nothing."""
        noop, now = self.kernel.noop, self.now
        for _ in range(INNER):
            noop(0, 0b111, 3, now)
