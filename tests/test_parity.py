"""The parity suite: the converted PyTorch model against the original network, layer by layer.

For every distinct released network (``parity_cases.CASES``: the 15 zoo entries, those with an
identical network merged, and the ResNet-101 recipes arc 3 and 4) and both heads at the real
input sizes, a Caffe2 checkpoint with realistic random blobs is written, read and converted by the
converter, and every layer output of the port in float32 and float64 is compared with the
reference executor's float64 run on the checkpoint's own blobs. Every layer must be within
``FP32_BOUND`` / ``FP64_BOUND`` (measured values in ``benchmarks/parity.md``).

The default run covers ``parity_cases.DEFAULT_RUNS`` (each architecture file, C2D and I3D,
non-local with BN, frozen affine with the grouped non-local, ResNet-101, both heads); the other
rows are marked ``parity_full`` and run with ``--parity-full`` (``make test-parity-full``).
"""

from __future__ import annotations

import numpy as np
import pytest
from blob_inventory import STAGE_BLOCKS, nonlocal_indices
from parity_cases import (
    CASES,
    DEFAULT_RUNS,
    FP32_BOUND,
    FP64_BOUND,
    SMALL,
    SPLITS,
    architecture_key,
    run_case,
)

import nonlocal_net as nl
from nonlocal_net.reference import build_graph, run
from nonlocal_net.verify import random_clip


def _expected_labels(case) -> list[str]:
    """The layers a full comparison must cover, from the specification's inventory (not from
    the graph the comparison walks): stem, pool1, res2, pool2, res3-res5 with their non-local
    blocks, pool5 and the head."""
    arch = case.arch()
    nl3, nl4 = nonlocal_indices(arch)
    labels = ["res_conv1_bn", "pool1"]
    for stage, blocks in zip((2, 3, 4, 5), STAGE_BLOCKS[arch.depth]):
        for i in range(blocks):
            labels.append(f"res{stage}_{i}")
            if (stage, i) in {(3, j) for j in nl3} | {(4, j) for j in nl4}:
                labels.append(f"nonlocal_conv{stage}_{i}")
        if stage == 2:
            labels.append("pool2")
    return [*labels, "pool5", "pred", "softmax"]


def _runs():
    for name in CASES:
        for split in SPLITS:
            marks = [pytest.mark.slow]
            if split not in DEFAULT_RUNS.get(name, ()):
                marks.append(pytest.mark.parity_full)
            yield pytest.param(name, split, marks=marks, id=f"{name}-{split}")


@pytest.mark.parametrize("name, split", list(_runs()))
def test_port_matches_the_original_layer_by_layer(name, split, tmp_path):
    case = CASES[name]
    result = run_case(case, split, workdir=tmp_path)
    report = result.report
    cfg = case.cfg()
    crop = 256 if split == "test" else 224
    assert report.input_shape == (1, 3, cfg.TRAIN.VIDEO_LENGTH, crop, crop)
    assert report.labels == _expected_labels(case)
    table = report.format_table()
    for r in report.runs:
        for layer in r.layers:
            assert layer.port_shape == layer.shape and not layer.note, (layer, table)
    fp32, fp64 = report.run("float32"), report.run("float64")
    assert fp32.max_rel <= FP32_BOUND, f"{report.verdict()}\n{table}"
    assert fp64.max_rel <= FP64_BOUND, f"{report.verdict()}\n{table}"
    assert report.ok and report.first_failure is None


def test_the_cases_cover_every_released_model_once():
    members = [m for case in CASES.values() for m in case.members]
    assert sorted(members) == sorted(nl.list_models())
    assert len(CASES) == 14  # 12 distinct released networks + R101 arc 3 and arc 4
    for name, splits in DEFAULT_RUNS.items():
        assert name in CASES and set(splits) <= set(SPLITS)


MERGED = [case for case in CASES.values() if len(case.members) > 1]


@pytest.mark.parametrize("case", MERGED, ids=[case.name for case in MERGED])
def test_merged_zoo_entries_build_the_same_network(case):
    """Entries merged into one case (the i3d_baseline_8x8 schedules) have the same effective
    model configuration, the same PyTorch modules and the same original graph."""
    cfgs = [nl.get_cfg(m) for m in case.members]
    assert len({architecture_key(c) for c in cfgs}) == 1
    for split in SPLITS:
        models = [nl.build_model(c, split) for c in cfgs]
        assert len({repr(m) for m in models}) == 1
        shapes = {tuple((k, tuple(v.shape)) for k, v in m.state_dict().items()) for m in models}
        assert len(shapes) == 1
        graphs = [build_graph(c, split, batch_size=1) for c in cfgs]
        assert all(g.ops == graphs[0].ops for g in graphs)


def test_synthetic_blobs_are_realistic(small_checkpoint):
    """What makes the suite meaningful, checked on the small case's checkpoint with the
    reference: BN running statistics that are not the batch statistics, non-local branches that
    contribute and attend by content (not uniformly, not saturated), and outputs that depend on
    the input."""
    _, blobs = small_checkpoint
    cfg = SMALL.cfg()
    graph = build_graph(cfg, "val")
    clips = random_clip(cfg, batch=2, split="val", seed=5)
    prob = "nonlocal_conv3_1_affinity_prob"
    out = run(graph, blobs, clips, keep=["conv1", "res3_1", "nonlocal_conv3_1", prob, "pool5"])
    # BN statistics: the batch's per-channel variance is not the running variance
    conv1 = out["conv1"]
    batch_var = conv1.var(axis=(0, 2, 3, 4))
    ratio = batch_var / blobs["res_conv1_bn_riv"]
    assert np.mean(np.abs(np.log(ratio)) > np.log(1.2)) > 0.5
    # the non-local branch contributes ~10% of its block's output
    x, y = out["res3_1"], out["nonlocal_conv3_1"]
    assert 0.03 < np.linalg.norm(y - x) / np.linalg.norm(x) < 0.5
    # attention by content: a position's best match gets far more than 1/M, but not everything
    p = out[prob]
    best = p.max(axis=-1).mean()
    assert 10 / p.shape[-1] < best < 0.9
    # the network's output depends on its input
    a, b = out["pool5"][0], out["pool5"][1]
    assert np.abs(a - b).max() / np.abs(a).max() > 0.01
    # and the classifier's softmax is not saturated
    assert out["softmax"].max() < 0.9
