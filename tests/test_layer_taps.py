"""Every layer ``vnl-extract --layer`` lists is the original's layer, in strict and in every fast
mode this CPU runs, or is refused up front in one line.

A tiny I3D non-local network (2-frame clips, narrow bottlenecks; every layer type of the
released models) with trained-like synthetic weights. Strict rows are checked against the
modules run by hand where a tap could go wrong (an in-place ReLU after a BN, a module run
three times, a grouped non-local block's windows); each fast mode's rows of every listed name
against strict's, within the mode's documented bound (docs/performance.md).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from eval_helpers import small_cfg, write_checkpoint

import nonlocal_net as nl
from nonlocal_net.converters.synthetic import load_synthetic_weights
from nonlocal_net.datasets.protocol import TestProtocol
from nonlocal_net.engine import inference
from nonlocal_net.engine.layer_taps import (
    POOL5,
    FeatureTap,
    LayerError,
    LayerTaps,
    check_layer,
    feature_dim,
    layer_dims,
    layer_names,
)
from nonlocal_net.models import fuse
from nonlocal_net.models.layers import AffineNd, SpatialBN

# documented bounds vs strict (max |mode - strict| / max |strict| over a layer's rows)
BOUNDS = {"fp32": 1e-5, "bf16": 5e-2}
CPU_MODES = ["fp32", pytest.param("bf16", marks=pytest.mark.slow)]


def tiny_model(extra=()) -> torch.nn.Module:
    model = nl.build_model(small_cfg(extra), split="test")
    return load_synthetic_weights(model.eval(), seed=1)


def clips(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    shape = (batch, 3, model.cfg.TRAIN.VIDEO_LENGTH, 224, 224)
    return torch.randn(shape, generator=torch.Generator().manual_seed(3))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tiny():
    """The model, a batch, every listed name and strict's rows of every name."""
    model = tiny_model()
    x = clips(model)
    names = layer_names(model)
    strict = LayerTaps(nl.prepare_for_inference(model, "cpu"), names)(x)
    return model, x, names, strict


def test_the_list_is_what_forward_features_runs(tiny):
    model, _, names, strict = tiny
    modules = dict(model.named_modules())
    assert names[0] == POOL5 and len(set(names)) == len(names)
    assert "dropout" not in names and not any(n.startswith("pred") for n in names)
    assert set(names[1:]) <= set(modules)
    # every module of the backbone but the (test-split) dropout is listed
    backbone = {n for n in modules if n and not n.startswith("pred")} - {"dropout"}
    assert backbone == set(names)
    protocol = TestProtocol.from_cfg(model.cfg)
    dims = layer_dims(model.cfg, protocol)
    assert list(dims) == names
    for name in names:
        rows = strict[name]
        assert rows.dtype == np.float32 and np.isfinite(rows).all(), name
        assert rows.shape == (2, dims[name]), name
    theta = modules["res3.nonlocal_1.theta"]  # the embedding: half the block's channels
    assert theta.out_channels * 2 == theta.in_channels
    assert feature_dim(model.cfg, "res3.nonlocal_1.theta", protocol) == theta.out_channels
    # names with different outputs give different rows (the taps are not one tensor)
    assert rel_err(strict["res2.0.branch2a"], strict["res2.0.branch2a_bn"]) > 1e-2


def test_strict_rows_are_the_modules_run_by_hand(tiny):
    model, x, _, strict = tiny
    block = model.res2[0]
    seen = {}
    block.register_forward_pre_hook(lambda m, i: seen.__setitem__("in", i[0].clone()))
    with torch.inference_mode():
        model.forward_features(x)
        a = block.branch2a(seen["in"])
        a_bn = block.branch2a_bn(a)
        stem_bn = model.res_conv1_bn(model.conv1(x))
        out = block(seen["in"])

    def mean(t):
        return t.mean(dim=(2, 3, 4)).numpy()

    assert (a_bn < 0).any()  # the BN output has negatives, which the in-place ReLU would zero
    assert rel_err(strict["res2.0.branch2a"], mean(a)) < 1e-6
    assert rel_err(strict["res2.0.branch2a_bn"], mean(a_bn)) < 1e-6
    assert rel_err(strict["res_conv1_bn"], mean(stem_bn)) < 1e-6
    # a module run three times (the block's ReLU) records its last run: the block's output
    assert rel_err(strict["res2.0.relu"], mean(out)) < 1e-6
    assert np.array_equal(strict["res2.0.relu"], strict["res2.0"])


def units_and_names(model, names):
    """The rewritten units in network order and the names inside each."""
    inner: dict[str, list[str]] = {}
    for name in names:
        unit = fuse.rewritten_unit(model, name)
        if unit is not None:
            inner.setdefault(unit, []).append(name)
    return inner


@pytest.mark.parametrize("mode", CPU_MODES)
def test_every_listed_layer_in_a_fast_mode_is_strict_within_its_bound(tiny, mode):
    if mode == "bf16" and not inference.cpu_bf16_supported():
        pytest.skip("this CPU has no bfloat16 units: bf16 is refused here (tested below)")
    model, x, names, strict = tiny
    inner = units_and_names(model, names)
    assert {fuse.STEM_UNIT, "res2.0", "res3.nonlocal_1", "res4.nonlocal_1"} <= set(inner)
    outer = [n for n in names if fuse.rewritten_unit(model, n) is None]
    fast = nl.prepare_for_inference(model, "cpu", mode)
    rows = LayerTaps(fast, outer)(x)  # blocks, stages, pools: what every rewrite keeps
    for inner_name in ("res2.0.branch2a", "res3.nonlocal_1.out", "conv1"):
        with pytest.raises(LayerError, match="record_layers"):
            LayerTaps(fast, [inner_name])  # a rewritten unit is never recorded as if it were
    units = list(inner)
    for half in (units[0::2], units[1::2]):  # each kept unit fed by a rewritten one
        recorded = [n for u in half for n in inner[u]]
        fast = nl.prepare_for_inference(model, "cpu", mode, record_layers=recorded)
        modules = dict(fast.named_modules())
        for unit in set(units) - {fuse.STEM_UNIT}:  # only the recorded units keep their norms
            norms = any(isinstance(m, SpatialBN | AffineNd) for m in modules[unit].modules())
            assert norms == (unit in half), unit
        rows.update(LayerTaps(fast, recorded)(x))
    assert set(rows) == set(names)
    errors = {name: rel_err(rows[name], strict[name]) for name in names}
    worst = max(errors, key=errors.get)
    assert errors[worst] < BOUNDS[mode], (worst, errors[worst])
    assert errors[worst] > 0  # the fast arithmetic ran (these are not strict's own rows)


def test_the_fast_path_is_unchanged_without_recorded_layers(tiny):
    model, x, _, _ = tiny
    fast = nl.prepare_for_inference(model, "cpu", "fp32")
    assert not any(isinstance(m, SpatialBN | AffineNd) for m in fast.modules())
    if fuse.cpu_pointwise_fusion_available():
        fused = sum(type(m) is fuse.FusedResidualBlock3d for m in fast.modules())
        assert fused == sum(isinstance(m, fuse.ResidualBlock3d) for m in model.modules())
    one = nl.prepare_for_inference(model, "cpu", "fp32", record_layers=["res4.2.branch2b_bn"])
    kept = [n for n, m in one.named_modules() if isinstance(m, SpatialBN)]
    assert kept == ["res4.2.branch2a_bn", "res4.2.branch2b_bn", "res4.2.branch2c_bn"]
    tap = FeatureTap(one, "res4.2.branch2b_bn")
    strict = FeatureTap(nl.prepare_for_inference(model, "cpu"), "res4.2.branch2b_bn")
    assert rel_err(tap(x), strict(x)) < BOUNDS["fp32"]


def test_a_grouped_nonlocal_block_records_one_row_per_clip():
    # the affine models attend within 4-frame windows in res3 (16 frames: 2 windows there)
    affine = ["MODEL.USE_AFFINE", "True", "NONLOCAL.USE_BN", "False", "NONLOCAL.USE_AFFINE", "True"]
    model = tiny_model([*affine, "TRAIN.VIDEO_LENGTH", "16"])
    block = model.res3.nonlocal_1
    assert block.group_size == 4
    x = clips(model, 1)
    names = [n for n in layer_names(model) if n.startswith("res3.nonlocal_1")]
    strict = LayerTaps(nl.prepare_for_inference(model, "cpu"), names)(x)
    seen = {}
    block.register_forward_pre_hook(lambda m, i: seen.__setitem__("in", i[0].clone()))
    with torch.inference_mode():
        model.forward_features(x)
        theta = block.theta(seen["in"])  # a 1x1 conv: its windows' mean is the clip's mean
    assert strict["res3.nonlocal_1.theta"].shape == (1, block.dim_inner)
    assert rel_err(strict["res3.nonlocal_1.theta"], theta.mean(dim=(2, 3, 4)).numpy()) < 1e-6
    fast = nl.prepare_for_inference(model, "cpu", "fp32", record_layers=names)
    rows = LayerTaps(fast, names)(x)
    for name in names:
        assert rel_err(rows[name], strict[name]) < BOUNDS["fp32"], name


def test_compile_records_only_pool5(tiny):
    model = tiny[0]
    check_layer(model, POOL5, "fp32", compile=True)
    for precision in ("strict", "fp32"):
        check_layer(model, "res2.0.branch2a", precision)
    with pytest.raises(LayerError) as refused:
        check_layer(model, "res2.0.branch2a", "fp32", compile=True)
    message = str(refused.value)
    assert "\n" not in message and "'res2.0.branch2a'" in message
    assert "strict, fp32, tf32, bf16, fp16 without --compile" in message
    with pytest.raises(LayerError, match="unknown layer 'dropout'"):
        check_layer(model, "dropout", "strict")


# --- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = small_cfg(["TEST.NUM_TEST_CLIPS", "3"])  # 1 clip x 3 crops a video
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", cfg)


def read_features(path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        data = f["features"] if "features" in f else f["views/features"]
        return data[()]


def extract(eval_videos, checkpoint, out, *options) -> int:
    from nonlocal_net.tools.extract_features import main

    args = ["--weights", checkpoint, "--list", eval_videos.list_file, "--output", out]
    args += ["--limit", "1", "--workers", "0", "--no-progress", *options]
    return main([str(a) for a in args])


@pytest.mark.parametrize(
    "layer",  # a bottleneck's conv (the 58% case), then a BN, the stem's BN, a non-local BN
    ["res2.0.branch2a"]
    + [
        pytest.param(name, marks=pytest.mark.slow)
        for name in ("res2.1.branch2b_bn", "res_conv1_bn", "res3.nonlocal_1.bn")
    ],
)
def test_vnl_extract_fp32_layer_rows_are_strict(eval_videos, checkpoint, tmp_path, layer):
    outs = {}
    for precision in ("strict", "fp32"):
        outs[precision] = tmp_path / f"{precision}.h5"
        options = ("--layer", layer, "--precision", precision)
        assert extract(eval_videos, checkpoint, outs[precision], *options) == 0
    strict, fast = read_features(outs["strict"]), read_features(outs["fp32"])
    assert strict.shape == fast.shape and len(strict)
    assert rel_err(fast, strict) < BOUNDS["fp32"]


def test_vnl_extract_refuses_unserved_modes_before_any_output(
    eval_videos, checkpoint, tmp_path, capsys
):
    out = tmp_path / "f.h5"
    refusals = [
        (["--layer", "res2.0.branch2a", "--precision", "fp32", "--compile"], "--compile"),
        (["--layer", "dropout"], "unknown layer 'dropout'"),
        (["--precision", "fp16"], "needs a CUDA GPU"),
        (["--precision", "tf32"], "needs a CUDA GPU"),
    ]
    if not inference.cpu_bf16_supported():
        refusals.append((["--precision", "bf16"], "bfloat16 units"))
    for options, expected in refusals:
        assert extract(eval_videos, checkpoint, out, *options) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("vnl-extract: error:")]
        assert len(lines) == 1 and "Traceback" not in err and expected in lines[0], err
        assert list(tmp_path.iterdir()) == [], options  # no output, parts or lock left


def test_a_failing_operator_refuses_the_mode_in_one_line(tiny, monkeypatch):
    # what bf16 on the CPU did before pool5 was pooled in float32: the probe now catches it
    model = tiny[0]
    if not inference.cpu_bf16_supported():
        monkeypatch.setattr(inference, "cpu_bf16_supported", lambda: True)
    fast = nl.prepare_for_inference(model, "cpu", "bf16")
    assert isinstance(fast.pool5[0], fuse.CastTo)  # the float32 pool5 of the CPU
    fast.pool5 = fast.pool5[1]  # pool5 back in bfloat16
    with pytest.raises(inference.PrecisionError) as refused:
        inference.probe(fast, torch.device("cpu"), "bf16")
    message = str(refused.value)
    assert "\n" not in message and "avg_pool3d" in message and "use fp32" in message


def test_vnl_test_refuses_a_mode_whose_probe_fails_before_any_output(
    eval_videos, checkpoint, tmp_path, monkeypatch, capsys
):
    from nonlocal_net.tools.test_net_video import main

    real = torch.nn.MaxPool3d.forward

    def no_fp32_maxpool(self, x):  # an operator this "device" lacks in the fast mode's dtype
        if x.dtype == torch.float32:
            raise NotImplementedError('"max_pool3d" not implemented for this device (test)')
        return real(self, x)

    monkeypatch.setattr(torch.nn.MaxPool3d, "forward", no_fp32_maxpool)
    results = tmp_path / "r.h5"
    args = ["--weights", checkpoint, "--list", eval_videos.list_file, "--results", results]
    args += ["--limit", "2", "--workers", "0", "--no-progress", "--precision", "fp32"]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("vnl-test: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "precision fp32 cannot run this network" in lines[0] and "max_pool3d" in lines[0]
    assert "use strict" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


@pytest.mark.skipif(not inference.cpu_bf16_supported(), reason="this CPU has no bf16 units")
def test_vnl_extract_bf16_runs_on_a_cpu_with_bf16_units(eval_videos, checkpoint, tmp_path):
    outs = {p: tmp_path / f"{p}.h5" for p in ("strict", "bf16")}
    for precision, out in outs.items():
        assert extract(eval_videos, checkpoint, out, "--precision", precision) == 0
    strict, fast = read_features(outs["strict"]), read_features(outs["bf16"])
    assert strict.shape == fast.shape and len(strict)
    assert rel_err(fast, strict) < BOUNDS["bf16"]
    assert not list(Path(tmp_path).glob("*.parts"))
