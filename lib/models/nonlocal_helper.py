"""The space-time non-local block (the original ``nonlocal_helper.py``).

``NonLocalBlock`` is the original's ``spacetime_nonlocal`` followed by the residual sum of
``add_nonlocal``; with ``group_size`` set it is ``add_nonlocal_group`` (attention restricted to
non-overlapping windows of ``group_size`` frames, used in res3 of the ``MODEL.USE_AFFINE`` models).

Differences from the original, all of which only remove failure modes:

* Reshapes use the real batch size ``x.shape[0]``; the original used ``TRAIN.BATCH_SIZE /
  NUM_GPUS`` from the config and silently mixed clips (or threw) for any other batch size.
* The grouped variant takes its spatial size from the tensor; the original took ``CROP_SIZE / 8``
  from the config, which is the same number wherever the original runs at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import AffineNd, SpatialBN, caffe2_float

__all__ = ["NonLocalBlock"]


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian (or dot-product) non-local block with a residual connection.

    Args:
        dim_in: channels ``C`` of the input (and output).
        dim_inner: channels ``C'`` of the embeddings (``C / 2`` in the original).
        use_maxpool: 1x2x2 max pool before ``phi`` and ``g`` (``NONLOCAL.USE_MAXPOOL``).
        use_softmax: embedded Gaussian (``True``) or dot product divided by the number of
            ``phi`` positions (``NONLOCAL.USE_SOFTMAX``).
        use_scale: multiply the affinity by ``C'^-1/2`` before the softmax
            (``NONLOCAL.USE_SCALE``; only with the softmax).
        use_bn: SpatialBN after the ``out`` conv (``NONLOCAL.USE_BN``).
        use_affine: frozen AffineNd after the ``out`` conv (``NONLOCAL.USE_AFFINE``).
        bias: biases on the four convs (``not NONLOCAL.NO_BIAS``).
        conv_init_std: Gaussian std of the four convs (``NONLOCAL.CONV_INIT_STD``).
        zero_init_out: initialise the ``out`` conv to zero (``NONLOCAL.USE_ZERO_INIT_CONV``).
        bn_eps, bn_momentum, bn_init_gamma: the BN's ``NONLOCAL.BN_*`` settings (Caffe2 momentum).
        group_size: when set, attention runs within consecutive windows of this many frames
            (the original's grouped non-local, group size 4); ``None`` means global attention.
    """

    def __init__(
        self,
        dim_in: int,
        dim_inner: int,
        *,
        use_maxpool: bool = True,
        use_softmax: bool = True,
        use_scale: bool = True,
        use_bn: bool = True,
        use_affine: bool = False,
        bias: bool = True,
        conv_init_std: float = 0.01,
        zero_init_out: bool = False,
        bn_eps: float = 1.0000001e-5,
        bn_momentum: float = 0.9,
        bn_init_gamma: float = 0.0,
        group_size: int | None = None,
    ) -> None:
        super().__init__()
        if use_bn and use_affine:
            # The original would create both ops on the same blobs <prefix>_bn_s/_bn_b.
            raise ValueError(
                "NONLOCAL.USE_BN and NONLOCAL.USE_AFFINE cannot both be on: the original creates "
                "both layers on the same blobs (<prefix>_bn_s, <prefix>_bn_b); no released model "
                "does this"
            )
        self.dim_in = dim_in
        self.dim_inner = dim_inner
        self.use_softmax = use_softmax
        self.use_scale = use_scale
        self.scale = caffe2_float(dim_inner**-0.5)  # Caffe2's Scale takes a float32 argument
        self.group_size = group_size

        self.theta = nn.Conv3d(dim_in, dim_inner, 1, bias=bias)
        self.pool = nn.MaxPool3d((1, 2, 2), stride=(1, 2, 2)) if use_maxpool else None
        self.phi = nn.Conv3d(dim_in, dim_inner, 1, bias=bias)
        self.g = nn.Conv3d(dim_in, dim_inner, 1, bias=bias)
        self.out = nn.Conv3d(dim_inner, dim_in, 1, bias=bias)
        self.bn: nn.Module | None
        if use_bn:
            self.bn = SpatialBN(
                dim_in, eps=bn_eps, caffe2_momentum=bn_momentum, init_gamma=bn_init_gamma
            )
        elif use_affine:
            self.bn = AffineNd(dim_in)
        else:
            self.bn = None

        for conv in (self.theta, self.phi, self.g, self.out):
            nn.init.normal_(conv.weight, std=conv_init_std)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        if zero_init_out:
            nn.init.zeros_(self.out.weight)

    def extra_repr(self) -> str:
        kind = "embedded_gaussian" if self.use_softmax else "dot_product"
        window = "global" if self.group_size is None else f"{self.group_size}-frame windows"
        return f"{kind}, scale={self.use_scale and self.use_softmax}, attention={window}"

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """The original ``spacetime_nonlocal``: the branch added to ``x`` (before the sum)."""
        b, _, t, h, w = x.shape
        c = self.dim_inner
        theta = self.theta(x).reshape(b, c, -1)  # (B, C', N)
        xp = self.pool(x) if self.pool is not None else x
        phi = self.phi(xp).reshape(b, c, -1)  # (B, C', M)
        g = self.g(xp).reshape(b, c, -1)  # (B, C', M)

        affinity = torch.bmm(theta.transpose(1, 2), phi)  # (B, N, M)
        if self.use_softmax:
            if self.use_scale:
                affinity = affinity * self.scale
            p = F.softmax(affinity, dim=2)
        else:
            p = affinity / affinity.shape[2]
        y = torch.bmm(g, p.transpose(1, 2))  # (B, C', N)
        z = self.out(y.reshape(b, c, t, h, w))
        if self.bn is not None:
            z = self.bn(z)
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is None:
            return x + self._attention(x)
        b, c, t, h, w = x.shape
        if t % self.group_size != 0:
            raise ValueError(
                f"grouped non-local: the temporal size {t} is not a multiple of the group size "
                f"{self.group_size} (the original requires the res3 temporal size to be "
                f"TRAIN.VIDEO_LENGTH/2 for resnet_video or /8 for resnet_video_org)"
            )
        groups = t // self.group_size
        if isinstance(self.bn, SpatialBN):  # per-GPU BN groups count clips, not windows
            self.bn.samples_per_clip = groups
        # (B, C, T, H, W) -> (B*groups, C, group_size, H, W); window k of clip i becomes
        # sample i*groups+k
        xg = x.transpose(1, 2).reshape(b * groups, self.group_size, c, h, w).transpose(1, 2)
        yg = xg + self._attention(xg)
        return yg.transpose(1, 2).reshape(b, t, c, h, w).transpose(1, 2)
