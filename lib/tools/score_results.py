"""``vnl-score``: the original's report from a results file, without running the model.

    vnl-score results.h5 --list vallist.txt

Also reads the ``results.h5.parts`` folder of an interrupted run (a partial report).
"""

from __future__ import annotations

import argparse
import logging

from ..engine.evaluator import score_results, write_report
from ..engine.metrics import format_report
from ..engine.results import ResultsError
from ..utils.log import add_logging_arguments, setup_logging

logger = logging.getLogger("nonlocal_net.score")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vnl-score",
        description="Re-score the per-view results written by vnl-test (top-1/top-5 over all "
        "list entries, clip and clip-1 accuracy, empty/incomplete videos) without the model.",
    )
    parser.add_argument("results", help="results .h5 file (or the .parts folder of a partial run)")
    parser.add_argument(
        "--list",
        dest="list_file",
        help="list file whose labels to score against (default: the labels stored in the file)",
    )
    parser.add_argument("--report", help="also write the report as JSON here")
    add_logging_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    try:
        report = score_results(args.results, args.list_file)
    except (ResultsError, FileNotFoundError, ValueError, OSError) as e:
        logger.error("%s", e)
        return 1
    if args.report:
        write_report(args.report, report)
    print(format_report(report))
    if not report["complete"]:
        print("(partial results of an interrupted run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
