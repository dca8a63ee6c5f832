"""The stages before the inference loop (:mod:`.runner`), the same for every command.

In order, each cheap check before the next expensive step and nothing written before the model
is known to run: the arguments and the decoding backend (:func:`check_model_source`), the list
(:func:`read_entries`: read, bounded, parsed), the outputs refused if they are inputs or
foreign files (:func:`refuse_outputs`, nothing created), then the first expensive step, the
model (:func:`load_test_model`), whose number of classes bounds the list's labels
(:func:`label_range`); the precision mode probed (:func:`prepare_model`), and only then the
outputs locked and prepared (:func:`claim_outputs`). :func:`my_items` is this process's share
of the videos.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ..datasets.decoders import available_backends
from ..datasets.stream import VideoItem
from ..datasets.video_list import ListEntry, VideoList, read_video_list
from ..pretrained import load_model, weights_label  # a weights file or a released model's name
from ..utils.io import OutputError, check_destination
from ..utils.lock import output_lock
from ..version import __version__
from .distributed import DistContext, shard
from .inference import prepare_for_inference

__all__ = [
    "Destination",
    "check_model_source",
    "claim_outputs",
    "label_range",
    "load_test_model",
    "model_fingerprint",
    "my_items",
    "package_version",
    "prepare_model",
    "read_entries",
    "recorded_weights",
    "refuse_outputs",
]


def package_version() -> str:
    """The package version recorded in every output file and report."""
    return __version__


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's state (names, dtypes, shapes, values): identifies the weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_model_source(
    weights: str | os.PathLike | None,
    model: torch.nn.Module | None,
    overrides: Sequence[str],
    backend: str,
    caller: str,
) -> None:
    """Refuse (``ValueError``) what no run can use, before anything is read: an unavailable
    decoding ``backend``, ``overrides`` with a given model, neither weights nor a model."""
    if backend not in available_backends():
        raise ValueError(
            f"video backend {backend!r} is not available (have {available_backends()})"
        )
    if model is not None and overrides:
        raise ValueError("overrides apply to weights loaded from a file, not to a given model")
    if model is None and weights is None:
        raise ValueError(
            f"{caller}() needs weights (a converted .pt file or a released model's name) or a model"
        )


def recorded_weights(weights: str | os.PathLike | None) -> str | None:
    """The weights as a header or report records them: a released model's name as given, a
    file's absolute path, None for a model passed in (:func:`..pretrained.weights_label`)."""
    return weights_label(weights) if weights is not None else None


def load_test_model(
    weights: str | os.PathLike | None, model: torch.nn.Module | None, overrides: Sequence[str]
) -> torch.nn.Module:
    """The test-split model: ``model`` as given, or loaded from ``weights`` with ``overrides``
    (the first expensive step; the caller ran :func:`check_model_source` and the cheap input
    checks before it)."""
    if model is not None:
        return model
    return load_model(weights, split="test", overrides=overrides)


def read_entries(
    list_file: str | os.PathLike, data_root: str | None, limit: int | None
) -> tuple[VideoList, list[ListEntry]]:
    """The list and the entries a run covers (the first ``limit``, or all), read before the
    model is built: a missing, unreadable, oversized or non-UTF-8 list stops the run here.
    Labels are bounded by the model's classes afterwards (:func:`label_range`)."""
    return _covered(read_video_list(list_file, data_root), limit)


def label_range(
    vlist: VideoList, num_classes: int, limit: int | None
) -> tuple[VideoList, list[ListEntry]]:
    """``vlist`` and its covered entries with the labels outside the model's ``num_classes``
    made bad lines (scored as wrong), as a list read with the classes known would have them."""
    return _covered(vlist.with_num_classes(num_classes), limit)


def _covered(vlist: VideoList, limit: int | None) -> tuple[VideoList, list[ListEntry]]:
    return vlist, list(vlist.entries if limit is None else vlist.entries[:limit])


def prepare_model(
    model: torch.nn.Module, device: torch.device, opts, record_layers: Sequence[str] = ()
) -> tuple[torch.nn.Module, str]:
    """``(model to run, fingerprint of the weights as given)``: the precision mode of ``opts``
    is set up (and refused, one line, if it cannot run here) before any output exists."""
    fingerprint = model_fingerprint(model)  # of the weights as given, before any folding
    prepared = prepare_for_inference(
        model,
        device,
        opts.precision,
        opts.compile,
        channels_last=getattr(opts, "channels_last", True),
        allow_tf32=getattr(opts, "allow_tf32", False),
        record_layers=record_layers,
    )
    return prepared, fingerprint


@dataclass(frozen=True)
class Destination:
    """A file a command writes: ``what`` names it in messages (``"results file"``),
    ``is_own(path)`` recognises a file of its kind (replaceable without ``--overwrite``)."""

    path: str
    what: str
    is_own: Callable[[str], bool]


def _listed_inputs(vlist: VideoList | None) -> list[str]:
    if vlist is None:
        return []
    return [vlist.resolve(e) for e in vlist.entries if e.ok]


def refuse_outputs(
    destinations: Sequence[Destination],
    inputs: Iterable[str | os.PathLike | None],
    vlist: VideoList | None,
    overwrite: bool,
) -> None:
    """Refuse (:class:`..utils.io.OutputError`) a destination that is an input (the list, the
    weights, any listed video, an earlier destination: links resolved, ``overwrite`` or not) or
    an existing file of another kind (unless ``overwrite``). Creates nothing."""
    named = [os.fspath(p) for p in inputs if p is not None]
    earlier: list[str] = []
    for dest in destinations:
        check_destination(
            dest.path,
            [*named, *earlier],
            what=dest.what,
            is_own_output=dest.is_own,
            replace_foreign=overwrite,
        )
        earlier.append(dest.path)
        if os.path.exists(dest.path):  # a listed video is an input too (one stat per video)
            _refuse_listed(dest, vlist)


def _refuse_listed(dest: Destination, vlist: VideoList | None) -> None:
    target = os.stat(dest.path)
    for path in _listed_inputs(vlist):
        try:
            found = os.stat(path)
        except OSError:  # a missing video is an error of its own, later
            continue
        if (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
            raise OutputError(
                f"{dest.path}: the {dest.what} is the listed video {path}; refusing to "
                f"overwrite an input"
            )


def claim_outputs(
    ctx: DistContext,
    held: contextlib.ExitStack,
    destinations: Sequence[Destination],
    inputs: Sequence[str | os.PathLike | None],
    vlist: VideoList | None,
    overwrite: bool,
    then: Callable[[], object] | None = None,
):
    """On the main process: refuse the outputs again (:func:`refuse_outputs`), lock them for
    the run (``held``), then run ``then`` (preparing the results folder); its result, or the
    refusal, goes to every process (:meth:`.distributed.DistContext.on_main`)."""

    def claim():
        refuse_outputs(destinations, inputs, vlist, overwrite)
        held.enter_context(output_lock(*(d.path for d in destinations)))
        return then() if then is not None else None

    return ctx.on_main(claim)


def my_items(
    entries: Sequence[ListEntry], vlist: VideoList, done: set[int], ctx: DistContext
) -> tuple[int, list[VideoItem]]:
    """``(videos still to run, this process's VideoItems)``: decodable entries not in
    ``done``, sharded contiguously across the processes."""
    todo = [e for e in entries if e.ok and e.video_id not in done]
    mine = shard(todo, ctx.rank, ctx.world_size)
    return len(todo), [VideoItem(e.video_id, vlist.resolve(e)) for e in mine]
