"""Run a :class:`~nonlocal_net.reference.graph.Graph` on Caffe2 blobs with NumPy.

The blobs are the checkpoint's own arrays (``name -> ndarray``, e.g. the inner ``'blobs'`` dict of a
released ``.pkl``): no converter and no PyTorch module is involved. Parameters are loaded the way
the original's loader loads them into a test net (its ``lib/utils/checkpoints.py``): by exact name,
with its classifier rule (a ``pred*`` blob whose element count matches is reshaped, so ``pred_w``
may be ``(K, 2048)`` or ``(K, 2048, 1, 1, 1)`` for either split); extra blobs (``lr``,
``model_iter``, ``*_momentum``, ...) are ignored.

Memory: a value is freed after its last reader unless it is to be returned, and element-wise ops
write into the buffer of an input whose value is dead (as Caffe2's in-place ops do), so a
128-frame float64 forward stays under 2 GiB at batch 1 with ``keep=None``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
from tqdm import tqdm

from .graph import DATA, Graph, GraphError
from .ops import ELEMENTWISE_OUT, OPERATORS, Caffe2Error, release_scratch

__all__ = ["ParameterError", "load_params", "run"]

logger = logging.getLogger(__name__)

Keep = Literal["taps", "all"] | Iterable[str] | None


class ParameterError(Caffe2Error, KeyError):
    """Missing or mis-shaped parameter blobs; the message names every offending blob."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def load_params(
    graph: Graph,
    blobs: Mapping[str, object],
    dtype: np.dtype | type = np.float64,
    names: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """The graph's parameters (or those in ``names``) from ``blobs``, cast to ``dtype``.

    Applies the original loader's classifier rule: a blob whose name contains ``pred`` and
    whose element count equals the net's is reshaped to the net's shape. Raises
    :class:`ParameterError` naming every missing blob and every blob of the wrong shape.
    """
    wanted = graph.param_shapes
    if names is not None:
        names = set(names)
        wanted = {k: v for k, v in wanted.items() if k in names}
    out: dict[str, np.ndarray] = {}
    missing: list[str] = []
    wrong: list[str] = []
    for name, shape in wanted.items():
        if name not in blobs:
            missing.append(name)
            continue
        value = np.asarray(blobs[name])
        if not np.issubdtype(value.dtype, np.number):
            wrong.append(f"{name}: not a numeric array (dtype {value.dtype})")
            continue
        if value.shape != shape:
            if "pred" in name and value.size == math.prod(shape):
                value = value.reshape(shape)
            else:
                hint = (
                    " (a different class count: the original's loader would skip it and keep "
                    "the initialiser)"
                    if "pred" in name
                    else ""
                )
                wrong.append(f"{name}: shape {value.shape}, expected {shape}{hint}")
                continue
        out[name] = value.astype(dtype, copy=True)
    if missing or wrong:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing blob(s): {', '.join(missing[:10])}")
            if len(missing) > 10:
                lines[-1] += f", ... ({len(missing) - 10} more)"
        if wrong:
            lines.append(f"{len(wrong)} blob(s) of the wrong shape: " + "; ".join(wrong[:10]))
        raise ParameterError(
            f"the blobs do not fit the original's {graph.split} net "
            f"({graph.cfg.MODEL.MODEL_NAME}, arc {graph.cfg.MODEL.VIDEO_ARC_CHOICE}, depth "
            f"{graph.cfg.MODEL.DEPTH}): " + "\n".join(lines)
        )
    return out


def _resolve_batch(graph: Graph, batch_size: int | str | None, real: int) -> int:
    if batch_size is None or batch_size == "real":
        return real
    if batch_size == "config":
        return graph.config_batch_size
    if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0:
        return batch_size
    raise ValueError(
        f"batch_size must be None, 'real', 'config' or a positive int, got {batch_size!r}"
    )


def _keep_blobs(graph: Graph, keep: Keep, first: int, last: int) -> dict[str, str]:
    """Result key -> blob name for what the caller wants back."""
    in_range = [c for c in graph.taps if first <= c.op_index < last]
    if keep is None:
        return {}
    if keep == "taps":
        return {c.label: c.blob for c in in_range}
    if keep == "all":
        return {name: name for op in graph.ops[first:last] for name in op.outputs}
    if isinstance(keep, str):
        raise ValueError(f"keep must be 'taps', 'all', None or a list of names, got {keep!r}")
    labels = {c.label: c.blob for c in in_range}
    written = {name for op in graph.ops[first:last] for name in op.outputs}
    result = {}
    for key in keep:
        if key in labels:
            result[key] = labels[key]
        elif key in written:
            result[key] = key
        else:
            raise KeyError(
                f"{key!r} is neither a tap label nor a blob written by the ops run "
                f"(taps: {', '.join(labels)})"
            )
    return result


def _donatable(
    env: Mapping[str, np.ndarray],
    op,
    index: int,
    last_read: Mapping[str, int],
    retained: set[str],
    params: Mapping[str, np.ndarray],
) -> bool:
    """Whether the element-wise ``op`` may write into its first input's buffer: the value is not
    read after this op and not returned (or Caffe2 overwrites that very blob, as its in-place
    ops do), it is a parameter of nobody, and no other live blob views the same memory."""
    name = op.inputs[0]
    if name in params or name in op.inputs[1:]:
        return False
    # an op writing the blob it reads (Caffe2 in place) ends the old value's life
    if op.outputs[0] != name and (last_read.get(name, -1) > index or name in retained):
        return False
    buffer = env[name]
    if buffer.base is not None or not buffer.flags.writeable:
        return False
    return not any(np.may_share_memory(buffer, value) for key, value in env.items() if key != name)


def run(
    graph: Graph,
    blobs: Mapping[str, object],
    data: np.ndarray,
    *,
    dtype: np.dtype | type = np.float64,
    keep: Keep = "taps",
    batch_size: int | Literal["real", "config"] | None = None,
    start: str | None = None,
    stop: str | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Run the original net on ``data`` with the checkpoint ``blobs``; return named results.

    Args:
        graph: from :func:`nonlocal_net.reference.build_graph`.
        blobs: checkpoint blobs by original name (NumPy arrays; any float dtype).
        data: the network input ``(N, 3, T, H, W)``, normalised as the original's input op
            does, or, with ``start``, the input of that tap's layer.
        dtype: computation dtype (float64 by default; float32 to mimic the original's fp32).
        keep: what to return besides the net's outputs: ``"taps"`` (every tap label,
            the default), ``None`` (outputs only), ``"all"`` (every blob: large), or a
            list of tap labels and blob names. A blob written several times (Caffe2's
            in-place ops) is returned with its last value. Everything else is freed as soon as
            no later op reads it.
        batch_size: the batch baked into the non-local reshapes. ``None``/``"real"`` (default):
            ``data.shape[0]``, the correct computation. ``"config"``: the original's
            ``TRAIN.BATCH_SIZE / NUM_GPUS``, reproducing what the original computes for another
            batch (it raises when the sizes do not divide and silently mixes clips when they do).
            An int: that number.
        start, stop: tap labels; run only from ``start``'s first op (``data`` is its
            layer input) to ``stop``'s op, inclusive. Only the parameters of those ops are needed.
        progress: show a progress bar over the operators.

    Returns:
        ``{key: array}`` for ``keep`` plus ``pred`` and ``softmax`` when they were computed.

    Raises:
        ParameterError: a parameter blob is missing or has the wrong shape.
        GraphError: an operator rejects its inputs (message names the op and its blobs).
    """
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.number):
        raise TypeError(f"data must be a numeric array, got dtype {data.dtype}")
    if start is None and (data.ndim != 5 or data.shape[1] != 3):
        raise ValueError(f"data must be clips of shape (N, 3, T, H, W), got {data.shape}")
    graph = graph.rebatched(_resolve_batch(graph, batch_size, int(data.shape[0])))
    first, last = graph.op_range(start, stop)
    ops = graph.ops[first:last]
    used = {name for op in ops for name in op.inputs}
    params = load_params(graph, blobs, dtype, names=used & set(graph.param_shapes))
    input_blob = DATA if start is None else graph.tap(start).input
    # Validate the whole range (parameter shapes, reshapes) before any heavy computation.
    graph.infer_shapes(data.shape, {k: v.shape for k, v in params.items()}, start=start, stop=stop)
    wanted = _keep_blobs(graph, keep, first, last)
    for name in graph.outputs:
        if any(name in op.outputs for op in ops):
            wanted.setdefault(name, name)
    retained = set(wanted.values())
    last_read: dict[str, int] = {}
    for i, op in enumerate(ops):
        for name in op.inputs:
            last_read[name] = i

    env: dict[str, np.ndarray] = dict(params)
    env[input_blob] = data.astype(dtype, copy=True)  # ours: its buffer may be reused
    iterator = enumerate(ops)
    if progress:
        iterator = tqdm(iterator, total=len(ops), desc="reference", unit="op")
    try:
        _execute(ops, first, env, last_read, retained, params, iterator)
    finally:
        release_scratch()
    logger.debug("ran %d ops of the %s net", len(ops), graph.split)
    return {key: env[blob] for key, blob in wanted.items()}


def _execute(ops, first, env, last_read, retained, params, iterator) -> None:
    """Run ``ops`` on ``env`` in place, freeing every value after its last reader."""
    for i, op in iterator:
        inputs = [env[name] for name in op.inputs]
        extra = {}
        if op.type in ELEMENTWISE_OUT and _donatable(env, op, i, last_read, retained, params):
            extra["out"] = inputs[0]
        try:
            result = OPERATORS[op.type](*inputs, **op.args, **extra)
        except Caffe2Error as e:
            raise GraphError(f"op #{first + i} {op}: {e}") from e
        results = result if isinstance(result, tuple) else (result,)
        for name, value in zip(op.outputs, results):
            env[name] = value
        for name in set(op.inputs) | set(op.outputs):
            if last_read.get(name, -1) <= i and name not in retained and name in env:
                del env[name]
