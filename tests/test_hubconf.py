"""``hubconf.py``: one torch.hub entry point per released model, spelled as ``list_models()``,
each documented; ``torch.hub.load(<checkout>, name, source="local", pretrained=True)`` loads the
released weights through the download cache, also from a checkout that is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_helpers import TINY, tiny_entry, write_release

import nonlocal_net as nl
from nonlocal_net.core import hub, zoo

ROOT = Path(__file__).resolve().parent.parent


def _hubconf():
    return torch.hub._import_module("hubconf", str(ROOT / "hubconf.py"))


def test_one_documented_entry_point_per_released_model():
    module = _hubconf()
    # what torch.hub.list lists: every public callable of the module
    entries = [f for f in dir(module) if callable(getattr(module, f)) and not f.startswith("_")]
    assert set(entries) == set(nl.list_models()) and len(entries) == 15
    for name in entries:
        doc = getattr(module, name).__doc__  # what torch.hub.help returns
        entry = nl.get_zoo_entry(name)
        assert doc.startswith(f"{name}: ") and entry.script in doc and str(entry.top1) in doc
        assert "pretrained=True" in doc


def test_dependencies_are_importable_names():
    import importlib.util

    dependencies = _hubconf().dependencies
    assert dependencies and all(importlib.util.find_spec(dep) for dep in dependencies)


def test_torch_hub_load_pretrained(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_release(mirror)
    monkeypatch.setitem(zoo.ZOO, TINY, tiny_entry())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(hub.ENV_ZOO_URL, mirror.as_uri())
    model = torch.hub.load(str(ROOT), TINY, source="local", pretrained=True, split="val")
    reference = nl.load_model(TINY, split="val")
    assert not model.training and model.cfg == reference.cfg
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), reference.state_dict().values())
    )
    fresh = torch.hub.load(str(ROOT), TINY, source="local")  # pretrained=False
    assert not torch.equal(fresh.conv1.weight, model.conv1.weight)


@pytest.mark.slow  # a fresh interpreter imports torch and the whole package
def test_a_checkout_that_is_not_installed_loads_its_own_code(tmp_path):
    mirror = tmp_path / "mirror"
    write_release(mirror)
    script = f"""
import importlib.util, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
assert importlib.util.find_spec("nonlocal_net") is None, "still installed"
import torch
sys.path.insert(0, {str(ROOT / "tests")!r})
hubconf = torch.hub._import_module("hubconf", {str(ROOT / "hubconf.py")!r})
import nonlocal_net
assert nonlocal_net.__file__ == {str(ROOT / "lib" / "__init__.py")!r}, nonlocal_net.__file__
from hub_helpers import install_tiny_entry, TINY
install_tiny_entry()
model = torch.hub.load({str(ROOT)!r}, TINY, source="local", pretrained=True)
print(type(model).__name__, nonlocal_net.converters.__file__)
"""
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "th"), hub.ENV_ZOO_URL: str(mirror)}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ResNetVideo", str(ROOT / "converters" / "__init__.py")]
