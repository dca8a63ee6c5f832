"""Mutation tests: deliberate porting mistakes make the parity check fail at the right layer.

Each mistake a port of the original is likely to make (specification section 8) is introduced on
one side only, from the test: in the blobs given to the port (theta/phi swapped, ``1/riv``), by
changing modules of the built PyTorch model (pool1 padded, the non-local max pool moved after the
convs, the ``1/sqrt(C')`` scale dropped, a non-local reshape with the config batch size), or in
the reference (the original's config batch against a real batch). The comparison must fail and
name the *first* diverging layer, with every layer before it within tolerance, and ``vnl-verify``
must exit with status 1 naming that layer.

The network is the small case of ``parity_cases`` (C2D with non-local, 4 frames, 224 crops, a
real batch of 2 against a config batch of 1), so each run takes a few seconds.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parity_cases import SMALL, SMALL_BATCH, SMALL_SPLIT
from torch import nn

import nonlocal_net as nl
from nonlocal_net.converters import convert_blobs
from nonlocal_net.core.weights_file import save_weights_file
from nonlocal_net.models import model_builder
from nonlocal_net.models.nonlocal_helper import NonLocalBlock
from nonlocal_net.reference import build_graph, config_batch_size
from nonlocal_net.verify import compare_port, random_clip, reference_outputs
from nonlocal_net.verify.cli import main

FIRST_NONLOCAL = "nonlocal_conv3_1"
FIRST_BN = "res_conv1_bn"  # conv1 -> res_conv1_bn -> ReLU: the stem's checkpoint


# ---------------------------------------------------------------------------------------------
# The mutations
# ---------------------------------------------------------------------------------------------


def swap_theta_phi(blobs: dict) -> dict:
    """theta's weights and bias where phi's belong and vice versa, in every non-local block."""
    out = dict(blobs)
    for name in blobs:
        if "_theta_" in name and not name.endswith("_momentum"):
            phi = name.replace("_theta_", "_phi_")
            out[name], out[phi] = blobs[phi], blobs[name]
    return out


def inverse_riv(blobs: dict) -> dict:
    """``_riv`` read as an inverse variance (trap 1): the port gets ``1 / riv``."""
    return {k: (np.float32(1) / v if k.endswith("_riv") else v) for k, v in blobs.items()}


def pad_pool1(model: nn.Module) -> None:
    """pool1 with torchvision's padding 1 (trap 2): 112 -> 56 instead of 55."""
    old = model.pool1
    model.pool1 = nn.MaxPool3d(old.kernel_size, stride=old.stride, padding=(0, 1, 1))


def _nonlocal_blocks(model: nn.Module) -> list[NonLocalBlock]:
    blocks = [m for m in model.modules() if isinstance(m, NonLocalBlock)]
    assert blocks, "the mutation needs a model with non-local blocks"
    return blocks


def pool_after_convs(model: nn.Module) -> None:
    """phi and g computed on the unpooled input and max-pooled afterwards (forward hooks that
    replace the convs' outputs, so the parameter names stay and weights still load)."""
    for block in _nonlocal_blocks(model):
        pool, block.pool = block.pool, None
        for conv in (block.phi, block.g):
            conv.register_forward_hook(lambda _module, _inputs, output, pool=pool: pool(output))


def drop_scale(model: nn.Module) -> None:
    """No ``1/sqrt(C')`` on the affinity before the softmax."""
    for block in _nonlocal_blocks(model):
        block.scale = 1.0


def config_batch_reshape(batch: int) -> Callable[[nn.Module], None]:
    """The non-local reshapes with the config's batch ``batch`` instead of the real one, as the
    original's ``spacetime_nonlocal`` does (trap 6)."""

    def attention(self: NonLocalBlock, x: torch.Tensor) -> torch.Tensor:
        c = self.dim_inner
        theta = self.theta(x).reshape(batch, c, -1)
        xp = self.pool(x) if self.pool is not None else x
        phi = self.phi(xp).reshape(batch, c, -1)
        g = self.g(xp).reshape(batch, c, -1)
        p = F.softmax(torch.bmm(theta.transpose(1, 2), phi) * self.scale, dim=2)
        y = torch.bmm(g, p.transpose(1, 2))
        z = self.out(y.reshape(x.shape[0], c, *x.shape[2:]))
        return self.bn(z) if self.bn is not None else z

    def mutate(model: nn.Module) -> None:
        for block in _nonlocal_blocks(model):
            block._attention = types.MethodType(attention, block)

    return mutate


CONFIG_BATCH = config_batch_size(SMALL.cfg())
BLOB_MUTATIONS = {
    "theta_phi_swapped": (swap_theta_phi, FIRST_NONLOCAL),
    "inverse_riv": (inverse_riv, FIRST_BN),
}
MODEL_MUTATIONS = {
    "pool1_padded": (pad_pool1, "pool1"),
    "nonlocal_pool_after_convs": (pool_after_convs, FIRST_NONLOCAL),
    "nonlocal_scale_dropped": (drop_scale, FIRST_NONLOCAL),
    "nonlocal_config_batch": (config_batch_reshape(CONFIG_BATCH), FIRST_NONLOCAL),
}


# ---------------------------------------------------------------------------------------------
# The comparison function
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(small_checkpoint):
    _, blobs = small_checkpoint
    cfg = SMALL.cfg()
    graph = build_graph(cfg, SMALL_SPLIT)
    clips = random_clip(cfg, batch=SMALL_BATCH, split=SMALL_SPLIT, seed=3)
    reference = reference_outputs(graph, blobs, clips)
    return types.SimpleNamespace(blobs=blobs, cfg=cfg, graph=graph, clips=clips, ref=reference)


def _port(setup, blobs=None) -> nn.Module:
    model = nl.build_model(setup.cfg, SMALL_SPLIT)
    model.load_state_dict(convert_blobs(blobs or setup.blobs, setup.cfg).state_dict)
    return model


def _assert_first_failure(run, label: str) -> None:
    labels = [x.label for x in run.layers]
    assert run.first_failure is not None, f"the mutation went unnoticed:\n{run.layers}"
    assert run.first_failure.label == label
    before = labels.index(label)
    assert all(x.ok for x in run.layers[:before]), "a layer before the mutation diverged"
    assert run.first_failure.rel > 10 * run.tol  # a clear signal, not a borderline one


def test_unmutated_port_passes(setup):
    assert config_batch_size(setup.cfg) == 1 and setup.clips.shape[0] == 2
    run = compare_port(_port(setup), setup.graph, setup.ref, setup.clips, dtype="float32")
    assert run.ok, run.first_failure


@pytest.mark.parametrize("mutation", sorted(BLOB_MUTATIONS))
def test_blob_mutation_names_the_first_diverging_layer(setup, mutation):
    mutate, label = BLOB_MUTATIONS[mutation]
    model = _port(setup, mutate(setup.blobs))
    run = compare_port(model, setup.graph, setup.ref, setup.clips, dtype="float32")
    _assert_first_failure(run, label)


@pytest.mark.parametrize("mutation", sorted(MODEL_MUTATIONS))
def test_model_mutation_names_the_first_diverging_layer(setup, mutation):
    mutate, label = MODEL_MUTATIONS[mutation]
    model = _port(setup)
    mutate(model)
    run = compare_port(model, setup.graph, setup.ref, setup.clips, dtype="float32")
    _assert_first_failure(run, label)
    if mutation == "pool1_padded":
        assert run.first_failure.port_shape[-1] == 56 and run.first_failure.shape[-1] == 55
        assert "shape" in run.first_failure.note


def test_reference_with_the_config_batch_mixes_clips(setup):
    """The original's own computation with its config batch (1) on a real batch of 2 differs
    from the port from the first non-local block on: the port does not mix clips."""
    mixed = reference_outputs(setup.graph, setup.blobs, setup.clips, batch_size="config")
    run = compare_port(_port(setup), setup.graph, mixed, setup.clips, dtype="float32")
    _assert_first_failure(run, FIRST_NONLOCAL)


# ---------------------------------------------------------------------------------------------
# The command line: exit status 1 and the first diverging layer named
# ---------------------------------------------------------------------------------------------


def _cli(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    out, _ = capsys.readouterr()
    return rc, out


SMALL_ARGS = [
    "--model", SMALL.zoo, *SMALL.overrides, "--split", SMALL_SPLIT, "--batch", str(SMALL_BATCH),
    "--precision", "fp32", "--seed", "3",
]  # fmt: skip


def _assert_cli_names(rc: int, out: str, label: str) -> None:
    assert rc == 1, out
    (verdict,) = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert verdict.startswith(f"FAIL: first diverging layer {label} "), verdict
    (row,) = [line for line in out.splitlines() if line.startswith(label + " ")]
    assert "<- first" in row


@pytest.mark.slow
@pytest.mark.parametrize("mutation", sorted(BLOB_MUTATIONS))
def test_cli_fails_on_a_converted_file_with_mutated_blobs(
    small_checkpoint, tmp_path, capsys, mutation
):
    src, blobs = small_checkpoint
    mutate, label = BLOB_MUTATIONS[mutation]
    dst = tmp_path / "mutated.pt"
    cfg = SMALL.cfg()
    save_weights_file(dst, convert_blobs(mutate(blobs), cfg).state_dict, cfg)
    rc, out = _cli([src, dst, *SMALL_ARGS], capsys)
    _assert_cli_names(rc, out, label)


@pytest.mark.slow
@pytest.mark.parametrize("mutation", sorted(MODEL_MUTATIONS))
def test_cli_fails_on_a_mutated_model(small_checkpoint, monkeypatch, capsys, mutation):
    mutate, label = MODEL_MUTATIONS[mutation]
    create = model_builder.MODEL_CREATORS["resnet_video"]

    def create_mutated(cfg, split):
        model = create(cfg, split)
        mutate(model)
        return model

    monkeypatch.setitem(model_builder.MODEL_CREATORS, "resnet_video", create_mutated)
    rc, out = _cli([small_checkpoint[0], *SMALL_ARGS], capsys)
    _assert_cli_names(rc, out, label)


@pytest.mark.slow
def test_cli_fails_with_the_originals_config_batch(small_checkpoint, capsys):
    rc, out = _cli([small_checkpoint[0], *SMALL_ARGS, "--reference-batch", "config"], capsys)
    _assert_cli_names(rc, out, FIRST_NONLOCAL)
