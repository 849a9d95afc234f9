"""``ServeError``: one refusal or failure, as the wire shows it (HTTP body or ``error`` frame)."""

from __future__ import annotations

import re
from http import HTTPStatus

from pysched.errors import (
    NoNodeAvailable,
    NoPoolForLanguagePair,
    ReservationBackendUnavailable,
    UnknownJob,
    UnknownNode,
    WrongNode,
)
from pysched.serve.protocol import Error, ErrorBody, ErrorCode, ProtocolError

__all__ = ["ServeError", "field_of", "from_exception"]

#: the HTTP status of each code
STATUS = {
    ErrorCode.BAD_MESSAGE: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.INVALID: 422,
    ErrorCode.TOO_BIG: 413,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_REGISTERED: 409,
    ErrorCode.UNKNOWN_JOB: 404,
    ErrorCode.WRONG_NODE: 409,
    ErrorCode.UNKNOWN_NODE: 404,
    ErrorCode.NO_POOL: 404,
    ErrorCode.NO_NODE: 503,
    ErrorCode.BACKEND_UNAVAILABLE: 503,
    ErrorCode.DRAINING: 503,
    ErrorCode.TOO_MANY_IN_FLIGHT: 429,
    ErrorCode.DUPLICATE_REQUEST: 409,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.NODE_LOST: 502,
    ErrorCode.CANCELLED: 499,
    ErrorCode.INTERNAL: 500,
}

_FIELD = re.compile(r"^([a-z_]+)(?: must|:| \[)")


def field_of(exc: BaseException, fields: frozenset[str] | set[str]) -> str | None:
    """Find the argument a library ``ValueError``/``TypeError`` names.

    The library's messages start with the argument's name ("src: malformed
    language code 'x'", "tenant must be a non-empty str, ...").

    :param exc: the exception.
    :param fields: the names the caller can fix (the request's fields).
    :returns: the name, if it is one of ``fields``; else None.
    """
    m = _FIELD.match(str(exc))
    return m.group(1) if m and m.group(1) in fields else None


class ServeError(Exception):
    """A request the server refuses or a job that failed, with everything the client is told.

    :param code: an :class:`~pysched.serve.protocol.ErrorCode`.
    :param message: what happened, for people.
    :param field: the request field at fault, if any.
    :param status: the HTTP status (default: the code's, from :data:`STATUS`).
    :param breakdown: ``no_node``: how many nodes were refused for each reason.
    :param best_reason: ``no_node``: the reason of the node closest to taking the job.
    :param src: the request's source language.
    :param tgt: the request's target language.
    :param job_id: the job, once it has an id.
    :param attempts: deliveries made, for a job that failed.
    """

    def __init__(self, code: str, message: str, *, field: str | None = None, status: int | None = None,
                 breakdown: dict[str, int] | None = None, best_reason: str | None = None, src: str | None = None,
                 tgt: str | None = None, job_id: str | None = None, attempts: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.status = status if status is not None else STATUS.get(code, 400)
        self.breakdown = breakdown
        self.best_reason = best_reason
        self.src = src
        self.tgt = tgt
        self.job_id = job_id
        self.attempts = attempts

    @property
    def retry_after(self) -> bool:
        """Whether the answer carries ``Retry-After`` (capacity may come back)."""
        return self.status == HTTPStatus.SERVICE_UNAVAILABLE

    def body(self) -> ErrorBody:
        """The error as an HTTP error body."""
        return ErrorBody(error=self.code, message=self.message, field=self.field, breakdown=self.breakdown,
                         best_reason=self.best_reason, src=self.src, tgt=self.tgt, job_id=self.job_id,
                         attempts=self.attempts)

    def frame(self, request_id: int | str | None = None) -> Error:
        """The error as an ``error`` frame.

        :param request_id: the session stream's request it answers, if any.
        """
        return Error(code=self.code, message=self.message, field=self.field, request_id=request_id,
                     status=self.status, job_id=self.job_id, attempts=self.attempts, breakdown=self.breakdown,
                     best_reason=self.best_reason)

    def __repr__(self) -> str:
        return f"ServeError({self.code!r}, {self.message!r}, status={self.status})"


def from_exception(exc: BaseException, fields: frozenset[str] | set[str] = frozenset()) -> ServeError:
    """Translate an exception of the scheduler or of decoding into what the client is told.

    :param exc: the exception.
    :param fields: the request's fields, which a ``ValueError``/``TypeError`` may name.
    :returns: the :class:`ServeError` (``exc`` itself when it is one).
    """
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, ProtocolError):
        return ServeError(exc.code, exc.message, field=exc.field)
    if isinstance(exc, NoNodeAvailable):
        return ServeError(ErrorCode.NO_NODE, str(exc), breakdown=exc.breakdown, best_reason=exc.best_reason,
                          src=exc.src, tgt=exc.tgt)
    if isinstance(exc, NoPoolForLanguagePair):
        return ServeError(ErrorCode.NO_POOL, str(exc), src=exc.src, tgt=exc.tgt)
    if isinstance(exc, ReservationBackendUnavailable):
        return ServeError(ErrorCode.BACKEND_UNAVAILABLE, f"reservation backend unavailable: {exc}")
    if isinstance(exc, WrongNode):
        return ServeError(ErrorCode.WRONG_NODE, str(exc), field="node_id")
    if isinstance(exc, UnknownJob):
        return ServeError(ErrorCode.UNKNOWN_JOB, str(exc), field="job_id")
    if isinstance(exc, UnknownNode):
        return ServeError(ErrorCode.UNKNOWN_NODE, str(exc), field="node_id")
    if isinstance(exc, (ValueError, TypeError)):
        return ServeError(ErrorCode.INVALID, str(exc), field=field_of(exc, fields))
    return ServeError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
