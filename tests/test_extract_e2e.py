"""vnl-extract end to end with the small I3D non-local network, as vnl-test is tested: the rows
against the model by hand, bad videos counted, resume after SIGKILL and a 2-process torchrun
identical to one uninterrupted run, per-video rows, hooked layers, precision recorded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from eval_helpers import small_cfg, write_checkpoint

import nonlocal_net as nl
from nonlocal_net.datasets import test_views
from nonlocal_net.engine.extract import extract_features
from nonlocal_net.tools.extract_features import main

BATCH = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = small_cfg(["TEST.NUM_TEST_CLIPS", "6"])
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "small.pt", cfg)


@pytest.fixture(scope="module")
def baseline(eval_videos, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "features.h5"
    summary = extract_features(
        eval_videos.list_file,
        checkpoint,
        out,
        batch_size=BATCH,
        workers=2,
        flush_every=1,
        progress=False,
    )
    return summary, out


def read_rows(path):
    with h5py.File(path, "r") as f:
        header = json.loads(f.attrs["header"])
        return header, (
            f["views/video_id"][()],
            f["views/view_index"][()],
            f["views/features"][()],
            f["videos/video_id"][()],
        )


def test_rows_are_the_pooled_res5_features(eval_videos, checkpoint, baseline):
    summary, out = baseline
    n = len(eval_videos.labels)
    assert summary["num_decode_errors"] == 2 and len(summary["errors"]) == 2
    assert summary["num_videos"] == n and summary["feature_dim"] == 2048
    header, (video_ids, view_index, feats, videos) = read_rows(out)
    assert header["layer"] == "pool5" and header["precision"] == "strict"
    assert header["weights"] == os.path.abspath(checkpoint) and header["protocol"]["scale"]
    assert videos.tolist() == list(range(n))  # bad videos recorded with no rows
    model = nl.load_model(checkpoint, split="test")
    video = eval_videos.root / eval_videos.specs[0].name
    views, _ = test_views(video, model.cfg)
    with torch.inference_mode():
        pooled = torch.cat(
            [model.forward_features(views[i : i + BATCH]).mean(dim=(2, 3, 4)) for i in (0, 4)]
        )
    rows = video_ids == 0
    assert view_index[rows].tolist() == list(range(6))
    torch.testing.assert_close(torch.from_numpy(feats[rows]), pooled, rtol=1e-5, atol=1e-6)


def run_cli(args, **kwargs):
    command = [sys.executable, "-m", "nonlocal_net.tools.extract_features", *map(str, args)]
    return subprocess.Popen(command, **kwargs)


def test_resume_after_sigkill_is_identical(eval_videos, checkpoint, baseline, tmp_path):
    _, base = baseline
    out = tmp_path / "killed.h5"
    args = ["--weights", checkpoint, "--list", eval_videos.list_file, "--output", out]
    args += ["--batch-size", BATCH, "--workers", 0, "--flush-every", 1, "--no-progress"]
    proc = run_cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = Path(str(out) + ".parts")
    deadline = time.monotonic() + 300
    while not list(parts.glob("part-*.h5")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    resumed = run_cli([*args, "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr.decode()[-3000:]
    assert "resuming:" in stderr.decode() and "2 undecodable" in stdout.decode()
    # the uninterrupted reference: the same command, same arguments, run once to the end
    whole = tmp_path / "whole.h5"
    uninterrupted = run_cli([a if a != out else whole for a in args], stdout=subprocess.DEVNULL)
    assert uninterrupted.wait(timeout=600) == 0
    rows, whole_rows = read_rows(out)[1], read_rows(whole)[1]
    for a, b in zip(rows, whole_rows):
        assert np.array_equal(a, b)  # bitwise the uninterrupted run's rows
    base_rows = read_rows(base)[1]
    for i in (0, 1, 3):  # and the same rows as the in-process run with 2 workers
        assert np.array_equal(rows[i], base_rows[i])
    np.testing.assert_allclose(rows[2], base_rows[2], rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(eval_videos, checkpoint, baseline, tmp_path):
    _, base = baseline
    out = tmp_path / "dist.h5"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(Path(sys.executable).parent / "vnl-extract"),
        "--weights",
        str(checkpoint),
        "--list",
        str(eval_videos.list_file),
        "--output",
        str(out),
        "--batch-size",
        str(BATCH),
        "--workers",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    rows, base_rows = read_rows(out)[1], read_rows(base)[1]
    assert np.array_equal(rows[0], base_rows[0]) and np.array_equal(rows[1], base_rows[1])
    assert np.array_equal(rows[3], base_rows[3])  # no duplicates, nothing missing
    np.testing.assert_allclose(rows[2], base_rows[2], rtol=1e-4, atol=1e-6)  # 1 vs 2 threads


def test_per_video_hooked_layer_in_fp32(eval_videos, checkpoint, tmp_path):
    out = tmp_path / "res4.h5"
    summary = extract_features(
        eval_videos.list_file,
        checkpoint,
        out,
        layer="res4",
        per_video=True,
        precision="fp32",
        batch_size=BATCH,
        workers=0,
        limit=2,
        progress=False,
    )
    assert summary["feature_dim"] == 1024 and summary["num_rows"] == 2
    header, (video_ids, view_index, feats, _) = read_rows(out)
    assert header["precision"] == "fp32" and header["layer"] == "res4" and header["per_video"]
    assert view_index.tolist() == [-1, -1] and video_ids.tolist() == [0, 1]
    model = nl.load_model(checkpoint, split="test")
    captured = []
    model.res4.register_forward_hook(lambda m, i, o: captured.append(o.mean(dim=(2, 3, 4))))
    views, _ = test_views(eval_videos.root / eval_videos.specs[0].name, model.cfg)
    with torch.inference_mode():
        model.forward_features(views)
    expected = captured[0].double().mean(0).float()
    err = (torch.from_numpy(feats[0]) - expected).abs().max() / expected.abs().max()
    assert err < 1e-5


def test_refusals_are_one_line(eval_videos, checkpoint, tmp_path, capsys):
    base = ["--weights", str(checkpoint), "--list", str(eval_videos.list_file)]
    inputs = {p: p.read_bytes() for p in (Path(checkpoint), Path(eval_videos.list_file))}

    def refused(args, *expected):
        assert main([*base, *map(str, args)]) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("vnl-extract: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert all(text in lines[0] for text in expected), lines[0]

    refused(["--output", tmp_path / "x.h5", "--layer", "res9"], "unknown layer 'res9'")
    refused(["--output", eval_videos.list_file], "same file as the input")
    link = tmp_path / "weights-link.h5"
    link.symlink_to(checkpoint)
    refused(["--output", link, "--overwrite"], "same file as the input")  # through a link
    foreign = tmp_path / "notes.h5"
    foreign.write_text("mine")
    refused(["--output", foreign], "not a features file", "--overwrite")
    assert foreign.read_text() == "mine"
    held = tmp_path / "held.h5"
    lock = Path(str(held) + ".lock")  # a live writer (this test's parent process) holds it
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    refused(["--output", held], f"process {os.getppid()}", "held.h5.lock")
    assert lock.exists() and not held.exists()
    refused(["--output", tmp_path / "y.h5", "--precision", "fp16"], "needs a CUDA GPU")
    for option in (["--workers", "-1"], ["--batch-size", "0"], ["--flush-every", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, "--output", str(tmp_path / "z.h5"), *option])
        assert exit_info.value.code == 2
        assert "vnl-extract: error: argument " + option[0] in capsys.readouterr().err
    assert all(p.read_bytes() == data for p, data in inputs.items())


def test_nonfinite_views_are_failed_views_not_rows(eval_videos, checkpoint, tmp_path):
    """A numeric fault in some views: their rows are never written, they are counted per
    video and in the summary; a stale temporary of a killed writer is removed first."""
    out = tmp_path / "nan.h5"
    stale = tmp_path / ".nan.h5.999999999-0123456789ab.tmp"  # no such pid
    stale.write_bytes(b"half-written")
    model = nl.load_model(checkpoint, split="test")

    def break_first_view(module, inputs, output):
        output = output.clone()
        output[0] = float("nan")  # the first view of every batch
        return output

    model.res5.register_forward_hook(break_first_view)
    summary = extract_features(
        eval_videos.list_file, None, out, model=model, batch_size=BATCH, workers=0, limit=2,
        progress=False,
    )  # fmt: skip
    assert not stale.exists()
    # 6 views per video in batches of 4 and 2: views 0 and 4 fail
    assert summary["num_failed_views"] == 4 and summary["num_videos_with_failed_views"] == 2
    assert summary["num_rows"] == 8 and summary["num_decode_errors"] == 0
    _, (video_ids, view_index, feats, _) = read_rows(out)
    assert np.isfinite(feats).all()
    assert view_index[video_ids == 0].tolist() == [1, 2, 3, 5]
