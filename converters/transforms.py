"""The two weight transformations of the original: BN folding and 2-D -> 3-D inflation.

Both compute in float32, in the original's order of operations, so that the results are bit for
bit those of the original's scripts (IEEE float32 arithmetic is the same in numpy 1.x and 2.x).
"""

from __future__ import annotations

import numpy as np

__all__ = ["FOLD_EPSILON", "fold_bn", "inflate_weight"]

# The conversion script's epsilon, exactly 1e-5 (the network's BN uses 1.0000001e-5).
FOLD_EPSILON = np.float32(1e-5)


def fold_bn(
    scale: np.ndarray, bias: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fold a test-mode BN into a per-channel affine ``y = x * scale' + bias'``, as the
    original's ``convert_to_finetune.py`` does::

        std    = sqrt(running_var + 1e-5)
        scale' = scale / std
        bias'  = bias - running_mean * scale / std

    ``running_var`` is the ``_riv`` blob, a variance.
    """
    s, b, rm, riv = (
        np.asarray(a, dtype=np.float32) for a in (scale, bias, running_mean, running_var)
    )
    std = np.sqrt(riv + FOLD_EPSILON)
    new_scale = s / std
    new_bias = b - rm * s / std
    return new_scale.astype(np.float32, copy=False), new_bias.astype(np.float32, copy=False)


def inflate_weight(weight_2d: np.ndarray, kt: int) -> np.ndarray:
    """Inflate a 2-D conv weight ``(Cout, Cin, kh, kw)`` to ``(Cout, Cin, kt, kh, kw)`` by the
    original's rule: ``kt`` copies stacked along time, divided by ``kt``, so that a temporally
    constant input gives the 2-D filter's response."""
    if weight_2d.ndim != 4:
        raise ValueError(f"expected a 4-D weight, got shape {weight_2d.shape}")
    if kt < 1:
        raise ValueError(f"temporal kernel size must be >= 1, got {kt}")
    w = np.asarray(weight_2d, dtype=np.float32)
    return (np.stack([w] * kt, axis=2) / np.float32(kt)).astype(np.float32, copy=False)
