"""Exceptions the client SDK raises for answers of a ``pysched serve`` server.

Every error the server reports is a :class:`ServeError` carrying the HTTP
status (or the session stream's ``status``), the error ``code``, the
``message`` and, for bad input, the ``field`` it names. Where the library
already has an exception for the same situation the client raises a class
that is both, so ``except pysched.NoNodeAvailable`` catches a remote refusal
as it catches a local one:

* :class:`NoNodeAvailable` (503, code ``no_node``): also a
  :class:`pysched.NoNodeAvailable`, with ``breakdown``, ``best_reason`` and
  ``retry_after`` (the ``Retry-After`` header, seconds).
* :class:`NoPoolForLanguagePair` (404, ``no_pool``): also a
  :class:`pysched.NoPoolForLanguagePair`.
* :class:`UnknownJob` (404, ``unknown_job``): also a :class:`pysched.UnknownJob`
  (commit/release of a job the server does not hold); :class:`WrongNode`
  (409, ``wrong_node``) is an :class:`UnknownJob` for a job held on another node.
* :class:`BadRequest` (400/413/422, or a bad-input code): also a ``ValueError``.
* :class:`AuthError` (401/403).
* :class:`JobFailed` (502/504; ``timeout``, ``node_lost``, ``cancelled``): the
  server took the job but got no result.
* :class:`ServeUnavailable`: also a ``ConnectionError``: ``draining``,
  ``backend_unavailable``, or no answer at all (refused, reset, timed out).
* :class:`ServeError`: anything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pysched import errors as _lib
from pysched.serve.protocol import ErrorCode as C

__all__ = [
    "AuthError",
    "BadRequest",
    "JobFailed",
    "NoNodeAvailable",
    "NoPoolForLanguagePair",
    "ServeError",
    "ServeUnavailable",
    "UnknownJob",
    "WrongNode",
    "error_from_body",
]


class ServeError(Exception):
    """An error answer of the server (or a failure to get one, see :class:`ServeUnavailable`).

    :param message: what happened, for people.
    :param status: the HTTP status (the session stream reports the same numbers); 0 without an answer.
    :param code: the machine-readable error code (``"no_node"``, ``"invalid"``, ...).
    :param field: the request field a bad-input error names (else None).
    :param body: the decoded error object as sent.
    """

    def __init__(self, message: str, *, status: int = 0, code: str = "error", field: str | None = None,
                 body: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self._init_serve(message, status=status, code=code, field=field, body=body)

    def _init_serve(self, message: str, *, status: int, code: str, field: str | None,
                    body: Mapping[str, Any] | None) -> None:
        self.message = message
        self.status = status
        self.code = code
        self.field = field
        self.body = dict(body) if body is not None else {}

    def __str__(self) -> str:
        where = f" (field {self.field!r})" if self.field else ""
        return f"{self.code} [{self.status}]: {self.message}{where}" if self.status else f"{self.code}: {self.message}"


class AuthError(ServeError):
    """401/403: the token is missing, wrong, or of the wrong kind for this endpoint."""


class BadRequest(ServeError, ValueError):
    """400/422: the request was malformed; ``field`` names the offending field. Nothing changed."""


class JobFailed(ServeError):
    """The server took the job but got no result.

    Its last attempt missed the deadline (``timeout``), its node disconnected
    or failed it (``node_lost``), or it was cancelled (``cancelled``).
    ``body["job_id"]`` and ``body["attempts"]`` say which job and how many tries.
    """


class ServeUnavailable(ServeError, ConnectionError):
    """The server could not be reached, or the connection broke before an answer came."""


class NoNodeAvailable(_lib.NoNodeAvailable, ServeError):
    """503: pools serve the pair but no node can take the job now.

    :param src: the request's source language.
    :param tgt: the request's target language.
    :param breakdown: the server's count of nodes by refusal reason (as in :class:`pysched.NoNodeAvailable`).
    :param best_reason: the server's reason of the node closest to taking the job.
    :param message: the server's message.
    :param status: the HTTP status.
    :param code: the error code.
    :param body: the decoded error object.
    :param retry_after: the server's ``Retry-After`` in seconds, or None.
    """

    def __init__(self, src: str, tgt: str, breakdown: Mapping[str, int], best_reason: str, *, message: str = "",
                 status: int = 503, code: str = "no_node", body: Mapping[str, Any] | None = None,
                 retry_after: float | None = None) -> None:
        _lib.NoNodeAvailable.__init__(self, src, tgt, breakdown, best_reason)
        self._init_serve(message or Exception.__str__(self), status=status, code=code, field=None, body=body)
        self.retry_after = retry_after

    def __str__(self) -> str:
        return Exception.__str__(self)


class NoPoolForLanguagePair(_lib.NoPoolForLanguagePair, ServeError):
    """404: no pool serves the requested language pair.

    :param src: the request's source language.
    :param tgt: the request's target language.
    :param message: the server's message.
    :param status: the HTTP status.
    :param code: the error code.
    :param body: the decoded error object.
    """

    def __init__(self, src: str, tgt: str, *, message: str = "", status: int = 404, code: str = "no_pool",
                 body: Mapping[str, Any] | None = None) -> None:
        _lib.NoPoolForLanguagePair.__init__(self, src, tgt)
        self._init_serve(message or Exception.__str__(self), status=status, code=code, field=None, body=body)

    def __str__(self) -> str:
        return Exception.__str__(self)


class UnknownJob(_lib.UnknownJob, ServeError):
    """404: commit/release named a job the server holds no reservation for.

    :class:`WrongNode`, a subclass, is a job held on another node than the one named.

    :param job_id: the job.
    :param message: the server's message.
    :param status: the HTTP status.
    :param code: the error code.
    :param body: the decoded error object.
    """

    def __init__(self, job_id: object, *, message: str = "", status: int = 404, code: str = "unknown_job",
                 body: Mapping[str, Any] | None = None) -> None:
        _lib.UnknownJob.__init__(self, job_id)
        self._init_serve(message or f"unknown job {job_id!r}", status=status, code=code, field=None, body=body)

    def __str__(self) -> str:
        return _lib.UnknownJob.__str__(self)


_BAD_INPUT = frozenset({C.BAD_MESSAGE, C.UNKNOWN_TYPE, C.INVALID, C.TOO_BIG, C.DUPLICATE_REQUEST})


class WrongNode(UnknownJob, _lib.WrongNode):
    """409: commit/release/renew named a node that does not hold the job.

    :param job_id: the job.
    :param node_id: the node the request named.
    :param message: the server's message.
    :param status: the HTTP status.
    :param code: the error code.
    :param body: the decoded error object.
    """

    def __init__(self, job_id: object, *, node_id: object = None, message: str = "", status: int = 409,
                 code: str = "wrong_node", body: Mapping[str, Any] | None = None) -> None:
        super().__init__(job_id, message=message, status=status, code=code, body=body)
        self.node_id = node_id
        self.holder = None  # the server does not say which node holds it

    def __str__(self) -> str:
        return f"job {self.job_id!r} is not held on node {self.node_id!r}" if self.node_id else self.message


def _retry_after(value: object) -> float | None:
    """A ``Retry-After`` (header text, or the body's number) in seconds; None when absent or not a number."""
    if not isinstance(value, (str, bytes, int, float)):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def error_from_body(status: int, body: Mapping[str, Any] | None, *, src: str = "", tgt: str = "",
                    job_id: str | None = None, node_id: str | None = None, retry_after: object = None) -> ServeError:
    """Build the typed exception for one error answer.

    :param status: the HTTP status (0 when unknown).
    :param body: the decoded JSON error object (``{"error": code, "message",
        "field"?, "breakdown"?, "best_reason"?}`` over HTTP, the same fields
        with ``code`` instead of ``error`` on a session stream).
    :param src: the request's source language, used when the body does not repeat it.
    :param tgt: the request's target language, likewise.
    :param job_id: the request's job, likewise.
    :param node_id: the node the request named (for :class:`WrongNode`).
    :param retry_after: the ``Retry-After`` header, if any.
    :returns: the most specific :class:`ServeError` subclass for the answer.
    """
    body = dict(body or {})
    code = str(body.get("error") or body.get("code") or "error")
    message = str(body.get("message") or code)
    field = body.get("field")
    field = str(field) if field is not None else None
    src = str(body.get("src") or src)
    tgt = str(body.get("tgt") or tgt)
    if status in (401, 403) or code in (C.UNAUTHORIZED, C.FORBIDDEN):
        return AuthError(message, status=status, code=code, field=field, body=body)
    if code == C.NO_NODE:
        breakdown: dict[str, int] = body.get("breakdown") or {}
        best = str(body.get("best_reason") or (max(breakdown, key=breakdown.__getitem__) if breakdown else "no_nodes"))
        if retry_after is None:
            retry_after = body.get("retry_after")
        return NoNodeAvailable(src, tgt, breakdown, best, message=message, status=status or 503, code=code,
                               body=body, retry_after=_retry_after(retry_after))
    if code == C.NO_POOL:
        return NoPoolForLanguagePair(src, tgt, message=message, status=status or 404, code=code, body=body)
    if code == C.WRONG_NODE:
        return WrongNode(body.get("job_id") or job_id, node_id=node_id, message=message, status=status or 409,
                         code=code, body=body)
    if code == C.UNKNOWN_JOB:
        return UnknownJob(body.get("job_id") or job_id, message=message, status=status or 404, code=code, body=body)
    if code in (C.TIMEOUT, C.NODE_LOST, C.CANCELLED):
        return JobFailed(message, status=status, code=code, field=field, body=body)
    if code in (C.BACKEND_UNAVAILABLE, C.DRAINING):
        return ServeUnavailable(message, status=status, code=code, field=field, body=body)
    if code in _BAD_INPUT or status in (400, 413, 422):
        return BadRequest(message, status=status, code=code, field=field, body=body)
    return ServeError(message, status=status, code=code, field=field, body=body)
