"""Training starts from what users give it: a ``vnl-convert --blob-rm`` fine-tuning file
(BN statistics start at mean 0 / var 1, each logged "not found"), the fine-tuning script
``scripts/run_finetune_own_dataset.sh`` end to end, params files with NaN/Inf/negative
variances refused before the first iteration, and the per-GPU BN combinations of processes x
``--accumulate`` the trainer accepts or refuses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import BASE, TINY, in_process_error, run_train, write_class_dataset

import nonlocal_net as nl
from nonlocal_net.converters.names import state_dict_key_to_blob
from nonlocal_net.converters.reader import read_caffe2_pkl
from nonlocal_net.converters.synthetic import synthetic_checkpoint_blobs
from nonlocal_net.converters.writer import write_caffe2_pkl
from nonlocal_net.engine.trainer import initialise_from_params_file
from nonlocal_net.models.layers import SpatialBN

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def overrides(**changes):
    """TINY with some KEY VALUE pairs replaced (keys written with '__' for '.')."""
    pairs = dict(zip(TINY[0::2], TINY[1::2]))
    pairs.update({k.replace("__", "."): str(v) for k, v in changes.items()})
    return [x for kv in pairs.items() for x in kv]


def tiny_cfg(**changes):
    return nl.get_cfg(BASE, overrides(**changes))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_class_dataset(tmp_path_factory.mktemp("finetune_data"))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released-like checkpoint of the tiny network (BN statistics, momentum, model_iter)."""
    path = tmp_path_factory.mktemp("released") / "released.pkl"
    write_caffe2_pkl(synthetic_checkpoint_blobs(tiny_cfg(), seed=3), path)
    return path


def convert(*args):
    command = [sys.executable, "-m", "nonlocal_net.converters", *map(str, args)]
    return subprocess.run(command, env=ENV, capture_output=True, text=True)


def train_args(data, out, **changes):
    return [
        "--model", BASE, "--train-list", data, "--output-dir", out, "--workers", "0",
        "--no-progress", *overrides(**changes),
    ]  # fmt: skip


def no_checkpoint(out: Path) -> bool:
    return not any(p.suffix in (".pt", ".pkl") for p in out.rglob("*")) if out.exists() else True


def bn_statistic_blobs(cfg) -> list[str]:
    with torch.device("meta"):
        model = nl.build_model(cfg, split="val")
    return [
        state_dict_key_to_blob(k)
        for k in model.state_dict()
        if k.endswith(("running_mean", "running_var"))
    ]


# ----------------------------------------------------------------------------- --blob-rm


def test_blob_rm_file_initialises_statistics_at_zero_and_one(released, tmp_path, caplog):
    ft = tmp_path / "ft.pkl"
    result = convert(released, ft, "--blob-rm")
    assert result.returncode == 0, result.stderr
    assert not any(b.endswith(("_rm", "_riv")) for b in read_caffe2_pkl(ft).blobs)
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = nl.build_model(cfg, split="train")
    with torch.no_grad():  # statistics a fresh model would not have: they must be kept
        for m in model.modules():
            if isinstance(m, SpatialBN):
                m.running_mean.fill_(0.25)
                m.running_var.fill_(4.0)
    caplog.set_level("INFO")
    assert initialise_from_params_file(model, cfg, str(ft)) == 0
    blobs = read_caffe2_pkl(released).blobs
    for key, value in model.state_dict().items():
        blob = state_dict_key_to_blob(key)
        if key.endswith(("running_mean", "running_var")):
            # not in the file: the model's own values, untouched (the original: "not found")
            assert torch.all(value == (0.25 if key.endswith("mean") else 4.0)), key
        elif key.startswith("pred."):
            assert not np.array_equal(value.numpy(), blobs[blob]), key  # re-initialised
        else:
            np.testing.assert_array_equal(value.numpy(), blobs[blob].reshape(value.shape))
    stats = bn_statistic_blobs(cfg)
    assert len(stats) == 2 * sum(isinstance(m, SpatialBN) for m in model.modules())
    for blob in stats:
        assert f"{blob} not found" in caplog.text, blob
    assert "start at mean 0 / variance 1" in caplog.text
    # a fresh model holds mean 0 / var 1 there, as Caffe2's SpatialBN creates them
    fresh = nl.build_model(cfg, split="train")
    initialise_from_params_file(fresh, cfg, str(ft))
    for m in fresh.modules():
        if isinstance(m, SpatialBN):
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)


def test_strict_conversion_still_refuses_a_file_without_statistics(released, tmp_path):
    ft = tmp_path / "ft.pkl"
    assert convert(released, ft, "--blob-rm").returncode == 0
    result = convert(ft, tmp_path / "out.pt", "--model", BASE, *overrides())
    assert result.returncode == 2 and "running statistics would be missing" in result.stderr


@pytest.mark.slow
def test_blob_rm_file_trains(released, data, tmp_path):
    ft = tmp_path / "ft.pkl"
    assert convert(released, ft, "--blob-rm").returncode == 0
    out = tmp_path / "run"
    args = train_args(
        data,
        out,
        TRAIN__PARAMS_FILE=ft,
        SOLVER__MAX_ITER=2,
        CHECKPOINT__CHECKPOINT_PERIOD=-1,
        NUM_GPUS=2,  # per-GPU BN groups of 2 clips
        TRAIN__COMPUTE_PRECISE_BN=True,
        TRAIN__ITER_COMPUTE_PRECISE_BN=1,
    )
    result = run_train(args, check=True)
    assert "res_conv1_bn_rm not found" in result.stderr
    assert "per-GPU BN: NUM_GPUS 2 groups of 2 clips per iteration, 2 per forward pass" in (
        result.stderr
    )
    ckpt = read_caffe2_pkl(out / "checkpoints/c2_model_iter2.pkl")
    assert ckpt.model_iter == 2
    for name in bn_statistic_blobs(tiny_cfg()):
        value = ckpt.blobs[name]
        assert np.isfinite(value).all(), name
        if name.endswith("_riv"):  # precise BN replaced the 0 / 1 start
            assert not np.allclose(value, 1.0), name


# ----------------------------------------------------------------------------- the script


@pytest.mark.slow
def test_finetune_script_runs_end_to_end(released, data, tmp_path):
    bash = shutil.which("bash")
    assert bash
    checkpoints = tmp_path / "checkpoints"
    env = {
        **ENV,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RELEASED": str(released),
        "NUM_CLASSES": "3",
        "KINETICS_ROOT": str(Path(data).parent),
        "TRAIN_LIST": str(data),
        "VAL_LIST": str(data),
        "CHECKPOINTS": str(checkpoints),
    }
    # the script's own overrides first, then the tiny sizes: the later value wins
    tiny = overrides(
        SOLVER__MAX_ITER=2,
        SOLVER__STEP_SIZES="[100]",
        SOLVER__LRS="[1]",
        CHECKPOINT__CHECKPOINT_PERIOD=2,
        TRAIN__EVAL_PERIOD=2,
        NUM_GPUS=2,
        TRAIN__COMPUTE_PRECISE_BN=True,
        TRAIN__ITER_COMPUTE_PRECISE_BN=1,
        TRAIN__TEST_AFTER_TRAIN=False,
    )
    i = tiny.index("SOLVER.BASE_LR")  # keep the script's
    del tiny[i : i + 2]
    result = subprocess.run(
        [bash, str(SCRIPTS / "run_finetune_own_dataset.sh"), *tiny, "--workers", "0",
         "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    init = checkpoints / f"finetune_{BASE}_init.pkl"
    assert init.is_file() and not any(b.endswith("_rm") for b in read_caffe2_pkl(init).blobs)
    run = checkpoints / f"finetune_{BASE}_3cls"
    log = (run / "log.txt").read_text()
    assert "res_conv1_bn_rm not found" in log
    assert "precise BN at iteration 2" in log and "val at iteration 2" in log
    ckpt = read_caffe2_pkl(run / "checkpoints/c2_model_iter2.pkl")
    assert ckpt.blobs["pred_w"].shape[0] == 3  # NUM_CLASSES
    assert ckpt.lr == pytest.approx(0.005)  # the script's SOLVER.BASE_LR


# ----------------------------------------------------------------------------- bad params files


def _bad_blobs(kind: str) -> tuple[dict, str]:
    blobs = synthetic_checkpoint_blobs(tiny_cfg(), seed=4, momentum=False, model_iter=None)
    if kind == "nan":
        name = "res3_1_branch2b_w"
        blobs[name][0, 0, 0, 0, 0] = np.nan
    elif kind == "inf":
        name = "nonlocal_conv3_1_theta_b"
        blobs[name][1] = np.inf
    else:
        name = "res4_2_branch2a_bn_riv"
        blobs[name][3] = -0.5
    return blobs, name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nan", "inf", "negative_var"])
def test_bad_pkl_params_file_is_refused_before_the_first_iteration(kind, data, tmp_path, capsys):
    blobs, name = _bad_blobs(kind)
    bad = tmp_path / "bad.pkl"
    write_caffe2_pkl(blobs, bad)
    out = tmp_path / "run"
    line, _ = in_process_error(train_args(data, out, TRAIN__PARAMS_FILE=bad), capsys)
    assert "TRAIN.PARAMS_FILE" in line and str(bad) in line and name in line, line
    assert no_checkpoint(out)
    # vnl-convert refuses the same file, naming the same blob
    converted = convert(bad, tmp_path / "x.pt", "--model", BASE, *overrides())
    assert converted.returncode == 2 and name in converted.stderr


@pytest.mark.slow
def test_bad_pt_params_file_is_refused_before_the_first_iteration(data, tmp_path, capsys):
    blobs, name = _bad_blobs("negative_var")
    bad = tmp_path / "bad.pkl"
    write_caffe2_pkl(blobs, bad)
    pt = tmp_path / "bad.pt"
    made = convert(bad, pt, "--model", BASE, *overrides(), "--allow-nonfinite")
    assert made.returncode == 0, made.stderr
    out = tmp_path / "run"
    line, _ = in_process_error(train_args(data, out, TRAIN__PARAMS_FILE=pt), capsys)
    assert str(pt) in line and name in line, line
    assert no_checkpoint(out)


# ----------------------------------------------------------------------------- per-GPU BN


def test_accumulate_that_cannot_be_per_gpu_bn_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    # NUM_GPUS 1 (one BN group of 4 clips): 2 micro-batches of 2 clips cannot be it
    line, _ = in_process_error([*train_args(data, out), "--accumulate", "2"], capsys)
    assert "NUM_GPUS 1" in line and "--accumulate 2" in line and "4 clips" in line, line
    assert no_checkpoint(out)


@pytest.mark.slow
def test_any_accumulate_gives_the_same_per_gpu_bn(data, tmp_path):
    """NUM_GPUS 2 (groups of 2 clips): one forward of 4 clips (2 groups) or two of 2 clips (1
    group each) are the same training: same BN statistics, same mean gradient."""
    args = dict(SOLVER__MAX_ITER=2, CHECKPOINT__CHECKPOINT_PERIOD=-1, NUM_GPUS=2)
    states = []
    for accumulate in (1, 2):
        out = tmp_path / f"acc{accumulate}"
        # one thread: the sums of the two ways then differ by rounding alone (tight bound)
        result = run_train(
            [*train_args(data, out, **args), "--accumulate", str(accumulate)], env=ONE_THREAD
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"groups of 2 clips per iteration, {2 // accumulate} per forward pass" in (
            result.stderr
        )
        states.append(torch.load(out / "checkpoints/model_iter2.pt", weights_only=True))
    a, b = (s["state_dict"] for s in states)
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-6, msg=key)
    # and NUM_GPUS 1 (one group of 4 clips) is another training
    out = tmp_path / "one_group"
    run_train(
        train_args(data, out, SOLVER__MAX_ITER=2, CHECKPOINT__CHECKPOINT_PERIOD=-1), check=True
    )
    c = torch.load(out / "checkpoints/model_iter2.pt", weights_only=True)["state_dict"]
    assert not torch.allclose(c["res_conv1_bn.running_mean"], a["res_conv1_bn.running_mean"])
