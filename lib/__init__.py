"""video-nonlocal-net for PyTorch: a faithful port of FAIR's Caffe2 Non-local Neural Networks.

Typical use::

    import nonlocal_net as nl
    model = nl.create_model("i3d_nonlocal_8x8_IN_pretrain_400k", pretrained=True)  # downloaded once
    names = nl.class_names(model)  # the Kinetics-400 names, by class id
    model = nl.create_model("i3d_nonlocal_8x8_IN_pretrain_400k", weights="released.pkl")
    model = nl.load_model("converted.pt")
    cfg = nl.get_cfg("i3d_nonlocal_8x8_IN_pretrain_400k")
    model = nl.build_model(cfg, split="test")
"""

from .api import class_names, create_model, load_model
from .core.config import ConfigError, get_cfg
from .core.weights_file import WeightsFileError
from .core.zoo import ZOO, get_zoo_entry, list_models
from .datasets.class_names import kinetics400_class_names
from .engine.inference import PRECISIONS, prepare_for_inference
from .models import build_model
from .version import __version__

__all__ = [
    "PRECISIONS",
    "ZOO",
    "ConfigError",
    "WeightsFileError",
    "__version__",
    "build_model",
    "class_names",
    "create_model",
    "get_cfg",
    "get_zoo_entry",
    "kinetics400_class_names",
    "list_models",
    "load_model",
    "prepare_for_inference",
]
