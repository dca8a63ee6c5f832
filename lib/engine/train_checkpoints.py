"""Training checkpoints: the project's ``.pt`` (with the training state) and the original's
``c2_model_iter<N>.pkl``, the run lock, the input checks and the resume checks.

Layout of ``--output-dir``::

    checkpoints.lock              the trainer that writes the checkpoints (pid, host, start;
                                  :func:`..utils.lock.output_lock`, as every writer)
    checkpoints/model_iter<N>.pt  weights + config + meta (what ``nl.load_model`` reads) and
                                  ``train``: optimizer state, iteration, RNG states, data
                                  position, list digests, run settings
    checkpoints/c2_model_iter<N>.pkl  the original's layout: ``{'blobs': ...}``, protocol 2,
                                  params and running statistics, ``<param>_momentum``, ``lr``
                                  (0-d float32), ``model_iter`` (int)

``N`` is the number of finished iterations (the original's ``curr_iter + 1``). The ``.pkl`` is
written before the ``.pt``; both atomically, so the newest ``.pt`` marks the newest complete
checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.weights_file import FORMAT, WeightsFileError, weights_payload
from ..utils.io import OutputError, atomic_write
from ..utils.lock import LockError, lock_path, output_lock

__all__ = [
    "RunLockedError",
    "check_inputs_not_checkpoints",
    "checkpoint_dir",
    "config_differences",
    "find_latest_checkpoint",
    "load_training_checkpoint",
    "pkl_path",
    "pt_path",
    "run_lock",
    "run_lock_path",
    "save_training_checkpoint",
]

_PT_RE = re.compile(r"^model_iter(\d+)\.pt$")
_CHECKPOINT_RE = re.compile(r"^(?:c2_)?model_iter\d+\.(?:pt|pkl)$")

RunLockedError = LockError  # another trainer holds the output directory's checkpoints


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def pt_path(output_dir: str | os.PathLike, iteration: int) -> Path:
    return checkpoint_dir(output_dir) / f"model_iter{iteration}.pt"


def pkl_path(output_dir: str | os.PathLike, iteration: int) -> Path:
    return checkpoint_dir(output_dir) / f"c2_model_iter{iteration}.pkl"


def run_lock_path(output_dir: str | os.PathLike) -> Path:
    """The lock file of a run's checkpoints: ``OUTPUT_DIR/checkpoints.lock``."""
    return Path(lock_path(checkpoint_dir(output_dir)))


@contextlib.contextmanager
def run_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of ``output_dir``'s checkpoints for the block (:func:`.output_lock`, the
    one lock of every writer): a second trainer gets :class:`RunLockedError` naming the holder;
    the lock of a trainer that no longer runs is taken over with a warning."""
    with output_lock(checkpoint_dir(output_dir)):
        yield


def check_inputs_not_checkpoints(
    output_dir: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]
) -> None:
    """Refuse an ``output_dir`` whose checkpoints could replace an input: a file of ``inputs``
    (``{option: path}``, e.g. the lists and ``TRAIN.PARAMS_FILE``) with a checkpoint name
    (``model_iter<N>.pt``, ``c2_model_iter<N>.pkl``) in ``output_dir/checkpoints``, named
    directly or through a link. Raises :class:`..utils.io.OutputError`."""
    folder = os.path.realpath(checkpoint_dir(output_dir))
    for option, path in inputs.items():
        if not path:
            continue
        for form in (os.path.abspath(path), os.path.realpath(path)):
            in_folder = os.path.realpath(os.path.dirname(form)) == folder
            if in_folder and _CHECKPOINT_RE.match(os.path.basename(form)):
                raise OutputError(
                    f"{option} {os.fspath(path)} is a checkpoint name in "
                    f"{checkpoint_dir(output_dir)}, where this run writes its checkpoints; "
                    f"copy it elsewhere or choose another --output-dir"
                )


def save_training_checkpoint(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    cfg: Any,
    meta: Mapping[str, Any],
    train_state: Mapping[str, Any],
) -> None:
    """Write the ``.pt`` atomically: the converted-checkpoint format plus ``train``."""
    payload = weights_payload(state_dict, cfg, meta)
    payload["train"] = dict(train_state)
    with atomic_write(path) as f:
        torch.save(payload, f)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The ``.pt`` with the largest iteration in ``output_dir/checkpoints`` (temporary files of
    an interrupted write are ignored), or ``None``."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _PT_RE.match(p.name))]
    return max(found)[1] if found else None


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training ``.pt`` (``weights_only``) and check it has the training state."""
    path = os.fspath(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsFileError(f"{path}: cannot read the training checkpoint ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or "train" not in data:
        raise WeightsFileError(f"{path}: not a vnl-train checkpoint (no training state)")
    return data


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``KEY: old -> new`` for every config key whose value differs."""
    a, b = _flatten(old), _flatten(new)
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
