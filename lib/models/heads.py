"""Classifier heads: the ``pred`` layer of the ``train``/``val`` nets and of the ``test`` net.

The original saves ``pred_w`` from the training net as an FC weight ``(K, 2048)``; the test net
holds it as a 1x1x1 conv weight ``(K, 2048, 1, 1, 1)`` and the loader reshapes any ``pred`` blob
of equal element count. Both layers here do the same on ``load_state_dict``, so one state_dict
serves every split.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PredConv", "PredLinear", "fully_conv_softmax"]


def _reshape_pred_weight(module: nn.Module, state_dict: dict, prefix: str) -> None:
    key = prefix + "weight"
    tensor = state_dict.get(key)
    if tensor is None or not isinstance(tensor, torch.Tensor):
        return
    target = module.weight.shape
    if tensor.shape != target and tensor.numel() == module.weight.numel():
        state_dict[key] = tensor.reshape(target)


class PredLinear(nn.Linear):
    """FC ``pred`` (``train``/``val`` split): Gaussian(``MODEL.FC_INIT_STD``) weight, zero bias.
    Also loads a ``(K, 2048, 1, 1, 1)`` test-net weight."""

    def __init__(self, dim_in: int, num_classes: int, init_std: float = 0.01) -> None:
        super().__init__(dim_in, num_classes)
        nn.init.normal_(self.weight, std=init_std)
        nn.init.zeros_(self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _reshape_pred_weight(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PredConv(nn.Conv3d):
    """1x1x1 conv ``pred`` of the ``test`` net, with Caffe2's default ``XavierFill``
    (uniform, ``+-sqrt(3 / fan_in)``) and a zero bias. Also loads an FC weight ``(K, 2048)``."""

    def __init__(self, dim_in: int, num_classes: int) -> None:
        super().__init__(dim_in, num_classes, 1)
        bound = math.sqrt(3.0 / dim_in)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _reshape_pred_weight(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def fully_conv_softmax(logits: torch.Tensor) -> torch.Tensor:
    """The original's fully-convolutional test head after the ``pred`` conv.

    ``logits`` is ``(B, K, T', H', W')``; the result ``(B, K)`` is the softmax over classes taken
    at every position, then averaged over all positions (the original's ``softmax`` blob).
    """
    return F.softmax(logits, dim=1).mean(dim=(2, 3, 4))
