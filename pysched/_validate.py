"""Boundary checks shared by every :class:`~pysched.Scheduler` entry point.

Each check raises ``TypeError`` (wrong type) or ``ValueError`` (right type,
bad value) naming the argument and the value it got, and changes nothing:
entry points run every check before they touch any state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pysched.errors import SchedulerError
from pysched.results import DispatchRequest

if TYPE_CHECKING:
    from pysched.snapshot import RuntimeSnapshot

__all__ = [
    "REQUEST_ERRORS",
    "check_bool",
    "check_callable",
    "check_in_range",
    "check_number",
    "check_positive",
    "check_positive_int",
    "check_seed",
    "check_str",
    "check_tenant_pools",
    "exclude_slots",
    "handle_array",
    "prefer_slots",
    "unpack_request",
]

#: what a batch request's result slot may hold instead of an Assignment (one set, everywhere)
REQUEST_ERRORS: tuple[type[Exception], ...] = (SchedulerError, ValueError, TypeError)

#: the keywords a request mapping of ``dispatch_many`` may carry besides session_id, src and tgt
_REQUEST_KEYWORDS = frozenset({"job_id", "exclude", "tenant", "services", "require_gpu", "prefer"})


def check_number(value: object, name: str) -> float:
    """``value`` as a float; it must be an int or float (not a bool).

    :param value: what the caller passed.
    :param name: the argument's name, for the message.
    :raises TypeError: for any other type.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    return float(value)


def check_positive(value: object, name: str) -> float:
    """``value`` as a float; it must be a positive finite number.

    :param value: what the caller passed.
    :param name: the argument's name, for the message.
    :raises TypeError: if it is not a number.
    :raises ValueError: if it is zero, negative, NaN or infinite.
    """
    number = check_number(value, name)
    if not number > 0 or math.isinf(number):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def check_in_range(value: object, name: str, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a float; it must lie in ``[low, high]`` (``(low, high]`` with ``low_open``).

    :param value: what the caller passed.
    :param name: the argument's name, for the message.
    :param low: the lowest value allowed (excluded with ``low_open``).
    :param high: the highest value allowed.
    :param low_open: whether ``low`` itself is refused.
    :raises TypeError: if it is not a number.
    :raises ValueError: if it is outside the range (or NaN).
    """
    number = check_number(value, name)
    above_low = number > low if low_open else number >= low
    if not (above_low and number <= high):
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return number


def check_positive_int(value: object, name: str) -> int:
    """``value``, which must be an ``int`` >= 1 (not a bool).

    :param value: what the caller passed.
    :param name: the argument's name, for the message.
    :raises ValueError: for anything else.
    """
    if type(value) is not int or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_str(value: object, name: str) -> str:
    """``value``, which must be a non-empty ``str``.

    :param value: what the caller passed.
    :param name: the argument's name, for the message.
    :raises TypeError: if it is not a ``str``.
    :raises ValueError: if it is empty.
    """
    if type(value) is not str:
        raise TypeError(f"{name} must be a str, got {type(value).__name__}: {value!r}")
    if not value:
        raise ValueError(f"{name} must be a non-empty str, got {value!r}")
    return value


def check_bool(value: object, name: str) -> bool:
    """``value``, which must be a ``bool``.

    :param value: what the caller passed.
    :param name: the argument's name, for the message.
    :raises TypeError: for anything else.
    """
    if type(value) is not bool:
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")
    return value


def check_callable(value: object, name: str) -> Callable[..., object]:
    """``value``, which must be callable.

    :param value: what the caller passed.
    :param name: the argument's name, for the message.
    :raises TypeError: if it is not.
    """
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {value!r}")
    return value


def check_seed(seed: object) -> int | None:
    """``seed``, which must be an ``int`` or ``None``.

    :param seed: what the caller passed.
    :raises TypeError: for anything else.
    """
    if seed is not None and type(seed) is not int:
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}: {seed!r}")
    return seed


def check_tenant_pools(tenant_pools: object) -> dict[str, int]:
    """A copy of ``tenant_pools``: tenant (a non-empty str) -> pool id (an int >= 0).

    :param tenant_pools: what the caller passed; ``None`` means no tenant prefers a pool.
    :raises TypeError: if it is not a mapping, or a tenant is not a ``str``.
    :raises ValueError: for an empty tenant or a value that is not a pool id.
    """
    if tenant_pools is None:
        return {}
    if not isinstance(tenant_pools, Mapping):
        raise TypeError(f"tenant_pools must be a mapping tenant -> pool id, got {type(tenant_pools).__name__}")
    out = {}
    for tenant, pool_id in tenant_pools.items():
        check_str(tenant, "tenant_pools key")
        if type(pool_id) is not int or pool_id < 0:
            raise ValueError(f"tenant_pools[{tenant!r}] must be a pool id (int >= 0), got {pool_id!r}")
        out[tenant] = pool_id
    return out


def exclude_slots(snap: RuntimeSnapshot, exclude: object) -> tuple[int, ...]:
    """Slots of the live nodes ``exclude`` names (unknown ids are skipped: they can't be chosen anyway).

    :param snap: the snapshot the job is placed in.
    :param exclude: an iterable of node ids, or ``None``.
    :raises TypeError: if it is a ``str``/``bytes``, not iterable, or holds a non-``str``.
    """
    if exclude is None:
        return ()
    if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):
        raise TypeError(f"exclude must be an iterable of node ids, got {type(exclude).__name__}: {exclude!r}")
    slots = []
    for node_id in exclude:
        if type(node_id) is not str:
            raise TypeError(f"exclude must hold node id strs, got {type(node_id).__name__}: {node_id!r}")
        slot = snap.slot(node_id)
        if slot is not None:
            slots.append(slot)
    return tuple(slots)


def prefer_slots(snap: RuntimeSnapshot, prefer: object) -> tuple[int, ...]:
    """Slots of the live preferred nodes, in order, each once (unknown ids are skipped, like ``exclude``).

    :param snap: the snapshot the job is placed in.
    :param prefer: a node id, or an iterable of node ids in order of preference.
    :raises TypeError: if it is ``bytes``, not iterable, or holds anything but non-empty ``str``.
    :raises ValueError: for an empty node id given alone.
    """
    if type(prefer) is str:
        ids: Iterable[object] = (check_str(prefer, "prefer"),)
    elif isinstance(prefer, bytes) or not isinstance(prefer, Iterable):
        raise TypeError(f"prefer must be a node id or an iterable of node ids, got "
                        f"{type(prefer).__name__}: {prefer!r}")
    else:
        ids = list(prefer)
    slots: list[int] = []
    for node_id in ids:
        if type(node_id) is not str or not node_id:
            raise TypeError(f"prefer must hold node id strs, got {type(node_id).__name__}: {node_id!r}")
        slot = snap.slot(node_id)
        if slot is not None and slot not in slots:
            slots.append(slot)
    return tuple(slots)


def unpack_request(req: object) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(session_id, src, tgt, keywords)`` of one :meth:`Scheduler.dispatch_many` request.

    Only the shape is checked here: the values are the caller's, unchecked
    (hence ``Any``), until :meth:`Scheduler.dispatch` checks them.

    :param req: ``(session_id, src, tgt)``, a mapping with the keywords of
        :meth:`Scheduler.dispatch`, or a :class:`DispatchRequest`.
    :raises ValueError: for a mapping without ``session_id``, ``src`` or ``tgt``.
    :raises TypeError: for unknown keywords, or a request of another shape.
    """
    if isinstance(req, DispatchRequest):
        return req.session_id, req.src, req.tgt, {
            "job_id": req.job_id, "exclude": req.exclude or None, "tenant": req.tenant, "services": req.services,
        }
    if isinstance(req, Mapping):
        kw = dict(req)
        try:
            sid, src, tgt = kw.pop("session_id"), kw.pop("src"), kw.pop("tgt")
        except KeyError as exc:
            raise ValueError(f"request {req!r} is missing {exc.args[0]!r}") from None
        unknown = set(kw) - _REQUEST_KEYWORDS
        if unknown:
            raise TypeError(f"request has unknown keywords {sorted(unknown)!r}")
        return sid, src, tgt, kw
    if isinstance(req, tuple) and len(req) == 3:  # noqa: PLR2004  (session_id, src, tgt)
        return req[0], req[1], req[2], {}
    raise TypeError(f"a request must be (session_id, src, tgt), a mapping or a DispatchRequest, got {req!r}")


def handle_array(handles: object) -> np.ndarray:
    """``handles`` as a flat contiguous ``int64`` array (:meth:`Scheduler.dispatch_batch` handles).

    :param handles: a sequence or array of integers.
    :raises TypeError: for an array of anything but integers (an empty one passes).
    """
    arr = np.asarray(handles)
    if arr.dtype.kind not in "iu" and arr.size != 0:
        raise TypeError(f"handles must be integers, got an array of {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64).reshape(-1)
