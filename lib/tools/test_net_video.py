"""``vnl-test``: the original's Kinetics test (``tools/test_net_video.py``) on a converted model.

Single process::

    vnl-test --weights i3d_nonlocal_8x8.pt --list vallist.txt --data-root /data/k400 \\
        --results results.h5

Several processes (videos sharded, identical numbers)::

    torchrun --nproc_per_node=8 $(which vnl-test) --weights ... --list ... --results results.h5
"""

from __future__ import annotations

import argparse
import logging
import os

from ..datasets.decoders import BACKENDS
from ..engine.evaluator import EvalOptions, evaluate
from ..engine.inference import add_precision_arguments
from ..engine.metrics import format_report
from ..utils.cli import (
    add_device_argument,
    add_overrides_argument,
    add_progress_argument,
    nonnegative_int,
    positive_int,
)
from ..utils.log import EXIT_OK, add_logging_arguments, run_reporting_errors, setup_logging

logger = logging.getLogger("nonlocal_net.test")


PROG = "vnl-test"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a converted checkpoint on a video list with the original's "
        "fully-convolutional 30-view test (10 clips x 3 crops at 256) and print the original's "
        "report: top-1/top-5 over all list entries, clip and clip-1 accuracy, empty/incomplete "
        "videos, failed (non-finite) views, plus throughput. Run under torchrun to shard the "
        "videos across processes.",
        epilog="Trailing KEY VALUE pairs override the checkpoint's config, as on the "
        "original's command line (e.g. TEST.SCALE 256). The results and report files are "
        "locked while a run writes them and are never one of the inputs. Exit status: 0 done, "
        "2 error (one line 'vnl-test: error: ...'), 130/143 interrupted.",
    )
    parser.add_argument(
        "--weights",
        required=True,
        help="converted checkpoint (.pt), or a released model's name "
        "(downloaded and converted once, then cached)",
    )
    parser.add_argument("--list", required=True, dest="list_file", help="'<path> <label>' lines")
    parser.add_argument(
        "--data-root",
        help="folder of the videos: relative list paths are taken under it, absolute ones "
        "re-rooted under it (default: relative to the list file)",
    )
    parser.add_argument("--results", help="HDF5 file for the per-view scores (crash-safe)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from --results"
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing --results/--report (even files this command did not write) and "
        "start again",
    )
    parser.add_argument(
        "--report",
        help="JSON report path (default: <results>.report.json, or vnl_test_report.json)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        help="views per forward pass (default TEST.BATCH_SIZE / NUM_GPUS of the config, the "
        "original's per-GPU batch; batches never mix videos)",
    )
    parser.add_argument(
        "--workers",
        type=nonnegative_int,
        default=min(4, os.cpu_count() or 1),
        help="decoding processes (0: decode in this process)",
    )
    parser.add_argument(
        "--limit", type=nonnegative_int, help="evaluate only the first K list entries"
    )
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="opencv", help="decoder")
    add_device_argument(parser)
    parser.add_argument(
        "--flush-every",
        type=positive_int,
        default=16,
        help="videos per results part file (default 16)",
    )
    parser.add_argument(
        "--decode-memory-mb",
        type=positive_int,
        default=1024,
        help="RGB frames a worker keeps from one decode; longer videos are decoded twice, "
        "keeping only the frames the clips use (default 1024)",
    )
    parser.add_argument(
        "--allow-tf32",
        action="store_true",
        help="allow TF32 on Ampere+ GPUs (faster, not the original's fp32 numerics)",
    )
    parser.add_argument(
        "--no-channels-last",
        action="store_true",
        help="keep the default memory format (channels_last_3d is faster; results differ only "
        "by float32 rounding)",
    )
    add_precision_arguments(parser)
    add_progress_argument(parser)
    add_logging_arguments(parser)
    add_overrides_argument(parser)
    return parser


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The :class:`EvalOptions` of parsed ``vnl-test`` arguments."""
    report_path = args.report
    if report_path is None and args.results is None:
        report_path = "vnl_test_report.json"
    return EvalOptions(
        overrides=args.opts,
        data_root=args.data_root,
        results=args.results,
        resume=args.resume,
        overwrite=args.overwrite,
        report_path=report_path,
        batch_size=args.batch_size,
        workers=args.workers,
        limit=args.limit,
        backend=args.backend,
        device=args.device,
        flush_every=args.flush_every,
        decode_memory_mb=args.decode_memory_mb,
        progress=not args.no_progress,
        allow_tf32=args.allow_tf32,
        channels_last=not args.no_channels_last,
        precision=args.precision,
        compile=args.compile,
    )


def _run(args: argparse.Namespace, rank: int) -> int:
    report = evaluate(args.list_file, args.weights, options=options_from_args(args))
    if rank == 0:
        print(format_report(report))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(args.verbose - args.quiet if rank == 0 else min(-1, args.verbose - args.quiet))
    return run_reporting_errors(PROG, lambda: _run(args, rank), verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
