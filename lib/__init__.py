"""video-nonlocal-net for PyTorch: a faithful port of FAIR's Caffe2 Non-local Neural Networks.

Typical use::

    import nonlocal_net as nl
    cfg = nl.get_cfg("i3d_nonlocal_8x8_IN_pretrain_400k")
    model = nl.build_model(cfg, split="test")
"""

from .core.config import ConfigError
from .engine.inference import PRECISIONS, prepare_for_inference
from .models import ZOO, build_model, get_cfg, get_zoo_entry, list_models
from .models.checkpoint import load_model

__version__ = "0.1.0"

__all__ = [
    "PRECISIONS",
    "ZOO",
    "ConfigError",
    "__version__",
    "build_model",
    "get_cfg",
    "get_zoo_entry",
    "list_models",
    "load_model",
    "prepare_for_inference",
]
