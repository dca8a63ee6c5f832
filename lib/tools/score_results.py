"""``vnl-score``: the original's report from a results file, without running the model.

    vnl-score results.h5 --list vallist.txt

Also reads the ``results.h5.parts`` folder of an interrupted run (a partial report).
"""

from __future__ import annotations

import argparse
import contextlib
import logging

from ..engine.evaluator import is_report_file, score_results, write_report
from ..engine.metrics import format_report
from ..utils.io import check_destination
from ..utils.lock import output_lock
from ..utils.log import EXIT_OK, add_logging_arguments, run_reporting_errors, setup_logging

logger = logging.getLogger("nonlocal_net.score")


PROG = "vnl-score"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Re-score the per-view results written by vnl-test (top-1/top-5 over all "
        "list entries, clip and clip-1 accuracy, empty/incomplete videos, failed views) "
        "without the model.",
        epilog="Exit status: 0 done, 2 error (one line 'vnl-score: error: ...').",
    )
    parser.add_argument("results", help="results .h5 file (or the .parts folder of a partial run)")
    parser.add_argument(
        "--list",
        dest="list_file",
        help="list file whose labels to score against (default: the labels stored in the file)",
    )
    parser.add_argument("--report", help="also write the report as JSON here (locked, atomic)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --report even when it is not a report this package wrote",
    )
    add_logging_arguments(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as held:
        if args.report:
            check_destination(
                args.report,
                [args.results, args.list_file],
                what="report file",
                is_own_output=is_report_file,
                replace_foreign=args.overwrite,
            )
            held.enter_context(output_lock(args.report))
        report = score_results(args.results, args.list_file)
        if args.report:
            write_report(args.report, report)
    print(format_report(report))
    if not report["complete"]:
        print("(partial results of an interrupted run)")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    return run_reporting_errors(PROG, lambda: _run(args), verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
