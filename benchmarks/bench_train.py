"""Training throughput (clips/s) and the share of time the trainer waits for data, on CPU.

Writes class-coloured synthetic videos (240x232, MJPG) to a temporary folder and trains the
real I3D non-local network made tiny (the tests' config: 2-frame clips, 224 crops, bottleneck
width 4, 3 classes) with :func:`nonlocal_net.engine.trainer.train` for a few iterations, with
0 and 2 decoding workers. The first iteration (start-up) is left out of the rates; the final
checkpoint is included. With a CUDA device it also trains one released recipe
(``i3d_nonlocal_8x8_IN_pretrain_400k``, full size) at its per-GPU batch (``TRAIN.BATCH_SIZE 64 /
NUM_GPUS 8`` = 8 clips, ``NUM_GPUS 1``) in fp32 (TF32 off, as the trainer runs it) and bf16
autocast, and reports clips/s and the peak GPU memory; without one those rows say
"unmeasured". Writes ``benchmarks/train.md``.

Usage: ``python benchmarks/bench_train.py [--iters N] [--batch B] [--gpu-iters N]``
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

import nonlocal_net as nl
from nonlocal_net.engine.distributed import DistContext
from nonlocal_net.engine.trainer import TrainOptions, train
from nonlocal_net.utils.io import atomic_write
from nonlocal_net.utils.log import setup_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from train_helpers import BASE, TINY, write_class_dataset

RESULTS = Path(__file__).with_name("train.md")
RECIPE = "i3d_nonlocal_8x8_IN_pretrain_400k"
RECIPE_PER_GPU_BATCH = 8  # TRAIN.BATCH_SIZE 64 over NUM_GPUS 8


def measure(root: Path, workers: int, iters: int, batch: int) -> dict:
    cfg = nl.get_cfg(
        BASE,
        [
            *TINY,
            *("SOLVER.MAX_ITER", str(iters), "TRAIN.BATCH_SIZE", str(batch)),
            *("CHECKPOINT.CHECKPOINT_PERIOD", "-1", "LOG_PERIOD", "1000"),
        ],
    )
    out = Path(tempfile.mkdtemp(dir=root))
    opts = TrainOptions(
        cfg=cfg,
        train_list=str(root / "train.txt"),
        output_dir=str(out),
        workers=workers,
        progress=False,
        write_caffe2=False,
    )
    t = train(opts, DistContext())["throughput"]
    steady = t["seconds"] - t["first_batch_seconds"]
    return {
        "workers": workers,
        "iters": iters,
        "batch": batch,
        "clips_per_s": t["clips"] / steady if steady > 0 else float("nan"),
        "data_share": t["data_seconds"] / steady if steady > 0 else float("nan"),
        "startup": t["first_batch_seconds"],
    }


def measure_gpu(root: Path, precision: str, iters: int) -> dict:
    """The released recipe at its per-GPU batch on ``cuda``: clips/s and peak memory."""
    cfg = nl.get_cfg(
        RECIPE,
        [
            *("NUM_GPUS", "1", "TRAIN.BATCH_SIZE", str(RECIPE_PER_GPU_BATCH)),
            *("MODEL.NUM_CLASSES", "3", "SOLVER.MAX_ITER", str(iters)),
            *("CHECKPOINT.CHECKPOINT_PERIOD", "-1", "LOG_PERIOD", "1000"),
            *("TRAIN.COMPUTE_PRECISE_BN", "False", "TRAIN.EVAL_PERIOD", "-1"),
        ],
    )
    out = Path(tempfile.mkdtemp(dir=root))
    opts = TrainOptions(
        cfg=cfg,
        train_list=str(root / "train.txt"),
        output_dir=str(out),
        workers=min(8, os.cpu_count() or 1),
        progress=False,
        write_caffe2=False,
        precision=precision,
    )
    torch.cuda.reset_peak_memory_stats()
    t = train(opts, DistContext(device=torch.device("cuda")))["throughput"]
    steady = t["seconds"] - t["first_batch_seconds"]
    return {
        "precision": precision,
        "workers": opts.workers,
        "iters": iters,
        "batch": RECIPE_PER_GPU_BATCH,
        "clips_per_s": t["clips"] / steady if steady > 0 else float("nan"),
        "data_share": t["data_seconds"] / steady if steady > 0 else float("nan"),
        "startup": t["first_batch_seconds"],
        "memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def gpu_lines(rows: list[dict]) -> list[str]:
    """The fp32 and bf16 rows of the released recipe: measured, or marked unmeasured."""
    if not rows:
        return [
            f"| GPU | {precision} | - | {RECIPE_PER_GPU_BATCH} | - | unmeasured (no GPU here) "
            f"| - | - | - |"
            for precision in ("fp32", "bf16")
        ]
    name = torch.cuda.get_device_name()
    return [
        f"| GPU ({name}) | {r['precision']} | {r['workers']} | {r['batch']} | {r['iters']} | "
        f"{r['clips_per_s']:.2f} | {100 * r['data_share']:.1f}% | {r['startup']:.1f} | "
        f"{r['memory_gib']:.1f} GiB |"
        for r in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--gpu-iters", type=int, default=20, help="iterations per GPU row")
    args = parser.parse_args()
    setup_logging(-1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_class_dataset(root)
        for workers in (0, 2):
            rows.append(measure(root, workers, args.iters, args.batch))
        gpu_rows = []
        if torch.cuda.is_available():
            gpu_rows = [measure_gpu(root, p, args.gpu_iters) for p in ("fp32", "bf16")]
    threads = torch.get_num_threads()
    lines = [
        "# Training throughput",
        "",
        "Generated by `benchmarks/bench_train.py` (do not edit by hand). Tiny I3D non-local "
        "network (the tests' config: 2-frame clips, 224x224 crops, bottleneck width 4, 3 "
        "classes, batch as listed), fp32, class-coloured synthetic 240x232 MJPG videos; the "
        "first iteration (start-up) is left out, the final checkpoint is included. GPU rows: "
        f"the released recipe `{RECIPE}` (full size, 8x8 clips, 3 classes) at its per-GPU batch "
        f"of {RECIPE_PER_GPU_BATCH} clips on one GPU (`NUM_GPUS 1`), fp32 with TF32 off (the "
        "trainer's fp32) and bf16 autocast, no precise BN, peak GPU memory allocated.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({threads} intra-op threads); Python {platform.python_version()}.",
        "",
        "| device | precision | workers | batch | iterations | clips/s | data-loading share "
        "| start-up s | peak GPU memory |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| CPU | fp32 | {r['workers']} | {r['batch']} | {r['iters']} | "
            f"{r['clips_per_s']:.2f} | {100 * r['data_share']:.1f}% | {r['startup']:.1f} | - |"
        )
    lines += gpu_lines(gpu_rows)
    lines += [
        "",
        '"data-loading share": time the training loop waited for the next batch over the '
        "steady-state wall time (with 0 workers decoding runs in the training process). The "
        "machine is shared, so timings are noisy.",
        "",
    ]
    with atomic_write(RESULTS, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
