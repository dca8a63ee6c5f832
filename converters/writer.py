"""Write Caffe2 checkpoints that Python 2.7 + numpy 1.x load exactly as the original's loader does.

Python 3's ``pickle`` cannot write such files: at protocol 2 it encodes ``bytes`` through
``_codecs.encode`` and numpy 2 names ``numpy._core.multiarray``, neither of which Python 2 +
numpy 1.x reads. :func:`write_caffe2_pkl` therefore emits the opcodes itself, in the shapes
``cPickle`` + numpy 1.x produced (see ``tests/data/caffe2_golden`` for real examples):

* protocol 2 (training checkpoints): ``PROTO 2``, ``EMPTY_DICT`` and batched ``SETITEMS``; blob
  names as Python-2 ``str`` (``SHORT_BINSTRING``/``BINSTRING``), ``model_iter``, ``lr`` and
  ``*_momentum`` as ``unicode`` (``BINUNICODE``) as the original's ``unicode_literals`` made them;
  arrays as ``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), 'b')`` with the state
  ``(1, shape, numpy.dtype('f4', 0, 1) + BUILD, False, <raw bytes as a str>)``; ``BINPUT``/
  ``BINGET`` memo use for the globals and dtypes;
* protocol 0 (the conversion scripts' flat files): the same objects in text opcodes (``MARK``
  ``DICT``, ``STRING`` with Python 2's ``repr`` escapes, ``INT``, ``FLOAT``, ``PUT``/``GET``).

Array payloads are written straight from the array's memory; the file is written atomically.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from nonlocal_net.utils.io import atomic_write

from .reader import MOMENTUM_SUFFIX

__all__ = ["write_caffe2_pkl"]

_NUMERIC_TYPESTR = re.compile(r"(b1|[iu][1248]|f[248]|c(8|16))")
_BATCHSIZE = 1000  # cPickle's SETITEMS batch size
_ESCAPE_CHUNK = 1 << 20


def _is_unicode_key(name: str, protocol: int) -> bool:
    """Which keys the original wrote as ``unicode``: in training checkpoints (protocol 2)
    ``model_iter``, ``lr`` and every ``*_momentum`` (``unicode_literals``); the conversion scripts
    (protocol 0) set ``lr`` from a plain ``str`` literal."""
    if not name.isascii():
        return True
    if name.endswith(MOMENTUM_SUFFIX) or name == "model_iter":
        return True
    return name == "lr" and protocol == 2


def _escape_table(quote: int) -> tuple[np.ndarray, np.ndarray]:
    """Per byte value, its Python 2 ``repr`` escape (padded to 4 bytes) and the escape's length."""
    table = np.zeros((256, 4), dtype=np.uint8)
    lengths = np.zeros(256, dtype=np.intp)
    special = {
        0x5C: b"\\\\",
        0x09: b"\\t",
        0x0A: b"\\n",
        0x0D: b"\\r",
        quote: b"\\" + bytes([quote]),
    }
    for value in range(256):
        if value in special:
            text = special[value]
        elif 0x20 <= value < 0x7F:
            text = bytes([value])
        else:
            text = b"\\x%02x" % value
        table[value, : len(text)] = np.frombuffer(text, dtype=np.uint8)
        lengths[value] = len(text)
    return table, lengths


_TABLES = {q: _escape_table(q) for q in (0x27, 0x22)}


class _Py2Pickler:
    """Emits one Python-2-style pickle of nested dicts, numbers and numpy arrays."""

    def __init__(self, f: BinaryIO, protocol: int) -> None:
        if protocol not in (0, 2):
            raise ValueError(f"protocol must be 0 or 2 (what the original wrote), got {protocol}")
        self.f = f
        self.protocol = protocol
        self.binary = protocol == 2
        self.next_memo = 1  # cPickle numbers its memo from 1
        self.globals: dict[tuple[str, str], int] = {}
        self.dtypes: dict[str, int] = {}

    # ------------------------------------------------------------------ memo
    def _put(self) -> int:
        index = self.next_memo
        self.next_memo += 1
        if not self.binary:
            self.f.write(b"p%d\n" % index)
        elif index < 256:
            self.f.write(b"q" + bytes([index]))
        else:
            self.f.write(b"r" + struct.pack("<I", index))
        return index

    def _get(self, index: int) -> None:
        if not self.binary:
            self.f.write(b"g%d\n" % index)
        elif index < 256:
            self.f.write(b"h" + bytes([index]))
        else:
            self.f.write(b"j" + struct.pack("<I", index))

    def _global(self, module: str, name: str) -> None:
        key = (module, name)
        if key in self.globals:
            self._get(self.globals[key])
            return
        self.f.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")
        self.globals[key] = self._put()

    # ------------------------------------------------------------------ scalars
    def _int(self, value: int) -> None:
        if not self.binary:
            self.f.write(b"I%d\n" % value)
        elif 0 <= value < 256:
            self.f.write(b"K" + bytes([value]))
        elif 0 <= value < 65536:
            self.f.write(b"M" + struct.pack("<H", value))
        elif -(2**31) <= value < 2**31:
            self.f.write(b"J" + struct.pack("<i", value))
        else:
            self.f.write(b"I%d\n" % value)  # cPickle's choice for ints beyond 32 bits

    def _bool(self, value: bool) -> None:
        if self.binary:
            self.f.write(b"\x88" if value else b"\x89")
        else:
            self.f.write(b"I01\n" if value else b"I00\n")

    def _float(self, value: float) -> None:
        if self.binary:
            self.f.write(b"G" + struct.pack(">d", value))
        else:
            self.f.write(b"F" + repr(float(value)).encode() + b"\n")

    def _str(self, data: bytes | memoryview, *, memo: bool) -> None:
        """A Python-2 ``str``. ``memo`` follows cPickle: strings of length < 2 never are."""
        n = len(data)
        if self.binary:
            if n < 256:
                self.f.write(b"U" + bytes([n]))
            else:
                if n >= 2**31:
                    raise ValueError(f"a Python 2 string cannot hold {n} bytes")
                self.f.write(b"T" + struct.pack("<i", n))
            self.f.write(data)
        else:
            self._repr_str(bytes(data) if isinstance(data, memoryview) else data)
        if memo and n >= 2:
            self._put()

    def _repr_str(self, data: bytes) -> None:
        quote = 0x22 if (b"'" in data and b'"' not in data) else 0x27
        table, lengths = _TABLES[quote]
        self.f.write(b"S" + bytes([quote]))
        codes_all = np.frombuffer(data, dtype=np.uint8)
        for start in range(0, len(codes_all), _ESCAPE_CHUNK):
            codes = codes_all[start : start + _ESCAPE_CHUNK]
            padded = table[codes]
            keep = np.arange(4) < lengths[codes][:, None]
            self.f.write(padded[keep].tobytes())
        self.f.write(bytes([quote]) + b"\n")

    def _unicode(self, text: str) -> None:
        if self.binary:
            data = text.encode("utf-8")
            self.f.write(b"X" + struct.pack("<I", len(data)) + data)
        else:
            self.f.write(b"V" + text.encode("raw-unicode-escape") + b"\n")
        self._put()

    def _key(self, name: str) -> None:
        if _is_unicode_key(name, self.protocol):
            self._unicode(name)
        else:
            self._str(name.encode("ascii"), memo=True)

    def _tuple_of_ints(self, values: tuple[int, ...]) -> None:
        if self.binary and len(values) <= 3:
            for v in values:
                self._int(v)
            self.f.write((b")", b"\x85", b"\x86", b"\x87")[len(values)])
            return
        self.f.write(b"(")
        for v in values:
            self._int(v)
        self.f.write(b"t")

    # ------------------------------------------------------------------ numpy
    def _dtype(self, dtype: np.dtype) -> None:
        typestr = f"{dtype.kind}{dtype.itemsize}"
        order = dtype.str[0] if dtype.str[0] in "<>" else "|"
        key = order + typestr
        if key in self.dtypes:
            self._get(self.dtypes[key])
            return
        self._global("numpy", "dtype")
        if self.binary:
            self._str(typestr.encode(), memo=False)
            self.f.write(b"K\x00K\x01\x87R")
        else:
            self.f.write(b"(")
            self._str(typestr.encode(), memo=False)
            self.f.write(b"I0\nI1\ntR")
        self.dtypes[key] = self._put()
        self.f.write(b"(")
        self._int(3)
        self._str(order.encode(), memo=False)
        self.f.write(b"NNN")
        self._int(-1)
        self._int(-1)
        self._int(0)
        self.f.write(b"tb")

    def _array(self, arr: np.ndarray) -> None:
        dtype = arr.dtype
        if not _NUMERIC_TYPESTR.fullmatch(f"{dtype.kind}{dtype.itemsize}") or dtype.fields:
            raise ValueError(f"only numeric arrays can be written, got dtype {dtype}")
        fortran = arr.ndim > 1 and arr.flags.f_contiguous and not arr.flags.c_contiguous
        if not (arr.flags.c_contiguous or fortran):
            arr = np.require(arr, requirements="C")
        self._global("numpy.core.multiarray", "_reconstruct")
        if self.binary:
            self._global("numpy", "ndarray")
            self.f.write(b"K\x00\x85")
            self._str(b"b", memo=False)
            self.f.write(b"\x87R")
        else:
            self.f.write(b"(")
            self._global("numpy", "ndarray")
            self.f.write(b"(I0\nt")
            self._str(b"b", memo=False)
            self.f.write(b"tR")
        self._put()
        self.f.write(b"(")
        self._int(1)
        self._tuple_of_ints(tuple(int(d) for d in arr.shape))
        self._dtype(dtype)
        self._bool(fortran)
        flat = (arr.T if fortran else arr).reshape(-1).view(np.uint8)
        self._str(memoryview(flat), memo=False)
        self.f.write(b"tb")

    # ------------------------------------------------------------------ containers
    def value(self, value: Any) -> None:
        if isinstance(value, Mapping):
            self.dict(value)
        elif isinstance(value, np.ndarray):
            self._array(value)
        elif isinstance(value, np.generic):
            self._array(np.asarray(value))
        elif isinstance(value, bool):
            self._bool(value)
        elif isinstance(value, int):
            self._int(value)
        elif isinstance(value, float):
            self._float(value)
        else:
            raise TypeError(
                f"cannot write a {type(value).__name__} into a Caffe2 checkpoint (numpy arrays, "
                f"ints and floats only)"
            )

    def dict(self, mapping: Mapping[str, Any]) -> None:
        items = list(mapping.items())
        for key, _ in items:
            if not isinstance(key, str):
                raise TypeError(f"blob names must be str, got {key!r}")
        if not self.binary:
            self.f.write(b"(d")
            self._put()
            for key, value in items:
                self._key(key)
                self.value(value)
                self.f.write(b"s")
            return
        self.f.write(b"}")
        self._put()
        for start in range(0, len(items), _BATCHSIZE):
            batch = items[start : start + _BATCHSIZE]
            if len(batch) == 1:
                self._key(batch[0][0])
                self.value(batch[0][1])
                self.f.write(b"s")
                continue
            self.f.write(b"(")
            for key, value in batch:
                self._key(key)
                self.value(value)
            self.f.write(b"u")

    def dump(self, obj: Mapping[str, Any]) -> None:
        if self.binary:
            self.f.write(b"\x80\x02")
        self.dict(obj)
        self.f.write(b".")


def write_caffe2_pkl(
    blobs: Mapping[str, np.ndarray | float | int],
    path: str | os.PathLike,
    *,
    protocol: int = 2,
    wrapped: bool = True,
) -> None:
    """Write ``blobs`` as a Caffe2 checkpoint that Python 2.7 + numpy 1.x (and the original's
    loader) read, atomically.

    Args:
        blobs: blob name -> numpy array (numeric dtype), ``int`` or ``float`` (e.g. ``lr``,
            ``model_iter``). Numpy scalars are written as 0-d arrays.
        path: the ``.pkl`` to write.
        protocol: 2 (as the original's training checkpoints) or 0 (as its conversion scripts).
        wrapped: write ``{'blobs': blobs}`` as training checkpoints are, or the flat dict as the
            conversion scripts do. The original's loader accepts both.
    """
    top: Mapping[str, Any] = {"blobs": blobs} if wrapped else blobs
    with atomic_write(path) as f:
        _Py2Pickler(f, protocol).dump(top)
