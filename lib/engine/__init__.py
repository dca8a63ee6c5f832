"""Evaluation engine: the original's 30-view Kinetics test, results files, prediction.

Typical use::

    from nonlocal_net.engine import evaluate, score_results

    report = evaluate("vallist.txt", "i3d_nonlocal_8x8.pt", results="results.h5")
    print(report["top1_accuracy"], report["top5_accuracy"])
    score_results("results.h5")  # the same numbers, without the model
"""

from .evaluator import (
    EvalOptions,
    default_batch_size,
    evaluate,
    model_fingerprint,
    score_results,
)
from .metrics import VideoOutcome, compute_report, format_report, video_outcome
from .predict import predict_video
from .results import ResultsError, VideoRecord, iter_result_records

__all__ = [
    "EvalOptions",
    "ResultsError",
    "VideoOutcome",
    "VideoRecord",
    "compute_report",
    "default_batch_size",
    "evaluate",
    "format_report",
    "iter_result_records",
    "model_fingerprint",
    "predict_video",
    "score_results",
    "video_outcome",
]
