"""Synthetic Caffe2 checkpoints with realistic statistics (for the demo, benchmarks and tests).

The released files cannot be downloaded everywhere, so the offline demo and the benchmarks write
a checkpoint shaped exactly like a released one: every parameter and BN statistic of the model, a
momentum blob for every trainable parameter, ``lr`` and ``model_iter``, written with
:func:`~.writer.write_caffe2_pkl` as the original's training code wrote it. The values are random
but look trained (:func:`synthetic_blob`):

* conv weights at He scale on the fan-in, so activations neither vanish nor explode over 16+
  blocks and the network's output depends on its input;
* positive running variances and non-zero running means that match no batch statistics (a port
  that normalised with batch statistics, or with ``1/riv``, would differ);
* non-zero non-local BN/affine gammas and output convs, so the non-local branches contribute;
* theta/phi at half the He scale: attention depends on the content without saturating;
* a classifier at the original's FC init scale (logits of a few units, an unsaturated softmax).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from yacs.config import CfgNode

from nonlocal_net.core.config import get_cfg
from nonlocal_net.models import build_model

from .names import state_dict_key_to_blob
from .writer import write_caffe2_pkl

__all__ = [
    "load_synthetic_weights",
    "synthetic_blob",
    "synthetic_checkpoint_blobs",
    "write_synthetic_checkpoint",
]

LR_400K = 1e-4  # the learning rate of the last step of the 400k schedules


def synthetic_blob(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A float64 random value for the Caffe2 blob ``name`` of ``shape`` (see the module doc)."""
    nonlocal_ = name.startswith("nonlocal_conv")
    if name.endswith("_riv"):
        return rng.uniform(0.5, 2.0, shape)
    if name.endswith("_rm"):
        return rng.normal(0.0, 0.2, shape)
    if name.endswith("_bn_s"):
        # the last BN of a residual branch is kept small so the sum stays O(1)
        low, high = (0.1, 0.3) if nonlocal_ or "branch2c" in name else (0.5, 1.5)
        return rng.uniform(low, high, shape)
    if name.endswith("_bn_b"):
        return rng.normal(0.0, 0.1, shape)
    if name.endswith("_b"):  # conv / FC biases
        return rng.normal(0.0, 0.05, shape)
    if name == "pred_w":  # the original's FC init scale: logits of a few units
        return rng.normal(0.0, 0.01, shape)
    # conv weights: He scale on the fan-in; half for theta/phi (unsaturated attention); 0.2 for
    # the non-local output conv, which affine models do not follow with a normalisation
    fan_in = math.prod(shape[1:])
    gain = 0.2 if name.endswith("_out_w") else 0.5 if name.endswith(("_theta_w", "_phi_w")) else 1
    return rng.normal(0.0, gain * math.sqrt(2.0 / fan_in), shape)


def synthetic_checkpoint_blobs(
    cfg: CfgNode | str | os.PathLike,
    *,
    seed: int = 0,
    momentum: bool = True,
    model_iter: int | None = 400000,
    lr: float | None = LR_400K,
) -> dict[str, Any]:
    """Every blob of a training checkpoint of ``cfg``'s network (a zoo name, YAML or config):
    parameters and BN statistics as float32 arrays (``pred_w`` as the FC ``(K, 2048)``), plus a
    ``<param>_momentum`` blob per trainable parameter, ``lr`` (a 0-d float32 array) and
    ``model_iter``, as the original's ``save_model_params`` writes them."""
    with torch.device("meta"):  # names and shapes only, no memory
        model = build_model(get_cfg(cfg), split="val")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    rng = np.random.default_rng(seed)
    blobs: dict[str, Any] = {}
    if model_iter is not None:
        blobs["model_iter"] = int(model_iter)
    if lr is not None:
        blobs["lr"] = np.array(lr, dtype=np.float32)
    params: dict[str, np.ndarray] = {}
    for key, tensor in model.state_dict().items():
        name = state_dict_key_to_blob(key)
        value = synthetic_blob(name, tuple(tensor.shape), rng).astype(np.float32)
        params[name] = value
        if momentum and key in trainable:
            blobs[name + "_momentum"] = value * np.float32(1e-3)
    blobs.update(params)
    return blobs


def write_synthetic_checkpoint(
    path: str | os.PathLike,
    cfg: CfgNode | str | os.PathLike,
    *,
    seed: int = 0,
    momentum: bool = True,
) -> dict[str, Any]:
    """Write :func:`synthetic_checkpoint_blobs` as a protocol-2 ``{'blobs': ...}`` training
    checkpoint (atomically) and return the blobs."""
    blobs = synthetic_checkpoint_blobs(cfg, seed=seed, momentum=momentum)
    write_caffe2_pkl(blobs, path, protocol=2, wrapped=True)
    return blobs


def load_synthetic_weights(model: torch.nn.Module, *, seed: int = 0) -> torch.nn.Module:
    """Fill a built model (any split) with :func:`synthetic_blob` values in place, without
    writing a checkpoint: trained-like weights for tests and benchmarks of the PyTorch side."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            name = state_dict_key_to_blob(key)
            value = synthetic_blob(name, tuple(tensor.shape), rng)
            tensor.copy_(torch.from_numpy(value.astype(np.float32)))
    return model
