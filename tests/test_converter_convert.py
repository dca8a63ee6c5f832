"""convert_blobs: total mapping, every refusal with its message, BN folding and 2-D -> 3-D
inflation checked numerically, fine-tuning allowances."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from blob_inventory import RELEASED, Arch, expected_blobs
from caffe2_fixtures import (
    affine_file_blobs,
    assign_blobs_by_hand,
    imagenet_blobs,
    realistic_blobs,
    training_checkpoint_blobs,
    write_training_checkpoint,
)

import nonlocal_net as nl
from nonlocal_net.converters import (
    ConversionError,
    convert_blobs,
    convert_checkpoint,
    fold_bn,
    inflate_weight,
)
from nonlocal_net.models.layers import AffineNd, SpatialBN

NL8 = "i3d_nonlocal_8x8_IN_pretrain_400k"
BASE8 = "i3d_baseline_8x8_IN_pretrain_400k"
NL32X4 = "i3d_nonlocal_32x4_I3D_pretrain_400k"
SRC = "/data/i3d_nonlocal_8x8_IN_pretrain_400k.pkl"


@pytest.fixture(scope="module")
def nl8_checkpoint() -> dict:
    return training_checkpoint_blobs(Arch(**RELEASED[NL8]), np.random.default_rng(10))


def _reference(name, blobs, split="val", overrides=()):
    with torch.device("meta"):
        model = nl.build_model(name, split=split, overrides=overrides)
    model = model.to_empty(device="cpu")
    return assign_blobs_by_hand(model, blobs).eval()


def _backbone(model, x):
    x = model.pool1(model.relu(model.res_conv1_bn(model.conv1(x))))
    x = model.pool2(model.res2(x))
    return model.res5(model.res4(model.res3(x)))


def _convert_error(blobs, cfg, **kw) -> str:
    """The error message, which always starts with the file's name."""
    with pytest.raises(ConversionError) as info:
        convert_blobs(blobs, cfg, source=SRC, **kw)
    message = str(info.value)
    assert message.startswith(f"{SRC}: ")
    return message


# ------------------------------------------------------------------------------------------
# Total conversion


def test_every_tensor_comes_from_its_blob(nl8_checkpoint):
    result = convert_blobs(nl8_checkpoint, NL8, source=SRC)
    reference = _reference(NL8, nl8_checkpoint).state_dict()
    assert list(result.state_dict) == list(reference)
    for key, tensor in result.state_dict.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, reference[key]), key
    counts = result.report.counts()
    assert counts["mapped"] == counts["loaded"] == 327
    assert counts["ignored_momentum"] == 211 and counts["file_blobs"] == 540
    assert counts["ignored_lr"] == counts["ignored_model_iter"] == 1
    assert counts["initialised"] == counts["dropped"] == counts["inflated"] == 0
    assert result.report.source == "i3d_nonlocal_8x8_IN_pretrain_400k.pkl"


def test_tensors_share_memory_with_the_blobs(nl8_checkpoint):
    result = convert_blobs(nl8_checkpoint, NL8)
    blob = nl8_checkpoint["res5_2_branch2c_w"]
    assert result.state_dict["res5.2.branch2c.weight"].data_ptr() == blob.ctypes.data


def test_pred_as_test_conv_is_accepted(nl8_checkpoint):
    blobs = dict(nl8_checkpoint)
    blobs["pred_w"] = blobs["pred_w"].reshape(400, 2048, 1, 1, 1)
    result = convert_blobs(blobs, NL8)
    assert result.state_dict["pred.weight"].shape == (400, 2048)
    assert torch.equal(
        result.state_dict["pred.weight"].reshape(-1), torch.from_numpy(blobs["pred_w"]).reshape(-1)
    )
    (row,) = [r for r in result.report.rows if r.blob == "pred_w"]
    assert row.action == "reshaped"


def test_mapping_table_lists_every_blob(nl8_checkpoint):
    report = convert_blobs(nl8_checkpoint, NL8).report
    table = report.format_table()
    assert len(table.splitlines()) == 2 + 540
    assert "res3_1_branch2a_bn_riv" in table and "res3.1.branch2a_bn.running_var" in table
    assert "ignored (optimizer state)" in table and "ignored (lr = 0.0001)" in table
    assert "327 blobs loaded" in report.summary()


# ------------------------------------------------------------------------------------------
# Refusals: one error listing every offending name and shape


def test_unknown_missing_and_wrong_shapes_all_in_one_error(nl8_checkpoint):
    blobs = dict(nl8_checkpoint)
    blobs["foo_w"] = np.zeros((3, 3), np.float32)
    blobs["res2_0_branch2a_b"] = np.zeros(64, np.float32)
    del blobs["res3_1_branch2b_w"], blobs["nonlocal_conv4_3_phi_b"]
    blobs["conv1_w"] = np.zeros((64, 3, 3, 7, 7), np.float32)
    message = _convert_error(blobs, NL8)
    first = message.splitlines()[0]
    assert first.startswith(f"{SRC}: the blobs do not fit the model (resnet_video I3D ResNet-50")
    assert "2 blob(s) the model has no place for, 2 model tensor(s) missing" in first
    assert "1 shape mismatch(es)" in first
    assert "foo_w (3, 3)" in message and "res2_0_branch2a_b (64,)" in message
    assert "res3.1.branch2b.weight <- res3_1_branch2b_w (128, 128, 1, 3, 3)" in message
    assert "res4.nonlocal_3.phi.bias <- nonlocal_conv4_3_phi_b (512,)" in message
    assert "conv1_w: file (64, 3, 3, 7, 7), model (64, 3, 5, 7, 7) (conv1.weight)" in message


def test_file_errors_name_the_file(tmp_path, nl8_checkpoint):
    blobs = dict(nl8_checkpoint)
    del blobs["res5_0_branch1_bn_riv"]
    src = write_training_checkpoint(tmp_path / "model.pkl", blobs)
    with pytest.raises(ConversionError, match=r"model\.pkl: the blobs do not fit") as info:
        convert_checkpoint(src, tmp_path / "out.pt", NL8)
    assert "res5_0_branch1_bn_riv (2048,)" in str(info.value)
    assert not (tmp_path / "out.pt").exists()


def test_baseline_file_into_nonlocal_model_and_back(nl8_checkpoint):
    message = _convert_error(nl8_checkpoint, BASE8)
    assert "60 blob(s) the model has no place for" in message
    assert "hint: the file has non-local blocks" in message
    baseline = realistic_blobs(Arch(**RELEASED[BASE8]), np.random.default_rng(1))
    message = _convert_error(baseline, NL8)
    assert "60 model tensor(s) missing from the file" in message
    assert "res3.nonlocal_1.theta.weight <- nonlocal_conv3_1_theta_w" in message
    assert "hint: the model has non-local blocks the file lacks" in message


def test_affine_file_into_bn_model_is_refused():
    blobs = affine_file_blobs(
        Arch(**RELEASED["i3d_baseline_32x4_I3D_pretrain_400k"]), np.random.default_rng(2)
    )
    message = _convert_error(blobs, BASE8)
    assert message.startswith(
        f"{SRC}: is an affine (BN-folded) file: it has _bn_s/_bn_b but no BN running statistics"
    )
    assert "Load it into a MODEL.USE_AFFINE model" in message
    assert "res_conv1_bn.running_var <- res_conv1_bn_riv (64,)" in message


def test_other_class_count_needs_finetune(nl8_checkpoint):
    blobs = dict(nl8_checkpoint)
    blobs["pred_w"] = np.zeros((101, 2048), np.float32)
    blobs["pred_b"] = np.zeros(101, np.float32)
    message = _convert_error(blobs, NL8)
    assert "pred_w: file (101, 2048), model (400, 2048) (pred.weight)" in message
    assert "pred_b: file (101,), model (400,)" in message
    assert "the file's classifier has 101 classes, the model 400" in message
    assert "finetune=True (--finetune)" in message
    result = convert_blobs(blobs, NL8, finetune=True)
    assert result.report.dropped == ["pred_w", "pred_b"]
    assert result.report.initialised == ["pred.weight", "pred.bias"]
    assert torch.count_nonzero(result.state_dict["pred.weight"]) > 0  # Gaussian initialiser
    assert torch.count_nonzero(result.state_dict["pred.bias"]) == 0
    # ... or a model built for that class count takes it as is
    convert_blobs(blobs, nl.get_cfg(NL8, ["MODEL.NUM_CLASSES", "101"]))


def test_values_that_are_not_float_arrays(nl8_checkpoint):
    blobs = dict(nl8_checkpoint)
    blobs["conv1_w"] = blobs["conv1_w"].astype(np.int32)
    blobs["pred_b"] = 0.5
    message = _convert_error(blobs, NL8)
    assert "conv1_w: dtype int32, not floating point" in message
    assert "pred_b: a float, not an array" in message


def test_float64_blobs_are_cast_as_the_original_does(nl8_checkpoint):
    blobs = dict(nl8_checkpoint)
    blobs["pred_w"] = blobs["pred_w"].astype(np.float64)
    state = convert_blobs(blobs, NL8).state_dict
    assert state["pred.weight"].dtype == torch.float32
    assert torch.equal(state["pred.weight"], torch.from_numpy(nl8_checkpoint["pred_w"]))


# ------------------------------------------------------------------------------------------
# BN folding (the original's convert_to_finetune.py)


def test_fold_bn_by_hand():
    s = np.array([2.0, 0.5, 1.0], np.float32)
    b = np.array([1.0, -1.0, 0.0], np.float32)
    rm = np.array([3.0, 0.0, -2.0], np.float32)
    riv = np.array([4.0, 0.25, 1.0], np.float32) - np.float32(1e-5)  # std 2, 0.5, 1 (about)
    new_s, new_b = fold_bn(s, b, rm, riv)
    assert new_s.dtype == new_b.dtype == np.float32
    np.testing.assert_allclose(new_s, [1.0, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(new_b, [1.0 - 3.0, -1.0, 0.0 + 2.0], rtol=1e-6, atol=1e-6)
    # the epsilon is exactly 1e-5 (not the network's 1.0000001e-5)
    s1, _ = fold_bn(np.float32([1.0]), np.float32([0.0]), np.float32([0.0]), np.float32([0.0]))
    assert s1[0] == np.float32(1.0) / np.sqrt(np.float32(1e-5))


def test_folded_affine_equals_bn_in_test_mode():
    rng = np.random.default_rng(3)
    c = 32
    s, b, rm = (rng.standard_normal(c).astype(np.float32) for _ in range(3))
    riv = rng.uniform(0.01, 3.0, c).astype(np.float32)
    bn = SpatialBN(c).eval()
    affine = AffineNd(c)
    with torch.no_grad():
        for t, v in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), (s, b, rm, riv)):
            t.copy_(torch.from_numpy(v))
        new_s, new_b = fold_bn(s, b, rm, riv)
        affine.weight.copy_(torch.from_numpy(new_s))
        affine.bias.copy_(torch.from_numpy(new_b))
        x = torch.randn(2, c, 3, 5, 5) * 3
        expected = bn(x)
    # float32 rounding plus the epsilon difference (1e-5 vs 1.0000001e-5)
    torch.testing.assert_close(affine(x), expected, rtol=1e-5, atol=1e-5)


def test_bn_checkpoint_into_affine_model_is_folded(caplog):
    blobs = training_checkpoint_blobs(Arch(**RELEASED[BASE8]), np.random.default_rng(4))
    affine_cfg = nl.get_cfg(BASE8, ["MODEL.USE_AFFINE", "True"])
    with caplog.at_level(logging.INFO, logger="nonlocal_net.converters"):
        result = convert_blobs(blobs, affine_cfg, source=SRC)
    report = result.report
    assert len(report.folded_layers) == 53 and report.counts()["folded_layers"] == 53
    assert "res2_0_branch2a_bn" in report.folded_layers
    assert "folded 53 BN layers into the model's frozen affines (eps 1e-5" in caplog.text
    expected_s, expected_b = fold_bn(
        *(blobs[f"res4_3_branch2b_bn_{x}"] for x in ("s", "b", "rm", "riv"))
    )
    assert np.array_equal(result.state_dict["res4.3.branch2b_bn.weight"].numpy(), expected_s)
    assert np.array_equal(result.state_dict["res4.3.branch2b_bn.bias"].numpy(), expected_b)
    # the folded network computes what the BN network computes (up to float32 and eps)
    affine_model = nl.build_model(affine_cfg, split="val")
    affine_model.load_state_dict(result.state_dict)
    bn_model = _reference(BASE8, blobs)
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(
            _backbone(affine_model, x), _backbone(bn_model, x), rtol=1e-4, atol=1e-4
        )


def test_folding_can_be_refused_or_required():
    blobs = realistic_blobs(Arch(**RELEASED[BASE8]), np.random.default_rng(5))
    affine_cfg = nl.get_cfg(BASE8, ["MODEL.USE_AFFINE", "True"])
    message = _convert_error(blobs, affine_cfg, fold_bn=False)
    assert (
        "106 blob(s) the model has no place for" in message and "res_conv1_bn_riv (64,)" in message
    )
    assert "hint: the file holds BN running statistics for the model's frozen affines" in message
    message = _convert_error(blobs, BASE8, fold_bn=True)
    assert "fold_bn=True but the model has no frozen affine layers" in message
    # statistics for only some affine layers
    del blobs["res3_2_branch2a_bn_rm"], blobs["res3_2_branch2a_bn_riv"]
    message = _convert_error(blobs, affine_cfg)
    assert "BN running statistics for 52 of the model's 53 affine layers" in message
    assert "none for: res3_2_branch2a_bn" in message


# ------------------------------------------------------------------------------------------
# Inflation (2-D ImageNet weights into 3-D models)


def test_inflate_weight_by_hand():
    w = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    w3 = inflate_weight(w, 4)
    assert w3.shape == (2, 3, 4, 2, 2) and w3.dtype == np.float32
    for t in range(4):
        assert np.array_equal(w3[:, :, t], w / np.float32(4))
    assert np.array_equal(inflate_weight(w, 1)[:, :, 0], w)


@pytest.mark.parametrize("kt, pad", [(3, 1), (5, 2)])
def test_inflated_conv_on_a_constant_clip_gives_the_2d_response(kt, pad):
    torch.manual_seed(0)
    w2 = torch.randn(8, 3, 7, 7)
    w3 = torch.from_numpy(inflate_weight(w2.numpy(), kt))
    frame = torch.randn(1, 3, 20, 20)
    clip = frame.unsqueeze(2).expand(1, 3, 9, 20, 20).contiguous()  # the same frame 9 times
    out3 = F.conv3d(clip, w3, padding=(pad, 3, 3))
    out2 = F.conv2d(frame, w2, padding=3)
    for t in range(pad, 9 - pad):  # away from the zero-padded temporal border
        torch.testing.assert_close(out3[:, :, t], out2, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def imagenet_r50() -> dict:
    return imagenet_blobs(50, np.random.default_rng(6))


def test_imagenet_file_inflates_into_an_i3d_nonlocal_model(imagenet_r50, caplog):
    assert imagenet_r50["conv1_w"].shape == (64, 3, 7, 7) and "model_iter" not in imagenet_r50
    with caplog.at_level(logging.INFO, logger="nonlocal_net.converters"):
        result = convert_blobs(imagenet_r50, NL8, inflate=True, source=SRC)
    report, state = result.report, result.state_dict
    assert len(report.inflated) == 53  # every conv weight changes rank (1x1 -> 1x1x1 too)
    assert report.dropped == ["pred_w", "pred_b"]  # 1000 classes, the model has 400
    nonlocal_keys = [k for k in state if ".nonlocal_" in k]
    assert sorted(report.initialised) == sorted([*nonlocal_keys, "pred.weight", "pred.bias"])
    assert len(nonlocal_keys) == 60
    assert "initialised, not in file (62)" in report.summary()
    assert "62 model tensors are not in the file and keep their initial values" in caplog.text
    conv1 = state["conv1.weight"].numpy()
    assert conv1.shape == (64, 3, 5, 7, 7)
    for t in range(5):
        assert np.array_equal(conv1[:, :, t], imagenet_r50["conv1_w"] / np.float32(5))
    branch = state["res3.0.branch2a.weight"].numpy()  # kt 3
    assert np.array_equal(
        branch[:, :, 1],
        imagenet_r50["res3_0_branch2a_w"][:, :, 0, 0][..., None, None] / np.float32(3),
    )
    same = state["res3.1.branch2a.weight"].numpy()  # kt 1: the 2-D weight itself
    assert np.array_equal(same[:, :, 0], imagenet_r50["res3_1_branch2a_w"])
    assert torch.equal(
        state["res2.0.branch2a_bn.running_var"],
        torch.from_numpy(imagenet_r50["res2_0_branch2a_bn_riv"]),
    )
    # the non-local blocks keep the original's initialisers: BN gamma 0, zero biases
    assert torch.count_nonzero(state["res3.nonlocal_1.bn.weight"]) == 0
    assert torch.count_nonzero(state["res4.nonlocal_5.theta.bias"]) == 0
    assert float(state["res4.nonlocal_5.theta.weight"].std()) == pytest.approx(0.01, rel=0.05)


def test_imagenet_file_needs_inflate(imagenet_r50):
    message = _convert_error(imagenet_r50, NL8)
    assert "55 shape mismatch(es)" in message  # 53 convs + the 1000-class pred
    assert "60 model tensor(s) missing" in message  # the non-local blocks
    assert "conv1_w: file (64, 3, 7, 7), model (64, 3, 5, 7, 7) (conv1.weight)" in message
    assert "hint: 53 blobs are 2-D conv weights (4-D)" in message and "--inflate" in message


def test_inflation_checks_the_spatial_dims(imagenet_r50):
    blobs = dict(imagenet_r50)
    blobs["res2_0_branch2b_w"] = np.zeros((64, 64, 1, 1), np.float32)  # should be 3x3
    message = _convert_error(blobs, NL8, inflate=True)
    assert "res2_0_branch2b_w: file (64, 64, 1, 1), model (64, 64, 1, 3, 3)" in message


def test_imagenet_r101_into_i3d_r101():
    blobs = imagenet_blobs(101, np.random.default_rng(7))
    cfg = nl.get_cfg(NL8, ["MODEL.DEPTH", "101", "MODEL.VIDEO_ARC_CHOICE", "4"])
    result = convert_blobs(blobs, cfg, inflate=True)
    assert len(result.report.inflated) == 104 and len(result.report.initialised) == 62
    assert result.state_dict["res4.22.branch2a.weight"].shape == (256, 1024, 3, 1, 1)


# ------------------------------------------------------------------------------------------
# Fine-tuning from the affine initialisation files (the 32x4 / 128x1 recipes)


def test_affine_baseline_file_initialises_the_affine_nonlocal_model():
    arch = Arch(**RELEASED["i3d_baseline_32x4_I3D_pretrain_400k"])
    blobs = affine_file_blobs(arch, np.random.default_rng(8))
    assert "pred_w" not in blobs and isinstance(blobs["lr"], float)
    message = _convert_error(blobs, NL32X4)
    assert "model tensor(s) missing from the file" in message
    assert "hint: the file has no classifier (pred_w/pred_b)" in message
    result = convert_blobs(blobs, NL32X4, finetune=True)
    assert len(result.report.initialised) == 2 + 5 * 8  # pred + 5 blocks x (4 convs w, b)
    assert result.report.counts()["mapped"] == len(expected_blobs(arch)) - 2
    assert torch.equal(
        result.state_dict["res_conv1_bn.weight"], torch.from_numpy(blobs["res_conv1_bn_s"])
    )
    # non-local out convs start at zero in the affine configs (NONLOCAL.USE_ZERO_INIT_CONV)
    assert torch.count_nonzero(result.state_dict["res3.nonlocal_1.out.weight"]) == 0


def test_initialisation_is_reproducible():
    blobs = affine_file_blobs(
        Arch(**RELEASED["i3d_baseline_32x4_I3D_pretrain_400k"]), np.random.default_rng(9)
    )
    a = convert_blobs(blobs, NL32X4, finetune=True).state_dict
    torch.manual_seed(123)
    b = convert_blobs(blobs, NL32X4, finetune=True).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
