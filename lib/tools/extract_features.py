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

from ..datasets.decoders import BACKENDS
from ..engine.extract import ExtractOptions, extract_features, layer_names
from ..engine.inference import add_precision_arguments
from ..pretrained import load_model  # a weights file or a released model's name
from ..utils.cli import (
    add_device_argument,
    add_overrides_argument,
    add_progress_argument,
    nonnegative_int,
    positive_int,
)
from ..utils.log import (
    EXIT_OK,
    add_logging_arguments,
    run_reporting_errors,
    setup_logging,
    terminal_safe,
)

__all__ = ["build_parser", "main"]

PROG = "vnl-extract"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Extract features of every video of a list: each video is decoded once "
        "and cut into the original's 30 test views (10 clips x 3 crops); a layer's output "
        "(default pool5, the pooled res5 feature of 2048 values) averaged over its positions "
        "is written per view (or averaged per video) to a crash-safe, resumable HDF5 file "
        "that records the protocol, layer, weights and precision mode.",
        epilog="Rows are in views/features (feature_dim wide), with views/video_id and "
        "views/view_index (-1 for --per-video); the header names the layer and the precision "
        "mode. Trailing KEY VALUE pairs override the "
        "checkpoint's config. The output is locked while a run writes it, is never one of the "
        "inputs, and a file that is not a features file is replaced only with --overwrite. "
        "Views whose features hold NaN/Inf are failed views: counted, reported, not written. "
        "Exit status: 0 done, 1 internal error (traceback), 2 error (one line "
        "'vnl-extract: error: ...'), 130/143 interrupted.",
    )
    parser.add_argument(
        "--weights",
        required=True,
        help="converted checkpoint (.pt), or a released model's name "
        "(downloaded and converted once, then cached)",
    )
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
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output (even a file this command did not write) and start again",
    )
    parser.add_argument("--batch-size", type=positive_int, help="views per forward pass")
    parser.add_argument(
        "--workers",
        type=nonnegative_int,
        default=min(4, os.cpu_count() or 1),
        help="decoding processes (0: decode in this process)",
    )
    parser.add_argument("--limit", type=nonnegative_int, help="only the first K list entries")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="opencv", help="decoder")
    add_device_argument(parser)
    parser.add_argument(
        "--flush-every", type=positive_int, default=16, help="videos per part file (default 16)"
    )
    parser.add_argument(
        "--decode-memory-mb", type=positive_int, default=1024, help="as in vnl-test"
    )
    add_precision_arguments(parser)
    add_progress_argument(parser)
    add_logging_arguments(parser)
    add_overrides_argument(parser)
    return parser


def options_from_args(args: argparse.Namespace) -> ExtractOptions:
    """The :class:`ExtractOptions` of parsed ``vnl-extract`` arguments."""
    return ExtractOptions(
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


def _summary_line(summary: dict) -> str:
    """The one line vnl-extract prints: rows, layer, mode, videos, what went wrong."""
    line = (
        f"{summary['output']}: {summary['num_rows']} rows of {summary['feature_dim']} "
        f"({summary['layer']}, precision {summary['precision']}) for "
        f"{summary['num_videos']} videos; {summary['num_decode_errors']} undecodable, "
        f"{summary['num_bad_list_lines']} bad list lines"
    )
    if summary.get("num_failed_views"):
        line += (
            f"; FAILED VIEWS: {summary['num_failed_views']} views in "
            f"{summary['num_videos_with_failed_views']} videos had NaN/Inf features "
            f"(not written)"
        )
    if not summary["num_rows"]:
        line += f"; no views: nothing extracted from {summary['num_entries']} list entries"
    return line


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.list_layers:
        model = load_model(args.weights, split="test", overrides=args.opts)
        print("\n".join(layer_names(model)))
        return EXIT_OK
    if not args.list_file or not args.output:
        parser.error("--list and --output are required (unless --list-layers)")
    summary = extract_features(
        args.list_file, args.weights, args.output, options=options_from_args(args)
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(terminal_safe(_summary_line(summary)))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(args.verbose - args.quiet if rank == 0 else min(-1, args.verbose - args.quiet))
    return run_reporting_errors(PROG, lambda: _run(args, parser), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
