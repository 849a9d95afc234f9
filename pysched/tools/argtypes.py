"""The argparse types every ``pysched`` subcommand shares.

One set, used by ``simulate``, ``bench``, ``serve``, ``nodes`` and ``load``:
each turns a command-line string into a checked value or raises
:class:`argparse.ArgumentTypeError`, which argparse reports as a usage
error (exit status 2) naming the option.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = ["comma_separated", "non_negative_float", "positive_float", "positive_int", "subset_of"]

_T = TypeVar("_T")


def positive_int(text: str) -> int:
    """Parse an int >= 1.

    :param text: the option's value as typed.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_float(text: str) -> float:
    """Parse a positive finite number.

    :param text: the option's value as typed.
    """
    value = _number(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """Parse a finite number >= 0.

    :param text: the option's value as typed.
    """
    value = _number(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def comma_separated(item: Callable[[str], _T], what: str) -> Callable[[str], tuple[_T, ...]]:
    """An argparse type for a non-empty comma-separated list of ``item`` values.

    :param item: parses one element (one of the types above, for example).
    :param what: the elements, in words, for the error message ("rates >= 0").
    """

    def parse(text: str) -> tuple[_T, ...]:
        try:
            values = tuple(item(part) for part in text.split(",") if part.strip())
        except (argparse.ArgumentTypeError, ValueError):
            values = ()
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        return values

    return parse


def subset_of(choices: Iterable[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type for a non-empty comma-separated subset of ``choices``.

    :param choices: the names allowed; the error message lists them.
    """
    allowed = tuple(choices)

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(part.strip() for part in text.split(",") if part.strip())
        if not values or any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, "
                                             f"got {text!r}")
        return values

    return parse
