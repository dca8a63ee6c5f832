"""Per-view results on disk: crash-safe while running, one HDF5 file at the end.

An HDF5 file that is being written when the process is killed can be left unreadable, so the
final file is never written incrementally. Instead:

* While running, finished videos are buffered and written every few videos (``flush_every``)
  or seconds as a small, complete HDF5 *part* file in ``<results>.parts/``. Each part is
  written under a temporary name, fsynced and renamed into place (:func:`atomic_path`):
  a kill at any moment leaves either the whole part or none of it (plus a stray ``.tmp`` file
  that the next start deletes). A kill loses at most the videos not yet flushed.
* ``run.json`` in the same folder records what is being evaluated (list file hash, model
  fingerprint, config, backend and decoding signature); ``--resume`` refuses a folder from a
  different run with one line naming the first setting that differs (:data:`RESUME_KEYS`).
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
    attrs: format, header (JSON: list, model, config, protocol, decoding), report (JSON)

The features file of ``vnl-extract`` is the same store with its own schema
(:data:`FEATURES_SCHEMA`, ``format = "nonlocal_net/features/v1"``): the rows are
``views/features`` (R, ``feature_dim``) and the header names the layer and the precision mode.

A run with no views at all (``--limit 0``, an empty list, only undecodable videos) writes a
valid final file with zero rows. Every write goes through :func:`..utils.io.atomic_write` or
:func:`..utils.io.atomic_path`; a failed write (a full disk) raises one :class:`OSError` naming
the file, and a part whose write failed is never renamed into place (parts are built in
memory, then written and fsynced). The final file is built in memory too, or for a very large
one written into disk blocks reserved beforehand (:meth:`ResultsStore.merge`): HDF5 writing to
a full disk crashes the process.
"""

from __future__ import annotations

import contextlib
import errno
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
from typing import Any

import h5py
import numpy as np

from ..datasets.video_list import ListEntry, VideoList
from ..utils.io import WriteError, atomic_path, atomic_write

__all__ = [
    "FEATURES_SCHEMA",
    "PART_FORMAT",
    "RESULTS_FORMAT",
    "RESULTS_SCHEMA",
    "ResultsError",
    "ResultsStore",
    "StoreSchema",
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
FEATURES_FORMAT = "nonlocal_net/features/v1"
PART_FORMAT = "nonlocal_net/results-part/v1"
MANIFEST = "run.json"
# what must match for --resume to continue a run (anything that changes a stored number)
RESUME_KEYS = (
    "list_sha256",
    "num_entries",
    "data_root",  # another root can hold other videos under the same listed names
    "model_fingerprint",
    "cfg",
    "views_per_video",
    "backend",
    "decoding",  # the decoders' configuration and library versions (decoding_signature)
    "precision",  # a resumed run continues in the same precision mode
    "channels_last",
)


@dataclass(frozen=True)
class StoreSchema:
    """What kind of rows a store holds and how its commands name things.

    ``format``: the final file's format tag; ``rows``: the dataset under ``views/``;
    ``width_key``: the header key giving the row width; ``resume_keys``: header keys a resumed
    run must share; ``run``/``flag``/``what``: the run, the command-line option and the kind of
    file that name it in messages (``"evaluation"``, ``"--results"``, ``"results file"``)."""

    format: str
    rows: str
    width_key: str
    resume_keys: tuple[str, ...]
    run: str
    flag: str
    what: str = "results file"


RESULTS_SCHEMA = StoreSchema(
    RESULTS_FORMAT, "scores", "num_classes", RESUME_KEYS, "evaluation", "--results"
)
FEATURES_SCHEMA = StoreSchema(
    FEATURES_FORMAT,
    "features",
    "feature_dim",
    (*RESUME_KEYS, "layer", "per_video", "feature_dim"),
    "extraction",
    "--output",
    "features file",
)
STR = h5py.string_dtype()
# final files up to this size (estimated from the parts, uncompressed) are built in memory and
# written as one byte string; larger ones are written in place after a free-space check
IN_MEMORY_MERGE_BYTES = 512 << 20


class ResultsError(ValueError):
    """A results file or folder that cannot be used (a bad input); names the path."""


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


def write_part(path: str, records: Sequence[VideoRecord], width: int) -> None:
    """Write ``records`` (rows ``width`` wide) as one part file, atomically.

    The HDF5 file is built in memory and written as one byte string: a failed write (a full
    disk) raises :class:`OSError` naming ``path`` before anything is renamed into place, where
    HDF5 writing to disk can report a failed flush only on close, or not at all."""
    counts = np.array([r.num_views for r in records], dtype=np.int32)
    rows = int(counts.sum())
    scores = np.zeros((rows, width), dtype=np.float32)
    views = np.zeros(rows, dtype=np.int16)
    row = 0
    for r in records:
        scores[row : row + r.num_views] = r.scores
        views[row : row + r.num_views] = r.view_ids
        row += r.num_views
    name = f"part-{secrets.token_hex(8)}.h5"
    with h5py.File(name, "w", driver="core", backing_store=False) as f:
        f.attrs["format"] = PART_FORMAT
        f["video_id"] = np.array([r.video_id for r in records], dtype=np.int64)
        f["num_views"] = counts
        f["num_frames"] = np.array([r.num_frames for r in records], dtype=np.int32)
        f["height"] = np.array([r.height for r in records], dtype=np.int32)
        f["width"] = np.array([r.width for r in records], dtype=np.int32)
        f.create_dataset("error", data=[r.error for r in records], dtype=STR)
        f["scores"] = scores
        f["view_index"] = views
        f.flush()
        image = f.id.get_file_image()
    with atomic_write(path) as out:
        out.write(image)


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
        width: int,
        flush_every: int = 16,
        flush_seconds: float = 60.0,
    ) -> None:
        self.parts_dir = parts_dir
        self.prefix = f"part-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}-r{rank:03d}"
        self.width = width
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
            write_part(path, self.buffer, self.width)
            logger.debug("wrote %s (%d videos)", path, len(self.buffer))
            self.count += 1
            self.buffer = []
        self.last_flush = time.monotonic()


def _part_files(parts_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(parts_dir), "part-*.h5")))


def _check_header(source: str, stored: Mapping, current: Mapping, schema: StoreSchema) -> None:
    """Refuse to continue a run whose stored settings differ, naming the first key that does
    (``cfg.TEST.SCALE``, ``data_root``), never dumping a whole config."""
    for key in schema.resume_keys:
        where, was, now = _first_difference(key, stored.get(key), current.get(key))
        if where is not None:
            raise ResultsError(
                f"{source} belongs to a different {schema.run} ({where} differs: stored "
                f"{_short(was)}, now {_short(now)}); delete it, pass --overwrite, or use "
                f"another {schema.flag} path"
            )


def _first_difference(key: str, a: Any, b: Any) -> tuple[str | None, Any, Any]:
    """``(dotted key, a's value, b's value)`` of the first leaf where ``a`` and ``b`` differ
    (``(None, a, b)`` when they are equal as JSON)."""
    if _json(a) == _json(b):
        return None, a, b
    mapping = isinstance(a, Mapping) or isinstance(b, Mapping)
    if mapping and all(isinstance(v, Mapping) or v is None for v in (a, b)):
        x_map, y_map = a or {}, b or {}  # a key missing from one side: a leaf of None
        for sub in sorted(set(x_map) | set(y_map), key=str):
            where, x, y = _first_difference(f"{key}.{sub}", x_map.get(sub), y_map.get(sub))
            if where is not None:
                return where, x, y
    return key, a, b


def _short(value) -> str:
    text = _json(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_store_file(path: str, schema: StoreSchema) -> bool:
    """Whether ``path`` is a final file of ``schema`` (HDF5 with its format tag)."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == schema.format
    except (OSError, ValueError):
        return False


def is_results_file(path: str) -> bool:
    """Whether ``path`` is a final results file of this package (HDF5 with its format tag)."""
    return is_store_file(path, RESULTS_SCHEMA)


def read_results_header(
    path: str, schema: StoreSchema = RESULTS_SCHEMA
) -> tuple[dict, dict | None]:
    """``(header, report)`` stored in a final file of ``schema`` (by default a results file)."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != schema.format:
                raise ResultsError(
                    f"{path}: not a nonlocal_net {schema.run} file ({schema.format})"
                )
            header = json.loads(f.attrs["header"])
            report = json.loads(f.attrs["report"]) if "report" in f.attrs else None
    except OSError as e:
        raise ResultsError(f"{path}: cannot read the {schema.run} file ({e})") from e
    return header, report


class ResultsStore:
    """The rows of one run: ``path`` (final HDF5) and ``path + '.parts'`` while it runs.

    ``schema`` says what the rows are (:data:`RESULTS_SCHEMA`, per-view scores, by default;
    :data:`FEATURES_SCHEMA` for ``vnl-extract``); the row width is ``header[schema.width_key]``.
    """

    def __init__(
        self, path: str | os.PathLike, header: Mapping, schema: StoreSchema = RESULTS_SCHEMA
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.parts_dir = self.path + ".parts"
        self.header = dict(header)
        self.schema = schema

    @property
    def width(self) -> int:
        """Values per row (classes, or the feature size)."""
        return int(self.header[self.schema.width_key])

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
            header, _ = read_results_header(self.path, self.schema)
            _check_header(self.path, header, self.header, self.schema)
            if os.path.isdir(self.parts_dir):
                shutil.rmtree(self.parts_dir)  # left by a kill after the final rename
            return True, set()
        elif final_exists:
            raise ResultsError(
                f"{self.path} exists: pass --resume to keep it, --overwrite to replace it, "
                f"or choose another {self.schema.flag} path"
            )
        elif os.path.isdir(self.parts_dir) and not resume:
            raise ResultsError(
                f"{self.parts_dir} holds the partial results of an interrupted run: pass "
                f"--resume to continue it or --overwrite to start again"
            )
        done: set[int] = set()
        stored: dict | None = None
        if os.path.isdir(self.parts_dir):
            try:
                with open(self.manifest, encoding="utf-8") as f:
                    stored = json.load(f)
            except (OSError, ValueError) as e:
                raise ResultsError(f"{self.manifest}: cannot read the run manifest ({e})") from e
            _check_header(self.parts_dir, stored, self.header, self.schema)
            for part in _part_files(self.parts_dir):
                done.update(r.video_id for r in read_part(part))
            logger.info("resuming: %d videos already recorded in %s", len(done), self.parts_dir)
        else:
            if resume:
                logger.info("nothing to resume at %s: starting a new run", self.path)
            os.makedirs(self.parts_dir, exist_ok=True)
        if stored is None or _json(stored) != _json(self.header):  # nothing to write else
            with atomic_write(self.manifest, "w") as f:
                json.dump(self.header, f, indent=1, sort_keys=True, default=str)
        return False, done

    def writer(self, rank: int, flush_every: int, flush_seconds: float) -> PartWriter:
        """The part writer of process ``rank``."""
        return PartWriter(self.parts_dir, rank, self.width, flush_every, flush_seconds)

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

        A final file of up to :data:`IN_MEMORY_MERGE_BYTES` (estimated from the parts) is built
        in memory and written as one byte string, so a full disk is one :class:`WriteError`
        naming the file and the space it needs (HDF5 writing to a full disk crashes the
        process). A larger one is written in place into a temporary file whose blocks are
        reserved first (the estimate, an upper bound; HDF5 gives back the rest on close), so
        the disk cannot fill under HDF5. Either way the free space is checked first, the parts
        survive a failure and ``--resume`` merges again.
        """
        parts, index, total_rows = self._index_parts()
        lists = (list_labels, list_paths, list_errors)
        estimate = _estimated_bytes(total_rows, self.width, len(index), lists, self.header)
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        if estimate <= IN_MEMORY_MERGE_BYTES:
            name = f"merge-{secrets.token_hex(8)}.h5"
            with h5py.File(name, "w", driver="core", backing_store=False) as f:
                self._fill(f, parts, index, total_rows, lists, on_record, report)
                f.flush()
                image = f.id.get_file_image()
            self._check_space(len(image), directory)
            try:
                with atomic_write(self.path) as out:
                    out.write(image)
            except WriteError as e:
                raise WriteError(e.errno, self._no_space(len(image), str(e), e.errno)) from e
        else:
            self._check_space(estimate, directory)
            try:
                with atomic_path(self.path) as tmp:
                    with h5py.File(tmp, "w"):
                        pass
                    _reserve(tmp, estimate)  # the blocks HDF5 writes into are already there
                    with h5py.File(tmp, "r+") as f:
                        self._fill(f, parts, index, total_rows, lists, on_record, report)
                        f.flush()
            except WriteError as e:
                raise WriteError(e.errno, self._no_space(estimate, str(e), e.errno)) from e
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        logger.info("%s written (%d videos, %d rows)", self.path, len(index), total_rows)

    def _no_space(self, needed: int, reason: str, code: int = errno.ENOSPC) -> str:
        todo = (
            "free space and"
            if code in (errno.ENOSPC, errno.EDQUOT)
            else f"once {os.path.dirname(self.path)} can be written,"
        )
        return (
            f"{reason} (the {self.schema.what} needs about {_mib(needed)}); {todo} run the "
            f"same command with --resume: the finished videos in {self.parts_dir} are kept"
        )

    def _check_space(self, needed: int, directory: str) -> None:
        """Refuse (one :class:`WriteError`) to write ``needed`` bytes into ``directory`` when
        its file system has less free space (where the platform can tell)."""
        try:
            stat = os.statvfs(directory)
        except (OSError, AttributeError):
            return
        free = stat.f_bavail * stat.f_frsize
        if free < needed:
            reason = f"{self.path}: cannot write: only {_mib(free)} free in {directory}"
            raise WriteError(errno.ENOSPC, self._no_space(needed, reason))

    def _index_parts(self) -> tuple[list[str], dict[int, tuple[int, int]], int]:
        """``(part files, video id -> (part number, record number), total rows)``."""
        parts = _part_files(self.parts_dir)
        index: dict[int, tuple[int, int]] = {}
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
        return parts, index, total_rows

    def _fill(self, f, parts, index, total_rows, lists, on_record, report) -> None:
        """Write the final file's content into the open HDF5 file ``f`` (one pass over the
        parts, in video order)."""
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

        width = self.width
        chunk_rows = max(1, min(max(total_rows, 1), (1 << 20) // (4 * width)))
        # a run with no views has no rows: an empty dataset cannot be chunked
        layout = (
            {"chunks": (chunk_rows, width), "compression": "gzip", "compression_opts": 4}
            if total_rows
            else {}
        )
        f.attrs["format"] = self.schema.format
        f.attrs["header"] = _json(self.header)
        scores = f.create_dataset(
            f"views/{self.schema.rows}",
            shape=(total_rows, width),
            dtype=np.float32,
            shuffle=bool(total_rows),
            **layout,
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
        list_labels, list_paths, list_errors = lists
        f["list/label"] = np.asarray(list_labels, dtype=np.int64)
        f.create_dataset("list/path", data=list(list_paths), dtype=STR)
        f.create_dataset("list/error", data=list(list_errors), dtype=STR)
        if report is not None:
            f.attrs["report"] = _json(report())


def _reserve(path: str | os.PathLike, size: int) -> None:
    """Allocate ``size`` bytes of disk for the file ``path`` (``OSError`` ENOSPC when the disk
    is full); a no-op where the file system or the platform cannot preallocate."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    except AttributeError:  # no posix_fallocate on this platform
        pass
    finally:
        os.close(fd)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _estimated_bytes(rows: int, width: int, videos: int, lists, header: Mapping) -> int:
    """An upper bound of the final file's size: every dataset uncompressed (rows of ``width``
    float32 with their video id and view index; per-video and per-entry columns with their
    strings), the header, and HDF5's own structures (1 MiB, plus 1% for chunk indexes)."""
    labels, paths, errors = lists
    strings = sum(len(str(t).encode()) + 16 for t in (*paths, *errors))
    data = rows * (4 * width + 8 + 2) + videos * (8 * 2 + 4 * 4 + 64) + 8 * len(labels)
    data += strings + 4 * len(_json(header))
    return int(data * 1.01) + (1 << 20)


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
