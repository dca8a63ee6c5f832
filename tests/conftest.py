"""Shared fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from caffe2_fixtures import training_checkpoint_blobs, write_training_checkpoint
from original_configs import write_original_configs
from parity_cases import SMALL

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """The parity suite's small case written as a Caffe2 training checkpoint: ``(path, blobs)``
    (``parity_cases.SMALL``; blobs with momentum, ``lr`` and ``model_iter``)."""
    blobs = training_checkpoint_blobs(SMALL.arch(), np.random.default_rng(21))
    path = tmp_path_factory.mktemp("parity") / "small_c2d_nonlocal.pkl"
    return write_training_checkpoint(path, blobs), blobs


@pytest.fixture(scope="session")
def original_config_files(tmp_path_factory) -> dict[str, Path]:
    """The original's five YAML configs, written the way the original repository has them."""
    return write_original_configs(tmp_path_factory.mktemp("configs"))


@pytest.fixture(scope="session")
def eval_videos(tmp_path_factory):
    """A Kinetics-like set of real video files written with OpenCV (landscape, portrait with
    255-column scaling, square, 5-frame video, scaled-down HD, undecodable and empty files)
    and its list file."""
    from nonlocal_net.datasets.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("videos"))


# Full-size cases beyond a representative default subset are marked parity_full: the rest of
# the parity suite (every released network, both heads), every released network's full-size
# test output, the README run as written on the released-size network, the --resume synonym's
# SIGKILL run. They run only with --parity-full (make test-parity-full, which CI runs after the
# default suite when time allows), so make test fits its 12 minutes on 2 cores.
def pytest_addoption(parser):
    parser.addoption(
        "--parity-full",
        action="store_true",
        default=False,
        help="also run the tests marked parity_full (full-size cases, ~8 min on 2 cores)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--parity-full"):
        return
    kept, deselected = [], []
    for item in items:
        (deselected if item.get_closest_marker("parity_full") else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
