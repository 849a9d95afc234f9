"""Shared fixtures: the kernel twins, an injectable clock, and the private redis-server.

Also the one guard of the service tests: without the ``serve`` extra they
are not collected (said in the report header), except under ``CI``, where
they must run, so a missing library fails their import.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

import pysched  # noqa: F401  (imported first, so the installed package is the one under test)

pytest_plugins = ["redis_server"]

KERNELS = ["compiled", "python"]

#: the ``serve`` extra's libraries, and the test files that need them
SERVE_EXTRA = ("httpx", "websockets", "uvicorn", "starlette", "msgspec", "prometheus_client")
SERVE_TESTS = ["test_serve_*.py", "test_client_*.py"]
_serve_missing = [name for name in SERVE_EXTRA if importlib.util.find_spec(name) is None]
# pytest reads this module-level name; under CI nothing is left out
collect_ignore_glob = SERVE_TESTS if _serve_missing and not os.environ.get("CI") else []


def pytest_report_header() -> list[str]:
    """Say when the service tests are left out, and why."""
    if collect_ignore_glob:
        return [f"service tests not collected: the serve extra is not installed (missing {', '.join(_serve_missing)})"]
    return []


class FakeClock:
    """A manual monotonic clock for TTL and heartbeat-age tests."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=KERNELS)
def kernel_name(request) -> str:
    """Runs a test once with the compiled kernel and once with its pure-Python twin."""
    if request.param == "compiled":
        try:
            import pysched._core  # noqa: F401
        except ImportError:
            if os.environ.get("PYSCHED_PURE_PYTHON"):
                pytest.skip("PYSCHED_PURE_PYTHON is set and the extension is not built")
            raise
    return request.param


@pytest.fixture
def core(kernel_name):
    """The kernel module itself (``pysched._core`` or ``pysched._pycore``)."""
    from pysched._impl import resolve

    return resolve(kernel_name)


@pytest.fixture
def make_scheduler(kernel_name, clock):
    """Factory for a Scheduler on the fake clock, with a fixed seed, for either kernel."""

    made = []

    def make(**kwargs):
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("seed", 12345)
        kwargs.setdefault("kernel", kernel_name)
        sched = pysched.Scheduler(**kwargs)
        made.append(sched)
        return sched

    yield make
    for sched in made:
        sched.close()
