"""One writer per output file: an advisory lock file next to it.

``with output_lock("results.h5"):`` creates ``results.h5.lock`` with ``O_CREAT | O_EXCL`` (atomic
on local and network file systems) holding the holder's pid, host and start time. A second
writer, whatever its flags, gets a :class:`LockError` that names the holder. A lock left by a
process that died (same host, pid gone; or an unreadable, empty lock file older than a minute)
is recognised as stale and taken over with a warning. The lock file is removed on exit,
including on Ctrl-C and SIGTERM (see :func:`.io.install_signal_cleanup`).

The trainer and the feature extractor use the same helper for their output files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator

from .io import hostname, pid_alive

__all__ = ["LockError", "lock_path", "output_lock"]

logger = logging.getLogger(__name__)

_EMPTY_LOCK_GRACE_SECONDS = 60.0


class LockError(OSError):
    """Another process is writing the same output."""


def lock_path(path: str | os.PathLike) -> str:
    """The lock file of output ``path``."""
    return os.path.abspath(os.fspath(path)) + ".lock"


def _read_holder(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_stale(path: str, holder: dict | None) -> bool:
    if holder is None:  # being written right now, or garbage: stale only when old
        try:
            return time.time() - os.path.getmtime(path) > _EMPTY_LOCK_GRACE_SECONDS
        except OSError:
            return True
    pid = holder.get("pid")
    if holder.get("host") != hostname() or not isinstance(pid, int):
        return False  # another machine: we cannot tell, so it stays locked
    return not pid_alive(pid)


def _acquire(path: str, what: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)  # as atomic_write does for the output
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if _is_stale(path, holder):
                logger.warning(
                    "%s: removing the stale lock of a process that no longer runs (%s)",
                    path,
                    holder,
                )
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            who = (
                f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                if holder
                else "another process"
            )
            raise LockError(
                f"{what} is being written by {who} (lock file {path}); wait for it to finish, "
                f"or delete the lock file if that process is gone"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "pid": os.getpid(),
                    "host": hostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                },
                f,
            )
        return
    raise LockError(f"{what}: could not take the lock {path}")


@contextlib.contextmanager
def output_lock(*paths: str | os.PathLike | None) -> Iterator[None]:
    """Hold the lock of every output in ``paths`` (``None`` entries skipped) for the block.

    Raises :class:`LockError` when another live process holds one of them. Locks are taken in
    sorted order (no deadlock between two writers of overlapping outputs) and released in
    reverse order, on any exit."""
    targets = sorted({lock_path(p): os.fspath(p) for p in paths if p is not None}.items())
    taken: list[str] = []
    try:
        for lock, target in targets:
            _acquire(lock, target)
            taken.append(lock)
        yield
    finally:
        for lock in reversed(taken):
            holder = _read_holder(lock)
            if holder is None or holder.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
