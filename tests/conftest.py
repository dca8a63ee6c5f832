"""Shared fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from original_configs import write_original_configs

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


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
