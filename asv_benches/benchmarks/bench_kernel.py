"""The compiled kernel alone: one decision over a pool of N nodes, against an empty call."""

from __future__ import annotations

import time

import numpy as np

from pysched import _layout
from pysched._kernel import resolve


class KernelPick:
    """``SnapshotKernel.pick`` on one pool of ``n`` nodes with varied loads."""

    params = ([10, 100, 1000, 10000], ["compiled"])
    param_names = ["pool_size", "kernel"]

    def setup(self, n, kernel):
        core = resolve(kernel)
        rng = np.random.default_rng(0)
        recs = np.zeros(n, dtype=_layout.NODE_DTYPE)
        recs["service_mask"] = 0b1111
        recs["max_concurrency"] = 8
        recs["flags"] = _layout.FLAG_HAS_GPU | _layout.FLAG_PUBLIC
        recs["status"] = rng.choice([0] * 9 + [2], n)  # 10 % degraded
        loads = core.LoadTable(n)
        self.now = time.monotonic()
        for s in range(n):
            loads.update(s, self.now, 20.0, float(rng.integers(0, 60)), 30.0, int(rng.integers(0, 4)))
        self.inflight = rng.integers(0, 4, n).astype(np.int32)
        self.kernel = core.SnapshotKernel(
            recs, loads, self.inflight, np.array([0, n], np.int32), np.arange(n, dtype=np.int32),
            np.array([0, 1, 2], np.int32), np.array([0, 0], np.int32), 1, core.Rng(1), 45.0, 85.0,
            4096, [f"n{i}" for i in range(n)],
        )
        self.pick = self.kernel.pick
        self.noop = self.kernel.noop
        self.select = self.kernel.select
        self.rank = self.kernel.rank

    def time_pick(self, n, kernel):
        self.pick(0, 0b111, 3, self.now)

    def time_select(self, n, kernel):
        self.select(0, 0, -1, 0b111, 3, self.now)

    def time_rank4(self, n, kernel):
        self.rank(0, 0b111, 3, self.now, (), 4)

    def time_empty_call(self, n, kernel):
        """Baseline: a compiled method with the same arguments that does nothing."""
        self.noop(0, 0b111, 3, self.now)
