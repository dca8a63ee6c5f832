"""The one inference pipeline under vnl-test, vnl-extract and vnl-predict: runs with no views,
listed videos never outputs, a full disk (simulated in-process, and real on a small tmpfs where
the tests run as root), the resume check, the features file schema, internal errors, and the
progress of vnl-predict. Tiny networks and videos the tests write."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from eval_helpers import small_cfg, write_checkpoint

from nonlocal_net.engine import results as results_module
from nonlocal_net.engine.metrics import format_report
from nonlocal_net.engine.results import FEATURES_SCHEMA, ResultsError, ResultsStore
from nonlocal_net.tools import extract_features as extract_tool
from nonlocal_net.tools import predict_video as predict_tool
from nonlocal_net.tools import test_net_video as test_tool
from nonlocal_net.utils.log import run_reporting_errors

BATCH = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = small_cfg(["TEST.NUM_TEST_CLIPS", "3"])  # 3 views per video: cheap
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "small.pt", cfg)


def one_error_line(err: str, prog: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def leftovers(path: Path) -> list[str]:
    """Parts folders, locks and temporaries next to ``path``."""
    names = [p.name for p in path.parent.iterdir()]
    return [n for n in names if n.endswith((".parts", ".lock", ".tmp")) or ".tmp" in n]


def no_view_lists(eval_videos, tmp_path) -> dict[str, tuple[Path, list[str]]]:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{eval_videos.undecodable} 0\n{eval_videos.empty} 1\n")
    return {
        "limit0": (Path(eval_videos.list_file), ["--limit", "0"]),
        "empty_list": (empty, []),
        "undecodable": (bad, []),
    }


@pytest.mark.parametrize(
    "case",
    ["limit0", pytest.param("empty_list", marks=pytest.mark.slow), "undecodable"],
)
def test_no_view_runs_finish_cleanly_and_again(case, eval_videos, checkpoint, tmp_path, capsys):
    lst, extra = no_view_lists(eval_videos, tmp_path)[case]
    out = tmp_path / "out"
    out.mkdir()
    results, features = out / "r.h5", out / "f.h5"
    common = ["--weights", checkpoint, "--list", lst, "--workers", "0", "--no-progress", *extra]
    test_args = [*map(str, common), "--results", str(results)]
    extract_args = [*map(str, common), "--output", str(features)]
    for attempt in ("first", "--resume"):
        more = [] if attempt == "first" else ["--resume"]
        assert test_tool.main([*test_args, *more]) == 0
        stdout = capsys.readouterr().out
        assert "NO VIEWS" in stdout and "0 with views" in stdout
        report = json.loads((out / "r.report.json").read_text())
        assert report["num_views"] == 0 and report["top1_correct"] == 0
        # no entries: no accuracy (null); undecodable entries: counted wrong, as the original
        assert report["top1_accuracy"] == (0.0 if case == "undecodable" else None)
        with h5py.File(results, "r") as f:
            assert f["views/scores"].shape == (0, 7)
        assert extract_tool.main([*extract_args, *more]) == 0
        assert "no views" in capsys.readouterr().out
        with h5py.File(features, "r") as f:
            assert f["views/features"].shape == (0, 2048) and "scores" not in f["views"]
            assert json.loads(f.attrs["report"])["num_rows"] == 0
        assert leftovers(results) == [], leftovers(results)
    # run again without --resume: refused as for any finished run, one line, nothing touched
    assert test_tool.main(test_args) == 2
    assert "exists: pass --resume" in one_error_line(capsys.readouterr().err, "vnl-test")
    assert extract_tool.main(extract_args) == 2
    line = one_error_line(capsys.readouterr().err, "vnl-extract")
    assert "--output" in line and "--results" not in line
    assert leftovers(results) == []


def test_listed_videos_are_never_outputs(eval_videos, checkpoint, tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    shutil.copy(eval_videos.root / eval_videos.specs[0].name, video)
    link = tmp_path / "link.h5"
    link.symlink_to(video)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{video} 1\n")
    before = video.read_bytes()
    base = ["--weights", str(checkpoint), "--list", str(lst), "--workers", "0", "--no-progress"]
    for target in (video, link):
        for flags in ([], ["--overwrite"]):
            assert test_tool.main([*base, "--results", str(target), *flags]) == 2
            line = one_error_line(capsys.readouterr().err, "vnl-test")
            assert "listed video" in line or "not a results file" in line, line
            report = tmp_path / "report.json"
            args = ["--results", str(tmp_path / "r.h5"), "--report", str(target), *flags]
            assert test_tool.main([*base, *args]) == 2
            one_error_line(capsys.readouterr().err, "vnl-test")
            assert extract_tool.main([*base, "--output", str(target), *flags]) == 2
            line = one_error_line(capsys.readouterr().err, "vnl-extract")
            assert "listed video" in line or "not a features file" in line, line
            assert not report.exists()
    assert video.read_bytes() == before
    assert leftovers(video) == []


def _part_count(parts: Path) -> int:
    return len(list(parts.glob("part-*.h5")))


def test_full_disk_during_a_part_is_one_line_and_resume_is_identical(
    eval_videos, checkpoint, tmp_path, capsys, monkeypatch
):
    """ENOSPC simulated in-process: the third part's write fails after some bytes."""
    base = ["--weights", str(checkpoint), "--list", str(eval_videos.list_file), "--limit", "4"]
    base += ["--workers", "0", "--batch-size", str(BATCH), "--flush-every", "1", "--no-progress"]
    whole = tmp_path / "whole.h5"
    assert extract_tool.main([*base, "--output", str(whole)]) == 0
    out = tmp_path / "full.h5"
    real = results_module.atomic_write
    calls = {"parts": 0}

    @contextlib.contextmanager
    def filling_disk(path, mode="wb"):
        with real(path, mode) as f:
            if os.path.basename(path).startswith("part-"):
                calls["parts"] += 1
                if calls["parts"] >= 3:  # the disk stays full
                    f.write(b"\x89HDF half a part")
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            yield f

    monkeypatch.setattr(results_module, "atomic_write", filling_disk)
    assert extract_tool.main([*base, "--output", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "vnl-extract")
    parts = Path(str(out) + ".parts")
    assert str(parts) in line and "No space left on device" in line, line
    assert _part_count(parts) == 2 and not list(parts.glob(".*tmp*")) and not out.exists()
    monkeypatch.setattr(results_module, "atomic_write", real)  # space freed
    assert extract_tool.main([*base, "--output", str(out), "--resume"]) == 0
    assert "resuming: 2 videos" in capsys.readouterr().err
    with h5py.File(out, "r") as a, h5py.File(whole, "r") as b:
        for key in ("views/features", "views/video_id", "views/view_index", "videos/video_id"):
            assert np.array_equal(a[key][()], b[key][()]), key


TMPFS = "/tmp/vnl-test-tmpfs"


@pytest.fixture
def small_tmpfs():
    """A 192 KiB tmpfs (root only; skipped elsewhere)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    os.makedirs(TMPFS, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", TMPFS])
    if done.returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield Path(TMPFS)
    finally:
        subprocess.run(["umount", TMPFS])


@pytest.mark.slow
def test_a_real_full_disk_is_one_line_and_resume_is_identical(
    eval_videos, checkpoint, tmp_path, small_tmpfs
):
    base = ["--weights", str(checkpoint), "--list", str(eval_videos.list_file), "--limit", "6"]
    base += ["--workers", "0", "--batch-size", str(BATCH), "--flush-every", "1", "--no-progress"]
    whole = tmp_path / "whole.h5"
    command = [sys.executable, "-m", "nonlocal_net.tools.extract_features", *base]
    assert subprocess.run([*command, "--output", str(whole)], capture_output=True).returncode == 0
    out = small_tmpfs / "f.h5"
    done = subprocess.run([*command, "--output", str(out)], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_error_line(done.stderr, "vnl-extract")
    assert str(small_tmpfs) in line and "No space left on device" in line, line
    assert not out.exists() and not [p for p in small_tmpfs.rglob(".*tmp*")]
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    done = subprocess.run([*command, "--output", str(out), "--resume"], capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(out, "r") as a, h5py.File(whole, "r") as b:
        for key in ("views/features", "views/video_id", "views/view_index", "videos/video_id"):
            assert np.array_equal(a[key][()], b[key][()]), key


def test_resume_check_names_the_key_not_the_config(tmp_path):
    header = {
        "list_sha256": "a",
        "num_entries": 2,
        "feature_dim": 4,
        "cfg": {"TEST": {"SCALE": 256, "CROP_SIZE": 256}, "MODEL": {"NUM_CLASSES": 400}},
        "data_root": "/data/a",
    }
    ResultsStore(tmp_path / "f.h5", header, FEATURES_SCHEMA).prepare(False, False)
    other = {**header, "cfg": {**header["cfg"], "TEST": {"SCALE": 224, "CROP_SIZE": 256}}}
    with pytest.raises(ResultsError) as refused:
        ResultsStore(tmp_path / "f.h5", other, FEATURES_SCHEMA).prepare(True, False)
    text = str(refused.value)
    assert "cfg.TEST.SCALE differs: stored 256, now 224" in text, text
    assert "--output" in text and "--results" not in text and "NUM_CLASSES" not in text
    moved = {**header, "data_root": "/data/b"}
    with pytest.raises(ResultsError, match=r"data_root differs: stored \"/data/a\""):
        ResultsStore(tmp_path / "f.h5", moved, FEATURES_SCHEMA).prepare(True, False)


def test_extract_refuses_another_data_root_on_resume(eval_videos, checkpoint, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(eval_videos.root, root)
    out = tmp_path / "f.h5"
    base = ["--weights", str(checkpoint), "--list", str(eval_videos.list_file), "--limit", "1"]
    base += ["--workers", "0", "--no-progress", "--output", str(out)]
    assert extract_tool.main(base) == 0
    capsys.readouterr()
    assert extract_tool.main([*base, "--resume", "--data-root", str(root)]) == 2
    line = one_error_line(capsys.readouterr().err, "vnl-extract")
    assert "data_root differs" in line and "--output" in line and "{" not in line, line


def test_extract_errors_name_the_list_line(eval_videos, checkpoint, tmp_path, capsys):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{eval_videos.root / eval_videos.specs[0].name} 1\n{eval_videos.empty} 2\n")
    out = tmp_path / "f.h5"
    args = ["--weights", str(checkpoint), "--list", str(lst), "--output", str(out)]
    assert extract_tool.main([*args, "--workers", "0", "--no-progress"]) == 0
    assert f"{lst}:2" in capsys.readouterr().err
    with h5py.File(out, "r") as f:
        header, report = json.loads(f.attrs["header"]), json.loads(f.attrs["report"])
        assert f.attrs["format"] == "nonlocal_net/features/v1"
        assert f["views/features"].shape == (3, 2048)
    assert report["errors"][0]["where"] == f"{lst}:2"
    assert header["feature_dim"] == 2048 and header["layer"] == "pool5"
    assert header["precision"] == "strict" and "num_classes" not in header


def test_an_unusable_precision_leaves_nothing(eval_videos, checkpoint, tmp_path, capsys):
    base = ["--weights", str(checkpoint), "--list", str(eval_videos.list_file), "--workers", "0"]
    out = tmp_path / "out"
    out.mkdir()
    assert test_tool.main([*base, "--results", str(out / "r.h5"), "--precision", "fp16"]) == 2
    one_error_line(capsys.readouterr().err, "vnl-test")
    assert extract_tool.main([*base, "--output", str(out / "f.h5"), "--precision", "tf32"]) == 2
    one_error_line(capsys.readouterr().err, "vnl-extract")
    assert list(out.iterdir()) == []


def test_internal_errors_keep_their_traceback_and_exit_1(tmp_path):
    def bug() -> int:
        raise RuntimeError("an internal bug")

    with pytest.raises(RuntimeError):
        run_reporting_errors("vnl-x", bug)
    code = (
        "import sys; from nonlocal_net.utils.log import run_reporting_errors as r\n"
        "def bug(): raise {}('boom')\n"
        "sys.exit(r('vnl-x', bug))"
    )
    for kind, status in (("RuntimeError", 1), ("ImportError", 1), ("ValueError", 2)):
        done = subprocess.run([sys.executable, "-c", code.format(kind)], capture_output=True)
        err = done.stderr.decode()
        assert done.returncode == status, err
        assert ("Traceback" in err) == (status == 1), err


def test_vnl_predict_shows_a_view_bar(eval_videos, checkpoint, capsys):
    video = eval_videos.root / eval_videos.specs[0].name
    assert predict_tool.main([str(video), "--weights", str(checkpoint), "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "3/3" in captured.err and "view" in captured.err
    assert captured.out.startswith(f"{video}:")
    assert predict_tool.main([str(video), "--weights", str(checkpoint), "--no-progress"]) == 0
    assert "view" not in capsys.readouterr().err
    assert predict_tool.main([str(eval_videos.empty), "--weights", str(checkpoint)]) == 2
    line = one_error_line(capsys.readouterr().err, "vnl-predict")
    assert str(eval_videos.empty) in line


def test_summary_counts_each_video_once():
    report = {
        "num_entries": 5,
        "num_videos_with_views": 3,
        "num_empty_videos": 2,
        "num_incomplete_videos": 2,
        "views_per_video": 30,
        "min_views_per_video": 0,
        "max_views_per_video": 30,
        "clip1_accuracy": 0.0,
        "clip1_correct": 0,
        "clip1_accuracy_lmdb_order": 0.0,
        "clip_accuracy": 0.0,
        "clip_correct": 0,
        "num_views": 90,
        "top1_accuracy": 0.0,
        "top1_correct": 0,
        "top5_accuracy": 0.0,
        "top5_correct": 0,
    }
    first = format_report(report).splitlines()[0]
    assert first.endswith("5 (3 with views; 2 without views)"), first
    first = format_report({**report, "num_incomplete_videos": 3}).splitlines()[0]
    assert first.endswith("5 (3 with views, 1 of them with fewer than 30; 2 without views)")
