"""The layers ``vnl-extract --layer`` can record, and the recording itself.

``pool5`` is the pooled res5 feature (what the heads see); every other name is a named module of
the backbone, recorded by a forward hook and averaged over its space-time positions. Kept apart
from the extraction pipeline (:mod:`.extract`) because which names exist and what a name's
output is in a fast precision mode (:mod:`.inference`) are questions of the model, not of the
run over a video list.
"""

from __future__ import annotations

import numpy as np
import torch

from ..datasets.protocol import TestProtocol

__all__ = ["POOL5", "FeatureTap", "feature_dim", "layer_names"]

POOL5 = "pool5"


def layer_names(model: torch.nn.Module) -> list[str]:
    """Names ``--layer`` accepts: ``pool5`` and every named module of the backbone."""
    return [POOL5] + [n for n, _ in model.named_modules() if n and not n.startswith("pred")]


def feature_dim(cfg, layer: str, protocol: TestProtocol) -> int:
    """Channels of ``layer`` for the protocol's clips (a forward pass on the meta device)."""
    from ..models.model_builder import build_model

    with torch.device("meta"):
        model = build_model(cfg, split="test").eval()
        shapes: list[torch.Size] = []
        if layer != POOL5:
            module = dict(model.named_modules())[layer]
            module.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
        size = protocol.crop_size
        out = model.forward_features(torch.empty(1, 3, protocol.video_length, size, size))
    return int((shapes[-1] if shapes else out.shape)[1])


class FeatureTap:
    """Per-view features of one layer, averaged over positions, as float32 numpy rows."""

    def __init__(self, model: torch.nn.Module, layer: str) -> None:
        self.model = model
        self.captured: list[torch.Tensor] = []
        self.hook = None
        if layer != POOL5:
            module = dict(model.named_modules())[layer]
            self.hook = module.register_forward_hook(lambda m, i, o: self.captured.append(o))

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        self.captured.clear()
        with torch.inference_mode():
            pooled = self.model.forward_features(pixels)
            out = pooled if self.hook is None else self.captured[-1]
            if out.dim() > 2:
                out = out.float().mean(dim=tuple(range(2, out.dim())))
            return out.float().cpu().numpy()  # NaN/Inf rows are failed views (see _take)
