"""The original's metrics (spec 6.7), on hand-made scores and through the whole engine with a
stand-in model whose outputs the test recomputes on its own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from eval_helpers import StandInModel, first_max, small_cfg, top5_by_hand

from nonlocal_net.datasets import test_views
from nonlocal_net.datasets.synthetic import write_list_file
from nonlocal_net.engine import compute_report, evaluate, score_results, video_outcome


def test_video_outcome_sums_views_and_takes_the_first_maximum():
    scores = np.array(
        [
            [0.1, 0.5, 0.5, 0.0],  # view 2: tie between 1 and 2 -> 1
            [0.6, 0.1, 0.2, 0.1],  # view 0 -> 0
            [0.1, 0.4, 0.4, 0.1],  # view 1 -> 1
        ],
        dtype=np.float32,
    )
    o = video_outcome(0, label=1, view_ids=[2, 0, 1], scores=scores, views_per_video=30)
    # sum = [0.8, 1.0, 1.1, 0.2] -> 2, 1, 0, 3
    assert o.topk == (2, 1, 0, 3) and o.num_views == 3
    assert o.clip_correct == 2  # views 2 and 1 (first maximum on ties)
    assert o.first_view_correct is False  # view 0 predicts 0
    tie = video_outcome(0, 1, [0], np.array([[0.3, 0.3, 0.3, 0.1]], np.float32), 30)
    assert tie.topk == (0, 1, 2, 3)


def test_lmdb_order_first_view():
    """Keys str(30*i + v) are read lexicographically: video 3's first key is '100' (view 10)."""
    scores = np.zeros((30, 2), dtype=np.float32)
    scores[:, 0] = 1.0
    scores[10] = [0.0, 1.0]  # only view 10 predicts class 1
    for vid, lmdb_first in ((0, 0), (3, 10), (4, 0), (33, 10)):
        o = video_outcome(vid, 1, range(30), scores, 30)
        assert o.first_view_correct is False
        assert o.lmdb_first_view_correct is (lmdb_first == 10), vid


def test_report_counts_entries_without_views_as_wrong():
    labels = [0, 1, 2, -1, 1]  # entry 3: a bad list line
    good = np.eye(3, dtype=np.float32)
    outcomes = {
        0: video_outcome(0, 0, range(30), np.repeat(good[[0]], 30, 0), 30),  # right
        1: video_outcome(1, 1, range(29), np.repeat(good[[0]], 29, 0), 30),  # wrong, 29 views
        2: video_outcome(2, 2, [], np.zeros((0, 3), np.float32), 30),  # undecodable
        # entry 4: never evaluated (e.g. missing); entry 3: bad line
    }
    report = compute_report(labels, outcomes, 30)
    assert report["num_entries"] == 5
    assert report["top1_correct"] == 1 and report["top1_accuracy"] == 1 / 5
    assert report["top5_correct"] == 2  # video 1's label is in its top-3 of 3 classes
    assert report["clip_correct"] == 30 and report["num_views"] == 59
    assert report["clip1_accuracy"] == 1 / 2 and report["num_videos_with_views"] == 2
    assert report["num_empty_videos"] == 3 and report["num_incomplete_videos"] == 4
    assert (report["min_views_per_video"], report["max_views_per_video"]) == (0, 30)


def test_engine_metrics_with_a_stand_in_model(eval_videos, tmp_path):
    """Labels are chosen from the stand-in's scores computed here without the engine, so the
    expected numbers are known: right, top-5 only, wrong, a missing file, a bad line."""
    cfg = small_cfg()
    model = StandInModel(cfg)
    names = [s.name for s in eval_videos.specs]
    per_view = {}
    for name in names:
        views, _ = test_views(eval_videos.root / name, cfg)
        with torch.no_grad():
            per_view[name] = model(views).numpy()
    plan = []  # (path, label, expected top1, expected top5)
    for i, name in enumerate(names):
        total = per_view[name].astype(np.float64).sum(0).tolist()
        ranking = sorted(range(7), key=lambda c: (-total[c], c))
        label = ranking[[0, 2, 6][i % 3]]  # right; in the top 5 only; outside the top 5
        plan.append((name, label, label == first_max(total), label in top5_by_hand(total)))
    entries = [(name, label) for name, label, _, _ in plan]
    entries += [("missing/nowhere.mp4", 3), ("broken/undecodable.mp4", 1)]
    entries += [("broken/empty.mp4", 0), ("class_a/landscape_340.mp4", "n/a")]
    lst = write_list_file(eval_videos.root / "stand_in_list.txt", entries)

    report = evaluate(
        lst, model=model, results=tmp_path / "r.h5", workers=2, batch_size=7, progress=False
    )
    n = len(entries)
    top1 = sum(p[2] for p in plan)
    top5 = sum(p[3] for p in plan)
    views = np.concatenate([per_view[name] for name in names])
    labels = np.concatenate([[label] * 30 for _, label, _, _ in plan])
    clip = int((views.argmax(1) == labels).sum())
    clip1 = sum(int(per_view[name][0].argmax() == label) for name, label, _, _ in plan)
    assert report["num_entries"] == n
    assert report["top1_correct"] == top1 and report["top1_accuracy"] == top1 / n
    assert report["top5_correct"] == top5 and report["top5_accuracy"] == top5 / n
    assert report["clip_correct"] == clip and report["num_views"] == 30 * len(names)
    assert report["clip_accuracy"] == clip / (30 * len(names))
    assert report["clip1_correct"] == clip1 and report["clip1_accuracy"] == clip1 / len(names)
    assert report["num_empty_videos"] == 4 and report["num_incomplete_videos"] == 4
    assert report["min_views_per_video"] == 0 and report["max_views_per_video"] == 30
    assert report["num_bad_list_lines"] == 1 and report["num_decode_errors"] == 3
    where = {e["where"].rsplit(":", 1)[1]: e["error"] for e in report["errors"]}
    assert set(where) == {str(len(names) + k) for k in (1, 2, 3, 4)}
    assert "no such file" in where[str(len(names) + 1)]
    assert "not an integer" in where[str(len(names) + 4)]
    assert 0 < top1 < len(names) and top1 < top5  # the plan exercises every case
    # the same numbers from the results file, without the model; per-view scores kept
    again = score_results(tmp_path / "r.h5", lst)
    for key in ("top1_correct", "top5_correct", "clip_correct", "clip1_correct", "num_views"):
        assert again[key] == report[key]
    saved = json.loads((tmp_path / "r.report.json").read_text())
    assert saved["top1_correct"] == top1 and saved["throughput"]["videos"] == n - 1


def test_vnl_score_cli(eval_videos, tmp_path, capsys):
    from nonlocal_net.tools.score_results import main

    cfg = small_cfg(["TEST.NUM_TEST_CLIPS", "3"])
    lst = write_list_file(tmp_path / "l.txt", [(str(eval_videos.root / "class_b/square.mkv"), 1)])
    evaluate(lst, model=StandInModel(cfg), results=tmp_path / "r.h5", workers=0, progress=False)
    assert main([str(tmp_path / "r.h5"), "--list", str(lst)]) == 0
    out = capsys.readouterr().out
    assert "top-1 accuracy" in out and "(original's lmdb order)" in out
    assert main([str(tmp_path / "nothing.h5")]) == 2


def test_workers_limit_and_data_root(eval_videos, tmp_path):
    """Absolute paths re-rooted with data_root, --limit, and the same numbers with 0 or 2
    decoding processes."""
    cfg = small_cfg(["TEST.NUM_TEST_CLIPS", "6"])
    entries = [
        (f"/old/machine/k400/{s.name}", s.label) for s in eval_videos.specs
    ]  # the list of another machine
    lst = write_list_file(tmp_path / "moved.txt", entries)
    model = StandInModel(cfg)
    reports = [
        evaluate(lst, model=model, data_root=eval_videos.root, workers=w, limit=4, progress=False)
        for w in (0, 2)
    ]
    for report in reports:
        assert report["num_entries"] == 4 and report["num_views"] == 4 * 6
        assert report["num_empty_videos"] == 0 and report["limit"] == 4
    keys = ("top1_correct", "top5_correct", "clip_correct", "clip1_correct", "num_views")
    assert [reports[0][k] for k in keys] == [reports[1][k] for k in keys]


def test_sharded_outcomes_merge_like_one_process(eval_videos, monkeypatch):
    """Two ranks without a results file: each evaluates its contiguous shard and rank 0
    gathers the per-video outcomes (collectives replaced by an in-process exchange)."""
    import nonlocal_net.engine.evaluator as engine
    from nonlocal_net.engine.distributed import DistContext

    cfg = small_cfg(["TEST.NUM_TEST_CLIPS", "3"])
    model = StandInModel(cfg)
    single = evaluate(eval_videos.list_file, model=model, workers=0, progress=False)
    sent: list = []  # what rank 1 contributed to each all_gather, in call order

    class Exchange(DistContext):
        def barrier(self) -> None:
            pass

        def broadcast(self, obj):
            return obj

        def all_gather(self, obj):
            if self.rank == 1:
                sent.append(obj)
                return [None, obj]
            return [obj, sent.pop(0)]

    shards = []
    for rank in (1, 0):
        monkeypatch.setattr(engine, "init_distributed", lambda device, r=rank: Exchange(r, 2))
        shards.append(evaluate(eval_videos.list_file, model=model, workers=0, progress=False))
    merged = shards[1]
    assert merged["world_size"] == 2 and merged["throughput"]["world_size"] == 2
    assert merged["throughput"]["videos"] == single["throughput"]["videos"]
    for key in ("top1_correct", "top5_correct", "clip_correct", "clip1_correct", "num_views"):
        assert merged[key] == single[key], key
    assert merged["num_empty_videos"] == single["num_empty_videos"] == 2
    assert merged["errors"] == single["errors"]


def test_cli_help_and_errors(tmp_path, capsys):
    from nonlocal_net.tools import predict_video, score_results, test_net_video

    for tool in (test_net_video, score_results, predict_video):
        with pytest.raises(SystemExit) as info:
            tool.main(["--help"])
        assert info.value.code == 0
    assert "--resume" in capsys.readouterr().out
    lst = write_list_file(tmp_path / "l.txt", [("a.mp4", 0)])
    args = ["--weights", str(tmp_path / "missing.pt"), "--list", str(lst), "--workers", "0"]
    assert test_net_video.main(args) == 2
