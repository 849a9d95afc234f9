"""Python SDK for a ``pysched serve`` server: ``pip install "pysched[serve]"``.

* :class:`NodeClient` — a worker node (asyncio): connect with the node
  token, register, send heartbeats in the background, receive jobs with
  ``async for job in node.jobs()``, answer with ``await job.reply(...)``;
  reconnects with backoff and registers again.
* :class:`JobClient` — a job client, synchronous (``submit``, ``dispatch``,
  ``commit``, ``release``) and asynchronous (``asubmit``, ...), with
  session streams (``async with client.session(id) as s``).

Errors are the typed exceptions of :mod:`pysched.client.errors`. The wire
format is :mod:`pysched.serve.protocol` (reference: ``docs/protocol.md``);
the SDK imports msgspec, websockets and httpx, never the server's
Starlette/uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pysched.client.errors import (
        AuthError,
        BadRequest,
        JobFailed,
        NoNodeAvailable,
        NoPoolForLanguagePair,
        ServeError,
        ServeUnavailable,
        UnknownJob,
        WrongNode,
    )
    from pysched.client.jobs import JobClient, JobResult, SessionStream
    from pysched.client.node import Job, NodeClient

# Loaded on first use, so that `pysched.client.demo` (imported while the
# `pysched` command builds its parser) pulls in no websockets/httpx/msgspec.
_WHERE = {
    "AuthError": "errors", "BadRequest": "errors", "JobFailed": "errors", "NoNodeAvailable": "errors",
    "NoPoolForLanguagePair": "errors", "ServeError": "errors", "ServeUnavailable": "errors",
    "UnknownJob": "errors", "WrongNode": "errors",
    "JobClient": "jobs", "JobResult": "jobs", "SessionStream": "jobs",
    "Job": "node", "NodeClient": "node",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pysched.client' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"pysched.client.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "AuthError",
    "BadRequest",
    "Job",
    "JobClient",
    "JobFailed",
    "JobResult",
    "NoNodeAvailable",
    "NoPoolForLanguagePair",
    "NodeClient",
    "ServeError",
    "ServeUnavailable",
    "SessionStream",
    "UnknownJob",
    "WrongNode",
]
