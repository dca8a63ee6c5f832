"""Video ResNets of the original ``resnet_video.py`` (8x8 and 32x4 models).

The "paper" variant used by the 32x2 and 128x1 models lives in :mod:`.resnet_video_org`; the two
differ only in the stem's temporal stride, pool1 and the pool5 temporal kernel (see
:class:`StemSpec`). Everything else, including :class:`ResNetVideo`, is shared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .heads import PredConv, PredLinear, fully_conv_softmax
from .nonlocal_helper import NonLocalBlock
from .resnet_helper import NormFactory, conv3d_msra, res_stage_nonlocal

if TYPE_CHECKING:
    from yacs.config import CfgNode

__all__ = [
    "BLOCK_CONFIG",
    "SPLITS",
    "NonLocalSpec",
    "ResNetVideo",
    "StemSpec",
    "create_model",
    "obtain_arc",
]

logger = logging.getLogger(__name__)

BLOCK_CONFIG: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
SPLITS = ("train", "val", "test")
NO_NONLOCAL = 1000  # the original's "mod" that never selects a block
DEFAULT_VIDEO_LENGTH = 32  # the original default of TRAIN.VIDEO_LENGTH

ArcLists = list[list[int]]
DEFAULT_NORM = NormFactory()


@dataclass(frozen=True)
class StemSpec:
    """What distinguishes ``resnet_video`` from ``resnet_video_org``."""

    name: str
    conv1_temporal_stride: int
    pool1_kernel: tuple[int, int, int]
    pool1_stride: tuple[int, int, int]
    pool_stride_divisor: int  # pool5 temporal kernel = int(TRAIN.VIDEO_LENGTH / divisor)


STEM = StemSpec("resnet_video", 1, (1, 3, 3), (1, 2, 2), 2)


def _arc_tables(arc_type: int) -> tuple[ArcLists, ArcLists]:
    """Temporal radii and strides of res2..res5 for ``MODEL.VIDEO_ARC_CHOICE`` 1-4, plus conv1."""
    if arc_type in (1, 3):  # C2D R50 / R101: no temporal kernels
        res4 = 6 if arc_type == 1 else 23
        use = [[0], [0] * 3, [0] * 4, [0] * res4, [0] * 3]
    elif arc_type in (2, 4):  # I3D R50 / R101: 5x7x7 conv1, 3x1x1 in alternating branch2a
        res4 = [1, 0, 1, 0, 1, 0] if arc_type == 2 else [1 - i % 2 for i in range(23)]
        use = [[2], [1, 1, 1], [1, 0, 1, 0], res4, [0, 1, 0]]
    else:
        raise ValueError(
            f"MODEL.VIDEO_ARC_CHOICE must be 1 (C2D R50), 2 (I3D R50), 3 (C2D R101) or "
            f"4 (I3D R101); got {arc_type!r}"
        )
    strides = [[1] * len(stage) for stage in use]
    return use, strides


def obtain_arc(
    arc_type: int, video_length: int | None = None, stem: StemSpec = STEM
) -> tuple[ArcLists, ArcLists, int]:
    """The original ``obtain_arc``: per-stage temporal kernel radii and strides, and pool5's
    temporal kernel.

    Returns ``(use_temp_convs_set, temp_strides_set, pool_stride)``; each set holds five lists
    (conv1, res2, res3, res4, res5), one entry per block; a radius ``u`` means a temporal kernel
    ``1 + 2u``. ``pool_stride = int(video_length / 2)`` here (``/ 8`` for ``resnet_video_org``).
    ``video_length`` is ``TRAIN.VIDEO_LENGTH``; like the original, which reads the global config,
    it defaults to the original default (32).
    """
    use_temp_convs_set, temp_strides_set = _arc_tables(arc_type)
    temp_strides_set[0] = [stem.conv1_temporal_stride]
    length = DEFAULT_VIDEO_LENGTH if video_length is None else video_length
    pool_stride = int(length / stem.pool_stride_divisor)
    return use_temp_convs_set, temp_strides_set, pool_stride


@dataclass(frozen=True)
class NonLocalSpec:
    """The ``NONLOCAL.*`` settings that shape every non-local block of a model."""

    use_maxpool: bool = True
    use_softmax: bool = True
    use_scale: bool = True
    use_bn: bool = True
    use_affine: bool = False
    no_bias: bool = False
    conv_init_std: float = 0.01
    use_zero_init_conv: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1.0000001e-5
    bn_init_gamma: float = 0.0

    def build(self, dim_in: int, group_size: int | None = None) -> NonLocalBlock:
        return NonLocalBlock(
            dim_in,
            dim_in // 2,
            use_maxpool=self.use_maxpool,
            use_softmax=self.use_softmax,
            use_scale=self.use_scale,
            use_bn=self.use_bn,
            use_affine=self.use_affine,
            bias=not self.no_bias,
            conv_init_std=self.conv_init_std,
            zero_init_out=self.use_zero_init_conv,
            bn_eps=self.bn_epsilon,
            bn_momentum=self.bn_momentum,
            bn_init_gamma=self.bn_init_gamma,
            group_size=group_size,
        )


def nonlocal_mods(depth: int, layer_mod: int, conv3: bool, conv4: bool) -> tuple[int, int]:
    """Placement periods of res3 and res4: ``LAYER_MOD`` for R50; for R101, 2 in res3 and
    ``LAYER_MOD * 4 - 1`` in res4; 1000 (none) where ``CONV3/CONV4_NONLOCAL`` is off."""
    mod3 = 2 if depth == 101 else layer_mod
    mod4 = layer_mod * 4 - 1 if depth == 101 else layer_mod
    return (mod3 if conv3 else NO_NONLOCAL), (mod4 if conv4 else NO_NONLOCAL)


class ResNetVideo(nn.Module):
    """C2D / I3D ResNet-50/101 with optional non-local blocks, as built by the original
    ``create_model``.

    The forward pass takes float32 clips ``(N, 3, T, H, W)`` normalised as
    ``(x - 114.75) / 57.375`` and returns, for split ``train``/``val``, the ``pred`` logits
    ``(N, K)`` of the FC head (224 crops); for split ``test``, the fully-convolutional head's
    per-position softmax averaged over positions ``(N, K)`` (the original's ``softmax`` blob,
    256 crops).
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        num_classes: int = 400,
        split: str = "test",
        stem: StemSpec = STEM,
        use_temp_convs_set: ArcLists,
        temp_strides_set: ArcLists,
        pool_stride: int,
        norm: NormFactory = DEFAULT_NORM,
        nonlocal_spec: NonLocalSpec | None = None,
        nonlocal_mod3: int = NO_NONLOCAL,
        nonlocal_mod4: int = NO_NONLOCAL,
        nonlocal3_group_size: int | None = None,
        num_groups: int = 1,
        width_per_group: int = 64,
        bn_init_gamma: float = 1.0,
        fc_init_std: float = 0.01,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if depth not in BLOCK_CONFIG:
            raise ValueError(f"MODEL.DEPTH must be one of {sorted(BLOCK_CONFIG)}, got {depth!r}")
        if pool_stride < 1:
            raise ValueError(f"pool5 temporal kernel must be >= 1, got {pool_stride}")
        if (nonlocal_mod3 != NO_NONLOCAL or nonlocal_mod4 != NO_NONLOCAL) and nonlocal_spec is None:
            raise ValueError("non-local placement given without a NonLocalSpec")
        self.split = split
        self.depth = depth
        self.num_classes = num_classes
        self.stem = stem
        self.pool_stride = pool_stride
        n1, n2, n3, n4 = BLOCK_CONFIG[depth]
        dim_inner = num_groups * width_per_group
        u1 = use_temp_convs_set[0][0]

        self.conv1 = conv3d_msra(
            3, 64, (1 + 2 * u1, 7, 7), stride=(temp_strides_set[0][0], 2, 2), padding=(u1, 3, 3)
        )
        self.res_conv1_bn = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool3d(stem.pool1_kernel, stride=stem.pool1_stride)

        common = dict(norm=norm, group=num_groups, bn_init_gamma=bn_init_gamma)
        self.res2 = res_stage_nonlocal(
            64, 256, 1, n1, dim_inner, use_temp_convs_set[1], temp_strides_set[1], **common
        )
        self.pool2 = nn.MaxPool3d((2, 1, 1), stride=(2, 1, 1))

        def nl3(dim: int) -> nn.Module:
            return nonlocal_spec.build(dim, group_size=nonlocal3_group_size)

        def nl4(dim: int) -> nn.Module:
            return nonlocal_spec.build(dim)

        self.res3 = res_stage_nonlocal(
            256,
            512,
            2,
            n2,
            dim_inner * 2,
            use_temp_convs_set[2],
            temp_strides_set[2],
            nonlocal_mod=nonlocal_mod3,
            make_nonlocal=nl3,
            **common,
        )
        self.res4 = res_stage_nonlocal(
            512,
            1024,
            2,
            n3,
            dim_inner * 4,
            use_temp_convs_set[3],
            temp_strides_set[3],
            nonlocal_mod=nonlocal_mod4,
            make_nonlocal=nl4,
            **common,
        )
        self.res5 = res_stage_nonlocal(
            1024, 2048, 2, n4, dim_inner * 8, use_temp_convs_set[4], temp_strides_set[4], **common
        )
        self.pool5 = nn.AvgPool3d((pool_stride, 7, 7), stride=1)
        self.dropout = (
            nn.Dropout(dropout_rate) if split == "train" and dropout_rate > 0 else nn.Identity()
        )
        self.pred: nn.Module = (
            PredConv(2048, num_classes)
            if split == "test"
            else PredLinear(2048, num_classes, init_std=fc_init_std)
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone up to and including pool5: ``(N, 2048, T', H', W')``."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"expected clips of shape (N, 3, T, H, W), got {tuple(x.shape)}")
        x = self.pool1(self.relu(self.res_conv1_bn(self.conv1(x))))
        x = self.pool2(self.res2(x))
        x = self.res5(self.res4(self.res3(x)))
        t, h, w = x.shape[2:]
        if t < self.pool_stride or h < 7 or w < 7:
            raise ValueError(
                f"res5 output is {t}x{h}x{w} (T x H x W) but pool5 needs at least "
                f"{self.pool_stride}x7x7: feed clips of TRAIN.VIDEO_LENGTH frames and 224 (val) "
                f"or 256 (test) crops"
            )
        return self.pool5(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Classifier on pool5 features: logits (``train``/``val``), mean softmax (``test``)."""
        if self.split == "test":
            return fully_conv_softmax(self.pred(features))
        if features.shape[2:].numel() != 1:
            raise ValueError(
                f"the FC head of split {self.split!r} needs pool5 output 1x1x1, got "
                f"{'x'.join(map(str, features.shape[2:]))}: use 224x224 crops, or split='test' "
                f"for the fully-convolutional head"
            )
        return self.pred(self.dropout(features.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def create_model(cfg: CfgNode, split: str, stem: StemSpec = STEM) -> ResNetVideo:
    """Build the network described by ``cfg`` for ``split`` (the original ``create_model``).

    Reads ``MODEL.*``, ``RESNETS.*``, ``NONLOCAL.*``, ``TRAIN.VIDEO_LENGTH`` (pool5's temporal
    kernel) and ``TRAIN.DROPOUT_RATE`` (``train`` split only). With ``MODEL.USE_AFFINE`` every BN
    is a frozen affine and res3's non-local blocks attend within 4-frame windows whenever
    ``pool_stride / 4 > 1``, as in the original.
    """
    if cfg.RESNETS.TRANS_FUNC != "bottleneck_transformation_3d":
        raise ValueError(
            f"RESNETS.TRANS_FUNC must be 'bottleneck_transformation_3d' (the only transformation "
            f"the original defines), got {cfg.RESNETS.TRANS_FUNC!r}"
        )
    if cfg.MODEL.NUM_CLASSES <= 0:
        raise ValueError(f"MODEL.NUM_CLASSES must be positive, got {cfg.MODEL.NUM_CLASSES}")
    use_temp_convs_set, temp_strides_set, pool_stride = obtain_arc(
        cfg.MODEL.VIDEO_ARC_CHOICE, cfg.TRAIN.VIDEO_LENGTH, stem
    )
    nl = cfg.NONLOCAL
    mod3, mod4 = nonlocal_mods(cfg.MODEL.DEPTH, nl.LAYER_MOD, nl.CONV3_NONLOCAL, nl.CONV4_NONLOCAL)
    group_size = None
    if cfg.MODEL.USE_AFFINE and mod3 != NO_NONLOCAL:
        if pool_stride % 4 != 0:
            raise ValueError(
                f"MODEL.USE_AFFINE with res3 non-local blocks needs the pool5 temporal kernel "
                f"({pool_stride} from TRAIN.VIDEO_LENGTH {cfg.TRAIN.VIDEO_LENGTH}) to be a "
                f"multiple of the group size 4, as the original asserts"
            )
        group_size = 4 if pool_stride // 4 > 1 else None
    spec = NonLocalSpec(
        use_maxpool=nl.USE_MAXPOOL,
        use_softmax=nl.USE_SOFTMAX,
        use_scale=nl.USE_SCALE,
        use_bn=nl.USE_BN,
        use_affine=nl.USE_AFFINE,
        no_bias=bool(nl.NO_BIAS),
        conv_init_std=nl.CONV_INIT_STD,
        use_zero_init_conv=nl.USE_ZERO_INIT_CONV,
        bn_momentum=nl.BN_MOMENTUM,
        bn_epsilon=nl.BN_EPSILON,
        bn_init_gamma=nl.BN_INIT_GAMMA,
    )
    logger.debug(
        "building %s ResNet-%d arc %d split %s: use_temp_convs_set=%s pool_stride=%d",
        stem.name,
        cfg.MODEL.DEPTH,
        cfg.MODEL.VIDEO_ARC_CHOICE,
        split,
        use_temp_convs_set,
        pool_stride,
    )
    return ResNetVideo(
        depth=cfg.MODEL.DEPTH,
        num_classes=cfg.MODEL.NUM_CLASSES,
        split=split,
        stem=stem,
        use_temp_convs_set=use_temp_convs_set,
        temp_strides_set=temp_strides_set,
        pool_stride=pool_stride,
        norm=NormFactory(cfg.MODEL.USE_AFFINE, cfg.MODEL.BN_EPSILON, cfg.MODEL.BN_MOMENTUM),
        nonlocal_spec=spec,
        nonlocal_mod3=mod3,
        nonlocal_mod4=mod4,
        nonlocal3_group_size=group_size,
        num_groups=cfg.RESNETS.NUM_GROUPS,
        width_per_group=cfg.RESNETS.WIDTH_PER_GROUP,
        bn_init_gamma=cfg.MODEL.BN_INIT_GAMMA,
        fc_init_std=cfg.MODEL.FC_INIT_STD,
        dropout_rate=cfg.TRAIN.DROPOUT_RATE,
    )
