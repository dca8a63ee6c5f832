"""The training run's machine-readable record: ``OUTPUT_DIR/metrics.jsonl`` (and TensorBoard).

One JSON object per line (the original prints its ``json_stats`` to the log; this is the same
information in a file a program can read):

* ``{"kind": "train", "iter": N, "lr", "loss", "top1_err", "top5_err", "clips_per_s",
  "iter_seconds", "data_seconds", "data_fraction", "eta_seconds", "videos_replaced", "time"}``
  every ``LOG_PERIOD`` iterations and at the last one: ``N`` finished iterations (the
  checkpoints' numbering), the LR, loss and batch errors of iteration ``N`` (fractions, not
  percent), the mean seconds per iteration and the seconds spent waiting for data since the
  previous line, the Unix time;
* ``{"kind": "val", "iter": N, "top1_err", "top5_err", "clips", "seconds", "time"}`` for every
  validation during training.

A resumed run first drops every line with ``iter`` above the iteration it continues from (those
were written after its checkpoint, and the resumed run writes them again), then appends, so the
file holds each iteration once. The file is rewritten atomically for that; lines are appended
and flushed one by one, so a killed run leaves at most a partial last line, which the next run
drops. A file with another line that is not such an object is not this command's and is refused.

With ``--tensorboard`` the same scalars go to ``OUTPUT_DIR/tensorboard`` (``train/loss``,
``train/lr``, ``train/top1_err``, ``train/top5_err``, ``train/clips_per_s``, ``val/top1_err``,
``val/top5_err``, step ``N``); a resumed run purges the events after its iteration.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import IO, Any

from ..utils.io import OutputError, atomic_write, remove_stale_temporaries

__all__ = ["METRICS_NAME", "TENSORBOARD_DIR", "MetricsLog", "check_tensorboard", "metrics_path"]

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_KINDS = ("train", "val")


def metrics_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / METRICS_NAME


def check_tensorboard() -> None:
    """Raise ``ValueError`` (a bad option: one line) unless TensorBoard's writer can be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise ValueError(
            f"--tensorboard needs the tensorboard package ({e}): pip install tensorboard, or "
            f"leave --tensorboard out (metrics.jsonl is written either way)"
        ) from None


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _kept_lines(path: Path, upto: int) -> tuple[list[str], bool]:
    """The lines of an existing metrics file with ``iter <= upto``, and whether any was
    dropped. A bad line other than the last (a kill mid-write) means the file is not ours."""
    raw = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    kept, changed = [], False
    for number, line in enumerate(raw, 1):
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and record.get("kind") in _KINDS
            ok = ok and isinstance(record.get("iter"), int)
        except ValueError:
            ok = False
        if not ok:
            if number == len(raw):
                changed = True
                continue
            raise OutputError(
                f"{path} exists and is not a metrics file this command wrote (line {number}); "
                f"move it or choose another --output-dir"
            )
        if record["iter"] <= upto:
            kept.append(line)
        else:
            changed = True
    return kept, changed


class MetricsLog:
    """The writer of ``metrics.jsonl`` (and TensorBoard) for one run on the main process;
    :meth:`open` continues a file at ``start_iter``. A no-op on the other processes."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool, tensorboard: bool) -> None:
        self.path = metrics_path(output_dir)
        self.enabled = enabled
        self.tensorboard = tensorboard and enabled
        self._file: IO[str] | None = None
        self._writer: Any = None

    def check(self, inputs: list[str | None]) -> None:
        """Refuse a metrics file that is an input or not ours (before anything is computed)."""
        from ..utils.io import check_destination

        if not self.enabled:
            return
        check_destination(self.path, inputs, what="metrics file")
        if self.path.exists():
            _kept_lines(self.path, upto=-1)

    def open(self, start_iter: int) -> None:
        """Keep the lines of iterations ``<= start_iter`` and append from there."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        if self.path.exists():
            kept, changed = _kept_lines(self.path, start_iter)
            if changed:
                with atomic_write(self.path, "w") as f:
                    f.write("".join(line + "\n" for line in kept))
                logger.info(
                    "%s: kept the %d lines up to iteration %d", self.path, len(kept), start_iter
                )
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                log_dir=str(self.path.parent / TENSORBOARD_DIR),
                purge_step=start_iter + 1 if start_iter > 0 else None,
            )

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        record = {k: _finite_or_none(v) for k, v in record.items()}
        record["time"] = round(time.time(), 3)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def train(self, iteration: int, values: dict[str, Any]) -> None:
        """One ``kind: train`` line for iteration ``iteration`` (and its scalars)."""
        self._write({"kind": "train", "iter": int(iteration), **values})
        if self._writer is not None:
            for key in ("loss", "lr", "top1_err", "top5_err", "clips_per_s"):
                value = _finite_or_none(values.get(key))
                if value is not None:
                    self._writer.add_scalar(f"train/{key}", value, iteration)

    def val(self, iteration: int, values: dict[str, Any]) -> None:
        """One ``kind: val`` line (and its scalars)."""
        self._write({"kind": "val", "iter": int(iteration), **values})
        if self._writer is not None:
            for key in ("top1_err", "top5_err"):
                self._writer.add_scalar(f"val/{key}", values[key], iteration)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
