"""The original's fully-convolutional multi-view test protocol (the original's
``tools/test_net_video.py`` and its video input operator).

For a video of ``N`` decoded frames of size ``H x W`` the original builds ``NUM_TEST_CLIPS``
(30) views: ``K = NUM_TEST_CLIPS / 3`` (10) temporal clips times 3 spatial crops. View ``v`` is
``(ct, j) = divmod(v, K)``, spatial position outer, temporal clip inner, as the original's test
lmdb numbers them (``index = 30*i + 10*ct + j``).

* Temporal (``DecodeClipFromVideoFileFlex``): clip ``j`` starts at
  ``int(float32(N) / float32(K) * float32(j)) % N`` (= ``floor(j*N/10)`` for ``K = 10``); frame
  ``k`` (``0 <= k < L``) is ``(start + k*r) % N`` with ``L = TRAIN.VIDEO_LENGTH`` and
  ``r = TRAIN.SAMPLE_RATE`` (the ``TEST.*`` ones are never read), wrapping to the start.
* Resize (``ScaleTransform``): ``ratio = float32(TEST.SCALE) / float32(short side)`` (the width
  if ``H > W``, else the height), ``newH = int(float32(H) * ratio)``,
  ``newW = int(float32(W) * ratio)`` (can give 255), ``cv2.resize(..., INTER_LINEAR)``.
* Crop (``ClipTransformFlex``): size ``c = TRAIN.JITTER_SCALES[0]``; ``h_off = (newH - c) / 2``
  and ``w_off = (newW - c) / 2`` with C++ truncation; for position ``p`` the offset along the
  long side is multiplied by ``p`` (``h_off`` if it is positive, else ``w_off``). No flip.
* A crop that does not fit the frame (``newW = 255 < 256``) is read exactly as the original's
  unchecked index arithmetic reads it: through the flat ``(3, L, newH, newW)`` clip buffer, so
  column 255 of a row is column 0 of the next row. The one element the original reads past the
  end of its buffer (undefined memory) is 0 here.
* Values: RGB (BGR if ``MODEL.USE_BGR``), ``(x - MEAN) * float32(1 / STD)`` in float32, layout
  ``(3, L, c, c)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.config import ConfigError

__all__ = [
    "NUM_SPATIAL_CROPS",
    "TestProtocol",
    "clip_frame_indices",
    "clip_start",
    "crop_offsets",
    "scaled_size",
]

NUM_SPATIAL_CROPS = 3  # TEST.USE_MULTI_CROP 1: left/top, centre, right/bottom


def _trunc_div2(value: int) -> int:
    """C++ ``int / 2`` (truncation toward zero)."""
    return abs(value) // 2 * (1 if value >= 0 else -1)


def clip_start(j: int, num_frames: int, num_clips: int) -> int:
    """Start frame of temporal clip ``j`` (the original's float32 arithmetic)."""
    gap = np.float32(num_frames) / np.float32(num_clips)
    return int(np.float32(gap * np.float32(j))) % num_frames


def scaled_size(height: int, width: int, side: int) -> tuple[int, int]:
    """``(newH, newW)`` of ``ScaleTransform``: short side to ``side`` with float32 truncation."""
    ratio = np.float32(side) / np.float32(width if height > width else height)
    return int(np.float32(height) * ratio), int(np.float32(width) * ratio)


def crop_offsets(
    new_height: int, new_width: int, crop: int, num_positions: int = NUM_SPATIAL_CROPS
) -> list[tuple[int, int]]:
    """``(h_off, w_off)`` of every spatial position (``ClipTransformFlex`` with ``is_test``)."""
    offsets = []
    for position in range(num_positions):
        h_off = _trunc_div2(new_height - crop)
        w_off = _trunc_div2(new_width - crop)
        pos = position % 3
        if h_off > 0:
            h_off *= pos
        else:
            w_off *= pos
        offsets.append((h_off, w_off))
    return offsets


@dataclass(frozen=True)
class TestProtocol:
    """The test-time sampling settings read from a model config."""

    video_length: int  # L = TRAIN.VIDEO_LENGTH
    sample_rate: int  # r = TRAIN.SAMPLE_RATE
    scale: int  # TEST.SCALE (short side after resizing)
    crop_size: int  # TRAIN.JITTER_SCALES[0] (the fully-convolutional test crop)
    num_temporal: int  # NUM_TEST_CLIPS / 3
    mean: float = 114.75
    std: float = 57.375
    use_bgr: bool = False
    num_spatial: int = NUM_SPATIAL_CROPS

    __test__ = False  # not a pytest test class despite its name

    @classmethod
    def from_cfg(cls, cfg) -> TestProtocol:
        """What the original's ``test_net`` hands to the input op (``TEST_FULLY_CONV``)."""
        clips = cfg.TEST.NUM_TEST_CLIPS
        if clips <= 0 or clips % NUM_SPATIAL_CROPS != 0:
            raise ConfigError(
                f"TEST.NUM_TEST_CLIPS must be a positive multiple of 3 for the fully-"
                f"convolutional multi-crop test (30 = 10 clips x 3 crops), got {clips}"
            )
        for key, value in (
            ("TRAIN.VIDEO_LENGTH", cfg.TRAIN.VIDEO_LENGTH),
            ("TRAIN.SAMPLE_RATE", cfg.TRAIN.SAMPLE_RATE),
            ("TEST.SCALE", cfg.TEST.SCALE),
            ("TRAIN.JITTER_SCALES[0]", cfg.TRAIN.JITTER_SCALES[0]),
        ):
            if int(value) <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        return cls(
            video_length=int(cfg.TRAIN.VIDEO_LENGTH),
            sample_rate=int(cfg.TRAIN.SAMPLE_RATE),
            scale=int(cfg.TEST.SCALE),
            crop_size=int(cfg.TRAIN.JITTER_SCALES[0]),
            num_temporal=clips // NUM_SPATIAL_CROPS,
            mean=float(cfg.MODEL.MEAN),
            std=float(cfg.MODEL.STD),
            use_bgr=bool(cfg.MODEL.USE_BGR),
        )

    @property
    def num_views(self) -> int:
        return self.num_temporal * self.num_spatial

    def view_position(self, view: int) -> tuple[int, int]:
        """``(ct, j)``: spatial position and temporal clip of view ``view``."""
        if not 0 <= view < self.num_views:
            raise IndexError(f"view {view} out of range 0..{self.num_views - 1}")
        return divmod(view, self.num_temporal)

    def frame_indices(self, num_frames: int) -> np.ndarray:
        """``(K, L)`` decoded-frame indices of every temporal clip."""
        return clip_frame_indices(num_frames, self)

    def normalise_(self, clips: torch.Tensor) -> torch.Tensor:
        """In place on float32 pixel values: ``(x - MEAN) * float32(1 / STD)``, the original's
        float32 arithmetic (channel order is the caller's business)."""
        if clips.dtype != torch.float32:
            raise TypeError(f"normalise_ needs float32 pixel values, got {clips.dtype}")
        inv_std = float(np.float32(1.0) / np.float32(self.std))
        return clips.sub_(float(np.float32(self.mean))).mul_(inv_std)


def clip_frame_indices(num_frames: int, protocol: TestProtocol) -> np.ndarray:
    """``(K, L)`` int64: row ``j`` = ``(clip_start(j) + k * r) % N`` for ``k`` in ``0..L-1``."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    k = np.arange(protocol.video_length, dtype=np.int64) * protocol.sample_rate
    starts = np.array(
        [clip_start(j, num_frames, protocol.num_temporal) for j in range(protocol.num_temporal)],
        dtype=np.int64,
    )
    return (starts[:, None] + k[None, :]) % num_frames
