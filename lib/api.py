"""The top-level API: models from a zoo name, a weights file or a released Caffe2 ``.pkl``.

``create_model(name, pretrained=True)`` and ``load_model(name)`` take a released model by name:
its ``.pkl`` is downloaded once into the torch hub cache and converted once, and the converted
weights are cached beside it (:mod:`nonlocal_net.pretrained`).

It sits above both :mod:`nonlocal_net.models` and :mod:`nonlocal_net.converters`: a Caffe2 ``.pkl``
goes through the same safe reader and the same total converter as ``vnl-convert`` (so it is
refused for exactly the same reasons), in memory, and then through the same strict load as a
converted weights file, so the model is bit for bit the one ``vnl-convert`` + ``load_model``
gives.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .converters.convert_file import convert_caffe2_pkl
from .converters.sniff import looks_like_pickle
from .core.config import CfgLike
from .core.hub import is_zoo_name
from .core.weights_file import WeightsFileError
from .datasets.class_names import class_names_for
from .models.model_builder import build_model, model_from_weights
from .models.model_builder import load_model as load_weights_model
from .models.resnet_video import ResNetVideo
from .pretrained import resolve_weights

__all__ = ["class_names", "create_model", "load_model"]


def looks_like_caffe2_pkl(path: str) -> bool:
    """A ``.pkl`` name, or a file that starts as a pickle (a weights file is a zip archive or a
    ``.safetensors`` file, neither of which does)."""
    if path.endswith(".pkl"):
        return True
    try:
        with open(path, "rb") as f:
            return looks_like_pickle(f.read(2))
    except OSError:
        return False


def load_model(
    path: str | os.PathLike,
    split: str = "test",
    overrides: Sequence[str] = (),
    map_location: str | torch.device = "cpu",
    *,
    model: CfgLike | None = None,
) -> ResNetVideo:
    """Load a model from a weights file (``.pt`` / ``.safetensors``, whose config it carries),
    from a released model's name (downloaded and converted once, then cached: see
    :mod:`nonlocal_net.pretrained`), or from a released Caffe2 ``.pkl``, which needs ``model``
    (a zoo name, YAML path or config) and is converted in memory exactly as
    ``vnl-convert SRC.pkl DST.pt --model NAME`` converts it.

    ``overrides`` are ``KEY VALUE`` pairs: applied to the stored config for a weights file, and
    to ``model``'s config for a ``.pkl`` (as ``vnl-convert``'s trailing overrides).
    """
    path = os.fspath(path)
    path = resolve_weights(path)
    if not looks_like_caffe2_pkl(path):
        if model is not None:
            raise ValueError(
                f"{path}: model= is for a Caffe2 .pkl; a weights file carries its own config"
            )
        return load_weights_model(path, split, overrides, map_location)
    if model is None:
        raise WeightsFileError(
            f"{path}: a Caffe2 .pkl holds no config: pass model=<zoo name, YAML or config>"
        )
    converted = convert_caffe2_pkl(path, model, overrides=overrides)
    return model_from_weights(converted.payload(), path, split, (), map_location)


def create_model(
    name: CfgLike,
    weights: str | os.PathLike | None = None,
    split: str = "test",
    overrides: Sequence[str] = (),
    map_location: str | torch.device = "cpu",
    *,
    pretrained: bool = False,
) -> ResNetVideo:
    """A model by zoo name (or YAML path / config), as ``timm.create_model``: with
    ``pretrained=True`` the released weights of the zoo name ``name`` (downloaded into the torch
    hub cache and converted on first use, from ``$VNL_ZOO_URL`` where it is set); freshly
    initialised when ``weights`` is ``None``; else with ``weights`` loaded, a released Caffe2
    ``.pkl`` (converted in memory for ``name``) or a weights file, whose stored config must then
    build the same network as ``name``."""
    if pretrained:
        if weights is not None:
            raise ValueError("pass either pretrained=True or weights=, not both")
        if not isinstance(name, str) or not is_zoo_name(name):
            raise ValueError(
                f"pretrained=True needs a released model's name (nl.list_models()), got {name!r}"
            )
        weights = name
    if weights is None:
        return build_model(name, split, overrides).to(map_location)
    path = resolve_weights(weights)
    if looks_like_caffe2_pkl(path):
        return load_model(path, split, overrides, map_location, model=name)
    loaded = load_weights_model(path, split, overrides, map_location)
    expected = build_model(name, split, overrides)
    shapes = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    if {k: tuple(v.shape) for k, v in loaded.state_dict().items()} != shapes:
        raise ValueError(f"{path}: its stored config builds another network than {name!r}")
    return loaded


def class_names(
    model: torch.nn.Module | int, labels: str | os.PathLike | None = None
) -> list[str] | None:
    """Names of ``model``'s classes (a model, or its number of classes), indexed by class id:
    read from ``labels`` (the original's ``classids.json`` or one name per line) when given, else
    the built-in Kinetics-400 names for a 400-class model, else ``None``."""
    if isinstance(model, int):
        num_classes = model
    else:
        cfg = getattr(model, "cfg", None)
        num_classes = int(cfg.MODEL.NUM_CLASSES) if cfg is not None else model.pred.out_features
    return class_names_for(num_classes, labels)
