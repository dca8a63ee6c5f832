"""Caffe2 blobs -> the model's state_dict, totally: every blob accounted for, every tensor filled.

:func:`convert_blobs` maps blob names with the rules of :mod:`.names` and then checks the result
against the model that the configuration builds (on the ``meta`` device: no memory, no compute):

* every parameter and buffer of the model receives exactly one blob;
* optimizer state (``*_momentum``), ``lr``, ``model_iter`` and ``epoch`` are recognised, counted
  and reported, never loaded;
* anything else is an error that lists *all* offending names and shapes at once: blobs the model
  has no place for, parameters the file lacks, shape mismatches, non-float values.

The original's loading rules (its ``lib/utils/checkpoints.py``) apply where they matter: ``pred_w``
loads as FC ``(K, 2048)`` or test conv ``(K, 2048, 1, 1, 1)``; a BN checkpoint loaded into an affine
(``MODEL.USE_AFFINE``) model is folded as ``convert_to_finetune.py`` folds it; with ``inflate`` 2-D
weights are inflated to 3-D; with ``inflate`` or ``finetune`` a ``pred`` of another class count is
dropped and the model's own initial classifier kept, and so are non-local blocks the file does not
have (the ImageNet and affine initialisation files have none) and BN running statistics it does
not have (``modify_blob_rm.py`` files: they start at mean 0 / variance 1, each logged "not
found" as the original's loader logs it).
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

from nonlocal_net.core.config import get_cfg
from nonlocal_net.models.layers import AffineNd, SpatialBN
from nonlocal_net.models.model_builder import build_model

from .errors import ConversionError
from .names import is_nonlocal_key, state_dict_key_to_blob, try_blob_to_state_dict_key
from .reader import MOMENTUM_SUFFIX, SCALAR_ENTRIES
from .report import (
    DROPPED,
    FOLDED,
    FOLDED_IN,
    IGNORED,
    INFLATED,
    INITIALISED,
    LOADED,
    RESHAPED,
    UNKNOWN,
    BlobRow,
    ConversionReport,
    ConversionResult,
    fmt_shape,
    shape_of,
)
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


@dataclass
class _Work:
    """The state of one conversion, passed through its steps."""

    targets: dict[str, Target]
    where: str
    model: str
    inflate: bool
    init_mode: bool  # inflate or finetune: preparing a model for training
    rows: dict[str, BlobRow] = field(default_factory=dict)
    arrays: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)  # key -> blob, value
    stats: dict[str, dict[str, tuple[str, np.ndarray]]] = field(default_factory=dict)
    problems: _Problems = field(default_factory=_Problems)
    init_keys: list[str] = field(default_factory=list)


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
            and ``pred``, non-local blocks and BN running statistics that the file lacks keep
            the model's initial values (reported as "initialised, not in file").
        fold_bn: ``None`` folds BN statistics into the model's frozen affines where the file has
            them (a BN checkpoint into a ``MODEL.USE_AFFINE`` model), ``True`` requires that,
            ``False`` refuses it.
        source: the file the blobs came from, for messages and the report.

    Returns:
        The state_dict (every key of the model, ``pred.weight`` as ``(K, 2048)``; tensors share
        memory with the input arrays where nothing had to change) and the report.

    Raises:
        ConversionError: listing every unknown blob, missing tensor and shape mismatch.
    """
    cfg = get_cfg(cfg)
    work = _Work(
        targets=model_targets(cfg),
        where=os.fspath(source) if source is not None else "blobs",
        model=describe_cfg(cfg),
        inflate=inflate,
        init_mode=inflate or finetune,
    )
    _classify(work, blobs)
    _fold(work, fold_bn)
    _classifier(work)
    _shapes(work)
    headline = _missing(work)
    if work.problems:
        raise work.problems.error(work.where, work.model, headline)
    state_dict = _assemble(work, cfg)
    report = ConversionReport(
        model=work.model,
        rows=list(work.rows.values()),
        source=os.path.basename(work.where) if source is not None else None,
        options={"inflate": inflate, "finetune": finetune, "fold_bn": fold_bn},
    )
    _log(work, report)
    return ConversionResult(state_dict, report)


def _classify(work: _Work, blobs: Mapping[str, Any]) -> None:
    """Sort every entry of the file: ignored bookkeeping, a model tensor, BN statistics of a
    frozen affine (to fold), or a blob the model has no place for."""
    targets, problems = work.targets, work.problems
    for name, value in blobs.items():
        kind = _ignored_kind(name)
        if kind is not None:
            detail = _describe_ignored(kind, value)
            work.rows[name] = BlobRow(name, None, shape_of(value), None, IGNORED, detail)
            continue
        key = try_blob_to_state_dict_key(name)
        target = targets.get(key) if key else None
        owner, _, leaf = (key or "").rpartition(".")
        if target is None and leaf in ("running_mean", "running_var"):
            affine = targets.get(f"{owner}.weight")
            if affine is not None and affine.layer == "affine":
                arr = _as_float32(name, value, problems)
                if arr is not None:
                    work.stats.setdefault(owner, {})[leaf] = (name, arr)
                work.rows[name] = BlobRow(name, key, shape_of(value), None, FOLDED_IN)
                continue
        if target is None:
            problems.unknown.append(f"{name} {fmt_shape(shape_of(value))}")
            work.rows[name] = BlobRow(name, key, shape_of(value), None, UNKNOWN)
            continue
        arr = _as_float32(name, value, problems)
        work.rows[name] = BlobRow(name, key, shape_of(value), target.shape, LOADED)
        if arr is not None:
            work.arrays[key] = (name, arr)
    if any(u.startswith("nonlocal_conv") for u in problems.unknown):
        problems.hints.append(
            "the file has non-local blocks (or non-local BN / bias blobs) the model lacks: check "
            "the model name or NONLOCAL.CONV3_NONLOCAL / CONV4_NONLOCAL / USE_BN / NO_BIAS"
        )


def _fold(work: _Work, fold_bn: bool | None) -> None:
    """Fold BN statistics into the frozen affines, or refuse to."""
    problems = work.problems
    affine_owners = {k.rsplit(".", 1)[0] for k, t in work.targets.items() if t.layer == "affine"}
    if work.stats and fold_bn is False:
        for found in work.stats.values():
            for name, arr in found.values():
                problems.unknown.append(f"{name} {fmt_shape(arr.shape)}")
                work.rows[name].action = UNKNOWN
        problems.hints.append(
            "the file holds BN running statistics for the model's frozen affines; fold them "
            "(fold_bn=None/True, the command line's default) as the original's conversion did"
        )
        work.stats = {}
    if fold_bn is True and not work.stats:
        problems.invalid.append(
            "fold_bn=True but "
            + (
                "the model has no frozen affine layers (MODEL.USE_AFFINE / NONLOCAL.USE_AFFINE)"
                if not affine_owners
                else "the file holds no BN running statistics (_bn_rm/_bn_riv) to fold"
            )
        )
    if work.stats:
        _fold_all(work.stats, affine_owners, work.arrays, work.rows, problems)


def _classifier(work: _Work) -> None:
    """``pred``: the same class count reshapes between FC and conv forms; another count is
    dropped when initialising for training (the original's "found but unmatching (not
    loaded)"), an error otherwise."""
    num_classes = work.targets["pred.bias"].shape[0]
    for key in ("pred.weight", "pred.bias"):
        if key not in work.arrays:
            continue
        name, arr = work.arrays[key]
        row = work.rows[name]
        if key == "pred.bias":
            valid_form = arr.ndim == 1
        else:
            valid_form = arr.shape[1:] in ((2048,), (2048, 1, 1, 1))
        if valid_form and arr.shape[0] != num_classes:
            if work.init_mode:
                row.action = DROPPED
                row.detail = f"{arr.shape[0]} classes, the model has {num_classes}"
                del work.arrays[key]
                continue
            work.problems.hints.append(
                f"the file's classifier has {arr.shape[0]} classes, the model {num_classes}: "
                f"set MODEL.NUM_CLASSES {arr.shape[0]}, or pass finetune=True (--finetune) to "
                f"drop it and keep the model's initial classifier"
            )
        elif key == "pred.weight" and valid_form and arr.ndim == 5:
            work.arrays[key] = (name, arr.reshape(work.targets[key].shape))
            row.action = RESHAPED
            row.detail = "test conv -> FC"


def _shapes(work: _Work) -> None:
    """Check every shape; inflate 2-D weights into 3-D ones if asked to."""
    two_d = 0
    for key, (name, arr) in list(work.arrays.items()):
        shape = work.targets[key].shape
        if arr.shape == shape:
            continue
        if arr.ndim == 4 and len(shape) == 5:
            two_d += 1
            if work.inflate and arr.shape[:2] == shape[:2] and arr.shape[-2:] == shape[-2:]:
                work.arrays[key] = (name, inflate_weight(arr, shape[2]))
                work.rows[name].action = INFLATED
                work.rows[name].detail = f"kt {shape[2]}"
                continue
        work.problems.shape.append(
            f"{name}: file {fmt_shape(arr.shape)}, model {fmt_shape(shape)} ({key})"
        )
    if two_d and not work.inflate:
        work.problems.hints.append(
            f"{two_d} blobs are 2-D conv weights (4-D): an ImageNet file loads into a video "
            f"model with inflate=True (--inflate)"
        )


def _missing(work: _Work) -> str | None:
    """Model tensors the file does not fill: initialised when allowed, else errors. Returns a
    specific headline for the error where the cause is typical."""
    unfolded = {f"{o}.{leaf}" for o in work.stats for leaf in ("weight", "bias")}
    for key, target in work.targets.items():
        if key in work.arrays or key in unfolded:  # a failed fold is reported already
            continue
        if work.init_mode and (
            is_nonlocal_key(key) or key.startswith("pred.") or _is_bn_statistic(target)
        ):
            work.init_keys.append(key)
            continue
        work.problems.missing.append(
            f"{key} <- {state_dict_key_to_blob(key)} {fmt_shape(target.shape)}"
        )
    if not work.problems.missing:
        return None
    return _missing_headline(work.problems, work.rows, work.where, work.model, work.init_mode)


def _is_bn_statistic(target: Target) -> bool:
    """A BN running statistic: when preparing a model for training, one the file lacks starts
    at its initial value (mean 0, variance 1), as the original's ``checkpoints.py`` logs it
    "not found" and leaves the blob as the SpatialBN created it (``modify_blob_rm.py`` files
    have none)."""
    return target.layer == "bn" and target.key.endswith((".running_mean", ".running_var"))


def _assemble(work: _Work, cfg: CfgNode) -> dict[str, torch.Tensor]:
    """The state_dict in the model's order; tensors not in the file get initial values."""
    initial = _initial_values(cfg, work.init_keys) if work.init_keys else {}
    state_dict: dict[str, torch.Tensor] = {}
    for key, target in work.targets.items():
        if key in work.arrays:
            state_dict[key] = torch.from_numpy(work.arrays[key][1])
        else:
            state_dict[key] = initial[key]
            blob = state_dict_key_to_blob(key)
            work.rows[f"<init> {key}"] = BlobRow(blob, key, None, target.shape, INITIALISED)
    return state_dict


def _log(work: _Work, report: ConversionReport) -> None:
    if report.folded_layers:
        logger.info(
            "%s: folded %d BN layers into the model's frozen affines (eps 1e-5, as the "
            "original's convert_to_finetune.py)",
            work.where,
            len(report.folded_layers),
        )
    if report.inflated:
        logger.info("%s: inflated %d 2-D weights to 3-D", work.where, len(report.inflated))
    for row in report.rows:
        if row.action == DROPPED:
            logger.info("%s: dropped %s (%s)", work.where, row.blob, row.detail)
    if work.init_keys:
        for key in work.init_keys:  # the original's initialize_master_gpu_model_params line
            logger.info("%s not found", state_dict_key_to_blob(key))
        logger.info(
            "%s: %d model tensors are not in the file and keep their initial values: %s",
            work.where,
            len(work.init_keys),
            ", ".join(work.init_keys),
        )
        stats = [k for k in work.init_keys if _is_bn_statistic(work.targets[k])]
        if stats:
            logger.warning(
                "%s: %d BN running statistics are not in the file (a --blob-rm file, or a "
                "BN-folded one): they start at mean 0 / variance 1, as in the original",
                work.where,
                len(stats),
            )


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
    file_blobs = {r.blob for r in rows.values()}
    has_stats = any(b.endswith(("_bn_rm", "_bn_riv")) for b in file_blobs)
    has_scales = any(b.endswith("_bn_s") for b in file_blobs)
    stats_missing = [k for k in missing_keys if k.endswith(("running_mean", "running_var"))]
    if stats_missing and not has_stats and has_scales:
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
    has_pred = bool(file_blobs & {"pred_w", "pred_b"})
    if any(k.startswith("pred.") for k in missing_keys) and not init_mode and not has_pred:
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
