"""Parity proof: the converted PyTorch model against the original network, layer by layer.

:func:`compare_layers` runs the reference executor of the original Caffe2 graph
(:mod:`nonlocal_net.reference`, float64, on the checkpoint's own blobs) and the PyTorch model on
the same clips, and compares every named layer output (stem, pool1, each residual block, pool2,
each non-local block, pool5, ``pred``, ``softmax``) in float32 and float64.
:func:`verify_checkpoint` does the whole check for a Caffe2 ``.pkl`` (converting it in memory, or
loading a converted file); ``vnl-verify`` is its command line.

Typical use::

    from nonlocal_net.verify import verify_checkpoint
    report = verify_checkpoint("i3d_nonlocal_8x8_IN_pretrain_400k.pkl",
                               model="i3d_nonlocal_8x8_IN_pretrain_400k")
    print(report.format_table()); print(report.verdict())
"""

from .compare import (
    DEFAULT_TOLERANCE,
    DTYPES,
    LayerDiff,
    ParityReport,
    PrecisionRun,
    compare_layers,
    compare_port,
    no_tf32,
    reference_outputs,
)
from .conversion import random_clip, verify_checkpoint, video_clips

__all__ = [
    "DEFAULT_TOLERANCE",
    "DTYPES",
    "LayerDiff",
    "ParityReport",
    "PrecisionRun",
    "compare_layers",
    "compare_port",
    "no_tf32",
    "random_clip",
    "reference_outputs",
    "verify_checkpoint",
    "video_clips",
]
