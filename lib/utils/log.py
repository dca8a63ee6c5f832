"""Logging set-up shared by the command-line tools."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``-v/--verbose`` and ``-q/--quiet`` counters every command line shares."""
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")


def setup_logging(verbosity: int = 0) -> None:
    """Log to stderr: INFO by default, DEBUG with ``-v``, WARNING with ``-q`` (verbosity < 0)."""
    level = logging.INFO
    if verbosity > 0:
        level = logging.DEBUG
    elif verbosity < 0:
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def run_reporting_errors(
    prog: str,
    run: Callable[[], int],
    expected: tuple[type[BaseException], ...],
    *,
    verbose: int = 0,
    error_status: int = 1,
) -> int:
    """Run a command's body; an ``expected`` error becomes ``PROG: error: MESSAGE`` on stderr and
    ``error_status`` (with ``-v`` it is raised instead, traceback included)."""
    try:
        return run()
    except expected as e:
        if verbose:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return error_status
