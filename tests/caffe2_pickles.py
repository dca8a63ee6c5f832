"""Test-side writer of Caffe2 pickles exactly as Python 2.7 ``cPickle`` + numpy 1.x wrote them.

Independent of the converter's own writer: it restates, opcode for opcode, what ``cPickle.dump``
emitted for the original's checkpoints (checked byte for byte against files made by real
Python 2.7.18 + numpy 1.16.6 in ``data/caffe2_golden``):

* ``cPickle`` numbers its memo from 1 and memoizes only objects referenced elsewhere: the dicts,
  their keys (str keys shorter than 2 characters never), the numpy globals on first use, every
  array (the ``REDUCE`` result) and every dtype object (an array of an already written dtype gets
  a ``BINGET``/``GET``); the ``(0,)`` tuples, ``'b'``, ``'f4'``, ``'<'``, shapes, numbers and the
  payload strings are not memoized;
* protocol 2 writes dict items in batches of 1000 with ``MARK ... SETITEMS`` (one item: no MARK,
  ``SETITEM``), tuples of up to 3 items as ``TUPLE1/2/3``, ints as ``BININT1/BININT2/BININT``
  (text ``INT`` beyond 32 bits), floats as ``BINFLOAT``, Python-2 ``str`` as ``SHORT_BINSTRING``
  (< 256 bytes) / ``BINSTRING`` and ``unicode`` as ``BINUNICODE``;
* protocol 0 writes ``MARK DICT``, one ``SETITEM`` per item, ``STRING`` with Python 2's ``repr``
  (which is Python 3's ``repr`` of the same ``bytes``), ``UNICODE``, ``INT`` (``I00``/``I01`` for
  bools), ``FLOAT`` (``repr``), ``PUT``/``GET``.

Which keys ``cPickle`` memoized depends on who else referenced the key object while it was
dumping (``Py_REFCNT >= 2``): literals such as ``'lr'`` were, names built at run time and held by
the dict alone were not. Keys are therefore :class:`Py2Key` objects that say both their Python 2
type and whether they are memoized; a plain ``str`` key is a memoized Python-2 ``str``. Dict order
is kept.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["Py2Key", "dump_py2", "dumps_py2", "script_file_keys", "training_checkpoint_keys"]


class Py2Key(str):
    """A dict key as Python 2 held it: ``unicode`` or ``str``, memoized by cPickle or not."""

    unicode: bool
    memo: bool

    def __new__(cls, name: str, *, unicode: bool = False, memo: bool = True) -> Py2Key:
        key = super().__new__(cls, name)
        key.unicode = unicode
        key.memo = memo
        return key


def training_checkpoint_keys(blobs: Mapping[str, Any]) -> dict[Py2Key, Any]:
    """Keys as the original's ``save_model_params`` made them (``unicode_literals``): the
    literals ``model_iter`` and ``lr`` are unicode and memoized; ``*_momentum`` names are unicode
    built at run time; parameter names are ``str`` built at run time (neither memoized)."""
    out = {}
    for k, v in blobs.items():
        literal = k in ("model_iter", "lr")
        out[Py2Key(k, unicode=literal or k.endswith("_momentum"), memo=literal)] = v
    return out


def script_file_keys(blobs: Mapping[str, Any]) -> dict[Py2Key, Any]:
    """Keys as the original's conversion scripts wrote them (``modify_caffe2_ftvideo.py``,
    ``modify_blob_rm.py``): ``str`` keys, all memoized (the script's ``now_keys`` list and the
    ``'lr'`` literal keep them referenced)."""
    return {Py2Key(k): v for k, v in blobs.items()}


class _CPickleEmulator:
    def __init__(self, out, protocol: int) -> None:
        assert protocol in (0, 2)
        self.out = out
        self.bin = protocol == 2
        self.protocol = protocol
        self.memo_size = 0
        self.memo_globals: dict[str, int] = {}
        self.memo_dtypes: dict[str, int] = {}

    def w(self, data: bytes) -> None:
        self.out.write(data)

    def put(self) -> int:
        self.memo_size += 1  # cPickle: memo id = len(memo) + 1
        i = self.memo_size
        if self.bin:
            self.w(b"q" + struct.pack("B", i) if i < 256 else b"r" + struct.pack("<i", i))
        else:
            self.w(b"p" + str(i).encode() + b"\n")
        return i

    def get(self, i: int) -> None:
        if self.bin:
            self.w(b"h" + struct.pack("B", i) if i < 256 else b"j" + struct.pack("<i", i))
        else:
            self.w(b"g" + str(i).encode() + b"\n")

    def save_global(self, module: str, name: str) -> None:
        qual = module + " " + name
        if qual in self.memo_globals:
            self.get(self.memo_globals[qual])
        else:
            self.w(b"c" + module.encode() + b"\n" + name.encode() + b"\n")
            self.memo_globals[qual] = self.put()

    def save_int(self, v: int) -> None:
        if self.bin and -(2**31) <= v < 2**31:
            if 0 <= v <= 0xFF:
                self.w(b"K" + struct.pack("<B", v))
            elif 0 <= v <= 0xFFFF:
                self.w(b"M" + struct.pack("<H", v))
            else:
                self.w(b"J" + struct.pack("<i", v))
        else:
            self.w(b"I" + str(v).encode() + b"\n")

    def save_bool(self, v: bool) -> None:
        if self.bin:
            self.w(b"\x88" if v else b"\x89")
        else:
            self.w(b"I01\n" if v else b"I00\n")

    def save_float(self, v: float) -> None:
        if self.bin:
            self.w(b"G" + struct.pack(">d", v))
        else:
            self.w(b"F" + repr(v).encode() + b"\n")

    def save_str(self, s: bytes, memoize: bool) -> None:
        if self.bin:
            if len(s) < 256:
                self.w(b"U" + struct.pack("B", len(s)) + s)
            else:
                self.w(b"T" + struct.pack("<i", len(s)) + s)
        else:
            self.w(b"S" + repr(bytes(s))[1:].encode("ascii") + b"\n")
        if memoize and len(s) >= 2:
            self.put()

    def save_unicode(self, s: str, memoize: bool) -> None:
        if self.bin:
            data = s.encode("utf-8")
            self.w(b"X" + struct.pack("<i", len(data)) + data)
        else:
            self.w(b"V" + s.encode("raw-unicode-escape") + b"\n")
        if memoize and len(s) >= 2:
            self.put()

    def save_key(self, key: str) -> None:
        unicode = getattr(key, "unicode", False)
        memo = getattr(key, "memo", True)
        if unicode:
            self.save_unicode(str(key), memo)
        else:
            self.save_str(str(key).encode("ascii"), memoize=memo)

    def save_small_tuple(self, items: list) -> None:
        """A fresh (unmemoized) tuple of already-saveable items."""
        if self.bin and len(items) == 0:
            self.w(b")")
            return
        if self.bin and len(items) <= 3:
            for it in items:
                self.save(it)
            self.w({1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(items)])
            return
        self.w(b"(")
        for it in items:
            self.save(it)
        self.w(b"t")

    def save_dtype(self, dtype: np.dtype) -> None:
        key = dtype.str
        if key in self.memo_dtypes:
            self.get(self.memo_dtypes[key])
            return
        order = "|" if dtype.itemsize == 1 else ("<" if dtype.str[0] in "<=" else ">")
        typestr = f"{dtype.kind}{dtype.itemsize}".encode()
        self.save_global("numpy", "dtype")
        if self.bin:
            self.save_str(typestr, memoize=False)
            self.save_int(0)
            self.save_int(1)
            self.w(b"\x87")
        else:
            self.w(b"(")
            self.save_str(typestr, memoize=False)
            self.save_int(0)
            self.save_int(1)
            self.w(b"t")
        self.w(b"R")
        self.memo_dtypes[key] = self.put()
        self.w(b"(")
        self.save_int(3)
        self.save_str(order.encode(), memoize=False)
        self.w(b"NNN")
        self.save_int(-1)
        self.save_int(-1)
        self.save_int(0)
        self.w(b"t")
        self.w(b"b")

    def save_array(self, a: np.ndarray) -> None:
        a = np.require(a, requirements="C")  # (ascontiguousarray would make 0-d 1-d)
        self.save_global("numpy.core.multiarray", "_reconstruct")
        if self.bin:
            self.save_global("numpy", "ndarray")
            self.save_int(0)
            self.w(b"\x85")
            self.save_str(b"b", memoize=False)
            self.w(b"\x87")
        else:
            self.w(b"(")
            self.save_global("numpy", "ndarray")
            self.w(b"(")
            self.save_int(0)
            self.w(b"t")
            self.save_str(b"b", memoize=False)
            self.w(b"t")
        self.w(b"R")
        self.put()
        self.w(b"(")
        self.save_int(1)
        self.save_small_tuple([int(d) for d in a.shape])
        self.save_dtype(a.dtype)
        self.save_bool(False)
        self.save_str(a.tobytes(), memoize=False)
        self.w(b"t")
        self.w(b"b")

    def save_dict(self, d: Mapping) -> None:
        items = list(d.items())
        if not self.bin:
            self.w(b"(d")
            self.put()
            for k, v in items:
                self.save_key(k)
                self.save(v)
                self.w(b"s")
            return
        self.w(b"}")
        self.put()
        for start in range(0, len(items), 1000):
            batch = items[start : start + 1000]
            if len(batch) > 1:
                self.w(b"(")
            for k, v in batch:
                self.save_key(k)
                self.save(v)
            self.w(b"u" if len(batch) > 1 else b"s")

    def save(self, v: Any) -> None:
        if isinstance(v, Mapping):
            self.save_dict(v)
        elif isinstance(v, np.ndarray):
            self.save_array(v)
        elif isinstance(v, bool):
            self.save_bool(v)
        elif isinstance(v, int):
            self.save_int(v)
        elif isinstance(v, float):
            self.save_float(v)
        else:
            raise TypeError(type(v))


def dump_py2(obj: Mapping[str, Any], f, protocol: int = 2) -> None:
    """Write ``obj`` (a dict of dicts / arrays / numbers) as Python 2's ``cPickle.dump``."""
    emulator = _CPickleEmulator(f, protocol)
    if protocol == 2:
        f.write(b"\x80\x02")
    emulator.save(obj)
    f.write(b".")


def dumps_py2(obj: Mapping[str, Any], protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    dump_py2(obj, buf, protocol)
    return buf.getvalue()
