"""Continuing a run: which checkpoint, whether it may be continued, and reading it.

The original's rule (``lib/utils/checkpoints.py``, ``load_model_from_params_file``): with
``CHECKPOINT.RESUME`` (its default, True) and a checkpoint in the checkpoint folder, training
continues from the newest one with its momentum, ``lr`` and ``model_iter``; otherwise it starts
from ``TRAIN.PARAMS_FILE`` (or the initialisers). Running the same command again therefore
continues an interrupted run, which is what a preemptible cluster needs.

Here the newest checkpoint (:func:`.train_checkpoints.find_resume_point`) is this trainer's
``.pt`` (weights, optimizer, RNG states, data position: the continuation equals an uninterrupted
run bit for bit) or the original's own ``c2_model_iter<N>.pkl`` (weights, ``<param>_momentum``,
``lr``, ``model_iter``: continued with that momentum, Caffe2's update and the original's
rescale rule, :func:`load_caffe2_checkpoint`). What the original does not do and this module
adds: a run is continued only with the settings that started it (:func:`check_resume`), no
checkpoint holding a NaN or infinite tensor is continued from, and ``CHECKPOINT.RESUME False``
in a folder that holds checkpoints is refused unless ``--start-over`` discards them
(:func:`decide_resume`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from ..converters.convert import convert_blobs
from ..converters.reader import read_caffe2_pkl
from ..core.config import cfg_to_dict
from ..utils.log import terminal_safe
from ..utils.numeric import check_finite
from . import solver
from .train_checkpoints import (
    ResumePoint,
    config_differences,
    find_resume_point,
    list_checkpoints,
)
from .train_errors import NonFiniteError, TrainingError

__all__ = [
    "RESUME_EXEMPT_KEYS",
    "SETTING_NAMES",
    "check_resume",
    "checkpoint_problems",
    "decide_resume",
    "load_caffe2_checkpoint",
    "refuse_nonfinite",
    "run_settings",
    "training_checkpoint_problems",
]

logger = logging.getLogger(__name__)

# Config keys that do not change what a run computes: a resume may change them.
RESUME_EXEMPT_KEYS = ("CHECKPOINT.RESUME", "CHECKPOINT.DIR", "LOG_PERIOD")

# The run settings recorded in every .pt and how the message names them; each changes the
# numbers a run computes (another BN batch, another decoder's pixels, another arithmetic).
SETTING_NAMES = {
    "world_size": "number of processes",
    "accumulate": "--accumulate",
    "precision": "--precision",
    "backend": "--backend",
    "data_root": "--data-root",
    "device_type": "device",
}


def run_settings(
    *,
    world_size: int,
    accumulate: int,
    precision: str,
    backend: str,
    data_root: str | None,
    device: torch.device,
) -> dict[str, Any]:
    """The settings of :data:`SETTING_NAMES` as a run records them in its checkpoints."""
    return {
        "world_size": int(world_size),
        "accumulate": int(accumulate),
        "precision": str(precision),
        "backend": str(backend),
        "data_root": os.path.abspath(data_root) if data_root else "",
        "device_type": torch.device(device).type,
    }


def decide_resume(output_dir: str, *, resume: bool, start_over: bool) -> ResumePoint | None:
    """What a run in ``output_dir`` continues from: the newest checkpoint when ``resume``
    (``CHECKPOINT.RESUME`` or ``--resume``), ``None`` for a new run. Checkpoints present with
    neither ``resume`` nor ``start_over`` are refused; with ``start_over`` the caller deletes
    them before the first iteration (:func:`.train_checkpoints.remove_checkpoints`)."""
    if resume and start_over:
        raise TrainingError("--start-over and --resume contradict each other: pass one of them")
    point = find_resume_point(output_dir)
    if start_over:
        found = list_checkpoints(output_dir)
        if found:
            logger.warning(
                "--start-over: the %d checkpoint file(s) in %s will be deleted before the first "
                "iteration",
                len(found),
                os.path.join(output_dir, "checkpoints"),
            )
        return None
    if point is None:
        return None
    if not resume:
        raise TrainingError(
            f"{output_dir} already holds checkpoints (newest {os.path.basename(point.path)}) "
            f"and CHECKPOINT.RESUME is False: pass --start-over to delete them and start a new "
            f"run, --resume to continue that run, or choose another --output-dir"
        )
    return point


def _shown(differences: list[str]) -> str:
    return "; ".join(differences[:6]) + (
        f"; ... ({len(differences)} in all)" if len(differences) > 6 else ""
    )


def check_resume(
    data: Mapping[str, Any],
    cfg: Any,
    lists: Mapping[str, str],
    settings: Mapping[str, Any],
    path: str | os.PathLike,
) -> None:
    """Refuse to continue the ``.pt`` ``data`` with another config (keys other than
    :data:`RESUME_EXEMPT_KEYS`), other list contents or other run settings, naming each."""
    differences = [
        d
        for d in config_differences(data["cfg"], cfg_to_dict(cfg))
        if not d.startswith(tuple(k + ":" for k in RESUME_EXEMPT_KEYS))
    ]
    old_lists = data["train"].get("lists", {})
    for name in ("train", "val"):
        if old_lists.get(name, "") != lists.get(name, ""):
            differences.append(f"--{name}-list (file content differs: sha256)")
    for key, label in SETTING_NAMES.items():
        if key in data["train"] and data["train"][key] != settings.get(key):
            old, new = data["train"][key], settings.get(key)
            differences.append(f"{label}: {terminal_safe(old)!s} -> {terminal_safe(new)!s}")
    if differences:
        raise TrainingError(
            f"cannot resume from {path}: the run was started with other settings "
            f"({_shown(differences)}); run it with those, or pass --start-over or another "
            f"--output-dir for a new run"
        )


def _variance(name: str) -> bool:
    return name.endswith(("running_var", "_riv"))


def checkpoint_problems(named: Iterable[tuple[str, Any]]) -> list[str]:
    """One line per tensor of ``named`` with NaN/Inf values or (a variance) negative ones."""
    return check_finite(named, negative_ok=lambda name: not _variance(name))


def refuse_nonfinite(problems: list[str], what: str) -> None:
    """Raise :class:`NonFiniteError` ``"<what>: ..."`` listing ``problems`` (if any)."""
    if problems:
        raise NonFiniteError(
            f"{what}: {len(problems)} tensors hold non-finite values or negative variances "
            f"({_shown([terminal_safe(p) for p in problems])})"
        )


def training_checkpoint_problems(data: Mapping[str, Any]) -> list[str]:
    """:func:`checkpoint_problems` of a ``.pt``: weights, statistics, momentum buffers, LR."""
    named: list[tuple[str, Any]] = list(data["state_dict"].items())
    optimizer = data["train"].get("optimizer", {})
    names: dict[int, str] = {}
    for group in optimizer.get("param_groups", []):
        names.update(zip(group.get("params", []), group.get("blob_names", [])))
    for index, state in optimizer.get("state", {}).items():
        buf = state.get("momentum_buffer") if isinstance(state, Mapping) else None
        if isinstance(buf, torch.Tensor):
            named.append((f"{names.get(index, f'parameter {index}')}{solver.MOMENTUM_SUFFIX}", buf))
    named.append(("lr", np.float64(data["train"].get("last_lr", 0.0))))
    return checkpoint_problems(named)


def load_caffe2_checkpoint(
    point: ResumePoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any
) -> tuple[int, float]:
    """Continue the original's ``c2_model_iter<N>.pkl`` as its loader does with
    ``load_momentum`` (``initialize_master_gpu_model_params``): every parameter and BN
    statistic (exact shapes, the whole network), ``<param>_momentum`` into the Caffe2 buffers (a
    missing one stays zero and is logged "not found"), ``lr`` as the current LR without
    rescaling (``model.current_lr = prev_lr``: the first iteration's ``set_lr`` then rescales
    the momentum by ``lr_N / lr`` under ``SOLVER.SCALE_MOMENTUM``), and ``model_iter`` as the
    start iteration. Returns ``(model_iter, lr)``."""
    path = point.path
    ckpt = read_caffe2_pkl(path, load_momentum=True)
    logger.info("%s: %s", path, ckpt.describe())
    if ckpt.lr is None:
        raise TrainingError(
            f"cannot resume from {path}: it has no lr blob (the original's loader refuses such a "
            f"file too: 'No lr blob found.')"
        )
    if ckpt.model_iter is None:
        raise TrainingError(
            f"cannot resume from {path}: it has no model_iter, so the iteration to continue "
            f"from is unknown; move it out of the checkpoints folder (use it as "
            f"TRAIN.PARAMS_FILE) or pass --start-over"
        )
    refuse_nonfinite(
        checkpoint_problems(
            [*ckpt.blobs.items(), *ckpt.momentum.items(), ("lr", np.float64(ckpt.lr))]
        ),
        f"cannot resume from {path}",
    )
    if ckpt.model_iter != point.iteration:
        logger.warning(
            "%s holds model_iter %d: continuing from there, as the original does",
            path,
            ckpt.model_iter,
        )
    result = convert_blobs(ckpt.entries(), cfg, source=path)
    state = model.state_dict()
    if set(result.state_dict) != set(state):
        missing = sorted(set(state) - set(result.state_dict))
        raise TrainingError(
            f"cannot resume from {path}: it does not hold the whole network "
            f"({len(missing)} tensors missing, e.g. {', '.join(missing[:4])})"
        )
    with torch.no_grad():
        for key, value in result.state_dict.items():
            state[key].copy_(value.reshape(state[key].shape))
    solver.load_caffe2_momentum(optimizer, {**ckpt.momentum, "lr": ckpt.lr})
    logger.info(
        "resumed from %s (the original's checkpoint format) at iteration %d, lr %.8g",
        path,
        ckpt.model_iter,
        ckpt.lr,
    )
    return int(ckpt.model_iter), float(np.float32(ckpt.lr))
