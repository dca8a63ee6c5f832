"""Golden pickles made by real Python 2.7.18 + numpy 1.16.6 (``data/caffe2_golden``): the reader
reads them, and the test-side fixture writer reproduces them byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from caffe2_pickles import Py2Key, dumps_py2

from nonlocal_net.converters import read_caffe2_pkl

GOLDEN = Path(__file__).parent / "data" / "caffe2_golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
FILES = sorted(MANIFEST)


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "golden_arrays.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _golden_object(name: str, arrays: dict[str, np.ndarray]) -> dict:
    entry = MANIFEST[name]
    inner = {}
    for key, key_type, memo, kind in entry["items"]:
        value = arrays[f"{name}/{key}"] if kind == "array" else entry["scalars"][key]
        inner[Py2Key(key, unicode=key_type == "unicode", memo=memo)] = value
    return {"blobs": inner} if entry["wrapped"] else inner


def test_golden_files_cover_both_layouts_and_key_types():
    layouts = {(m["protocol"], m["wrapped"]) for m in MANIFEST.values()}
    assert {(2, True), (0, False), (2, False)} <= layouts
    key_types = {item[1] for m in MANIFEST.values() for item in m["items"]}
    assert key_types == {"str", "unicode"}
    memo = {item[2] for m in MANIFEST.values() for item in m["items"]}
    assert memo == {True, False}


@pytest.mark.parametrize("name", FILES)
def test_fixture_writer_reproduces_python2_bytes(name, arrays):
    entry = MANIFEST[name]
    produced = dumps_py2(_golden_object(name, arrays), protocol=entry["protocol"])
    assert produced == (GOLDEN / name).read_bytes()


@pytest.mark.parametrize("name", FILES)
def test_reader_reads_python2_files(name, arrays):
    entry = MANIFEST[name]
    ckpt = read_caffe2_pkl(GOLDEN / name)
    assert ckpt.protocol == entry["protocol"] and ckpt.wrapped == entry["wrapped"]
    assert ckpt.names == [item[0] for item in entry["items"]]
    for key, _, _, kind in entry["items"]:
        if kind != "array":
            continue
        expected = arrays[f"{name}/{key}"]
        if key == "lr":
            assert ckpt.lr == float(expected)
            continue
        got = ckpt.momentum[key] if key.endswith("_momentum") else ckpt.blobs[key]
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert got.tobytes() == expected.tobytes()
        assert got.flags.writeable
    scalars = entry["scalars"]
    if "lr" in scalars:
        assert ckpt.lr == scalars["lr"]
    assert ckpt.model_iter == scalars.get("model_iter")


def test_golden_lr_forms():
    # a training checkpoint's lr is a 0-d float32 array; the scripts' files hold a Python float
    ckpt = read_caffe2_pkl(GOLDEN / "checkpoint_p2_wrapped.pkl")
    assert ckpt.lr == float(np.float32(1e-4)) and ckpt.model_iter == 400000
    assert read_caffe2_pkl(GOLDEN / "affine_p0_flat.pkl").lr == 0.00125
    assert read_caffe2_pkl(GOLDEN / "imagenet_p2_flat.pkl").model_iter is None
