"""A ``torch.utils.data.IterableDataset`` of test views, decoded in DataLoader workers.

Every worker takes every ``num_workers``-th video of its share, decodes it once
(:func:`.load_test_video`) and yields its views as uint8 pixel values (a quarter of the float32
size to pass between processes and to the GPU) in chunks of at most ``batch_size``
(:class:`ViewChunk`): views ``0..B-1``, ``B..2B-1``, ... of one video, never mixing videos, so a
video's scores do not depend on which other videos are evaluated (resume and sharding give
bitwise the same scores). Only ``prefetch_factor x num_workers`` chunks exist at a time. A video
that cannot be decoded yields one chunk with ``error`` set and no views; nothing raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .decoders import DEFAULT_MEMORY_BUDGET, VideoDecodeError
from .protocol import TestProtocol
from .views import VideoMeta, load_test_video

__all__ = [
    "VideoItem",
    "ViewChunk",
    "ViewStream",
    "identity_collate",
    "init_decode_worker",
    "view_loader",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoItem:
    """A video to evaluate: its id (list line index) and the file to open."""

    video_id: int
    path: str


@dataclass
class ViewChunk:
    """Some views of one video (or its failure)."""

    video_id: int
    view_ids: list[int]
    views: torch.Tensor | None  # uint8 (n, 3, L, c, c): normalise on the device
    num_views: int  # views of the whole video (0 when it failed)
    last: bool  # the video's final chunk
    meta: VideoMeta | None
    error: str = ""
    prepare_seconds: float = 0.0  # cutting and normalising these views (decode is in meta)


def identity_collate(item):
    """DataLoader ``collate_fn`` for ``batch_size=None``: chunks are already batches."""
    return item


def init_decode_worker(worker_id: int) -> None:
    """Keep each worker's OpenCV and torch single-threaded: parallelism comes from the workers.
    (Video decoding is single-threaded in every process: :data:`.decoders.DECODER_THREADS`.)"""
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class ViewStream(IterableDataset):
    """Chunks of test views of ``items``, in item order within each worker."""

    def __init__(
        self,
        items: Sequence[VideoItem],
        protocol: TestProtocol,
        batch_size: int,
        backend: str = "opencv",
        memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.items = list(items)
        self.protocol = protocol
        self.batch_size = batch_size
        self.backend = backend
        self.memory_budget = memory_budget

    def __len__(self) -> int:  # number of videos (not of chunks)
        return len(self.items)

    def __iter__(self) -> Iterator[ViewChunk]:
        info = get_worker_info()
        mine = self.items if info is None else self.items[info.id :: info.num_workers]
        for item in mine:
            yield from self._video_chunks(item)

    def _video_chunks(self, item: VideoItem) -> Iterator[ViewChunk]:
        try:
            video = load_test_video(
                item.path,
                self.protocol,
                self.backend,
                memory_budget=self.memory_budget,
            )
        except VideoDecodeError as e:
            yield ViewChunk(item.video_id, [], None, 0, True, None, str(e))
            return
        except Exception as e:  # a decoder crashing on a broken file must not end the run
            message = f"{item.path}: {type(e).__name__}: {e}"
            yield ViewChunk(item.video_id, [], None, 0, True, None, message)
            return
        n = video.num_views
        for start in range(0, n, self.batch_size):
            t0 = time.perf_counter()
            ids = list(range(start, min(n, start + self.batch_size)))
            views = video.views_uint8(ids)
            yield ViewChunk(
                item.video_id,
                ids,
                views,
                n,
                ids[-1] == n - 1,
                video.meta,
                prepare_seconds=time.perf_counter() - t0,
            )


def view_loader(
    items: Sequence[VideoItem],
    protocol: TestProtocol,
    batch_size: int,
    backend: str,
    *,
    workers: int,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    pin_memory: bool = False,
    mp_context: str = "spawn",
) -> DataLoader:
    """The decode-once pipeline over ``items``: a :class:`ViewStream` in ``workers`` decoding
    processes (none: decoding in this process), chunks in completion order. The decoded
    frames, hence the views, do not depend on ``workers`` (one decoding configuration,
    :func:`.decoders.decoding_signature`).

    Worker processes are fresh (``mp_context``, "spawn" by default): a forked child inherits
    the parent's OpenMP/OpenCV thread-pool state, and OpenCV calls in it can deadlock."""
    stream = ViewStream(
        items,
        protocol,
        batch_size,
        backend,
        memory_budget=memory_budget,
    )
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        collate_fn=identity_collate,
        worker_init_fn=init_decode_worker if workers > 0 else None,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,
        in_order=False,
        multiprocessing_context=mp_context if workers > 0 else None,
    )
