"""Picks the kernel: the compiled ``_core``, or its pure-Python twin ``_pycore``.

The *kernel* is the implementation of selection, reservation counting and
the one-call dispatch; both modules have the same surface (``_core.pyi``
types it, ``tests/test_kernel.py`` checks the twin against it).
``PYSCHED_PURE_PYTHON=1`` forces the twin. Without it, a missing extension
falls back to the twin with a ``RuntimeWarning`` (a test in the suite fails
when that happens to an installed package, so a broken build cannot pass
silently).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = ["COMPILED", "kernel", "resolve"]


def _default() -> ModuleType:
    """The kernel ``kernel="auto"`` means in this process."""
    if os.environ.get("PYSCHED_PURE_PYTHON", "") not in ("", "0"):
        from pysched import _pycore

        return _pycore
    try:
        from pysched import _core
    except ImportError as exc:  # pragma: no cover - exercised only by broken installs
        warnings.warn(
            f"pysched: compiled kernel unavailable ({exc}); using the slow pure-Python twin",
            RuntimeWarning,
            stacklevel=3,
        )
        from pysched import _pycore

        return _pycore
    return _core


if TYPE_CHECKING:
    # Typed as the compiled module (its stub, ``_core.pyi``): the twin has the same surface.
    from pysched import _core as kernel
else:
    #: the kernel module of ``kernel="auto"``: ``pysched._core``, or ``pysched._pycore``
    #: when it is forced or the extension is missing
    kernel = _default()

#: True when :data:`kernel` is the compiled ``_core``
COMPILED: bool = kernel.COMPILED


def resolve(name: str = "auto") -> ModuleType:
    """The kernel module for a ``kernel=`` argument.

    :param name: ``"auto"`` (:data:`kernel`), ``"compiled"`` (``pysched._core``)
        or ``"python"`` (``pysched._pycore``).
    :raises ValueError: for any other value.
    :raises ImportError: for ``"compiled"`` when the extension is not built.
    """
    if name == "auto":
        return kernel
    if name == "python":
        from pysched import _pycore

        return _pycore
    if name == "compiled":
        from pysched import _core

        return _core
    raise ValueError(f"kernel must be 'auto', 'compiled' or 'python', got {name!r}")
