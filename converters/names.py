"""The bijective naming rules between Caffe2 blob names and the model's state_dict keys.

Every parameter and buffer of every configuration the model supports (C2D/I3D, ResNet-50/101,
any non-local placement, ``NONLOCAL.NO_BIAS``, ``NONLOCAL.USE_BN``/``USE_AFFINE``,
``MODEL.USE_AFFINE``) is named by exactly one rule below, and each rule is a one-to-one
rewrite in both directions, so the mapping needs no knowledge of the configuration:

===========================================  =================================================
Caffe2 blob                                  state_dict key
===========================================  =================================================
``conv1_w``                                  ``conv1.weight``
``res_conv1_bn_<x>``                         ``res_conv1_bn.<y>``
``res<s>_<i>_branch<b>_w``                   ``res<s>.<i>.branch<b>.weight``
``res<s>_<i>_branch<b>_bn_<x>``              ``res<s>.<i>.branch<b>_bn.<y>``
``nonlocal_conv<s>_<i>_<part>_w`` / ``_b``   ``res<s>.nonlocal_<i>.<part>.weight`` / ``.bias``
``nonlocal_conv<s>_<i>_bn_<x>``              ``res<s>.nonlocal_<i>.bn.<y>``
``pred_w`` / ``pred_b``                      ``pred.weight`` / ``pred.bias``
===========================================  =================================================

with ``<b>`` in ``1, 2a, 2b, 2c``, ``<part>`` in ``theta, phi, g, out``, and the BN suffixes
``<x> -> <y>``: ``s -> weight``, ``b -> bias``, ``rm -> running_mean``, ``riv -> running_var``
(``_riv`` holds the running *variance*). ``<s>`` and ``<i>`` are copied
as written. A frozen affine (``MODEL.USE_AFFINE``) uses the same ``_bn_s``/``_bn_b`` names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "NAME_RULES",
    "NameRule",
    "blob_to_state_dict_key",
    "is_nonlocal_key",
    "state_dict_key_to_blob",
    "try_blob_to_state_dict_key",
    "try_state_dict_key_to_blob",
]

BN_SUFFIXES = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
CONV_SUFFIXES = {"w": "weight", "b": "bias"}
_BN_INVERSE = {v: k for k, v in BN_SUFFIXES.items()}
_CONV_INVERSE = {v: k for k, v in CONV_SUFFIXES.items()}

_N = "[0-9]+"
_BN = "s|b|rm|riv"
_BN_KEY = "weight|bias|running_mean|running_var"
_BRANCH = "1|2a|2b|2c"
_PART = "theta|phi|g|out"


@dataclass(frozen=True)
class NameRule:
    """One rewrite rule: ``blob_form`` <-> ``key_form`` (for the documentation), and the two
    regular expressions whose named groups carry the variable parts."""

    blob_form: str
    key_form: str
    blob_re: re.Pattern[str]
    key_re: re.Pattern[str]
    to_key: Callable[[dict[str, str]], str]
    to_blob: Callable[[dict[str, str]], str]


def _rule(
    blob_form: str,
    key_form: str,
    blob_re: str,
    key_re: str,
    to_key: Callable[[dict[str, str]], str],
    to_blob: Callable[[dict[str, str]], str],
) -> NameRule:
    return NameRule(blob_form, key_form, re.compile(blob_re), re.compile(key_re), to_key, to_blob)


NAME_RULES: tuple[NameRule, ...] = (
    _rule(
        "conv1_w",
        "conv1.weight",
        r"conv1_w",
        r"conv1\.weight",
        lambda g: "conv1.weight",
        lambda g: "conv1_w",
    ),
    _rule(
        "res_conv1_bn_<x>",
        "res_conv1_bn.<y>",
        rf"res_conv1_bn_(?P<x>{_BN})",
        rf"res_conv1_bn\.(?P<y>{_BN_KEY})",
        lambda g: f"res_conv1_bn.{BN_SUFFIXES[g['x']]}",
        lambda g: f"res_conv1_bn_{_BN_INVERSE[g['y']]}",
    ),
    _rule(
        "res<s>_<i>_branch<b>_w",
        "res<s>.<i>.branch<b>.weight",
        rf"res(?P<s>{_N})_(?P<i>{_N})_branch(?P<b>{_BRANCH})_w",
        rf"res(?P<s>{_N})\.(?P<i>{_N})\.branch(?P<b>{_BRANCH})\.weight",
        lambda g: f"res{g['s']}.{g['i']}.branch{g['b']}.weight",
        lambda g: f"res{g['s']}_{g['i']}_branch{g['b']}_w",
    ),
    _rule(
        "res<s>_<i>_branch<b>_bn_<x>",
        "res<s>.<i>.branch<b>_bn.<y>",
        rf"res(?P<s>{_N})_(?P<i>{_N})_branch(?P<b>{_BRANCH})_bn_(?P<x>{_BN})",
        rf"res(?P<s>{_N})\.(?P<i>{_N})\.branch(?P<b>{_BRANCH})_bn\.(?P<y>{_BN_KEY})",
        lambda g: f"res{g['s']}.{g['i']}.branch{g['b']}_bn.{BN_SUFFIXES[g['x']]}",
        lambda g: f"res{g['s']}_{g['i']}_branch{g['b']}_bn_{_BN_INVERSE[g['y']]}",
    ),
    _rule(
        "nonlocal_conv<s>_<i>_<part>_<w|b>",
        "res<s>.nonlocal_<i>.<part>.<weight|bias>",
        rf"nonlocal_conv(?P<s>{_N})_(?P<i>{_N})_(?P<p>{_PART})_(?P<x>w|b)",
        rf"res(?P<s>{_N})\.nonlocal_(?P<i>{_N})\.(?P<p>{_PART})\.(?P<y>weight|bias)",
        lambda g: f"res{g['s']}.nonlocal_{g['i']}.{g['p']}.{CONV_SUFFIXES[g['x']]}",
        lambda g: f"nonlocal_conv{g['s']}_{g['i']}_{g['p']}_{_CONV_INVERSE[g['y']]}",
    ),
    _rule(
        "nonlocal_conv<s>_<i>_bn_<x>",
        "res<s>.nonlocal_<i>.bn.<y>",
        rf"nonlocal_conv(?P<s>{_N})_(?P<i>{_N})_bn_(?P<x>{_BN})",
        rf"res(?P<s>{_N})\.nonlocal_(?P<i>{_N})\.bn\.(?P<y>{_BN_KEY})",
        lambda g: f"res{g['s']}.nonlocal_{g['i']}.bn.{BN_SUFFIXES[g['x']]}",
        lambda g: f"nonlocal_conv{g['s']}_{g['i']}_bn_{_BN_INVERSE[g['y']]}",
    ),
    _rule(
        "pred_<w|b>",
        "pred.<weight|bias>",
        r"pred_(?P<x>w|b)",
        r"pred\.(?P<y>weight|bias)",
        lambda g: f"pred.{CONV_SUFFIXES[g['x']]}",
        lambda g: f"pred_{_CONV_INVERSE[g['y']]}",
    ),
)

_NONLOCAL_KEY = re.compile(rf"res{_N}\.nonlocal_{_N}\.")


def try_blob_to_state_dict_key(blob: str) -> str | None:
    """The state_dict key of a Caffe2 blob name, or ``None`` if no rule names it."""
    for rule in NAME_RULES:
        m = rule.blob_re.fullmatch(blob)
        if m:
            return rule.to_key(m.groupdict())
    return None


def try_state_dict_key_to_blob(key: str) -> str | None:
    """The Caffe2 blob name of a state_dict key, or ``None`` if no rule names it."""
    for rule in NAME_RULES:
        m = rule.key_re.fullmatch(key)
        if m:
            return rule.to_blob(m.groupdict())
    return None


def blob_to_state_dict_key(blob: str) -> str:
    """The state_dict key of a Caffe2 blob name (``res3_1_branch2a_bn_riv`` ->
    ``res3.1.branch2a_bn.running_var``); ``KeyError`` for a name no rule covers."""
    key = try_blob_to_state_dict_key(blob)
    if key is None:
        raise KeyError(f"{blob!r} is not a blob name of these models (see NAME_RULES)")
    return key


def state_dict_key_to_blob(key: str) -> str:
    """The Caffe2 blob name of a state_dict key (``res4.nonlocal_5.theta.weight`` ->
    ``nonlocal_conv4_5_theta_w``); ``KeyError`` for a key no rule covers."""
    blob = try_state_dict_key_to_blob(key)
    if blob is None:
        raise KeyError(f"{key!r} is not a state_dict key of these models (see NAME_RULES)")
    return blob


def is_nonlocal_key(key: str) -> bool:
    """Whether a state_dict key belongs to a non-local block."""
    return _NONLOCAL_KEY.match(key) is not None
