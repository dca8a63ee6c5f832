"""The model zoo: the 15 released checkpoints with the effective settings of spec table 5.2."""

from __future__ import annotations

from pathlib import Path

import pytest

import nonlocal_net as nl
from nonlocal_net.core.zoo import PRETRAINED_INIT, ZOO, get_zoo_entry

# name: (model file, arc, frames, rate, affine, non-local, dropout, top-1, top-5)
TABLE_5_2 = {
    "c2d_baseline_32x2_IN_pretrain_400k": (
        "resnet_video_org",
        1,
        32,
        2,
        False,
        False,
        0.5,
        72.0,
        90.0,
    ),
    "c2d_nonlocal_32x2_IN_pretrain_400k": (
        "resnet_video_org",
        1,
        32,
        2,
        False,
        True,
        0.5,
        73.9,
        91.0,
    ),
    "i3d_baseline_32x2_IN_pretrain_400k": (
        "resnet_video_org",
        2,
        32,
        2,
        False,
        False,
        0.5,
        73.6,
        90.8,
    ),
    "i3d_nonlocal_32x2_IN_pretrain_400k": (
        "resnet_video_org",
        2,
        32,
        2,
        False,
        True,
        0.5,
        74.9,
        91.6,
    ),
    "i3d_baseline_128x1_I3D_pretrain_400k": (
        "resnet_video_org",
        2,
        128,
        1,
        True,
        False,
        0.5,
        75.2,
        92.0,
    ),
    "i3d_nonlocal_128x1_I3D_pretrain_400k": (
        "resnet_video_org",
        2,
        128,
        1,
        True,
        True,
        0.5,
        76.5,
        92.7,
    ),
    "c2d_baseline_8x8_IN_pretrain_400k": ("resnet_video", 1, 8, 8, False, False, 0.5, 71.9, 90.0),
    "c2d_nonlocal_8x8_IN_pretrain_400k": ("resnet_video", 1, 8, 8, False, True, 0.5, 74.4, 91.4),
    "i3d_baseline_8x8_IN_pretrain_400k": ("resnet_video", 2, 8, 8, False, False, 0.5, 73.4, 90.9),
    "i3d_nonlocal_8x8_IN_pretrain_400k": ("resnet_video", 2, 8, 8, False, True, 0.5, 74.7, 91.6),
    "i3d_baseline_32x4_I3D_pretrain_400k": ("resnet_video", 2, 32, 4, True, False, 0.5, 75.5, 92.0),
    "i3d_nonlocal_32x4_I3D_pretrain_400k": ("resnet_video", 2, 32, 4, True, True, 0.5, 76.5, 92.6),
    "i3d_baseline_8x8_IN_pretrain_300k": ("resnet_video", 2, 8, 8, False, False, 0.5, 73.2, 90.8),
    "i3d_baseline_8x8_IN_pretrain_600k_4gpu": (
        "resnet_video",
        2,
        8,
        8,
        False,
        False,
        0.5,
        73.0,
        90.4,
    ),
    "i3d_baseline_8x8_IN_pretrain_300k_4gpu": (
        "resnet_video",
        2,
        8,
        8,
        False,
        False,
        0.0,
        72.0,
        90.1,
    ),
}


def test_zoo_holds_exactly_the_released_files():
    assert sorted(nl.list_models()) == sorted(TABLE_5_2)
    assert len(ZOO) == 15


@pytest.mark.parametrize("name", sorted(TABLE_5_2))
def test_effective_config(name):
    model_name, arc, frames, rate, affine, nonlocal_on, dropout, top1, top5 = TABLE_5_2[name]
    entry = get_zoo_entry(name)
    cfg = nl.get_cfg(name)
    assert cfg.MODEL.MODEL_NAME == model_name and cfg.MODEL.VIDEO_ARC_CHOICE == arc
    assert cfg.MODEL.DEPTH == 50 and cfg.MODEL.NUM_CLASSES == 400
    assert (cfg.TRAIN.VIDEO_LENGTH, cfg.TRAIN.SAMPLE_RATE) == (frames, rate)
    assert (cfg.TEST.VIDEO_LENGTH, cfg.TEST.SAMPLE_RATE) == (frames, rate)
    assert cfg.MODEL.USE_AFFINE is affine
    assert cfg.NONLOCAL.CONV3_NONLOCAL is nonlocal_on and cfg.NONLOCAL.CONV4_NONLOCAL is nonlocal_on
    assert cfg.NONLOCAL.USE_BN is (not affine) and cfg.NONLOCAL.USE_ZERO_INIT_CONV is affine
    assert cfg.TRAIN.DROPOUT_RATE == dropout
    assert (entry.top1, entry.top5) == (top1, top5)
    assert entry.url == f"https://dl.fbaipublicfiles.com/video-nonlocal/{name}.pkl"
    assert entry.filename == name + ".pkl"
    assert cfg.MODEL.BN_INIT_GAMMA == 0.0 and cfg.TRAIN.JITTER_SCALES[0] == 256
    assert cfg.NONLOCAL.LAYER_MOD == 2 and cfg.NONLOCAL.USE_SCALE and cfg.NONLOCAL.USE_SOFTMAX
    assert entry.init in PRETRAINED_INIT
    assert cfg.is_frozen()


def test_schedules_and_gpus():
    assert nl.get_cfg("i3d_baseline_8x8_IN_pretrain_300k").SOLVER.MAX_ITER == 300000
    four = nl.get_cfg("i3d_baseline_8x8_IN_pretrain_600k_4gpu")
    assert four.NUM_GPUS == 4 and four.SOLVER.STEPS == [0, 300000, 500000, 600000]
    assert nl.get_cfg("i3d_baseline_8x8_IN_pretrain_300k_4gpu").TRAIN.JITTER_SCALES == [
        256,
        256,
    ]


def test_lookup_accepts_file_names():
    assert (
        get_zoo_entry("some/dir/i3d_nonlocal_8x8_IN_pretrain_400k.pkl").name
        == "i3d_nonlocal_8x8_IN_pretrain_400k"
    )


def test_checkpoints_readme_matches_the_zoo():
    text = (Path(__file__).parents[1] / "checkpoints" / "README.md").read_text()
    for entry in ZOO.values():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{entry.name}`"))
        assert f"{entry.top1}" in row and f"{entry.top5}" in row
    for init in PRETRAINED_INIT:
        assert f"`{init}`" in text
