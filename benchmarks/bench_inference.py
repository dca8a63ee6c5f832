"""Inference speed of every precision mode vs strict and an eager baseline, plus fidelity.

Speed (clips/s, all ratios measured in this one run, trained-like synthetic weights):

* ``fast <mode>``: :func:`nonlocal_net.prepare_for_inference` in that mode (BN folded, SDPA
  non-local, channels_last_3d, routed CPU convs / padded stem and cast weights);
* ``strict``: what ``vnl-test`` runs by default (the original's arithmetic, channels_last_3d);
* ``eager``: the network as peers run it, our own model in NCDHW with no folding (under autocast
  to the mode's dtype on CUDA; plain float32 on the CPU).

Cases: the I3D-NL 32x2 val net (224 crops, 32 frames) at batch 1 and the I3D-NL 8x8 test net
(256 crops, 8 frames) at batch 4, on the CPU; on CUDA also a throughput batch of 32.

Fidelity (per mode and head): max |fast - strict| / max |strict| over the outputs, and the
share of views whose top-1 class / top-5 set agree with strict, on random clips of the two
nets shortened in time (TRAIN.VIDEO_LENGTH 4/8, 224 crops).

Writes ``benchmarks/inference.md``. Modes this machine cannot run are listed as unmeasured.

Usage: ``python benchmarks/bench_inference.py [--iters N] [--views V] [--compile]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import time
from pathlib import Path

import torch

import nonlocal_net as nl
from nonlocal_net.converters.synthetic import load_synthetic_weights
from nonlocal_net.engine.inference import (
    PRECISIONS,
    PrecisionError,
    check_precision,
    resolve_device,
    warm_up,
)
from nonlocal_net.utils.io import atomic_write

RESULTS = Path(__file__).with_name("inference.md")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}

# (label, zoo name, split, frames, crop, batch)
SPEED_CASES = [
    ("I3D-NL 32x2 val @224", "i3d_nonlocal_32x2_IN_pretrain_400k", "val", 32, 224, 1),
    ("I3D-NL 8x8 test @256", "i3d_nonlocal_8x8_IN_pretrain_400k", "test", 8, 256, 4),
]
CUDA_CASES = [("I3D-NL 32x2 val @224", "i3d_nonlocal_32x2_IN_pretrain_400k", "val", 32, 224, 32)]
# (label, zoo name, TRAIN.VIDEO_LENGTH, frames)
FIDELITY_MODELS = [
    ("I3D-NL 8x8 (T=4)", "i3d_nonlocal_8x8_IN_pretrain_400k", "4", 4),
    ("C2D-NL 32x2 (T=8)", "c2d_nonlocal_32x2_IN_pretrain_400k", "8", 8),
]


def runnable(mode: str, device: torch.device) -> str | None:
    """None when ``mode`` runs here, else why not."""
    try:
        check_precision(mode, device)
    except PrecisionError as e:
        return str(e).split(":")[0]
    return None


def eager_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return copy.deepcopy(model).eval().to(device, memory_format=torch.contiguous_format)


def timed(model, x, autocast_dtype=None) -> float:
    """Seconds of one forward pass of ``model`` on ``x``."""
    ctx = (
        torch.autocast(x.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with ctx, torch.inference_mode():
        start = time.perf_counter()
        model(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - start


def speed_rows(device, modes, iters, compile_) -> list[list[str]]:
    """Each case's variants are timed round-robin (strict, eager, every mode, again ...) and
    the fastest run of each is kept, so that other load on the machine hits all alike."""
    cases = SPEED_CASES + (CUDA_CASES if device.type == "cuda" else [])
    rows = []
    for label, name, split, frames, crop, batch in cases:
        model = load_synthetic_weights(nl.build_model(name, split=split).eval())
        x = torch.randn(batch, 3, frames, crop, crop, device=device)
        variants: dict[str, tuple] = {
            "strict": (nl.prepare_for_inference(copy.deepcopy(model), device, "strict"), None)
        }
        skipped = {}
        for mode in modes:
            why = runnable(mode, device)
            if why is not None:
                skipped[mode] = why
                continue
            amp = AUTOCAST.get(mode) if device.type == "cuda" else None
            variants.setdefault(f"eager {amp}", (eager_model(model, device), amp))
            variants[mode] = (nl.prepare_for_inference(model, device, mode, compile_), None)
        first = {
            k: warm_up(m, x) if amp is None else timed(m, x, amp)
            for k, (m, amp) in variants.items()
        }
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(iters):
            for key, (m, amp) in variants.items():
                best[key] = min(best[key], timed(m, x, amp))
        cps = {k: batch / t for k, t in best.items()}
        for mode in modes:
            if mode in skipped:
                rows.append([label, str(batch), mode, "-", "-", "-", f"not run: {skipped[mode]}"])
                continue
            amp = AUTOCAST.get(mode) if device.type == "cuda" else None
            eager = cps[f"eager {amp}"]
            note = f"first batch {first[mode]:.1f} s" + (" (compile)" if compile_ else "")
            rows.append(
                [
                    label,
                    str(batch),
                    mode + (" +compile" if compile_ else ""),
                    f"{cps[mode]:.3f}",
                    f"{cps[mode] / cps['strict']:.2f}x (strict {cps['strict']:.3f})",
                    f"{cps[mode] / eager:.2f}x (eager {eager:.3f})",
                    note,
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
        del variants
    return rows


def topk_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    top1 = (a.argmax(1) == b.argmax(1)).float().mean().item()
    ta, tb = a.topk(5, dim=1).indices, b.topk(5, dim=1).indices
    top5 = sum(set(r.tolist()) == set(s.tolist()) for r, s in zip(ta, tb)) / len(ta)
    return top1, top5


def fidelity_rows(device, modes, views: int) -> list[list[str]]:
    rows = []
    for label, name, length, frames in FIDELITY_MODELS:
        for split in ("val", "test"):
            model = nl.build_model(name, split=split, overrides=["TRAIN.VIDEO_LENGTH", length])
            model = load_synthetic_weights(model.eval(), seed=3)
            gen = torch.Generator().manual_seed(4)
            x = torch.randn(views, 3, frames, 224, 224, generator=gen).to(device)
            strict = nl.prepare_for_inference(copy.deepcopy(model), device, "strict")
            with torch.inference_mode():
                ref = torch.cat([strict(v[None]) for v in x]).double()
            head = "FC logits (val)" if split == "val" else "conv softmax (test)"
            for mode in modes:
                why = runnable(mode, device)
                if why is not None:
                    rows.append([label, head, mode, "-", "-", "-", f"unmeasured: {why}"])
                    continue
                fast = nl.prepare_for_inference(model, device, mode)
                with torch.inference_mode():
                    out = torch.cat([fast(v[None]).float() for v in x]).double()
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                top1, top5 = topk_agreement(out, ref)
                cells = [f"{err:.1e}", f"{top1:.0%}", f"{top5:.0%}", f"{views} views"]
                rows.append([label, head, mode, *cells])
                print(" | ".join(rows[-1]), flush=True)
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=3, help="timed runs per variant (default 3)")
    parser.add_argument("--views", type=int, default=6, help="clips per fidelity row")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the fast path")
    parser.add_argument("--skip-fidelity", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    modes = [m for m in PRECISIONS if m != "strict"]
    load_before = os.getloadavg()
    start = time.perf_counter()
    speed = speed_rows(device, modes, args.iters, args.compile)
    fidelity = [] if args.skip_fidelity else fidelity_rows(device, modes, args.views)
    load_after = os.getloadavg()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    gpu_note = (
        ""
        if device.type == "cuda"
        else "\nGPU rows: unmeasured (no GPU lent); `tf32`/`fp16` need CUDA, and `bf16` needs "
        "CUDA or a CPU with bfloat16 units.\n"
    )
    text = f"""# Inference speed and fidelity of the precision modes

Generated by `benchmarks/bench_inference.py` (`make bench`) in one run of
{time.perf_counter() - start:.0f} s. Device: {device} ({name or platform.machine()}),
{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, torch {torch.__version__},
Python {platform.python_version()}. Load average (1/5/15 min) before:
{" / ".join(f"{v:.2f}" for v in load_before)}, after: {" / ".join(f"{v:.2f}" for v in load_after)}
(a load above the core count means other work shared the CPU and the clips/s are low and noisy;
the ratios, measured side by side, are more robust than the absolute figures).
{gpu_note}
## Speed (clips/s; best of {args.iters} round-robin runs per variant after one warm-up)

`strict` is what `vnl-test` runs by default; `eager` is our model as peers run it (NCDHW, no
folding, autocast on CUDA).

{table(["network", "batch", "mode", "clips/s", "vs strict", "vs eager", "note"], speed)}

## Fidelity vs strict (float32, the original's arithmetic)

Max relative error = max |mode - strict| / max |strict| over all outputs of {args.views} random
clips per row (trained-like synthetic weights); agreement = share of clips whose top-1 class
(top-5 set) is the same as strict's.

{table(["network", "head", "mode", "max rel err", "top-1 agree", "top-5 agree", "note"], fidelity)}
"""
    with atomic_write(RESULTS, "w") as f:
        f.write(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
