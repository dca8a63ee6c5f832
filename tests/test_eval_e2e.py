"""End to end with the real (small) I3D non-local network: the report against a computation
by hand, resume after SIGKILL, torchrun with two processes, and vnl-predict."""

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
from eval_helpers import first_max, small_cfg, top5_by_hand, write_checkpoint

import nonlocal_net as nl
from nonlocal_net.datasets import test_views
from nonlocal_net.engine import evaluate, score_results

BATCH = 4  # views per forward pass: videos of 6 views run as batches of 4 + 2
METRICS = (
    "num_entries",
    "top1_correct",
    "top5_correct",
    "clip_correct",
    "clip1_correct",
    "clip1_lmdb_order_correct",
    "num_views",
    "num_empty_videos",
    "num_incomplete_videos",
    "min_views_per_video",
    "max_views_per_video",
    "num_decode_errors",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = small_cfg(["TEST.NUM_TEST_CLIPS", "6"])  # 2 clips x 3 crops: the pipeline, cheaply
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "small.pt", cfg)


@pytest.fixture(scope="module")
def baseline(eval_videos, checkpoint, tmp_path_factory):
    """One uninterrupted single-process run with results."""
    out = tmp_path_factory.mktemp("baseline") / "results.h5"
    report = evaluate(
        eval_videos.list_file,
        checkpoint,
        results=out,
        batch_size=BATCH,
        workers=2,
        flush_every=1,
        progress=False,
    )
    return report, out


def read_views(path):
    with h5py.File(path, "r") as f:
        return (
            f["views/video_id"][()],
            f["views/view_index"][()],
            f["views/scores"][()],
            f["videos/video_id"][()],
        )


def run_cli(args, env=None, **kwargs):
    command = [sys.executable, "-m", "nonlocal_net.tools.test_net_video", *map(str, args)]
    return subprocess.Popen(command, env={**os.environ, **(env or {})}, **kwargs)


def test_report_matches_a_computation_by_hand(eval_videos, checkpoint, baseline):
    report, results = baseline
    model = nl.load_model(checkpoint, split="test")
    cfg = model.cfg
    labels = eval_videos.labels
    expected_views = {}
    for vid, spec in enumerate(eval_videos.specs):
        views, meta = test_views(eval_videos.root / spec.name, cfg)
        assert meta.num_frames == spec.num_frames
        with torch.inference_mode():
            expected_views[vid] = torch.cat([model(views[i : i + BATCH]) for i in (0, 4)]).numpy()
    top1 = top5 = clip = clip1 = 0
    for vid, scores in expected_views.items():
        total = scores.astype(np.float64).sum(0).tolist()
        top1 += first_max(total) == labels[vid]
        top5 += labels[vid] in top5_by_hand(total)
        clip += sum(first_max(row.tolist()) == labels[vid] for row in scores)
        clip1 += first_max(scores[0].tolist()) == labels[vid]
    n = len(labels)
    assert report["num_entries"] == n == len(eval_videos.specs) + 2
    assert report["top1_correct"] == top1 and report["top1_accuracy"] == top1 / n
    assert report["top5_correct"] == top5 and report["top5_accuracy"] == top5 / n
    assert report["clip_correct"] == clip and report["num_views"] == 6 * len(expected_views)
    assert report["clip1_correct"] == clip1
    assert report["num_empty_videos"] == 2 and report["num_decode_errors"] == 2
    assert (report["min_views_per_video"], report["max_views_per_video"]) == (0, 6)
    video_ids, view_index, scores, videos = read_views(results)
    assert videos.tolist() == list(range(n))  # every entry recorded, broken ones with 0 views
    for vid, expected in expected_views.items():
        rows = video_ids == vid
        assert view_index[rows].tolist() == list(range(6))
        torch.testing.assert_close(scores[rows], expected, rtol=1e-5, atol=1e-6)
    assert report["throughput"]["videos"] == n and report["throughput"]["views"] == 36
    for key in METRICS:
        assert score_results(results)[key] == report[key], key


def test_resume_after_sigkill_gives_the_uninterrupted_results(
    eval_videos, checkpoint, baseline, tmp_path
):
    base_report, base_results = baseline
    out = tmp_path / "killed.h5"
    args = ["--weights", checkpoint, "--list", eval_videos.list_file, "--results", out]
    args += ["--batch-size", BATCH, "--workers", 0, "--flush-every", 1, "--no-progress"]
    proc = run_cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = Path(str(out) + ".parts")
    deadline = time.monotonic() + 300
    while not list(parts.glob("part-*.h5")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    recorded = list(parts.glob("part-*.h5"))
    assert recorded and not out.exists()  # killed mid-run: parts only, no final file
    # what a kill in the middle of a write leaves behind: half-written temporaries
    (parts / f".{recorded[0].name}.0123456789ab.tmp").write_bytes(b"\x89HDF\r\n\x1a\n trunc")
    (tmp_path / ".killed.h5.ba9876543210.tmp").write_bytes(b"\x89HDF\r\n\x1a\n trunc")
    resumed = run_cli([*args, "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr.decode()[-3000:]
    assert "resuming:" in stderr.decode()
    assert out.exists() and not parts.exists()
    assert not list(tmp_path.glob(".*.tmp"))
    for a, b in zip(read_views(out), read_views(base_results)):
        assert np.array_equal(a, b)  # bitwise the uninterrupted scores
    report = json.loads((tmp_path / "killed.report.json").read_text())
    for key in METRICS:
        assert report[key] == base_report[key], key
    assert report["throughput"]["videos"] < len(eval_videos.labels)  # only the rest ran
    assert "top-1 accuracy" in stdout.decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(eval_videos, checkpoint, baseline, tmp_path):
    base_report, base_results = baseline
    out = tmp_path / "dist.h5"
    vnl_test = Path(sys.executable).parent / "vnl-test"  # the console script
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(vnl_test),
        "--weights",
        str(checkpoint),
        "--list",
        str(eval_videos.list_file),
        "--results",
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
    report = json.loads((tmp_path / "dist.report.json").read_text())
    assert report["world_size"] == 2 and report["throughput"]["world_size"] == 2
    for key in METRICS:
        assert report[key] == base_report[key], key
    video_ids, view_index, scores, videos = read_views(out)
    base = read_views(base_results)
    assert np.array_equal(video_ids, base[0]) and np.array_equal(view_index, base[1])
    assert np.array_equal(videos, base[3])  # no duplicates, nothing missing
    np.testing.assert_allclose(scores, base[2], rtol=1e-4, atol=1e-6)  # 1 vs 2 threads


def test_vnl_predict(eval_videos, checkpoint, baseline, tmp_path, capsys):
    from nonlocal_net.tools.predict_video import main

    _, results = baseline
    names = {f'"class {i} name"' if i % 2 else f"class_{i}": i for i in range(7)}
    labels = tmp_path / "classids.json"
    labels.write_text(json.dumps(names))
    features = tmp_path / "feats.npy"
    video = eval_videos.root / eval_videos.specs[0].name
    args = [str(video), "--weights", str(checkpoint), "--labels", str(labels), "--topk", "3"]
    assert main([*args, "--features", str(features), "--batch-size", str(BATCH)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{video}: {eval_videos.specs[0].num_frames} frames")
    video_ids, _, scores, _ = read_views(results)
    mean = scores[video_ids == 0].astype(np.float64).mean(0)
    order = sorted(range(7), key=lambda c: (-mean[c], c))[:3]
    for rank, (line, c) in enumerate(zip(lines[1:], order), 1):
        name = f"class {c} name" if c % 2 else f"class_{c}"
        assert line == f"{rank:>2}. {mean[c]:.4f}  {name}  ({c})"
    feats = np.load(features)
    assert feats.shape == (6, 2048) and feats.dtype == np.float32
    model = nl.load_model(checkpoint, split="test")
    views, _ = test_views(video, model.cfg)
    with torch.inference_mode():
        pooled = model.forward_features(views[:BATCH]).mean(dim=(2, 3, 4))
    torch.testing.assert_close(torch.from_numpy(feats[:BATCH]), pooled, rtol=1e-5, atol=1e-6)
    assert main([str(eval_videos.empty), "--weights", str(checkpoint)]) == 2
