"""Non-finite numbers are errors or loud warnings, never results.

:func:`nonfinite_counts` counts NaN/+Inf/-Inf in an array; :func:`check_finite` turns the counts
of many named arrays into one message per offending array. The converter refuses such weights by
default (``--allow-nonfinite`` writes them anyway, with a warning), the evaluator counts a view
with a non-finite score as a failed view, and the trainer can call the same helpers on its loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["check_finite", "finite_rows", "nonfinite_counts"]


def _numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch.Tensor without importing torch here
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def nonfinite_counts(array: Any) -> tuple[int, int, int]:
    """``(nan, +inf, -inf)`` counts of a numeric array or tensor (zeros for integer dtypes)."""
    a = _numpy(array)
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.complexfloating):
        return 0, 0, 0
    if np.isfinite(a).all():
        return 0, 0, 0
    return int(np.isnan(a).sum()), int(np.isposinf(a).sum()), int(np.isneginf(a).sum())


def check_finite(named: Iterable[tuple[str, Any]], negative_ok=lambda name: True) -> list[str]:
    """One problem line per array of ``named`` with NaN/Inf values (and, where
    ``negative_ok(name)`` is False, negative values, e.g. BN variances); empty when all is
    well."""
    problems = []
    for name, array in named:
        nan, pinf, ninf = nonfinite_counts(array)
        parts = [f"{n} {label}" for n, label in ((nan, "NaN"), (pinf, "+Inf"), (ninf, "-Inf")) if n]
        if not negative_ok(name):
            a = _numpy(array)
            negative = int((a < 0).sum())
            if negative:
                parts.append(f"{negative} negative (a variance must be >= 0)")
        if parts:
            problems.append(f"{name}: {', '.join(parts)} of {_numpy(array).size} values")
    return problems


def finite_rows(scores: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of a 2-D score array whose values are all finite."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {scores.shape}")
    return np.isfinite(scores).all(axis=1)
