"""Per-view results on disk: crash-safe while running, one HDF5 file at the end.

An HDF5 file that is being written when the process is killed can be left unreadable, so the
final file is never written incrementally. Instead:

* While running, finished videos are buffered and written every few videos (``flush_every``)
  or seconds as a small, complete HDF5 *part* file in ``<results>.parts/``. Each part is
  written under a temporary name, fsynced and renamed into place (:func:`atomic_path`):
  a kill at any moment leaves either the whole part or none of it (plus a stray ``.tmp`` file
  that the next start deletes). A kill loses at most the videos not yet flushed.
* ``run.json`` in the same folder records what is being evaluated (list file hash, model
  fingerprint, config, backend); ``--resume`` refuses a folder from a different run.
* ``--resume`` reads the parts, skips their videos (including videos recorded as
  undecodable) and evaluates the rest. Every video's views go through the model in the same
  batches whatever else runs (batches never mix videos), so resumed scores are bitwise the
  scores of an uninterrupted run.
* At the end the parts are merged, sorted by video id, into the final file, which is also
  written under a temporary name and renamed; only then is the parts folder removed. A kill
  during the merge leaves the parts intact and ``--resume`` merges again. Merging reads every
  part once and writes every row once (no rewriting), so it is linear in the number of views.

Final file (``format = "nonlocal_net/results/v1"``)::

    views/scores      float32 (R, K)  per-view averaged softmax, chunked, gzip + shuffle
    views/video_id    int64   (R,)    video id (list line index) of each row
    views/view_index  int16   (R,)    view 10*ct + j (spatial position ct, temporal clip j)
    videos/video_id   int64   (M,)    evaluated videos, increasing
    videos/row_start  int64   (M,)    first row of the video's views (rows are contiguous)
    videos/num_views  int32   (M,)    0 for an undecodable video
    videos/num_frames, height, width  int32 (M,)  decoded frames and frame-0 size
    videos/error      str     (M,)    why a video has no views ('' otherwise)
    list/label        int64   (E,)    label of every list entry (-1: bad line)
    list/path         str     (E,)    path as listed
    list/error        str     (E,)    why a list line is bad ('' otherwise)
    attrs: format, header (JSON: list, model, config, protocol), report (JSON)
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import secrets
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from ..datasets.video_list import ListEntry, VideoList
from ..utils.io import atomic_path, atomic_write

if TYPE_CHECKING:
    from .distributed import DistContext

__all__ = [
    "PART_FORMAT",
    "RESULTS_FORMAT",
    "ResultsError",
    "ResultsStore",
    "VideoRecord",
    "is_results_file",
    "iter_result_records",
    "read_list_entries",
    "read_part",
    "read_results_header",
    "write_part",
]

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "nonlocal_net/results/v1"
PART_FORMAT = "nonlocal_net/results-part/v1"
MANIFEST = "run.json"
# header keys that must match for --resume (anything that can change a number)
# what must match for --resume to continue a run (anything that changes the scores)
RESUME_KEYS = (
    "list_sha256",
    "num_entries",
    "model_fingerprint",
    "cfg",
    "views_per_video",
    "backend",
    "precision",  # a resumed run continues in the same precision mode
    "channels_last",
)
STR = h5py.string_dtype()


class ResultsError(RuntimeError):
    """A results file or folder that cannot be used; names the path."""


@dataclass
class VideoRecord:
    """One evaluated video: its views' scores (or why it has none)."""

    video_id: int
    view_ids: np.ndarray  # (n,) view indices 10*ct + j
    scores: np.ndarray  # (n, K) float32
    num_frames: int = 0
    height: int = 0
    width: int = 0
    error: str = ""

    @property
    def num_views(self) -> int:
        return len(self.view_ids)


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def write_part(path: str, records: Sequence[VideoRecord], num_classes: int) -> None:
    """Write ``records`` as one part file, atomically."""
    counts = np.array([r.num_views for r in records], dtype=np.int32)
    rows = int(counts.sum())
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = PART_FORMAT
        f["video_id"] = np.array([r.video_id for r in records], dtype=np.int64)
        f["num_views"] = counts
        f["num_frames"] = np.array([r.num_frames for r in records], dtype=np.int32)
        f["height"] = np.array([r.height for r in records], dtype=np.int32)
        f["width"] = np.array([r.width for r in records], dtype=np.int32)
        f.create_dataset("error", data=[r.error for r in records], dtype=STR)
        scores = np.zeros((rows, num_classes), dtype=np.float32)
        views = np.zeros(rows, dtype=np.int16)
        row = 0
        for r in records:
            scores[row : row + r.num_views] = r.scores
            views[row : row + r.num_views] = r.view_ids
            row += r.num_views
        f["scores"] = scores
        f["view_index"] = views


def read_part(path: str) -> list[VideoRecord]:
    """All records of a part file."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != PART_FORMAT:
                raise ResultsError(f"{path}: not a results part file")
            ids, counts = f["video_id"][()], f["num_views"][()]
            frames, heights, widths = f["num_frames"][()], f["height"][()], f["width"][()]
            errors = [_text(e) for e in f["error"][()]]
            scores, views = f["scores"][()], f["view_index"][()]
    except (OSError, KeyError) as e:
        raise ResultsError(f"{path}: unreadable results part ({e})") from e
    records, row = [], 0
    for i, vid in enumerate(ids.tolist()):
        n = int(counts[i])
        records.append(
            VideoRecord(
                vid,
                views[row : row + n],
                scores[row : row + n],
                int(frames[i]),
                int(heights[i]),
                int(widths[i]),
                errors[i],
            )
        )
        row += n
    return records


class PartWriter:
    """Buffers finished videos of one process and flushes them as part files."""

    def __init__(
        self,
        parts_dir: str,
        rank: int,
        num_classes: int,
        flush_every: int = 16,
        flush_seconds: float = 60.0,
    ) -> None:
        self.parts_dir = parts_dir
        self.prefix = f"part-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}-r{rank:03d}"
        self.num_classes = num_classes
        self.flush_every = max(1, flush_every)
        self.flush_seconds = flush_seconds
        self.buffer: list[VideoRecord] = []
        self.count = 0
        self.last_flush = time.monotonic()

    def add(self, record: VideoRecord) -> None:
        self.buffer.append(record)
        if (
            len(self.buffer) >= self.flush_every
            or time.monotonic() - self.last_flush >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            path = os.path.join(self.parts_dir, f"{self.prefix}-{self.count:06d}.h5")
            write_part(path, self.buffer, self.num_classes)
            logger.debug("wrote %s (%d videos)", path, len(self.buffer))
            self.count += 1
            self.buffer = []
        self.last_flush = time.monotonic()


def _part_files(parts_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(parts_dir), "part-*.h5")))


def _check_header(source: str, stored: Mapping, current: Mapping) -> None:
    for key in RESUME_KEYS:
        if _json(stored.get(key)) != _json(current.get(key)):
            raise ResultsError(
                f"{source} belongs to a different evaluation ({key} differs: stored "
                f"{_short(stored.get(key))}, now {_short(current.get(key))}); delete it, pass "
                f"--overwrite, or use another --results path"
            )


def _short(value) -> str:
    text = _json(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_results_file(path: str) -> bool:
    """Whether ``path`` is a final results file of this package (HDF5 with its format tag)."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == RESULTS_FORMAT
    except (OSError, ValueError):
        return False


def read_results_header(path: str) -> tuple[dict, dict | None]:
    """``(header, report)`` stored in a final results file."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != RESULTS_FORMAT:
                raise ResultsError(f"{path}: not a nonlocal_net results file")
            header = json.loads(f.attrs["header"])
            report = json.loads(f.attrs["report"]) if "report" in f.attrs else None
    except OSError as e:
        raise ResultsError(f"{path}: cannot read results file ({e})") from e
    return header, report


class ResultsStore:
    """The results of one evaluation: ``path`` (final HDF5) and ``path + '.parts'``."""

    def __init__(self, path: str | os.PathLike, header: Mapping) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.parts_dir = self.path + ".parts"
        self.header = dict(header)

    @property
    def manifest(self) -> str:
        return os.path.join(self.parts_dir, MANIFEST)

    def _remove_stale_temporaries(self) -> None:
        directory, name = os.path.split(self.path)
        stale = glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*.tmp"))
        if os.path.isdir(self.parts_dir):
            stale += glob.glob(os.path.join(glob.escape(self.parts_dir), ".*.tmp"))
        for path in stale:
            logger.info("removing %s left by an interrupted run", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def prepare_on_main(
        self, ctx: DistContext, resume: bool, overwrite: bool
    ) -> tuple[bool, set[int]]:
        """:meth:`prepare` run by the main process of ``ctx`` (a ``DistContext``) and its
        verdict, or its refusal as :class:`ResultsError`, handed to every process."""
        state: Any = (False, [])
        if ctx.is_main:
            try:
                complete, done = self.prepare(resume, overwrite)
                state = (complete, sorted(done))
            except ResultsError as e:
                state = e
        state = ctx.broadcast(state)
        if isinstance(state, Exception):
            raise ResultsError(str(state))
        complete, done_ids = state
        return complete, set(done_ids)

    def prepare(self, resume: bool, overwrite: bool) -> tuple[bool, set[int]]:
        """Check and set up the output (one process only). Returns ``(complete, done)``:
        ``complete`` if the final file of this very evaluation exists (``--resume``), and the
        ids of the videos already recorded in parts."""
        self._remove_stale_temporaries()
        final_exists = os.path.exists(self.path)
        if overwrite:
            if os.path.isdir(self.parts_dir):
                shutil.rmtree(self.parts_dir)
        elif final_exists and resume:
            header, _ = read_results_header(self.path)
            _check_header(self.path, header, self.header)
            if os.path.isdir(self.parts_dir):
                shutil.rmtree(self.parts_dir)  # left by a kill after the final rename
            return True, set()
        elif final_exists:
            raise ResultsError(
                f"{self.path} exists: pass --resume to re-score it, --overwrite to replace it, "
                f"or choose another --results path"
            )
        elif os.path.isdir(self.parts_dir) and not resume:
            raise ResultsError(
                f"{self.parts_dir} holds the partial results of an interrupted run: pass "
                f"--resume to continue it or --overwrite to start again"
            )
        done: set[int] = set()
        if os.path.isdir(self.parts_dir):
            try:
                with open(self.manifest, encoding="utf-8") as f:
                    stored = json.load(f)
            except (OSError, ValueError) as e:
                raise ResultsError(f"{self.manifest}: cannot read the run manifest ({e})") from e
            _check_header(self.parts_dir, stored, self.header)
            for part in _part_files(self.parts_dir):
                done.update(r.video_id for r in read_part(part))
            logger.info("resuming: %d videos already recorded in %s", len(done), self.parts_dir)
        else:
            if resume:
                logger.info("nothing to resume at %s: starting a new run", self.path)
            os.makedirs(self.parts_dir, exist_ok=True)
        with atomic_write(self.manifest, "w") as f:
            json.dump(self.header, f, indent=1, sort_keys=True, default=str)
        return False, done

    def writer(self, rank: int, num_classes: int, flush_every: int, flush_seconds: float):
        return PartWriter(self.parts_dir, rank, num_classes, flush_every, flush_seconds)

    def merge(
        self,
        list_labels: Sequence[int],
        list_paths: Sequence[str],
        list_errors: Sequence[str],
        on_record: Callable[[VideoRecord], None] | None = None,
        report: Callable[[], Mapping] | None = None,
    ) -> None:
        """Merge the parts into the final file (atomically), then remove the parts folder.

        ``on_record`` sees every record in video order (the caller computes metrics from the
        same pass); ``report()`` is called after the last record and stored as an attribute.
        """
        parts = _part_files(self.parts_dir)
        index: dict[int, tuple[int, int]] = {}  # video id -> (part number, record number)
        total_rows = 0
        for p, part in enumerate(parts):
            try:
                with h5py.File(part, "r") as f:
                    ids, counts = f["video_id"][()].tolist(), f["num_views"][()].tolist()
            except (OSError, KeyError) as e:
                raise ResultsError(f"{part}: unreadable results part ({e})") from e
            for i, (vid, n) in enumerate(zip(ids, counts)):
                if vid in index:
                    logger.warning("video %d recorded twice (%s); keeping the first", vid, part)
                    continue
                index[vid] = (p, i)
                total_rows += n
        order = sorted(index)
        loaded: OrderedDict[int, list[VideoRecord]] = OrderedDict()

        def record(vid: int) -> VideoRecord:
            p, i = index[vid]
            if p not in loaded:
                loaded[p] = read_part(parts[p])
                if len(loaded) > 32:
                    loaded.popitem(last=False)
            loaded.move_to_end(p)
            return loaded[p][i]

        num_classes = int(self.header["num_classes"])
        with atomic_path(self.path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = RESULTS_FORMAT
            f.attrs["header"] = _json(self.header)
            chunk_rows = max(1, min(max(total_rows, 1), (1 << 20) // (4 * num_classes)))
            scores = f.create_dataset(
                "views/scores",
                shape=(total_rows, num_classes),
                dtype=np.float32,
                chunks=(chunk_rows, num_classes),
                compression="gzip",
                compression_opts=4,
                shuffle=True,
            )
            view_video = np.empty(total_rows, dtype=np.int64)
            view_index = np.empty(total_rows, dtype=np.int16)
            m = len(order)
            videos = {
                key: np.zeros(m, dtype=np.int64 if key == "row_start" else np.int32)
                for key in ("row_start", "num_views", "num_frames", "height", "width")
            }
            errors = []
            block: list[np.ndarray] = []
            block_start = row = 0
            for k, vid in enumerate(order):
                rec = record(vid)
                if on_record is not None:
                    on_record(rec)
                videos["row_start"][k] = row
                videos["num_views"][k] = rec.num_views
                videos["num_frames"][k] = rec.num_frames
                videos["height"][k] = rec.height
                videos["width"][k] = rec.width
                errors.append(rec.error)
                view_video[row : row + rec.num_views] = vid
                view_index[row : row + rec.num_views] = rec.view_ids
                row += rec.num_views
                if rec.num_views:
                    block.append(np.asarray(rec.scores, dtype=np.float32))
                if row - block_start >= 8 * chunk_rows or k == m - 1:
                    if block:
                        scores[block_start:row] = np.concatenate(block)
                    block, block_start = [], row
            f["views/video_id"] = view_video
            f["views/view_index"] = view_index
            f["videos/video_id"] = np.array(order, dtype=np.int64)
            for key, values in videos.items():
                f[f"videos/{key}"] = values
            f.create_dataset("videos/error", data=errors, dtype=STR)
            f["list/label"] = np.asarray(list_labels, dtype=np.int64)
            f.create_dataset("list/path", data=list(list_paths), dtype=STR)
            f.create_dataset("list/error", data=list(list_errors), dtype=STR)
            if report is not None:
                f.attrs["report"] = _json(report())
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        logger.info("results written to %s (%d videos, %d views)", self.path, m, total_rows)


def read_list_entries(path: str | os.PathLike, header: Mapping) -> VideoList:
    """The list entries stored in a final results file (labels, paths, bad-line reasons)."""
    with h5py.File(os.fspath(path), "r") as f:
        labels = f["list/label"][()].tolist()
        paths = [_text(p) for p in f["list/path"][()]]
        errors = [_text(e) for e in f["list/error"][()]]
    return VideoList(
        source=header["list_file"],
        entries=[
            ListEntry(i, i + 1, p, (label,) if label >= 0 else (), err)
            for i, (label, p, err) in enumerate(zip(labels, paths, errors))
        ],
        sha256=header["list_sha256"],
    )


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _iter_final(path: str, block_rows: int = 1 << 15) -> Iterator[VideoRecord]:
    with h5py.File(path, "r") as f:
        ids = f["videos/video_id"][()]
        starts, counts = f["videos/row_start"][()], f["videos/num_views"][()]
        frames, heights, widths = (f[f"videos/{k}"][()] for k in ("num_frames", "height", "width"))
        errors = [_text(e) for e in f["videos/error"][()]]
        scores_ds, views_ds = f["views/scores"], f["views/view_index"]
        cache_start, cache_scores, cache_views = 0, np.empty((0, 0), np.float32), np.empty(0)
        for i, vid in enumerate(ids.tolist()):
            start, n = int(starts[i]), int(counts[i])
            if start + n > cache_start + len(cache_views):
                cache_start = start
                stop = min(len(views_ds), start + max(n, block_rows))
                cache_scores, cache_views = scores_ds[start:stop], views_ds[start:stop]
            a = start - cache_start
            yield VideoRecord(
                vid,
                cache_views[a : a + n],
                cache_scores[a : a + n],
                int(frames[i]),
                int(heights[i]),
                int(widths[i]),
                errors[i],
            )


def iter_result_records(path: str | os.PathLike) -> tuple[dict, Iterator[VideoRecord], bool]:
    """``(header, records, complete)`` of a final results file, or of the parts folder of an
    interrupted run (``complete`` False) when only that exists."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        header, _ = read_results_header(path)
        return header, _iter_final(path), True
    parts_dir = path if path.endswith(".parts") else path + ".parts"
    if os.path.isdir(parts_dir):
        try:
            with open(os.path.join(parts_dir, MANIFEST), encoding="utf-8") as f:
                header = json.load(f)
        except (OSError, ValueError) as e:
            raise ResultsError(f"{parts_dir}: cannot read the run manifest ({e})") from e

        def records() -> Iterator[VideoRecord]:
            seen: set[int] = set()
            for part in _part_files(parts_dir):
                for rec in read_part(part):
                    if rec.video_id not in seen:
                        seen.add(rec.video_id)
                        yield rec

        return header, records(), False
    raise ResultsError(f"{path}: no such results file (and no {parts_dir} of a partial run)")
