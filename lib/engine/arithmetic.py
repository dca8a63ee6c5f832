"""The arithmetic of a training run: fp32 as the original's, or bf16 autocast.

The original trains in float32 with cuDNN (no TensorFloat-32 on its GPUs). PyTorch on Ampere and
newer GPUs runs convolutions in TF32 by default (``torch.backends.cudnn.allow_tf32 = True``), a
10-bit mantissa: ``--precision fp32`` turns TF32 off for convolutions and matrix products for the
run (and restores the previous flags after it), so fp32 means fp32. ``--precision bf16`` keeps its
autocast path: forward passes under ``torch.autocast("cuda", dtype=torch.bfloat16)`` (convs and
matmuls in bf16, the loss in fp32); the flags are left as they are for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["run_arithmetic", "tf32_flags"]


def tf32_flags() -> dict[str, bool | str]:
    """The settings that decide whether CUDA convs and matmuls use TF32."""
    return {
        "cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def _apply(flags: dict[str, bool | str]) -> None:
    # the precision first: setting it also sets cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision(str(flags["float32_matmul_precision"]))
    torch.backends.cudnn.allow_tf32 = bool(flags["cudnn.allow_tf32"])
    torch.backends.cuda.matmul.allow_tf32 = bool(flags["cuda.matmul.allow_tf32"])


@contextlib.contextmanager
def run_arithmetic(precision: str, device: torch.device) -> Iterator[None]:
    """For the block: TF32 off when ``precision`` is ``fp32`` on a CUDA ``device``; nothing
    changes otherwise (CPU runs have no TF32; bf16 uses autocast)."""
    if precision != "fp32" or torch.device(device).type != "cuda":
        yield
        return
    before = tf32_flags()
    _apply(
        {
            "cudnn.allow_tf32": False,
            "cuda.matmul.allow_tf32": False,
            "float32_matmul_precision": "highest",
        }
    )
    try:
        yield
    finally:
        _apply(before)
