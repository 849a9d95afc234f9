"""Pytest fixtures that run a private, throw-away ``redis-server``.

Register once for the whole suite, from ``tests/conftest.py``::

    pytest_plugins = ["redis_server"]

(``tests/`` has no ``__init__.py``, so pytest puts ``tests/`` on
``sys.path`` and this module imports as ``redis_server``. Use that exact
name everywhere: importing it under a second name, e.g.
``tests.redis_server``, would make a second copy of the fixtures and start
a second server.) Test modules may also list it in their own
``pytest_plugins``; registering the same name twice is a no-op.

Fixtures
--------
``redis_server_session`` (session)
    A :class:`RedisServer` started once: unix socket in a private temporary
    directory, no TCP port, no persistence. Killed at the end of the session.
``redis_server`` (function)
    The same server, running (restarted if a previous test stopped it) and
    emptied with ``FLUSHALL`` before the test.
``redis_client`` (function)
    A ``redis.Redis`` on it (fail-fast timeouts, no retries), closed after
    the test.
``redis_server_factory`` (function)
    Starts extra private servers with their own arguments (e.g. cluster
    mode), all killed after the test.

When ``redis-server`` is not on ``PATH`` or redis-py is not importable the
tests are skipped, except in CI (``CI`` set and non-empty), where they fail:
there the Redis tests must really run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "RedisServer",
    "free_port",
    "redis_server_session",
    "redis_server",
    "redis_client",
    "redis_server_factory",
]


def _unavailable(reason: str) -> None:
    """Skip locally, fail in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the Redis tests must run)", pytrace=False)
    pytest.skip(reason)


class RedisServer:
    """A ``redis-server`` child process listening on a unix socket.

    :meth:`stop` and :meth:`start` may be called mid-test: the server comes
    back on the *same* socket path (with an empty dataset, as nothing is
    persisted), so clients built earlier reconnect by themselves.
    """

    def __init__(self, binary: str, workdir: Path, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        self.binary = binary
        self.workdir = workdir
        #: Path of the unix socket clients connect to.
        self.unix_socket = str(workdir / "redis.sock")
        #: Loopback TCP port, or ``None`` (the default): unix socket only, so
        #: there is no port to race for and nothing else on the host can
        #: reach the server.
        self.port = port
        self.extra_args = list(extra_args)
        self.log_path = workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (if not running) and wait until it answers PING."""
        if self.running:
            return
        if os.path.exists(self.unix_socket):
            os.unlink(self.unix_socket)
        cmd = [
            self.binary,
            "--port", str(self.port or 0),
            "--bind", "127.0.0.1",
            "--unixsocket", self.unix_socket,
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--logfile", str(self.log_path),
            *self.extra_args,
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}:\n{self._log_tail()}")
            if os.path.exists(self.unix_socket) and self._ping():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING within {timeout}s:\n{self._log_tail()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """Kill the server (if running) and wait for it to exit."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            # SIGKILL: a crash, not a graceful shutdown (nothing to save anyway).
            proc.send_signal(signal.SIGKILL)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:  # pragma: no cover
                proc.kill()
                proc.wait()
        if os.path.exists(self.unix_socket):
            os.unlink(self.unix_socket)

    def client(self, **kwargs: Any) -> Any:
        """A new ``redis.Redis`` on this server.

        Defaults fail fast (0.5 s timeouts, no retries) so an outage shows up
        at once; any keyword overrides them.
        """
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        options: dict[str, Any] = {
            "unix_socket_path": self.unix_socket,
            "socket_timeout": 0.5,
            "socket_connect_timeout": 0.5,
            "retry": Retry(NoBackoff(), 0),
        }
        options.update(kwargs)
        return redis.Redis(**options)

    def flushall(self) -> None:
        client = self.client()
        try:
            client.flushall()
            client.script_flush()
        finally:
            client.close()

    def _ping(self) -> bool:
        import redis

        client = self.client(socket_timeout=0.2, socket_connect_timeout=0.2)
        try:
            return bool(client.ping())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            return False
        finally:
            client.close()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer({self.unix_socket!r}, {state})"


def _require_redis() -> str:
    """The redis-server binary; skips (or fails in CI) when Redis is unusable."""
    try:
        import redis  # noqa: F401
    except ImportError:
        _unavailable('redis-py is not installed (pip install "pysched[redis]")')
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable("redis-server is not on PATH")
    return binary  # type: ignore[return-value]


def _workdir() -> Path:
    # A short directory under /tmp: unix socket paths are limited to ~107
    # bytes, which a deep pytest basetemp can exceed.
    return Path(tempfile.mkdtemp(prefix="pysched-redis-", dir="/tmp" if os.path.isdir("/tmp") else None))


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server_session() -> Iterator[RedisServer]:
    """One private redis-server for the whole test session."""
    binary = _require_redis()
    workdir = _workdir()
    server = RedisServer(binary, workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisServer]]:
    """Start extra, test-private servers: ``factory(port=None, extra_args=())``.

    Each gets its own directory and is killed after the test. For servers
    that need special configuration (e.g. ``--cluster-enabled yes``).
    """
    binary = _require_redis()
    servers: list[RedisServer] = []

    def factory(port: int | None = None, extra_args: Sequence[str] = ()) -> RedisServer:
        server = RedisServer(binary, _workdir(), port=port, extra_args=extra_args)
        servers.append(server)
        server.start()
        return server

    try:
        yield factory
    finally:
        for server in servers:
            server.stop()
            shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture
def redis_server(redis_server_session: RedisServer) -> RedisServer:
    """The session's server, running and empty."""
    redis_server_session.start()  # a previous test may have stopped it
    redis_server_session.flushall()
    return redis_server_session


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[Any]:
    """A fail-fast client on the (emptied) server, closed after the test."""
    client = redis_server.client()
    try:
        yield client
    finally:
        client.close()
