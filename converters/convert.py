"""Caffe2 blobs -> the model's state_dict, totally: every blob accounted for, every tensor filled.

:func:`convert_blobs` maps blob names with the rules of :mod:`.names` and then checks the result
against the model that the configuration builds (on the ``meta`` device: no memory, no compute):

* every parameter and buffer of the model receives exactly one blob;
* optimizer state (``*_momentum``), ``lr``, ``model_iter`` and ``epoch`` are recognised, counted
  and reported, never loaded;
* anything else is an error that lists *all* offending names and shapes at once: blobs the model
  has no place for, parameters the file lacks, shape mismatches, non-float values.

The original's loading rules apply where they matter (specification 1.2-1.4): ``pred_w`` loads as
FC ``(K, 2048)`` or test conv ``(K, 2048, 1, 1, 1)``; a BN checkpoint loaded into an affine
(``MODEL.USE_AFFINE``) model is folded as ``convert_to_finetune.py`` folds it; with ``inflate``
2-D weights are inflated to 3-D; with ``inflate`` or ``finetune`` a ``pred`` of another class
count is dropped and the model's own initial classifier kept, and so are non-local blocks the
file does not have (the ImageNet and affine initialisation files have none).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from yacs.config import CfgNode

from ..models.layers import AffineNd, SpatialBN
from ..models.model_builder import build_model, get_cfg
from .errors import ConversionError
from .names import is_nonlocal_key, state_dict_key_to_blob, try_blob_to_state_dict_key
from .reader import MOMENTUM_SUFFIX, SCALAR_ENTRIES
from .transforms import fold_bn, inflate_weight

__all__ = [
    "BlobRow",
    "ConversionReport",
    "ConversionResult",
    "Target",
    "convert_blobs",
    "describe_cfg",
    "model_targets",
]

logger = logging.getLogger(__name__)

CfgLike = CfgNode | str | os.PathLike

# Row actions.
LOADED = "loaded"
RESHAPED = "reshaped"  # pred_w between FC (K, 2048) and conv (K, 2048, 1, 1, 1)
INFLATED = "inflated"  # 2-D -> 3-D
FOLDED = "folded"  # BN -> affine (_s/_b rows); _rm/_riv rows are FOLDED_IN
FOLDED_IN = "folded in"
IGNORED = "ignored"
DROPPED = "dropped"
INITIALISED = "initialised, not in file"
MAPPED_ACTIONS = (LOADED, RESHAPED, INFLATED, FOLDED)


@dataclass(frozen=True)
class Target:
    """One state_dict entry of the model: its shape and the kind of layer it belongs to."""

    key: str
    shape: tuple[int, ...]
    layer: str  # "conv", "bn", "affine", "pred"


def model_targets(cfg: CfgNode) -> dict[str, Target]:
    """The model's state_dict entries for ``cfg``, in order (``pred.weight`` as FC ``(K, 2048)``).

    The model is built on the ``meta`` device, so this costs neither memory nor initialisation.
    """
    with torch.device("meta"):
        model = build_model(cfg, split="val")
    layers: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, AffineNd):
            layers[name] = "affine"
        elif isinstance(module, SpatialBN):
            layers[name] = "bn"
        elif name == "pred":
            layers[name] = "pred"
    targets = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner = key.rsplit(".", 1)[0]
        targets[key] = Target(key, tuple(tensor.shape), layers.get(owner, "conv"))
    return targets


def describe_cfg(cfg: CfgNode) -> str:
    """A short description of the architecture a config builds."""
    kind = {1: "C2D", 2: "I3D", 3: "C2D", 4: "I3D"}.get(cfg.MODEL.VIDEO_ARC_CHOICE, "?")
    nl = cfg.NONLOCAL
    places = [s for s, on in (("res3", nl.CONV3_NONLOCAL), ("res4", nl.CONV4_NONLOCAL)) if on]
    return (
        f"{cfg.MODEL.MODEL_NAME} {kind} ResNet-{cfg.MODEL.DEPTH} (arc {cfg.MODEL.VIDEO_ARC_CHOICE}"
        f"), {cfg.MODEL.NUM_CLASSES} classes, {'frozen affine' if cfg.MODEL.USE_AFFINE else 'BN'}"
        f", non-local {'+'.join(places) if places else 'none'}"
    )


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def _fmt(shape: tuple[int, ...] | None) -> str:
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
                _fmt(r.file_shape),
                r.key or "-",
                _fmt(r.model_shape),
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


def _ignored_kind(name: str) -> str | None:
    if name in SCALAR_ENTRIES:
        return name
    if name.endswith(MOMENTUM_SUFFIX):
        return "momentum"
    return None


def _describe_ignored(kind: str, value: Any) -> str:
    if kind == "momentum":
        return "optimizer state"
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    if isinstance(value, (int, float, np.number)):
        return f"{kind} = {value:.6g}" if kind == "lr" else f"{kind} = {value}"
    return kind


class _Problems:
    """Everything that stops a conversion, gathered to be reported in one error."""

    def __init__(self) -> None:
        self.unknown: list[str] = []
        self.missing: list[str] = []
        self.shape: list[str] = []
        self.invalid: list[str] = []
        self.hints: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.unknown or self.missing or self.shape or self.invalid)

    def error(self, where: str, model: str, headline: str | None) -> ConversionError:
        counts = [
            (len(self.unknown), "blob(s) the model has no place for"),
            (len(self.missing), "model tensor(s) missing from the file"),
            (len(self.shape), "shape mismatch(es)"),
            (len(self.invalid), "invalid value(s)"),
        ]
        summary = ", ".join(f"{n} {what}" for n, what in counts if n)
        lines = [headline or f"{where}: the blobs do not fit the model ({model}): {summary}"]
        for title, items in (
            ("blobs the model has no place for", self.unknown),
            ("missing from the file (state_dict key <- expected blob)", self.missing),
            ("shape mismatches", self.shape),
            ("invalid values", self.invalid),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items))
        lines += [f"  hint: {h}" for h in dict.fromkeys(self.hints)]
        return ConversionError("\n".join(lines))


def _as_float32(name: str, value: Any, problems: _Problems) -> np.ndarray | None:
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        problems.invalid.append(f"{name}: a {type(value).__name__}, not an array")
        return None
    if value.dtype.kind != "f":
        problems.invalid.append(f"{name}: dtype {value.dtype}, not floating point")
        return None
    if value.dtype != np.float32:  # the original casts every blob to float32 when loading
        logger.info("%s: cast from %s to float32", name, value.dtype)
        return value.astype(np.float32)
    arr = np.require(value, requirements="C")  # keeps 0-d arrays 0-d
    return arr if arr.flags.writeable else arr.copy()


def convert_blobs(
    blobs: Mapping[str, Any],
    cfg: CfgLike,
    *,
    inflate: bool = False,
    finetune: bool = False,
    fold_bn: bool | None = None,
    source: str | os.PathLike | None = None,
) -> ConversionResult:
    """Convert Caffe2 blobs (name -> array) into the state_dict of the model ``cfg`` builds.

    Args:
        blobs: the file's flat blob dict; ``*_momentum``, ``lr``, ``model_iter`` and ``epoch``
            may be present (only their names and shapes are looked at).
        cfg: a config, a zoo name or a YAML path (anything :func:`nonlocal_net.get_cfg` takes).
        inflate: load 2-D (ImageNet) conv weights into the 3-D model by the original's rule.
            Implies the ``finetune`` allowances below.
        finetune: preparing a model for training: a ``pred`` of another class count is dropped,
            and ``pred`` and non-local blocks that the file lacks keep the model's initial
            values (reported as "initialised, not in file").
        fold_bn: ``None`` folds BN statistics into the model's frozen affines where the file has
            them (a BN checkpoint into a ``MODEL.USE_AFFINE`` model), ``True`` requires that,
            ``False`` refuses it.
        source: the file the blobs came from, for messages and the report.

    Returns:
        The state_dict (every key of the model, ``pred.weight`` as ``(K, 2048)``) and the report.

    Raises:
        ConversionError: listing every unknown blob, missing tensor and shape mismatch.
    """
    cfg = get_cfg(cfg)
    where = os.fspath(source) if source is not None else "blobs"
    model_desc = describe_cfg(cfg)
    targets = model_targets(cfg)
    init_mode = inflate or finetune
    report = ConversionReport(
        model=model_desc,
        source=os.path.basename(where) if source is not None else None,
        options={"inflate": inflate, "finetune": finetune, "fold_bn": fold_bn},
    )
    problems = _Problems()
    rows: dict[str, BlobRow] = {}
    arrays: dict[str, tuple[str, np.ndarray]] = {}  # key -> (blob, float32 array)
    stats: dict[str, dict[str, tuple[str, np.ndarray]]] = {}  # affine owner -> rm/riv blobs

    # 1. Classify every entry of the file.
    for name, value in blobs.items():
        kind = _ignored_kind(name)
        if kind is not None:
            detail = _describe_ignored(kind, value)
            rows[name] = BlobRow(name, None, _shape(value), None, IGNORED, detail)
            continue
        key = try_blob_to_state_dict_key(name)
        owner, _, leaf = (key or "").rpartition(".")
        target = targets.get(key) if key else None
        if target is None and leaf in ("running_mean", "running_var"):
            affine_key = f"{owner}.weight"
            if affine_key in targets and targets[affine_key].layer == "affine":
                arr = _as_float32(name, value, problems)
                if arr is not None:
                    stats.setdefault(owner, {})[leaf] = (name, arr)
                rows[name] = BlobRow(name, key, _shape(value), None, FOLDED_IN)
                continue
        if target is None:
            problems.unknown.append(f"{name} {_fmt(_shape(value))}")
            rows[name] = BlobRow(name, key, _shape(value), None, "unknown")
            continue
        arr = _as_float32(name, value, problems)
        rows[name] = BlobRow(name, key, _shape(value), target.shape, LOADED)
        if arr is not None:
            arrays[key] = (name, arr)

    if any(u.startswith("nonlocal_conv") for u in problems.unknown):
        problems.hints.append(
            "the file has non-local blocks (or non-local BN / bias blobs) the model lacks: check "
            "the model name or NONLOCAL.CONV3_NONLOCAL / CONV4_NONLOCAL / USE_BN / NO_BIAS"
        )

    # 2. Fold BN statistics into affines (specification 1.3).
    affine_owners = {k.rsplit(".", 1)[0] for k, t in targets.items() if t.layer == "affine"}
    if stats and fold_bn is False:
        for owner in stats:
            for name, arr in stats[owner].values():
                problems.unknown.append(f"{name} {_fmt(arr.shape)}")
                rows[name].action = "unknown"
        problems.hints.append(
            "the file holds BN running statistics for the model's frozen affines; fold them "
            "(fold_bn=None/True, the command line's default) as the original's conversion did"
        )
        stats = {}
    if fold_bn is True and not stats:
        problems.invalid.append(
            "fold_bn=True but "
            + (
                "the model has no frozen affine layers (MODEL.USE_AFFINE / NONLOCAL.USE_AFFINE)"
                if not affine_owners
                else "the file holds no BN running statistics (_bn_rm/_bn_riv) to fold"
            )
        )
    if stats:
        _fold_all(stats, affine_owners, arrays, rows, problems)

    # 3. The classifier: same class count -> reshape between FC and conv forms; another count ->
    # dropped with inflate/finetune (the original's "found but unmatching (not loaded)").
    num_classes = targets["pred.bias"].shape[0]
    for key in ("pred.weight", "pred.bias"):
        if key not in arrays:
            continue
        name, arr = arrays[key]
        valid_form = (
            (arr.ndim == 1) if key == "pred.bias" else (arr.shape[1:] in ((2048,), (2048, 1, 1, 1)))
        )
        if valid_form and arr.shape[0] != num_classes:
            if init_mode:
                rows[name].action = DROPPED
                rows[name].detail = f"{arr.shape[0]} classes, the model has {num_classes}"
                del arrays[key]
                continue
            problems.hints.append(
                f"the file's classifier has {arr.shape[0]} classes, the model {num_classes}: "
                f"set MODEL.NUM_CLASSES {arr.shape[0]}, or pass finetune=True (--finetune) to "
                f"drop it and keep the model's initial classifier"
            )
        if key == "pred.weight" and valid_form and arr.shape[0] == num_classes and arr.ndim == 5:
            arrays[key] = (name, arr.reshape(targets[key].shape))
            rows[name].action = RESHAPED
            rows[name].detail = "test conv -> FC"

    # 4. Shapes, with 2-D -> 3-D inflation (specification 1.2).
    two_d = 0
    for key, (name, arr) in list(arrays.items()):
        shape = targets[key].shape
        if arr.shape == shape:
            continue
        if arr.ndim == 4 and len(shape) == 5:
            two_d += 1
            if inflate and arr.shape[:2] == shape[:2] and arr.shape[-2:] == shape[-2:]:
                arrays[key] = (name, inflate_weight(arr, shape[2]))
                rows[name].action = INFLATED
                rows[name].detail = f"kt {shape[2]}"
                continue
        problems.shape.append(f"{name}: file {_fmt(arr.shape)}, model {_fmt(shape)} ({key})")
    if two_d and not inflate:
        problems.hints.append(
            f"{two_d} blobs are 2-D conv weights (4-D): an ImageNet file loads into a video "
            f"model with inflate=True (--inflate)"
        )

    # 5. Model tensors the file does not fill.
    init_keys = []
    unfolded = {f"{o}.{leaf}" for o in stats for leaf in ("weight", "bias")}
    for key, target in targets.items():
        if key in arrays or key in unfolded:  # a failed fold is reported already
            continue
        if init_mode and (is_nonlocal_key(key) or key.startswith("pred.")):
            init_keys.append(key)
            continue
        problems.missing.append(f"{key} <- {state_dict_key_to_blob(key)} {_fmt(target.shape)}")
    headline = None
    if problems.missing:
        headline = _missing_headline(problems, rows, where, model_desc, init_mode)

    if problems:
        raise problems.error(where, model_desc, headline)

    # 6. Assemble the state_dict in the model's order.
    initial = _initial_values(cfg, init_keys) if init_keys else {}
    state_dict: dict[str, torch.Tensor] = {}
    for key, target in targets.items():
        if key in arrays:
            state_dict[key] = torch.from_numpy(arrays[key][1])
        else:
            state_dict[key] = initial[key]
            blob = state_dict_key_to_blob(key)
            rows[f"<init> {key}"] = BlobRow(blob, key, None, target.shape, INITIALISED)
    report.rows = list(rows.values())
    if report.folded_layers:
        logger.info(
            "%s: folded %d BN layers into the model's frozen affines (eps 1e-5, as the "
            "original's convert_to_finetune.py)",
            where,
            len(report.folded_layers),
        )
    if report.inflated:
        logger.info("%s: inflated %d 2-D weights to 3-D", where, len(report.inflated))
    for row in report.rows:
        if row.action == DROPPED:
            logger.info("%s: dropped %s (%s)", where, row.blob, row.detail)
    if init_keys:
        logger.info(
            "%s: %d model tensors are not in the file and keep their initial values: %s",
            where,
            len(init_keys),
            ", ".join(init_keys),
        )
    return ConversionResult(state_dict, report)


def _bn_prefix(owner: str) -> str:
    """The blob prefix of a BN/affine module (``res2.0.branch2a_bn`` -> ``res2_0_branch2a_bn``)."""
    return state_dict_key_to_blob(f"{owner}.weight")[: -len("_s")]


def _fold_all(
    stats: dict[str, dict[str, tuple[str, np.ndarray]]],
    affine_owners: set[str],
    arrays: dict[str, tuple[str, np.ndarray]],
    rows: dict[str, BlobRow],
    problems: _Problems,
) -> None:
    """Fold every affine layer's BN statistics; all affine layers must have them or none."""
    without = sorted(affine_owners - set(stats))
    if without:
        problems.invalid.append(
            f"BN running statistics for {len(stats)} of the model's {len(affine_owners)} affine "
            f"layers (a checkpoint has them for all or none); none for: "
            + ", ".join(_bn_prefix(o) for o in without)
        )
    for owner, found in stats.items():
        parts = {leaf: found.get(leaf) for leaf in ("running_mean", "running_var")}
        sb = {leaf: arrays.get(f"{owner}.{leaf}") for leaf in ("weight", "bias")}
        prefix = _bn_prefix(owner)
        absent = [
            state_dict_key_to_blob(f"{owner}.{leaf}")
            for leaf, v in {**parts, **sb}.items()
            if v is None
        ]
        if absent:
            problems.invalid.append(f"cannot fold {prefix}: missing {', '.join(absent)}")
            continue
        arrs = [sb["weight"][1], sb["bias"][1], parts["running_mean"][1], parts["running_var"][1]]
        if len({a.shape for a in arrs}) != 1:
            problems.shape.append(
                f"{prefix}: BN blobs of different shapes {[tuple(a.shape) for a in arrs]}"
            )
            continue
        new_s, new_b = fold_bn(*arrs)
        for leaf, value in (("weight", new_s), ("bias", new_b)):
            name = sb[leaf][0]
            arrays[f"{owner}.{leaf}"] = (name, value)
            rows[name].action = FOLDED
            rows[name].detail = "BN -> affine, eps 1e-5"
        for name, _ in parts.values():
            rows[name].detail = f"into {prefix}_s/_b"


def _missing_headline(
    problems: _Problems,
    rows: dict[str, BlobRow],
    where: str,
    model_desc: str,
    init_mode: bool,
) -> str | None:
    """A specific first line (and hints) for the common ways a file lacks model tensors."""
    missing_keys = [m.split(" <- ")[0] for m in problems.missing]
    has_stats = any(r.blob.endswith(("_bn_rm", "_bn_riv")) for r in rows.values())
    stats_missing = [k for k in missing_keys if k.endswith(("running_mean", "running_var"))]
    if stats_missing and not has_stats:
        return (
            f"{where}: is an affine (BN-folded) file: it has _bn_s/_bn_b but no BN running "
            f"statistics (_bn_rm/_bn_riv), and the model ({model_desc}) uses BN, so "
            f"{len(stats_missing)} running statistics would be missing. Load it into a "
            f"MODEL.USE_AFFINE model (as the 32x4 and 128x1 configurations are) instead"
        )
    if any(is_nonlocal_key(k) for k in missing_keys) and not init_mode:
        problems.hints.append(
            "the model has non-local blocks the file lacks: check the configuration "
            "(NONLOCAL.CONV3_NONLOCAL / CONV4_NONLOCAL), or pass finetune=True (--finetune) "
            "to initialise them as for training"
        )
    if any(k.startswith("pred.") for k in missing_keys) and not init_mode:
        problems.hints.append(
            "the file has no classifier (pred_w/pred_b), as the original's affine and "
            "fine-tuning files: pass finetune=True (--finetune) to keep the model's initial one"
        )
    return None


def _initial_values(cfg: CfgNode, keys: list[str]) -> dict[str, torch.Tensor]:
    """The original's initial values of ``keys`` (a model built with a fixed seed, so a
    conversion is reproducible; the caller's random state is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(cfg, split="val")
    state = model.state_dict()
    return {k: state[k].detach().clone() for k in keys}
