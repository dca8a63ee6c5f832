"""The parity suite's cases and runner, shared by ``test_parity.py`` and ``parity_table.py``.

A case is one distinct network: every released zoo entry, with entries whose effective model
configuration is identical (the four ``i3d_baseline_8x8`` schedule variants differ only in
training settings) merged into one case, plus the two ResNet-101 recipes of the original README
(arc 3 = C2D, arc 4 = I3D, ``MODEL.DEPTH 101``, non-local placement of depth 101).

:func:`run_case` writes random blobs with realistic statistics (``synthetic_blobs``) as a real
Caffe2 training checkpoint (``caffe2_fixtures``: protocol 2, ``{'blobs': ...}``, momentum,
``lr``, ``model_iter``, Python 2 key types), then runs the whole user-facing check on it,
:func:`nonlocal_net.verify.verify_checkpoint`: read the ``.pkl``, convert it in memory with the
converter, run the reference executor (float64) and the port (float32 and float64) on a seeded
random clip at the real input size, compare every layer.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from blob_inventory import RELEASED, Arch
from caffe2_fixtures import training_checkpoint_blobs, write_training_checkpoint

import nonlocal_net as nl
from nonlocal_net.core.config import cfg_to_dict
from nonlocal_net.verify import ParityReport, verify_checkpoint

__all__ = [
    "CASES",
    "DEFAULT_RUNS",
    "FP32_BOUND",
    "FP64_BOUND",
    "SMALL",
    "SMALL_BATCH",
    "SMALL_SPLIT",
    "SPLITS",
    "CaseResult",
    "ParityCase",
    "architecture_key",
    "run_case",
]

SPLITS = ("test", "val")

# The suite's bounds on the per-layer relative error max|port - ref| / max|ref| (every layer,
# every case). Measured maxima (benchmarks/parity.md):
# 5.2e-6 in float32 (the softmax of the 128-frame
# networks, whose relative error is about the logits' absolute error; most layers ~1e-6) and
# 1.2e-14 in float64. The runs are seeded, hence deterministic on a given machine.
FP32_BOUND = 1e-5
FP64_BOUND = 1e-13

# The config values that determine the val/test network (everything else is training, data or
# bookkeeping): model, ResNet and non-local settings, the clip length (pool5's temporal kernel,
# the grouped non-local) and the crops the nets are built for (the val net's TRAIN.CROP_SIZE,
# the test net's TRAIN.JITTER_SCALES[0]; the upper jitter scale only matters for training).
_NETWORK_SECTIONS = ("MODEL", "RESNETS", "NONLOCAL")


def architecture_key(cfg) -> str:
    """The effective model configuration of ``cfg`` as a canonical string."""
    data = cfg_to_dict(cfg)
    key = {s: data[s] for s in _NETWORK_SECTIONS}
    train = data["TRAIN"]
    key["TRAIN"] = {
        "VIDEO_LENGTH": train["VIDEO_LENGTH"],
        "CROP_SIZE": train["CROP_SIZE"],
        "TEST_CROP_SIZE": train["JITTER_SCALES"][0],
    }
    return json.dumps(key, sort_keys=True)


@dataclass(frozen=True)
class ParityCase:
    """One distinct network of the suite.

    Attributes:
        name: the label (the zoo name, or ``R101 ...`` for the ResNet-101 recipes).
        zoo: the zoo entry the config comes from.
        overrides: ``KEY VALUE`` overrides on top of it.
        members: every zoo entry with this very network (``zoo`` first).
    """

    name: str
    zoo: str
    overrides: tuple[str, ...] = ()
    members: tuple[str, ...] = ()

    def cfg(self):
        return nl.get_cfg(self.zoo, list(self.overrides))

    def arch(self) -> Arch:
        """The blob inventory's description (from the specification's table, not the model)."""
        fields = dict(RELEASED[self.zoo])
        ov = dict(zip(self.overrides[::2], self.overrides[1::2]))
        if "MODEL.DEPTH" in ov:
            fields["depth"] = int(ov["MODEL.DEPTH"])
        if "MODEL.VIDEO_ARC_CHOICE" in ov:
            fields["arc"] = int(ov["MODEL.VIDEO_ARC_CHOICE"])
        return Arch(**fields)


def _zoo_cases() -> list[ParityCase]:
    groups: dict[str, list[str]] = {}
    for name in nl.list_models():
        groups.setdefault(architecture_key(nl.get_cfg(name)), []).append(name)
    return [ParityCase(names[0], names[0], (), tuple(names)) for names in groups.values()]


R101_CASES = [
    ParityCase(
        "R101 C2D NL 8x8 (arc 3)",
        "c2d_nonlocal_8x8_IN_pretrain_400k",
        ("MODEL.DEPTH", "101", "MODEL.VIDEO_ARC_CHOICE", "3"),
    ),
    ParityCase(
        "R101 I3D NL 8x8 (arc 4)",
        "i3d_nonlocal_8x8_IN_pretrain_400k",
        ("MODEL.DEPTH", "101", "MODEL.VIDEO_ARC_CHOICE", "4"),
    ),
]

CASES: dict[str, ParityCase] = {c.name: c for c in [*_zoo_cases(), *R101_CASES]}

# What the default test run covers (the rest is marked parity_full): each architecture file
# (resnet_video 8x8, resnet_video_org 32x2), C2D and I3D, non-local with BN, frozen affine with
# the grouped non-local, ResNet-101's block count and non-local placement; the
# fully-convolutional test head on the first two and the FC val head (224 crops, cheaper) on the
# 32-frame affine network and ResNet-101 (both heads of every network run in the full suite).
# Case name -> splits.
DEFAULT_RUNS: dict[str, tuple[str, ...]] = {
    "i3d_nonlocal_8x8_IN_pretrain_400k": ("test",),
    "c2d_nonlocal_32x2_IN_pretrain_400k": ("test",),
    "i3d_nonlocal_32x4_I3D_pretrain_400k": ("val",),
    "R101 I3D NL 8x8 (arc 4)": ("val",),
}


# A small configuration for tests about *which* layer diverges (mutations, the CLI): the 8x8
# C2D non-local network with 4-frame clips at 224 (the smallest input pool5's 7x7 kernel takes)
# and TRAIN.BATCH_SIZE 8 on 8 GPUs, i.e. a config batch of 1, so that the original's explicit-
# batch reshape silently mixes the two clips of a real batch of 2.
SMALL = ParityCase(
    "small C2D NL (4 frames)",
    "c2d_nonlocal_8x8_IN_pretrain_400k",
    ("TRAIN.VIDEO_LENGTH", "4", "TRAIN.BATCH_SIZE", "8"),
)
SMALL_SPLIT = "val"
SMALL_BATCH = 2


@dataclass
class CaseResult:
    """A case's report and the time spent on each step."""

    report: ParityReport
    write_seconds: float
    total_seconds: float


def run_case(
    case: ParityCase, split: str, *, seed: int = 0, workdir: str | Path | None = None
) -> CaseResult:
    """Write the case's synthetic Caffe2 checkpoint and verify it at the real input size
    (batch 1, ``TRAIN.VIDEO_LENGTH`` frames, 256 test / 224 val crops); the ``.pkl`` is
    removed afterwards."""
    start = time.perf_counter()
    blobs = training_checkpoint_blobs(case.arch(), np.random.default_rng(seed))
    with tempfile.TemporaryDirectory(dir=workdir, prefix="parity-") as tmp:
        path = write_training_checkpoint(Path(tmp) / "checkpoint.pkl", blobs)
        del blobs
        written = time.perf_counter() - start
        report = verify_checkpoint(
            path, model=case.zoo, overrides=case.overrides, split=split, seed=seed + 1
        )
    return CaseResult(report, written, time.perf_counter() - start)
