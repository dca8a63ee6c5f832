"""``nonlocal_net.solver``: the original's training solver (see :mod:`nonlocal_net.engine.solver`).

The implementation lives in the engine layer because the weight-decay groups are defined on the
Caffe2 blob names of ``nonlocal_net.converters.names`` (engine may import converters; the package
root may not be imported by them). This module only re-exports it under the short name.
"""

from .engine.solver import (
    MOMENTUM_SUFFIX,
    Caffe2MomentumSGD,
    build_optimizer,
    caffe2_momentum_blobs,
    current_lr,
    load_caffe2_momentum,
    lr_at,
    parameter_blob_name,
    set_lr,
    weight_decay_groups,
)

__all__ = [
    "MOMENTUM_SUFFIX",
    "Caffe2MomentumSGD",
    "build_optimizer",
    "caffe2_momentum_blobs",
    "current_lr",
    "load_caffe2_momentum",
    "lr_at",
    "parameter_blob_name",
    "set_lr",
    "weight_decay_groups",
]
