"""Feature extraction for a whole video list (``vnl-extract``), with the evaluation's machinery.

Every listed video is decoded once in DataLoader workers and cut into the original's test views
(:mod:`..datasets.stream`, as :func:`.evaluator.evaluate`); the model, prepared in a
:func:`.inference.prepare_for_inference` precision mode, gives per view the named layer's output
averaged over its space-time positions (``pool5``, the default, is the pooled res5 feature,
2048 values). Results go through :class:`.results.ResultsStore`, so the output has the same
crash safety as ``vnl-test``'s (part files written atomically, ``resume``, atomic final merge),
and ``torchrun`` shards the videos across processes.

Output file (the results format, ``header.kind = "features"``)::

    views/scores      float32 (R, D)  the features (also reachable as views/features)
    views/video_id    int64   (R,)    video id (list line index) of each row
    views/view_index  int16   (R,)    view 10*ct + j; -1 for a per-video average
    videos/..., list/...              as in vnl-test's results (errors of bad videos included)
    attrs: header (JSON: kind, layer, per_video, protocol, weights, precision, config, ...)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from ..core.config import cfg_to_dict
from ..datasets.decoders import available_backends
from ..datasets.protocol import TestProtocol
from ..datasets.stream import (
    VideoItem,
    view_loader,
)
from ..datasets.video_list import read_video_list
from ..pretrained import load_model  # a weights file or a released model's name
from ..utils.io import check_destination
from ..utils.lock import output_lock
from ..utils.numeric import finite_rows
from .distributed import init_distributed, shard
from .evaluator import default_batch_size, model_fingerprint
from .inference import prepare_for_inference
from .layer_taps import POOL5, FeatureTap, feature_dim, layer_names
from .results import RESULTS_FORMAT, ResultsError, ResultsStore, VideoRecord

__all__ = ["FEATURES_KIND", "extract_features", "is_features_file", "layer_names"]

logger = logging.getLogger(__name__)

FEATURES_KIND = "nonlocal_net/features/v1"
# the error text of a video some of whose views had NaN/Inf features (those rows not written);
# stored per video, so the counts survive --resume
_FAILED = "non-finite features:"
_FAILED_RE = re.compile(re.escape(_FAILED) + r" (\d+) of \d+ views")


def is_features_file(path: str) -> bool:
    """Whether ``path`` is a features file ``vnl-extract`` wrote (replaceable by a new run
    without ``--overwrite``, after ``--resume``/``--overwrite`` are chosen)."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != RESULTS_FORMAT:
                return False
            header = json.loads(f.attrs["header"])
    except (OSError, ValueError, KeyError):
        return False
    return isinstance(header, dict) and header.get("kind") == FEATURES_KIND


def extract_features(
    list_file: str | os.PathLike,
    weights: str | os.PathLike | None,
    output: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    overrides: Sequence[str] = (),
    data_root: str | os.PathLike | None = None,
    layer: str = POOL5,
    per_video: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    batch_size: int | None = None,
    workers: int = 2,
    limit: int | None = None,
    backend: str = "opencv",
    device: str | None = None,
    precision: str = "strict",
    compile: bool = False,
    flush_every: int = 16,
    flush_seconds: float = 60.0,
    decode_memory_mb: int = 1024,
    progress: bool = True,
    mp_context: str = "spawn",
) -> dict:
    """Extract ``layer`` features of every view of every video in ``list_file`` into ``output``.

    ``per_video``: one row per video, the mean over its views. Returns a summary (videos, views,
    decode errors, bad list lines, feature size, output path), also stored in the file.
    ``resume``/``overwrite`` as in :func:`.evaluator.evaluate`; a resumed run must use the same
    model, layer, mode, backend and list. Under ``torchrun`` every process returns the summary.

    ``output`` must not be the list or the weights (links resolved) nor an existing file that
    is not a features file (unless ``overwrite``); it is locked for the run (a second writer is
    refused). A view whose features hold NaN/Inf is a *failed view*: its row is not written,
    and the summary counts ``num_failed_views`` / ``num_videos_with_failed_views`` (with a
    warning).
    """
    ctx = init_distributed(device)
    try:
        with contextlib.ExitStack() as held:
            args = {k: v for k, v in locals().items() if k not in ("ctx", "held")}
            return _extract(ctx, held, **args)
    finally:
        ctx.close()


def _claim_output(held, output, list_file, weights, overwrite) -> None:
    """Refuse an output that is an input or a foreign file, then lock it for this run."""
    check_destination(
        output,
        [list_file, weights],
        what="features file",
        is_own_output=is_features_file,
        replace_foreign=overwrite,
    )
    held.enter_context(output_lock(output))


def _extract(
    ctx,
    held,
    *,
    list_file,
    weights,
    output,
    model,
    overrides,
    data_root,
    layer,
    per_video,
    resume,
    overwrite,
    batch_size,
    workers,
    limit,
    backend,
    device,
    precision,
    compile,
    flush_every,
    flush_seconds,
    decode_memory_mb,
    progress,
    mp_context,
) -> dict:
    claimed: Any = None
    if ctx.is_main:
        try:
            _claim_output(held, output, list_file, weights, overwrite)
        except OSError as e:
            claimed = e
    claimed = ctx.broadcast(claimed)
    if claimed is not None:
        raise claimed if isinstance(claimed, OSError) else ResultsError(str(claimed))
    if backend not in available_backends():
        raise ValueError(f"video backend {backend!r} is not available ({available_backends()})")
    if model is None:
        if weights is None:
            raise ValueError("extract_features() needs weights (a converted .pt file) or a model")
        model = load_model(weights, split="test", overrides=overrides)
    cfg = model.cfg
    if layer not in layer_names(model):
        raise ValueError(
            f"unknown layer {layer!r}: use pool5 or a module name such as res4, res5.2 or "
            f"res4.nonlocal_5 (vnl-extract --list-layers prints them all)"
        )
    protocol = TestProtocol.from_cfg(cfg)
    dim = feature_dim(cfg, layer, protocol)
    fingerprint = model_fingerprint(model)  # of the weights as given, before any folding
    model = prepare_for_inference(model, ctx.device, precision, compile)
    features = FeatureTap(model, layer)
    batch_size = batch_size or default_batch_size(cfg)
    vlist = read_video_list(list_file, data_root, num_classes=cfg.MODEL.NUM_CLASSES)
    entries = vlist.entries if limit is None else vlist.entries[:limit]
    header = {
        "kind": FEATURES_KIND,
        "layer": layer,
        "per_video": bool(per_video),
        "feature_dim": dim,
        "list_file": os.path.abspath(vlist.source),
        "list_sha256": vlist.sha256,
        "num_entries": len(entries),
        "data_root": os.fspath(data_root) if data_root is not None else None,
        "weights": os.path.abspath(os.fspath(weights)) if weights is not None else None,
        # the extraction settings ride in cfg, which --resume compares
        "model_fingerprint": fingerprint,
        "cfg": {**cfg_to_dict(cfg), "EXTRACT": {"LAYER": layer, "PER_VIDEO": bool(per_video)}},
        "num_classes": dim,
        "views_per_video": 1 if per_video else protocol.num_views,
        "protocol": asdict(protocol),
        "backend": backend,
        "precision": precision,
        "channels_last": True,
        "version": _version(),
    }
    store = ResultsStore(output, header)
    complete, done = store.prepare_on_main(ctx, resume, overwrite)
    todo = [] if complete else [e for e in entries if e.ok and e.video_id not in done]
    items = [VideoItem(e.video_id, vlist.resolve(e)) for e in shard(todo, ctx.rank, ctx.world_size)]
    logger.info(
        "%d list entries, %d to extract (%d here), layer %s (%d values), %s, precision %s",
        len(entries),
        len(todo),
        len(items),
        layer,
        dim,
        "one row per video" if per_video else f"{protocol.num_views} views per video",
        precision,
    )
    if items:
        writer = store.writer(ctx.rank, dim, flush_every, flush_seconds)
        loader = view_loader(
            items,
            protocol,
            batch_size,
            backend,
            workers=workers,
            memory_budget=decode_memory_mb << 20,
            pin_memory=ctx.device.type == "cuda",
            mp_context=mp_context,
        )
        pending: dict[int, tuple[list[int], list[np.ndarray]]] = {}
        bar = tqdm(total=len(items), unit="video", disable=not (progress and ctx.is_main))
        try:
            for chunk in loader:
                record = _take(chunk, features, protocol, ctx.device, pending, per_video, dim)
                if record is not None:
                    writer.add(record)
                    bar.update(1)
        finally:
            bar.close()
            writer.flush()  # finished videos survive an exception or Ctrl-C
        if pending:
            raise RuntimeError(f"videos {sorted(pending)} ended without their last views")
    ctx.barrier()  # every shard flushed
    summary: Any = None
    if ctx.is_main:
        summary = _finish(store, complete, entries, vlist, header)
    return ctx.broadcast(summary)


def _take(chunk, features, protocol, device, pending, per_video, dim) -> VideoRecord | None:
    """The record of a finished video, or None while its views are still coming."""
    vid = chunk.video_id
    if chunk.error:
        logger.error("video %d has no views: %s", vid, chunk.error)
        empty = np.zeros((0, dim), np.float32)
        return VideoRecord(vid, np.zeros(0, np.int16), empty, error=chunk.error)
    pixels = chunk.views.to(device, non_blocking=True).float()
    rows = features(protocol.normalise_(pixels))
    ids, parts = pending.setdefault(vid, ([], []))
    ids.extend(chunk.view_ids)
    parts.append(rows)
    if not chunk.last:
        return None
    del pending[vid]
    feats = np.concatenate(parts).astype(np.float32, copy=False)
    view_ids = np.asarray(ids, dtype=np.int16)
    finite = finite_rows(feats)
    error = ""
    if not finite.all():  # failed views: never written as features
        error = f"{_FAILED} {int((~finite).sum())} of {len(finite)} views had NaN/Inf (not written)"
        logger.error("video %d: %s", vid, error)
        feats, view_ids = feats[finite], view_ids[finite]
    if per_video and len(feats):
        feats = feats.astype(np.float64).mean(0, keepdims=True).astype(np.float32)
        view_ids = np.full(1, -1, np.int16)
    meta = chunk.meta
    return VideoRecord(vid, view_ids, feats, meta.num_frames, meta.height, meta.width, error)


def _finish(store, complete, entries, vlist, header) -> dict:
    counts = {"videos": 0, "rows": 0, "decode_errors": 0, "failed_views": 0, "failed_videos": 0}
    errors: list[dict] = []

    def on_record(rec: VideoRecord) -> None:
        counts["videos"] += 1
        counts["rows"] += rec.num_views
        failed = _FAILED_RE.match(rec.error)
        if failed:
            counts["failed_views"] += int(failed.group(1))
            counts["failed_videos"] += 1
        elif rec.error:
            counts["decode_errors"] += 1
            errors.append(
                {"video_id": rec.video_id, "path": entries[rec.video_id].path, "error": rec.error}
            )

    def summary() -> dict:
        return {
            "num_entries": len(entries),
            "num_bad_list_lines": sum(1 for e in entries if not e.ok),
            "num_videos": counts["videos"],
            "num_rows": counts["rows"],
            "num_decode_errors": counts["decode_errors"],
            "num_failed_views": counts["failed_views"],
            "num_videos_with_failed_views": counts["failed_videos"],
            "errors": errors,
            "layer": header["layer"],
            "feature_dim": header["feature_dim"],
            "precision": header["precision"],
        }

    if not complete:
        store.merge(
            [e.label for e in entries],
            [e.path for e in entries],
            [e.error for e in entries],
            on_record=on_record,
            report=summary,
        )
    else:
        logger.info("%s is complete: nothing to extract", store.path)
    with h5py.File(store.path, "r") as f:
        report = json.loads(f.attrs["report"])
    if "features" not in h5py.File(store.path, "r")["views"]:
        with h5py.File(store.path, "r+") as f:  # a convenience name for the rows
            f["views/features"] = h5py.SoftLink("/views/scores")
    report["output"] = store.path
    if report.get("num_failed_views"):
        logger.warning(
            "FAILED VIEWS: %d views in %d videos have NaN/Inf features and were not written; "
            "the weights or the numerics are broken",
            report["num_failed_views"],
            report["num_videos_with_failed_views"],
        )
    return report


def _version() -> str:
    from ..version import __version__

    return __version__
