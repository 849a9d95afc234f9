"""The ``pysched`` command line (also ``python -m pysched``).

Each subcommand lives in its own module, which provides two functions: one
adding the subcommand's options to its parser, one running it from the
parsed options and returning the exit status. :data:`SUBCOMMANDS` names
them; a module is imported only when its subcommand's parser is built or it
runs, so ``pysched simulate`` needs neither the serve extra nor anything
else another subcommand uses. This module imports the tools; the tools never
import it. To add a subcommand, write its module and add a line::

    Subcommand("bench", "time dispatch in isolation", "pysched.tools.bench")
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import cast

__all__ = ["SUBCOMMANDS", "Subcommand", "build_parser", "entry", "main"]

#: Environment the command line wants before numpy loads: numpy's OpenBLAS
#: worker threads otherwise spin and steal one of the two cores the dispatch
#: and heartbeat threads share (pysched itself does no linear algebra).
_QUIET_BLAS = {"OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Subcommand:
    """One ``pysched <name>`` subcommand, and the module implementing it."""

    name: str
    help: str
    module: str  #: dotted name of the module implementing it, imported on first use
    configure_name: str = "add_arguments"  #: the module's function adding the options to a parser
    run_name: str = "run"  #: the module's function running it; returns the exit status

    def configure(self, parser: argparse.ArgumentParser) -> None:
        """Add the subcommand's options to ``parser``.

        :param parser: the subcommand's parser.
        """
        add = cast("Callable[[argparse.ArgumentParser], None]", getattr(import_module(self.module),
                                                                           self.configure_name))
        add(parser)

    def run(self, args: argparse.Namespace) -> int:
        """Run the subcommand; its exit status.

        :param args: the parsed options.
        """
        run = cast("Callable[[argparse.Namespace], int]", getattr(import_module(self.module), self.run_name))
        return run(args)


#: name -> subcommand, in the order ``--help`` lists them
SUBCOMMANDS: dict[str, Subcommand] = {cmd.name: cmd for cmd in (
    Subcommand("simulate", "run a simulated speech-translation fleet against a real Scheduler",
               "pysched.tools.simulate"),
    Subcommand("bench", "one workload against pysched (compiled and pure-Python), the pure-Python indexed peer "
               "and the legacy multi-lock design", "pysched.tools.bench.command"),
    # serve and its demo need the serve extra (pip install "pysched[serve]"); their
    # argument functions import only argparse-level modules, the servers and
    # clients load their libraries when they run
    Subcommand("serve", "run the scheduler as a network service (nodes on WebSocket, jobs over HTTP)",
               "pysched.serve.cli"),
    Subcommand("nodes", "simulate worker nodes connected to a pysched server", "pysched.client.demo",
               "add_nodes_arguments", "run_nodes"),
    Subcommand("load", "send a stream of jobs to a pysched server and summarise the results", "pysched.client.demo",
               "add_load_arguments", "run_load"),
)}


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
        cmd.configure(sub.add_parser(cmd.name, help=cmd.help, description=cmd.help))
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
        with contextlib.suppress(OSError):  # it failed: run as we are
            os.execve(sys.executable, [sys.executable, "-m", "pysched", *sys.argv[1:]], env)
    sys.exit(main())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pysched`` with ``argv``; return the exit status.

    :param argv: the arguments (default: ``sys.argv[1:]``).
    """
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
