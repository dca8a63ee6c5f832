"""The layers ``vnl-extract --layer`` can record, and the recording itself.

``pool5`` is the pooled res5 feature (what the heads see); every other name is a module of the
backbone that ``forward_features`` runs, recorded by a forward hook and averaged over its
space-time positions. Kept apart from the extraction pipeline (:mod:`.extract`) because which
names exist and what a name's output is in a fast precision mode (:mod:`.inference`) are
questions of the model, not of the run over a video list.

What a name records, in every mode:

* the module's output on its last run in a forward pass (a block's ``relu`` runs three times:
  it records the block's output), averaged over its positions at the moment the module returns
  (an in-place ReLU after a BN cannot change the recorded BN output);
* inside a grouped non-local block (attention within 4-frame windows), the windows' rows are
  averaged back into one row per clip (the same mean over all positions);
* in a fast mode, the unit holding the name (the stem, a residual or non-local block) keeps the
  original's modules (:func:`~.inference.prepare_for_inference` ``record_layers``), so the name
  is the original's layer computed in that mode's arithmetic. With ``compile`` only ``pool5``
  is recorded (a compiled graph runs no module hooks), and other names are refused up front.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..datasets.protocol import TestProtocol
from ..models import fuse
from .inference import PRECISIONS

__all__ = [
    "POOL5",
    "FeatureTap",
    "LayerError",
    "LayerTaps",
    "check_layer",
    "feature_dim",
    "layer_dims",
    "layer_names",
    "serving_modes",
]

POOL5 = "pool5"


class LayerError(ValueError):
    """A layer name that is not recordable (unknown, or not served in the chosen mode)."""


def _meta_shapes(cfg, protocol: TestProtocol | None = None) -> dict[str, torch.Size]:
    """Output shape of every module ``forward_features`` runs (last run), in module order,
    from a forward pass of the test-split network of ``cfg`` on the meta device."""
    from ..models.model_builder import build_model

    protocol = protocol or TestProtocol.from_cfg(cfg)
    with torch.device("meta"):
        model = build_model(cfg, split="test").eval()
        shapes: dict[str, torch.Size] = {}
        for name, module in model.named_modules():
            if name:
                module.register_forward_hook(
                    lambda m, i, o, name=name: shapes.__setitem__(name, o.shape)
                )
        size = protocol.crop_size
        pooled = model.forward_features(torch.empty(1, 3, protocol.video_length, size, size))
    order = {name: k for k, (name, _) in enumerate(model.named_modules())}
    ordered = {POOL5: pooled.shape}
    ordered.update(
        sorted(((n, s) for n, s in shapes.items() if n != POOL5), key=lambda x: order[x[0]])
    )
    return ordered


def layer_names(model: torch.nn.Module) -> list[str]:
    """Names ``--layer`` accepts: ``pool5`` and every backbone module ``forward_features``
    runs (not the classifier, not the train-only dropout), in module order."""
    return list(_meta_shapes(model.cfg))


def layer_dims(cfg, protocol: TestProtocol | None = None) -> dict[str, int]:
    """``{name: channels}`` of every listed layer (one forward pass on the meta device)."""
    return {name: int(shape[1]) for name, shape in _meta_shapes(cfg, protocol).items()}


def feature_dim(cfg, layer: str, protocol: TestProtocol) -> int:
    """Channels of ``layer`` for the protocol's clips (a forward pass on the meta device)."""
    dims = layer_dims(cfg, protocol)
    if layer not in dims:
        raise LayerError(_unknown(layer))
    return dims[layer]


def _unknown(layer: str) -> str:
    return (
        f"unknown layer {layer!r}: use pool5 or a module name such as res4, res5.2 or "
        f"res4.nonlocal_5 (vnl-extract --list-layers prints them all)"
    )


def serving_modes(layer: str, compile: bool) -> tuple[str, ...]:
    """The precision modes that record ``layer`` (with ``compile`` or without)."""
    if compile and layer != POOL5:
        return ()
    return PRECISIONS[1:] if compile else PRECISIONS


def check_layer(model: torch.nn.Module, layer: str, precision: str, compile: bool = False) -> None:
    """Refuse, in one line (:class:`LayerError`), a ``layer`` that ``model`` does not have or
    that ``precision`` (with ``compile``) does not record; call it before creating outputs."""
    if layer not in layer_names(model):
        raise LayerError(_unknown(layer))
    if compile and layer != POOL5:
        raise LayerError(
            f"layer {layer!r} is not recorded with --compile (a compiled graph runs no module "
            f"hooks): it is served by {', '.join(serving_modes(layer, False))} without "
            f"--compile; with --compile only {POOL5}"
        )
    del precision  # every mode records every layer without compile (see the module docstring)


def _served(model: torch.nn.Module, layer: str) -> bool:
    """Whether ``layer`` of a prepared ``model`` outputs what the original's module does."""
    if layer == POOL5 or getattr(model, "inference_precision", "strict") == "strict":
        return True
    if getattr(model, "inference_compiled", False):
        return False
    unit = fuse.rewritten_unit(model, layer)
    return unit is None or unit in (getattr(model, "kept_units", None) or ())


class LayerTaps:
    """Per-view features of several layers at once: ``{layer: float32 (B, C) numpy rows}``.

    ``model`` is a prepared model (:func:`~.inference.prepare_for_inference`); a fast one must
    have been prepared with these layers in ``record_layers``, else :class:`LayerError`.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[str]) -> None:
        self.model = model
        self.layers = list(layers)
        self.rows: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        for layer in self.layers:
            if layer != POOL5 and layer not in modules:
                raise LayerError(_unknown(layer))
            if not _served(model, layer):
                raise LayerError(
                    f"layer {layer!r} is rewritten in this {model.inference_precision} model: "
                    f"prepare it with record_layers=[{layer!r}]"
                )
        self.hooks = [
            modules[layer].register_forward_hook(self._hook(layer))
            for layer in self.layers
            if layer != POOL5
        ]

    def _hook(self, layer: str):
        def record(module, inputs, output) -> None:
            # reduced now: a later in-place op (the ReLU after a BN) cannot reach the rows
            self.rows[layer] = _position_mean(output)

        return record

    def __call__(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        self.rows.clear()
        batch = pixels.shape[0]
        with torch.inference_mode():
            pooled = self.model.forward_features(pixels)
            if POOL5 in self.layers:
                self.rows[POOL5] = _position_mean(pooled)
            missing = [layer for layer in self.layers if layer not in self.rows]
            if missing:
                raise RuntimeError(f"layers {missing} did not run in forward_features")
            return {layer: _per_clip(self.rows[layer], batch) for layer in self.layers}

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


class FeatureTap(LayerTaps):
    """Per-view features of one layer, averaged over positions, as float32 numpy rows."""

    def __init__(self, model: torch.nn.Module, layer: str) -> None:
        super().__init__(model, [layer])
        self.layer = layer

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:  # NaN/Inf rows: failed views
        return super().__call__(pixels)[self.layer]


def _position_mean(out: torch.Tensor) -> torch.Tensor:
    out = out.float()
    return out.mean(dim=tuple(range(2, out.dim()))) if out.dim() > 2 else out.clone()


def _per_clip(rows: torch.Tensor, batch: int) -> np.ndarray:
    """``(B, C)`` rows; a grouped non-local block's ``(B * windows, C)`` window rows (window
    ``k`` of clip ``i`` is row ``i * windows + k``) averaged per clip."""
    if rows.shape[0] != batch:
        if rows.shape[0] % batch:
            raise RuntimeError(f"{rows.shape[0]} rows for a batch of {batch} clips")
        rows = rows.reshape(batch, rows.shape[0] // batch, -1).mean(1)
    return rows.cpu().numpy()
