"""The original's blob inventory, derived from the specification's naming rules alone.

This module does not import the model code: it restates sections 2.1-2.5 of the specification
(builder naming rules, ``obtain_arc`` tables, non-local placement) so that tests can check the
PyTorch model, the converter and the synthetic checkpoints against an independent derivation.
"""

from __future__ import annotations

from dataclasses import dataclass

Blob = tuple[str, tuple[int, ...]]

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


@dataclass(frozen=True)
class Arch:
    """The settings that determine the blob inventory."""

    arc: int = 2
    depth: int = 50
    affine: bool = False
    conv3_nonlocal: bool = True
    conv4_nonlocal: bool = True
    layer_mod: int = 2
    nl_bn: bool = True
    nl_affine: bool = False
    nl_bias: bool = True
    num_classes: int = 400
    split: str = "val"  # "test" holds pred_w as a 1x1x1 conv weight


def temporal_radii(arc: int, depth: int) -> list[list[int]]:
    """Kernel radii of conv1 and of every res2..res5 block (spec 4.3), padded as the original."""
    n = STAGE_BLOCKS[depth]
    if arc == 1:
        lists = [[0], [0, 0, 0], [0, 0, 0, 0], [0] * 6, [0, 0, 0]]
    elif arc == 2:
        lists = [[2], [1, 1, 1], [1, 0, 1, 0], [1, 0, 1, 0, 1, 0], [0, 1, 0]]
    elif arc == 3:
        lists = [[0], [0, 0, 0], [0, 0, 0, 0], [0] * 23, [0, 0, 0]]
    elif arc == 4:
        lists = [[2], [1, 1, 1], [1, 0, 1, 0], [1, 0] * 11 + [1], [0, 1, 0]]
    else:
        raise ValueError(arc)
    for stage in range(4):
        lists[stage + 1] = (lists[stage + 1] + [0] * n[stage])[: n[stage]]
    return lists


def nonlocal_indices(arch: Arch) -> tuple[set[int], set[int]]:
    """Block indices of res3 and res4 followed by a non-local block (spec 2.4)."""
    if arch.depth == 101:
        mod3, mod4 = 2, arch.layer_mod * 4 - 1
    else:
        mod3 = mod4 = arch.layer_mod
    if not arch.conv3_nonlocal:
        mod3 = 1000
    if not arch.conv4_nonlocal:
        mod4 = 1000
    n = STAGE_BLOCKS[arch.depth]
    res3 = {i for i in range(n[1]) if i % mod3 == mod3 - 1}
    res4 = {i for i in range(n[2]) if i % mod4 == mod4 - 1}
    return res3, res4


def _norm(prefix: str, c: int, affine: bool) -> list[Blob]:
    names = ("s", "b") if affine else ("s", "b", "rm", "riv")
    return [(f"{prefix}_{n}", (c,)) for n in names]


def expected_blobs(arch: Arch) -> list[Blob]:
    """Every parameter and running-statistic blob, in the original's creation order."""
    radii = temporal_radii(arch.arc, arch.depth)
    nl3, nl4 = nonlocal_indices(arch)
    blobs: list[Blob] = []
    kt1 = 1 + 2 * radii[0][0]
    blobs.append(("conv1_w", (64, 3, kt1, 7, 7)))
    blobs += _norm("res_conv1_bn", 64, arch.affine)
    dim_in = 64
    plan = [(2, 64, 256), (3, 128, 512), (4, 256, 1024), (5, 512, 2048)]
    for (stage, inner, out), n_blocks in zip(plan, STAGE_BLOCKS[arch.depth]):
        for i in range(n_blocks):
            p = f"res{stage}_{i}"
            kt = 1 + 2 * radii[stage - 1][i]
            blobs.append((f"{p}_branch2a_w", (inner, dim_in, kt, 1, 1)))
            blobs += _norm(f"{p}_branch2a_bn", inner, arch.affine)
            blobs.append((f"{p}_branch2b_w", (inner, inner, 1, 3, 3)))
            blobs += _norm(f"{p}_branch2b_bn", inner, arch.affine)
            blobs.append((f"{p}_branch2c_w", (out, inner, 1, 1, 1)))
            blobs += _norm(f"{p}_branch2c_bn", out, arch.affine)
            if i == 0:  # channel change (res2) or stride 2 (res3-res5)
                blobs.append((f"{p}_branch1_w", (out, dim_in, 1, 1, 1)))
                blobs += _norm(f"{p}_branch1_bn", out, arch.affine)
            dim_in = out
            if (stage == 3 and i in nl3) or (stage == 4 and i in nl4):
                q = f"nonlocal_conv{stage}_{i}"
                c, ci = out, out // 2
                for part in ("theta", "phi", "g"):
                    blobs.append((f"{q}_{part}_w", (ci, c, 1, 1, 1)))
                    if arch.nl_bias:
                        blobs.append((f"{q}_{part}_b", (ci,)))
                blobs.append((f"{q}_out_w", (c, ci, 1, 1, 1)))
                if arch.nl_bias:
                    blobs.append((f"{q}_out_b", (c,)))
                if arch.nl_bn:
                    blobs += _norm(f"{q}_bn", c, affine=False)
                if arch.nl_affine:
                    blobs += _norm(f"{q}_bn", c, affine=True)
    pred_shape = (arch.num_classes, 2048) + ((1, 1, 1) if arch.split == "test" else ())
    blobs.append(("pred_w", pred_shape))
    blobs.append(("pred_b", (arch.num_classes,)))
    return blobs


def is_running_stat(name: str) -> bool:
    return name.endswith(("_rm", "_riv"))


def is_trainable(name: str, arch: Arch) -> bool:
    """Blobs with a gradient (spec 1.1): convs, SpatialBN scale/bias, pred; not AffineNd."""
    if is_running_stat(name):
        return False
    if name.endswith(("_bn_s", "_bn_b")):
        if name.startswith("nonlocal_conv"):
            return arch.nl_bn
        return not arch.affine
    return True


# The released models, described by the specification's table 5.2 (name -> Arch fields).
# Config overrides of the i3d_nonlocal_8x8 model and the architecture they give, for the
# flag-by-flag inventory checks of the port and of the reference graph.
FLAG_CASES: list[tuple[list[str], Arch]] = [
    # arc 2 with depth 101: res4 lists padded with zeros, as the original pads them
    (["MODEL.DEPTH", "101"], Arch(arc=2, depth=101)),
    (["NONLOCAL.NO_BIAS", "1"], Arch(nl_bias=False)),
    (["NONLOCAL.USE_BN", "False"], Arch(nl_bn=False)),
    (
        ["NONLOCAL.USE_BN", "False", "NONLOCAL.USE_AFFINE", "True"],
        Arch(nl_bn=False, nl_affine=True),
    ),
    (["NONLOCAL.LAYER_MOD", "1"], Arch(layer_mod=1)),
    (["NONLOCAL.CONV3_NONLOCAL", "False"], Arch(conv3_nonlocal=False)),
    (["NONLOCAL.CONV4_NONLOCAL", "False"], Arch(conv4_nonlocal=False)),
    (["MODEL.NUM_CLASSES", "101"], Arch(num_classes=101)),
    (["MODEL.USE_AFFINE", "True", "NONLOCAL.USE_BN", "False"], Arch(affine=True, nl_bn=False)),
]

RELEASED: dict[str, dict] = {
    "c2d_baseline_32x2_IN_pretrain_400k": dict(arc=1, conv3_nonlocal=False, conv4_nonlocal=False),
    "c2d_nonlocal_32x2_IN_pretrain_400k": dict(arc=1),
    "i3d_baseline_32x2_IN_pretrain_400k": dict(arc=2, conv3_nonlocal=False, conv4_nonlocal=False),
    "i3d_nonlocal_32x2_IN_pretrain_400k": dict(arc=2),
    "i3d_baseline_128x1_I3D_pretrain_400k": dict(
        arc=2, affine=True, conv3_nonlocal=False, conv4_nonlocal=False, nl_bn=False
    ),
    "i3d_nonlocal_128x1_I3D_pretrain_400k": dict(arc=2, affine=True, nl_bn=False),
    "c2d_baseline_8x8_IN_pretrain_400k": dict(arc=1, conv3_nonlocal=False, conv4_nonlocal=False),
    "c2d_nonlocal_8x8_IN_pretrain_400k": dict(arc=1),
    "i3d_baseline_8x8_IN_pretrain_400k": dict(arc=2, conv3_nonlocal=False, conv4_nonlocal=False),
    "i3d_nonlocal_8x8_IN_pretrain_400k": dict(arc=2),
    "i3d_baseline_32x4_I3D_pretrain_400k": dict(
        arc=2, affine=True, conv3_nonlocal=False, conv4_nonlocal=False, nl_bn=False
    ),
    "i3d_nonlocal_32x4_I3D_pretrain_400k": dict(arc=2, affine=True, nl_bn=False),
    "i3d_baseline_8x8_IN_pretrain_300k": dict(arc=2, conv3_nonlocal=False, conv4_nonlocal=False),
    "i3d_baseline_8x8_IN_pretrain_600k_4gpu": dict(
        arc=2, conv3_nonlocal=False, conv4_nonlocal=False
    ),
    "i3d_baseline_8x8_IN_pretrain_300k_4gpu": dict(
        arc=2, conv3_nonlocal=False, conv4_nonlocal=False
    ),
}
