"""The original's solver: Caffe2 ``MomentumSGDUpdate`` with weight-decay groups by blob name.

Public API (re-exported as :mod:`nonlocal_net.solver`; the trainer uses exactly this)::

    from nonlocal_net import solver
    optimizer = solver.build_optimizer(model, cfg)
    for it in range(start_iter, cfg.SOLVER.MAX_ITER):
        solver.set_lr(optimizer, solver.lr_at(cfg, it))   # at the start of every iteration
        loss = ...; loss.backward()
        optimizer.step(); optimizer.zero_grad()

What one iteration does to every trainable parameter ``p`` (the original's
``add_parameter_update_ops`` in ``lib/models/model_builder_video.py``), in float32 like Caffe2:

1. weight decay folded into the gradient, ``g = g + wd * p``, with ``wd = SOLVER.WEIGHT_DECAY_BN``
   when the parameter's Caffe2 blob name contains ``_bn`` (every BN ``_s``/``_b``, non-local BN
   included) and ``wd = SOLVER.WEIGHT_DECAY`` otherwise (conv weights, conv/non-local/``pred``
   biases, ``pred_w``);
2. Caffe2's ``MomentumSGDUpdate`` with ``mu = SOLVER.MOMENTUM``; the buffer ``m`` holds the LR:

   * Nesterov (every config): ``m' = mu * m + lr * g``; ``p -= (1 + mu) * m' - mu * m``; ``m = m'``
   * plain: ``m' = mu * m + lr * g``; ``p -= m'``; ``m = m'``;

3. at an LR change (:func:`set_lr`, the original's ``_SetNewLr``), if ``SOLVER.SCALE_MOMENTUM``
   and ``|new - old| > 1e-7 * new``, every buffer is multiplied by ``new / old``
   (``_CorrectMomentum``), so that ``m`` keeps the scale of ``lr * g``.

Frozen affines (``MODEL.USE_AFFINE``) are buffers of the model, not parameters: they are not in
the optimizer and never change, as the original's AffineNd has no parameter gradient.

Loss (for the trainer): the original averages ``SoftmaxWithLoss`` over each GPU's batch, scales it
by ``1 / NUM_GPUS`` and sums the gradients over GPUs, i.e. the update uses the gradient of the
softmax cross-entropy *averaged over the global batch* ``TRAIN.BATCH_SIZE``. In PyTorch: a mean
cross-entropy per process, DDP's gradient averaging over the world size, and with ``A``
accumulated micro-batches a loss divided by ``A`` each.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from yacs.config import CfgNode

from ..converters.names import try_state_dict_key_to_blob
from ..utils.lr_policy import get_lr_at_iter

__all__ = [
    "MOMENTUM_SUFFIX",
    "Caffe2MomentumSGD",
    "build_optimizer",
    "caffe2_momentum_blobs",
    "current_lr",
    "load_caffe2_momentum",
    "lr_at",
    "nonfinite_state",
    "parameter_blob_name",
    "set_lr",
    "weight_decay_groups",
]

logger = logging.getLogger(__name__)

MOMENTUM_SUFFIX = "_momentum"
# Wrappers whose attribute name prefixes the parameter names (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _f32(value: float) -> float:
    """``value`` rounded to float32: the Caffe2 ``lr`` blob and float operator arguments."""
    return float(np.float32(value))


class Caffe2MomentumSGD(torch.optim.Optimizer):
    """Caffe2's ``WeightedSum`` weight decay + ``MomentumSGDUpdate`` as a PyTorch optimizer.

    :meth:`step` performs exactly Caffe2's update, operation by operation, on a buffer in
    Caffe2's convention (the buffer holds ``lr * g`` terms; it *is* the ``<param>_momentum``
    blob of the original's checkpoints, see :func:`caffe2_momentum_blobs`). With the
    float32 operands of Caffe2 (``lr`` and ``mu`` rounded to float32, ``1 + mu`` computed in
    float32) every elementwise operation is the one Caffe2 performs.

    Equivalence relied upon (why this is the original's training and not just "SGD"): with
    ``SCALE_MOMENTUM`` the buffer is rescaled by ``new_lr / old_lr`` at every LR change, so
    ``m = lr * b`` holds at all times for PyTorch's buffer ``b`` of
    ``torch.optim.SGD(momentum=mu, nesterov=True, dampening=0)``: PyTorch's
    ``b' = mu * b + g; p -= lr * (g + mu * b')`` is ``m' = mu * m + lr * g`` and
    ``p -= lr * g + mu * m' = (1 + mu) * m' - mu * m`` (substitute ``lr * g = m' - mu * m``).
    The two therefore agree mathematically (up to float32 rounding) *only* with
    ``SCALE_MOMENTUM True``; with ``False`` (the original's default) the history keeps the old
    LR's scale for a while after a change, which PyTorch's SGD cannot express. This class
    implements Caffe2's form, so both settings are the original's and the buffer can be exported
    to and imported from Caffe2 checkpoints without conversion.

    Parameter groups hold ``lr``, ``momentum``, ``nesterov``, ``weight_decay``,
    ``scale_momentum`` and (from :func:`build_optimizer`) ``blob_names``, the Caffe2 name of each
    parameter. Change the LR with :func:`set_lr`, not by assigning ``group["lr"]``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        scale_momentum: bool = True,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
        defaults = dict(
            lr=_f32(lr),
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            scale_momentum=scale_momentum,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One Caffe2 update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Caffe2MomentumSGD does not support sparse gradients")
            lr = _f32(group["lr"])
            mu = _f32(group["momentum"])
            wd = _f32(group["weight_decay"])
            grads = [p.grad for p in params]
            if wd != 0.0:  # WeightedSum([g, 1, p, wd]) = g + wd * p
                grads = torch._foreach_add(grads, torch._foreach_mul(params, wd))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:  # the original's ConstantFill(0.0)
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                bufs.append(state["momentum_buffer"])
            # m' = mu * m + lr * g
            new_bufs = torch._foreach_mul(bufs, mu)
            torch._foreach_add_(new_bufs, torch._foreach_mul(grads, lr))
            if group["nesterov"]:
                # p -= (1 + mu) * m' - mu * m
                one_plus_mu = float(np.float32(1.0) + np.float32(mu))
                steps = torch._foreach_mul(new_bufs, one_plus_mu)
                torch._foreach_sub_(steps, torch._foreach_mul(bufs, mu))
            else:
                steps = new_bufs  # p -= m'
            torch._foreach_sub_(params, steps)
            torch._foreach_copy_(bufs, new_bufs)
        return loss


def _unwrapped_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


def parameter_blob_name(name: str) -> str:
    """The Caffe2 blob name of a model parameter name (``res3.0.branch2a_bn.weight`` ->
    ``res3_0_branch2a_bn_s``); DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes
    are ignored. ``ValueError`` for a name that is not one of these models' parameters."""
    blob = try_state_dict_key_to_blob(_unwrapped_name(name))
    if blob is None:
        raise ValueError(
            f"parameter {name!r} has no Caffe2 blob name; the solver's weight-decay groups are "
            "defined on the original's blob names (see nonlocal_net.converters.names)"
        )
    return blob


def weight_decay_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The trainable parameters of ``model`` as ``{"bn": [...], "other": [...]}`` lists of
    ``(blob name, parameter)``: ``"bn"`` when the blob name contains ``_bn`` (the original's
    rule), in the model's parameter order."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"bn": [], "other": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        blob = parameter_blob_name(name)
        groups["bn" if "_bn" in blob else "other"].append((blob, param))
    return groups


def lr_at(cfg: CfgNode, iteration: int) -> float:
    """The learning rate of the 0-based ``iteration`` under ``cfg.SOLVER`` (the original's
    ``lr_policy.get_lr_at_iter``: schedule, warm-up, float32), as a Python float."""
    return float(get_lr_at_iter(cfg, iteration))


def build_optimizer(model: nn.Module, cfg: CfgNode | None = None) -> Caffe2MomentumSGD:
    """The original's optimizer over the trainable parameters of ``model`` (``cfg`` defaults to
    ``model.cfg``): two groups, ``SOLVER.WEIGHT_DECAY`` and ``SOLVER.WEIGHT_DECAY_BN`` (blob name
    containing ``_bn``), momentum ``SOLVER.MOMENTUM``, ``SOLVER.NESTEROV``,
    ``SOLVER.SCALE_MOMENTUM``, and the LR of iteration 0 as the current LR. Momentum buffers
    start at zero."""
    if cfg is None:
        cfg = getattr(model, "cfg", None)
        if cfg is None:
            raise ValueError("build_optimizer needs a config (the model has no .cfg)")
    solver = cfg.SOLVER
    lr = lr_at(cfg, 0)  # also validates the policy and the schedule
    groups = weight_decay_groups(model)
    param_groups = []
    for key, wd in (("other", solver.WEIGHT_DECAY), ("bn", solver.WEIGHT_DECAY_BN)):
        members = groups[key]
        if members:
            param_groups.append(
                {
                    "params": [p for _, p in members],
                    "blob_names": [b for b, _ in members],
                    "weight_decay": float(wd),
                    "name": "weight_decay_bn" if key == "bn" else "weight_decay",
                }
            )
    if not param_groups:
        raise ValueError("the model has no trainable parameters")
    return Caffe2MomentumSGD(
        param_groups,
        lr=lr,
        momentum=float(solver.MOMENTUM),
        nesterov=bool(solver.NESTEROV),
        scale_momentum=bool(solver.SCALE_MOMENTUM),
    )


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LR the optimizer's next step uses (that of its first group)."""
    return float(optimizer.param_groups[0]["lr"])


@torch.no_grad()
def set_lr(optimizer: torch.optim.Optimizer, lr: float, *, rescale: bool = True) -> float:
    """Apply a new LR with the original's semantics (``UpdateWorkspaceLr`` / ``_SetNewLr``).

    If ``lr`` differs from the current one: with ``scale_momentum`` (``SOLVER.SCALE_MOMENTUM``)
    and ``|lr - old| > 1e-7 * lr``, every momentum buffer is multiplied by ``lr / old`` (the
    original's ``_CorrectMomentum``, a float32 ``Scale``); then the LR is set. Returns the
    correction applied (1.0 if none). ``rescale=False`` sets the LR without touching the buffers,
    as the original does when it loads a file (``model.current_lr = prev_lr``).

    For optimizers other than :class:`Caffe2MomentumSGD` only the LR is set.
    """
    new_lr = _f32(lr)
    if not new_lr > 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    correction = 1.0
    for group in optimizer.param_groups:
        old_lr = float(group["lr"])
        if new_lr == old_lr:
            continue
        if (
            rescale
            and group.get("scale_momentum", False)
            and abs(new_lr - old_lr) > abs(1e-7 * new_lr)
        ):
            if not old_lr > 0:
                raise ValueError(f"cannot rescale momentum from a learning rate of {old_lr}")
            correction = _f32(new_lr / old_lr)
            bufs = [
                optimizer.state[p]["momentum_buffer"]
                for p in group["params"]
                if "momentum_buffer" in optimizer.state.get(p, {})
            ]
            if bufs:
                torch._foreach_mul_(bufs, correction)
        group["lr"] = new_lr
    if correction != 1.0 and not 0.9 <= correction <= 1.1:
        logger.info("Scaling update history by %.6f (new/old lr)", correction)
    return correction


def _named_params(optimizer: torch.optim.Optimizer):
    for group in optimizer.param_groups:
        names = group.get("blob_names")
        if names is None or len(names) != len(group["params"]):
            raise ValueError(
                "the optimizer's groups carry no blob names; build it with build_optimizer()"
            )
        yield from zip(names, group["params"])


def caffe2_momentum_blobs(optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """The momentum buffers as the original's checkpoint blobs ``<param>_momentum`` (float32,
    the parameter's shape, Caffe2's convention with the LR inside; zeros for a parameter that
    has not been updated yet, as the original's zero-filled buffers). Add ``lr`` =
    :func:`current_lr` and ``model_iter`` to make a full checkpoint."""
    blobs: dict[str, np.ndarray] = {}
    for blob, param in _named_params(optimizer):
        buf = optimizer.state.get(param, {}).get("momentum_buffer")
        if buf is None:
            value = np.zeros(tuple(param.shape), dtype=np.float32)
        else:
            value = buf.detach().to("cpu", torch.float32).numpy().copy()
        blobs[blob + MOMENTUM_SUFFIX] = np.ascontiguousarray(value)
    return blobs


@torch.no_grad()
def load_caffe2_momentum(
    optimizer: torch.optim.Optimizer, blobs: Mapping[str, Any], *, use_lr: bool = True
) -> list[str]:
    """Load ``<param>_momentum`` blobs (a resumed Caffe2 checkpoint) into the buffers, with the
    original loader's rules: a missing blob keeps a zero buffer (and is returned in the list of
    names not found); a ``pred`` blob of another element count is skipped, one of the same count
    reshaped; any other shape mismatch is a ``ValueError``. With ``use_lr`` and an ``lr`` blob,
    the current LR becomes that value without rescaling (the original's
    ``model.current_lr = prev_lr``), so the next :func:`set_lr` rescales from it."""
    missing = []
    for blob, param in _named_params(optimizer):
        name = blob + MOMENTUM_SUFFIX
        state = optimizer.state[param]
        if name not in blobs:
            missing.append(name)
            state["momentum_buffer"] = torch.zeros_like(param)
            continue
        value = np.asarray(blobs[name])
        if value.shape != tuple(param.shape):
            if "pred" in name and value.size != param.numel():
                logger.info("%s found but unmatching (not loaded)", name)
                missing.append(name)
                state["momentum_buffer"] = torch.zeros_like(param)
                continue
            if "pred" in name:
                value = value.reshape(tuple(param.shape))
            else:
                raise ValueError(
                    f"{name}: shape {value.shape} does not match the parameter's "
                    f"{tuple(param.shape)}"
                )
        state["momentum_buffer"] = torch.as_tensor(
            np.array(value, dtype=np.float32), device=param.device
        ).to(param.dtype)
    if use_lr and "lr" in blobs:
        set_lr(
            optimizer,
            float(np.asarray(blobs["lr"], dtype=np.float64).reshape(-1)[0]),
            rescale=False,
        )
    for name in missing:
        logger.info("%s not found", name)
    return missing


@torch.no_grad()
def nonfinite_state(optimizer: torch.optim.Optimizer) -> list[str]:
    """The blob names of the parameters and ``<param>_momentum`` buffers that hold a NaN or an
    infinity (empty when all are finite): what the trainer checks after every update, so a
    non-finite update stops the run before anything is written. One max-abs reduction per
    tensor on its device and one transfer, cheap next to a forward and backward pass."""
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    for blob, param in _named_params(optimizer):
        names.append(blob)
        tensors.append(param)
        buf = optimizer.state.get(param, {}).get("momentum_buffer")
        if buf is not None:
            names.append(blob + MOMENTUM_SUFFIX)
            tensors.append(buf)
    if not tensors:
        return []
    peaks = torch.stack([n.float() for n in torch._foreach_norm(tensors, float("inf"))])
    bad = (~torch.isfinite(peaks)).nonzero().flatten().tolist()
    return [names[i] for i in bad]
