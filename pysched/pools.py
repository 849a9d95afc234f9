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

#: the largest pool id: ids are non-negative signed 32-bit integers
MAX_POOL_ID = 2**31 - 1


def auto_pool_name(languages: Iterable[str]) -> str:
    """The auto pool name of a language set: sorted codes joined by ``-``."""
    return "-".join(sorted(languages))


# init=False: the constructor takes any iterable of codes and stores them
# normalised as frozensets, which the generated __init__ could not type.
@dataclass(frozen=True, init=False)
class PoolConfig:
    """One manually configured pool.

    :param pool_id: the pool id, in ``[0, MAX_POOL_ID]``.
    :param name: a non-empty display name.
    :param languages: the pool's language codes (an iterable, not a bare
        string), stored normalised as a frozenset.
    :param required_services: services every member must run, stored
        normalised as a frozenset.
    :raises TypeError: a value of the wrong type, naming the field.
    :raises ValueError: a bad value, naming the field.
    """

    pool_id: int
    name: str
    languages: frozenset[str]
    required_services: frozenset[str] = field(default_factory=frozenset)

    def __init__(
        self, pool_id: int, name: str, languages: Iterable[str], required_services: Iterable[str] = ()
    ) -> None:
        if type(pool_id) is not int:
            raise TypeError(f"pool_id must be an int, got {type(pool_id).__name__}: {pool_id!r}")
        if not 0 <= pool_id <= MAX_POOL_ID:
            raise ValueError(f"pool_id must be in [0, {MAX_POOL_ID}], got {pool_id!r}")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        langs = normalize_languages(languages, "languages")
        services = normalize_services(required_services, "required_services")
        # frozen: fields are set once, here, the way the generated __init__ sets them
        object.__setattr__(self, "pool_id", pool_id)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "languages", langs)
        object.__setattr__(self, "required_services", services)


@dataclass(frozen=True)
class PoolInfo:
    """A pool as reported by :meth:`Scheduler.pools`.

    :param pool_id: the pool id.
    :param name: the pool's name (an auto pool's is :func:`auto_pool_name`).
    :param languages: its language codes.
    :param required_services: services every member runs (empty for auto pools).
    :param node_ids: the member node ids, in slot order.
    :param auto: an automatic language-set pool rather than a :class:`PoolConfig`.
    """

    pool_id: int
    name: str
    languages: frozenset[str]
    required_services: frozenset[str]
    node_ids: tuple[str, ...]
    auto: bool
