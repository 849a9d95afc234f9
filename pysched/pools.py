"""Pool configuration: manual pools (:class:`PoolConfig`) and automatic language-set pools.

In *auto* mode there is one pool per distinct node language set, named by
its sorted codes joined with ``-`` (``{zh, en}`` -> ``en-zh``); a node joins
the pool of its own set. Ids are stable: a set keeps its id for the life of
the scheduler, a new set gets ``max id + 1``, and ids are never reused.

In *manual* mode (:meth:`Scheduler.set_pools`) a node joins every pool whose
languages it all speaks and whose required services it all runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pysched.languages import normalize_languages, normalize_services

__all__ = ["PoolConfig", "PoolInfo", "auto_pool_name", "MAX_POOL_ID"]

#: pool ids are non-negative and fit the kernel's packed 32-bit pool index
MAX_POOL_ID = 2**31 - 1


def auto_pool_name(languages: Iterable[str]) -> str:
    """The auto pool name of a language set: sorted codes joined by ``-``."""
    return "-".join(sorted(languages))


@dataclass(frozen=True)
class PoolConfig:
    """One manually configured pool.

    ``languages`` and ``required_services`` are normalised on construction;
    bad values raise ``ValueError``/``TypeError`` naming the field.
    """

    pool_id: int
    name: str
    languages: frozenset[str]
    required_services: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if type(self.pool_id) is not int:
            raise TypeError(f"pool_id must be an int, got {type(self.pool_id).__name__}: {self.pool_id!r}")
        if not 0 <= self.pool_id <= MAX_POOL_ID:
            raise ValueError(f"pool_id must be in [0, {MAX_POOL_ID}], got {self.pool_id!r}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty str, got {self.name!r}")
        object.__setattr__(self, "languages", normalize_languages(self.languages, "languages"))
        object.__setattr__(
            self, "required_services", normalize_services(self.required_services, "required_services")
        )


@dataclass(frozen=True)
class PoolInfo:
    """A pool as reported by :meth:`Scheduler.pools`."""

    pool_id: int
    name: str
    languages: frozenset[str]
    required_services: frozenset[str]
    node_ids: tuple[str, ...]
    auto: bool
