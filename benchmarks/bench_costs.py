"""What each command costs: wall time, CPU time and peak memory of whole processes, and disk.

Every command runs as a user runs it, a fresh process (``vnl-convert``, ``vnl-verify``,
``vnl-test``, ...) on files this script makes in a temporary folder: a Caffe2 training checkpoint
of the released ``i3d_nonlocal_8x8_IN_pretrain_400k`` at its released size, written as the
original writes one (:mod:`nonlocal_net.converters.synthetic`), and synthetic videos of
Kinetics' size (340x256, 10 s at 30 fps). A small launcher process runs each command and reads
``getrusage(RUSAGE_CHILDREN)`` after it: wall time, user + system CPU seconds (decoding
processes included) and the peak resident set of the largest process (``ru_maxrss``), so the
benchmark's own memory is not counted.

Rows: conversion, layer-by-layer verification, the 30-view test of one video at ``strict`` and
``fp32``, ``vnl-predict``, ``vnl-extract``, one training iteration of the released recipe at its
per-GPU batch (8 clips) on the CPU, ``vnl-export`` to ONNX and ``torch.export``, and
``vnl-demo``. Disk: the environment (``sys.prefix``), the demo's output folder, the Caffe2
``.pkl``, the converted ``.pt``, a training checkpoint, the exported files, and a results and a
features file per 1000 videos (the growth per video measured between two list sizes on the
released class count and feature width, extrapolated).

Writes ``benchmarks/costs.md`` (generated; do not edit by hand). ``--quick`` runs every row on
a tiny network (the tests' overrides) and short videos, to check the script in a few minutes;
its table goes to ``--output`` (a path, or ``-`` for stdout), never to the committed table.

    python benchmarks/bench_costs.py            # the table (about 7 min on 2 quiet cores)
    python benchmarks/bench_costs.py --quick --output -
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine_info import machine

from nonlocal_net.datasets.synthetic import write_list_file, write_video
from nonlocal_net.utils.io import atomic_write

RESULTS = Path(__file__).with_name("costs.md")
MODEL = "i3d_nonlocal_8x8_IN_pretrain_400k"
BIN = Path(sys.executable).parent
# the quick mode's network: docs/quickstart.md's overrides (every row in seconds)
TINY = (
    *("NUM_GPUS", "1", "TRAIN.BATCH_SIZE", "3", "MODEL.NUM_CLASSES", "3"),
    *("RESNETS.WIDTH_PER_GROUP", "4", "TRAIN.VIDEO_LENGTH", "2", "TRAIN.SAMPLE_RATE", "2"),
    *("TRAIN.JITTER_SCALES", "[224,232]", "TRAIN.CROP_SIZE", "224", "TEST.SCALE", "224"),
)
# the released recipe's per-GPU batch: TRAIN.BATCH_SIZE 64 over NUM_GPUS 8
RECIPE_BATCH = 8
# one training iteration, its checkpoint, nothing else
ONE_ITERATION = (
    *("TRAIN.RESET_START_ITER", "True", "SOLVER.MAX_ITER", "1", "TRAIN.EVAL_PERIOD", "-1"),
    *("TRAIN.COMPUTE_PRECISE_BN", "False", "TRAIN.TEST_AFTER_TRAIN", "False"),
    *("CHECKPOINT.CHECKPOINT_PERIOD", "1", "LOG_PERIOD", "1"),
)

# Runs the command on its command line and reports its costs. A launcher keeps the benchmark's
# own resident set out of ru_maxrss (a forked child starts with its parent's).
LAUNCHER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": done.returncode, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
                  "peak_kib": usage.ru_maxrss,
                  "stderr": done.stderr.decode(errors="replace")[-3000:]}))
"""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the run measures on: the network's overrides and the inputs' sizes."""

    overrides: tuple[str, ...]
    frames: int  # per video
    width: int
    height: int
    train_batch: int
    disk_videos: tuple[int, int]  # two list sizes for the per-video growth of the files
    network: str  # as the table names it


FULL = Sizes((), 300, 340, 256, RECIPE_BATCH, (2, 6), f"`{MODEL}` at its released size")
QUICK = Sizes(TINY, 24, 240, 232, 3, (1, 2), "QUICK MODE: a tiny network (not for the docs)")


@dataclasses.dataclass(frozen=True)
class Row:
    command: str
    input: str
    wall: float
    cpu: float
    peak_mib: float


def measure(argv: list[str], cwd: Path) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one fresh process running ``argv`` in ``cwd``."""
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *argv], cwd=cwd, capture_output=True, text=True
    )
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result['rc']}):\n{result['stderr']}")
    return result["wall"], result["cpu"], result["peak_kib"] / 1024.0  # Linux reports KiB


def disk_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (links not followed)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def environment_bytes() -> int:
    """Bytes of the Python environment: ``sys.prefix`` and every site-packages folder on
    ``sys.path`` outside it (a venv may reach its packages through a ``.pth`` file)."""
    prefix = Path(sys.prefix).resolve()
    folders = {prefix}
    for entry in sys.path:
        folder = Path(entry).resolve()
        if folder.name == "site-packages" and folder.is_dir() and prefix not in folder.parents:
            folders.add(folder)
    return sum(disk_bytes(folder) for folder in folders)


def human(size: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def vnl(command: str) -> str:
    return str(BIN / command)


def make_inputs(work: Path, sizes: Sizes) -> None:
    """The Caffe2 checkpoint (in its own process: its blobs stay out of this one), the videos
    and their lists: ``one.txt`` (a video), ``train.txt`` (a batch of videos), ``disk<N>.txt``."""
    write = (
        "import sys, nonlocal_net as nl\n"
        "from nonlocal_net.converters.synthetic import write_synthetic_checkpoint\n"
        "write_synthetic_checkpoint(sys.argv[1], nl.get_cfg(sys.argv[2], sys.argv[3:]))\n"
    )
    argv = [sys.executable, "-c", write, "model.pkl", MODEL, *sizes.overrides]
    subprocess.run(argv, cwd=work, check=True)
    count = max(sizes.train_batch, *sizes.disk_videos)
    names = [f"video{i}.mp4" for i in range(count)]
    for i, name in enumerate(names):
        write_video(work / name, sizes.frames, sizes.width, sizes.height, seed=i)
    write_list_file(work / "one.txt", [(names[0], 0)])
    write_list_file(work / "train.txt", [(n, i % 3) for i, n in enumerate(names)])
    for n in sizes.disk_videos:
        write_list_file(work / f"disk{n}.txt", [(name, 0) for name in names[:n]])


def command_rows(work: Path, sizes: Sizes) -> list[Row]:
    """Each command once, as a fresh process."""
    ov = list(sizes.overrides)
    view = f"1 video ({sizes.frames} frames {sizes.width}x{sizes.height}), 30 views"
    quiet = ["--workers", "0", "--no-progress"]
    test = ["vnl-test", "--weights", "model.pt", "--list", "one.txt", *quiet]
    train = ["vnl-train", "--model", MODEL, "--train-list", "train.txt", "--output-dir", "run"]
    train += [*quiet, *ov, "NUM_GPUS", "1", "TRAIN.BATCH_SIZE", str(sizes.train_batch)]
    train += ["TRAIN.PARAMS_FILE", "model.pkl", *ONE_ITERATION]
    export = ["vnl-export", "--weights", "model.pt", "--output"]
    demo = "the whole demo" + (" (its own sizes: --quick does not shrink it)" if ov else "")
    convert = ["vnl-convert", "model.pkl", "model.pt", "--model", MODEL, *ov]
    verify = ["vnl-verify", "model.pkl", "model.pt", "--no-progress"]
    predict = ["vnl-predict", "video0.mp4", "--weights", "model.pt", "--no-progress"]
    extract = ["vnl-extract", *test[1:5], "--output", "f.h5", *quiet]
    cases = [
        ("vnl-convert", "the Caffe2 .pkl -> .pt", convert),
        ("vnl-verify", "1 clip, float32 and float64 runs", verify),
        ("vnl-test --precision strict", view, [*test, "--results", "strict.h5"]),
        ("vnl-test --precision fp32", view, [*test, "--results", "fp32.h5", "--precision", "fp32"]),
        ("vnl-predict", view, predict),
        ("vnl-extract", view + ", pool5 per view", extract),
        ("vnl-train", f"1 iteration of {sizes.train_batch} clips, its checkpoint", train),
        ("vnl-export (.onnx)", "test head, checked with onnxruntime", [*export, "model.onnx"]),
        ("vnl-export (.pt2)", "test head, checked", [*export, "model.pt2"]),
        ("vnl-demo", demo, ["vnl-demo", "--output", "demo"]),
    ]
    rows = []
    for label, what, argv in cases:
        print(f"== {label}", file=sys.stderr, flush=True)
        rows.append(Row(label, what, *measure([vnl(argv[0]), *argv[1:]], work)))
    return rows


def tiny400() -> list[str]:
    """The quick network with the released class count (400); its pool5 is 2048 wide too."""
    overrides = list(TINY)
    overrides[overrides.index("MODEL.NUM_CLASSES") + 1] = "400"
    return overrides


def per_thousand(work: Path, sizes: Sizes, kind: str) -> float:
    """Bytes of a results (``kind`` 'results') or per-view features file for 1000 videos: the
    file of the first list size plus the growth per video between the two sizes."""
    small, large = sizes.disk_videos
    command, flag = ("vnl-test", "--results") if kind == "results" else ("vnl-extract", "--output")
    found = []
    for n in (small, large):
        out = work / f"{kind}{n}.h5"
        argv = [vnl(command), "--weights", "tiny400.pt", "--list", f"disk{n}.txt", flag, str(out)]
        print(f"== {command} ({n} videos, for the file size)", file=sys.stderr, flush=True)
        measure([*argv, "--workers", "0", "--no-progress"], work)
        found.append(disk_bytes(out))
    growth = (found[1] - found[0]) / (large - small)
    return found[0] + growth * (1000 - small)


def disk_rows(work: Path, sizes: Sizes) -> list[tuple[str, float, str]]:
    """(what, bytes, how measured)."""
    write = (
        "import sys, nonlocal_net as nl\n"
        "from nonlocal_net.converters.synthetic import write_synthetic_checkpoint\n"
        "write_synthetic_checkpoint(sys.argv[1], nl.get_cfg(sys.argv[2], sys.argv[3:]))\n"
    )
    argv = [sys.executable, "-c", write, "tiny400.pkl", MODEL, *tiny400()]
    subprocess.run(argv, cwd=work, check=True)
    measure([vnl("vnl-convert"), "tiny400.pkl", "tiny400.pt", "--model", MODEL, *tiny400()], work)
    growth = f"{sizes.disk_videos[0]} and {sizes.disk_videos[1]} videos, extrapolated"
    return [
        ("the environment (.venv)", environment_bytes(), "`sys.prefix` and site-packages"),
        ("the demo's output (`vnl-demo`)", disk_bytes(work / "demo"), "all files"),
        ("a Caffe2 training checkpoint (.pkl, momentum)", disk_bytes(work / "model.pkl"), ""),
        ("a converted checkpoint (.pt)", disk_bytes(work / "model.pt"), ""),
        ("a training checkpoint (`vnl-train`: .pt + .pkl)", disk_bytes(work / "run"), "all files"),
        ("an ONNX export (.onnx)", disk_bytes(work / "model.onnx"), ""),
        ("a torch.export file (.pt2)", disk_bytes(work / "model.pt2"), ""),
        ("a results file per 1000 videos", per_thousand(work, sizes, "results"), growth),
        ("a features file per 1000 videos (per view)", per_thousand(work, sizes, "feat"), growth),
    ]


def table(sizes: Sizes, rows: list[Row], disk: list, load: tuple, seconds: float) -> str:
    torch_line = f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads)"
    lines = [
        "# What each command costs",
        "",
        "Generated by `benchmarks/bench_costs.py` (`make bench`; do not edit by hand) in one run "
        f"of {seconds:.0f} s. Network: {sizes.network}; the Caffe2 checkpoint is a training "
        "checkpoint written as the original writes one (momentum, `lr`, `model_iter`), videos "
        f"are synthetic MPEG-4 `.mp4` of {sizes.frames} frames at {sizes.width}x{sizes.height}. "
        "Each row is one fresh process on the CPU: wall time, CPU seconds (user + system, "
        "decoding processes included) and the peak resident set of its largest process "
        "(`ru_maxrss`). `vnl-test`, `vnl-extract` and `vnl-train` decode in the process "
        "(`--workers 0`).",
        "",
        f"Machine: {machine(torch_line)}. Load average (1/5/15 min) before: "
        + " / ".join(f"{x:.2f}" for x in load[0])
        + ", after: "
        + " / ".join(f"{x:.2f}" for x in load[1])
        + " (a load above the core count means other work shared the CPU: wall times grow, "
        "CPU seconds and memory much less).",
        "",
        "| command | input | wall s | CPU s | peak RSS |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| `{r.command}` | {r.input} | {r.wall:.1f} | {r.cpu:.1f} | "
            f"{human(r.peak_mib * 2**20)} |"
        )
    lines += ["", "| on disk | size | measured |", "| --- | ---: | --- |"]
    for what, size, how in disk:
        lines.append(f"| {what} | {human(size)} | {how or 'the file'} |")
    lines += [
        "",
        "Per 1000 videos: the file of the smaller list plus 1000 - that many times its growth "
        "per video up to the larger list, on a network with the released class count (400) "
        "and pool5 width (2048); `vnl-extract --per-video` writes one row per video instead of "
        "30.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny network and videos, to check the script"
    )
    parser.add_argument(
        "--output",
        help="where the table goes ('-' stdout); default benchmarks/costs.md, which --quick "
        "never writes",
    )
    args = parser.parse_args(argv)
    output = Path(args.output) if args.output not in (None, "-") else None
    if args.quick and (args.output is None or (output and output.resolve() == RESULTS)):
        parser.error("--quick needs --output PATH or '-' (never the committed table)")
    sizes = QUICK if args.quick else FULL
    start, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_costs_") as tmp:
        work = Path(tmp)
        make_inputs(work, sizes)
        rows = command_rows(work, sizes)
        disk = disk_rows(work, sizes)
        shutil.rmtree(work / "demo", ignore_errors=True)
    text = table(sizes, rows, disk, (load_before, os.getloadavg()), time.perf_counter() - start)
    if output is None and args.output == "-":
        print(text)
    else:
        with atomic_write(output or RESULTS, "w") as f:
            f.write(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
