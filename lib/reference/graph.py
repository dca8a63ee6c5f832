"""The original Caffe2 network as a list of operators with the original blob names.

:func:`build_graph` restates what the original's
``resnet_video.py`` / ``resnet_video_org.py`` / ``resnet_helper.py`` / ``nonlocal_helper.py``
emit into a Caffe2 net for a configuration: the same operators in the same order, reading and
writing the same blob names, including Caffe2's in-place writes (``Relu`` on the BN output,
``Sum`` into the branch-2c output, ``Scale`` on the affinity, in-place ``Reshape``) and the
explicit numbers the original bakes into its reshapes (the config's per-GPU batch
``TRAIN.BATCH_SIZE / NUM_GPUS`` and, for the grouped non-local, ``crop / 8``). It does not import
the PyTorch model: it is an independent description of the original, to be run by
:func:`nonlocal_net.reference.run`.

A :class:`Graph` also lists its parameter inventory (every blob the net reads from a checkpoint,
in creation order) and its *taps*: the layer outputs a layer-by-layer comparison needs (which
module of the port computes each is :mod:`nonlocal_net.verify.pairing`'s business).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .ops import SHAPE_RULES, Caffe2Error

__all__ = [
    "SPLITS",
    "Graph",
    "GraphError",
    "LayerTap",
    "Op",
    "ParamSpec",
    "build_graph",
]

SPLITS = ("val", "test")
DATA = "data"
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
NO_NONLOCAL = 1000  # the original's "never" placement period
GROUP_SIZE = 4  # frames per attention window of the grouped non-local

# obtain_arc (the original's lib/models/resnet_video.py): temporal kernel radius of conv1 and
# of every block of res2..res5. All temporal strides of res2..res5 are 1.
_ARC_RADII: dict[int, list[list[int]]] = {
    1: [[0], [0, 0, 0], [0, 0, 0, 0], [0] * 6, [0, 0, 0]],
    2: [[2], [1, 1, 1], [1, 0, 1, 0], [1, 0, 1, 0, 1, 0], [0, 1, 0]],
    3: [[0], [0, 0, 0], [0, 0, 0, 0], [0] * 23, [0, 0, 0]],
    4: [[2], [1, 1, 1], [1, 0, 1, 0], [1 - i % 2 for i in range(23)], [0, 1, 0]],
}


@dataclass(frozen=True)
class _ModelFile:
    """What differs between the two architecture files."""

    conv1_temporal_stride: int
    pool1_kernel: tuple[int, int, int]
    pool1_stride: tuple[int, int, int]
    pool_stride_divisor: int  # pool5 temporal kernel = int(TRAIN.VIDEO_LENGTH / divisor)


_MODEL_FILES = {
    "resnet_video": _ModelFile(1, (1, 3, 3), (1, 2, 2), 2),
    "resnet_video_org": _ModelFile(2, (2, 3, 3), (2, 2, 2), 8),
}


class GraphError(Caffe2Error):
    """A configuration the original cannot build, or an operator failing in a graph; the
    message names the operator and its blobs."""


@dataclass(frozen=True)
class Op:
    """One Caffe2 operator: its type, input and output blob names and its arguments."""

    type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    args: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.args.items())
        text = f"{self.type}({', '.join(self.inputs)}) -> {', '.join(self.outputs)}"
        return f"{text} [{args}]" if args else text


@dataclass(frozen=True)
class ParamSpec:
    """A blob the net reads from the checkpoint (parameter or BN running statistic)."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LayerTap:
    """A layer output of the reference graph, tapped for layer-by-layer comparisons.

    Attributes:
        label: the layer: ``res_conv1_bn`` (stem after BN and ReLU), ``pool1``, ``res<s>_<i>``
            (residual block after its final ReLU), ``nonlocal_conv<s>_<i>`` (non-local block
            after its residual sum), ``pool2``, ``pool5``, ``pred``, ``softmax``.
        blob: the original blob holding it (e.g. ``res3_1_branch2c_bn``, written in place by the
            block's final ``Relu``; ``nonlocal_conv3_1_sum``, or ``..._sum_trans_trans`` for the
            grouped non-local, whose ``_sum`` blob is in the regrouped layout). The tap's
            op is the last one to write this blob.
        op_index: index of the op that produces the value.
        start: index of the layer's first op; running ``ops[start:op_index + 1]`` on ``input``
            recomputes the layer alone.
        input: the blob the layer consumes.
    """

    label: str
    blob: str
    op_index: int
    start: int
    input: str


@dataclass(frozen=True)
class _Settings:
    """Everything the builder reads from a config, resolved once."""

    model_file: _ModelFile
    depth: int
    radii: list[list[int]]
    pool_stride: int
    dim_inner: int
    group: int
    num_classes: int
    bn_epsilon: float
    use_affine: bool
    mod3: int
    mod4: int
    nl_maxpool: bool
    nl_softmax: bool
    nl_scale: bool
    nl_bn: bool
    nl_affine: bool
    nl_bias: bool
    nl_bn_epsilon: float


def _settings(cfg) -> _Settings:
    name = cfg.MODEL.MODEL_NAME
    if name not in _MODEL_FILES:
        raise GraphError(f"MODEL.MODEL_NAME must be one of {sorted(_MODEL_FILES)}, got {name!r}")
    depth = cfg.MODEL.DEPTH
    if depth not in STAGE_BLOCKS:
        raise GraphError(f"MODEL.DEPTH must be one of {sorted(STAGE_BLOCKS)}, got {depth!r}")
    arc = cfg.MODEL.VIDEO_ARC_CHOICE
    if arc not in _ARC_RADII:
        raise GraphError(f"MODEL.VIDEO_ARC_CHOICE must be one of 1-4, got {arc!r}")
    if cfg.RESNETS.TRANS_FUNC != "bottleneck_transformation_3d":
        raise GraphError(
            f"RESNETS.TRANS_FUNC {cfg.RESNETS.TRANS_FUNC!r} does not exist in the original "
            f"(only 'bottleneck_transformation_3d')"
        )
    if cfg.MODEL.NUM_CLASSES <= 0:
        raise GraphError(f"MODEL.NUM_CLASSES must be positive, got {cfg.MODEL.NUM_CLASSES}")
    model_file = _MODEL_FILES[name]
    # Lists shorter than the stage are padded with radius 0, as res_stage_nonlocal pads them.
    radii = [list(_ARC_RADII[arc][0])]
    for stage, n in enumerate(STAGE_BLOCKS[depth]):
        radii.append((_ARC_RADII[arc][stage + 1] + [0] * n)[:n])
    nl = cfg.NONLOCAL
    mod3 = 2 if depth == 101 else nl.LAYER_MOD
    mod4 = nl.LAYER_MOD * 4 - 1 if depth == 101 else nl.LAYER_MOD
    return _Settings(
        model_file=model_file,
        depth=depth,
        radii=radii,
        pool_stride=int(cfg.TRAIN.VIDEO_LENGTH / model_file.pool_stride_divisor),
        dim_inner=cfg.RESNETS.NUM_GROUPS * cfg.RESNETS.WIDTH_PER_GROUP,
        group=cfg.RESNETS.NUM_GROUPS,
        num_classes=cfg.MODEL.NUM_CLASSES,
        bn_epsilon=cfg.MODEL.BN_EPSILON,
        use_affine=bool(cfg.MODEL.USE_AFFINE),
        mod3=mod3 if nl.CONV3_NONLOCAL else NO_NONLOCAL,
        mod4=mod4 if nl.CONV4_NONLOCAL else NO_NONLOCAL,
        nl_maxpool=bool(nl.USE_MAXPOOL),
        nl_softmax=bool(nl.USE_SOFTMAX),
        nl_scale=bool(nl.USE_SCALE),
        nl_bn=bool(nl.USE_BN),
        nl_affine=bool(nl.USE_AFFINE),
        nl_bias=not nl.NO_BIAS,
        nl_bn_epsilon=nl.BN_EPSILON,
    )


def config_batch_size(cfg) -> int:
    """The per-GPU batch the original bakes into its reshapes: ``TRAIN.BATCH_SIZE / NUM_GPUS``."""
    return int(cfg.TRAIN.BATCH_SIZE / cfg.NUM_GPUS)


def config_crop_size(cfg, split: str) -> int:
    """The crop the original's net is built for: ``TRAIN.CROP_SIZE`` for ``val``; for ``test``
    the fully-convolutional test sets ``TRAIN.CROP_SIZE = TRAIN.JITTER_SCALES[0]`` first."""
    return cfg.TRAIN.JITTER_SCALES[0] if split == "test" else cfg.TRAIN.CROP_SIZE


class _Builder:
    """Accumulates ops, the parameter inventory and the taps, in creation order."""

    def __init__(self, s: _Settings, batch_size: int, crop_size: int) -> None:
        self.s = s
        self.batch_size = batch_size
        self.crop_size = crop_size
        self.ops: list[Op] = []
        self.params: dict[str, tuple[int, ...]] = {}
        self.taps: list[LayerTap] = []

    # -- primitives -----------------------------------------------------------------------

    def op(self, type_: str, inputs: Sequence[str], outputs: Sequence[str], **args: Any) -> str:
        self.ops.append(Op(type_, tuple(inputs), tuple(outputs), args))
        return outputs[0]

    def param(self, name: str, shape: tuple[int, ...]) -> str:
        old = self.params.setdefault(name, shape)
        if old != shape:  # would be two different tensors under one name
            raise GraphError(f"blob {name} created twice with shapes {old} and {shape}")
        return name

    def mark(self, label: str, blob: str, start: int, input_: str) -> None:
        self.taps.append(LayerTap(label, blob, len(self.ops) - 1, start, input_))

    def conv(
        self,
        x: str,
        name: str,
        dim_in: int,
        dim_out: int,
        kernels: Sequence[int],
        strides: Sequence[int] = (1, 1, 1),
        pads: Sequence[int] = (0, 0, 0) * 2,
        group: int = 1,
        bias: bool = False,
    ) -> str:
        """``ConvNd``: weight ``<name>_w``, bias ``<name>_b`` unless ``no_bias``."""
        inputs = [x, self.param(f"{name}_w", (dim_out, dim_in // group, *kernels))]
        if bias:
            inputs.append(self.param(f"{name}_b", (dim_out,)))
        return self.op(
            "Conv", inputs, [name], kernels=list(kernels), strides=list(strides),
            pads=list(pads), group=group,
        )  # fmt: skip

    def spatial_bn(self, x: str, name: str, dim: int, epsilon: float) -> str:
        """``SpatialBN`` in test mode: ``<name>_s``, ``_b``, ``_rm``, ``_riv`` (a variance)."""
        params = [self.param(f"{name}_{p}", (dim,)) for p in ("s", "b", "rm", "riv")]
        return self.op("SpatialBN", [x, *params], [name], epsilon=epsilon, is_test=1)

    def affine(self, x: str, name: str, dim: int) -> str:
        """``AffineNd``: ``<name>_s``, ``<name>_b`` (frozen)."""
        params = [self.param(f"{name}_{p}", (dim,)) for p in ("s", "b")]
        return self.op("AffineNd", [x, *params], [name])

    def norm(self, x: str, name: str, dim: int) -> str:
        """The backbone's normalisation: AffineNd with ``MODEL.USE_AFFINE``, else SpatialBN."""
        if self.s.use_affine:
            return self.affine(x, name, dim)
        return self.spatial_bn(x, name, dim, self.s.bn_epsilon)

    def relu_(self, x: str) -> str:
        """In-place ``Relu`` (``MODEL.ALLOW_INPLACE_RELU``)."""
        return self.op("Relu", [x], [x])

    def transpose(self, x: str, out: str, axes: Sequence[int]) -> str:
        return self.op("Transpose", [x], [out], axes=list(axes))

    # -- network pieces -------------------------------------------------------------------

    def conv_norm(self, x: str, prefix: str, dim_in: int, dim_out: int, **conv_args: Any) -> str:
        """``Conv3dBN`` / ``Conv3dAffine``: conv ``<prefix>`` without bias, norm ``<prefix>_bn``."""
        return self.norm(
            self.conv(x, prefix, dim_in, dim_out, **conv_args), f"{prefix}_bn", dim_out
        )

    def residual_block(
        self, x: str, stage: int, idx: int, dim_in: int, dim_out: int, dim_inner: int, stride: int
    ) -> str:
        """``_generic_residual_block_3d`` with ``bottleneck_transformation_3d``."""
        prefix = f"res{stage}_{idx}"
        u = self.s.radii[stage - 1][idx]
        temp_stride = 1
        start = len(self.ops)
        t = self.conv_norm(
            x, f"{prefix}_branch2a", dim_in, dim_inner, kernels=(1 + 2 * u, 1, 1),
            strides=(temp_stride, 1, 1), pads=(u, 0, 0) * 2,
        )  # fmt: skip
        t = self.relu_(t)
        t = self.conv_norm(
            t, f"{prefix}_branch2b", dim_inner, dim_inner, kernels=(1, 3, 3),
            strides=(1, stride, stride), pads=(0, 1, 1) * 2, group=self.s.group,
        )  # fmt: skip
        t = self.relu_(t)
        t = self.conv_norm(t, f"{prefix}_branch2c", dim_inner, dim_out, kernels=(1, 1, 1))
        if dim_in != dim_out or temp_stride != 1 or stride != 1:
            shortcut = self.conv_norm(
                x, f"{prefix}_branch1", dim_in, dim_out, kernels=(1, 1, 1),
                strides=(temp_stride, stride, stride),
            )  # fmt: skip
        else:
            shortcut = x
        t = self.op("Sum", [t, shortcut], [t])  # in place into the branch-2c output
        t = self.relu_(t)
        self.mark(prefix, t, start, x)
        return t

    def spacetime_nonlocal(self, x: str, prefix: str, dim: int, batch_size: int) -> str:
        """``spacetime_nonlocal``: the branch that ``add_nonlocal`` sums with ``x``."""
        s = self.s
        inner = dim // 2
        conv = dict(kernels=(1, 1, 1), bias=s.nl_bias)
        theta = self.conv(x, f"{prefix}_theta", dim, inner, **conv)
        pooled = x
        if s.nl_maxpool:
            pooled = self.op(
                "MaxPool", [x], [f"{prefix}_pool"], kernels=[1, 2, 2], strides=[1, 2, 2],
                pads=[0, 0, 0] * 2,
            )  # fmt: skip
        phi = self.conv(pooled, f"{prefix}_phi", dim, inner, **conv)
        g = self.conv(pooled, f"{prefix}_g", dim, inner, **conv)
        # In-place reshapes with the explicit batch size: (B, C', T, H, W) -> (B, C', T*H*W).
        for blob in (theta, phi, g):
            self.op("Reshape", [blob], [blob, f"{blob}_shape5d"], shape=[batch_size, inner, -1])
        affinity = self.op(
            "BatchMatMul", [theta, phi], [f"{prefix}_affinity"], trans_a=1
        )  # (B, N, M)
        if s.nl_softmax:
            if s.nl_scale:
                self.op("Scale", [affinity], [affinity], scale=inner**-0.5)
            prob = self.op("Softmax", [affinity], [f"{affinity}_prob"], axis=2)
        else:  # dot product: divide by the number of phi positions, built from constants
            ones = self.op("ConstantFill", [affinity], [f"{affinity}_ones"], value=1.0)
            count = self.op("ReduceBackSum", [ones], [f"{affinity}_const"])
            zeros = self.op("ConstantFill", [affinity], [f"{affinity}_zeros"], value=0.0)
            denom = self.op("Add", [zeros, count], [f"{affinity}_denom"], broadcast=1, axis=0)
            self.op("StopGradient", [denom], [denom])
            prob = self.op("Div", [affinity, denom], [f"{affinity}_sc"])
        y = self.op("BatchMatMul", [g, prob], [f"{prefix}_y"], trans_b=1)  # (B, C', N)
        self.op("Reshape", [y, f"{theta}_shape5d"], [y, f"{y}_shape3d"])
        out = self.conv(y, f"{prefix}_out", inner, dim, **conv)
        if s.nl_bn:
            out = self.spatial_bn(out, f"{prefix}_bn", dim, s.nl_bn_epsilon)
        if s.nl_affine:  # after the BN if both are on, on the same _bn_s/_bn_b blobs
            out = self.affine(out, f"{prefix}_bn", dim)
        return out

    def add_nonlocal(self, x: str, stage: int, idx: int, dim: int) -> str:
        prefix = f"nonlocal_conv{stage}_{idx}"
        start = len(self.ops)
        out = self.spacetime_nonlocal(x, prefix, dim, self.batch_size)
        out = self.op("Sum", [x, out], [f"{prefix}_sum"])
        self.mark(prefix, out, start, x)
        return out

    def add_nonlocal_group(self, x: str, stage: int, idx: int, dim: int) -> str:
        """``add_nonlocal_group``: attention within windows of 4 frames (res3, affine models)."""
        prefix = f"nonlocal_conv{stage}_{idx}"
        pool_stride = self.s.pool_stride
        if pool_stride % GROUP_SIZE:
            raise GraphError(
                f"grouped non-local {prefix}: the pool5 temporal kernel {pool_stride} "
                f"(TRAIN.VIDEO_LENGTH / {self.s.model_file.pool_stride_divisor}) is not a "
                f"multiple of {GROUP_SIZE} (the original asserts this)"
            )
        group_num = pool_stride // GROUP_SIZE
        spatial = int(self.crop_size / 8)
        start = len(self.ops)
        inp = x
        if group_num > 1:
            x = self.transpose(x, f"{x}_trans", (0, 2, 1, 3, 4))
            self.op(
                "Reshape", [x], [x, f"{x}_shape5d"],
                shape=[self.batch_size * group_num, GROUP_SIZE, dim, spatial, spatial],
            )  # fmt: skip
            shape5d = f"{x}_shape5d"
            x = self.transpose(x, f"{x}_trans", (0, 2, 1, 3, 4))
        out = self.spacetime_nonlocal(x, prefix, dim, self.batch_size * group_num)
        out = self.op("Sum", [x, out], [f"{prefix}_sum"])
        if group_num > 1:
            out = self.transpose(out, f"{out}_trans", (0, 2, 1, 3, 4))
            self.op("Reshape", [out, shape5d], [out, f"{out}_shape5d"])
            out = self.transpose(out, f"{out}_trans", (0, 2, 1, 3, 4))
        self.mark(prefix, out, start, inp)
        return out

    def stage(
        self, x: str, stage: int, dim_in: int, dim_out: int, dim_inner: int, stride: int,
        nonlocal_mod: int = NO_NONLOCAL, grouped: bool = False,
    ) -> str:  # fmt: skip
        """``res_stage_nonlocal`` / ``res_stage_nonlocal_group``."""
        for idx in range(STAGE_BLOCKS[self.s.depth][stage - 2]):
            block_stride = stride if idx == 0 else 1
            x = self.residual_block(x, stage, idx, dim_in, dim_out, dim_inner, block_stride)
            dim_in = dim_out
            if idx % nonlocal_mod == nonlocal_mod - 1:
                if grouped:
                    x = self.add_nonlocal_group(x, stage, idx, dim_out)
                else:
                    x = self.add_nonlocal(x, stage, idx, dim_out)
        return x

    def max_pool(self, x: str, name: str, kernels, strides) -> str:
        start = len(self.ops)
        out = self.op(
            "MaxPool", [x], [name], kernels=list(kernels), strides=list(strides), pads=[0] * 6
        )
        self.mark(name, out, start, x)
        return out

    def backbone(self) -> str:
        """``create_model`` up to and including pool5."""
        s = self.s
        mf = s.model_file
        u1 = s.radii[0][0]
        x = self.conv(
            DATA, "conv1", 3, 64, kernels=(1 + 2 * u1, 7, 7),
            strides=(mf.conv1_temporal_stride, 2, 2), pads=(u1, 3, 3) * 2,
        )  # fmt: skip
        x = self.relu_(self.norm(x, "res_conv1_bn", 64))
        self.mark("res_conv1_bn", x, 0, DATA)
        x = self.max_pool(x, "pool1", mf.pool1_kernel, mf.pool1_stride)
        inner = s.dim_inner
        x = self.stage(x, 2, 64, 256, inner, 1)
        x = self.max_pool(x, "pool2", (2, 1, 1), (2, 1, 1))
        x = self.stage(x, 3, 256, 512, inner * 2, 2, s.mod3, grouped=s.use_affine)
        x = self.stage(x, 4, 512, 1024, inner * 4, 2, s.mod4)
        x = self.stage(x, 5, 1024, 2048, inner * 8, 2)
        start = len(self.ops)
        out = self.op(
            "AveragePool", [x], ["pool5"], kernels=[s.pool_stride, 7, 7], strides=[1, 1, 1],
            pads=[0] * 6,
        )  # fmt: skip
        self.mark("pool5", out, start, x)
        return out

    def head(self, x: str, split: str) -> None:
        """``val``: FC ``pred`` and Softmax; ``test``: the fully-convolutional head."""
        k = self.s.num_classes
        start = len(self.ops)
        if split == "val":
            w = self.param("pred_w", (k, 2048))
            b = self.param("pred_b", (k,))
            pred = self.op("FC", [x, w, b], ["pred"])
            self.mark("pred", pred, start, x)
            start = len(self.ops)
            self.op("Softmax", [pred], ["softmax"])
            self.mark("softmax", "softmax", start, pred)
            return
        pred = self.conv(x, "pred", 2048, k, kernels=(1, 1, 1), bias=True)
        self.mark("pred", pred, start, x)
        start = len(self.ops)
        t = self.transpose(pred, "pred_tr", (0, 2, 3, 4, 1))
        t = self.op("Reshape", [t], ["pred_re", "pred_shape5d"], shape=[-1, k])
        t = self.op("Softmax", [t], ["softmax_conv"])
        t = self.op("Reshape", [t, "pred_shape5d"], ["softmax_conv_re", "pred_shape2d"])
        t = self.transpose(t, "softmax_conv_tr", (0, 4, 1, 2, 3))
        for name in ("softmax_ave_w", "softmax_ave_h", "softmax"):
            t = self.op("ReduceBackMean", [t], [name])
        self.mark("softmax", t, start, pred)


@dataclass(frozen=True)
class Graph:
    """The original net for a config and split (see :func:`build_graph`).

    Attributes:
        cfg: the config it was built from.
        split: ``"val"`` or ``"test"``.
        batch_size: the batch size baked into the non-local reshapes of this graph.
        config_batch_size: the original's value, ``TRAIN.BATCH_SIZE / NUM_GPUS``.
        crop_size: the crop the grouped non-local's explicit reshape assumes (``crop / 8``).
        ops: the operators in execution order.
        params: every blob read from the checkpoint, in the original's creation order.
        taps: the layer outputs for comparisons, in execution order.
        outputs: the net's outputs (``pred`` and ``softmax``).
    """

    cfg: Any
    split: str
    batch_size: int
    config_batch_size: int
    crop_size: int
    ops: tuple[Op, ...]
    params: tuple[ParamSpec, ...]
    taps: tuple[LayerTap, ...]
    outputs: tuple[str, ...] = ("pred", "softmax")

    def tap(self, label: str) -> LayerTap:
        """The tap called ``label``; ``KeyError`` listing the labels otherwise."""
        for c in self.taps:
            if c.label == label:
                return c
        raise KeyError(
            f"no tap {label!r} in this graph; labels: {', '.join(c.label for c in self.taps)}"
        )

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {p.name: p.shape for p in self.params}

    def op_counts(self) -> Counter:
        """How many operators of each type the graph has."""
        return Counter(op.type for op in self.ops)

    def rebatched(self, batch_size: int) -> Graph:
        """The same net with ``batch_size`` baked into the reshapes instead."""
        if batch_size == self.batch_size:
            return self
        return build_graph(self.cfg, self.split, batch_size=batch_size, crop_size=self.crop_size)

    def op_range(self, start: str | None = None, stop: str | None = None) -> tuple[int, int]:
        """``[first, last)`` op indices from the first op of the tap ``start`` (default: the
        first op) to the op of the tap ``stop`` (default: the last op), inclusive."""
        first = 0 if start is None else self.tap(start).start
        last = len(self.ops) if stop is None else self.tap(stop).op_index + 1
        if last <= first:
            raise ValueError(f"tap {stop!r} comes before {start!r}")
        return first, last

    def infer_shapes(
        self,
        data_shape: Sequence[int],
        param_shapes: Mapping[str, Sequence[int]] | None = None,
        *,
        start: str | None = None,
        stop: str | None = None,
    ) -> dict[str, tuple[int, ...]]:
        """Shapes of every blob (its last value) and tap label for an input of
        ``data_shape`` (the network input, or the input of the tap ``start``), applying each
        operator's checks; raises :class:`GraphError` naming the failing op, e.g. when an
        explicit reshape does not agree with the input. ``param_shapes`` defaults to the
        inventory."""
        first, last = self.op_range(start, stop)
        env: dict[str, Any] = {k: tuple(v) for k, v in (param_shapes or self.param_shapes).items()}
        env[DATA if start is None else self.tap(start).input] = tuple(int(d) for d in data_shape)
        for index in range(first, last):
            op = self.ops[index]
            metas = [_lookup(env, name, index, op) for name in op.inputs]
            try:
                result = SHAPE_RULES[op.type](*metas, **op.args)
            except Caffe2Error as e:
                raise GraphError(f"op #{index} {op}: {e}") from e
            results = result if len(op.outputs) > 1 else (result,)
            for name, meta in zip(op.outputs, results):
                env[name] = meta
        # Tensors are tracked by shape; int64 shape blobs (Reshape's second output) by value.
        shapes = {
            k: v if isinstance(v, tuple) else tuple(int(d) for d in np.shape(v))
            for k, v in env.items()
        }
        for c in self.taps:
            if first <= c.op_index < last:
                shapes[c.label] = shapes[c.blob]
        return shapes


def _lookup(env: Mapping[str, Any], name: str, index: int, op: Op) -> Any:
    try:
        return env[name]
    except KeyError:
        raise GraphError(f"op #{index} {op}: input blob {name!r} does not exist") from None


def build_graph(
    cfg, split: str = "test", *, batch_size: int | None = None, crop_size: int | None = None
) -> Graph:
    """Build the original's ``val`` or ``test`` net for ``cfg`` (a config node).

    Reads ``MODEL.MODEL_NAME`` (``resnet_video`` / ``resnet_video_org``),
    ``MODEL.VIDEO_ARC_CHOICE`` (1-4), ``MODEL.DEPTH`` (50/101), ``MODEL.USE_AFFINE``,
    ``MODEL.BN_EPSILON``, ``MODEL.NUM_CLASSES``, ``RESNETS.*``, every ``NONLOCAL.*`` flag,
    ``TRAIN.VIDEO_LENGTH`` (pool5's temporal kernel), and the two explicit numbers the original
    bakes into its reshapes:

    * ``batch_size``: the non-local reshapes' batch; default the original's
      ``TRAIN.BATCH_SIZE / NUM_GPUS`` (:func:`nonlocal_net.reference.run` rebuilds the graph
      with the real batch unless asked to reproduce the original's quirk);
    * ``crop_size``: the grouped non-local's spatial size is ``crop_size / 8``; default
      ``TRAIN.CROP_SIZE`` for ``val`` and ``TRAIN.JITTER_SCALES[0]`` for ``test``, as the
      original's test_net sets it for the fully-convolutional test.

    ``split="val"``: pool5 -> FC ``pred`` -> Softmax ``softmax``. ``split="test"``: pool5 ->
    1x1x1 conv ``pred`` -> per-position softmax -> mean over positions = ``softmax``.
    """
    if split not in SPLITS:
        raise GraphError(
            f"split must be one of {SPLITS}, got {split!r} (the training net's batch-statistics "
            f"BN, dropout and loss are not part of the reference)"
        )
    settings = _settings(cfg)
    cfg_batch = config_batch_size(cfg)
    batch = cfg_batch if batch_size is None else int(batch_size)
    crop = config_crop_size(cfg, split) if crop_size is None else int(crop_size)
    if batch < 1:
        raise GraphError(f"batch size must be positive, got {batch}")
    builder = _Builder(settings, batch, crop)
    builder.head(builder.backbone(), split)
    return Graph(
        cfg=cfg,
        split=split,
        batch_size=batch,
        config_batch_size=cfg_batch,
        crop_size=crop,
        ops=tuple(builder.ops),
        params=tuple(ParamSpec(n, s) for n, s in builder.params.items()),
        taps=tuple(builder.taps),
    )
