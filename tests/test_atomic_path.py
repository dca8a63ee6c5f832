"""``atomic_path``: atomic writes for writers that take a file name."""

from __future__ import annotations

import os

import pytest

from nonlocal_net.utils.io import atomic_path


def test_atomic_path_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"partial")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.safetensors"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["model.safetensors"]
