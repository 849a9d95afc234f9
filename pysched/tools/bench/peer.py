"""A pure-Python indexed scheduler: the peer ``pysched bench`` compares against.

This is the design a competent Python engineer writes in an afternoon when
asked for "the least-loaded capable node, fast, thread-safe" (issue 7, item 5):

* **one** ``threading.Lock`` around every operation (dispatch, release,
  commit, heartbeat, registration): simple, obviously correct, and under
  CPython's GIL only one thread runs Python at a time anyway;
* auto pools, one per distinct node language set (capped at ``max_pools``),
  and a ``(src, tgt) -> pools`` index with **superset** matching, most
  specific pool first, like pysched's language index (``src="auto"``: every
  pool containing ``tgt``);
* per pool, an **ordered index of its eligible nodes** keyed by
  ``(load ratio, gpu, tie-break, seq, node)``, where the load ratio is
  ``max(in-flight, reported running) / max_concurrency``: the best node is
  at the front. Every change of a key (reserve, release, a heartbeat's
  ``running`` or ``gpu``) re-keys the node; a node that is not ready,
  overloaded or silent for ``heartbeat_timeout`` leaves the index and comes
  back with its next heartbeat;
* the order is pysched's: least load ratio, then lowest GPU use, then a
  seeded random tie-break drawn at each re-key (so equally good nodes share
  the work); ``seq`` (a counter) makes every key unique;
* reservations in a dict with a TTL (expired uncommitted jobs give their
  capacity back, swept in FIFO order since the TTL is fixed), ``commit``
  stops the TTL, ``release`` returns the capacity; a node is never given
  more than ``max_concurrency`` jobs (checked under the lock);
* sessions bound to the pool that served them (a new session takes the pool
  with the most free capacity), like pysched's binding.

Two interchangeable indexes are provided, so the comparison can use the
faster one:

:class:`SortedListPeer`
    the design issue 7 describes: a ``sortedcontainers.SortedList`` per pool,
    re-keyed by ``remove(old)`` + ``add(new)``.
:class:`HeapPeer`
    the same ordering in a ``heapq`` binary heap with lazy deletion: a
    re-key pushes a new entry (``heapreplace`` when the node is the one at
    the top, which is the common dispatch) and leaves the old one behind,
    stale since it is no longer its node's key; stale entries are dropped when they
    surface, and the heap is rebuilt once it holds more than twice its live
    entries (amortised O(1) per re-key). ``heapq`` is C, so a re-key costs a
    few hundred nanoseconds instead of the SortedList's two pure-Python
    bisect-and-insert passes. Measured (``pysched bench --impl peer
    --peer-index heap|sortedlist --rates 20000 --threads 1``), p50 2.3-2.4 vs
    3.4-3.5 µs at 1,000 nodes and 2.9-3.0 vs 4.2-4.9 µs at 10,000; it was
    ahead before its dispatch and release were written out inline too (2.8 vs
    3.7 µs and 3.1 vs 4.6 µs). So :data:`PeerScheduler`, what ``pysched
    bench`` runs, is this one.

What it leaves out of pysched's feature set, each of which would only make
it slower: per-session locks (one lock does it all), tenant pool preference,
idle-session expiry, commit leases, listeners, manual pools, Redis.

A module of the tools (``pysched bench`` imports it, as it imports
:mod:`pysched.tools.bench.legacy`), never of the library. Standard library
plus ``sortedcontainers`` (only :class:`SortedListPeer` needs it).
"""

from __future__ import annotations

import itertools
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from heapq import heapify, heappop, heappush, heapreplace
from typing import Any

try:  # only SortedListPeer needs it; HeapPeer is stdlib only
    from sortedcontainers import SortedList
except ImportError:  # pragma: no cover - exercised only without the bench extra
    SortedList = None

__all__ = [
    "AUTO",
    "DEFAULT_SERVICES",
    "INDEXES",
    "HeapPeer",
    "PeerAssignment",
    "PeerError",
    "PeerNoNodeAvailable",
    "PeerNoPool",
    "PeerScheduler",
    "PeerUnknownJob",
    "PeerUnknownNode",
    "SortedListPeer",
]

AUTO = "auto"
DEFAULT_SERVICES = ("asr", "nmt", "tts")
_ALL_SERVICES = ("asr", "nmt", "tts", "semantic")

_READY = "ready"
_DRAINING = "draining"
_DEGRADED = "degraded"
_OFFLINE = "offline"
_PAIR_CACHE_MAX = 100_000  # (src, tgt) spellings cached at most: bounds what bad input can grow
_UNHEALTHY_LIMIT = 3  # consecutive healthy=False heartbeats that make a ready node degraded


# ---------------------------------------------------------------- errors
class PeerError(Exception):
    """Base class of the peer's errors."""


class PeerNoPool(PeerError, LookupError):
    """No pool serves the language pair."""

    def __init__(self, src: str, tgt: str) -> None:
        super().__init__(f"no pool serves {src} -> {tgt}")
        self.src, self.tgt = src, tgt


class PeerNoNodeAvailable(PeerError, LookupError):
    """Pools serve the pair but no node in them can take the job now."""

    def __init__(self, src: str, tgt: str) -> None:
        super().__init__(f"no node available for {src} -> {tgt}")
        self.src, self.tgt = src, tgt


class PeerUnknownNode(PeerError, KeyError):
    """No node has this id."""

    def __init__(self, node_id: object) -> None:
        super().__init__(node_id)
        self.node_id = node_id

    def __str__(self) -> str:
        return f"unknown node_id {self.node_id!r}"


class PeerUnknownJob(PeerError, KeyError):
    """The job holds no reservation (never dispatched, released, or expired)."""

    def __init__(self, job_id: object) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"job_id {self.job_id!r} holds no reservation"


# ---------------------------------------------------------------- records
class PeerAssignment:
    """Where a job goes (the fields of pysched's ``Assignment``)."""

    __slots__ = ("node_id", "pool_id", "job_id", "session_id", "src", "tgt")

    def __init__(self, node_id: str, pool_id: int, job_id: str, session_id: str, src: str, tgt: str) -> None:
        self.node_id = node_id
        self.pool_id = pool_id
        self.job_id = job_id
        self.session_id = session_id
        self.src = src
        self.tgt = tgt

    def __repr__(self) -> str:
        return (f"PeerAssignment(node_id={self.node_id!r}, pool_id={self.pool_id}, job_id={self.job_id!r}, "
                f"session_id={self.session_id!r}, src={self.src!r}, tgt={self.tgt!r})")


class _Node:
    __slots__ = ("node_id", "languages", "services", "max", "has_gpu", "public", "inflight", "running",
                 "cpu", "gpu", "mem", "last_heartbeat", "status", "unhealthy", "pool", "key", "kfree", "alive")

    def __init__(self, node_id: str, languages: frozenset[str], services: frozenset[str], max_concurrency: int,
                 *, has_gpu: bool, public: bool, now: float) -> None:
        self.node_id = node_id
        self.languages = languages
        self.services = services
        self.max = max_concurrency
        self.has_gpu = has_gpu
        self.public = public
        self.inflight = 0  # reservations held here (uncommitted and committed)
        self.running = 0  # what the node last reported
        self.cpu = self.gpu = self.mem = 0.0
        self.last_heartbeat = now
        self.status = _READY
        self.unhealthy = 0
        # its _Pool, or None while it has none (max_pools reached). Any: the
        # index paths read it only while the node is indexed, when it is never
        # None; typed `_Pool | None`, they would need a None check to say so.
        self.pool: Any = None
        self.key: _Key | None = None  # the node's live index key; None: not in its pool's index
        self.kfree = 0  # max - effective when the live key was made: its share of the pool's ``free``
        self.alive = True  # False once removed (its jobs can still be released)


class _Pool:
    __slots__ = ("pool_id", "languages", "members", "index", "free")

    def __init__(self, pool_id: int, languages: frozenset[str], index: Any) -> None:
        self.pool_id = pool_id
        self.languages = languages
        self.members: set[_Node] = set()
        self.index: Any = index  # SortedList or heap list, per implementation
        self.free = 0  # sum of (max - effective) over the nodes in the index: new sessions go to the most free


#: A node's index key: (load ratio, gpu, tie-break, seq, node); the least is the best.
_Key = tuple[float, float, float, int, _Node]

# A reservation is a list (cheaper to build than an object, and the dispatch
# path builds one per job): [node, pool id, session id, expires, committed];
# its items are typed Any (a list holds one type).
_J_NODE, _J_POOL, _J_SESSION, _J_EXPIRES, _J_COMMITTED = range(5)


# ---------------------------------------------------------------- validation
def _check_id(value: object, name: str) -> str:
    if type(value) is not str:
        raise TypeError(f"{name} must be a str, got {type(value).__name__}: {value!r}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value


def _language(code: object, name: str, allow_auto: bool = False) -> str:
    if type(code) is not str:
        raise TypeError(f"{name} must be a str language code, got {type(code).__name__}: {code!r}")
    norm = code.strip().lower().replace("_", "-")
    if not norm or (norm == AUTO and not allow_auto):
        raise ValueError(f"{name} must be a language code{' or auto' if allow_auto else ''}, got {code!r}")
    return norm


def _names(values: object, name: str, language: bool) -> frozenset[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be an iterable of strs, got {type(values).__name__}: {values!r}")
    out = set()
    for v in values:
        if language:
            out.add(_language(v, name))
        else:
            if type(v) is not str or not v.strip():
                raise ValueError(f"{name} must hold non-empty strs, got {v!r}")
            out.add(v.strip().lower())
    if not out:
        raise ValueError(f"{name} must not be empty")
    return frozenset(out)


def _max_concurrency(value: object) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"max_concurrency must be an int >= 1, got {value!r}")
    return value


def _figure(value: object, name: str) -> float:
    if type(value) is not float and type(value) is not int:
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    if not 0.0 <= value <= 100.0:  # noqa: PLR2004  (a percentage; also rejects NaN)
        raise ValueError(f"{name} must be in [0, 100], got {value!r}")
    return float(value)


def _iterable(value: object, name: str) -> Iterable[object]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be an iterable of node ids, got {type(value).__name__}: {value!r}")
    return value


def _free(pool: _Pool) -> int:
    return pool.free


# ---------------------------------------------------------------- the scheduler
class _PeerBase:
    """Everything but the per-pool index.

    Subclasses supply the index primitives (``_new_index``, ``_index``,
    ``_unindex``, ``_pick``, ``_live_keys``) and their own ``dispatch``, in
    which the re-key of the chosen node is written out for speed.
    """

    kind = "base"

    def __init__(
        self,
        *,
        heartbeat_timeout: float = 45.0,
        reservation_ttl: float = 90.0,
        resource_threshold: float = 85.0,
        max_pools: int = 50,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        for name, value in (("heartbeat_timeout", heartbeat_timeout), ("reservation_ttl", reservation_ttl)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if isinstance(resource_threshold, bool) or not isinstance(resource_threshold, (int, float)) \
                or not 0 < resource_threshold <= 100:  # noqa: PLR2004  (a percentage)
            raise ValueError(f"resource_threshold must be in (0, 100], got {resource_threshold!r}")
        if type(max_pools) is not int or max_pools < 1:
            raise ValueError(f"max_pools must be an int >= 1, got {max_pools!r}")
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        elif type(seed) is not int:
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.reservation_ttl = float(reservation_ttl)
        self.threshold = float(resource_threshold)
        self.max_pools = max_pools
        self.seed = seed
        self._clock = clock
        self._lock = threading.Lock()
        self._rand = random.Random(seed).random  # the tie-break, drawn at each re-key
        self._seq = itertools.count()
        self._nodes: dict[str, _Node] = {}
        self._pools: dict[frozenset[str], _Pool] = {}
        self._pool_ids = itertools.count(1)
        # (src, tgt) as the caller spelled them -> pools, most specific first; cleared when pools change
        self._pairs: dict[tuple[Any, Any], tuple[_Pool, ...]] = {}
        self._sessions: dict[str, tuple[str, str, Any]] = {}  # session -> (src, tgt, bound pool)
        self._jobs: dict[str, list[Any]] = {}
        # expiry order is issue order (one fixed TTL): two parallel FIFOs of
        # floats and strs, which the garbage collector does not track
        self._exp_at: deque[float] = deque()
        self._exp_ids: deque[str] = deque()
        self._job_prefix = f"peer{random.Random(seed).getrandbits(32):08x}-"
        self._job_seq = itertools.count(1)
        self._default_services = frozenset(DEFAULT_SERVICES)

    # ------------------------------------------------------------ index primitives (per subclass)
    def _new_index(self) -> object:
        raise NotImplementedError

    def _index(self, node: _Node) -> None:
        """Put ``node`` into its pool's index under its current figures, or re-key it. Lock held."""
        raise NotImplementedError

    def _unindex(self, node: _Node) -> None:
        """Take ``node`` out of its pool's index. Lock held."""
        raise NotImplementedError

    def _pick(self, pool: _Pool, now: float, accept: Callable[[_Node], bool] | None) -> _Node | None:
        """The best node of ``pool`` that can take a job now (``accept``: the request's filter). Lock held."""
        raise NotImplementedError

    def _live_keys(self, pool: _Pool) -> list[_Key]:
        raise NotImplementedError

    # ------------------------------------------------------------ shared helpers (lock held)
    def _eligible(self, node: _Node, now: float) -> bool:
        """Belongs in the index: ready, pooled, not overloaded, heard from recently."""
        thr = self.threshold
        return (node.status == _READY and node.pool is not None and node.alive
                and node.cpu < thr and node.gpu < thr and node.mem < thr
                and now - node.last_heartbeat <= self.heartbeat_timeout)

    def _refresh(self, node: _Node, now: float) -> None:
        """Index (or re-key) ``node`` after any change of its figures, or take it out."""
        if self._eligible(node, now):
            self._index(node)
        elif node.key is not None:
            self._unindex(node)

    def _key(self, node: _Node) -> _Key:
        """A new live key for ``node``; records its share of the pool's free capacity."""
        eff = node.inflight if node.inflight > node.running else node.running
        node.kfree = node.max - eff
        return (eff / node.max, node.gpu, self._rand(), next(self._seq), node)

    def _pool_for(self, languages: frozenset[str]) -> _Pool | None:
        pool = self._pools.get(languages)
        if pool is None and len(self._pools) < self.max_pools:
            pool = _Pool(next(self._pool_ids), languages, self._new_index())
            self._pools[languages] = pool
            self._pairs.clear()
        return pool

    def _join(self, node: _Node, now: float) -> None:
        pool = self._pool_for(node.languages)
        node.pool = pool
        if pool is not None:
            pool.members.add(node)
        self._refresh(node, now)

    def _leave(self, node: _Node) -> None:
        if node.key is not None:
            self._unindex(node)
        if node.pool is not None:
            node.pool.members.discard(node)
            node.pool = None

    def _lookup(self, src: object, tgt: object) -> tuple[_Pool, ...]:
        """The pools of a pair not yet in the cache (validates it). Lock held."""
        s = _language(src, "src", allow_auto=True)
        t = _language(tgt, "tgt")
        pools = [p for p in self._pools.values() if t in p.languages and (s == AUTO or s in p.languages)]
        pools.sort(key=lambda p: (len(p.languages), p.pool_id))  # most specific first, like pysched
        found = tuple(pools)
        if found and len(self._pairs) < _PAIR_CACHE_MAX:
            self._pairs[(src, tgt)] = found
        return found

    def _expire(self, now: float) -> None:
        """Give back the capacity of uncommitted reservations whose TTL ended. Lock held."""
        at, ids, jobs = self._exp_at, self._exp_ids, self._jobs
        while at and at[0] <= now:
            at.popleft()
            job_id = ids.popleft()
            job = jobs.get(job_id)
            if job is not None and not job[_J_COMMITTED] and job[_J_EXPIRES] <= now:
                del jobs[job_id]
                node = job[_J_NODE]
                node.inflight -= 1
                if node.key is not None:
                    self._index(node)

    def _trim_expiry(self) -> None:
        """Drop released jobs from the head of the expiry FIFOs (bounds their memory). Lock held."""
        at, ids, jobs = self._exp_at, self._exp_ids, self._jobs
        while ids and ids[0] not in jobs:
            at.popleft()
            ids.popleft()

    def _request_filter(self, exclude: object, tenant: object, services: object,
                        require_gpu: object) -> Callable[[_Node], bool] | None:
        """None for the common job (default services, GPU, public, nothing excluded), else a predicate."""
        if exclude is None and tenant is None and services is DEFAULT_SERVICES and require_gpu is True:
            return None
        excluded = frozenset() if exclude is None else frozenset(
            _check_id(x, "exclude") for x in _iterable(exclude, "exclude"))
        if tenant is not None:
            _check_id(tenant, "tenant")
        need = self._default_services if services is DEFAULT_SERVICES else _names(services, "services", False)
        if type(require_gpu) is not bool:
            raise TypeError(f"require_gpu must be a bool, got {require_gpu!r}")
        public = tenant is None

        def accept(node: _Node) -> bool:
            return ((not require_gpu or node.has_gpu) and (not public or node.public)
                    and need <= node.services and node.node_id not in excluded)

        return accept

    def _choose(self, session_id: str, src: str, tgt: str, pools: tuple[_Pool, ...], now: float,
                accept: Callable[[_Node], bool] | None) -> _Node:
        """The node for one job: the session's pool first, else the most free one, then the others."""
        bound = self._sessions.get(session_id)
        if bound is not None and bound[0] == src and bound[1] == tgt:
            first = bound[2]
        elif len(pools) == 1:
            first = pools[0]
        else:
            first = max(pools, key=_free)  # ties: the most specific (max keeps the first)
        node = self._pick(first, now, accept)
        if node is None:
            for pool in pools:
                if pool is not first:
                    node = self._pick(pool, now, accept)
                    if node is not None:
                        break
            else:
                raise PeerNoNodeAvailable(src, tgt)
        if bound is None or bound[2] is not node.pool or bound[0] != src or bound[1] != tgt:
            self._sessions[session_id] = (src, tgt, node.pool)
        return node

    def _record(self, node: _Node, session_id: str, now: float) -> str:
        """Hold a reservation for a job on ``node`` (already counted in its in-flight). Lock held."""
        job_id = self._job_prefix + str(next(self._job_seq))
        expires = now + self.reservation_ttl
        self._jobs[job_id] = [node, node.pool.pool_id, session_id, expires, False]
        ids = self._exp_ids
        ids.append(job_id)
        self._exp_at.append(expires)
        if len(ids) > 2 * len(self._jobs) + 4096:
            self._trim_expiry()
        return job_id

    # ------------------------------------------------------------ dispatch and reservations
    def dispatch(
        self,
        session_id: str,
        src: str,
        tgt: str,
        *,
        exclude: Iterable[str] | None = None,
        tenant: str | None = None,
        services: Iterable[str] = DEFAULT_SERVICES,
        require_gpu: bool = True,
    ) -> PeerAssignment:
        """Reserve a slot on the best node for one job of ``session_id``.

        Raises :class:`PeerNoPool`, :class:`PeerNoNodeAvailable`, or
        ``TypeError``/``ValueError`` naming a bad argument (nothing changed).
        """
        if type(session_id) is not str or not session_id:
            _check_id(session_id, "session_id")
        accept = None if (exclude is None and tenant is None and services is DEFAULT_SERVICES
                          and require_gpu is True) else self._request_filter(exclude, tenant, services, require_gpu)
        now = self._clock()
        with self._lock:
            pools = self._pairs.get((src, tgt))
            if pools is None:
                pools = self._lookup(src, tgt)
                if not pools:
                    raise PeerNoPool(src, tgt)
            at = self._exp_at
            if at and at[0] <= now:
                self._expire(now)
            node = self._choose(session_id, src, tgt, pools, now, accept)
            node.inflight += 1
            self._index(node)
            job_id = self._record(node, session_id, now)
            pool_id = node.pool.pool_id
        return PeerAssignment(node.node_id, pool_id, job_id, session_id, src, tgt)

    def release(self, job_id: str) -> bool:
        """Return a job's capacity. False when nothing was held (unknown, released or expired)."""
        now = self._clock()
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is None:
                return False
            node = job[_J_NODE]
            node.inflight -= 1
            if node.key is not None:
                self._index(node)
            # an expired job not yet swept gave its capacity back all the same; the caller is told it was gone
            return job[_J_COMMITTED] or job[_J_EXPIRES] > now  # type: ignore[no-any-return]  # a bool, in an Any slot

    def commit(self, job_id: str) -> None:
        """The node accepted the job: its reservation stops expiring. Raises :class:`PeerUnknownJob`."""
        now = self._clock()
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or (not job[_J_COMMITTED] and job[_J_EXPIRES] <= now):
                raise PeerUnknownJob(job_id)
            job[_J_COMMITTED] = True

    def close_session(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    # ------------------------------------------------------------ management
    def register_node(
        self,
        node_id: str,
        languages: Iterable[str],
        services: Iterable[str] = _ALL_SERVICES,
        max_concurrency: int = 4,
        has_gpu: bool = True,
        accept_public_jobs: bool = True,
    ) -> None:
        """Register (or re-register) a node: ready, no reported load; jobs it holds stay held."""
        _check_id(node_id, "node_id")
        langs = _names(languages, "languages", True)
        servs = _names(services, "services", False)
        mx = _max_concurrency(max_concurrency)
        if type(has_gpu) is not bool:
            raise TypeError(f"has_gpu must be a bool, got {has_gpu!r}")
        if type(accept_public_jobs) is not bool:
            raise TypeError(f"accept_public_jobs must be a bool, got {accept_public_jobs!r}")
        now = self._clock()
        with self._lock:
            old = self._nodes.get(node_id)
            node = _Node(node_id, langs, servs, mx, has_gpu=has_gpu, public=accept_public_jobs, now=now)
            if old is not None:
                self._leave(old)
                old.alive = False
                node.inflight = old.inflight
                for job in self._jobs.values():  # held jobs now count on the new record
                    if job[_J_NODE] is old:
                        job[_J_NODE] = node
            self._nodes[node_id] = node
            self._join(node, now)

    def heartbeat(
        self,
        node_id: str,
        *,
        running: int | None = None,
        cpu: float | None = None,
        gpu: float | None = None,
        mem: float | None = None,
        healthy: bool | None = None,
        services: Iterable[str] | None = None,
        languages: Iterable[str] | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        """Record a heartbeat and re-key the node.

        Raises :class:`PeerUnknownNode`, or ``TypeError``/``ValueError``
        naming the field (nothing changed then).
        """
        if running is not None and (type(running) is not int or running < 0):
            raise ValueError(f"running must be an int >= 0, got {running!r}")
        if cpu is not None:
            cpu = _figure(cpu, "cpu")
        if gpu is not None:
            gpu = _figure(gpu, "gpu")
        if mem is not None:
            mem = _figure(mem, "mem")
        if healthy is not None and type(healthy) is not bool:
            raise TypeError(f"healthy must be a bool, got {healthy!r}")
        servs = None if services is None else _names(services, "services", False)
        langs = None if languages is None else _names(languages, "languages", True)
        mx = None if max_concurrency is None else _max_concurrency(max_concurrency)
        now = self._clock()
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                raise PeerUnknownNode(node_id)
            node.last_heartbeat = now
            if running is not None:
                node.running = running
            if cpu is not None:
                node.cpu = cpu
            if gpu is not None:
                node.gpu = gpu
            if mem is not None:
                node.mem = mem
            if mx is not None:
                node.max = mx
            if servs is not None:
                node.services = servs
            if healthy is False:
                node.unhealthy += 1
                if node.status == _READY and node.unhealthy >= _UNHEALTHY_LIMIT:
                    node.status = _DEGRADED
            elif healthy is True:
                node.unhealthy = 0
                if node.status == _DEGRADED:
                    node.status = _READY
            if node.status == _OFFLINE:
                node.status = _READY  # a heartbeat brings a node marked offline back, as in pysched
            if langs is not None and langs != node.languages:
                self._leave(node)
                node.languages = langs
                self._join(node, now)
            else:
                self._refresh(node, now)

    def _set_status(self, node_id: str, status: str) -> None:
        now = self._clock()
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                raise PeerUnknownNode(node_id)
            node.status = status
            if status == _READY:
                node.unhealthy = 0
            self._refresh(node, now)

    def drain_node(self, node_id: str) -> None:
        """Stop sending new jobs to a node."""
        self._set_status(node_id, _DRAINING)

    def mark_offline(self, node_id: str) -> None:
        """Mark a node offline until it heartbeats or is resumed."""
        self._set_status(node_id, _OFFLINE)

    def resume_node(self, node_id: str) -> None:
        """Return a drained, degraded or offline node to ready."""
        self._set_status(node_id, _READY)

    def remove_node(self, node_id: str) -> None:
        """Forget a node; its held jobs can still be released."""
        with self._lock:
            node = self._nodes.pop(node_id, None)
            if node is None:
                raise PeerUnknownNode(node_id)
            self._leave(node)
            node.alive = False

    # ------------------------------------------------------------ views
    def node(self, node_id: str) -> dict[str, object]:
        """One node's figures, as the peer sees them."""
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                raise PeerUnknownNode(node_id)
            return {"node_id": node.node_id, "languages": node.languages, "services": node.services,
                    "max_concurrency": node.max, "inflight": node.inflight, "running": node.running,
                    "cpu": node.cpu, "gpu": node.gpu, "mem": node.mem, "status": node.status,
                    "pool_id": None if node.pool is None else node.pool.pool_id, "indexed": node.key is not None}

    def inflight(self, node_id: str) -> int:
        """Jobs held on a node."""
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                raise PeerUnknownNode(node_id)
            return node.inflight

    def pools(self) -> dict[int, tuple[frozenset[str], tuple[str, ...]]]:
        """Pool id -> (language set, member node ids, sorted)."""
        with self._lock:
            return {p.pool_id: (p.languages, tuple(sorted(n.node_id for n in p.members)))
                    for p in self._pools.values()}

    def stats(self) -> dict[str, object]:
        """Counts: nodes, pools, sessions, jobs and jobs held."""
        with self._lock:
            return {"kind": self.kind, "nodes": len(self._nodes), "pools": len(self._pools),
                    "sessions": len(self._sessions), "jobs": len(self._jobs),
                    "inflight": sum(n.inflight for n in self._nodes.values())}

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the bookkeeping is inconsistent (for tests and soaks)."""
        with self._lock:
            held: dict[_Node, int] = {}
            for job in self._jobs.values():
                held[job[_J_NODE]] = held.get(job[_J_NODE], 0) + 1
            for node in self._nodes.values():
                assert node.inflight == held.get(node, 0), (node.node_id, node.inflight, held.get(node, 0))
                assert node.inflight <= node.max, (node.node_id, node.inflight, node.max)
            for pool in self._pools.values():
                live = self._live_keys(pool)
                indexed = {n for n in pool.members if n.key is not None}
                assert len(live) == len(indexed) and {k[-1] for k in live} == indexed, pool.pool_id
                for key in live:
                    node = key[-1]
                    assert node.key is key and node.pool is pool, (node.node_id, key)
                    eff = max(node.inflight, node.running)
                    assert key[0] == eff / node.max and key[1] == node.gpu, (node.node_id, key)
                assert pool.free == sum(n.max - max(n.inflight, n.running) for n in indexed), pool.pool_id

    def close(self) -> None:
        """Nothing to stop (no threads); here so the bench treats every implementation alike."""


# ---------------------------------------------------------------- SortedList index
class SortedListPeer(_PeerBase):
    """A ``sortedcontainers.SortedList`` of keys per pool, re-keyed by remove + add (issue 7's description)."""

    kind = "sortedlist"

    def __init__(self, **kwargs: object) -> None:
        if SortedList is None:
            raise ImportError("SortedListPeer needs sortedcontainers (pip install sortedcontainers)")
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def _new_index(self) -> object:
        return SortedList()

    def _index(self, node: _Node) -> None:
        pool = node.pool
        index = pool.index
        if node.key is not None:
            index.remove(node.key)
            pool.free -= node.kfree
        node.key = key = self._key(node)
        index.add(key)
        pool.free += node.kfree

    def _unindex(self, node: _Node) -> None:
        pool = node.pool
        pool.index.remove(node.key)
        pool.free -= node.kfree
        node.key = None

    def _pick(self, pool: _Pool, now: float, accept: Callable[[_Node], bool] | None) -> _Node | None:
        index = pool.index
        if not index:
            return None
        key = index[0]
        node: _Node = key[4]
        if key[0] >= 1.0:
            return None  # the least loaded is full: all are
        if now - node.last_heartbeat <= self.heartbeat_timeout and (accept is None or accept(node)):
            return node
        # the front node is silent or filtered out: walk the order
        timeout = self.heartbeat_timeout
        silent = []
        found = None
        for key in index:
            if key[0] >= 1.0:
                break
            node = key[4]
            if now - node.last_heartbeat > timeout:
                silent.append(node)
            elif accept is None or accept(node):
                found = node
                break
        for node in silent:  # back with its next heartbeat
            self._unindex(node)
        return found

    def _live_keys(self, pool: _Pool) -> list[_Key]:
        return list(pool.index)


# ---------------------------------------------------------------- lazy-deletion heap index
class HeapPeer(_PeerBase):
    """A ``heapq`` heap of keys per pool with lazy deletion.

    An entry is live when it is its node's current key (``node.key is
    entry``); anything else is stale and dropped when it reaches the top.
    Taking a node out of the index is O(1) (forget its key).
    """

    kind = "heap"

    def _new_index(self) -> object:
        return []

    def _index(self, node: _Node) -> None:
        pool = node.pool
        if node.key is not None:
            pool.free -= node.kfree
        node.key = key = self._key(node)
        heap = pool.index
        heappush(heap, key)
        pool.free += node.kfree
        if len(heap) > 2 * len(pool.members) + 32:
            self._compact(pool)

    def _unindex(self, node: _Node) -> None:
        node.pool.free -= node.kfree
        node.key = None  # its entries are stale now

    def _live_keys(self, pool: _Pool) -> list[_Key]:
        return [e for e in pool.index if e[4].key is e]

    @staticmethod
    def _compact(pool: _Pool) -> None:
        heap = [e for e in pool.index if e[4].key is e]
        heapify(heap)
        pool.index[:] = heap

    def _pick(self, pool: _Pool, now: float, accept: Callable[[_Node], bool] | None) -> _Node | None:
        heap = pool.index
        timeout = self.heartbeat_timeout
        while heap:
            top: _Key = heap[0]
            node = top[4]
            if node.key is not top:
                heappop(heap)  # stale
                continue
            if top[0] >= 1.0:
                return None  # the least loaded is full: all are
            if now - node.last_heartbeat > timeout:
                heappop(heap)
                self._unindex(node)  # back with its next heartbeat
                continue
            if accept is None or accept(node):
                return node
            return self._pick_filtered(pool, now, accept)
        return None

    def _pick_filtered(self, pool: _Pool, now: float, accept: Callable[[_Node], bool]) -> _Node | None:
        """Walk the heap in order (pop, then push the live entries back) until a node passes the filter."""
        heap = pool.index
        timeout = self.heartbeat_timeout
        kept = []
        found = None
        while heap:
            entry = heappop(heap)
            node = entry[4]
            if node.key is not entry:
                continue  # stale
            if entry[0] >= 1.0:
                kept.append(entry)
                break
            if now - node.last_heartbeat > timeout:
                self._unindex(node)
                continue
            kept.append(entry)
            if accept(node):
                found = node
                break
        for entry in kept:
            heappush(heap, entry)
        return found

    # The two calls every job makes, written out (no helper calls on the
    # common path): the index makes the decision cheap, so the Python around
    # it is most of the cost, and a peer worth comparing against pays as
    # little of it as it can.
    def dispatch(
        self,
        session_id: str,
        src: str,
        tgt: str,
        *,
        exclude: Iterable[str] | None = None,
        tenant: str | None = None,
        services: Iterable[str] = DEFAULT_SERVICES,
        require_gpu: bool = True,
    ) -> PeerAssignment:
        """Reserve a slot on the best node for one job of ``session_id``.

        Raises :class:`PeerNoPool`, :class:`PeerNoNodeAvailable`, or
        ``TypeError``/``ValueError`` naming a bad argument (nothing changed).
        """
        if type(session_id) is not str or not session_id:
            _check_id(session_id, "session_id")
        if exclude is None and tenant is None and services is DEFAULT_SERVICES and require_gpu is True:
            accept = None
        else:
            accept = self._request_filter(exclude, tenant, services, require_gpu)
        now = self._clock()
        with self._lock:
            pools = self._pairs.get((src, tgt))
            if pools is None:
                pools = self._lookup(src, tgt)
                if not pools:
                    raise PeerNoPool(src, tgt)
            at = self._exp_at
            if at and at[0] <= now:
                self._expire(now)
            node = None
            bound = self._sessions.get(session_id)
            if accept is None and bound is not None and bound[0] == src and bound[1] == tgt:
                # the common job: the top of its session's pool is live, not full and heard from
                heap = bound[2].index
                if heap:
                    top = heap[0]
                    node = top[4]
                    if node.key is not top or top[0] >= 1.0 or now - node.last_heartbeat > self.heartbeat_timeout:
                        node = None
            if node is None:
                node = self._choose(session_id, src, tgt, pools, now, accept)
            # re-key: the chosen node is nearly always the top, so one heapreplace swaps its entry
            pool = node.pool
            inflight = node.inflight + 1
            node.inflight = inflight
            running = node.running
            eff = inflight if inflight > running else running
            kfree = node.max - eff
            pool.free += kfree - node.kfree
            node.kfree = kfree
            old = node.key
            node.key = key = (eff / node.max, node.gpu, self._rand(), next(self._seq), node)
            heap = pool.index
            if heap[0] is old:
                heapreplace(heap, key)
            else:
                heappush(heap, key)
                if len(heap) > 2 * len(pool.members) + 32:
                    self._compact(pool)
            # the reservation
            job_id = self._job_prefix + str(next(self._job_seq))
            expires = now + self.reservation_ttl
            jobs = self._jobs
            pool_id = pool.pool_id
            jobs[job_id] = [node, pool_id, session_id, expires, False]
            ids = self._exp_ids
            ids.append(job_id)
            at.append(expires)
            if len(ids) > 2 * len(jobs) + 4096:
                self._trim_expiry()
        return PeerAssignment(node.node_id, pool_id, job_id, session_id, src, tgt)

    def release(self, job_id: str) -> bool:
        """Return a job's capacity. False when nothing was held (unknown, released or expired)."""
        now = self._clock()
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is None:
                return False
            node = job[0]
            inflight = node.inflight - 1
            node.inflight = inflight
            if node.key is not None:
                pool = node.pool
                running = node.running
                eff = inflight if inflight > running else running
                kfree = node.max - eff
                pool.free += kfree - node.kfree
                node.kfree = kfree
                node.key = key = (eff / node.max, node.gpu, self._rand(), next(self._seq), node)
                heap = pool.index
                heappush(heap, key)
                if len(heap) > 2 * len(pool.members) + 32:
                    self._compact(pool)
            # an expired job not yet swept gave its capacity back all the same; the caller is told it was gone
            return job[4] or job[3] > now  # type: ignore[no-any-return]  # a bool, in an Any slot


#: the peer ``pysched bench`` runs: the faster of the two indexes (see the module docstring)
PeerScheduler = HeapPeer
#: index name -> class (``pysched bench --peer-index``)
INDEXES: dict[str, type[_PeerBase]] = {"heap": HeapPeer, "sortedlist": SortedListPeer}
