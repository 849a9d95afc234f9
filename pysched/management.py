"""The management layer: nodes, pools and the language index behind one lock.

Everything slow happens here (validation, registration, heartbeats, pool
changes, index rebuilds) under a single ``threading.Lock``, and every
structural change ends by publishing a new :class:`RuntimeSnapshot` with one
reference assignment. Dispatch never takes this lock; it reads
``registry.snapshot`` once and works on that.

Heartbeats that only carry load figures write them in place into the shared
load table and publish nothing. Management code never touches sessions; it
does tell the reservation backend about node slots (registration, removal,
capacity growth), with the lock order management -> reservation, which no
reservation code ever reverses.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from pysched._impl import kernel as default_kernel
from pysched._layout import (
    FLAG_HAS_GPU,
    FLAG_PUBLIC,
    NODE_DTYPE,
    STATUS_ABSENT,
    STATUS_CODES,
)
from pysched.errors import ReservationBackendUnavailable, UnknownNode
from pysched.language_index import PoolLanguageIndex
from pysched.languages import MAX_SERVICES, normalize_languages, normalize_services
from pysched.pools import MAX_POOL_ID, PoolConfig, auto_pool_name
from pysched.reservations import ReservationBackend
from pysched.snapshot import PoolMeta, RuntimeSnapshot

if TYPE_CHECKING:
    from pysched import _core

__all__ = ["ManagementRegistry", "NodeState", "UNHEALTHY_LIMIT"]

#: consecutive ``healthy=False`` heartbeats that turn a ready node degraded
UNHEALTHY_LIMIT = 3

_STATUS_NAMES = {code: name for name, code in STATUS_CODES.items()}

#: the largest count or limit a node may report (the kernel keeps them as int32)
_INT32_MAX = 2**31 - 1
#: load figures are percentages
_MAX_PERCENT = 100.0
#: the longest node id, in characters
_MAX_NODE_ID_LENGTH = 256


class NodeState:
    """Management's own record of one node (never seen by dispatch).

    :param node_id: the node's id.
    :param slot: its slot in the per-node arrays (for the scheduler's life).
    """

    __slots__ = ("node_id", "slot", "languages", "services", "max_concurrency", "has_gpu", "public", "status",
                 "unhealthy_streak", "pool_ids", "registered_at", "warming", "marked_offline_at")

    def __init__(self, node_id: str, slot: int) -> None:
        self.node_id = node_id
        self.slot = slot
        self.languages: frozenset[str] = frozenset()
        self.services: frozenset[str] = frozenset()
        self.max_concurrency = 1
        self.has_gpu = True
        self.public = True
        self.status = "ready"
        self.unhealthy_streak = 0
        self.pool_ids: tuple[int, ...] = ()
        self.registered_at = 0.0
        #: registered with ``ready=False`` and no ``healthy=True`` heartbeat (or resume) since
        self.warming = False
        #: when an operator marked it offline (meaningful while status is "offline")
        self.marked_offline_at = math.inf


def _check_int(value: object, name: str, minimum: int) -> int:
    if type(value) is int and minimum <= value <= _INT32_MAX:
        return value
    if type(value) is not int and not isinstance(value, np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum or value > _INT32_MAX:
        raise ValueError(f"{name} must be in [{minimum}, {_INT32_MAX}], got {value!r}")
    return int(value)


def _check_bool(value: object, name: str) -> bool:
    if type(value) is not bool and not isinstance(value, np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")
    return bool(value)


def _check_percent(value: object, name: str) -> float:
    if type(value) is float and 0.0 <= value <= _MAX_PERCENT:
        return value  # the usual heartbeat figure: one type check, one chained compare (NaN fails it)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    number = float(value)
    if math.isnan(number) or not 0.0 <= number <= _MAX_PERCENT:
        raise ValueError(f"{name} must be a percentage in [0, 100], got {value!r}")
    return number


def _node_key(node_id: object) -> str:
    """A node id to look up: any str (unknown ones raise UnknownNode later), never a bare "unhashable type"."""
    if type(node_id) is not str and not isinstance(node_id, str):
        raise TypeError(f"node_id must be a str, got {type(node_id).__name__}: {node_id!r}")
    return node_id


def check_forget_after(value: object) -> float | None:
    """Validate ``forget_after``: ``None`` (never forget) or a positive finite number of seconds.

    :raises TypeError: for a non-number.
    :raises ValueError: for a number that is not positive and finite.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"forget_after must be a number of seconds or None, got {type(value).__name__}: {value!r}")
    number = float(value)
    if not 0.0 < number < math.inf:
        raise ValueError(f"forget_after must be a positive finite number of seconds or None, got {value!r}")
    return number


def check_node_id(node_id: object) -> str:
    """Validate a node id: a non-empty str of printable characters.

    :raises TypeError: for a non-string.
    :raises ValueError: for an empty, too long or unprintable id.
    """
    if not isinstance(node_id, str):
        raise TypeError(f"node_id must be a str, got {type(node_id).__name__}: {node_id!r}")
    if not node_id or len(node_id) > _MAX_NODE_ID_LENGTH or not node_id.isprintable():
        raise ValueError(f"node_id must be 1-{_MAX_NODE_ID_LENGTH} printable characters, got {node_id!r}")
    return node_id


class ManagementRegistry:
    """Owns nodes, pools and the language index; publishes snapshots.

    All public methods are thread-safe. ``snapshot`` is the current
    :class:`RuntimeSnapshot`; reading it needs no lock.

    Placement has one owner: every change of a node's languages or services
    (registration, re-registration, heartbeat) goes through
    :meth:`_place_locked`, and every change that can open room or a pool
    (a node placed, moved or removed, :meth:`set_pools`) ends with
    :meth:`_retry_unpooled_locked`. After each public call:

    * manual mode: a node is in exactly the pools whose languages it all
      speaks and whose required services it all runs;
    * auto mode: a node is in the pool of its language set when that pool
      exists or there is room for it under ``max_pools``; otherwise it waits
      in ``unpooled`` (in arrival order), and it joins as soon as its set's
      pool appears or a pool retires and makes room (the longest-waiting
      node's set first). An auto pool retires when its last node leaves;
    * a node without a pool is listed in ``unpooled``, and only then.

    Status (draining, degraded, offline, registering) never changes membership.

    :param pools: ``"auto"``, or the manual pools.
    :param heartbeat_timeout: seconds of silence after which a node counts as offline.
    :param resource_threshold: the cpu/gpu/mem percentage at which a node is overloaded.
    :param max_pools: the most pools at once.
    :param clock: the scheduler's clock.
    :param rng: the kernel's ``Rng`` (tie-breaks), handed to every ``SnapshotKernel``.
    :param reservations: the backend told about node slots (registration,
        removal, capacity growth), under the lock.
    :param nogil_min_pool: pool size from which the compiled kernel scans without the GIL.
    :param core: the kernel module (``pysched._core`` or ``pysched._pycore``).
    :param forget_after: seconds offline after which an idle node is forgotten
        (:meth:`forget_offline`); ``None``: never.
    """

    def __init__(
        self,
        *,
        pools: str | Sequence[PoolConfig],
        heartbeat_timeout: float,
        resource_threshold: float,
        max_pools: int,
        clock: Callable[[], float],
        rng: object,
        reservations: ReservationBackend,
        nogil_min_pool: int = 4096,
        core: ModuleType = default_kernel,
        forget_after: float | None = None,
    ) -> None:
        self._forget_after = check_forget_after(forget_after)
        self._lock = threading.Lock()
        self._kernel = core
        self._clock = clock
        self._rng = rng
        self._reservations = reservations
        self._heartbeat_timeout = heartbeat_timeout
        self._threshold = resource_threshold
        self._max_pools = max_pools
        self._nogil_min_pool = nogil_min_pool

        self._nodes: dict[str, NodeState] = {}
        # slot -> node id and back; a slot belongs to one node id for life, so a
        # node that is removed and registers again finds its old slot (and any
        # reservations it still holds there).
        self._node_ids: list[str] = []
        self._slot_of: dict[str, int] = {}
        self._loads: _core.LoadTable = core.LoadTable(0)
        self._recs: NDArray[np.void] = np.zeros(0, dtype=NODE_DTYPE)
        self._recs_shared = True  # the current recs array belongs to a published snapshot
        # slots whose record was written since the last publication: every write
        # to recs goes through _write_rec_locked or _remove_locked, which append
        self._changed_slots: list[int] = []
        self._service_bits: dict[str, int] = {}

        # pools
        self._auto = True
        self._manual: tuple[PoolConfig, ...] = ()
        self._auto_ids: dict[frozenset[str], int] = {}
        self._next_pool_id = 1
        self._meta: dict[int, PoolMeta] = {}
        self._members: dict[int, NDArray[np.int32]] = {}  # active pool id -> sorted slots
        self._unpooled: dict[str, None] = {}  # insertion-ordered set of node ids
        self._pools_grew = False  # an auto pool opened since the last retry of the unpooled nodes
        # The earliest time any node could be due to be forgotten (a lower
        # bound: heartbeats only move a node's time later, and the calls that
        # can move it earlier lower this), so that forget_offline() is one
        # comparison until then.
        self._forget_next = math.inf
        self._index_dirty = True
        self._members_dirty = True
        self._index: PoolLanguageIndex | None = None  # built by the first publication
        self._pool_off: NDArray[np.int32] = np.zeros(1, dtype=np.int32)
        self._pool_members: NDArray[np.int32] = np.zeros(0, dtype=np.int32)

        #: auto mode: language set -> new pool id. The default counts up locally;
        #: a fleet of processes installs one that allocates ids in shared storage
        #: so that every process gives the same set the same id.
        self.pool_id_allocator: Callable[[frozenset[str]], int] | None = None
        #: told each new snapshot right after it is published, under the lock
        #: (the compiled dispatch caches what it reads from it; it must be quick)
        self.on_publish: Callable[[RuntimeSnapshot], None] | None = None

        self.version = 0
        self.snapshot: RuntimeSnapshot
        with self._lock:
            if isinstance(pools, str):
                if pools != "auto":
                    raise ValueError(f"pools must be 'auto' or a sequence of PoolConfig, got {pools!r}")
            else:
                self._set_manual_locked(self._check_pool_configs(pools))
            self._publish_locked()

    # ------------------------------------------------------------------ reads
    @property
    def service_bits(self) -> dict[str, int]:
        """Service name -> bit index. Grows only; safe to read without the lock."""
        return self._service_bits

    @property
    def slot_of(self) -> dict[str, int]:
        """Node id -> slot, for every node ever registered. Grows only; safe to read without the lock."""
        return self._slot_of

    def node_ids(self) -> list[str]:
        """The registered node ids, in registration order."""
        with self._lock:
            return list(self._nodes)

    # A report of mixed value types, served as JSON (Any: its readers index it by key).
    def node_info(self, node_id: str) -> dict[str, Any]:
        """Management's view of one node (status, languages, services, pools, loads).

        :raises UnknownNode: if ``node_id`` is not registered.
        """
        node_id = _node_key(node_id)
        with self._lock:
            st = self._nodes.get(node_id)
            if st is None:
                raise UnknownNode(node_id)
            last, cpu, gpu, mem, running = self._loads.get(st.slot)
            return {
                "node_id": st.node_id,
                "status": self._effective_status(st, last, self._clock()),
                "languages": st.languages,
                "services": st.services,
                "max_concurrency": st.max_concurrency,
                "has_gpu": st.has_gpu,
                "accept_public_jobs": st.public,
                "pool_ids": st.pool_ids,
                "running": running,
                "cpu": cpu,
                "gpu": gpu,
                "mem": mem,
                "last_heartbeat": last,
            }

    def _effective_status(self, st: NodeState, last_heartbeat: float, now: float) -> str:
        if st.status != "offline" and now - last_heartbeat > self._heartbeat_timeout:
            return "offline"
        return st.status

    # A report of mixed value types, which the scheduler extends and serves as JSON.
    def stats(self) -> dict[str, Any]:
        """Nodes by status, pools with member counts, nodes without a pool."""
        with self._lock:
            now = self._clock()
            by_status = {name: 0 for name in ("ready", "registering", "degraded", "draining", "offline")}
            for st in self._nodes.values():
                by_status[self._effective_status(st, self._loads.get(st.slot)[0], now)] += 1
            pools = {
                pid: {"name": self._meta[pid].name, "members": int(len(self._members[pid]))}
                for pid in sorted(self._members)
            }
            return {
                "nodes": by_status,
                "nodes_total": len(self._nodes),
                "pools": pools,
                "unpooled": list(self._unpooled),
                "snapshot_version": self.version,
                "mode": "auto" if self._auto else "manual",
            }

    def pool_configs(self) -> list[tuple[PoolMeta, tuple[str, ...]]]:
        """Each active pool, by pool id, with its member node ids (in slot order)."""
        with self._lock:
            return [
                (self._meta[pid], tuple(self._node_ids[s] for s in self._members[pid]))
                for pid in sorted(self._members)
            ]

    # ------------------------------------------------------------ registration
    def register(  # noqa: PLR0917  Scheduler.register_node's arguments, which it passes on in order
        self,
        node_id: str,
        languages: Iterable[str],
        services: Iterable[str],
        max_concurrency: int,
        has_gpu: bool,
        accept_public_jobs: bool,
        ready: bool = True,
    ) -> None:
        """Register (or re-register: a fresh start) a node.

        ``ready=False`` starts it ``registering`` (not eligible, reason
        ``not_ready``) until its first ``healthy=True`` heartbeat.

        :raises TypeError: an argument of the wrong type, naming it.
        :raises ValueError: a bad value, naming it; nothing is changed.
        :raises ReservationBackendUnavailable: the backend could not be told;
            nothing is changed.
        """
        node_id = check_node_id(node_id)
        langs = normalize_languages(languages, "languages")
        servs = normalize_services(services, "services")
        max_concurrency = _check_int(max_concurrency, "max_concurrency", 1)
        has_gpu = _check_bool(has_gpu, "has_gpu")
        public = _check_bool(accept_public_jobs, "accept_public_jobs")
        ready = _check_bool(ready, "ready")
        with self._lock:
            self._check_service_room_locked(servs)
            if self._auto:
                self._reserve_pool_id_locked(langs)
            known = self._slot_of.get(node_id)
            new_slot = known is None
            slot = len(self._node_ids) if known is None else known
            # The backend may fail (Redis down): ask it before changing anything.
            self._reservations.ensure_capacity(slot + 1)
            self._reservations.bind_node(slot, node_id, max_concurrency)
            if new_slot:
                self._node_ids.append(node_id)
                self._slot_of[node_id] = slot
            self._ensure_slots_locked(slot + 1)
            self._assign_service_bits_locked(servs)
            st = self._nodes.get(node_id)
            if st is None:
                st = self._nodes[node_id] = NodeState(node_id, slot)
            now = self._clock()
            st.languages, st.services = langs, servs
            st.max_concurrency, st.has_gpu, st.public = max_concurrency, has_gpu, public
            st.status, st.unhealthy_streak, st.registered_at = ("ready" if ready else "registering"), 0, now
            st.warming, st.marked_offline_at = not ready, math.inf
            if self._forget_after is not None:
                self._forget_next = min(self._forget_next, now + self._heartbeat_timeout + self._forget_after)
            # A (re-)registration is a fresh start: the node reports nothing running yet.
            self._loads.update(slot, now, 0.0, 0.0, 0.0, 0)
            self._write_rec_locked(st)
            self._place_locked(st)
            self._publish_locked()

    def remove(self, node_id: str) -> None:
        """Remove a node: no pool, no new reservations; its slot stays its own.

        :raises UnknownNode: if ``node_id`` is not registered.
        """
        node_id = _node_key(node_id)
        with self._lock:
            st = self._nodes.get(node_id)
            if st is None:
                raise UnknownNode(node_id)
            self._remove_locked(st)
            self._publish_locked()

    def _remove_locked(self, st: NodeState) -> None:
        # The backend may fail (Redis down): ask it before changing anything.
        self._reservations.unbind_node(st.slot, st.node_id)
        del self._nodes[st.node_id]
        self._unpooled.pop(st.node_id, None)
        recs = self._writable_recs_locked()
        recs[st.slot] = (0, 0, STATUS_ABSENT, 0, 0)
        self._changed_slots.append(st.slot)
        self._leave_pools_locked(st, (), st.pool_ids)
        st.pool_ids = ()
        self._retry_unpooled_locked()

    # ------------------------------------------------------------ forgetting
    def _offline_since(self, st: NodeState, last_heartbeat: float) -> float:
        """When the node went (or, silent from now on, will go) offline.

        By heartbeat age it is offline from ``last + heartbeat_timeout``; an
        operator's mark can only make that earlier.
        """
        aged = last_heartbeat + self._heartbeat_timeout
        return min(st.marked_offline_at, aged) if st.status == "offline" else aged

    def forget_offline(self, now: float) -> list[tuple[str, float]]:
        """Remove nodes offline for at least ``forget_after`` s that hold nothing.

        Returns ``(node_id, offline_for)`` of each node removed. Cheap to call
        often: until the earliest time any node could be due it is one
        comparison, no lock. The reservation backend is asked
        (``count(node_id) == 0``) outside the management lock, and a node is
        removed only if, under the lock, it is still offline long enough (a
        heartbeat that landed meanwhile keeps it). A node that was due but
        held jobs, or could not be checked (backend unavailable), is looked
        at again after ``min(forget_after, heartbeat_timeout)``.
        """
        forget_after = self._forget_after
        if forget_after is None or now < self._forget_next:
            return []
        recheck = now + min(forget_after, self._heartbeat_timeout)
        with self._lock:
            if now < self._forget_next:
                return []
            due: list[tuple[NodeState, float]] = []
            earliest = math.inf
            for st in self._nodes.values():
                at = self._offline_since(st, self._loads.get(st.slot)[0]) + forget_after
                if now >= at:
                    due.append((st, at))
                elif at < earliest:
                    earliest = at
            # Conservative while the due ones are being checked: a held one
            # (or one the backend could not tell about) is looked at again.
            self._forget_next = min(earliest, recheck) if due else earliest
        if not due:
            return []
        idle: list[NodeState] = []
        for st, _ in due:
            try:
                if self._reservations.count(st.node_id) == 0:
                    idle.append(st)
            except ReservationBackendUnavailable:
                break  # nothing can be told now; the recheck time is already set
        forgotten: list[tuple[str, float]] = []
        if not idle:
            return forgotten
        with self._lock:
            for st in idle:
                if self._nodes.get(st.node_id) is not st:
                    continue  # removed or re-registered meanwhile
                since = self._offline_since(st, self._loads.get(st.slot)[0])
                if now < since + forget_after:
                    continue  # a sign of life meanwhile
                try:
                    self._remove_locked(st)
                except ReservationBackendUnavailable:
                    self._forget_next = min(self._forget_next, recheck)
                    break
                forgotten.append((st.node_id, now - since))
            if forgotten:
                self._publish_locked()
        return forgotten

    # -------------------------------------------------------------- heartbeats
    def heartbeat(  # noqa: PLR0917  Scheduler.heartbeat's fields, passed on in order on every heartbeat
        self,
        node_id: str,
        running: int | None = None,
        cpu: float | None = None,
        gpu: float | None = None,
        mem: float | None = None,
        services: Iterable[str] | None = None,
        languages: Iterable[str] | None = None,
        healthy: bool | None = None,
        max_concurrency: int | None = None,
    ) -> bool:
        """Apply one heartbeat; True when some offline node could now be due for :meth:`forget_offline`."""
        running_v = -1 if running is None else _check_int(running, "running", 0)
        cpu_v = math.nan if cpu is None else _check_percent(cpu, "cpu")
        gpu_v = math.nan if gpu is None else _check_percent(gpu, "gpu")
        mem_v = math.nan if mem is None else _check_percent(mem, "mem")
        servs = None if services is None else normalize_services(services, "services")
        langs = None if languages is None else normalize_languages(languages, "languages")
        healthy_v = None if healthy is None else _check_bool(healthy, "healthy")
        max_v = None if max_concurrency is None else _check_int(max_concurrency, "max_concurrency", 1)
        if type(node_id) is not str:  # the hot path pays one type check
            node_id = _node_key(node_id)
        with self._lock:
            st = self._nodes.get(node_id)
            if st is None:
                raise UnknownNode(node_id)
            if servs is not None:
                self._check_service_room_locked(servs)
            if langs is not None and self._auto:
                self._reserve_pool_id_locked(langs)
            if max_v is not None and max_v != st.max_concurrency:
                self._reservations.bind_node(st.slot, node_id, max_v)
            structural = moved = False
            if servs is not None and servs != st.services:
                self._assign_service_bits_locked(servs)
                st.services = servs
                structural = moved = True
            if langs is not None and langs != st.languages:
                st.languages = langs
                structural = moved = True
            if max_v is not None and max_v != st.max_concurrency:
                st.max_concurrency = max_v
                structural = True
            status = st.status
            if status == "offline":
                # a node marked offline that reports again is back (still warming up if it never was ready)
                status = "registering" if st.warming else "ready"
            if healthy_v is False:
                st.unhealthy_streak += 1
                if st.unhealthy_streak >= UNHEALTHY_LIMIT and status == "ready":
                    status = "degraded"
            elif healthy_v is True:
                st.unhealthy_streak = 0
                st.warming = False
                if status in ("degraded", "registering"):
                    status = "ready"
            if status != st.status:
                st.status = status
                structural = True
            now = self._clock()
            self._loads.update(st.slot, now, cpu_v, gpu_v, mem_v, running_v)
            if moved:
                # languages decide auto pools; languages and services decide manual ones
                self._place_locked(st)
            if structural:
                self._write_rec_locked(st)
                self._publish_locked()
        # the caller runs forget_offline only when some node could be due (no extra clock read)
        return now >= self._forget_next

    def set_status(self, node_id: str, status: str) -> None:
        """Operator status change: ``draining``, ``offline`` or back to ``ready``.

        ``ready`` (resume) is the operator's word that the node is alive and
        ready: it counts as a heartbeat (so a node offline by heartbeat age
        is back too, until it stays silent for ``heartbeat_timeout`` again)
        and ends a ``registering`` or ``degraded`` state.
        """
        if status not in ("ready", "draining", "offline"):
            raise ValueError(f"status must be 'ready', 'draining' or 'offline', got {status!r}")
        node_id = _node_key(node_id)
        with self._lock:
            st = self._nodes.get(node_id)
            if st is None:
                raise UnknownNode(node_id)
            now = self._clock()
            if status == "ready":
                # Load figures are written in place: the sign of life alone needs no new snapshot.
                self._loads.update(st.slot, now, math.nan, math.nan, math.nan, -1)
                st.warming = False
            if st.status == status and not (status == "ready" and st.unhealthy_streak):
                return
            st.status = status
            st.unhealthy_streak = 0
            if status == "offline":
                st.marked_offline_at = now
                if self._forget_after is not None:
                    since = self._offline_since(st, self._loads.get(st.slot)[0])
                    self._forget_next = min(self._forget_next, since + self._forget_after)
            self._write_rec_locked(st)
            self._publish_locked()

    # ------------------------------------------------------------------ pools
    def set_pools(self, pools: str | Sequence[PoolConfig]) -> None:
        """Switch to ``"auto"`` pools or to these manual pools, and place every node again.

        :raises TypeError: ``pools`` is neither ``"auto"`` nor a sequence of :class:`PoolConfig`.
        :raises ValueError: a duplicate pool id, more than ``max_pools``
            pools, or too many distinct services; nothing is changed.
        """
        configs: tuple[PoolConfig, ...] | None
        if isinstance(pools, str):
            if pools != "auto":
                raise ValueError(f"pools must be 'auto' or a sequence of PoolConfig, got {pools!r}")
            configs = None
        else:
            configs = self._check_pool_configs(pools)
        with self._lock:
            if configs is None:
                # ids first: an allocator that fails leaves everything as it was
                for langs in {st.languages for st in self._nodes.values()}:
                    self._reserve_pool_id_locked(langs)
                self._auto = True
                self._manual = ()
                self._meta = {}
                self._members = {}
            else:
                self._set_manual_locked(configs)
            self._unpooled.clear()
            self._index_dirty = self._members_dirty = True
            # Place every node in one pass and build each pool's array once
            # (placing them one by one would copy a pool's array per node).
            slots_of: dict[int, list[int]] = {}
            for st in self._nodes.values():
                if self._auto:
                    pid = self._auto_pool_for_locked(st.languages)
                    st.pool_ids = () if pid is None else (pid,)
                else:
                    st.pool_ids = self._manual_pools_for(st)
                for pid in st.pool_ids:
                    slots_of.setdefault(pid, []).append(st.slot)
                if not st.pool_ids:
                    self._unpooled[st.node_id] = None
            for pid, slots in slots_of.items():
                self._members[pid] = np.array(sorted(slots), dtype=np.int32)
            self._retry_unpooled_locked()
            self._publish_locked()

    def _check_pool_configs(self, pools: object) -> tuple[PoolConfig, ...]:
        if isinstance(pools, (str, bytes)) or not isinstance(pools, Iterable):
            raise TypeError(f"pools must be 'auto' or a sequence of PoolConfig, got {type(pools).__name__}")
        configs = tuple(pools)
        ids: set[int] = set()
        for cfg in configs:
            if not isinstance(cfg, PoolConfig):
                raise TypeError(f"pools must hold PoolConfig objects, got {type(cfg).__name__}: {cfg!r}")
            if cfg.pool_id in ids:
                raise ValueError(f"pools: duplicate pool_id {cfg.pool_id}")
            ids.add(cfg.pool_id)
        if len(configs) > self._max_pools:
            raise ValueError(f"pools: {len(configs)} pools configured, more than max_pools={self._max_pools}")
        return configs

    def _set_manual_locked(self, configs: tuple[PoolConfig, ...]) -> None:
        self._check_service_room_locked(frozenset(s for c in configs for s in c.required_services))
        self._auto = False
        self._manual = configs
        for c in configs:
            self._assign_service_bits_locked(c.required_services)
        self._meta = {
            c.pool_id: PoolMeta(c.pool_id, c.name, c.languages, c.required_services, False) for c in configs
        }
        self._members = {c.pool_id: np.zeros(0, dtype=np.int32) for c in configs}
        # auto ids continue above every id ever used, so they are never reused
        if configs:
            self._next_pool_id = max(self._next_pool_id, max(c.pool_id for c in configs) + 1)
        self._index_dirty = self._members_dirty = True

    def _manual_pools_for(self, st: NodeState) -> tuple[int, ...]:
        """Manual mode: every pool whose languages the node all speaks and whose services it all runs."""
        return tuple(
            c.pool_id for c in self._manual
            if c.languages <= st.languages and c.required_services <= st.services
        )

    def _place_locked(self, st: NodeState) -> None:
        """(Re)compute the pools of one node after its languages or services changed, and move it there.

        The one place a node's membership is decided (``set_pools`` applies
        the same rules to every node in one pass); it ends by letting
        waiting nodes in (the move may have opened a pool or made room).
        """
        old = st.pool_ids
        if self._auto:
            pid = self._auto_ids.get(st.languages)
            if pid is None or old != (pid,):
                # Leave first: the old pool may retire and make room under max_pools.
                self._leave_pools_locked(st, (), old)
                old = st.pool_ids = ()
                pid = self._auto_pool_for_locked(st.languages)
            new: tuple[int, ...] = () if pid is None else (pid,)
        else:
            new = self._manual_pools_for(st)
            self._leave_pools_locked(st, new, old)
        for pid in new:
            if pid not in old:
                self._join_pool_locked(pid, st.slot)
        st.pool_ids = new
        if new:
            self._unpooled.pop(st.node_id, None)
        else:
            self._unpooled[st.node_id] = None
        self._retry_unpooled_locked()

    def _join_pool_locked(self, pid: int, slot: int | list[int]) -> None:
        members = self._members[pid]
        if isinstance(slot, list):
            self._members[pid] = np.union1d(members, np.array(slot, dtype=np.int32)).astype(np.int32)
        else:
            self._members[pid] = np.insert(members, np.searchsorted(members, slot), slot).astype(np.int32)
        self._members_dirty = True

    def _leave_pools_locked(self, st: NodeState, keep: tuple[int, ...], old: tuple[int, ...]) -> None:
        for pid in old:
            if pid in keep:
                continue
            members = self._members[pid]
            self._members[pid] = members[members != st.slot]
            self._members_dirty = True
            if self._auto and len(self._members[pid]) == 0:
                # An empty auto pool is retired from the index; its set keeps the id.
                del self._members[pid]
                del self._meta[pid]
                self._index_dirty = True

    def _auto_pool_for_locked(self, languages: frozenset[str]) -> int | None:
        pid = self._auto_ids.get(languages)
        if pid is not None and pid in self._members:
            return pid
        if len(self._members) >= self._max_pools:
            return None
        if pid is None:
            pid = self._reserve_pool_id_locked(languages)
        self._meta[pid] = PoolMeta(pid, auto_pool_name(languages), languages, frozenset(), True)
        self._members[pid] = np.zeros(0, dtype=np.int32)
        self._index_dirty = True
        self._pools_grew = True  # nodes of this set waiting unpooled join it (_retry_unpooled_locked)
        return pid

    def _reserve_pool_id_locked(self, languages: frozenset[str]) -> int:
        """The id of a language set, allocating it (for life) on first sight.

        Callers run this before changing anything else, so an allocator that
        fails (shared storage down) leaves the registry as it was.
        """
        pid = self._auto_ids.get(languages)
        if pid is not None:
            return pid
        if self.pool_id_allocator is not None:
            pid = int(self.pool_id_allocator(languages))
            if pid in self._meta or pid in self._auto_ids.values() or not 0 <= pid <= MAX_POOL_ID:
                raise RuntimeError(f"pool id allocator returned {pid} for {sorted(languages)}: already used")
            self._next_pool_id = max(self._next_pool_id, pid + 1)
        else:
            pid = self._next_pool_id
            self._next_pool_id += 1
        self._auto_ids[languages] = pid
        return pid

    def _retry_unpooled_locked(self) -> None:
        """Auto mode: give waiting nodes the pool their set now has, or the room a retired pool left.

        Runs after every placement change. A node waits only while its
        set has no pool and there is no room, so nothing can have changed
        for the waiting nodes unless a pool opened or there is room now:
        otherwise this is one comparison. Waiting nodes are taken in
        arrival order, and every node of a set that gets a pool joins it.
        """
        if not self._auto or not self._unpooled:
            self._pools_grew = False
            return
        if not self._pools_grew and len(self._members) >= self._max_pools:
            return
        joins: dict[int, list[int]] = {}
        try:
            for node_id in list(self._unpooled):
                st = self._nodes[node_id]
                pid = self._auto_pool_for_locked(st.languages)  # its set's pool, or a new one while there is room
                if pid is None:
                    continue  # a later node's set may have a pool (opened earlier in this pass)
                joins.setdefault(pid, []).append(st.slot)
                st.pool_ids = (pid,)
                del self._unpooled[node_id]
            self._pools_grew = False
        finally:
            # one array per pool, however many nodes join it
            for pid, slots in joins.items():
                self._join_pool_locked(pid, slots)

    # -------------------------------------------------------------- internals
    def _check_service_room_locked(self, services: frozenset[str]) -> None:
        new = [s for s in services if s not in self._service_bits]
        if len(self._service_bits) + len(new) > MAX_SERVICES:
            raise ValueError(
                f"services: {sorted(new)!r} would exceed the limit of {MAX_SERVICES} distinct service names"
            )

    def _assign_service_bits_locked(self, services: Iterable[str]) -> None:
        for name in sorted(services):
            if name not in self._service_bits:
                self._service_bits[name] = len(self._service_bits)

    def service_mask(self, services: Iterable[str]) -> int | None:
        """Bit mask of the services, or None if one was never announced by anybody."""
        mask = 0
        bits = self._service_bits
        for name in services:
            bit = bits.get(name)
            if bit is None:
                return None
            mask |= 1 << bit
        return mask

    def _ensure_slots_locked(self, n: int) -> None:
        if n <= len(self._recs):
            return
        cap = max(n, 2 * len(self._recs), 64)
        recs = np.zeros(cap, dtype=NODE_DTYPE)
        recs["status"] = STATUS_ABSENT
        recs[: len(self._recs)] = self._recs
        self._recs = recs
        self._recs_shared = False
        self._loads = self._loads.grown(cap)
        self._reservations.ensure_capacity(cap)

    def _writable_recs_locked(self) -> np.ndarray:
        if self._recs_shared:
            # A raw byte copy: numpy copies structured arrays field by field,
            # 16-56x slower than the memcpy this is.
            self._recs = self._recs.view(np.uint8).copy().view(NODE_DTYPE)
            self._recs_shared = False
        return self._recs

    def _write_rec_locked(self, st: NodeState) -> None:
        recs = self._writable_recs_locked()
        mask = self.service_mask(st.services) or 0
        flags = (FLAG_HAS_GPU if st.has_gpu else 0) | (FLAG_PUBLIC if st.public else 0)
        recs[st.slot] = (mask, st.max_concurrency, STATUS_CODES[st.status], flags, 0)
        self._changed_slots.append(st.slot)

    def _publish_locked(self) -> None:
        index = self._index
        if index is None or self._index_dirty:
            order = sorted(self._members)
            index = self._index = PoolLanguageIndex([(pid, self._meta[pid].languages) for pid in order])
            self._index_dirty = False
            self._members_dirty = True
        pools_changed = self._members_dirty
        if self._members_dirty:
            arrays = [self._members[pid] for pid in index.pool_ids]
            sizes = np.array([len(a) for a in arrays], dtype=np.int64)
            self._pool_off = np.zeros(len(arrays) + 1, dtype=np.int32)
            self._pool_off[1:] = np.cumsum(sizes)
            self._pool_members = (
                np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, dtype=np.int32)
            )
            self._members_dirty = False
        recs = self._recs
        recs.flags.writeable = False
        self._recs_shared = True
        inflight = self._reservations.inflight
        previous: RuntimeSnapshot | None = getattr(self, "snapshot", None)  # None: the first publication
        # The slots whose record was written since the last publication, where the
        # writers keep that list: the kernel then re-keys just those in its per-pool
        # ordering instead of comparing every record (O(changes), not O(slots)).
        # None: the kernel compares.
        changed = self._changed_slots
        snapshot_kernel: _core.SnapshotKernel
        if previous is not None and not pools_changed:
            snapshot_kernel = previous.kernel.with_records(recs, self._loads, inflight, changed)
        else:
            snapshot_kernel = self._kernel.SnapshotKernel(
                recs, self._loads, inflight, self._pool_off, self._pool_members, index.pair_off, index.pair_pools,
                index.n_langs, self._rng, self._heartbeat_timeout, self._threshold, self._nogil_min_pool,
                self._node_ids, changed,
            )
        self._changed_slots = []
        self.version += 1
        unpooled = tuple((nid, self._nodes[nid].languages) for nid in self._unpooled)
        self.snapshot = RuntimeSnapshot(
            self.version, recs, self._loads.array, inflight, self._pool_off, self._pool_members, index,
            {pid: self._meta[pid] for pid in index.pool_ids}, unpooled, snapshot_kernel, self._node_ids, self._slot_of,
        )
        if self.on_publish is not None:
            self.on_publish(self.snapshot)
