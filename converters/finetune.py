"""The original's fine-tuning file conversions, and ``pred`` re-initialisation.

The original prepares initialisation files for training with three small scripts under
``process_data/convert_models/``; their results are reproduced here on blob dicts and files:

* :func:`convert_to_finetune` (the library function of ``convert_to_finetune.py``): drop
  ``epoch``/``model_iter``/``lr`` and every ``*_momentum``; fold every BN (every blob prefix
  before the first ``_bn_``, non-local BNs included) into a frozen affine with
  ``std = sqrt(riv + 1e-5)`` (epsilon exactly 1e-5, float32), ``s' = s / std``,
  ``b' = b - rm * s / std``; drop ``_rm``/``_riv``.
* :func:`modify_caffe2_ftvideo` (``modify_caffe2_ftvideo.py``, the "freeze BN" files such as
  ``affine_model_400k.pkl``): the above, then drop every blob whose name contains ``pred`` or
  ``momentum``, and set ``lr = 0.00125``.
* :func:`modify_blob_rm` (``modify_blob_rm.py``, a Kinetics model prepared for another
  dataset): drop ``model_iter`` and every blob whose name contains ``_riv``, ``_rm``,
  ``_momentum`` or ``pred``; keep BN ``_s``/``_b`` (the running statistics restart from
  ``rm = 0``, ``riv = 1``); set ``lr = 0.01``.

Both scripts write a *flat* dict (no ``{'blobs': ...}``) with pickle protocol 0 and ``lr`` a
Python float; :func:`write_finetune_file` does the same through the project's Python-2-compatible
writer. Unlike the original scripts, wrapped and flat inputs are both accepted, a missing
``model_iter`` is not an error, and a BN prefix without its running statistics is reported by
name instead of a ``KeyError``. Both refuse what plain conversion refuses (non-finite values,
negative variances, a destination that is an input or not a Caffe2 checkpoint), and refuse
entries that are not arrays where the original script would have kept them (it deletes entries
by name only, whatever their type, and pickles the rest as they are).

:func:`reinit_pred` gives a model a fresh classifier for ``MODEL.NUM_CLASSES K``, as the
original's training initialiser does when the file's ``pred`` has another size: weights
Gaussian with std ``MODEL.FC_INIT_STD`` (0.01), bias 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from nonlocal_net.utils.log import terminal_safe

from .checks import caffe2_destination, refuse_nonfinite
from .errors import ConversionError
from .reader import Caffe2Pkl, read_caffe2_pkl
from .transforms import fold_bn
from .writer import write_caffe2_pkl

__all__ = [
    "BLOB_RM_LR",
    "FINETUNE_MODES",
    "FTVIDEO_LR",
    "convert_to_finetune",
    "modify_blob_rm",
    "modify_caffe2_ftvideo",
    "reinit_pred",
    "write_finetune_file",
]

logger = logging.getLogger(__name__)

FTVIDEO_LR = 0.00125  # the lr entry modify_caffe2_ftvideo.py writes
BLOB_RM_LR = 0.01  # the lr entry modify_blob_rm.py writes


def convert_to_finetune(blobs: Mapping[str, Any]) -> dict[str, Any]:
    """``convert_to_finetune.py``'s conversion of a checkpoint's blob dict (see the module doc).
    Returns a new dict; the input is not modified."""
    out = dict(blobs)
    for key in ("epoch", "model_iter", "lr"):
        out.pop(key, None)
    for key in [k for k in out if k.endswith("_momentum")]:
        del out[key]
    done: set[str] = set()
    for key in sorted(out):
        if "_bn_" not in key:
            continue
        prefix = key.split("_bn_", 1)[0]
        if prefix in done:
            continue
        done.add(prefix)
        names = {x: f"{prefix}_bn_{x}" for x in ("s", "b", "rm", "riv")}
        absent = [n for n in names.values() if n not in out]
        if absent:
            raise ConversionError(
                f"cannot fold BN {prefix}_bn: {', '.join(absent)} not in the file "
                "(already folded, or not a BN checkpoint)"
            )
        new_s, new_b = fold_bn(*(out[names[x]] for x in ("s", "b", "rm", "riv")))
        out[names["s"]], out[names["b"]] = new_s, new_b
        del out[names["rm"]], out[names["riv"]]
    return out


def modify_caffe2_ftvideo(blobs: Mapping[str, Any]) -> dict[str, Any]:
    """``modify_caffe2_ftvideo.py``: BN folded into affines, no ``pred``, no momentum,
    ``lr = 0.00125`` (the flat blob dict to write with protocol 0)."""
    out = convert_to_finetune(blobs)
    out = {k: v for k, v in out.items() if "pred" not in k and "momentum" not in k}
    out["lr"] = FTVIDEO_LR
    return out


def modify_blob_rm(blobs: Mapping[str, Any]) -> dict[str, Any]:
    """``modify_blob_rm.py``: no ``model_iter``, no BN running statistics, no momentum, no
    ``pred``; BN ``_s``/``_b`` and every conv kept; ``lr = 0.01``."""
    dropped = ("_riv", "_rm", "_momentum", "pred")
    out = {k: v for k, v in blobs.items() if k != "model_iter" and not any(s in k for s in dropped)}
    out["lr"] = BLOB_RM_LR
    return out


FINETUNE_MODES = {
    "ftvideo": modify_caffe2_ftvideo,
    "blob-rm": modify_blob_rm,
}


# the entries each original script deletes by name; any other non-array entry would be written
# into the file as it is (a list, a dict), where the original's loader cannot feed it as a blob
_DROPPED_BY_NAME: dict[str, Callable[[str], bool]] = {
    "ftvideo": lambda name: "pred" in name or "momentum" in name,
    "blob-rm": lambda name: (
        name == "model_iter" or any(s in name for s in ("_riv", "_rm", "_momentum", "pred"))
    ),
}


def _refuse_non_arrays(ckpt: Caffe2Pkl, mode: str) -> None:
    """Refuse entries that are not arrays (lists, nested dicts, strings) unless the original's
    script deletes them by name (then they are dropped as it drops them)."""
    dropped = _DROPPED_BY_NAME[mode]
    kept = [name for name in ckpt.other if not dropped(name)]
    if kept:
        shown = ", ".join(
            f"{terminal_safe(n)} ({type(ckpt.other[n]).__name__})" for n in kept[:5]
        ) + (f", ... ({len(kept)} in all)" if len(kept) > 5 else "")
        raise ConversionError(
            f"{ckpt.path}: {len(kept)} entries are not arrays ({shown}); a Caffe2 blob is an "
            f"array, and --{mode} would keep them"
        )
    for name in ckpt.other:
        logger.info(
            "%s: dropping the non-array entry %s (%s)", ckpt.path, terminal_safe(name), mode
        )


def write_finetune_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    mode: str,
    *,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Read the Caffe2 checkpoint ``src`` (safely), apply ``mode`` (``"ftvideo"``:
    :func:`modify_caffe2_ftvideo`, ``"blob-rm"``: :func:`modify_blob_rm`) and write the result
    as the original scripts do (flat dict, pickle protocol 0), atomically. Returns the blobs
    written.

    Refused (``ConversionError`` / ``OutputError``, nothing written), as by plain conversion:
    ``dst`` the same file as ``src``; ``dst`` an existing file that is not a Caffe2 checkpoint
    (:func:`.checks.is_caffe2_checkpoint`) unless ``overwrite``; blobs of ``src`` with NaN/Inf
    values or negative BN variances, or a result with non-finite values (a BN fold that
    overflows), unless ``allow_nonfinite``; entries that are not arrays and that the original
    script would keep. ``dst`` is locked while written; temporaries of a killed earlier run are
    removed."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"unknown fine-tuning conversion {mode!r}; one of {list(FINETUNE_MODES)}")
    src, dst = os.fspath(src), os.fspath(dst)
    with caffe2_destination(dst, [src], overwrite):
        ckpt = read_caffe2_pkl(src, load_momentum=False)  # momentum is dropped by both modes
        _refuse_non_arrays(ckpt, mode)
        warned = refuse_nonfinite(ckpt.blobs, src, allow_nonfinite)
        entries = dict(ckpt.blobs)
        for name, value in (
            ("lr", ckpt.lr),
            ("model_iter", ckpt.model_iter),
            ("epoch", ckpt.epoch),
        ):
            if value is not None:
                entries[name] = value
        out = FINETUNE_MODES[mode](entries)
        if not warned:  # a fold can overflow: the result is checked too
            refuse_nonfinite(out, f"{src} (after --{mode})", allow_nonfinite)
        write_caffe2_pkl(out, dst, protocol=0, wrapped=False)
    logger.info("wrote %s (%s): %d entries", dst, mode, len(out))
    return out


@torch.no_grad()
def reinit_pred(
    model: nn.Module, std: float | None = None, generator: torch.Generator | None = None
) -> None:
    """Re-initialise ``model.pred`` for fine-tuning on a new label set: weight Gaussian with
    standard deviation ``std`` (default ``model.cfg.MODEL.FC_INIT_STD``, 0.01 in the original),
    bias 0. The class count is the model's (``MODEL.NUM_CLASSES``)."""
    pred = getattr(model, "pred", None)
    if pred is None:
        raise ValueError("the model has no pred layer")
    if std is None:
        cfg = getattr(model, "cfg", None)
        std = float(cfg.MODEL.FC_INIT_STD) if cfg is not None else 0.01
    pred.weight.normal_(0.0, std, generator=generator)
    if pred.bias is not None:
        pred.bias.zero_()
