"""Results files: crash-safe parts, merge, resume checks, re-scoring (stand-in model)."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest
from eval_helpers import StandInModel, small_cfg

from nonlocal_net.datasets.synthetic import write_list_file
from nonlocal_net.engine import ResultsError, evaluate, score_results
from nonlocal_net.engine.results import (
    ResultsStore,
    VideoRecord,
    iter_result_records,
    read_part,
    write_part,
)

HEADER = {
    "list_file": "/lists/val.txt",
    "list_sha256": "ab" * 32,
    "num_entries": 6,
    "model_fingerprint": "cd" * 32,
    "cfg": {"MODEL": {"NUM_CLASSES": 4}},
    "num_classes": 4,
    "views_per_video": 3,
}


def record(vid: int, views=(0, 1, 2), error: str = "") -> VideoRecord:
    rng = np.random.default_rng(vid)
    scores = rng.random((len(views), 4)).astype(np.float32)
    return VideoRecord(vid, np.array(views, np.int16), scores, 10 + vid, 256, 340, error)


def test_part_round_trip_and_failed_write_leaves_nothing(tmp_path):
    recs = [record(3), record(1, views=()), record(4, views=(2, 0))]
    recs[1].error = "x.mp4: empty file (0 bytes)"
    recs[1].scores = np.zeros((0, 4), np.float32)
    write_part(str(tmp_path / "part-a.h5"), recs, 4)
    back = read_part(str(tmp_path / "part-a.h5"))
    assert [r.video_id for r in back] == [3, 1, 4]
    assert back[1].error == recs[1].error and back[1].num_views == 0
    assert np.array_equal(back[2].scores, recs[2].scores)
    assert back[2].view_ids.tolist() == [2, 0] and back[0].num_frames == 13
    broken = VideoRecord(9, np.array([0, 1], np.int16), np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError):
        write_part(str(tmp_path / "part-b.h5"), [broken], 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-a.h5"]  # no debris


def test_merge_sorts_videos_and_keeps_first_duplicate(tmp_path, caplog):
    store = ResultsStore(tmp_path / "r.h5", HEADER)
    assert store.prepare(resume=False, overwrite=False) == (False, set())
    write_part(f"{store.parts_dir}/part-x-r001-000000.h5", [record(4), record(2)], 4)
    write_part(f"{store.parts_dir}/part-x-r000-000000.h5", [record(0), record(5, views=(1,))], 4)
    write_part(f"{store.parts_dir}/part-x-r000-000001.h5", [record(2, views=(0,))], 4)
    seen = []
    with caplog.at_level(logging.WARNING):
        store.merge([0] * 6, ["p"] * 6, [""] * 6, on_record=lambda r: seen.append(r.video_id))
    assert "video 2 recorded twice" in caplog.text
    assert seen == [0, 2, 4, 5]
    with h5py.File(tmp_path / "r.h5") as f:
        assert f["videos/video_id"][()].tolist() == [0, 2, 4, 5]
        # parts are read in name order: video 2's first copy is r000-000001 (one view)
        assert f["videos/row_start"][()].tolist() == [0, 3, 4, 7]
        assert f["views/video_id"][()].tolist() == [0] * 3 + [2] + [4] * 3 + [5]
        assert np.array_equal(f["views/scores"][3:4], record(2, views=(0,)).scores)
        assert f["views/view_index"][()].tolist() == [0, 1, 2, 0, 0, 1, 2, 1]
        assert f["views/scores"].compression == "gzip" and f["views/scores"].chunks
    assert not (tmp_path / "r.h5.parts").exists()


def test_existing_results_are_never_clobbered(tmp_path):
    store = ResultsStore(tmp_path / "r.h5", HEADER)
    store.prepare(False, False)
    with pytest.raises(ResultsError, match="--resume to continue"):
        ResultsStore(tmp_path / "r.h5", HEADER).prepare(False, False)
    other = dict(HEADER, model_fingerprint="ef" * 32)
    with pytest.raises(ResultsError, match="model_fingerprint differs"):
        ResultsStore(tmp_path / "r.h5", other).prepare(True, False)
    write_part(f"{store.parts_dir}/part-y-r000-000000.h5", [record(1)], 4)
    assert ResultsStore(tmp_path / "r.h5", HEADER).prepare(True, False) == (False, {1})
    store.merge([0] * 6, ["p"] * 6, [""] * 6)
    with pytest.raises(ResultsError, match="exists: pass --resume"):
        ResultsStore(tmp_path / "r.h5", HEADER).prepare(False, False)
    assert ResultsStore(tmp_path / "r.h5", HEADER).prepare(True, False) == (True, set())
    assert ResultsStore(tmp_path / "r.h5", HEADER).prepare(False, True) == (False, set())


def test_partial_runs_can_be_scored_and_resumed(eval_videos, tmp_path):
    cfg = small_cfg(["TEST.NUM_TEST_CLIPS", "3"])
    model = StandInModel(cfg)
    entries = [(s.name, s.label) for s in eval_videos.specs[:4]] + [("broken/empty.mp4", 2)]
    lst = write_list_file(eval_videos.root / "partial_list.txt", entries)
    out = tmp_path / "r.h5"
    full = evaluate(lst, model=model, results=tmp_path / "full.h5", workers=0, progress=False)
    header, records, complete = iter_result_records(tmp_path / "full.h5")
    assert complete
    # an interrupted run of the same evaluation that recorded the first two videos
    store = ResultsStore(out, header)
    store.prepare(False, False)
    write_part(f"{store.parts_dir}/part-z-r000-000000.h5", list(records)[:2], 7)
    partial = score_results(out)
    assert partial["complete"] is False and partial["num_videos_with_views"] == 2
    resumed = evaluate(lst, model=model, results=out, resume=True, workers=0, progress=False)
    assert resumed["throughput"]["videos"] == 3  # the other three
    keys = ("top1_correct", "top5_correct", "clip_correct", "clip1_correct", "num_views")
    for key in keys:
        assert resumed[key] == full[key]
    finished = evaluate(lst, model=model, results=out, resume=True, workers=0, progress=False)
    assert finished["throughput"]["videos"] == 0  # re-scored from the file
    assert [finished[k] for k in keys] == [full[k] for k in keys]
    with pytest.raises(ResultsError, match="different evaluation"):
        evaluate(lst, model=StandInModel(cfg, seed=1), results=out, resume=True, workers=0)
    # settings that change the scores must match too
    with pytest.raises(ResultsError, match="channels_last differs"):
        evaluate(lst, model=model, results=out, resume=True, workers=0, channels_last=False)
