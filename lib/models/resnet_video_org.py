"""Video ResNets of the original ``resnet_video_org.py`` (the paper's 32x2 and 128x1 models).

Identical to :mod:`.resnet_video` except for the stem: conv1 has temporal stride 2, pool1 is
``(2, 3, 3)`` with stride ``(2, 2, 2)``, and pool5's temporal kernel is
``int(TRAIN.VIDEO_LENGTH / 8)``, so the clip is downsampled 8x in time before res3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import resnet_video
from .resnet_video import ArcLists, ResNetVideo, StemSpec

if TYPE_CHECKING:
    from yacs.config import CfgNode

__all__ = ["STEM", "create_model", "obtain_arc"]

STEM = StemSpec("resnet_video_org", 2, (2, 3, 3), (2, 2, 2), 8)


def obtain_arc(arc_type: int, video_length: int | None = None) -> tuple[ArcLists, ArcLists, int]:
    """:func:`.resnet_video.obtain_arc` for this file: ``temp_strides_set[0] == [2]`` and
    ``pool_stride = int(video_length / 8)``."""
    return resnet_video.obtain_arc(arc_type, video_length, STEM)


def create_model(cfg: CfgNode, split: str) -> ResNetVideo:
    """Build the network described by ``cfg`` with this file's stem."""
    return resnet_video.create_model(cfg, split, STEM)
