"""Hardening: inputs are never outputs, one writer per output, non-finite numbers never pass as
results, bounded work for hostile inputs, one ``prog: error:`` line (exit status 2) for every
refusal. Every input here is written by the test, and every refusal must leave the inputs
byte-identical."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import SMALL_BASE, SMALL_OVERRIDES, small_cfg, write_checkpoint

from nonlocal_net.converters import write_caffe2_pkl
from nonlocal_net.converters.reader import read_caffe2_pkl
from nonlocal_net.converters.synthetic import synthetic_checkpoint_blobs
from nonlocal_net.core.config import ConfigError, cfg_from_file, get_default_cfg
from nonlocal_net.engine.metrics import compute_report, video_outcome
from nonlocal_net.utils.io import atomic_write, remove_stale_temporaries
from nonlocal_net.utils.lock import LockError, output_lock
from nonlocal_net.utils.log import EXIT_ERROR, terminal_safe

SMALL_ARGS = ["--model", SMALL_BASE, *SMALL_OVERRIDES, "TEST.NUM_TEST_CLIPS", "6"]


def digest(*paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def run_tool(module: str, args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        **kwargs,
    )


def run_in_process(module: str, args, capsys) -> subprocess.CompletedProcess:
    """``run_tool`` through the command's own ``main`` in this process: the same argument
    checks and error lines, without a new process's torch start-up (for refusal matrices)."""
    main = importlib.import_module(module).main
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own refusals
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def assert_refused(done, *needles: str, prog: str) -> None:
    """Exit status 2, exactly one stderr line ``prog: error: ...`` naming the needles, and no
    traceback or raw control characters."""
    assert done.returncode == EXIT_ERROR, (done.returncode, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr and "\x1b" not in done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


CONVERT = "nonlocal_net.converters.cli"
TEST = "nonlocal_net.tools.test_net_video"
SCORE = "nonlocal_net.tools.score_results"
PREDICT = "nonlocal_net.tools.predict_video"
VERIFY = "nonlocal_net.verify.cli"


@pytest.fixture(scope="module")
def small_pt(tmp_path_factory):
    cfg = small_cfg(["TEST.NUM_TEST_CLIPS", "6"])
    return write_checkpoint(tmp_path_factory.mktemp("pt") / "small.pt", cfg)


@pytest.fixture(scope="module")
def small_pkl(tmp_path_factory):
    cfg = small_cfg(["TEST.NUM_TEST_CLIPS", "6"])
    blobs = synthetic_checkpoint_blobs(cfg, momentum=False)
    path = tmp_path_factory.mktemp("pkl") / "small.pkl"
    write_caffe2_pkl(blobs, path)
    return path, blobs


# --------------------------------------------------------------------------- inputs != outputs
def test_convert_refuses_its_source_as_destination(small_pkl, tmp_path):
    src, _ = small_pkl
    link = tmp_path / "link.pkl"
    link.symlink_to(src)
    before = digest(src)
    for dst in (src, link, os.path.relpath(src, tmp_path)):
        done = run_tool(CONVERT, [src, dst, *SMALL_ARGS], cwd=tmp_path)
        assert_refused(done, str(dst), "same file", prog="vnl-convert")
    assert digest(src) == before


def test_export_refuses_its_source_and_foreign_files(small_pt, tmp_path):
    before = digest(small_pt)
    done = run_tool(CONVERT, [small_pt, small_pt, "--to-caffe2"])
    assert_refused(done, "same file", prog="vnl-convert")
    foreign = tmp_path / "notes.pkl"
    foreign.write_text("my notes\n")
    done = run_tool(CONVERT, [small_pt, foreign, "--to-caffe2"])
    assert_refused(done, "--overwrite", prog="vnl-convert")
    assert foreign.read_text() == "my notes\n" and digest(small_pt) == before


def test_convert_refuses_to_replace_a_foreign_file(small_pkl, tmp_path):
    src, _ = small_pkl
    dst = tmp_path / "thesis.pt"
    dst.write_text("not a checkpoint")
    done = run_tool(CONVERT, [src, dst, *SMALL_ARGS])
    assert_refused(done, str(dst), "--overwrite", prog="vnl-convert")
    assert dst.read_text() == "not a checkpoint"


def test_eval_tools_refuse_inputs_as_outputs(small_pt, eval_videos, tmp_path, capsys):
    lst = eval_videos.list_file
    before = digest(lst, small_pt)
    base = ["--weights", small_pt, "--list", lst, "--workers", "0", "--no-progress"]
    # the first case as a process from the command line, the rest through the same main()
    done = run_tool(TEST, [*base, "--report", lst])
    assert_refused(done, "same file", prog="vnl-test")
    for extra in (
        ["--report", small_pt],
        ["--results", small_pt, "--overwrite"],
        ["--results", tmp_path / "r.h5", "--report", lst, "--overwrite"],
    ):
        done = run_in_process(TEST, [*base, *extra], capsys)
        assert_refused(done, "same file", prog="vnl-test")
    done = run_in_process(PREDICT, [lst, "--weights", small_pt, "--features", small_pt], capsys)
    assert_refused(done, "same file", prog="vnl-predict")
    results = tmp_path / "r.h5"
    results.write_bytes(b"\x89HDF\r\n\x1a\nnot really")
    done = run_in_process(SCORE, [results, "--report", results], capsys)
    assert_refused(done, "same file", prog="vnl-score")
    verify_args = [small_pt, "--model", SMALL_BASE, "--json", small_pt]
    done = run_in_process(VERIFY, verify_args, capsys)
    assert_refused(done, "same file", prog="vnl-verify")
    assert digest(lst, small_pt) == before


# --------------------------------------------------------------------------- one writer
def test_a_live_second_writer_is_refused_whatever_its_flags(small_pt, eval_videos, tmp_path):
    results = tmp_path / "r.h5"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = Path(f"{results}.lock")
        lock.write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        args = ["--weights", small_pt, "--list", eval_videos.list_file, "--results", results]
        for flag in ("--resume", "--overwrite"):
            done = run_tool(TEST, [*args, flag, "--workers", "0"])
            assert_refused(done, str(results), f"process {holder.pid}", prog="vnl-test")
        assert lock.exists() and not results.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over
    with output_lock(results):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(LockError, match="being written by process"), output_lock(results):
            pass
    assert not lock.exists()


def test_sigterm_removes_the_temporary_and_stale_temporaries_are_removed(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    script = (
        "import sys, time\n"
        "from nonlocal_net.utils.io import atomic_write, install_signal_cleanup\n"
        "install_signal_cleanup()\n"
        f"with atomic_write({str(target)!r}) as f:\n"
        "    f.write(b'new' * 1000); f.flush(); print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert list(tmp_path.glob(".out.bin.*.tmp"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not list(tmp_path.glob(".out.bin.*.tmp")) and target.read_bytes() == b"old"
    # a SIGKILLed writer (a dead pid) leaves its temporary; the next run removes it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.bin.{dead.pid}-0123456789ab.tmp"
    stale.write_bytes(b"partial")
    assert remove_stale_temporaries(target) == [str(stale)] and not stale.exists()


# --------------------------------------------------------------------------- non-finite numbers
def test_nan_weights_are_refused_then_fail_every_view(small_pkl, eval_videos, tmp_path):
    _, blobs = small_pkl
    bad = dict(blobs)
    bad["pred_w"] = bad["pred_w"].copy()
    bad["pred_w"][0, 0] = np.nan
    bn = next(k for k in bad if k.endswith("_bn_riv"))
    bad[bn] = -np.abs(bad[bn])
    src = tmp_path / "nan.pkl"
    write_caffe2_pkl(bad, src)
    before = digest(src)
    dst = tmp_path / "nan.pt"
    done = run_tool(CONVERT, [src, dst, *SMALL_ARGS])
    assert_refused(done, "pred_w: 1 NaN", bn, "--allow-nonfinite", prog="vnl-convert")
    assert not dst.exists()
    done = run_tool(CONVERT, [src, dst, *SMALL_ARGS, "--allow-nonfinite"])
    assert done.returncode == 0 and "pred_w" in done.stderr and dst.exists()
    assert digest(src) == before
    report = tmp_path / "report.json"
    args = ["--weights", dst, "--list", eval_videos.list_file, "--report", report]
    done = run_tool(TEST, [*args, "--limit", "2", "--workers", "0", "--no-progress"])
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert data["top1_correct"] == data["top5_correct"] == data["clip_correct"] == 0
    assert data["num_failed_views"] == data["num_views"] > 0
    assert "FAILED VIEWS" in done.stdout and "NaN/Inf" in done.stderr


def test_metrics_never_count_nan_as_correct():
    scores = np.full((3, 8), np.nan, np.float32)
    scores[2] = [0.0, 0.7, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03]  # label 0 is last
    outcome = video_outcome(0, 0, [0, 1, 2], scores, 3)  # NaN argmax would be class 0
    assert outcome.failed_views == 2 and outcome.topk[0] == 1
    assert outcome.clip_correct == 0 and not outcome.first_view_correct
    all_nan = video_outcome(1, 0, [0, 1, 2], np.full((3, 8), np.nan), 3)
    report = compute_report([0, 0], {0: outcome, 1: all_nan}, 3)
    assert report["top1_correct"] == report["top5_correct"] == report["clip_correct"] == 0
    assert report["num_failed_views"] == 5 and report["num_videos_with_failed_views"] == 2


# --------------------------------------------------------------------------- bounded work
def _bounded(fn):
    """Run ``fn`` and return (exception or result, seconds, peak traced MB)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        outcome = fn()
    except Exception as e:
        outcome = e
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return outcome, seconds, peak


def _memo_bomb(levels: int = 60) -> bytes:
    """A few hundred bytes: dict i = {'a': dict i-1, 'b': dict i-1} through memo references
    (2**levels paths when copied per path)."""
    out = bytearray(b"\x80\x02}q\x00")
    for i in range(1, levels + 1):
        out += b"}" + b"(" + b"U\x01a" + b"h" + bytes([i - 1]) + b"U\x01b"
        out += b"h" + bytes([i - 1]) + b"u" + b"q" + bytes([i])
    out += b"}(U\x05blobsh" + bytes([levels]) + b"u."
    return bytes(out)


def test_pickle_memo_bomb_is_linear(tmp_path):
    path = tmp_path / "bomb.pkl"
    path.write_bytes(_memo_bomb())
    assert path.stat().st_size < 1000
    _, seconds, peak = _bounded(lambda: read_caffe2_pkl(path))
    assert seconds < 1 and peak < 200, (seconds, peak)
    done = run_tool(CONVERT, [path, tmp_path / "out.pt", *SMALL_ARGS])
    assert done.returncode == EXIT_ERROR and "Traceback" not in done.stderr
    assert done.stderr.count("vnl-convert: error:") == 1


def test_yaml_alias_bomb_is_refused_fast(tmp_path):
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    outcome, seconds, peak = _bounded(lambda: cfg_from_file(get_default_cfg(), path))
    assert isinstance(outcome, ConfigError) and "more than" in str(outcome)
    assert seconds < 1 and peak < 200, (seconds, peak)
    merge = ["base: &m0 {A: 1}"]
    merge += [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], K{i}: 1}}" for i in range(1, 40)]
    path.write_text("\n".join(merge) + "\n")
    outcome, seconds, peak = _bounded(lambda: cfg_from_file(get_default_cfg(), path))
    assert isinstance(outcome, ConfigError) and seconds < 1 and peak < 200


def _stored(tmp_path, name, cfg_value, base: Path) -> Path:
    data = torch.load(base, weights_only=True)
    data["cfg"] = cfg_value
    path = tmp_path / name
    torch.save(data, path)
    return path


def test_malformed_stored_configs_are_refused_before_building(
    small_pt, eval_videos, tmp_path, capsys
):
    good = torch.load(small_pt, weights_only=True)["cfg"]
    shared: list = [1]
    for _ in range(60):
        shared = [shared, shared]
    deep: dict = {}
    for _ in range(200):
        deep = {"MODEL": deep}
    huge = json.loads(json.dumps(good))
    huge["MODEL"]["NUM_CLASSES"] = 10**9
    cases = {
        "list.pt": ([1, 2], "'cfg'"),
        "str.pt": ("MODEL", "'cfg'"),
        "bomb.pt": ({**good, "SOLVER": {**good["SOLVER"], "LRS": shared}}, "more than"),
        "deep.pt": (deep, "levels deep"),
        "huge.pt": (huge, "MODEL.NUM_CLASSES"),
    }
    for name, (value, needle) in cases.items():
        path = _stored(tmp_path, name, value, small_pt)
        before = digest(path)
        start = time.perf_counter()
        done = run_in_process(
            TEST, ["--weights", path, "--list", eval_videos.list_file, "--workers", "0"], capsys
        )
        assert_refused(done, name, needle, prog="vnl-test")
        assert time.perf_counter() - start < 60 and digest(path) == before


@pytest.mark.parametrize(
    "override,needle",
    [
        (["MODEL.DEPTH", "34"], "MODEL.DEPTH"),
        (["MODEL.NUM_CLASSES", "0"], "MODEL.NUM_CLASSES"),
        (["MODEL.VIDEO_ARC_CHOICE", "9"], "MODEL.VIDEO_ARC_CHOICE"),
        (["TRAIN.JITTER_SCALES", "[]"], "TRAIN.JITTER_SCALES"),
        (["SOLVER.BASE_LR", "float('nan')"], "SOLVER.BASE_LR"),
    ],
)
def test_rejected_overrides_are_one_line(small_pt, eval_videos, override, needle, capsys):
    args = ["--weights", small_pt, "--list", eval_videos.list_file, "--workers", "0", *override]
    done = run_in_process(TEST, args, capsys)
    assert_refused(done, needle, prog="vnl-test")


def test_invalid_numeric_options_are_refused(small_pt, eval_videos, capsys):
    base = ["--weights", small_pt, "--list", eval_videos.list_file]
    for extra in (["--batch-size", "0"], ["--workers", "-1"], ["--flush-every", "0"]):
        done = run_in_process(TEST, [*base, *extra], capsys)
        assert done.returncode == 2 and extra[0] in done.stderr


def one_video_args(weights, videos) -> list:
    return ["--weights", weights, "--list", videos.list_file, "--workers", "0", "--limit", "1"]


def test_unwritable_output_folder_is_one_line(small_pt, eval_videos, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = run_tool(
        TEST,
        [*one_video_args(small_pt, eval_videos), "--report", blocker / "r.json"],
    )
    assert_refused(done, str(blocker), prog="vnl-test")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_one_line(small_pt, eval_videos, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    done = run_tool(
        TEST,
        [*one_video_args(small_pt, eval_videos), "--results", folder / "r.h5"],
    )
    assert_refused(done, "ro", prog="vnl-test")


# --------------------------------------------------------------------------- printing
def test_names_from_files_are_printed_terminal_safe(small_pkl, tmp_path):
    _, blobs = small_pkl
    evil = {**blobs, "evil\x1b[2J\nname": np.zeros(1, np.float32)}
    src = tmp_path / "evil.pkl"
    write_caffe2_pkl(evil, src)
    done = run_tool(CONVERT, [src, tmp_path / "out.pt", *SMALL_ARGS])
    assert_refused(done, "evil\\x1b[2J\\nname", prog="vnl-convert")
    assert terminal_safe("a\x1b[31mb\nc") == "a\\x1b[31mb\\nc"


def test_atomic_write_cleans_up_on_error(tmp_path):
    target = tmp_path / "t.json"
    with pytest.raises(RuntimeError), atomic_write(target, "w") as f:
        f.write("x")
        raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())


def test_demo_reports_a_bad_output_folder_in_one_line(tmp_path, capsys):
    from nonlocal_net.tools import demo

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert demo.main(["--output", str(blocker)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("vnl-demo: error:") == 1 and str(blocker) in err and "Traceback" not in err
    assert blocker.read_text() == "x"


def test_eval_options_are_validated():
    from nonlocal_net.engine import EvalOptions, evaluate

    for bad in ({"batch_size": 0}, {"workers": -1}, {"flush_every": 0}, {"limit": -2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            evaluate("unused.txt", options=EvalOptions(), **bad)
    with pytest.raises(TypeError):
        evaluate("unused.txt", no_such_option=1)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo never",))


def test_hostile_pt_refusal_names_the_global_and_gives_no_unsafe_advice(tmp_path):
    from nonlocal_net.core.weights_file import WeightsFileError
    from nonlocal_net.models.model_builder import load_model

    path = tmp_path / "hostile.pt"
    torch.save({"format": "nonlocal_net/v1", "state_dict": {}, "x": _Payload()}, path)
    before = digest(path)
    with pytest.raises(WeightsFileError) as info:
        load_model(path)
    message = str(info.value)
    assert "system" in message and str(path) in message
    assert "weights_only" not in message and "False" not in message
    assert digest(path) == before
