"""Benchmark: converting a released-size Caffe2 checkpoint (time and peak memory).

Writes a checkpoint shaped exactly like the released ``i3d_nonlocal_8x8_IN_pretrain_400k.pkl``
(every parameter and BN statistic, a momentum blob per trainable parameter, ``lr``,
``model_iter``; protocol 2, wrapped; random values) with the converter's own writer, then runs
the command line in fresh processes and measures each one's wall time and peak resident memory
(``ru_maxrss``, read by a small launcher process around it):

* ``import`` - only ``import nonlocal_net.converters`` (the interpreter + torch baseline);
* ``convert -> .pt`` and ``convert -> .safetensors`` - ``vnl-convert SRC DST --model ...``;
* ``export -> .pkl`` - ``vnl-convert DST.pt OUT.pkl --to-caffe2``;
* ``read_caffe2_pkl`` of the whole file, momentum included (the Python API), and, for comparison,
  the standard ``pickle.load(f, encoding="latin1")`` that third-party converters use.

Results go to ``benchmarks/convert.md`` (generated; do not edit by hand).

    python benchmarks/bench_convert.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from machine_info import machine

from nonlocal_net.converters import write_caffe2_pkl
from nonlocal_net.converters.synthetic import synthetic_checkpoint_blobs
from nonlocal_net.utils.io import atomic_write

MODEL = "i3d_nonlocal_8x8_IN_pretrain_400k"
OUT = Path(__file__).with_name("convert.md")


# Runs the command given on its command line and reports its wall time and peak RSS. A small
# launcher is used because a child forked from a large process (this benchmark holds the blobs)
# starts with that process's resident set, which ru_maxrss would count.
LAUNCHER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": done.returncode, "wall": wall, "peak_kib": peak_kib,
                  "stderr": done.stderr.decode(errors="replace")[-2000:]}))
"""


READ = (
    "import sys; from nonlocal_net.converters import read_caffe2_pkl; read_caffe2_pkl(sys.argv[1])"
)
# What third-party converters do (executes whatever the file names; fine for our own file).
PICKLE = (
    "import pickle, sys; import nonlocal_net.converters; "
    "pickle.load(open(sys.argv[1], 'rb'), encoding='latin1')"
)


def run_measured(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one fresh process running ``argv``."""
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *argv], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result['rc']}):\n{result['stderr']}")
    return result["wall"], result["peak_kib"] / 1024.0  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement")
    args = parser.parse_args(argv)
    py = sys.executable
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{MODEL}.pkl"
        blobs = synthetic_checkpoint_blobs(MODEL)
        n_blobs = len(blobs)
        write_caffe2_pkl(blobs, src)
        del blobs
        size_mib = src.stat().st_size / 2**20
        cli = [py, "-m", "nonlocal_net.converters"]
        cases = [
            (
                "import nonlocal_net.converters (baseline)",
                [py, "-c", "import nonlocal_net.converters"],
            ),
            ("convert .pkl -> .pt", [*cli, str(src), f"{tmp}/m.pt", "--model", MODEL, "-q"]),
            (
                "convert .pkl -> .safetensors",
                [*cli, str(src), f"{tmp}/m.safetensors", "--model", MODEL, "-q"],
            ),
            (
                "export .pt -> .pkl (--to-caffe2)",
                [*cli, f"{tmp}/m.pt", f"{tmp}/b.pkl", "--to-caffe2", "-q"],
            ),
            ("read_caffe2_pkl, momentum included", [py, "-c", READ, str(src)]),
            (
                "for comparison: pickle.load(encoding='latin1') (unsafe)",
                [py, "-c", PICKLE, str(src)],
            ),
        ]
        rows = []
        for label, command in cases:
            runs = [run_measured(command) for _ in range(args.repeats)]
            wall = statistics.median(r[0] for r in runs)
            peak = max(r[1] for r in runs)
            rows.append((label, wall, peak))
            print(f"{label}: {wall:.2f} s, peak {peak:.0f} MiB", flush=True)
    baseline = rows[0][2]
    lines = [
        "# Converter benchmark",
        "",
        "Generated by `benchmarks/bench_convert.py` (`make bench`); do not edit by hand.",
        "",
        f"Source: a checkpoint shaped like the released `{MODEL}.pkl` (R50 I3D with 5 non-local "
        f"blocks: {n_blobs} entries = every parameter and BN statistic, a momentum blob per "
        f"trainable parameter, `lr`, `model_iter`; pickle protocol 2, wrapped), "
        f"**{size_mib:.0f} MiB**. Each row is a fresh Python process (`python -m "
        f"nonlocal_net.converters ...` or `python -c ...`); time is the median of "
        f"{args.repeats} runs, peak is the largest resident set size (`ru_maxrss`) among them.",
        "",
        "| operation | seconds | peak RSS (MiB) | peak / file size | (peak - import) / file size |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, wall, peak in rows:
        lines.append(
            f"| {label} | {wall:.2f} | {peak:.0f} | {peak / size_mib:.2f} | "
            f"{(peak - baseline) / size_mib:.2f} |"
        )
    host = machine(f"torch {torch.__version__}", f"numpy {np.__version__}")
    lines += [
        "",
        f"Machine: {host}. Load average (1 min) before / after the runs: "
        f"{load_before:.1f} / {os.getloadavg()[0]:.1f} (other processes share the cores when it "
        f"exceeds 0; times grow with it, memory does not).",
        "",
    ]
    with atomic_write(OUT, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
