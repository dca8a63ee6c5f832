"""The ``vnl-convert`` command line (``python -m nonlocal_net.converters``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from blob_inventory import RELEASED, Arch
from caffe2_fixtures import (
    imagenet_blobs,
    training_checkpoint_blobs,
    write_imagenet_file,
    write_training_checkpoint,
)

import nonlocal_net as nl
from nonlocal_net.converters import Caffe2FormatError, read_caffe2_pkl
from nonlocal_net.converters.cli import main

NAME = "c2d_nonlocal_8x8_IN_pretrain_400k"  # the architecture of the 400k base YAML
YAML = "DBG_kinetics_resnet_8gpu_c2d_nonlocal_400k.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    blobs = training_checkpoint_blobs(Arch(**RELEASED[NAME]), np.random.default_rng(11))
    path = tmp_path_factory.mktemp("cli") / f"{NAME}.pkl"
    return write_training_checkpoint(path, blobs), blobs


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _error_line(stderr: str) -> str:
    """The error line (log lines may precede it)."""
    (line,) = [x for x in stderr.splitlines() if x.startswith("vnl-convert: error:")]
    return line


def test_convert_with_a_zoo_name(checkpoint, tmp_path, capsys):
    src, blobs = checkpoint
    dst = tmp_path / "model.pt"
    rc, out, _ = _run([src, dst, "--model", NAME], capsys)
    assert rc == 0
    assert "327 blobs loaded into the model's 327 tensors" in out
    assert "lr = 0.0001" in out and "model_iter = 400000" in out and "211 momentum blobs" in out
    assert f"wrote {dst}" in out
    model = nl.load_model(dst, split="test")
    assert torch.equal(model.conv1.weight, torch.from_numpy(blobs["conv1_w"]))


def test_convert_with_a_yaml_and_overrides(checkpoint, tmp_path, capsys, original_config_files):
    src, _ = checkpoint
    yaml = original_config_files[YAML]
    dst = tmp_path / "model.pt"
    rc, _, _ = _run([src, dst, "--cfg", yaml, "TRAIN.VIDEO_LENGTH", "32"], capsys)
    assert rc == 0
    assert nl.load_model(dst).cfg == nl.get_cfg(yaml, ["TRAIN.VIDEO_LENGTH", "32"])
    # an override that changes the architecture: a clear one-line-headed error, no traceback
    bad = tmp_path / "bad.pt"
    rc, _, err = _run([src, bad, "--cfg", yaml, "NONLOCAL.CONV4_NONLOCAL", "False"], capsys)
    assert rc == 2 and not bad.exists()
    assert _error_line(err).startswith(f"vnl-convert: error: {src}: the blobs do not fit the model")
    assert "nonlocal_conv4_1_theta_w (512, 1024, 1, 1, 1)" in err and "Traceback" not in err


def test_dry_run_prints_the_table_and_writes_nothing(checkpoint, tmp_path, capsys):
    src, _ = checkpoint
    before = sorted(os.listdir(src.parent))
    rc, out, _ = _run([src, "--dry-run", "--model", NAME, "MODEL.NUM_CLASSES", "400"], capsys)
    assert rc == 0 and sorted(os.listdir(src.parent)) == before
    lines = out.splitlines()
    assert lines[0].startswith(f"{src}: pickle protocol 2, wrapped")
    assert lines[1].split() == [
        "blob",
        "file",
        "shape",
        "state_dict",
        "key",
        "model",
        "shape",
        "action",
    ]
    assert any(
        line.split()[:2] == ["nonlocal_conv4_5_bn_riv", "(1024,)"] and "running_var" in line
        for line in lines
    )
    assert lines[-1] == "dry run: nothing written"
    # a DST given with --dry-run is not written either
    rc, out, _ = _run([src, tmp_path / "x.pt", "--dry-run", "--model", NAME], capsys)
    assert rc == 0 and not (tmp_path / "x.pt").exists()


def test_to_caffe2_and_safetensors(checkpoint, tmp_path, capsys):
    src, blobs = checkpoint
    sft = tmp_path / "model.safetensors"
    assert _run([src, sft, "--model", NAME, "-q"], capsys)[0] == 0
    back = tmp_path / "back.pkl"
    rc, out, _ = _run([sft, back, "--to-caffe2", "--protocol", "0", "--flat"], capsys)
    assert rc == 0 and "327 blobs, lr 0.0001, pickle protocol 0, flat" in out
    again = read_caffe2_pkl(back)
    assert again.protocol == 0 and not again.wrapped
    assert all(again.blobs[k].tobytes() == blobs[k].tobytes() for k in again.blobs)


def test_inflate_an_imagenet_file(tmp_path, capsys):
    src = write_imagenet_file(
        tmp_path / "r50_pretrain_c2_model_iter450450_clean.pkl",
        imagenet_blobs(50, np.random.default_rng(12)),
    )
    dst = tmp_path / "init.pt"
    rc, _, err = _run([src, dst, "--model", "i3d_nonlocal_8x8_IN_pretrain_400k"], capsys)
    assert rc == 2 and "--inflate" in err
    rc, out, _ = _run(
        [src, dst, "--model", "i3d_nonlocal_8x8_IN_pretrain_400k", "--inflate"], capsys
    )
    assert rc == 0
    assert "53 inflated 2-D -> 3-D" in out and "dropped from the file: pred_w, pred_b" in out
    assert "initialised, not in file (62)" in out
    meta = torch.load(dst, weights_only=True)["meta"]
    assert meta["counts"]["inflated"] == 53 and meta["options"]["inflate"] is True


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b"<html><body>503</body></html>"), "an HTML page"),
        (lambda p: p.write_bytes(b"\x80\x02cos\nsystem\nU\x02ls\x85R."), "global os.system"),
    ],
)
def test_bad_input_gives_a_clear_error(tmp_path, capsys, make, pattern):
    src = tmp_path / "in.pkl"
    make(src)
    rc, out, err = _run([src, tmp_path / "out.pt", "--model", NAME], capsys)
    assert rc == 2 and out == ""
    assert _error_line(err).startswith(f"vnl-convert: error: {src}") and pattern in err
    assert "Traceback" not in err and not (tmp_path / "out.pt").exists()


def test_verbose_shows_the_exception(tmp_path):
    with pytest.raises(Caffe2FormatError, match="no such file"):
        main([str(tmp_path / "missing.pkl"), str(tmp_path / "o.pt"), "--model", NAME, "-v"])


def test_unknown_model(tmp_path, capsys, checkpoint):
    rc, _, err = _run([checkpoint[0], tmp_path / "o.pt", "--model", "i3d_nonlocal_8x8"], capsys)
    assert rc == 2 and "unknown model 'i3d_nonlocal_8x8'" in err and "did you mean" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["a.pkl", "b.pt"], "one of --model NAME or --cfg FILE.yaml is required"),
        (["a.pkl", "--model", NAME], "DST is required (or pass --dry-run)"),
        (["a.pkl", "b.pt", "--model", NAME, "MODEL.DEPTH"], "overrides must be KEY VALUE pairs"),
        (["a.pt", "b.pkl", "--to-caffe2", "--model", NAME], "--to-caffe2 takes exactly"),
        (["a.pkl", "b.pt", "--model", NAME, "--cfg", "x.yaml"], "not allowed with argument"),
        ([], "SRC is required"),
    ],
)
def test_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_module_and_console_script(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "nonlocal_net.converters", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "usage: vnl-convert SRC.pkl DST.pt" in done.stdout and "--to-caffe2" in done.stdout
    script = Path(sys.executable).parent / "vnl-convert"
    assert script.exists()
    bad = tmp_path / "download.pkl"
    bad.write_bytes(b"")
    done = subprocess.run(
        [str(script), str(bad), str(tmp_path / "o.pt"), "--model", NAME],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"vnl-convert: error: {bad}: not a Caffe2 checkpoint (a Python pickle): it is an empty "
        f"file (0 bytes): the download failed or was interrupted"
    ]
