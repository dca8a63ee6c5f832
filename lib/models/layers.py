"""Normalisation layers with the original's blob inventory and semantics.

* :class:`SpatialBN` is Caffe2's ``SpatialBN``: ``weight``/``bias``/``running_mean``/
  ``running_var`` are the blobs ``_s``/``_b``/``_rm``/``_riv`` (``_riv`` holds the running
  *variance*). Unlike ``nn.BatchNorm3d`` it keeps no ``num_batches_tracked`` counter, so its
  state is exactly the four Caffe2 blobs. In training mode with ``bn_group_size`` set it is the
  original's per-GPU BN: every consecutive group of ``bn_group_size`` clips is normalised with
  its own statistics (:meth:`SpatialBN.batch_groups`), in one call over the whole batch.
* :class:`AffineNd` is the project's frozen per-channel affine (``MODEL.USE_AFFINE`` and
  ``NONLOCAL.USE_AFFINE``): ``y = x * weight[c] + bias[c]``. Its ``weight``/``bias`` are buffers,
  because the original's AffineNd has no parameter gradient: they are never trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AffineNd",
    "SpatialBN",
    "caffe2_float",
    "caffe2_to_torch_momentum",
    "frozen_running_stats",
    "set_bn_group_size",
]


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

    Per-GPU BN: the original runs ``NUM_GPUS`` copies of the network, each on its
    ``TRAIN.BATCH_SIZE // NUM_GPUS`` clips, and every copy's SpatialBN normalises with the
    statistics of its own clips. With ``bn_group_size = g`` (what the train-split model sets, see
    :func:`set_bn_group_size`) a training-mode forward over ``N = G * g`` clips does the same for
    ``G`` groups of consecutive clips at once: the batch is reshaped so that group ``j``'s
    channel ``c`` becomes channel ``j * C + c`` of one ``F.batch_norm`` call (no Python loop).
    ``N`` not a multiple of ``g`` raises :class:`ValueError`. ``bn_group_size = None`` (every
    val/test model, and the train split's default before this existed) normalises over the
    whole batch. Eval mode never looks at ``bn_group_size``: it is ``nn.BatchNorm3d``'s.

    Running statistics in training mode are updated from the *first* group only: the original
    saves the blobs of ``gpu_0`` in its checkpoints (``save_model_params`` of its
    ``lib/utils/checkpoints.py``), and each GPU's ``_rm``/``_riv`` follow that GPU's own batches,
    so the statistics a checkpoint holds are those of the clips ``0 .. g-1`` of every global
    batch (before precise BN, which replaces them on every GPU alike).

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
        # clips per BN group in training mode (None: the whole batch); not a blob, not saved
        self.bn_group_size: int | None = None
        # samples of the input per clip: 1, or the temporal windows of a grouped non-local
        # block, which sets it on its BN for every forward (see NonLocalBlock.forward)
        self.samples_per_clip = 1

    def batch_groups(self, samples: int) -> int:
        """The number of per-GPU groups in a training batch of ``samples`` samples
        (``samples_per_clip`` consecutive samples per clip).

        Raises ValueError if the clips are not a whole number of groups.
        """
        if self.bn_group_size is None:
            return 1
        windows = self.samples_per_clip
        per_group = self.bn_group_size * windows
        if samples <= 0 or samples % per_group:
            clips = samples // windows if samples % windows == 0 else samples / windows
            raise ValueError(
                f"per-GPU BN: a batch of {clips} clips is not a multiple of the BN group size "
                f"{self.bn_group_size} (TRAIN.BATCH_SIZE // NUM_GPUS clips, the original's "
                f"per-GPU batch)"
            )
        return samples // per_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BN of ``x`` ``(N, C, ...)``; in training mode per group of ``bn_group_size`` clips."""
        if not self.training or self.bn_group_size is None:
            return super().forward(x)
        groups = self.batch_groups(x.shape[0])
        if groups == 1:
            return super().forward(x)
        return self._grouped_forward(x, groups)

    def _grouped_forward(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        n, c = x.shape[:2]
        rest = x.shape[2:]
        per = n // groups
        # (G*g, C, ...) -> (g, G*C, ...): channel j*C+c holds group j's channel c
        xg = x.reshape(groups, per, c, *rest).transpose(0, 1).reshape(per, groups * c, *rest)
        running_mean = self.running_mean.repeat(groups)
        running_var = self.running_var.repeat(groups)
        y = F.batch_norm(
            xg,
            running_mean,
            running_var,
            self.weight.repeat(groups),
            self.bias.repeat(groups),
            True,
            self.momentum,
            self.eps,
        )
        with torch.no_grad():  # the first group's update: what gpu_0 keeps (see the class doc)
            self.running_mean.copy_(running_mean[:c])
            self.running_var.copy_(running_var[:c])
        return y.reshape(per, groups, c, *rest).transpose(0, 1).reshape(n, c, *rest)

    def extra_repr(self) -> str:
        group = "" if self.bn_group_size is None else f", bn_group_size={self.bn_group_size}"
        return super().extra_repr() + group

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


def set_bn_group_size(model: nn.Module, group_size: int | None) -> int:
    """Set ``bn_group_size`` on every :class:`SpatialBN` of ``model`` (the original's per-GPU
    batch ``TRAIN.BATCH_SIZE // NUM_GPUS`` for training; ``None``: whole-batch statistics).
    Returns the number of layers set."""
    if group_size is not None and group_size <= 0:
        raise ValueError(f"the BN group size must be positive, got {group_size}")
    layers = [m for m in model.modules() if isinstance(m, SpatialBN)]
    for m in layers:
        m.bn_group_size = group_size
    return len(layers)


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module, frozen: bool = True) -> Iterator[None]:
    """While active (and ``frozen``), training-mode :class:`SpatialBN` layers of ``model`` still
    normalise with their batch statistics but leave their running statistics as they are
    (momentum 0). The trainer uses it for every micro-batch after the first of an iteration:
    the original's checkpoints hold ``gpu_0``'s statistics, which only its own clips update."""
    layers = [m for m in model.modules() if isinstance(m, SpatialBN)] if frozen else []
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum
