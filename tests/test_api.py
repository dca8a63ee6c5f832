"""The top-level API: ``nl.load_model`` / ``nl.create_model`` on a released Caffe2 ``.pkl``
equal ``vnl-convert`` + ``load_model`` bit for bit, and refuse what ``vnl-convert`` refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from blob_inventory import RELEASED, Arch
from caffe2_fixtures import training_checkpoint_blobs, write_training_checkpoint

import nonlocal_net as nl
from nonlocal_net.converters.cli import main as vnl_convert
from nonlocal_net.utils.log import EXIT_ERROR, terminal_safe

NAME = "c2d_nonlocal_8x8_IN_pretrain_400k"


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[Path, dict]:
    blobs = training_checkpoint_blobs(Arch(**RELEASED[NAME]), np.random.default_rng(5))
    path = tmp_path_factory.mktemp("api") / f"{NAME}.pkl"
    return write_training_checkpoint(path, blobs), blobs


def _assert_same_model(a, b):
    assert a.cfg == b.cfg and a.training == b.training
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_pkl_loads_as_vnl_convert_then_load_model(released, tmp_path, capsys):
    src, blobs = released
    dst = tmp_path / "model.pt"
    assert vnl_convert([str(src), str(dst), "--model", NAME]) == 0
    capsys.readouterr()
    for split in ("test", "val"):
        via_file = nl.load_model(dst, split=split)
        direct = nl.load_model(src, split=split, model=NAME)
        _assert_same_model(direct, via_file)
    assert torch.equal(direct.conv1.weight, torch.from_numpy(blobs["conv1_w"]))
    _assert_same_model(nl.create_model(NAME, weights=src, split="val"), via_file)
    _assert_same_model(nl.create_model(NAME, weights=dst, split="val"), via_file)


def test_overrides_apply_to_the_model_config_as_in_vnl_convert(released, tmp_path, capsys):
    src, _ = released
    dst = tmp_path / "model32.pt"
    overrides = ["TRAIN.VIDEO_LENGTH", "32"]
    assert vnl_convert([str(src), str(dst), "--model", NAME, *overrides]) == 0
    capsys.readouterr()
    _assert_same_model(nl.load_model(src, overrides=overrides, model=NAME), nl.load_model(dst))


def _refusal(argv, capsys) -> str:
    assert vnl_convert([str(a) for a in argv]) == EXIT_ERROR
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "vnl-convert: error:" in x]
    return line.split("vnl-convert: error: ", 1)[1]


@pytest.mark.parametrize(
    "case",
    ["architecture", "missing blob", "unsafe pickle", "not a pickle", "no such file"],
)
def test_refuses_what_vnl_convert_refuses(case, released, tmp_path, capsys):
    src, blobs = released
    overrides: list[str] = []
    if case == "architecture":
        overrides = ["NONLOCAL.CONV4_NONLOCAL", "False"]
    elif case == "missing blob":
        short = {k: v for k, v in blobs.items() if k != "res3_1_branch2a_w"}
        src = write_training_checkpoint(tmp_path / "short.pkl", short)
    elif case == "unsafe pickle":
        src = tmp_path / "evil.pkl"
        src.write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    elif case == "not a pickle":
        src = tmp_path / "page.pkl"
        src.write_bytes(b"<!doctype html><html>Not Found</html>")
    else:
        src = tmp_path / "missing.pkl"
    message = _refusal([src, tmp_path / "out.pt", "--model", NAME, *overrides], capsys)
    with pytest.raises(Exception) as raised:
        nl.load_model(src, overrides=overrides, model=NAME)
    assert terminal_safe(str(raised.value)) == message  # the CLI prints it as one line
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.pt").exists()


def test_a_pkl_needs_a_model_and_a_weights_file_takes_none(released, tmp_path, capsys):
    src, _ = released
    with pytest.raises(nl.WeightsFileError, match=r"Caffe2 \.pkl holds no config"):
        nl.load_model(src)
    dst = tmp_path / "m.pt"
    assert vnl_convert([str(src), str(dst), "--model", NAME]) == 0
    with pytest.raises(ValueError, match=r"model= is for a Caffe2 \.pkl"):
        nl.load_model(dst, model=NAME)
    with pytest.raises(ValueError, match="builds another network"):
        nl.create_model("i3d_nonlocal_8x8_IN_pretrain_400k", weights=dst)


def test_create_model_without_weights_is_build_model():
    a = nl.create_model(NAME, split="val")
    assert a.cfg == nl.get_cfg(NAME) and not a.training
