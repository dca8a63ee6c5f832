"""Training checkpoints: the project's ``.pt`` (with the training state) and the original's
``c2_model_iter<N>.pkl``, the run lock, and the resume checks.

Layout of ``--output-dir``::

    .vnl-train.lock               pid of the trainer that owns the directory
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.weights_file import FORMAT, WeightsFileError, weights_payload
from ..utils.io import atomic_write

__all__ = [
    "LOCK_NAME",
    "RunLock",
    "RunLockedError",
    "checkpoint_dir",
    "config_differences",
    "find_latest_checkpoint",
    "load_training_checkpoint",
    "pkl_path",
    "pt_path",
    "save_training_checkpoint",
]

LOCK_NAME = ".vnl-train.lock"
_PT_RE = re.compile(r"^model_iter(\d+)\.pt$")


class RunLockedError(RuntimeError):
    """Another trainer holds the output directory."""


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def pt_path(output_dir: str | os.PathLike, iteration: int) -> Path:
    return checkpoint_dir(output_dir) / f"model_iter{iteration}.pt"


def pkl_path(output_dir: str | os.PathLike, iteration: int) -> Path:
    return checkpoint_dir(output_dir) / f"c2_model_iter{iteration}.pkl"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An ``O_EXCL`` lock file holding the owner's pid. A lock whose pid no longer runs (a
    killed trainer) is taken over with a warning by the caller; a live one is refused."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False
        self.stale_pid: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid > 0 and pid != os.getpid() and _pid_alive(pid):
                    raise RunLockedError(
                        f"{self.path.parent}: another trainer (pid {pid}) is writing this "
                        f"output directory (lock file {self.path})"
                    ) from None
                self.stale_pid = pid
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise RunLockedError(f"{self.path}: could not take the lock file")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


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
