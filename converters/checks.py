"""The checks every conversion runs before it writes: blob values and the destination.

* :func:`refuse_nonfinite`: blobs with NaN/Inf values or negative BN variances (``*_riv``) are
  refused, one line naming each, unless the caller allows them (``--allow-nonfinite``; then each
  is logged as a warning). Plain conversion, the fine-tuning files (``--ftvideo``,
  ``--blob-rm``) and ``--to-caffe2`` all run it.
* :func:`is_caffe2_checkpoint`: whether an existing file is the kind of file the Caffe2 writers
  of this package write (what they replace without ``--overwrite``).
* :func:`check_lr`: the ``lr`` entry written into a Caffe2 file is finite and positive.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from nonlocal_net.utils.io import check_destination, remove_stale_temporaries
from nonlocal_net.utils.lock import output_lock
from nonlocal_net.utils.log import terminal_safe
from nonlocal_net.utils.numeric import check_finite

from .errors import ConversionError
from .reader import SCALAR_ENTRIES
from .safe_pickle import LazyArray, SafeUnpickler
from .sniff import describe_known_format, looks_like_pickle

__all__ = ["caffe2_destination", "check_lr", "is_caffe2_checkpoint", "refuse_nonfinite"]

logger = logging.getLogger(__name__)

# the pickle protocols the writer emits (those of the original's files)
WRITTEN_PROTOCOLS = (0, 2)


def refuse_nonfinite(blobs: Mapping[str, Any], source: str, allow: bool) -> bool:
    """Refuse (``ConversionError``) or, with ``allow``, warn about the arrays of ``blobs`` that
    hold NaN/Inf values or negative BN variances (``*_riv``); names printed terminal-safe.
    ``source`` names the file in the messages. Non-array entries are skipped. Returns whether
    any array was found wanting (``True`` only with ``allow``)."""
    arrays = ((n, v) for n, v in blobs.items() if isinstance(v, np.ndarray))
    problems = check_finite(arrays, negative_ok=lambda n: not n.endswith("_riv"))
    if not problems:
        return False
    shown = [terminal_safe(p) for p in problems]
    if allow:
        for line in shown:
            logger.warning("%s: %s (written anyway: --allow-nonfinite)", source, line)
        return True
    listed = "; ".join(shown[:5]) + (f"; ... ({len(shown)} blobs in all)" if len(shown) > 5 else "")
    raise ConversionError(
        f"{source}: {len(shown)} blobs hold non-finite values or negative variances "
        f"({listed}); pass --allow-nonfinite to write them anyway"
    )


def check_lr(lr: Any, source: str) -> float:
    """``lr`` as a float, refused (``ConversionError``) unless finite and positive: the
    original's solver multiplies every step by it."""
    try:
        value = float(lr)
    except (TypeError, ValueError):
        raise ConversionError(f"{source}: lr must be a number, got {lr!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConversionError(f"{source}: lr must be finite and positive, got {value!r}")
    return value


def _is_blob_value(name: str, value: Any) -> bool:
    if name in SCALAR_ENTRIES:
        return isinstance(value, (int, float, np.ndarray, np.generic)) and not isinstance(
            value, bool
        )
    return isinstance(value, (np.ndarray, LazyArray, np.generic))


def is_caffe2_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Caffe2 checkpoint as this package's writers write it: a pickle of
    protocol 0 or 2 (what the original's Python 2 wrote; Python 3's own pickles are 3 and up)
    holding a dict of blobs, flat or as ``{'blobs': ...}``, whose every entry is a numeric
    array (``lr``, ``model_iter`` and ``epoch`` numbers). Only the pickle's structure is read,
    with the safe unpickler (array payloads are skipped); a file that is anything else (a
    user's own pickle, a text file that starts like one) is not. The original's released
    checkpoints have the same form and are recognised as well."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4096)
            if not looks_like_pickle(head) or describe_known_format(head, path) is not None:
                return False
            f.seek(0)
            unpickler = SafeUnpickler(f, path, size)
            top = unpickler.load()
    except (OSError, ValueError, MemoryError, RecursionError):
        return False
    if unpickler.protocol not in WRITTEN_PROTOCOLS or not isinstance(top, dict):
        return False
    inner = top["blobs"] if set(top) == {"blobs"} and isinstance(top["blobs"], dict) else top
    return bool(inner) and all(
        isinstance(k, str) and _is_blob_value(k, v) for k, v in inner.items()
    )


@contextlib.contextmanager
def caffe2_destination(dst: str, inputs: list[str | None], overwrite: bool) -> Iterator[None]:
    """Claim ``dst`` for a Caffe2 ``.pkl`` writer (``--ftvideo``, ``--blob-rm``,
    ``--to-caffe2``): never one of ``inputs``, replaced without ``overwrite`` only when it is a
    Caffe2 checkpoint, locked while the block runs, temporaries of a killed earlier write
    removed first."""
    check_destination(
        dst,
        inputs,
        what="Caffe2 checkpoint",
        is_own_output=is_caffe2_checkpoint,
        replace_foreign=overwrite,
    )
    with output_lock(dst):
        remove_stale_temporaries(dst)  # left by a write killed with SIGKILL
        yield
