"""Exceptions of the converter. Every message names the file (when there is one) and the item."""

from __future__ import annotations

__all__ = ["Caffe2FormatError", "ConversionError", "UnsafePickleError"]


class Caffe2FormatError(ValueError):
    """A file that is not a readable Caffe2 checkpoint: not a pickle, truncated, corrupt, or a
    pickle of the wrong structure."""


class UnsafePickleError(Caffe2FormatError):
    """A pickle that asks for anything besides numpy arrays, numbers, strings and plain
    containers (a global function, an extension code, a persistent id, ...). Nothing from the
    file is executed before this is raised."""


class ConversionError(ValueError):
    """Blobs that do not fit the model: unknown or left-over blobs, missing parameters, shape
    mismatches, or a combination of file and model the converter refuses (e.g. an affine file
    into a model with BN)."""
