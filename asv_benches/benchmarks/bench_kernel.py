"""The compiled kernel alone: one decision over a pool of N nodes, against an empty call.

Each ``time_*`` makes ``INNER`` (1,000) calls: divide by 1,000 for one.

``inflight="slot_counts"`` is how the scheduler builds its kernel: the
in-flight counts belong to a ``SlotCounts``, so the kernel keeps its per-pool
ordering in step with them and a decision costs O(log n).
``"plain_array"``: counts no ``SlotCounts`` owns, so every decision scans the
pool (the same decisions, O(n)).
"""

from __future__ import annotations

import time

import numpy as np

from pysched import _layout
from pysched._impl import resolve

from .common import INNER, cached


def _kernel(n: int, kernel: str, inflight: str):
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
    counts = core.SlotCounts(n)
    held = rng.integers(0, 4, n).astype(np.int32)
    if inflight == "slot_counts":
        counts.array[:] = held  # before the kernel exists: it builds its ordering from these
        array = counts.array
    else:
        array = held
    k = core.SnapshotKernel(
        recs, loads, array, np.array([0, n], np.int32), np.arange(n, dtype=np.int32),
        np.array([0, 1, 2], np.int32), np.array([0, 0], np.int32), 1, core.Rng(1), 45.0, 85.0,
        4096, [f"n{i}" for i in range(n)],
    )
    return k, counts, loads, now


class KernelPick:
    """``SnapshotKernel.pick`` on one pool of ``n`` nodes with varied loads, 1,000 decisions per sample."""

    params = ([10, 100, 1000, 10000], ["compiled"], ["slot_counts", "plain_array"])
    param_names = ["pool_size", "kernel", "inflight"]

    def setup(self, n, kernel, inflight):
        self.kernel, self.counts, self.loads, self.now = cached(
            ("kernel", n, kernel, inflight), lambda: _kernel(n, kernel, inflight))
        self.slots = [(7 * i) % n for i in range(INNER)]

    def time_pick(self, n, kernel, inflight):
        pick, now = self.kernel.pick, self.now
        for _ in range(INNER):
            pick(0, 0b111, 3, now)

    def time_select(self, n, kernel, inflight):
        select, now = self.kernel.select, self.now
        for _ in range(INNER):
            select(0, 0, -1, 0b111, 3, now)

    def time_rank4(self, n, kernel, inflight):
        rank, now = self.kernel.rank, self.now
        for _ in range(INNER):
            rank(0, 0b111, 3, now, (), 4)

    def time_reserve_release(self, n, kernel, inflight):
        """What keeping the ordering costs a reservation: one count up, one down (a pool-sized tree each)."""
        try_add, add = self.counts.try_add, self.counts.add
        for slot in self.slots:
            if try_add(slot, 1_000_000, 0):
                add(slot, -1)

    def time_heartbeat_update(self, n, kernel, inflight):
        """``LoadTable.update`` as a heartbeat writes it (what keeping the ordering costs a heartbeat)."""
        update, now = self.loads.update, self.now
        for i, slot in enumerate(self.slots):
            update(slot, now, 20.0, float(i % 60), 30.0, i % 4)

    def time_empty_call(self, n, kernel, inflight):
        """Baseline: a compiled method with the same arguments that does nothing."""
        noop, now = self.kernel.noop, self.now
        for _ in range(INNER):
            noop(0, 0b111, 3, now)
