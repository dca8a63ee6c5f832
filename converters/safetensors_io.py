"""Converted weights as ``.safetensors``: the same content as the ``.pt`` format.

The file holds the state_dict's tensors; its string metadata holds ``format``
(``nonlocal_net/v1``), ``cfg`` (the model config as JSON, as :func:`cfg_to_dict` gives it) and
``meta`` (the conversion's provenance as JSON). ``safetensors`` is an optional dependency
(``pip install video-nonlocal-net[safetensors]``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from yacs.config import CfgNode

from ..models.checkpoint import FORMAT, CheckpointError, cfg_to_dict
from ..utils.io import atomic_path

__all__ = ["load_safetensors_checkpoint", "save_safetensors_checkpoint"]


def _safetensors_torch():
    try:
        import safetensors.torch
    except ImportError:  # optional dependency
        raise ImportError(
            "writing or reading .safetensors needs the optional package safetensors: "
            "pip install 'video-nonlocal-net[safetensors]'"
        ) from None
    return safetensors.torch


def save_safetensors_checkpoint(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    cfg: CfgNode,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write converted weights as ``.safetensors`` (config and meta as JSON metadata),
    atomically."""
    st = _safetensors_torch()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    metadata = {
        "format": FORMAT,
        "cfg": json.dumps(cfg_to_dict(cfg), sort_keys=True),
        "meta": json.dumps(dict(meta or {}), sort_keys=True),
    }
    with atomic_path(path) as tmp:  # save_file streams the tensors (no copy in memory)
        st.save_file(tensors, tmp, metadata=metadata)


def load_safetensors_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.safetensors`` written by :func:`save_safetensors_checkpoint` into the same dict
    as :func:`nonlocal_net.models.checkpoint.load_checkpoint` returns."""
    st = _safetensors_torch()
    path = os.fspath(path)
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        state_dict = st.load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # safetensors raises its own error types for a bad file
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from e
    if metadata.get("format") != FORMAT or "cfg" not in metadata:
        raise CheckpointError(
            f"{path}: not a converted nonlocal_net checkpoint (metadata format "
            f"{metadata.get('format')!r}, expected {FORMAT!r} with a 'cfg' entry)"
        )
    try:
        cfg = json.loads(metadata["cfg"])
        meta = json.loads(metadata.get("meta", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON metadata ({e})") from e
    return {"format": FORMAT, "state_dict": state_dict, "cfg": cfg, "meta": meta}
