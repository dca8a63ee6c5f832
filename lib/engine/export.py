"""Export a model to a deployment format and prove the exported file computes what strict
PyTorch computes.

Two formats, chosen by the output's suffix (:data:`FORMATS`):

* ``.onnx``: the dynamo-based ONNX exporter (``torch.onnx.export(..., dynamo=True)``) at its
  current default opset, one self-contained file (weights inside, no ``.data`` sidecar), input
  ``clips`` of shape ``(batch, 3, T, H, W)`` with a dynamic batch, output ``scores``. Needs the
  optional extra ``pip install video-nonlocal-net[onnx]`` (``onnx``, ``onnxscript``,
  ``onnxruntime``); the check runs the file with onnxruntime on the CPU.
* ``.pt2``: ``torch.export`` (an ``ExportedProgram`` saved with ``torch.export.save``), dynamic
  batch; the check runs ``torch.export.load(file).module()``.

:func:`export_model` traces the model in eval mode on the CPU in float32 (the original's
arithmetic, exactly the model ``vnl-test`` runs by default), writes the file under a temporary
name, loads the *written file* back with its runtime, runs it on a random clip of a batch size
other than the traced one (which proves the batch is dynamic) and compares with the strict model:
max |exported - strict| / max |strict| over the outputs. Above :data:`MAX_REL_ERROR` (or
non-finite), the temporary file is removed and :class:`ExportError` raised; otherwise it is
renamed into place. Both files carry a marker (ONNX metadata, an extra file in the ``.pt2``
archive) so that a later export may replace them without ``--overwrite``
(:func:`is_exported_file`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.io import atomic_path
from ..version import __version__

__all__ = [
    "FORMATS",
    "MAX_REL_ERROR",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "clip_shape",
    "export_format",
    "export_model",
    "is_exported_file",
    "max_relative_error",
]

logger = logging.getLogger(__name__)

# The documented bound on max |exported - strict| / max |strict|: both runtimes compute the same
# float32 graph with other kernels (other summation orders); see benchmarks/inference.md.
MAX_REL_ERROR = 1e-4
MARKER = "nonlocal_net.export"  # ONNX metadata key / .pt2 extra file name
INPUT_NAME, OUTPUT_NAME = "clips", "scores"
TRACE_BATCH = 2  # batch of the example the graph is traced with (1 would be specialised)
CHECK_BATCH = 1  # batch of the random clip the written file is checked on


class ExportError(ValueError):
    """An export that cannot be made or that does not reproduce the strict model."""


@dataclass(frozen=True)
class ExportOptions:
    """How :func:`export_model` exports and checks.

    Attributes:
        max_rel_error: refuse the file above this max relative error (default
            :data:`MAX_REL_ERROR`).
        seed: seed of the random example and check clips.
        check_batch: batch size of the check clip (any size other than :data:`TRACE_BATCH`
            also proves the dynamic batch).
    """

    max_rel_error: float = MAX_REL_ERROR
    seed: int = 0
    check_batch: int = CHECK_BATCH


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote and how close it came to strict PyTorch."""

    path: str
    format: str
    runtime: str
    input_shape: tuple[int | str, ...]  # ("batch", 3, T, H, W)
    max_rel_error: float
    bound: float
    opset: int | None  # ONNX only


Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExportFormat:
    """One output format: how to write it, how to run the written file, what it needs."""

    name: str
    suffix: str
    runtime: str
    requires: tuple[str, ...]  # importable modules
    write: Callable[[nn.Module, torch.Tensor, Path, dict[str, Any]], int | None]
    load: Callable[[Path], Runner]
    is_own: Callable[[str], bool]


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


# ------------------------------------------------------------------------------------- .pt2
def _write_pt2(model: nn.Module, example: torch.Tensor, path: Path, marker: dict) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch(), strict=False)
    torch.export.save(program, path, extra_files={MARKER: json.dumps(marker)})


def _load_pt2(path: Path) -> Runner:
    module = torch.export.load(path).module()
    return lambda x: module(x)


def _is_pt2(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(f"/extra/{MARKER}") for n in z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


# ------------------------------------------------------------------------------------ .onnx
def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, marker: dict) -> int:
    progress = io.StringIO()  # the exporter prints its steps; they go to the debug log
    with contextlib.redirect_stdout(progress), _quiet_exporter_logs(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecations inside the exporter
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=_dynamic_batch(),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            external_data=False,
            verbose=False,
        )
    logger.debug("torch.onnx.export: %s", progress.getvalue().strip())
    program.model.metadata_props[MARKER] = json.dumps(marker)
    program.save(os.fspath(path), external_data=False)
    return int(program.model.opset_imports.get("", 0)) or None


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """The ONNX optimiser logs every rewrite at INFO; shown only with ``-v`` (DEBUG)."""
    names = ("onnx_ir", "onnxscript")
    saved = {n: logging.getLogger(n).level for n in names}
    if not logger.isEnabledFor(logging.DEBUG):
        for name in names:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _load_onnx(path: Path) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        (out,) = session.run(None, {name: x.detach().cpu().numpy()})
        return torch.from_numpy(out)

    return run


def _is_onnx(path: str) -> bool:
    if importlib.util.find_spec("onnx") is None:
        return False
    import onnx

    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:  # any decoding error: not an ONNX file
        return False
    return any(p.key == MARKER for p in proto.metadata_props)


FORMATS: dict[str, ExportFormat] = {
    ".onnx": ExportFormat(
        "ONNX",
        ".onnx",
        "onnxruntime (CPU)",
        ("onnx", "onnxscript", "onnxruntime"),
        _write_onnx,
        _load_onnx,
        _is_onnx,
    ),
    ".pt2": ExportFormat(
        "torch.export", ".pt2", "torch.export.load", (), _write_pt2, _load_pt2, _is_pt2
    ),
}


def export_format(path: str | os.PathLike) -> ExportFormat:
    """The format of an output name, by suffix; raises :class:`ExportError` for another suffix
    and for a format whose packages are not installed (checked before any model is built)."""
    suffix = Path(path).suffix.lower()
    fmt = FORMATS.get(suffix)
    if fmt is None:
        raise ExportError(
            f"{os.fspath(path)}: unknown export format {suffix or '(no suffix)'!r}; "
            f"the output must end in {' or '.join(FORMATS)}"
        )
    missing = [m for m in fmt.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"{os.fspath(path)}: {fmt.name} export needs {', '.join(missing)}: "
            f"pip install 'video-nonlocal-net[onnx]'"
        )
    return fmt


def is_exported_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file :func:`export_model` wrote (its marker is present): what
    ``vnl-export`` replaces without ``--overwrite``."""
    path = os.fspath(path)
    return any(fmt.is_own(path) for fmt in FORMATS.values())


def clip_shape(model: nn.Module, batch: int) -> tuple[int, int, int, int, int]:
    """The input of ``model``'s split: ``(batch, 3, TRAIN.VIDEO_LENGTH, crop, crop)`` with the
    crop ``TRAIN.CROP_SIZE`` (224) for the FC head (``val``) and ``TEST.SCALE`` (256) for the
    fully-convolutional head (``test``), as the original's test feeds them."""
    cfg = model.cfg
    crop = cfg.TEST.SCALE if getattr(model, "split", "test") == "test" else cfg.TRAIN.CROP_SIZE
    return (batch, 3, int(cfg.TRAIN.VIDEO_LENGTH), int(crop), int(crop))


def max_relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (``inf`` for a shape mismatch or non-finite values)."""
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return float("inf")
    scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def export_model(
    model: nn.Module, output: str | os.PathLike, options: ExportOptions | None = None
) -> ExportResult:
    """Export ``model`` (a val- or test-split model with its ``cfg``) to ``output`` (``.onnx``
    or ``.pt2``, see the module docstring), check the written file against strict PyTorch and
    return the result. Raises :class:`ExportError` (nothing left at ``output``) when the file's
    max relative error exceeds ``options.max_rel_error`` or is non-finite. ``output`` is written
    atomically; the caller checks and locks the destination."""
    options = options or ExportOptions()
    fmt = export_format(output)
    split = getattr(model, "split", "test")
    if split == "train":
        raise ExportError("export needs a val- or test-split model, got split 'train'")
    strict = copy.deepcopy(model).eval().to("cpu", torch.float32)
    generator = torch.Generator().manual_seed(options.seed)
    example = torch.randn(clip_shape(strict, TRACE_BATCH), generator=generator)
    clip = torch.randn(clip_shape(strict, options.check_batch), generator=generator)
    with torch.no_grad():
        ref = strict(clip)
    if not torch.isfinite(ref).all():
        raise ExportError(
            "the strict model's outputs are not finite on a random clip: the weights are broken; "
            "nothing exported"
        )
    marker = {"version": __version__, "split": split, "format": fmt.name}
    with atomic_path(output, suffix=fmt.suffix) as tmp:
        logger.info("exporting the %s-split model to %s (%s)", split, os.fspath(output), fmt.name)
        opset = fmt.write(strict, example, tmp, marker)
        with torch.no_grad():
            out = fmt.load(tmp)(clip)
        error = max_relative_error(out, ref)
        logger.info("%s: max relative error %.3g vs strict PyTorch", fmt.runtime, error)
        if not error <= options.max_rel_error:
            raise ExportError(
                f"{os.fspath(output)}: the exported model ({fmt.runtime}) differs from strict "
                f"PyTorch by a max relative error of {error:.3g} on a random clip (bound "
                f"{options.max_rel_error:.3g}); nothing written"
            )
    return ExportResult(
        path=os.fspath(output),
        format=fmt.name,
        runtime=fmt.runtime,
        input_shape=("batch", *clip_shape(strict, 1)[1:]),
        max_rel_error=error,
        bound=options.max_rel_error,
        opset=opset,
    )
