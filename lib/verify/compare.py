"""Layer-by-layer comparison of the PyTorch port with the reference executor of the original.

The reference (:mod:`nonlocal_net.reference`) runs the original Caffe2 graph in float64 on the
checkpoint's own blobs; the port runs the converted model on the same clips in float32 and/or
float64. Every tapped layer of the graph (after the stem, pool1, every residual block, pool2, every
non-local block, pool5, ``pred``, ``softmax``) is paired with the port module that computes the
same tensor; forward hooks on those modules compare each output with the reference as soon as it
is computed, so nothing but the numbers is kept.

Error measure, per layer: ``max_abs = max |port - ref|`` over the whole tensor and
``rel = max_abs / max |ref|`` (the largest error relative to the largest reference magnitude of
that layer; unlike an element-wise relative error it is not inflated by values near zero). A
layer fails when ``rel > tol``, when its shape differs from the reference (``rel = inf``), when
its output is not finite, or when the port never computed it.

On CUDA, TF32 is switched off for the duration of a comparison (PyTorch allows it for cuDNN
convolutions by default on Ampere and later; the original ran full fp32).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..reference import Graph, run
from .pairing import port_module

__all__ = [
    "DEFAULT_TOLERANCE",
    "DTYPES",
    "LayerDiff",
    "ParityReport",
    "PrecisionRun",
    "compare_layers",
    "compare_port",
    "no_tf32",
    "reference_outputs",
]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Largest per-layer relative error accepted by default. Measured on every released architecture
# with realistic synthetic weights (benchmarks/parity.md): float32 stays below 6e-6 and float64
# below 2e-14; the defaults leave a margin for real weights (larger logits, sharper attention)
# while every porting mistake of the mutation tests gives 4e-3 or more at its layer.
DEFAULT_TOLERANCE = {"float32": 1e-4, "float64": 1e-10}


@dataclass(frozen=True)
class LayerDiff:
    """The comparison of one layer output.

    Attributes:
        label: the tapped layer (original layer), e.g. ``res_conv1_bn``, ``res3_1``,
            ``nonlocal_conv3_1``, ``pool5``, ``softmax``.
        blob: the original blob holding it.
        module: the port module whose output was compared (``""`` = the model's output;
            ``None`` = computed from the model's output, see ``note``).
        shape: the reference tensor's shape.
        port_shape: the port tensor's shape (``None`` if the port never produced it).
        max_abs: ``max |port - ref|`` (``inf`` on a shape mismatch, ``nan`` if missing).
        ref_max: ``max |ref|``.
        rel: ``max_abs / ref_max`` (``max_abs`` itself if the reference is all zeros).
        tol: the tolerance the layer was judged with.
        note: why a layer failed other than by its error, or how its port value was obtained.
    """

    label: str
    blob: str
    module: str | None
    shape: tuple[int, ...]
    port_shape: tuple[int, ...] | None
    max_abs: float
    ref_max: float
    rel: float
    tol: float
    note: str = ""

    @property
    def ok(self) -> bool:
        # written so that nan fails
        return bool(self.rel <= self.tol)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "blob": self.blob,
            "module": self.module,
            "shape": list(self.shape),
            "port_shape": None if self.port_shape is None else list(self.port_shape),
            "max_abs": _json_float(self.max_abs),
            "ref_max": _json_float(self.ref_max),
            "rel": _json_float(self.rel),
            "tol": self.tol,
            "ok": self.ok,
            "note": self.note,
        }


@dataclass
class PrecisionRun:
    """The port's run in one dtype, compared layer by layer."""

    dtype: str
    tol: float
    layers: list[LayerDiff]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(layer.ok for layer in self.layers)

    @property
    def first_failure(self) -> LayerDiff | None:
        return next((layer for layer in self.layers if not layer.ok), None)

    @property
    def max_rel(self) -> float:
        """The largest relative error over all layers (``nan`` propagates)."""
        values = [layer.rel for layer in self.layers]
        if any(math.isnan(v) for v in values):
            return math.nan
        return max(values, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_failure
        return {
            "dtype": self.dtype,
            "tol": self.tol,
            "ok": self.ok,
            "max_rel": _json_float(self.max_rel),
            "first_failure": None if first is None else first.label,
            "seconds": round(self.seconds, 3),
            "layers": [layer.to_dict() for layer in self.layers],
        }


@dataclass
class ParityReport:
    """Result of :func:`compare_layers`: one :class:`PrecisionRun` per port dtype."""

    description: str
    split: str
    input_shape: tuple[int, ...]
    reference_seconds: float
    runs: list[PrecisionRun]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.runs)

    @property
    def labels(self) -> list[str]:
        return [layer.label for layer in self.runs[0].layers] if self.runs else []

    @property
    def first_failure(self) -> str | None:
        """The first layer, in execution order, that fails in any of the runs."""
        failed = {layer.label for r in self.runs for layer in r.layers if not layer.ok}
        return next((label for label in self.labels if label in failed), None)

    def run(self, dtype: str) -> PrecisionRun:
        for r in self.runs:
            if r.dtype == dtype:
                return r
        raise KeyError(f"no {dtype} run in this report (runs: {[r.dtype for r in self.runs]})")

    def verdict(self) -> str:
        """One line: PASS with the largest errors, or FAIL naming the first diverging layer."""
        summary = "; ".join(
            f"{r.dtype} max rel {_fmt(r.max_rel)} (tol {r.tol:.0e})" for r in self.runs
        )
        first = self.first_failure
        if first is None:
            return f"PASS: all {len(self.labels)} layers agree with the reference; {summary}"
        details = []
        for r in self.runs:
            layer = next(x for x in r.layers if x.label == first)
            if not layer.ok:
                why = layer.note or f"rel {_fmt(layer.rel)} > tol {layer.tol:.0e}"
                details.append(f"{r.dtype}: {why}")
        module = next(x.module for x in self.runs[0].layers if x.label == first)
        where = f" (port module {module!r})" if module else ""
        return f"FAIL: first diverging layer {first}{where}: {'; '.join(details)}; {summary}"

    def format_table(self) -> str:
        """A per-layer table, one column pair (max abs, rel) per dtype."""
        head = ["layer", "port module", "shape"]
        for r in self.runs:
            head += [f"{r.dtype} max abs", f"{r.dtype} rel"]
        head.append("status")
        rows = [head]
        first = self.first_failure
        for i, label in enumerate(self.labels):
            layers = [r.layers[i] for r in self.runs]
            base = layers[0]
            module = (
                "(model output)" if base.module == "" else (base.module or "(softmax of output)")
            )
            row = [label, module, _fmt_shape(base.shape)]
            for layer in layers:
                row += [_fmt(layer.max_abs), _fmt(layer.rel)]
            status = "ok" if all(x.ok for x in layers) else "FAIL"
            if label == first:
                status += " <- first"
            notes = sorted({x.note for x in layers if x.note and not x.ok})
            if notes:
                status += " (" + "; ".join(notes) + ")"
            row.append(status)
            rows.append(row)
        widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "split": self.split,
            "input_shape": list(self.input_shape),
            "ok": self.ok,
            "first_failure": self.first_failure,
            "verdict": self.verdict(),
            "reference_seconds": round(self.reference_seconds, 3),
            "info": self.info,
            "runs": [r.to_dict() for r in self.runs],
        }


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return f"{value:.2e}"


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Full fp32 matmuls and cuDNN convolutions on CUDA for the duration (restored afterwards).

    Uses the per-backend ``fp32_precision`` settings where this PyTorch has them (reading the
    legacy ``allow_tf32`` flags after they were set raises there), else the legacy flags.
    """
    matmul = torch.backends.cuda.matmul
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
        return
    saved_flags = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_flags


def reference_outputs(
    graph: Graph,
    blobs: Mapping[str, Any],
    clips: np.ndarray,
    *,
    batch_size: int | str | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Every tap of ``graph`` computed by the float64 reference executor on ``blobs``.

    ``batch_size`` is the executor's: ``None`` = the real batch (the correct computation),
    ``"config"`` = what the original computes with its config batch baked into the reshapes.
    """
    return run(graph, blobs, clips, keep="taps", batch_size=batch_size, progress=progress)


def _layer_diff(label, blob, module, ref: np.ndarray, port: torch.Tensor | None, tol, note=""):
    ref_t = torch.from_numpy(np.asarray(ref, dtype=np.float64))
    ref_max = float(ref_t.abs().max()) if ref_t.numel() else 0.0
    shape = tuple(ref_t.shape)
    if port is None:
        note = note or "not computed by the port"
        return LayerDiff(label, blob, module, shape, None, math.nan, ref_max, math.nan, tol, note)
    port_shape = tuple(port.shape)
    if port_shape != shape:
        note = f"shape {_fmt_shape(port_shape)} vs reference {_fmt_shape(shape)}"
        return LayerDiff(
            label, blob, module, shape, port_shape, math.inf, ref_max, math.inf, tol, note
        )
    # one float64 copy of the port's tensor, then in place (the port's own tensor is not touched)
    diff = port.detach().to("cpu", torch.float64, copy=True)
    max_abs = float(diff.sub_(ref_t).abs_().max()) if diff.numel() else 0.0
    if not math.isfinite(max_abs):  # nan and inf in the port's output propagate here
        max_abs = math.nan
        note = note or "non-finite values"
    rel = max_abs / ref_max if ref_max > 0 else max_abs
    return LayerDiff(label, blob, module, shape, port_shape, max_abs, ref_max, rel, tol, note)


def compare_port(
    model: nn.Module,
    graph: Graph,
    reference: Mapping[str, np.ndarray],
    clips: np.ndarray | torch.Tensor,
    *,
    dtype: str = "float32",
    tol: float | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> PrecisionRun:
    """Run ``model`` on ``clips`` in ``dtype`` and compare every tap with ``reference``.

    The model is converted to ``dtype`` and ``device`` for the run and put back to its dtype
    and device afterwards (float32 -> float64 -> float32 is exact).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tol = DEFAULT_TOLERANCE[dtype] if tol is None else float(tol)
    taps = graph.taps
    modules = {c.label: port_module(c.label, graph.split) for c in taps}
    missing = [c.label for c in taps if c.label not in reference]
    if missing:
        raise KeyError(f"reference outputs lack taps: {', '.join(missing)}")
    results: dict[str, LayerDiff] = {}
    hooks = []
    bar = tqdm(total=len(taps), desc=f"port {dtype}", unit="layer", disable=not progress)

    def make_hook(c):
        def hook(_module, _inputs, output):
            results[c.label] = _layer_diff(
                c.label, c.blob, modules[c.label], reference[c.label], output, tol
            )
            bar.update(1)

        return hook

    param = next(iter(model.parameters()), None)
    old_dtype = param.dtype if param is not None else torch.float32
    old_device = param.device if param is not None else torch.device("cpu")
    try:
        for c in taps:
            path = modules[c.label]
            if path is None:
                continue
            try:
                module = model.get_submodule(path) if path else model
            except AttributeError:
                note = f"the port has no module {path!r}"
                results[c.label] = _layer_diff(
                    c.label, c.blob, path, reference[c.label], None, tol, note
                )
                continue
            hooks.append(module.register_forward_hook(make_hook(c)))
        model.to(device=device, dtype=DTYPES[dtype])
        x = torch.as_tensor(clips).to(device=device, dtype=DTYPES[dtype])
        start = time.perf_counter()
        with torch.no_grad(), no_tf32():
            output = model(x)
        seconds = time.perf_counter() - start
    finally:
        for h in hooks:
            h.remove()
        bar.close()
        model.to(device=old_device, dtype=old_dtype)
    for c in taps:
        if modules[c.label] is None and c.label == "softmax":
            # the val net's softmax: the port returns the logits and leaves the softmax to
            # the caller
            results[c.label] = _layer_diff(
                c.label, c.blob, None, reference[c.label], F.softmax(output, dim=1), tol
            )
    layers = [
        results.get(c.label)
        or _layer_diff(c.label, c.blob, modules[c.label], reference[c.label], None, tol)
        for c in taps
    ]
    return PrecisionRun(dtype, tol, layers, seconds)


def compare_layers(
    model: nn.Module,
    graph: Graph,
    blobs: Mapping[str, Any],
    clips: np.ndarray,
    *,
    dtypes: Sequence[str] = ("float32", "float64"),
    tol: Mapping[str, float] | None = None,
    device: str | torch.device = "cpu",
    reference_batch_size: int | str | None = None,
    progress: bool = False,
    description: str = "",
) -> ParityReport:
    """Compare ``model`` (the port, e.g. a converted checkpoint) with the original's graph run
    by the reference executor on the Caffe2 ``blobs``, layer by layer, on ``clips``.

    Args:
        model: the PyTorch model, built for ``graph.split`` (eval mode is enforced).
        graph: :func:`nonlocal_net.reference.build_graph` of the same config and split.
        blobs: the Caffe2 checkpoint's blobs (name -> array), e.g. ``read_caffe2_pkl(p).blobs``.
        clips: ``(N, 3, T, H, W)`` normalised clips; both sides see the same values (the
            reference in float64, the port in each of ``dtypes``).
        dtypes: the port's runs, ``"float32"`` and/or ``"float64"``.
        tol: per-dtype tolerance on the per-layer relative error (default
            :data:`DEFAULT_TOLERANCE`).
        device: where the port runs (TF32 is disabled on CUDA).
        reference_batch_size: the executor's ``batch_size``: ``None`` (the real batch, correct)
            or ``"config"`` to show what the original computes with its config batch.
        progress: progress bars for both sides.
        description: what is compared (for the report).
    """
    split = getattr(model, "split", None)
    if split is not None and split != graph.split:
        raise ValueError(f"the model is built for split {split!r}, the graph for {graph.split!r}")
    tolerances = dict(DEFAULT_TOLERANCE)
    tolerances.update(tol or {})
    clips = np.asarray(clips)
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        reference = reference_outputs(
            graph, blobs, clips, batch_size=reference_batch_size, progress=progress
        )
        ref_seconds = time.perf_counter() - start
        logger.info("reference (float64, NumPy): %.1f s", ref_seconds)
        runs = []
        for dtype in dtypes:
            r = compare_port(
                model,
                graph,
                reference,
                clips,
                dtype=dtype,
                tol=tolerances[dtype],
                device=device,
                progress=progress,
            )
            logger.info(
                "port %s on %s: %.1f s, max rel %s", dtype, device, r.seconds, _fmt(r.max_rel)
            )
            runs.append(r)
    finally:
        model.train(was_training)
    return ParityReport(
        description=description,
        split=graph.split,
        input_shape=tuple(clips.shape),
        reference_seconds=ref_seconds,
        runs=runs,
        info={"device": str(device), "reference_batch_size": reference_batch_size or "real"},
    )
