"""Random Caffe2 checkpoint blobs with realistic statistics, for a blob inventory.

Used to exercise the reference executor (and, later, parity against the PyTorch model) without
the released files: conv weights at He scale so activations neither vanish nor explode over 16+
blocks, positive running variances that do not match any batch statistics, non-zero running
means, and non-zero non-local BN/affine gammas so the non-local branches contribute.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def make_blobs(
    inventory: Iterable[tuple[str, tuple[int, ...]]], seed: int = 0, dtype=np.float32
) -> dict[str, np.ndarray]:
    """``name -> array`` for every ``(name, shape)`` of ``inventory`` (float32 like the
    released files)."""
    rng = np.random.default_rng(seed)
    blobs: dict[str, np.ndarray] = {}
    for name, shape in inventory:
        nonlocal_ = name.startswith("nonlocal_conv")
        if name.endswith("_riv"):
            value = rng.uniform(0.5, 2.0, shape)
        elif name.endswith("_rm"):
            value = rng.normal(0.0, 0.2, shape)
        elif name.endswith("_bn_s"):
            # the last BN of a residual branch is kept small so the sum stays O(1)
            low, high = (0.1, 0.3) if nonlocal_ or "branch2c" in name else (0.5, 1.5)
            value = rng.uniform(low, high, shape)
        elif name.endswith("_bn_b"):
            value = rng.normal(0.0, 0.1, shape)
        elif name.endswith("_b"):  # conv / FC biases
            value = rng.normal(0.0, 0.05, shape)
        elif name == "pred_w":  # the original's FC init scale: logits of a few units
            value = rng.normal(0.0, 0.01, shape)
        else:  # conv weights: He scale on the fan-in (half for the non-local output conv,
            # which affine models do not follow with a normalisation)
            fan_in = math.prod(shape[1:])
            gain = 0.2 if name.endswith("_out_w") else 1.0
            value = rng.normal(0.0, gain * math.sqrt(2.0 / fan_in), shape)
        blobs[name] = value.astype(dtype)
    return blobs
