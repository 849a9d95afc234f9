"""The pool language index: which pools serve a (source, target) pair.

A pair is served by every pool whose language set contains both languages
(superset match: a ``de-en-zh`` pool serves ``zh -> en``), most specific
first: the smallest set, then the lowest pool id. ``src="auto"`` is served
by every pool containing the target. The index is rebuilt only when pools
change; a lookup is one dict access in Python, or one offset read in the
compiled kernel, which gets the same index as two ``int32`` arrays.

The kernel numbers languages densely (``lang_ids``) and a pair by its *pair
key*, :func:`pair_key`: the one definition of that numbering in Python
(the compiled ``SnapshotKernel._pair_key`` computes the same in C).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from pysched.languages import AUTO

#: an int, or an integer numpy array (key arithmetic works on either)
IntOrArray = TypeVar("IntOrArray", int, np.ndarray)

#: most pairs ``pair_ids`` remembers: normalised codes only arrive there, so this
#: bounds a memo of the pairs clients use, not of arbitrary input
_MEMO_LIMIT = 65536

#: ``pair_ids``' memo marker for "not looked up yet" (one dict lookup per job, typed)
_UNSEEN: tuple[int, int] = (-1, -1)

__all__ = ["PoolLanguageIndex", "pair_key", "split_pair_key"]


def pair_key(src_id: int, tgt_id: int, n_langs: int) -> int:
    """The kernel's key of a language pair: ``src_id * n_langs + tgt_id``.

    Keys are dense, ``(n_langs + 1) * n_langs`` of them: ``src_id == n_langs``
    stands for ``"auto"`` (any source), a target is never ``"auto"``.

    :param src_id: the source's language id, or ``n_langs`` for ``"auto"``.
    :param tgt_id: the target's language id.
    :param n_langs: how many languages the index numbers.
    """
    return src_id * n_langs + tgt_id


def split_pair_key(key: IntOrArray, n_langs: int) -> tuple[IntOrArray, IntOrArray]:
    """``(src_id, tgt_id)`` of a :func:`pair_key` (or of an array of them).

    :param key: a pair key (>= 0), or an integer array of them.
    :param n_langs: how many languages the index numbers.
    """
    return divmod(key, n_langs)


class PoolLanguageIndex:
    """Immutable index over the pools of one snapshot.

    :param pools: ``(pool_id, languages)`` in pool-index order (the order of
        the snapshot's membership arrays).
    :ivar pool_ids: the pool id of each pool index.
    :ivar by_language_pair: ``(src, tgt) -> pool ids`` for every pair a pool covers.
    :ivar by_mixed_pool: ``tgt -> pool ids`` of pools containing ``tgt`` (``src="auto"``).
    :ivar by_language_set: ``frozenset -> pool ids`` with exactly that language set.
    :ivar lang_ids: language code -> dense id used by the kernel.
    :ivar pair_off: with ``pair_pools``, the kernel's CSR form: entries
        ``pair_off[k]:pair_off[k + 1]`` of ``pair_pools`` are the pool
        *indices* serving the pair whose :func:`pair_key` is ``k``.
    :ivar pair_pools: see ``pair_off``.
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
            flat[pair_key(ids[src], ids[tgt], n)] = [index_of[p] for p in pids]
        for tgt, pids in self.by_mixed_pool.items():
            flat[pair_key(n, ids[tgt], n)] = [index_of[p] for p in pids]
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
        """How many languages the pools cover (``src_id == n_langs`` is ``"auto"``)."""
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
        ids = self._pair_ids.get(pair, _UNSEEN)
        if ids is _UNSEEN:
            ids = self.kernel_ids(pair[0], pair[1])
            if len(self._pair_ids) < _MEMO_LIMIT:
                self._pair_ids[pair] = ids
        return ids

    def key(self, pair: tuple[str, str]) -> int:
        """The :func:`pair_key` of a ``(src, tgt)`` tuple (normalised codes), or -1 if no pool has both."""
        ids = self.pair_ids(pair)
        return -1 if ids is None else pair_key(ids[0], ids[1], len(self.lang_ids))

    def kernel_ids(self, src: str, tgt: str) -> tuple[int, int] | None:
        """The kernel's ``(src_id, tgt_id)`` for a pair, or None if no pool has both languages."""
        tgt_id = self.lang_ids.get(tgt)
        if tgt_id is None:
            return None
        if src == AUTO:
            return len(self.lang_ids), tgt_id
        src_id = self.lang_ids.get(src)
        if src_id is None:
            return None
        return src_id, tgt_id
