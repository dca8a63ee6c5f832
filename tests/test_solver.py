"""The solver equals the original's Caffe2 update and LR schedule.

The reference here is written from the specification of the original's training (weight decay
``g + wd * p`` with ``wd`` chosen by the ``_bn`` substring of the blob name, Caffe2's Nesterov
``MomentumSGDUpdate`` with the LR inside the buffer, the buffer rescaled by ``new/old`` at an LR
change under ``SOLVER.SCALE_MOMENTUM``, frozen affines untouched) in NumPy float32, by blob name;
it shares no code with ``nonlocal_net.solver``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nonlocal_net as nl
from nonlocal_net import solver
from nonlocal_net.converters import state_dict_key_to_blob

NONAFFINE = "i3d_nonlocal_8x8_IN_pretrain_400k"
AFFINE = "i3d_nonlocal_32x4_I3D_pretrain_400k"
SMALL = ["RESNETS.WIDTH_PER_GROUP", "4", "MODEL.NUM_CLASSES", "5"]
# Three iterations with an LR change before the 2nd and the 3rd; weight decays large enough that
# applying the wrong one to a group is visible; distinct decays for the two groups.
SOLVER_3STEPS = [
    "SOLVER.BASE_LR",
    "0.2",
    "SOLVER.STEP_SIZES",
    "[1, 1, 1]",
    "SOLVER.LRS",
    "[1, 0.1, 0.5]",
    "SOLVER.MAX_ITER",
    "3",
    "SOLVER.WEIGHT_DECAY",
    "0.05",
    "SOLVER.WEIGHT_DECAY_BN",
    "0.02",
]


# ---------------------------------------------------------------------------------------------
# the independent reference
# ---------------------------------------------------------------------------------------------


def spec_lr(base_lr, step_sizes, lrs, it):
    """steps_with_relative_lrs: BASE_LR * LRS[k], k = number of boundaries <= it, minus 1."""
    bounds = np.cumsum([0, *step_sizes])
    k = int(np.sum(bounds <= it)) - 1
    return base_lr * lrs[k]


def numpy_caffe2_training(params, grads, lr_of_iter, *, wd, wd_bn, mu, nesterov, scale):
    """Run len(grads) iterations of the original's update on float32 NumPy arrays by name."""
    p = {n: v.astype(np.float32).copy() for n, v in params.items()}
    m = {n: np.zeros_like(v) for n, v in p.items()}
    mu = np.float32(mu)
    current = np.float32(lr_of_iter(0))
    for it, g_it in enumerate(grads):
        lr = np.float32(lr_of_iter(it))
        if lr != current:
            if scale and abs(lr - current) > abs(1e-7 * lr):
                factor = np.float32(float(lr) / float(current))
                m = {n: (v * factor).astype(np.float32) for n, v in m.items()}
            current = lr
        for n in p:
            decay = np.float32(wd_bn if "_bn" in n else wd)
            g = g_it[n] + decay * p[n]
            m_new = mu * m[n] + lr * g
            if nesterov:
                p[n] = p[n] - ((np.float32(1) + mu) * m_new - mu * m[n])
            else:
                p[n] = p[n] - m_new
            m[n] = m_new
    return p, m


def expected_trainable(model, affine: bool) -> list[str]:
    """Blob names that have a gradient in the original: not BN statistics, and no ``_bn_``
    blob at all in an affine model (AffineNd has no parameter gradient)."""
    names = [state_dict_key_to_blob(k) for k in model.state_dict()]
    names = [n for n in names if not n.endswith(("_rm", "_riv"))]
    if affine:
        names = [n for n in names if "_bn_" not in n]
    return names


def assert_close_by_name(actual: dict, expected: dict, rel: float = 1e-6):
    assert set(actual) == set(expected)
    for name in expected:
        a, e = np.asarray(actual[name]), np.asarray(expected[name])
        assert a.shape == e.shape, name
        scale = float(np.abs(e).max()) or 1.0
        err = float(np.abs(a - e).max())
        assert err <= rel * scale, f"{name}: max abs diff {err:.3g} > {rel} * {scale:.3g}"


def blob_params(model) -> dict[str, np.ndarray]:
    return {
        state_dict_key_to_blob(k): p.detach().numpy().copy() for k, p in model.named_parameters()
    }


def small_model(zoo: str, extra=()):
    overrides = SMALL + SOLVER_3STEPS + list(extra)
    if zoo == AFFINE:
        overrides += ["TRAIN.VIDEO_LENGTH", "8", "TRAIN.BATCH_SIZE", "16"]
    else:
        overrides += ["TRAIN.VIDEO_LENGTH", "2"]
    cfg = nl.get_cfg(zoo, overrides)
    torch.manual_seed(0)
    model = nl.build_model(cfg, split="train")
    with torch.no_grad():  # trained-like: no zero gammas, non-zero biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return cfg, model


# ---------------------------------------------------------------------------------------------
# LR schedule
# ---------------------------------------------------------------------------------------------


def test_lr_at_every_boundary_of_the_five_original_configs(original_config_files):
    for path in original_config_files.values():
        cfg = nl.get_cfg(path)
        s = cfg.SOLVER
        bounds = np.cumsum([0, *s.STEP_SIZES])
        assert bounds[-1] == s.MAX_ITER  # the 4th LRS entry is never reached
        its = {0, 1, s.MAX_ITER - 1}
        for b in bounds[1:-1]:
            its |= {int(b) - 1, int(b), int(b) + 1}
        for it in sorted(its):
            expected = spec_lr(s.BASE_LR, s.STEP_SIZES, s.LRS, it)
            assert solver.lr_at(cfg, it) == pytest.approx(expected, rel=1e-7), (path.name, it)


def test_lr_at_400k_values():
    cfg = nl.get_cfg("i3d_baseline_8x8_IN_pretrain_400k")
    table = {0: 0.01, 149999: 0.01, 150000: 0.001, 299999: 0.001, 300000: 1e-4, 399999: 1e-4}
    for it, lr in table.items():
        assert solver.lr_at(cfg, it) == pytest.approx(lr, rel=1e-7)
        assert solver.lr_at(cfg, it) == float(np.float32(lr))  # the float32 lr blob


def test_linear_warmup():
    cfg = nl.get_cfg(
        "i3d_baseline_8x8_IN_pretrain_400k",
        [
            "SOLVER.WARMUP.WARMUP_ON",
            "True",
            "SOLVER.WARMUP.WARMUP_START_LR",
            "0.001",
            "SOLVER.WARMUP.WARMUP_END_ITER",
            "2001",
        ],
    )
    for it in (0, 1, 1000, 1999, 2000, 2001, 5000):
        expected = it * (0.01 - 0.001) / 2000 + 0.001 if it < 2001 else 0.01
        assert solver.lr_at(cfg, it) == pytest.approx(expected, rel=1e-6), it


def test_unknown_policy_is_refused():
    cfg = nl.get_cfg(NONAFFINE, ["SOLVER.LR_POLICY", "cosine"])
    with pytest.raises(ValueError, match="cosine"):
        solver.lr_at(cfg, 0)


# ---------------------------------------------------------------------------------------------
# groups and the update
# ---------------------------------------------------------------------------------------------


def test_weight_decay_groups_follow_the_bn_substring_rule():
    cfg, model = small_model(NONAFFINE)
    opt = solver.build_optimizer(model, cfg)
    by_decay = {g["weight_decay"]: set(g["blob_names"]) for g in opt.param_groups}
    bn, other = by_decay[0.02], by_decay[0.05]
    assert "nonlocal_conv3_1_bn_s" in bn and "nonlocal_conv3_1_bn_b" in bn
    assert "res_conv1_bn_s" in bn and "res2_0_branch2c_bn_b" in bn
    for name in ("pred_b", "pred_w", "nonlocal_conv3_1_theta_b", "nonlocal_conv4_5_out_b"):
        assert name in other
    assert bn | other == set(expected_trainable(model, affine=False))
    assert all("_bn" in n for n in bn) and not any("_bn" in n for n in other)


@pytest.mark.parametrize("scale_momentum", [True, False])
@pytest.mark.parametrize("zoo", [NONAFFINE, AFFINE])
def test_three_steps_equal_the_numpy_reference(zoo, scale_momentum):
    affine = zoo == AFFINE
    cfg, model = small_model(zoo, ["SOLVER.SCALE_MOMENTUM", str(scale_momentum)])
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if "_bn" in k}
    opt = solver.build_optimizer(model, cfg)
    names = [n for g in opt.param_groups for n in g["blob_names"]]
    assert sorted(names) == sorted(expected_trainable(model, affine))
    start = blob_params(model)

    rng = np.random.default_rng(1)
    grads = [
        {n: rng.normal(0, 1, v.shape).astype(np.float32) for n, v in start.items()}
        for _ in range(3)
    ]
    params = dict(model.named_parameters())
    for it in range(3):
        solver.set_lr(opt, solver.lr_at(cfg, it))
        for key, p in params.items():
            p.grad = torch.from_numpy(grads[it][state_dict_key_to_blob(key)].copy())
        opt.step()

    ref_p, ref_m = numpy_caffe2_training(
        start,
        grads,
        lambda it: spec_lr(0.2, [1, 1, 1], [1, 0.1, 0.5], it),
        wd=0.05,
        wd_bn=0.02,
        mu=0.9,
        nesterov=True,
        scale=scale_momentum,
    )
    assert_close_by_name(blob_params(model), ref_p)
    # the momentum blobs are Caffe2's (LR inside)
    momenta = solver.caffe2_momentum_blobs(opt)
    assert_close_by_name({k.removesuffix("_momentum"): v for k, v in momenta.items()}, ref_m)
    # every parameter moved far beyond the tolerance, so the comparison is informative
    for n, v in ref_p.items():
        assert np.abs(v - start[n]).max() > 1e-3 * np.abs(v).max(), n
    # frozen affines (and BN statistics) never change
    after = model.state_dict()
    for k, v in frozen_before.items():
        if affine or k.endswith(("running_mean", "running_var")):
            assert torch.equal(after[k], v), k
    if affine:
        return
    # the two SCALE_MOMENTUM settings give different trajectories (the test sees the difference)
    other_p, _ = numpy_caffe2_training(
        start,
        grads,
        lambda it: spec_lr(0.2, [1, 1, 1], [1, 0.1, 0.5], it),
        wd=0.05,
        wd_bn=0.02,
        mu=0.9,
        nesterov=True,
        scale=not scale_momentum,
    )
    assert max(np.abs(other_p[n] - ref_p[n]).max() for n in ref_p) > 1e-3


@pytest.mark.slow
def test_plain_momentum_and_real_gradients():
    """NESTEROV False, gradients from a real backward pass of the training network."""
    # batches of 2 clips, one per-GPU BN group (TRAIN.BATCH_SIZE // NUM_GPUS)
    extra = ["SOLVER.NESTEROV", "False", "TRAIN.DROPOUT_RATE", "0.0"]
    extra += ["TRAIN.BATCH_SIZE", "2", "NUM_GPUS", "1"]
    cfg, model = small_model(NONAFFINE, extra)
    opt = solver.build_optimizer(model, cfg)
    start = blob_params(model)
    torch.manual_seed(3)
    clips = torch.randn(3, 2, 3, 2, 224, 224)
    labels = torch.tensor([[0, 3], [1, 4], [2, 2]])
    grads = []
    for it in range(3):
        solver.set_lr(opt, solver.lr_at(cfg, it))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(clips[it]), labels[it])
        loss.backward()
        grads.append(
            {state_dict_key_to_blob(k): p.grad.numpy().copy() for k, p in model.named_parameters()}
        )
        opt.step()
    ref_p, _ = numpy_caffe2_training(
        start,
        grads,
        lambda it: spec_lr(0.2, [1, 1, 1], [1, 0.1, 0.5], it),
        wd=0.05,
        wd_bn=0.02,
        mu=0.9,
        nesterov=False,
        scale=True,
    )
    assert_close_by_name(blob_params(model), ref_p)


def test_set_lr_rescales_only_on_a_real_change():
    cfg, model = small_model(NONAFFINE, ["SOLVER.SCALE_MOMENTUM", "True"])
    opt = solver.build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    before = solver.caffe2_momentum_blobs(opt)
    lr = solver.current_lr(opt)
    assert solver.set_lr(opt, lr) == 1.0  # unchanged
    assert solver.set_lr(opt, lr * (1 + 2e-8)) == 1.0  # below the original's 1e-7 threshold
    assert solver.set_lr(opt, lr / 4) == pytest.approx(0.25, rel=1e-6)
    after = solver.caffe2_momentum_blobs(opt)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], (v * np.float32(0.25)).astype(np.float32))
    assert solver.current_lr(opt) == pytest.approx(lr / 4, rel=1e-6)


def test_momentum_blobs_round_trip_and_loader_rules():
    cfg, model = small_model(NONAFFINE)
    opt = solver.build_optimizer(model, cfg)
    rng = np.random.default_rng(5)
    for it in range(2):
        solver.set_lr(opt, solver.lr_at(cfg, it))
        for p in model.parameters():
            p.grad = torch.from_numpy(rng.normal(0, 1, tuple(p.shape)).astype(np.float32))
        opt.step()
    blobs = solver.caffe2_momentum_blobs(opt)
    blobs["lr"] = np.array(solver.current_lr(opt), dtype=np.float32)  # as a checkpoint holds it
    assert blobs["pred_w_momentum"].shape == (5, 32 * 4 * 16)  # the FC layout of checkpoints

    # resume: a fresh optimizer with the loaded buffers continues exactly like the original one
    cfg2, model2 = small_model(NONAFFINE)
    model2.load_state_dict(model.state_dict())
    opt2 = solver.build_optimizer(model2, cfg2)
    assert solver.load_caffe2_momentum(opt2, blobs) == []
    assert solver.current_lr(opt2) == solver.current_lr(opt)
    grads = {
        k: rng.normal(0, 1, tuple(p.shape)).astype(np.float32) for k, p in model.named_parameters()
    }
    for m, o in ((model, opt), (model2, opt2)):
        solver.set_lr(o, solver.lr_at(cfg, 2))
        for k, p in m.named_parameters():
            p.grad = torch.from_numpy(grads[k].copy())
        o.step()
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k

    # the original loader's rules: missing -> zero; pred of another size skipped; else refused
    partial = {k: v for k, v in blobs.items() if k != "res2_0_branch2a_w_momentum"}
    partial["pred_w_momentum"] = np.zeros((400, 7), dtype=np.float32)
    missing = solver.load_caffe2_momentum(opt2, partial)
    assert sorted(missing) == ["pred_w_momentum", "res2_0_branch2a_w_momentum"]
    assert not np.any(solver.caffe2_momentum_blobs(opt2)["res2_0_branch2a_w_momentum"])
    bad = dict(blobs, res2_0_branch2a_w_momentum=np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="res2_0_branch2a_w_momentum"):
        solver.load_caffe2_momentum(opt2, bad)


def test_ddp_prefix_and_unknown_parameters():
    assert solver.parameter_blob_name("module.res3.0.branch2a_bn.weight") == "res3_0_branch2a_bn_s"
    assert solver.parameter_blob_name("_orig_mod.pred.bias") == "pred_b"
    with pytest.raises(ValueError, match=r"extra\.weight"):
        solver.build_optimizer(
            torch.nn.ModuleDict({"extra": torch.nn.Linear(2, 2)}), nl.get_cfg(NONAFFINE)
        )
