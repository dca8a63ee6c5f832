"""Classify one video with the original's 30-view test, optionally extracting features.

The video score is the original's: the per-view averaged softmax summed over the views; it is
reported divided by the number of views (a probability; the ranking is the same). Features are
the pool5 output of every view averaged over its positions (``(views, 2048)``, rows in view
order ``10*ct + j``), what downstream users extract from the backbone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..datasets.protocol import TestProtocol
from ..datasets.views import VideoMeta, load_test_video
from ..pretrained import load_model  # a weights file or a released model's name
from .inference import prepare_for_inference

__all__ = ["Prediction", "predict_video"]


@dataclass
class Prediction:
    """What :func:`predict_video` found."""

    scores: np.ndarray  # (K,) mean over views of the per-view averaged softmax
    view_scores: np.ndarray  # (views, K)
    topk: list[tuple[int, float]]  # (class index, score), best first
    features: np.ndarray | None  # (views, 2048) pooled res5 features, if asked for
    meta: VideoMeta


def predict_video(
    video: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    *,
    model: torch.nn.Module | None = None,
    overrides: Sequence[str] = (),
    backend: str = "opencv",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    topk: int = 5,
    features: bool = False,
    channels_last: bool = True,
    precision: str = "strict",
    compile: bool = False,
) -> Prediction:
    """Run the test-split model on every view of ``video`` (decoded once).

    ``precision`` / ``compile``: see :func:`.inference.prepare_for_inference`."""
    if model is None:
        if weights is None:
            raise ValueError("predict_video() needs weights (a converted .pt file) or a model")
        model = load_model(weights, split="test", overrides=overrides)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = prepare_for_inference(model, device, precision, compile, channels_last=channels_last)
    protocol = TestProtocol.from_cfg(model.cfg)
    batch_size = batch_size or max(1, model.cfg.TEST.BATCH_SIZE // max(1, model.cfg.NUM_GPUS))
    clip = load_test_video(video, protocol, backend)
    view_scores, view_features = [], []
    with torch.inference_mode():
        for start in range(0, clip.num_views, batch_size):
            views = clip.views_uint8(range(start, min(clip.num_views, start + batch_size)))
            pixels = protocol.normalise_(views.to(device).float())
            pooled = model.forward_features(pixels)
            view_scores.append(model.forward_head(pooled).float().cpu())
            if features:
                view_features.append(pooled.float().mean(dim=(2, 3, 4)).cpu())
    scores_per_view = torch.cat(view_scores).numpy()
    total = scores_per_view.astype(np.float64).sum(axis=0) / len(scores_per_view)
    order = np.argsort(-total, kind="stable")[: max(0, topk)]
    return Prediction(
        scores=total,
        view_scores=scores_per_view,
        topk=[(int(c), float(total[c])) for c in order],
        features=torch.cat(view_features).numpy() if features else None,
        meta=clip.meta,
    )
