"""The stages before vnl-test's and vnl-extract's inference loop, from the command line: the
list is read and the outputs refused before the model is built, the decoding signature is
recorded and checked on ``--resume`` (one line naming the field), and the weights are recorded
as given (a released model's name) or as a file's absolute path. Tiny networks, videos and
lists the tests write; the released name is served from a local folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import pytest
from eval_helpers import small_cfg, write_checkpoint
from hub_helpers import TINY, tiny_entry, write_release

from nonlocal_net import pretrained
from nonlocal_net.core import hub, zoo
from nonlocal_net.datasets.decoders import decoding_signature
from nonlocal_net.engine import results as results_module
from nonlocal_net.engine import runner_setup
from nonlocal_net.tools import extract_features as extract_tool
from nonlocal_net.tools import test_net_video as test_tool

COMMANDS = {"vnl-test": (test_tool, "--results"), "vnl-extract": (extract_tool, "--output")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = small_cfg(["TEST.NUM_TEST_CLIPS", "3"])  # 3 views per video: cheap
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "small.pt", cfg)


def one_error_line(err: str, prog: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def header_of(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["header"])


def run_args(weights, list_file, flag: str, out: Path) -> list[str]:
    return [
        *("--weights", str(weights), "--list", str(list_file), "--limit", "1"),
        *("--workers", "0", "--no-progress", flag, str(out)),
    ]


# -- the list and the outputs before the model ------------------------------------------------


@pytest.fixture
def broken_weights(tmp_path) -> Path:
    """A weights file no model can be built from."""
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint at all")
    return path


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_the_list_is_checked_before_the_model(
    prog, eval_videos, broken_weights, tmp_path, capsys, monkeypatch
):
    tool, flag = COMMANDS[prog]
    out = tmp_path / "out.h5"
    # control: with a usable list the broken weights are what is refused
    assert tool.main(run_args(broken_weights, eval_videos.list_file, flag, out)) == 2
    assert str(broken_weights) in one_error_line(capsys.readouterr().err, prog)

    def no_model(*_, **__):
        raise AssertionError("the model was loaded before the list was checked")

    monkeypatch.setattr(runner_setup, "load_model", no_model)
    bad_lists = {
        "missing": tmp_path / "no-such-list.txt",
        "device": Path("/dev/zero"),
        "folder": tmp_path,
    }
    for case, lst in bad_lists.items():
        assert tool.main(run_args(broken_weights, lst, flag, out)) == 2, case
        line = one_error_line(capsys.readouterr().err, prog)
        assert str(lst) in line and "broken.pt" not in line, (case, line)
    # the output is refused before the model too: here it is the list itself
    lst = tmp_path / "list.txt"
    lst.write_text(f"{eval_videos.root / eval_videos.specs[0].name} 1\n")
    before = lst.read_bytes()
    assert tool.main([*run_args(broken_weights, lst, flag, lst), "--overwrite"]) == 2
    assert "refusing to overwrite an input" in one_error_line(capsys.readouterr().err, prog)
    assert lst.read_bytes() == before and not out.exists()


def test_vnl_predict_checks_its_video_before_the_model(
    eval_videos, checkpoint, tmp_path, capsys, monkeypatch
):
    """A missing video, a folder or a device is one line before any model is built (for a
    released name that would be a download of its checkpoint)."""
    from nonlocal_net.tools import predict_video as predict_tool

    def no_model(*_, **__):
        raise AssertionError("the model was loaded before the video was checked")

    monkeypatch.setattr(runner_setup, "load_model", no_model)
    cases = {
        tmp_path / "no-such.mp4": "does not exist",
        tmp_path: "is not a file",
        Path("/dev/zero"): "is not a file",
    }
    for video, why in cases.items():
        args = [str(video), "--weights", "i3d_nonlocal_8x8_IN_pretrain_400k", "--no-progress"]
        assert predict_tool.main(args) == 2
        line = one_error_line(capsys.readouterr().err, "vnl-predict")
        assert str(video) in line and why in line, line
    # a labels file is read and checked before the model too
    video = eval_videos.root / eval_videos.specs[0].name
    empty_name = tmp_path / "labels.txt"
    empty_name.write_text("a\n\nc\n")
    labels_cases = {tmp_path / "no-labels.txt": "no-labels.txt", empty_name: ":2: empty class"}
    for labels, why in labels_cases.items():
        args = [str(video), "--weights", str(checkpoint), "--labels", str(labels)]
        assert predict_tool.main([*args, "--no-progress"]) == 2
        line = one_error_line(capsys.readouterr().err, "vnl-predict")
        assert why in line, line
    monkeypatch.undo()  # control: a real video with the same checks goes on to the model
    assert predict_tool.main([str(video), "--weights", str(checkpoint), "--no-progress"]) == 0
    # and a labels file of another class count is refused once the model's 7 classes are known
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    args = [str(video), "--weights", str(checkpoint), "--labels", str(three), "--no-progress"]
    assert predict_tool.main(args) == 2
    line = one_error_line(capsys.readouterr().err, "vnl-predict")
    assert "3 class names for a model with 7 classes" in line, line


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_labels_beyond_the_models_classes_are_bad_lines(
    prog, eval_videos, checkpoint, tmp_path, capsys
):
    """The label range is checked once the model's classes are known (7 here)."""
    tool, flag = COMMANDS[prog]
    video = eval_videos.root / eval_videos.specs[0].name
    lst = tmp_path / "list.txt"
    lst.write_text(f"{video} 1\n{video} 7\n")
    out = tmp_path / "out.h5"
    args = run_args(checkpoint, lst, flag, out)
    assert tool.main([a for a in args if a not in ("--limit", "1")]) == 0
    assert f"{lst}:2: bad list line (scored as wrong): label 7 out of range (0..6)" in (
        capsys.readouterr().err
    )
    with h5py.File(out, "r") as f:
        assert f["list/label"][()].tolist() == [1, -1]
        assert f["videos/video_id"][()].tolist() == [0]  # the bad line is never decoded
        errors = [e.decode() for e in f["list/error"][()]]
    assert errors == ["", "label 7 out of range (0..6)"]


# -- the decoding signature on --resume -------------------------------------------------------


@pytest.mark.parametrize("prog", sorted(COMMANDS))
@pytest.mark.parametrize("state", ["finished", "interrupted"])
def test_resume_with_another_decoding_is_refused_naming_the_field(
    prog, state, eval_videos, checkpoint, tmp_path, capsys, monkeypatch
):
    tool, flag = COMMANDS[prog]
    out = tmp_path / "out.h5"
    args = run_args(checkpoint, eval_videos.list_file, flag, out)
    monkeypatch.delenv("OPENCV_FFMPEG_READ_ATTEMPTS", raising=False)
    if state == "interrupted":

        def killed(*_, **__):
            raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(results_module.ResultsStore, "merge", killed)
            assert tool.main(args) == 130
        with open(Path(str(out) + ".parts") / "run.json", encoding="utf-8") as f:
            recorded = json.load(f)["decoding"]
    else:
        assert tool.main(args) == 0
        recorded = header_of(out)["decoding"]
    assert recorded == decoding_signature("opencv")
    capsys.readouterr()
    monkeypatch.setenv("OPENCV_FFMPEG_READ_ATTEMPTS", "7")  # changes what OpenCV's reader does
    assert tool.main([*args, "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err, prog)
    expected = 'decoding.OPENCV_FFMPEG_READ_ATTEMPTS differs: stored null, now "7"'
    assert expected in line and "{" not in line, line
    assert flag in line and "--results --output".replace(flag, "").strip() not in line, line
    monkeypatch.delenv("OPENCV_FFMPEG_READ_ATTEMPTS")
    assert tool.main([*args, "--resume"]) == 0  # the same decoding again: continues
    assert header_of(out)["decoding"] == recorded


def test_a_file_without_a_decoding_record_names_the_first_field(tmp_path):
    """A results folder written before the signature was recorded: refused naming a field."""
    header = {"list_sha256": "a", "num_entries": 1, "num_classes": 7, "backend": "opencv"}
    results_module.ResultsStore(tmp_path / "r.h5", header).prepare(False, False)
    now = {**header, "decoding": decoding_signature("opencv")}
    with pytest.raises(results_module.ResultsError) as refused:
        results_module.ResultsStore(tmp_path / "r.h5", now).prepare(True, False)
    first = sorted(now["decoding"])[0]
    assert f"decoding.{first} differs: stored null, now " in str(refused.value)


# -- the weights as recorded ------------------------------------------------------------------


@pytest.fixture
def released(tmp_path, monkeypatch) -> str:
    """A released model's name usable offline: its stand-in served from a local folder."""
    mirror = tmp_path / "mirror"
    write_release(mirror)
    monkeypatch.setitem(zoo.ZOO, TINY, tiny_entry())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(hub.ENV_ZOO_URL, str(mirror))
    return TINY


def test_a_released_name_is_recorded_as_given(released, eval_videos, tmp_path, capsys):
    results, features = tmp_path / "r.h5", tmp_path / "f.h5"
    assert test_tool.main(run_args(released, eval_videos.list_file, "--results", results)) == 0
    report = json.loads((tmp_path / "r.report.json").read_text())
    assert header_of(results)["weights"] == released and report["weights"] == released
    assert extract_tool.main(run_args(released, eval_videos.list_file, "--output", features)) == 0
    assert header_of(features)["weights"] == released
    # the cached conversion it resolved to is not what is recorded
    assert os.path.isfile(pretrained.resolve_weights(released))


def test_a_weights_file_is_recorded_by_its_absolute_path(
    eval_videos, checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(Path(checkpoint).parent)
    name = Path(checkpoint).name
    results = tmp_path / "r.h5"
    assert test_tool.main(run_args(name, eval_videos.list_file, "--results", results)) == 0
    assert header_of(results)["weights"] == str(Path(checkpoint).resolve())
    # a file named like a released model is a file (a file always wins over a name)
    named = Path(checkpoint).parent / "i3d_nonlocal_8x8_IN_pretrain_400k"
    named.write_bytes(b"")
    assert pretrained.weights_label(named.name) == str(named.resolve())
    named.unlink()
    assert pretrained.weights_label(named.name) == named.name
