"""Self-tests of the reference executor's Caffe2 operators against hand-worked numbers and
explicit loops written here (never against PyTorch)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nonlocal_net.reference import ops
from nonlocal_net.reference.ops import Caffe2Error

# ---------------------------------------------------------------------------------------------
# Conv
# ---------------------------------------------------------------------------------------------


def _loop_conv(x, w, b, strides, pads, group):
    """Direct definition: y[n,o,t,h,w] = sum over the group's input channels and the kernel of
    w * zero-padded x at (t*st + kt - pad_t, ...)."""
    n, _, *size = x.shape
    c_out, cin_g, *k = w.shape
    heads, tails = pads[:3], pads[3:]
    out = [(size[d] + heads[d] + tails[d] - k[d]) // strides[d] + 1 for d in range(3)]
    y = np.zeros((n, c_out, *out))
    cout_g = c_out // group
    for i, o, t, h, v in itertools.product(range(n), range(c_out), *(range(m) for m in out)):
        g = o // cout_g
        acc = 0.0 if b is None else b[o]
        for ci, a, bb, cc in itertools.product(range(cin_g), *(range(m) for m in k)):
            pos = (t * strides[0] + a - heads[0], h * strides[1] + bb - heads[1])
            pos = (*pos, v * strides[2] + cc - heads[2])
            if all(0 <= p < s for p, s in zip(pos, size)):
                acc += w[o, ci, a, bb, cc] * x[i, g * cin_g + ci, pos[0], pos[1], pos[2]]
        y[i, o, t, h, v] = acc
    return y


def test_conv_hand_worked_stride_and_head_pad():
    # W axis: x = 1..5, kernel [1, 10], stride 2, head pad 1, tail pad 0.
    # padded = [0, 1, 2, 3, 4, 5]; windows start at 0, 2, 4: [10, 32, 54];
    # size = int((5 + 1 + 0 - 2) / 2 + 1) = 3
    x = np.arange(1.0, 6.0).reshape(1, 1, 1, 1, 5)
    w = np.array([1.0, 10.0]).reshape(1, 1, 1, 1, 2)
    y = ops.conv(x, w, kernels=[1, 1, 2], strides=[1, 1, 2], pads=[0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(y.ravel(), [10.0, 32.0, 54.0])
    # the tail pad goes at the end: padded [1, 2, 3, 4, 5, 0] -> [1 + 20, 3 + 40, 5 + 0]
    y = ops.conv(x, w, kernels=[1, 1, 2], strides=[1, 1, 2], pads=[0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(y.ravel(), [21.0, 43.0, 5.0])


@pytest.mark.parametrize(
    "strides, pads, group, bias",
    [
        ((1, 1, 1), (0, 0, 0, 0, 0, 0), 1, False),  # the 1x1x1 fast path when k == 1
        ((2, 1, 3), (1, 0, 2, 0, 2, 1), 1, True),  # asymmetric head/tail pads
        ((1, 2, 2), (1, 1, 1, 1, 1, 1), 2, True),  # groups
        ((2, 2, 2), (2, 3, 3, 2, 3, 3), 1, False),  # conv1-like
    ],
)
def test_conv_matches_direct_loops(strides, pads, group, bias):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 5, 6, 7))
    w = rng.normal(size=(6, 4 // group, 3, 2, 3))
    b = rng.normal(size=6) if bias else None
    y = ops.conv(x, w, b, kernels=w.shape[2:], strides=strides, pads=pads, group=group)
    np.testing.assert_allclose(y, _loop_conv(x, w, b, strides, pads, group), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group", [1, 2])
def test_temporal_conv_matches_direct_loops(group):
    # kernel (3, 1, 1), stride 1: the path that multiplies whole-frame views
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 4, 5, 3, 4))
    w = rng.normal(size=(6, 4 // group, 3, 1, 1))
    b = rng.normal(size=6)
    pads = (1, 0, 0, 2, 0, 0)  # head 1, tail 2: 5 + 3 - 3 + 1 = 6 output frames
    y = ops.conv(x, w, b, kernels=[3, 1, 1], pads=pads, group=group)
    assert y.shape == (2, 6, 6, 3, 4)
    np.testing.assert_allclose(y, _loop_conv(x, w, b, (1, 1, 1), pads, group), rtol=1e-12)


@pytest.mark.parametrize("strides", [(1, 1, 1), (1, 2, 2), (2, 2, 2), (3, 1, 1)])
def test_conv_pointwise_and_chunked_paths(monkeypatch, strides):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 7, 4, 5))
    w = rng.normal(size=(3, 5, 1, 1, 1))
    b = rng.normal(size=3)
    expected = _loop_conv(x, w, b, strides, (0,) * 6, 1)
    y = ops.conv(x, w, b, kernels=[1, 1, 1], strides=strides, pads=[0] * 6)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    # A column budget of 2 output frames forces several chunks, the last one shorter for
    # strides 1 (7 = 2 + 2 + 2 + 1) and 3 (3 = 2 + 1).
    w3 = rng.normal(size=(3, 5, 3, 3, 3))
    expected = _loop_conv(x, w3, b, strides, (1,) * 6, 1)
    ho, wo = expected.shape[3:]
    monkeypatch.setattr(ops, "_COL_BUDGET_BYTES", 2 * (5 * 9) * (ho * wo) * 8 * strides[0])
    y = ops.conv(x, w3, b, kernels=[3, 3, 3], strides=strides, pads=[1] * 6)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_conv_output_size_rule_and_errors():
    # int(float(in + pads - k) / s + 1): 224 -> 112 for conv1 (k 7, s 2, pad 3)
    assert ops.conv_output_size(224, 7, 2, 3, 3) == 112
    assert ops.conv_output_size(256, 7, 2, 3, 3) == 128
    assert ops.conv_output_size(8, 5, 1, 2, 2) == 8
    assert ops.conv_output_size(128, 5, 2, 2, 2) == 64
    with pytest.raises(Caffe2Error, match="does not fit"):
        ops.conv_output_size(2, 3, 1, 0, 0)
    x = np.zeros((1, 4, 3, 3, 3))
    with pytest.raises(Caffe2Error, match=r"expected \(2, 4, 1, 1, 1\)"):
        ops.conv(x, np.zeros((2, 3, 1, 1, 1)), kernels=[1, 1, 1])
    with pytest.raises(Caffe2Error, match="2 \\* 3 entries"):
        ops.conv(x, np.zeros((2, 4, 1, 1, 1)), kernels=[1, 1, 1], pads=[0, 0, 0])


# ---------------------------------------------------------------------------------------------
# Normalisation and element-wise
# ---------------------------------------------------------------------------------------------


def test_spatial_bn_uses_riv_as_variance():
    # channel 0: rm 1, riv 4, s 3, b 0.5 -> (x - 1) / 2 * 3 + 0.5; channel 1: identity
    x = np.array([2.0, 4.0, 7.0, -1.0]).reshape(1, 2, 1, 1, 2)
    s, b = np.array([3.0, 1.0]), np.array([0.5, 0.0])
    rm, riv = np.array([1.0, 0.0]), np.array([4.0, 1.0])
    y = ops.spatial_bn(x, s, b, rm, riv, epsilon=0.0)
    np.testing.assert_allclose(y.ravel(), [2.0, 5.0, 7.0, -1.0])
    # With 1/riv as the variance channel 0 would give (x - 1) * 2 * 3 + 0.5 = 6.5, 18.5.
    assert not np.allclose(y.ravel()[:2], [6.5, 18.5])
    # epsilon is a float32 argument: 1.0000001e-5 becomes 1.0000000656873453e-05
    y = ops.spatial_bn(x, s, b, rm, riv, epsilon=1.0000001e-5)
    eps32 = 1.0000000656873453e-05
    np.testing.assert_allclose(y.ravel()[0], (2.0 - 1.0) / np.sqrt(4.0 + eps32) * 3.0 + 0.5, 0, 0)


def test_spatial_bn_rejects_wrong_param_shape_and_train_mode():
    x = np.zeros((1, 2, 1, 1, 1))
    p = np.ones(2)
    with pytest.raises(Caffe2Error, match=r"var has shape \(3,\)"):
        ops.spatial_bn(x, p, p, p, np.ones(3))
    with pytest.raises(NotImplementedError):
        ops.spatial_bn(x, p, p, p, p, is_test=0)


def test_affine_relu_sum_scale():
    x = np.array([1.0, -2.0, 3.0, -4.0]).reshape(1, 2, 2)
    np.testing.assert_array_equal(
        ops.affine_nd(x, np.array([2.0, -1.0]), np.array([1.0, 0.5])).ravel(), [3, -3, -2.5, 4.5]
    )
    np.testing.assert_array_equal(ops.relu(x).ravel(), [1, 0, 3, 0])
    np.testing.assert_array_equal(ops.sum_(x, x, x).ravel(), [3, -6, 9, -12])
    with pytest.raises(Caffe2Error, match="equal shapes"):
        ops.sum_(x, x[:, :1])
    # Scale's argument is float32: 512 ** -0.5 = 0.04419417382415922 becomes 0.04419417306780815
    y = ops.scale(np.ones(1), scale=512**-0.5)
    assert y[0] == 0.04419417306780815 != 512**-0.5
    assert ops.scale(np.ones(1), scale=256**-0.5)[0] == 0.0625


def test_operators_do_not_modify_inputs():
    x = np.array([[-1.0, 2.0]])
    keep = x.copy()
    ops.relu(x)
    ops.scale(x, scale=3.0)
    ops.sum_(x, x)
    np.testing.assert_array_equal(x, keep)


def test_legacy_broadcast_add_div_constant_fill_reduce_back_sum():
    # The dot-product non-local's denominator: ones (B, N, M) summed over M, broadcast back.
    a = np.arange(12.0).reshape(2, 2, 3)
    ones = ops.constant_fill(a, value=1.0)
    count = ops.reduce_back_sum(ones)
    np.testing.assert_array_equal(count, [[3.0, 3.0], [3.0, 3.0]])
    denom = ops.add(ops.constant_fill(a, value=0.0), count, broadcast=1, axis=0)
    np.testing.assert_array_equal(denom, np.full((2, 2, 3), 3.0))
    np.testing.assert_array_equal(ops.div(a, denom), a / 3.0)
    # axis 0: B's dims are A's leading dims; B (2,) with axis 1 matches A's dim 1
    np.testing.assert_array_equal(
        ops.add(np.zeros((2, 2, 3)), np.array([10.0, 20.0]), broadcast=1, axis=1)[:, :, 0],
        [[10, 20], [10, 20]],
    )
    with pytest.raises(Caffe2Error, match="mismatch"):
        ops.add(a, np.zeros((3, 2)), broadcast=1, axis=0)
    with pytest.raises(Caffe2Error, match="equal shapes"):
        ops.add(a, count)  # no broadcast=1
    assert ops.constant_fill(a.astype(np.float32), value=0.1).dtype == np.float32


def test_dropout_test_mode_is_identity():
    x = np.arange(4.0)
    assert ops.dropout(x, ratio=0.5, is_test=1) is x
    with pytest.raises(NotImplementedError):
        ops.dropout(x, ratio=0.5, is_test=0)


# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------


def test_pool_floor_rule_without_padding():
    # pool1 of the original: k 3, s 2, no pad: 112 -> 55, 128 -> 63 (not 56 / 64); odd 7 -> 3
    for size, expected in [(112, 55), (128, 63), (7, 3), (8, 3)]:
        shape = ops.pool_shape((1, 1, 1, size, size), kernels=[1, 3, 3], strides=[1, 2, 2])
        assert shape[3:] == (expected, expected)
    x = np.zeros((1, 2, 1, 112, 112))
    assert ops.max_pool(x, kernels=[1, 3, 3], strides=[1, 2, 2]).shape == (1, 2, 1, 55, 55)
    # pool2 / the non-local max pool: 8 -> 4 in time, 28 -> 14, 7 -> 3 in space
    assert ops.max_pool(np.zeros((1, 1, 8, 7, 28)), kernels=[2, 2, 2], strides=[2, 2, 2]).shape[
        2:
    ] == (
        4,
        3,
        14,
    )


def test_max_pool_hand_worked():
    x = np.arange(25.0).reshape(1, 1, 1, 5, 5)
    y = ops.max_pool(x, kernels=[1, 3, 3], strides=[1, 2, 2])
    np.testing.assert_array_equal(y.reshape(2, 2), [[12, 14], [22, 24]])
    # padding never wins, also for negative inputs: windows [pad, -1], [-2, -3]
    x = np.array([-1.0, -2.0, -3.0]).reshape(1, 1, 1, 1, 3)
    y = ops.max_pool(x, kernels=[1, 1, 2], strides=[1, 1, 2], pads=[0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(y.ravel(), [-1.0, -2.0])


def test_average_pool_excludes_padding():
    # [1, 2, 3] padded [0 | 1, 2, 3 | 0], k 2, s 2: windows [pad, 1] -> 1 / 1, [2, 3] -> 2.5
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 1, 1, 1, 3)
    y = ops.average_pool(x, kernels=[1, 1, 2], strides=[1, 1, 2], pads=[0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(y.ravel(), [1.0, 2.5])
    # pool5-like: mean over the whole (T, 7, 7) window, stride 1: 8x8 -> 2x2 positions
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 3, 4, 8, 8))
    y = ops.average_pool(x, kernels=[4, 7, 7], strides=[1, 1, 1])
    assert y.shape == (1, 3, 1, 2, 2)
    for h, w in itertools.product(range(2), range(2)):
        np.testing.assert_allclose(
            y[0, :, 0, h, w], x[0, :, :, h : h + 7, w : w + 7].mean((1, 2, 3))
        )


# ---------------------------------------------------------------------------------------------
# Softmax, FC, BatchMatMul, reductions
# ---------------------------------------------------------------------------------------------


def test_softmax_axis_coerces_to_2d():
    # axis 1 on (2, 2, 3): each sample's 6 values form one distribution
    p = np.array([1, 2, 3, 4, 5, 5.0])
    x = np.log(np.stack([p, p[::-1]])).reshape(2, 2, 3)
    y = ops.softmax(x, axis=1)
    np.testing.assert_allclose(y[0].ravel(), p / 20.0)
    np.testing.assert_allclose(y[1].ravel(), p[::-1] / 20.0)
    # axis 2 (the non-local's): over the last dim only
    y = ops.softmax(np.log(np.array([1.0, 1.0, 2.0])).reshape(1, 1, 3) + 100.0, axis=2)
    np.testing.assert_allclose(y.ravel(), [0.25, 0.25, 0.5])
    # default axis 1 on (B, K): over the classes
    np.testing.assert_allclose(ops.softmax(np.zeros((2, 4))), np.full((2, 4), 0.25))
    with pytest.raises(Caffe2Error, match="out of range"):
        ops.softmax(np.zeros((2, 4)), axis=2)


def test_batch_mat_mul_transposes():
    a = np.array([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]])
    b = np.array([[[5.0, 6.0], [7.0, 8.0]], [[1.0, 2.0], [3.0, 4.0]]])
    np.testing.assert_array_equal(ops.batch_mat_mul(a, b)[0], [[19, 22], [43, 50]])
    np.testing.assert_array_equal(ops.batch_mat_mul(a, b, trans_a=1)[0], [[26, 30], [38, 44]])
    np.testing.assert_array_equal(ops.batch_mat_mul(a, b, trans_b=1)[0], [[17, 23], [39, 53]])
    # second batch entry: a swaps rows; with trans_b: rows of b^T swapped
    np.testing.assert_array_equal(ops.batch_mat_mul(a, b)[1], [[3, 4], [1, 2]])
    # non-square: theta (B, C', N) ^T @ phi (B, C', M) -> (B, N, M)
    rng = np.random.default_rng(4)
    th, ph = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 4))
    y = ops.batch_mat_mul(th, ph, trans_a=1)
    loops = np.zeros((2, 5, 4))
    for i, n, m in itertools.product(range(2), range(5), range(4)):
        loops[i, n, m] = sum(th[i, c, n] * ph[i, c, m] for c in range(3))
    np.testing.assert_allclose(y, loops)
    with pytest.raises(Caffe2Error, match="inner dimensions"):
        ops.batch_mat_mul(th, ph)


def test_fc_flattens_at_axis_1():
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).reshape(2, 3, 1, 1, 1)
    w = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    y = ops.fc(x, w, np.array([10.0, 20.0]))
    np.testing.assert_array_equal(y, [[11.0, 25.0], [14.0, 31.0]])
    with pytest.raises(Caffe2Error, match="dimension mismatch"):
        ops.fc(x, np.zeros((2, 4)), np.zeros(2))


def test_reduce_back_mean_and_sum():
    x = np.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(ops.reduce_back_sum(x, num_reduce_dim=2), [66.0, 210.0])
    np.testing.assert_array_equal(ops.reduce_back_mean(x, num_reduce_dim=2), [5.5, 17.5])
    np.testing.assert_array_equal(ops.reduce_back_mean(x)[0], [1.5, 5.5, 9.5])
    # three times on (B, C, T, H, W): the mean over all positions (the test head)
    rng = np.random.default_rng(5)
    y = rng.normal(size=(2, 3, 1, 2, 2))
    z = ops.reduce_back_mean(ops.reduce_back_mean(ops.reduce_back_mean(y)))
    np.testing.assert_allclose(z, y.reshape(2, 3, 4).sum(-1) / 4)


# ---------------------------------------------------------------------------------------------
# Transpose and Reshape
# ---------------------------------------------------------------------------------------------


def test_transpose():
    x = np.arange(6.0).reshape(1, 2, 3)
    y = ops.transpose(x, axes=[2, 0, 1])
    assert y.shape == (3, 1, 2) and y.flags.c_contiguous
    for j, k in itertools.product(range(2), range(3)):
        assert y[k, 0, j] == x[0, j, k]
    assert ops.transpose(x).shape == (3, 2, 1)  # default: reversed
    with pytest.raises(Caffe2Error, match="permutation"):
        ops.transpose(x, axes=[0, 0, 1])


def test_reshape_zero_and_minus_one_rules():
    x = np.arange(24.0).reshape(2, 3, 4)
    y, old = ops.reshape(x, shape=[0, -1])
    assert y.shape == (2, 12)
    assert old.dtype == np.int64 and old.tolist() == [2, 3, 4]
    assert ops.reshape(x, shape=[-1, 0])[0].shape == (8, 3)  # 0 copies input dim 1
    assert ops.reshape(x, shape=[4, 0, 2])[0].shape == (4, 3, 2)
    # the new shape from a second input (the saved old shape), row-major reinterpretation
    back, _ = ops.reshape(y, np.array([2, 3, 4], dtype=np.int64))
    np.testing.assert_array_equal(back, x)
    for shape, message in [
        ([-1, -1], "more than one missing"),
        ([0, 0, 0, 0], "exceeds the original dimension"),
        ([5, -1], "does not agree"),
        ([2, 3, 5], "does not agree"),
        ([2, -2, 3], "must not be negative"),
    ]:
        with pytest.raises(Caffe2Error, match=message):
            ops.reshape(x, shape=shape)
    with pytest.raises(Caffe2Error, match="do not pass in"):
        ops.reshape(x, np.array([24]), shape=[24])


def test_reshape_with_explicit_batch_mixes_clips_or_raises():
    """The non-local's reshape to (config_batch, C', -1) (spec 3.8)."""
    c, n_pos = 2, 3  # C' = 2 channels, N = 3 positions per clip
    # clip i, channel k, position p holds 100*i + 10*k + p
    clips = np.array([[[100 * i + 10 * k + p for p in range(n_pos)] for k in range(c)]
                      for i in range(4)], dtype=float)  # fmt: skip
    # Real batch 4 = 2 x the config batch 2: pseudo-sample 0 holds clips 0 and 1, its
    # "channel" 0 is clip 0's whole data and "channel" 1 is clip 1's.
    mixed, old = ops.reshape(clips, shape=[2, c, -1])
    assert mixed.shape == (2, 2, 6)
    np.testing.assert_array_equal(mixed[0, 0], [0, 1, 2, 10, 11, 12])
    np.testing.assert_array_equal(mixed[0, 1], [100, 101, 102, 110, 111, 112])
    np.testing.assert_array_equal(mixed[1, 0], [200, 201, 202, 210, 211, 212])
    assert old.tolist() == [4, 2, 3]
    # Real batch 3: 3 * 2 * 3 = 18 elements are not divisible by 2 * 2 -> Caffe2 throws.
    with pytest.raises(Caffe2Error, match="does not agree with the input data"):
        ops.reshape(clips[:3], shape=[2, c, -1])
