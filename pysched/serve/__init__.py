"""pysched as a network service: ``pip install "pysched[serve]"``.

:func:`create_app` builds the ASGI application (Starlette) around a
:class:`pysched.Scheduler`; ``pysched serve`` runs it under uvicorn.
Nodes connect on WebSocket ``/v1/nodes``; jobs arrive on ``POST /v1/jobs``,
on session streams ``/v1/sessions/{id}`` or as bare decisions on
``POST /v1/dispatch``. The wire protocol is :mod:`pysched.serve.protocol`
(reference: ``docs/protocol.md``).

This package imports nothing heavy at import time: ``pysched.serve.cli``
and ``pysched.serve.protocol`` must load without Starlette or uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ServeConfig", "create_app"]

if TYPE_CHECKING:  # pragma: no cover
    from pysched.serve.app import create_app
    from pysched.serve.config import ServeConfig


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from pysched.serve.app import create_app

        return create_app
    if name == "ServeConfig":
        from pysched.serve.config import ServeConfig

        return ServeConfig
    raise AttributeError(f"module 'pysched.serve' has no attribute {name!r}")
