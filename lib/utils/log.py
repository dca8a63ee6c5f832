"""Logging and the one error convention shared by every command-line tool.

Exit statuses of every ``vnl-*`` command (documented in each ``--help``):

* ``0`` (:data:`EXIT_OK`): done;
* ``1`` (:data:`EXIT_FAIL`): the work ran but its verdict is negative (``vnl-verify``: a layer
  outside tolerance; ``vnl-demo``: the verification step failed); also an internal error (a
  bug: any exception that is not one of :data:`INPUT_ERRORS`), printed with its traceback;
* ``2`` (:data:`EXIT_ERROR`): an error: bad arguments (argparse), or a bad input or output
  refused with one line ``PROG: error: <what, which file, which key>`` (no traceback unless
  ``-v``);
* ``130`` / ``143``: interrupted (Ctrl-C / SIGTERM); temporary files removed, locks released.

A new command uses the convention like this::

    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)          # add_logging_arguments(parser) inside
        setup_logging(args.verbose - args.quiet)
        return run_reporting_errors("vnl-train", lambda: _run(args), verbose=args.verbose)

``_run`` returns the exit status; any of :data:`INPUT_ERRORS` (and the extra ``expected``
classes a command passes) becomes the one-line refusal.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from .io import install_signal_cleanup

__all__ = [
    "EXIT_ERROR",
    "EXIT_FAIL",
    "EXIT_OK",
    "INPUT_ERRORS",
    "add_logging_arguments",
    "run_reporting_errors",
    "setup_logging",
    "terminal_safe",
]

EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
EXIT_INTERRUPTED = 130

# What a bad input, option or output raises anywhere in the package, and only that: the
# project's own errors derive from ValueError (config, checkpoint, conversion, format, results
# files) or OSError (files, locks, refused destinations, a full disk); numeric conversions raise
# OverflowError; a list or class count too large for memory MemoryError; a too deeply nested
# input (JSON, pickle) RecursionError. Anything else (RuntimeError, ImportError, TypeError, ...)
# is a bug: it keeps its traceback and the command exits 1, as Python does.
INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    OverflowError,
    MemoryError,
    RecursionError,
)


def terminal_safe(text: object, limit: int = 50_000) -> str:
    """``text`` with control characters (escape sequences, newlines, ...) shown escaped, so a
    name read from a file cannot move the cursor, recolour or fake lines; long texts cut."""
    s = str(text)
    if s.isprintable() and len(s) <= limit:
        return s
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
    return out if len(out) <= limit else out[: limit - 3] + "..."


class _SafeFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        # keep the traceback's own newlines (debugging), escape everything in the message
        head, sep, tail = text.partition("\nTraceback")
        return terminal_safe(head) + (sep + tail if sep else "")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``-v/--verbose`` and ``-q/--quiet`` counters every command line shares."""
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging; tracebacks on errors"
    )
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")


def setup_logging(verbosity: int = 0) -> None:
    """Log to stderr: INFO by default, DEBUG with ``-v``, WARNING with ``-q`` (verbosity < 0).
    Messages are printed terminal-safe (:func:`terminal_safe`)."""
    level = logging.INFO
    if verbosity > 0:
        level = logging.DEBUG
    elif verbosity < 0:
        level = logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)


def run_reporting_errors(
    prog: str,
    run: Callable[[], int],
    expected: tuple[type[BaseException], ...] = (),
    *,
    verbose: int = 0,
    error_status: int = EXIT_ERROR,
) -> int:
    """Run a command's body ``run()`` and return its exit status.

    An exception of :data:`INPUT_ERRORS` or ``expected`` becomes one line
    ``PROG: error: MESSAGE`` on stderr (terminal-safe, first line kept whole) and
    ``error_status`` (:data:`EXIT_ERROR`); with ``-v`` (``verbose``) it is raised instead,
    traceback included. Ctrl-C and SIGTERM print ``PROG: interrupted`` and return 130 / 128+N
    after the writers removed their temporary files and released their locks.
    """
    install_signal_cleanup()
    try:
        return run()
    except KeyboardInterrupt:
        if verbose:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:
        if isinstance(e.code, int) and e.code >= 128 and not verbose:
            print(f"{prog}: terminated", file=sys.stderr)
        raise
    except (*INPUT_ERRORS, *expected) as e:
        if verbose:
            raise
        message = str(e) or type(e).__name__
        if isinstance(e, MemoryError):
            message = f"out of memory ({message})"
        print(f"{prog}: error: {terminal_safe(message)}", file=sys.stderr)
        return error_status
