"""The ``pysched bench`` subcommand: its options, and running it from them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pysched.tools.argtypes import comma_separated, non_negative_float, positive_float, positive_int, subset_of
from pysched.tools.bench.config import IMPLEMENTATIONS, PEER_INDEXES, BenchConfig
from pysched.tools.bench.report import format_table
from pysched.tools.bench.runner import run_bench

__all__ = ["add_arguments", "config_from_args", "main", "run"]

#: command-line option (its argparse dest) -> BenchConfig field
_OPTIONS = (("nodes", "nodes"), ("pools", "pools"), ("sessions", "sessions"), ("rates", "rates"),
            ("threads", "threads"), ("duration", "duration"), ("hold_ms", "hold_ms"), ("impl", "impls"),
            ("legacy", "legacy_path"), ("peer", "peer_path"), ("peer_index", "peer_index"), ("seed", "seed"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``pysched bench``'s options to ``parser``.

    Sizing options default to None so ``--quick`` can supply its own defaults
    while anything given explicitly still wins.

    :param parser: the subcommand's parser.
    """
    d = BenchConfig()
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of a few seconds (200 nodes, 0.25 s scenarios, rates 0,20000)")
    parser.add_argument("--nodes", type=positive_int, default=None, help=f"nodes (default: {d.nodes})")
    parser.add_argument("--pools", type=positive_int, default=None,
                        help=f"distinct language sets, i.e. auto pools (default: {d.pools})")
    parser.add_argument("--sessions", type=positive_int, default=None, help=f"sessions (default: {d.sessions})")
    parser.add_argument("--rates", type=comma_separated(non_negative_float, "rates >= 0"), default=None,
                        help="heartbeats/s to request, comma-separated; 0 = no heartbeat thread "
                             "(default: 0,2000,20000)")
    parser.add_argument("--threads", type=comma_separated(positive_int, "integers >= 1"), default=None,
                        help="dispatching thread counts, comma-separated (default: 1,4)")
    parser.add_argument("--duration", type=positive_float, default=None,
                        help=f"measured seconds per scenario (default: {d.duration:g})")
    parser.add_argument("--hold-ms", type=non_negative_float, default=None,
                        help=f"simulated processing time before a job is released (default: {d.hold_ms:g})")
    parser.add_argument("--impl", type=subset_of(IMPLEMENTATIONS), default=None,
                        help="implementations to run, comma-separated (default: compiled,python,peer,legacy)")
    parser.add_argument("--legacy", metavar="PATH", default=None,
                        help="load the legacy model from this file (default: the module "
                             "pysched.tools.bench.legacy)")
    parser.add_argument("--peer", metavar="PATH", default=None,
                        help="load the pure-Python indexed peer from this file (default: the module "
                             "pysched.tools.bench.peer)")
    parser.add_argument("--peer-index", choices=PEER_INDEXES, default=None,
                        help="the peer's per-pool index (default: its PeerScheduler, the faster: heap)")
    parser.add_argument("--seed", type=int, default=None, help=f"seed of the workload (default: {d.seed})")
    parser.add_argument("--json", metavar="PATH", default="bench-results.json",
                        help="where to write the results as JSON (default: bench-results.json)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` an :func:`add_arguments` namespace asks for.

    :param args: the parsed options.
    :raises ValueError: the combination is not a valid configuration.
    """
    # Any: the namespace's values, of the types add_arguments gave them; BenchConfig checks them
    overrides: dict[str, Any] = {}
    for arg, name in _OPTIONS:
        value = getattr(args, arg, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "quick", False):
        if "nodes" in overrides and "pools" not in overrides:
            overrides["pools"] = min(20, overrides["nodes"])
        return BenchConfig.quick_config(**overrides)
    if "nodes" in overrides and "pools" not in overrides:
        overrides["pools"] = min(BenchConfig.pools, overrides["nodes"])
    return BenchConfig(**overrides)


def run(args: argparse.Namespace) -> int:
    """``pysched bench``: run, print the table, write the JSON.

    Exit status 0 when the benchmark ran (goal misses and a missing baseline
    included: they are results, said so in the output), 1 when a worker
    raised unexpectedly or nothing could run, 2 for a bad configuration.

    :param args: the parsed options (:func:`add_arguments`).
    """
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"pysched bench: {exc}", file=sys.stderr)
        return 2

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = run_bench(config, progress=None if getattr(args, "quiet", False) else progress)
    print(format_table(report), flush=True)
    if "legacy" in report.missing:
        print(f"pysched bench: legacy model not run: {report.missing['legacy']}. "
              "Leave out --legacy to run the module pysched.tools.bench.legacy.", file=sys.stderr)
    if "peer" in report.missing:
        print(f"pysched bench: peer not run: {report.missing['peer']}. "
              "Leave out --peer to run the module pysched.tools.bench.peer "
              "(--peer-index sortedlist needs sortedcontainers: pip install 'pysched[bench]').", file=sys.stderr)
    if args.json:
        path = Path(args.json)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        print(f"pysched bench: results written to {path}", file=sys.stderr)
    if not report.results:
        print("pysched bench: no implementation could run", file=sys.stderr)
        return 1
    return 1 if report.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pysched.tools.bench``: the subcommand on its own.

    :param argv: the options (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="pysched bench", description="compare pysched with a pure-Python indexed peer and the legacy design")
    add_arguments(parser)
    return run(parser.parse_args(argv))
