"""Shared fleet builders for the asv suite (numpy ``benchmarks/`` style).

asv times one call per sample, right after ``setup`` (which leaves caches
cold), so the sub-microsecond operations are timed as loops of ``INNER``
calls: divide those figures by ``INNER`` for the time of one.
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pysched  # noqa: E402

#: calls per timed sample for the sub-microsecond benchmarks
INNER = 1000

LANGUAGES = ["en", "zh", "de", "fr", "es", "ja", "ko", "ru", "pt", "it", "ar", "hi"]


def language_sets(n_sets: int, seed: int = 1) -> list[tuple[str, ...]]:
    """``n_sets`` distinct, realistic language sets (2-3 languages, English-heavy)."""
    rng = random.Random(seed)
    sets: list[tuple[str, ...]] = []
    while len(sets) < n_sets:
        k = rng.choice([2, 2, 3])
        langs = tuple(sorted({"en", *rng.sample(LANGUAGES, k - 1)} if rng.random() < 0.7 else rng.sample(LANGUAGES, k)))
        if len(langs) >= 2 and langs not in sets:
            sets.append(langs)
    return sets


def build_fleet(n_nodes: int, n_pools: int = 50, max_concurrency: int = 1_000_000, seed: int = 1, **kwargs):
    """A scheduler with ``n_nodes`` nodes spread evenly over ``n_pools`` auto pools.

    Returns ``(scheduler, sets, pairs)``; the huge default max concurrency keeps
    long benchmark loops from ever filling a node.
    """
    kwargs.setdefault("max_pools", max(50, n_pools))
    sched = pysched.Scheduler(seed=seed, **kwargs)
    sets = language_sets(n_pools, seed)
    for i in range(n_nodes):
        sched.register_node(f"node-{i}", languages=sets[i % n_pools], max_concurrency=max_concurrency)
    pairs = [(a, b) for s in sets for a in s for b in s if a != b]
    return sched, sets, pairs


def median(values: list[float]) -> float:
    """The median of ``values`` (here, not ``statistics``: its imports would count in the peakmem benchmarks)."""
    s = sorted(values)
    k = len(s) // 2
    return s[k] if len(s) % 2 else (s[k - 1] + s[k]) / 2


_CACHE: dict = {}


def cached(key, build):
    """Build once per process: asv re-runs ``setup`` before every sample, and a
    10,000-node fleet takes a second or more to register."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def sessions_for(pairs, n_sessions: int, seed: int = 2) -> list[tuple[str, str, str]]:
    """One fixed language pair per session, as real sessions mostly have."""
    rng = random.Random(seed)
    return [(f"sess-{i:08x}", *rng.choice(pairs)) for i in range(n_sessions)]
