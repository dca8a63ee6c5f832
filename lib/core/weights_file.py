"""The project's weights file: converted weights as ``.pt`` or ``.safetensors``.

A ``.pt`` weights file is a ``torch.save`` file that ``torch.load(path, weights_only=True)``
reads (no pickled classes), holding a dict::

    {
        "format": "nonlocal_net/v1",
        "state_dict": {name: tensor, ...},   # exactly the model's parameters and buffers
        "cfg": {...},                        # the model config as a plain nested dict
        "meta": {...},                       # provenance: source file, sha256, counts, version
    }

A ``.safetensors`` weights file holds the same content: the state_dict's tensors, and as string
metadata ``format``, ``cfg`` (JSON of :func:`~nonlocal_net.core.config.cfg_to_dict`) and ``meta``
(JSON). ``safetensors`` is an optional dependency (``pip install video-nonlocal-net[safetensors]``).

This module reads and writes both; :func:`nonlocal_net.models.load_model` builds the model from
what :func:`load_weights_file` returns. It sits below both the models and the converters.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from yacs.config import CfgNode

from ..utils.io import atomic_path, atomic_write
from ..utils.log import terminal_safe
from .config import cfg_to_dict

__all__ = [
    "FORMAT",
    "WeightsFileError",
    "is_converted_file",
    "is_safetensors_file",
    "load_weights_file",
    "save_weights_file",
    "weights_payload",
]

FORMAT = "nonlocal_net/v1"


class WeightsFileError(ValueError):
    """A weights file that cannot be read or does not fit its model; names the file."""


def weights_payload(
    state_dict: Mapping[str, torch.Tensor], cfg: CfgNode, meta: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The in-memory form of a weights file, as :func:`load_weights_file` returns it."""
    return {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "cfg": cfg_to_dict(cfg),
        "meta": dict(meta or {}),
    }


def save_weights_file(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    cfg: CfgNode,
    meta: Mapping[str, Any] | None = None,
    *,
    safetensors: bool | None = None,
) -> None:
    """Write a weights file atomically (temporary file + rename): ``.safetensors`` when
    ``safetensors`` is true, or is ``None`` and the name ends in ``.safetensors``; else ``.pt``."""
    if safetensors is None:
        safetensors = os.fspath(path).endswith(".safetensors")
    if safetensors:
        _save_safetensors(path, state_dict, cfg, meta)
        return
    payload = weights_payload(state_dict, cfg, meta)
    with atomic_write(path) as f:
        torch.save(payload, f)


def load_weights_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a weights file (``.pt`` with ``weights_only=True``, or ``.safetensors``) and check
    its structure; returns the dict shown in the module docstring."""
    path = os.fspath(path)
    if is_safetensors_file(path):
        data = _load_safetensors(path)
        data["state_dict"] = {k: v.to(map_location) for k, v in data["state_dict"].items()}
        return data
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise WeightsFileError(f"{path}: no such file") from None
    except Exception as e:  # torch raises many exception types for a bad file
        hint = _describe_non_torch_file(path) if os.path.isfile(path) else ""
        refused = _refused_global(str(e))
        if refused is not None and not hint:
            raise WeightsFileError(
                f"{path}: refused to load: the file references {refused}, which a converted "
                f"checkpoint never contains; nothing from it was executed"
            ) from None
        detail = f"it references {refused}" if refused else _first_safe_line(str(e))
        raise WeightsFileError(
            f"{path}: not a converted nonlocal_net checkpoint ({type(e).__name__}: {detail}).{hint}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise WeightsFileError(f"{path}: expected a {FORMAT!r} checkpoint, found {found!r}")
    for key, kind in (("state_dict", dict), ("cfg", dict), ("meta", dict)):
        if not isinstance(data.get(key), kind):
            raise WeightsFileError(f"{path}: missing or malformed {key!r} entry")
    _check_state_dict(path, data["state_dict"])
    return data


def _check_state_dict(path: str, state: Mapping) -> None:
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise WeightsFileError(
                f"{path}: state_dict entry {terminal_safe(name)!s} is a {type(value).__name__}, "
                f"not a tensor"
            )


def is_converted_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a weights file of this package (a ``torch.save`` zip whose
    pickle names the format, or a ``.safetensors`` file with the format in its header), checked
    without loading it: what a command may replace without ``--overwrite``."""
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


def is_safetensors_file(path: str) -> bool:
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


def _describe_non_torch_file(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}"):
        return " It looks like a Python pickle: is it a Caffe2 .pkl? Convert it with vnl-convert."
    return ""


def _safetensors_torch():
    try:
        import safetensors.torch
    except ImportError:  # optional dependency
        raise ImportError(
            "writing or reading .safetensors needs the optional package safetensors: "
            "pip install 'video-nonlocal-net[safetensors]'"
        ) from None
    return safetensors.torch


def _save_safetensors(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    cfg: CfgNode,
    meta: Mapping[str, Any] | None,
) -> None:
    st = _safetensors_torch()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    metadata = {
        "format": FORMAT,
        "cfg": json.dumps(cfg_to_dict(cfg), sort_keys=True),
        "meta": json.dumps(dict(meta or {}), sort_keys=True),
    }
    with atomic_path(path) as tmp:  # save_file streams the tensors (no copy in memory)
        st.save_file(tensors, tmp, metadata=metadata)


def _load_safetensors(path: str) -> dict[str, Any]:
    st = _safetensors_torch()
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        state_dict = st.load_file(path)
    except FileNotFoundError:
        raise WeightsFileError(f"{path}: no such file") from None
    except Exception as e:  # safetensors raises its own error types for a bad file
        raise WeightsFileError(f"{path}: not a readable .safetensors file ({e})") from e
    if metadata.get("format") != FORMAT or "cfg" not in metadata:
        raise WeightsFileError(
            f"{path}: not a converted nonlocal_net checkpoint (metadata format "
            f"{metadata.get('format')!r}, expected {FORMAT!r} with a 'cfg' entry)"
        )
    try:
        cfg = json.loads(metadata["cfg"])
        meta = json.loads(metadata.get("meta", "{}"))
    except json.JSONDecodeError as e:
        raise WeightsFileError(f"{path}: malformed JSON metadata ({e})") from e
    return {"format": FORMAT, "state_dict": state_dict, "cfg": cfg, "meta": meta}
