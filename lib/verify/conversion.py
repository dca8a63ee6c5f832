"""Check a conversion end to end: a Caffe2 ``.pkl`` against its PyTorch model, layer by layer.

:func:`verify_checkpoint` reads the ``.pkl`` safely, runs the original graph on its blobs with the
reference executor, converts the same blobs in memory with the converter (or loads an already
converted file), runs the model on the same clips (seeded random pixels, or test views of a video
cut by :mod:`nonlocal_net.datasets`) and compares every layer
(:func:`nonlocal_net.verify.compare_layers`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from yacs.config import CfgNode

from ..converters.convert import convert_blobs, describe_cfg
from ..converters.reader import read_caffe2_pkl
from ..core.config import cfg_to_dict, get_cfg
from ..datasets import TestProtocol, load_test_video
from ..models.model_builder import build_model, load_model
from ..pretrained import resolve_weights
from ..reference import GraphError, build_graph, config_crop_size
from .compare import ParityReport, compare_layers

__all__ = ["random_clip", "verify_checkpoint", "video_clips"]

logger = logging.getLogger(__name__)

# Config sections that decide the architecture (a DST built from other values is reported).
_ARCH_SECTIONS = ("MODEL", "RESNETS", "NONLOCAL")


def random_clip(
    cfg: CfgNode,
    *,
    batch: int = 1,
    frames: int | None = None,
    crop: int | None = None,
    split: str = "test",
    seed: int = 0,
) -> np.ndarray:
    """Seeded random clips ``(batch, 3, frames, crop, crop)``, float32: uniform integer pixels
    in [0, 255] normalised as the test input is (:meth:`TestProtocol.normalise_`,
    ``(x - MODEL.MEAN) / MODEL.STD`` in the original's float32 arithmetic).

    ``frames`` defaults to ``TRAIN.VIDEO_LENGTH`` (the original's clip length at test time too);
    ``crop`` to 256 for ``test`` (``TRAIN.JITTER_SCALES[0]``) and ``TRAIN.CROP_SIZE`` (224) for
    ``val``.
    """
    frames = cfg.TRAIN.VIDEO_LENGTH if frames is None else int(frames)
    crop = config_crop_size(cfg, split) if crop is None else int(crop)
    if batch < 1 or frames < 1 or crop < 1:
        raise ValueError(f"batch, frames and crop must be positive, got {batch}, {frames}, {crop}")
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(batch, 3, frames, crop, crop)).astype(np.float32)
    return TestProtocol.from_cfg(cfg).normalise_(torch.from_numpy(pixels)).numpy()


def video_clips(
    path: str | os.PathLike,
    cfg: CfgNode,
    *,
    view: int = 0,
    batch: int = 1,
    split: str = "test",
    crop: int | None = None,
    backend: str = "opencv",
) -> np.ndarray:
    """Test views ``view .. view + batch - 1`` of a video, cut as the original's 30-view test
    cuts them (:mod:`nonlocal_net.datasets`: ``TRAIN.VIDEO_LENGTH`` frames at
    ``TRAIN.SAMPLE_RATE``, short side scaled to ``TEST.SCALE``, 256 crops), normalised, float32.

    ``crop`` (default: the split's, 224 for ``val``) smaller than the test crop takes the
    central ``crop x crop`` of each view. Raises :class:`VideoDecodeError` for a video that
    cannot be decoded and ``ValueError`` for views out of range.
    """
    protocol = TestProtocol.from_cfg(cfg)
    crop = config_crop_size(cfg, split) if crop is None else int(crop)
    if crop > protocol.crop_size:
        raise ValueError(
            f"--crop {crop} is larger than the test views' {protocol.crop_size} "
            f"(TRAIN.JITTER_SCALES[0])"
        )
    views = list(range(view, view + batch))
    if view < 0 or views[-1] >= protocol.num_views:
        raise ValueError(
            f"{path}: views {views[0]}..{views[-1]} requested, the test protocol has "
            f"{protocol.num_views} (0..{protocol.num_views - 1})"
        )
    video = load_test_video(path, protocol, backend)
    clips = video.views(views).numpy()
    offset = (protocol.crop_size - crop) // 2
    clips = clips[..., offset : offset + crop, offset : offset + crop]
    logger.info(
        "%s: %d decoded frames, views %s (frames %s)",
        path,
        video.meta.num_frames,
        views,
        [video.view_frames(v).tolist() for v in views],
    )
    return np.ascontiguousarray(clips)


def _architecture_differences(a: CfgNode, b: CfgNode) -> list[str]:
    da, db = cfg_to_dict(a), cfg_to_dict(b)
    out = []
    for section in _ARCH_SECTIONS:
        for key in sorted(set(da[section]) | set(db[section])):
            va, vb = da[section].get(key), db[section].get(key)
            if va != vb:
                out.append(f"{section}.{key}: {va!r} vs {vb!r}")
    if da["TRAIN"]["VIDEO_LENGTH"] != db["TRAIN"]["VIDEO_LENGTH"]:
        out.append(
            f"TRAIN.VIDEO_LENGTH: {da['TRAIN']['VIDEO_LENGTH']} vs {db['TRAIN']['VIDEO_LENGTH']}"
        )
    return out


def verify_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    *,
    model: CfgNode | str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    split: str = "test",
    frames: int | None = None,
    crop: int | None = None,
    batch: int = 1,
    seed: int = 0,
    clips: np.ndarray | None = None,
    video: str | os.PathLike | None = None,
    view: int = 0,
    dtypes: Sequence[str] = ("float32", "float64"),
    tol: Mapping[str, float] | None = None,
    device: str = "cpu",
    reference_batch_size: int | str | None = None,
    progress: bool = False,
) -> ParityReport:
    """Verify that the PyTorch model computes what the original computes with ``src``'s blobs.

    Args:
        src: the Caffe2 checkpoint (``.pkl``) the original would load.
        dst: a converted checkpoint (``.pt``/``.safetensors`` written by ``vnl-convert``) to
            check; default: convert ``src`` in memory with :func:`convert_blobs`.
        model: the zoo name, YAML path or config of ``src``'s network. Optional with ``dst``
            (its stored config is used); required otherwise.
        overrides: ``KEY VALUE`` config overrides (applied to both sides).
        split: ``"test"`` (fully-convolutional head, 256 crops) or ``"val"`` (FC head, 224).
        frames, crop, batch, seed: the random clip (see :func:`random_clip`).
        clips: use these clips instead of a random one (``(N, 3, T, H, W)``, normalised).
        video, view: use test views ``view .. view + batch - 1`` of this video instead (see
            :func:`video_clips`; ``frames`` must then be left at its default).
        dtypes, tol, device, reference_batch_size, progress: see :func:`compare_layers`.

    Raises:
        Caffe2FormatError / UnsafePickleError: ``src`` is not a readable Caffe2 checkpoint.
        ConversionError: ``src``'s blobs do not fit the model.
        WeightsFileError: ``dst`` is not a weights file or does not fit its model.
        ParameterError / GraphError: the reference cannot run ``src``'s blobs on this input.
    """
    overrides = list(overrides)
    if model is None and dst is None:
        raise ValueError("give the model (zoo name or YAML config) of SRC, or a converted DST")
    src = resolve_weights(src, caffe2=True)  # a released model's name: its cached .pkl
    ckpt = read_caffe2_pkl(src, load_momentum=False)
    logger.info("%s: %s", src, ckpt.describe())
    if dst is not None:
        port = load_model(dst, split=split, overrides=overrides)
        cfg = port.cfg if model is None else get_cfg(model, overrides)
        differences = _architecture_differences(cfg, port.cfg)
        if differences:
            logger.warning(
                "%s was converted with another architecture than the one given for %s: %s",
                dst,
                src,
                "; ".join(differences),
            )
        source = f"{src} vs {dst}"
    else:
        cfg = get_cfg(model, overrides)
        state_dict = convert_blobs(ckpt.entries(), cfg, source=src).state_dict
        port = build_model(cfg, split=split)
        port.load_state_dict(state_dict, strict=True)
        source = f"{src} (converted in memory)"
    if clips is None and video is not None:
        if frames is not None:
            raise ValueError("a video's test views have TRAIN.VIDEO_LENGTH frames: no --frames")
        clips = video_clips(video, cfg, view=view, batch=batch, split=split, crop=crop)
    elif clips is None:
        clips = random_clip(cfg, batch=batch, frames=frames, crop=crop, split=split, seed=seed)
    clips = np.asarray(clips)
    if clips.ndim != 5 or clips.shape[1] != 3:
        raise ValueError(f"clips must have shape (N, 3, T, H, W), got {clips.shape}")
    graph = build_graph(cfg, split, batch_size=int(clips.shape[0]), crop_size=int(clips.shape[-1]))
    try:  # the network's own checks, before any heavy work
        graph.infer_shapes(clips.shape)
    except GraphError as e:
        raise GraphError(
            f"clips {'x'.join(map(str, clips.shape))} do not fit the original's {split} network "
            f"({describe_cfg(cfg)}, built for {cfg.TRAIN.VIDEO_LENGTH}-frame clips at "
            f"{config_crop_size(cfg, split)}x{config_crop_size(cfg, split)}): {e}"
        ) from e
    logger.info(
        "comparing %d layers on clips %s (%s)",
        len(graph.taps),
        "x".join(map(str, clips.shape)),
        source,
    )
    report = compare_layers(
        port,
        graph,
        ckpt.blobs,
        clips,
        dtypes=dtypes,
        tol=tol,
        device=device,
        reference_batch_size=reference_batch_size,
        progress=progress,
        description=source,
    )
    info: dict[str, Any] = {
        "src": os.fspath(src),
        "dst": None if dst is None else os.fspath(dst),
        "model": describe_cfg(cfg),
        "seed": None if video is not None else seed,
        "video": None if video is None else os.fspath(video),
        "view": None if video is None else view,
    }
    report.info.update(info)
    return report
