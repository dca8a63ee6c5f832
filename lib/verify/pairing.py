"""Which module of the PyTorch port outputs the same tensor as a layer of the reference graph.

The reference (:mod:`nonlocal_net.reference`) knows only the original's layers and blob names;
this pairing of its layer labels with the port's module paths belongs to the comparison.
"""

from __future__ import annotations

import re

__all__ = ["port_module"]

_RESIDUAL = re.compile(r"res(\d+)_(\d+)")
_NONLOCAL = re.compile(r"nonlocal_conv(\d+)_(\d+)")


def port_module(label: str, split: str) -> str | None:
    """The dotted path of the port's module whose output is the reference layer ``label``
    (``res3_1`` -> ``res3.1``, ``nonlocal_conv4_5`` -> ``res4.nonlocal_5``, ``res_conv1_bn`` ->
    ``relu``; ``pool1``, ``pool2``, ``pool5`` and ``pred`` keep their names); ``""`` for the model
    itself (the ``test`` net's ``softmax``); ``None`` where the port has no module for it (the
    ``val`` net's ``softmax``: the port returns logits)."""
    if label == "softmax":
        return "" if split == "test" else None
    if label == "res_conv1_bn":
        return "relu"
    if m := _RESIDUAL.fullmatch(label):
        return f"res{m[1]}.{m[2]}"
    if m := _NONLOCAL.fullmatch(label):
        return f"res{m[1]}.nonlocal_{m[2]}"
    return label  # pool1, pool2, pool5, pred
