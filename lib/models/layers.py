"""Normalisation layers with the original's blob inventory and semantics.

* :class:`SpatialBN` is Caffe2's ``SpatialBN``: ``weight``/``bias``/``running_mean``/
  ``running_var`` are the blobs ``_s``/``_b``/``_rm``/``_riv`` (``_riv`` holds the running
  *variance*). Unlike ``nn.BatchNorm3d`` it keeps no ``num_batches_tracked`` counter, so its
  state is exactly the four Caffe2 blobs.
* :class:`AffineNd` is the project's frozen per-channel affine (``MODEL.USE_AFFINE`` and
  ``NONLOCAL.USE_AFFINE``): ``y = x * weight[c] + bias[c]``. Its ``weight``/``bias`` are buffers,
  because the original's AffineNd has no parameter gradient: they are never trained.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["AffineNd", "SpatialBN", "caffe2_float", "caffe2_to_torch_momentum"]


def caffe2_float(value: float) -> float:
    """``value`` rounded to float32, as Caffe2 stores a float operator argument.

    The original passes e.g. the BN epsilon 1.0000001e-5 and the non-local scale ``C'^-1/2`` as
    float arguments; using the float32-rounded constants keeps float64 runs of the port on the
    original's numbers (the difference is ~1e-9 relative, visible only in float64).
    """
    return float(np.float32(value))


def caffe2_to_torch_momentum(momentum: float) -> float:
    """Convert a Caffe2 BN momentum (``running = running * m + batch * (1 - m)``) to PyTorch's."""
    return 1.0 - momentum


class SpatialBN(nn.BatchNorm3d):
    """Batch normalisation over (N, T, H, W) per channel with exactly Caffe2's four blobs.

    Args:
        num_features: channel count ``C``.
        eps: the original passes ``1.0000001e-5`` (``MODEL.BN_EPSILON`` / ``NONLOCAL.BN_EPSILON``);
            it is rounded to float32 like every Caffe2 float argument.
        caffe2_momentum: Caffe2 convention (0.9 in every config); stored as PyTorch's ``1 - m``.
        init_gamma: initial value of ``weight`` (Caffe2 ``_s``).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1.0000001e-5,
        caffe2_momentum: float = 0.9,
        init_gamma: float = 1.0,
    ) -> None:
        super().__init__(
            num_features, eps=caffe2_float(eps), momentum=caffe2_to_torch_momentum(caffe2_momentum)
        )
        # No counter: the original has no such blob, and momentum is never None here.
        self.num_batches_tracked = None
        nn.init.constant_(self.weight, init_gamma)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # nn.BatchNorm adds a num_batches_tracked entry for old checkpoints; we never hold one.
        state_dict.pop(prefix + "num_batches_tracked", None)
        # Skip _NormBase's hook (it would insert the counter again) and load plainly.
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


class AffineNd(nn.Module):
    """Frozen per-channel affine ``y = x * weight[c] + bias[c]`` over any trailing dimensions."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.bias.view(shape), x, self.weight.view(shape))

    def extra_repr(self) -> str:
        return f"{self.num_features}, frozen"
