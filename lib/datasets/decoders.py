"""Decode a video once, the way the original's FFmpeg decoder does (its Caffe2
video input operator).

The original decodes the *first video stream* from the start, every frame (no seeking, no fps
resampling, timestamps ignored), at most ``MAX_DECODING_FRAMES`` = 10000 frames, converts each
frame at its native size to RGB24, and takes ``N`` = the number of frames actually decoded (not
the container's frame count). Two backends do the same here:

* ``"opencv"`` (default, always installed): ``cv2.VideoCapture`` with OpenCV's bundled FFmpeg,
  automatic rotation from metadata switched off (the original ignores it), no hardware
  acceleration, BGR -> RGB; reading stops at the first frame OpenCV cannot decode.
* ``"pyav"`` (``pip install av``): PyAV (FFmpeg), demuxing the first video stream packet by packet;
  a packet that fails to decode is logged and skipped, as the original does, and frames are
  converted with swscale's ``FAST_BILINEAR`` flag, the original's. The closest to the original.

**One decoding configuration.** Every caller (evaluation, extraction, prediction, verification,
training; in the main process or in a DataLoader worker) decodes with exactly the settings of
:func:`decoding_signature`: one decoding thread (:data:`DECODER_THREADS`, libavcodec's own
default and the original's: its decoder never sets a thread count), libavcodec's default error
concealment, one swscale thread. Multi-threaded (frame-threaded) H.264 decoding returns fewer
frames of a damaged stream than one thread does (131 instead of 133 on a truncated file in
``tests/test_decoding.py``), which would make ``N``, the clip positions and the scores depend
on the number of workers or CPUs; so the thread count is not a parameter. The parallelism of
an evaluation comes from its DataLoader workers (``--workers``), one video each.

Both use the FFmpeg they were built with; what each backend's colour conversion matches is
measured in ``docs/evaluating.md`` (``FAST_BILINEAR`` exactly on 8-bit 4:2:0 for both; OpenCV
converts with bicubic chroma and differs on 4:4:4 and 10-bit streams), and a broken stream may
yield a different ``N`` with another FFmpeg.

Memory: :func:`decode_video` keeps the frames the caller asks for. A caller that needs ``N``
before it knows which frames it needs (the test protocol) passes ``keep=None``: all frames are
kept while they fit in ``memory_budget`` bytes; a longer video is decoded a second time keeping
only the selected frames (see :func:`decode_selected`). Typical Kinetics videos (300 frames of
454x256) need about 100 MB and are decoded once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BACKENDS",
    "DECODER_THREADS",
    "DEFAULT_MEMORY_BUDGET",
    "MAX_DECODING_FRAMES",
    "DecodedFrames",
    "VideoDecodeError",
    "available_backends",
    "decode_selected",
    "decode_video",
    "decoding_signature",
]

logger = logging.getLogger(__name__)

MAX_DECODING_FRAMES = 10000
DECODER_THREADS = 1  # libavcodec's default and the original's; the same in every process
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of RGB frames kept by one decode before a second pass

FrameGetter = Callable[[], np.ndarray]


class VideoDecodeError(ValueError):
    """A video that cannot be used; the message starts with its path."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass
class DecodedFrames:
    """Frames kept by :func:`decode_video`: ``frames[i]`` is decoded frame ``i`` (RGB, HxWx3)."""

    path: str
    backend: str
    num_frames: int
    height: int
    width: int
    frames: dict[int, np.ndarray] = field(default_factory=dict)
    complete: bool = True  # every frame kept (False when the memory budget was exceeded)
    seconds: float = 0.0
    passes: int = 1


# Environment variables through which OpenCV's FFmpeg reader lets a user change decoding
# (FFmpeg options, how many read/decode failures it tolerates): part of the signature.
OPENCV_DECODING_ENV = (
    "OPENCV_FFMPEG_CAPTURE_OPTIONS",
    "OPENCV_FFMPEG_READ_ATTEMPTS",
    "OPENCV_FFMPEG_DECODE_ATTEMPTS",
)


def _opencv_frames(path: str) -> Iterator[FrameGetter]:
    import cv2

    params = [
        cv2.CAP_PROP_N_THREADS,
        DECODER_THREADS,
        cv2.CAP_PROP_HW_ACCELERATION,
        cv2.VIDEO_ACCELERATION_NONE,
    ]
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        cap.release()
        raise VideoDecodeError(path, "cannot be opened by OpenCV/FFmpeg (not a video?)")
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)

    def retrieve() -> np.ndarray:
        ok, bgr = cap.retrieve()
        if not ok or bgr is None:
            raise VideoDecodeError(path, "OpenCV decoded a frame but could not convert it")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    try:
        while cap.grab():
            yield retrieve
    finally:
        cap.release()


def _pyav_frames(path: str) -> Iterator[FrameGetter]:
    import av

    try:
        container = av.open(path)
    except Exception as e:  # PyAV raises FFmpeg error subclasses and OSError
        raise VideoDecodeError(path, f"cannot be opened by PyAV/FFmpeg ({e})") from e
    try:
        if not container.streams.video:
            raise VideoDecodeError(path, "has no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "NONE"  # PyAV's default is slice threads
        stream.codec_context.thread_count = DECODER_THREADS
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                logger.debug("%s: error decoding a packet, skipped (%s)", path, e)
                continue
            for frame in frames:

                def convert(frame=frame) -> np.ndarray:
                    return frame.to_ndarray(
                        format="rgb24", interpolation="FAST_BILINEAR", threads=1
                    )

                yield convert
    except av.error.FFmpegError as e:
        raise VideoDecodeError(path, f"PyAV/FFmpeg failed while demuxing ({e})") from e
    finally:
        container.close()


BACKENDS: dict[str, Callable[[str], Iterator[FrameGetter]]] = {
    "opencv": _opencv_frames,
    "pyav": _pyav_frames,
}


def available_backends() -> list[str]:
    """The backends usable in this environment (``pyav`` needs the optional ``av`` package)."""
    names = ["opencv"]
    try:
        import av  # noqa: F401

        names.append("pyav")
    except ImportError:
        pass
    return names


def decoding_signature(backend: str) -> dict[str, str | int]:
    """Everything that decides which frames ``backend`` returns for a file, as JSON-ready
    values: the backend, the decoding configuration (the same in every process, see the module
    docstring), the library versions that decode and convert, and the OpenCV environment
    variables that change its reader. Two runs whose signatures are equal decode every file to
    the same frames; a resumed run must have the signature its results file recorded."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose from {sorted(BACKENDS)}")
    signature: dict[str, str | int] = {
        "backend": backend,
        "decoder_threads": DECODER_THREADS,
        "max_decoding_frames": MAX_DECODING_FRAMES,
        "error_concealment": "libavcodec default",
        "output": "rgb24, native size, rotation metadata ignored",
    }
    if backend == "opencv":
        import cv2

        signature["conversion"] = "OpenCV FFmpeg reader (swscale, bicubic) BGR24 -> RGB"
        signature["on_decode_error"] = "stop"
        signature["hw_acceleration"] = "none"
        signature["opencv"] = cv2.__version__
        for name in OPENCV_DECODING_ENV:
            if name in os.environ:
                signature[name] = os.environ[name]
    else:
        import av

        signature["conversion"] = "swscale FAST_BILINEAR rgb24, 1 thread"
        signature["on_decode_error"] = "skip packet"
        signature["av"] = av.__version__
        for lib in ("libavcodec", "libavformat", "libswscale"):
            signature[lib] = ".".join(map(str, av.library_versions[lib]))
    return signature


def _frames(path: str, backend: str) -> Iterator[FrameGetter]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose from {sorted(BACKENDS)}")
    if backend == "pyav" and "pyav" not in available_backends():
        raise ImportError("the 'pyav' backend needs PyAV: pip install 'video-nonlocal-net[pyav]'")
    if not os.path.exists(path):
        raise VideoDecodeError(path, "no such file")
    if os.path.isdir(path):
        raise VideoDecodeError(path, "is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    return BACKENDS[backend](path)


def _check_size(path: str, index: int, frame: np.ndarray, height: int, width: int) -> None:
    if frame.shape != (height, width, 3):
        raise VideoDecodeError(
            path,
            f"frame {index} is {frame.shape[1]}x{frame.shape[0]} but frame 0 is "
            f"{width}x{height}: videos whose frame size changes are not supported",
        )


def _decode(
    path: str,
    backend: str,
    keep: Callable[[int], bool],
    memory_budget: int | None,
    max_frames: int,
) -> DecodedFrames:
    """One pass: count frames, keep those ``keep(i)`` selects while within ``memory_budget``."""
    start = time.perf_counter()
    result = DecodedFrames(path, backend, 0, 0, 0)
    kept_bytes = 0
    for index, get in enumerate(_frames(path, backend)):
        if index >= max_frames:
            break
        if index == 0:
            first = get()
            result.height, result.width = first.shape[:2]
            if keep(0):
                result.frames[0] = first
                kept_bytes += first.nbytes
        elif result.complete and keep(index):
            frame = get()
            _check_size(path, index, frame, result.height, result.width)
            if memory_budget is not None and kept_bytes + frame.nbytes > memory_budget:
                result.complete = False
                result.frames.clear()
            else:
                result.frames[index] = frame
                kept_bytes += frame.nbytes
        result.num_frames = index + 1
    result.seconds = time.perf_counter() - start
    return result


def decode_video(
    path: str | os.PathLike,
    backend: str = "opencv",
    *,
    keep: Iterable[int] | None = None,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    max_frames: int = MAX_DECODING_FRAMES,
    min_frames: int = 2,
) -> DecodedFrames:
    """Decode ``path`` once and return ``N`` and the frames in ``keep`` (all frames if ``None``).

    With ``keep=None`` the frames are kept only while their total size stays within
    ``memory_budget`` bytes; beyond it ``complete`` is False and ``frames`` is empty (``N`` is
    still exact), and the caller decodes again with an explicit ``keep``
    (:func:`decode_selected`). Decoding uses the one configuration of
    :func:`decoding_signature` (one decoding thread), whatever the caller.
    Raises :class:`VideoDecodeError` for a missing, empty or undecodable file, or one with fewer
    than ``min_frames`` frames (the original aborts for ``N <= 1``).
    """
    path = os.fspath(path)
    wanted = None if keep is None else frozenset(keep)
    result = _decode(
        path,
        backend,
        (lambda i: True) if wanted is None else wanted.__contains__,
        memory_budget if wanted is None else None,
        max_frames,
    )
    if result.num_frames == 0:
        raise VideoDecodeError(path, f"no frame could be decoded ({backend} backend)")
    if result.num_frames < min_frames:
        raise VideoDecodeError(
            path, f"only {result.num_frames} frame(s) decoded; at least {min_frames} needed"
        )
    if wanted is not None:
        result.complete = wanted <= set(range(result.num_frames))
    return result


def decode_selected(
    path: str | os.PathLike,
    wanted_for_n: Callable[[int], Iterable[int]],
    backend: str = "opencv",
    *,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    max_frames: int = MAX_DECODING_FRAMES,
) -> DecodedFrames:
    """Decode once and keep the frames ``wanted_for_n(N)`` names (the selection depends on
    ``N``, known only at the end). Short videos are decoded once with every frame kept; videos
    over ``memory_budget`` are decoded a second time keeping only the wanted frames."""
    path = os.fspath(path)
    first = decode_video(path, backend, memory_budget=memory_budget, max_frames=max_frames)
    wanted = sorted(set(wanted_for_n(first.num_frames)))
    if first.complete:
        first.frames = {i: first.frames[i] for i in wanted}
        return first
    logger.debug(
        "%s: %d frames exceed the decode memory budget; second pass for %d frames",
        path,
        first.num_frames,
        len(wanted),
    )
    second = decode_video(path, backend, keep=wanted, max_frames=max_frames)
    if second.num_frames != first.num_frames or not second.complete:
        raise VideoDecodeError(
            path,
            f"decoding is not repeatable: {first.num_frames} frames in the first pass, "
            f"{second.num_frames} in the second",
        )
    second.seconds += first.seconds
    second.passes = 2
    return second
