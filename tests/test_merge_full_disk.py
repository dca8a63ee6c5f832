"""A full disk during the final merge of vnl-test's results and vnl-extract's features: one
error line naming the file, the space it needs and what to do (never an HDF5 crash), the parts
kept, no temporary left, and ``--resume`` then writes the file an uninterrupted run writes.
Simulated in-process (the write fails, or the free-space check refuses) and real on a small
tmpfs where the tests may mount one. Tiny network, videos the tests write."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from eval_helpers import small_cfg, write_checkpoint

from nonlocal_net.engine import results as results_module
from nonlocal_net.tools import extract_features as extract_tool
from nonlocal_net.tools import test_net_video as test_tool

COMMANDS = {
    "vnl-test": (test_tool, "--results", "views/scores"),
    "vnl-extract": (extract_tool, "--output", "views/features"),
}
KEYS = ("views/video_id", "views/view_index", "videos/video_id", "videos/num_views", "list/label")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = small_cfg(["TEST.NUM_TEST_CLIPS", "3"])  # 3 views per video: cheap
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "small.pt", cfg)


def base_args(eval_videos, checkpoint) -> list[str]:
    return [
        *("--weights", str(checkpoint), "--list", str(eval_videos.list_file), "--limit", "3"),
        *("--workers", "0", "--batch-size", "4", "--flush-every", "1", "--no-progress"),
    ]


@pytest.fixture(scope="module")
def whole_runs(eval_videos, checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The file of an uninterrupted run of each command."""
    folder = tmp_path_factory.mktemp("whole")
    made = {}
    for prog, (tool, flag, _) in COMMANDS.items():
        made[prog] = folder / f"{prog}.h5"
        assert tool.main([*base_args(eval_videos, checkpoint), flag, str(made[prog])]) == 0
    return made


def one_error_line(err: str, prog: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def assert_same_file(a: Path, b: Path, rows: str) -> None:
    with h5py.File(a, "r") as x, h5py.File(b, "r") as y:
        for key in (rows, *KEYS):
            assert np.array_equal(x[key][()], y[key][()]), key
        assert json.loads(x.attrs["header"]) == json.loads(y.attrs["header"])


def assert_refused_and_kept(line: str, out: Path) -> None:
    parts = Path(str(out) + ".parts")
    assert str(out) in line and "MiB" in line and "--resume" in line, line
    assert str(parts) in line and "--results" not in line.replace("--resume", ""), line
    assert len(list(parts.glob("part-*.h5"))) == 3 and (parts / "run.json").is_file()
    assert not out.exists()
    left = [p.name for p in out.parent.rglob("*") if ".tmp" in p.name or p.suffix == ".lock"]
    assert left == [], left


@pytest.mark.parametrize("prog", sorted(COMMANDS))
@pytest.mark.parametrize("failure", ["write_fails", "no_free_space", "no_free_space_large"])
def test_full_disk_during_the_merge(
    prog, failure, eval_videos, checkpoint, whole_runs, tmp_path, capsys, monkeypatch
):
    """``write_fails``: the in-memory file's bytes hit a full disk; ``no_free_space``: the
    free-space check refuses first, for a file built in memory or (``_large``) on disk."""
    tool, flag, rows = COMMANDS[prog]
    out = tmp_path / "out.h5"
    args = [*base_args(eval_videos, checkpoint), flag, str(out)]
    if failure.endswith("_large"):  # as if the file were too large to build in memory
        monkeypatch.setattr(results_module, "IN_MEMORY_MERGE_BYTES", 0)
    if failure == "write_fails":  # the disk fills while the final file's bytes are written
        real = results_module.atomic_write

        @contextlib.contextmanager
        def full_for_the_final_file(path, mode="wb"):
            with real(path, mode) as f:
                if os.fspath(path) == str(out):
                    f.write(b"\x89HDF\r\n\x1a\n half a file")
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                yield f

        monkeypatch.setattr(results_module, "atomic_write", full_for_the_final_file)
    else:  # the destination's file system reports almost no free space
        real_statvfs = os.statvfs

        def almost_full(path):
            found = real_statvfs(path)
            if os.path.abspath(path) != str(tmp_path):
                return found
            return os.statvfs_result((*found[:4], 1, *found[5:]))  # 1 free block

        monkeypatch.setattr(os, "statvfs", almost_full)
    assert tool.main(args) == 2
    line = one_error_line(capsys.readouterr().err, prog)
    assert ("No space left on device" if failure == "write_fails" else "free in") in line, line
    assert_refused_and_kept(line, out)
    monkeypatch.undo()  # space freed
    if failure.endswith("_large"):
        monkeypatch.setattr(results_module, "IN_MEMORY_MERGE_BYTES", 0)
    assert tool.main([*args, "--resume"]) == 0
    assert "resuming: 3 videos" in capsys.readouterr().err
    assert_same_file(out, whole_runs[prog], rows)
    assert not Path(str(out) + ".parts").exists()


@pytest.fixture
def small_tmpfs():
    """A 4 MiB tmpfs of this test's own (root only; skipped where it cannot be mounted)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mount = tempfile.mkdtemp(prefix="vnl-merge-tmpfs-")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mount])
    if done.returncode:
        os.rmdir(mount)
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield Path(mount)
    finally:
        subprocess.run(["umount", mount])
        os.rmdir(mount)


def stage_parts_on(folder: Path, prog: str, args: list[str], staging: Path, monkeypatch) -> Path:
    """The parts of a ``prog`` run killed before its merge, copied into ``folder``, which is
    then filled up to 8 KiB; returns the output path there (and the filler beside it)."""
    tool, flag, _ = COMMANDS[prog]

    def killed(*_, **__):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(results_module.ResultsStore, "merge", killed)
        assert tool.main([*args, flag, str(staging / "r.h5")]) == 130
    out = folder / "r.h5"
    shutil.copytree(str(staging / "r.h5") + ".parts", str(out) + ".parts")
    stat = os.statvfs(folder)
    with open(folder / "filler", "wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * (stat.f_bavail * stat.f_frsize - 8192))
    return out


def test_a_real_full_disk_during_the_merge(
    eval_videos, checkpoint, whole_runs, tmp_path, small_tmpfs, capsys, monkeypatch
):
    """The parts of a run killed before its merge, on a real file system that has no room
    for the results file: ``vnl-test --resume`` refuses in one line; after space is freed it
    writes the uninterrupted run's file."""
    args = base_args(eval_videos, checkpoint)
    out = stage_parts_on(small_tmpfs, "vnl-test", args, tmp_path, monkeypatch)
    filler = small_tmpfs / "filler"
    capsys.readouterr()
    command = [sys.executable, "-m", "nonlocal_net.tools.test_net_video", *args]
    command += ["--results", str(out), "--resume"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-3000:]
    assert_refused_and_kept(one_error_line(done.stderr, "vnl-test"), out)
    filler.unlink()
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_file(out, whole_runs["vnl-test"], "views/scores")


# vnl-extract with the merge as for a file too large for memory, and the free-space check
# out of the way (as if the space were taken between the check and the write)
LARGE_MERGE = (
    "import sys\n"
    "from nonlocal_net.engine import results\n"
    "from nonlocal_net.tools import extract_features\n"
    "results.IN_MEMORY_MERGE_BYTES = 0\n"
    "results.ResultsStore._check_space = lambda *_: None\n"
    "sys.exit(extract_features.main(sys.argv[1:]))\n"
)


def test_a_large_file_reserves_its_blocks_before_hdf5_writes(
    eval_videos, checkpoint, whole_runs, tmp_path, small_tmpfs, capsys, monkeypatch
):
    """A features file too large to build in memory is written in place into reserved
    blocks: a real full disk is one line, where HDF5 writing its chunks would crash."""
    args = base_args(eval_videos, checkpoint)
    out = stage_parts_on(small_tmpfs, "vnl-extract", args, tmp_path, monkeypatch)
    capsys.readouterr()
    command = [sys.executable, "-c", LARGE_MERGE, *args, "--output", str(out), "--resume"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_error_line(done.stderr, "vnl-extract")
    assert "No space left on device" in line, line
    assert_refused_and_kept(line, out)
    (small_tmpfs / "filler").unlink()
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_file(out, whole_runs["vnl-extract"], "views/features")
