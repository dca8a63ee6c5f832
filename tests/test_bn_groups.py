"""Per-GPU BN inside the train-split model: every consecutive group of ``TRAIN.BATCH_SIZE //
NUM_GPUS`` clips is normalised with its own statistics, in every SpatialBN (stem, bottlenecks,
non-local), in one forward; precise BN counts every group as one of the original's GPU batches.

The independent computations here are the same network run on each group on its own with
whole-batch BN (``bn_group_size = None``: one of the original's GPUs), and the original's
precise-BN formula on statistics recorded that way.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import nonlocal_net as nl
from nonlocal_net.engine.bn_helper import compute_precise_bn
from nonlocal_net.models.layers import SpatialBN, set_bn_group_size
from nonlocal_net.models.nonlocal_helper import NonLocalBlock

NL8 = "i3d_nonlocal_8x8_IN_pretrain_400k"
# a narrow network, 2-frame clips, global batch 4 = NUM_GPUS 2 x 2 clips (groups of 2)
SMALL = [
    "RESNETS.WIDTH_PER_GROUP", "4", "MODEL.NUM_CLASSES", "5", "TRAIN.VIDEO_LENGTH", "2",
    "TRAIN.BATCH_SIZE", "4", "NUM_GPUS", "2", "TRAIN.DROPOUT_RATE", "0.0",
]  # fmt: skip


def _trained_like(model):
    """Non-zero gammas and biases everywhere (a fresh model's zero-gamma branches hide bugs)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SpatialBN):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _model(num_gpus=2, batch=4):
    torch.manual_seed(0)
    overrides = [*SMALL, "NUM_GPUS", str(num_gpus), "TRAIN.BATCH_SIZE", str(batch)]
    return _trained_like(nl.build_model(NL8, split="train", overrides=overrides))


def _clips(n, seed=5, size=224):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 2, size, size, generator=g) * 0.8 + 0.2


def _bn_outputs_with_second_half_times_ten(model, x):
    """Run ``model`` on ``x`` with every SpatialBN's input replaced by ``[a, 10 a]`` (``a``
    random, of the input's half shape: a unit variance, far above the BN epsilon); returns each
    layer's output."""
    outputs, handles = {}, []
    g = torch.Generator().manual_seed(9)
    for name, m in model.named_modules():
        if not isinstance(m, SpatialBN):
            continue

        def pre(module, args):
            half = args[0][: args[0].shape[0] // 2]
            a = torch.randn(half.shape, generator=g, dtype=half.dtype) + 0.5
            return (torch.cat([a, a * 10]),)

        def post(module, args, out, name=name):
            outputs[name] = out.detach().clone()

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outputs


def _check_halves(two, one, x, names):
    grouped = _bn_outputs_with_second_half_times_ten(two, x)
    whole = _bn_outputs_with_second_half_times_ten(one, x)
    assert set(grouped) == names
    half = x.shape[0] // 2
    for name in names:
        out = grouped[name]
        torch.testing.assert_close(out[half:], out[:half], rtol=1e-4, atol=1e-5, msg=name)
        other = whole[name]
        assert (other[half:] - other[:half]).abs().max() > 0.1, name  # statistics of all clips


def test_two_groups_give_both_halves_the_same_output_conv_and_nonlocal_bn():
    names = {"1", "3.bn"}  # a conv's BN and a non-local block's BN
    _check_halves(_tiny_net(2), _tiny_net(4), torch.randn(4, 3, 2, 6, 6).double(), names)


@pytest.mark.slow
def test_two_groups_give_both_halves_the_same_output_in_every_bn_of_the_network():
    two = _model(num_gpus=4)  # groups of 1 clip: the halves of a batch of 2
    one = _model(num_gpus=2)  # groups of 2 clips: the batch of 2 is one group
    names = {n for n, m in two.named_modules() if isinstance(m, SpatialBN)}
    assert any("nonlocal" in n for n in names) and "res_conv1_bn" in names
    assert all(m.bn_group_size == 1 for m in two.modules() if isinstance(m, SpatialBN))
    _check_halves(two, one, _clips(2), names)


def _check_groups_alone(model, x, rtol, atol):
    """``model`` (groups of half the batch) on ``x`` equals a whole-batch copy on each half
    alone; its running statistics are the first half's; gradients reach every parameter."""
    alone = copy.deepcopy(model)
    set_bn_group_size(alone, None)  # whole-batch BN: one of the original's GPUs
    first = copy.deepcopy(alone)
    half = x.shape[0] // 2
    y = model(x)
    torch.testing.assert_close(y[:half], first(x[:half]), rtol=rtol, atol=atol)
    torch.testing.assert_close(y[half:], alone(x[half:]), rtol=rtol, atol=atol)
    # the running statistics are the first group's (gpu_0's, as the original saves)
    state, ref = model.state_dict(), first.state_dict()
    changed = 0
    for key in state:
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(state[key], ref[key], rtol=rtol, atol=atol, msg=key)
            changed += not torch.equal(state[key], alone.state_dict()[key])
    assert changed
    y.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grouped_forward_equals_each_group_on_its_own():
    _check_groups_alone(_tiny_net(2), torch.randn(4, 3, 2, 6, 6).double(), 1e-10, 1e-12)


@pytest.mark.slow
def test_grouped_forward_of_the_network_equals_each_group_on_its_own():
    model = _model(num_gpus=4).double()  # float64: only the summation order differs
    _check_groups_alone(model, _clips(2).double(), 1e-9, 1e-11)
    assert model.res_conv1_bn.bn_group_size == 1


def test_grouped_nonlocal_block_groups_clips_not_windows():
    """A non-local block attending within 4-frame windows puts the windows of a clip into the
    batch; its BN groups must still be whole clips (here 2 windows x 2 clips per group)."""
    torch.manual_seed(1)
    block = NonLocalBlock(8, 4, group_size=4, bn_init_gamma=0.7, conv_init_std=0.2)
    block.train()
    set_bn_group_size(block, 2)
    alone = copy.deepcopy(block)
    set_bn_group_size(alone, None)
    x = torch.randn(4, 8, 8, 4, 4)
    y = block(x)
    assert block.bn.samples_per_clip == 2
    torch.testing.assert_close(y[:2], copy.deepcopy(alone)(x[:2]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y[2:], alone(x[2:]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"a batch of 3 clips is not a multiple of .* size 2"):
        block(torch.randn(3, 8, 8, 4, 4))


def test_nonlocal_bn_normalises_each_group_on_its_own():
    model = _model(num_gpus=2)
    bn = model.res3.nonlocal_1.bn
    assert isinstance(bn, SpatialBN) and bn.bn_group_size == 2
    z = torch.randn(2, bn.num_features, 1, 14, 14)
    with torch.no_grad():
        out = bn(torch.cat([z, z * 10]))
    torch.testing.assert_close(out[2:], out[:2], rtol=1e-4, atol=1e-5)
    set_bn_group_size(model, 4)
    with torch.no_grad():
        out = bn(torch.cat([z, z * 10]))
    assert (out[2:] - out[:2]).abs().max() > 0.1


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_batch_not_a_multiple_of_the_group_size_is_refused(batch):
    model = _model(num_gpus=2)
    with pytest.raises(ValueError, match=rf"a batch of {batch} clips .* group size 2"):
        model(_clips(batch))


def test_eval_mode_is_unchanged():
    train = _model(num_gpus=2)
    train.eval()
    val = nl.build_model(NL8, split="val", overrides=SMALL)
    val.load_state_dict(train.state_dict())
    assert all(m.bn_group_size is None for m in val.modules() if isinstance(m, SpatialBN))
    x = _clips(1)  # any batch in eval mode
    with torch.no_grad():
        assert torch.equal(train(x), val(x))
    # the test split and val split are never grouped, also when put in training mode
    test = nl.build_model(NL8, split="test", overrides=SMALL)
    assert all(m.bn_group_size is None for m in test.modules() if isinstance(m, SpatialBN))


def _recorded_group_statistics(model, batches):
    """Per layer, (mean, biased var) of every group of every batch, recorded by running a
    whole-batch copy on each group alone with momentum 1 (PyTorch's own BN machinery)."""
    rec = copy.deepcopy(model)
    group = next(m.bn_group_size for m in rec.modules() if isinstance(m, SpatialBN))
    set_bn_group_size(rec, None)
    bns = {n: m for n, m in rec.named_modules() if isinstance(m, SpatialBN)}
    counts = {}
    for name, m in bns.items():
        m.momentum = 1.0

        def hook(module, args, name=name):
            counts[name] = args[0].numel() // args[0].shape[1]

        m.register_forward_pre_hook(hook)
    rec.train()
    stats = {n: [] for n in bns}
    with torch.no_grad():
        for clips in batches:
            for start in range(0, clips.shape[0], group):
                rec(clips[start : start + group])
                for n, m in bns.items():
                    k = counts[n]
                    var = m.running_var.double().numpy() * (k - 1) / k
                    stats[n].append((m.running_mean.double().numpy().copy(), var))
    return stats


def _tiny_net(group):
    """Conv, SpatialBN, ReLU and a non-local block with its BN: every kind of BN input, cheap."""
    torch.manual_seed(2)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(3, 8, 3, padding=1),
        SpatialBN(8),
        torch.nn.ReLU(),
        NonLocalBlock(8, 4, bn_init_gamma=0.7, conv_init_std=0.2),
    )
    set_bn_group_size(net, group)
    return _trained_like(net).double()


def _check_precise_bn_per_group(model, whole, batches, groups_per_batch, rtol, atol):
    stats = _recorded_group_statistics(model, batches)
    assert compute_precise_bn(model, iter(batches), num_iters=len(batches)) == len(batches)
    compute_precise_bn(whole, iter(batches), num_iters=len(batches))
    differ = 0
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SpatialBN)}
    assert any("bn" in n and "." in n for n in layers)  # the non-local BN is one of them
    for name, m in layers.items():
        means = np.stack([s[0] for s in stats[name]])
        assert len(means) == len(batches) * groups_per_batch
        ex2 = np.stack([s[1] + s[0] ** 2 for s in stats[name]])
        rm = means.mean(axis=0)
        riv = ex2.mean(axis=0) - rm**2
        got_mean, got_var = m.running_mean.double().numpy(), m.running_var.double().numpy()
        np.testing.assert_allclose(got_mean, rm, rtol=rtol, atol=atol, err_msg=name)
        np.testing.assert_allclose(got_var, riv, rtol=rtol, atol=atol, err_msg=name)
        other = dict(whole.named_modules())[name]
        differ += not np.allclose(other.running_var.double().numpy(), riv, rtol=1e-3)
    assert differ > 0  # per-group statistics are not those of whole batches


def test_precise_bn_over_groups_equals_the_original_formula_per_group():
    """2 batches of 3 groups of 2 clips: 6 per-GPU batches, averaged as the original's
    ``_finalize_bn_stats`` (divided by ITER_COMPUTE_PRECISE_BN x NUM_GPUS)."""
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(6, 3, 2, 6, 6, generator=g, dtype=torch.float64) * s for s in (1, 3)]
    for i, b in enumerate(batches):
        b[2 * i : 2 * i + 2] += 2.0  # groups of different statistics
    _check_precise_bn_per_group(_tiny_net(2), _tiny_net(None), batches, 3, 1e-10, 1e-12)


@pytest.mark.slow
def test_precise_bn_over_groups_in_the_network():
    model = _model(num_gpus=4, batch=4).double()  # groups of 1 clip
    whole = _model(num_gpus=2, batch=4).double()  # the same batches as one group each
    batches = [_clips(2, seed=s).double() for s in (11, 12)]
    _check_precise_bn_per_group(model, whole, batches, 2, 1e-9, 1e-11)
