"""The one default-device rule of every command: CUDA when available, else the CPU.

Evaluation, extraction, prediction and training all pick their device here (a process started
by ``torchrun`` takes the GPU of its ``LOCAL_RANK``), so ``--device`` means the same on every
command line.
"""

from __future__ import annotations

import torch

__all__ = ["default_device"]


def default_device(
    requested: str | torch.device | None = None, local_rank: int = 0
) -> torch.device:
    """The device a run uses: ``requested`` (``None``/``"auto"``: ``cuda`` when available, else
    ``cpu``); a CUDA device without an index is this process's GPU, ``cuda:<local_rank>``."""
    if requested is None or requested == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device
