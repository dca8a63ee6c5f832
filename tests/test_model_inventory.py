"""Every model's parameters and buffers equal the original's blob inventory (count and shapes,
in creation order), derived independently in ``blob_inventory.py`` from the spec's rules."""

from __future__ import annotations

import pytest
from blob_inventory import FLAG_CASES, RELEASED, Arch, expected_blobs, is_running_stat

import nonlocal_net as nl
from nonlocal_net.models.layers import AffineNd


def _inventory(model) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in model.state_dict().values()]


def _check(model, arch: Arch) -> None:
    expected = expected_blobs(arch)
    got = _inventory(model)
    assert len(got) == len(expected)
    mismatches = [
        (i, name, shape, got[i]) for i, (name, shape) in enumerate(expected) if got[i] != shape
    ]
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_model_inventory(name, split):
    _check(nl.build_model(name, split=split), Arch(split=split, **RELEASED[name]))


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("arc", [3, 4])
def test_r101_inventory(arc, split):
    model = nl.build_model(
        "i3d_nonlocal_8x8_IN_pretrain_400k",
        split=split,
        overrides=["MODEL.DEPTH", "101", "MODEL.VIDEO_ARC_CHOICE", str(arc)],
    )
    _check(model, Arch(arc=arc, depth=101, split=split))


@pytest.mark.parametrize("overrides, arch", FLAG_CASES)
def test_flag_inventory(overrides, arch):
    _check(
        nl.build_model("i3d_nonlocal_8x8_IN_pretrain_400k", split="val", overrides=overrides), arch
    )


# Parameter counts (without running statistics) given by the specification, section 2.5.
@pytest.mark.parametrize(
    "name, overrides, count",
    [
        ("i3d_nonlocal_8x8_IN_pretrain_400k", [], 35_401_936),
        ("i3d_baseline_8x8_IN_pretrain_400k", [], 28_043_472),
        ("c2d_nonlocal_8x8_IN_pretrain_400k", [], 31_686_096),
        ("c2d_baseline_32x2_IN_pretrain_400k", [], 24_327_632),
        (
            "i3d_nonlocal_8x8_IN_pretrain_400k",
            ["MODEL.DEPTH", "101", "MODEL.VIDEO_ARC_CHOICE", "4"],
            59_112_656,
        ),
    ],
)
def test_parameter_counts_match_the_spec(name, overrides, count):
    model = nl.build_model(name, split="val", overrides=overrides)
    blobs = {k: v for k, v in model.state_dict().items()}
    total = sum(
        v.numel() for k, v in blobs.items() if not k.endswith(("running_mean", "running_var"))
    )
    assert total == count
    assert sum(p.numel() for p in model.parameters()) == count  # BN models: all trainable


def test_blob_counts_match_the_spec():
    # spec 1.1 / 2.5: 267 arrays (R50 baseline), 327 (with 5 non-local blocks), 161 affine,
    # 201 affine with non-local, 582 R101 I3D non-local
    def count(name, overrides=()):
        return len(nl.build_model(name, split="val", overrides=list(overrides)).state_dict())

    assert count("i3d_baseline_8x8_IN_pretrain_400k") == 267
    assert count("i3d_nonlocal_8x8_IN_pretrain_400k") == 327
    assert count("i3d_baseline_32x4_I3D_pretrain_400k") == 161
    assert count("i3d_nonlocal_32x4_I3D_pretrain_400k") == 201
    assert (
        count(
            "i3d_nonlocal_8x8_IN_pretrain_400k",
            ["MODEL.DEPTH", "101", "MODEL.VIDEO_ARC_CHOICE", "4"],
        )
        == 582
    )


def test_affine_models_train_nothing_in_the_affines():
    model = nl.build_model("i3d_nonlocal_32x4_I3D_pretrain_400k", split="train")
    arch = Arch(affine=True, nl_bn=False)
    affine_blobs = [n for n, _ in expected_blobs(arch) if n.endswith(("_bn_s", "_bn_b"))]
    affines = [m for m in model.modules() if isinstance(m, AffineNd)]
    assert len(affine_blobs) == 2 * len(affines)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = sum(
        _numel(shape)
        for n, shape in expected_blobs(arch)
        if not n.endswith(("_bn_s", "_bn_b")) and not is_running_stat(n)
    )
    assert trainable == expected


def _numel(shape):
    out = 1
    for s in shape:
        out *= s
    return out


def test_state_dict_names_mirror_blob_names():
    sd = nl.build_model("i3d_nonlocal_8x8_IN_pretrain_400k", split="test").state_dict()
    for key in [
        "conv1.weight",
        "res_conv1_bn.running_var",
        "res2.0.branch1.weight",
        "res3.1.branch2a_bn.weight",
        "res3.nonlocal_1.theta.weight",
        "res4.nonlocal_5.bn.running_var",
        "res5.2.branch2c.weight",
        "pred.weight",
        "pred.bias",
    ]:
        assert key in sd, key
    assert "res3.nonlocal_2.theta.weight" not in sd
    assert not any(k.endswith("num_batches_tracked") for k in sd)
