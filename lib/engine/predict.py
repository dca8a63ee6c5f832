"""Classify one video with the original's 30-view test, optionally extracting features.

The video goes through the one inference pipeline (:mod:`.runner`), as a list of one video:
decoded once, the same decoding and the same batches as ``vnl-test``, so the scores equal the
evaluation's for that video. The video score is the original's: the per-view averaged softmax
summed over the views; it is reported divided by the number of views (a probability; the
ranking is the same). Features are the pool5 output of every view averaged over its positions
(``(views, 2048)``, rows in view order ``10*ct + j``), what downstream users extract from the
backbone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..datasets.protocol import TestProtocol
from ..datasets.stream import VideoItem
from ..datasets.views import VideoMeta
from ..utils.device import default_device
from .layer_taps import POOL5, feature_dim
from .results import VideoRecord
from .runner import InferenceRunner, default_batch_size, run_views
from .runner_setup import check_model_source, load_test_model, prepare_model

__all__ = ["PredictOptions", "Prediction", "predict_video"]


@dataclass
class Prediction:
    """What :func:`predict_video` found."""

    scores: np.ndarray  # (K,) mean over views of the per-view averaged softmax
    view_scores: np.ndarray  # (views, K)
    topk: list[tuple[int, float]]  # (class index, score), best first
    features: np.ndarray | None  # (views, 2048) pooled res5 features, if asked for
    meta: VideoMeta


@dataclass
class PredictOptions:
    """How :func:`predict_video` runs. ``features``: also keep every view's pool5 features.
    ``progress``: a bar counting views. ``precision``/``compile``/``channels_last``: see
    :func:`.inference.prepare_for_inference`; ``backend``/``decode_memory_mb`` as in
    ``vnl-test`` (the video is decoded in this process, ``workers`` 0)."""

    overrides: Sequence[str] = ()
    backend: str = "opencv"
    batch_size: int | None = None
    device: str | torch.device | None = None
    topk: int = 5
    features: bool = False
    channels_last: bool = True
    precision: str = "strict"
    compile: bool = False
    progress: bool = False
    decode_memory_mb: int = 1024
    workers: int = 0
    mp_context: str = "spawn"


class ScoresAndPool5:
    """What prediction collects per view: the class scores, then (``features``) the pooled
    res5 features, side by side in one row."""

    def __init__(self, model: torch.nn.Module, protocol: TestProtocol, features: bool) -> None:
        self.model = model
        self.features = features
        self.width = model.cfg.MODEL.NUM_CLASSES
        if features:
            self.width += feature_dim(model.cfg, POOL5, protocol)

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            pooled = self.model.forward_features(pixels)
            scores = self.model.forward_head(pooled).float()
            if self.features:
                scores = torch.cat([scores, pooled.float().mean(dim=(2, 3, 4))], dim=1)
        return scores.cpu().numpy()

    def finish(self, record: VideoRecord) -> VideoRecord:
        return record


def predict_video(
    video: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    *,
    model: torch.nn.Module | None = None,
    options: PredictOptions | None = None,
    **changes: Any,
) -> Prediction:
    """Run the test-split model on every view of ``video`` (decoded once).

    ``options`` (:class:`PredictOptions`, defaults when omitted) say how; keyword ``changes``
    replace single fields (``predict_video(v, w, features=True, topk=3)``). An undecodable
    video raises ``ValueError`` naming the file."""
    opts = replace(options or PredictOptions(), **changes)
    path = os.fspath(video)
    # the cheap checks before the first expensive step (building, perhaps downloading, a model)
    check_model_source(weights, model, opts.overrides, opts.backend, "predict_video")
    if not os.path.isfile(path):
        what = "is not a file" if os.path.exists(path) else "does not exist"
        raise ValueError(f"{path}: the video {what}")
    model = load_test_model(weights, model, opts.overrides)
    device = default_device(opts.device)
    model, _ = prepare_model(model, device, opts)
    cfg = model.cfg
    protocol = TestProtocol.from_cfg(cfg)
    rows = ScoresAndPool5(model, protocol, opts.features)
    records: list[VideoRecord] = []
    runner = InferenceRunner(
        rows, protocol, device, records.append, lambda _: path, "view" if opts.progress else None
    )
    runner.log_decode_errors = False  # the error is raised, as one line
    run_views(runner, [VideoItem(0, path)], opts.batch_size or default_batch_size(cfg), opts)
    (record,) = records
    if record.error:
        raise ValueError(record.error)
    k = cfg.MODEL.NUM_CLASSES
    scores_per_view = record.scores[:, :k]
    total = scores_per_view.astype(np.float64).sum(axis=0) / len(scores_per_view)
    order = np.argsort(-total, kind="stable")[: max(0, opts.topk)]
    return Prediction(
        scores=total,
        view_scores=scores_per_view,
        topk=[(int(c), float(total[c])) for c in order],
        features=np.ascontiguousarray(record.scores[:, k:]) if opts.features else None,
        meta=runner.last_meta,
    )
