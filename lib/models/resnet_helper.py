"""Residual building blocks of the video ResNets (the original ``resnet_helper.py``).

Module and attribute names follow the Caffe2 blob names, so that ``res3_1_branch2a_bn_riv``
lives at ``res3.1.branch2a_bn.running_var`` and ``nonlocal_conv3_1_theta_w`` at
``res3.nonlocal_1.theta.weight``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import AffineNd, SpatialBN

__all__ = [
    "NormFactory",
    "ResidualBlock3d",
    "conv3d_msra",
    "res_stage_nonlocal",
]


@dataclass(frozen=True)
class NormFactory:
    """Builds the layer that follows every backbone conv: SpatialBN, or AffineNd when
    ``MODEL.USE_AFFINE`` (the original's ``Conv3dBN`` vs ``Conv3dAffine``)."""

    use_affine: bool = False
    eps: float = 1.0000001e-5
    momentum: float = 0.9  # Caffe2 convention

    def __call__(self, num_features: int, init_gamma: float = 1.0) -> nn.Module:
        if self.use_affine:
            # Conv3dAffine ignores the bn_init argument: every affine starts at 1 / 0.
            return AffineNd(num_features)
        return SpatialBN(
            num_features, eps=self.eps, caffe2_momentum=self.momentum, init_gamma=init_gamma
        )


def conv3d_msra(
    dim_in: int,
    dim_out: int,
    kernel: Sequence[int],
    stride: Sequence[int] = (1, 1, 1),
    padding: Sequence[int] = (0, 0, 0),
    groups: int = 1,
) -> nn.Conv3d:
    """A bias-free 3-D conv with Caffe2's ``MSRAFill``: N(0, sqrt(2 / fan_out)),
    ``fan_out = Cout * kt * kh * kw``."""
    conv = nn.Conv3d(
        dim_in,
        dim_out,
        tuple(kernel),
        stride=tuple(stride),
        padding=tuple(padding),
        groups=groups,
        bias=False,
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class ResidualBlock3d(nn.Module):
    """``_generic_residual_block_3d`` with ``bottleneck_transformation_3d``.

    ``relu(bn2c(conv2c(relu(bn2b(conv2b(relu(bn2a(conv2a(x))))))))) + shortcut(x))`` where
    ``conv2a`` carries the temporal kernel ``1 + 2 * use_temp_conv`` and ``conv2b`` the spatial
    stride; ``shortcut`` is ``bn1(conv1(x))`` only when the shape changes, else the identity.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        dim_inner: int,
        stride: int,
        use_temp_conv: int,
        temp_stride: int,
        norm: NormFactory,
        group: int = 1,
        bn_init_gamma: float = 1.0,
    ) -> None:
        super().__init__()
        u = int(use_temp_conv)
        self.branch2a = conv3d_msra(
            dim_in, dim_inner, (1 + 2 * u, 1, 1), stride=(temp_stride, 1, 1), padding=(u, 0, 0)
        )
        self.branch2a_bn = norm(dim_inner)
        self.branch2b = conv3d_msra(
            dim_inner,
            dim_inner,
            (1, 3, 3),
            stride=(1, stride, stride),
            padding=(0, 1, 1),
            groups=group,
        )
        self.branch2b_bn = norm(dim_inner)
        self.branch2c = conv3d_msra(dim_inner, dim_out, (1, 1, 1))
        self.branch2c_bn = norm(dim_out, init_gamma=bn_init_gamma)
        self.branch1: nn.Conv3d | None = None
        self.branch1_bn: nn.Module | None = None
        if dim_in != dim_out or temp_stride != 1 or stride != 1:
            self.branch1 = conv3d_msra(
                dim_in, dim_out, (1, 1, 1), stride=(temp_stride, stride, stride)
            )
            self.branch1_bn = norm(dim_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.branch2a_bn(self.branch2a(x)))
        out = self.relu(self.branch2b_bn(self.branch2b(out)))
        out = self.branch2c_bn(self.branch2c(out))
        shortcut = x if self.branch1 is None else self.branch1_bn(self.branch1(x))
        return self.relu(out + shortcut)


def res_stage_nonlocal(
    dim_in: int,
    dim_out: int,
    stride: int,
    num_blocks: int,
    dim_inner: int,
    use_temp_convs: Sequence[int],
    temp_strides: Sequence[int],
    norm: NormFactory,
    group: int = 1,
    bn_init_gamma: float = 1.0,
    nonlocal_mod: int = 1000,
    make_nonlocal: Callable[[int], nn.Module] | None = None,
) -> nn.Sequential:
    """One ResNet stage with a non-local block after block ``idx`` whenever
    ``idx % nonlocal_mod == nonlocal_mod - 1`` (the original's ``res_stage_nonlocal`` and, with a
    grouped ``make_nonlocal``, ``res_stage_nonlocal_group``).

    Children are named ``"0"``, ``"1"``, ... for the residual blocks and ``"nonlocal_<idx>"`` for
    the non-local blocks, in execution order. Temporal lists shorter than the stage are padded with
    ``0`` / ``1`` as in the original (e.g. arc 2 with depth 101).
    """
    use_temp_convs = list(use_temp_convs) + [0] * max(0, num_blocks - len(use_temp_convs))
    temp_strides = list(temp_strides) + [1] * max(0, num_blocks - len(temp_strides))
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for idx in range(num_blocks):
        block_stride = 2 if (idx == 0 and stride == 2) else 1
        layers[str(idx)] = ResidualBlock3d(
            dim_in,
            dim_out,
            dim_inner,
            block_stride,
            use_temp_convs[idx],
            temp_strides[idx],
            norm,
            group=group,
            bn_init_gamma=bn_init_gamma,
        )
        dim_in = dim_out
        if idx % nonlocal_mod == nonlocal_mod - 1:
            if make_nonlocal is None:
                raise ValueError("nonlocal_mod selects a block but no non-local factory is given")
            layers[f"nonlocal_{idx}"] = make_nonlocal(dim_in)
    return nn.Sequential(layers)
