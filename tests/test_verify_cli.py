"""``vnl-verify`` and the comparison's report: what is measured, printed, written and refused.

Runs on the small case of ``parity_cases`` (a C2D non-local network with 4-frame clips).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from parity_cases import SMALL, SMALL_SPLIT

import nonlocal_net as nl
from nonlocal_net.converters import convert_blobs, convert_checkpoint
from nonlocal_net.datasets import test_views
from nonlocal_net.datasets.synthetic import write_undecodable_file, write_video
from nonlocal_net.reference import build_graph
from nonlocal_net.verify import (
    DEFAULT_TOLERANCE,
    LayerDiff,
    ParityReport,
    PrecisionRun,
    compare_layers,
    compare_port,
    no_tf32,
    random_clip,
    reference_outputs,
    video_clips,
)
from nonlocal_net.verify.cli import main

MODEL_ARGS = ["--model", SMALL.zoo, *SMALL.overrides]


def _cli(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _error_line(stderr: str) -> str:
    (line,) = [x for x in stderr.splitlines() if x.startswith("vnl-verify: error:")]
    return line


@pytest.fixture(scope="module")
def small(small_checkpoint):
    """The small case's graph, clips, reference outputs and converted model (val head)."""
    path, blobs = small_checkpoint
    cfg = SMALL.cfg()
    graph = build_graph(cfg, SMALL_SPLIT)
    clips = random_clip(cfg, batch=1, split=SMALL_SPLIT, seed=9)
    reference = reference_outputs(graph, blobs, clips)
    model = nl.build_model(cfg, SMALL_SPLIT)
    model.load_state_dict(convert_blobs(blobs, cfg).state_dict)
    return dict(
        path=path, blobs=blobs, cfg=cfg, graph=graph, clips=clips, ref=reference, model=model
    )


# ---------------------------------------------------------------------------------------------
# The comparison's measure and report
# ---------------------------------------------------------------------------------------------


def test_relative_error_is_max_abs_over_max_ref(small):
    """A known error injected into pool5's output is reported exactly as defined."""
    model, ref = small["model"], small["ref"]["pool5"]
    delta = 1e-3

    def perturb(_module, _inputs, output):
        output = output.clone()
        output.view(-1)[7] += delta
        return output

    handle = model.pool5.register_forward_hook(perturb)
    try:
        run = compare_port(model, small["graph"], small["ref"], small["clips"], dtype="float64")
    finally:
        handle.remove()
    layer = {x.label: x for x in run.layers}["pool5"]
    assert layer.ref_max == float(np.abs(ref).max())
    assert math.isclose(layer.max_abs, delta, rel_tol=1e-9)
    assert math.isclose(layer.rel, delta / np.abs(ref).max(), rel_tol=1e-9)
    assert not layer.ok and run.first_failure is layer
    before = run.layers[: run.layers.index(layer)]
    assert before and all(x.ok and x.rel < 1e-12 for x in before)
    # the model is left in float32, as it came
    assert next(model.parameters()).dtype == torch.float32


def test_non_finite_outputs_fail(small):
    model = small["model"]

    def poison(_module, _inputs, output):
        output = output.clone()
        output[0, 3] = float("nan")
        return output

    handle = model.pred.register_forward_hook(poison)
    try:
        run = compare_port(model, small["graph"], small["ref"], small["clips"], dtype="float32")
    finally:
        handle.remove()
    assert run.first_failure.label == "pred"
    assert run.first_failure.note == "non-finite values" and math.isnan(run.max_rel)
    assert not run.ok


def test_report_of_a_clean_conversion(small):
    report = compare_layers(small["model"], small["graph"], small["blobs"], small["clips"])
    assert report.ok and report.first_failure is None
    assert [r.dtype for r in report.runs] == ["float32", "float64"]
    assert report.run("float32").max_rel < 1e-5 and report.run("float64").max_rel < 1e-13
    labels = report.labels
    assert labels[0] == "res_conv1_bn" and labels[-3:] == ["pool5", "pred", "softmax"]
    softmax = {x.label: x for x in report.run("float32").layers}["softmax"]
    assert softmax.module is None and softmax.shape == (1, 400)  # val: softmax of the logits
    table = report.format_table()
    assert len(table.splitlines()) == len(labels) + 2
    assert "(softmax of output)" in table and "<- first" not in table
    assert report.verdict().startswith(f"PASS: all {len(labels)} layers agree")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] and len(data["runs"][1]["layers"]) == len(labels)
    with pytest.raises(ValueError, match="split"):
        compare_layers(small["model"], build_graph(small["cfg"], "test"), {}, small["clips"])


def test_verdict_names_the_first_failure_over_all_runs():
    def layer(label, rel, tol=1e-4):
        return LayerDiff(label, label, label, (1,), (1,), rel, 1.0, rel, tol)

    fp32 = PrecisionRun("float32", 1e-4, [layer("a", 0), layer("b", 1e-6), layer("c", 1)], 1.0)
    fp64_layers = [layer("a", 0, 1e-10), layer("b", 1e-6, 1e-10), layer("c", 1, 1e-10)]
    fp64 = PrecisionRun("float64", 1e-10, fp64_layers, 1.0)
    report = ParityReport("x", "val", (1, 3, 4, 224, 224), 1.0, [fp32, fp64])
    assert fp32.first_failure.label == "c" and fp64.first_failure.label == "b"
    assert report.first_failure == "b"
    assert report.verdict().startswith("FAIL: first diverging layer b (port module 'b'): float64:")
    assert not report.ok


def test_no_tf32_switches_tf32_off_and_restores_it():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision = conv.fp32_precision = "tf32"
    try:
        with no_tf32():
            assert matmul.fp32_precision == conv.fp32_precision == "ieee"
        assert matmul.fp32_precision == conv.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_comparison_on_cuda(small):
    report = compare_layers(
        small["model"], small["graph"], small["blobs"], small["clips"], device="cuda"
    )
    assert report.ok, report.format_table()
    assert report.run("float32").max_rel < 1e-5 and report.run("float64").max_rel < 1e-13


def test_random_clip():
    cfg = SMALL.cfg()
    test = random_clip(cfg, seed=1)
    assert test.shape == (1, 3, 4, 256, 256) and test.dtype == np.float32
    assert random_clip(cfg, split="val", batch=2).shape == (2, 3, 4, 224, 224)
    assert random_clip(cfg, frames=6, crop=100).shape == (1, 3, 6, 100, 100)
    np.testing.assert_array_equal(test, random_clip(cfg, seed=1))
    assert not np.array_equal(test, random_clip(cfg, seed=2))
    pixels = test * np.float32(57.375) + np.float32(114.75)
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-4)
    assert pixels.min() > -0.01 and pixels.max() < 255.01
    with pytest.raises(ValueError, match="positive"):
        random_clip(cfg, batch=0)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_help():
    out = subprocess.run(
        [sys.executable, "-m", "nonlocal_net.verify", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("usage: vnl-verify SRC.pkl [DST.pt]")
    for option in ("--model", "--cfg", "--split", "--frames", "--crop", "--seed", "--tol",
                   "--json", "--device"):  # fmt: skip
        assert option in out
    assert f"{DEFAULT_TOLERANCE['float32']:.0e}" in out


def test_cli_passes_a_clean_conversion_and_writes_json(small, tmp_path, capsys):
    report_file = tmp_path / "out" / "report.json"
    rc, out, _ = _cli(
        [small["path"], *MODEL_ARGS, "--split", "val", "--seed", "9", "--json", report_file],
        capsys,
    )
    assert rc == 0, out
    lines = out.splitlines()
    description = "(converted in memory): resnet_video C2D ResNet-50 (arc 1)"
    assert lines[0].startswith(f"{small['path']} {description}")
    assert lines[-1].startswith("PASS: all ")
    for label in ("res_conv1_bn", "pool1", "res2_0", "pool2", "nonlocal_conv3_1",
                  "nonlocal_conv4_5", "res5_2", "pool5", "pred", "softmax"):  # fmt: skip
        assert any(line.startswith(label + " ") for line in lines), label
    data = json.loads(report_file.read_text())
    assert data["ok"] and data["first_failure"] is None and data["verdict"] == lines[-1]
    assert data["input_shape"] == [1, 3, 4, 224, 224] and data["info"]["seed"] == 9
    # the same clip (seed 9) as the fixture: the same numbers as the function's run
    fp32 = compare_port(small["model"], small["graph"], small["ref"], small["clips"])
    assert math.isclose(data["runs"][0]["max_rel"], fp32.max_rel, rel_tol=1e-2)
    assert list(report_file.parent.iterdir()) == [report_file]  # no temporary file left


def test_cli_checks_a_converted_file(small, tmp_path, capsys):
    dst = tmp_path / "converted.pt"
    convert_checkpoint(small["path"], dst, SMALL.cfg())
    # without --model the converted file's own config is used; a test head on 6 x 224 x 224
    rc, out, _ = _cli(
        [small["path"], dst, "--split", "test", "--frames", "6", "--crop", "224",
         "--runs", "fp32", "--json", tmp_path / "r.json"],
        capsys,
    )  # fmt: skip
    assert rc == 0, out
    assert out.splitlines()[0].startswith(f"{small['path']} vs {dst}: ")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["input_shape"] == [1, 3, 6, 224, 224]
    assert [r["dtype"] for r in data["runs"]] == ["float32"]
    assert data["runs"][0]["layers"][-1]["shape"] == [1, 400]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["SRC"], "one of --model NAME or --cfg FILE.yaml is required"),
        (["SRC", "--model", SMALL.zoo, "MODEL.DEPTH"], "KEY VALUE pairs"),
        (["SRC", "--model", SMALL.zoo, "--frames", "0"], "--frames must be positive"),
        (["SRC", "--model", SMALL.zoo, "--tol", "-1"], "--tol must be positive"),
        ([], "SRC is required"),
    ],
)
def test_cli_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_errors_name_the_file(small, tmp_path, capsys):
    missing = tmp_path / "missing.pkl"
    rc, _, err = _cli([missing, *MODEL_ARGS], capsys)
    assert rc == 2 and _error_line(err).startswith(f"vnl-verify: error: {missing}")
    # the blobs of a C2D network checked as an I3D one: the converter refuses, naming the file
    rc, _, err = _cli([small["path"], "--model", "i3d_nonlocal_8x8_IN_pretrain_400k"], capsys)
    assert rc == 2 and _error_line(err).startswith(f"vnl-verify: error: {small['path']}")
    # a Caffe2 pickle where the converted file belongs
    rc, _, err = _cli([small["path"], small["path"], *MODEL_ARGS], capsys)
    assert rc == 2 and f"{small['path']}: not a converted" in _error_line(err)
    # the FC head of the val net cannot take a longer clip than TRAIN.VIDEO_LENGTH
    rc, _, err = _cli([small["path"], *MODEL_ARGS, "--split", "val", "--frames", "8"], capsys)
    assert rc == 2
    assert _error_line(err).startswith(
        "vnl-verify: error: clips 1x3x8x224x224 do not fit the original's val network"
    )


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 40-frame 320x240 video (MJPG in AVI) written with OpenCV."""
    return write_video(tmp_path_factory.mktemp("video") / "clip.avi", 40, 320, 240)


def test_video_clips_are_the_original_test_views(video):
    cfg = SMALL.cfg()
    views, _ = test_views(video, cfg)  # (30, 3, 4, 256, 256)
    np.testing.assert_array_equal(video_clips(video, cfg, view=11, batch=2), views[11:13].numpy())
    # val: the central 224 crop of the 256 view
    val = video_clips(video, cfg, view=3, split="val")
    np.testing.assert_array_equal(val, views[3:4, :, :, 16:240, 16:240].numpy())
    with pytest.raises(ValueError, match=r"views 29\.\.30 requested"):
        video_clips(video, cfg, view=29, batch=2)


def test_cli_on_a_video(small, video, tmp_path, capsys):
    report_file = tmp_path / "video.json"
    rc, out, _ = _cli(
        [small["path"], *MODEL_ARGS, "--video", video, "--view", "14", "--runs", "fp32",
         "--json", report_file],
        capsys,
    )  # fmt: skip
    assert rc == 0, out
    assert f"({video} view 14)" in out.splitlines()[1]
    data = json.loads(report_file.read_text())
    assert data["input_shape"] == [1, 3, 4, 256, 256]
    assert data["info"]["video"] == str(video) and data["info"]["view"] == 14
    bad = write_undecodable_file(tmp_path / "bad.mp4")
    rc, _, err = _cli([small["path"], *MODEL_ARGS, "--video", bad], capsys)
    assert rc == 2 and _error_line(err).startswith(f"vnl-verify: error: {bad}")
    with pytest.raises(SystemExit):
        main([str(small["path"]), *MODEL_ARGS, "--video", str(video), "--frames", "8"])
    assert "--frames cannot be combined with --video" in capsys.readouterr().err


def test_flag_names_shared_with_the_other_commands_and_the_older_ones():
    from nonlocal_net.verify.cli import parse_args

    new = parse_args(["a.pkl", "--model", "x", "--batch-size", "2", "--runs", "fp64"])
    old = parse_args(["a.pkl", "--model", "x", "--batch", "2", "--precision", "fp64"])
    assert (new.batch, new.precision) == (old.batch, old.precision) == (2, "fp64")
    with pytest.raises(SystemExit):
        parse_args(["a.pkl", "--model", "x", "--batch-size", "0"])
