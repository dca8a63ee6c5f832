"""Precision modes for inference: :func:`prepare_for_inference` returns the model to run.

``strict`` (the default) is the original's arithmetic layer for layer in float32: the model in
eval mode on its device, no folding (what parity and ``vnl-verify`` prove). The other modes are
the fast path (see ``docs/performance.md``):

=========  =====================================================================================
``fp32``   BN/affine folded into the convs, SDPA non-local, channels_last_3d; on the CPU every
           conv one oneDNN primitive with the ReLUs/residual adds as post-ops
           (:func:`~nonlocal_net.models.fuse.fuse_cpu_pointwise`).
           Within 1e-5 relative of ``strict`` (float32 rounding only).
``tf32``   ``fp32`` with TF32 tensor-core matmuls/convs (CUDA only).
``bf16``   ``fp32``'s rewrites with weights cast once to bfloat16, conv1 padded to 8 input
           channels (tensor-core friendly), the classifier in float32. CUDA, or a CPU with
           bfloat16 units (avx512_bf16 / amx_bf16).
``fp16``   as ``bf16`` in float16 (CUDA only).
=========  =====================================================================================

``compile=True`` (fast path only) also runs the backbone through ``torch.compile`` with
inductor's weight freezing; compilation happens on the first batch (see :func:`warm_up`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import nn

from ..models import fuse
from ..utils.device import default_device

__all__ = [
    "PRECISIONS",
    "PrecisionError",
    "add_precision_arguments",
    "cpu_bf16_supported",
    "prepare_for_inference",
    "probe",
    "supported_precisions",
    "warm_up",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("strict", "fp32", "tf32", "bf16", "fp16")
FAST_DTYPES = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PROBE_CROP = 224  # the crop of the probe clip (see probe_clip)


class PrecisionError(ValueError):
    """A precision mode this device cannot run (or an unknown one)."""


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_supported() -> bool:
    """Whether this CPU has bfloat16 arithmetic units (avx512_bf16 or AMX).

    Without them every bfloat16 conv falls back to ``slow_conv3d_forward`` and runs more than
    ten times slower than float32, so ``bf16`` is refused there.
    """
    if any(flag in _cpu_flags() for flag in CPU_BF16_FLAGS):
        return True
    capability = torch.backends.cpu.get_cpu_capability()
    return "AMX" in capability or "BF16" in capability


def check_precision(precision: str, device: torch.device, compile: bool = False) -> None:
    """Raise :class:`PrecisionError` when ``precision`` cannot run on ``device``."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if compile and precision == "strict":
        raise PrecisionError(
            "compile is part of the fast path: use it with precision fp32/tf32/bf16/fp16 "
            "(strict keeps the original's arithmetic layer for layer)"
        )
    if device.type == "cuda":
        return
    if precision in ("tf32", "fp16"):
        raise PrecisionError(
            f"precision {precision} needs a CUDA GPU (device is {device}); use fp32 on the CPU"
        )
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_supported():
        raise PrecisionError(
            "precision bf16 needs a CPU with bfloat16 units (avx512_bf16 or amx_bf16) or a CUDA "
            "GPU: this CPU would emulate it more than 10x slower than fp32; use fp32"
        )


def prepare_for_inference(
    model: nn.Module,
    device: str | torch.device | None = None,
    precision: str = "strict",
    compile: bool = False,
    *,
    channels_last: bool = True,
    allow_tf32: bool = False,
    record_layers: Sequence[str] = (),
) -> nn.Module:
    """Return the model to run for inference in ``precision`` on ``device``.

    ``strict`` prepares ``model`` in place exactly as before (eval mode, on the device,
    ``channels_last`` weights, ``allow_tf32`` on CUDA) and returns it. The fast modes leave
    ``model`` untouched and return a rewritten copy (folded, cast, SDPA non-local, padded stem in
    bf16/fp16, routed CPU convs, optionally compiled) with the same ``cfg``, ``split``,
    ``forward_features`` and ``forward_head``; its outputs are float32 or the mode's dtype
    (callers take ``.float()``). The returned model carries ``inference_precision``.

    ``record_layers``: module names whose outputs the caller will record (``vnl-extract
    --layer``); the unit holding each (the stem, a residual or non-local block; see
    :func:`~nonlocal_net.models.fuse.rewritten_unit`) keeps the original's modules, unfolded and
    unfused, cast to the mode's dtype. Every other unit is rewritten as usual.

    A fast mode is first run once on one clip of the network's own size (:func:`probe`): a mode
    whose operators this device cannot run is refused with :class:`PrecisionError` here, before
    a caller creates any output.
    """
    device = default_device(device)
    check_precision(precision, device, compile)
    split = getattr(model, "split", "test")
    if split == "train":
        raise ValueError("inference needs a val- or test-split model, got split 'train'")
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    if precision == "strict":
        model.eval().to(device, memory_format=memory_format)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            torch.backends.cudnn.allow_tf32 = allow_tf32
        model.inference_precision = precision
        model.kept_units = None  # every unit is the original's
        model.inference_compiled = False
        return model

    dtype = FAST_DTYPES.get(precision, torch.float32)
    keep = frozenset(u for u in (fuse.rewritten_unit(model, n) for n in record_layers) if u)
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    folded = fuse.fold_norms(fast, keep)
    sdpa = fuse.use_sdpa_nonlocal(fast, keep)
    reduced = dtype != torch.float32
    if reduced:
        fuse.pad_stem_channels(fast)
    if device.type == "cpu" and dtype == torch.float32 and not compile:
        # ReLUs/residual adds as oneDNN conv post-ops, the other convs routed to oneDNN/GEMM;
        # inductor chooses its own conv kernels when compiling
        fuse.fuse_cpu_pointwise(fast)
    pred = fast.pred
    del fast.pred  # the classifier stays float32 (tiny, and its softmax is the score)
    fast.to(device=device, dtype=dtype, memory_format=memory_format)
    fast.pred = nn.Sequential(fuse.CastTo(torch.float32), pred.to(device=device))
    fast.conv1 = nn.Sequential(fuse.CastTo(dtype, memory_format), fast.conv1)
    if reduced and device.type == "cpu" and isinstance(getattr(fast, "pool5", None), nn.Module):
        # PyTorch has no reduced-precision avg_pool3d on the CPU; pool5 averages in float32
        # (what the classifier reads anyway)
        fast.pool5 = nn.Sequential(fuse.CastTo(torch.float32), fast.pool5)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    fast.inference_precision = precision
    fast.kept_units = keep
    fast.inference_compiled = compile
    probe(fast, device, precision)
    if compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        # forward() calls self.forward_features, so both entry points run compiled
        fast.forward_features = torch.compile(fast.forward_features)
    logger.info(
        "precision %s: %d norms folded, %d non-local blocks on SDPA, %s%s%s%s",
        precision,
        folded,
        sdpa,
        dtype,
        ", stem padded 3->8" if reduced else "",
        f", kept as the original's: {', '.join(sorted(keep))}" if keep else "",
        ", compiled on the first batch" if compile else "",
    )
    return fast


def probe_clip(model: nn.Module) -> torch.Tensor | None:
    """One clip of the smallest size ``model`` accepts (``TRAIN.VIDEO_LENGTH`` frames, 224x224:
    the val head's size, the smallest pool5 of the test head takes); None without a ``cfg``."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return None
    length = int(cfg.TRAIN.VIDEO_LENGTH)
    return torch.randn(
        1, 3, length, PROBE_CROP, PROBE_CROP, generator=torch.Generator().manual_seed(0)
    )


def probe(model: nn.Module, device: torch.device, precision: str) -> None:
    """Run a prepared fast ``model`` once on :func:`probe_clip`; refuse the mode when one of
    its operators is not implemented on ``device`` (:class:`PrecisionError`, one line).

    This is what decides whether a mode runs here: a CPU flag or a CUDA capability says what
    the hardware has, not whether every operator of this network has a kernel for the dtype
    (PyTorch's CPU ``avg_pool3d`` has none for bfloat16, for instance). Models without a
    ``cfg`` (no known clip size) are not probed.
    """
    clip = probe_clip(model)
    if clip is None:
        return
    try:
        with torch.inference_mode():
            out = model(clip.to(device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except (RuntimeError, NotImplementedError) as e:  # a missing kernel, an unsupported dtype
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        other = "strict" if precision == "fp32" else "fp32"
        raise PrecisionError(
            f"precision {precision} cannot run this network on {device}: a one-clip probe "
            f"failed ({reason}); use {other}"
        ) from e
    del out


def supported_precisions(model: nn.Module, device: str | torch.device | None = None) -> list[str]:
    """The modes ``prepare_for_inference(model, device, mode)`` accepts here (each probed)."""
    device = default_device(device)
    modes = ["strict"]
    for precision in PRECISIONS[1:]:
        try:
            prepare_for_inference(model, device, precision)
        except PrecisionError:
            continue
        modes.append(precision)
    return modes


def warm_up(model: nn.Module, example: torch.Tensor) -> float:
    """Run ``model`` once on ``example`` (compiling it if it is compiled); seconds taken."""
    start = time.perf_counter()
    with torch.inference_mode():
        model(example)
    if example.device.type == "cuda":
        torch.cuda.synchronize(example.device)
    return time.perf_counter() - start


def add_precision_arguments(parser) -> None:
    """``--precision`` and ``--compile``, the same on every inference command."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="strict",
        help="strict (default): the original's float32 arithmetic layer for layer; fp32: BN "
        "folded, faster, within 1e-5 relative; tf32/fp16 (CUDA), bf16 (CUDA or a CPU with "
        "bf16 units): reduced precision (see docs/performance.md)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the fast path (not with strict); the first batch compiles",
    )
