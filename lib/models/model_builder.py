"""Public entry points: :func:`get_cfg` and :func:`build_model`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from yacs.config import CfgNode

from ..core.config import (
    ConfigError,
    assert_and_infer_cfg,
    cfg_from_file,
    cfg_from_list,
    get_default_cfg,
    validate_model_cfg,
)
from . import resnet_video, resnet_video_org
from .resnet_video import SPLITS, ResNetVideo
from .zoo import ZOO, get_zoo_entry

__all__ = ["MODEL_CREATORS", "build_model", "get_cfg"]

logger = logging.getLogger(__name__)

MODEL_CREATORS: dict[str, Callable[[CfgNode, str], ResNetVideo]] = {
    "resnet_video": resnet_video.create_model,
    "resnet_video_org": resnet_video_org.create_model,
}

CfgLike = CfgNode | str | os.PathLike


def get_cfg(source: CfgLike | None = None, overrides: Sequence[str] = ()) -> CfgNode:
    """Return a frozen config.

    ``source`` is a zoo name (``"i3d_nonlocal_8x8_IN_pretrain_400k"``, the released file name
    without ``.pkl``), the path of an original-format YAML file, an existing config (copied), or
    ``None`` for the bare original defaults. ``overrides`` are ``KEY VALUE`` pairs as on the
    original command line, e.g. ``["MODEL.DEPTH", "101"]``.
    """
    if isinstance(source, CfgNode):
        cfg = source.clone()
        cfg.defrost()
        cfg_from_list(cfg, list(overrides))
    elif source is None:
        cfg = get_default_cfg()
        cfg_from_list(cfg, list(overrides))
    else:
        text = os.fspath(source)
        if text in ZOO or (not os.path.exists(text) and not text.endswith((".yaml", ".yml"))):
            return get_zoo_entry(text).cfg(list(overrides))
        cfg = get_default_cfg()
        cfg_from_file(cfg, text)
        cfg_from_list(cfg, list(overrides))
    assert_and_infer_cfg(cfg)
    cfg.freeze()
    return cfg


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
    model.train(split == "train")
    model.cfg = cfg
    return model
