"""torch.hub entry points: one per released model, named as ``nonlocal_net.list_models()``.

::

    model = torch.hub.load("<checkout>", "i3d_nonlocal_8x8_IN_pretrain_400k", source="local",
                           pretrained=True)

``pretrained=True`` downloads the released Caffe2 ``.pkl`` once into the torch hub cache, converts
it once with the safe converter and caches the converted weights beside it (``VNL_ZOO_URL``
names a mirror: an http(s) URL, a ``file://`` URL or a folder); ``pretrained=False`` gives the
freshly initialised network. Other keyword arguments go to ``nonlocal_net.create_model``
(``split``, ``overrides``, ``map_location``).

The entry points use the installed ``nonlocal_net`` when it is already imported, else this
checkout's code (``lib/`` as ``nonlocal_net``, ``converters/`` as ``nonlocal_net.converters``,
as ``pyproject.toml`` maps them), so a plain clone works without ``pip install``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType as _ModuleType  # hub lists every public callable: keep these private
from typing import Any as _Any

dependencies = ["torch", "numpy", "yacs", "yaml", "h5py", "cv2", "tqdm"]

_ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_package(name: str, folder: str) -> _ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {name} from {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    return module


def _nonlocal_net() -> _ModuleType:
    """The ``nonlocal_net`` package: already imported, importable, or from this checkout."""
    if "nonlocal_net" in sys.modules:
        return sys.modules["nonlocal_net"]
    if importlib.util.find_spec("nonlocal_net") is None:
        package = _load_package("nonlocal_net", os.path.join(_ROOT, "lib"))
        converters = _load_package("nonlocal_net.converters", os.path.join(_ROOT, "converters"))
        try:  # the converters first: the package's __init__ imports them
            converters.__spec__.loader.exec_module(converters)
            package.converters = converters
            package.__spec__.loader.exec_module(package)
        except BaseException:
            for key in [k for k in sys.modules if k.split(".")[0] == "nonlocal_net"]:
                del sys.modules[key]
            raise
        return package
    import nonlocal_net

    return nonlocal_net


def _entry_point(name: str):
    entry = _nonlocal_net().get_zoo_entry(name)

    def create(pretrained: bool = False, **kwargs: _Any):
        return _nonlocal_net().create_model(name, pretrained=pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    notes = f" Note: {entry.notes}." if entry.notes else ""
    create.__doc__ = (
        f"{name}: the released Kinetics-400 model of the original's "
        f"scripts/{entry.script} ({entry.config_file} with its overrides); published "
        f"30-view top-1 {entry.top1} / top-5 {entry.top5}.{notes}\n\n"
        f"pretrained=True downloads and converts the released {entry.filename} once (cached in "
        f"torch.hub.get_dir()/checkpoints; VNL_ZOO_URL names a mirror); False gives fresh "
        f"weights. Keyword arguments go to nonlocal_net.create_model (split='test' gives the "
        f"fully-convolutional head, 'val' the FC head)."
    )
    return create


for _name in _nonlocal_net().list_models():
    globals()[_name] = _entry_point(_name)
del _name
