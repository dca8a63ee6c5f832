"""Training from scratch starts where the original started: the initialisers of spec 2.1/7.2."""

from __future__ import annotations

import math

import pytest
import torch

import nonlocal_net as nl
from nonlocal_net.models.layers import AffineNd, SpatialBN


@pytest.fixture(scope="module")
def i3d_nl():
    torch.manual_seed(0)
    return nl.build_model("i3d_nonlocal_8x8_IN_pretrain_400k", split="train")


def test_msra_fill_uses_fan_out(i3d_nl):
    for conv in (
        i3d_nl.conv1,
        i3d_nl.res4.get_submodule("0").branch2b,
        i3d_nl.res5.get_submodule("1").branch2a,
        i3d_nl.res5.get_submodule("0").branch1,
    ):
        w = conv.weight
        fan_out = w.shape[0] * w[0, 0].numel()
        assert w.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)
        assert abs(w.mean().item()) < 0.1 * math.sqrt(2.0 / fan_out)
        assert conv.bias is None


def test_bn_initialisation(i3d_nl):
    # zoo configs set MODEL.BN_INIT_GAMMA 0.0: every branch2c gamma starts at 0
    assert torch.all(i3d_nl.res3.get_submodule("2").branch2c_bn.weight == 0)
    assert torch.all(i3d_nl.res3.get_submodule("2").branch2a_bn.weight == 1)
    assert torch.all(i3d_nl.res3.get_submodule("0").branch1_bn.weight == 1)
    assert torch.all(i3d_nl.res_conv1_bn.weight == 1)
    for m in i3d_nl.modules():
        if isinstance(m, SpatialBN):
            assert torch.all(m.bias == 0) and torch.all(m.running_mean == 0)
            assert torch.all(m.running_var == 1)
    default = nl.build_model(
        None,
        split="val",
        overrides=[
            "MODEL.MODEL_NAME",
            "resnet_video",
            "MODEL.NUM_CLASSES",
            "400",
            "RESNETS.TRANS_FUNC",
            "bottleneck_transformation_3d",
        ],
    )
    assert torch.all(default.res2[0].branch2c_bn.weight == 1)  # original default 1.0


def test_nonlocal_and_classifier_initialisation(i3d_nl):
    block = i3d_nl.res4.nonlocal_3
    assert block.theta.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert block.out.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(block.bn.weight == 0)  # NONLOCAL.BN_INIT_GAMMA
    assert i3d_nl.pred.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(i3d_nl.pred.bias == 0)
    test = nl.build_model("i3d_nonlocal_8x8_IN_pretrain_400k", split="test")
    bound = math.sqrt(3.0 / 2048)  # XavierFill
    assert test.pred.weight.abs().max().item() <= bound
    assert test.pred.weight.abs().max().item() > 0.9 * bound


def test_affine_models_start_at_identity_affines():
    model = nl.build_model("i3d_nonlocal_32x4_I3D_pretrain_400k", split="train")
    affines = [m for m in model.modules() if isinstance(m, AffineNd)]
    assert affines and not any(isinstance(m, SpatialBN) for m in model.modules())
    for m in affines:  # Conv3dAffine ignores bn_init: branch2c starts at 1 too
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.count_nonzero(model.res3.nonlocal_1.out.weight) == 0  # USE_ZERO_INIT_CONV
    assert model.res3.nonlocal_1.bn is None  # NONLOCAL.USE_BN False
    assert model.res3.nonlocal_1.group_size == 4 and model.res4.nonlocal_1.group_size is None
