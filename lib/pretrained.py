"""Released models by name: the one resolver every command and the API take weights through.

:func:`resolve_weights` turns what a user wrote where a weights file is expected into a path. An
existing file is returned unchanged (a file always wins over a name); a released model's name
(exactly as :func:`nonlocal_net.list_models` spells it) becomes

* with ``caffe2=True``, the released ``NAME.pkl`` in the download cache
  (:func:`nonlocal_net.core.hub.fetch_released`: downloaded once, SHA-256 checked on every use),
  for what reads the original's files (``vnl-verify``'s SRC, ``TRAIN.PARAMS_FILE``);
* otherwise the converted weights cached beside it, ``NAME.pt``: written once by the safe
  converter (the same reader and total conversion as ``vnl-convert NAME.pkl NAME.pt --model
  NAME``), so later loads take no conversion. Its SHA-256 and the converter version are recorded
  in ``NAME.pt.json``; a cache written by another converter version is converted again, a file
  that no longer matches its record is refused.

Anything else is returned unchanged, so the caller's own "no such file" error stays as it was.

:func:`load_model` is :func:`nonlocal_net.models.load_model` through the resolver: what the
commands (``vnl-test``, ``vnl-predict``, ``vnl-extract``) load ``--weights`` with.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import torch

from .converters.convert_file import convert_caffe2_pkl, converter_version
from .core.hub import (
    cache_dir,
    fetch_released,
    is_zoo_name,
    recorded_sha256,
    verify_sha256,
    waiting_lock,
)
from .core.weights_file import save_weights_file
from .models.model_builder import load_model as _load_weights_file
from .models.resnet_video import ResNetVideo
from .utils.download import file_sha256
from .utils.io import atomic_write

__all__ = [
    "converted_released",
    "is_released_name",
    "load_model",
    "resolve_weights",
    "weights_label",
]

logger = logging.getLogger(__name__)


def is_released_name(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a released model rather than a file: a zoo name with no file of
    that name (a file wins, so a local copy named like a released model is used as it is)."""
    text = os.fspath(spec)
    return not os.path.exists(text) and is_zoo_name(text)


def resolve_weights(spec: str | os.PathLike, *, caffe2: bool = False, progress: bool = True) -> str:
    """The local path of ``spec``: an existing file as it is; a released model's name as its
    cached converted weights (or, with ``caffe2``, its released ``.pkl``), fetched and converted
    on first use; anything else unchanged (the caller reports it missing)."""
    text = os.fspath(spec)
    if not is_released_name(text):
        return text
    if caffe2:
        return fetch_released(text, progress=progress)
    return converted_released(text, progress=progress)


def weights_label(spec: str | os.PathLike) -> str:
    """How an output records the weights ``spec``: a released model's name as given
    (:func:`is_released_name`), anything else as the absolute path of the file."""
    text = os.fspath(spec)
    return text if is_released_name(text) else os.path.abspath(text)


def load_model(
    weights: str | os.PathLike,
    split: str = "test",
    overrides: Sequence[str] = (),
    map_location: str | torch.device = "cpu",
) -> ResNetVideo:
    """:func:`nonlocal_net.models.load_model` of ``weights``, a weights file or a released
    model's name (:func:`resolve_weights`)."""
    return _load_weights_file(resolve_weights(weights), split, overrides, map_location)


def _record_path(path: str) -> str:
    return path + ".json"


def _read_record(path: str) -> dict | None:
    try:
        with open(_record_path(path), encoding="utf-8") as f:
            record = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _usable(path: str, pkl_sha256: str | None) -> bool:
    """Whether the cached conversion ``path`` may be used: it exists, its record names the
    current converter and (when known) the source's SHA-256. Its own SHA-256 is checked by the
    caller; a missing or stale record means "convert again"."""
    record = _read_record(path)
    if not os.path.isfile(path) or record is None or not isinstance(record.get("sha256"), str):
        return False
    if record.get("converter_version") != converter_version():
        logger.info("%s was written by %s: converting again", path, record.get("converter_version"))
        return False
    return pkl_sha256 is None or record.get("source_sha256") == pkl_sha256


def converted_released(name: str, *, progress: bool = True) -> str:
    """The cached converted weights (``.pt``) of the released model ``name``, converting its
    downloaded ``.pkl`` (:func:`resolve_weights`) when the cache holds none for this converter."""
    path = os.path.join(cache_dir(), name + ".pt")
    pkl = os.path.join(cache_dir(), name + ".pkl")
    # The released file is checked whenever it is there; without it, the conversion's record
    # (checked below) is what vouches for the weights.
    pkl_sha = recorded_sha256(fetch_released(name)) if os.path.isfile(pkl) else None
    if not _usable(path, pkl_sha):
        with waiting_lock(path, f"the conversion of {name}"):
            if not _usable(path, pkl_sha):
                pkl = fetch_released(name, progress=progress)
                _convert(name, pkl, path)
    record = _read_record(path) or {}
    verify_sha256(
        path, str(record.get("sha256")), f"sha256 recorded in {_record_path(path)}", "convert again"
    )
    return path


def _convert(name: str, pkl: str, path: str) -> None:
    logger.info("converting %s for %s (cached in %s)", pkl, name, path)
    converted = convert_caffe2_pkl(pkl, name)
    save_weights_file(path, converted.state_dict, converted.cfg, converted.meta)
    record = {
        "model": name,
        "source": os.path.basename(pkl),
        "source_sha256": converted.meta["source_sha256"],
        "sha256": file_sha256(path),
        "converter_version": converter_version(),
    }
    with atomic_write(_record_path(path), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
