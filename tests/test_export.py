"""``vnl-export``: ONNX and ``torch.export`` files of both heads that reproduce strict PyTorch
on clips of any batch size, and the refusals (suffix, missing packages, same file, foreign file,
an export whose error exceeds the bound, a non-finite one)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from eval_helpers import small_cfg

import nonlocal_net as nl
from nonlocal_net.converters.synthetic import load_synthetic_weights
from nonlocal_net.core.weights_file import save_weights_file
from nonlocal_net.engine import export as export_mod
from nonlocal_net.engine.export import FORMATS, clip_shape, is_exported_file, max_relative_error
from nonlocal_net.tools.export_model import main

HAS_ORT = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
needs_ort = pytest.mark.skipif(
    not HAS_ORT, reason="onnx/onnxscript/onnxruntime not installed (pip install '.[onnx]')"
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small converted checkpoint with trained-like synthetic weights."""
    cfg = small_cfg()
    model = load_synthetic_weights(nl.build_model(cfg, split="test"), seed=2)
    path = tmp_path_factory.mktemp("export") / "small.pt"
    save_weights_file(path, model.state_dict(), cfg, {"source": "export test"})
    return path


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _error_line(err: str) -> str:
    (line,) = [x for x in err.splitlines() if x.startswith("vnl-export: error:")]
    return line


def _runner(path, suffix):
    if suffix == ".pt2":
        module = torch.export.load(path).module()
        return lambda x: module(x)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # a dynamic batch dimension
    return lambda x: torch.from_numpy(session.run(None, {"clips": x.numpy()})[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "suffix, split",
    [
        (".pt2", "test"),
        pytest.param(".onnx", "val", marks=needs_ort),
        # the other two pairings (same exporters, same heads) with the full suite
        pytest.param(".pt2", "val", marks=pytest.mark.parity_full),
        pytest.param(".onnx", "test", marks=(needs_ort, pytest.mark.parity_full)),
    ],
)
def test_export_reproduces_strict_pytorch(weights, tmp_path, capsys, suffix, split):
    out = tmp_path / f"model{suffix}"
    rc, stdout, _ = _run(["--weights", weights, "--output", out, "--split", split], capsys)
    assert rc == 0 and out.exists() and is_exported_file(out)
    printed = float(re.search(r"max relative error vs strict PyTorch .*?: (\S+)", stdout)[1])
    assert printed <= export_mod.MAX_REL_ERROR
    assert f"{split} head" in stdout and "x".join(map(str, (3, 2, 224, 224))) in stdout
    if suffix == ".onnx":
        assert re.search(r"opset \d+", stdout)
        assert not list(tmp_path.glob("*.data"))  # one self-contained file
    # independently: the written file on clips of other batch sizes vs the strict model
    strict = nl.load_model(weights, split=split).eval()
    run = _runner(out, suffix)
    for batch in (3, 1):
        clip = torch.randn(clip_shape(strict, batch), generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            ref, got = strict(clip), run(clip)
        assert got.shape == ref.shape == (batch, 7)
        assert max_relative_error(got, ref) <= export_mod.MAX_REL_ERROR
        if split == "test":  # the averaged softmax of the fully-convolutional head
            np.testing.assert_allclose(got.sum(1).numpy(), 1.0, rtol=1e-5)
    assert not list(tmp_path.glob(".model*"))  # no temporary or lock left


@pytest.mark.parametrize("name", ["model.onnx.txt", "model.pt", "model"])
def test_a_bad_suffix_is_refused_before_the_model_is_built(weights, tmp_path, capsys, name):
    rc, _, err = _run(["--weights", tmp_path / "missing.pt", "--output", tmp_path / name], capsys)
    assert rc == 2 and "must end in .onnx or .pt2" in _error_line(err)  # not the weights' error
    assert list(tmp_path.iterdir()) == []


def test_onnx_without_its_packages_is_refused(weights, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a)
    )
    rc, _, err = _run(["--weights", weights, "--output", tmp_path / "m.onnx"], capsys)
    line = _error_line(err)
    assert rc == 2 and "onnxruntime" in line and "[onnx]" in line
    assert not (tmp_path / "m.onnx").exists()


def test_the_output_is_never_the_input(weights, tmp_path, capsys):
    link = tmp_path / "link.pt2"
    os.symlink(weights, link)
    before = weights.read_bytes()
    for argv in (["--weights", weights, "--output", link], ["--weights", link, "--output", link]):
        rc, _, err = _run([*argv, "--overwrite"], capsys)
        assert rc == 2 and "same file as the input" in _error_line(err)
    assert weights.read_bytes() == before


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_a_foreign_file_needs_overwrite(weights, tmp_path, capsys, suffix):
    if suffix == ".onnx" and not HAS_ORT:
        pytest.skip("onnx/onnxscript/onnxruntime not installed")
    foreign = tmp_path / f"notes{suffix}"
    foreign.write_bytes(b"my notes")
    zipped = tmp_path / f"weights_copy{suffix}"  # a zip (a torch.save file) without the marker
    zipped.write_bytes(weights.read_bytes())
    for dst in (foreign, zipped):
        before = dst.read_bytes()
        rc, _, err = _run(["--weights", weights, "--output", dst], capsys)
        assert rc == 2 and "--overwrite" in _error_line(err) and dst.read_bytes() == before
        assert not is_exported_file(dst)


def _fake_format(monkeypatch, scale: float) -> list:
    """Replace the .pt2 exporter by one that writes a stub and whose 'runtime' returns the
    strict outputs times ``scale``: the check is what decides whether a file stays."""
    written, traced = [], []

    def write(model, example, path, marker):
        written.append(path)
        traced.append(model)
        path.write_bytes(b"stub export")

    def load(path):
        model = traced[-1]
        return lambda x: model(x) * scale

    fake = dataclasses.replace(FORMATS[".pt2"], write=write, load=load, is_own=lambda p: False)
    monkeypatch.setitem(FORMATS, ".pt2", fake)
    return written


@pytest.mark.parametrize(
    ("scale", "bound", "shown"),
    [(1.01, None, "0.01"), (float("nan"), None, "inf"), (1 + 1e-5, "1e-6", "(bound 1e-06)")],
)
def test_an_export_above_the_bound_leaves_nothing(
    weights, tmp_path, capsys, monkeypatch, scale, bound, shown
):
    written = _fake_format(monkeypatch, scale)
    dst = tmp_path / "m.pt2"
    dst.write_bytes(b"a foreign file, replaced only once the export is proven")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.pt2.{dead.pid}-0123456789ab.tmp.pt2"  # a SIGKILLed export's
    stale.write_bytes(b"partial")
    argv = ["--weights", weights, "--output", dst, "--overwrite"]
    rc, _, err = _run([*argv, *(["--max-rel-error", bound] if bound else [])], capsys)
    line = _error_line(err)
    assert rc == 2 and "max relative error of" in line and shown in line and "bound" in line
    assert written and not any(p.exists() for p in written)  # the temporary is removed
    assert dst.read_bytes().startswith(b"a foreign file") and not stale.exists()
    if scale == 1.01:  # within a looser bound the same stub is renamed into place
        rc, stdout, _ = _run([*argv, "--max-rel-error", "0.05"], capsys)
        assert rc == 0 and dst.read_bytes() == b"stub export" and "0.01" in stdout


@pytest.mark.parametrize(
    "argv",
    [["--split", "train"], ["--max-rel-error", "0"], ["--max-rel-error", "nan"], ["--seed", "-1"]],
)
def test_usage_errors(weights, tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--weights", str(weights), "--output", str(tmp_path / "m.pt2"), *argv])
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err
