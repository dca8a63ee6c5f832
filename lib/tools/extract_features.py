"""``vnl-extract``: features of every video of a list, with the evaluation's pipeline.

Single process::

    vnl-extract --weights i3d_nonlocal_8x8.pt --list videos.txt --output features.h5

Several processes (videos sharded, identical rows)::

    torchrun --nproc_per_node=8 $(which vnl-extract) --weights ... --list ... --output f.h5
"""

from __future__ import annotations

import argparse
import os
import sys

from ..core.config import ConfigError
from ..core.weights_file import WeightsFileError
from ..datasets.decoders import BACKENDS, VideoDecodeError
from ..engine.extract import extract_features, layer_names
from ..engine.inference import add_precision_arguments
from ..engine.results import ResultsError
from ..models.model_builder import load_model
from ..utils.log import add_logging_arguments, run_reporting_errors, setup_logging

__all__ = ["build_parser", "main"]

PROG = "vnl-extract"
EXPECTED_ERRORS = (
    WeightsFileError,
    ConfigError,
    ResultsError,
    VideoDecodeError,
    FileNotFoundError,
    ValueError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Extract features of every video of a list: each video is decoded once "
        "and cut into the original's 30 test views (10 clips x 3 crops); a layer's output "
        "(default pool5, the pooled res5 feature of 2048 values) averaged over its positions "
        "is written per view (or averaged per video) to a crash-safe, resumable HDF5 file "
        "that records the protocol, layer, weights and precision mode.",
        epilog="Rows are in views/features (= views/scores), with views/video_id and "
        "views/view_index (-1 for --per-video). Trailing KEY VALUE pairs override the "
        "checkpoint's config. Exit status: 0 done, 1 error.",
    )
    parser.add_argument("--weights", required=True, help="converted checkpoint (.pt)")
    parser.add_argument("--list", dest="list_file", help="'<path> <label>' lines")
    parser.add_argument("--output", help="HDF5 file for the features (crash-safe)")
    parser.add_argument("--data-root", help="folder of the videos (as in vnl-test)")
    parser.add_argument(
        "--layer", default="pool5", help="pool5 (default) or a module name, e.g. res4, res5.2"
    )
    parser.add_argument("--list-layers", action="store_true", help="print the layer names and exit")
    parser.add_argument(
        "--per-video", action="store_true", help="one row per video: the mean over its views"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted run")
    mode.add_argument("--overwrite", action="store_true", help="replace --output, start again")
    parser.add_argument("--batch-size", type=int, help="views per forward pass")
    parser.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes"
    )
    parser.add_argument("--limit", type=int, help="only the first K list entries")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="opencv", help="decoder")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument(
        "--flush-every", type=int, default=16, help="videos per part file (default 16)"
    )
    parser.add_argument("--decode-memory-mb", type=int, default=1024, help="as in vnl-test")
    add_precision_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_logging_arguments(parser)
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    return parser


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.list_layers:
        model = load_model(args.weights, split="test", overrides=args.opts)
        print("\n".join(layer_names(model)))
        return 0
    if not args.list_file or not args.output:
        raise ValueError("--list and --output are required (unless --list-layers)")
    if args.limit is not None and args.limit < 0:
        raise ValueError("--limit must be >= 0")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if os.path.abspath(args.output) in {
        os.path.abspath(args.weights),
        os.path.abspath(args.list_file),
    }:
        raise ValueError(f"--output {args.output} is one of the inputs")
    summary = extract_features(
        args.list_file,
        args.weights,
        args.output,
        overrides=args.opts,
        data_root=args.data_root,
        layer=args.layer,
        per_video=args.per_video,
        resume=args.resume,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        workers=args.workers,
        limit=args.limit,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        flush_every=args.flush_every,
        decode_memory_mb=args.decode_memory_mb,
        progress=not args.no_progress,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"{summary['output']}: {summary['num_rows']} rows of {summary['feature_dim']} "
            f"({summary['layer']}, precision {summary['precision']}) for "
            f"{summary['num_videos']} videos; {summary['num_decode_errors']} undecodable, "
            f"{summary['num_bad_list_lines']} bad list lines"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(args.verbose - args.quiet if rank == 0 else min(-1, args.verbose - args.quiet))
    return run_reporting_errors(
        PROG, lambda: _run(args, parser), EXPECTED_ERRORS, verbose=args.verbose
    )


if __name__ == "__main__":
    sys.exit(main())
