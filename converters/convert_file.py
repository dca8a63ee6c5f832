"""Convert a Caffe2 ``.pkl`` file into a converted-weights file (``.pt`` or ``.safetensors``)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

from yacs.config import CfgNode

from .. import __version__
from ..models.checkpoint import is_converted_file, save_checkpoint
from ..models.model_builder import get_cfg
from ..utils.io import check_destination, remove_stale_temporaries
from ..utils.lock import output_lock
from ..utils.log import terminal_safe
from ..utils.numeric import check_finite
from .convert import ConversionReport, convert_blobs
from .errors import ConversionError
from .reader import Caffe2Checkpoint, read_caffe2_pkl
from .safetensors_io import save_safetensors_checkpoint

__all__ = [
    "CONVERTER_VERSION",
    "check_blobs_finite",
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


def conversion_meta(
    ckpt: Caffe2Checkpoint, report: ConversionReport, sha256: str
) -> dict[str, Any]:
    """Provenance stored with the converted weights."""
    return {
        "source": os.path.basename(ckpt.path),
        "source_sha256": sha256,
        "source_bytes": ckpt.size,
        "source_layout": ckpt.describe(),
        "source_lr": ckpt.lr,
        "source_model_iter": ckpt.model_iter,
        "converter_version": converter_version(),
        **report.to_meta(),
    }


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
    """Convert the Caffe2 checkpoint ``src_pkl`` for the model ``cfg`` (a config, zoo name or
    YAML path, with ``KEY VALUE`` ``overrides``) and write it to ``dst``.

    ``dst`` is a ``torch.save`` file (:func:`nonlocal_net.models.checkpoint.save_checkpoint`,
    readable with ``nl.load_model``) or, with ``safetensors=True`` or a ``.safetensors`` suffix,
    a safetensors file. Both hold the state_dict, the config and the meta (source name and
    SHA-256, counts of mapped / ignored / folded / inflated blobs, converter version). See
    :func:`convert_blobs` for ``inflate``, ``finetune`` and ``fold_bn``. Writing is atomic;
    nothing is written when the conversion fails. Momentum payloads are never read.

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
    cfg = get_cfg(cfg, overrides)
    with output_lock(dst):
        return _convert_locked(
            src, dst, cfg, inflate, finetune, fold_bn, safetensors, allow_nonfinite
        )


def check_blobs_finite(ckpt: Caffe2Checkpoint, allow: bool) -> None:
    """Refuse (``ConversionError``) or, with ``allow``, warn about blobs holding NaN/Inf values
    or negative BN variances (``*_riv``), one line per blob, names printed terminal-safe."""
    problems = check_finite(ckpt.blobs.items(), negative_ok=lambda n: not n.endswith("_riv"))
    if not problems:
        return
    shown = [terminal_safe(p) for p in problems]
    if allow:
        for line in shown:
            logger.warning("%s: %s (written anyway: --allow-nonfinite)", ckpt.path, line)
        return
    listed = "; ".join(shown[:5]) + (f"; ... ({len(shown)} blobs in all)" if len(shown) > 5 else "")
    raise ConversionError(
        f"{ckpt.path}: {len(shown)} blobs hold non-finite values or negative variances "
        f"({listed}); pass --allow-nonfinite to write them anyway"
    )


def _convert_locked(src, dst, cfg, inflate, finetune, fold_bn, safetensors, allow_nonfinite):
    remove_stale_temporaries(dst)  # left by a conversion killed with SIGKILL
    ckpt = read_caffe2_pkl(src, load_momentum=False)
    logger.info("%s: %s", src, ckpt.describe())
    check_blobs_finite(ckpt, allow_nonfinite)
    result = convert_blobs(
        ckpt.entries(), cfg, inflate=inflate, finetune=finetune, fold_bn=fold_bn, source=src
    )
    meta = conversion_meta(ckpt, result.report, sha256_file(src))
    as_safetensors = safetensors if safetensors is not None else str(dst).endswith(".safetensors")
    if as_safetensors:
        save_safetensors_checkpoint(dst, result.state_dict, cfg, meta)
    else:
        save_checkpoint(dst, result.state_dict, cfg, meta)
    logger.info("wrote %s", os.fspath(dst))
    return result.report
