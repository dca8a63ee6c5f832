"""The fast inference path (precision modes): fidelity to strict, and mutations it would expose.

Models carry trained-like synthetic weights (non-zero BN statistics, non-local branches that
contribute): a broken fold or stem changes their outputs far beyond the fp32 bound. Clips are
224x224 (the smallest the pool5 of either head accepts) with TRAIN.VIDEO_LENGTH shortened.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.profiler import profile

import nonlocal_net as nl
from nonlocal_net.converters.synthetic import load_synthetic_weights
from nonlocal_net.engine import inference
from nonlocal_net.models import fuse
from nonlocal_net.models.layers import AffineNd, SpatialBN
from nonlocal_net.models.nonlocal_helper import NonLocalBlock

FP32_BOUND = 1e-5  # the documented bound of precision fp32 vs strict (max abs diff / max abs)

# (zoo name, TRAIN.VIDEO_LENGTH, frames fed): the res5 temporal size covers the pool5 kernel
MODELS = {
    "i3d_nl": ("i3d_nonlocal_8x8_IN_pretrain_400k", "4", 4),
    "c2d_nl": ("c2d_nonlocal_32x2_IN_pretrain_400k", "8", 8),
}


def small_model(key: str, split: str) -> nn.Module:
    name, length, _ = MODELS[key]
    model = nl.build_model(name, split=split, overrides=["TRAIN.VIDEO_LENGTH", length])
    return load_synthetic_weights(model.eval(), seed=1)


def clips(key: str, batch: int = 2) -> torch.Tensor:
    frames = MODELS[key][2]
    return torch.randn(batch, 3, frames, 224, 224, generator=torch.Generator().manual_seed(2))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x).float()


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize(
    "key",
    ["c2d_nl", pytest.param("i3d_nl", marks=pytest.mark.slow)],  # I3D: ~30 s on 2 cores
)
def test_fp32_fast_path_within_bound_of_strict(key, split):
    model = small_model(key, split)
    x = clips(key)
    fast = nl.prepare_for_inference(model, "cpu", "fp32")
    assert fast is not model and fast.inference_precision == "fp32"
    assert not any(isinstance(m, (SpatialBN, AffineNd)) for m in fast.modules())
    strict = nl.prepare_for_inference(model, "cpu")
    assert strict is model  # strict is today's path, in place
    ref = run(strict, x)
    out = run(fast, x)
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    assert err < FP32_BOUND, err
    # the output depends on the input (the comparison is not between two constants)
    assert rel_err(run(fast, x.flip(0)), ref) > 1e-3


def test_strict_leaves_the_original_modules():
    model = small_model("c2d_nl", "val")
    strict = nl.prepare_for_inference(model, "cpu", "strict")
    assert any(isinstance(m, SpatialBN) for m in strict.modules())
    assert all(type(m) is not fuse.RoutedConv3d for m in strict.modules())


@pytest.mark.parametrize("norm_kind", ["bn", "affine"])
def test_folded_conv_is_exact_in_float64(norm_kind):
    torch.manual_seed(0)
    conv = nn.Conv3d(6, 5, (3, 3, 3), padding=1, bias=False).double()
    if norm_kind == "bn":
        norm = SpatialBN(5).double().eval()
        norm.running_var.uniform_(0.5, 2.0)
        norm.running_mean.normal_(0, 0.3)
    else:
        norm = AffineNd(5).double()
        norm.weight.uniform_(0.5, 1.5)
    norm.weight.data.uniform_(0.5, 1.5)
    norm.bias.data.normal_(0, 0.2)
    x = torch.randn(2, 6, 4, 5, 5, dtype=torch.float64)
    fused = fuse.folded_conv(conv, norm).double()
    assert rel_err(fused(x), norm(conv(x))) < 1e-12


GOOD_FOLD = fuse.folded_conv


def broken_fold(conv, norm):
    """A fold that forgets the running mean (a plausible bug)."""
    fused = GOOD_FOLD(conv, norm)
    if isinstance(norm, SpatialBN):
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        with torch.no_grad():
            fused.bias.add_(norm.running_mean * scale)
    return fused


def broken_fold_riv(conv, norm):
    """A fold that divides by the variance instead of its square root (Caffe2's ``_riv`` trap)."""
    fused = GOOD_FOLD(conv, norm)
    if isinstance(norm, SpatialBN):
        with torch.no_grad():
            fused.weight.div_(torch.sqrt(norm.running_var + norm.eps).view(-1, 1, 1, 1, 1))
    return fused


@pytest.mark.parametrize("mutant", [broken_fold, broken_fold_riv])
def test_a_broken_fold_exceeds_the_bound(monkeypatch, mutant):
    model = small_model("c2d_nl", "val")
    x = clips("c2d_nl", 1)
    ref = run(nl.prepare_for_inference(model, "cpu"), x)
    monkeypatch.setattr(fuse, "folded_conv", mutant)
    err = rel_err(run(nl.prepare_for_inference(model, "cpu", "fp32"), x), ref)
    assert err > 100 * FP32_BOUND, err


def stem_pair() -> tuple[nn.Conv3d, torch.Tensor]:
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 16, (5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=True)
    return conv, torch.randn(2, 3, 4, 20, 20)


def test_padded_stem_equals_the_stem_in_fp32():
    conv, x = stem_pair()
    padded = fuse.PaddedStem(conv)
    assert padded.conv.in_channels == 8
    assert rel_err(padded(x), conv(x)) < 1e-6


def test_padded_stem_equals_the_stem_in_bf16():
    # bfloat16 convs run on any CPU (slowly without bf16 units): the padding adds exact zeros
    conv, x = stem_pair()
    conv = conv.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    ref = conv(xb).float()
    assert rel_err(fuse.PaddedStem(conv)(xb).float(), ref) < 1e-2  # bf16 accumulation order


def test_a_stem_padded_with_nonzero_weights_is_caught():
    conv, x = stem_pair()
    padded = fuse.PaddedStem(conv)
    with torch.no_grad():
        padded.conv.weight[:, 3:].fill_(0.01)

    class OnesPad(nn.Module):  # a stem that pads with ones instead of zeros
        def forward(self, y):
            ones = torch.ones_like(y[:, :1]).expand(-1, padded.extra, -1, -1, -1)
            return padded.conv(torch.cat([y, ones], 1))

    assert rel_err(OnesPad()(x), conv(x)) > 1e-3


@pytest.mark.parametrize("softmax", [True, False])
def test_sdpa_nonlocal_matches_the_explicit_block(softmax):
    torch.manual_seed(0)
    block = NonLocalBlock(16, 8, use_softmax=softmax, use_scale=softmax, bn_init_gamma=0.5)
    block.eval()
    with torch.no_grad():
        block.out.weight.normal_(0, 0.2)
    x = torch.randn(2, 16, 4, 6, 6)
    ref = block(x)
    converted = fuse.use_sdpa_nonlocal(block)
    assert converted == int(softmax)
    assert (type(block) is fuse.SDPANonLocalBlock) == softmax
    assert rel_err(block(x), ref) < 1e-6


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "layout"),
    [
        ((1, 1, 1), (1, 1, 1), (0, 0, 0), torch.channels_last_3d),
        ((1, 1, 1), (1, 1, 1), (0, 0, 0), torch.contiguous_format),
        ((1, 1, 1), (1, 2, 2), (0, 0, 0), torch.channels_last_3d),
        ((1, 3, 3), (1, 1, 1), (0, 1, 1), torch.channels_last_3d),
        ((3, 1, 1), (1, 1, 1), (1, 0, 0), torch.contiguous_format),
    ],
)
def test_routed_conv_matches_conv3d(kernel, stride, padding, layout):
    torch.manual_seed(0)
    conv = nn.Conv3d(8, 12, kernel, stride=stride, padding=padding, bias=True)
    x = torch.randn(1, 8, 3, 8, 8).contiguous(memory_format=layout)
    ref = conv(x)
    conv = conv.to(memory_format=torch.channels_last_3d)
    fuse.route_cpu_convs(conv)
    assert type(conv) is fuse.RoutedConv3d
    with torch.inference_mode():
        out = conv(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-6


@pytest.mark.skipif(
    not fuse.cpu_pointwise_fusion_available(), reason="this torch lacks oneDNN's fused convs"
)
@pytest.mark.parametrize("post_relu", [False, True])
@pytest.mark.parametrize("with_other", [False, True])
@pytest.mark.parametrize("layout", [torch.channels_last_3d, torch.contiguous_format])
def test_fused_conv_matches_conv_add_relu(post_relu, with_other, layout):
    torch.manual_seed(0)
    conv = nn.Conv3d(8, 12, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=True)
    x = torch.randn(1, 8, 3, 8, 8).contiguous(memory_format=layout)
    other = torch.randn(1, 12, 3, 4, 4) if with_other else None
    ref = conv(x) + (other if with_other else 0)
    ref = ref.relu() if post_relu else ref
    conv = conv.to(memory_format=torch.channels_last_3d).requires_grad_(False)
    conv.__class__ = fuse.FusedConv3d
    conv.post_relu = post_relu
    with torch.inference_mode():
        outs = [conv(x, other), conv(x, other)]  # the second call reuses the reordered weight
        twin = copy.deepcopy(conv)  # the oneDNN weight is rebuilt, not copied
        outs.append(twin(x, other))
    for out in outs:
        assert out.shape == ref.shape
        assert rel_err(out, ref) < 1e-6
    assert set(conv.state_dict()) == {"weight", "bias"}


def test_fp32_fast_path_without_the_fused_ops_routes_the_convs(monkeypatch):
    model = small_model("c2d_nl", "val")
    x = clips("c2d_nl")
    ref = run(nl.prepare_for_inference(model, "cpu"), x)
    fused = nl.prepare_for_inference(model, "cpu", "fp32")
    if fuse.cpu_pointwise_fusion_available():
        kinds = {type(m) for m in fused.modules()}
        assert {fuse.FusedResidualBlock3d, fuse.FusedSDPANonLocalBlock} <= kinds
        with torch.inference_mode(), profile() as prof:
            fused(x)
        ops = {e.key for e in prof.key_averages()}
        # every ReLU and residual add ran inside the convs
        assert not ops & {"aten::relu", "aten::relu_", "aten::add", "aten::add_"}, ops
    monkeypatch.setattr(fuse, "cpu_pointwise_fusion_available", lambda: False)
    routed = nl.prepare_for_inference(model, "cpu", "fp32")
    assert not any(isinstance(m, fuse.FusedConv3d) for m in routed.modules())
    assert any(type(m) is fuse.RoutedConv3d for m in routed.modules())
    assert routed.state_dict().keys() == fused.state_dict().keys()
    for m in (fused, routed):
        assert rel_err(run(m, x), ref) < FP32_BOUND


def test_fast_path_avoids_slow_conv3d_at_batch_1():
    model = small_model("c2d_nl", "val")
    x = clips("c2d_nl", 1)

    def slow_calls(m):
        with torch.inference_mode(), profile() as prof:
            m(x)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::slow_conv3d_forward")

    fast = nl.prepare_for_inference(model, "cpu", "fp32")
    assert slow_calls(nl.prepare_for_inference(model, "cpu")) > 0  # what strict's heuristic picks
    assert slow_calls(fast) == 0


def test_modes_a_cpu_cannot_run_are_refused(monkeypatch):
    model = small_model("c2d_nl", "val")
    for precision in ("tf32", "fp16"):
        with pytest.raises(inference.PrecisionError, match="needs a CUDA GPU"):
            nl.prepare_for_inference(model, "cpu", precision)
    monkeypatch.setattr(inference, "cpu_bf16_supported", lambda: False)
    with pytest.raises(inference.PrecisionError, match="bfloat16 units"):
        nl.prepare_for_inference(model, "cpu", "bf16")
    with pytest.raises(inference.PrecisionError, match="compile is part of the fast path"):
        nl.prepare_for_inference(model, "cpu", "strict", compile=True)
    with pytest.raises(inference.PrecisionError, match="one of"):
        nl.prepare_for_inference(model, "cpu", "int8")


def test_bf16_detection_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(inference, "_cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert inference.cpu_bf16_supported()
    monkeypatch.setattr(inference, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert not inference.cpu_bf16_supported()


def test_bf16_fast_path_structure(monkeypatch):
    # the bf16 rewrite (cast once, padded stem, float32 classifier), not run here
    monkeypatch.setattr(inference, "cpu_bf16_supported", lambda: True)
    model = small_model("i3d_nl", "test")
    fast = nl.prepare_for_inference(model, "cpu", "bf16")
    assert isinstance(fast.conv1[1], fuse.PaddedStem)
    assert fast.conv1[1].conv.weight.dtype == torch.bfloat16
    assert fast.res5[0].branch2a.weight.dtype == torch.bfloat16
    assert fast.pred[1].weight.dtype == torch.float32
    assert all(type(m) is not fuse.RoutedConv3d for m in fast.modules())
