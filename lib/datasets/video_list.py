"""The original's video list files: ``<path> <label>`` per line, the line index is the video id.

``process_data/kinetics/vallist.txt`` holds one absolute path and one integer label per line;
the evaluation indexes ground truth by line number and divides by the number of lines, so a line
that cannot be used must still count (as a wrong answer), never silently disappear. Rules here:

* Lines end at ``\n`` (or ``\r\n``) only (:func:`.text_lines.split_lines`): U+2028, a form
  feed and the like are characters of a path. Every line is one entry whose video id is its
  0-based line index. The file must be UTF-8 and a regular file of at most
  :data:`.text_lines.MAX_TEXT_BYTES` (a device, FIFO or directory is refused before reading).
* The label is the last token separated by ASCII spaces or tabs; everything before it, without
  the spaces and tabs around it, is the path (so paths with spaces work; the original split on
  whitespace and took tokens 0 and 1).
* A label is ASCII digits ``0-9`` only: ``+2``, ``-1``, ``2_0``, ``٣`` (an Arabic-Indic digit)
  or a label glued to the path by a non-ASCII space are refused, though Python's ``int`` takes
  most of them. A multi-label line (``path 3,17``, which the original's lmdb writer splits on
  ``,``) is accepted; all labels are kept and the first one is scored (the original's input op
  reads the first label). A label outside ``0..num_classes-1`` (or above the int32 range), a
  malformed label, a missing path or an empty line in the middle of the file makes the entry
  *bad*: it is logged with ``file:line``, counted and scored as wrong (training leaves it out).
  Blank lines at the end of the file are ignored.
* Relative paths are taken relative to ``data_root`` if given, else to the list file's folder.
  Absolute paths are re-rooted under ``data_root`` (see :func:`resolve_video_path`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .text_lines import read_bounded_bytes, split_lines

__all__ = ["ListEntry", "VideoList", "parse_labels", "read_video_list", "resolve_video_path"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListEntry:
    """One line of a list file. ``label`` is -1 for a bad line (``error`` says why)."""

    video_id: int
    line_no: int  # 1-based, for messages
    path: str  # as written in the file ('' for a bad line without one)
    labels: tuple[int, ...] = ()
    error: str = ""

    @property
    def label(self) -> int:
        return self.labels[0] if self.labels and not self.error else -1

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class VideoList:
    """A parsed list file: ``entries[i].video_id == i``."""

    source: str
    entries: list[ListEntry]
    sha256: str
    data_root: str | None = None
    base_dir: str = field(default="")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.entries]

    @property
    def bad_entries(self) -> list[ListEntry]:
        return [e for e in self.entries if not e.ok]

    def resolve(self, entry: ListEntry) -> str:
        """The file to open for ``entry`` (see :func:`resolve_video_path`)."""
        return resolve_video_path(entry.path, self.data_root, self.base_dir)

    def where(self, entry: ListEntry) -> str:
        return f"{self.source}:{entry.line_no}"

    def with_num_classes(self, num_classes: int) -> VideoList:
        """This list with the labels outside ``0..num_classes-1`` made bad lines (logged), as
        :func:`read_video_list` with ``num_classes`` marks them: for a command that reads the
        list before it knows the model's number of classes."""
        entries = [
            replace(e, error=_label_error(e.labels, num_classes)) if e.ok else e
            for e in self.entries
        ]
        _log_bad([e for e, old in zip(entries, self.entries) if old.ok and not e.ok], self)
        return replace(self, entries=entries)


def resolve_video_path(path: str, data_root: str | None, base_dir: str = "") -> str:
    """Map a listed path to a file on this machine.

    * relative ``path``: ``data_root/path`` (or ``base_dir/path`` without a data root);
    * absolute ``path`` without ``data_root``: unchanged;
    * absolute ``path`` with ``data_root``: the longest trailing part of ``path`` that exists
      under ``data_root`` (``/old/root/val_256/abseiling/x.mp4`` with ``--data-root /data/k400``
      finds ``/data/k400/val_256/abseiling/x.mp4`` or ``/data/k400/abseiling/x.mp4``); if no
      trailing part exists, ``data_root/<class>/<file>`` (the last two parts), which then fails
      to open with both names in the message.
    """
    if not os.path.isabs(path):
        return os.path.join(data_root if data_root is not None else base_dir, path)
    if data_root is None:
        return path
    parts = Path(path).parts[1:]
    for i in range(len(parts)):
        candidate = os.path.join(data_root, *parts[i:])
        if os.path.exists(candidate):
            return candidate
    return os.path.join(data_root, *parts[-2:])


SEPARATORS = " \t"  # what separates the path from the label (ASCII space and tab only)
LABEL_PATTERN = re.compile(r"[0-9]+(?:,[0-9]+)*")  # ASCII digits, comma-separated
MAX_LABEL = 2**31 - 1  # labels are stored as int32


def parse_labels(text: str) -> tuple[int, ...]:
    """The labels of ``3`` or ``3,17``: ASCII digits only. Raises ``ValueError`` saying why."""
    if not LABEL_PATTERN.fullmatch(text):
        if re.fullmatch(r"-[0-9]+", text):
            raise ValueError(f"label {text[:20]} out of range (labels are >= 0)")
        raise ValueError(f"label {text!r} is not an integer written in ASCII digits 0-9")
    tokens = text.split(",")
    for token in tokens:
        if len(token.lstrip("0")) > 10 or int(token) > MAX_LABEL:
            raise ValueError(f"label {token[:20]} out of range (above {MAX_LABEL})")
    return tuple(int(t) for t in tokens)


def _parse_line(text: str, video_id: int, line_no: int, num_classes: int | None) -> ListEntry:
    stripped = text.strip(SEPARATORS)
    if not stripped:
        return ListEntry(video_id, line_no, "", (), "empty line")
    cut = max(stripped.rfind(c) for c in SEPARATORS)
    if cut < 0:
        return ListEntry(
            video_id, line_no, stripped, (), f"expected '<path> <label>', got {text!r}"
        )
    path, label_text = stripped[:cut].rstrip(SEPARATORS), stripped[cut + 1 :]
    try:
        labels = parse_labels(label_text)
    except ValueError as e:
        return ListEntry(video_id, line_no, path, (), str(e))
    return ListEntry(video_id, line_no, path, labels, _label_error(labels, num_classes))


def _label_error(labels: tuple[int, ...], num_classes: int | None) -> str:
    """Why ``labels`` do not fit ``num_classes`` classes ('' when they do, or when unknown)."""
    for label in labels:
        if num_classes is not None and label >= num_classes:
            return f"label {label} out of range (0..{num_classes - 1})"
    return ""


def _log_bad(bad: list[ListEntry], vlist: VideoList) -> None:
    for entry in bad[:20]:
        logger.error("%s: bad list line (scored as wrong): %s", vlist.where(entry), entry.error)
    if len(bad) > 20:
        logger.error("%s: %d more bad lines not shown", vlist.source, len(bad) - 20)


def read_video_list(
    path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    num_classes: int | None = None,
) -> VideoList:
    """Parse a list file (see the module docstring); bad lines are logged and kept as entries."""
    path = os.fspath(path)
    raw = read_bounded_bytes(path, "list file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: list file is not UTF-8 text ({e})") from e
    lines = split_lines(text)
    while lines and not lines[-1].strip(SEPARATORS + "\r"):
        lines.pop()
    entries = [_parse_line(line, i, i + 1, num_classes) for i, line in enumerate(lines)]
    result = VideoList(
        source=path,
        entries=entries,
        sha256=hashlib.sha256(raw).hexdigest(),
        data_root=os.fspath(data_root) if data_root is not None else None,
        base_dir=os.path.dirname(os.path.abspath(path)),
    )
    _log_bad(result.bad_entries, result)
    if not entries:
        logger.warning("%s: the list file has no entries", path)
    return result
