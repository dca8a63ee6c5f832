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

``N`` is the number of finished iterations (the original's ``curr_iter + 1``). The ``.pt`` is
written before the ``.pkl``, both atomically: a ``c2_model_iter<N>.pkl`` without its
``model_iter<N>.pt`` was therefore not written by this trainer (the original's, or one copied in)
and :func:`find_resume_point` continues from it as the original would; a ``.pt`` whose ``.pkl``
is missing (a kill between the two writes) is complete and its ``.pkl`` is written again on
resume.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.weights_file import (
    FORMAT,
    WeightsFileError,
    _first_safe_line,
    _refused_global,
    weights_payload,
)
from ..utils.io import OutputError, atomic_write, remove_stale_temporaries
from ..utils.lock import LockError, lock_path, output_lock

__all__ = [
    "ResumePoint",
    "RunLockedError",
    "check_inputs_not_checkpoints",
    "checkpoint_dir",
    "config_differences",
    "find_latest_checkpoint",
    "find_resume_point",
    "list_checkpoints",
    "load_training_checkpoint",
    "pkl_path",
    "pt_path",
    "remove_checkpoints",
    "remove_stale_checkpoint_temporaries",
    "run_lock",
    "run_lock_path",
    "save_training_checkpoint",
]

_PT_RE = re.compile(r"^model_iter(\d+)\.pt$")
_PKL_RE = re.compile(r"^c2_model_iter(\d+)\.pkl$")
# a temporary of an interrupted checkpoint write (utils.io.temporary_sibling's name)
_CHECKPOINT_TMP_RE = re.compile(r"^\.(?:c2_)?model_iter\d+\.(?:pt|pkl)\.\d+-[0-9a-f]{12}\.tmp$")
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


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from: this trainer's ``.pt`` (full training state) or a
    ``c2_model_iter<N>.pkl`` it did not write (weights, momentum, ``lr``, ``model_iter``)."""

    path: str
    iteration: int  # from the file name; the file's own counter is checked when it is read

    @property
    def is_caffe2(self) -> bool:
        return self.path.endswith(".pkl")


def _numbered(folder: Path, pattern: re.Pattern) -> dict[int, Path]:
    return {int(m.group(1)): p for p in folder.iterdir() if (m := pattern.match(p.name))}


def find_resume_point(output_dir: str | os.PathLike) -> ResumePoint | None:
    """The newest checkpoint of ``output_dir/checkpoints`` (the original's
    ``get_checkpoint_resume_file``, extended to the ``.pt``): the ``.pt`` with the largest
    iteration, unless a ``c2_model_iter<N>.pkl`` of a larger iteration has no ``.pt`` (then that
    ``.pkl``, written by the original or copied in). ``None`` if there is no checkpoint."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return None
    pts, pkls = _numbered(folder, _PT_RE), _numbered(folder, _PKL_RE)
    newest_pt = max(pts, default=-1)
    foreign = [n for n in pkls if n not in pts and n > newest_pt]
    if foreign:
        n = max(foreign)
        return ResumePoint(os.fspath(pkls[n]), n)
    if newest_pt >= 0:
        return ResumePoint(os.fspath(pts[newest_pt]), newest_pt)
    return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint file of ``output_dir/checkpoints`` (``model_iter<N>.pt``,
    ``c2_model_iter<N>.pkl``) and every temporary of an interrupted checkpoint write, sorted."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if _CHECKPOINT_RE.match(p.name) or _CHECKPOINT_TMP_RE.match(p.name)
    )


def remove_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete :func:`list_checkpoints` (``--start-over``; the caller holds the run lock and has
    checked that no input is among them). Other files in the folder are left alone."""
    removed = list_checkpoints(output_dir)
    for path in removed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return removed


def remove_stale_checkpoint_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove the temporaries that a killed write of the checkpoint ``path`` left (their
    process is gone), before this run writes ``path`` again."""
    return remove_stale_temporaries(path)


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
    except Exception as e:  # torch raises many types; its advice to drop weights_only is not ours
        refused = _refused_global(str(e)) or ""
        if refused.startswith("the global"):
            detail = f"it references {refused}"
        else:
            detail = refused or _first_safe_line(str(e))
        detail = detail or "damaged, or it holds objects other than tensors"
        raise WeightsFileError(
            f"{path}: cannot read the training checkpoint ({type(e).__name__}: {detail}); "
            f"nothing from it was executed"
        ) from None
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
