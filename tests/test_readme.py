"""Every code block of README.md runs as written.

The README's blocks are ``python`` or ``bash``. A block preceded by the line
``<!-- readme-test: skip (REASON) -->`` is an illustration the test does not run (it needs
Kinetics, GPUs, or would run this test itself), and says why; every other block runs, in README
order, in one scratch folder, against synthetic files this test makes:

* ``VNL_ZOO_URL`` points at a loopback HTTP server (127.0.0.1) serving a synthetic checkpoint of
  the real ``i3d_nonlocal_8x8_IN_pretrain_400k`` network, and ``TORCH_HOME`` at the scratch
  folder, so released names download, convert and cache as for a user;
* ``wget`` of a released file's URL is served from the same synthetic files (a stand-in ``wget``
  first on ``PATH`` refuses any other URL);
* the only substitution in the text is the data root ``/data/kinetics``, replaced by a folder of
  synthetic videos; ``vallist.txt`` and ``video.mp4`` are made in the scratch folder.

The fast tests check the structure (languages, reasons, syntax, every ``vnl-*`` command line
parses with its command's parser); running the blocks builds the full-size network and is slow.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hub_helpers import loopback_server

from nonlocal_net.converters.synthetic import write_synthetic_checkpoint
from nonlocal_net.core import hub, zoo
from nonlocal_net.datasets.synthetic import write_list_file, write_video

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((?P<reason>[^)]+)\) -->")
FENCE = re.compile(r"```(?P<lang>\w*)\s*$")
DATA_ROOT = "/data/kinetics"
NAME = "i3d_nonlocal_8x8_IN_pretrain_400k"  # the model the README's examples use
PARSERS = {  # command -> (module, function returning a parser, or parsing argv itself)
    "vnl-convert": ("nonlocal_net.converters.cli", "parse_args"),
    "vnl-verify": ("nonlocal_net.verify.cli", "parse_args"),
    "vnl-test": ("nonlocal_net.tools.test_net_video", "build_parser"),
    "vnl-predict": ("nonlocal_net.tools.predict_video", "build_parser"),
    "vnl-train": ("nonlocal_net.tools.train_net_video", "build_parser"),
    "vnl-extract": ("nonlocal_net.tools.extract_features", "build_parser"),
    "vnl-score": ("nonlocal_net.tools.score_results", "build_parser"),
}


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    skip: str | None  # the reason, for an illustration-only block


def readme_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        previous = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
        marker = SKIP.fullmatch(previous.strip())
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        code = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(match["lang"], code, i + 1, marker["reason"] if marker else None))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def bash_commands(code: str) -> list[list[str]]:
    """The commands of a bash block, continuation lines joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def test_every_block_is_python_or_bash_and_skips_say_why():
    assert BLOCKS
    for block in BLOCKS:
        assert block.lang in ("python", "bash"), f"README.md:{block.line}: {block.lang!r}"
        if block.skip is not None:
            assert len(block.skip.strip()) > 10, f"README.md:{block.line}: say why it is skipped"
    assert any(b.skip is None and b.lang == "bash" for b in BLOCKS)


def test_the_first_python_example_uses_pretrained_weights():
    first = next(b for b in BLOCKS if b.lang == "python")
    assert first.skip is None and "pretrained=True" in first.code


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"line{b.line}")
def test_every_block_is_valid_code(block):
    if block.lang == "python":
        compile(block.code, f"README.md:{block.line}", "exec")
    else:
        result = subprocess.run(["bash", "-n", "-c", block.code], capture_output=True, text=True)
        assert result.returncode == 0, f"README.md:{block.line}: {result.stderr}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash" and b.skip is None])
def test_every_command_line_parses(block):
    """Each ``vnl-*`` line of a block that runs is accepted by its command's parser."""
    for argv in bash_commands(block.code):
        if argv[0] not in PARSERS:
            continue
        module, function = PARSERS[argv[0]]
        parse = getattr(importlib.import_module(module), function)
        try:
            parse(argv[1:]) if function == "parse_args" else parse().parse_intermixed_args(argv[1:])
        except SystemExit as e:
            pytest.fail(f"README.md:{block.line}: {shlex.join(argv)} does not parse ({e})")


def _wget_stand_in(folder: Path, mirror: Path) -> None:
    """A ``wget URL -P DIR`` that serves the released files' URLs from ``mirror``."""
    script = folder / "wget"
    script.write_text(
        f"#!{sys.executable}\n"
        "import shutil, sys, os\n"
        "url, _, target = sys.argv[1:4]\n"
        f"prefix = {zoo.DOWNLOAD_ROOT!r}\n"
        "assert url.startswith(prefix) and sys.argv[2] == '-P', 'only released files'\n"
        "os.makedirs(target, exist_ok=True)\n"
        f"shutil.copy(os.path.join({str(mirror)!r}, url[len(prefix):]), target)\n"
    )
    script.chmod(0o755)


@pytest.mark.slow  # the full-size released network: converted, verified, evaluated
@pytest.mark.parity_full  # about 90 s: run by make test-parity-full (CI), not make test
def test_the_readme_runs_as_written(tmp_path):
    mirror, work, data, bin_dir = (tmp_path / d for d in ("mirror", "work", "data", "bin"))
    for folder in (mirror, work, data, bin_dir):
        folder.mkdir()
    write_synthetic_checkpoint(mirror / f"{NAME}.pkl", NAME, momentum=False)
    write_video(data / "clip_a.mp4", 24, 320, 256, seed=1)
    write_list_file(work / "vallist.txt", [("clip_a.mp4", 12)])
    write_video(work / "video.mp4", 24, 320, 256, seed=2)
    _wget_stand_in(bin_dir, mirror)
    with loopback_server(mirror) as (url, state):
        env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
            + os.environ.get("PATH", ""),
            "TORCH_HOME": str(tmp_path / "torch_home"),
            hub.ENV_ZOO_URL: url,
        }
        for block in BLOCKS:
            if block.skip is not None:
                continue
            if block.lang == "python":
                command = [sys.executable, "-c", block.code]
            else:
                code = block.code.replace(DATA_ROOT, str(data))
                command = ["bash", "-e", "-o", "pipefail", "-c", code]
            result = subprocess.run(
                command, cwd=work, env=env, capture_output=True, text=True, timeout=1800
            )
            assert result.returncode == 0, (
                f"README.md:{block.line} failed ({result.returncode}):\n{result.stderr[-4000:]}"
            )
        assert state.requests == [(f"/{NAME}.pkl", None)]  # downloaded once, then cached
    assert (work / "results.h5").is_file() and (work / "checkpoints" / "i3d_nl_8x8.pt").is_file()
