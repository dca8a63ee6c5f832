"""Public entry points: :func:`build_model` (a network from its config) and :func:`load_model`
(a network from a weights file)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from yacs.config import CfgNode

from ..core.config import (
    CfgLike,
    ConfigError,
    build_cfg,
    cfg_from_dict,
    get_cfg,
    validate_model_cfg,
)
from ..core.weights_file import WeightsFileError, load_weights_file
from . import resnet_video, resnet_video_org
from .layers import SpatialBN, set_bn_group_size
from .resnet_video import SPLITS, ResNetVideo

__all__ = [
    "MODEL_CREATORS",
    "build_model",
    "has_batch_norm",
    "load_model",
    "model_from_weights",
    "train_bn_group_size",
]

logger = logging.getLogger(__name__)

MODEL_CREATORS: dict[str, Callable[[CfgNode, str], ResNetVideo]] = {
    "resnet_video": resnet_video.create_model,
    "resnet_video_org": resnet_video_org.create_model,
}


def build_model(cfg: CfgLike, split: str = "test", overrides: Sequence[str] = ()) -> ResNetVideo:
    """Build the original network for ``cfg`` (a config, zoo name or YAML path) and ``split``.

    ``split="test"`` gives the fully-convolutional head (averaged per-position softmax, 256
    crops); ``"val"`` the FC head (logits, 224 crops); ``"train"`` the FC head with dropout. The
    model is in eval mode for ``val``/``test`` (BN with running statistics, as the original's
    ``is_test``) and in train mode for ``train``. Its config is kept as ``model.cfg``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cfg = get_cfg(cfg, overrides)
    name = cfg.MODEL.MODEL_NAME
    if name not in MODEL_CREATORS:
        raise ConfigError(f"MODEL.MODEL_NAME must be one of {sorted(MODEL_CREATORS)}, got {name!r}")
    validate_model_cfg(cfg)
    try:
        model = MODEL_CREATORS[name](cfg, split)
    except ValueError as e:  # a combination of keys the original's builder asserts against
        raise ConfigError(f"config: {e}") from e
    if split == "train":
        set_bn_group_size(model, train_bn_group_size(cfg))
    model.train(split == "train")
    model.cfg = cfg
    return model


def train_bn_group_size(cfg: CfgNode) -> int:
    """Clips per BN group of the train-split model: the original's per-GPU batch
    ``TRAIN.BATCH_SIZE // NUM_GPUS`` (the config checks that it divides)."""
    return int(cfg.TRAIN.BATCH_SIZE) // int(cfg.NUM_GPUS)


def has_batch_norm(cfg: CfgNode) -> bool:
    """Whether the network of ``cfg`` has any SpatialBN (per-GPU statistics matter), decided
    on the ``meta`` device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = build_model(cfg, split="val")
    return any(isinstance(m, SpatialBN) for m in model.modules())


def load_model(
    path: str | os.PathLike,
    split: str = "test",
    overrides: Sequence[str] = (),
    map_location: str | torch.device = "cpu",
) -> ResNetVideo:
    """Rebuild the model stored in a weights file (``.pt`` or ``.safetensors``) and load its
    weights strictly.

    ``overrides`` are ``KEY VALUE`` pairs applied to the stored config (for example
    ``["TRAIN.VIDEO_LENGTH", "16"]``); any override that changes the parameter shapes makes the
    strict load fail with a message listing the offending names. A Caffe2 ``.pkl`` is loaded by
    :func:`nonlocal_net.load_model` (which converts it first).
    """
    path = os.fspath(path)
    data = load_weights_file(path, map_location=map_location)
    return model_from_weights(data, path, split, overrides, map_location)


def model_from_weights(
    weights: Mapping[str, Any],
    source: str,
    split: str = "test",
    overrides: Sequence[str] = (),
    map_location: str | torch.device = "cpu",
) -> ResNetVideo:
    """The model of a weights file's content (``state_dict``, ``cfg`` as a plain dict), with the
    weights loaded strictly; ``source`` names it in errors (:class:`WeightsFileError`)."""
    try:
        cfg = cfg_from_dict(weights["cfg"], source=f"{source} [cfg]")
        if overrides:
            cfg = build_cfg(cfg, overrides=overrides)
        validate_model_cfg(cfg, f"{source} [cfg]")
    except ConfigError as e:
        raise WeightsFileError(str(e)) from e
    model = build_model(cfg, split=split)
    state = weights["state_dict"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
        and not (k == "pred.weight" and state[k].numel() == expected[k].numel())
    )
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if items:
                shown = ", ".join(items[:8]) + (
                    f", ... ({len(items)} in all)" if len(items) > 8 else ""
                )
                parts.append(f"{label}: {shown}")
        raise WeightsFileError(f"{source}: weights do not fit the model ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    return model
