"""Precise BN equals the original's formula on recorded per-batch statistics.

The batch statistics are recorded here independently of the implementation: with PyTorch's own
BN machinery (momentum 1: after a training-mode forward, ``running_mean`` is the batch mean and
``running_var`` the *unbiased* batch variance, converted back to the biased one BN normalises
with). The original's formula is then ``rm = mean_b(m_b)``, ``riv = mean_b(v_b + m_b^2) - rm^2``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import nonlocal_net as nl
from nonlocal_net.engine.bn_helper import BatchNormHelper, PreciseBNError, compute_precise_bn
from nonlocal_net.models.layers import AffineNd, SpatialBN

SMALL = [
    "RESNETS.WIDTH_PER_GROUP",
    "4",
    "MODEL.NUM_CLASSES",
    "5",
    "TRAIN.VIDEO_LENGTH",
    "2",
    "TRAIN.BATCH_SIZE",
    "16",
    "NUM_GPUS",
    "16",  # per-GPU BN batches of 1 clip: the single-clip batches below are whole groups
]


def _model(zoo="i3d_nonlocal_8x8_IN_pretrain_400k"):
    torch.manual_seed(0)
    model = nl.build_model(nl.get_cfg(zoo, SMALL), split="train")
    with torch.no_grad():  # trained-like: non-zero gammas everywhere, so every BN sees signal
        for m in model.modules():
            if isinstance(m, SpatialBN):
                m.weight.uniform_(0.5, 1.0)
                m.bias.normal_(0.0, 0.1)
    return model


def _batches(n, size=1):
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(size, 3, 2, 224, 224, generator=g) * 0.8 + 0.3, torch.zeros(size))
        for _ in range(n)
    ]


def _record_batch_stats(model, batches):
    """Per layer, the list of (batch mean, biased batch variance) of every batch."""
    rec = copy.deepcopy(model)
    bns = {n: m for n, m in rec.named_modules() if isinstance(m, SpatialBN)}
    counts = {}

    def count_hook(name):
        def hook(module, args):
            x = args[0]
            counts[name] = x.numel() // x.shape[1]

        return hook

    for name, m in bns.items():
        m.momentum = 1.0
        m.register_forward_pre_hook(count_hook(name))
    rec.train()
    stats = {n: [] for n in bns}
    with torch.no_grad():
        for clips, _ in batches:
            rec(clips)
            for n, m in bns.items():
                k = counts[n]
                unbiased = m.running_var.double().numpy()
                stats[n].append((m.running_mean.double().numpy(), unbiased * (k - 1) / k))
    return stats


def test_precise_bn_equals_the_formula_on_recorded_batch_statistics():
    model = _model()
    batches = _batches(2)
    stats = _record_batch_stats(model, batches)
    params_before = {k: v.clone() for k, v in model.named_parameters()}
    model.eval()

    assert compute_precise_bn(model, iter(batches), num_iters=2) == 2

    bns = {n: m for n, m in model.named_modules() if isinstance(m, SpatialBN)}
    assert any("nonlocal" in n for n in bns)  # non-local BNs are included
    for name, m in bns.items():
        means = np.stack([s[0] for s in stats[name]])
        ex2 = np.stack([s[1] + s[0] ** 2 for s in stats[name]])
        rm = means.mean(axis=0)
        riv = ex2.mean(axis=0) - rm**2
        np.testing.assert_allclose(m.running_mean.numpy(), rm, rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(m.running_var.numpy(), riv, rtol=1e-4, atol=1e-6, err_msg=name)
        # population statistics, not the last batch's and not the unbiased average
        assert not np.allclose(m.running_var.numpy(), stats[name][-1][1], rtol=1e-3)
    assert not model.training  # mode restored
    for k, v in model.named_parameters():
        assert torch.equal(v, params_before[k]), k


def test_only_num_iters_batches_are_used_and_helper_caches_per_iteration():
    model = _model()
    batches = _batches(2)
    helper = BatchNormHelper(num_iters=1)
    helper.compute_and_update_bn_stats(model, iter(batches), curr_iter=9)
    first = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    stats = _record_batch_stats(model, batches[:1])
    name, m = next((n, m) for n, m in model.named_modules() if isinstance(m, SpatialBN))
    rm = np.mean([s[0] for s in stats[name]], axis=0)
    np.testing.assert_allclose(m.running_mean.numpy(), rm, rtol=1e-4, atol=1e-6)
    # the same iteration again: no new batches consumed, the cached statistics re-applied
    with torch.no_grad():
        m.running_mean.zero_()

    def no_batches():
        raise AssertionError("batches consumed although the iteration's stats are cached")
        yield

    helper.compute_and_update_bn_stats(model, no_batches(), curr_iter=9)
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, first[k]), k


def test_affine_model_is_untouched_and_errors_keep_the_statistics():
    affine = _model("i3d_baseline_32x4_I3D_pretrain_400k")
    assert not any(isinstance(m, SpatialBN) for m in affine.modules())
    assert any(isinstance(m, AffineNd) for m in affine.modules())
    state = {k: v.clone() for k, v in affine.state_dict().items()}
    assert compute_precise_bn(affine, iter(_batches(1)), 1) == 0
    for k, v in affine.state_dict().items():
        assert torch.equal(v, state[k])

    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PreciseBNError, match="no batch"):
        compute_precise_bn(model, iter([]), 5)
    # a zero conv1: zero variance in the first BN -> refused like the original's assertion
    with torch.no_grad():
        model.conv1.weight.zero_()
    before["conv1.weight"] = model.conv1.weight.clone()
    with pytest.raises(PreciseBNError, match="res_conv1_bn"):
        compute_precise_bn(model, iter(_batches(1)), 1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
