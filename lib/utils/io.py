"""Safe file writing: atomic writes, temporary files cleaned on signals, inputs never outputs.

Every command that writes a file goes through these helpers, so the rules hold everywhere:

* :func:`atomic_write` / :func:`atomic_path`: write under a temporary sibling name, fsync, rename.
  A crash or kill never leaves a half-written destination. The temporary name carries the pid
  (``.NAME.<pid>-<random>.tmp``) so that :func:`remove_stale_temporaries` can tell the leftovers
  of a dead process (removed) from those of a live one (reported).
* :func:`install_signal_cleanup`: SIGTERM (and SIGHUP) raise :class:`Terminated`, an exception,
  so the ``except BaseException`` clauses of the writers remove their temporary files exactly as
  for Ctrl-C (``KeyboardInterrupt``). The CLI wrapper (:func:`.log.run_reporting_errors`)
  installs it for every command.
* Inside :func:`atomic_write` / :func:`atomic_path` a signal is also *recorded* before its
  handler runs: a writer in C++ (``torch.save`` into a file object) turns the exception raised in
  its write callback into a ``RuntimeError`` (``[enforce fail at inline_container.cc] unexpected
  pos``); the recorded signal is raised again in its place (exit 130/143, not 2).
* :func:`check_destination`: refuses a destination that is the same file as any input (through
  links and relative paths too), and one that exists but is not the command's own kind of
  output unless the caller passes ``replace_foreign=True`` (the command's ``--overwrite``).
* A write that fails because the disk is full (or the quota, the file size limit, a read-only
  file system, an I/O error) raises :class:`WriteError`, one line naming the destination, also
  when the writer is a library (HDF5) that reports it in its own words; the destination is left
  as it was.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import glob
import logging
import os
import re
import secrets
import signal
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "OutputError",
    "Terminated",
    "WriteError",
    "atomic_path",
    "atomic_write",
    "check_destination",
    "fsync_directory",
    "install_signal_cleanup",
    "pid_alive",
    "remove_stale_temporaries",
    "same_file",
    "temporary_sibling",
]

logger = logging.getLogger(__name__)

_TMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{12}\.tmp(?:\..*)?")


class OutputError(OSError):
    """A destination a command refuses to write (an input, or a file it does not own)."""


class WriteError(OSError):
    """A destination that could not be written (full disk, quota, read-only file system, I/O
    error); its message names the destination and the reason, on one line."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


# errors of the storage, not of the program or the data: reported as a WriteError
_WRITE_ERRNOS = frozenset({errnos.ENOSPC, errnos.EDQUOT, errnos.EFBIG, errnos.EROFS, errnos.EIO})
_LIBRARY_ERRNO = re.compile(r"errno = (\d+)")


def _write_error(target: Path, error: OSError) -> WriteError | None:
    """``error`` as a :class:`WriteError` naming ``target`` when the storage caused it (HDF5
    puts the errno in its message), else None."""
    code = error.errno
    if code is None:
        found = _LIBRARY_ERRNO.search(str(error))
        code = int(found.group(1)) if found else None
    if code not in _WRITE_ERRNOS:
        return None
    return WriteError(code, f"{target}: cannot write: {os.strerror(code)}")


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM/SIGHUP so that cleanup code runs (exit 128+sig)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(128 + signum)


def install_signal_cleanup() -> None:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` exceptions (main thread only; a no-op
    elsewhere), so temporary files are removed and locks released as on Ctrl-C."""
    with contextlib.suppress(ValueError):  # not the main thread
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _raise_terminated)


class _SignalRecorder:
    """While active, SIGINT/SIGTERM/SIGHUP are noted (``self.signum``) and then handled by the
    handler that was installed before (which raises ``KeyboardInterrupt`` or
    :class:`Terminated`). Signals whose handler is not a Python function are left alone."""

    _SIGNALS = tuple(
        s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None
    )

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Callable] = {}

    def _record(self, signum, frame) -> None:
        self.signum = signum
        self._previous[signum](signum, frame)

    def __enter__(self) -> _SignalRecorder:
        with contextlib.suppress(ValueError):  # not the main thread: nothing to record
            for sig in self._SIGNALS:
                previous = signal.getsignal(sig)
                if callable(previous):
                    signal.signal(sig, self._record)  # raises outside the main thread
                    self._previous[sig] = previous
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def reraise_if_swallowed(self, error: BaseException) -> None:
        """Raise the recorded signal's exception when ``error`` is what a C++ writer made of it
        (anything but the ``KeyboardInterrupt`` / ``SystemExit`` the handler raised)."""
        if self.signum is None or isinstance(error, (KeyboardInterrupt, SystemExit)):
            return
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt from error
        raise Terminated(128 + self.signum) from error


def _abandon(tmp: Path, target: Path, error: BaseException, signals: _SignalRecorder) -> None:
    """After a failed atomic write: remove the temporary, then raise what the failure means
    for the user (the signal a C++ writer swallowed, a full disk as one line naming
    ``target``); returns only when ``error`` itself should propagate."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    signals.reraise_if_swallowed(error)
    failed = _write_error(target, error) if isinstance(error, OSError) else None
    if failed is not None:
        raise failed from error


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A fresh, unused temporary name in the directory of ``path`` (same file system), marked
    with this process's pid (see :func:`remove_stale_temporaries`)."""
    target = Path(path)
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove the temporary siblings of ``path`` left by processes that no longer run (a
    SIGKILL during a write); temporaries of live processes are reported, not touched.
    Returns the removed paths."""
    target = Path(path)
    removed = []
    pattern = os.path.join(glob.escape(str(target.parent)), f".{glob.escape(target.name)}.*.tmp*")
    for found in glob.glob(pattern):
        match = _TMP_NAME.fullmatch(os.path.basename(found))
        if match is None or match["name"] != target.name:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and pid_alive(pid):
            logger.warning("%s: temporary file of running process %d left alone", found, pid)
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(found)
            logger.warning("removed %s, left by an interrupted write", found)
            removed.append(found)
    return removed


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same existing file (links and relative paths
    resolved: device and inode compared)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_destination(
    dst: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None],
    *,
    what: str = "output",
    is_own_output: Callable[[str], bool] | None = None,
    replace_foreign: bool = False,
    flag: str = "--overwrite",
) -> None:
    """Refuse to write ``dst`` when it is one of ``inputs`` (same file), a directory, or an
    existing file that ``is_own_output`` does not recognise (unless ``replace_foreign``).

    ``what`` names the destination in the message (``"results file"``); ``flag`` is the
    command's option that allows replacing a foreign file. Raises :class:`OutputError`.
    """
    dst_s = os.fspath(dst)
    for src in inputs:
        if src is not None and same_file(dst_s, src):
            raise OutputError(
                f"{dst_s}: the {what} is the same file as the input {os.fspath(src)}; "
                f"refusing to overwrite an input"
            )
    if os.path.isdir(dst_s):
        raise OutputError(f"{dst_s}: the {what} is a directory")
    if not os.path.exists(dst_s) or replace_foreign or is_own_output is None:
        return
    try:
        own = is_own_output(dst_s)
    except OSError:
        own = False
    if not own:
        raise OutputError(
            f"{dst_s} exists and is not a {what} this command wrote; pass {flag} to replace it"
        )


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a directory entry (after a rename) to disk where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file next to ``path``; on success flush, fsync and rename it over
    ``path``. On any exception (Ctrl-C and, with :func:`install_signal_cleanup`, SIGTERM
    included) the temporary file is removed and ``path`` is left as it was.

    The file is created with the usual permissions (``0o666`` minus the umask).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write supports modes 'wb' and 'w', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with _SignalRecorder() as signals:
        try:
            with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            fsync_directory(target.parent)
        except BaseException as e:
            _abandon(tmp, target, e, signals)
            raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Like :func:`atomic_write`, for writers that need a file *name* rather than a file object
    (``safetensors.torch.save_file``, HDF5, video writers): yields a fresh temporary path next to
    ``path`` (ending in ``suffix``, for writers that pick a format from the extension); on success
    the file written there is fsynced and renamed over ``path``, on any exception it is removed
    and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    tmp = tmp.with_name(tmp.name + suffix)
    with _SignalRecorder() as signals:
        try:
            yield tmp
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            fsync_directory(target.parent)
        except BaseException as e:
            _abandon(tmp, target, e, signals)
            raise


def hostname() -> str:
    """This machine's name (recorded in lock files)."""
    return socket.gethostname()
