"""torch.distributed for evaluation: ``torchrun --nproc_per_node=K vnl-test ...``.

Videos (never views) are split into ``K`` contiguous shards of the videos still to evaluate, so
each video's views are scored by one process in the same batches as in a single-process run.
``gloo`` is used on CPU, ``nccl`` on GPUs (one GPU per process, ``LOCAL_RANK``).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..utils.device import default_device

__all__ = ["DistContext", "init_distributed", "shard"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Ranks wait for each other at the end (slowest shard, then the merge); allow for long runs.
TIMEOUT = datetime.timedelta(hours=6)


@dataclass
class DistContext:
    """This process's place in the run (``world_size == 1`` without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this context initialised the process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(
        self,
        step: Callable[[], T],
        refusals: tuple[type[BaseException], ...] = (OSError, ValueError),
    ) -> T:
        """Run ``step`` on the main process only and hand its result to every process.

        The one "claim, broadcast, refuse" of the package: checking and locking outputs,
        preparing a results folder, anything one process must decide for all. An exception of
        ``refusals`` (an output that is an input, a held lock, a results folder of another run)
        is raised on every process, so all of them stop with the same one-line error instead of
        the others waiting forever; any other exception (a bug) is raised on the main process
        only, with its traceback. Example (the trainer's claim of its output folder)::

            ctx.on_main(lambda: held.enter_context(run_lock(output_dir)))
        """
        verdict: Any = None
        if self.is_main:
            try:
                verdict = ("ok", step())
            except refusals as e:
                verdict = ("refused", e)
        verdict = self.broadcast(verdict)
        if verdict is None:  # an exchange that hands this process its own value
            return None  # type: ignore[return-value]
        kind, value = verdict
        if kind == "refused":
            raise value
        return value

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: str | torch.device | None = None) -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE > 1``), or a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = default_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    ctx = DistContext(rank, world_size, local_rank, dev)
    if world_size > 1:
        if dist.is_initialized():
            ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
        else:
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=TIMEOUT)
            ctx.owns_group = True
            logger.info("rank %d/%d on %s (%s)", rank, world_size, dev, backend)
    return ctx


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Contiguous share ``rank`` of ``world_size`` (sizes differ by at most one)."""
    n = len(items)
    return list(items[rank * n // world_size : (rank + 1) * n // world_size])
