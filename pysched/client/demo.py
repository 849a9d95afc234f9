"""``pysched nodes`` and ``pysched load``: a node simulator and a load generator.

Together with ``pysched serve`` they show the whole system at work::

    pysched serve --insecure &                         # the scheduler service
    pysched nodes --count 200 --url ws://127.0.0.1:8000 &
    pysched load --url http://127.0.0.1:8000 --duration 10

``pysched nodes`` runs many simulated worker nodes in one process (one
asyncio event loop, one WebSocket each, built on :class:`NodeClient`): they
register, send heartbeats and answer every job after a simulated processing
time, failing a chosen fraction. ``pysched load`` sends jobs over session
streams or ``POST /v1/jobs`` (built on :class:`JobClient`), at a fixed rate
or with a fixed number in flight, and prints progress once a second and a
summary: jobs/s, latency percentiles, errors by code.

This module is what the ``pysched`` command imports to build its parser:
argparse-level modules only (the serve extra may be missing then). The
programs themselves are :mod:`pysched.client._demo`, imported by ``run_*``.
"""

from __future__ import annotations

import argparse
from collections.abc import Coroutine
from typing import Any

from pysched.tools.argtypes import non_negative_float, positive_float, positive_int

__all__ = ["add_load_arguments", "add_nodes_arguments", "run_load", "run_nodes"]


def _fraction(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def _language_sets(text: str) -> list[list[str]]:
    """``"zh,en;ja,en"`` -> ``[["zh", "en"], ["ja", "en"]]``."""
    sets = [[code.strip() for code in part.split(",") if code.strip()] for part in text.split(";")]
    sets = [s for s in sets if s]
    if not sets:
        raise argparse.ArgumentTypeError(f"expected language codes such as 'zh,en' or 'zh,en;ja,en', got {text!r}")
    return sets


def _pairs(text: str) -> list[tuple[str, str]]:
    """``"zh:en,ja:en"`` -> ``[("zh", "en"), ("ja", "en")]``."""
    pairs = []
    for part in text.split(","):
        src, sep, tgt = part.strip().partition(":")
        if not sep or not src.strip() or not tgt.strip():
            raise argparse.ArgumentTypeError(f"expected pairs such as 'zh:en' or 'zh:en,ja:en', got {text!r}")
        pairs.append((src.strip(), tgt.strip()))
    return pairs


def _common_arguments(parser: argparse.ArgumentParser, url: str, token_env: str) -> None:
    parser.add_argument("--url", default=url, help=f"the server (default: {url})")
    parser.add_argument("--token", default=None,
                        help=f"bearer token (default: ${token_env}; none for a server started with --insecure)")
    parser.add_argument("--duration", type=positive_float, default=None,
                        help="stop after this many seconds (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


# ====================================================================== nodes
def add_nodes_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``pysched nodes``.

    :param parser: the subcommand's parser.
    """
    _common_arguments(parser, "ws://127.0.0.1:8000", "PYSCHED_NODE_TOKEN")
    parser.set_defaults(duration=None)
    parser.add_argument("--count", type=positive_int, default=200, help="simulated nodes (default: 200)")
    parser.add_argument("--languages", type=_language_sets, default=_language_sets("zh,en"),
                        help="language set of each node, comma-separated; several sets separated by ';' are "
                             "handed out in turn (default: zh,en)")
    parser.add_argument("--services", default=None,
                        help="services of each node, comma-separated (default: the server's: asr,nmt,tts,semantic)")
    parser.add_argument("--max-concurrency", type=positive_int, default=4, help="jobs per node at once (default: 4)")
    parser.add_argument("--latency-ms", type=non_negative_float, default=20.0,
                        help="mean simulated processing time per job; each job takes 0.5x-1.5x of it "
                             "(default: 20; 0 answers at once)")
    parser.add_argument("--fail-rate", type=_fraction, default=0.0,
                        help="fraction of jobs answered with ok=false (default: 0)")
    parser.add_argument("--accept", action="store_true",
                        help="send 'accept' for every job before working on it (needed under at_most_once)")
    parser.add_argument("--heartbeat-interval", type=positive_float, default=None,
                        help="seconds between heartbeats of each node (default: what the server asks for)")
    parser.add_argument("--prefix", default="sim-", help="node id prefix; ids are PREFIX0001... (default: sim-)")
    parser.add_argument("--connect-timeout", type=positive_float, default=60.0,
                        help="seconds for all nodes to register (default: 60)")
    parser.add_argument("--seed", type=int, default=1, help="seed of simulated times and failures (default: 1)")


def _run_async(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop when it is installed, else asyncio; return its result."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(main)
    result: int = uvloop.run(main)
    return result


def run_nodes(args: argparse.Namespace) -> int:
    """Run ``pysched nodes``.

    :param args: the options (:func:`add_nodes_arguments`).
    :returns: the exit status: 0 when every node registered and none stopped on an error.
    """
    from pysched.client._demo import nodes_main

    return _run_async(nodes_main(args))


# ====================================================================== load
def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``pysched load``.

    :param parser: the subcommand's parser.
    """
    _common_arguments(parser, "http://127.0.0.1:8000", "PYSCHED_CLIENT_TOKEN")
    parser.set_defaults(duration=10.0)
    parser.add_argument("--mode", choices=("stream", "jobs"), default="stream",
                        help="stream: session streams (WebSocket /v1/sessions/{id}); jobs: POST /v1/jobs "
                             "(default: stream)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=positive_float, default=None,
                      help="jobs per second, all sessions together (open loop)")
    pace.add_argument("--concurrency", type=positive_int, default=None,
                      help="jobs in flight, all sessions together (closed loop; default: 64)")
    parser.add_argument("--sessions", type=positive_int, default=16,
                        help="sessions the jobs are spread over (one stream each in stream mode; default: 16)")
    parser.add_argument("--pairs", type=_pairs, default=_pairs("zh:en"),
                        help="language pairs, handed out to sessions in turn (default: zh:en)")
    parser.add_argument("--payload-bytes", type=int, default=32, help="size of each job's payload text (default: 32)")
    parser.add_argument("--timeout", type=positive_float, default=None,
                        help="per-attempt job timeout sent with each job (default: the server's)")
    parser.add_argument("--warmup", type=non_negative_float, default=0.0,
                        help="seconds at the start left out of the summary's rates and latencies (default: 0)")
    parser.add_argument("--http", choices=("auto", "fast", "httpx"), default="auto",
                        help="jobs mode: send through a lean keep-alive client on httptools (fast), or through "
                             "the SDK's JobClient on httpx, which costs ~1 ms of CPU per request (auto: fast "
                             "when httptools is installed)")
    parser.add_argument("--max-in-flight", type=positive_int, default=4096,
                        help="open loop: jobs the generator lets wait at once before it skips sends (default: 4096)")


def run_load(args: argparse.Namespace) -> int:
    """Run ``pysched load``.

    :param args: the options (:func:`add_load_arguments`).
    :returns: the exit status: 0 when at least one job was answered and no transport error stopped it.
    """
    from pysched.client._demo import load_main

    return _run_async(load_main(args))
