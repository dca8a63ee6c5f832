"""An independent executor of the original Caffe2 network, in NumPy (float64 by default).

It runs the original's operator sequence, with the original blob names, directly on a Caffe2
checkpoint's blobs: no converter and no PyTorch module is involved (this package imports neither
torch nor ``nonlocal_net.models``), so agreement between it and the converted PyTorch model is
evidence of a faithful port rather than of one implementation agreeing with itself.

Typical use::

    from nonlocal_net.reference import build_graph, run
    graph = build_graph(cfg, "test")  # cfg: a config node, e.g. nl.get_cfg(zoo_name)
    out = run(graph, blobs, clips)    # blobs: name -> ndarray; clips: (N, 3, T, H, W)
    out["softmax"], out["res3_1"], out["nonlocal_conv3_1"], out["pool5"]

* :mod:`.ops`: the Caffe2 operators (Conv, SpatialBN, AffineNd, pooling, Softmax, Reshape, ...).
* :mod:`.graph`: :func:`build_graph` -> :class:`Graph` (ops, parameter inventory, the
  tapped layer outputs).
* :mod:`.executor`: :func:`run`, :func:`load_params`.
"""

from .executor import ParameterError, load_params, run
from .graph import (
    SPLITS,
    Graph,
    GraphError,
    LayerTap,
    Op,
    ParamSpec,
    build_graph,
    config_batch_size,
    config_crop_size,
)
from .ops import Caffe2Error

__all__ = [
    "SPLITS",
    "Caffe2Error",
    "Graph",
    "GraphError",
    "LayerTap",
    "Op",
    "ParamSpec",
    "ParameterError",
    "build_graph",
    "config_batch_size",
    "config_crop_size",
    "load_params",
    "run",
]
