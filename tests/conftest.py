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
