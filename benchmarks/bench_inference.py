"""Inference speed of every precision mode and exported format vs strict and an eager baseline,
plus fidelity.

Speed (clips/s, all ratios measured in this one run, trained-like synthetic weights):

* ``fast <mode>``: :func:`nonlocal_net.prepare_for_inference` in that mode (BN folded, SDPA
  non-local, channels_last_3d, routed CPU convs / padded stem and cast weights; ``bf16`` on a
  CPU with bfloat16 units averages pool5 in float32);
* ``strict``: what ``vnl-test`` runs by default (the original's arithmetic, channels_last_3d);
* ``eager``: the network as peers run it, our own model in NCDHW with no folding (under autocast
  to the mode's dtype on CUDA; plain float32 on the CPU);
* ``onnxruntime`` / ``torch.export .pt2`` (CPU runs): the strict model exported as ``vnl-export``
  exports it (:func:`nonlocal_net.engine.export.export_model`, checked against strict), run by
  onnxruntime's CPU provider with torch's thread count / by ``torch.export.load(...).module()``
  (see ``exported_runtimes.py``); each file lives in a temporary directory removed afterwards.

Cases: the I3D-NL 32x2 val net (224 crops, 32 frames) at batch 1 and the I3D-NL 8x8 test net
(256 crops, 8 frames) at batch 4, on the CPU; on CUDA also a throughput batch of 32.

Fidelity (per mode, exported format and head): max |variant - strict| / max |strict| over the
outputs, and the share of views whose top-1 class / top-5 set agree with strict, on random clips
of the two nets shortened in time (TRAIN.VIDEO_LENGTH 4/8, 224 crops for both heads).

Writes ``benchmarks/inference.md``. Variants this machine cannot run are listed as unmeasured,
with the reason. ``--quick`` is a smoke run (tiny networks, one timed run, two views) printed to
stdout (or ``--output``); it never writes ``benchmarks/inference.md``.

Usage: ``python benchmarks/bench_inference.py [--iters N] [--views V] [--compile] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from exported_runtimes import EXPORTED, export_directory, export_variant, remove_stale_directories

import nonlocal_net as nl
from nonlocal_net.converters.synthetic import load_synthetic_weights
from nonlocal_net.engine.export import clip_shape
from nonlocal_net.engine.inference import PRECISIONS, PrecisionError, check_precision, warm_up
from nonlocal_net.utils.device import default_device
from nonlocal_net.utils.io import atomic_write, install_signal_cleanup, same_file

RESULTS = Path(__file__).with_name("inference.md")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
EAGER_FP32 = "eager None"  # the variant key of the float32 eager baseline


@dataclass(frozen=True)
class Case:
    """A network to time: its input is ``clip_shape(model, batch)`` (the crop of its split)."""

    label: str
    name: str  # zoo name
    split: str
    batch: int
    quick_length: str  # TRAIN.VIDEO_LENGTH of its --quick version (the smallest pool5 takes)


SPEED_CASES = [
    Case("I3D-NL 32x2 val @224", "i3d_nonlocal_32x2_IN_pretrain_400k", "val", 1, "8"),
    Case("I3D-NL 8x8 test @256", "i3d_nonlocal_8x8_IN_pretrain_400k", "test", 4, "2"),
]
CUDA_CASES = [Case("I3D-NL 32x2 val @224", "i3d_nonlocal_32x2_IN_pretrain_400k", "val", 32, "8")]
# (label, zoo name, TRAIN.VIDEO_LENGTH); both heads on 224 crops (TEST.SCALE 224: the test
# head's input, which an exported graph fixes, is then the val head's)
FIDELITY_MODELS = [
    ("I3D-NL 8x8 (T=4)", "i3d_nonlocal_8x8_IN_pretrain_400k", "4"),
    ("C2D-NL 32x2 (T=8)", "c2d_nonlocal_32x2_IN_pretrain_400k", "8"),
]
FIDELITY_OVERRIDES = ["TEST.SCALE", "224"]
# --quick: the same layer types, narrow bottlenecks, short clips, 224 crops
QUICK_OVERRIDES = ["RESNETS.WIDTH_PER_GROUP", "8", "TEST.SCALE", "224"]
MODE_NOTES = {("bf16", "cpu"): "pool5 averaged in float32"}  # see prepare_for_inference


def prepared(model, device, mode: str, compile_: bool = False):
    """``(model prepared in mode, None)``, or ``(None, why not)`` where the mode cannot run
    here (refused by the device check or by the one-clip probe)."""
    try:
        check_precision(mode, device, compile_)
    except PrecisionError as e:
        return None, str(e).split(":")[0]  # the reason, without the advice
    try:
        return nl.prepare_for_inference(model, device, mode, compile_), None
    except PrecisionError as e:
        return None, str(e)


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


def build(name: str, split: str, overrides: list[str], seed: int = 0) -> torch.nn.Module:
    model = nl.build_model(name, split=split, overrides=overrides)
    return load_synthetic_weights(model.eval(), seed=seed)


def speed_row(case: Case, variant: str, cps: dict[str, float], eager_key: str, note: str):
    eager = cps[eager_key]
    return [
        case.label,
        str(case.batch),
        variant,
        f"{cps[variant]:.3f}",
        f"{cps[variant] / cps['strict']:.2f}x (strict {cps['strict']:.3f})",
        f"{cps[variant] / eager:.2f}x (eager {eager:.3f})",
        note,
    ]


def speed_rows(device, modes, iters, compile_, quick) -> list[list[str]]:
    """Each case's variants are timed round-robin (strict, eager, every mode, every exported
    format, again ...) and the fastest run of each is kept, so that other load on the machine
    hits all alike."""
    cases = SPEED_CASES + (CUDA_CASES if device.type == "cuda" else [])
    if quick:
        cases = [
            dataclasses.replace(c, label=f"{c.label.split(' @')[0]} [tiny @224]") for c in cases
        ]
    rows = []
    for case in cases:
        overrides = ["TRAIN.VIDEO_LENGTH", case.quick_length, *QUICK_OVERRIDES] if quick else []
        model = build(case.name, case.split, overrides)
        x = torch.randn(clip_shape(model, case.batch), device=device)
        variants: dict[str, tuple] = {
            "strict": (nl.prepare_for_inference(copy.deepcopy(model), device, "strict"), None),
            EAGER_FP32: (eager_model(model, device), None),
        }
        skipped, notes, eager_of = {}, {}, {}
        for mode in modes:
            fast, why = prepared(model, device, mode, compile_)
            if fast is None:
                skipped[mode] = f"not run: {why}"
                continue
            amp = AUTOCAST.get(mode) if device.type == "cuda" else None
            eager_of[mode] = f"eager {amp}"
            variants.setdefault(eager_of[mode], (eager_model(model, device), amp))
            variants[mode] = (fast, None)
            notes[mode] = MODE_NOTES.get((mode, device.type), "")
            if mode in AUTOCAST and amp is None:
                notes[mode] = "; ".join(filter(None, (notes[mode], "eager is float32")))
        with export_directory() as directory:
            for label in EXPORTED:
                if device.type != "cpu":
                    skipped[label] = "not run: CPU runs only (--device cpu)"
                    continue
                exported = export_variant(model, label, directory)
                if exported.run is None:
                    skipped[label] = exported.note
                    continue
                variants[label] = (exported.run, None)
                eager_of[label], notes[label] = EAGER_FP32, exported.note
            first = {
                k: warm_up(m, x) if amp is None else timed(m, x, amp)
                for k, (m, amp) in variants.items()
            }
            best = dict.fromkeys(variants, float("inf"))
            for _ in range(iters):
                for key, (m, amp) in variants.items():
                    best[key] = min(best[key], timed(m, x, amp))
        cps = {k: case.batch / t for k, t in best.items()}
        suffix = " +compile" if compile_ else ""
        for variant in [*modes, *EXPORTED]:
            if variant in skipped:
                rows.append([case.label, str(case.batch), variant, "-", "-", "-", skipped[variant]])
            else:
                first_note = f"first batch {first[variant]:.1f} s"
                if variant in modes and compile_:
                    first_note += " (compile)"
                note = "; ".join(n for n in (notes[variant], first_note) if n)
                key = variant + (suffix if variant in modes else "")
                row = speed_row(case, variant, cps, eager_of[variant], note)
                row[2] = key
                rows.append(row)
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        del variants
    return rows


def topk_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    top1 = (a.argmax(1) == b.argmax(1)).float().mean().item()
    ta, tb = a.topk(5, dim=1).indices, b.topk(5, dim=1).indices
    top5 = sum(set(r.tolist()) == set(s.tolist()) for r, s in zip(ta, tb)) / len(ta)
    return top1, top5


def fidelity_cells(run, x: torch.Tensor, ref: torch.Tensor, note: str) -> list[str]:
    """Max relative error and top-1/top-5 agreement of ``run`` (one view at a time) vs ``ref``."""
    with torch.inference_mode():
        out = torch.cat([run(v[None]).float().cpu() for v in x]).double()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    top1, top5 = topk_agreement(out, ref)
    return [f"{err:.1e}", f"{top1:.0%}", f"{top5:.0%}", note]


def fidelity_rows(device, modes, views: int, quick: bool) -> list[list[str]]:
    rows = []
    for label, name, length in FIDELITY_MODELS:
        label = f"{label} [tiny]" if quick else label
        for split in ("val", "test"):
            overrides = ["TRAIN.VIDEO_LENGTH", length, *FIDELITY_OVERRIDES]
            model = build(name, split, overrides + (QUICK_OVERRIDES if quick else []), seed=3)
            gen = torch.Generator().manual_seed(4)
            x = torch.randn(clip_shape(model, views), generator=gen).to(device)
            strict = nl.prepare_for_inference(copy.deepcopy(model), device, "strict")
            with torch.inference_mode():
                ref = torch.cat([strict(v[None]) for v in x]).double().cpu()
            head = "FC logits (val)" if split == "val" else "conv softmax (test)"
            for mode in modes:
                fast, why = prepared(model, device, mode)
                if fast is None:
                    rows.append([label, head, mode, "-", "-", "-", f"unmeasured: {why}"])
                else:
                    extra = MODE_NOTES.get((mode, device.type))
                    note = f"{views} views" + (f"; {extra}" if extra else "")
                    rows.append([label, head, mode, *fidelity_cells(fast, x, ref, note)])
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
            with export_directory() as directory:
                for variant in EXPORTED:
                    exported = export_variant(model, variant, directory)
                    if exported.run is None:
                        rows.append([label, head, variant, "-", "-", "-", exported.note])
                    else:
                        cells = fidelity_cells(exported.run, x.cpu(), ref, f"{views} views")
                        rows.append([label, head, variant, *cells])
                    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, help="timed runs per variant (default 3; quick 1)")
    parser.add_argument("--views", type=int, help="clips per fidelity row (default 6; quick 2)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the fast path")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny networks (narrow bottlenecks, short clips, 224 crops); the table "
        "goes to stdout (or --output), never to benchmarks/inference.md",
    )
    parser.add_argument(
        "--output", help=f"where the table goes ('-': stdout; default {RESULTS}, quick '-')"
    )
    args = parser.parse_args(argv)
    args.iters = args.iters if args.iters is not None else (1 if args.quick else 3)
    args.views = args.views if args.views is not None else (2 if args.quick else 6)
    if args.iters < 1 or args.views < 1:
        parser.error("--iters and --views must be >= 1")
    args.output = args.output or ("-" if args.quick else str(RESULTS))
    if args.quick and args.output != "-" and same_file(args.output, RESULTS):
        parser.error(f"--quick figures never go to {RESULTS}: give another --output or none")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    install_signal_cleanup()  # SIGTERM unwinds: the export directories are removed
    # the ONNX exporter warns about every torchvision op it cannot register (none is used)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    remove_stale_directories()
    device = default_device(args.device)
    modes = [m for m in PRECISIONS if m != "strict"]
    load_before = os.getloadavg()
    start = time.perf_counter()
    speed = speed_rows(device, modes, args.iters, args.compile, args.quick)
    fidelity = [] if args.skip_fidelity else fidelity_rows(device, modes, args.views, args.quick)
    load_after = os.getloadavg()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    gpu_note = (
        ""
        if device.type == "cuda"
        else "\nGPU rows: unmeasured (no GPU lent); `tf32`/`fp16` need CUDA, and `bf16` needs "
        "CUDA or a CPU with bfloat16 units.\n"
    )
    quick_note = (
        "\n**Quick smoke run** (`--quick`): tiny networks (RESNETS.WIDTH_PER_GROUP 8, short "
        "clips, 224 crops); these are not benchmark figures.\n"
        if args.quick
        else ""
    )
    text = f"""# Inference speed and fidelity of the precision modes and exported formats

Generated by `benchmarks/bench_inference.py` (`make bench`) in one run of
{time.perf_counter() - start:.0f} s. Device: {device} ({name or platform.machine()}),
{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, torch {torch.__version__},
Python {platform.python_version()}. Load average (1/5/15 min) before:
{" / ".join(f"{v:.2f}" for v in load_before)}, after: {" / ".join(f"{v:.2f}" for v in load_after)}
(a load above the core count means other work shared the CPU and the clips/s are low and noisy;
the ratios, measured side by side, are more robust than the absolute figures).
{quick_note}{gpu_note}
## Speed (clips/s; best of {args.iters} round-robin runs per variant after one warm-up)

`strict` is what `vnl-test` runs by default; `eager` is our model as peers run it (NCDHW, no
folding, autocast on CUDA). `onnxruntime` and `torch.export .pt2` are the strict model exported
as `vnl-export` exports it (float32, dynamic batch, checked against strict when written; see
[docs/exporting.md](../docs/exporting.md)), run by onnxruntime's CPU execution provider with
as many intra-op threads as torch, and by `torch.export.load(file).module()`; "export" is the
time to write and check the file.

{table(["network", "batch", "mode", "clips/s", "vs strict", "vs eager", "note"], speed)}

## Fidelity vs strict (float32, the original's arithmetic)

Max relative error = max |variant - strict| / max |strict| over all outputs of {args.views}
random clips per row (trained-like synthetic weights); agreement = share of clips whose top-1
class (top-5 set) is the same as strict's.

{table(["network", "head", "mode", "max rel err", "top-1 agree", "top-5 agree", "note"], fidelity)}
"""
    if args.output == "-":
        sys.stdout.write(text)
        return
    with atomic_write(args.output, "w") as f:
        f.write(text)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
