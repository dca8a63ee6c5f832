"""Synthetic videos and list files for tests, benchmarks and the offline demo.

Real video files written with OpenCV's bundled FFmpeg: moving, textured content (a drifting
colour gradient, a bouncing rectangle and disc, sensor-like noise) and a binary stripe that
encodes the frame index, so every frame differs from its neighbours. Codecs/containers that
OpenCV-headless writes: ``mp4v`` in ``.mp4``, ``MJPG`` and ``XVID`` in ``.avi``, lossless
``FFV1`` in ``.mkv``. OpenCV's writer needs even frame sizes.

:func:`write_dataset` writes a small Kinetics-like evaluation set: landscape (already 256 high,
as the authors' re-encoded copies, and a larger one that is scaled down), portrait (whose
256-wide scaling truncates to 255 columns), square, a video shorter than one clip (frame
indices wrap), an undecodable file and an empty file, plus a list file in the original format.

:func:`write_h264_video` writes H.264 with PyAV's libx264 (index at the start of the file, any
pixel format libx264 takes: 8/10-bit, 4:2:0/4:4:4) where the environment has them
(:func:`h264_unavailable_reason`), and :func:`write_truncated_copy` cuts a file's tail: the
damaged streams the decoding tests need.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..utils.io import atomic_path, atomic_write

__all__ = [
    "CODECS",
    "DEFAULT_SPECS",
    "SyntheticDataset",
    "VideoSpec",
    "h264_unavailable_reason",
    "render_frame",
    "write_dataset",
    "write_empty_file",
    "write_h264_video",
    "write_list_file",
    "write_truncated_copy",
    "write_undecodable_file",
    "write_video",
]

CODECS: dict[str, str] = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "FFV1"}


@dataclass(frozen=True)
class VideoSpec:
    """A synthetic video: file name (extension picks the container), size, length, codec."""

    name: str
    width: int
    height: int
    num_frames: int
    label: int = 0
    fourcc: str | None = None  # default: CODECS[extension]
    seed: int = 0


def render_frame(index: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Frame ``index`` of a synthetic clip, RGB uint8 ``(height, width, 3)``."""
    rng = np.random.default_rng(seed * 100003 + index)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    phase = 0.07 * index + 0.9 * seed
    frame = np.empty((height, width, 3), dtype=np.float32)
    frame[..., 0] = 128 + 100 * np.sin(2 * np.pi * (x + phase))
    frame[..., 1] = 128 + 100 * np.cos(2 * np.pi * (y - 0.5 * phase))
    frame[..., 2] = 128 + 90 * np.sin(2 * np.pi * (x + y + 0.3 * phase))
    # a bouncing rectangle and a disc
    bw, bh = max(2, width // 5), max(2, height // 4)
    bx = int(abs((index * 7 + seed * 13) % (2 * (width - bw)) - (width - bw)))
    by = int(abs((index * 5 + seed * 11) % (2 * (height - bh)) - (height - bh)))
    frame[by : by + bh, bx : bx + bw] = (230, 40 + (index * 9) % 200, 30)
    cy = height / 2 + height / 3 * np.sin(0.21 * index + seed)
    cx = width / 2 + width / 3 * np.cos(0.17 * index + seed)
    disc = (np.arange(height)[:, None] - cy) ** 2 + (np.arange(width)[None, :] - cx) ** 2
    frame[disc < (min(height, width) / 6) ** 2] = (20, 60, 220)
    # the frame index as a binary stripe along the top (white = 1), 12 bits
    bits = 12
    cell = max(1, width // bits)
    stripe = max(2, height // 16)
    for bit in range(bits):
        frame[:stripe, bit * cell : (bit + 1) * cell] = 255 if (index >> bit) & 1 else 0
    frame += rng.normal(0.0, 6.0, size=frame.shape).astype(np.float32)
    return np.clip(frame, 0, 255).astype(np.uint8)


def write_video(
    path: str | os.PathLike,
    num_frames: int,
    width: int,
    height: int,
    fourcc: str | None = None,
    fps: float = 25.0,
    seed: int = 0,
) -> Path:
    """Write a synthetic video with OpenCV (atomically) and return its path."""
    path = Path(path)
    if width % 2 or height % 2 or width < 2 or height < 2:
        raise ValueError(f"{path}: OpenCV writes even frame sizes only, got {width}x{height}")
    if num_frames < 1:
        raise ValueError(f"{path}: num_frames must be >= 1, got {num_frames}")
    fourcc = fourcc or CODECS.get(path.suffix.lower())
    if fourcc is None:
        raise ValueError(f"{path}: no default codec for {path.suffix!r}; pass fourcc")
    with atomic_path(path, suffix=path.suffix) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
        if not writer.isOpened():
            raise RuntimeError(f"{path}: OpenCV cannot write {fourcc!r} into {path.suffix!r}")
        try:
            for index in range(num_frames):
                rgb = render_frame(index, height, width, seed)
                writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
    return path


def h264_unavailable_reason(pix_fmt: str = "yuv420p") -> str:
    """Why :func:`write_h264_video` cannot write ``pix_fmt`` here ('' when it can)."""
    try:
        import av
    except ImportError:
        return "PyAV (optional extra 'pyav') is not installed: no H.264 encoder"
    if "libx264" not in av.codecs_available:
        return "this PyAV's FFmpeg has no libx264 encoder"
    formats = {f.name for f in av.codec.Codec("libx264", "w").video_formats or ()}
    if pix_fmt not in formats:
        return f"this FFmpeg's libx264 cannot encode {pix_fmt}"
    return ""


def write_h264_video(
    path: str | os.PathLike,
    num_frames: int,
    width: int,
    height: int,
    *,
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    seed: int = 0,
) -> Path:
    """Write a synthetic H.264 ``.mp4`` with PyAV's libx264 (atomically) and return its path.

    The index (``moov``) is at the start of the file (``movflags=faststart``), as in files
    prepared for streaming, so a copy with its tail cut still opens. ``options`` are libx264's
    (default: ``preset ultrafast``, a keyframe every 30 frames, 2 B-frames; ``{"qp": "0"}``
    adds lossless coding). Raises ``RuntimeError`` with :func:`h264_unavailable_reason`."""
    reason = h264_unavailable_reason(pix_fmt)
    if reason:
        raise RuntimeError(f"{path}: {reason}")
    import av

    path = Path(path)
    encoder_options = {"preset": "ultrafast", "g": "30", "bf": "2", **(options or {})}
    mp4_options = {"movflags": "faststart"}
    with (
        atomic_path(path, suffix=".mp4") as tmp,
        av.open(str(tmp), "w", format="mp4", options=mp4_options) as out,
    ):
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = encoder_options
        for index in range(num_frames):
            rgb = render_frame(index, height, width, seed)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def write_truncated_copy(
    source: str | os.PathLike, path: str | os.PathLike, keep: float = 0.9
) -> Path:
    """Copy the first ``keep`` (a fraction) of ``source``'s bytes to ``path``: a file whose
    index promises more frames than its data holds, with the last packet cut in the middle."""
    if not 0.0 < keep < 1.0:
        raise ValueError(f"keep must be a fraction in (0, 1), got {keep}")
    data = Path(source).read_bytes()
    with atomic_write(path) as f:
        f.write(data[: int(len(data) * keep)])
    return Path(path)


def write_undecodable_file(path: str | os.PathLike, size: int = 40000, seed: int = 0) -> Path:
    """A file with a video extension that holds random bytes (no container can be found)."""
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    with atomic_write(path) as f:
        f.write(b"this is not a video\n" + data)
    return Path(path)


def write_empty_file(path: str | os.PathLike) -> Path:
    """A 0-byte file."""
    with atomic_write(path) as f:
        f.write(b"")
    return Path(path)


def write_list_file(path: str | os.PathLike, entries: Sequence[tuple[str, int | str]]) -> Path:
    """A list file in the original format: ``<path> <label>`` per line."""
    with atomic_write(path, "w") as f:
        for video, label in entries:
            f.write(f"{video} {label}\n")
    return Path(path)


# A Kinetics-like mix of shapes; sizes are even (OpenCV's writer needs that).
DEFAULT_SPECS: tuple[VideoSpec, ...] = (
    VideoSpec("class_a/landscape_340.mp4", 340, 256, 40, label=0, seed=1),
    VideoSpec("class_a/portrait_166.avi", 166, 256, 33, label=0, seed=2),
    VideoSpec("class_b/square.mkv", 200, 200, 27, label=1, seed=3),
    VideoSpec("class_b/short_wrap.mp4", 320, 256, 5, label=1, seed=4),
    VideoSpec("class_c/landscape_hd.avi", 480, 270, 24, label=2, seed=5),
    VideoSpec("class_c/portrait_tall.mp4", 144, 256, 31, label=2, seed=6),
)


@dataclass
class SyntheticDataset:
    """What :func:`write_dataset` wrote."""

    root: Path
    list_file: Path
    specs: tuple[VideoSpec, ...]
    undecodable: Path | None
    empty: Path | None
    labels: list[int]  # per list line

    @property
    def num_entries(self) -> int:
        return len(self.labels)


def write_dataset(
    root: str | os.PathLike,
    specs: Sequence[VideoSpec] = DEFAULT_SPECS,
    *,
    with_broken: bool = True,
    list_name: str = "vallist.txt",
    absolute_paths: bool = False,
) -> SyntheticDataset:
    """Write ``specs`` (and, with ``with_broken``, an undecodable and an empty file, labels 0)
    under ``root`` with a list file naming them (relative paths unless ``absolute_paths``)."""
    root = Path(root)
    entries = []
    for spec in specs:
        path = root / spec.name
        write_video(path, spec.num_frames, spec.width, spec.height, spec.fourcc, seed=spec.seed)
        entries.append((spec.name, spec.label))
    undecodable = empty = None
    if with_broken:
        undecodable = write_undecodable_file(root / "broken/undecodable.mp4")
        empty = write_empty_file(root / "broken/empty.mp4")
        entries += [("broken/undecodable.mp4", 0), ("broken/empty.mp4", 0)]
    if absolute_paths:
        entries = [(str((root / name).resolve()), label) for name, label in entries]
    list_file = write_list_file(root / list_name, entries)
    return SyntheticDataset(
        root=root,
        list_file=list_file,
        specs=tuple(specs),
        undecodable=undecodable,
        empty=empty,
        labels=[int(label) for _, label in entries],
    )
