"""The released Kinetics-400 checkpoints and the files they were initialised from.

Every :class:`ZooEntry` is named exactly as its released file without ``.pkl`` and records how
the original produced it: the YAML config its training script loaded, the script's command-line
overrides, the initialisation file, and the accuracy the original README reports for the
fully-convolutional 30-view test (10 clips x 3 crops of 256x256). The table is data only:
:func:`nonlocal_net.core.config.get_cfg` turns a name into the effective configuration (original
defaults <- YAML values <- script overrides), so ``build_model(name, split)`` is the released
network.

The five ``BASE_CONFIGS`` hold the values of the original's five ``configs/*.yaml`` files (the
same keys and values; the files themselves are not redistributed here).
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BASE_CONFIGS",
    "DOWNLOAD_ROOT",
    "PRETRAINED_INIT",
    "ZOO",
    "InitFile",
    "UnknownModelError",
    "ZooEntry",
    "get_zoo_entry",
    "list_models",
]

DOWNLOAD_ROOT = "https://dl.fbaipublicfiles.com/video-nonlocal/"
PRETRAINED_TARBALL = DOWNLOAD_ROOT + "pretrained_model.tar.gz"


def _base_8gpu_400k() -> dict[str, Any]:
    """Values of ``DBG_kinetics_resnet_8gpu_c2d_nonlocal_400k.yaml``."""
    return {
        "DATADIR": "../data/lmdb/kinetics_lmdb_multicrop/",
        "FILENAME_GT": "../process_data/kinetics/vallist.txt",
        "NUM_GPUS": 8,
        "LOG_PERIOD": 10,
        "MODEL": {
            "NUM_CLASSES": 400,
            "MODEL_NAME": "resnet_video",
            "BN_MOMENTUM": 0.9,
            "BN_EPSILON": 1.0000001e-5,
            "ALLOW_INPLACE_SUM": True,
            "ALLOW_INPLACE_RELU": True,
            "ALLOW_INPLACE_RESHAPE": True,
            "MEMONGER": True,
            "BN_INIT_GAMMA": 0.0,
            "DEPTH": 50,
            "VIDEO_ARC_CHOICE": 1,
        },
        "RESNETS": {
            "NUM_GROUPS": 1,
            "WIDTH_PER_GROUP": 64,
            "TRANS_FUNC": "bottleneck_transformation_3d",
        },
        "TRAIN": {
            "DATA_TYPE": "train",
            "BATCH_SIZE": 64,
            "EVAL_PERIOD": 20000,
            "JITTER_SCALES": [256, 320],
            "MEM_CACHE": False,
            "COMPUTE_PRECISE_BN": True,
            "CROP_SIZE": 224,
            "VIDEO_LENGTH": 8,
            "SAMPLE_RATE": 8,
            "TEST_AFTER_TRAIN": True,
        },
        "TEST": {
            "DATA_TYPE": "val",
            "BATCH_SIZE": 64,
            "CROP_SIZE": 224,
            "SCALE": 256,
            "VIDEO_LENGTH": 8,
            "SAMPLE_RATE": 8,
            "OUTPUT_NAME": "softmax",
            "DATASET_SIZE": 19761,
            "NUM_TEST_CLIPS": 30,
        },
        "SOLVER": {
            "LR_POLICY": "steps_with_relative_lrs",
            "BASE_LR": 0.01,
            "STEP_SIZES": [150000, 150000, 100000],
            "LRS": [1, 0.1, 0.01, 0.001],
            "MAX_ITER": 400000,
            "WEIGHT_DECAY": 0.0001,
            "WEIGHT_DECAY_BN": 0.0,
            "MOMENTUM": 0.9,
            "NESTEROV": True,
            "SCALE_MOMENTUM": True,
            "WARMUP": {"WARMUP_ON": False, "WARMUP_START_LR": 0.001, "WARMUP_END_ITER": 2000},
        },
        "CHECKPOINT": {"DIR": ".", "CHECKPOINT_PERIOD": 10000},
        "NONLOCAL": {
            "USE_ZERO_INIT_CONV": False,
            "USE_BN": True,
            "CONV3_NONLOCAL": True,
            "CONV4_NONLOCAL": True,
            "USE_SCALE": True,
        },
    }


def _derive(changes: dict[str, Any]) -> dict[str, Any]:
    """The 8-GPU 400k values with ``changes`` (``"SECTION.KEY": value``) applied."""
    base = _base_8gpu_400k()
    for dotted, value in changes.items():
        node = base
        *path, leaf = dotted.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return base


BASE_CONFIGS: dict[str, dict[str, Any]] = {
    "DBG_kinetics_resnet_8gpu_c2d_nonlocal_400k.yaml": _base_8gpu_400k(),
    "DBG_kinetics_resnet_8gpu_c2d_nonlocal_300k.yaml": _derive(
        {
            "SOLVER.STEP_SIZES": [150000, 100000, 50000],
            "SOLVER.MAX_ITER": 300000,
        }
    ),
    "DBG_kinetics_resnet_4gpu_c2d_nonlocal_600k.yaml": _derive(
        {
            "NUM_GPUS": 4,
            "TRAIN.BATCH_SIZE": 32,
            "TEST.BATCH_SIZE": 32,
            "SOLVER.BASE_LR": 0.005,
            "SOLVER.STEP_SIZES": [300000, 200000, 100000],
            "SOLVER.MAX_ITER": 600000,
        }
    ),
    "DBG_kinetics_resnet_4gpu_c2d_nonlocal_300k.yaml": _derive(
        {
            "NUM_GPUS": 4,
            "TRAIN.BATCH_SIZE": 32,
            "TRAIN.JITTER_SCALES": [256, 256],
            "TEST.BATCH_SIZE": 32,
            "SOLVER.BASE_LR": 0.005,
            "SOLVER.STEP_SIZES": [150000, 100000, 50000],
            "SOLVER.MAX_ITER": 300000,
        }
    ),
    "DBG_kinetics_resnet_8gpu_c2d_nonlocal_affine_400k.yaml": _derive(
        {
            "MODEL.USE_AFFINE": True,
            "TRAIN.BATCH_SIZE": 16,
            "TRAIN.COMPUTE_PRECISE_BN": False,
            "TRAIN.VIDEO_LENGTH": 32,
            "TRAIN.SAMPLE_RATE": 4,
            "TEST.BATCH_SIZE": 16,
            "TEST.VIDEO_LENGTH": 32,
            "TEST.SAMPLE_RATE": 4,
            "SOLVER.BASE_LR": 0.0025,
            "NONLOCAL.USE_ZERO_INIT_CONV": True,
            "NONLOCAL.USE_BN": False,
        }
    ),
}


@dataclass(frozen=True)
class InitFile:
    """A file the released models were initialised from (inside ``pretrained_model.tar.gz``)."""

    name: str  # path inside the tarball's ``pretrained_model/`` folder
    description: str
    depth: int
    is_2d: bool  # 4-D conv weights: load with --inflate
    affine: bool  # folded BN (only _bn_s/_bn_b): load into MODEL.USE_AFFINE models
    url: str = PRETRAINED_TARBALL


PRETRAINED_INIT: dict[str, InitFile] = {
    f.name: f
    for f in (
        InitFile(
            "r50_pretrain_c2_model_iter450450_clean.pkl",
            "ImageNet ResNet-50 (2-D weights, 1000-class pred)",
            50,
            True,
            False,
        ),
        InitFile(
            "r101_pretrain_c2_model_iter450450_clean.pkl",
            "ImageNet ResNet-101 (2-D weights, 1000-class pred)",
            101,
            True,
            False,
        ),
        InitFile(
            "run_i3d_baseline_400k/affine_model_400k.pkl",
            "8x8 I3D baseline with BN folded into affine (init of the 32x4 models)",
            50,
            False,
            True,
        ),
        InitFile(
            "run_i3d_baseline_400k_32f/affine_model_400k.pkl",
            "32x2 I3D baseline with BN folded into affine (init of the 128x1 models)",
            50,
            False,
            True,
        ),
    )
}

_R50 = "r50_pretrain_c2_model_iter450450_clean.pkl"
_CFG_400K = "DBG_kinetics_resnet_8gpu_c2d_nonlocal_400k.yaml"
_CFG_AFFINE = "DBG_kinetics_resnet_8gpu_c2d_nonlocal_affine_400k.yaml"


@dataclass(frozen=True)
class ZooEntry:
    """One released checkpoint and the recipe that produced it."""

    name: str
    script: str
    config_file: str
    overrides: tuple[str, ...]
    top1: float
    top5: float
    init: str
    paper_top1: float | None = None
    notes: str = ""
    # The released file's SHA-256 where it is known (the original publishes none); when set,
    # the download cache checks it instead of the one recorded at the first download.
    sha256: str | None = None

    @property
    def filename(self) -> str:
        return self.name + ".pkl"

    @property
    def url(self) -> str:
        return DOWNLOAD_ROOT + self.filename

    def base_config(self) -> dict[str, Any]:
        """A fresh copy of the values of the YAML file the training script loaded."""
        return copy.deepcopy(BASE_CONFIGS[self.config_file])


def _script_overrides(
    *, nonlocal_on: bool, arc: int, dropout: float = 0.5, org_frames: tuple[int, int] | None = None
) -> tuple[str, ...]:
    flag = "True" if nonlocal_on else "False"
    args = ["NONLOCAL.CONV3_NONLOCAL", flag, "NONLOCAL.CONV4_NONLOCAL", flag]
    if org_frames is not None:
        length, rate = (str(v) for v in org_frames)
        args += [
            "TRAIN.VIDEO_LENGTH",
            length,
            "TRAIN.SAMPLE_RATE",
            rate,
            "TEST.VIDEO_LENGTH",
            length,
            "TEST.SAMPLE_RATE",
            rate,
            "MODEL.MODEL_NAME",
            "resnet_video_org",
        ]
    args += ["MODEL.VIDEO_ARC_CHOICE", str(arc), "TRAIN.DROPOUT_RATE", str(dropout)]
    return tuple(args)


def _entry(
    name: str,
    script: str,
    config_file: str,
    top1: float,
    top5: float,
    *,
    nonlocal_on: bool,
    arc: int,
    dropout: float = 0.5,
    org_frames: tuple[int, int] | None = None,
    init: str = _R50,
    paper_top1: float | None = None,
    notes: str = "",
) -> ZooEntry:
    return ZooEntry(
        name=name,
        script=script,
        config_file=config_file,
        overrides=_script_overrides(
            nonlocal_on=nonlocal_on, arc=arc, dropout=dropout, org_frames=org_frames
        ),
        top1=top1,
        top5=top5,
        init=init,
        paper_top1=paper_top1,
        notes=notes,
    )


_AFFINE_8X8_INIT = "run_i3d_baseline_400k/affine_model_400k.pkl"
_AFFINE_32F_INIT = "run_i3d_baseline_400k_32f/affine_model_400k.pkl"

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        # Paper settings (resnet_video_org): 32x2 and 128x1.
        _entry(
            "c2d_baseline_32x2_IN_pretrain_400k",
            "run_c2d_baseline_400k_32f.sh",
            _CFG_400K,
            72.0,
            90.0,
            nonlocal_on=False,
            arc=1,
            org_frames=(32, 2),
            paper_top1=71.8,
        ),
        _entry(
            "c2d_nonlocal_32x2_IN_pretrain_400k",
            "run_c2d_nlnet_400k_32f.sh",
            _CFG_400K,
            73.9,
            91.0,
            nonlocal_on=True,
            arc=1,
            org_frames=(32, 2),
            paper_top1=73.8,
        ),
        _entry(
            "i3d_baseline_32x2_IN_pretrain_400k",
            "run_i3d_baseline_400k_32f.sh",
            _CFG_400K,
            73.6,
            90.8,
            nonlocal_on=False,
            arc=2,
            org_frames=(32, 2),
            paper_top1=73.3,
        ),
        _entry(
            "i3d_nonlocal_32x2_IN_pretrain_400k",
            "run_i3d_nlnet_400k_32f.sh",
            _CFG_400K,
            74.9,
            91.6,
            nonlocal_on=True,
            arc=2,
            org_frames=(32, 2),
            paper_top1=74.9,
        ),
        _entry(
            "i3d_baseline_128x1_I3D_pretrain_400k",
            "run_i3d_baseline_affine_400k_128f.sh",
            _CFG_AFFINE,
            75.2,
            92.0,
            nonlocal_on=False,
            arc=2,
            org_frames=(128, 1),
            init=_AFFINE_32F_INIT,
            paper_top1=74.9,
        ),
        _entry(
            "i3d_nonlocal_128x1_I3D_pretrain_400k",
            "run_i3d_nlnet_affine_400k_128f.sh",
            _CFG_AFFINE,
            76.5,
            92.7,
            nonlocal_on=True,
            arc=2,
            org_frames=(128, 1),
            init=_AFFINE_32F_INIT,
            paper_top1=76.5,
            notes="res3 non-local attends within 4-frame windows (4 groups)",
        ),
        # Modified settings (resnet_video): 8x8 and 32x4.
        _entry(
            "c2d_baseline_8x8_IN_pretrain_400k",
            "run_c2d_baseline_400k.sh",
            _CFG_400K,
            71.9,
            90.0,
            nonlocal_on=False,
            arc=1,
        ),
        _entry(
            "c2d_nonlocal_8x8_IN_pretrain_400k",
            "run_c2d_nlnet_400k.sh",
            _CFG_400K,
            74.4,
            91.4,
            nonlocal_on=True,
            arc=1,
        ),
        _entry(
            "i3d_baseline_8x8_IN_pretrain_400k",
            "run_i3d_baseline_400k.sh",
            _CFG_400K,
            73.4,
            90.9,
            nonlocal_on=False,
            arc=2,
        ),
        _entry(
            "i3d_nonlocal_8x8_IN_pretrain_400k",
            "run_i3d_nlnet_400k.sh",
            _CFG_400K,
            74.7,
            91.6,
            nonlocal_on=True,
            arc=2,
        ),
        _entry(
            "i3d_baseline_32x4_I3D_pretrain_400k",
            "run_i3d_baseline_affine_400k.sh",
            _CFG_AFFINE,
            75.5,
            92.0,
            nonlocal_on=False,
            arc=2,
            init=_AFFINE_8X8_INIT,
        ),
        _entry(
            "i3d_nonlocal_32x4_I3D_pretrain_400k",
            "run_i3d_nlnet_affine_400k.sh",
            _CFG_AFFINE,
            76.5,
            92.6,
            nonlocal_on=True,
            arc=2,
            init=_AFFINE_8X8_INIT,
            notes="res3 non-local attends within 4-frame windows (4 groups)",
        ),
        # Schedules.
        _entry(
            "i3d_baseline_8x8_IN_pretrain_300k",
            "run_i3d_baseline_300k.sh",
            "DBG_kinetics_resnet_8gpu_c2d_nonlocal_300k.yaml",
            73.2,
            90.8,
            nonlocal_on=False,
            arc=2,
        ),
        _entry(
            "i3d_baseline_8x8_IN_pretrain_600k_4gpu",
            "run_i3d_baseline_600k_4gpu.sh",
            "DBG_kinetics_resnet_4gpu_c2d_nonlocal_600k.yaml",
            73.0,
            90.4,
            nonlocal_on=False,
            arc=2,
            notes="trained outside FAIR on the 12/20/2017 data",
        ),
        _entry(
            "i3d_baseline_8x8_IN_pretrain_300k_4gpu",
            "run_i3d_baseline_300k_4gpu.sh",
            "DBG_kinetics_resnet_4gpu_c2d_nonlocal_300k.yaml",
            72.0,
            90.1,
            nonlocal_on=False,
            arc=2,
            dropout=0.0,
            notes="trained outside FAIR on the 12/20/2017 data; no dropout",
        ),
    )
}


class UnknownModelError(KeyError):
    """A name that is not a released checkpoint."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def list_models() -> list[str]:
    """Names of the released checkpoints, in the order of the original README."""
    return list(ZOO)


def get_zoo_entry(name: str) -> ZooEntry:
    """Look up a released checkpoint by name (``.pkl`` suffix and directories are ignored)."""
    key = name.rsplit("/", 1)[-1]
    key = key[:-4] if key.endswith(".pkl") else key
    try:
        return ZOO[key]
    except KeyError:
        close = difflib.get_close_matches(key, ZOO, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}{hint} Known models: {', '.join(ZOO)}"
        ) from None
