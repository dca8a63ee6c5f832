"""Random Caffe2 checkpoint blobs with realistic statistics for the tests.

Names and shapes come from the caller (the tests use ``blob_inventory``, derived from the
specification alone); the values from the package's one rule,
:func:`nonlocal_net.converters.synthetic.synthetic_blob`. Used by the reference executor's
tests, the converter's synthetic checkpoints (``caffe2_fixtures``) and the parity suite.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from nonlocal_net.converters.synthetic import synthetic_blob

__all__ = ["make_blobs"]


def make_blobs(
    inventory: Iterable[tuple[str, tuple[int, ...]]],
    seed: int | np.random.Generator = 0,
    dtype=np.float32,
) -> dict[str, np.ndarray]:
    """``name -> array`` for every ``(name, shape)`` of ``inventory`` (float32 like the
    released files); ``seed`` is a seed or a generator to draw from."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return {name: synthetic_blob(name, shape, rng).astype(dtype) for name, shape in inventory}
