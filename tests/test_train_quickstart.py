"""docs/training.md's quick start, run as it is written: its bash blocks in one shell, in a
fresh folder, with this environment's ``python`` and ``vnl-train`` first on ``PATH``; the output
of its last block must be the text block the page shows after it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
MARK = "@@quick-start-check@@"


def quick_start_blocks() -> tuple[list[str], str]:
    """The bash blocks of the quick-start section and the text block after the last one."""
    text = DOC.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    bash = [body for lang, body in blocks if lang == "bash"]
    expected = [body for lang, body in blocks if lang == "text"]
    assert len(bash) >= 2 and len(expected) == 1, "the quick start changed shape"
    return bash, expected[0]


def test_quick_start_is_shaped_as_the_test_expects():
    bash, expected = quick_start_blocks()
    assert "vnl-train" in bash[0] and "NUM_GPUS" in bash[0]
    assert "model_iter2.pt" in expected


@pytest.mark.slow
# docs/quickstart.md runs this very command (tests/test_quickstart.py checks it is the same) in
# make test; the page's own run is in the full suite
@pytest.mark.parity_full
def test_quick_start_runs_as_written(tmp_path):
    bash, expected = quick_start_blocks()
    script = "set -euo pipefail\n" + "\n".join(bash[:-1]) + f"\necho {MARK}\n" + bash[-1]
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}  # threads as a user
    result = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split(MARK + "\n", 1)[1] == expected
    log = result.stderr
    assert "global batch 3 = 1 process(es) x 1 micro-batch(es) x 3 clips, fp32" in log
    assert "iter 2/2" in log and "val at iteration 2" in log
    # the same vnl-train command again continues the run (here: it had finished)
    train = bash[0][bash[0].index("vnl-train") :]
    setup = bash[0][: bash[0].index("# the initialisation file")]
    setup = setup.replace("mkdir quickstart && ", "")  # the folder is there now
    again = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + setup + "\n" + train],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert "the run had already finished at iteration 2" in again.stderr
