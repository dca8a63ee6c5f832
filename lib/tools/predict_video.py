"""``vnl-predict``: classify one video with the original's 30-view test.

vnl-predict video.mp4 --weights i3d_nonlocal_8x8.pt --labels classids.json --topk 5
vnl-predict video.mp4 --weights i3d_nonlocal_8x8.pt --features feats.npy
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from ..datasets.class_names import check_class_count, class_names_for, read_class_names
from ..datasets.decoders import BACKENDS
from ..engine.inference import add_precision_arguments
from ..engine.predict import PredictOptions, predict_video
from ..utils.cli import (
    add_device_argument,
    add_overrides_argument,
    add_progress_argument,
    positive_int,
)
from ..utils.io import atomic_write, check_destination
from ..utils.lock import output_lock
from ..utils.log import (
    EXIT_OK,
    add_logging_arguments,
    run_reporting_errors,
    setup_logging,
    terminal_safe,
)

logger = logging.getLogger("nonlocal_net.predict")


PROG = "vnl-predict"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Classify one video: decode it once, run the converted model on its 30 "
        "test views (10 clips x 3 crops) and print the top classes. The score is the "
        "original's video score (per-view averaged softmax summed over the views) divided by "
        "the number of views.",
        epilog="Trailing KEY VALUE pairs override the checkpoint's config. Exit status: 0 done, "
        "2 error (one line 'vnl-predict: error: ...').",
    )
    parser.add_argument("video", help="video file")
    parser.add_argument(
        "--weights",
        required=True,
        help="converted checkpoint (.pt), or a released model's name "
        "(downloaded and converted once, then cached)",
    )
    parser.add_argument(
        "--labels",
        help="class names: the original's classids.json (name -> id) or one name per line "
        "(default: the built-in Kinetics-400 names for a 400-class model, else class indices)",
    )
    parser.add_argument("--topk", type=positive_int, default=5, help="classes to print (default 5)")
    parser.add_argument(
        "--features",
        help="save the pooled res5 (pool5) features of every view here, float32 (views, 2048) "
        "in view order 10*ct + j (.npy)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --features even when it is not a .npy file",
    )
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="opencv", help="decoder")
    parser.add_argument("--batch-size", type=positive_int, help="views per forward pass")
    add_device_argument(parser)
    parser.add_argument(
        "--no-channels-last",
        action="store_true",
        help="keep the default memory format (channels_last_3d is faster)",
    )
    add_precision_arguments(parser)
    add_progress_argument(parser)
    add_logging_arguments(parser)
    add_overrides_argument(parser)
    return parser


def _is_npy(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


def options_from_args(args: argparse.Namespace) -> PredictOptions:
    """The :class:`PredictOptions` of parsed ``vnl-predict`` arguments."""
    return PredictOptions(
        overrides=args.opts,
        backend=args.backend,
        batch_size=args.batch_size,
        device=args.device,
        topk=args.topk,
        features=args.features is not None,
        channels_last=not args.no_channels_last,
        precision=args.precision,
        compile=args.compile,
        progress=not args.no_progress,
    )


def _run(args: argparse.Namespace) -> int:
    if args.features:
        check_destination(
            args.features,
            [args.video, args.weights, args.labels],
            what="features file",
            is_own_output=_is_npy,
            replace_foreign=args.overwrite,
        )
    # a labels file is read and checked before the model; its count once the model is known
    given = read_class_names(args.labels) if args.labels else None
    prediction = predict_video(args.video, args.weights, options=options_from_args(args))
    if given is not None:
        check_class_count(given, len(prediction.scores), args.labels)
    names = given if given is not None else class_names_for(len(prediction.scores))
    if args.features:
        with output_lock(args.features), atomic_write(args.features) as f:
            np.save(f, prediction.features)
        logger.info("features %s written to %s", prediction.features.shape, args.features)
    meta = prediction.meta
    print(
        f"{terminal_safe(meta.path)}: {meta.num_frames} frames of {meta.width}x{meta.height}, "
        f"{len(prediction.view_scores)} views"
    )
    for rank, (index, score) in enumerate(prediction.topk, 1):
        if not np.isfinite(score):
            logger.warning("class %d has a non-finite score: the weights are broken", index)
        label = terminal_safe(names[index]) if names else str(index)
        print(f"{rank:>2}. {score:.4f}  {label}" + (f"  ({index})" if names else ""))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    setup_logging(args.verbose - args.quiet)
    return run_reporting_errors(PROG, lambda: _run(args), verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
