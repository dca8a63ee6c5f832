"""The reference graph of the original network: blob inventory, op sequence, taps,
feature-map sizes (spec table 4.4), the non-local variants against formulas written here, the
explicit-batch quirk, parameter loading, and independence from torch and the port."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from blob_inventory import FLAG_CASES, RELEASED, Arch, expected_blobs
from synthetic_blobs import make_blobs

import nonlocal_net as nl
from nonlocal_net.reference import GraphError, ParameterError, build_graph, run
from nonlocal_net.verify.pairing import port_module

NL_8X8 = "i3d_nonlocal_8x8_IN_pretrain_400k"
NL_32X4 = "i3d_nonlocal_32x4_I3D_pretrain_400k"
EPS32 = float(np.float32(1.0000001e-5))


def _graph(name: str, split: str = "val", overrides=(), **kwargs):
    return build_graph(nl.get_cfg(name, list(overrides)), split, **kwargs)


def _inventory(graph) -> list[tuple[str, tuple[int, ...]]]:
    return [(p.name, p.shape) for p in graph.params]


# ---------------------------------------------------------------------------------------------
# Inventory, ops, checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_inventory(name, split):
    graph = _graph(name, split)
    assert _inventory(graph) == expected_blobs(Arch(split=split, **RELEASED[name]))


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("arc", [3, 4])
def test_r101_inventory(arc, split):
    graph = _graph(NL_8X8, split, ["MODEL.DEPTH", "101", "MODEL.VIDEO_ARC_CHOICE", str(arc)])
    assert _inventory(graph) == expected_blobs(Arch(arc=arc, depth=101, split=split))


@pytest.mark.parametrize("overrides, arch", FLAG_CASES)
def test_flag_inventory(overrides, arch):
    assert _inventory(_graph(NL_8X8, "val", overrides)) == expected_blobs(arch)


def test_nonlocal_bn_and_affine_share_their_blobs():
    """Both flags on: the original runs SpatialBN then AffineNd on the same _bn_s/_bn_b."""
    graph = _graph(NL_8X8, "val", ["NONLOCAL.USE_AFFINE", "True"])
    assert _inventory(graph) == expected_blobs(Arch())  # no second _bn_s/_bn_b
    ops = [op for op in graph.ops if op.outputs == ("nonlocal_conv3_1_bn",)]
    assert [op.type for op in ops] == ["SpatialBN", "AffineNd"]
    assert ops[1].inputs == (
        "nonlocal_conv3_1_bn",
        "nonlocal_conv3_1_bn_s",
        "nonlocal_conv3_1_bn_b",
    )


R50_NL_LABELS = [
    "res_conv1_bn", "pool1", "res2_0", "res2_1", "res2_2", "pool2",
    "res3_0", "res3_1", "nonlocal_conv3_1", "res3_2", "res3_3", "nonlocal_conv3_3",
    "res4_0", "res4_1", "nonlocal_conv4_1", "res4_2", "res4_3", "nonlocal_conv4_3",
    "res4_4", "res4_5", "nonlocal_conv4_5", "res5_0", "res5_1", "res5_2", "pool5", "pred",
    "softmax",
]  # fmt: skip


@pytest.mark.parametrize("split", ["val", "test"])
def test_taps_and_module_pairing(split):
    graph = _graph(NL_8X8, split)
    assert [c.label for c in graph.taps] == R50_NL_LABELS
    c = graph.tap("res3_1")
    assert c.blob == "res3_1_branch2c_bn" and port_module(c.label, split) == "res3.1"
    assert graph.ops[c.op_index].type == "Relu"  # after the block's final ReLU
    assert graph.ops[c.start].outputs == ("res3_1_branch2a",) and c.input == "res3_0_branch2c_bn"
    c = graph.tap("nonlocal_conv4_5")
    assert c.blob == "nonlocal_conv4_5_sum" and port_module(c.label, split) == "res4.nonlocal_5"
    assert graph.ops[c.op_index].type == "Sum"
    pairs = {c.label: port_module(c.label, split) for c in graph.taps}
    assert pairs["res_conv1_bn"] == "relu" and pairs["pool1"] == "pool1"
    assert pairs["pool2"] == "pool2" and pairs["pool5"] == "pool5" and pairs["pred"] == "pred"
    assert pairs["softmax"] == ("" if split == "test" else None)
    model = nl.build_model(NL_8X8, split=split)
    for path in pairs.values():  # every paired module exists in the port
        if path:
            model.get_submodule(path)
    stem = graph.tap("res_conv1_bn")
    assert [op.type for op in graph.ops[: stem.op_index + 1]] == ["Conv", "SpatialBN", "Relu"]
    with pytest.raises(KeyError, match="no tap 'res9_0'"):
        graph.tap("res9_0")


def test_every_tap_is_the_last_write_of_its_blob():
    for name in (NL_8X8, NL_32X4):
        for split in ("val", "test"):
            graph = _graph(name, split)
            for c in graph.taps:
                assert c.blob in graph.ops[c.op_index].outputs
                later = [op for op in graph.ops[c.op_index + 1 :] if c.blob in op.outputs]
                assert not later, (name, c.label)


def test_r101_blocks_and_nonlocal_placement():
    graph = _graph(NL_8X8, "val", ["MODEL.DEPTH", "101", "MODEL.VIDEO_ARC_CHOICE", "4"])
    labels = [c.label for c in graph.taps]
    assert [x for x in labels if x.startswith("res4_")] == [f"res4_{i}" for i in range(23)]
    assert [x for x in labels if x.startswith("nonlocal")] == [
        "nonlocal_conv3_1", "nonlocal_conv3_3", "nonlocal_conv4_6", "nonlocal_conv4_13",
        "nonlocal_conv4_20",
    ]  # fmt: skip
    kernels = [op.args["kernels"][0] for op in graph.ops if op.outputs[0].endswith("branch2a")]
    res4 = kernels[7:30]
    assert res4 == [3 if i % 2 == 0 else 1 for i in range(23)]


def test_op_counts():
    # R50 BN + 5 non-local blocks, val: 53 backbone convs + 4 per non-local block; 16 blocks
    # with 3 ReLUs each plus the stem's; 16 + 5 Sums; pool1, pool2 and 5 non-local max pools.
    counts = _graph(NL_8X8, "val").op_counts()
    assert counts == {
        "Conv": 73, "SpatialBN": 58, "Relu": 49, "Sum": 21, "MaxPool": 7, "AveragePool": 1,
        "Reshape": 20, "BatchMatMul": 10, "Scale": 5, "Softmax": 6, "FC": 1,
    }  # fmt: skip
    counts = _graph(NL_8X8, "test").op_counts()
    assert (counts["Conv"], counts["Reshape"], counts["Transpose"]) == (74, 22, 2)
    assert (counts["ReduceBackMean"], counts["Softmax"], counts.get("FC")) == (3, 6, None)
    # affine, grouped res3: 2 Transposes and 1 Reshape on each side of the 2 res3 blocks
    counts = _graph(NL_32X4, "val").op_counts()
    assert counts["AffineNd"] == 53 and "SpatialBN" not in counts
    assert (counts["Transpose"], counts["Reshape"]) == (8, 20 + 4)
    # dot product: the denominator from ConstantFill / ReduceBackSum / Add / Div, no softmax
    counts = _graph(NL_8X8, "val", ["NONLOCAL.USE_SOFTMAX", "False"]).op_counts()
    assert (counts["ConstantFill"], counts["ReduceBackSum"], counts["Add"]) == (10, 5, 5)
    assert (counts["Div"], counts["StopGradient"], counts["Softmax"]) == (5, 5, 1)
    assert "Scale" not in counts
    counts = _graph(NL_8X8, "val", ["NONLOCAL.USE_MAXPOOL", "False"]).op_counts()
    assert counts["MaxPool"] == 2
    counts = _graph(NL_8X8, "val", ["NONLOCAL.USE_SCALE", "False"]).op_counts()
    assert "Scale" not in counts and counts["Softmax"] == 6


def test_unbuildable_configs_raise():
    with pytest.raises(GraphError, match="MODEL_NAME"):
        _graph(NL_8X8, "val", ["MODEL.MODEL_NAME", "resnet"])
    with pytest.raises(GraphError, match="VIDEO_ARC_CHOICE"):
        _graph(NL_8X8, "val", ["MODEL.VIDEO_ARC_CHOICE", "5"])
    with pytest.raises(GraphError, match="split"):
        _graph(NL_8X8, "train")
    # grouped non-local: pool5's temporal kernel must be a multiple of 4
    with pytest.raises(GraphError, match="multiple of 4"):
        _graph(NL_32X4, "val", ["TRAIN.VIDEO_LENGTH", "12"])


# ---------------------------------------------------------------------------------------------
# Feature-map sizes: specification table 4.4
# ---------------------------------------------------------------------------------------------

# model, crop -> conv1, pool1, res2, pool2 (T), res3, res4, res5 as (T, H); pool5 (T, H, W)
TABLE_4_4 = [
    (NL_8X8, 224, (8, 112), (8, 55), (8, 55), 4, (4, 28), (4, 14), (4, 7), (1, 1, 1)),
    (NL_8X8, 256, (8, 128), (8, 63), (8, 63), 4, (4, 32), (4, 16), (4, 8), (1, 2, 2)),
    (NL_32X4, 224, (32, 112), (32, 55), (32, 55), 16, (16, 28), (16, 14), (16, 7), (1, 1, 1)),
    (NL_32X4, 256, (32, 128), (32, 63), (32, 63), 16, (16, 32), (16, 16), (16, 8), (1, 2, 2)),
    ("i3d_nonlocal_32x2_IN_pretrain_400k", 224, (16, 112), (8, 55), (8, 55), 4, (4, 28),
     (4, 14), (4, 7), (1, 1, 1)),
    ("c2d_baseline_32x2_IN_pretrain_400k", 256, (16, 128), (8, 63), (8, 63), 4, (4, 32),
     (4, 16), (4, 8), (1, 2, 2)),
    ("i3d_nonlocal_128x1_I3D_pretrain_400k", 224, (64, 112), (32, 55), (32, 55), 16, (16, 28),
     (16, 14), (16, 7), (1, 1, 1)),
    ("i3d_nonlocal_128x1_I3D_pretrain_400k", 256, (64, 128), (32, 63), (32, 63), 16, (16, 32),
     (16, 16), (16, 8), (1, 2, 2)),
]  # fmt: skip


@pytest.mark.parametrize("row", TABLE_4_4, ids=lambda r: f"{r[0]}-{r[1]}")
def test_feature_map_sizes(row):
    name, crop, conv1, pool1, res2, pool2, res3, res4, res5, pool5 = row
    split = "val" if crop == 224 else "test"
    cfg = nl.get_cfg(name)
    graph = build_graph(cfg, split)
    batch = graph.config_batch_size  # grouped models: the explicit reshapes need it
    shapes = graph.infer_shapes((batch, 3, cfg.TRAIN.VIDEO_LENGTH, crop, crop))
    th = {k: (shapes[k][2], shapes[k][3]) for k in ("conv1", "pool1", "res2_2", "res3_3")}
    assert th == {"conv1": conv1, "pool1": pool1, "res2_2": res2, "res3_3": res3}
    assert shapes["pool2"][2] == pool2
    assert (shapes["res4_5"][2:4], shapes["res5_2"][2:4]) == (res4, res5)
    assert shapes["pool5"] == (batch, 2048, *pool5)
    assert shapes["softmax"] == (batch, 400)
    assert shapes["pred"] == ((batch, 400) if split == "val" else (batch, 400, 1, 2, 2))
    for c in graph.taps:  # the grouped non-local restores (B, C, T, H, W)
        if c.label.startswith("nonlocal_conv3"):
            assert shapes[c.label] == (batch, 512, *res3, res3[1])


# ---------------------------------------------------------------------------------------------
# Non-local variants on small inputs, against formulas written here
# ---------------------------------------------------------------------------------------------


def _conv1x1(blobs, name, x):
    y = np.einsum("oi,bithw->bothw", blobs[f"{name}_w"][:, :, 0, 0, 0].astype(float), x)
    if f"{name}_b" in blobs:
        y = y + blobs[f"{name}_b"].astype(float)[None, :, None, None, None]
    return y


def nonlocal_formula(
    x, blobs, prefix, *, softmax=True, scale=True, maxpool=True, bn=True, affine=False,
    reshape_batch=None,
):  # fmt: skip
    """Embedded Gaussian (or dot product) non-local block plus the residual, spec 4.5; biases
    where ``blobs`` has them. ``reshape_batch`` reproduces the original's explicit-batch
    reshape of theta/phi/g."""
    b, c, t, h, w = x.shape
    ci = c // 2
    theta = _conv1x1(blobs, f"{prefix}_theta", x)
    pooled = x
    if maxpool:  # 1x2x2 windows, floor
        pooled = x[:, :, :, : h // 2 * 2, : w // 2 * 2].reshape(b, c, t, h // 2, 2, w // 2, 2)
        pooled = pooled.max(axis=(4, 6))
    phi, g = _conv1x1(blobs, f"{prefix}_phi", pooled), _conv1x1(blobs, f"{prefix}_g", pooled)
    rb = b if reshape_batch is None else reshape_batch
    theta, phi, g = (a.reshape(rb, ci, -1) for a in (theta, phi, g))
    affinity = np.einsum("bcn,bcm->bnm", theta, phi)
    if softmax:
        if scale:
            affinity = affinity * float(np.float32(ci**-0.5))  # the float32 Scale argument
        p = np.exp(affinity - affinity.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
    else:
        p = affinity / affinity.shape[2]
    y = np.einsum("bcm,bnm->bcn", g, p).reshape(b, ci, t, h, w)
    z = _conv1x1(blobs, f"{prefix}_out", y)
    if bn:
        s, beta, rm, riv = (
            blobs[f"{prefix}_bn_{k}"].astype(float) for k in ("s", "b", "rm", "riv")
        )
        z = (z - rm[:, None, None, None]) / np.sqrt(riv[:, None, None, None] + EPS32)
        z = z * s[:, None, None, None] + beta[:, None, None, None]
    if affine:
        s, beta = (blobs[f"{prefix}_bn_{k}"].astype(float) for k in ("s", "b"))
        z = z * s[:, None, None, None] + beta[:, None, None, None]
    return x + z


def _layer(graph, blobs, x, label, **kwargs):
    return run(graph, blobs, x, start=label, stop=label, keep=[label], **kwargs)[label]


@pytest.mark.parametrize(
    "overrides, flags",
    [
        ([], {}),
        (["NONLOCAL.USE_SOFTMAX", "False"], {"softmax": False}),  # dot product
        (["NONLOCAL.USE_SCALE", "False"], {"scale": False}),
        (["NONLOCAL.USE_MAXPOOL", "False"], {"maxpool": False}),
        (["NONLOCAL.NO_BIAS", "1"], {}),
        (
            ["NONLOCAL.USE_BN", "False", "NONLOCAL.USE_AFFINE", "True"],
            {"bn": False, "affine": True},
        ),
        (["NONLOCAL.USE_AFFINE", "True"], {"affine": True}),  # BN then affine, shared blobs
    ],
)
def test_nonlocal_block_matches_formula(overrides, flags):
    graph = _graph(NL_8X8, "val", overrides)
    blobs = make_blobs(_inventory(graph), seed=1)
    x = np.random.default_rng(2).normal(size=(2, 512, 2, 5, 6))  # odd H: the pool's floor
    y = _layer(graph, blobs, x, "nonlocal_conv3_1")
    expected = nonlocal_formula(x, blobs, "nonlocal_conv3_1", **flags)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    assert not np.allclose(y, x, atol=1e-3)  # the block contributes


def test_grouped_nonlocal_attends_within_4_frame_windows():
    # 32x4 affine: res3 T = 16 -> 4 windows of 4 frames; val crop 32 -> spatial 32 / 8 = 4
    graph = _graph(NL_32X4, "val", ["TRAIN.CROP_SIZE", "32"])
    assert graph.config_batch_size == 2
    blobs = make_blobs(_inventory(graph), seed=3)
    x = np.random.default_rng(4).normal(size=(2, 512, 16, 4, 4))
    y = _layer(graph, blobs, x, "nonlocal_conv3_1")
    expected = np.empty_like(x)
    for clip in range(2):
        for k in range(4):
            window = x[clip : clip + 1, :, 4 * k : 4 * k + 4]
            expected[clip : clip + 1, :, 4 * k : 4 * k + 4] = nonlocal_formula(
                window, blobs, "nonlocal_conv3_1", bn=False
            )
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    global_attention = nonlocal_formula(x, blobs, "nonlocal_conv3_1", bn=False)
    assert not np.allclose(y, global_attention, atol=1e-6)
    # res4 of the same model attends globally (over all 16 frames)
    x4 = np.random.default_rng(5).normal(size=(2, 1024, 16, 2, 2))
    y4 = _layer(graph, blobs, x4, "nonlocal_conv4_1")
    np.testing.assert_allclose(
        y4, nonlocal_formula(x4, blobs, "nonlocal_conv4_1", bn=False), rtol=1e-12, atol=1e-12
    )


def test_explicit_batch_reshape_mixes_clips_in_config_mode():
    """With TRAIN.BATCH_SIZE / NUM_GPUS = 1 and 2 real clips, the original's non-local treats
    the two clips as one sample (spec 3.8); the executor reproduces that only when asked."""
    graph = _graph(NL_8X8, "val", ["TRAIN.BATCH_SIZE", "8"])
    assert graph.config_batch_size == 1
    blobs = make_blobs(_inventory(graph), seed=5)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 512, 2, 4, 4))
    other = x.copy()
    other[1] = rng.normal(size=other[1].shape)  # change clip 1 only
    label = "nonlocal_conv3_1"

    real = _layer(graph, blobs, x, label)
    np.testing.assert_allclose(real, nonlocal_formula(x, blobs, label), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(real[0], _layer(graph, blobs, other, label)[0])

    quirk = _layer(graph, blobs, x, label, batch_size="config")
    np.testing.assert_allclose(
        quirk, nonlocal_formula(x, blobs, label, reshape_batch=1), rtol=1e-12, atol=1e-12
    )
    assert not np.allclose(quirk[0], real[0], atol=1e-6)
    # clip 0's output now depends on clip 1
    assert not np.allclose(quirk[0], _layer(graph, blobs, other, label, batch_size="config")[0])


def test_explicit_batch_reshape_raises_when_sizes_do_not_divide():
    graph = _graph(NL_8X8, "val")  # config batch 64 / 8 = 8
    blobs = make_blobs(_inventory(graph), seed=7)
    x = np.zeros((3, 512, 1, 3, 3))  # 3 * 256 * 9 elements, not divisible by 8 * 256
    with pytest.raises(GraphError, match=r"Reshape\(nonlocal_conv3_1_theta\).*does not agree"):
        _layer(graph, blobs, x, "nonlocal_conv3_1", batch_size="config")
    _layer(graph, blobs, x, "nonlocal_conv3_1")  # the real batch works
    # the grouped reshape has an explicit 5-D shape: any other batch raises
    graph = _graph(NL_32X4, "val", ["TRAIN.CROP_SIZE", "32"])
    with pytest.raises(GraphError, match="does not agree"):
        _layer(graph, blobs, np.zeros((1, 512, 16, 4, 4)), "nonlocal_conv3_1", batch_size="config")


# ---------------------------------------------------------------------------------------------
# Heads and parameter loading
# ---------------------------------------------------------------------------------------------


def _softmax_rows(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_test_head_is_per_position_softmax_then_mean():
    graph = _graph(NL_8X8, "test")
    rng = np.random.default_rng(8)
    w, b = rng.normal(size=(400, 2048)) * 0.05, rng.normal(size=400)
    blobs = {"pred_w": w.astype(np.float32), "pred_b": b.astype(np.float32)}  # 2-D FC weight
    pool5 = rng.normal(size=(2, 2048, 1, 2, 2))
    out = run(graph, blobs, pool5, start="pred", keep=["pred", "softmax_conv"])
    logits = np.einsum("kc,bcthw->bthwk", w.astype(np.float32).astype(float), pool5)
    logits = logits + b.astype(np.float32)
    np.testing.assert_allclose(out["pred"], logits.transpose(0, 4, 1, 2, 3), rtol=1e-12, atol=1e-13)
    expected = _softmax_rows(logits).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(out["softmax"], expected, rtol=1e-12)
    assert out["softmax_conv"].shape == (8, 400)  # (B*T'*H'*W', K)
    # one softmax on the averaged logits would be a different function
    assert not np.allclose(out["softmax"], _softmax_rows(logits.mean(axis=(1, 2, 3))), atol=1e-4)


def test_val_head_accepts_a_conv_shaped_pred_weight():
    graph = _graph(NL_8X8, "val")
    rng = np.random.default_rng(9)
    w, b = rng.normal(size=(400, 2048, 1, 1, 1)), rng.normal(size=400)
    pool5 = rng.normal(size=(3, 2048, 1, 1, 1))
    out = run(graph, {"pred_w": w, "pred_b": b}, pool5, start="pred")
    logits = pool5.reshape(3, 2048) @ w.reshape(400, 2048).T + b
    np.testing.assert_allclose(out["pred"], logits, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(out["softmax"], _softmax_rows(logits), rtol=1e-12)


def test_parameter_errors_name_the_blobs():
    graph = _graph(NL_8X8, "test")
    blobs = make_blobs(_inventory(graph))
    x = np.zeros((1, 3, 8, 256, 256))
    broken = {k: v for k, v in blobs.items() if k != "res3_1_branch2b_bn_riv"}
    broken["res4_0_branch1_w"] = np.zeros((1024, 512, 3, 1, 1), np.float32)
    with pytest.raises(ParameterError) as err:
        run(graph, broken, x)
    message = str(err.value)
    assert "missing blob(s): res3_1_branch2b_bn_riv" in message
    assert "res4_0_branch1_w: shape (1024, 512, 3, 1, 1), expected (1024, 512, 1, 1, 1)" in message
    wrong_classes = dict(blobs, pred_w=np.zeros((101, 2048), np.float32))
    with pytest.raises(ParameterError, match=r"pred_w.*different class count"):
        run(graph, wrong_classes, x)
    with pytest.raises(ValueError, match=r"\(N, 3, T, H, W\)"):
        run(graph, blobs, np.zeros((1, 8, 256, 256)))
    # extra blobs of a checkpoint (lr, model_iter, momenta) are ignored
    extra = {"lr": np.float32(1e-4), "model_iter": 400000, "pred_w_momentum": blobs["pred_w"]}
    pool5 = np.zeros((1, 2048, 1, 2, 2))
    run(graph, {**blobs, **extra}, pool5, start="pred")


def test_keep_options():
    graph = _graph(NL_8X8, "val")
    blobs = make_blobs(_inventory(graph))
    x = np.random.default_rng(10).normal(size=(1, 1024, 2, 4, 4))
    out = run(graph, blobs, x, start="res4_5", stop="res4_5", keep=None)
    assert out == {}
    out = run(graph, blobs, x, start="res4_5", stop="nonlocal_conv4_5", keep="all")
    assert {"res4_5_branch2a", "nonlocal_conv4_5_affinity_prob", "nonlocal_conv4_5_sum"} <= set(out)
    out = run(graph, blobs, x, start="res4_5", stop="nonlocal_conv4_5")
    assert set(out) == {"res4_5", "nonlocal_conv4_5"}
    # Buffers of dead values are reused in place; keeping every blob (no reuse) or only the
    # last one gives the same result, and the caller's input is never modified.
    x_before = x.copy()
    everything = run(graph, blobs, x, start="res4_5", stop="nonlocal_conv4_5", keep="all")
    np.testing.assert_array_equal(everything["nonlocal_conv4_5_sum"], out["nonlocal_conv4_5"])
    np.testing.assert_array_equal(everything["res4_5_branch2c_bn"], out["res4_5"])
    np.testing.assert_array_equal(x, x_before)
    with pytest.raises(KeyError, match="neither a tap label nor a blob"):
        run(graph, blobs, x, start="res4_5", stop="res4_5", keep=["pool5"])


# ---------------------------------------------------------------------------------------------
# Independence
# ---------------------------------------------------------------------------------------------

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "lib" / "reference"


def test_reference_modules_import_only_numpy_tqdm_and_stdlib():
    allowed = set(sys.stdlib_module_names) | {"numpy", "tqdm"}
    for path in REFERENCE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, (path.name, roots)


def test_reference_runs_with_torch_and_the_port_unavailable():
    code = f"""
import importlib.abc, sys, types
import numpy as np

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch" or name.startswith(
            ("nonlocal_net.models", "nonlocal_net.converters")
        ):
            raise ImportError("blocked " + name)

sys.meta_path.insert(0, Block())
package = types.ModuleType("nonlocal_net")
package.__path__ = [{str(REFERENCE_DIR.parent)!r}]
sys.modules["nonlocal_net"] = package
from nonlocal_net.core.config import get_default_cfg
from nonlocal_net.reference import build_graph, run

cfg = get_default_cfg()
cfg.MODEL.MODEL_NAME, cfg.MODEL.NUM_CLASSES = "resnet_video", 5
cfg.TRAIN.VIDEO_LENGTH = 2  # pool5 kernel 1x7x7
cfg.RESNETS.TRANS_FUNC = "bottleneck_transformation_3d"
graph = build_graph(cfg, "val")
blobs = {{p.name: np.full(p.shape, 0.01) for p in graph.params}}
out = run(graph, blobs, np.ones((1, 1024, 1, 14, 14)), start="res4_5")
assert out["softmax"].shape == (1, 5)
print("torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Full size
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parity_full  # full size; the small graphs above run the same code in make test
def test_full_size_run_matches_inferred_shapes_and_is_batch_independent():
    cfg = nl.get_cfg(NL_8X8)
    graph = build_graph(cfg, "test")
    blobs = make_blobs(_inventory(graph), seed=11)
    clips = np.random.default_rng(12).normal(size=(2, 3, 8, 256, 256)).astype(np.float32)
    out = run(graph, blobs, clips)
    shapes = graph.infer_shapes(clips.shape)
    assert set(out) == {c.label for c in graph.taps}
    for key, value in out.items():
        assert value.shape == shapes[key] and value.dtype == np.float64, key
        assert np.isfinite(value).all(), key
    np.testing.assert_allclose(out["softmax"].sum(axis=1), 1.0, rtol=1e-12)
    assert out["softmax"].max() < 0.9  # realistic blobs: not a saturated softmax
    # with the real batch, each clip's result is that of the clip alone
    single = run(graph, blobs, clips[1:], keep=None)
    np.testing.assert_allclose(single["softmax"], out["softmax"][1:], rtol=1e-10, atol=1e-14)
    # float32 runs agree with float64 to float32 precision
    out32 = run(graph, blobs, clips[:1], dtype=np.float32, keep=["pool5"])
    assert out32["softmax"].dtype == np.float32
    np.testing.assert_allclose(out32["softmax"], out["softmax"][:1], rtol=1e-3, atol=1e-7)
