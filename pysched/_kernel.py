"""Picks the kernel implementation: the compiled ``_core``, or its pure-Python twin.

``PYSCHED_PURE_PYTHON=1`` forces the twin. Without it, a missing extension
falls back to the twin with a ``RuntimeWarning`` (a test in the suite fails
when that happens to an installed package, so a broken build cannot pass
silently).
"""

from __future__ import annotations

import os
import warnings

if os.environ.get("PYSCHED_PURE_PYTHON", "") not in ("", "0"):
    from pysched import _pycore as core
else:
    try:
        from pysched import _core as core
    except ImportError as exc:  # pragma: no cover - exercised only by broken installs
        warnings.warn(
            f"pysched: compiled kernel unavailable ({exc}); using the slow pure-Python twin",
            RuntimeWarning,
            stacklevel=2,
        )
        from pysched import _pycore as core

COMPILED: bool = core.COMPILED

__all__ = ["core", "COMPILED", "resolve"]


def resolve(kernel: str = "auto"):
    """The kernel module for a ``kernel=`` argument: "auto", "compiled" or "python"."""
    if kernel == "auto":
        return core
    if kernel == "python":
        from pysched import _pycore

        return _pycore
    if kernel == "compiled":
        from pysched import _core

        return _core
    raise ValueError(f"kernel must be 'auto', 'compiled' or 'python', got {kernel!r}")
