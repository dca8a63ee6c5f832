"""vnl-train end to end on OpenCV-written videos with the real (tiny) I3D non-local network:
overfitting, the written .pkl through vnl-convert and vnl-verify, resume after SIGKILL,
torchrun DDP against --accumulate, and the refusals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import (
    AFFINE_BASE,
    BASE,
    TINY,
    TRAIN_THREADS,
    in_process_error,
    run_train,
    write_class_dataset,
)

import nonlocal_net as nl
from nonlocal_net.converters.reader import read_caffe2_pkl


def overrides(**changes):
    """TINY with some KEY VALUE pairs replaced (keys written with '__' for '.')."""
    pairs = dict(zip(TINY[0::2], TINY[1::2]))
    pairs.update({k.replace("__", "."): str(v) for k, v in changes.items()})
    return [x for kv in pairs.items() for x in kv]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return write_class_dataset(root)


def base_args(data, out, model=BASE, **changes):
    return [
        "--model", model, "--train-list", data, "--output-dir", out, "--workers", "0",
        "--no-progress", *overrides(**changes),
    ]  # fmt: skip


def one_line_error(result):
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("vnl-train: error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def losses_and_errors(stderr):
    found = re.findall(r"iter (\d+)/\d+ .*? loss ([0-9.]+)\s+top1_err ([0-9.]+)%", stderr)
    return [(int(i), float(loss), float(err)) for i, loss, err in found]


@pytest.mark.slow
def test_overfits_and_pkl_converts_and_verifies(data, tmp_path):
    out = tmp_path / "run"
    result = run_train(
        base_args(
            data,
            out,
            SOLVER__MAX_ITER=16,
            SOLVER__BASE_LR=0.003,  # batches of 3 with per-batch BN statistics: noisy at 0.01
            SOLVER__STEP_SIZES="[100]",
            SOLVER__LRS="[1]",
            TRAIN__BATCH_SIZE=3,
            CHECKPOINT__CHECKPOINT_PERIOD=-1,
        ),
        check=True,
    )
    log = losses_and_errors(result.stderr)
    assert [i for i, _, _ in log] == list(range(1, 17))
    first, last = log[0][1], [loss for _, loss, _ in log[-3:]]
    assert max(last) < first / 3, log
    assert all(err == 0.0 for _, _, err in log[-3:]), log  # training accuracy 100%
    pkl = out / "checkpoints/c2_model_iter16.pkl"
    ckpt = read_caffe2_pkl(pkl)
    assert ckpt.wrapped and ckpt.protocol == 2 and ckpt.model_iter == 16
    assert ckpt.lr == pytest.approx(0.003)
    assert len(ckpt.blobs) == 327 and len(ckpt.momentum_info) == 211  # R50 + 5 non-local
    cfg = overrides(TRAIN__BATCH_SIZE=3)
    conv = tmp_path / "conv.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "nonlocal_net.converters", pkl, conv, "--model", BASE, *cfg],
        check=True,
        env=env,
        capture_output=True,
    )
    verify = subprocess.run(
        [sys.executable, "-m", "nonlocal_net.verify", pkl, conv, "--split", "val", *cfg],
        env=env,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0 and "PASS" in verify.stdout, verify.stdout + verify.stderr
    # the .pt is what nl.load_model reads, with the same weights
    model = nl.load_model(out / "checkpoints/model_iter16.pt", split="val")
    converted = nl.load_model(conv, split="val")
    for key, value in model.state_dict().items():
        assert torch.equal(value, converted.state_dict()[key]), key


def final_state(out, iteration):
    return torch.load(out / f"checkpoints/model_iter{iteration}.pt", weights_only=True)


def dead_pid():
    """The pid of a process that has exited (what a SIGKILLed writer leaves in its temp name)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def metrics_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "rerun",
    [
        pytest.param([], id="same-command"),
        # the synonym's parsing is covered by the fast resume tests; its full chain is heavy
        pytest.param(["--resume"], id="--resume", marks=pytest.mark.parity_full),
    ],
)
def test_sigkill_then_rerun_is_bit_identical(data, tmp_path, rerun):
    """A run killed with SIGKILL and run again with the same command (CHECKPOINT.RESUME True,
    the default; ``--resume`` is a synonym) ends as an uninterrupted run, tensor for tensor:
    weights, statistics, momentum, both checkpoint formats, metrics.jsonl's iterations."""
    args = dict(SOLVER__MAX_ITER=4, CHECKPOINT__CHECKPOINT_PERIOD=1, TRAIN__BATCH_SIZE=2)
    args.update(TRAIN__DROPOUT_RATE=0.5)  # the RNG state must survive the resume too
    args.update(TRAIN__EVAL_PERIOD=2)  # validation records in metrics.jsonl
    args.update(TEST__NUM_TEST_CLIPS=3)  # TEST_AFTER_TRAIN's test: 3 views a video, not 30
    val = ["--val-list", data]
    straight = tmp_path / "straight"
    run_train([*base_args(data, straight, **args), *val], check=True)
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "nonlocal_net.tools.train_net_video"]
    proc = subprocess.Popen(
        [*command, *map(str, base_args(data, killed, **args)), *map(str, val)],
        env={**os.environ, "OMP_NUM_THREADS": TRAIN_THREADS},  # as run_train: bit for bit
        stderr=subprocess.DEVNULL,
    )
    target = killed / "checkpoints/model_iter2.pt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists() and not (killed / "checkpoints/model_iter4.pt").exists()
    assert (killed / "checkpoints.lock").exists()  # left behind by the killed trainer
    # what a kill during the next checkpoint's write leaves (the writer's pid is gone)
    stale = [killed / f"checkpoints/.{name}.{dead_pid()}-00000000abcd.tmp" for name in
             ("model_iter3.pt", "c2_model_iter3.pkl")]  # fmt: skip
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    with open(killed / "metrics.jsonl", "a") as f:  # lines the killed run wrote after iter 2
        f.write('{"kind": "train", "iter": 3, "loss": 123.0}\n{"kind": "tra')
    resumed = run_train([*base_args(data, killed, **args), *val, *rerun], check=True)
    assert "resumed from" in resumed.stderr and "stale lock" in resumed.stderr
    assert not any(path.exists() for path in stale)
    a, b = final_state(straight, 4), final_state(killed, 4)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for (ka, va), (_, vb) in zip(
        a["train"]["optimizer"]["state"].items(), b["train"]["optimizer"]["state"].items()
    ):
        assert torch.equal(va["momentum_buffer"], vb["momentum_buffer"]), ka
    for n in (2, 4):  # c2_model_iter2.pkl too: rewritten on resume if the kill came before it
        pa = read_caffe2_pkl(straight / f"checkpoints/c2_model_iter{n}.pkl")
        pb = read_caffe2_pkl(killed / f"checkpoints/c2_model_iter{n}.pkl")
        assert pa.blobs.keys() == pb.blobs.keys() and pa.lr == pb.lr and pb.model_iter == n
        assert all((pa.blobs[k] == pb.blobs[k]).all() for k in pa.blobs)
        assert all((pa.momentum[k] == pb.momentum[k]).all() for k in pa.momentum)
    ra, rb = metrics_records(straight), metrics_records(killed)
    assert [(r["kind"], r["iter"]) for r in rb] == [(r["kind"], r["iter"]) for r in ra]
    assert [(r["kind"], r["iter"]) for r in ra] == [
        ("train", 1), ("train", 2), ("val", 2), ("train", 3), ("train", 4), ("val", 4)
    ]  # fmt: skip
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k in ("lr", "loss", "top1_err", "top5_err")} == {
            k: v for k, v in y.items() if k in ("lr", "loss", "top1_err", "top5_err")
        }
    # the test after training (TRAIN.TEST_AFTER_TRAIN) of the resumed run is the straight one's
    ta, tb = (json.loads((o / "test_report.json").read_text()) for o in (straight, killed))
    assert ta["num_views"] == tb["num_views"] == 6 * 3 and ta["num_videos_with_views"] == 6
    assert (ta["top1_accuracy"], ta["top5_accuracy"]) == (tb["top1_accuracy"], tb["top5_accuracy"])
    timing = {"train": ("clips_per_s", "iter_seconds", "data_seconds"), "val": ("seconds",)}
    for record in ra:
        assert all(record[k] >= 0 for k in timing[record["kind"]]) and record["time"] > 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_equals_accumulate_two(data, tmp_path):
    args = dict(SOLVER__MAX_ITER=2, CHECKPOINT__CHECKPOINT_PERIOD=-1, TRAIN__BATCH_SIZE=4)
    single = tmp_path / "single"
    one = run_train(
        [*base_args(data, single, AFFINE_BASE, **args), "--accumulate", "2"],
        env={"OMP_NUM_THREADS": "1"},  # as each of the two processes below
        check=True,
    )
    assert "1 process(es) x 2 micro-batch(es) x 2 clips" in one.stderr
    ddp = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", "-m", "nonlocal_net.tools.train_net_video",
        *map(str, base_args(data, ddp, AFFINE_BASE, **args)),
    ]  # fmt: skip
    result = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    a, b = final_state(single, 2)["state_dict"], final_state(ddp, 2)["state_dict"]
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert "2 process(es) x 1 micro-batch(es) x 2 clips" in result.stderr


def test_refusals_are_one_line_and_lose_nothing(data, tmp_path):
    out = tmp_path / "run"
    # a params file of another network (bottlenecks twice as wide)
    from nonlocal_net.converters.synthetic import write_synthetic_checkpoint

    other = tmp_path / "wider.pkl"
    write_synthetic_checkpoint(other, nl.get_cfg(BASE, overrides(RESNETS__WIDTH_PER_GROUP=8)))
    line = one_line_error(run_train(base_args(data, out, TRAIN__PARAMS_FILE=other)))
    assert "wider.pkl" in line
    # bf16 on CPU, an accumulate that does not divide the batch
    line = one_line_error(run_train([*base_args(data, out), "--precision", "bf16"]))
    assert "bf16" in line and "CUDA" in line
    line = one_line_error(run_train([*base_args(data, out), "--accumulate", "3"]))
    assert "--accumulate 3" in line
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_nan_loss_stops_naming_the_iteration_and_keeps_the_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    args = base_args(
        data,
        out,
        SOLVER__MAX_ITER=4,
        CHECKPOINT__CHECKPOINT_PERIOD=1,
        TRAIN__BATCH_SIZE=2,
        SOLVER__BASE_LR="1e30",
        SOLVER__STEP_SIZES="[100]",
        SOLVER__LRS="[1]",
    )
    line = one_line_error(run_train(args))
    match = re.search(r"non-finite at iteration (\d+)", line)
    assert match, line
    failed = int(match.group(1))
    kept = sorted(p.name for p in (out / "checkpoints").glob("model_iter*.pt"))
    assert kept == [f"model_iter{i}.pt" for i in range(1, failed)]
    assert not (out / "checkpoints.lock").exists()


@pytest.mark.slow
def test_resume_with_another_config_or_list_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = dict(SOLVER__MAX_ITER=1, TRAIN__BATCH_SIZE=2)
    run_train(base_args(data, out, **args), check=True)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    # the refusals in this process: the same main() as the command, without torch's start-up
    line, _ = in_process_error(base_args(data, out, SOLVER__BASE_LR="0.5", **args), capsys)
    assert "SOLVER.BASE_LR" in line and "0.01" in line and "0.5" in line
    other_list = tmp_path / "other.txt"
    other_list.write_text(data.read_text().replace("c2/v1.avi 2\n", ""))
    line, _ = in_process_error([*base_args(other_list, out, **args), "--resume"], capsys)
    assert "--train-list" in line
    line, _ = in_process_error(base_args(data, out, CHECKPOINT__RESUME="False", **args), capsys)
    assert "--start-over" in line and "CHECKPOINT.RESUME is False" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_live_second_trainer_is_refused_and_nothing_is_lost(data, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    kept = out / "checkpoints/model_iter1.pt"
    kept.write_bytes(b"the first trainer's checkpoint")
    lock = out / "checkpoints.lock"  # held by a live process (this test's parent)
    holder = json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "now"})
    lock.write_text(holder)
    line, _ = in_process_error([*base_args(data, out), "--resume"], capsys)
    assert f"process {os.getppid()}" in line and "checkpoints.lock" in line
    assert lock.read_text() == holder and kept.read_bytes() == b"the first trainer's checkpoint"
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoints", "checkpoints.lock", kept.name]


def test_inputs_are_never_checkpoints_or_reports(data, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    params = out / "checkpoints/c2_model_iter5.pkl"
    params.write_bytes(b"user weights")
    line, _ = in_process_error(base_args(data, out, TRAIN__PARAMS_FILE=params), capsys)
    assert "TRAIN.PARAMS_FILE" in line and "c2_model_iter5.pkl" in line
    val = tmp_path / "val.txt"  # a link whose target has a checkpoint name
    val.symlink_to(out / "checkpoints/model_iter7.pt")
    (out / "checkpoints/model_iter7.pt").write_text(data.read_text())
    line, _ = in_process_error([*base_args(data, out), "--val-list", val], capsys)
    assert "--val-list" in line and "checkpoint name" in line
    report = out / "test_report.json"  # not a report this package wrote
    report.write_text("my notes")
    args = [*base_args(data, out, TRAIN__TEST_AFTER_TRAIN="True"), "--val-list", data]
    line, _ = in_process_error(args, capsys)
    assert "test_report.json" in line and "not a test report" in line
    assert report.read_text() == "my notes" and params.read_bytes() == b"user weights"
    assert not (out / "checkpoints.lock").exists()


def test_bad_list_lines_are_counted_in_the_log(tmp_path, capsys):
    lst = write_class_dataset(tmp_path, extra_lines=[("missing_label.avi", ""), ("x.avi", "z")])
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints/model_iter1.pt").write_bytes(b"x")  # refused after the list is read
    line, err = in_process_error(base_args(lst, out, CHECKPOINT__RESUME="False"), capsys)
    assert "--start-over" in line and "CHECKPOINT.RESUME is False" in line
    assert "2 of 8 list lines are bad" in err


@pytest.mark.parametrize("option", [["--workers", "-1"], ["--accumulate", "0"]])
def test_invalid_numbers_are_refused_by_argparse(data, tmp_path, capsys, option):
    from nonlocal_net.tools.train_net_video import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in base_args(data, tmp_path / "run")] + option)
    assert exit_info.value.code == 2
    assert f"vnl-train: error: argument {option[0]}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
