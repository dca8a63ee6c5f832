"""Fetch one file from an ``http(s)://`` URL, a ``file://`` URL or a local path, atomically.

The bytes go to ``DEST.part`` and are renamed to ``DEST`` only once every byte announced has
arrived, so a partial download never sits under the final name. An interrupted download (a
truncated response, a dropped connection, Ctrl-C) keeps ``DEST.part``; the next call resumes it
with an HTTP ``Range`` request, or starts again where the server ignores the range. The SHA-256
is computed while the bytes arrive (the part already on disk is hashed first) and returned.

The amount read is bounded (:data:`MAX_DOWNLOAD_BYTES`, and the announced ``Content-Length``);
every read has a timeout. Errors are :class:`DownloadError` naming the URL and the file. This
module knows nothing of checkpoints: it moves bytes; callers decide what to trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import IO

from .io import fsync_directory
from .log import terminal_safe

__all__ = [
    "MAX_DOWNLOAD_BYTES",
    "ChecksumError",
    "DownloadError",
    "download_file",
    "file_sha256",
    "part_path",
]

# Larger than any released checkpoint (the 128x1 models with momentum are under 1 GiB).
MAX_DOWNLOAD_BYTES = 4 << 30
_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(OSError):
    """A file that could not be fetched; the message names the URL and the destination."""


class ChecksumError(DownloadError):
    """A file whose SHA-256 is not the expected one."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    return _hash_existing(os.fspath(path))[0].hexdigest()


def part_path(dest: str | os.PathLike) -> str:
    """Where the bytes of ``dest`` accumulate until the download is complete."""
    return os.fspath(dest) + ".part"


def _is_http(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme in ("http", "https")


def _local_source(url: str) -> str:
    """The local path of a ``file://`` URL or of a plain path."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{url}: a file:// URL names no host (file:///path)")
        return urllib.request.url2pathname(parts.path)
    return url


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    progress: bool = True,
    timeout: float = 60.0,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    expected_sha256: str | None = None,
) -> str:
    """Fetch ``url`` (``http(s)://``, ``file://`` or a local path) into ``dest`` atomically,
    resuming a ``dest.part`` left by an interrupted call; returns the file's SHA-256 (hex).

    With ``expected_sha256``, a complete download of other content is deleted and refused
    (:class:`ChecksumError`); ``dest`` is then left as it was. ``progress`` shows a tqdm bar on
    a terminal. The caller holds ``dest``'s lock: two processes must not append to one part.
    """
    dest = os.fspath(dest)
    part = part_path(dest)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    what = f"{terminal_safe(url)} -> {dest}"
    try:
        if _is_http(url):
            digest = _fetch_http(url, part, what, progress, timeout, max_bytes)
        else:
            digest = _fetch_local(_local_source(url), part, what, progress, max_bytes)
    except DownloadError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise DownloadError(f"cannot download {what}: {_reason(e)}") from e
    if expected_sha256 is not None and digest != expected_sha256:
        os.unlink(part)
        raise ChecksumError(
            f"{what}: sha256 {digest} is not the expected {expected_sha256}; the file was not kept"
        )
    os.replace(part, dest)
    fsync_directory(os.path.dirname(os.path.abspath(dest)))
    return digest


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return terminal_safe(str(e.reason))
    if isinstance(e, FileNotFoundError):
        return "no such file"
    return terminal_safe(f"{type(e).__name__}: {e}")


def _hash_existing(path: str) -> tuple[hashlib._Hash, int]:
    digest = hashlib.sha256()
    size = 0
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
            size += len(block)
    return digest, size


@contextlib.contextmanager
def _bar(total: int | None, initial: int, name: str, enabled: bool) -> Iterator:
    from tqdm import tqdm

    with tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=name,
        disable=None if enabled else True,  # None: only on a terminal
        leave=False,
    ) as bar:
        yield bar


def _copy(src: IO[bytes], dst: IO[bytes], digest, bar, limit: int) -> int:
    """Copy until EOF or ``limit`` bytes; returns the number copied."""
    copied = 0
    while copied < limit:
        try:
            block = src.read(min(_CHUNK, limit - copied))
        except http.client.IncompleteRead as e:  # the connection closed early: keep what came
            block = e.partial
            limit = copied + len(block)
        if not block:
            break
        dst.write(block)
        digest.update(block)
        copied += len(block)
        bar.update(len(block))
    return copied


def _finish(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fetch_local(src: str, part: str, what: str, progress: bool, max_bytes: int) -> str:
    """Copy a local file through the part file (a mirror folder on a shared file system)."""
    if not os.path.isfile(src):
        raise DownloadError(f"cannot download {what}: no such file {src}")
    total = os.path.getsize(src)
    if total > max_bytes:
        raise DownloadError(f"cannot download {what}: {total} bytes, more than {max_bytes}")
    digest = hashlib.sha256()
    with (
        open(src, "rb") as s,
        open(part, "wb") as d,
        _bar(total, 0, os.path.basename(src), progress) as bar,
    ):
        copied = _copy(s, d, digest, bar, total + 1)
        _finish(d)
    if copied != total:
        raise DownloadError(f"cannot download {what}: {src} changed size while being copied")
    return digest.hexdigest()


def _fetch_http(
    url: str, part: str, what: str, progress: bool, timeout: float, max_bytes: int
) -> str:
    digest, have = _hash_existing(part)
    headers = {"User-Agent": "nonlocal_net", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:  # 416: the range starts past the end: start again
            raise
        os.unlink(part)
        return _fetch_http(url, part, what, progress, timeout, max_bytes)
    with response:
        start, total = _response_extent(response, have, what)
        if start == 0 and have:  # the server sent the whole file: start again
            digest, have = hashlib.sha256(), 0
        if total is not None and total > max_bytes:
            raise DownloadError(f"cannot download {what}: {total} bytes, more than {max_bytes}")
        limit = (total if total is not None else max_bytes + 1) - have
        with (
            open(part, "ab" if have else "wb") as f,
            _bar(total, have, os.path.basename(part)[: -len(".part")], progress) as bar,
        ):
            try:
                got = _copy(response, f, digest, bar, limit)
            finally:
                _finish(f)
    received = have + got
    if total is None:
        if received > max_bytes:
            raise DownloadError(f"cannot download {what}: more than {max_bytes} bytes")
    elif received < total:
        raise DownloadError(
            f"cannot download {what}: the response was truncated ({received} of {total} "
            f"bytes); {part} is kept and the next try resumes it"
        )
    return digest.hexdigest()


def _response_extent(response, have: int, what: str) -> tuple[int, int | None]:
    """``(first byte, total size or None)`` of a 200 or 206 response."""
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match[1]) != have:
            raise DownloadError(f"cannot download {what}: the server resumed at the wrong byte")
        return have, None if match[3] == "*" else int(match[3])
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None
