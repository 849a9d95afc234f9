"""The ``pysched`` command line (also ``python -m pysched``).

Each subcommand is a function registered in :data:`SUBCOMMANDS` with the
:func:`subcommand` decorator, together with a function adding its
arguments; :func:`main` builds the parser from that table. To add one::

    def _bench_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--rounds", type=positive_int, default=5)

    @subcommand("bench", "time dispatch in isolation", _bench_arguments)
    def _bench(args: argparse.Namespace) -> int:
        ...
        return 0
"""

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

__all__ = ["SUBCOMMANDS", "Subcommand", "build_parser", "entry", "main", "non_negative_float", "positive_float",
           "positive_int", "subcommand"]

#: Environment the command line wants before numpy loads: numpy's OpenBLAS
#: worker threads otherwise spin and steal one of the two cores the dispatch
#: and heartbeat threads share (pysched itself does no linear algebra).
_QUIET_BLAS = {"OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Subcommand:
    """One ``pysched <name>`` subcommand."""

    name: str
    help: str
    #: adds the subcommand's arguments to its parser
    configure: Callable[[argparse.ArgumentParser], None]
    #: runs it; returns the process exit status
    run: Callable[[argparse.Namespace], int]


#: name -> subcommand, in registration order (the order ``--help`` lists them)
SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]
               ) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated function as subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in SUBCOMMANDS:
            raise ValueError(f"subcommand {name!r} is already registered")
        SUBCOMMANDS[name] = Subcommand(name, help, configure, run)
        return run

    return register


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a positive finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, with one subparser per entry of :data:`SUBCOMMANDS`."""
    from pysched import __version__

    parser = argparse.ArgumentParser(
        prog="pysched",
        description="pysched: decide which worker node runs each job, in microseconds.",
    )
    parser.add_argument("--version", action="version", version=f"pysched {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in SUBCOMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
    return parser


def entry() -> None:
    """Console-script entry point (``pysched``, ``python -m pysched``).

    numpy is already loaded once this runs (``import pysched`` loads it), too
    late to configure OpenBLAS; so when the environment does not say, it
    re-executes itself once with the quiet-BLAS settings, then runs :func:`main`.
    """
    missing = {k: v for k, v in _QUIET_BLAS.items() if k not in os.environ}
    if missing and "PYSCHED_CLI_REEXEC" not in os.environ:
        env = {**os.environ, **missing, "PYSCHED_CLI_REEXEC": "1"}
        try:
            os.execve(sys.executable, [sys.executable, "-m", "pysched", *sys.argv[1:]], env)
        except OSError:
            pass  # fall through: run as we are
    sys.exit(main())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pysched`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return SUBCOMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------ simulate
class ProgressPrinter:
    """Prints simulation progress to ``stream``: one line a second, redrawn
    in place with ``\\r`` on a terminal, as plain lines otherwise (logs, CI)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        isatty = getattr(stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._width = 0

    def __call__(self, p) -> None:  # p: pysched.simulate.Progress
        line = (f"{p.elapsed:5.1f} s  {p.dispatches:>11,} dispatches  {p.rate:>9,.0f}/s  "
                f"{p.failures:>8,} failures  {p.heartbeats:>9,} heartbeats  {p.in_flight:>6,} in flight")
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """End the redrawn line so the summary starts on a fresh one."""
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def _simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=positive_float, default=10.0,
                        help="total wall time in seconds, setup included (default: 10)")
    parser.add_argument("--nodes", type=positive_int, default=200, help="simulated nodes (default: 200)")
    parser.add_argument("--sessions", type=positive_int, default=2000, help="sessions in total (default: 2000)")
    parser.add_argument("--threads", type=positive_int, default=4,
                        help="session threads sharing the sessions (default: 4)")
    parser.add_argument("--heartbeat-rate", type=positive_float, default=2000.0,
                        help="heartbeats per second, all nodes together (default: 2000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fleet and the traffic (default: 1)")
    parser.add_argument("--kernel", choices=("auto", "compiled", "python"), default="auto",
                        help="dispatch kernel (default: auto, the compiled one when built)")
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


@subcommand("simulate", "run a simulated speech-translation fleet against a real Scheduler", _simulate_arguments)
def _simulate(args: argparse.Namespace) -> int:
    """Run the simulation; exit status 1 if any node was over-committed."""
    from pysched.simulate import SimulationConfig, run_simulation

    config = SimulationConfig(
        duration=args.duration,
        nodes=args.nodes,
        sessions=args.sessions,
        threads=args.threads,
        heartbeat_rate=args.heartbeat_rate,
        seed=args.seed,
        kernel=args.kernel,
    )
    printer = None if args.quiet else ProgressPrinter(sys.stderr)
    try:
        report = run_simulation(config, progress=printer)
    finally:
        if printer is not None:
            printer.finish()
    print(report.format_summary(), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")
    return 0 if report.ok else 1


# ------------------------------------------------------------------ bench
def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from pysched.bench import add_arguments

    add_arguments(parser)


@subcommand("bench", "one workload against pysched (compiled and pure-Python), the pure-Python indexed peer "
            "and the legacy multi-lock design", _bench_arguments)
def _bench(args: argparse.Namespace) -> int:
    """Run the side-by-side benchmark; print the table and write JSON."""
    from pysched.bench import run

    return run(args)


# ------------------------------------------------------------------ serve and its demo (pip install "pysched[serve]")
# The argument functions import only argparse-level modules, so `pysched simulate`
# works without the serve extra; the servers and clients load their libraries in run().
def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from pysched.serve.cli import add_arguments

    add_arguments(parser)


@subcommand("serve", "run the scheduler as a network service (nodes on WebSocket, jobs over HTTP)", _serve_arguments)
def _serve(args: argparse.Namespace) -> int:
    from pysched.serve.cli import run

    return run(args)


def _nodes_arguments(parser: argparse.ArgumentParser) -> None:
    from pysched.client.demo import add_nodes_arguments

    add_nodes_arguments(parser)


@subcommand("nodes", "simulate worker nodes connected to a pysched server", _nodes_arguments)
def _nodes(args: argparse.Namespace) -> int:
    from pysched.client.demo import run_nodes

    return run_nodes(args)


def _load_arguments(parser: argparse.ArgumentParser) -> None:
    from pysched.client.demo import add_load_arguments

    add_load_arguments(parser)


@subcommand("load", "send a stream of jobs to a pysched server and summarise the results", _load_arguments)
def _load(args: argparse.Namespace) -> int:
    from pysched.client.demo import run_load

    return run_load(args)
