"""Decode a video once and cut the original's test views from it, a few at a time.

:func:`load_test_video` decodes the video (:mod:`.decoders`), keeps only the frames the
protocol's clips use and resizes each of them once (``cv2.resize``, ``INTER_LINEAR``, to the
float32-truncated size of :func:`.protocol.scaled_size`). :meth:`TestVideo.views` then
builds any subset of the views as float32 ``(n, 3, L, c, c)``, so the engine never holds all
30 views of a video at once (30 views of a 128-frame clip at 256 are 3 GB).
:func:`test_views` is the one-call public form returning all views.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch

from .decoders import DEFAULT_MEMORY_BUDGET, MAX_DECODING_FRAMES, decode_selected
from .protocol import TestProtocol, crop_offsets, scaled_size

__all__ = ["TestVideo", "VideoMeta", "load_test_video", "test_views"]


@dataclass(frozen=True)
class VideoMeta:
    """What was decoded: ``num_frames`` is N (frames actually decoded), sizes of frame 0."""

    path: str
    num_frames: int
    height: int
    width: int
    scaled_height: int
    scaled_width: int
    backend: str
    decode_seconds: float = 0.0
    resize_seconds: float = 0.0
    decode_passes: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TestVideo:
    """The resized frames a video's views need and how to cut the views.

    ``frames`` is uint8 ``(U, 3, newH, newW)`` (RGB) for the ``U`` distinct frames the clips use,
    ``slots[j, k]`` the row of ``frames`` holding frame ``k`` of temporal clip ``j``,
    ``frame_indices[j, k]`` the decoded-frame index it came from, ``offsets[p]`` the
    ``(h_off, w_off)`` of spatial position ``p``.
    """

    meta: VideoMeta
    protocol: TestProtocol
    frames: torch.Tensor
    slots: torch.Tensor
    frame_indices: np.ndarray
    offsets: list[tuple[int, int]]

    __test__ = False  # not a pytest test class despite its name

    @property
    def num_views(self) -> int:
        return self.protocol.num_views

    def view_frames(self, view: int) -> np.ndarray:
        """Decoded-frame indices ``(L,)`` of view ``view``."""
        return self.frame_indices[self.protocol.view_position(view)[1]]

    def view_offset(self, view: int) -> tuple[int, int]:
        return self.offsets[self.protocol.view_position(view)[0]]

    def views(self, view_ids: Sequence[int] | None = None) -> torch.Tensor:
        """float32 ``(n, 3, L, c, c)`` for ``view_ids`` (all views in order if ``None``),
        normalised."""
        return self.protocol.normalise_(self.views_uint8(view_ids).float())

    def views_uint8(self, view_ids: Sequence[int] | None = None) -> torch.Tensor:
        """uint8 ``(n, 3, L, c, c)`` pixel values of ``view_ids`` (a quarter of the float32
        size: what DataLoader workers hand over; normalise on the device with
        :meth:`TestProtocol.normalise_`)."""
        ids = list(range(self.num_views) if view_ids is None else view_ids)
        c, length = self.protocol.crop_size, self.protocol.video_length
        out = np.empty((len(ids), 3, length, c, c), dtype=np.uint8)
        for row, view in enumerate(ids):
            out[row] = self._crop(view)
        return torch.from_numpy(out)

    def _crop(self, view: int) -> np.ndarray:
        """uint8 ``(3, L, c, c)`` of one view (possibly a strided view), channels in the
        configured order. NumPy rather than torch: single-threaded copies stay fast when the
        process's threads are busy elsewhere."""
        position, clip = self.protocol.view_position(view)
        h_off, w_off = self.offsets[position]
        c = self.protocol.crop_size
        frames = self.frames.numpy()
        new_h, new_w = frames.shape[2:]
        slots = self.slots[clip].numpy()
        channels = [2, 1, 0] if self.protocol.use_bgr else [0, 1, 2]
        if 0 <= h_off and h_off + c <= new_h and 0 <= w_off and w_off + c <= new_w:
            crop = frames[:, :, h_off : h_off + c, w_off : w_off + c][slots]  # (L, 3, c, c)
            crop = crop.transpose(1, 0, 2, 3)
            return crop[::-1] if self.protocol.use_bgr else crop
        clip_frames = torch.from_numpy(frames[slots])
        return _crop_with_flat_wrap(clip_frames, h_off, w_off, c, channels).numpy()


def _crop_with_flat_wrap(
    frames: torch.Tensor, h_off: int, w_off: int, crop: int, channels: list[int]
) -> torch.Tensor:
    """The original's unchecked crop of frames ``(L, 3, newH, newW)`` smaller than the crop:
    element ``(ch, l, h, w)`` is read at flat index
    ``((src_ch*L + l)*newH + h_off + h)*newW + w_off + w`` of the ``(3, L, newH, newW)`` clip
    buffer; outside the buffer it is 0."""
    length, _, new_h, new_w = frames.shape
    buffer = frames.transpose(0, 1).reshape(-1)  # (3, L, newH, newW), contiguous copy
    plane = new_h * new_w
    first = h_off * new_w + w_off  # flat offset of element (0, 0) within a frame plane
    last = first + (crop - 1) * new_w + crop - 1
    pad_lo = max(0, -first)
    pad_hi = max(0, (2 * length + length - 1) * plane + last + 1 - buffer.numel())
    padded = torch.cat([buffer.new_zeros(pad_lo), buffer, buffer.new_zeros(pad_hi)])
    return torch.stack(
        [
            padded.as_strided(
                (length, crop, crop),
                (plane, new_w, 1),
                pad_lo + src * length * plane + first,
            )
            for src in channels
        ]
    )


def load_test_video(
    path: str | os.PathLike,
    protocol: TestProtocol,
    backend: str = "opencv",
    *,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    max_frames: int = MAX_DECODING_FRAMES,
) -> TestVideo:
    """Decode ``path`` once and prepare its views (raises :class:`.VideoDecodeError`)."""
    path = os.fspath(path)
    decoded = decode_selected(
        path,
        lambda n: protocol.frame_indices(n).reshape(-1).tolist(),
        backend,
        memory_budget=memory_budget,
        max_frames=max_frames,
    )
    start = time.perf_counter()
    indices = protocol.frame_indices(decoded.num_frames)
    unique, inverse = np.unique(indices.ravel(), return_inverse=True)
    new_h, new_w = scaled_size(decoded.height, decoded.width, protocol.scale)
    resized = np.empty((len(unique), new_h, new_w, 3), dtype=np.uint8)
    for row, index in enumerate(unique.tolist()):
        frame = decoded.frames[index]
        if (new_h, new_w) == frame.shape[:2]:
            resized[row] = frame
        else:
            cv2.resize(frame, (new_w, new_h), dst=resized[row], interpolation=cv2.INTER_LINEAR)
    decoded.frames.clear()
    meta = VideoMeta(
        path=path,
        num_frames=decoded.num_frames,
        height=decoded.height,
        width=decoded.width,
        scaled_height=new_h,
        scaled_width=new_w,
        backend=backend,
        decode_seconds=decoded.seconds,
        resize_seconds=time.perf_counter() - start,
        decode_passes=decoded.passes,
    )
    return TestVideo(
        meta=meta,
        protocol=protocol,
        frames=torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous(),
        slots=torch.from_numpy(inverse.reshape(indices.shape).astype(np.int64)),
        frame_indices=indices,
        offsets=crop_offsets(new_h, new_w, protocol.crop_size, protocol.num_spatial),
    )


def test_views(
    video_path: str | os.PathLike, cfg, backend: str = "opencv"
) -> tuple[torch.Tensor, VideoMeta]:
    """All test views of one video: float32 ``(NUM_TEST_CLIPS, 3, L, c, c)`` in the original's
    order (view ``10*ct + j``: spatial position ``ct`` outer, temporal clip ``j`` inner) and
    its :class:`VideoMeta`. ``cfg`` is a model config (``model.cfg``, :func:`nl.get_cfg`).

    Holds every view in memory: for evaluation use :func:`load_test_video` and
    :meth:`TestVideo.views` on a few views at a time.
    """
    video = load_test_video(video_path, TestProtocol.from_cfg(cfg), backend)
    return video.views(), video.meta


test_views.__test__ = False  # not a pytest test despite its name
