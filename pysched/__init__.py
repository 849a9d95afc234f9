"""pysched: decide which worker node runs each job, in microseconds.

A management layer owns nodes, pools and the language index behind one lock
and publishes immutable runtime snapshots; dispatch reads the current
snapshot without locking, scores candidates in a compiled kernel, and lets a
reservation backend make the final, atomic capacity decision.

>>> import pysched
>>> sched = pysched.Scheduler(seed=1)
>>> sched.register_node("node-1", languages=["zh", "en"])
>>> a = sched.dispatch("session-1", "zh", "en")
>>> a.node_id, a.pool_id
('node-1', 1)
>>> sched.release(a.job_id)
True
"""

from typing import TYPE_CHECKING

from pysched._impl import COMPILED
from pysched.errors import (
    NoNodeAvailable,
    NoPoolForLanguagePair,
    ReservationBackendUnavailable,
    SchedulerError,
    UnknownJob,
    UnknownNode,
    WrongNode,
)
from pysched.language_index import PoolLanguageIndex
from pysched.languages import AUTO, DEFAULT_SERVICES, LANGUAGE_ALIASES, normalize_language
from pysched.pools import PoolConfig, PoolInfo
from pysched.reservations import Candidate, LocalReservations, Reservation, ReservationBackend
from pysched.results import BATCH_REASONS, Assignment, BatchResult, DispatchRequest, Explanation
from pysched.scheduler import Scheduler
from pysched.snapshot import RuntimeSnapshot

__version__ = "0.1.0"  # the only place the version is written: pyproject.toml reads it (dynamic)


if TYPE_CHECKING:
    # Imported for the type checker only: at run time __getattr__ imports them on first use.
    from pysched.redis.fleet import RedisFleet
    from pysched.redis.reservations import RedisReservations


def __getattr__(name: str) -> object:
    # The Redis classes import redis-py lazily, so `import pysched` works without it.
    if name == "RedisReservations":
        from pysched.redis.reservations import RedisReservations

        return RedisReservations
    if name == "RedisFleet":
        from pysched.redis.fleet import RedisFleet

        return RedisFleet
    raise AttributeError(f"module 'pysched' has no attribute {name!r}")


def __dir__() -> list[str]:
    # List the lazy Redis classes too (completion, help()), without importing them.
    return sorted({*globals(), *__all__})


__all__ = [
    "AUTO",
    "Assignment",
    "BATCH_REASONS",
    "BatchResult",
    "COMPILED",
    "Candidate",
    "DEFAULT_SERVICES",
    "DispatchRequest",
    "Explanation",
    "LANGUAGE_ALIASES",
    "LocalReservations",
    "NoNodeAvailable",
    "NoPoolForLanguagePair",
    "PoolConfig",
    "PoolInfo",
    "PoolLanguageIndex",
    "RedisFleet",
    "RedisReservations",
    "Reservation",
    "ReservationBackend",
    "ReservationBackendUnavailable",
    "RuntimeSnapshot",
    "Scheduler",
    "SchedulerError",
    "UnknownJob",
    "UnknownNode",
    "WrongNode",
    "normalize_language",
    "__version__",
]
