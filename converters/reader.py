"""Read a Caffe2 checkpoint (``.pkl``) as the original wrote it, safely.

The original writes two layouts (the original's ``lib/utils/checkpoints.py`` and its conversion
scripts):

* training checkpoints ``c2_model_iter<N>.pkl``: Python-2 ``cPickle`` protocol 2, a dict
  ``{'blobs': {...}}`` holding ``model_iter`` (int), ``lr`` (a 0-d float32 array), every
  parameter and BN running statistic, and ``<param>_momentum`` for every trainable parameter;
* the files of its conversion scripts (BN folded into affine, prepared for fine-tuning):
  protocol 0, the flat inner dict, ``lr`` a Python float, no ``model_iter`` and no momentum.

Both load here, through :class:`~.safe_pickle.SafeUnpickler` (no code from the file runs), and a
file that is not a pickle at all gets an error that says what it is instead.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from .errors import Caffe2FormatError, UnsafePickleError
from .safe_pickle import PICKLE_OPCODES, LazyArray, SafeUnpickler
from .sniff import describe_file_head, describe_known_format, looks_like_pickle

__all__ = [
    "MOMENTUM_SUFFIX",
    "SCALAR_ENTRIES",
    "ArrayInfo",
    "Caffe2Pkl",
    "read_caffe2_pkl",
]

logger = logging.getLogger(__name__)

MOMENTUM_SUFFIX = "_momentum"
# Bookkeeping entries of a checkpoint: recognised, reported, never loaded into a model.
SCALAR_ENTRIES = ("lr", "model_iter", "epoch")


@dataclass(frozen=True)
class ArrayInfo:
    """Shape and dtype of an array whose payload was not read (momentum, when not requested)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class Caffe2Pkl:
    """The contents of a Caffe2 ``.pkl``.

    Attributes:
        path: the file read.
        blobs: parameter and running-statistic arrays by blob name, as stored (float32 in every
            file the original wrote).
        momentum: the optimizer's ``<param>_momentum`` arrays (empty if not requested, see
            ``momentum_info``).
        momentum_info: shape/dtype of every momentum blob, whether its payload was read or not.
        model_iter: the iteration counter, or ``None`` if the file has none.
        lr: the learning rate, or ``None`` if the file has none.
        epoch: an ``epoch`` counter (some Caffe2 tools write one), or ``None``.
        wrapped: whether the blobs were inside a top-level ``{'blobs': ...}``.
        protocol: the pickle protocol (0 for the conversion scripts' files, 2 for checkpoints).
        size: the file size in bytes.
        other: any other entries that are not arrays (reported as unknown by the converter).
        top_level_extra: top-level keys next to ``'blobs'`` (ignored, as the original does).
        names: every entry name of the blob dict, in file order.
    """

    path: str
    blobs: dict[str, np.ndarray]
    momentum: dict[str, np.ndarray]
    momentum_info: dict[str, ArrayInfo]
    model_iter: int | None
    lr: float | None
    epoch: int | None
    wrapped: bool
    protocol: int
    size: int
    other: dict[str, Any] = field(default_factory=dict)
    top_level_extra: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def entries(self) -> dict[str, Any]:
        """Every entry of the blob dict in file order, as :func:`convert_blobs` takes them; a
        momentum blob whose payload was not read appears as its :class:`ArrayInfo`."""
        out: dict[str, Any] = {}
        scalars = {"lr": self.lr, "model_iter": self.model_iter, "epoch": self.epoch}
        for name in self.names:
            if name in self.blobs:
                out[name] = self.blobs[name]
            elif name in self.momentum_info:
                out[name] = self.momentum.get(name, self.momentum_info[name])
            elif name in scalars:
                out[name] = scalars[name]
            else:
                out[name] = self.other[name]
        return out

    def describe(self) -> str:
        """One line: layout, protocol and what the file holds."""
        layout = "wrapped {'blobs': ...}" if self.wrapped else "flat dict"
        parts = [
            f"pickle protocol {self.protocol}, {layout}",
            f"{len(self.blobs)} parameter/statistic arrays",
            f"{len(self.momentum_info)} momentum blobs",
        ]
        if self.lr is not None:
            parts.append(f"lr {self.lr:.6g}")
        if self.model_iter is not None:
            parts.append(f"model_iter {self.model_iter}")
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch}")
        if self.other:
            parts.append(f"{len(self.other)} other entries")
        return ", ".join(parts)


def _number(path: str, name: str, value: Any, kind: type) -> Any:
    """``lr`` / ``model_iter`` / ``epoch`` as a Python number (the original calls ``float(lr)``,
    which accepts a Python number, a numpy scalar or a one-element array)."""
    if isinstance(value, LazyArray) or (isinstance(value, np.ndarray) and value.size != 1):
        raise Caffe2FormatError(
            f"{path}: entry {name!r} must be a single number, found an array of shape "
            f"{tuple(value.shape)}"
        )
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise Caffe2FormatError(
            f"{path}: entry {name!r} must be a number, found {type(value).__name__}"
        )
    if isinstance(value, (int, np.integer)):
        if not -(2**63) <= int(value) < 2**63:
            raise Caffe2FormatError(f"{path}: entry {name!r} is out of range ({name} too large)")
    elif not math.isfinite(float(value)):
        raise Caffe2FormatError(f"{path}: entry {name!r} must be finite, found {float(value)}")
    if kind is int and float(value) != int(value):
        raise Caffe2FormatError(f"{path}: entry {name!r} must be an integer, found {value!r}")
    return kind(value)


def _not_a_pickle(path: str, head: bytes) -> Caffe2FormatError:
    return Caffe2FormatError(
        f"{path}: not a Caffe2 checkpoint (a Python pickle): it is {describe_file_head(head, path)}"
    )


def _open_checked(path: str) -> int:
    try:
        if os.path.isdir(path):
            raise Caffe2FormatError(f"{path}: is a directory, not a Caffe2 checkpoint file")
        return os.path.getsize(path)
    except FileNotFoundError:
        raise Caffe2FormatError(f"{path}: no such file") from None


def read_caffe2_pkl(path: str | os.PathLike, *, load_momentum: bool = True) -> Caffe2Pkl:
    """Read a Caffe2 checkpoint without executing anything from it.

    Accepts the original's wrapped protocol-2 training checkpoints and its flat protocol-0
    files, keys that are Python-2 ``str`` or ``unicode``, ``lr`` as a 0-d array or a float.
    With ``load_momentum=False`` the momentum payloads are skipped on disk (only their shapes
    are recorded), which halves the memory and time needed for a training checkpoint.

    Raises:
        Caffe2FormatError: the file is missing, not a pickle (the message says what it looks
            like: an archive, an HTML page, ...), truncated, corrupt, or not a dict of blobs.
        UnsafePickleError: the pickle asks for anything but numpy arrays and plain values.
    """
    path = os.fspath(path)
    size = _open_checked(path)
    with open(path, "rb", buffering=1 << 16) as f:
        head = f.read(4096)
        plausible = looks_like_pickle(head)
        if describe_known_format(head, path) is not None or (
            not plausible and head[:1] not in PICKLE_OPCODES
        ):
            raise _not_a_pickle(path, head)
        f.seek(0)
        unpickler = SafeUnpickler(f, path, size)
        try:
            top = unpickler.load()
        except UnsafePickleError:
            raise
        except Caffe2FormatError as e:
            if plausible:
                raise
            # starts with an opcode byte but is no pickle: say what it looks like
            raise _not_a_pickle(path, head) from e
        if not isinstance(top, dict):
            raise Caffe2FormatError(
                f"{path}: the pickle holds a {type(top).__name__}, not a dict of blobs"
            )
        wrapped = "blobs" in top and isinstance(top["blobs"], dict)
        inner = top["blobs"] if wrapped else top
        extra = sorted(str(k) for k in top if k != "blobs") if wrapped else []
        if extra:
            logger.warning("%s: ignoring top-level entries next to 'blobs': %s", path, extra)
        bad_keys = [k for k in inner if not isinstance(k, str)]
        if bad_keys:
            raise Caffe2FormatError(
                f"{path}: blob names must be strings, found {', '.join(map(repr, bad_keys[:5]))}"
            )
        ckpt = Caffe2Pkl(
            path=path,
            blobs={},
            momentum={},
            momentum_info={},
            model_iter=None,
            lr=None,
            epoch=None,
            wrapped=wrapped,
            protocol=unpickler.protocol,
            size=size,
            top_level_extra=extra,
            names=list(inner),
        )
        pending: list[tuple[str, LazyArray, dict[str, np.ndarray]]] = []
        for name, value in inner.items():
            if name in SCALAR_ENTRIES:
                kind = float if name == "lr" else int
                setattr(ckpt, name, _number(path, name, value, kind))
            elif isinstance(value, (np.ndarray, LazyArray, np.generic)):
                if isinstance(value, np.generic):
                    value = np.asarray(value)
                if name.endswith(MOMENTUM_SUFFIX):
                    ckpt.momentum_info[name] = ArrayInfo(tuple(value.shape), value.dtype)
                    if not load_momentum:
                        continue
                    target = ckpt.momentum
                else:
                    target = ckpt.blobs
                if isinstance(value, LazyArray):
                    pending.append((name, value, target))
                else:
                    target[name] = value
            else:
                ckpt.other[name] = value
        _read_payloads(f, path, pending)
    for target in (ckpt.blobs, ckpt.momentum):  # file order
        order = {n: i for i, n in enumerate(ckpt.names)}
        items = sorted(target.items(), key=lambda kv: order[kv[0]])
        target.clear()
        target.update(items)
    logger.debug("%s: %s", path, ckpt.describe())
    return ckpt


def _read_payloads(f, path: str, pending: list[tuple[str, LazyArray, dict]]) -> None:
    """Read the skipped array payloads in file order, each straight into its array."""
    pending.sort(key=lambda item: item[1].data.offset)
    total = sum(lazy.nbytes for _, lazy, _ in pending)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"reading {os.path.basename(path)}",
        disable=None,
        leave=False,
    ) as bar:
        for name, lazy, target in pending:
            target[name] = lazy.read(f, path)
            bar.update(lazy.nbytes)
