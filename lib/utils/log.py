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

from tqdm import tqdm

from .io import install_signal_cleanup

__all__ = [
    "EXIT_ERROR",
    "EXIT_FAIL",
    "EXIT_OK",
    "INPUT_ERRORS",
    "BarAwareHandler",
    "add_logging_arguments",
    "run_reporting_errors",
    "setup_logging",
    "terminal_safe",
    "write_line",
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


def write_line(text: str, file=None) -> None:
    """Write one line to ``file`` (default: the current ``sys.stderr``) through the progress
    bars' writer: every open bar on stdout/stderr is cleared first and redrawn below the line,
    so the line never ends up glued to a bar (``tqdm.write``)."""
    stream = sys.stderr if file is None else file
    tqdm.write(text, file=stream)
    stream.flush()


class BarAwareHandler(logging.Handler):
    """A logging handler that writes each record with :func:`write_line`, to the
    ``sys.stderr`` of the moment (so a redirected or captured stderr gets the lines).

    Why: a progress bar redraws its line with ``\\r`` and no newline; a record written straight
    to stderr would continue that line (``...clips_s=1.5]08:02:12 ERROR ...``). Through the
    bars' writer the bar is erased, the record gets a line of its own, and the bar is redrawn
    after it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.format(record))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``-v/--verbose`` and ``-q/--quiet`` counters every command line shares."""
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging; tracebacks on errors"
    )
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")


def setup_logging(verbosity: int = 0) -> None:
    """Log to stderr: INFO by default, DEBUG with ``-v``, WARNING with ``-q`` (verbosity < 0).
    Messages are printed terminal-safe (:func:`terminal_safe`) through the progress bars'
    writer (:class:`BarAwareHandler`), so no log line shares a line with a bar."""
    level = logging.INFO
    if verbosity > 0:
        level = logging.DEBUG
    elif verbosity < 0:
        level = logging.WARNING
    handler = BarAwareHandler()
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
        write_line(f"{prog}: interrupted")
        return EXIT_INTERRUPTED
    except SystemExit as e:
        if isinstance(e.code, int) and e.code >= 128 and not verbose:
            write_line(f"{prog}: terminated")
        raise
    except (*INPUT_ERRORS, *expected) as e:
        if verbose:
            raise
        message = str(e) or type(e).__name__
        if isinstance(e, MemoryError):
            message = f"out of memory ({message})"
        write_line(f"{prog}: error: {terminal_safe(message)}")
        return error_status
