"""Built-in demo: the whole chain, offline, on synthetic data.

``python -m nonlocal_net.tools.demo`` (``make demo``, ``vnl-demo``) does what a user does with a
released checkpoint, without downloading anything:

1. writes a Caffe2 training checkpoint of a released model the way the original wrote it
   (Python-2 protocol-2 pickle, ``{'blobs': ...}`` with momentum, ``lr`` and ``model_iter``;
   random values with trained-like statistics),
2. converts it (``vnl-convert``),
3. verifies the conversion layer by layer against the NumPy executor of the original Caffe2
   graph (``vnl-verify``),
4. writes a few synthetic videos (OpenCV) and a list file in the original format, including an
   undecodable and an empty file,
5. evaluates the converted model with the original's 30-view test (``vnl-test``) and prints
   the report.

``--zoo`` instead builds every released model and prints its parameter count and output shape.
The weights are random, so the accuracy in step 5 is chance: the demo shows the chain, the
parity verdict in step 3 is the part that carries over to real checkpoints.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..converters.convert_file import convert_checkpoint
from ..converters.synthetic import write_synthetic_checkpoint
from ..core.zoo import get_zoo_entry, list_models
from ..datasets.synthetic import DEFAULT_SPECS, write_dataset
from ..engine import evaluate
from ..engine.metrics import format_report
from ..models import build_model
from ..utils.cli import nonnegative_int
from ..utils.log import add_logging_arguments, run_reporting_errors, setup_logging
from ..verify import verify_checkpoint

logger = logging.getLogger("nonlocal_net.demo")

PROG = "vnl-demo"
DEFAULT_MODEL = "c2d_nonlocal_8x8_IN_pretrain_400k"
# landscape (already 256 high), portrait (scaled to 255 columns), a clip shorter than one
# sampling window (frame indices wrap): three of the synthetic specs, plus the broken files
DEMO_VIDEOS = tuple(DEFAULT_SPECS[i] for i in (0, 1, 3))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Offline demo of the whole chain on synthetic data: write a Caffe2 "
        "checkpoint, convert it, verify it against the original graph, write videos and a "
        "list, evaluate with the original 30-view protocol.",
        epilog="Exit status: 0 done, 1 the verification failed, 2 error (one line "
        "'vnl-demo: error: ...').",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"zoo name of the released model to imitate (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("demo_output"),
        help="folder for the checkpoint, converted weights, videos and results "
        "(default ./demo_output)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    parser.add_argument(
        "--workers",
        type=nonnegative_int,
        default=1,
        help="decoding processes for the evaluation",
    )
    parser.add_argument(
        "--zoo",
        action="store_true",
        help="instead: build every released model, count its parameters, run one clip",
    )
    add_logging_arguments(parser)
    return parser.parse_args(argv)


def _step(number: int, text: str) -> None:
    print(f"\n[{number}/5] {text}", flush=True)


def run_chain(model: str, output: Path, seed: int = 0, workers: int = 1) -> int:
    """Steps 1-5; returns the process exit status (non-zero when the verification fails)."""
    entry = get_zoo_entry(model)
    output.mkdir(parents=True, exist_ok=True)
    pkl = output / entry.filename
    pt = output / f"{entry.name}.pt"

    _step(1, f"Caffe2 checkpoint of {entry.name} (as the original's training code writes it)")
    start = time.perf_counter()
    blobs = write_synthetic_checkpoint(pkl, entry.name, seed=seed)
    momenta = sum(name.endswith("_momentum") for name in blobs)
    print(
        f"  wrote {pkl} ({pkl.stat().st_size / 2**20:.0f} MiB, {len(blobs)} blobs of which "
        f"{momenta} momenta) in {time.perf_counter() - start:.1f} s"
    )

    _step(2, "convert (vnl-convert)")
    start = time.perf_counter()
    report = convert_checkpoint(pkl, pt, entry.name)
    print(f"  {report.summary()}")
    print(f"  wrote {pt} in {time.perf_counter() - start:.1f} s")

    _step(3, "verify against the original Caffe2 graph run in NumPy (vnl-verify)")
    start = time.perf_counter()
    parity = verify_checkpoint(pkl, pt, model=entry.name)
    print(parity.format_table())
    print(f"  {parity.verdict()} ({time.perf_counter() - start:.1f} s)")
    if not parity.ok:
        return 1

    _step(4, "synthetic videos and a list file in the original format")
    dataset = write_dataset(output / "videos", DEMO_VIDEOS)
    print(
        f"  wrote {dataset.num_entries} list entries to {dataset.list_file} "
        f"({len(DEMO_VIDEOS)} videos, an undecodable file, an empty file)"
    )

    _step(5, "evaluate with the original 30-view fully-convolutional test (vnl-test)")
    results = evaluate(
        dataset.list_file,
        pt,
        results=output / "results.h5",
        overwrite=True,
        workers=workers,
    )
    print(format_report(results))
    print(f"\nEverything is under {output}/ (results.h5 can be re-scored with vnl-score).")
    return 0


def run_zoo() -> int:
    """Build every released model in the test split, count it, run one random clip."""
    rows = []
    for name in tqdm(list_models(), desc="models", unit="model"):
        start = time.perf_counter()
        model = build_model(name, split="test")
        frames = model.cfg.TRAIN.VIDEO_LENGTH
        with torch.inference_mode():
            out = model(torch.randn(1, 3, frames, 256, 256))
        params = sum(p.numel() for p in model.parameters())
        rows.append(
            (
                name,
                params,
                len(model.state_dict()),
                f"1x3x{frames}x256x256",
                "x".join(map(str, out.shape)),
                time.perf_counter() - start,
            )
        )
    width = max(len(r[0]) for r in rows)
    print(
        f"{'model':<{width}}  {'params':>11}  {'blobs':>5}  {'input':>16}  {'output':>6}  "
        f"{'seconds':>7}"
    )
    for name, params, blobs, inp, shape, secs in rows:
        print(f"{name:<{width}}  {params:>11,}  {blobs:>5}  {inp:>16}  {shape:>6}  {secs:>7.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose - args.quiet - 1)  # the demo prints its own story
    if args.zoo:
        return run_reporting_errors(PROG, run_zoo, verbose=args.verbose)
    return run_reporting_errors(
        PROG,
        lambda: run_chain(args.model, args.output, seed=args.seed, workers=args.workers),
        verbose=args.verbose,
    )


if __name__ == "__main__":
    sys.exit(main())
