"""The report of a conversion: one row per blob of the file (and per model tensor that did not
come from it), counts for the converted file's ``meta``, a summary and the full mapping table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .reader import MOMENTUM_SUFFIX

__all__ = [
    "DROPPED",
    "FOLDED",
    "FOLDED_IN",
    "IGNORED",
    "INFLATED",
    "INITIALISED",
    "LOADED",
    "RESHAPED",
    "UNKNOWN",
    "BlobRow",
    "ConversionReport",
    "ConversionResult",
    "fmt_shape",
    "shape_of",
]

# Row actions.
LOADED = "loaded"
RESHAPED = "reshaped"  # pred_w between FC (K, 2048) and conv (K, 2048, 1, 1, 1)
INFLATED = "inflated"  # 2-D -> 3-D
FOLDED = "folded"  # BN -> affine (_s/_b rows); _rm/_riv rows are FOLDED_IN
FOLDED_IN = "folded in"
IGNORED = "ignored"
DROPPED = "dropped"
INITIALISED = "initialised, not in file"
UNKNOWN = "unknown"
MAPPED_ACTIONS = (LOADED, RESHAPED, INFLATED, FOLDED)


def shape_of(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def fmt_shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else str(tuple(shape))


@dataclass
class BlobRow:
    """One line of the mapping table."""

    blob: str
    key: str | None
    file_shape: tuple[int, ...] | None
    model_shape: tuple[int, ...] | None
    action: str
    detail: str = ""


@dataclass
class ConversionReport:
    """What a conversion did, blob by blob.

    ``rows`` has one entry per blob of the file and one per model tensor that did not come from
    the file (``initialised``); :meth:`counts` summarises it, :meth:`format_table` prints it.
    """

    model: str
    rows: list[BlobRow] = field(default_factory=list)
    source: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def _with(self, *actions: str) -> list[BlobRow]:
        return [r for r in self.rows if r.action in actions]

    @property
    def mapped(self) -> list[BlobRow]:
        """Blobs loaded into the model (as is, reshaped, inflated or folded)."""
        return self._with(*MAPPED_ACTIONS)

    @property
    def ignored(self) -> list[BlobRow]:
        return self._with(IGNORED)

    @property
    def folded_layers(self) -> list[str]:
        """Blob prefixes (``res2_0_branch2a_bn``) of the BN layers folded into affines."""
        return [r.blob[:-2] for r in self.rows if r.action == FOLDED and r.blob.endswith("_s")]

    @property
    def inflated(self) -> list[str]:
        return [r.blob for r in self._with(INFLATED)]

    @property
    def dropped(self) -> list[str]:
        return [r.blob for r in self._with(DROPPED)]

    @property
    def initialised(self) -> list[str]:
        """State_dict keys that kept the model's initial values (not in the file)."""
        return [r.key for r in self._with(INITIALISED) if r.key]

    def counts(self) -> dict[str, int]:
        """Numbers of blobs per outcome (the ``counts`` entry of a converted file's meta)."""
        ignored = self.ignored
        return {
            "file_blobs": sum(r.action != INITIALISED for r in self.rows),
            "mapped": len(self.mapped),
            "loaded": len(self._with(LOADED)),
            "reshaped": len(self._with(RESHAPED)),
            "inflated": len(self._with(INFLATED)),
            "folded_layers": len(self.folded_layers),
            "ignored_momentum": sum(r.blob.endswith(MOMENTUM_SUFFIX) for r in ignored),
            "ignored_lr": sum(r.blob == "lr" for r in ignored),
            "ignored_model_iter": sum(r.blob == "model_iter" for r in ignored),
            "ignored_epoch": sum(r.blob == "epoch" for r in ignored),
            "dropped": len(self._with(DROPPED)),
            "initialised": len(self._with(INITIALISED)),
        }

    def to_meta(self) -> dict[str, Any]:
        """The report as plain data for a converted file's ``meta``."""
        return {
            "model": self.model,
            "counts": self.counts(),
            "folded_layers": self.folded_layers,
            "inflated": self.inflated,
            "dropped": self.dropped,
            "initialised": self.initialised,
            "options": dict(self.options),
        }

    def summary(self) -> str:
        """A few lines for the log / the command line."""
        c = self.counts()
        lines = [
            f"{self.source or 'blobs'} -> {self.model}",
            f"  {c['mapped']} blobs loaded into the model's {c['mapped'] + c['initialised']} "
            f"tensors ({c['loaded']} as stored, {c['reshaped']} reshaped, {c['inflated']} "
            f"inflated 2-D -> 3-D, {2 * c['folded_layers']} folded from "
            f"{c['folded_layers']} BN layers)",
            "  not loaded (bookkeeping): "
            + (
                ", ".join(r.detail for r in self.ignored if not r.blob.endswith(MOMENTUM_SUFFIX))
                or "no lr/model_iter"
            )
            + f", {c['ignored_momentum']} momentum blobs",
        ]
        if c["dropped"]:
            lines.append(f"  dropped from the file: {', '.join(self.dropped)}")
        if c["initialised"]:
            lines.append(
                f"  initialised, not in file ({c['initialised']}): {', '.join(self.initialised)}"
            )
        return "\n".join(lines)

    def format_table(self) -> str:
        """The full mapping table: blob, file shape, state_dict key, model shape, action."""
        header = ("blob", "file shape", "state_dict key", "model shape", "action")
        body = [
            (
                r.blob,
                fmt_shape(r.file_shape),
                r.key or "-",
                fmt_shape(r.model_shape),
                r.action + (f" ({r.detail})" if r.detail else ""),
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(4)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[4]]
        lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(header[4]))
        for row in body:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
        return "\n".join(lines)


@dataclass
class ConversionResult:
    """The converted weights (tensors share memory with the input arrays where no
    transformation was needed) and the report."""

    state_dict: dict[str, torch.Tensor]
    report: ConversionReport
