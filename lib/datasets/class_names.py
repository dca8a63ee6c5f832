"""Class names for predictions: built in for Kinetics-400, or the original's ``classids.json``,
or one name per line.

``process_data/kinetics/classids.json`` maps class names to ids; names that contain spaces are
stored with literal double quotes around them (``"\\"air drumming\\"": 1``), which are removed
here. A plain text file lists one name per line, line ``i`` naming class ``i`` (lines end at
``\n`` or ``\r\n`` only, as in list files; the file is bounded like them).

The 400 Kinetics-400 names are package data (``kinetics400_classes.json``), in the class-id
order of the released models: the ids of the original's ``classids.json``, which its
``process_data/kinetics/gen_py_list.py`` writes into the list files the models were trained on
(they are the names in sorted order). :func:`class_names_for` gives them to any 400-class model
unless a labels file is given.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from importlib import resources

from .text_lines import read_bounded_bytes, split_lines

__all__ = [
    "KINETICS400_FILE",
    "check_class_count",
    "class_names_for",
    "kinetics400_class_names",
    "read_class_names",
]

KINETICS400_FILE = "kinetics400_classes.json"


def _unquote(name: str) -> str:
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        return name[1:-1]
    return name


def read_class_names(path: str | os.PathLike, num_classes: int | None = None) -> list[str]:
    """Names indexed by class id; errors name the file and the offending entry."""
    path = os.fspath(path)
    raw = read_bounded_bytes(path, "class names")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: class names are not UTF-8 text ({e})") from e
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        names: dict[int, str] = {}
        for name, idx in mapping.items():
            if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                raise ValueError(f"{path}: class {name!r} has id {idx!r}, expected an int >= 0")
            if idx in names:
                raise ValueError(f"{path}: id {idx} is used by {names[idx]!r} and {name!r}")
            names[idx] = _unquote(name)
        missing = sorted(set(range(len(names))) - set(names))
        if missing:
            raise ValueError(
                f"{path}: class ids are not 0..{len(names) - 1} (missing {missing[:5]})"
            )
        result = [names[i] for i in range(len(names))]
    else:
        result = [line.strip(" \t") for line in split_lines(text)]
        while result and not result[-1]:
            result.pop()
        for i, name in enumerate(result):
            if not name:
                raise ValueError(f"{path}:{i + 1}: empty class name")
    if num_classes is not None:
        check_class_count(result, num_classes, path)
    return result


def check_class_count(names: Sequence[str], num_classes: int, source: str | os.PathLike) -> None:
    """Refuse (``ValueError`` naming ``source``) names that are not one per model class: for a
    file read before the model is known (:func:`read_class_names` without ``num_classes``)."""
    if len(names) != num_classes:
        raise ValueError(
            f"{os.fspath(source)}: {len(names)} class names for a model with {num_classes} classes"
        )


@functools.lru_cache(maxsize=1)
def _kinetics400() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath(KINETICS400_FILE).read_text(encoding="utf-8")
    names = json.loads(text)["classes"]
    if len(names) != 400 or len(set(names)) != 400:
        raise RuntimeError(f"{KINETICS400_FILE}: expected 400 distinct names")  # a broken install
    return tuple(names)


def kinetics400_class_names() -> list[str]:
    """The 400 Kinetics-400 class names, indexed by the released models' class ids."""
    return list(_kinetics400())


def class_names_for(num_classes: int, labels: str | os.PathLike | None = None) -> list[str] | None:
    """Names for a model's ``num_classes`` outputs: read from ``labels`` when given (it must
    hold exactly that many), else the built-in Kinetics-400 names for a 400-class model, else
    ``None`` (print class indices)."""
    if labels is not None:
        return read_class_names(labels, num_classes=num_classes)
    return kinetics400_class_names() if num_classes == 400 else None
