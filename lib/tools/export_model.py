"""``vnl-export``: export a converted model to ONNX or ``torch.export``, checked against strict
PyTorch.

vnl-export --weights i3d_nonlocal_8x8.pt --output i3d_nonlocal_8x8.onnx            # test head
vnl-export --weights i3d_nonlocal_8x8.pt --output i3d_nonlocal_8x8_val.pt2 --split val
"""

from __future__ import annotations

import argparse
import logging

from ..engine.export import (
    FORMATS,
    MAX_REL_ERROR,
    ExportOptions,
    export_format,
    export_model,
    is_exported_file,
)
from ..pretrained import load_model  # a weights file or a released model's name
from ..utils.cli import add_overrides_argument, finite_float, nonnegative_int
from ..utils.io import check_destination, remove_stale_temporaries
from ..utils.lock import output_lock
from ..utils.log import EXIT_OK, add_logging_arguments, run_reporting_errors, setup_logging
from ..utils.log import terminal_safe as safe

logger = logging.getLogger("nonlocal_net.export")

PROG = "vnl-export"


def _bound(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a converted model to ONNX (.onnx: the dynamo exporter at its current "
        "opset, dynamic batch, checked with onnxruntime on the CPU) or torch.export (.pt2, "
        "dynamic batch, checked with torch.export.load). The written file is run on a random "
        "clip and compared with strict PyTorch; a file whose max relative error exceeds the "
        "bound is not left behind.",
        epilog=f"The input is clips (batch, 3, TRAIN.VIDEO_LENGTH, crop, crop): crop "
        f"TRAIN.CROP_SIZE for --split val (FC logits), TEST.SCALE for --split test "
        f"(fully-convolutional head, averaged softmax). Trailing KEY VALUE pairs override the "
        f"checkpoint's config. OUTPUT is never an input; an existing OUTPUT is replaced only "
        f"when vnl-export wrote it, else --overwrite. Exit status: 0 done, 2 error (one line "
        f"'{PROG}: error: ...', the max relative error above the bound included), 130/143 "
        f"interrupted.",
    )
    parser.add_argument(
        "--weights",
        required=True,
        help="converted checkpoint (.pt or .safetensors), or a released model's name",
    )
    parser.add_argument(
        "--output", required=True, help=f"the file to write: {' or '.join(FORMATS)}"
    )
    parser.add_argument(
        "--split",
        choices=["val", "test"],
        default="test",
        help="val: the FC head (logits, 224 crops); test: the fully-convolutional head "
        "(averaged softmax, 256 crops) (default test)",
    )
    parser.add_argument(
        "--max-rel-error",
        type=_bound,
        default=MAX_REL_ERROR,
        help=f"refuse the file above this max relative error vs strict PyTorch "
        f"(default {MAX_REL_ERROR:g})",
    )
    parser.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed of the random check clip"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT even when it is not a file vnl-export wrote (never an input)",
    )
    add_logging_arguments(parser)
    add_overrides_argument(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    if len(args.opts) % 2:
        raise ValueError(f"overrides must be KEY VALUE pairs, got {len(args.opts)} items")
    export_format(args.output)  # the suffix and the format's packages, before any model
    check_destination(
        args.output,
        [args.weights],
        what="exported model",
        is_own_output=is_exported_file,
        replace_foreign=args.overwrite,
    )
    with output_lock(args.output):
        remove_stale_temporaries(args.output)  # left by an export killed with SIGKILL
        model = load_model(args.weights, split=args.split, overrides=args.opts)
        options = ExportOptions(max_rel_error=args.max_rel_error, seed=args.seed)
        result = export_model(model, args.output, options)
    shape = "x".join(str(d) for d in result.input_shape)
    opset = f", opset {result.opset}" if result.opset else ""
    print(
        f"wrote {safe(result.path)} ({result.format}{opset}, {args.split} head, input clips "
        f"{shape})"
    )
    print(
        f"max relative error vs strict PyTorch on a random clip: {result.max_rel_error:.3g} "
        f"({result.runtime}; bound {result.bound:g})"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    setup_logging(args.verbose - args.quiet)
    return run_reporting_errors(PROG, lambda: _run(args), verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
