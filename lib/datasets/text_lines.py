"""Reading the project's line-oriented inputs (list files, class-name files) safely.

* Size is bounded: only a regular file is read (a directory, a FIFO or a device such as
  ``/dev/zero`` is refused before anything is read, and opening never blocks on a FIFO), and a
  file over ``limit`` bytes is refused without reading past the limit.
* Lines end at ``\\n`` (an optional ``\\r`` before it is dropped), and nowhere else: the
  original's Python 2 readers split byte strings there, so U+2028, U+0085, a form feed or a
  vertical tab are characters of a file name, not line breaks (``str.splitlines`` would cut a
  line at each of them and shift every following video id).
"""

from __future__ import annotations

import os
import stat

__all__ = ["MAX_TEXT_BYTES", "read_bounded_bytes", "split_lines"]

MAX_TEXT_BYTES = 256 << 20  # 256 MiB: a Kinetics-700 training list is about 60 MB


def read_bounded_bytes(path: str, what: str, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit``); ``what`` names it in errors
    (``"list file"``). Raises ``OSError`` (unreadable, not a regular file) or ``ValueError``
    (too large), each naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise FileNotFoundError(f"cannot read {what} {path}: {e.strerror or e}") from e
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket"
        raise OSError(f"{what} {path} is {kind}, not a regular file")
    with os.fdopen(fd, "rb") as f:
        # the size first (nothing read), then a read that stops past the limit (a growing file)
        if info.st_size > limit or len(data := f.read(limit + 1)) > limit:
            raise ValueError(
                f"{what} {path} is larger than {limit} bytes ({limit >> 20} MiB); "
                "is it the right file?"
            )
    return data


def split_lines(text: str) -> list[str]:
    """``text`` cut at ``\\n`` only, one ``\\r`` before each ``\\n`` dropped (``\\r\\n`` files);
    a final ``\\n`` ends the last line rather than starting an empty one."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]
