"""The download cache of the released Caffe2 checkpoints: ``torch.hub.get_dir()/checkpoints``.

:func:`fetch_released` gives the local path of a released ``NAME.pkl``, downloading it once
from its URL (:mod:`nonlocal_net.utils.download`: atomic, resumable, with a progress bar). The
cache is torch's (``TORCH_HOME`` moves it, as for torchvision and timm); the base URL is the
zoo's unless the environment variable ``VNL_ZOO_URL`` names a mirror: an ``http(s)://`` URL, a
``file://`` URL or a local folder, each holding the released file names.

Trust: the SHA-256 of every file is recorded beside it (``NAME.pkl.sha256``, in ``sha256sum``
format) at its first download and checked on every later use; where the zoo pins a SHA-256
(:attr:`~nonlocal_net.core.zoo.ZooEntry.sha256`) that one is checked instead, at the download
too. A file that no longer matches is refused (:class:`ChecksumError`), never replaced silently.
A downloaded file is as untrusted as any other: it is read only by the safe ``.pkl`` reader.

Concurrent processes (the ranks of a distributed run) share the cache: one downloads under the
file's lock, the others wait for it and then use its file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Iterator

from ..utils.download import ChecksumError, DownloadError, download_file, file_sha256
from ..utils.io import atomic_write
from ..utils.lock import LockError, output_lock
from .zoo import ZOO, ZooEntry, get_zoo_entry

__all__ = [
    "ENV_ZOO_URL",
    "ChecksumError",
    "DownloadError",
    "cache_dir",
    "fetch_released",
    "file_sha256",
    "is_zoo_name",
    "recorded_sha256",
    "released_url",
    "verify_sha256",
    "waiting_lock",
]

logger = logging.getLogger(__name__)

ENV_ZOO_URL = "VNL_ZOO_URL"
LOCK_WAIT_SECONDS = 3 * 3600.0  # a download of the largest file on a slow link
_HEX64 = re.compile(r"[0-9a-f]{64}")


def cache_dir() -> str:
    """``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``)."""
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def is_zoo_name(spec: object) -> bool:
    """Whether ``spec`` is exactly a released model's name (as ``list_models()`` spells it)."""
    return isinstance(spec, str) and spec in ZOO


def released_url(entry: ZooEntry) -> str:
    """Where ``entry``'s file is fetched from: ``$VNL_ZOO_URL/NAME.pkl`` or the zoo's URL."""
    base = os.environ.get(ENV_ZOO_URL, "").strip()
    if not base:
        return entry.url
    scheme = urllib.parse.urlsplit(base).scheme
    if scheme in ("http", "https", "file"):
        return base.rstrip("/") + "/" + urllib.parse.quote(entry.filename)
    if scheme and len(scheme) > 1:  # one letter: a Windows drive
        raise ValueError(
            f"{ENV_ZOO_URL}={base!r}: expected an http(s):// or file:// URL or a local folder"
        )
    if not os.path.isdir(base):
        raise DownloadError(f"{ENV_ZOO_URL}={base!r}: no such folder")
    return os.path.join(base, entry.filename)


def _record_path(path: str) -> str:
    return path + ".sha256"


def recorded_sha256(path: str) -> str | None:
    """The SHA-256 recorded beside a cached file (``PATH.sha256``), or ``None``."""
    return _read_record(path)


def _read_record(path: str) -> str | None:
    """The SHA-256 recorded for ``path`` (``sha256sum`` format), or ``None``."""
    try:
        with open(_record_path(path), encoding="utf-8") as f:
            text = f.read(4096)
    except FileNotFoundError:
        return None
    digest = text.split()[0].lower() if text.split() else ""
    if not _HEX64.fullmatch(digest):
        raise ChecksumError(f"{_record_path(path)}: not a SHA-256 record; delete it and {path}")
    return digest


def _write_record(path: str, digest: str) -> None:
    with atomic_write(_record_path(path), "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")


def verify_sha256(path: str, expected: str, what: str, again: str = "download it again") -> None:
    """Refuse ``path`` (:class:`ChecksumError`, one line) unless its SHA-256 is ``expected``."""
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumError(
            f"{path}: sha256 {actual} is not the {what} {expected}: the file changed; "
            f"delete it to {again}"
        )


@contextlib.contextmanager
def waiting_lock(path: str, what: str) -> Iterator[None]:
    """``output_lock(path)``, waiting while another live process holds it (bounded)."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    told = False
    while True:
        try:
            lock = output_lock(path)
            lock.__enter__()
        except LockError as e:
            if time.monotonic() > deadline:
                raise
            if not told:
                logger.info("waiting for another process to finish %s (%s)", what, e)
                told = True
            time.sleep(0.5)
            continue
        break
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def fetch_released(name: str, *, progress: bool = True) -> str:
    """The verified local path of the released ``name.pkl``, downloaded on first use.

    Raises :class:`~nonlocal_net.core.zoo.UnknownModelError` for an unknown name,
    :class:`DownloadError` (names the URL and the file) when it cannot be fetched and
    :class:`ChecksumError` when the file is not the one pinned or recorded.
    """
    entry = get_zoo_entry(name)
    path = os.path.join(cache_dir(), entry.filename)
    if os.path.isfile(path):  # the common case: no lock, no network
        _check_cached(path, entry)
        return path
    url = released_url(entry)
    with waiting_lock(path, f"the download of {entry.filename}"):
        if os.path.isfile(path):  # another process downloaded it meanwhile
            _check_cached(path, entry)
            return path
        logger.info("downloading %s to %s", url, path)
        # a record without its file: the file was deleted to fetch it again; it must match
        expected = entry.sha256 or _read_record(path)
        try:
            digest = download_file(url, path, progress=progress, expected_sha256=expected)
        except ChecksumError as e:
            which = "the zoo pins it" if entry.sha256 else f"recorded in {_record_path(path)}"
            raise ChecksumError(f"{e} ({which})") from None
        _write_record(path, digest)
    return path


def _check_cached(path: str, entry: ZooEntry) -> None:
    """Check a cached file against the pinned SHA-256 or the one recorded at its download; a
    file placed in the cache by hand (no record) is recorded now."""
    recorded = _read_record(path)
    if entry.sha256:
        verify_sha256(path, entry.sha256, "sha256 the zoo pins for it")
        if recorded != entry.sha256:
            _write_record(path, entry.sha256)
        return
    if recorded is None:
        logger.warning("%s: no sha256 recorded (placed by hand?): recording it now", path)
        _write_record(path, file_sha256(path))
        return
    verify_sha256(path, recorded, "sha256 recorded at its first download")
