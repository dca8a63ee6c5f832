"""Random Caffe2 checkpoint blobs with realistic statistics: the one value rule of the tests.

Used for the reference executor's tests, the converter's synthetic checkpoints
(``caffe2_fixtures``) and the parity suite, without the released files:

* conv weights at He scale on the fan-in, so activations neither vanish nor explode over 16+
  blocks and the network's output depends on its input;
* positive running variances and non-zero running means that do not match any batch
  statistics (a port that normalised with batch statistics, or with ``1/riv``, would differ);
* non-zero non-local BN/affine gammas and output convs, so the non-local branches contribute
  (about 10% of their block's output in norm);
* theta/phi at half the He scale: the attention depends on the content (a position typically
  gives 4-17% of its weight to its best match, 30-100x the uniform ``1/M``) without saturating;
* a classifier at the original's FC init scale (logits of a few units, an unsaturated softmax).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = ["blob_value", "make_blobs"]


def blob_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A float64 random value for the Caffe2 blob ``name`` of ``shape``."""
    nonlocal_ = name.startswith("nonlocal_conv")
    if name.endswith("_riv"):
        return rng.uniform(0.5, 2.0, shape)
    if name.endswith("_rm"):
        return rng.normal(0.0, 0.2, shape)
    if name.endswith("_bn_s"):
        # the last BN of a residual branch is kept small so the sum stays O(1)
        low, high = (0.1, 0.3) if nonlocal_ or "branch2c" in name else (0.5, 1.5)
        return rng.uniform(low, high, shape)
    if name.endswith("_bn_b"):
        return rng.normal(0.0, 0.1, shape)
    if name.endswith("_b"):  # conv / FC biases
        return rng.normal(0.0, 0.05, shape)
    if name == "pred_w":  # the original's FC init scale: logits of a few units
        return rng.normal(0.0, 0.01, shape)
    # conv weights: He scale on the fan-in; half for theta/phi (unsaturated attention); 0.2 for
    # the non-local output conv, which affine models do not follow with a normalisation
    fan_in = math.prod(shape[1:])
    gain = 0.2 if name.endswith("_out_w") else 0.5 if name.endswith(("_theta_w", "_phi_w")) else 1
    return rng.normal(0.0, gain * math.sqrt(2.0 / fan_in), shape)


def make_blobs(
    inventory: Iterable[tuple[str, tuple[int, ...]]],
    seed: int | np.random.Generator = 0,
    dtype=np.float32,
) -> dict[str, np.ndarray]:
    """``name -> array`` for every ``(name, shape)`` of ``inventory`` (float32 like the
    released files); ``seed`` is a seed or a generator to draw from."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return {name: blob_value(name, shape, rng).astype(dtype) for name, shape in inventory}
