"""``vnl-convert``: convert released Caffe2 checkpoints, and back.

::

    vnl-convert SRC.pkl DST.pt --model <zoo name> [KEY VALUE ...]
    vnl-convert SRC.pkl DST.pt --cfg FILE.yaml [KEY VALUE ...]
    vnl-convert SRC.pkl --dry-run --model <zoo name>      # print the mapping table, write nothing
    vnl-convert DST.pt OUT.pkl --to-caffe2
    vnl-convert SRC.pkl OUT.pkl --ftvideo     # modify_caffe2_ftvideo.py: BN folded into affines
    vnl-convert SRC.pkl OUT.pkl --blob-rm     # modify_blob_rm.py: BN statistics and pred dropped
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

from nonlocal_net.core.config import ConfigError, get_cfg
from nonlocal_net.core.weights_file import WeightsFileError
from nonlocal_net.core.zoo import UnknownModelError
from nonlocal_net.utils.cli import finite_float, nonnegative_int
from nonlocal_net.utils.log import (
    EXIT_OK,
    add_logging_arguments,
    run_reporting_errors,
    setup_logging,
    terminal_safe,
)

from .convert import convert_blobs
from .convert_file import check_blobs_finite, convert_checkpoint
from .errors import Caffe2FormatError, ConversionError
from .export import export_caffe2
from .finetune import write_finetune_file
from .reader import read_caffe2_pkl

__all__ = ["main", "parse_args"]

logger = logging.getLogger("nonlocal_net.converters")

PROG = "vnl-convert"
_CFG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+")
EXPECTED_ERRORS = (
    Caffe2FormatError,
    ConversionError,
    ConfigError,
    WeightsFileError,
    UnknownModelError,
    OSError,
    ImportError,
)

USAGE = """\
vnl-convert SRC.pkl DST.pt (--model NAME | --cfg FILE.yaml) [options] [KEY VALUE ...]
       vnl-convert SRC.pkl --dry-run (--model NAME | --cfg FILE.yaml) [options] [KEY VALUE ...]
       vnl-convert SRC.pt OUT.pkl --to-caffe2 [--protocol {0,2}] [--flat] [--lr LR]
       vnl-convert SRC.pkl OUT.pkl (--ftvideo | --blob-rm)"""

EPILOG = """\
Every blob of SRC must have a place in the model and every model tensor must come from SRC;
momentum, lr and model_iter are reported, not loaded. A BN checkpoint loaded into a
MODEL.USE_AFFINE model is folded as the original's convert_to_finetune.py folds it.
Initialising for training: --inflate (2-D ImageNet weights) and --finetune keep the model's own
initial classifier when the class count differs and its non-local blocks when the file has none.
DST is never an input (same file through links too) and is locked while written; an existing
DST is replaced only when it is this command's kind of output (a converted checkpoint, or for
--to-caffe2/--ftvideo/--blob-rm a Caffe2 checkpoint), else --overwrite. Blobs with NaN/Inf or
negative variances are refused in every mode unless --allow-nonfinite.
Exit status: 0 done, 2 error (one line 'vnl-convert: error: ...'), 130/143 interrupted.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=USAGE,
        description="Convert a Caffe2 checkpoint (.pkl) of the original Non-local Neural Networks "
        "code into PyTorch weights for nonlocal_net (or, with --to-caffe2, back).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "args",
        nargs="*",
        metavar="SRC DST [KEY VALUE ...]",
        help="source file, destination file (not with --dry-run), then config overrides",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--model", metavar="NAME", help="zoo name of the model (see nl.list_models())"
    )
    which.add_argument("--cfg", metavar="FILE.yaml", help="an original-format YAML config")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the blob -> state_dict mapping table only"
    )
    parser.add_argument(
        "--to-caffe2", action="store_true", help="convert a converted .pt back into a Caffe2 .pkl"
    )
    parser.add_argument(
        "--inflate",
        action="store_true",
        help="load 2-D (ImageNet) conv weights into the 3-D model: kt copies along time / kt",
    )
    parser.add_argument(
        "--finetune",
        action="store_true",
        help="initialise for training: drop a pred of another class count; pred and non-local "
        "blocks missing from the file keep the model's initial values",
    )
    parser.add_argument(
        "--no-fold-bn",
        action="store_true",
        help="refuse to fold BN statistics into a MODEL.USE_AFFINE model (default: fold)",
    )
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="write blobs holding NaN/Inf or negative BN variances (default: refuse, listing "
        "each such blob)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST even when it is not a file this command wrote (never an input)",
    )
    parser.add_argument(
        "--safetensors",
        action="store_true",
        help="write DST as .safetensors (implied by a .safetensors suffix)",
    )
    export = parser.add_argument_group("--to-caffe2 options")
    export.add_argument("--protocol", type=int, choices=[0, 2], default=2, help="pickle protocol")
    export.add_argument(
        "--flat",
        action="store_true",
        help="write the flat dict of the original's conversion scripts instead of {'blobs': ...}",
    )
    export.add_argument(
        "--lr",
        type=positive_finite_float,
        default=None,
        help="the file's lr entry (finite, > 0; default: the lr the source was converted from, "
        "else the config's SOLVER.BASE_LR)",
    )
    export.add_argument(
        "--model-iter",
        type=nonnegative_int,
        default=None,
        help="write a model_iter entry (omitted by default)",
    )
    ft = parser.add_argument_group(
        "fine-tuning files (Caffe2 -> Caffe2, flat dict, protocol 0, as the original's scripts)"
    )
    ft_mode = ft.add_mutually_exclusive_group()
    ft_mode.add_argument(
        "--ftvideo",
        dest="ft_mode",
        action="store_const",
        const="ftvideo",
        help="modify_caffe2_ftvideo.py: fold BN into frozen affines (eps 1e-5), drop pred and "
        "momentum, lr 0.00125 (the init of the MODEL.USE_AFFINE recipes)",
    )
    ft_mode.add_argument(
        "--blob-rm",
        dest="ft_mode",
        action="store_const",
        const="blob-rm",
        help="modify_blob_rm.py: drop BN running statistics, momentum, model_iter and pred, "
        "lr 0.01 (a Kinetics model prepared for another dataset)",
    )
    add_logging_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    _split_positionals(parser, args)
    return args


def positive_finite_float(text: str) -> float:
    """A finite ``float`` > 0 (argparse ``type=``): a learning rate."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _split_positionals(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Sort the positionals into ``src``, ``dst`` and the ``KEY VALUE`` overrides."""
    rest = list(args.args)
    if not rest:
        parser.error("SRC is required")
    args.src = rest.pop(0)
    args.dst = None
    if rest and not (args.dry_run and _CFG_KEY.fullmatch(rest[0])):
        args.dst = rest.pop(0)
    args.overrides = rest
    if args.ft_mode:
        if args.dst is None or rest or args.model or args.cfg or args.dry_run or args.to_caffe2:
            parser.error(f"--{args.ft_mode} takes exactly SRC.pkl OUT.pkl")
        return
    if args.to_caffe2:
        if args.dst is None or rest or args.model or args.cfg or args.dry_run:
            parser.error("--to-caffe2 takes exactly SRC.pt OUT.pkl (the config is in SRC.pt)")
        return
    if not (args.model or args.cfg):
        parser.error("one of --model NAME or --cfg FILE.yaml is required")
    if args.dst is None and not args.dry_run:
        parser.error("DST is required (or pass --dry-run)")
    if len(rest) % 2:
        parser.error(f"overrides must be KEY VALUE pairs, got {len(rest)} items: {rest}")


def _safe_lines(text: str) -> str:
    return "\n".join(terminal_safe(line) for line in text.splitlines())


def _run(args: argparse.Namespace) -> int:
    if args.ft_mode or args.to_caffe2:
        return _write_finetune(args) if args.ft_mode else _export(args)
    cfg = get_cfg(args.model or args.cfg, args.overrides)
    options = dict(
        inflate=args.inflate, finetune=args.finetune, fold_bn=False if args.no_fold_bn else None
    )
    if args.dry_run:
        ckpt = read_caffe2_pkl(args.src, load_momentum=False)
        print(_safe_lines(f"{args.src}: {ckpt.describe()}"))
        check_blobs_finite(ckpt, allow=True)
        result = convert_blobs(ckpt.entries(), cfg, source=args.src, **options)
        print(_safe_lines(result.report.format_table()))
        print(_safe_lines(result.report.summary()))
        print("dry run: nothing written")
        return EXIT_OK
    report = convert_checkpoint(
        args.src,
        args.dst,
        cfg,
        safetensors=args.safetensors or None,
        allow_nonfinite=args.allow_nonfinite,
        overwrite=args.overwrite,
        **options,
    )
    print(_safe_lines(report.summary()))
    print(_safe_lines(f"wrote {args.dst}"))
    return EXIT_OK


def _write_finetune(args: argparse.Namespace) -> int:
    out = write_finetune_file(
        args.src,
        args.dst,
        args.ft_mode,
        allow_nonfinite=args.allow_nonfinite,
        overwrite=args.overwrite,
    )
    print(
        _safe_lines(
            f"{args.src} -> {args.dst}: {len(out)} entries ({args.ft_mode}, flat, protocol 0)"
        )
    )
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    result = export_caffe2(
        args.src,
        args.dst,
        protocol=args.protocol,
        wrapped=not args.flat,
        lr=args.lr,
        model_iter=args.model_iter,
        allow_nonfinite=args.allow_nonfinite,
        overwrite=args.overwrite,
    )
    print(
        f"{args.src} -> {result.path}: {len(result.blobs)} blobs, lr {result.lr:.6g}, "
        f"pickle protocol {result.protocol}, {'wrapped' if result.wrapped else 'flat'}"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    return run_reporting_errors(PROG, lambda: _run(args), EXPECTED_ERRORS, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
