"""Kinetics evaluation exactly as the original's ``tools/test_net_video.py``.

:func:`evaluate` runs the test-split model on the 30 views of every listed video, decoding each
video once in DataLoader workers, and returns the original's report (:mod:`.metrics`) plus
throughput. Per-view scores can be kept in a crash-safe, resumable HDF5 file
(:mod:`.results`); under ``torchrun`` the videos are sharded across processes
(:mod:`.distributed`). :func:`score_results` re-scores a results file without the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..core.config import cfg_to_dict
from ..datasets.decoders import available_backends
from ..datasets.protocol import TestProtocol
from ..datasets.stream import (
    VideoItem,
    ViewChunk,
    view_loader,
)
from ..datasets.video_list import VideoList, read_video_list
from ..pretrained import load_model  # a weights file or a released model's name
from ..utils.io import atomic_write, check_destination
from ..utils.lock import output_lock
from .distributed import DistContext, init_distributed, shard
from .inference import PRECISIONS, prepare_for_inference
from .metrics import VideoOutcome, compute_report, video_outcome
from .results import (
    ResultsError,
    ResultsStore,
    VideoRecord,
    is_results_file,
    iter_result_records,
    read_list_entries,
)

__all__ = [
    "EvalOptions",
    "default_batch_size",
    "evaluate",
    "is_report_file",
    "model_fingerprint",
    "score_results",
]

logger = logging.getLogger(__name__)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's state (names, dtypes, shapes, values): identifies the weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def default_batch_size(cfg) -> int:
    """The original's per-GPU test batch, ``TEST.BATCH_SIZE / NUM_GPUS`` (8 for the 8-GPU
    configs, 2 for the affine 32x4/128x1 models)."""
    return max(1, cfg.TEST.BATCH_SIZE // max(1, cfg.NUM_GPUS))


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


class _Run:
    """One process's share of an evaluation: stream chunks, score them, record videos."""

    def __init__(
        self, model, protocol, device, labels, num_classes, writer, progress: bool
    ) -> None:
        self.model = model
        self.num_classes = num_classes
        self.protocol = protocol
        self.device = device
        self.labels = labels
        self.writer = writer
        self.progress = progress
        self.pending: dict[int, tuple[list[int], list[np.ndarray]]] = {}
        self.outcomes: dict[int, VideoOutcome] = {}
        self.decode_errors: list[tuple[int, str]] = []
        self.stats = dict.fromkeys(
            ("videos", "views", "decode_seconds", "prepare_seconds", "model_seconds"), 0
        )
        self.stats.update(wait_seconds=0.0, wall_seconds=0.0, startup_seconds=0.0)

    def score(self, views: torch.Tensor) -> np.ndarray:
        """Per-view scores of uint8 views, normalised on the device."""
        start = time.perf_counter()
        with torch.inference_mode():
            pixels = views.to(self.device, non_blocking=True).float()
            out = self.model(self.protocol.normalise_(pixels))
        scores = out.float().cpu().numpy()
        self.stats["model_seconds"] += time.perf_counter() - start
        if scores.shape != (views.shape[0], self.num_classes):
            raise RuntimeError(
                f"the model returned {tuple(out.shape)} for {views.shape[0]} views; expected "
                f"({views.shape[0]}, {self.num_classes}): is it the test-split model?"
            )
        return scores

    def finish_video(self, record: VideoRecord) -> None:
        if self.writer is not None:
            self.writer.add(record)
        self.outcomes[record.video_id] = video_outcome(
            record.video_id,
            self.labels[record.video_id],
            record.view_ids,
            record.scores,
            self.protocol.num_views,
        )
        self.stats["videos"] += 1
        self.stats["views"] += record.num_views

    def handle(self, chunk: ViewChunk, where: str) -> bool:
        """Process one chunk; True when it completed a video."""
        vid = chunk.video_id
        if chunk.error:
            logger.error("video %d (%s) has no views: %s", vid, where, chunk.error)
            self.decode_errors.append((vid, chunk.error))
            empty = np.zeros((0, self.num_classes), np.float32)
            self.finish_video(VideoRecord(vid, np.zeros(0, np.int16), empty, error=chunk.error))
            return True
        scores = self.score(chunk.views)
        self.stats["prepare_seconds"] += chunk.prepare_seconds
        ids, rows = self.pending.setdefault(vid, ([], []))
        ids.extend(chunk.view_ids)
        rows.append(scores)
        if not chunk.last:
            return False
        del self.pending[vid]
        meta = chunk.meta
        self.stats["decode_seconds"] += meta.decode_seconds + meta.resize_seconds
        self.finish_video(
            VideoRecord(
                vid,
                np.asarray(ids, dtype=np.int16),
                np.concatenate(rows).astype(np.float32, copy=False),
                meta.num_frames,
                meta.height,
                meta.width,
            )
        )
        return True

    def run(self, loader: Iterable[ViewChunk], total: int, vlist: VideoList) -> None:
        start = time.perf_counter()
        bar = tqdm(total=total, unit="video", disable=not self.progress, dynamic_ncols=True)
        try:
            iterator = iter(loader)
            while True:
                t0 = time.perf_counter()
                chunk = next(iterator, None)
                self.stats["wait_seconds"] += time.perf_counter() - t0
                if chunk is None:
                    break
                if not self.stats["startup_seconds"]:  # workers started, first video decoded
                    self.stats["startup_seconds"] = time.perf_counter() - start
                if self.handle(chunk, vlist.where(vlist.entries[chunk.video_id])):
                    bar.update(1)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(clips_s=f"{self.stats['views'] / max(elapsed, 1e-9):.1f}")
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.flush()  # finished videos survive an exception or Ctrl-C
            self.stats["wall_seconds"] = time.perf_counter() - start
        if self.pending:
            raise RuntimeError(f"videos {sorted(self.pending)} ended without their last views")


def _header(
    vlist, num_entries, cfg, fingerprint, protocol, weights, backend, data_root, channels_last
) -> dict:
    return {
        "list_file": os.path.abspath(vlist.source),
        "list_sha256": vlist.sha256,
        "num_entries": num_entries,
        "data_root": os.fspath(data_root) if data_root is not None else None,
        "weights": os.path.abspath(os.fspath(weights)) if weights is not None else None,
        "model_fingerprint": fingerprint,
        "cfg": cfg_to_dict(cfg),
        "num_classes": int(cfg.MODEL.NUM_CLASSES),
        "views_per_video": protocol.num_views,
        "protocol": asdict(protocol),
        "backend": backend,
        "channels_last": bool(channels_last),
        "version": _version(),
    }


def _version() -> str:
    from ..version import __version__

    return __version__


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
class EvalOptions:
    """How :func:`evaluate` runs (everything but the list, the weights and the model).

    ``results``: HDF5 file of per-view scores (crash-safe; ``resume`` continues an interrupted
    run, ``overwrite`` starts again and allows replacing a file that is not a results file).
    ``report_path``: JSON report (default ``<results>.report.json`` when ``results`` is given).
    ``batch_size``: views per forward pass (default ``TEST.BATCH_SIZE / NUM_GPUS``, the
    original's per-GPU batch); batches never mix videos. ``limit``: only the first ``limit``
    list entries (and the metrics over those). ``channels_last`` / ``allow_tf32``: see
    :func:`.inference.prepare_for_inference`; a resumed run must use the same decoding
    ``backend`` and ``channels_last`` as the run it continues. ``precision`` / ``compile``: see
    :func:`.inference.prepare_for_inference` (``strict``, the default, is the original's
    arithmetic); recorded in the results file and the report, and a resumed run must use the
    same mode. ``workers`` decoding processes are started
    with ``mp_context`` ("spawn": a script that calls :func:`evaluate` at import time needs the
    usual ``if __name__ == "__main__":`` guard). ``flush_every`` videos or ``flush_seconds``
    seconds per results part; ``decode_memory_mb``: RGB frames a worker keeps from one decode.
    """

    overrides: Sequence[str] = ()
    data_root: str | os.PathLike | None = None
    results: str | os.PathLike | None = None
    resume: bool = False
    overwrite: bool = False
    report_path: str | os.PathLike | None = None
    batch_size: int | None = None
    workers: int = 2
    limit: int | None = None
    backend: str = "opencv"
    device: str | None = None
    flush_every: int = 16
    flush_seconds: float = 60.0
    decode_memory_mb: int = 1024
    progress: bool = True
    allow_tf32: bool = False
    channels_last: bool = True
    mp_context: str = "spawn"
    precision: str = "strict"
    compile: bool = False

    def validate(self) -> None:
        """Refuse values no run can use (``ValueError`` naming the option)."""
        checks = (
            ("batch_size", self.batch_size is None or _int_at_least(self.batch_size, 1)),
            ("workers", _int_at_least(self.workers, 0)),
            ("limit", self.limit is None or _int_at_least(self.limit, 0)),
            ("flush_every", _int_at_least(self.flush_every, 1)),
            ("decode_memory_mb", _int_at_least(self.decode_memory_mb, 1)),
            (
                "flush_seconds",
                isinstance(self.flush_seconds, (int, float))
                and math.isfinite(self.flush_seconds)
                and self.flush_seconds > 0,
            ),
        )
        for name, ok in checks:
            if not ok:
                raise ValueError(f"invalid {name}: {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"invalid precision: {self.precision!r} (one of {PRECISIONS})")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")


def _int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


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
    share) and the run's settings. The results and report files are locked for the run (a
    second writer is refused) and must not be any input. Under ``torchrun`` the videos are
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


def _claim_outputs(held, list_file, weights, results, report, data_root, overwrite) -> None:
    """Refuse outputs that are inputs or foreign files, then lock them for this run."""
    inputs = [list_file, weights]
    if results is not None:
        check_destination(
            results,
            inputs,
            what="results file",
            is_own_output=is_results_file,
            replace_foreign=overwrite,
        )
    if report is not None:
        check_destination(
            report,
            [*inputs, results],
            what="report file",
            is_own_output=is_report_file,
            replace_foreign=overwrite,
        )
    held.enter_context(output_lock(results, report))


def _evaluate(
    ctx: DistContext, held: contextlib.ExitStack, list_file, weights, model, opts: EvalOptions
) -> dict:
    overrides, data_root, results = opts.overrides, opts.data_root, opts.results
    resume, overwrite, batch_size = opts.resume, opts.overwrite, opts.batch_size
    workers, limit, backend = opts.workers, opts.limit, opts.backend
    report_path = _check_report_path(opts.report_path, results)
    claimed: Any = None
    if ctx.is_main:
        try:
            _claim_outputs(held, list_file, weights, results, report_path, data_root, overwrite)
        except OSError as e:
            claimed = e
    claimed = ctx.broadcast(claimed)
    if claimed is not None:
        raise claimed if isinstance(claimed, OSError) else ResultsError(str(claimed))
    if backend not in available_backends():
        raise ValueError(
            f"video backend {backend!r} is not available (have {available_backends()})"
        )
    if model is None:
        if weights is None:
            raise ValueError("evaluate() needs weights (a converted .pt file) or a model")
        model = load_model(weights, split="test", overrides=overrides)
    elif overrides:
        raise ValueError("overrides apply to weights loaded from a file, not to a given model")
    cfg = model.cfg
    fingerprint = model_fingerprint(model)  # of the weights as given, before any folding
    model = prepare_for_inference(
        model,
        ctx.device,
        opts.precision,
        opts.compile,
        channels_last=opts.channels_last,
        allow_tf32=opts.allow_tf32,
    )
    protocol = TestProtocol.from_cfg(cfg)
    batch_size = batch_size or default_batch_size(cfg)
    vlist = read_video_list(list_file, data_root, num_classes=cfg.MODEL.NUM_CLASSES)
    num_entries = len(vlist) if limit is None else min(limit, len(vlist))
    entries = vlist.entries[:num_entries]
    labels = [e.label for e in entries]
    header = _header(
        vlist,
        num_entries,
        cfg,
        fingerprint,
        protocol,
        weights,
        backend,
        data_root,
        opts.channels_last,
    )
    header["precision"] = opts.precision

    store = ResultsStore(results, header) if results is not None else None
    complete, done = store.prepare_on_main(ctx, resume, overwrite) if store else (False, set())

    todo = [] if complete else [e for e in entries if e.ok and e.video_id not in done]
    mine = shard(todo, ctx.rank, ctx.world_size)
    items = [VideoItem(e.video_id, vlist.resolve(e)) for e in mine]
    logger.info(
        "%d list entries, %d to evaluate (%d on this process), %d views each, batch %d, "
        "%d workers, %s decoder, device %s",
        num_entries,
        len(todo),
        len(items),
        protocol.num_views,
        batch_size,
        workers,
        backend,
        ctx.device,
    )
    writer = (
        store.writer(ctx.rank, cfg.MODEL.NUM_CLASSES, opts.flush_every, opts.flush_seconds)
        if store is not None and not complete
        else None
    )
    run = _Run(
        model,
        protocol,
        ctx.device,
        labels,
        cfg.MODEL.NUM_CLASSES,
        writer,
        opts.progress and ctx.is_main,
    )
    if items:
        loader = view_loader(
            items,
            protocol,
            batch_size,
            backend,
            workers=workers,
            memory_budget=opts.decode_memory_mb << 20,
            pin_memory=ctx.device.type == "cuda",
            mp_context=opts.mp_context,
        )
        run.run(loader, len(items), vlist)
    ctx.barrier()  # every shard flushed
    all_stats = ctx.all_gather(run.stats)

    report: Any = None
    if store is not None:
        if ctx.is_main:
            report = _report_from_store(store, complete, labels, protocol, vlist, all_stats)
    else:
        gathered = ctx.all_gather((run.outcomes, run.decode_errors))
        if ctx.is_main:
            outcomes: dict[int, VideoOutcome] = {}
            errors: list[tuple[int, str]] = []
            for part_outcomes, part_errors in gathered:
                outcomes.update(part_outcomes)
                errors += part_errors
            report = _finish_report(labels, outcomes, protocol.num_views, vlist, errors)
            report["throughput"] = _throughput(all_stats)
    if ctx.is_main:
        report.update(
            _settings(vlist, weights, results, protocol, batch_size, workers, backend, ctx, limit)
        )
        report["precision"] = opts.precision
        _warn_failed_views(report)
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


def _settings(vlist, weights, results, protocol, batch_size, workers, backend, ctx, limit):
    return {
        "list_file": os.path.abspath(vlist.source),
        "weights": os.path.abspath(os.fspath(weights)) if weights is not None else None,
        "results": os.path.abspath(os.fspath(results)) if results is not None else None,
        "protocol": asdict(protocol),
        "batch_size": batch_size,
        "workers": workers,
        "backend": backend,
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        "limit": limit,
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
