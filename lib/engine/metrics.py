"""The original's test metrics (``evaluate_result`` in ``tools/test_net_video.py``).

Per video the per-view scores (the test net's averaged softmax, one ``(K,)`` vector per view) are
reduced to a :class:`VideoOutcome`; :func:`compute_report` turns the outcomes of all list entries
into the original's numbers:

* video score = the **sum** of its view vectors (float64, in view order);
* top-1: first maximum of the video score equals the label; top-5: the label is among the five
  highest (ties: lower class index first, as a stable sort; the original's ``np.argsort`` leaves
  tie order unspecified). Both are divided by the number of list entries: an entry without any
  view (bad list line, undecodable video) counts as wrong;
* clip accuracy: views whose own first maximum equals the label / all recorded views;
* clip-1 accuracy: one view per video that has any, divided by the number of such videos. The
  original scores the first view *read*, and its test lmdb is read in lexicographic order of the
  unpadded keys ``str(30*i + v)`` (as the original's lmdb writer keys them), so the first view of
  video 3 is view 10 (key ``"100"``), not view 0. ``clip1_accuracy`` uses view 0 (``ct=0, j=0``, or
  the lowest recorded view); ``clip1_accuracy_lmdb_order`` uses the view with the lexicographically
  smallest key, the original's first view when the lmdb is read by one reader;
* failed views: a view whose score has a NaN or an infinity (broken weights, a numeric fault) is
  counted as a failed view: it never contributes to a video score, is never a class and never
  correct; ``num_failed_views`` / ``num_videos_with_failed_views`` report them loudly;
* empty videos (0 views) and incomplete ones (views != NUM_TEST_CLIPS; the original calls them
  "corrupted" and counts the empty ones among them), min/max views per entry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..utils.numeric import finite_rows

__all__ = ["VideoOutcome", "compute_report", "format_report", "video_outcome"]

TOPK = 5


@dataclass(frozen=True)
class VideoOutcome:
    """What the metrics need from one video's views."""

    video_id: int
    num_views: int
    topk: tuple[int, ...]  # classes by decreasing summed score (stable: ties -> lower index)
    clip_correct: int  # views whose own first maximum is the label
    first_view_correct: bool  # the lowest recorded view index (view 0 when present)
    lmdb_first_view_correct: bool  # the view the original's lmdb order reads first
    failed_views: int = 0  # views whose scores are not all finite (never correct)


def video_outcome(
    video_id: int,
    label: int,
    view_ids: Sequence[int] | np.ndarray,
    scores: np.ndarray,
    views_per_video: int,
) -> VideoOutcome:
    """Reduce one video's ``scores`` ``(n, K)`` (rows = ``view_ids``) to a :class:`VideoOutcome`."""
    view_ids = np.asarray(view_ids, dtype=np.int64)
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != len(view_ids):
        raise ValueError(
            f"video {video_id}: scores {scores.shape} do not match {len(view_ids)} view ids"
        )
    if len(view_ids) == 0:
        return VideoOutcome(video_id, 0, (), 0, False, False)
    order = np.argsort(view_ids, kind="stable")
    view_ids, scores = view_ids[order], scores[order]
    finite = finite_rows(scores)
    total = np.zeros(scores.shape[1], dtype=np.float64)
    for row in scores[finite]:  # sequential float64 sum in view order (deterministic)
        total += row
    topk = tuple(int(c) for c in np.argsort(-total, kind="stable")[:TOPK]) if finite.any() else ()
    if not np.isfinite(total).all():  # finite views whose sum overflows
        topk = ()
    view_pred = np.where(finite, scores.argmax(axis=1), -1)  # a failed view predicts no class
    keys = [str(views_per_video * video_id + int(v)) for v in view_ids]
    lmdb_first = min(range(len(keys)), key=keys.__getitem__)
    return VideoOutcome(
        video_id=video_id,
        num_views=len(view_ids),
        topk=topk,
        clip_correct=int((view_pred == label).sum()),
        first_view_correct=bool(view_pred[0] == label),
        lmdb_first_view_correct=bool(view_pred[lmdb_first] == label),
        failed_views=int((~finite).sum()),
    )


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def compute_report(
    labels: Sequence[int], outcomes: Mapping[int, VideoOutcome], views_per_video: int
) -> dict:
    """The original's numbers over all ``len(labels)`` list entries (see the module docstring).

    ``labels[i]`` is entry ``i``'s label (-1 for a bad list line); ``outcomes`` maps video ids
    to outcomes (entries without one have no view).
    """
    num_entries = len(labels)
    counts = np.zeros(num_entries, dtype=np.int64)
    top1 = top5 = clip_correct = clip1 = clip1_lmdb = seen = failed = failed_videos = 0
    for vid, outcome in outcomes.items():
        if not 0 <= vid < num_entries:
            raise ValueError(f"video id {vid} outside the list's {num_entries} entries")
        counts[vid] = outcome.num_views
        if outcome.num_views == 0:
            continue
        label = labels[vid]
        seen += 1
        failed += outcome.failed_views
        failed_videos += outcome.failed_views > 0
        top1 += bool(outcome.topk) and outcome.topk[0] == label
        top5 += label in outcome.topk
        clip_correct += outcome.clip_correct
        clip1 += outcome.first_view_correct
        clip1_lmdb += outcome.lmdb_first_view_correct
    total_views = int(counts.sum())
    return {
        "num_entries": num_entries,
        "num_videos_with_views": seen,
        "top1_accuracy": _ratio(top1, num_entries),
        "top5_accuracy": _ratio(top5, num_entries),
        "top1_correct": int(top1),
        "top5_correct": int(top5),
        "clip_accuracy": _ratio(clip_correct, total_views),
        "clip_correct": int(clip_correct),
        "num_views": total_views,
        "clip1_accuracy": _ratio(clip1, seen),
        "clip1_correct": int(clip1),
        "clip1_accuracy_lmdb_order": _ratio(clip1_lmdb, seen),
        "clip1_lmdb_order_correct": int(clip1_lmdb),
        "views_per_video": views_per_video,
        "num_failed_views": int(failed),
        "num_videos_with_failed_views": int(failed_videos),
        "num_empty_videos": int((counts == 0).sum()),
        "num_incomplete_videos": int((counts != views_per_video).sum()),
        "min_views_per_video": int(counts.min()) if num_entries else 0,
        "max_views_per_video": int(counts.max()) if num_entries else 0,
    }


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def format_report(report: Mapping) -> str:
    """The report as the lines a CLI prints (metrics first, then throughput if present)."""
    n = report["num_entries"]
    empty, views = report["num_empty_videos"], report["views_per_video"]
    partial = report["num_incomplete_videos"] - empty  # some views, not all: counted once
    videos = f"{n} ({report['num_videos_with_views']} with views"
    videos += f", {partial} of them with fewer than {views}" if partial else ""
    videos += f"; {empty} without views)"
    lines = [
        f"videos in list:          {videos}",
        f"views per video:         min {report['min_views_per_video']}, "
        f"max {report['max_views_per_video']}",
        f"clip1 accuracy:          {_pct(report['clip1_accuracy'])} "
        f"({report['clip1_correct']}/{report['num_videos_with_views']}; view 0) | "
        f"{_pct(report['clip1_accuracy_lmdb_order'])} (original's lmdb order)",
        f"clip accuracy:           {_pct(report['clip_accuracy'])} "
        f"({report['clip_correct']}/{report['num_views']})",
        f"top-1 accuracy:          {_pct(report['top1_accuracy'])} ({report['top1_correct']}/{n})",
        f"top-5 accuracy:          {_pct(report['top5_accuracy'])} ({report['top5_correct']}/{n})",
    ]
    if not report["num_views"]:
        lines.append(
            f"NO VIEWS:                nothing was evaluated ({n} list entries, none with a "
            f"view): no accuracy to report"
        )
    if report.get("num_failed_views"):
        lines.append(
            f"FAILED VIEWS:            {report['num_failed_views']} views in "
            f"{report['num_videos_with_failed_views']} videos have NaN/Inf scores (counted "
            f"wrong; check the weights)"
        )
    if report.get("num_bad_list_lines"):
        lines.append(f"bad list lines:          {report['num_bad_list_lines']}")
    if report.get("num_decode_errors"):
        lines.append(f"undecodable videos:      {report['num_decode_errors']}")
    timing = report.get("throughput")
    if timing and timing.get("videos"):
        lines.append(
            f"throughput:              {timing['videos_per_second']:.3f} videos/s, "
            f"{timing['clips_per_second']:.2f} clips/s ({timing['videos']} videos in "
            f"{timing['wall_seconds']:.1f} s including {timing.get('startup_seconds', 0):.1f} s "
            f"start-up, {timing['world_size']} process(es))"
        )
        lines.append(
            f"decode share:            {_pct(timing['decode_share'])} of the work, model "
            f"waited for data {_pct(timing['data_wait_share'])} of the time"
        )
    return "\n".join(lines)
