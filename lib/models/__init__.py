"""Model definitions: the video ResNets and their blocks; :func:`build_model` and
:func:`load_model`. The released-model zoo table is :mod:`nonlocal_net.core.zoo`."""

from .model_builder import build_model, load_model
from .resnet_video import ResNetVideo, obtain_arc

__all__ = ["ResNetVideo", "build_model", "load_model", "obtain_arc"]
