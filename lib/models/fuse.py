"""Inference-only rewrites of a built :class:`~.resnet_video.ResNetVideo` (the fast path).

Every function here changes *how* the network computes, never *what* it computes in exact
arithmetic; results differ from the original's layer-by-layer arithmetic only by rounding. They
are applied by :func:`nonlocal_net.engine.inference.prepare_for_inference` for the precision
modes ``fp32``/``tf32``/``bf16``/``fp16``, never for ``strict`` and never by the parity or
``vnl-verify`` paths, which keep the original's operator sequence.

* :func:`rewritten_unit` names the unit (the stem, a residual block, a non-local block) whose
  rewrite changes what a module inside it outputs; every rewrite below leaves the units it is
  told to ``keep`` in the original's form, so that a recorded layer (``vnl-extract --layer``)
  inside one is the original's module computing the original's operators.
* :func:`fold_norms` folds every SpatialBN (running statistics, eval mode) and every frozen
  AffineNd into the conv before it: ``bn(conv(x)) = conv'(x)`` with ``w' = w * s``,
  ``b' = b * s + t`` for ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s`` (the fold is
  computed in float64 and rounded once).
* :func:`pad_stem_channels` gives conv1 zero-weighted extra input channels (3 -> 8) and pads the
  clip with zero channels: the products added are exactly zero, and the conv becomes
  tensor-core friendly in bf16/fp16 (cuDNN runs 3-channel 3-D convs on a generic kernel).
* :func:`use_sdpa_nonlocal` runs the embedded-Gaussian non-local attention through
  ``F.scaled_dot_product_attention`` (the same softmax(theta^T phi * scale) g^T); the
  dot-product variant keeps its explicit ``/ M`` form, which SDPA does not express.
* :func:`route_cpu_convs` replaces the Conv3d modules with :class:`RoutedConv3d`, which sends
  every conv to oneDNN (or to a plain matrix product for unstrided 1x1x1 convs) instead of
  letting PyTorch's size heuristic pick the unvectorised ``slow_conv3d_forward`` at small batch.
* :func:`fuse_cpu_pointwise` goes further on the CPU: every conv becomes a :class:`FusedConv3d`
  (one oneDNN primitive, weight reordered once) and the ReLUs and residual adds of the stem,
  the bottlenecks and the non-local blocks run as its post-ops (no extra passes over memory).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .layers import AffineNd, SpatialBN
from .nonlocal_helper import NonLocalBlock
from .resnet_helper import ResidualBlock3d

__all__ = [
    "STEM_NAMES",
    "STEM_UNIT",
    "CastTo",
    "FusedConv3d",
    "FusedResidualBlock3d",
    "FusedSDPANonLocalBlock",
    "PaddedStem",
    "RoutedConv3d",
    "SDPANonLocalBlock",
    "cpu_pointwise_fusion_available",
    "fold_norms",
    "folded_conv",
    "fuse_cpu_pointwise",
    "pad_stem_channels",
    "rewritten_unit",
    "route_cpu_convs",
    "use_sdpa_nonlocal",
]

STEM_CHANNELS = 8
# the stem's modules: conv1 + res_conv1_bn are folded and the ReLU becomes conv1's post-op
STEM_NAMES = ("conv1", "res_conv1_bn", "relu")
STEM_UNIT = "stem"  # the unit name of the stem (no module of a ResNetVideo has this name)


def rewritten_unit(model: nn.Module, name: str) -> str | None:
    """The unit whose fast-path rewrite changes what module ``name`` of ``model`` outputs.

    ``STEM_UNIT`` for the stem's modules; for a module strictly inside a residual or non-local
    block (``res2.0.branch2a``, ``res4.1.relu``, ``res3.nonlocal_1.out``), that block's name;
    ``None`` for a module whose output every rewrite keeps (a block, a stage, a pool).
    """
    if name in STEM_NAMES:
        return STEM_UNIT
    parts = name.split(".")
    modules = dict(model.named_modules())
    for end in range(1, len(parts)):
        prefix = ".".join(parts[:end])
        if isinstance(modules.get(prefix), ResidualBlock3d | NonLocalBlock):
            return prefix
    return None


def folded_conv(conv: nn.Conv3d, norm: nn.Module) -> nn.Conv3d:
    """A new conv computing ``norm(conv(x))`` (``norm``: eval-mode SpatialBN or AffineNd)."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0]).double()
    if isinstance(norm, SpatialBN):
        if norm.training:
            raise ValueError("fold_norms needs an eval-mode model (BN with running statistics)")
        scale = norm.weight.detach().double() / torch.sqrt(
            norm.running_var.detach().double() + norm.eps
        )
        shift = norm.bias.detach().double() - norm.running_mean.detach().double() * scale
    elif isinstance(norm, AffineNd):
        scale = norm.weight.detach().double()
        shift = norm.bias.detach().double()
    else:
        raise TypeError(f"cannot fold {type(norm).__name__} into a conv")
    fused = nn.Conv3d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(w * scale.view(-1, 1, 1, 1, 1))
        fused.bias.copy_(b * scale + shift)
    return fused.requires_grad_(False)


def _fold_pair(parent: nn.Module, conv_name: str, norm_name: str) -> int:
    conv = getattr(parent, conv_name, None)
    norm = getattr(parent, norm_name, None)
    if conv is None or norm is None or isinstance(norm, nn.Identity):
        return 0
    setattr(parent, conv_name, folded_conv(conv, norm))
    setattr(parent, norm_name, nn.Identity())
    return 1


def fold_norms(model: nn.Module, keep: frozenset[str] = frozenset()) -> int:
    """Fold every BN/affine of ``model`` into its conv, in place; returns how many were folded.

    Covers the stem (``conv1`` + ``res_conv1_bn``), the four conv/norm pairs of every residual
    block, and the ``out`` conv + ``bn`` of every non-local block; the units named in ``keep``
    (:func:`rewritten_unit`) are left unfolded.
    """
    if model.training:
        raise ValueError("fold_norms needs an eval-mode model (BN with running statistics)")
    count = 0
    if STEM_UNIT not in keep and hasattr(model, "conv1") and hasattr(model, "res_conv1_bn"):
        count += _fold_pair(model, "conv1", "res_conv1_bn")
    for name, module in list(model.named_modules()):
        if name in keep:
            continue
        if isinstance(module, ResidualBlock3d):
            for conv_name in ("branch2a", "branch2b", "branch2c", "branch1"):
                count += _fold_pair(module, conv_name, conv_name + "_bn")
        elif isinstance(module, NonLocalBlock) and module.bn is not None:
            count += _fold_pair(module, "out", "bn")
            module.bn = None
    return count


class CastTo(nn.Module):
    """Casts its input to ``dtype`` and ``memory_format`` (no copy when it already is)."""

    def __init__(
        self, dtype: torch.dtype, memory_format: torch.memory_format | None = None
    ) -> None:
        super().__init__()
        self.dtype = dtype
        self.memory_format = memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.memory_format is not None and x.dim() == 5:
            x = x.contiguous(memory_format=self.memory_format)
        return x

    def extra_repr(self) -> str:
        return f"{self.dtype}, {self.memory_format}"


class PaddedStem(nn.Module):
    """conv1 on a clip padded with zero channels, with zero weights for them (exact in math)."""

    def __init__(self, conv: nn.Conv3d, channels: int = STEM_CHANNELS) -> None:
        super().__init__()
        if conv.groups != 1 or channels < conv.in_channels:
            raise ValueError(f"cannot pad a {conv.in_channels}-channel conv to {channels}")
        self.extra = channels - conv.in_channels
        self.conv = nn.Conv3d(
            channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        ).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, : conv.in_channels].copy_(conv.weight)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pad dims are given last-first: (W, W, H, H, T, T, C_before, C_after)
        return self.conv(F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.extra)))


def pad_stem_channels(model: nn.Module, channels: int = STEM_CHANNELS) -> None:
    """Replace ``model.conv1`` by a :class:`PaddedStem` of ``channels`` input channels."""
    model.conv1 = PaddedStem(model.conv1, channels)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, 1, T*H*W, C): a view when ``x`` is channels-last."""
    return x.permute(0, 2, 3, 4, 1).reshape(x.shape[0], 1, -1, x.shape[1])


class SDPANonLocalBlock(NonLocalBlock):
    """A :class:`NonLocalBlock` whose embedded-Gaussian attention runs through
    ``F.scaled_dot_product_attention`` (same parameters, same state_dict)."""

    def _attended(self, x: torch.Tensor) -> torch.Tensor:
        """``g`` attended by ``softmax(theta^T phi * scale)``, shaped like ``theta(x)``."""
        b, _, t, h, w = x.shape
        c = self.dim_inner
        # (B, 1, L, C'): one head, 4-D, so that SDPA may take its fused (flash) kernels (3-D
        # inputs fall back to the unfused math path, which materialises the (N, M) affinity);
        # tokens are taken as (T, H, W, C') so that channels-last maps are views, not copies
        query = _tokens(self.theta(x))  # (B, 1, N, C')
        xp = self.pool(x) if self.pool is not None else x
        key = _tokens(self.phi(xp))  # (B, 1, M, C')
        value = _tokens(self.g(xp))  # (B, 1, M, C')
        scale = self.scale if self.use_scale else 1.0
        y = F.scaled_dot_product_attention(query, key, value, scale=scale)  # (B, 1, N, C')
        return y.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_softmax:
            return super()._attention(x)
        z = self.out(self._attended(x))
        if self.bn is not None:
            z = self.bn(z)
        return z


def use_sdpa_nonlocal(model: nn.Module, keep: frozenset[str] = frozenset()) -> int:
    """Switch every embedded-Gaussian non-local block of ``model`` to SDPA, in place (except
    the blocks named in ``keep``)."""
    count = 0
    for name, module in model.named_modules():
        if type(module) is NonLocalBlock and module.use_softmax and name not in keep:
            module.__class__ = SDPANonLocalBlock
            count += 1
    return count


class RoutedConv3d(nn.Conv3d):
    """A Conv3d that always takes oneDNN on the CPU (a matrix product for unstrided 1x1x1).

    PyTorch's CPU dispatcher sends small-batch float32 3-D convs with kernels of at most 3x3 to
    ``slow_conv3d_forward`` (im2col + GEMM, single-threaded copies) when the input is small; the
    oneDNN kernels are faster for every shape of these networks. Channels-last inputs are kept
    channels-last. Off the CPU it is a plain Conv3d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.requires_grad:
            return super().forward(x)
        if (
            self.kernel_size == (1, 1, 1)
            and self.stride == (1, 1, 1)
            and self.groups == 1
            and x.is_contiguous(memory_format=torch.channels_last_3d)
        ):
            # (N, C, T, H, W) channels-last is (N, T, H, W, C) in memory: one GEMM
            y = F.linear(x.permute(0, 2, 3, 4, 1), self.weight.flatten(1), self.bias)
            return y.permute(0, 4, 1, 2, 3)
        return torch.mkldnn_convolution(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
        )


def route_cpu_convs(model: nn.Module) -> int:
    """Turn every plain ``nn.Conv3d`` of ``model`` into a :class:`RoutedConv3d`, in place."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Conv3d and module.padding_mode == "zeros":
            module.__class__ = RoutedConv3d
            count += 1
    return count


def cpu_pointwise_fusion_available() -> bool:
    """Whether this torch has oneDNN's fused conv ops (those inductor uses on the CPU)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        ops = torch.ops.mkldnn
        ops._convolution_pointwise.default  # noqa: B018 (raises when missing)
        ops._convolution_pointwise.binary  # noqa: B018
        ops._reorder_convolution_weight.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


class FusedConv3d(RoutedConv3d):
    """A :class:`RoutedConv3d` that runs as one oneDNN primitive with its post-ops on the CPU.

    ``forward(x)`` computes ``conv(x)`` and ``forward(x, other)`` computes ``conv(x) + other``,
    each followed by ReLU when ``post_relu``; on the CPU in float32 the add and the ReLU are
    oneDNN post-ops of the conv (no extra pass over memory), and the weight is reordered once
    into oneDNN's blocked layout on the first call (the oneDNN tensor lives beside the ordinary
    parameter, which stays what ``state_dict`` holds). Elsewhere it is the routed conv followed
    by the same add and ReLU.
    """

    post_relu: bool = False

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        # inference tensors (a model prepared under inference_mode) carry no version counter
        version = None if weight.is_inference() else weight._version
        key = (x.shape, weight.data_ptr(), version)
        packed = self.__dict__.get("_packed")
        if packed is None or packed[0] != key:
            w = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight,
                list(self.padding),
                list(self.stride),
                list(self.dilation),
                self.groups,
                list(x.shape),
            )
            packed = (key, w)
            self.__dict__["_packed"] = packed  # not a buffer: kept out of state_dict/copies
        return packed[1]

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.requires_grad:
            y = super().forward(x)
            if other is not None:
                y = y + other
            return F.relu(y) if self.post_relu else y
        args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        w = self._packed_weight(x)
        if other is None:
            attr, scalars = ("relu", [None]) if self.post_relu else ("none", [])
            return torch.ops.mkldnn._convolution_pointwise(
                x, w, self.bias, *args, attr, scalars, ""
            )
        if other.stride() != x.stride() and other.shape[1:] == x.shape[1:]:
            other = other.contiguous(memory_format=_memory_format_of(x))
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, w, self.bias, *args, "add", 1.0, "relu" if self.post_relu else None, [], ""
        )

    def __deepcopy__(self, memo):  # the oneDNN weight cannot be deep-copied; it is rebuilt
        packed = self.__dict__.pop("_packed", None)
        try:
            cls = self.__class__
            self.__class__ = RoutedConv3d
            twin = copy.deepcopy(self, memo)
        finally:
            self.__class__ = cls
            if packed is not None:
                self.__dict__["_packed"] = packed
        twin.__class__ = cls
        return twin


def _memory_format_of(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class FusedResidualBlock3d(ResidualBlock3d):
    """A folded :class:`ResidualBlock3d` whose ReLUs and residual add run as conv post-ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch2b(self.branch2a(x))
        shortcut = x if self.branch1 is None else self.branch1(x)
        return self.branch2c(out, shortcut)


class FusedSDPANonLocalBlock(SDPANonLocalBlock):
    """An :class:`SDPANonLocalBlock` whose residual add is a post-op of its ``out`` conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is not None or self.bn is not None:
            return super().forward(x)
        return self.out(self._attended(x), x)


def fuse_cpu_pointwise(model: nn.Module) -> int:
    """Make the ReLUs and residual adds of a folded model oneDNN conv post-ops, in place.

    Needs :func:`fold_norms` first (a block with a norm left is skipped); the stem's ReLU, each
    bottleneck's three ReLUs and residual add, and each SDPA non-local block's residual add
    become post-ops; every other conv runs as a :class:`FusedConv3d` without post-op. Returns
    how many blocks were fused (0, with the convs routed by :func:`route_cpu_convs` instead,
    when this torch lacks the fused ops).
    """
    if not cpu_pointwise_fusion_available():
        route_cpu_convs(model)
        return 0
    count = 0
    relu = getattr(model, "relu", None)
    if (
        isinstance(getattr(model, "conv1", None), nn.Conv3d)
        and isinstance(getattr(model, "res_conv1_bn", None), nn.Identity)
        and isinstance(relu, nn.ReLU)
    ):
        model.conv1.__class__ = FusedConv3d
        model.conv1.post_relu = True
        model.relu = nn.Identity()
        count += 1
    for module in list(model.modules()):
        if type(module) is ResidualBlock3d and all(
            isinstance(getattr(module, n + "_bn"), nn.Identity | type(None))
            for n in ("branch2a", "branch2b", "branch2c", "branch1")
        ):
            for name, post_relu in (("branch2a", True), ("branch2b", True), ("branch2c", True)):
                conv = getattr(module, name)
                conv.__class__ = FusedConv3d
                conv.post_relu = post_relu
            if module.branch1 is not None:
                module.branch1.__class__ = FusedConv3d
            module.__class__ = FusedResidualBlock3d
            count += 1
        elif type(module) is SDPANonLocalBlock and module.bn is None and module.group_size is None:
            module.out.__class__ = FusedConv3d
            module.__class__ = FusedSDPANonLocalBlock
            count += 1
    for module in model.modules():
        # the other convs (non-local theta/phi/g) too: oneDNN adds the bias in its kernel, where
        # a GEMM with bias first copies the bias into every output row
        if type(module) is nn.Conv3d and module.padding_mode == "zeros":
            module.__class__ = FusedConv3d
    return count
