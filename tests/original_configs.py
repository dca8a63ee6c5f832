"""The original's five ``configs/*.yaml`` files, re-typed from the specification (section 5.1)
in the original's layout: nested sections, ``True``/``False``, inline lists, quoted and
unquoted strings, trailing comments and blank lines. Tests write them to disk and load them.
"""

from __future__ import annotations

from pathlib import Path

_TEMPLATE = """\
DATADIR: ../data/lmdb/kinetics_lmdb_multicrop/
FILENAME_GT: ../process_data/kinetics/vallist.txt

NUM_GPUS: {gpus}
LOG_PERIOD: 10

MODEL:
  NUM_CLASSES: 400
  MODEL_NAME: resnet_video
  BN_MOMENTUM: 0.9
  BN_EPSILON: 1.0000001e-5
  ALLOW_INPLACE_SUM: True
  ALLOW_INPLACE_RELU: True
  ALLOW_INPLACE_RESHAPE: True
  MEMONGER: True

  BN_INIT_GAMMA: 0.0
  DEPTH: 50
  VIDEO_ARC_CHOICE: 1{affine}

RESNETS:
  NUM_GROUPS: 1  # groups
  WIDTH_PER_GROUP: 64  # width
  TRANS_FUNC: bottleneck_transformation_3d # the 3-D bottleneck

TRAIN:
  DATA_TYPE: train
  BATCH_SIZE: {batch}
  EVAL_PERIOD: 20000
  JITTER_SCALES: {jitter}

  MEM_CACHE: False
  COMPUTE_PRECISE_BN: {precise}
  CROP_SIZE: 224 # training crop

  VIDEO_LENGTH: {length}  # frames
  SAMPLE_RATE: {rate}  # stride
  TEST_AFTER_TRAIN: True

TEST:
  DATA_TYPE: val
  BATCH_SIZE: {batch}
  CROP_SIZE: 224 # unused by the FCN test
  SCALE: 256 # short side

  VIDEO_LENGTH: {length}  # never read
  SAMPLE_RATE: {rate}  # never read

  OUTPUT_NAME: softmax # blob to fetch
  DATASET_SIZE: 19761 # videos
  NUM_TEST_CLIPS: 30 # 10 clips x 3 crops

SOLVER:
  LR_POLICY: 'steps_with_relative_lrs' # policy
  BASE_LR: {lr}
  STEP_SIZES: {steps} # iterations per step
  LRS: [1, 0.1, 0.01, 0.001]
  MAX_ITER: {max_iter} # total

  WEIGHT_DECAY: 0.0001
  WEIGHT_DECAY_BN: 0.0
  MOMENTUM: 0.9
  NESTEROV: True
  SCALE_MOMENTUM: True

  WARMUP:
    WARMUP_ON: False
    WARMUP_START_LR: 0.001
    WARMUP_END_ITER: 2000

CHECKPOINT:
  DIR: .
  CHECKPOINT_PERIOD: 10000

NONLOCAL:
  USE_ZERO_INIT_CONV: {zero_init}
  USE_BN: {nl_bn}
  CONV3_NONLOCAL: True
  CONV4_NONLOCAL: True
  USE_SCALE: True
"""

_COMMON = dict(
    gpus=8,
    affine="",
    batch=64,
    jitter="[256, 320]",
    precise="True",
    length=8,
    rate=8,
    lr=0.01,
    steps="[150000, 150000, 100000]",
    max_iter=400000,
    zero_init="False",
    nl_bn="True",
)

# file name -> values that differ from the 8-GPU 400k file (spec table 5.1)
ORIGINAL_CONFIGS: dict[str, dict] = {
    "DBG_kinetics_resnet_8gpu_c2d_nonlocal_400k.yaml": {},
    "DBG_kinetics_resnet_8gpu_c2d_nonlocal_300k.yaml": dict(
        steps="[150000, 100000, 50000]", max_iter=300000
    ),
    "DBG_kinetics_resnet_4gpu_c2d_nonlocal_600k.yaml": dict(
        gpus=4, batch=32, lr=0.005, steps="[300000, 200000, 100000]", max_iter=600000
    ),
    "DBG_kinetics_resnet_4gpu_c2d_nonlocal_300k.yaml": dict(
        gpus=4,
        batch=32,
        jitter="[256, 256]",
        lr=0.005,
        steps="[150000, 100000, 50000]",
        max_iter=300000,
    ),
    "DBG_kinetics_resnet_8gpu_c2d_nonlocal_affine_400k.yaml": dict(
        affine="\n  USE_AFFINE: True",
        batch=16,
        precise="False",
        length=32,
        rate=4,
        lr=0.0025,
        zero_init="True",
        nl_bn="False",
    ),
}


def write_original_configs(directory: Path) -> dict[str, Path]:
    """Write the five files into ``directory``; return name -> path."""
    paths = {}
    for name, changes in ORIGINAL_CONFIGS.items():
        path = directory / name
        path.write_text(_TEMPLATE.format(**{**_COMMON, **changes}), encoding="utf-8")
        paths[name] = path
    return paths
