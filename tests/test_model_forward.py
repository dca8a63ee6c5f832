"""Forward behaviour of the full-size models: output shapes, feature-map sizes of spec table 4.4,
heads, batch independence, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from blob_inventory import RELEASED

import nonlocal_net as nl
from nonlocal_net.core.config import ConfigError


def _frames(name: str) -> int:
    return nl.get_cfg(name).TRAIN.VIDEO_LENGTH


def _sizes(model, x) -> dict[str, tuple[int, int]]:
    """(T, H) after conv1, pool1, res2, res3, res4, res5 and pool5 (spec table 4.4)."""
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        getattr(model, n).register_forward_hook(
            lambda _m, _i, out, n=n: sizes.__setitem__(n, (out.shape[2], out.shape[3]))
        )
        for n in ("conv1", "pool1", "res2", "res3", "res4", "res5", "pool5")
    ]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return sizes, out


# Spec table 4.4 (T x H after conv1, pool1, res2, res3, res4, res5; pool5 output T x H).
TABLE_4_4 = {
    ("resnet_video", 8, 224): [(8, 112), (8, 55), (8, 55), (4, 28), (4, 14), (4, 7), (1, 1)],
    ("resnet_video", 8, 256): [(8, 128), (8, 63), (8, 63), (4, 32), (4, 16), (4, 8), (1, 2)],
    ("resnet_video", 32, 224): [(32, 112), (32, 55), (32, 55), (16, 28), (16, 14), (16, 7), (1, 1)],
    ("resnet_video", 32, 256): [(32, 128), (32, 63), (32, 63), (16, 32), (16, 16), (16, 8), (1, 2)],
    ("resnet_video_org", 32, 224): [(16, 112), (8, 55), (8, 55), (4, 28), (4, 14), (4, 7), (1, 1)],
    ("resnet_video_org", 32, 256): [(16, 128), (8, 63), (8, 63), (4, 32), (4, 16), (4, 8), (1, 2)],
    ("resnet_video_org", 128, 224): [
        (64, 112),
        (32, 55),
        (32, 55),
        (16, 28),
        (16, 14),
        (16, 7),
        (1, 1),
    ],
    ("resnet_video_org", 128, 256): [
        (64, 128),
        (32, 63),
        (32, 63),
        (16, 32),
        (16, 16),
        (16, 8),
        (1, 2),
    ],
}


def _one_per_table_row() -> list:
    """Every released name; by default one per (file, frames, C2D/I3D arc) kind, non-local where
    there is one; the others (the same shapes under other names) with the full-size suite."""
    seen: set = set()
    params = []
    for name in sorted(RELEASED, key=lambda n: ("nonlocal" not in n, n)):
        cfg = nl.get_cfg(name)
        key = (cfg.MODEL.MODEL_NAME, int(cfg.TRAIN.VIDEO_LENGTH), cfg.MODEL.VIDEO_ARC_CHOICE)
        params.append(pytest.param(name, marks=() if key not in seen else pytest.mark.parity_full))
        seen.add(key)
    return params


@pytest.mark.slow
@pytest.mark.parametrize("split, crop", [("val", 224), ("test", 256)])
@pytest.mark.parametrize("name", _one_per_table_row())
def test_every_released_model_full_size(name, split, crop):
    model = nl.build_model(name, split=split)
    frames = _frames(name)
    sizes, out = _sizes(model, torch.randn(1, 3, frames, crop, crop))
    assert out.shape == (1, 400) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    if split == "test":
        torch.testing.assert_close(out.sum(1), torch.ones(1))
    expected = TABLE_4_4[(model.cfg.MODEL.MODEL_NAME, frames, crop)]
    assert [
        sizes[k] for k in ("conv1", "pool1", "res2", "res3", "res4", "res5", "pool5")
    ] == expected


@pytest.mark.parametrize("split, crop", [("val", 224), ("test", 256)])
def test_representative_model_full_size(split, crop):
    # The fast default subset of the test above: the 8x8 I3D non-local model.
    model = nl.build_model("i3d_nonlocal_8x8_IN_pretrain_400k", split=split)
    sizes, out = _sizes(model, torch.randn(2, 3, 8, crop, crop))
    assert out.shape == (2, 400)
    assert list(sizes.values()) == TABLE_4_4[("resnet_video", 8, crop)]


@pytest.mark.parametrize("arc", [3, 4])
def test_r101_arcs_forward(arc):
    model = nl.build_model(
        "i3d_nonlocal_8x8_IN_pretrain_400k",
        split="test",
        overrides=["MODEL.DEPTH", "101", "MODEL.VIDEO_ARC_CHOICE", str(arc)],
    )
    with torch.no_grad():
        out = model(torch.randn(1, 3, 8, 256, 256))
    assert out.shape == (1, 400)


def _randomise_bn(model, seed=0):
    """Non-trivial BN statistics and non-local gammas, so that every branch contributes."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name.endswith("running_mean"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        elif "_bn.weight" in name or name.endswith("bn.weight"):
            t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
        elif name.endswith("bn.bias"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)


@pytest.mark.parametrize(
    "name, split, frames",
    [
        ("i3d_nonlocal_8x8_IN_pretrain_400k", "test", 8),  # per-GPU batch in the config: 8
        # grouped res3 (4-frame windows), config batch 2: 16 of its 32 frames keep several
        # windows and halve the cost, the FC head's 224 crops cut it again (whether clips mix
        # depends on neither)
        pytest.param("i3d_nonlocal_32x4_I3D_pretrain_400k", "val", 16, marks=pytest.mark.slow),
    ],
)
def test_batch_size_does_not_mix_clips(name, split, frames):
    crop = 256 if split == "test" else 224
    model = nl.build_model(name, split=split, overrides=["TRAIN.VIDEO_LENGTH", str(frames)])
    _randomise_bn(model)
    torch.manual_seed(1)
    x = torch.randn(3, 3, frames, crop, crop)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
        x2 = x.clone()
        x2[1:] = torch.randn_like(x2[1:])
        changed = model(x2)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)
    # clip 0 does not see clips 1 and 2 at all
    torch.testing.assert_close(changed[0], batched[0], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(changed[1], batched[1])


def test_test_head_is_per_position_softmax_averaged():
    model = nl.build_model("c2d_baseline_8x8_IN_pretrain_400k", split="test")
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 8, 256, 256)).shape == (1, 2048, 1, 2, 2)
        feats = torch.randn(2, 2048, 1, 2, 2)  # positions that disagree
        w = model.pred.weight.reshape(400, 2048)
        logits = torch.einsum("kc,nctij->nktij", w, feats) + model.pred.bias.view(1, -1, 1, 1, 1)
        expected = F.softmax(logits, dim=1).mean(dim=(2, 3, 4))
        got = model.forward_head(feats)
        # not the same function as a global pool followed by one softmax
        pooled = F.softmax(feats.mean(dim=(2, 3, 4)) @ w.T + model.pred.bias, dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert (got - pooled).abs().max() > 1e-4


def test_val_and_test_weights_are_interchangeable():
    val = nl.build_model("i3d_baseline_8x8_IN_pretrain_400k", split="val")
    test = nl.build_model("i3d_baseline_8x8_IN_pretrain_400k", split="test")
    test.load_state_dict(val.state_dict())  # FC (400, 2048) into the 1x1x1 conv
    assert test.pred.weight.shape == (400, 2048, 1, 1, 1)
    x = torch.randn(1, 3, 8, 224, 224)
    with torch.no_grad():
        # at 224 pool5 is 1x1x1, so the test head is the softmax of the val logits
        torch.testing.assert_close(test(x), F.softmax(val(x), dim=1), rtol=1e-5, atol=1e-7)
    val.load_state_dict(test.state_dict())  # and back
    torch.testing.assert_close(val.pred.weight, test.pred.weight.reshape(400, 2048))


def test_split_modes_and_dropout():
    # NUM_GPUS 32: per-GPU BN groups of 64 / 32 = 2 clips, the batch of 2 below
    train = nl.build_model("i3d_baseline_8x8_IN_pretrain_400k", "train", ["NUM_GPUS", "32"])
    assert train.training and isinstance(train.dropout, torch.nn.Dropout)
    assert train.res_conv1_bn.bn_group_size == 2
    assert train.dropout.p == 0.5
    assert train.res_conv1_bn.momentum == pytest.approx(0.1)  # Caffe2 0.9
    assert train.res_conv1_bn.eps == float(np.float32(1.0000001e-5))  # a Caffe2 float argument
    no_drop = nl.build_model("i3d_baseline_8x8_IN_pretrain_300k_4gpu", split="train")
    assert isinstance(no_drop.dropout, torch.nn.Identity)
    for split in ("val", "test"):
        m = nl.build_model("i3d_baseline_8x8_IN_pretrain_400k", split=split)
        assert not m.training and isinstance(m.dropout, torch.nn.Identity)
    logits = train(torch.randn(2, 3, 8, 224, 224))
    assert logits.shape == (2, 400)
    logits.sum().backward()
    assert train.conv1.weight.grad is not None


def test_errors_are_clear():
    val = nl.build_model("i3d_baseline_8x8_IN_pretrain_400k", split="val")
    with pytest.raises(ValueError, match=r"pool5 output 1x1x1, got 1x2x2"):
        val(torch.randn(1, 3, 8, 256, 256))
    with pytest.raises(ValueError, match=r"\(N, 3, T, H, W\)"):
        val(torch.randn(1, 8, 3, 224, 224))
    with pytest.raises(ValueError, match="pool5 needs at least 4x7x7"):
        val(torch.randn(1, 3, 4, 224, 224))
    with pytest.raises(ValueError, match="split must be one of"):
        nl.build_model("i3d_baseline_8x8_IN_pretrain_400k", split="eval")
    with pytest.raises(ValueError, match="VIDEO_ARC_CHOICE must be 1"):
        nl.build_model(
            "i3d_baseline_8x8_IN_pretrain_400k", overrides=["MODEL.VIDEO_ARC_CHOICE", "5"]
        )
    with pytest.raises(ValueError, match=r"MODEL\.DEPTH must be one of"):
        nl.build_model("i3d_baseline_8x8_IN_pretrain_400k", overrides=["MODEL.DEPTH", "152"])
    with pytest.raises(ConfigError, match=r"MODEL\.MODEL_NAME must be one of"):
        nl.build_model(
            "i3d_baseline_8x8_IN_pretrain_400k", overrides=["MODEL.MODEL_NAME", "resnet"]
        )
    with pytest.raises(ValueError, match="TRANS_FUNC"):
        nl.build_model(
            None, overrides=["MODEL.MODEL_NAME", "resnet_video", "MODEL.NUM_CLASSES", "400"]
        )
    with pytest.raises(ValueError, match=r"USE_BN and NONLOCAL\.USE_AFFINE"):
        nl.build_model(
            "i3d_nonlocal_8x8_IN_pretrain_400k", overrides=["NONLOCAL.USE_AFFINE", "True"]
        )
    with pytest.raises(ValueError, match="multiple of the group size 4"):
        nl.build_model(
            "i3d_nonlocal_32x4_I3D_pretrain_400k", overrides=["TRAIN.VIDEO_LENGTH", "12"]
        )
