"""The weights file: atomic save, weights_only load, strict load_model."""

from __future__ import annotations

import os

import pytest
import torch

import nonlocal_net as nl
from nonlocal_net.core.config import cfg_from_dict, cfg_to_dict
from nonlocal_net.core.weights_file import WeightsFileError, load_weights_file, save_weights_file
from nonlocal_net.utils.io import atomic_write

NAME = "c2d_nonlocal_8x8_IN_pretrain_400k"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = nl.build_model(NAME, split="val")
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_weights_file(path, model.state_dict(), model.cfg, {"source": "unit test"})
    return path, model


def test_round_trip_through_weights_only_load(saved):
    path, model = saved
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "nonlocal_net/v1" and raw["meta"] == {"source": "unit test"}
    assert isinstance(raw["cfg"], dict) and raw["cfg"]["MODEL"]["MODEL_NAME"] == "resnet_video"
    for split in ("val", "test"):
        loaded = nl.load_model(path, split=split)
        assert loaded.cfg == model.cfg
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key].reshape(value.shape), value)
    x = torch.randn(1, 3, 8, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(nl.load_model(path, split="val")(x), model(x))


def test_cfg_dict_round_trip():
    cfg = nl.get_cfg("i3d_nonlocal_32x4_I3D_pretrain_400k")
    assert cfg_from_dict(cfg_to_dict(cfg)) == cfg
    bad = cfg_to_dict(cfg)
    bad["MODEL"]["NOT_A_KEY"] = 1
    with pytest.raises(KeyError, match=r"MODEL\.NOT_A_KEY"):
        cfg_from_dict(bad, source="x.pt [cfg]")


def test_overrides_that_change_shapes_fail_strictly(saved):
    path, _ = saved
    with pytest.raises(WeightsFileError, match=r"model\.pt: weights do not fit the model.*shape"):
        nl.load_model(path, overrides=["MODEL.VIDEO_ARC_CHOICE", "2"])
    with pytest.raises(WeightsFileError, match=r"unexpected: res3\.nonlocal_1"):
        nl.load_model(path, overrides=["NONLOCAL.CONV3_NONLOCAL", "False"])
    # an override that keeps the shapes is fine
    assert nl.load_model(path, overrides=["TRAIN.VIDEO_LENGTH", "16"]).pool_stride == 8


def test_bad_files_are_named(tmp_path):
    with pytest.raises(WeightsFileError, match="no such file"):
        load_weights_file(tmp_path / "missing.pt")
    pkl = tmp_path / "released.pkl"
    pkl.write_bytes(b"\x80\x02}q\x01.")
    with pytest.raises(WeightsFileError, match=r"released\.pkl.*Caffe2 \.pkl"):
        load_weights_file(pkl)
    other = tmp_path / "other.pt"
    torch.save({"model": 1}, other)
    with pytest.raises(WeightsFileError, match=r"other\.pt: expected a 'nonlocal_net/v1'"):
        load_weights_file(other)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"partial")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.pt"]
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0o600
