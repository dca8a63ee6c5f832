"""Precise BN statistics, as the original's ``lib/utils/bn_helper.py`` computes them.

Before every checkpoint and every validation pass (``TRAIN.COMPUTE_PRECISE_BN``, the non-affine
configs), the original replaces the exponential running averages of every BN layer (backbone and
non-local) by population statistics of ``TRAIN.ITER_COMPUTE_PRECISE_BN`` (200) training batches
per GPU: a forward-only pass of the training network (BN in training mode, training
augmentation) records for every batch ``b`` and layer the batch mean ``m_b`` and the biased batch
variance ``v_b`` (recovered from Caffe2's saved inverse std as ``(1 / siv)^2 - eps``), then::

    running_mean = mean_b(m_b)
    running_var  = mean_b(v_b + m_b^2) - running_mean^2       (asserted > 0)

over all ``ITER_COMPUTE_PRECISE_BN x NUM_GPUS`` per-GPU batches (its ``_collect_bn_stats`` loops
over the GPUs, ``_finalize_bn_stats`` divides by ``ITER_COMPUTE_PRECISE_BN * NUM_GPUS``). The
statistics are thus those of ``ITER_COMPUTE_PRECISE_BN x TRAIN.BATCH_SIZE`` clips, built from
per-GPU batches of ``TRAIN.BATCH_SIZE / NUM_GPUS`` clips (8 in the released recipes).

Here a "per-GPU batch" is one BN group of the layer: a train-split model normalises every
consecutive group of ``bn_group_size`` clips of its input on its own
(:class:`~nonlocal_net.models.layers.SpatialBN`), so a forward over ``G`` groups contributes
``G`` per-GPU batches, each with its own moments, exactly as ``G`` of the original's GPUs; a layer
without a group size (a val/test model put in training mode) counts its whole input as one.
The moments are taken directly from each BN layer's input (a forward pre-hook on every
SpatialBN; frozen affines have no statistics) in float32 as the original's, summed in float64,
and averaged over processes when ``torch.distributed`` is initialised (every process must then
run the same number of batches). Every layer is divided by its own count of groups, which is
``ITER_COMPUTE_PRECISE_BN x NUM_GPUS`` when the trainer feeds it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..models.layers import SpatialBN

__all__ = ["BatchNormHelper", "PreciseBNError", "compute_precise_bn"]

logger = logging.getLogger(__name__)


class PreciseBNError(ValueError):
    """Precise BN could not produce statistics (no batches, non-positive variance)."""


def _inputs_of(batch: Any) -> Any:
    """The network input of a loader item: a tensor, or the first element of a tuple/list
    (``(clips, labels, ...)``), or ``batch["data"]``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["data"]
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(f"cannot find the network input in a batch of type {type(batch).__name__}")


def _model_device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def compute_precise_bn(model: nn.Module, batches_iterable: Iterable[Any], num_iters: int) -> int:
    """Replace the running statistics of every BN layer of ``model`` by precise-BN statistics
    of the first ``num_iters`` batches of ``batches_iterable`` (the original's
    ``compute_and_update_bn_stats``); returns the number of batches used. A batch of ``G`` BN
    groups (a train-split model's per-GPU BN) counts as ``G`` of the original's per-GPU batches.

    Batches are tensors ``(N, 3, T, H, W)`` or loader items whose first element is one (labels
    are ignored), moved to the model's device. The model runs in training mode without
    gradients; its mode, parameters and everything but the BN ``running_mean``/``running_var``
    are left as they were. A model without BN layers (``MODEL.USE_AFFINE``) is left unchanged
    and 0 is returned. Pass the unwrapped model, not a ``DistributedDataParallel`` wrapper; under
    ``torch.distributed`` the sums are averaged over all processes (each must run ``num_iters``
    batches), as the original averages over its GPUs.

    Raises :class:`PreciseBNError` if no batch came, or a layer's variance is not positive (the
    original's assertion), naming the layer; the statistics are then left unchanged.
    """
    if num_iters <= 0:
        raise ValueError(f"num_iters must be positive, got {num_iters}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SpatialBN)}
    if not layers:
        return 0
    sums: dict[str, list[torch.Tensor | None]] = {name: [None, None] for name in layers}
    groups_seen = dict.fromkeys(layers, 0)

    def make_hook(name: str):
        def hook(module: SpatialBN, args: tuple[Any, ...]) -> None:
            mean, var = _group_moments(module, args[0])
            groups_seen[name] += mean.shape[0]
            entry = sums[name]
            mean_sum = mean.sum(0)
            ex2_sum = (var + mean * mean).sum(0)
            entry[0] = mean_sum if entry[0] is None else entry[0] + mean_sum
            entry[1] = ex2_sum if entry[1] is None else entry[1] + ex2_sum

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in layers.items()]
    saved = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers.items()}
    modes = {m: m.training for m in model.modules()}
    device = _model_device(model)
    count = 0
    try:
        model.train()
        for batch in itertools.islice(batches_iterable, num_iters):
            model(_inputs_of(batch).to(device, non_blocking=True))
            count += 1
        if count == 0:
            raise PreciseBNError("precise BN: the batch iterable produced no batch")
        if count < num_iters:
            logger.warning("precise BN: only %d of %d batches were available", count, num_iters)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        for name, module in layers.items():
            mean_sum, ex2_sum = sums[name]
            if mean_sum is None:
                raise PreciseBNError(f"precise BN: layer {name} was not run by the batches")
            total = torch.tensor(float(groups_seen[name]), dtype=torch.float64, device=device)
            if distributed:
                dist.all_reduce(total)
                dist.all_reduce(mean_sum)
                dist.all_reduce(ex2_sum)
            mean = mean_sum / total
            var = ex2_sum / total - mean * mean
            if not bool((var > 0).all()):
                raise PreciseBNError(
                    f"precise BN: layer {name} has a non-positive variance "
                    f"(min {float(var.min()):.3g}) after {count} batches"
                )
            module.running_mean.copy_(mean.to(module.running_mean.dtype))
            module.running_var.copy_(var.to(module.running_var.dtype))
    except BaseException:
        for name, module in layers.items():
            module.running_mean.copy_(saved[name][0])
            module.running_var.copy_(saved[name][1])
        raise
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    logger.info("Precise BN: %d layers from %d batches", len(layers), count)
    return count


def _group_moments(module: SpatialBN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per BN group of ``module`` (its per-GPU batches), the batch mean and the biased batch
    variance BN normalises with, both ``(groups, C)`` float64: computed in the activation's
    precision (at least float32, as the original's GPU statistics)."""
    xf = x.detach()
    xf = xf if xf.dtype == torch.float64 else xf.float()
    groups = module.batch_groups(xf.shape[0]) if module.training else 1
    if groups == 1:
        dims = [d for d in range(xf.dim()) if d != 1]
        var, mean = torch.var_mean(xf, dim=dims, correction=0)
        return mean.double()[None], var.double()[None]
    grouped = xf.reshape(groups, xf.shape[0] // groups, xf.shape[1], -1)
    var, mean = torch.var_mean(grouped, dim=(1, 3), correction=0)
    return mean.double(), var.double()


class BatchNormHelper:
    """The original's per-iteration caching around :func:`compute_precise_bn`: statistics are
    computed once per iteration number (checkpoint and validation at the same iteration share
    them) and re-applied when asked again for the same iteration."""

    def __init__(self, num_iters: int) -> None:
        self.num_iters = num_iters
        self._last_update_iter: int | None = None
        self._stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def compute_and_update_bn_stats(
        self, model: nn.Module, batches_iterable: Iterable[Any], curr_iter: int | None = None
    ) -> None:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, SpatialBN)}
        if curr_iter is not None and curr_iter == self._last_update_iter:
            logger.info("BN of iter %d computed. Update only.", curr_iter + 1)
            with torch.no_grad():
                for name, (mean, var) in self._stats.items():
                    layers[name].running_mean.copy_(mean)
                    layers[name].running_var.copy_(var)
            return
        if curr_iter is not None:
            logger.info("Computing and updating BN stats at iter: %d", curr_iter + 1)
        compute_precise_bn(model, batches_iterable, self.num_iters)
        self._last_update_iter = curr_iter
        self._stats = {
            n: (m.running_mean.clone(), m.running_var.clone()) for n, m in layers.items()
        }
