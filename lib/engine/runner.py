"""The one inference pipeline under ``vnl-test``, ``vnl-extract`` and ``vnl-predict``.

Every inference command does the same thing: decode each video once into the original's test
views (:func:`..datasets.stream.view_loader`), run the prepared model on batches that never mix
videos, gather each video's rows and hand the finished video on. The commands differ only in
*what is collected* per view (a :class:`ViewRows`: class scores, a layer's features, both) and
*where a finished video goes* (a ``sink``: the crash-safe part files of a
:class:`.results.ResultsStore`, an in-memory list). :class:`InferenceRunner` is that loop;
:class:`InferenceOptions` holds the settings every command shares; the stages before the loop
(model, list, outputs) are in :mod:`.runner_setup`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from ..datasets.protocol import TestProtocol
from ..datasets.stream import VideoItem, ViewChunk, view_loader
from ..datasets.views import VideoMeta
from .inference import PRECISIONS
from .results import VideoRecord

__all__ = ["InferenceOptions", "InferenceRunner", "ViewRows", "default_batch_size", "run_views"]

logger = logging.getLogger(__name__)


def default_batch_size(cfg) -> int:
    """The original's per-GPU test batch, ``TEST.BATCH_SIZE / NUM_GPUS`` (8 for the 8-GPU
    configs, 2 for the affine 32x4/128x1 models)."""
    return max(1, cfg.TEST.BATCH_SIZE // max(1, cfg.NUM_GPUS))


@dataclass
class InferenceOptions:
    """Settings every inference command over a video list shares (subclassed per command:
    :class:`.evaluator.EvalOptions`, :class:`.extract.ExtractOptions`).

    ``batch_size``: views per forward pass (default :func:`default_batch_size`); batches never
    mix videos. ``limit``: only the first ``limit`` list entries. ``workers`` decoding processes
    are started with ``mp_context`` ("spawn": a script calling the API at import time needs the
    usual ``if __name__ == "__main__":`` guard). ``flush_every`` videos or ``flush_seconds``
    seconds per part file; ``decode_memory_mb``: RGB frames a worker keeps from one decode.
    ``precision``/``compile``/``channels_last``/``allow_tf32``: see
    :func:`.inference.prepare_for_inference`. ``resume`` continues an interrupted run (same
    list, model, data root, backend and decoding signature, mode), ``overwrite`` starts again
    and allows replacing a file of another kind (never an input).
    """

    overrides: Sequence[str] = ()
    data_root: str | None = None
    resume: bool = False
    overwrite: bool = False
    batch_size: int | None = None
    workers: int = 2
    limit: int | None = None
    backend: str = "opencv"
    device: str | None = None
    flush_every: int = 16
    flush_seconds: float = 60.0
    decode_memory_mb: int = 1024
    progress: bool = True
    allow_tf32: bool = False
    channels_last: bool = True
    mp_context: str = "spawn"
    precision: str = "strict"
    compile: bool = False

    def validate(self) -> None:
        """Refuse values no run can use (``ValueError`` naming the option)."""
        checks = (
            ("batch_size", self.batch_size is None or _int_at_least(self.batch_size, 1)),
            ("workers", _int_at_least(self.workers, 0)),
            ("limit", self.limit is None or _int_at_least(self.limit, 0)),
            ("flush_every", _int_at_least(self.flush_every, 1)),
            ("decode_memory_mb", _int_at_least(self.decode_memory_mb, 1)),
            (
                "flush_seconds",
                isinstance(self.flush_seconds, (int, float))
                and math.isfinite(self.flush_seconds)
                and self.flush_seconds > 0,
            ),
        )
        for name, ok in checks:
            if not ok:
                raise ValueError(f"invalid {name}: {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"invalid precision: {self.precision!r} (one of {PRECISIONS})")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")


def _int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


class ViewRows(Protocol):
    """What a command collects per view: ``width`` values from a batch of normalised views,
    and what it makes of a finished video (``finish``: e.g. drop failed rows, average)."""

    width: int

    def __call__(self, pixels: torch.Tensor) -> np.ndarray: ...

    def finish(self, record: VideoRecord) -> VideoRecord: ...


def _new_stats() -> dict[str, float]:
    keys = ("videos", "views", "decode_seconds", "prepare_seconds", "model_seconds")
    stats: dict[str, float] = dict.fromkeys(keys, 0)
    stats.update(wait_seconds=0.0, wall_seconds=0.0, startup_seconds=0.0)
    return stats


class InferenceRunner:
    """One process's share of a run: stream chunks, collect rows, hand finished videos on.

    ``sink`` receives every finished :class:`.results.VideoRecord` (an undecodable video as a
    record with ``error`` and no rows); ``where(video_id)`` names a video in log lines
    (``list:line``). ``progress`` shows a tqdm bar counting ``"video"``s or ``"view"``s."""

    def __init__(
        self,
        rows: ViewRows,
        protocol: TestProtocol,
        device: torch.device,
        sink: Callable[[VideoRecord], None],
        where: Callable[[int], str],
        progress: str | None = "video",
    ) -> None:
        self.rows = rows
        self.protocol = protocol
        self.device = device
        self.sink = sink
        self.where = where
        self.progress = progress
        self.pending: dict[int, tuple[list[int], list[np.ndarray]]] = {}
        self.stats = _new_stats()
        self.views_seen = 0  # views through the model so far (the bar's rate)
        self.last_meta: VideoMeta | None = None  # what was decoded of the last finished video
        self.log_decode_errors = True

    def _collect(self, views: torch.Tensor) -> np.ndarray:
        start = time.perf_counter()
        pixels = views.to(self.device, non_blocking=True).float()
        rows = self.rows(self.protocol.normalise_(pixels))
        self.stats["model_seconds"] += time.perf_counter() - start
        return rows

    def _finish(self, record: VideoRecord) -> None:
        record = self.rows.finish(record)
        self.sink(record)
        self.stats["videos"] += 1
        self.stats["views"] += record.num_views

    def handle(self, chunk: ViewChunk) -> bool:
        """Process one chunk; True when it completed a video."""
        vid = chunk.video_id
        if chunk.error:
            if self.log_decode_errors:
                logger.error("video %d (%s) has no views: %s", vid, self.where(vid), chunk.error)
            empty = np.zeros((0, self.rows.width), np.float32)
            self._finish(VideoRecord(vid, np.zeros(0, np.int16), empty, error=chunk.error))
            return True
        rows = self._collect(chunk.views)
        self.stats["prepare_seconds"] += chunk.prepare_seconds
        ids, parts = self.pending.setdefault(vid, ([], []))
        ids.extend(chunk.view_ids)
        parts.append(rows)
        if not chunk.last:
            return False
        del self.pending[vid]
        meta = self.last_meta = chunk.meta
        self.stats["decode_seconds"] += meta.decode_seconds + meta.resize_seconds
        rows_all = np.concatenate(parts).astype(np.float32, copy=False)
        view_ids = np.asarray(ids, dtype=np.int16)
        self._finish(VideoRecord(vid, view_ids, rows_all, meta.num_frames, meta.height, meta.width))
        return True

    def run(self, loader: Iterable[ViewChunk], num_videos: int) -> dict[str, float]:
        """Consume ``loader`` (chunks of ``num_videos`` videos); returns the run's timings."""
        start = time.perf_counter()
        total = num_videos * (self.protocol.num_views if self.progress == "view" else 1)
        bar = tqdm(
            total=total,
            unit=self.progress or "video",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            iterator = iter(loader)
            while True:
                t0 = time.perf_counter()
                chunk = next(iterator, None)
                self.stats["wait_seconds"] += time.perf_counter() - t0
                if chunk is None:
                    break
                if not self.stats["startup_seconds"]:  # workers started, first video decoded
                    self.stats["startup_seconds"] = time.perf_counter() - start
                finished = self.handle(chunk)
                self.views_seen += len(chunk.view_ids)
                if self.progress == "view":
                    bar.update(len(chunk.view_ids))
                elif finished:
                    bar.update(1)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(clips_s=f"{self.views_seen / elapsed:.1f}", refresh=False)
        finally:
            bar.close()
            self.stats["wall_seconds"] = time.perf_counter() - start
        if self.pending:
            raise RuntimeError(f"videos {sorted(self.pending)} ended without their last views")
        return self.stats


def run_views(
    runner: InferenceRunner,
    items: Sequence[VideoItem],
    batch_size: int,
    opts: InferenceOptions,
) -> dict[str, float]:
    """Decode ``items`` (this process's videos) as ``opts`` say (``backend``, ``workers``,
    ``decode_memory_mb``, ``mp_context``: any options object with those fields) and run
    ``runner`` over them; no items, no loader (nothing is started)."""
    if not items:
        return runner.stats
    loader = view_loader(
        items,
        runner.protocol,
        batch_size,
        opts.backend,
        workers=opts.workers,
        memory_budget=opts.decode_memory_mb << 20,
        pin_memory=runner.device.type == "cuda",
        mp_context=opts.mp_context,
    )
    return runner.run(loader, len(items))
