"""The one place that talks to redis-py: scripts, error classification, replies.

Both Redis classes (:class:`~pysched.redis.RedisReservations` and
:class:`~pysched.redis.RedisFleet`) call Redis only through a
:class:`ScriptClient`, so loading the Lua scripts of ``pysched/redis/lua``,
running them by SHA with a ``NOSCRIPT`` fallback, and telling an outage
(:class:`~pysched.errors.ReservationBackendUnavailable`) from a
misconfiguration (raised unchanged) are written once.

redis-py is imported lazily (:func:`import_redis`), when a Redis class is
constructed, so ``import pysched`` (and ``import pysched.redis``) work without
the ``redis`` extra.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable, Sequence
from importlib import resources
from types import ModuleType
from typing import Any, TypeAlias, TypeVar

from pysched.errors import ReservationBackendUnavailable

__all__ = ["RedisClient", "Script", "ScriptClient", "import_redis", "shipped", "text"]

#: A ``redis.Redis`` (or a cluster client: anything with ``execute_command``
#: and ``pipeline``), ``decode_responses`` either way. ``Any`` on purpose: this
#: is the dynamic boundary (redis-py types its replies as ``Awaitable | Any``),
#: every reply is decoded through :func:`text` or ``int()`` right away.
RedisClient: TypeAlias = Any

_T = TypeVar("_T")


def import_redis(who: str) -> ModuleType:
    """Import redis-py, or raise ``ImportError`` naming the extra that installs it.

    :param who: the class that needs it (named in the message).
    """
    try:
        import redis
        import redis.exceptions
    except ImportError as exc:  # pragma: no cover - exercised with redis hidden (a subprocess test)
        raise ImportError(f'{who} needs the redis client library: pip install "pysched[redis]"') from exc
    return redis


def text(value: object) -> str:
    """A reply element as ``str`` (the client may or may not decode replies)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


class Script:
    """One Lua script and its SHA1, computed locally.

    Computing the SHA here means constructing a backend makes no network
    call: a script reaches the server on its first ``NOSCRIPT`` fallback (or
    :meth:`ScriptClient.load`).

    :param name: the script's name (its file name without ``.lua``).
    :param body: the Lua source.
    """

    __slots__ = ("body", "name", "sha")

    def __init__(self, name: str, body: str) -> None:
        self.name = name
        self.body = body
        self.sha = hashlib.sha1(body.encode("utf-8")).hexdigest()

    def strict(self) -> Script:
        """This script with a ``#!lua`` shebang: Redis 7 then refuses keys not declared in ``KEYS``.

        The shipped scripts have no shebang, so they also run on Redis < 7;
        the tests run strict copies on a cluster-mode server.
        """
        return Script(self.name, "#!lua\n" + self.body)

    def __repr__(self) -> str:
        return f"Script({self.name!r}, sha={self.sha[:12]})"


@functools.cache
def shipped(name: str) -> Script:
    """The script ``pysched/redis/lua/<name>.lua`` (read once per process).

    :param name: the file name without ``.lua``.
    """
    # lua/ is plain package data (no __init__.py): reached through the package.
    body = (resources.files("pysched.redis") / "lua" / f"{name}.lua").read_text(encoding="utf-8")
    return Script(name, body)


class ScriptClient:
    """A redis client's calls: outages classified, scripts run by SHA, round trips counted.

    An *outage* (connection failure or timeout, a server still loading its
    data, a read-only replica after a failover, a cluster that is down) is
    transient: the call may be retried, so it becomes
    :class:`~pysched.errors.ReservationBackendUnavailable` with the redis
    error chained, its message starting with ``what``. Authentication and
    authorization errors are ``ConnectionError`` subclasses in redis-py but a
    misconfiguration, not an outage: they propagate unchanged, as does any
    other error.

    Thread-safe: redis-py clients are (through their connection pool), and
    the figures below are guarded by a lock of their own.

    :param client: the redis client (never closed here).
    :param what: the message prefix of the unavailable errors raised.
    :param who: the class using it, named if redis-py is missing.
    """

    __slots__ = ("_lock", "_round_trips", "_what", "available", "client", "error", "misconfiguration",
                 "noscript", "outage")

    def __init__(self, client: RedisClient, what: str, who: str) -> None:
        exc = import_redis(who).exceptions
        self.client = client
        self._what = what
        self.outage: tuple[type[BaseException], ...] = (
            exc.ConnectionError, exc.TimeoutError, exc.BusyLoadingError, exc.ReadOnlyError, exc.TryAgainError,
            exc.ClusterDownError,
        )
        self.misconfiguration: tuple[type[BaseException], ...] = (exc.AuthenticationError, exc.AuthorizationError)
        self.noscript: type[BaseException] = exc.NoScriptError
        self._lock = threading.Lock()
        self._round_trips = 0
        #: the last call succeeded (False from an outage until the next success)
        self.available = True
        #: the last outage, while unavailable
        self.error: str | None = None

    # -- classification ----------------------------------------------------------
    def unavailable(self, exc: BaseException) -> ReservationBackendUnavailable:
        """The error to raise (``from exc``) for an outage; marks this client unavailable."""
        self.available = False
        self.error = f"{type(exc).__name__}: {exc}"
        return ReservationBackendUnavailable(f"{self._what} ({type(exc).__name__}: {exc})")

    def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)``: an outage raised inside becomes :class:`ReservationBackendUnavailable`.

        For code that uses the client's own commands (pipelines, ``XREAD``);
        an unavailable error raised inside passes through unchanged.
        """
        try:
            return fn(*args)
        except ReservationBackendUnavailable:
            raise
        except self.misconfiguration:
            raise
        except self.outage as exc:
            raise self.unavailable(exc) from exc

    # -- round trips -------------------------------------------------------------
    @property
    def round_trips(self) -> int:
        """Network calls made through this object (settable, e.g. to reset to 0)."""
        return self._round_trips

    @round_trips.setter
    def round_trips(self, value: int) -> None:
        with self._lock:
            self._round_trips = int(value)

    def _counted(self) -> None:
        with self._lock:
            self._round_trips += 1

    def _succeeded(self) -> None:
        if not self.available:
            self.available, self.error = True, None

    def execute(self, *args: Any) -> Any:
        """One command (one round trip)."""
        self._counted()
        try:
            reply = self.client.execute_command(*args)
        except self.misconfiguration:
            raise
        except self.outage as exc:
            raise self.unavailable(exc) from exc
        self._succeeded()
        return reply

    def execute_pipeline(self, pipe: Any, *, raise_on_error: bool = True) -> list[Any]:
        """Send a pipeline built on :attr:`client` (one round trip).

        :param pipe: the pipeline.
        :param raise_on_error: False: a failed command's error is its reply.
        """
        self._counted()
        try:
            replies: list[Any] = pipe.execute(raise_on_error=raise_on_error)
        except self.misconfiguration:
            raise
        except self.outage as exc:
            raise self.unavailable(exc) from exc
        self._succeeded()
        return replies

    # -- scripts -------------------------------------------------------------------
    def eval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run ``script`` by SHA; on ``NOSCRIPT`` send its body (one more round trip)."""
        try:
            return self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except self.noscript:
            # First use on this server (or after a restart / SCRIPT FLUSH):
            # EVAL sends the body once and caches it server-side.
            return self.execute("EVAL", script.body, len(keys), *keys, *args)

    def eval_each(self, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Run ``script`` once per ``(keys, args)`` in one pipeline, in order.

        Calls answered ``NOSCRIPT`` are sent again, once, after ``SCRIPT LOAD``.
        Returns one reply per call; a call that failed with an error that is
        not an outage has that error (an exception instance) as its reply,
        so one bad call does not cost the others. An outage or a
        misconfiguration raises.
        """
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for i in todo:
                keys, args = calls[i]
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            results = self.execute_pipeline(pipe, raise_on_error=False)
            retry = []
            for i, result in zip(todo, results, strict=True):
                if isinstance(result, self.noscript) and attempt == 0:
                    retry.append(i)
                    continue
                if isinstance(result, BaseException) and isinstance(result, self.outage):
                    if isinstance(result, self.misconfiguration):
                        raise result
                    raise self.unavailable(result) from result
                replies[i] = result
            if not retry:
                break
            self.load(script)
            todo = retry
        return replies

    def load(self, script: Script) -> None:
        """Cache ``script`` on the server now (one round trip)."""
        self.execute("SCRIPT", "LOAD", script.body)
