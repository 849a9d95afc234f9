"""What one ``pysched bench`` run measures: :class:`BenchConfig` and the implementations' names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["BASELINES", "IMPLEMENTATIONS", "PEER_INDEXES", "PYSCHED_IMPLEMENTATIONS", "BenchConfig"]

#: implementation name -> label in the table, in the order they are run and shown
IMPLEMENTATIONS: dict[str, str] = {
    "compiled": "pysched (compiled)",
    "python": "pysched (python twin)",
    "peer": "peer (indexed, 1 lock)",
    "legacy": "legacy (multi-lock)",
}
#: the implementations that are pysched (the others are what it is compared with)
PYSCHED_IMPLEMENTATIONS = ("compiled", "python")
#: what pysched is compared with, in the order the ratio rows are shown
BASELINES = ("peer", "legacy")
#: the peer's per-pool indexes (the keys of :data:`pysched.tools.bench.peer.INDEXES`)
PEER_INDEXES = ("heap", "sortedlist")


@dataclass
class BenchConfig:
    """What :func:`~pysched.tools.bench.run_bench` runs. The defaults are the issue's full run (about a minute)."""

    nodes: int = 1000
    pools: int = 50  #: distinct language sets, i.e. auto pools; nodes are spread evenly over them
    sessions: int = 10_000
    rates: tuple[float, ...] = (0.0, 2000.0, 20_000.0)  #: requested heartbeats/s (0: no heartbeat thread)
    threads: tuple[int, ...] = (1, 4)  #: dispatching threads
    duration: float = 2.0  #: measured seconds per scenario
    hold_ms: float = 2.0  #: simulated processing time before a job is released
    impls: tuple[str, ...] = ("compiled", "python", "peer", "legacy")
    #: a file to load the legacy model from; None: the module pysched.tools.bench.legacy
    legacy_path: str | None = None
    #: a file to load the peer from; None: the module pysched.tools.bench.peer
    peer_path: str | None = None
    peer_index: str | None = None  #: the peer's index ("heap", "sortedlist"); None: its default (the faster)
    seed: int = 1
    #: per node; large so the fleet never fills and throughput measures dispatch, not refusals
    max_concurrency: int = 64
    #: seconds at most spent binding sessions before each scenario (None: min(1, duration / 2))
    warmup: float | None = None
    max_samples: int = 2_000_000  #: latency samples kept per thread (reservoir-sampled beyond)
    goal_rate: float = 20_000.0  #: heartbeat rate the goals are evaluated at
    quick: bool = False  #: informational: the run was a ``--quick`` smoke run

    def __post_init__(self) -> None:
        for name in ("nodes", "pools", "sessions", "max_concurrency", "max_samples"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.pools > self.nodes:
            raise ValueError(f"pools ({self.pools}) must not exceed nodes ({self.nodes}): every pool needs a node")
        for name in ("duration", "goal_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not 0 <= self.hold_ms < math.inf:
            raise ValueError(f"hold_ms must be >= 0, got {self.hold_ms!r}")
        if self.warmup is not None and not 0 <= self.warmup < math.inf:
            raise ValueError(f"warmup must be >= 0 or None, got {self.warmup!r}")
        # duplicates dropped (order kept): one block per distinct scenario
        self.rates = tuple(dict.fromkeys(float(r) for r in self.rates))
        if not self.rates or any(not 0 <= r < math.inf for r in self.rates):
            raise ValueError(f"rates must be non-empty, each >= 0, got {self.rates!r}")
        self.threads = tuple(dict.fromkeys(self.threads))
        if not self.threads or any(type(t) is not int or t < 1 for t in self.threads):
            raise ValueError(f"threads must be non-empty ints >= 1, got {self.threads!r}")
        self.impls = tuple(self.impls)
        unknown = [i for i in self.impls if i not in IMPLEMENTATIONS]
        if unknown or not self.impls:
            raise ValueError(f"impls must name some of {', '.join(IMPLEMENTATIONS)}; got {self.impls!r}")
        # canonical order, duplicates dropped: the table's columns do not depend on how they were typed
        self.impls = tuple(i for i in IMPLEMENTATIONS if i in self.impls)
        if self.peer_index is not None and self.peer_index not in PEER_INDEXES:
            raise ValueError(f"peer_index must be one of {', '.join(PEER_INDEXES)} or None, "
                             f"got {self.peer_index!r}")

    @property
    def warmup_seconds(self) -> float:
        """Seconds at most spent binding sessions before each scenario."""
        return min(1.0, self.duration / 2) if self.warmup is None else float(self.warmup)

    @classmethod
    def quick_config(cls, **overrides: Any) -> BenchConfig:
        """A smoke run of a few seconds: 200 nodes, 0.25 s scenarios, rates 0 and 20,000.

        :param overrides: fields to set otherwise (the options given on the
            command line); typed ``Any`` because they are the dataclass's
            keyword arguments, checked by ``__post_init__``.
        """
        values: dict[str, Any] = dict(nodes=200, pools=20, sessions=2000, rates=(0.0, 20_000.0), threads=(1, 4),
                                      duration=0.25, quick=True)
        values.update(overrides)
        return cls(**values)
