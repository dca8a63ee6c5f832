"""List files that are devices, FIFOs or folders are one error line from every command that
reads a list (vnl-test, vnl-extract, vnl-train), before any model is built or output made."""

from __future__ import annotations

import os

import pytest
from eval_helpers import small_cfg, write_checkpoint
from train_helpers import BASE, TINY

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "small.pt", small_cfg())


@pytest.fixture
def bad_lists(tmp_path):
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)  # nobody writes to it: reading it would block forever
    folder = tmp_path / "folder"
    folder.mkdir()
    return {"/dev/zero": "a device", str(fifo): "a device", str(folder): "a directory"}


def one_error_line(prog, status, err):
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error:")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_vnl_test_and_vnl_extract(checkpoint, tmp_path, capsys):
    """/dev/zero only (each call loads the model first); FIFOs and folders: test_eval_list."""
    from nonlocal_net.tools.extract_features import main as extract
    from nonlocal_net.tools.test_net_video import main as test

    for path, kind in {"/dev/zero": "a device"}.items():
        out = tmp_path / "out.h5"
        status = test(["--weights", str(checkpoint), "--list", path, "--results", str(out)])
        line = one_error_line("vnl-test", status, capsys.readouterr().err)
        assert path in line and kind in line
        status = extract(["--weights", str(checkpoint), "--list", path, "--output", str(out)])
        line = one_error_line("vnl-extract", status, capsys.readouterr().err)
        assert path in line and kind in line
        assert not out.exists() and not (tmp_path / "out.h5.parts").exists()


def test_vnl_train(bad_lists, tmp_path, capsys):
    from nonlocal_net.tools.train_net_video import main

    for path, kind in bad_lists.items():
        out = tmp_path / "run"
        args = ["--model", BASE, "--train-list", path, "--output-dir", str(out), *TINY]
        line = one_error_line("vnl-train", main(args), capsys.readouterr().err)
        assert path in line and kind in line
        assert not (out / "checkpoints").exists()
