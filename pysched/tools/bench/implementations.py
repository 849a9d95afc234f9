"""The implementations ``pysched bench`` compares, and how each is built.

``compiled`` and ``python`` are pysched with either kernel; ``peer``
(:mod:`pysched.tools.bench.peer`) and ``legacy``
(:mod:`pysched.tools.bench.legacy`) are the baselines, ordinary modules of
this package, so the benchmark runs from an installed wheel. Another file
can stand in for either (``--peer PATH`` / ``--legacy PATH``: an edited
copy, an older version); it must define what the bench drives.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pysched.errors import NoNodeAvailable, NoPoolForLanguagePair
from pysched.scheduler import Scheduler
from pysched.tools.bench.config import BenchConfig
from pysched.tools.bench.workload import BenchScheduler

__all__ = ["Implementation", "Implementations", "compiled_available", "load_legacy", "load_peer", "prepare"]

_LEGACY_NEEDS = ("LegacyScheduler", "LegacyNoNodeAvailable", "LegacyNoPool")
_PEER_NEEDS = ("PeerScheduler", "INDEXES", "PeerNoNodeAvailable", "PeerNoPool")


@dataclass(frozen=True)
class Implementation:
    """How to build one implementation and which exceptions mean a refused dispatch."""

    name: str
    build: Callable[[], BenchScheduler]
    failures: dict[type[BaseException], str]  #: exception class -> failure kind ("no_node", "no_pool")


@dataclass
class Implementations:
    """What :func:`prepare` found: the implementations that can run, and why the others cannot."""

    runnable: list[Implementation] = field(default_factory=list)  #: in the config's order
    missing: dict[str, str] = field(default_factory=dict)  #: implementation -> why it cannot run
    legacy_path: str | None = None  #: the file the legacy model was loaded from
    peer_path: str | None = None  #: the file the peer was loaded from
    peer_kind: str | None = None  #: the peer's index ("heap" or "sortedlist")


def compiled_available() -> bool:
    """True when the compiled kernel (``pysched._core``) is importable."""
    try:
        from pysched import _core  # noqa: F401  (imported to see whether it can be)
    except ImportError:
        return False
    return True


def _load(name: str, path: str | os.PathLike[str] | None, required: tuple[str, ...]) -> types.ModuleType:
    if path is None:
        module_name = f"pysched.tools.bench.{name}"
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ImportError(f"{module_name} failed to import: {type(exc).__name__}: {exc}") from exc
        where = module_name
    else:
        file = Path(path)
        if not file.is_file():
            raise ImportError(f"{file} not found")
        spec = importlib.util.spec_from_file_location(f"_pysched_bench_{name}", file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {file}")
        module = importlib.util.module_from_spec(spec)
        # registered before exec so anything resolving the module by name
        # (pickling, dataclasses, typing) finds it
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:
            sys.modules.pop(spec.name, None)
            raise ImportError(f"{file} failed to import: {type(exc).__name__}: {exc}") from exc
        where = str(file)
    for attr in required:
        if not hasattr(module, attr):
            raise ImportError(f"{where} does not define {attr}")
    return module


def load_legacy(path: str | os.PathLike[str] | None = None) -> types.ModuleType:
    """The legacy model: :mod:`pysched.tools.bench.legacy`, or the file at ``path``.

    :param path: a file to load instead of the module.
    :raises ImportError: it does not load, or lacks the classes the bench drives.
    """
    return _load("legacy", path, _LEGACY_NEEDS)


def load_peer(path: str | os.PathLike[str] | None = None) -> types.ModuleType:
    """The pure-Python indexed peer: :mod:`pysched.tools.bench.peer`, or the file at ``path``.

    :param path: a file to load instead of the module.
    :raises ImportError: it does not load, or lacks the classes the bench drives.
    """
    return _load("peer", path, _PEER_NEEDS)


def _origin(module: types.ModuleType) -> str | None:
    file = getattr(module, "__file__", None)
    return None if file is None else str(file)


# The baselines' classes are read off a module object (it may have been
# loaded from any file): typed by the protocol the bench drives them through.
def _peer_class(config: BenchConfig, peer: types.ModuleType) -> Callable[..., BenchScheduler]:
    cls: Callable[..., BenchScheduler] = (peer.PeerScheduler if config.peer_index is None
                                          else peer.INDEXES[config.peer_index])
    return cls


def prepare(config: BenchConfig) -> Implementations:
    """Load and check what ``config.impls`` names; list what cannot run and why.

    :param config: the run's configuration.
    """
    found = Implementations()
    max_pools = max(50, config.pools)
    built: dict[str, Implementation] = {}
    pysched_failures: dict[type[BaseException], str] = {NoNodeAvailable: "no_node", NoPoolForLanguagePair: "no_pool"}
    # checked in this order: the order of the table's MISSING lines
    if "legacy" in config.impls:
        try:
            legacy = load_legacy(config.legacy_path)
        except ImportError as exc:
            found.missing["legacy"] = str(exc)
        else:
            found.legacy_path = _origin(legacy)
            legacy_cls: Callable[..., BenchScheduler] = legacy.LegacyScheduler
            built["legacy"] = Implementation(
                "legacy",
                # ready_on_register: the model otherwise waits for a first healthy
                # heartbeat, which a rate-0 scenario never sends
                lambda: legacy_cls(seed=config.seed, max_pools=max_pools, ready_on_register=True),
                {legacy.LegacyNoNodeAvailable: "no_node", legacy.LegacyNoPool: "no_pool"})
    if "peer" in config.impls:
        try:
            peer = load_peer(config.peer_path)
            cls = _peer_class(config, peer)
            cls(seed=config.seed)  # fails early when its index cannot be built (sortedcontainers missing)
        except ImportError as exc:
            found.missing["peer"] = str(exc)
        else:
            found.peer_path = _origin(peer)
            found.peer_kind = getattr(cls, "kind", config.peer_index)
            built["peer"] = Implementation("peer", lambda: cls(seed=config.seed, max_pools=max_pools),
                                           {peer.PeerNoNodeAvailable: "no_node", peer.PeerNoPool: "no_pool"})
    if "compiled" in config.impls:
        if compiled_available():
            built["compiled"] = Implementation(
                "compiled", lambda: Scheduler(seed=config.seed, max_pools=max_pools, kernel="compiled"),
                pysched_failures)
        else:
            found.missing["compiled"] = ("the compiled extension pysched._core is not importable "
                                         "(build it: python setup.py build_ext --inplace)")
    built["python"] = Implementation(
        "python", lambda: Scheduler(seed=config.seed, max_pools=max_pools, kernel="python"), pysched_failures)
    found.runnable = [built[name] for name in config.impls if name in built]
    return found
