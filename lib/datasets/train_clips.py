"""The original's training clips: temporal jitter, scale jitter, random crop, flip.

For one list entry the original's video input op (with ``temporal_jitter``, ``is_test=0``,
``mirror=1``) does, on ``N`` decoded frames of size ``H x W``:

* start frame ``start ~ UniformInt[0, N - L*r]`` if ``N - L*r > 0``, else ``0``; frame ``k`` of
  the clip (``0 <= k < L``) is ``(start + k*r) % N`` (short videos loop);
* short side scaled to ``S ~ UniformInt[TRAIN.JITTER_SCALES[0], TRAIN.JITTER_SCALES[1]]`` with
  the float32 size arithmetic of ``ScaleTransform`` (:func:`.test_protocol.scaled_size`) and
  ``cv2.resize(..., INTER_LINEAR)``;
* one ``TRAIN.CROP_SIZE`` crop at ``h_off ~ UniformInt[0, newH - c]``,
  ``w_off ~ UniformInt[0, newW - c]`` for every frame (a frame one column short of the crop, the
  float32 truncation case, is read through the flat buffer as the original's unchecked indexing
  does);
* the whole clip flipped horizontally with probability 0.5;
* RGB (BGR if ``MODEL.USE_BGR``), ``(x - 114.75) * float32(1 / 57.375)``.

Randomness. The draws of one clip come, in the order start, ``S``, ``h_off``, ``w_off``, flip,
from ``numpy.random.default_rng([RNG_SEED, epoch, index, attempt])``, where ``index`` is the
sample's position in the epoch's global order (so the rank that reads it is implied: rank
``q`` of ``K`` reads positions ``q*b .. q*b+b-1`` of each global batch) and ``attempt`` is 0
unless the video had to be replaced. The epoch's order is a permutation of the usable entries
drawn from ``default_rng([RNG_SEED, epoch])``. Every sample is therefore a pure function of
``(RNG_SEED, global stream position)``: a resumed run, or a run on another number of processes,
reads exactly the same clips.

Replacement. An entry whose video cannot be decoded (missing, corrupt, fewer than 2 frames) is
logged (once per worker and file) and counted, and the sample is replaced by the entry
``perm[(index + attempt * 7919) % M]`` of the same epoch with draws from attempt ``attempt``
(1, 2, ...), up to :data:`MAX_REPLACEMENTS` times; the epoch keeps its length. If every attempt
fails the batch cannot be filled and :class:`TrainDataError` stops the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..core.config import ConfigError
from .decoders import VideoDecodeError, decode_selected
from .protocol import scaled_size
from .video_list import VideoList
from .views import _crop_with_flat_wrap

__all__ = [
    "MAX_REPLACEMENTS",
    "ClipDraws",
    "TrainClipDataset",
    "TrainDataError",
    "TrainSampler",
    "TrainSampling",
    "clip_rng",
    "collate_train",
    "draw_clip",
    "epoch_order",
    "make_train_clip",
    "normalise_clips",
]

logger = logging.getLogger(__name__)

MAX_REPLACEMENTS = 100  # as the original's DATALOADER.MAX_BAD_IMAGES default
REPLACEMENT_STRIDE = 7919  # a prime: successive replacements spread over the epoch


class TrainDataError(ValueError):
    """Training data that cannot be used at all (no usable entry, every replacement failed)."""


@dataclass(frozen=True)
class TrainSampling:
    """The training-clip settings of a config."""

    video_length: int  # L = TRAIN.VIDEO_LENGTH
    sample_rate: int  # r = TRAIN.SAMPLE_RATE
    min_scale: int  # TRAIN.JITTER_SCALES[0]
    max_scale: int  # TRAIN.JITTER_SCALES[1]
    crop_size: int  # TRAIN.CROP_SIZE
    mean: float = 114.75
    std: float = 57.375
    use_bgr: bool = False

    @classmethod
    def from_cfg(cls, cfg) -> TrainSampling:
        scales = list(cfg.TRAIN.JITTER_SCALES)
        if len(scales) != 2 or scales[0] > scales[1]:
            raise ConfigError(
                f"TRAIN.JITTER_SCALES must be [min, max] with min <= max, got {scales}"
            )
        for key, value in (
            ("TRAIN.VIDEO_LENGTH", cfg.TRAIN.VIDEO_LENGTH),
            ("TRAIN.SAMPLE_RATE", cfg.TRAIN.SAMPLE_RATE),
            ("TRAIN.CROP_SIZE", cfg.TRAIN.CROP_SIZE),
            ("TRAIN.JITTER_SCALES[0]", scales[0]),
        ):
            if int(value) <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if scales[0] < cfg.TRAIN.CROP_SIZE:
            raise ConfigError(
                f"TRAIN.JITTER_SCALES[0] ({scales[0]}) is smaller than TRAIN.CROP_SIZE "
                f"({cfg.TRAIN.CROP_SIZE}): the random crop would not fit the scaled frames"
            )
        return cls(
            video_length=int(cfg.TRAIN.VIDEO_LENGTH),
            sample_rate=int(cfg.TRAIN.SAMPLE_RATE),
            min_scale=int(scales[0]),
            max_scale=int(scales[1]),
            crop_size=int(cfg.TRAIN.CROP_SIZE),
            mean=float(cfg.MODEL.MEAN),
            std=float(cfg.MODEL.STD),
            use_bgr=bool(cfg.MODEL.USE_BGR),
        )


@dataclass(frozen=True)
class ClipDraws:
    """The random choices of one clip."""

    start: int
    scale: int
    h_off: int
    w_off: int
    flip: bool


def clip_rng(
    seed: int, epoch: int, index: int, attempt: int = 0, stream: tuple[int, ...] = ()
) -> np.random.Generator:
    """The generator of sample ``index`` of ``epoch`` (see the module docstring); ``stream``
    tells apart the other clip streams (validation, precise BN) from training's ``()``."""
    return np.random.default_rng([int(seed), int(epoch), int(index), int(attempt), *stream])


def epoch_order(
    seed: int, epoch: int, num_entries: int, stream: tuple[int, ...] = ()
) -> np.ndarray:
    """The order in which ``epoch`` visits the usable entries (a permutation of ``0..M-1``)."""
    return np.random.default_rng([int(seed), int(epoch), *stream]).permutation(num_entries)


def draw_start(rng: np.random.Generator, num_frames: int, s: TrainSampling) -> int:
    """``UniformInt[0, N - L*r]`` if ``N > L*r``, else 0 (the original's temporal jitter)."""
    span = num_frames - s.video_length * s.sample_rate
    return int(rng.integers(0, span + 1)) if span > 0 else 0


def draw_clip(
    rng: np.random.Generator, num_frames: int, height: int, width: int, s: TrainSampling
) -> ClipDraws:
    """Every draw of one clip, in the order the dataset makes them."""
    start = draw_start(rng, num_frames, s)
    return _draw_spatial(rng, start, height, width, s)


def _draw_spatial(
    rng: np.random.Generator, start: int, height: int, width: int, s: TrainSampling
) -> ClipDraws:
    scale = int(rng.integers(s.min_scale, s.max_scale + 1))
    new_h, new_w = scaled_size(height, width, scale)
    h_off = int(rng.integers(0, max(0, new_h - s.crop_size) + 1))
    w_off = int(rng.integers(0, max(0, new_w - s.crop_size) + 1))
    flip = bool(rng.random() < 0.5)
    return ClipDraws(start, scale, h_off, w_off, flip)


def frame_indices(start: int, num_frames: int, s: TrainSampling) -> np.ndarray:
    """``(start + k*r) % N`` for ``k`` in ``0..L-1``."""
    return (start + np.arange(s.video_length, dtype=np.int64) * s.sample_rate) % num_frames


def make_train_clip(
    frames: dict[int, np.ndarray], num_frames: int, draws: ClipDraws, s: TrainSampling
) -> np.ndarray:
    """uint8 ``(3, L, c, c)`` clip from decoded RGB frames ``{index: HxWx3}`` and the draws."""
    indices = frame_indices(draws.start, num_frames, s)
    height, width = frames[int(indices[0])].shape[:2]
    new_h, new_w = scaled_size(height, width, draws.scale)
    resized: dict[int, np.ndarray] = {}
    for i in set(indices.tolist()):
        frame = frames[i]
        if frame.shape[:2] != (new_h, new_w):
            frame = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        resized[i] = frame
    clip = np.stack([resized[i] for i in indices.tolist()])  # (L, newH, newW, 3)
    c = s.crop_size
    channels = [2, 1, 0] if s.use_bgr else [0, 1, 2]
    if draws.h_off + c <= new_h and draws.w_off + c <= new_w:
        out = clip[:, draws.h_off : draws.h_off + c, draws.w_off : draws.w_off + c, :]
        out = out[..., channels].transpose(3, 0, 1, 2)  # (3, L, c, c)
    else:  # a frame one pixel short of the crop (float32 truncation): the original's reads
        chw = torch.from_numpy(np.ascontiguousarray(clip.transpose(0, 3, 1, 2)))
        out = _crop_with_flat_wrap(chw, draws.h_off, draws.w_off, c, channels).numpy()
    if draws.flip:
        out = out[..., ::-1]
    return np.ascontiguousarray(out)


def normalise_clips(clips: torch.Tensor, s: TrainSampling) -> torch.Tensor:
    """float32 ``(x - MEAN) * float32(1 / STD)`` of uint8 (or float) clips, on their device."""
    inv_std = float(np.float32(1.0) / np.float32(s.std))
    return clips.float().sub_(float(np.float32(s.mean))).mul_(inv_std)


@dataclass
class _Entry:
    path: str
    label: int
    where: str


@dataclass
class TrainClipDataset(Dataset):
    """Map-style dataset over the infinite stream of training samples.

    Item ``p`` (a global stream position: ``p = iteration * TRAIN.BATCH_SIZE + j``) is sample
    ``p % M`` of epoch ``p // M`` (``M`` usable list entries). Returns a dict with ``clip``
    (uint8 ``(3, L, c, c)``), ``label``, ``position`` and ``failures`` (the list positions of
    videos that had to be replaced for this sample). ``stream`` selects another seed stream:
    ``(1,)`` validation (list order, training augmentation, as the original's ``val`` net),
    ``(2, N)`` the precise-BN batches computed at iteration ``N``.
    """

    vlist: VideoList
    sampling: TrainSampling
    seed: int
    backend: str = "opencv"
    stream: tuple[int, ...] = ()
    entries: list[_Entry] = field(init=False)
    _orders: dict[int, np.ndarray] = field(init=False, default_factory=dict)
    _bad_seen: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.entries = [
            _Entry(self.vlist.resolve(e), e.label, self.vlist.where(e))
            for e in self.vlist.entries
            if e.ok
        ]
        skipped = len(self.vlist.entries) - len(self.entries)
        if skipped:
            logger.error(
                "%s: %d of %d list lines are bad and are left out of %s",
                self.vlist.source,
                skipped,
                len(self.vlist.entries),
                "validation" if self.val else "training",
            )
        if not self.entries:
            raise TrainDataError(f"{self.vlist.source}: no usable entry in the list file")

    def __len__(self) -> int:  # one epoch; positions beyond it are valid (next epochs)
        return len(self.entries)

    @property
    def val(self) -> bool:
        return self.stream[:1] == (1,)

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = (
                np.arange(len(self.entries))
                if self.val
                else epoch_order(self.seed, epoch, len(self.entries), self.stream)
            )
        return self._orders[epoch]

    def __getitem__(self, position: int) -> dict:
        m = len(self.entries)
        epoch, index = divmod(int(position), m)
        order = self.order(epoch)
        failures: list[int] = []
        for attempt in range(MAX_REPLACEMENTS + 1):
            entry_id = int(order[(index + attempt * REPLACEMENT_STRIDE) % m])
            entry = self.entries[entry_id]
            rng = clip_rng(self.seed, epoch, index, attempt, self.stream)
            try:
                clip = self._load(entry, rng)
            except VideoDecodeError as e:
                failures.append(entry_id)
                if entry.path not in self._bad_seen:
                    self._bad_seen.add(entry.path)
                    logger.warning("%s: %s; replaced by another sample", entry.where, e)
                continue
            return {
                "clip": torch.from_numpy(clip),
                "label": entry.label,
                "position": int(position),
                "failures": failures,
            }
        raise TrainDataError(
            f"{self.vlist.source}: {MAX_REPLACEMENTS + 1} videos in a row could not be decoded "
            f"for sample {position}; is --data-root right?"
        )

    def _load(self, entry: _Entry, rng: np.random.Generator) -> np.ndarray:
        s = self.sampling
        box: dict[str, int] = {}

        def wanted(n: int) -> list[int]:
            box["start"] = draw_start(rng, n, s)
            return frame_indices(box["start"], n, s).tolist()

        decoded = decode_selected(entry.path, wanted, self.backend)
        draws = _draw_spatial(rng, box["start"], decoded.height, decoded.width, s)
        return make_train_clip(decoded.frames, decoded.num_frames, draws, s)


def collate_train(samples: list[dict]) -> dict:
    """Stack clips and labels; keep positions and failures for bookkeeping."""
    return {
        "clip": torch.stack([x["clip"] for x in samples]),
        "label": torch.tensor([x["label"] for x in samples], dtype=torch.int64),
        "position": [x["position"] for x in samples],
        "failures": [f for x in samples for f in x["failures"]],
    }


class TrainSampler(Sampler[int]):
    """Stream positions this rank reads, iteration by iteration from ``start_iter``:
    ``it * global_batch + rank * per_rank + j`` for ``j < per_rank``."""

    def __init__(
        self, start_iter: int, max_iter: int, global_batch: int, rank: int, world_size: int
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"batch {global_batch} is not a multiple of world size {world_size}")
        self.start_iter, self.max_iter = int(start_iter), int(max_iter)
        self.global_batch, self.rank = int(global_batch), int(rank)
        self.per_rank = self.global_batch // int(world_size)

    def __len__(self) -> int:
        return max(0, self.max_iter - self.start_iter) * self.per_rank

    def __iter__(self):
        for it in range(self.start_iter, self.max_iter):
            base = it * self.global_batch + self.rank * self.per_rank
            yield from range(base, base + self.per_rank)
