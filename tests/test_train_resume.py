"""vnl-train's resume as the original's (CHECKPOINT.RESUME, its own c2_model_iterN.pkl), the
refusals before the first iteration, non-finite numbers that stop a run, metrics.jsonl and the
fp32 arithmetic, on OpenCV-written videos with the real (tiny) I3D non-local network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import BASE, TINY, run_train, write_class_dataset

import nonlocal_net as nl
from nonlocal_net.converters.reader import read_caffe2_pkl
from nonlocal_net.converters.synthetic import synthetic_checkpoint_blobs, write_synthetic_checkpoint
from nonlocal_net.converters.writer import write_caffe2_pkl


def overrides(**changes):
    """TINY with some KEY VALUE pairs replaced (keys written with '__' for '.')."""
    pairs = dict(zip(TINY[0::2], TINY[1::2]))
    pairs.update({k.replace("__", "."): str(v) for k, v in changes.items()})
    return [x for kv in pairs.items() for x in kv]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_class_dataset(tmp_path_factory.mktemp("resume_data"))


def base_args(data, out, **changes):
    return [
        "--model", BASE, "--train-list", data, "--output-dir", out, "--workers", "0",
        "--no-progress", *overrides(**changes),
    ]  # fmt: skip


def in_process(args, capsys):
    """``vnl-train ARGS`` in this process: ``(exit status, stderr)``."""
    from nonlocal_net.tools.train_net_video import main

    status = main([str(a) for a in args])
    return status, capsys.readouterr().err


def error_line(args, capsys):
    """The one ``vnl-train: error:`` line of a refused run (exit 2, no traceback)."""
    status, err = in_process(args, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("vnl-train: error:")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "iter 1/" not in err  # refused before the first iteration
    return lines[0]


def checkpoint_files(out):
    folder = Path(out) / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "changes, expected",
    [
        (
            dict(TRAIN__COMPUTE_PRECISE_BN="True", TRAIN__ITER_COMPUTE_PRECISE_BN=0),
            "TRAIN.ITER_COMPUTE_PRECISE_BN",
        ),
        (dict(TRAIN__JITTER_SCALES="[60000,60000]"), "TRAIN.JITTER_SCALES"),
        (dict(CHECKPOINT__CHECKPOINT_PERIOD=0), "CHECKPOINT.CHECKPOINT_PERIOD"),
        (dict(CHECKPOINT__CHECKPOINT_PERIOD=-5), "CHECKPOINT.CHECKPOINT_PERIOD"),
        (dict(TRAIN__EVAL_PERIOD=0), "TRAIN.EVAL_PERIOD"),
        (dict(LOG_PERIOD=0), "LOG_PERIOD"),
    ],
)
def test_bad_settings_are_refused_before_anything(data, tmp_path, capsys, changes, expected):
    out = tmp_path / "run"
    line = error_line(base_args(data, out, **changes), capsys)
    assert expected in line
    assert not out.exists()  # not even the lock or the metrics file


def test_val_list_without_a_usable_line_is_refused_before_training(data, tmp_path, capsys):
    val = tmp_path / "val.txt"
    val.write_text("no_label.avi\nx.avi notanumber\n")
    out = tmp_path / "run"
    line = error_line([*base_args(data, out, TRAIN__EVAL_PERIOD=2), "--val-list", val], capsys)
    assert "val.txt" in line and "no usable entry" in line
    assert checkpoint_files(out) == [] and not (out / "metrics.jsonl").exists()


def test_params_file_past_max_iter_is_refused_with_a_clear_message(data, tmp_path, capsys):
    params = tmp_path / "trained.pkl"  # model_iter 400000, as a released checkpoint
    write_synthetic_checkpoint(params, nl.get_cfg(BASE, overrides()))
    out = tmp_path / "run"
    line = error_line(base_args(data, out, TRAIN__PARAMS_FILE=params), capsys)
    assert "model_iter 400000" in line and "SOLVER.MAX_ITER 6" in line
    assert "TRAIN.RESET_START_ITER" in line
    assert checkpoint_files(out) == [] and not (out / "metrics.jsonl").exists()


def test_tensorboard_without_the_package_is_one_line(data, tmp_path, capsys, monkeypatch):
    # the package hidden (a None entry makes the import fail), whether or not it is installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    line = error_line([*base_args(data, out), "--tensorboard"], capsys)
    assert "--tensorboard needs the tensorboard package" in line
    assert not out.exists()


def test_resume_false_with_checkpoints_is_refused_and_start_over_needs_no_resume(
    data, tmp_path, capsys
):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    kept = out / "checkpoints/c2_model_iter3.pkl"
    kept.write_bytes(b"the original's checkpoint")
    line = error_line(base_args(data, out, CHECKPOINT__RESUME="False"), capsys)
    assert "CHECKPOINT.RESUME is False" in line and "--start-over" in line
    assert "c2_model_iter3.pkl" in line
    from nonlocal_net.tools.train_net_video import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in base_args(data, out)] + ["--resume", "--start-over"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert kept.read_bytes() == b"the original's checkpoint"
    assert checkpoint_files(out) == ["c2_model_iter3.pkl"]


def test_someone_elses_metrics_file_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my notes\nmore notes\n")
    line = error_line(base_args(data, out), capsys)
    assert "metrics.jsonl" in line and "not a metrics file" in line
    assert (out / "metrics.jsonl").read_text() == "my notes\nmore notes\n"
    assert checkpoint_files(out) == []


def test_hostile_resume_file_is_refused_without_weights_only_advice(data, tmp_path, capsys):
    import argparse

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    hostile = {"format": "x", "payload": argparse.Namespace(a=1)}
    torch.save(hostile, out / "checkpoints/model_iter2.pt")
    line = error_line(base_args(data, out), capsys)
    assert "model_iter2.pt" in line and "argparse.Namespace" in line
    assert "weights_only" not in line and "nothing from it was executed" in line


# ----------------------------------------------------------------------------- non-finite


def test_inf_update_stops_the_run_and_writes_no_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    args = base_args(
        data,
        out,
        SOLVER__MAX_ITER=1,
        TRAIN__BATCH_SIZE=2,
        SOLVER__BASE_LR="3e38",
        SOLVER__STEP_SIZES="[100]",
        SOLVER__LRS="[1]",
    )
    result = run_train(args)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("vnl-train: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "update of iteration 1" in lines[0] and "non-finite" in lines[0]
    assert checkpoint_files(out) == []
    assert not (out / "checkpoints.lock").exists()


def test_caffe2_checkpoint_with_nan_is_not_resumed_from(data, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = nl.get_cfg(BASE, overrides())
    blobs = synthetic_checkpoint_blobs(cfg, model_iter=2, lr=0.01)
    blobs["res3_0_branch2a_w"][0, 0, 0, 0, 0] = np.nan
    write_caffe2_pkl(blobs, out / "checkpoints/c2_model_iter2.pkl", protocol=2, wrapped=True)
    line = error_line(base_args(data, out), capsys)
    assert "c2_model_iter2.pkl" in line and "res3_0_branch2a_w: 1 NaN" in line
    assert checkpoint_files(out) == ["c2_model_iter2.pkl"]


# ----------------------------------------------------------------------------- arithmetic


def test_fp32_on_cuda_turns_tf32_off_for_the_run_and_restores_it(data, tmp_path, monkeypatch):
    from nonlocal_net.engine import trainer
    from nonlocal_net.engine.arithmetic import run_arithmetic, tf32_flags
    from nonlocal_net.engine.distributed import DistContext

    saved = tf32_flags()
    torch.backends.cudnn.allow_tf32 = True  # torch's defaults on CUDA (matmul: off)
    torch.backends.cuda.matmul.allow_tf32 = False
    before = tf32_flags()
    seen = {}

    def fake_train(opts, ctx, micro, metrics):  # what the iterations would run under
        seen[opts.precision] = tf32_flags()
        return {}

    monkeypatch.setattr(trainer, "_train", fake_train)
    cfg = nl.get_cfg(BASE, overrides())
    ctx = DistContext(device=torch.device("cuda"))
    for precision in ("fp32", "bf16"):
        opts = trainer.TrainOptions(
            cfg=cfg, train_list=str(data), output_dir=str(tmp_path / precision), precision=precision
        )
        trainer.train(opts, ctx)
    off = {"cudnn.allow_tf32": False, "cuda.matmul.allow_tf32": False}
    assert {k: seen["fp32"][k] for k in off} == off
    assert seen["fp32"]["float32_matmul_precision"] == "highest"
    assert seen["bf16"] == before  # autocast path, flags untouched
    assert tf32_flags() == before  # restored after the run
    with run_arithmetic("fp32", torch.device("cpu")):  # CPU: nothing to change
        assert tf32_flags() == before
    torch.backends.cudnn.allow_tf32 = bool(saved["cudnn.allow_tf32"])
    torch.backends.cuda.matmul.allow_tf32 = bool(saved["cuda.matmul.allow_tf32"])


# ----------------------------------------------------------------------------- resume


def test_original_checkpoint_is_continued_with_its_momentum_and_rescale(data, tmp_path):
    """A ``c2_model_iter2.pkl`` as the original writes it (non-zero momenta, lr 0.02 while the
    schedule's LR of iteration 2 is 0.01) in the output folder: the same command continues it
    from iteration 2; Nesterov with the original's rescale: ``p_2 - p_3 = (1 + mu) m_3 - mu * r
    * m_2`` with ``r = 0.01 / 0.02``."""
    out = tmp_path / "run"
    args = dict(SOLVER__MAX_ITER=3, TRAIN__BATCH_SIZE=2, CHECKPOINT__CHECKPOINT_PERIOD=-1)
    cfg = nl.get_cfg(BASE, overrides(**args))
    blobs = synthetic_checkpoint_blobs(cfg, model_iter=2, lr=0.02)
    write_caffe2_pkl(blobs, out / "checkpoints/c2_model_iter2.pkl", protocol=2, wrapped=True)
    result = run_train(base_args(data, out, **args), check=True)
    assert "the original's checkpoint format) at iteration 2" in result.stderr
    assert "iterations 2..3" in result.stderr and "iter 3/3" in result.stderr
    after = read_caffe2_pkl(out / "checkpoints/c2_model_iter3.pkl")
    assert after.model_iter == 3 and after.lr == pytest.approx(0.01)
    mu, r = np.float32(0.9), np.float32(np.float32(0.01) / np.float32(0.02))
    checked = 0
    for name, m3 in after.momentum.items():
        param = name[: -len("_momentum")]
        p2, p3, m2 = blobs[param], after.blobs[param], blobs[name]
        step = (np.float32(1) + mu) * m3 - mu * (m2 * r)
        np.testing.assert_allclose(p2 - p3, step, rtol=0, atol=4e-7 * np.abs(p2).max() + 1e-12)
        checked += 1
    assert checked == len(blobs) - len(after.blobs) - 2 and checked > 100


@pytest.mark.slow
def test_resume_with_other_settings_or_inf_checkpoint_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    # NUM_GPUS 2: --accumulate 2 is then a per-GPU BN layout the trainer accepts, so what
    # refuses it is the resume check
    args = dict(SOLVER__MAX_ITER=1, TRAIN__BATCH_SIZE=2, NUM_GPUS=2)
    run_train(base_args(data, out, **args), check=True)
    before = checkpoint_files(out)
    assert before == ["c2_model_iter1.pkl", "model_iter1.pt"]
    more = dict(args, SOLVER__MAX_ITER=2)  # a longer run: another config key
    for extra, named in [
        (["--accumulate", "2"], "--accumulate: 1 -> 2"),
        (["--backend", "pyav"], "--backend: opencv -> pyav"),
        (["--data-root", data.parent], "--data-root"),
        (["--precision", "fp32", "--resume"], "SOLVER.MAX_ITER: 1 -> 2"),
    ]:
        line = error_line([*base_args(data, out, **more), *extra], capsys)
        assert "cannot resume from" in line and named in line, line
    # a checkpoint that holds an infinity is never continued from
    pt = out / "checkpoints/model_iter1.pt"
    saved = torch.load(pt, weights_only=True)
    saved["state_dict"]["res4.0.branch2b.weight"].view(-1)[3] = float("inf")
    torch.save(saved, out / "checkpoints/model_iter2.pt")
    line = error_line(base_args(data, out, **args), capsys)
    assert "model_iter2.pt" in line and "res4.0.branch2b.weight: 1 +Inf" in line
    assert checkpoint_files(out) == ["c2_model_iter1.pkl", "model_iter1.pt", "model_iter2.pt"]


@pytest.mark.slow
def test_start_over_deletes_the_checkpoints_and_restarts_the_metrics(data, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints/c2_model_iter7.pkl").write_bytes(b"old")
    (out / "checkpoints/.model_iter7.pt.1-0123456789ab.tmp").write_bytes(b"old temp")
    (out / "checkpoints/notes.txt").write_text("mine")
    old = {"kind": "train", "iter": 7, "loss": 1.0}
    (out / "metrics.jsonl").write_text(json.dumps(old) + "\n")
    args = base_args(data, out, SOLVER__MAX_ITER=1, TRAIN__BATCH_SIZE=2, CHECKPOINT__RESUME="False")
    result = run_train([*args, "--start-over"], check=True)
    assert "deleted 2 checkpoint file(s)" in result.stderr
    assert checkpoint_files(out) == ["c2_model_iter1.pkl", "model_iter1.pt", "notes.txt"]
    assert [r["iter"] for r in metrics(out)] == [1]


def test_metrics_file_keeps_lines_up_to_the_resumed_iteration(tmp_path):
    from nonlocal_net.engine.train_metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "train", "iter": i, "loss": float(i)} for i in (1, 2, 3)]
    lines.insert(2, {"kind": "val", "iter": 2, "top1_err": 0.5, "top5_err": 0.0})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "tr')  # killed
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False)
    log.check([])
    log.open(2)
    log.train(3, {"loss": 0.25, "lr": 0.01, "clips_per_s": float("nan")})
    log.close()
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["kind"], r["iter"]) for r in records] == [
        ("train", 1),
        ("train", 2),
        ("val", 2),
        ("train", 3),
    ]
    assert records[-1]["loss"] == 0.25 and records[-1]["clips_per_s"] is None
    assert "time" in records[-1]


def test_tensorboard_scalars_when_the_package_is_installed(data, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = [*base_args(data, out, SOLVER__MAX_ITER=2, TRAIN__BATCH_SIZE=2), "--tensorboard"]
    status, err = in_process(args, capsys)
    assert status == 0, err
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    losses = [r["loss"] for r in metrics(out)]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses)


def test_stale_checkpoint_temporaries_are_removed_when_the_checkpoint_is_written(tmp_path):
    from nonlocal_net.engine.train_checkpoints import remove_stale_checkpoint_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = folder / f".model_iter4.pt.{dead.pid}-0123456789ab.tmp"
    live = folder / f".model_iter4.pt.{os.getppid()}-0123456789ab.tmp"
    other = folder / f".model_iter8.pt.{dead.pid}-0123456789ab.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    removed = remove_stale_checkpoint_temporaries(folder / "model_iter4.pt")
    assert removed == [str(stale)] and live.exists() and other.exists()
