"""The pool language index: which pools serve a (source, target) pair.

A pair is served by every pool whose language set contains both languages
(superset match: a ``de-en-zh`` pool serves ``zh -> en``), most specific
first: the smallest set, then the lowest pool id. ``src="auto"`` is served
by every pool containing the target. The index is rebuilt only when pools
change; a lookup is one dict access in Python, or one offset read in the
compiled kernel, which gets the same index as two ``int32`` arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pysched.languages import AUTO

__all__ = ["PoolLanguageIndex"]


class PoolLanguageIndex:
    """Immutable index over the pools of one snapshot.

    ``pools`` lists ``(pool_id, languages)`` in pool-index order (the order
    of the snapshot's membership arrays).

    Attributes:
        by_language_pair: ``(src, tgt) -> pool ids`` for every pair a pool covers.
        by_mixed_pool: ``tgt -> pool ids`` of pools containing ``tgt`` (``src="auto"``).
        by_language_set: ``frozenset -> pool ids`` with exactly that language set.
        lang_ids: language code -> dense id used by the kernel.
        pair_off, pair_pools: the kernel's CSR form; key ``src_id * L + tgt_id``
            (``src_id == L`` for "auto") lists pool *indices*.
    """

    __slots__ = ("by_language_pair", "by_mixed_pool", "by_language_set", "lang_ids", "pair_off", "pair_pools",
                 "pool_ids", "_pair_ids")

    def __init__(self, pools: Sequence[tuple[int, frozenset[str]]]) -> None:
        self.pool_ids = tuple(pid for pid, _ in pools)
        index_of = {pid: i for i, pid in enumerate(self.pool_ids)}
        ordered = sorted(pools, key=lambda p: (len(p[1]), p[0]))
        langs = sorted({lang for _, ls in pools for lang in ls})
        self.lang_ids = {lang: i for i, lang in enumerate(langs)}
        n = len(langs)

        by_pair: dict[tuple[str, str], list[int]] = {}
        by_target: dict[str, list[int]] = {}
        by_set: dict[frozenset[str], list[int]] = {}
        for pid, ls in ordered:
            by_set.setdefault(ls, []).append(pid)
            for tgt in ls:
                by_target.setdefault(tgt, []).append(pid)
                for src in ls:
                    by_pair.setdefault((src, tgt), []).append(pid)
        self.by_language_pair = {k: tuple(v) for k, v in by_pair.items()}
        self.by_mixed_pool = {k: tuple(v) for k, v in by_target.items()}
        self.by_language_set = {k: tuple(v) for k, v in by_set.items()}

        counts = np.zeros((n + 1) * n, dtype=np.int64)
        flat: list[list[int]] = [[] for _ in range((n + 1) * n)]
        ids = self.lang_ids
        for (src, tgt), pids in self.by_language_pair.items():
            flat[ids[src] * n + ids[tgt]] = [index_of[p] for p in pids]
        for tgt, pids in self.by_mixed_pool.items():
            flat[n * n + ids[tgt]] = [index_of[p] for p in pids]
        for key, entry in enumerate(flat):
            counts[key] = len(entry)
        self.pair_off = np.zeros((n + 1) * n + 1, dtype=np.int32)
        self.pair_off[1:] = np.cumsum(counts)
        self.pair_pools = np.array([p for entry in flat for p in entry], dtype=np.int32)
        for arr in (self.pair_off, self.pair_pools):
            arr.flags.writeable = False
        self._pair_ids: dict[tuple[str, str], tuple[int, int] | None] = {}

    @property
    def n_langs(self) -> int:
        return len(self.lang_ids)

    def lookup(self, src: str, tgt: str) -> tuple[int, ...]:
        """Pool ids serving ``src -> tgt`` (normalised codes), most specific first."""
        if src == AUTO:
            return self.by_mixed_pool.get(tgt, ())
        return self.by_language_pair.get((src, tgt), ())

    def pair_ids(self, pair: tuple[str, str]) -> tuple[int, int] | None:
        """:meth:`kernel_ids` of a ``(src, tgt)`` tuple, memoised (dispatch asks on every job).

        Only pairs of codes that already passed normalisation arrive here, so
        the memo is bounded by the pairs clients actually use.
        """
        ids = self._pair_ids.get(pair, False)
        if ids is False:
            ids = self.kernel_ids(pair[0], pair[1])
            if len(self._pair_ids) < 65536:
                self._pair_ids[pair] = ids
        return ids

    def kernel_ids(self, src: str, tgt: str) -> tuple[int, int] | None:
        """The kernel's (src_id, tgt_id) for a pair, or None if no pool has both languages."""
        tgt_id = self.lang_ids.get(tgt)
        if tgt_id is None:
            return None
        if src == AUTO:
            return len(self.lang_ids), tgt_id
        src_id = self.lang_ids.get(src)
        if src_id is None:
            return None
        return src_id, tgt_id
