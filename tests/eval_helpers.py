"""Helpers for the evaluation tests: small model configs, checkpoints and a stand-in model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

import nonlocal_net as nl
from nonlocal_net.core.weights_file import save_weights_file

# The real I3D non-local network, made cheap for pipeline tests: 2-frame clips, 224 crops
# (1x1 pool5 positions), narrow bottlenecks, 7 classes. Stage widths and every layer type
# (temporal convs, non-local blocks, BN, FCN head) are those of the released models.
SMALL_BASE = "i3d_nonlocal_8x8_IN_pretrain_400k"
SMALL_OVERRIDES = (
    "TRAIN.VIDEO_LENGTH",
    "2",
    "TRAIN.SAMPLE_RATE",
    "4",
    "RESNETS.WIDTH_PER_GROUP",
    "8",
    "MODEL.NUM_CLASSES",
    "7",
    "TRAIN.JITTER_SCALES",
    "[224, 224]",
    "TEST.SCALE",
    "224",
)


def small_cfg(extra: Sequence[str] = ()):
    return nl.get_cfg(SMALL_BASE, list(SMALL_OVERRIDES) + list(extra))


def write_checkpoint(path, cfg, seed: int = 0):
    """A converted checkpoint of ``cfg`` with seeded random weights whose test-split outputs
    are far from uniform (the ``pred`` layer is scaled up), so that metrics are informative."""
    torch.manual_seed(seed)
    model = nl.build_model(cfg, split="test")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.weight.uniform_(0.5, 1.0)
                module.bias.normal_(0.0, 0.05)
        model.pred.weight.mul_(300.0)
        model.pred.bias.normal_(0.0, 0.5)
    save_weights_file(path, model.state_dict(), cfg, {"source": "eval test, random weights"})
    return path


class StandInModel(nn.Module):
    """Maps every view to known class probabilities: a fixed linear map of the view's mean
    value per channel and per frame, then softmax. Views of different content get different
    scores; ``expected`` recomputes them in the test without the engine."""

    split = "test"

    def __init__(self, cfg, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        k = cfg.MODEL.NUM_CLASSES
        g = torch.Generator().manual_seed(seed)
        self.length = cfg.TRAIN.VIDEO_LENGTH
        self.weight = nn.Parameter(torch.randn(k, 3 * self.length, generator=g) * 40.0)
        self.bias = nn.Parameter(torch.randn(k, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = x.double().mean(dim=(3, 4)).flatten(1)  # (n, 3*L)
        logits = stats @ self.weight.double().t() + self.bias.double()
        return torch.softmax(logits, dim=1).float()


def first_max(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def top5_by_hand(values: Sequence[float]) -> list[int]:
    """Indices of the five largest values, ties broken by the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:5]


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=0, abs_tol=1e-12)
