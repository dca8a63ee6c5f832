"""Realistic synthetic Caffe2 checkpoints, written the way the original wrote them.

Blob names and shapes come from ``blob_inventory`` (derived from the specification alone), the
bytes from ``caffe2_pickles`` (Python 2 cPickle's opcodes), the values from ``synthetic_blobs``
(random but shaped like trained ones: He-scaled conv weights, BN scales near 1, small on
``branch2c`` and in non-local blocks, positive running variances that match no batch
statistics, non-local branches that contribute, small classifier weights).

Also here: :func:`assign_blobs_by_hand`, an independent way of putting blobs into a model (by
walking modules with plain string handling, not through the converter's name rules), which
the parity tests compare the converter against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from blob_inventory import Arch, expected_blobs, is_trainable
from caffe2_pickles import dump_py2, script_file_keys, training_checkpoint_keys
from synthetic_blobs import make_blobs
from torch import nn

__all__ = [
    "affine_file_blobs",
    "assign_blobs_by_hand",
    "imagenet_blobs",
    "realistic_blobs",
    "training_checkpoint_blobs",
    "write_affine_file",
    "write_imagenet_file",
    "write_training_checkpoint",
]

LR_400K = np.float32(1e-4)  # the last learning rate of the 400k schedules


def realistic_blobs(arch: Arch, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every parameter and running-statistic blob of ``arch`` (float32, C order), drawn with
    the tests' one value rule (:func:`synthetic_blobs.make_blobs`)."""
    return make_blobs(expected_blobs(arch), rng)


def training_checkpoint_blobs(arch: Arch, rng: np.random.Generator) -> dict[str, Any]:
    """A training checkpoint's blob dict (``save_model_params``): ``model_iter``, ``lr`` (0-d
    float32 array), a momentum blob for every trainable parameter, every parameter and
    statistic."""
    params = realistic_blobs(arch, rng)
    blobs: dict[str, Any] = {"model_iter": 400000, "lr": np.array(LR_400K)}
    for name, value in params.items():
        if is_trainable(name, arch):
            blobs[name + "_momentum"] = (value * np.float32(1e-3)).astype(np.float32)
    blobs.update(params)
    return blobs


def affine_file_blobs(arch: Arch, rng: np.random.Generator) -> dict[str, Any]:
    """What ``modify_caffe2_ftvideo.py`` writes for an affine ``arch``: conv weights, folded
    ``_bn_s``/``_bn_b``, no ``pred``, no momentum, ``lr`` = 0.00125 as a Python float."""
    assert arch.affine
    blobs: dict[str, Any] = {
        name: value for name, value in realistic_blobs(arch, rng).items() if "pred" not in name
    }
    blobs["lr"] = 0.00125
    return blobs


def imagenet_blobs(depth: int, rng: np.random.Generator) -> dict[str, Any]:
    """An ImageNet ResNet in the same Caffe2 naming, 2-D: 4-D conv weights, BN with running
    statistics, a 1000-class ``pred``, ``lr``, no ``model_iter``, no non-local blocks."""
    arch = Arch(
        arc=1 if depth == 50 else 3,
        depth=depth,
        conv3_nonlocal=False,
        conv4_nonlocal=False,
        num_classes=1000,
    )
    blobs: dict[str, Any] = {}
    for name, value in realistic_blobs(arch, rng).items():
        if value.ndim == 5:  # (Cout, Cin, 1, kh, kw) -> (Cout, Cin, kh, kw)
            value = np.ascontiguousarray(value[:, :, 0])
        blobs[name] = value
    blobs["lr"] = 0.1
    return blobs


def write_training_checkpoint(path: Path, blobs: dict[str, Any]) -> Path:
    """Protocol 2, wrapped in ``{'blobs': ...}``, with the original's key types."""
    with open(path, "wb") as f:
        dump_py2({"blobs": training_checkpoint_keys(blobs)}, f, protocol=2)
    return path


def write_affine_file(path: Path, blobs: dict[str, Any]) -> Path:
    """Protocol 0, flat, as the original's conversion scripts wrote."""
    with open(path, "wb") as f:
        dump_py2(script_file_keys(blobs), f, protocol=0)
    return path


def write_imagenet_file(path: Path, blobs: dict[str, Any]) -> Path:
    """Protocol 2, flat (the ``_clean`` ImageNet files hold no ``model_iter``)."""
    with open(path, "wb") as f:
        dump_py2(script_file_keys(blobs), f, protocol=2)
    return path


# --------------------------------------------------------------------------------------------
# An independent loader, for the parity tests.

_BN_ATTR = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
_PARAM_ATTR = {"w": "weight", "b": "bias"}


def _locate(model: nn.Module, blob: str) -> tuple[nn.Module, str]:
    """The module and attribute a Caffe2 blob belongs to, by splitting the name on '_'."""
    parts = blob.split("_")
    if parts[0] == "conv1":  # conv1_w
        return model.conv1, _PARAM_ATTR[parts[1]]
    if parts[0] == "pred":  # pred_w, pred_b
        return model.pred, _PARAM_ATTR[parts[1]]
    if parts[:3] == ["res", "conv1", "bn"]:  # res_conv1_bn_<x>
        return model.res_conv1_bn, _BN_ATTR[parts[3]]
    if parts[0] == "nonlocal":  # nonlocal_conv<s>_<i>_<part>_<w|b> / _bn_<x>
        stage = getattr(model, "res" + parts[1][len("conv") :])
        block = dict(stage.named_children())["nonlocal_" + parts[2]]
        if parts[3] == "bn":
            return block.bn, _BN_ATTR[parts[4]]
        return getattr(block, parts[3]), _PARAM_ATTR[parts[4]]
    # res<s>_<i>_branch<b>_w / res<s>_<i>_branch<b>_bn_<x>
    stage = getattr(model, parts[0])
    block = dict(stage.named_children())[parts[1]]
    if parts[3] == "bn":
        return getattr(block, parts[2] + "_bn"), _BN_ATTR[parts[4]]
    return getattr(block, parts[2]), _PARAM_ATTR[parts[3]]


@torch.no_grad()
def assign_blobs_by_hand(model: nn.Module, blobs: dict[str, Any]) -> nn.Module:
    """Copy every parameter/statistic blob into ``model`` (``*_momentum``, ``lr`` and
    ``model_iter`` skipped) and check that every tensor of the model was assigned exactly once."""
    assigned: list[int] = []
    for name, value in blobs.items():
        if name in ("lr", "model_iter", "epoch") or name.endswith("_momentum"):
            continue
        module, attr = _locate(model, name)
        tensor = getattr(module, attr)
        source = torch.from_numpy(np.asarray(value, dtype=np.float32))
        assert source.numel() == tensor.numel(), (name, tuple(source.shape), tuple(tensor.shape))
        tensor.copy_(source.reshape(tensor.shape))
        assigned.append(id(tensor))
    every = [id(t) for t in model.state_dict(keep_vars=True).values()]
    assert sorted(assigned) == sorted(every), "not every model tensor was assigned exactly once"
    return model
