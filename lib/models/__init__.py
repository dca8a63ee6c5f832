"""Model definitions: the video ResNets, their blocks, and the released-model zoo."""

from .model_builder import build_model, get_cfg
from .resnet_video import ResNetVideo, obtain_arc
from .zoo import ZOO, get_zoo_entry, list_models

__all__ = [
    "ZOO",
    "ResNetVideo",
    "build_model",
    "get_cfg",
    "get_zoo_entry",
    "list_models",
    "obtain_arc",
]
