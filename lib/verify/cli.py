"""``vnl-verify``: prove that a converted model computes what the original computes.

::

    vnl-verify SRC.pkl --model <zoo name> [KEY VALUE ...]           # converts SRC in memory
    vnl-verify SRC.pkl DST.pt [--model <zoo name>] [KEY VALUE ...]  # checks a converted file
    vnl-verify SRC.pkl --cfg FILE.yaml [--split val] [--frames T --crop S --seed N]
    vnl-verify SRC.pkl --model <zoo name> --video clip.mp4 [--view K]  # a real video's test view
    vnl-verify <zoo name> [...]             # the released .pkl, downloaded once into the cache

Runs the original network (reference executor, float64, on SRC's blobs) and the PyTorch model
(float32 and float64) on the same seeded random clip (or test view of a video), prints a
per-layer error table and a verdict. Exit status: 0 when every layer is within tolerance, 1
when one is not (the first diverging layer is named), 2 on bad arguments or unreadable files.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys

from ..converters.errors import Caffe2FormatError, ConversionError
from ..core.config import ConfigError
from ..core.hub import is_zoo_name
from ..core.weights_file import WeightsFileError
from ..core.zoo import UnknownModelError
from ..datasets import VideoDecodeError
from ..reference import Caffe2Error
from ..utils.cli import positive_int
from ..utils.io import atomic_write, check_destination
from ..utils.lock import output_lock
from ..utils.log import add_logging_arguments, run_reporting_errors, setup_logging
from .compare import DEFAULT_TOLERANCE
from .conversion import verify_checkpoint

__all__ = ["main", "parse_args"]

logger = logging.getLogger("nonlocal_net.verify")

PROG = "vnl-verify"
EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
_CFG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+")
EXPECTED_ERRORS = (
    Caffe2FormatError,
    ConversionError,
    ConfigError,
    WeightsFileError,
    UnknownModelError,
    Caffe2Error,
    VideoDecodeError,
    OSError,
    ValueError,
)

USAGE = """\
vnl-verify SRC.pkl [DST.pt] (--model NAME | --cfg FILE.yaml) [options] [KEY VALUE ...]
       vnl-verify SRC.pkl DST.pt [options] [KEY VALUE ...]"""

EPILOG = f"""\
The reference is an independent NumPy implementation of the original Caffe2 graph run on SRC's
own blobs (no converter involved); the port is SRC converted in memory, or DST. Per layer the
table shows max|port - ref| and the relative error max|port - ref| / max|ref|; a layer fails
above the tolerance (defaults: float32 {DEFAULT_TOLERANCE["float32"]:.0e}, \
float64 {DEFAULT_TOLERANCE["float64"]:.0e}).
Exit status 0: every layer agrees; 1: a layer diverges (the first one is named); 2: bad
arguments or unreadable input.

Examples (a released file, as downloaded; then the file vnl-convert wrote from it):
  vnl-verify i3d_nonlocal_8x8_IN_pretrain_400k.pkl --model i3d_nonlocal_8x8_IN_pretrain_400k
  vnl-verify i3d_nonlocal_8x8_IN_pretrain_400k.pkl i3d_nl_8x8.pt
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=USAGE,
        description="Check a conversion of a Caffe2 checkpoint of the original Non-local Neural "
        "Networks code: run the original network (reference executor) and the PyTorch model on "
        "the same clip and compare every layer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "args",
        nargs="*",
        metavar="SRC [DST] [KEY VALUE ...]",
        help="the Caffe2 .pkl (or a released model's name: its cached download), optionally a "
        "converted .pt/.safetensors to check instead of converting SRC in memory, then config "
        "overrides",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="NAME", help="zoo name of SRC's model")
    which.add_argument("--cfg", metavar="FILE.yaml", help="an original-format YAML config")
    parser.add_argument(
        "--split",
        choices=["test", "val"],
        default="test",
        help="'test': fully-convolutional head on 256 crops (default); 'val': FC head, 224 crops",
    )
    clip = parser.add_argument_group(
        "input clip (seeded random pixels, or a video's test views with --video)"
    )
    clip.add_argument(
        "--frames", type=int, default=None, help="clip length (default TRAIN.VIDEO_LENGTH)"
    )
    clip.add_argument(
        "--crop", type=int, default=None, help="crop size (default 256 for test, 224 for val)"
    )
    clip.add_argument(
        "--batch-size",
        "--batch",
        dest="batch",
        type=positive_int,
        default=1,
        help="clips in the batch (default 1)",
    )
    clip.add_argument("--seed", type=int, default=0, help="random seed of the clip (default 0)")
    clip.add_argument(
        "--video",
        metavar="PATH",
        help="use the original's test views of this video instead of random pixels "
        "(TRAIN.VIDEO_LENGTH frames; with --split val the central 224 crop of each view)",
    )
    clip.add_argument(
        "--view",
        type=int,
        default=0,
        metavar="K",
        help="first test view of --video (0-29, view 10*crop + clip; default 0); --batch N "
        "takes N consecutive views",
    )
    check = parser.add_argument_group("comparison")
    check.add_argument(
        "--tol",
        type=float,
        default=DEFAULT_TOLERANCE["float32"],
        metavar="REL",
        help="largest per-layer relative error of the float32 run "
        f"(default {DEFAULT_TOLERANCE['float32']:.0e})",
    )
    check.add_argument(
        "--tol-fp64",
        type=float,
        default=DEFAULT_TOLERANCE["float64"],
        metavar="REL",
        help=f"the same for the float64 run (default {DEFAULT_TOLERANCE['float64']:.0e})",
    )
    check.add_argument(
        "--runs",
        "--precision",
        dest="precision",
        choices=["both", "fp32", "fp64"],
        default="both",
        help="which runs of the port to compare (default both; --precision is the older name, "
        "not the inference commands' precision modes)",
    )
    check.add_argument(
        "--device", default="cpu", help="device of the port, e.g. cuda (TF32 is disabled)"
    )
    check.add_argument(
        "--reference-batch",
        choices=["real", "config"],
        default="real",
        help="'config' makes the reference bake TRAIN.BATCH_SIZE / NUM_GPUS into its non-local "
        "reshapes as the original did, to show how it mixes clips of another batch size",
    )
    parser.add_argument("--json", metavar="OUT.json", help="also write the report as JSON")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --json even when it is not a report vnl-verify wrote",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (default: on a terminal)"
    )
    add_logging_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    rest = list(args.args)
    if not rest:
        parser.error("SRC is required")
    args.src = rest.pop(0)
    args.dst = rest.pop(0) if rest and not _CFG_KEY.fullmatch(rest[0]) else None
    args.overrides = rest
    if len(rest) % 2:
        parser.error(f"overrides must be KEY VALUE pairs, got {len(rest)} items: {rest}")
    if args.dst is None and not (args.model or args.cfg) and is_zoo_name(args.src):
        args.model = args.src  # a released model's name is its own model
    if args.dst is None and not (args.model or args.cfg):
        parser.error("one of --model NAME or --cfg FILE.yaml is required without DST")
    if args.video and args.frames is not None:
        parser.error("--frames cannot be combined with --video (views have TRAIN.VIDEO_LENGTH)")
    if args.view < 0:
        parser.error(f"--view must be >= 0, got {args.view}")
    for name in ("frames", "crop", "batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be positive, got {value}")
    for name in ("tol", "tol_fp64"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def _is_verify_report(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "runs" in data and "ok" in data


def _run(args: argparse.Namespace) -> int:
    if args.json:
        check_destination(
            args.json,
            [args.src, args.dst, args.cfg, args.video],
            what="JSON report",
            is_own_output=_is_verify_report,
            replace_foreign=args.overwrite,
        )
    dtypes = {"both": ("float32", "float64"), "fp32": ("float32",), "fp64": ("float64",)}
    progress = not args.no_progress and sys.stderr.isatty()
    report = verify_checkpoint(
        args.src,
        args.dst,
        model=args.model or args.cfg,
        overrides=args.overrides,
        split=args.split,
        frames=args.frames,
        crop=args.crop,
        batch=args.batch,
        seed=args.seed,
        video=args.video,
        view=args.view,
        dtypes=dtypes[args.precision],
        tol={"float32": args.tol, "float64": args.tol_fp64},
        device=args.device,
        reference_batch_size=None if args.reference_batch == "real" else "config",
        progress=progress,
    )
    print(f"{report.description}: {report.info['model']}")
    source = f"{args.video} view {args.view}" if args.video else f"random pixels, seed {args.seed}"
    print(
        f"split {report.split}, clips {'x'.join(map(str, report.input_shape))} ({source}), "
        f"reference float64 {report.reference_seconds:.1f} s, "
        + ", ".join(f"port {r.dtype} {r.seconds:.1f} s" for r in report.runs)
    )
    print(report.format_table())
    print(report.verdict())
    if args.json:
        with output_lock(args.json), atomic_write(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
            f.write("\n")
        logger.info("wrote %s", args.json)
    return EXIT_PASS if report.ok else EXIT_FAIL


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    return run_reporting_errors(
        PROG, lambda: _run(args), EXPECTED_ERRORS, verbose=args.verbose, error_status=EXIT_ERROR
    )


if __name__ == "__main__":
    sys.exit(main())
