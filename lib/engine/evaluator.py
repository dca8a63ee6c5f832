"""Kinetics evaluation exactly as the original's ``tools/test_net_video.py``.

:func:`evaluate` runs the test-split model on the 30 views of every listed video, decoding each
video once in DataLoader workers, and returns the original's report (:mod:`.metrics`) plus
throughput. Per-view scores can be kept in a crash-safe, resumable HDF5 file
(:mod:`.results`); under ``torchrun`` the videos are sharded across processes
(:mod:`.distributed`). :func:`score_results` re-scores a results file without the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from ..core.config import cfg_to_dict
from ..datasets.decoders import decoding_signature
from ..datasets.protocol import TestProtocol
from ..datasets.video_list import VideoList, read_video_list
from ..utils.io import atomic_write
from .distributed import DistContext, init_distributed
from .metrics import VideoOutcome, compute_report, video_outcome
from .results import (
    ResultsError,
    ResultsStore,
    VideoRecord,
    is_results_file,
    iter_result_records,
    read_list_entries,
)
from .runner import InferenceOptions, InferenceRunner, default_batch_size, run_views
from .runner_setup import (
    Destination,
    check_model_source,
    claim_outputs,
    label_range,
    load_test_model,
    model_fingerprint,
    my_items,
    package_version,
    prepare_model,
    read_entries,
    recorded_weights,
    refuse_outputs,
)

__all__ = [
    "ClassScores",
    "EvalOptions",
    "default_batch_size",
    "evaluate",
    "is_report_file",
    "model_fingerprint",
    "score_results",
]

logger = logging.getLogger(__name__)


def _errors_of(vlist: VideoList, records: Iterable[tuple[int, str]]) -> list[dict]:
    errors = [
        {"video_id": e.video_id, "where": vlist.where(e), "path": e.path, "error": e.error}
        for e in vlist.entries
        if not e.ok
    ]
    for vid, message in records:
        entry = vlist.entries[vid]
        errors.append(
            {"video_id": vid, "where": vlist.where(entry), "path": entry.path, "error": message}
        )
    return sorted(errors, key=lambda e: e["video_id"])


def _finish_report(
    labels: Sequence[int],
    outcomes: Mapping[int, VideoOutcome],
    views_per_video: int,
    vlist: VideoList,
    decode_errors: list[tuple[int, str]],
) -> dict:
    report = compute_report(labels, outcomes, views_per_video)
    report["num_bad_list_lines"] = sum(1 for e in vlist.entries[: len(labels)] if not e.ok)
    report["num_decode_errors"] = len(decode_errors)
    report["errors"] = [e for e in _errors_of(vlist, decode_errors) if e["video_id"] < len(labels)]
    return report


def _throughput(stats: list[dict]) -> dict:
    total = {k: sum(s[k] for s in stats) for k in stats[0]}
    wall = max(s["wall_seconds"] for s in stats)
    work = total["decode_seconds"] + total["prepare_seconds"] + total["model_seconds"]
    wait = total["wait_seconds"]
    return {
        "world_size": len(stats),
        "videos": total["videos"],
        "views": total["views"],
        "wall_seconds": wall,
        "startup_seconds": max(s["startup_seconds"] for s in stats),
        "videos_per_second": total["videos"] / wall if wall > 0 else math.nan,
        "clips_per_second": total["views"] / wall if wall > 0 else math.nan,
        "decode_seconds": total["decode_seconds"],
        "prepare_seconds": total["prepare_seconds"],
        "model_seconds": total["model_seconds"],
        "data_wait_seconds": wait,
        "decode_share": total["decode_seconds"] / work if work > 0 else math.nan,
        "data_wait_share": wait / sum(s["wall_seconds"] for s in stats) if wall > 0 else math.nan,
    }


class ClassScores:
    """What the evaluation collects per view: the test-split model's class scores."""

    def __init__(self, model: torch.nn.Module, num_classes: int) -> None:
        self.model = model
        self.width = num_classes

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(pixels)
        scores = out.float().cpu().numpy()
        if scores.shape != (pixels.shape[0], self.width):
            raise ValueError(
                f"the model returned {tuple(out.shape)} for {pixels.shape[0]} views; expected "
                f"({pixels.shape[0]}, {self.width}): is it the test-split model?"
            )
        return scores

    def finish(self, record: VideoRecord) -> VideoRecord:
        return record


class _Outcomes:
    """The evaluation's sink: every finished video to the part writer (if any) and scored."""

    def __init__(self, labels: Sequence[int], views_per_video: int, writer) -> None:
        self.labels = labels
        self.views_per_video = views_per_video
        self.writer = writer
        self.outcomes: dict[int, VideoOutcome] = {}
        self.decode_errors: list[tuple[int, str]] = []

    def __call__(self, record: VideoRecord) -> None:
        if self.writer is not None:
            self.writer.add(record)
        vid = record.video_id
        self.outcomes[vid] = video_outcome(
            vid, self.labels[vid], record.view_ids, record.scores, self.views_per_video
        )
        if record.error:
            self.decode_errors.append((vid, record.error))


def _header(vlist, entries, cfg, fingerprint, protocol, weights, opts: EvalOptions) -> dict:
    """What a results file records about its run (compared on ``--resume``)."""
    return {
        "list_file": os.path.abspath(vlist.source),
        "list_sha256": vlist.sha256,
        "num_entries": len(entries),
        "data_root": os.path.abspath(opts.data_root) if opts.data_root is not None else None,
        "weights": recorded_weights(weights),
        "model_fingerprint": fingerprint,
        "cfg": cfg_to_dict(cfg),
        "num_classes": int(cfg.MODEL.NUM_CLASSES),
        "views_per_video": protocol.num_views,
        "protocol": asdict(protocol),
        "backend": opts.backend,
        "decoding": decoding_signature(opts.backend),
        "channels_last": bool(opts.channels_last),
        "precision": opts.precision,
        "version": package_version(),
    }


def _check_report_path(report_path, results) -> str | None:
    if report_path is not None:
        return os.fspath(report_path)
    if results is not None:
        root, _ = os.path.splitext(os.fspath(results))
        return root + ".report.json"
    return None


def write_report(path: str | os.PathLike, report: Mapping) -> None:
    """The report as JSON (atomic; NaN written as null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    with atomic_write(path, "w") as f:
        json.dump(clean(report), f, indent=1, sort_keys=True)
        f.write("\n")


@dataclass
class EvalOptions(InferenceOptions):
    """How :func:`evaluate` runs (everything but the list, the weights and the model): the
    settings of :class:`.runner.InferenceOptions` plus

    ``results``: HDF5 file of per-view scores (crash-safe; ``resume`` continues an interrupted
    run, ``overwrite`` starts again and allows replacing a file that is not a results file).
    ``report_path``: JSON report (default ``<results>.report.json`` when ``results`` is given).
    A resumed run must use the same list, weights and config, data root, decoding ``backend``
    and decoding signature (:func:`..datasets.decoders.decoding_signature`), ``channels_last``
    and ``precision`` as the run it continues (:data:`.results.RESUME_KEYS`); a refusal names
    the first setting that differs.
    """

    results: str | os.PathLike | None = None
    report_path: str | os.PathLike | None = None


def evaluate(
    list_file: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    *,
    model: torch.nn.Module | None = None,
    options: EvalOptions | None = None,
    **changes: Any,
) -> dict:
    """Evaluate a converted checkpoint (``weights``) or a test-split ``model`` on ``list_file``.

    ``options`` (:class:`EvalOptions`, default values when omitted) say how; keyword
    ``changes`` replace single fields (``evaluate(lst, w, results="r.h5", workers=0)``).
    Returns the report (also written as JSON to ``options.report_path``): the original's
    metrics (:func:`.metrics.compute_report`, failed views included), ``errors`` (bad list
    lines and undecodable videos with ``file:line``), ``throughput`` (videos/s, clips/s, decode
    share) and the run's settings. A run with no views (``limit=0``, an empty list, only
    undecodable videos) gives a valid report with ``num_views`` 0 (and a results file with no
    rows). The results and report files are locked for the run (a second writer is refused)
    and must not be any input, listed videos included. Under ``torchrun`` the videos are
    sharded across the processes; every process returns the same report.
    """
    opts = replace(options or EvalOptions(), **changes)
    opts.validate()
    ctx = init_distributed(opts.device)
    try:
        with contextlib.ExitStack() as held:
            return _evaluate(ctx, held, list_file, weights, model, opts)
    finally:
        ctx.close()


def is_report_file(path: str) -> bool:
    """Whether ``path`` is a JSON report this package wrote (replaceable without --overwrite)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(1 << 16)
        data = json.loads(head) if len(head) < 1 << 16 else None
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "top1_accuracy" in data and "num_entries" in data


def _destinations(results, report_path) -> list[Destination]:
    found = []
    if results is not None:
        found.append(Destination(os.fspath(results), "results file", is_results_file))
    if report_path is not None:
        found.append(Destination(os.fspath(report_path), "report file", is_report_file))
    return found


def _evaluate(
    ctx: DistContext, held: contextlib.ExitStack, list_file, weights, model, opts: EvalOptions
) -> dict:
    report_path = _check_report_path(opts.report_path, opts.results)
    outputs = _destinations(opts.results, report_path)
    inputs = [list_file, weights]
    # everything checkable before the first expensive step, building the model
    check_model_source(weights, model, opts.overrides, opts.backend, "evaluate")
    vlist, entries = read_entries(list_file, opts.data_root, opts.limit)
    ctx.on_main(lambda: refuse_outputs(outputs, inputs, vlist, opts.overwrite))
    model = load_test_model(weights, model, opts.overrides)
    cfg = model.cfg
    vlist, entries = label_range(vlist, cfg.MODEL.NUM_CLASSES, opts.limit)
    model, fingerprint = prepare_model(model, ctx.device, opts)
    protocol = TestProtocol.from_cfg(cfg)
    batch_size = opts.batch_size or default_batch_size(cfg)
    labels = [e.label for e in entries]
    header = _header(vlist, entries, cfg, fingerprint, protocol, weights, opts)
    store = ResultsStore(opts.results, header) if opts.results is not None else None
    prepare = (lambda: store.prepare(opts.resume, opts.overwrite)) if store else None
    state = claim_outputs(ctx, held, outputs, inputs, vlist, opts.overwrite, then=prepare)
    complete, done = state if store else (False, set())
    num_todo, items = my_items([] if complete else entries, vlist, done, ctx)
    logger.info(
        "%d list entries, %d to evaluate (%d on this process), %d views each, batch %d, "
        "%d workers, %s decoder, device %s",
        len(entries),
        num_todo,
        len(items),
        protocol.num_views,
        batch_size,
        opts.workers,
        opts.backend,
        ctx.device,
    )
    writer = store.writer(ctx.rank, opts.flush_every, opts.flush_seconds) if store else None
    sink = _Outcomes(labels, protocol.num_views, writer if not complete else None)
    runner = InferenceRunner(
        ClassScores(model, cfg.MODEL.NUM_CLASSES),
        protocol,
        ctx.device,
        sink,
        lambda vid: vlist.where(vlist.entries[vid]),
        "video" if opts.progress and ctx.is_main else None,
    )
    try:
        stats = run_views(runner, items, batch_size, opts)
    finally:
        if sink.writer is not None:
            sink.writer.flush()  # finished videos survive an exception or Ctrl-C
    ctx.barrier()  # every shard flushed
    all_stats = ctx.all_gather(stats)

    report: Any = None
    if store is not None:
        if ctx.is_main:
            report = _report_from_store(store, complete, labels, protocol, vlist, all_stats)
    else:
        gathered = ctx.all_gather((sink.outcomes, sink.decode_errors))
        if ctx.is_main:
            outcomes: dict[int, VideoOutcome] = {}
            errors: list[tuple[int, str]] = []
            for part_outcomes, part_errors in gathered:
                outcomes.update(part_outcomes)
                errors += part_errors
            report = _finish_report(labels, outcomes, protocol.num_views, vlist, errors)
            report["throughput"] = _throughput(all_stats)
    if ctx.is_main:
        report.update(_settings(vlist, weights, opts, protocol, batch_size, ctx))
        _warn_failed_views(report)
        _warn_no_views(report)
        if report_path is not None:
            write_report(report_path, report)
            report["report_file"] = os.path.abspath(report_path)
            logger.info("report written to %s", report_path)
    return ctx.broadcast(report)


def _warn_failed_views(report: Mapping) -> None:
    if report.get("num_failed_views"):
        logger.warning(
            "%d views in %d videos have NaN/Inf scores: counted as failed (never correct); "
            "the weights or the numerics are broken",
            report["num_failed_views"],
            report["num_videos_with_failed_views"],
        )


def _warn_no_views(report: Mapping) -> None:
    if not report.get("num_views"):
        logger.warning(
            "no views: nothing was evaluated (%d list entries, %d bad list lines, %d "
            "undecodable videos); the report has no accuracy",
            report["num_entries"],
            report.get("num_bad_list_lines", 0),
            report.get("num_decode_errors", 0),
        )


def _settings(vlist, weights, opts: EvalOptions, protocol, batch_size, ctx) -> dict:
    return {
        "list_file": os.path.abspath(vlist.source),
        "weights": recorded_weights(weights),
        "results": os.path.abspath(os.fspath(opts.results)) if opts.results is not None else None,
        "protocol": asdict(protocol),
        "batch_size": batch_size,
        "workers": opts.workers,
        "backend": opts.backend,
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        "limit": opts.limit,
        "precision": opts.precision,
    }


def _report_from_store(store, complete, labels, protocol, vlist, all_stats) -> dict:
    """Merge the parts (unless the final file already exists) and score the final file."""
    throughput = _throughput(all_stats)
    if not complete:
        outcomes: dict[int, VideoOutcome] = {}
        errors: list[tuple[int, str]] = []

        def on_record(rec: VideoRecord) -> None:
            outcomes[rec.video_id] = video_outcome(
                rec.video_id, labels[rec.video_id], rec.view_ids, rec.scores, protocol.num_views
            )
            if rec.error:
                errors.append((rec.video_id, rec.error))

        def make_report() -> dict:
            report = _finish_report(labels, outcomes, protocol.num_views, vlist, errors)
            report["throughput"] = throughput
            return report

        entries = vlist.entries[: len(labels)]
        store.merge(
            labels,
            [e.path for e in entries],
            [e.error for e in entries],
            on_record=on_record,
            report=make_report,
        )
        return make_report()
    logger.info("%s is complete: scoring it without running the model", store.path)
    report = score_results(store.path, vlist.source, vlist.data_root, _vlist=vlist)
    report["throughput"] = throughput
    return report


def score_results(
    results: str | os.PathLike,
    list_file: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    *,
    _vlist: VideoList | None = None,
) -> dict:
    """The original's report from a results file (no model). Labels come from ``list_file``
    (must have at least the file's number of entries), else from the file itself. Also accepts
    the ``.parts`` folder of an interrupted run (``complete`` is then False)."""
    header, records, complete = iter_result_records(results)
    num_entries = int(header["num_entries"])
    views_per_video = int(header["views_per_video"])
    if _vlist is None and list_file is None:
        if complete:
            _vlist = read_list_entries(results, header)
        else:
            list_file = header["list_file"]
    vlist = _vlist or read_video_list(list_file, data_root, num_classes=header["num_classes"])
    if vlist.sha256 != header["list_sha256"]:
        logger.warning(
            "%s differs from the list the results were computed with (%s)",
            vlist.source,
            header["list_file"],
        )
    if len(vlist) < num_entries:
        raise ValueError(
            f"{vlist.source} has {len(vlist)} entries; the results cover {num_entries}"
        )
    labels = [e.label for e in vlist.entries[:num_entries]]
    outcomes: dict[int, VideoOutcome] = {}
    errors: list[tuple[int, str]] = []
    for rec in records:
        if rec.video_id >= num_entries:
            raise ResultsError(f"{results}: video id {rec.video_id} beyond {num_entries} entries")
        outcomes[rec.video_id] = video_outcome(
            rec.video_id, labels[rec.video_id], rec.view_ids, rec.scores, views_per_video
        )
        if rec.error:
            errors.append((rec.video_id, rec.error))
    report = _finish_report(labels, outcomes, views_per_video, vlist, errors)
    _warn_failed_views(report)
    report["complete"] = complete
    report["results"] = os.path.abspath(os.fspath(results))
    if not complete:
        logger.warning(
            "%s is a partial run: %d of %d videos recorded", results, len(outcomes), num_entries
        )
    return report
