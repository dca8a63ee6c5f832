"""The reverse direction: converted weights -> a Caffe2 ``.pkl`` with the original's names and
shapes, which the original's loader (and Python 2.7 + numpy 1.x) reads.

Blob names come from :func:`~.names.state_dict_key_to_blob`; ``pred_w`` is written as the FC
weight ``(K, 2048)`` that the original's checkpoints hold; every array is float32. The file
contains ``lr`` (the original's loader refuses a file without it) and, only when asked for,
``model_iter`` (the original starts training at that iteration when initialising from the file).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from nonlocal_net.core.config import cfg_from_dict, get_default_cfg
from nonlocal_net.core.weights_file import load_weights_file

from .checks import caffe2_destination, check_lr, refuse_nonfinite
from .errors import ConversionError
from .names import try_state_dict_key_to_blob
from .writer import write_caffe2_pkl

__all__ = ["Caffe2Export", "export_caffe2", "state_dict_to_blobs"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caffe2Export:
    """What :func:`export_caffe2` wrote."""

    path: str
    blobs: dict[str, tuple[int, ...]]  # parameter blobs (without lr / model_iter)
    lr: float
    model_iter: int | None
    protocol: int
    wrapped: bool


def state_dict_to_blobs(
    state_dict: Mapping[str, torch.Tensor | np.ndarray], source: str = "state_dict"
) -> dict[str, np.ndarray]:
    """Caffe2 blob name -> float32 array for every entry (``pred_w`` as ``(K, 2048)``); keys
    that no naming rule covers are an error listing all of them."""
    unknown = [k for k in state_dict if try_state_dict_key_to_blob(k) is None]
    if unknown:
        raise ConversionError(
            f"{source}: {len(unknown)} state_dict keys have no Caffe2 blob name: "
            + ", ".join(unknown)
        )
    blobs: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            if value.dtype != torch.float32:
                value = value.float()
            arr = value.contiguous().numpy()
        else:
            arr = np.require(value, dtype=np.float32, requirements="C")
        name = try_state_dict_key_to_blob(key)
        if name == "pred_w" and arr.ndim == 5:
            arr = arr.reshape(arr.shape[:2])  # test conv (K, 2048, 1, 1, 1) -> FC (K, 2048)
        blobs[name] = arr
    return blobs


def _load_source(source: Any) -> tuple[Mapping[str, Any], dict[str, Any], Any, str]:
    """(state_dict, meta, cfg or None, name) of a converted file, a state_dict or a model."""
    if isinstance(source, nn.Module):
        return source.state_dict(), {}, getattr(source, "cfg", None), type(source).__name__
    if isinstance(source, Mapping):
        return source, {}, None, "state_dict"
    path = os.fspath(source)
    data = load_weights_file(path)  # .pt or .safetensors
    cfg = cfg_from_dict(data["cfg"], source=f"{path} [cfg]")
    return data["state_dict"], data["meta"], cfg, path


def export_caffe2(
    source: str | os.PathLike | Mapping[str, torch.Tensor] | nn.Module,
    pkl_path: str | os.PathLike,
    *,
    protocol: int = 2,
    wrapped: bool = True,
    lr: float | None = None,
    model_iter: int | None = None,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
) -> Caffe2Export:
    """Write converted weights as a Caffe2 checkpoint.

    Args:
        source: a converted file (``.pt`` or ``.safetensors``), a state_dict, or a model.
        pkl_path: the ``.pkl`` to write (atomically).
        protocol, wrapped: 2 and ``True`` (default) write a training-checkpoint-like
            ``{'blobs': ...}`` with ``lr`` as a 0-d float32 array; 0 and ``False`` write the flat
            layout of the original's conversion scripts with ``lr`` a float.
        lr: the ``lr`` entry; by default the source file's ``lr`` recorded at conversion, else
            the config's ``SOLVER.BASE_LR``.
        model_iter: write a ``model_iter`` entry (omitted by default).
        allow_nonfinite: write blobs with NaN/Inf values or negative BN variances (default:
            refused, as by plain conversion, :func:`.checks.refuse_nonfinite`).
        overwrite: replace ``pkl_path`` even when it is not a Caffe2 checkpoint
            (:func:`.checks.is_caffe2_checkpoint`); it is never the source.

    ``lr`` must be finite and positive. ``pkl_path`` is locked while written; temporaries of a
    killed earlier run are removed.
    """
    dst = os.fspath(pkl_path)
    source_path = None if isinstance(source, (nn.Module, Mapping)) else os.fspath(source)
    with caffe2_destination(dst, [source_path], overwrite):
        state_dict, meta, cfg, name = _load_source(source)
        params = state_dict_to_blobs(state_dict, source=name)
        refuse_nonfinite(params, name, allow_nonfinite)
        blobs: dict[str, Any] = dict(params)
        if lr is None:
            lr = meta.get("source_lr")
        if lr is None:
            lr = (cfg if cfg is not None else get_default_cfg()).SOLVER.BASE_LR
        lr = check_lr(lr, f"{name}: the lr entry")
        blobs["lr"] = np.array(lr, dtype=np.float32) if wrapped else float(lr)
        if model_iter is not None:
            blobs["model_iter"] = int(model_iter)
        write_caffe2_pkl(blobs, dst, protocol=protocol, wrapped=wrapped)
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    logger.info("wrote %s: %d blobs, lr %.6g", os.fspath(pkl_path), len(shapes), float(lr))
    return Caffe2Export(os.fspath(pkl_path), shapes, float(lr), model_iter, protocol, wrapped)
