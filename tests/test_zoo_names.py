"""A released model's name works wherever a weights file is taken: ``vnl-test``, ``vnl-predict``,
``vnl-extract`` (``--weights``), ``vnl-verify`` (SRC) and ``vnl-train`` (``TRAIN.PARAMS_FILE``),
all through the same download cache (``VNL_ZOO_URL`` pointing at a mirror folder here); and the
built-in Kinetics-400 class names."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import tomllib
import torch
from hub_helpers import BASE, TINY, TINY_OVERRIDES, tiny_entry, write_release
from train_helpers import write_class_video

import nonlocal_net as nl
from nonlocal_net.converters.reader import read_caffe2_pkl
from nonlocal_net.core import hub, zoo
from nonlocal_net.datasets.class_names import kinetics400_class_names
from nonlocal_net.datasets.synthetic import write_list_file

ROOT = Path(__file__).resolve().parent.parent
FEW_VIEWS = ["TEST.NUM_TEST_CLIPS", "3"]  # 1 clip x 3 crops: the protocol, cheaper


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mirror")
    write_release(folder)
    return folder


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    write_class_video(root / "a.avi", (200, 40, 40), 12, seed=1)
    write_class_video(root / "b.avi", (40, 40, 200), 12, seed=2)
    write_list_file(root / "list.txt", [("a.avi", 3), ("b.avi", 7)])
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch, mirror) -> Path:
    monkeypatch.setitem(zoo.ZOO, TINY, tiny_entry())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(hub.ENV_ZOO_URL, str(mirror))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_vnl_test_takes_a_zoo_name(cache, videos, tmp_path, capsys):
    from nonlocal_net.tools.test_net_video import main

    results = tmp_path / "results.h5"
    argv = ["--weights", TINY, "--list", str(videos / "list.txt"), "--data-root", str(videos)]
    argv += ["--results", str(results), "--workers", "0", "--no-progress", *FEW_VIEWS]
    assert main(argv) == 0
    assert "top-1" in capsys.readouterr().out.lower()
    assert (cache / f"{TINY}.pt").is_file() and results.is_file()


def test_vnl_predict_takes_a_zoo_name_and_prints_kinetics_names(cache, videos, tmp_path, capsys):
    from nonlocal_net.tools.predict_video import main

    video = str(videos / "a.avi")
    assert main([video, "--weights", TINY, "--topk", "3", *FEW_VIEWS]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    names = kinetics400_class_names()
    assert len(lines) == 3
    for line in lines:  # " 1. 0.0123  playing drums  (230)"
        index = int(line.rsplit("(", 1)[1].rstrip(")"))
        assert f"  {names[index]}  ({index})" in line
    # --labels still overrides the built-in names
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class number {i}\n" for i in range(400)))
    assert main([video, "--weights", TINY, "--topk", "3", "--labels", str(labels), *FEW_VIEWS]) == 0
    out = capsys.readouterr().out.splitlines()[1:]
    assert all("class number " in line for line in out) and len(out) == 3


def test_a_model_without_400_classes_prints_indices(videos, tmp_path, capsys):
    from eval_helpers import small_cfg, write_checkpoint

    from nonlocal_net.tools.predict_video import main

    weights = write_checkpoint(tmp_path / "seven.pt", small_cfg())  # 7 classes
    assert main([str(videos / "a.avi"), "--weights", str(weights), "--topk", "2", *FEW_VIEWS]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 2 and all(line.split()[-1].isdigit() for line in lines)
    assert nl.class_names(7) is None and nl.class_names(nl.build_model(BASE))[0] == "abseiling"


def test_vnl_extract_takes_a_zoo_name(cache, videos, tmp_path, capsys):
    from nonlocal_net.tools.extract_features import main

    assert main(["--weights", TINY, "--list-layers"]) == 0
    assert "pool5" in capsys.readouterr().out.split()
    out = tmp_path / "features.h5"
    argv = ["--weights", TINY, "--list", str(videos / "list.txt"), "--data-root", str(videos)]
    argv += ["--output", str(out), "--workers", "0", "--no-progress", *FEW_VIEWS]
    assert main(argv) == 0
    with h5py.File(out) as f:
        assert len(f.keys()) > 0


def test_vnl_verify_takes_a_zoo_name_as_src(cache, capsys):
    from nonlocal_net.verify.cli import main

    status = main([TINY, "--split", "val", "--runs", "fp32", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"{cache / TINY}.pkl" in out and "PASS" in out.upper()


def test_train_params_file_takes_a_zoo_name(cache):
    from nonlocal_net.engine.trainer import initialise_from_params_file

    cfg = nl.get_cfg(BASE, [*TINY_OVERRIDES, "MODEL.NUM_CLASSES", "3"])
    model = nl.build_model(cfg, split="train")
    assert initialise_from_params_file(model, cfg, TINY) == 400000  # the file's model_iter
    blobs = read_caffe2_pkl(str(cache / f"{TINY}.pkl")).blobs
    assert torch.equal(model.conv1.weight, torch.from_numpy(blobs["conv1_w"]))


@pytest.mark.slow  # one training iteration of the whole command
def test_vnl_train_takes_a_zoo_name_as_params_file(cache, videos, tmp_path, capsys):
    from nonlocal_net.tools.train_net_video import main

    out = tmp_path / "run"
    argv = ["--model", BASE, "--train-list", str(videos / "list.txt"), "--data-root", str(videos)]
    argv += ["--output-dir", str(out), "--workers", "0", "--no-progress", "--no-caffe2"]
    overrides = [*TINY_OVERRIDES, "MODEL.NUM_CLASSES", "8", "SOLVER.MAX_ITER", "1"]
    overrides += ["TRAIN.COMPUTE_PRECISE_BN", "False", "TRAIN.TEST_AFTER_TRAIN", "False"]
    overrides += ["TRAIN.RESET_START_ITER", "True", "TRAIN.PARAMS_FILE", TINY]
    assert main([*argv, *overrides]) == 0
    assert f"initialised from {cache / TINY}.pkl" in capsys.readouterr().err


def test_kinetics400_names_follow_the_original_class_ids():
    names = kinetics400_class_names()
    assert len(names) == 400 and len(set(names)) == 400
    # the original's classids.json numbers the classes in sorted order of their names
    assert names == sorted(names)
    assert names[0] == "abseiling" and names[1] == "air drumming" and names[399] == "zumba"
    data = json.loads((ROOT / "lib/datasets/kinetics400_classes.json").read_text())
    assert "process_data/kinetics/classids.json" in data["source"]


def test_the_names_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = config["tool"]["setuptools"]["package-data"]["nonlocal_net.datasets"]
    assert "kinetics400_classes.json" in data
