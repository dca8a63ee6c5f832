"""docs/quickstart.md runs as it is written.

Its ``bash`` blocks run in order in one bash shell (``set -euo pipefail``, stderr merged into
stdout as a terminal shows them) in a fresh folder, with this environment's ``python`` and
``vnl-*`` commands first on ``PATH``. Each ``bash`` block is followed by a ``text`` block: the
lines it prints. A line of it must match one printed line, in order (other printed lines may lie
between), where ``...`` stands for any text; a line that does not start (end) with ``...``
matches from the start (to the end) of the printed line.

The training step is the command of docs/training.md's quick start (run there by
tests/test_train_quickstart.py); the fast test checks the two pages keep the same command.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "quickstart.md"
TRAINING = ROOT / "docs" / "training.md"
MARK = "@@quickstart-block-done@@"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", flags=re.S)


def doc_blocks() -> list[tuple[str, str]]:
    """(bash code, expected text) pairs of the page, in order."""
    blocks = BLOCK.findall(DOC.read_text(encoding="utf-8"))
    pairs = []
    for (lang, code), (next_lang, expected) in itertools.pairwise(blocks):
        if lang == "bash":
            assert next_lang == "text", f"no expected output after:\n{code}"
            pairs.append((code, expected))
    assert len(pairs) == sum(lang == "bash" for lang, _ in blocks)
    return pairs


def line_pattern(expected: str) -> re.Pattern[str]:
    """A documented output line as a regex: ``...`` is any text, anchored where it is not."""
    pieces = [re.escape(piece) for piece in expected.split("...")]
    return re.compile("^" + ".*".join(pieces) + "$")


def unmatched(expected: str, printed: str) -> list[str]:
    """The documented lines that do not match printed lines in order (all of them from the
    first that fails)."""
    lines = [line.rstrip() for line in printed.splitlines()]
    wanted = [line.rstrip() for line in expected.splitlines() if line.strip()]
    at = 0
    for index, line in enumerate(wanted):
        pattern = line_pattern(line)
        found = next((j for j in range(at, len(lines)) if pattern.search(lines[j])), None)
        if found is None:
            return wanted[index:]
        at = found + 1
    return []


def commands(code: str) -> str:
    """A block's commands with continuation lines joined and comments dropped."""
    joined = code.replace("\\\n", " ")
    lines = (re.sub(r"\s+", " ", line).strip() for line in joined.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("#"))


def test_the_page_covers_every_task_in_order():
    code = [commands(c) for c, _ in doc_blocks()]
    order = ["write_synthetic_checkpoint", "write_video", "vnl-convert", "vnl-verify"]
    order += ["vnl-predict", "vnl-test", "vnl-score", "vnl-extract", "vnl-train", "vnl-export"]
    text = "\n".join(code)
    positions = [text.find(name) for name in order]
    assert -1 not in positions, dict(zip(order, positions))
    assert positions == sorted(positions)


def test_the_training_step_is_the_training_quick_start_command():
    """Reused, not re-invented: the vnl-train command is docs/training.md's, on its files."""
    quick = TRAINING.read_text(encoding="utf-8").split("## Quick start", 1)[1].split("\n## ")[0]
    training_code = [commands(c) for lang, c in BLOCK.findall(quick) if lang == "bash"]
    train = next(commands(c) for c, _ in doc_blocks() if "vnl-train" in c)
    train_line = next(line for line in train.splitlines() if line.startswith("vnl-train"))
    assert train_line in training_code[0].splitlines()
    # the same model, overrides, initialisation file and list as that page
    setup = commands(doc_blocks()[0][0]).splitlines()
    for line in training_code[0].splitlines():
        if not line.startswith(("mkdir", "vnl-train")):
            assert line in setup, line


def test_matching_is_strict_where_the_page_is():
    assert unmatched("wrote tiny.pt", "x\nwrote tiny.pt\n") == []
    assert unmatched("wrote tiny.pt", "wrote tiny.pt2\n") == ["wrote tiny.pt"]
    assert unmatched("...rel ... (tol 1e-04)", "max rel 9e-07 (tol 1e-04)") == []
    assert unmatched("b\na", "a\nb\n") == ["a"]  # order counts


@pytest.mark.slow  # every command once on the tiny network: about a minute on 2 cores
def test_the_quickstart_runs_as_written(tmp_path):
    pairs = doc_blocks()
    script = "set -euo pipefail\nexec 2>&1\n"
    script += "".join(f"{code}\necho {MARK}\n" for code, _ in pairs)
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}  # threads as a user
    result = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    outputs = result.stdout.split(MARK + "\n")
    done = len(outputs) - 1
    assert result.returncode == 0, (
        f"block {done + 1} exited {result.returncode}:\n{pairs[done][0]}\n{outputs[-1][-4000:]}"
    )
    assert done == len(pairs)
    for (code, expected), printed in zip(pairs, outputs):
        missing = unmatched(expected, printed)
        assert not missing, f"{code}\nprinted:\n{printed[-4000:]}\nnot matched: {missing}"
    work = tmp_path / "vnl-quickstart"
    for name in ("init.pkl", "tiny.pt", "results.h5", "features.h5", "tiny.pt2"):
        assert (work / name).is_file(), name
