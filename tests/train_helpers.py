"""Helpers for the training tests: a tiny trainable config and visually distinct class videos."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from nonlocal_net.datasets.synthetic import write_list_file

# The real I3D non-local network made cheap: 2-frame clips, 224 crops (pool5 1x1), narrow
# bottlenecks, 3 classes, batch 4, no dropout, 6 iterations.
TINY = [
    "TRAIN.VIDEO_LENGTH", "2", "TRAIN.SAMPLE_RATE", "2", "RESNETS.WIDTH_PER_GROUP", "4",
    "MODEL.NUM_CLASSES", "3", "TRAIN.JITTER_SCALES", "[224,232]", "TRAIN.CROP_SIZE", "224",
    "TEST.SCALE", "224", "TRAIN.BATCH_SIZE", "4", "NUM_GPUS", "1", "TRAIN.DROPOUT_RATE", "0.0",
    "SOLVER.MAX_ITER", "6", "SOLVER.BASE_LR", "0.01", "SOLVER.STEP_SIZES", "[4,100]",
    "SOLVER.LRS", "[1,0.1]", "CHECKPOINT.CHECKPOINT_PERIOD", "3", "LOG_PERIOD", "1",
    "TRAIN.COMPUTE_PRECISE_BN", "False", "TRAIN.EVAL_PERIOD", "-1",
]  # fmt: skip
BASE = "i3d_nonlocal_8x8_IN_pretrain_400k"
AFFINE_BASE = "i3d_baseline_32x4_I3D_pretrain_400k"  # no BN anywhere

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]  # RGB, one per class


def write_class_video(path: Path, colour, num_frames: int, seed: int, w=240, h=232) -> Path:
    """A video of a class: its colour plus drifting noise texture (distinct per video)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (w, h))
    base = np.array(colour, np.float32)[None, None, :]
    for _ in range(num_frames):
        noise = rng.normal(0, 25, (h, w, 1)).astype(np.float32)
        rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def write_class_dataset(root: Path, per_class: int = 2, extra_lines=()) -> Path:
    lines = []
    for label, colour in enumerate(COLOURS):
        for k in range(per_class):
            name = f"c{label}/v{k}.avi"
            write_class_video(root / name, colour, 8, seed=10 * label + k)
            lines.append((name, label))
    lines += list(extra_lines)
    return write_list_file(root / "train.txt", lines)


# One training process at a time uses the cores the tests use (conftest's torch threads); runs
# that are compared tensor for tensor use the same count. Several processes at once take 1 each.
TRAIN_THREADS = str(max(1, min(4, os.cpu_count() or 1)))


def run_train(args, env=None, check=False, **kwargs):
    """``python -m nonlocal_net.tools.train_net_video ARGS`` (one process)."""
    command = [sys.executable, "-m", "nonlocal_net.tools.train_net_video", *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": TRAIN_THREADS, **(env or {})}
    result = subprocess.run(command, env=full_env, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"vnl-train failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def in_process_error(args, capsys):
    """``vnl-train ARGS`` in this process (the command's own ``main``, without a new process's
    torch start-up): ``(its one error line, all of stderr)``; asserts exit 2, no traceback."""
    from nonlocal_net.tools.train_net_video import main

    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("vnl-train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0], err
