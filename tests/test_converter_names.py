"""The blob-name <-> state_dict-key rules are bijective and total for every configuration the
model supports, and agree with the independent blob inventory derived from the specification."""

from __future__ import annotations

import itertools

import pytest
import torch
from blob_inventory import RELEASED, Arch, expected_blobs

import nonlocal_net as nl
from nonlocal_net.converters import (
    NAME_RULES,
    blob_to_state_dict_key,
    state_dict_key_to_blob,
    try_blob_to_state_dict_key,
    try_state_dict_key_to_blob,
)

NL8 = "i3d_nonlocal_8x8_IN_pretrain_400k"

CONFIGS = [
    *[(name, [], Arch(**RELEASED[name]), split) for name in RELEASED for split in ("val", "test")],
    *[
        (
            NL8,
            ["MODEL.DEPTH", "101", "MODEL.VIDEO_ARC_CHOICE", str(arc)],
            Arch(arc=arc, depth=101),
            "val",
        )
        for arc in (3, 4)
    ],
    (NL8, ["MODEL.DEPTH", "101"], Arch(depth=101), "val"),
    (NL8, ["NONLOCAL.NO_BIAS", "1"], Arch(nl_bias=False), "val"),
    (
        NL8,
        ["NONLOCAL.USE_BN", "False", "NONLOCAL.USE_AFFINE", "True"],
        Arch(nl_bn=False, nl_affine=True),
        "val",
    ),
    (NL8, ["NONLOCAL.USE_BN", "False"], Arch(nl_bn=False), "val"),
    (NL8, ["NONLOCAL.LAYER_MOD", "1"], Arch(layer_mod=1), "val"),
    (NL8, ["MODEL.USE_AFFINE", "True"], Arch(affine=True), "val"),
    (NL8, ["MODEL.NUM_CLASSES", "101"], Arch(num_classes=101), "test"),
]


def _meta_model(name, overrides, split):
    with torch.device("meta"):
        return nl.build_model(name, split=split, overrides=overrides)


@pytest.mark.parametrize(
    "name, overrides, arch, split",
    CONFIGS,
    ids=[f"{c[0][:24]}-{'-'.join(c[1])}-{c[3]}" for c in CONFIGS],
)
def test_every_model_tensor_has_exactly_one_blob(name, overrides, arch, split):
    keys = list(_meta_model(name, overrides, split).state_dict())
    blobs = [state_dict_key_to_blob(k) for k in keys]
    assert len(set(blobs)) == len(keys)  # injective
    # ... onto exactly the original's blob names for this configuration
    assert blobs == [b for b, _ in expected_blobs(arch)]
    # and back
    assert [blob_to_state_dict_key(b) for b in blobs] == keys


def _all_rule_names():
    """Blob names of every form the rules cover, over a wide range of stage/block numbers."""
    for s, i in itertools.product(["2", "3", "4", "5", "10"], ["0", "1", "6", "22", "123"]):
        for b in ("1", "2a", "2b", "2c"):
            yield f"res{s}_{i}_branch{b}_w"
            for x in ("s", "b", "rm", "riv"):
                yield f"res{s}_{i}_branch{b}_bn_{x}"
        for p, x in itertools.product(("theta", "phi", "g", "out"), ("w", "b")):
            yield f"nonlocal_conv{s}_{i}_{p}_{x}"
        for x in ("s", "b", "rm", "riv"):
            yield f"nonlocal_conv{s}_{i}_bn_{x}"
    yield from ["conv1_w", "pred_w", "pred_b"]
    yield from [f"res_conv1_bn_{x}" for x in ("s", "b", "rm", "riv")]


def test_rules_are_a_bijection():
    names = list(_all_rule_names())
    keys = [blob_to_state_dict_key(n) for n in names]
    assert len(set(keys)) == len(names)
    assert [state_dict_key_to_blob(k) for k in keys] == names
    # every name is covered by exactly one rule, in both directions
    for name, key in zip(names, keys):
        assert sum(bool(r.blob_re.fullmatch(name)) for r in NAME_RULES) == 1
        assert sum(bool(r.key_re.fullmatch(key)) for r in NAME_RULES) == 1


@pytest.mark.parametrize(
    "blob, key",
    [
        ("res3_1_branch2a_bn_riv", "res3.1.branch2a_bn.running_var"),
        ("res_conv1_bn_rm", "res_conv1_bn.running_mean"),
        ("nonlocal_conv4_5_theta_w", "res4.nonlocal_5.theta.weight"),
        ("nonlocal_conv3_1_bn_s", "res3.nonlocal_1.bn.weight"),
        ("res2_0_branch1_w", "res2.0.branch1.weight"),
        ("pred_w", "pred.weight"),
    ],
)
def test_documented_examples(blob, key):
    assert blob_to_state_dict_key(blob) == key and state_dict_key_to_blob(key) == blob


@pytest.mark.parametrize(
    "blob",
    [
        "conv1_b",
        "res2_0_branch2a_b",
        "res2_0_branch3_w",
        "res_conv1_bn_sm",
        "res2_0_branch2a_bn_siv",
        "pred_w_momentum",
        "lr",
        "model_iter",
        "nonlocal_conv3_1_theta",
        "nonlocal_conv3_1_pool_w",
        "res2_0_branch2a_w ",
        "RES2_0_branch2a_w",
    ],
)
def test_names_outside_the_rules(blob):
    assert try_blob_to_state_dict_key(blob) is None
    with pytest.raises(KeyError, match="not a blob name"):
        blob_to_state_dict_key(blob)


@pytest.mark.parametrize(
    "key",
    [
        "conv1.bias",
        "res2.0.branch2a.bias",
        "res3.nonlocal_1.pool.weight",
        "pred.weight2",
        "fc.weight",
    ],
)
def test_keys_outside_the_rules(key):
    assert try_state_dict_key_to_blob(key) is None
    with pytest.raises(KeyError, match="not a state_dict key"):
        state_dict_key_to_blob(key)
