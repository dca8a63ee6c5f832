"""Learning-rate policies, as in the original's ``lib/utils/lr_policy.py``.

The schedule is a function of the 0-based iteration index ``it``; the trainer sets the LR from
it at the *start* of every iteration (the original's ``UpdateWorkspaceLr(curr_iter)``). All
released configs use ``steps_with_relative_lrs``: with ``SOLVER.STEPS = [0, s1, s1+s2, ...]``
(derived from ``SOLVER.STEP_SIZES``), the LR of iteration ``it`` is
``BASE_LR * LRS[k]`` where ``k`` is the index of the last step ``<= it`` (for the 8-GPU 400k
configs: 0.01 on ``[0, 150000)``, 0.001 on ``[150000, 300000)``, 1e-4 on ``[300000, 400000)``).

The optional linear warm-up (``SOLVER.WARMUP.WARMUP_ON``; off in every released config) replaces
the LR for ``it < WARMUP_END_ITER`` by
``it * (lr(WARMUP_END_ITER) - WARMUP_START_LR) / (WARMUP_END_ITER - 1) + WARMUP_START_LR``.

As in the original, the result is rounded to float32 (the value the Caffe2 ``lr`` blob holds);
the warm-up arithmetic is done in float32 too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from yacs.config import CfgNode

__all__ = [
    "LR_POLICIES",
    "get_lr_at_iter",
    "get_lr_func",
    "get_step_index",
    "lr_func_steps_with_decay",
    "lr_func_steps_with_lrs",
    "lr_func_steps_with_relative_lrs",
    "solver_steps",
]


def solver_steps(cfg: CfgNode) -> list[int]:
    """``SOLVER.STEPS`` (derived from ``SOLVER.STEP_SIZES`` when the config has not been through
    :func:`~nonlocal_net.core.config.assert_and_infer_cfg`)."""
    if cfg.SOLVER.STEPS is not None:
        return [int(s) for s in cfg.SOLVER.STEPS]
    steps = [0]
    for size in cfg.SOLVER.STEP_SIZES:
        steps.append(steps[-1] + int(size))
    return steps


def get_step_index(cfg: CfgNode, cur_iter: int) -> int:
    """The index of the schedule step that iteration ``cur_iter`` is in.

    As the original: the first iteration of ``STEPS + [MAX_ITER]`` greater than ``cur_iter``
    ends the search, and the index before it is returned (so at and after ``MAX_ITER`` the last
    entry of ``STEPS`` is used).
    """
    steps = solver_steps(cfg)
    if not steps or steps[0] != 0:
        raise ValueError(f"SOLVER.STEPS must start at 0, got {steps}")
    bounds = [*steps, int(cfg.SOLVER.MAX_ITER)]
    ind = 0
    for ind, step in enumerate(bounds):  # noqa: B007 (the index after the loop is the result)
        if cur_iter < step:
            break
    return ind - 1


def _lrs_entry(cfg: CfgNode, ind: int) -> float:
    lrs = cfg.SOLVER.LRS
    if not 0 <= ind < len(lrs):
        raise ValueError(
            f"SOLVER.LRS has {len(lrs)} entries but the schedule needs entry {ind} "
            f"(SOLVER.STEPS {solver_steps(cfg)})"
        )
    return lrs[ind]


def lr_func_steps_with_lrs(cfg: CfgNode, cur_iter: int) -> float:
    """``steps_with_lrs``: ``LRS[k]`` as absolute values."""
    return _lrs_entry(cfg, get_step_index(cfg, cur_iter))


def lr_func_steps_with_relative_lrs(cfg: CfgNode, cur_iter: int) -> float:
    """``steps_with_relative_lrs`` (every released config): ``LRS[k] * BASE_LR``."""
    return _lrs_entry(cfg, get_step_index(cfg, cur_iter)) * cfg.SOLVER.BASE_LR


def lr_func_steps_with_decay(cfg: CfgNode, cur_iter: int) -> float:
    """``steps_with_decay``: ``BASE_LR * GAMMA ** k``."""
    return cfg.SOLVER.BASE_LR * cfg.SOLVER.GAMMA ** get_step_index(cfg, cur_iter)


# The original also names a ``step`` policy, but it reads ``SOLVER.STEP_SIZE``, a key its own
# config does not define, so it cannot run there; it is not offered here either.
LR_POLICIES: dict[str, Callable[[CfgNode, int], float]] = {
    "steps_with_lrs": lr_func_steps_with_lrs,
    "steps_with_relative_lrs": lr_func_steps_with_relative_lrs,
    "steps_with_decay": lr_func_steps_with_decay,
}


def get_lr_func(cfg: CfgNode) -> Callable[[CfgNode, int], float]:
    """The policy function named by ``SOLVER.LR_POLICY``; ``ValueError`` names an unknown one."""
    policy = cfg.SOLVER.LR_POLICY
    try:
        return LR_POLICIES[policy]
    except KeyError:
        raise ValueError(
            f"unknown SOLVER.LR_POLICY {policy!r}; known policies: {', '.join(LR_POLICIES)}"
        ) from None


def get_lr_at_iter(cfg: CfgNode, it: int) -> np.float32:
    """The learning rate of 0-based iteration ``it`` (float32), warm-up included."""
    if it < 0:
        raise ValueError(f"iteration must be >= 0, got {it}")
    func = get_lr_func(cfg)
    lr = np.float32(func(cfg, it))
    warmup = cfg.SOLVER.WARMUP
    last_it = int(warmup.WARMUP_END_ITER)
    if warmup.WARMUP_ON and it < last_it:
        lr_start = np.float32(warmup.WARMUP_START_LR)
        lr_end = np.float32(func(cfg, last_it))
        if last_it > 1:
            lr = np.float32(it) * (lr_end - lr_start) / np.float32(last_it - 1) + lr_start
        else:  # only iteration 0 warms up: it starts at WARMUP_START_LR
            lr = lr_start
    return np.float32(lr)
