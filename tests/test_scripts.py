"""scripts/: every recipe parses, names an existing zoo model, the original's init file and
existing config keys, and there is one script per released model."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import nonlocal_net as nl
from nonlocal_net.core.config import cfg_from_list
from nonlocal_net.core.zoo import PRETRAINED_INIT, ZOO

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
ALL = sorted(SCRIPTS.glob("*.sh"))
KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*")


def _command_words(path: Path) -> list[str]:
    """The words of the script's commands (comments dropped, continuations joined)."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    return shlex.split("\n".join(ln.rstrip("\\") for ln in lines), comments=True)


def _overrides(words: list[str]) -> list[str]:
    """KEY VALUE pairs after the zoo name of a run_train call."""
    start = words.index("run_train") + 3
    out = []
    i = start
    while i + 1 < len(words) and KEY.fullmatch(words[i]):
        out += [words[i], words[i + 1]]
        i += 2
    return out


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_script_parses(path):
    bash = shutil.which("bash")
    assert bash
    result = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_one_recipe_per_released_model():
    names = {p.name for p in ALL}
    for entry in ZOO.values():
        assert entry.script in names, entry.script
    assert "run_test_multicrop.sh" in names
    assert len([n for n in names if n.startswith("run_") and n != "run_test_multicrop.sh"]) >= 15


@pytest.mark.parametrize("entry", list(ZOO.values()), ids=lambda e: e.script)
def test_recipe_matches_its_zoo_entry(entry):
    words = _command_words(SCRIPTS / entry.script)
    call = words.index("run_train")
    assert words[call + 1] == entry.script[: -len(".sh")]
    assert words[call + 2] == entry.name
    overrides = _overrides(words)
    pairs = dict(zip(overrides[::2], overrides[1::2]))
    assert pairs["TRAIN.PARAMS_FILE"] == "${PRETRAINED}/" + entry.init
    assert entry.init in PRETRAINED_INIT
    # the decoder threads of the original scripts: 2 for the affine recipes, 5 otherwise
    assert pairs["VIDEO_DECODER_THREADS"] == (
        "2" if nl.get_cfg(entry.name).MODEL.USE_AFFINE else "5"
    )
    cfg = nl.get_cfg(entry.name).clone()
    cfg.defrost()
    cfg_from_list(cfg, [v if "$" not in v else "x" for v in overrides])  # keys exist, types fit


def test_finetune_example_overrides_are_valid():
    words = _command_words(SCRIPTS / "run_finetune_own_dataset.sh")
    overrides = _overrides(words)
    cfg = nl.get_cfg("i3d_nonlocal_8x8_IN_pretrain_400k").clone()
    cfg.defrost()
    values = {"${NUM_CLASSES}": "101", "${INIT}": "init.pkl"}
    cfg_from_list(cfg, [values.get(v, v) for v in overrides])
    assert cfg.MODEL.NUM_CLASSES == 101 and cfg.SOLVER.MAX_ITER == 20000
    assert "--blob-rm" in (SCRIPTS / "run_finetune_own_dataset.sh").read_text()
