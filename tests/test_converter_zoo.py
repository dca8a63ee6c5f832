"""Every released model: a training checkpoint written as the original wrote it converts, loads
with ``nl.load_model``, and computes bit for bit what a model whose tensors were assigned
directly from the same blobs (by ``assign_blobs_by_hand``, not through the converter's rules)
computes; and pkl -> pt -> pkl gives back every parameter blob unchanged.

The default tests run the backbone on small clips of the real length (32x32 pixels: every
parameter is used, the arithmetic is the same) and the ``val``/``test`` heads on pool5-shaped
features; the ``slow`` variant runs whole models on real 256x256 test crops.
"""

from __future__ import annotations

import hashlib
import shutil
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from blob_inventory import RELEASED, Arch
from caffe2_fixtures import (
    affine_file_blobs,
    assign_blobs_by_hand,
    training_checkpoint_blobs,
    write_affine_file,
    write_training_checkpoint,
)

import nonlocal_net as nl
from nonlocal_net.converters import (
    CONVERTER_VERSION,
    convert_checkpoint,
    export_caffe2,
    read_caffe2_pkl,
)
from nonlocal_net.core.weights_file import load_weights_file

ZOO_NAMES = nl.list_models()


def test_the_zoo_is_the_released_list():
    assert sorted(ZOO_NAMES) == sorted(RELEASED) and len(ZOO_NAMES) == 15


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def _reference(name: str, blobs: dict, split: str):
    with torch.device("meta"):
        model = nl.build_model(name, split=split)
    return assign_blobs_by_hand(model.to_empty(device="cpu"), blobs).eval()


def _backbone(model, x):
    x = model.pool1(model.relu(model.res_conv1_bn(model.conv1(x))))
    x = model.pool2(model.res2(x))
    return model.res5(model.res4(model.res3(x)))


def _parameter_blobs(blobs: dict) -> dict[str, np.ndarray]:
    return {
        k: v
        for k, v in blobs.items()
        if isinstance(v, np.ndarray) and k != "lr" and not k.endswith("_momentum")
    }


@pytest.fixture
def converted(tmp_path, request):
    """(name, blobs, converted .pt, report) for the released model ``request.param``."""
    name = request.param
    blobs = training_checkpoint_blobs(Arch(**RELEASED[name]), _rng(name))
    src = write_training_checkpoint(tmp_path / f"{name}.pkl", blobs)
    dst = tmp_path / f"{name}.pt"
    report = convert_checkpoint(src, dst, name)
    src.unlink()  # large: free the space now
    yield name, blobs, dst, report
    dst.unlink(missing_ok=True)


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("converted", ZOO_NAMES, indirect=True)
def test_released_model_converts_loads_and_matches(converted, tmp_path):
    name, blobs, dst, report = converted
    params = _parameter_blobs(blobs)
    counts = report.counts()
    assert counts["mapped"] == counts["loaded"] == len(params)
    assert counts["ignored_momentum"] == sum(k.endswith("_momentum") for k in blobs) > 0
    assert counts["ignored_lr"] == counts["ignored_model_iter"] == 1
    assert counts["initialised"] == counts["dropped"] == 0

    meta = torch.load(dst, weights_only=True)["meta"]
    assert meta["source"] == f"{name}.pkl" and meta["counts"] == counts
    assert meta["source_model_iter"] == 400000 and meta["source_lr"] == float(np.float32(1e-4))
    assert meta["converter_version"].endswith(f"converter v{CONVERTER_VERSION}")

    torch.manual_seed(0)
    frames = nl.get_cfg(name).TRAIN.VIDEO_LENGTH
    clip = torch.randn(1, 3, frames, 32, 32)
    with torch.inference_mode():
        converted_test = nl.load_model(dst, split="test")
        reference_test = _reference(name, blobs, "test")
        features = _backbone(converted_test, clip)
        assert torch.isfinite(features).all() and features.abs().max() > 0
        assert torch.equal(features, _backbone(reference_test, clip))
        pool5 = torch.randn(1, 2048, 1, 2, 2)  # pool5 output of a 256x256 test crop
        probs = converted_test.forward_head(pool5)
        assert torch.equal(probs, reference_test.forward_head(pool5))
        expected = reference_test.state_dict()
        del converted_test, reference_test
        # val: the FC head, by hand from the blobs, on the pool5 output of a 224x224 crop
        converted_val = nl.load_model(dst, split="val")
        pool5 = torch.randn(1, 2048, 1, 1, 1)
        logits = F.linear(
            pool5.flatten(1), torch.from_numpy(blobs["pred_w"]), torch.from_numpy(blobs["pred_b"])
        )
        assert torch.equal(converted_val.forward_head(pool5), logits)
        for key, tensor in converted_val.state_dict().items():
            assert torch.equal(tensor.reshape(expected[key].shape), expected[key]), key

    # pkl -> pt -> pkl: every parameter blob comes back unchanged, with its original shape
    back = tmp_path / "back.pkl"
    export_caffe2(dst, back)
    again = read_caffe2_pkl(back)
    assert again.wrapped and again.protocol == 2 and again.lr == float(np.float32(1e-4))
    assert list(again.blobs) == list(params) and again.momentum_info == {}
    for key, value in params.items():
        got = again.blobs[key]
        assert got.dtype == np.float32 and got.shape == value.shape, key
        assert got.tobytes() == value.tobytes(), key
    assert again.blobs["pred_w"].shape == (400, 2048)


@pytest.mark.parametrize("converted", ["i3d_nonlocal_32x4_I3D_pretrain_400k"], indirect=True)
def test_round_trip_through_the_conversion_scripts_layout_and_safetensors(converted, tmp_path):
    name, blobs, dst, _ = converted
    params = _parameter_blobs(blobs)
    flat = tmp_path / "flat.pkl"
    export_caffe2(dst, flat, protocol=0, wrapped=False, lr=0.00125)
    again = read_caffe2_pkl(flat)
    assert (again.protocol, again.wrapped, again.lr) == (0, False, 0.00125)
    assert all(again.blobs[k].tobytes() == v.tobytes() for k, v in params.items())
    assert list(again.blobs) == list(params)

    sft = tmp_path / "model.safetensors"
    src = write_training_checkpoint(tmp_path / "src.pkl", blobs)
    convert_checkpoint(src, sft, name)
    loaded = load_weights_file(sft)
    assert loaded["meta"]["source_sha256"] == _sha256(src)
    assert loaded["meta"]["source_bytes"] == src.stat().st_size
    reference = torch.load(dst, weights_only=True)
    assert loaded["cfg"] == reference["cfg"]
    assert loaded["meta"]["counts"] == reference["meta"]["counts"]
    assert loaded["state_dict"].keys() == reference["state_dict"].keys()
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in reference["state_dict"].items())
    # load_model reads it like the .pt; a renamed copy is recognised by its header
    renamed = tmp_path / "model.weights"
    shutil.copyfile(sft, renamed)
    for path in (sft, renamed):
        model = nl.load_model(path, split="val")
        assert (
            model.cfg.TRAIN.VIDEO_LENGTH == 32
            and model.state_dict().keys() == loaded["state_dict"].keys()
        )
        assert all(torch.equal(model.state_dict()[k], v) for k, v in loaded["state_dict"].items())
    export_caffe2(sft, tmp_path / "from_safetensors.pkl")
    again = read_caffe2_pkl(tmp_path / "from_safetensors.pkl")
    assert all(again.blobs[k].tobytes() == v.tobytes() for k, v in params.items())


@pytest.mark.parametrize("name", ["i3d_baseline_32x4_I3D_pretrain_400k"])
def test_affine_file_round_trip(tmp_path, name):
    # the conversion scripts' flat protocol-0 file, loaded into its own (baseline) architecture
    blobs = affine_file_blobs(Arch(**RELEASED[name]), _rng(name))
    src = write_affine_file(tmp_path / "affine_model_400k.pkl", blobs)
    report = convert_checkpoint(src, tmp_path / "affine.pt", name, finetune=True)
    assert report.initialised == ["pred.weight", "pred.bias"]
    export_caffe2(tmp_path / "affine.pt", tmp_path / "back.pkl", protocol=0, wrapped=False)
    again = read_caffe2_pkl(tmp_path / "back.pkl")
    params = _parameter_blobs(blobs)
    assert set(again.blobs) == set(params) | {"pred_w", "pred_b"}
    assert all(again.blobs[k].tobytes() == v.tobytes() for k, v in params.items())
    assert again.lr == 0.00125  # the source's lr, recorded at conversion


# One released network per kind (C2D/I3D, 8- and 32-frame, affine) runs by default; the rest
# (the same code paths at other sizes and the same networks under other names) with the
# full-size suite (make test-parity-full).
FULL_SIZE_DEFAULT = {
    "c2d_nonlocal_8x8_IN_pretrain_400k",
    "c2d_nonlocal_32x2_IN_pretrain_400k",
    "i3d_nonlocal_8x8_IN_pretrain_400k",
}  # the affine 32x4: its parity row and test_affine_file_round_trip in make test


@pytest.mark.slow
@pytest.mark.parametrize(
    "converted",
    [
        pytest.param(n, marks=() if n in FULL_SIZE_DEFAULT else pytest.mark.parity_full)
        for n in ZOO_NAMES
    ],
    indirect=True,
)
def test_released_model_full_size_test_output(converted):
    # the evaluation path as it runs: a whole clip, a 256x256 crop, the fully-convolutional head
    name, blobs, dst, _ = converted
    torch.manual_seed(1)
    frames = nl.get_cfg(name).TRAIN.VIDEO_LENGTH
    clip = torch.randn(1, 3, frames, 256, 256)
    with torch.inference_mode():
        out = nl.load_model(dst, split="test")(clip)
        expected = _reference(name, blobs, "test")(clip)
    assert out.shape == (1, 400) and torch.isfinite(out).all()
    assert torch.equal(out, expected)
