"""Argument helpers shared by the ``vnl-*`` command lines (one spelling per option).

Validated numeric types (``--batch-size 0``, ``--workers -1`` are refused by argparse with
exit status 2), and the options several commands share, added with the same name and help.
"""

from __future__ import annotations

import argparse
import math

__all__ = [
    "add_device_argument",
    "add_overrides_argument",
    "add_progress_argument",
    "finite_float",
    "nonnegative_int",
    "positive_int",
]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None


def positive_int(text: str) -> int:
    """An ``int`` >= 1 (argparse ``type=``)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An ``int`` >= 0 (argparse ``type=``)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite ``float`` (argparse ``type=``): NaN and Inf refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` (cpu, cuda or cuda:N)."""
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    """Trailing ``KEY VALUE`` config overrides (as on the original's command line)."""
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
