"""Run a real ``pysched serve`` (and ``pysched nodes``/``pysched load``) in subprocesses.

For tests and benchmarks of code built on the SDK: the server listens on a
free loopback port with its own tokens, and every process is stopped on
exit::

    from pysched.client.testing import ServeProcess

    with ServeProcess() as server:                   # tokens: server.node_token, ...
        with JobClient(server.url, token=server.client_token) as client:
            ...

Output of each process goes to a log file (:attr:`PyschedProcess.log_path`),
never to a pipe that could fill up; :meth:`PyschedProcess.output` reads it.
Stdlib only (it polls ``/healthz`` with :mod:`urllib`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from http import HTTPStatus
from pathlib import Path
from typing import IO

__all__ = ["free_port", "PyschedProcess", "ServeProcess"]


def free_port(host: str = "127.0.0.1") -> int:
    """Find a TCP port free right now (the OS picks it).

    :param host: the address it is free on.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # The child runs the same pysched as this process (a checkout or the installed wheel).
    here = str(Path(__file__).resolve().parents[2])
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = here if not path else os.pathsep.join([here, path])
    # numpy's BLAS threads would spin on a 2-core machine; setting it here also
    # spares the CLI its re-exec, so the pid we hold is the process that serves.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


class PyschedProcess:
    """``python -m pysched ARGS...`` as a child process with its output in a log file.

    :param args: the command's arguments (``["serve", "--port", ...]``).
    :param env: variables added to this process's environment.
    :param log_dir: where the log file goes (default: a new temporary directory).
    :param name: the log file's name, without ``.log``.
    """

    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None, log_dir: str | None = None,
                 name: str = "pysched") -> None:
        self.args = [str(a) for a in args]
        self.env = env
        self._log_dir = Path(log_dir or tempfile.mkdtemp(prefix="pysched-"))
        self.name = name
        self.log_path = self._log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        state = "not started" if self.proc is None else f"pid {self.proc.pid}, returncode {self.proc.returncode}"
        return f"{type(self).__name__}({' '.join(self.args)!r}, {state})"

    @property
    def command(self) -> list[str]:
        """The command line run."""
        return [sys.executable, "-m", "pysched", *self.args]

    def spawn(self) -> None:
        """Start the process (output appended to :attr:`log_path`)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self!r} is already running")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=_env(self.env))

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        """Everything the process printed so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself.

        :param timeout: seconds to wait.
        :returns: its exit status.
        :raises TimeoutError: it is still running (the message carries its output).
        """
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self!r} still running after {timeout} s; output:\n{self.output()[-3000:]}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Stop the process: send a signal, wait, SIGKILL after that.

        :param sig: the signal to send first.
        :param timeout: seconds to wait before the SIGKILL.
        :returns: the exit status (None when never started).
        """
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode

    def kill(self) -> int | None:
        """Send SIGKILL, at once.

        :returns: the exit status (None when never started).
        """
        return self.stop(signal.SIGKILL, 30.0)

    def __enter__(self) -> PyschedProcess:
        self.spawn()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServeProcess(PyschedProcess):
    """``pysched serve`` on ``host:port`` with three tokens.

    :meth:`start` returns once ``GET /healthz`` answers 200; :meth:`restart`
    stops it and starts it again on the same port.

    :param extra_args: passed on (``--redis URL``, ``--guarantee``, ...).
    :param host: the address to listen on.
    :param port: the port (default: a free one).
    :param node_token: the node token.
    :param client_token: the client token.
    :param admin_token: the admin token.
    :param insecure: start without tokens.
    :param env: variables added to the child's environment.
    :param log_dir: where the log file goes.
    :param name: the log file's name, without ``.log``.
    """

    def __init__(self, extra_args: Sequence[str] = (), *, host: str = "127.0.0.1", port: int | None = None,
                 node_token: str | None = "node-token-for-tests", client_token: str | None = "client-token-for-tests",
                 admin_token: str | None = "admin-token-for-tests", insecure: bool = False,
                 env: dict[str, str] | None = None, log_dir: str | None = None, name: str = "serve") -> None:
        self.host = host
        self.port = port or free_port(host)
        self.node_token = None if insecure else node_token
        self.client_token = None if insecure else client_token
        self.admin_token = None if insecure else admin_token
        self.extra_args = [str(a) for a in extra_args]
        args = ["serve", "--host", host, "--port", str(self.port), "--log-level", "warning"]
        if insecure:
            args.append("--insecure")
        else:
            for flag, token in (("--node-token", node_token), ("--client-token", client_token),
                                ("--admin-token", admin_token)):
                if token is not None:
                    args += [flag, token]
        super().__init__(args + self.extra_args, env=env, log_dir=log_dir, name=name)

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """``ws://host:port``."""
        return f"ws://{self.host}:{self.port}"

    def healthy(self) -> bool:
        """Whether ``GET /healthz`` answers 200 now."""
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2.0) as resp:  # noqa: S310 - loopback
                return bool(resp.status == HTTPStatus.OK)
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout: float = 60.0) -> ServeProcess:
        """Spawn the server and wait until ``/healthz`` answers.

        :param timeout: seconds to wait.
        :returns: self.
        :raises RuntimeError: it exited first (the message carries its log).
        :raises TimeoutError: it did not answer in time (it is killed).
        """
        self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"pysched serve exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            if self.healthy():
                return self
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise TimeoutError(f"pysched serve not healthy within {timeout} s:\n{self.output()[-3000:]}")

    def restart(self, timeout: float = 60.0) -> ServeProcess:
        """Stop (SIGTERM, then SIGKILL) and start again on the same port.

        :param timeout: seconds the stop and the start may each take.
        :returns: self.
        """
        self.stop(timeout=timeout)
        return self.start(timeout)

    def __enter__(self) -> ServeProcess:
        return self.start()
