"""``vnl-train``: the original's training (``tools/train_net_video.py``) on PyTorch.

Single process::

    vnl-train --model i3d_nonlocal_8x8_IN_pretrain_400k --train-list trainlist.txt \\
        --val-list vallist.txt --data-root /data/k400 --output-dir runs/i3d_nl \\
        TRAIN.PARAMS_FILE r50_pretrain_c2_model_iter450450_clean.pkl

Several processes (DDP; ``TRAIN.BATCH_SIZE`` stays the global batch)::

    torchrun --nproc_per_node=8 $(which vnl-train) --model ... --output-dir runs/i3d_nl
"""

from __future__ import annotations

import argparse
import logging
import os

from ..core.config import get_cfg
from ..datasets.decoders import BACKENDS
from ..engine.distributed import init_distributed
from ..engine.trainer import TrainOptions, train
from ..utils.cli import (
    add_device_argument,
    add_overrides_argument,
    add_progress_argument,
    nonnegative_int,
    positive_int,
)
from ..utils.io import OutputError, check_destination
from ..utils.log import EXIT_OK, add_logging_arguments, run_reporting_errors, setup_logging

logger = logging.getLogger("nonlocal_net.train")

PROG = "vnl-train"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train or fine-tune a video non-local network with the original's recipe "
        "(augmentation, Caffe2 solver, per-device BN, precise BN, checkpoints in both formats). "
        "Run under torchrun for DDP across processes.",
        epilog="Trailing KEY VALUE pairs override the config, as on the original's command "
        "line (e.g. TRAIN.PARAMS_FILE in.pkl SOLVER.MAX_ITER 1000 MODEL.NUM_CLASSES 101). "
        "Running the same command again continues from the newest checkpoint (CHECKPOINT.RESUME "
        "True, the original's default). The checkpoints are locked while a run writes them "
        "(OUTPUT_DIR/checkpoints.lock; a second trainer is refused) and never replace an input; "
        "OUTPUT_DIR/metrics.jsonl records every logged iteration and validation. Exit status: "
        "0 done, 2 error or a non-finite loss or update (one line 'vnl-train: error: ...'), "
        "130/143 interrupted.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cfg", help="original-format YAML config file")
    source.add_argument("--model", help="zoo name (a released model's recipe)")
    parser.add_argument("--train-list", required=True, help="'<path> <label>' lines")
    parser.add_argument("--val-list", help="list for TRAIN.EVAL_PERIOD validation and the test")
    parser.add_argument("--data-root", help="folder the list paths are taken under")
    parser.add_argument("--output-dir", required=True, help="checkpoints and logs go here")
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --output-dir, as CHECKPOINT.RESUME True "
        "(the default) does: running the same command again continues the run (same config, "
        "lists and settings required); also from the original's c2_model_iter<N>.pkl",
    )
    start.add_argument(
        "--start-over",
        action="store_true",
        help="delete the checkpoints in --output-dir (and restart metrics.jsonl) and start a "
        "new run; needed when the folder holds checkpoints and CHECKPOINT.RESUME is False",
    )
    parser.add_argument(
        "--accumulate",
        type=positive_int,
        default=1,
        help="split each process's batch into A micro-batches (each with its own BN "
        "statistics, as one of the original's GPUs)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32 (default, the original's numerics) or bf16 autocast (CUDA only)",
    )
    parser.add_argument(
        "--no-caffe2", action="store_true", help="do not write c2_model_iter<N>.pkl files"
    )
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the metrics as TensorBoard scalars to OUTPUT_DIR/tensorboard (needs "
        "the tensorboard package); OUTPUT_DIR/metrics.jsonl is written either way",
    )
    parser.add_argument(
        "--workers",
        type=nonnegative_int,
        default=min(4, os.cpu_count() or 1),
        help="decoding processes (0: decode in this process)",
    )
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="opencv", help="decoder")
    add_device_argument(parser)
    add_progress_argument(parser)
    add_logging_arguments(parser)
    add_overrides_argument(parser)
    return parser


def _test_report_path(args: argparse.Namespace) -> str:
    return os.path.join(args.output_dir, "test_report.json")


def _check_test_report(args: argparse.Namespace, cfg) -> None:
    """The ``TEST_AFTER_TRAIN`` report is never an input nor a file someone else wrote."""
    from ..engine.evaluator import is_report_file

    report = _test_report_path(args)
    inputs = [args.train_list, args.val_list, args.cfg, cfg.TRAIN.PARAMS_FILE or None]
    check_destination(report, inputs, what="test report")
    if os.path.exists(report) and not is_report_file(report):
        raise OutputError(
            f"{report} exists and is not a test report this command wrote; move it or choose "
            f"another --output-dir"
        )


def _run(args: argparse.Namespace) -> int:
    cfg = get_cfg(args.cfg or args.model, args.opts)
    if cfg.TRAIN.TEST_AFTER_TRAIN and args.val_list:  # refused now, not after hours of training
        _check_test_report(args, cfg)
    ctx = init_distributed(args.device)
    try:
        opts = TrainOptions(
            cfg=cfg,
            train_list=args.train_list,
            output_dir=args.output_dir,
            val_list=args.val_list,
            data_root=args.data_root,
            resume=args.resume,
            start_over=args.start_over,
            tensorboard=args.tensorboard,
            accumulate=args.accumulate,
            precision=args.precision,
            write_caffe2=not args.no_caffe2,
            workers=args.workers,
            backend=args.backend,
            progress=not args.no_progress,
            extra_meta={"config_source": args.cfg or args.model},
        )
        summary = train(opts, ctx)
        if cfg.TRAIN.TEST_AFTER_TRAIN and summary["checkpoint"]:
            _test_after_train(args, summary["checkpoint"])
    finally:
        ctx.close()
    return EXIT_OK


def _test_after_train(args: argparse.Namespace, checkpoint: str) -> None:
    """The original's ``TEST_AFTER_TRAIN``: the 30-view test of the last checkpoint, through
    :func:`..engine.evaluator.evaluate` and its own checks (report never an input, locked,
    failed views counted)."""
    if not args.val_list:
        logger.warning("TRAIN.TEST_AFTER_TRAIN: no --val-list given, test skipped")
        return
    from ..engine.evaluator import EvalOptions, evaluate
    from ..engine.metrics import format_report

    options = EvalOptions(
        data_root=args.data_root,
        report_path=_test_report_path(args),
        workers=args.workers,
        backend=args.backend,
        device=args.device,
        progress=not args.no_progress,
    )
    report = evaluate(args.val_list, checkpoint, options=options)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_report(report))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    verbosity = args.verbose - args.quiet
    setup_logging(verbosity if rank == 0 else min(-1, verbosity))
    return run_reporting_errors(PROG, lambda: _run(args), verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
