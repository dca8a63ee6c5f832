"""Feature extraction for a whole video list (``vnl-extract``), on the one inference pipeline.

Every listed video is decoded once in DataLoader workers and cut into the original's test views
(:mod:`.runner`, as :func:`.evaluator.evaluate`); the model, prepared in a
:func:`.inference.prepare_for_inference` precision mode, gives per view the named layer's output
averaged over its space-time positions (``pool5``, the default, is the pooled res5 feature,
2048 values; :mod:`.layer_taps`). Rows go through :class:`.results.ResultsStore` with the
features schema, so the output has the crash safety of ``vnl-test``'s results (part files
written atomically, ``resume``, atomic final merge), and ``torchrun`` shards the videos.

Output file (``format = "nonlocal_net/features/v1"``), written in one pass::

    views/features    float32 (R, feature_dim)  the features, one row per view (or per video)
    views/video_id    int64   (R,)    video id (list line index) of each row
    views/view_index  int16   (R,)    view 10*ct + j; -1 for a per-video average
    videos/..., list/...              as in vnl-test's results (errors of bad videos included)
    attrs: format; header (JSON: layer, per_video, feature_dim, precision, protocol, weights,
           model_fingerprint, list, data_root, backend, decoding, cfg, version); report
           (the summary)

A run with no views (``limit=0``, an empty list, only undecodable videos) writes a valid file
with zero rows and a summary saying so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from ..core.config import cfg_to_dict
from ..datasets.decoders import decoding_signature
from ..datasets.protocol import TestProtocol
from ..utils.numeric import finite_rows
from .distributed import init_distributed
from .layer_taps import POOL5, FeatureTap, check_layer, feature_dim, layer_names
from .results import (
    FEATURES_SCHEMA,
    ResultsStore,
    VideoRecord,
    is_store_file,
    read_results_header,
)
from .runner import InferenceOptions, InferenceRunner, default_batch_size, run_views
from .runner_setup import (
    Destination,
    check_model_source,
    claim_outputs,
    label_range,
    load_test_model,
    my_items,
    package_version,
    prepare_model,
    read_entries,
    recorded_weights,
    refuse_outputs,
)

__all__ = [
    "FEATURES_FORMAT",
    "ExtractOptions",
    "LayerFeatures",
    "extract_features",
    "is_features_file",
    "layer_names",
]

logger = logging.getLogger(__name__)

FEATURES_FORMAT = FEATURES_SCHEMA.format
# the error text of a video some of whose views had NaN/Inf features (those rows not written);
# stored per video, so the counts survive --resume
_FAILED = "non-finite features:"
_FAILED_RE = re.compile(re.escape(_FAILED) + r" (\d+) of \d+ views")


def is_features_file(path: str) -> bool:
    """Whether ``path`` is a features file ``vnl-extract`` wrote (replaceable by a new run
    without ``--overwrite``, after ``--resume``/``--overwrite`` are chosen)."""
    return is_store_file(path, FEATURES_SCHEMA)


@dataclass
class ExtractOptions(InferenceOptions):
    """How :func:`extract_features` runs: the settings of :class:`.runner.InferenceOptions`
    plus ``layer`` (``pool5`` or a module name, :func:`.layer_taps.layer_names`) and
    ``per_video`` (one row per video, the mean over its views). A resumed run must use the
    same list, model, layer, ``per_video``, mode, data root, backend and decoding signature
    (:data:`.results.FEATURES_SCHEMA` ``.resume_keys``)."""

    layer: str = POOL5
    per_video: bool = False


class LayerFeatures:
    """What the extraction collects per view: ``layer``'s output averaged over its positions.

    A view whose row holds NaN/Inf is a *failed view*: ``finish`` drops its row and records
    the count in the video's error text (so the counts survive ``--resume``)."""

    def __init__(self, model: torch.nn.Module, layer: str, width: int, per_video: bool) -> None:
        self.tap = FeatureTap(model, layer)
        self.width = width
        self.per_video = per_video

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        return self.tap(pixels)

    def finish(self, record: VideoRecord) -> VideoRecord:
        if record.error:
            return record
        feats, view_ids = record.scores, record.view_ids
        finite = finite_rows(feats)
        error = ""
        if not finite.all():  # failed views: never written as features
            error = (
                f"{_FAILED} {int((~finite).sum())} of {len(finite)} views had NaN/Inf (not written)"
            )
            logger.error("video %d: %s", record.video_id, error)
            feats, view_ids = feats[finite], view_ids[finite]
        if self.per_video and len(feats):
            feats = feats.astype(np.float64).mean(0, keepdims=True).astype(np.float32)
            view_ids = np.full(1, -1, np.int16)
        return replace(record, view_ids=view_ids, scores=feats, error=error)


def extract_features(
    list_file: str | os.PathLike,
    weights: str | os.PathLike | None,
    output: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    options: ExtractOptions | None = None,
    **changes: Any,
) -> dict:
    """Extract ``layer`` features of every view of every video in ``list_file`` into ``output``.

    ``options`` (:class:`ExtractOptions`, defaults when omitted) say how; keyword ``changes``
    replace single fields (``extract_features(lst, w, out, layer="res4", workers=0)``).
    Returns a summary (videos, rows, decode errors with ``list:line``, bad list lines, failed
    views, feature size, layer, mode, output path), also stored in the file. Under
    ``torchrun`` every process returns the summary.

    ``output`` must not be an input (the list, the weights, a listed video; links resolved)
    nor an existing file that is not a features file (unless ``overwrite``); it is locked for
    the run (a second writer is refused). Nothing is created before the layer, the list and
    the precision mode are known to be usable.
    """
    opts = replace(options or ExtractOptions(), **changes)
    opts.validate()
    ctx = init_distributed(opts.device)
    try:
        with contextlib.ExitStack() as held:
            return _extract(ctx, held, list_file, weights, output, model, opts)
    finally:
        ctx.close()


def _header(vlist, entries, cfg, fingerprint, protocol, dim, weights, opts: ExtractOptions):
    """What a features file records about its run (compared on ``--resume``)."""
    return {
        "layer": opts.layer,
        "per_video": bool(opts.per_video),
        "feature_dim": dim,
        "precision": opts.precision,
        "list_file": os.path.abspath(vlist.source),
        "list_sha256": vlist.sha256,
        "num_entries": len(entries),
        "data_root": os.path.abspath(opts.data_root) if opts.data_root is not None else None,
        "weights": recorded_weights(weights),
        "model_fingerprint": fingerprint,
        "cfg": cfg_to_dict(cfg),
        "views_per_video": 1 if opts.per_video else protocol.num_views,
        "protocol": asdict(protocol),
        "backend": opts.backend,
        "decoding": decoding_signature(opts.backend),
        "channels_last": bool(opts.channels_last),
        "version": package_version(),
    }


def _extract(ctx, held, list_file, weights, output, model, opts: ExtractOptions) -> dict:
    outputs = [Destination(os.fspath(output), "features file", is_features_file)]
    inputs = [list_file, weights]
    # everything checkable before the first expensive step, building the model
    check_model_source(weights, model, opts.overrides, opts.backend, "extract_features")
    vlist, entries = read_entries(list_file, opts.data_root, opts.limit)
    ctx.on_main(lambda: refuse_outputs(outputs, inputs, vlist, opts.overwrite))
    model = load_test_model(weights, model, opts.overrides)
    cfg = model.cfg
    check_layer(model, opts.layer, opts.precision, opts.compile)
    protocol = TestProtocol.from_cfg(cfg)
    dim = feature_dim(cfg, opts.layer, protocol)
    vlist, entries = label_range(vlist, cfg.MODEL.NUM_CLASSES, opts.limit)
    model, fingerprint = prepare_model(model, ctx.device, opts, record_layers=[opts.layer])
    rows = LayerFeatures(model, opts.layer, dim, opts.per_video)
    batch_size = opts.batch_size or default_batch_size(cfg)
    header = _header(vlist, entries, cfg, fingerprint, protocol, dim, weights, opts)
    store = ResultsStore(output, header, FEATURES_SCHEMA)
    complete, done = claim_outputs(
        ctx,
        held,
        outputs,
        inputs,
        vlist,
        opts.overwrite,
        then=lambda: store.prepare(opts.resume, opts.overwrite),
    )
    num_todo, items = my_items([] if complete else entries, vlist, done, ctx)
    logger.info(
        "%d list entries, %d to extract (%d here), layer %s (%d values), %s, precision %s",
        len(entries),
        num_todo,
        len(items),
        opts.layer,
        dim,
        "one row per video" if opts.per_video else f"{protocol.num_views} views per video",
        opts.precision,
    )
    writer = store.writer(ctx.rank, opts.flush_every, opts.flush_seconds)
    where = lambda vid: vlist.where(vlist.entries[vid])  # noqa: E731
    progress = "video" if opts.progress and ctx.is_main else None
    runner = InferenceRunner(rows, protocol, ctx.device, writer.add, where, progress)
    try:
        run_views(runner, items, batch_size, opts)
    finally:
        writer.flush()  # finished videos survive an exception or Ctrl-C
    ctx.barrier()  # every shard flushed
    summary: Any = None
    if ctx.is_main:
        summary = _finish(store, complete, entries, vlist)
    return ctx.broadcast(summary)


def _finish(store: ResultsStore, complete: bool, entries, vlist) -> dict:
    """Merge the parts into the features file, its summary computed in the same pass (or the
    summary stored in a file that was already complete)."""
    header = store.header
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
            entry = vlist.entries[rec.video_id]
            errors.append(
                {
                    "video_id": rec.video_id,
                    "where": vlist.where(entry),
                    "path": entry.path,
                    "error": rec.error,
                }
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

    if complete:
        logger.info("%s is complete: nothing to extract", store.path)
        report = read_results_header(store.path, FEATURES_SCHEMA)[1] or {}
    else:
        store.merge(
            [e.label for e in entries],
            [e.path for e in entries],
            [e.error for e in entries],
            on_record=on_record,
            report=summary,
        )
        report = summary()
    report["output"] = store.path
    if report.get("num_failed_views"):
        logger.warning(
            "FAILED VIEWS: %d views in %d videos have NaN/Inf features and were not written; "
            "the weights or the numerics are broken",
            report["num_failed_views"],
            report["num_videos_with_failed_views"],
        )
    if not report.get("num_rows"):
        logger.warning(
            "no views: nothing was extracted (%d list entries, %d bad list lines, %d "
            "undecodable videos); %s has no rows",
            report["num_entries"],
            report["num_bad_list_lines"],
            report["num_decode_errors"],
            store.path,
        )
    return report
