"""The non-local block against a direct re-statement of the spec's formulas (section 4.5, 4.6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nonlocal_net.models.layers import AffineNd, SpatialBN
from nonlocal_net.models.nonlocal_helper import NonLocalBlock


@pytest.fixture(autouse=True)
def _float64():
    """Exact comparisons without fp32 noise."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _conv1x1(x, w, b):
    """A 1x1x1 conv written as a sum over input channels, position by position."""
    y = torch.einsum("oc,nc...->no...", w.reshape(w.shape[0], w.shape[1]), x)
    return y if b is None else y + b.view(1, -1, *([1] * (x.dim() - 2)))


def _reference(block: NonLocalBlock, x: torch.Tensor, softmax=True, scale=True, maxpool=True):
    """Spec 4.5 step by step, with explicit loops over the batch."""
    outs = []
    for n in range(x.shape[0]):
        xn = x[n : n + 1]
        c = block.dim_inner
        theta = _conv1x1(xn, block.theta.weight, block.theta.bias)[0].reshape(c, -1)  # (C', N)
        xp = xn
        if maxpool:
            t, h, w = xn.shape[2:]
            xp = xn[..., : h // 2 * 2, : w // 2 * 2].reshape(1, -1, t, h // 2, 2, w // 2, 2)
            xp = xp.amax(dim=(4, 6))
        phi = _conv1x1(xp, block.phi.weight, block.phi.bias)[0].reshape(c, -1)  # (C', M)
        g = _conv1x1(xp, block.g.weight, block.g.bias)[0].reshape(c, -1)
        a = torch.zeros(theta.shape[1], phi.shape[1])
        for i in range(theta.shape[1]):
            a[i] = (theta[:, i : i + 1] * phi).sum(0)
        if softmax:
            if scale:
                a = a * float(np.float32(c**-0.5))  # Caffe2 Scale: a float32 argument
            p = torch.exp(a - a.max(1, keepdim=True).values)
            p = p / p.sum(1, keepdim=True)
        else:
            p = a / phi.shape[1]
        y = torch.stack([(g * p[i]).sum(1) for i in range(theta.shape[1])], dim=1)  # (C', N)
        z = _conv1x1(y.reshape(1, c, *xn.shape[2:]), block.out.weight, block.out.bias)
        if isinstance(block.bn, SpatialBN):
            bn = block.bn
            z = (z - bn.running_mean.view(1, -1, 1, 1, 1)) / torch.sqrt(
                bn.running_var.view(1, -1, 1, 1, 1) + bn.eps
            ) * bn.weight.view(1, -1, 1, 1, 1) + bn.bias.view(1, -1, 1, 1, 1)
        elif isinstance(block.bn, AffineNd):
            z = z * block.bn.weight.view(1, -1, 1, 1, 1) + block.bn.bias.view(1, -1, 1, 1, 1)
        outs.append(xn + z)  # residual sum, no ReLU
    return torch.cat(outs)


def _randomise(block: NonLocalBlock, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in block.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return block.eval()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(use_scale=False),
        dict(use_softmax=False),
        dict(use_maxpool=False),
        dict(bias=False),
        dict(use_bn=False),
        dict(use_bn=False, use_affine=True),
    ],
)
def test_block_matches_the_formulas(kwargs):
    block = _randomise(NonLocalBlock(16, 8, **kwargs))
    x = torch.randn(2, 16, 3, 6, 5)  # odd width: the max pool floors 5 -> 2
    ref = _reference(
        block,
        x,
        softmax=kwargs.get("use_softmax", True),
        scale=kwargs.get("use_scale", True),
        maxpool=kwargs.get("use_maxpool", True),
    )
    torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-12)


def test_swapping_theta_and_phi_changes_the_output():
    # theta sees the full-resolution input, phi the pooled one: not symmetric
    block = _randomise(NonLocalBlock(16, 8))
    x = torch.randn(1, 16, 2, 4, 4)
    out = block(x)
    with torch.no_grad():
        tw, pw = block.theta.weight.clone(), block.phi.weight.clone()
        block.theta.weight.copy_(pw)
        block.phi.weight.copy_(tw)
    assert not torch.allclose(block(x), out)


def test_grouped_block_attends_within_four_frame_windows():
    block = _randomise(NonLocalBlock(16, 8, use_bn=False, group_size=4))
    x = torch.randn(2, 16, 12, 4, 4)
    got = block(x)
    block.group_size = None
    windows = [block(x[:, :, k : k + 4]) for k in range(0, 12, 4)]
    torch.testing.assert_close(got, torch.cat(windows, dim=2), rtol=1e-12, atol=1e-12)
    # and it is not global attention
    assert not torch.allclose(got, block(x))
    block.group_size = 4
    with pytest.raises(ValueError, match="not a multiple of the group size 4"):
        block(torch.randn(1, 16, 6, 4, 4))


def test_initialisation_is_the_originals():
    torch.manual_seed(0)
    block = NonLocalBlock(1024, 512)
    for conv in (block.theta, block.phi, block.g, block.out):
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.02)
        assert torch.count_nonzero(conv.bias) == 0
    assert isinstance(block.bn, SpatialBN)
    assert torch.all(block.bn.weight == 0) and torch.all(block.bn.running_var == 1)
    x = torch.randn(1, 1024, 2, 4, 4)
    block.eval()
    torch.testing.assert_close(block(x), x)  # gamma 0: a new block is the identity
    zero = NonLocalBlock(64, 32, use_bn=False, zero_init_out=True)
    assert torch.count_nonzero(zero.out.weight) == 0
    torch.testing.assert_close(zero(torch.ones(1, 64, 1, 2, 2)), torch.ones(1, 64, 1, 2, 2))
