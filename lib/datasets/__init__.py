"""Evaluation data: the original's list files, video decoding and the 30-view test protocol.

Typical use::

    import nonlocal_net as nl
    from nonlocal_net.datasets import test_views

    cfg = nl.get_cfg("i3d_nonlocal_8x8_IN_pretrain_400k")
    views, meta = test_views("video.mp4", cfg)  # (30, 3, 8, 256, 256), view 10*ct + j
"""

import os

# FFmpeg and OpenCV write to stderr for every file they cannot open; the decoders report those
# themselves, naming the file, so keep the libraries quiet unless the user sets these.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")

from .class_names import class_names_for, kinetics400_class_names, read_class_names
from .decoders import (
    DECODER_THREADS,
    MAX_DECODING_FRAMES,
    DecodedFrames,
    VideoDecodeError,
    available_backends,
    decode_selected,
    decode_video,
    decoding_signature,
)
from .protocol import TestProtocol, clip_frame_indices, clip_start, crop_offsets, scaled_size
from .stream import VideoItem, ViewChunk, ViewStream
from .video_list import ListEntry, VideoList, read_video_list, resolve_video_path
from .views import TestVideo, VideoMeta, load_test_video, test_views

__all__ = [
    "DECODER_THREADS",
    "MAX_DECODING_FRAMES",
    "DecodedFrames",
    "ListEntry",
    "TestProtocol",
    "TestVideo",
    "VideoDecodeError",
    "VideoItem",
    "VideoList",
    "VideoMeta",
    "ViewChunk",
    "ViewStream",
    "available_backends",
    "class_names_for",
    "clip_frame_indices",
    "clip_start",
    "crop_offsets",
    "decode_selected",
    "decode_video",
    "decoding_signature",
    "kinetics400_class_names",
    "load_test_video",
    "read_class_names",
    "read_video_list",
    "resolve_video_path",
    "scaled_size",
    "test_views",
]
