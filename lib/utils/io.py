"""Atomic file writing: a crash never leaves a half-written checkpoint or results file."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_path", "atomic_write", "fsync_directory", "temporary_sibling"]


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A fresh, unused temporary name in the directory of ``path`` (same file system)."""
    target = Path(path)
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")


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
    ``path``. On any exception the temporary file is removed and ``path`` is left as it was.

    The file is created with the usual permissions (``0o666`` minus the umask).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write supports modes 'wb' and 'w', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_directory(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        fsync_directory(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
