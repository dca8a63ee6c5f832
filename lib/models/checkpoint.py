"""The converted-weights file format and :func:`load_model`.

A converted checkpoint is a ``torch.save`` file that ``torch.load(path, weights_only=True)``
reads (no pickled classes), holding a dict::

    {
        "format": "nonlocal_net/v1",
        "state_dict": {name: tensor, ...},   # exactly the model's parameters and buffers
        "cfg": {...},                        # the model config as a plain nested dict
        "meta": {...},                       # provenance: source file, sha256, counts, version
    }

:func:`load_model` rebuilds the model from the stored config and loads the weights strictly.
Both functions also read the same content written as ``.safetensors``
(:mod:`nonlocal_net.converters.safetensors_io`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from yacs.config import CfgNode

from ..core.config import (
    ConfigError,
    _merge_mapping,
    assert_and_infer_cfg,
    check_structure,
    get_default_cfg,
    validate_model_cfg,
)
from ..core.config import cfg_from_list as _cfg_from_list
from ..utils.io import atomic_write
from ..utils.log import terminal_safe
from .model_builder import build_model
from .resnet_video import ResNetVideo

__all__ = [
    "FORMAT",
    "CheckpointError",
    "cfg_from_dict",
    "cfg_to_dict",
    "is_converted_file",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]

FORMAT = "nonlocal_net/v1"


class CheckpointError(ValueError):
    """A converted checkpoint that cannot be read or does not fit its model; names the file."""


def cfg_to_dict(cfg: CfgNode) -> dict[str, Any]:
    """A plain nested ``dict`` copy of a config (safe for ``torch.load(weights_only=True)``)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(cfg)


def cfg_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> CfgNode:
    """Rebuild a frozen config from :func:`cfg_to_dict` output; unknown keys are errors.

    The structure is bounded first (:func:`check_structure`: shared parts counted at every use,
    depth), so a stored config cannot make any later copy or dump grow without bound."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the stored config is a {type(data).__name__}, not a dict")
    check_structure(data, source)
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    solver = data.get("SOLVER")
    if isinstance(solver, dict):
        solver.pop("STEPS", None)  # derived again from STEP_SIZES below
    cfg = get_default_cfg()
    _merge_mapping(cfg, data, "", source)
    assert_and_infer_cfg(cfg)
    cfg.freeze()
    return cfg


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    cfg: CfgNode,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write a converted checkpoint atomically (temporary file + rename)."""
    payload = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "cfg": cfg_to_dict(cfg),
        "meta": dict(meta or {}),
    }
    with atomic_write(path) as f:
        torch.save(payload, f)


def is_converted_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a converted checkpoint of this package (a ``torch.save`` zip
    whose pickle names the format, or a ``.safetensors`` file with the format in its header),
    checked without loading it: what a converter may replace without ``--overwrite``."""
    import zipfile

    path = os.fspath(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if not names or z.getinfo(names[0]).file_size > 1 << 24:
                    return False
                return FORMAT.encode() in z.read(names[0])
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            n = int.from_bytes(head, "little")
            return 0 < n < 1 << 24 and FORMAT.encode() in f.read(n)
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _describe_non_torch_file(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}"):
        return " It looks like a Python pickle: is it a Caffe2 .pkl? Convert it with vnl-convert."
    return ""


_GLOBAL = re.compile(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.<>]+)", re.I)


def _refused_global(message: str) -> str | None:
    """The global named in ``torch.load(weights_only=True)``'s refusal, if it is one."""
    if "Weights only load failed" not in message and "WeightsUnpickler" not in message:
        return None
    match = _GLOBAL.search(message)
    if match:
        return f"the global {terminal_safe(match.group(1))}"
    lines = [ln.strip() for ln in message.splitlines()[1:] if ln.strip()]
    lines = [ln for ln in lines if "weights_only" not in ln and "documentation" not in ln]
    return terminal_safe(lines[0][:300]) if lines else "something torch refuses to load"


def _first_safe_line(message: str) -> str:
    """The first line of a torch error, never its advice to load with ``weights_only=False``."""
    advice = ("weights_only", "Weights only", "trust", "documentation")
    lines = [ln for ln in message.splitlines() if ln.strip() and not any(a in ln for a in advice)]
    return terminal_safe(lines[0][:300]) if lines else ""


def _is_safetensors(path: str) -> bool:
    """A ``.safetensors`` name, or a file that starts as one: 8-byte little-endian header length,
    then the JSON header's ``{`` (a ``torch.save`` file starts with ``PK``)."""
    if path.endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 32


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a converted checkpoint (``torch.save`` with ``weights_only=True``, or
    ``.safetensors``) and check its structure."""
    path = os.fspath(path)
    if _is_safetensors(path):
        # converters depends on models, not the other way round: import where needed
        from ..converters.safetensors_io import load_safetensors_checkpoint

        data = load_safetensors_checkpoint(path)
        data["state_dict"] = {k: v.to(map_location) for k, v in data["state_dict"].items()}
        return data
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # torch raises many exception types for a bad file
        hint = _describe_non_torch_file(path) if os.path.isfile(path) else ""
        refused = _refused_global(str(e))
        if refused is not None and not hint:
            raise CheckpointError(
                f"{path}: refused to load: the file references {refused}, which a converted "
                f"checkpoint never contains; nothing from it was executed"
            ) from None
        detail = f"it references {refused}" if refused else _first_safe_line(str(e))
        raise CheckpointError(
            f"{path}: not a converted nonlocal_net checkpoint ({type(e).__name__}: {detail}).{hint}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: expected a {FORMAT!r} checkpoint, found {found!r}")
    for key, kind in (("state_dict", dict), ("cfg", dict), ("meta", dict)):
        if not isinstance(data.get(key), kind):
            raise CheckpointError(f"{path}: missing or malformed {key!r} entry")
    return data


def _check_state_dict(path: str, state: Mapping) -> None:
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: state_dict entry {terminal_safe(name)!s} is a {type(value).__name__}, "
                f"not a tensor"
            )


def load_model(
    path: str | os.PathLike,
    split: str = "test",
    overrides: Sequence[str] = (),
    map_location: str | torch.device = "cpu",
) -> ResNetVideo:
    """Rebuild the model stored in a converted checkpoint and load its weights strictly.

    ``overrides`` are ``KEY VALUE`` pairs applied to the stored config (for example
    ``["TRAIN.VIDEO_LENGTH", "16"]``); any override that changes the parameter shapes makes the
    strict load fail with a message listing the offending names.
    """
    path = os.fspath(path)
    data = load_checkpoint(path, map_location=map_location)
    try:
        cfg = cfg_from_dict(data["cfg"], source=f"{path} [cfg]")
        if overrides:
            cfg = cfg.clone()
            cfg.defrost()
            _cfg_from_list(cfg, list(overrides))
            assert_and_infer_cfg(cfg)
            cfg.freeze()
        validate_model_cfg(cfg, f"{path} [cfg]")
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    _check_state_dict(path, data["state_dict"])
    model = build_model(cfg, split=split)
    state = data["state_dict"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
        and not (k == "pred.weight" and state[k].numel() == expected[k].numel())
    )
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if items:
                shown = ", ".join(items[:8]) + (
                    f", ... ({len(items)} in all)" if len(items) > 8 else ""
                )
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"{path}: weights do not fit the model ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    return model
