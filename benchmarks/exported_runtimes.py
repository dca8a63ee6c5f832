"""The exported formats as benchmark variants, made the way ``vnl-export`` makes them.

:func:`export_variant` exports a model with the package's own
:func:`nonlocal_net.engine.export.export_model` (which also checks the written file against
strict PyTorch) into a directory the caller owns and removes, and returns a callable that runs
the written file in its runtime:

* ``onnxruntime``: the ``.onnx`` file in an ``onnxruntime.InferenceSession`` on the
  ``CPUExecutionProvider`` with as many intra-op threads as torch uses (and no spinning of idle
  threads, which would take CPU from the variant timed next in the round-robin);
* ``torch.export .pt2``: ``torch.export.load(file).module()``.

A variant that cannot be made here (its packages are not installed, the export refused) comes
back with ``run`` None and the reason, for an "unmeasured" row.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nonlocal_net.engine.export import FORMATS, ExportError, export_model
from nonlocal_net.utils.io import pid_alive

# benchmark row label -> output suffix of vnl-export
EXPORTED = {"onnxruntime": ".onnx", "torch.export .pt2": ".pt2"}
TEMP_PREFIX = "vnl-bench-export-"

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExportedVariant:
    """A written export and how to run it; ``run`` is None when it could not be made."""

    run: Runner | None
    note: str  # how it was made (export time, check error, threads), or why not


def missing_packages(suffix: str) -> str | None:
    """Why the format of ``suffix`` cannot be exported here (its packages), or None."""
    missing = [m for m in FORMATS[suffix].requires if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    verb = "is" if len(missing) == 1 else "are"
    return f"{', '.join(missing)} {verb} not installed (pip install '.[onnx]')"


def _onnxruntime_runner(path: Path) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        (out,) = session.run(None, {name: x.detach().cpu().numpy()})
        return torch.from_numpy(out)

    return run


def _pt2_runner(path: Path) -> Runner:
    return torch.export.load(path).module()


def export_variant(model: nn.Module, label: str, directory: Path) -> ExportedVariant:
    """Export ``model`` (a val- or test-split model with its ``cfg``; left untouched) as the
    ``label`` variant (a key of :data:`EXPORTED`) into ``directory`` and load it back."""
    suffix = EXPORTED[label]
    why = missing_packages(suffix)
    if why is not None:
        return ExportedVariant(None, f"unmeasured: {why}")
    path = directory / f"model{suffix}"
    start = time.perf_counter()
    try:
        result = export_model(model, path)
    except ExportError as e:
        return ExportedVariant(None, f"unmeasured: {e}")
    seconds = time.perf_counter() - start
    if suffix == ".onnx":
        run = _onnxruntime_runner(path)
        how = f"opset {result.opset}, {torch.get_num_threads()} intra-op threads, "
    else:
        run = _pt2_runner(path)
        how = ""
    return ExportedVariant(run, f"{how}export {seconds:.0f} s")


def remove_stale_directories() -> list[str]:
    """Remove the export directories of benchmark runs that died without cleaning up (their
    process is gone); the names removed."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        pid = path.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


@contextmanager
def export_directory() -> Iterator[Path]:
    """A temporary directory for exported files, removed on exit (Ctrl-C and, with
    :func:`nonlocal_net.utils.io.install_signal_cleanup`, SIGTERM included)."""
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as name:
        yield Path(name)
