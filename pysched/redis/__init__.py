"""The Redis backend: several scheduler processes share capacity and a fleet through one Redis.

* :class:`RedisReservations` (:mod:`pysched.redis.reservations`): the
  reservation backend; the decision lives in Redis (Lua scripts in
  ``pysched/redis/lua``), each process keeps a mirror of its own jobs.
* :class:`RedisFleet` (:mod:`pysched.redis.fleet`): node state and pool ids
  shared between processes; a publisher thread (:mod:`pysched.redis._publisher`)
  sends this process's node events, an applier thread
  (:mod:`pysched.redis._applier`) replays the others'.
* :mod:`pysched.redis._scripts`: the one helper that calls redis-py (script
  loading, ``EVALSHA`` with the ``NOSCRIPT`` fallback, outage classification).

redis-py (the ``redis`` extra) is imported only when one of the classes is
constructed, so importing this package needs numpy only.
"""

from pysched.redis.fleet import RedisFleet
from pysched.redis.reservations import REFUSED_RECOVERING, RedisReservations

__all__ = ["REFUSED_RECOVERING", "RedisFleet", "RedisReservations"]
