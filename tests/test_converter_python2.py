"""Local validation against real Python 2.7 + numpy 1.x: what the converter writes loads there
exactly as the original's loader loads a checkpoint (``cPickle.load``, descend into ``'blobs'``,
``float(lr)``), with identical arrays.

CI has no Python 2: these tests run where ``VNL_PYTHON2`` (or the default pyenv path below) names a
Python 2.7 interpreter with numpy, and are skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from blob_inventory import RELEASED, Arch
from caffe2_fixtures import training_checkpoint_blobs, write_training_checkpoint

from nonlocal_net.converters import convert_checkpoint, export_caffe2, write_caffe2_pkl

PYTHON2 = os.environ.get("VNL_PYTHON2", "/root/.pyenv/versions/2.7.18/bin/python")


def _python2_unusable() -> str | None:
    """Why the Python 2.7 + numpy toolchain cannot run here (``None`` when it can)."""
    if not os.path.exists(PYTHON2):
        return f"no Python 2.7 interpreter at {PYTHON2} (set VNL_PYTHON2)"
    try:
        probe = subprocess.run(
            [PYTHON2, "-c", "import sys, cPickle, numpy; sys.stdout.write(sys.version[:3])"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{PYTHON2} does not run ({e})"
    if probe.returncode != 0 or probe.stdout != "2.7":
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{PYTHON2} is not a Python 2.7 with numpy ({last})"
    return None


_UNUSABLE = _python2_unusable()
pytestmark = pytest.mark.skipif(_UNUSABLE is not None, reason=_UNUSABLE or "")

# Loads a pickle as the original's initialize_master_gpu_model_params does, compares every array
# with an .npz written by this (Python 3) test, and prints what it found as JSON.
CHECK_PY2 = r"""
import cPickle, json, sys
import numpy as np
pkl, npz = sys.argv[1], sys.argv[2]
with open(pkl, 'r') as f:
    blobs = cPickle.load(f)
wrapped = 'blobs' in blobs
if wrapped:
    blobs = blobs['blobs']
prev_lr = float(blobs['lr'])          # the original raises if there is no lr
ref = np.load(npz)
mismatch = []
for name in ref.files:
    value = np.asarray(blobs[name])
    if value.dtype != ref[name].dtype or value.shape != ref[name].shape or \
            value.tobytes() != ref[name].tobytes():
        mismatch.append(name)
out = {
    'wrapped': wrapped, 'lr': prev_lr, 'numpy': np.__version__,
    'model_iter': blobs.get('model_iter'), 'mismatch': mismatch, 'checked': len(ref.files),
    'keys': dict((str(k), type(k).__name__) for k in blobs),
    'extra': sorted(str(k) for k in blobs if str(k) not in ref.files),
}
print(json.dumps(out))
"""


def _load_in_python2(tmp_path: Path, pkl: Path, reference: dict[str, np.ndarray]) -> dict:
    npz = tmp_path / "reference.npz"
    np.savez(npz, **reference)
    script = tmp_path / "check_py2.py"
    script.write_text(CHECK_PY2)
    done = subprocess.run(
        [PYTHON2, str(script), str(pkl), str(npz)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("protocol, wrapped", [(2, True), (0, False), (2, False), (0, True)])
def test_writer_output_loads_in_python2(tmp_path, protocol, wrapped):
    rng = np.random.default_rng(0)
    arrays = {
        "conv1_w": rng.standard_normal((64, 3, 5, 7, 7), dtype=np.float32),
        "conv1_w_momentum": rng.standard_normal((64, 3, 5, 7, 7), dtype=np.float32),
        "res_conv1_bn_riv": rng.uniform(0.5, 2, 64).astype(np.float32),
        "pred_w": rng.standard_normal((400, 2048), dtype=np.float32),
        "quotes": np.frombuffer(b"'\"\\\n\r\t\x00\x7f\x80\xff'abcd'", dtype=np.float32).copy(),
        "lr": np.array(1e-4, dtype=np.float32),
    }
    blobs = {**arrays, "model_iter": 400000}
    pkl = tmp_path / "out.pkl"
    write_caffe2_pkl(blobs, pkl, protocol=protocol, wrapped=wrapped)
    got = _load_in_python2(tmp_path, pkl, arrays)
    assert got["mismatch"] == [] and got["checked"] == len(arrays)
    assert got["wrapped"] == wrapped and got["model_iter"] == 400000
    assert got["lr"] == float(np.float32(1e-4))
    assert got["keys"]["conv1_w"] == "str"
    assert got["keys"]["conv1_w_momentum"] == "unicode"
    assert got["keys"]["model_iter"] == "unicode"


def test_fixture_writer_loads_in_python2(tmp_path):
    # the test-side writer (used for every synthetic checkpoint) on a full-size model
    arch = Arch(**RELEASED["i3d_nonlocal_8x8_IN_pretrain_400k"])
    blobs = training_checkpoint_blobs(arch, np.random.default_rng(1))
    pkl = write_training_checkpoint(tmp_path / "ckpt.pkl", blobs)
    arrays = {k: v for k, v in blobs.items() if isinstance(v, np.ndarray)}
    got = _load_in_python2(tmp_path, pkl, arrays)
    assert got["mismatch"] == [] and got["checked"] == len(blobs) - 1 == 539
    assert got["keys"]["lr"] == "unicode" and got["keys"]["res5_2_branch2c_bn_riv"] == "str"


def test_exported_checkpoint_loads_in_python2_with_identical_arrays(tmp_path):
    name = "i3d_nonlocal_32x4_I3D_pretrain_400k"
    arch = Arch(**RELEASED[name])
    blobs = training_checkpoint_blobs(arch, np.random.default_rng(2))
    src = write_training_checkpoint(tmp_path / "src.pkl", blobs)
    convert_checkpoint(src, tmp_path / "model.pt", name)
    out = tmp_path / "back.pkl"
    export_caffe2(tmp_path / "model.pt", out)
    params = {
        k: v
        for k, v in blobs.items()
        if isinstance(v, np.ndarray) and k != "lr" and not k.endswith("_momentum")
    }
    got = _load_in_python2(tmp_path, out, params)
    assert got["mismatch"] == [] and got["checked"] == len(params)
    assert got["extra"] == ["lr"] and got["lr"] == float(np.float32(1e-4))
    assert got["wrapped"] is True and got["model_iter"] is None
