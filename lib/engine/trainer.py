"""The original's training loop (``tools/train_net_video.py``) on PyTorch, single process or DDP.

One iteration (0-based ``it``): the LR of ``it`` is set (``nonlocal_net.solver.lr_at`` /
``set_lr``), each process takes its ``TRAIN.BATCH_SIZE / world`` clips of the global batch
(:class:`~nonlocal_net.datasets.train_clips.TrainSampler`), splits them into ``--accumulate``
micro-batches (each one a forward pass with its own BN batch statistics, as one of the
original's GPUs), the softmax cross-entropy of each micro-batch is averaged over it and scaled
by ``1 / (accumulate * world)``; DDP sums (averages, with the scale folded in) the gradients, so
the update uses the mean gradient over the global batch, then ``optimizer.step()``.

After iteration ``it`` (``N = it + 1`` finished): every ``LOG_PERIOD`` a log line; if
``N % TRAIN.EVAL_PERIOD == 0`` and a val list is given, precise BN (non-affine configs with
``TRAIN.COMPUTE_PRECISE_BN``) and validation (single random-crop clips, top-1/top-5 error, as
the original's ``val`` net); if ``N % CHECKPOINT.CHECKPOINT_PERIOD == 0`` or ``N == MAX_ITER``,
precise BN (once per iteration number) and the checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..converters.convert import convert_blobs
from ..converters.export import state_dict_to_blobs
from ..converters.reader import read_caffe2_pkl
from ..converters.report import INITIALISED
from ..converters.sniff import looks_like_pickle
from ..converters.writer import write_caffe2_pkl
from ..core.config import ConfigError
from ..core.weights_file import WeightsFileError, load_weights_file
from ..datasets.train_clips import (
    TrainClipDataset,
    TrainDataError,
    TrainSampler,
    TrainSampling,
    collate_train,
    normalise_clips,
)
from ..datasets.video_list import read_video_list
from ..models.layers import frozen_running_stats
from ..models.model_builder import build_model, has_batch_norm, train_bn_group_size
from ..pretrained import resolve_weights
from ..utils.numeric import check_finite
from . import solver
from .arithmetic import run_arithmetic
from .bn_helper import compute_precise_bn
from .distributed import DistContext
from .train_checkpoints import (
    ResumePoint,
    check_inputs_not_checkpoints,
    load_training_checkpoint,
    pkl_path,
    pt_path,
    remove_checkpoints,
    remove_stale_checkpoint_temporaries,
    run_lock,
    save_training_checkpoint,
)
from .train_errors import NonFiniteError, NonFiniteLossError, TrainingError
from .train_metrics import MetricsLog, check_tensorboard
from .train_resume import (
    check_resume,
    checkpoint_problems,
    decide_resume,
    load_caffe2_checkpoint,
    refuse_nonfinite,
    run_settings,
    training_checkpoint_problems,
)

__all__ = [
    "MAX_JITTER_SCALE",
    "NonFiniteError",
    "NonFiniteLossError",
    "TrainDataError",
    "TrainOptions",
    "TrainingError",
    "WeightsFileError",
    "check_run_settings",
    "check_train_cfg",
    "initialise_from_params_file",
    "train",
]

logger = logging.getLogger(__name__)


# The largest short side TRAIN.JITTER_SCALES may ask for: the decoder scales whole frames to it
# before cropping, so it sizes the allocations of every sample (a 16:9 frame at 2048 is
# 2048 x 3641 x 3 bytes, 22 MB, times TRAIN.VIDEO_LENGTH * SAMPLE_RATE frames at most).
MAX_JITTER_SCALE = 2048


@dataclass
class TrainOptions:
    """What ``vnl-train`` passes to :func:`train`."""

    cfg: Any  # frozen config
    train_list: str
    output_dir: str
    val_list: str | None = None
    data_root: str | None = None
    resume: bool = False  # --resume: continue even with CHECKPOINT.RESUME False
    start_over: bool = False  # --start-over: delete the folder's checkpoints, start a new run
    tensorboard: bool = False  # --tensorboard: scalars also to OUTPUT_DIR/tensorboard
    accumulate: int = 1
    precision: str = "fp32"
    write_caffe2: bool = True
    workers: int = 2
    backend: str = "opencv"
    progress: bool = True
    extra_meta: dict = field(default_factory=dict)


def _uses_precise_bn(cfg) -> bool:
    return bool(cfg.TRAIN.COMPUTE_PRECISE_BN) and not bool(cfg.MODEL.USE_AFFINE)


def check_train_cfg(cfg, world_size: int, accumulate: int, precision: str, device) -> int:
    """Validate what the run needs before anything is built; returns the micro-batch size."""
    if cfg.MODEL.NUM_CLASSES <= 0:
        raise ConfigError(f"MODEL.NUM_CLASSES must be positive, got {cfg.MODEL.NUM_CLASSES}")
    batch = int(cfg.TRAIN.BATCH_SIZE)
    if batch <= 0 or batch % world_size:
        raise ConfigError(
            f"TRAIN.BATCH_SIZE ({batch}) must be a positive multiple of the number of "
            f"processes ({world_size})"
        )
    per_rank = batch // world_size
    if accumulate < 1 or per_rank % accumulate:
        raise ConfigError(
            f"--accumulate {accumulate} must divide the per-process batch {per_rank} "
            f"(TRAIN.BATCH_SIZE {batch} / {world_size} processes)"
        )
    if cfg.SOLVER.MAX_ITER <= 0:
        raise ConfigError(f"SOLVER.MAX_ITER must be positive, got {cfg.SOLVER.MAX_ITER}")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision must be fp32 or bf16, got {precision!r}")
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError("--precision bf16 needs a CUDA device (autocast on CPU is not used)")
    _check_bn_groups(cfg, world_size, accumulate)
    TrainSampling.from_cfg(cfg)
    return per_rank // accumulate


def _check_bn_groups(cfg, world_size: int, accumulate: int) -> None:
    """Per-GPU BN (the train-split model normalises every group of ``TRAIN.BATCH_SIZE //
    NUM_GPUS`` clips on its own): every forward pass must hold whole groups, so the processes x
    ``--accumulate`` forward passes of an iteration must divide ``NUM_GPUS``; then each forward
    runs ``NUM_GPUS / (processes x accumulate)`` of the original's GPUs. A model without BN
    (frozen affines only) does not depend on it."""
    if not has_batch_norm(cfg):
        return
    gpus = int(cfg.NUM_GPUS)
    group = train_bn_group_size(cfg)
    forwards = world_size * accumulate
    if gpus % forwards:
        fitting = [d for d in range(1, gpus + 1) if gpus % d == 0]
        raise ConfigError(
            f"{world_size} process(es) x --accumulate {accumulate} = {forwards} forward passes "
            f"per iteration cannot reproduce the original's per-GPU BN of NUM_GPUS {gpus} "
            f"(BN groups of TRAIN.BATCH_SIZE // NUM_GPUS = {group} clips): each forward pass "
            f"would hold {gpus / forwards:g} groups; use processes x --accumulate in "
            f"{', '.join(map(str, fitting))}"
        )
    logger.info(
        "per-GPU BN: NUM_GPUS %d groups of %d clips per iteration, %d per forward pass "
        "(%d process(es) x %d micro-batch(es))",
        gpus,
        group,
        gpus // forwards,
        world_size,
        accumulate,
    )
    if group < 2:
        logger.warning("BN groups of 1 clip (TRAIN.BATCH_SIZE // NUM_GPUS): degenerate statistics")


# ----------------------------------------------------------------------------- initialisation


def _params_file_blobs(path: str) -> tuple[dict[str, Any], int | None]:
    """Blobs of a Caffe2 ``.pkl`` or a converted ``.pt``/``.safetensors``; ``model_iter``.

    Refused (:class:`TrainingError`, naming the blobs) as ``vnl-convert`` refuses them: blobs
    with NaN/Inf values or negative BN variances (``_riv``)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if looks_like_pickle(head):
        ckpt = read_caffe2_pkl(path, load_momentum=False)
        logger.info("%s: %s", path, ckpt.describe())
        blobs, model_iter = ckpt.entries(), ckpt.model_iter
    else:
        data = load_weights_file(path)
        blobs, model_iter = state_dict_to_blobs(data["state_dict"], source=path), None
    problems = check_finite(
        ((k, v) for k, v in blobs.items() if isinstance(v, np.ndarray | torch.Tensor)),
        negative_ok=lambda name: not name.endswith("_riv"),
    )
    if problems:
        listed = "; ".join(problems[:5]) + (
            f"; ... ({len(problems)} blobs in all)" if len(problems) > 5 else ""
        )
        raise TrainingError(
            f"TRAIN.PARAMS_FILE {path}: {len(problems)} blob(s) hold non-finite values or "
            f"negative variances ({listed}); vnl-convert refuses them too"
        )
    return blobs, model_iter


def initialise_from_params_file(model: torch.nn.Module, cfg, path: str) -> int:
    """Load ``TRAIN.PARAMS_FILE`` with the original's rules: 2-D weights inflated, a ``pred``
    of another class count dropped, layers the file lacks keep their initialisers, BN
    statistics folded into frozen affines for affine models. Returns the file's
    ``model_iter`` (the original's start iteration) or 0."""
    path = resolve_weights(path, caffe2=True)  # a released model's name: its cached .pkl
    if not os.path.isfile(path):
        raise TrainingError(f"TRAIN.PARAMS_FILE {path}: no such file")
    blobs, model_iter = _params_file_blobs(path)
    result = convert_blobs(blobs, cfg, inflate=True, finetune=True, source=path)
    keep = {row.key for row in result.report.rows if row.action == INITIALISED and row.key}
    state = model.state_dict()
    loaded = 0
    with torch.no_grad():
        for key, value in result.state_dict.items():
            if key in keep:
                continue
            state[key].copy_(value.reshape(state[key].shape))
            loaded += 1
    logger.info(
        "initialised from %s: %d tensors loaded, %d kept their initialisers%s",
        path,
        loaded,
        len(keep),
        f" ({', '.join(sorted(keep)[:6])}{', ...' if len(keep) > 6 else ''})" if keep else "",
    )
    if model_iter and not cfg.TRAIN.RESET_START_ITER:
        logger.warning(
            "%s holds model_iter %d: training starts there, as the original does "
            "(TRAIN.RESET_START_ITER True starts at 0)",
            path,
            model_iter,
        )
        return int(model_iter)
    return 0


# ----------------------------------------------------------------------------- run checks


def _period(cfg, key: str) -> int:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return int(node)


def check_run_settings(cfg, opts: TrainOptions) -> None:
    """Every setting the run uses later, checked before anything is built or read, so no
    refusal comes after hours of training: the periods, the precise-BN batch count, bounded
    jitter scales, the resume flags and ``--tensorboard``'s package."""
    for key in ("CHECKPOINT.CHECKPOINT_PERIOD", "TRAIN.EVAL_PERIOD"):
        value = _period(cfg, key)
        if value == 0 or value < -1:
            raise ConfigError(
                f"{key} must be a positive number of iterations or -1 (never, apart from the "
                f"end for checkpoints), got {value}"
            )
    if _period(cfg, "LOG_PERIOD") < 1:
        raise ConfigError(
            f"LOG_PERIOD must be a positive number of iterations, got {cfg.LOG_PERIOD}"
        )
    if _uses_precise_bn(cfg) and int(cfg.TRAIN.ITER_COMPUTE_PRECISE_BN) < 1:
        raise ConfigError(
            f"TRAIN.ITER_COMPUTE_PRECISE_BN must be at least 1 batch with TRAIN.COMPUTE_PRECISE_BN "
            f"True (a non-affine model), got {cfg.TRAIN.ITER_COMPUTE_PRECISE_BN}; set "
            f"TRAIN.COMPUTE_PRECISE_BN False to keep the running averages"
        )
    scales = list(cfg.TRAIN.JITTER_SCALES)
    if any(int(v) > MAX_JITTER_SCALE for v in scales):
        raise ConfigError(
            f"TRAIN.JITTER_SCALES {scales} exceeds {MAX_JITTER_SCALE}: frames are scaled to that "
            f"short side before cropping (the original's recipes use 256 to 480)"
        )
    if opts.resume and opts.start_over:
        raise ConfigError("--resume and --start-over contradict each other: pass one of them")
    if opts.tensorboard:
        check_tensorboard()
    if _period(cfg, "TRAIN.EVAL_PERIOD") > 0 and not opts.val_list:
        logger.info("TRAIN.EVAL_PERIOD %d: no --val-list, no validation", cfg.TRAIN.EVAL_PERIOD)


# ----------------------------------------------------------------------------- data


def _loader(dataset, sampler, batch: int, workers: int, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_train,
        persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,
        # a generator of its own: creating the loader must not consume the global RNG, so a
        # resumed run's dropout draws equal an uninterrupted run's
        generator=torch.Generator().manual_seed(seed),
        multiprocessing_context="spawn" if workers > 0 else None,
    )


class _Positions(torch.utils.data.Sampler):
    def __init__(self, positions: Sequence[int]) -> None:
        self.positions = list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[int]:
        return iter(self.positions)


# ----------------------------------------------------------------------------- the run


@dataclass
class _Run:
    opts: TrainOptions
    ctx: DistContext
    cfg: Any
    model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampling: TrainSampling
    train_set: TrainClipDataset
    micro: int
    lists: dict[str, str]
    settings: dict[str, Any]
    val_set: TrainClipDataset | None = None
    metrics: MetricsLog | None = None
    failures: int = 0
    precise_bn_done_at: int = -1
    last_checkpoint: str | None = None

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def autocast(self):
        if self.opts.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def allreduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.ctx.distributed:
            dist.all_reduce(t)
        return t.tolist()

    # -- one iteration
    def step(self, it: int, batch: dict) -> dict:
        lr = solver.lr_at(self.cfg, it)
        solver.set_lr(self.optimizer, lr)
        clips = normalise_clips(batch["clip"].to(self.device, non_blocking=True), self.sampling)
        labels = batch["label"].to(self.device)
        accumulate = self.opts.accumulate
        scale = 1.0 / accumulate
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = top1 = top5 = 0.0
        nonfinite = 0.0
        for m in range(accumulate):
            x = clips[m * self.micro : (m + 1) * self.micro]
            y = labels[m * self.micro : (m + 1) * self.micro]
            sync = m == accumulate - 1 or not self.ctx.distributed
            with (
                contextlib.nullcontext() if sync else self.ddp.no_sync(),
                self.autocast(),
                frozen_running_stats(self.model, frozen=m > 0),  # gpu_0 sees micro-batch 0
            ):
                logits = self.ddp(x)
                loss = F.cross_entropy(logits.float(), y)
                if not torch.isfinite(loss):
                    nonfinite = 1.0
                (loss * scale).backward()
            with torch.no_grad():
                loss_sum += float(loss) * len(y)
                top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
                hit = top == y[:, None]
                top1 += float(hit[:, 0].sum())
                top5 += float(hit.any(dim=1).sum())
        n = float(len(labels))
        loss_sum, top1, top5, n, nonfinite = self.allreduce([loss_sum, top1, top5, n, nonfinite])
        if nonfinite or not math.isfinite(loss_sum):
            raise NonFiniteLossError(
                f"the loss became non-finite at iteration {it + 1} (lr {lr:.6g}); the weights "
                f"were not updated and nothing was written after the last checkpoint "
                f"({self.last_checkpoint or 'none yet'})"
            )
        self.optimizer.step()
        self.check_update(it, lr)
        return {
            "lr": lr,
            "loss": loss_sum / n,
            "top1_err": 1.0 - top1 / n,
            "top5_err": 1.0 - top5 / n,
            "failures": len(batch["failures"]),
        }

    def check_update(self, it: int, lr: float) -> None:
        """Stop (:class:`NonFiniteError`) when the update of ``it`` made a parameter or a
        momentum buffer non-finite: the loss was finite, the step was not (an LR or gradient
        too large for float32)."""
        bad = solver.nonfinite_state(self.optimizer)
        if bad:
            shown = ", ".join(bad[:4]) + (f", ... ({len(bad)} in all)" if len(bad) > 4 else "")
            raise NonFiniteError(
                f"the update of iteration {it + 1} (lr {lr:.6g}) made {len(bad)} tensors "
                f"non-finite ({shown}); nothing was written after the last checkpoint "
                f"({self.last_checkpoint or 'none yet'})"
            )

    # -- precise BN
    def precise_bn(self, iteration: int) -> None:
        if not _uses_precise_bn(self.cfg) or self.precise_bn_done_at == iteration:
            return
        num_iters = int(self.cfg.TRAIN.ITER_COMPUTE_PRECISE_BN) * self.opts.accumulate
        dataset = TrainClipDataset(
            self.train_set.vlist,
            self.sampling,
            seed=int(self.cfg.RNG_SEED),
            backend=self.opts.backend,
            stream=(2, iteration),
        )
        per = self.micro
        base = self.ctx.rank * num_iters * per
        loader = _loader(
            dataset,
            _Positions(range(base, base + num_iters * per)),
            per,
            self.opts.workers,
            seed=iteration,
        )

        def batches():
            for b in loader:
                with self.autocast():
                    yield normalise_clips(b["clip"].to(self.device), self.sampling)

        t0 = time.perf_counter()
        compute_precise_bn(self.model, batches(), num_iters)  # averages over processes itself
        self.precise_bn_done_at = iteration
        logger.info(
            "precise BN at iteration %d: %d batches of %d clips per process (%.1f s)",
            iteration,
            num_iters,
            per,
            time.perf_counter() - t0,
        )

    # -- validation
    def validate(self, iteration: int) -> dict | None:
        if self.val_set is None:
            return None
        t0 = time.perf_counter()
        dataset = self.val_set  # read and checked before the first iteration
        n = len(dataset)
        positions = range(self.ctx.rank, n, self.ctx.world_size)
        loader = _loader(dataset, _Positions(positions), self.micro, self.opts.workers, iteration)
        self.model.eval()
        top1 = top5 = count = 0.0
        try:
            with torch.no_grad():
                for b in loader:
                    x = normalise_clips(b["clip"].to(self.device), self.sampling)
                    y = b["label"].to(self.device)
                    with self.autocast():
                        logits = self.model(x).float()
                    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                    hit = top == y[:, None]
                    top1 += float(hit[:, 0].sum())
                    top5 += float(hit.any(dim=1).sum())
                    count += len(y)
        finally:
            self.model.train()
        top1, top5, count = self.allreduce([top1, top5, count])
        result = {
            "iteration": iteration,
            "top1_err": 1 - top1 / count,
            "top5_err": 1 - top5 / count,
        }
        if self.metrics is not None:
            self.metrics.val(
                iteration,
                {
                    "top1_err": result["top1_err"],
                    "top5_err": result["top5_err"],
                    "clips": int(count),
                    "seconds": round(time.perf_counter() - t0, 3),
                },
            )
        logger.info(
            "val at iteration %d: top-1 error %.2f%%, top-5 error %.2f%% (%d random-crop clips)",
            iteration,
            100 * result["top1_err"],
            100 * result["top5_err"],
            int(count),
        )
        return result

    # -- checkpoints
    def save(self, iteration: int, last_lr: float) -> None:
        self.precise_bn(iteration)
        if not self.ctx.is_main:
            self.ctx.barrier()
            return
        out = self.opts.output_dir
        state = self.model.state_dict()
        momentum = solver.caffe2_momentum_blobs(self.optimizer)
        refuse_nonfinite(
            checkpoint_problems([*state.items(), *momentum.items(), ("lr", np.float64(last_lr))]),
            f"checkpoint {iteration} not written (the checkpoints already written are kept)",
        )
        train_state = {
            "iteration": int(iteration),
            "data_position": int(iteration) * int(self.cfg.TRAIN.BATCH_SIZE),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "lists": dict(self.lists),
            **self.settings,
            "decode_failures": int(self.failures),
            "precise_bn_done_at": int(self.precise_bn_done_at),
            "last_lr": float(last_lr),
        }
        meta = {
            "source": "vnl-train",
            "iteration": int(iteration),
            "train_list_sha256": self.lists.get("train", ""),
            **self.opts.extra_meta,
        }
        path = pt_path(out, iteration)
        remove_stale_checkpoint_temporaries(path)
        save_training_checkpoint(path, state, self.cfg, meta, train_state)  # the .pt first
        if self.opts.write_caffe2:
            self.write_pkl(iteration, state, momentum, last_lr)
        self.last_checkpoint = str(path)
        logger.info("checkpoint %s%s", path, " (+ .pkl)" if self.opts.write_caffe2 else "")
        self.ctx.barrier()

    def write_pkl(self, iteration: int, state: dict, momentum: dict, last_lr: float) -> None:
        """``c2_model_iter<N>.pkl``: the original's ``save_model_params`` layout."""
        path = pkl_path(self.opts.output_dir, iteration)
        remove_stale_checkpoint_temporaries(path)
        blobs: dict[str, Any] = dict(state_dict_to_blobs(state))
        blobs.update(momentum)
        blobs["lr"] = np.array(last_lr, dtype=np.float32)
        blobs["model_iter"] = int(iteration)
        write_caffe2_pkl(blobs, path, protocol=2, wrapped=True)


def train(opts: TrainOptions, ctx: DistContext) -> dict:
    """Run (or continue) a training run; returns a summary (final iteration, checkpoint, val)."""
    cfg = opts.cfg
    micro = check_train_cfg(cfg, ctx.world_size, opts.accumulate, opts.precision, ctx.device)
    check_run_settings(cfg, opts)
    inputs = {
        "--train-list": opts.train_list,
        "--val-list": opts.val_list,
        "TRAIN.PARAMS_FILE": cfg.TRAIN.PARAMS_FILE,
    }
    metrics = MetricsLog(opts.output_dir, enabled=ctx.is_main, tensorboard=opts.tensorboard)
    with contextlib.ExitStack() as held:

        def claim() -> None:  # one process checks and locks; every process gets the verdict
            check_inputs_not_checkpoints(opts.output_dir, inputs)
            metrics.check([p for p in inputs.values() if p])
            held.enter_context(run_lock(opts.output_dir))

        ctx.on_main(claim, refusals=(OSError,))
        held.enter_context(run_arithmetic(opts.precision, ctx.device))
        held.callback(metrics.close)
        return _train(opts, ctx, micro, metrics)


@dataclass
class _Data:
    sampling: TrainSampling
    train_set: TrainClipDataset
    val_set: TrainClipDataset | None
    lists: dict[str, str]  # sha256 of the list files, recorded in the checkpoints


def _read_data(opts: TrainOptions, cfg) -> _Data:
    """Both lists read and checked (a list with no usable line is refused) before anything is
    built: a bad validation list must not end a run after its iterations."""
    sampling = TrainSampling.from_cfg(cfg)
    classes = cfg.MODEL.NUM_CLASSES
    train_list = read_video_list(opts.train_list, opts.data_root, classes)
    train_set = TrainClipDataset(train_list, sampling, int(cfg.RNG_SEED), opts.backend)
    val_set, val_digest = None, ""
    if opts.val_list:
        val_list = read_video_list(opts.val_list, opts.data_root, classes)
        val_set = TrainClipDataset(val_list, sampling, int(cfg.RNG_SEED), opts.backend, stream=(1,))
        val_digest = val_list.sha256
    lists = {"train": train_list.sha256, "val": val_digest}
    return _Data(sampling, train_set, val_set, lists)


def _resume_point(opts: TrainOptions, ctx: DistContext) -> ResumePoint | None:
    """:func:`.train_resume.decide_resume` on the main process, its verdict on every one."""
    cfg = opts.cfg
    resume = bool(opts.resume or cfg.CHECKPOINT.RESUME)
    verdict = ctx.on_main(
        lambda: decide_resume(opts.output_dir, resume=resume, start_over=opts.start_over),
        refusals=(TrainingError,),
    )
    if verdict is None and opts.resume:
        logger.info("--resume: no checkpoint in %s yet; starting a new run", opts.output_dir)
    return verdict


def _check_start_iter(cfg, start_iter: int) -> None:
    """A params file whose ``model_iter`` is at or past ``SOLVER.MAX_ITER`` trains nothing."""
    max_iter = int(cfg.SOLVER.MAX_ITER)
    if start_iter >= max_iter:
        raise TrainingError(
            f"TRAIN.PARAMS_FILE {cfg.TRAIN.PARAMS_FILE} holds model_iter {start_iter}, at or "
            f"past SOLVER.MAX_ITER {max_iter}: there is nothing to train (the original starts "
            f"at a file's model_iter; TRAIN.RESET_START_ITER True trains its weights from 0)"
        )


def _restore_pt(data: dict, model, optimizer, point: ResumePoint) -> int:
    """This trainer's ``.pt``: weights, optimizer, RNG states; returns the iteration."""
    model.load_state_dict(data["state_dict"], strict=True)
    optimizer.load_state_dict(data["train"]["optimizer"])
    start_iter = int(data["train"]["iteration"])
    torch.set_rng_state(data["train"]["torch_rng"])
    if torch.cuda.is_available() and data["train"]["cuda_rng"]:
        torch.cuda.set_rng_state_all(data["train"]["cuda_rng"])
    logger.info("resumed from %s at iteration %d", point.path, start_iter)
    return start_iter


def _prepare_outputs(run: _Run, start_iter: int, last_lr: float, resumed_pt: bool) -> None:
    """On the main process, just before the first iteration: ``--start-over`` deletes the old
    checkpoints, ``metrics.jsonl`` is continued at ``start_iter``, and a ``.pt`` resumed from
    gets back its ``.pkl`` if a kill came between the two writes."""
    opts = run.opts
    if run.ctx.is_main:
        if opts.start_over:
            removed = remove_checkpoints(opts.output_dir)
            if removed:
                logger.warning("--start-over: deleted %d checkpoint file(s)", len(removed))
        assert run.metrics is not None
        run.metrics.open(start_iter)
        if resumed_pt and opts.write_caffe2 and not pkl_path(opts.output_dir, start_iter).exists():
            momentum = solver.caffe2_momentum_blobs(run.optimizer)
            run.write_pkl(start_iter, run.model.state_dict(), momentum, last_lr)
            logger.info("wrote the missing %s", pkl_path(opts.output_dir, start_iter))
    run.ctx.barrier()


def _train(opts: TrainOptions, ctx: DistContext, micro: int, metrics: MetricsLog) -> dict:
    cfg = opts.cfg
    data = _read_data(opts, cfg)
    point = _resume_point(opts, ctx)
    settings = run_settings(
        world_size=ctx.world_size,
        accumulate=opts.accumulate,
        precision=opts.precision,
        backend=opts.backend,
        data_root=opts.data_root,
        device=ctx.device,
    )
    resume_data = None
    if point is not None and not point.is_caffe2:
        resume_data = load_training_checkpoint(point.path)
        refuse_nonfinite(
            training_checkpoint_problems(resume_data), f"cannot resume from {point.path}"
        )
        check_resume(resume_data, cfg, data.lists, settings, point.path)

    torch.manual_seed(int(cfg.RNG_SEED))
    np.random.seed(int(cfg.RNG_SEED))
    model = build_model(cfg, split="train").to(ctx.device)
    start_iter = 0
    if point is None and cfg.TRAIN.PARAMS_FILE:
        start_iter = initialise_from_params_file(model, cfg, cfg.TRAIN.PARAMS_FILE)
        _check_start_iter(cfg, start_iter)
    optimizer = solver.build_optimizer(model, cfg)
    last_lr = solver.lr_at(cfg, start_iter)
    if resume_data is not None:
        start_iter = _restore_pt(resume_data, model, optimizer, point)
        last_lr = float(resume_data["train"]["last_lr"])
    elif point is not None:  # the original's c2_model_iter<N>.pkl
        start_iter, last_lr = load_caffe2_checkpoint(point, model, optimizer, cfg)
    ddp: torch.nn.Module = model
    if ctx.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            broadcast_buffers=False,  # per-device BN statistics, as the original's GPUs
        )
    run = _Run(
        opts,
        ctx,
        cfg,
        model,
        ddp,
        optimizer,
        data.sampling,
        data.train_set,
        micro,
        data.lists,
        settings,
        val_set=data.val_set,
        metrics=metrics,
    )
    if resume_data is not None:
        run.failures = int(resume_data["train"].get("decode_failures", 0))
        run.precise_bn_done_at = int(resume_data["train"].get("precise_bn_done_at", -1))
    if point is not None:
        run.last_checkpoint = point.path
    _prepare_outputs(run, start_iter, last_lr, resumed_pt=resume_data is not None)
    summary = _loop(run, start_iter, last_lr)
    if point is not None and start_iter >= int(cfg.SOLVER.MAX_ITER):
        logger.info("the run had already finished at iteration %d", start_iter)
    return summary


def _loop(run: _Run, start_iter: int, last_lr: float) -> dict:
    """The iterations ``start_iter .. MAX_ITER - 1``: step, log line and metrics record,
    validation, checkpoints."""
    cfg, opts, ctx = run.cfg, run.opts, run.ctx
    max_iter = int(cfg.SOLVER.MAX_ITER)
    period = int(cfg.CHECKPOINT.CHECKPOINT_PERIOD)
    eval_period = int(cfg.TRAIN.EVAL_PERIOD)
    log_period = int(cfg.LOG_PERIOD)
    batch = int(cfg.TRAIN.BATCH_SIZE)
    per_rank = batch // ctx.world_size
    sampler = TrainSampler(start_iter, max_iter, batch, ctx.rank, ctx.world_size)
    loader = _loader(run.train_set, sampler, per_rank, opts.workers, int(cfg.RNG_SEED))
    logger.info(
        "training %s: iterations %d..%d, global batch %d = %d process(es) x %d micro-batch(es) "
        "x %d clips, %s, device %s",
        cfg.MODEL.MODEL_NAME,
        start_iter,
        max_iter,
        batch,
        ctx.world_size,
        opts.accumulate,
        run.micro,
        opts.precision,
        ctx.device,
    )
    bar = None
    if opts.progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=max_iter, initial=start_iter, unit="it", desc="train", dynamic_ncols=True)
    run.model.train()
    val_result = None
    window_t = time.perf_counter()
    data_time = 0.0
    window_iters = 0
    totals = {"clips": 0, "data_seconds": 0.0, "first_batch_seconds": 0.0}
    run_t0 = time.perf_counter()
    it = start_iter
    t_data = time.perf_counter()
    for it, batch_data in zip(range(start_iter, max_iter), loader):
        waited = time.perf_counter() - t_data
        data_time += waited
        if it == start_iter:
            totals["first_batch_seconds"] = waited
        else:
            totals["data_seconds"] += waited
            totals["clips"] += batch
        stats = run.step(it, batch_data)
        last_lr = stats["lr"]
        run.failures += stats["failures"]
        window_iters += 1
        done = it + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.3g}")
        if done % log_period == 0 or done == max_iter:
            elapsed = time.perf_counter() - window_t
            _log_iteration(run, done, stats, window_iters, elapsed, data_time)
            window_t, window_iters, data_time = time.perf_counter(), 0, 0.0
        if eval_period > 0 and done % eval_period == 0 and run.val_set is not None:
            run.precise_bn(done)
            val_result = run.validate(done)
        if (period > 0 and done % period == 0) or done == max_iter:
            run.save(done, last_lr)
        t_data = time.perf_counter()
    if bar is not None:
        bar.close()
    summary = {
        "iteration": max(it + 1, start_iter) if max_iter > start_iter else start_iter,
        "checkpoint": run.last_checkpoint,
        "val": val_result,
        "decode_failures": run.failures,
        "model": run.model,
        "throughput": {**totals, "seconds": time.perf_counter() - run_t0},
    }
    if run.failures:
        logger.warning("%d training samples were replaced because their video failed", run.failures)
    return summary


def _log_iteration(
    run: _Run, done: int, stats: dict, iters: int, elapsed: float, data_time: float
) -> None:
    """The log line of iteration ``done`` and its ``metrics.jsonl`` record (the window: the
    ``iters`` iterations since the previous line)."""
    max_iter = int(run.cfg.SOLVER.MAX_ITER)
    batch = int(run.cfg.TRAIN.BATCH_SIZE)
    rate = iters * batch / elapsed if elapsed > 0 else float("nan")
    eta = (max_iter - done) * batch / rate if rate > 0 else float("nan")
    data_share = data_time / elapsed if elapsed > 0 else 0.0
    logger.info(
        "iter %d/%d  lr %.6g  loss %.4f  top1_err %.2f%%  top5_err %.2f%%  "
        "%.2f clips/s  data %.0f%%  eta %s%s",
        done,
        max_iter,
        stats["lr"],
        stats["loss"],
        100 * stats["top1_err"],
        100 * stats["top5_err"],
        rate,
        100 * data_share,
        _fmt_seconds(eta),
        f"  ({run.failures} videos replaced so far)" if run.failures else "",
    )
    if run.metrics is not None:
        run.metrics.train(
            done,
            {
                "lr": stats["lr"],
                "loss": stats["loss"],
                "top1_err": stats["top1_err"],
                "top5_err": stats["top5_err"],
                "clips_per_s": rate,
                "iter_seconds": elapsed / iters if iters else None,
                "data_seconds": data_time,
                "data_fraction": data_share,
                "eta_seconds": eta,
                "videos_replaced": run.failures,
            },
        )


def _fmt_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"
