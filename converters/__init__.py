"""Caffe2 checkpoint conversion (``nonlocal_net.converters``).

* :func:`read_caffe2_pkl` reads a released ``.pkl`` safely (no code from the file runs);
* :func:`convert_blobs` maps its blobs totally onto a model's state_dict (folding BN into frozen
  affines, inflating 2-D weights, dropping a classifier of another class count, as the original's
  loader and scripts do) and reports every blob;
* :func:`convert_caffe2_pkl` does both in memory; :func:`convert_checkpoint` also writes the
  result as a weights file (``.pt`` or ``.safetensors``) that :func:`nonlocal_net.load_model` loads;
* :func:`export_caffe2` and :func:`write_caffe2_pkl` go back to Caffe2 pickles that Python 2.7 +
  numpy 1.x read.

Command line: ``vnl-convert`` / ``python -m nonlocal_net.converters`` (see ``--help``).
"""

from .convert import ConversionReport, ConversionResult, convert_blobs, model_targets
from .convert_file import (
    CONVERTER_VERSION,
    ConvertedWeights,
    convert_caffe2_pkl,
    convert_checkpoint,
    sha256_file,
)
from .errors import Caffe2FormatError, ConversionError, UnsafePickleError
from .export import Caffe2Export, export_caffe2, state_dict_to_blobs
from .names import (
    NAME_RULES,
    blob_to_state_dict_key,
    state_dict_key_to_blob,
    try_blob_to_state_dict_key,
    try_state_dict_key_to_blob,
)
from .reader import ArrayInfo, Caffe2Pkl, read_caffe2_pkl
from .transforms import fold_bn, inflate_weight
from .writer import write_caffe2_pkl

__all__ = [
    "CONVERTER_VERSION",
    "NAME_RULES",
    "ArrayInfo",
    "Caffe2Export",
    "Caffe2FormatError",
    "Caffe2Pkl",
    "ConversionError",
    "ConversionReport",
    "ConversionResult",
    "ConvertedWeights",
    "UnsafePickleError",
    "blob_to_state_dict_key",
    "convert_blobs",
    "convert_caffe2_pkl",
    "convert_checkpoint",
    "export_caffe2",
    "fold_bn",
    "inflate_weight",
    "model_targets",
    "read_caffe2_pkl",
    "sha256_file",
    "state_dict_key_to_blob",
    "state_dict_to_blobs",
    "try_blob_to_state_dict_key",
    "try_state_dict_key_to_blob",
    "write_caffe2_pkl",
]
