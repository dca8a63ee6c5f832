"""The Caffe2 operators of the original network, in NumPy, with Caffe2's semantics.

Each operator is a plain function named after its Caffe2 type; positional parameters are the
operator's inputs in Caffe2's order and keyword parameters are its arguments under their Caffe2
names (``kernels``, ``strides``, ``pads``, ``epsilon``, ``trans_a``, ...), so an operator of a
graph runs as ``OPERATORS[op.type](*inputs, **op.args)``. Operators never modify their inputs,
except that the element-wise ones in :data:`ELEMENTWISE_OUT` accept ``out=``, which may be their
first input: the executor passes a dead input's buffer there (as Caffe2's in-place ops do) to
avoid allocating and zeroing fresh memory.

Conventions that follow Caffe2's operators exactly:

* Tensors are NCHW-ordered, i.e. ``(N, C, T, H, W)`` for video.
* ``pads`` has length ``2 * spatial_ndim`` and lists all head pads first:
  ``[t_head, h_head, w_head, t_tail, h_tail, w_tail]``.
* The output size of a convolution or pooling window is
  ``int(float32(in + pad_head + pad_tail - kernel) / stride + 1)`` (truncation; equal to floor
  wherever the window fits).
* Float arguments are float32 (``Argument.f`` in ``caffe2.proto`` is a ``float``): the BN epsilon,
  the non-local ``Scale`` factor and ``ConstantFill`` values are rounded to float32 before use,
  whatever the dtype of the computation.

The computation runs in the dtype of the inputs (float64 for the reference runs). Convolutions
are BLAS matrix products (no Python loop over positions): 1x1x1 and temporal ``kx1x1`` stride-1
kernels multiply strided views of whole input frames; other kernels fill a column matrix chunk by
chunk, one block copy per kernel offset, on every core.

Every shape rule lives in one ``*_shape`` helper that the operator itself calls first; the graph's
shape inference (:meth:`nonlocal_net.reference.graph.Graph.infer_shapes`) calls the same helpers,
so a graph is checked with exactly the rules it runs with.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "ELEMENTWISE_OUT",
    "OPERATORS",
    "SHAPE_RULES",
    "Caffe2Error",
    "add",
    "affine_nd",
    "average_pool",
    "batch_mat_mul",
    "constant_fill",
    "conv",
    "conv_output_size",
    "div",
    "dropout",
    "fc",
    "float32_arg",
    "max_pool",
    "reduce_back_mean",
    "reduce_back_sum",
    "release_scratch",
    "relu",
    "reshape",
    "reshape_target",
    "scale",
    "softmax",
    "spatial_bn",
    "stop_gradient",
    "sum_",
    "transpose",
]

Shape = tuple[int, ...]

# Upper bound on the column matrix of one convolution chunk (bytes). Large enough for efficient
# BLAS products, small enough to keep a 128-frame float64 run within a few GiB.
_COL_BUDGET_BYTES = 64 * 2**20
_WORKERS = max(1, os.cpu_count() or 1)
_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_SCRATCH = threading.local()


def _scratch(key: str, shape: Shape, dtype) -> np.ndarray:
    """A reusable per-thread work buffer (its contents are garbage): convolutions reuse their
    column and product buffers instead of faulting in fresh memory for every call."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(key)
    if buffer is None or buffer.size < size:
        buffer = buffers[key] = np.empty(size, dtype=np.uint8)
    return buffer[:size].view(dtype).reshape(shape)


def release_scratch() -> None:
    """Free this thread's work buffers (the executor calls it after a run)."""
    _SCRATCH.__dict__.pop("buffers", None)


def _copy_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads that fill convolution column matrices (created on first use)."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix="im2col")
    return _POOL


class Caffe2Error(ValueError):
    """An input that Caffe2 would reject (its ``CAFFE_ENFORCE`` failures)."""


def float32_arg(value: float) -> float:
    """A float operator argument as Caffe2 stores it (``float`` in ``caffe2.proto``)."""
    return float(np.float32(value))


def _shape(x) -> Shape:
    return tuple(int(d) for d in x.shape)


# --------------------------------------------------------------------------------------------
# Convolution and pooling geometry
# --------------------------------------------------------------------------------------------


def conv_output_size(in_size: int, kernel: int, stride: int, pad_head: int, pad_tail: int) -> int:
    """Caffe2's ``ComputeSizeAndPad`` for explicit pads: truncated float32 division."""
    span = in_size + pad_head + pad_tail - kernel
    if span < 0:
        raise Caffe2Error(
            f"window of size {kernel} does not fit an input of size {in_size} with pads "
            f"({pad_head}, {pad_tail})"
        )
    return int(np.float32(span) / np.float32(stride) + np.float32(1))


def _window_args(
    ndim: int, kernels: Sequence[int], strides: Sequence[int] | None, pads: Sequence[int] | None
) -> tuple[Shape, Shape, Shape, Shape]:
    """Validate ``kernels``/``strides``/``pads`` for ``ndim`` spatial dims; split the pads."""
    kernels = tuple(int(k) for k in kernels)
    strides = (1,) * ndim if strides is None else tuple(int(s) for s in strides)
    pads = (0,) * (2 * ndim) if pads is None else tuple(int(p) for p in pads)
    if len(kernels) != ndim or len(strides) != ndim:
        raise Caffe2Error(
            f"kernels {kernels} and strides {strides} must have one entry per spatial dim ({ndim})"
        )
    if len(pads) != 2 * ndim:
        raise Caffe2Error(f"pads {pads} must have 2 * {ndim} entries ordered [heads..., tails...]")
    if min(kernels) < 1 or min(strides) < 1 or min(pads) < 0:
        raise Caffe2Error(f"invalid window: kernels {kernels}, strides {strides}, pads {pads}")
    return kernels, strides, pads[:ndim], pads[ndim:]


def _window_output(
    spatial: Shape, kernels: Shape, strides: Shape, heads: Shape, tails: Shape
) -> Shape:
    return tuple(
        conv_output_size(n, k, s, h, t)
        for n, k, s, h, t in zip(spatial, kernels, strides, heads, tails)
    )


def _pad(x: np.ndarray, heads: Shape, tails: Shape, value: float) -> np.ndarray:
    if not any(heads) and not any(tails):
        return x
    widths = [(0, 0), (0, 0), *zip(heads, tails)]
    return np.pad(x, widths, mode="constant", constant_values=value)


def conv_shape(
    x_shape: Shape,
    w_shape: Shape,
    b_shape: Shape | None = None,
    *,
    kernels: Sequence[int],
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    group: int = 1,
) -> Shape:
    """Output shape of :func:`conv`; raises as Caffe2 does on inconsistent shapes."""
    if len(x_shape) < 3:
        raise Caffe2Error(f"Conv input must be (N, C, spatial...), got shape {x_shape}")
    ndim = len(x_shape) - 2
    kernels, strides, heads, tails = _window_args(ndim, kernels, strides, pads)
    n, c_in = x_shape[:2]
    if len(w_shape) != ndim + 2:
        raise Caffe2Error(f"Conv weight must be {ndim + 2}-D, got shape {w_shape}")
    c_out = w_shape[0]
    if group < 1 or c_in % group or c_out % group:
        raise Caffe2Error(
            f"Conv group {group} must divide the input ({c_in}) and output ({c_out}) channels"
        )
    expected_w = (c_out, c_in // group, *kernels)
    if tuple(w_shape) != expected_w:
        raise Caffe2Error(
            f"Conv weight has shape {tuple(w_shape)}, expected {expected_w} for an input with "
            f"{c_in} channels, kernels {kernels} and group {group}"
        )
    if b_shape is not None and tuple(b_shape) != (c_out,):
        raise Caffe2Error(f"Conv bias has shape {tuple(b_shape)}, expected ({c_out},)")
    return (n, c_out, *_window_output(x_shape[2:], kernels, strides, heads, tails))


def conv(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    kernels: Sequence[int],
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    group: int = 1,
) -> np.ndarray:
    """Caffe2 ``Conv`` (``ConvNd``): ``Y = W * X (+ b)``, weight ``(Cout, Cin/group, *kernels)``.

    Zero padding with separate head/tail pads; no dilation (the original never dilates).
    """
    out_shape = conv_shape(
        _shape(x),
        _shape(w),
        None if b is None else _shape(b),
        kernels=kernels,
        strides=strides,
        pads=pads,
        group=group,
    )
    ndim = x.ndim - 2
    kernels, strides, heads, tails = _window_args(ndim, kernels, strides, pads)
    dtype = np.result_type(x, w)
    n, c_in = x.shape[:2]
    c_out = w.shape[0]
    cin_g, cout_g = c_in // group, c_out // group
    out_spatial = out_shape[2:]
    y = np.empty(out_shape, dtype=dtype)
    xp = _pad(x.astype(dtype, copy=False), heads, tails, 0.0)
    # Kernels and pads only along the first spatial dim, stride 1 (the 1x1x1 and the temporal
    # kx1x1 convs): every kernel offset reads a slice of whole frames, a strided *view* that
    # BLAS takes as is, so the products accumulate without any column matrix.
    frames_only = all(k == 1 for k in kernels[1:]) and not any(heads[1:]) and not any(tails[1:])
    frames_only = frames_only and all(s == 1 for s in strides)
    for gi in range(group):
        w_g = w[gi * cout_g : (gi + 1) * cout_g].astype(dtype, copy=False)
        xs = xp[:, gi * cin_g : (gi + 1) * cin_g]
        ys = y[:, gi * cout_g : (gi + 1) * cout_g]
        for i in range(n):
            if frames_only:
                _conv_frames(xs[i], w_g, ys[i])
            else:
                _conv_sample(xs[i], w_g.reshape(cout_g, -1), ys[i], kernels, strides, out_spatial)
    if b is not None:
        y += b.astype(dtype, copy=False).reshape((1, c_out) + (1,) * ndim)
    return y


def _conv_frames(xs: np.ndarray, w: np.ndarray, ys: np.ndarray) -> None:
    """``ys = sum_a w[:, :, a] @ xs[:, a : a + T']`` over the temporal kernel offsets ``a``
    (kernel ``(kt, 1, 1)``, stride 1, the input already padded in time)."""
    c_out, c_in, kt = w.shape[:3]
    t_out = ys.shape[1]
    out = (
        ys.reshape(c_out, -1) if ys.flags.c_contiguous else np.empty((c_out, ys[0].size), ys.dtype)
    )
    for a in range(kt):
        frames = xs[:, a : a + t_out].reshape(c_in, -1)  # a view: whole frames are contiguous
        if a == 0:
            np.matmul(w[:, :, 0].reshape(c_out, c_in), frames, out=out)
        else:
            term = _scratch("term", out.shape, out.dtype)
            out += np.matmul(w[:, :, a].reshape(c_out, c_in), frames, out=term)
    if not ys.flags.c_contiguous:
        ys[...] = out.reshape(ys.shape)


def _conv_sample(
    xs: np.ndarray,
    w2: np.ndarray,
    ys: np.ndarray,
    kernels: Shape,
    strides: Shape,
    out_spatial: Shape,
) -> None:
    """One sample and group: ``ys = w2 @ columns(xs)``, chunked over the first spatial dim.

    The column matrix of a chunk has one row per (input channel, kernel offset), in the
    weight's order, and one column per output position. It is filled with one strided block
    copy per kernel offset (much faster than copying a high-dimensional window view), then
    multiplied by the weight matrix with BLAS.
    """
    c = xs.shape[0]
    rows = c * math.prod(kernels)
    per_step = rows * math.prod(out_spatial[1:]) * xs.itemsize
    step = min(out_spatial[0], max(1, _COL_BUDGET_BYTES // max(1, per_step)))
    cols = _scratch("cols", (c, *kernels, step, *out_spatial[1:]), xs.dtype)
    prod = _scratch("prod", (ys.shape[0], step * math.prod(out_spatial[1:])), ys.dtype)
    offsets = list(itertools.product(*(range(k) for k in kernels)))
    phases = _stride_phases(xs, strides)
    for t0 in range(0, out_spatial[0], step):
        t1 = min(out_spatial[0], t0 + step)
        sizes = (t1 - t0, *out_spatial[1:])
        firsts = (t0, *(0 for _ in strides[1:]))

        def fill(part: list[tuple[int, ...]], firsts=firsts, sizes=sizes, t0=t0, t1=t1) -> None:
            for offset in part:
                # input index f*s + o = (f + o // s) * s + o % s: phase o % s, unit stride
                phase = tuple(o % s for o, s in zip(offset, strides))
                window = tuple(
                    slice(f + o // s, f + o // s + m)
                    for f, o, s, m in zip(firsts, offset, strides, sizes)
                )
                cols[(slice(None), *offset, slice(0, t1 - t0))] = phases[
                    (slice(None), *phase, *window)
                ]

        # NumPy releases the GIL while copying: fill the column matrix on every core.
        list(_copy_pool().map(fill, [offsets[k::_WORKERS] for k in range(_WORKERS)]))
        used = (t1 - t0) * math.prod(out_spatial[1:])
        if t1 - t0 < step:  # last, shorter chunk
            chunk = cols[(slice(None),) * (1 + len(kernels)) + (slice(0, t1 - t0),)]
            a = np.ascontiguousarray(chunk).reshape(rows, used)
        else:
            a = cols.reshape(rows, used)
        np.matmul(w2, a, out=prod[:, :used])
        ys[:, t0:t1] = prod[:, :used].reshape(ys.shape[0], *sizes)


def _stride_phases(xs: np.ndarray, strides: Shape) -> np.ndarray:
    """``xs`` (C, *spatial) rearranged to (C, *strides, *spatial/strides) so that element
    ``i*s + p`` of a spatial dim sits at phase ``p``, index ``i``: every strided window becomes a
    unit-stride slice of one phase (a faster copy). A view when all strides are 1."""
    if all(s == 1 for s in strides):
        return xs.reshape(xs.shape[0], *((1,) * len(strides)), *xs.shape[1:])
    spatial = xs.shape[1:]
    padded = tuple(-(-n // s) * s for n, s in zip(spatial, strides))
    if padded != spatial:  # the tail never reaches a window; pad to whole phases
        xs = np.pad(xs, [(0, 0), *((0, p - n) for p, n in zip(padded, spatial))])
    split = xs.reshape(xs.shape[0], *(d for p, s in zip(padded, strides) for d in (p // s, s)))
    ndim = len(strides)
    order = (0, *(2 + 2 * i for i in range(ndim)), *(1 + 2 * i for i in range(ndim)))
    return np.ascontiguousarray(split.transpose(order))


def pool_shape(
    x_shape: Shape,
    *,
    kernels: Sequence[int],
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
) -> Shape:
    """Output shape of :func:`max_pool` / :func:`average_pool` (the convolution size rule)."""
    if len(x_shape) < 3:
        raise Caffe2Error(f"pooling input must be (N, C, spatial...), got shape {x_shape}")
    kernels, strides, heads, tails = _window_args(len(x_shape) - 2, kernels, strides, pads)
    return (*x_shape[:2], *_window_output(x_shape[2:], kernels, strides, heads, tails))


def _pool(x, kernels, strides, pads, reduce: str) -> np.ndarray:
    out_shape = pool_shape(_shape(x), kernels=kernels, strides=strides, pads=pads)
    kernels, strides, heads, tails = _window_args(x.ndim - 2, kernels, strides, pads)
    out_spatial = out_shape[2:]
    fill = -np.inf if reduce == "max" else 0.0
    xp = _pad(x, heads, tails, fill)
    acc: np.ndarray | None = None
    # One vectorised pass per kernel offset, in the order t, h, w (Caffe2's summation order).
    for offset in itertools.product(*(range(k) for k in kernels)):
        window = [slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(offset, strides, out_spatial)]
        view = xp[(slice(None), slice(None), *window)]
        if acc is None:
            acc = np.array(view, copy=True)
        elif reduce == "max":
            np.maximum(acc, view, out=acc)
        else:
            np.add(acc, view, out=acc)
    assert acc is not None
    if reduce == "mean":
        acc /= _window_counts(x.shape[2:], kernels, strides, heads, out_spatial).astype(acc.dtype)
    return acc


def _window_counts(spatial, kernels, strides, heads, out_spatial) -> np.ndarray:
    """Number of non-padding elements of every window (count-exclude-pad averaging)."""
    counts = np.ones((), dtype=np.int64)
    for n, k, s, h, o in zip(spatial, kernels, strides, heads, out_spatial):
        start = np.arange(o) * s - h
        per_dim = np.minimum(start + k, n) - np.maximum(start, 0)
        counts = np.multiply.outer(counts, per_dim)
    return counts


def max_pool(
    x: np.ndarray,
    *,
    kernels: Sequence[int],
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
) -> np.ndarray:
    """Caffe2 ``MaxPool``: maximum over each window; padding never wins (``-inf``)."""
    return _pool(x, kernels, strides, pads, "max")


def average_pool(
    x: np.ndarray,
    *,
    kernels: Sequence[int],
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
) -> np.ndarray:
    """Caffe2 ``AveragePool``: window mean over the non-padding elements only (cuDNN's
    ``COUNT_EXCLUDE_PADDING``; the CPU op divides by the clipped window likewise)."""
    return _pool(x, kernels, strides, pads, "mean")


# --------------------------------------------------------------------------------------------
# Normalisation and element-wise operators
# --------------------------------------------------------------------------------------------


def _channel_params(x_shape: Shape, op: str, **params: Shape) -> None:
    if len(x_shape) < 2:
        raise Caffe2Error(f"{op} input must be (N, C, ...), got shape {x_shape}")
    c = x_shape[1]
    for name, shape in params.items():
        if tuple(shape) != (c,):
            raise Caffe2Error(f"{op} {name} has shape {tuple(shape)}, expected ({c},)")


def spatial_bn_shape(x_shape, s_shape, b_shape, rm_shape, riv_shape, **_: object) -> Shape:
    _channel_params(x_shape, "SpatialBN", scale=s_shape, bias=b_shape, mean=rm_shape, var=riv_shape)
    return tuple(x_shape)


def _per_channel(v: np.ndarray, ndim: int, dtype) -> np.ndarray:
    return v.astype(dtype, copy=False).reshape((1, -1) + (1,) * (ndim - 2))


def spatial_bn(
    x: np.ndarray,
    s: np.ndarray,
    b: np.ndarray,
    rm: np.ndarray,
    riv: np.ndarray,
    *,
    epsilon: float = 1e-5,
    is_test: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Caffe2 ``SpatialBN`` in test mode: ``(x - rm) / sqrt(riv + eps) * s + b`` per channel.

    The fifth input (the checkpoint's ``_riv`` blob) is the running **variance**. ``epsilon`` is
    a float32 argument.
    """
    if not is_test:
        raise NotImplementedError("SpatialBN training mode (batch statistics) is not supported")
    spatial_bn_shape(_shape(x), _shape(s), _shape(b), _shape(rm), _shape(riv))
    dtype = x.dtype
    eps = float32_arg(epsilon)
    inv_std = 1.0 / np.sqrt(riv.astype(dtype) + dtype.type(eps))
    y = np.subtract(x, _per_channel(rm, x.ndim, dtype), out=out)
    y *= _per_channel(inv_std * s.astype(dtype), x.ndim, dtype)
    y += _per_channel(b, x.ndim, dtype)
    return y


def affine_nd_shape(x_shape, s_shape, b_shape, **_: object) -> Shape:
    _channel_params(x_shape, "AffineNd", scale=s_shape, bias=b_shape)
    return tuple(x_shape)


def affine_nd(
    x: np.ndarray, s: np.ndarray, b: np.ndarray, *, out: np.ndarray | None = None
) -> np.ndarray:
    """The project's ``AffineNd``: ``x * s[c] + b[c]`` over any trailing dims."""
    affine_nd_shape(_shape(x), _shape(s), _shape(b))
    y = np.multiply(x, _per_channel(s, x.ndim, x.dtype), out=out)
    y += _per_channel(b, x.ndim, x.dtype)
    return y


def relu(x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Caffe2 ``Relu``: ``max(x, 0)``."""
    return np.maximum(x, x.dtype.type(0), out=out)


def sum_shape(*shapes: Shape) -> Shape:
    if not shapes:
        raise Caffe2Error("Sum needs at least one input")
    for s in shapes[1:]:
        if tuple(s) != tuple(shapes[0]):
            raise Caffe2Error(
                f"Sum inputs must have equal shapes, got {[tuple(x) for x in shapes]}"
            )
    return tuple(shapes[0])


def sum_(*xs: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Caffe2 ``Sum``: element-wise sum of equally shaped inputs (no broadcasting)."""
    sum_shape(*(_shape(x) for x in xs))
    y = np.add(xs[0], xs[1], out=out) if len(xs) > 1 else np.array(xs[0], copy=True)
    for x in xs[2:]:
        y += x
    return y


def scale(x: np.ndarray, *, scale: float = 1.0, out: np.ndarray | None = None) -> np.ndarray:
    """Caffe2 ``Scale``: ``Y = scale * X`` with ``scale`` a float32 argument."""
    return np.multiply(x, x.dtype.type(float32_arg(scale)), out=out)


def _legacy_broadcast(a_shape: Shape, b_shape: Shape, broadcast: int, axis: int) -> Shape:
    """Caffe2's pre-numpy broadcasting (``broadcast=1``, ``axis``): the shape ``b`` takes."""
    if not broadcast:
        if tuple(a_shape) != tuple(b_shape):
            raise Caffe2Error(
                f"without broadcast=1 the inputs must have equal shapes, got {tuple(a_shape)} "
                f"and {tuple(b_shape)}"
            )
        return tuple(b_shape)
    if len(b_shape) > len(a_shape):
        raise Caffe2Error(
            "If you are doing broadcasting, input1 should have a smaller or equal number of "
            f"dimensions (got {tuple(a_shape)} and {tuple(b_shape)})"
        )
    if axis == -1:
        axis = len(a_shape) - len(b_shape)
    if not 0 <= axis <= len(a_shape) - len(b_shape):
        raise Caffe2Error(f"Broadcast axis should be in [0, A.ndim - B.ndim], but axis = {axis}")
    lead = 0
    while lead < len(b_shape) and b_shape[lead] == 1:
        lead += 1
    end = len(b_shape)
    while end > lead and b_shape[end - 1] == 1:
        end -= 1
    core = tuple(b_shape[lead:end])
    if tuple(a_shape[axis + lead : axis + end]) != core:
        raise Caffe2Error(
            f"Broadcast dimension mismatch: {tuple(b_shape)} does not match {tuple(a_shape)} "
            f"at axis {axis}"
        )
    return (1,) * (axis + lead) + core + (1,) * (len(a_shape) - axis - end)


def binary_shape(a_shape: Shape, b_shape: Shape, *, broadcast: int = 0, axis: int = -1) -> Shape:
    _legacy_broadcast(a_shape, b_shape, broadcast, axis)
    return tuple(a_shape)


def add(a: np.ndarray, b: np.ndarray, *, broadcast: int = 0, axis: int = -1) -> np.ndarray:
    """Caffe2 ``Add`` with its legacy broadcasting: with ``broadcast=1``, ``b``'s dims match
    ``a``'s starting at ``axis`` (``-1``: aligned to the end) and repeat over the others."""
    b2 = b.reshape(_legacy_broadcast(_shape(a), _shape(b), broadcast, axis))
    return a + b2


def div(a: np.ndarray, b: np.ndarray, *, broadcast: int = 0, axis: int = -1) -> np.ndarray:
    """Caffe2 ``Div``: ``a / b`` with the same legacy broadcasting as :func:`add`."""
    b2 = b.reshape(_legacy_broadcast(_shape(a), _shape(b), broadcast, axis))
    return a / b2


def constant_fill(x: np.ndarray, *, value: float = 0.0) -> np.ndarray:
    """Caffe2 ``ConstantFill`` with an input: same shape as the input, every element ``value``
    (float32 argument), in the input's float dtype."""
    return np.full(x.shape, float32_arg(value), dtype=x.dtype)


def stop_gradient(x: np.ndarray) -> np.ndarray:
    """Caffe2 ``StopGradient``: identity in the forward pass."""
    return x


def dropout(x: np.ndarray, *, ratio: float = 0.5, is_test: int = 0) -> np.ndarray:
    """Caffe2 ``Dropout``; only the test-mode identity (the original's val/test nets)."""
    if not is_test:
        raise NotImplementedError("training-mode Dropout (a random mask) is not supported")
    return x


# --------------------------------------------------------------------------------------------
# Matrix products, softmax, reductions
# --------------------------------------------------------------------------------------------


def fc_shape(
    x_shape: Shape, w_shape: Shape, b_shape: Shape, *, axis: int = 1, axis_w: int = 1
) -> Shape:
    k = math.prod(x_shape[axis:])
    n = math.prod(w_shape[:axis_w])
    k_w = math.prod(w_shape[axis_w:])
    if k != k_w:
        raise Caffe2Error(
            f"FC dimension mismatch: input {tuple(x_shape)} flattened at axis {axis} has {k} "
            f"features, weight {tuple(w_shape)} flattened at axis {axis_w} has {k_w}"
        )
    if tuple(b_shape) != (n,):
        raise Caffe2Error(f"FC bias has shape {tuple(b_shape)}, expected ({n},)")
    return (*x_shape[:axis], n)


def fc(x: np.ndarray, w: np.ndarray, b: np.ndarray, *, axis: int = 1, axis_w: int = 1):
    """Caffe2 ``FC``: ``X`` flattened to 2-D at ``axis``, ``W`` at ``axis_w``;
    ``Y = X W^T + b``."""
    out = fc_shape(_shape(x), _shape(w), _shape(b), axis=axis, axis_w=axis_w)
    dtype = np.result_type(x, w)
    x2 = x.reshape(math.prod(x.shape[:axis]), -1)
    w2 = w.reshape(math.prod(w.shape[:axis_w]), -1).astype(dtype, copy=False)
    y = x2 @ w2.T
    y += b.astype(dtype, copy=False)
    return y.reshape(out)


def batch_mat_mul_shape(a_shape: Shape, b_shape: Shape, *, trans_a=0, trans_b=0) -> Shape:
    if len(a_shape) < 2 or len(a_shape) != len(b_shape) or a_shape[:-2] != b_shape[:-2]:
        raise Caffe2Error(
            f"BatchMatMul needs inputs with equal batch dims, got {tuple(a_shape)} and "
            f"{tuple(b_shape)}"
        )
    m, k = (a_shape[-1], a_shape[-2]) if trans_a else (a_shape[-2], a_shape[-1])
    k2, n = (b_shape[-1], b_shape[-2]) if trans_b else (b_shape[-2], b_shape[-1])
    if k != k2:
        raise Caffe2Error(
            f"BatchMatMul inner dimensions differ: {tuple(a_shape)} (trans_a={trans_a}) and "
            f"{tuple(b_shape)} (trans_b={trans_b})"
        )
    return (*a_shape[:-2], m, n)


def batch_mat_mul(a: np.ndarray, b: np.ndarray, *, trans_a: int = 0, trans_b: int = 0):
    """Caffe2 ``BatchMatMul``: ``Y[i] = op(A[i]) @ op(B[i])``; ``op`` transposes the last two
    dims when ``trans_a`` / ``trans_b`` is set."""
    batch_mat_mul_shape(_shape(a), _shape(b), trans_a=trans_a, trans_b=trans_b)
    a2 = np.swapaxes(a, -1, -2) if trans_a else a
    b2 = np.swapaxes(b, -1, -2) if trans_b else b
    return np.matmul(a2, b2)


def _canonical_axis(axis: int, ndim: int, op: str) -> int:
    if not -ndim <= axis < ndim:
        raise Caffe2Error(f"{op} axis {axis} is out of range for a {ndim}-D input")
    return axis % ndim


def softmax(x: np.ndarray, *, axis: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """Caffe2 ``Softmax``: the input is viewed as 2-D ``(prod(dims[:axis]), prod(dims[axis:]))``
    and normalised over the second factor (max-subtracted for stability)."""
    axis = _canonical_axis(axis, x.ndim, "Softmax")
    x2 = x.reshape(math.prod(x.shape[:axis]), -1)
    e = np.subtract(
        x2, x2.max(axis=1, keepdims=True), out=None if out is None else out.reshape(x2.shape)
    )
    np.exp(e, out=e)
    e /= e.sum(axis=1, keepdims=True)
    return e.reshape(x.shape)


def reduce_back_shape(x_shape: Shape, *, num_reduce_dim: int = 1) -> Shape:
    if not 0 <= num_reduce_dim <= len(x_shape):
        raise Caffe2Error(
            f"num_reduce_dim {num_reduce_dim} is out of range for input shape {tuple(x_shape)}"
        )
    return tuple(x_shape[: len(x_shape) - num_reduce_dim])


def _reduce_back(x: np.ndarray, num_reduce_dim: int, reducer) -> np.ndarray:
    out = reduce_back_shape(_shape(x), num_reduce_dim=num_reduce_dim)
    return reducer(x.reshape(*out, -1), axis=-1)


def reduce_back_mean(x: np.ndarray, *, num_reduce_dim: int = 1) -> np.ndarray:
    """Caffe2 ``ReduceBackMean``: mean over the last ``num_reduce_dim`` dims."""
    return _reduce_back(x, num_reduce_dim, np.mean)


def reduce_back_sum(x: np.ndarray, *, num_reduce_dim: int = 1) -> np.ndarray:
    """Caffe2 ``ReduceBackSum``: sum over the last ``num_reduce_dim`` dims."""
    return _reduce_back(x, num_reduce_dim, np.sum)


# --------------------------------------------------------------------------------------------
# Layout operators
# --------------------------------------------------------------------------------------------


def transpose_shape(x_shape: Shape, *, axes: Sequence[int] | None = None) -> Shape:
    axes = tuple(reversed(range(len(x_shape)))) if not axes else tuple(axes)
    if sorted(axes) != list(range(len(x_shape))):
        raise Caffe2Error(f"Transpose axes {axes} are not a permutation of {len(x_shape)} dims")
    return tuple(x_shape[a] for a in axes)


def transpose(x: np.ndarray, *, axes: Sequence[int] | None = None) -> np.ndarray:
    """Caffe2 ``Transpose``: output dim ``i`` is input dim ``axes[i]`` (default: reversed); the
    result is a new contiguous tensor."""
    transpose_shape(_shape(x), axes=axes)
    return np.ascontiguousarray(np.transpose(x, None if not axes else tuple(axes)))


def reshape_target(in_shape: Shape, shape: Sequence[int]) -> Shape:
    """Caffe2 ``Reshape``'s new shape: ``0`` copies the input dim at that index, one ``-1`` is
    inferred; raises when the sizes do not agree (e.g. the explicit-batch reshape of the
    non-local block fed with a batch it does not divide)."""
    target = [int(d) for d in shape]
    for i, d in enumerate(target):
        if d < -1:
            raise Caffe2Error(f"The dimensions in argument `shape` must not be negative: {shape}")
        if d == 0:
            if i >= len(in_shape):
                raise Caffe2Error(
                    f"Argument `shape` has a dimension set to zero that exceeds the original "
                    f"dimension size (shape {tuple(shape)}, input {tuple(in_shape)})"
                )
            target[i] = in_shape[i]
    unknown = [i for i, d in enumerate(target) if d == -1]
    if len(unknown) > 1:
        raise Caffe2Error(f"Argument `shape` has more than one missing dimension: {shape}")
    total = math.prod(in_shape)
    known = math.prod(d for d in target if d != -1)
    if unknown:
        if known == 0 or total % known:
            raise Caffe2Error(
                f"Argument `shape` does not agree with the input data. ({total} vs {known}): "
                f"cannot reshape {tuple(in_shape)} to {tuple(shape)}"
            )
        target[unknown[0]] = total // known
    elif total != known:
        raise Caffe2Error(
            f"Argument `shape` does not agree with the input data. ({total} != {known}): "
            f"cannot reshape {tuple(in_shape)} to {tuple(shape)}"
        )
    return tuple(target)


def reshape(
    x: np.ndarray, new_shape: np.ndarray | None = None, *, shape: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Caffe2 ``Reshape``: returns ``(reshaped, old_shape)``, ``old_shape`` being the input's
    shape as a 1-D int64 tensor. The new shape comes from ``shape`` or from a second input
    (exactly one of the two); a row-major reinterpretation, no data movement."""
    return (
        x.reshape(_reshape_new_shape(_shape(x), new_shape, shape)),
        np.asarray(x.shape, dtype=np.int64),
    )


def _reshape_new_shape(x_shape: Shape, new_shape, shape) -> Shape:
    if new_shape is not None and shape is not None:
        raise Caffe2Error(
            "New shape is specified by the input blob, do not pass in the argument `shape`."
        )
    if new_shape is None and shape is None:
        raise Caffe2Error("New shape must be specified by either the input blob or the argument.")
    requested = shape if shape is not None else [int(d) for d in np.asarray(new_shape).ravel()]
    return reshape_target(x_shape, requested)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

# Operators whose ``out=`` may be their first input (same shape and dtype as the output).
ELEMENTWISE_OUT = frozenset({"AffineNd", "Relu", "Scale", "Softmax", "SpatialBN", "Sum"})

OPERATORS: dict[str, Callable[..., np.ndarray | tuple[np.ndarray, ...]]] = {
    "Add": add,
    "AffineNd": affine_nd,
    "AveragePool": average_pool,
    "BatchMatMul": batch_mat_mul,
    "ConstantFill": constant_fill,
    "Conv": conv,
    "Div": div,
    "Dropout": dropout,
    "FC": fc,
    "MaxPool": max_pool,
    "ReduceBackMean": reduce_back_mean,
    "ReduceBackSum": reduce_back_sum,
    "Relu": relu,
    "Reshape": reshape,
    "Scale": scale,
    "Softmax": softmax,
    "SpatialBN": spatial_bn,
    "StopGradient": stop_gradient,
    "Sum": sum_,
    "Transpose": transpose,
}


def _same(x_shape: Shape, **_: object) -> Shape:
    return tuple(x_shape)


def _reshape_rule(x_shape: Shape, new_shape=None, *, shape=None) -> tuple[Shape, np.ndarray]:
    return _reshape_new_shape(x_shape, new_shape, shape), np.asarray(x_shape, dtype=np.int64)


def _softmax_rule(x_shape: Shape, *, axis: int = 1) -> Shape:
    _canonical_axis(axis, len(x_shape), "Softmax")
    return tuple(x_shape)


# Output shapes from input shapes (an int64 shape blob is passed as its value), with the checks
# the operators make. Used by :meth:`Graph.infer_shapes`; the operators call the same helpers.
SHAPE_RULES: dict[str, Callable[..., Shape | tuple]] = {
    "Add": binary_shape,
    "AffineNd": affine_nd_shape,
    "AveragePool": pool_shape,
    "BatchMatMul": batch_mat_mul_shape,
    "ConstantFill": _same,
    "Conv": conv_shape,
    "Div": binary_shape,
    "Dropout": _same,
    "FC": fc_shape,
    "MaxPool": pool_shape,
    "ReduceBackMean": reduce_back_shape,
    "ReduceBackSum": reduce_back_shape,
    "Relu": _same,
    "Reshape": _reshape_rule,
    "Scale": _same,
    "Softmax": _softmax_rule,
    "SpatialBN": spatial_bn_shape,
    "StopGradient": _same,
    "Sum": sum_shape,
    "Transpose": transpose_shape,
}
