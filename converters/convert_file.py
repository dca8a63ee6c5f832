"""Convert a Caffe2 ``.pkl`` file into weights: in memory (:func:`convert_caffe2_pkl`) or into a
weights file (``.pt`` or ``.safetensors``, :func:`convert_checkpoint`)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from yacs.config import CfgNode

from nonlocal_net.core.config import get_cfg
from nonlocal_net.core.weights_file import is_converted_file, save_weights_file, weights_payload
from nonlocal_net.utils.io import check_destination, remove_stale_temporaries
from nonlocal_net.utils.lock import output_lock
from nonlocal_net.version import __version__

from .checks import refuse_nonfinite
from .convert import ConversionReport, convert_blobs
from .reader import Caffe2Pkl, read_caffe2_pkl

__all__ = [
    "CONVERTER_VERSION",
    "ConvertedWeights",
    "check_blobs_finite",
    "convert_caffe2_pkl",
    "convert_checkpoint",
    "converter_version",
    "sha256_file",
]

logger = logging.getLogger(__name__)

# Bumped whenever the converter's output for the same input changes.
CONVERTER_VERSION = 1


def converter_version() -> str:
    return f"nonlocal_net {__version__} converter v{CONVERTER_VERSION}"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def conversion_meta(pkl: Caffe2Pkl, report: ConversionReport, sha256: str) -> dict[str, Any]:
    """Provenance stored with the converted weights."""
    return {
        "source": os.path.basename(pkl.path),
        "source_sha256": sha256,
        "source_bytes": pkl.size,
        "source_layout": pkl.describe(),
        "source_lr": pkl.lr,
        "source_model_iter": pkl.model_iter,
        "converter_version": converter_version(),
        **report.to_meta(),
    }


@dataclass(frozen=True)
class ConvertedWeights:
    """A Caffe2 ``.pkl`` converted in memory: what a weights file would hold, and the report."""

    state_dict: dict[str, torch.Tensor]
    cfg: CfgNode
    meta: dict[str, Any]
    report: ConversionReport

    def payload(self) -> dict[str, Any]:
        """The content of the weights file :func:`convert_checkpoint` would write."""
        return weights_payload(self.state_dict, self.cfg, self.meta)


def convert_caffe2_pkl(
    src_pkl: str | os.PathLike,
    cfg: CfgNode | str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    inflate: bool = False,
    finetune: bool = False,
    fold_bn: bool | None = None,
    allow_nonfinite: bool = False,
) -> ConvertedWeights:
    """Read the Caffe2 checkpoint ``src_pkl`` with the safe reader and convert it totally for
    the model ``cfg`` (a config, zoo name or YAML path, with ``KEY VALUE`` ``overrides``), in
    memory. See :func:`convert_blobs` for ``inflate``, ``finetune`` and ``fold_bn``; it raises
    what they raise. Blobs with NaN/Inf values or negative BN variances are refused
    (:func:`check_blobs_finite`) unless ``allow_nonfinite``. Momentum payloads are never read."""
    cfg = get_cfg(cfg, overrides)
    src = os.fspath(src_pkl)
    pkl = read_caffe2_pkl(src, load_momentum=False)
    logger.info("%s: %s", src, pkl.describe())
    check_blobs_finite(pkl, allow_nonfinite)
    result = convert_blobs(
        pkl.entries(), cfg, inflate=inflate, finetune=finetune, fold_bn=fold_bn, source=src
    )
    meta = conversion_meta(pkl, result.report, sha256_file(src))
    return ConvertedWeights(result.state_dict, cfg, meta, result.report)


def convert_checkpoint(
    src_pkl: str | os.PathLike,
    dst: str | os.PathLike,
    cfg: CfgNode | str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    inflate: bool = False,
    finetune: bool = False,
    fold_bn: bool | None = None,
    safetensors: bool | None = None,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert the Caffe2 checkpoint ``src_pkl`` (:func:`convert_caffe2_pkl`) and write it to
    the weights file ``dst``.

    ``dst`` is a ``torch.save`` file (readable with ``nl.load_model``) or, with
    ``safetensors=True`` or a ``.safetensors`` suffix, a safetensors file
    (:mod:`nonlocal_net.core.weights_file`). Both hold the state_dict, the config and the meta
    (source name and SHA-256, counts of mapped / ignored / folded / inflated blobs, converter
    version). Writing is atomic; nothing is written when the conversion fails.

    Refused (nothing written): ``dst`` the same file as ``src_pkl`` or the config file;
    ``dst`` an existing file that is not a converted checkpoint, unless ``overwrite``; blobs
    with NaN/Inf values or negative BN variances, unless ``allow_nonfinite`` (then each is
    logged as a warning). ``dst`` is locked while it is written.
    """
    src = os.fspath(src_pkl)
    check_destination(
        dst,
        [src, cfg if isinstance(cfg, (str, os.PathLike)) and os.path.exists(cfg) else None],
        what="converted checkpoint",
        is_own_output=is_converted_file,
        replace_foreign=overwrite,
    )
    with output_lock(dst):
        remove_stale_temporaries(dst)  # left by a conversion killed with SIGKILL
        converted = convert_caffe2_pkl(
            src,
            cfg,
            overrides=overrides,
            inflate=inflate,
            finetune=finetune,
            fold_bn=fold_bn,
            allow_nonfinite=allow_nonfinite,
        )
        save_weights_file(
            dst, converted.state_dict, converted.cfg, converted.meta, safetensors=safetensors
        )
    logger.info("wrote %s", os.fspath(dst))
    return converted.report


def check_blobs_finite(pkl: Caffe2Pkl, allow: bool) -> None:
    """Refuse (``ConversionError``) or, with ``allow``, warn about blobs holding NaN/Inf values
    or negative BN variances (``*_riv``), one line per blob, names printed terminal-safe
    (:func:`.checks.refuse_nonfinite`)."""
    refuse_nonfinite(pkl.blobs, pkl.path, allow)
