"""The fine-tuning conversions equal the original scripts' results, computed here independently
from their description: ``modify_caffe2_ftvideo.py`` (BN folded into affines with epsilon exactly
1e-5, no pred/momentum, lr 0.00125) and ``modify_blob_rm.py`` (no BN statistics, momentum,
model_iter or pred; lr 0.01); both write a flat protocol-0 dict."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import nonlocal_net as nl
from nonlocal_net.converters import read_caffe2_pkl, write_caffe2_pkl
from nonlocal_net.converters.cli import main as convert_main
from nonlocal_net.converters.convert_file import convert_checkpoint
from nonlocal_net.converters.finetune import (
    convert_to_finetune,
    modify_blob_rm,
    reinit_pred,
    write_finetune_file,
)
from nonlocal_net.converters.synthetic import synthetic_checkpoint_blobs

SMALL = ["RESNETS.WIDTH_PER_GROUP", "4"]
# the 8x8 baseline (BN) is what the original folds into the 32x4 affine models' init; the
# non-local network adds non-local BNs, which are folded too
SOURCES = ["i3d_baseline_8x8_IN_pretrain_400k", "i3d_nonlocal_8x8_IN_pretrain_400k"]


@pytest.fixture(scope="module", params=SOURCES)
def source(request, tmp_path_factory):
    cfg = nl.get_cfg(request.param, SMALL)
    blobs = synthetic_checkpoint_blobs(cfg, seed=3)  # params, stats, momentum, lr, model_iter
    path = tmp_path_factory.mktemp("ft") / "c2_model_iter400000.pkl"
    write_caffe2_pkl(blobs, path, protocol=2, wrapped=True)
    return path, blobs


def _raw(path):
    """The file as the original's Python would see it: a plain unpickle."""
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        return head, pickle.load(f, encoding="latin1")


def test_ftvideo_folds_every_bn_with_epsilon_1e5(source, tmp_path):
    src, blobs = source
    dst = tmp_path / "affine_model_400k.pkl"
    assert convert_main([str(src), str(dst), "--ftvideo"]) == 0
    head, raw = _raw(dst)
    assert head[:1] != b"\x80"  # protocol 0 (no PROTO opcode)
    assert "blobs" not in raw  # flat
    assert raw["lr"] == 0.00125 and isinstance(raw["lr"], float)

    prefixes = {k[: -len("_bn_s")] for k in blobs if k.endswith("_bn_s")}
    expected = {"lr"}
    for name in blobs:
        if name in ("lr", "model_iter") or "pred" in name or "momentum" in name:
            continue
        if name.endswith(("_bn_rm", "_bn_riv")):
            continue
        expected.add(name)
    assert set(raw) == expected
    if "nonlocal" in str(sorted(blobs)):
        assert any(p.startswith("nonlocal_conv") for p in prefixes)
    for p in prefixes:
        s, b = blobs[p + "_bn_s"], blobs[p + "_bn_b"]
        rm, riv = blobs[p + "_bn_rm"], blobs[p + "_bn_riv"]
        std = np.sqrt(riv + np.float32(1e-5))
        np.testing.assert_allclose(raw[p + "_bn_s"], s / std, rtol=1e-7, atol=0)
        np.testing.assert_allclose(raw[p + "_bn_b"], b - rm * s / std, rtol=1e-6, atol=1e-8)
        assert raw[p + "_bn_s"].dtype == np.float32
    for name in (
        expected - {"lr"} - {p + "_bn_s" for p in prefixes} - {p + "_bn_b" for p in prefixes}
    ):
        np.testing.assert_array_equal(raw[name], blobs[name])


def test_ftvideo_file_loads_into_the_affine_model(tmp_path):
    """The original's route to the 32x4 affine recipes' init: 8x8 baseline -> ftvideo file."""
    src = tmp_path / "c2_model_iter400000.pkl"
    blobs = synthetic_checkpoint_blobs(nl.get_cfg(SOURCES[0], SMALL), seed=4)
    write_caffe2_pkl(blobs, src, protocol=2, wrapped=True)
    dst = tmp_path / "affine.pkl"
    write_finetune_file(src, dst, "ftvideo")
    cfg = nl.get_cfg("i3d_baseline_32x4_I3D_pretrain_400k", SMALL)
    pt = tmp_path / "affine.pt"
    convert_checkpoint(dst, pt, cfg, finetune=True)
    model = nl.load_model(pt)
    folded = read_caffe2_pkl(dst).blobs
    np.testing.assert_array_equal(
        model.state_dict()["res2.0.branch2a_bn.weight"].numpy(), folded["res2_0_branch2a_bn_s"]
    )


def test_blob_rm_drops_statistics_momentum_and_pred(source, tmp_path):
    src, blobs = source
    dst = tmp_path / "ft_model.pkl"
    assert convert_main([str(src), str(dst), "--blob-rm"]) == 0
    head, raw = _raw(dst)
    assert head[:1] != b"\x80" and "blobs" not in raw
    assert raw["lr"] == 0.01
    drop = ("_riv", "_rm", "_momentum", "pred")
    expected = {
        k for k in blobs if k != "model_iter" and k != "lr" and not any(d in k for d in drop)
    }
    assert set(raw) == expected | {"lr"}
    assert any(k.endswith("_bn_s") for k in raw)  # BN scales and biases kept, unfolded
    for k in expected:
        np.testing.assert_array_equal(raw[k], blobs[k])


def test_refusals(source, tmp_path, capsys):
    src, _ = source
    # the destination may not be the source
    assert convert_main([str(src), str(src), "--blob-rm"]) != 0
    assert "same file as the input" in capsys.readouterr().err
    # an already folded file cannot be folded again: the BN is named
    folded = tmp_path / "folded.pkl"
    write_finetune_file(src, folded, "ftvideo")
    assert convert_main([str(folded), str(tmp_path / "again.pkl"), "--ftvideo"]) != 0
    assert "_bn_rm, " in capsys.readouterr().err  # names the BN whose statistics are missing
    with pytest.raises(SystemExit):
        convert_main([str(src), str(tmp_path / "x.pkl"), "--ftvideo", "--model", "x"])


def test_convert_to_finetune_does_not_touch_its_input():
    blobs = {
        "conv1_w": np.ones((2, 3, 1, 1, 1), np.float32),
        "res_conv1_bn_s": np.array([2.0, 3.0], np.float32),
        "res_conv1_bn_b": np.array([0.5, -1.0], np.float32),
        "res_conv1_bn_rm": np.array([1.0, 2.0], np.float32),
        "res_conv1_bn_riv": np.array([3.0, 0.0], np.float32),
        "conv1_w_momentum": np.zeros((2, 3, 1, 1, 1), np.float32),
        "lr": 0.1,
        "model_iter": 5,
    }
    out = convert_to_finetune(blobs)
    assert set(out) == {"conv1_w", "res_conv1_bn_s", "res_conv1_bn_b"}
    # channel 1: riv 0 -> std = sqrt(1e-5): epsilon exactly 1e-5, not the network's 1.0000001e-5
    std = np.sqrt(np.float32(1e-5))
    assert out["res_conv1_bn_s"][1] == np.float32(3.0) / std
    assert out["res_conv1_bn_s"][1] != np.float32(3.0) / np.sqrt(np.float32(1.0000001e-5))
    assert out["res_conv1_bn_s"][0] == np.float32(2.0) / np.sqrt(np.float32(3.0) + np.float32(1e-5))
    assert "res_conv1_bn_rm" in blobs and blobs["lr"] == 0.1
    assert set(modify_blob_rm(blobs)) == {"conv1_w", "res_conv1_bn_s", "res_conv1_bn_b", "lr"}


def test_reinit_pred_for_a_new_class_count():
    cfg = nl.get_cfg("i3d_baseline_8x8_IN_pretrain_400k", [*SMALL, "MODEL.NUM_CLASSES", "101"])
    model = nl.build_model(cfg, split="train")
    with torch.no_grad():
        model.pred.weight.fill_(1.0)
        model.pred.bias.fill_(1.0)
    reinit_pred(model, generator=torch.Generator().manual_seed(0))
    w = model.pred.weight.detach()
    assert w.shape == (101, 2048)
    assert torch.equal(model.pred.bias, torch.zeros(101))
    expected = torch.empty_like(w).normal_(0.0, 0.01, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, expected)
    assert abs(float(w.std()) - 0.01) < 5e-4
