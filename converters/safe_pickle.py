"""A restricted pickle reader for Caffe2 checkpoints: numpy arrays in plain containers only.

Python's ``pickle`` executes whatever callables a file names. This module instead interprets the
pickle opcodes itself and accepts only what Caffe2 checkpoints are made of:

* plain values and containers: ``None``, bools, ints, floats, Python-2 ``str`` (kept as
  ``bytes``; dict keys are decoded as Latin-1, as ``pickle.load(..., encoding="latin1")`` does),
  ``unicode``/``str``, ``bytes``, tuples, lists, dicts;
* numpy arrays and scalars of numeric dtypes, through exactly these globals, which are never
  imported from the names in the file but mapped to this module's own reconstruction code:
  ``numpy.core.multiarray._reconstruct`` (numpy 1.x; ``numpy._core.multiarray`` in numpy 2),
  ``numpy.ndarray`` (only as ``_reconstruct``'s first argument), ``numpy.dtype``,
  ``numpy.core.multiarray.scalar`` and, for files re-saved by Python 3,
  ``numpy.core.numeric._frombuffer`` (protocol 5) and ``_codecs.encode`` with a Latin-1
  encoding (how Python 3 writes ``bytes`` at protocols 0-2).

Any other global (``os.system``, ``builtins.eval``, ``copyreg._reconstructor``, ...), the
``INST``/``OBJ``/``NEWOBJ`` opcodes, extension-registry codes and persistent ids are refused with
an :class:`UnsafePickleError` the moment the opcode is read, before anything else happens; object
and structured dtypes are refused too.

Large byte strings (the array payloads) are not copied into Python objects while the pickle is
interpreted: on a seekable file the reader records their offset and skips them, and
:meth:`LazyArray.read` later reads each one straight into the array's own memory. Memory use is
therefore about the size of the arrays that are kept, and arrays that are not wanted (optimizer
momentum) need never be read at all.
"""

from __future__ import annotations

import codecs
import math
import pickletools
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from .errors import Caffe2FormatError, UnsafePickleError

__all__ = ["ALLOWED_GLOBALS", "PICKLE_OPCODES", "LazyArray", "LazyBytes", "SafeUnpickler"]

# Payloads at least this long are skipped and read later into the array's memory.
LAZY_MIN_BYTES = 1 << 16
# Bounds on the structure (a Caffe2 checkpoint is a dict of a few thousand arrays, two deep).
MAX_NESTING = 100
MAX_MEMO = 1 << 20

ALLOWED_GLOBALS: dict[tuple[str, str], str] = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("numpy.core.multiarray", "scalar"): "scalar",
    ("numpy._core.multiarray", "scalar"): "scalar",
    ("numpy.core.numeric", "_frombuffer"): "frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "frombuffer",
    ("_codecs", "encode"): "codecs_encode",
}

# Every opcode byte of any pickle protocol (what a pickle can start with).
PICKLE_OPCODES = frozenset(op.code.encode("latin-1") for op in pickletools.opcodes)
# The protocol that introduced each opcode: a pickle without PROTO (protocols 0 and 1) is of the
# highest protocol among its opcodes, as ``pickletools.dis`` reports it.
_OPCODE_PROTOCOL = {op.code.encode("latin-1"): op.proto for op in pickletools.opcodes}

# Numeric dtypes only: booleans, integers, floats, complex (numpy's pickled type strings).
_NUMERIC_TYPESTR = re.compile(r"(b1|[iu][1248]|f[248]|c(8|16))")
_BYTE_ORDERS = ("<", ">", "|", "=")


@dataclass(frozen=True)
class LazyBytes:
    """A byte string of the file, by position: read only when needed."""

    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class LazyArray:
    """An array whose payload is still in the file (see :meth:`read`)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data: LazyBytes

    @property
    def nbytes(self) -> int:
        return self.data.length

    def read(self, f: BinaryIO, path: str) -> np.ndarray:
        """Read the payload from ``f`` straight into a new, writable array."""
        raw = np.empty(self.data.length, dtype=np.uint8)
        f.seek(self.data.offset)
        view = memoryview(raw)
        done = 0
        while done < self.data.length:
            n = f.readinto(view[done:])
            if not n:
                raise Caffe2FormatError(
                    f"{path}: truncated file: an array payload at byte {self.data.offset} needs "
                    f"{self.data.length} bytes but the file ends after {done} of them"
                )
            done += n
        return raw.view(self.dtype).reshape(self.shape, order="F" if self.fortran_order else "C")


class _Global:
    """An allowed global, by its role; never a real callable."""

    __slots__ = ("qualname", "role")

    def __init__(self, role: str, qualname: str) -> None:
        self.role = role
        self.qualname = qualname

    def __repr__(self) -> str:
        return f"<global {self.qualname}>"


class _DTypeStub:
    """``numpy.dtype(typestr, ...)`` awaiting its ``BUILD`` (which sets the byte order)."""

    __slots__ = ("dtype", "typestr")

    def __init__(self, typestr: str) -> None:
        self.typestr = typestr
        self.dtype: np.dtype | None = None

    def __repr__(self) -> str:
        return f"<dtype {self.typestr}>"


class _ArrayStub:
    """``_reconstruct(ndarray, (0,), 'b')`` awaiting its ``BUILD`` state."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: np.ndarray | LazyArray | None = None

    def __repr__(self) -> str:
        return "<array>" if self.value is None else f"<array {getattr(self.value, 'shape', '')}>"


_REFUSED_OPCODES = {
    b"i": "INST",
    b"o": "OBJ",
    b"\x81": "NEWOBJ",
    b"\x92": "NEWOBJ_EX",
    b"P": "PERSID",
    b"Q": "BINPERSID",
    b"\x82": "EXT1",
    b"\x83": "EXT2",
    b"\x84": "EXT4",
    b"\x97": "NEXT_BUFFER",
    b"\x98": "READONLY_BUFFER",
    b"\x8f": "EMPTY_SET",
    b"\x90": "ADDITEMS",
    b"\x91": "FROZENSET",
}


class SafeUnpickler:
    """Interpret one pickle from ``f`` under the rules of this module.

    ``path`` is used in error messages; ``size`` (the file size, when known) lets truncation be
    detected when payloads are skipped. :meth:`load` returns the unpickled object in which arrays
    are ``numpy.ndarray`` (small ones) or :class:`LazyArray` (large ones, when ``f`` is seekable).
    """

    def __init__(self, f: BinaryIO, path: str, size: int | None = None) -> None:
        self.f = f
        self.path = path
        self.size = size
        self.lazy = size is not None and f.seekable()
        self.protocol = 0  # PROTO's argument, or the highest protocol of the opcodes read
        self._declared = False
        self.memo: dict[int, Any] = {}
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self._op_pos = 0
        self._op_name = ""

    # ----------------------------------------------------------------------------- errors
    def _fail(self, message: str) -> Caffe2FormatError:
        return Caffe2FormatError(
            f"{self.path}: corrupt pickle at byte {self._op_pos} ({self._op_name}): {message}"
        )

    def _truncated(self) -> Caffe2FormatError:
        return Caffe2FormatError(
            f"{self.path}: truncated file: it ends at byte {self.f.tell()} inside the pickle "
            f"(in {self._op_name} at byte {self._op_pos}); the download or copy is incomplete"
        )

    def _refuse(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(
            f"{self.path}: refused to load: at byte {self._op_pos} the pickle {what}, which a "
            f"Caffe2 checkpoint never contains; nothing from the file was executed (only numpy "
            f"arrays, numbers, strings and plain containers are accepted)"
        )

    # ----------------------------------------------------------------------------- reading
    def _read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise self._truncated()
        return data

    def _readline(self) -> bytes:
        line = self.f.readline()
        if not line.endswith(b"\n"):
            raise self._truncated()
        return line[:-1]

    def _read_payload(self, n: int, *, mutable: bool = False) -> bytes | bytearray | LazyBytes:
        """A byte string of length ``n``: skipped (:class:`LazyBytes`) when large."""
        if n < 0:
            raise self._fail(f"negative length {n}")
        pos = self.f.tell()
        if self.size is not None and pos + n > self.size:
            raise Caffe2FormatError(
                f"{self.path}: truncated file: a {n}-byte string starts at byte {pos} but the "
                f"file has only {self.size} bytes; the download or copy is incomplete"
            )
        if self.lazy and n >= LAZY_MIN_BYTES:
            self.f.seek(pos + n)
            return LazyBytes(pos, n)
        if n >= LAZY_MIN_BYTES or mutable:
            buf = bytearray(n)
            if self.f.readinto(buf) != n:
                raise self._truncated()
            return buf
        return self._read(n)

    # ----------------------------------------------------------------------------- stack
    def _pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise self._fail("no MARK on the stack")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _pop(self) -> Any:
        if not self.stack:
            raise self._fail("stack underflow")
        return self.stack.pop()

    def _top(self) -> Any:
        if not self.stack:
            raise self._fail("stack underflow")
        return self.stack[-1]

    @staticmethod
    def _key(key: Any) -> Any:
        # Python-2 str keys are bytes here; decode them as pickle.load(encoding="latin1") does.
        if isinstance(key, (bytes, bytearray)):
            return bytes(key).decode("latin-1")
        return key

    def _setitems(self, d: Any, items: list[Any]) -> None:
        if not isinstance(d, dict):
            raise self._fail(f"SETITEM(S) on a {type(d).__name__}, not a dict")
        if len(items) % 2:
            raise self._fail("odd number of items for a dict")
        for i in range(0, len(items), 2):
            key = self._key(items[i])
            if isinstance(key, LazyBytes):
                raise self._fail("a dict key of more than 64 KiB")
            try:
                d[key] = items[i + 1]
            except TypeError as e:
                raise self._fail(f"unhashable dict key ({e})") from None

    def _memo_get(self, index: int) -> Any:
        if index not in self.memo:
            raise self._fail(f"memo entry {index} was never stored")
        return self.memo[index]

    # ----------------------------------------------------------------------------- globals
    def _global(self, module: str, name: str) -> _Global:
        role = ALLOWED_GLOBALS.get((module, name))
        if role is None:
            raise self._refuse(f"references the global {module}.{name}")
        return _Global(role, f"{module}.{name}")

    @staticmethod
    def _text(value: Any) -> str | None:
        if isinstance(value, str):
            return value
        if isinstance(value, (bytes, bytearray)):
            return bytes(value).decode("latin-1")
        return None

    def _dtype(self, value: Any) -> np.dtype:
        if isinstance(value, _DTypeStub):
            if value.dtype is None:
                raise self._fail("a numpy dtype used before its state was set")
            return value.dtype
        raise self._fail(f"expected a numpy dtype, got {type(value).__name__}")

    def _reduce(self, func: Any, args: Any) -> Any:
        if not isinstance(func, _Global):
            raise self._refuse(f"calls a {type(func).__name__} object (REDUCE)")
        if not isinstance(args, tuple):
            raise self._fail(f"REDUCE arguments must be a tuple, got {type(args).__name__}")
        role = func.role
        if role == "reconstruct":
            if len(args) != 3 or not (isinstance(args[0], _Global) and args[0].role == "ndarray"):
                raise self._refuse(
                    f"calls {func.qualname} with arguments other than (numpy.ndarray, (0,), 'b') "
                    f"(an ndarray subclass or another type)"
                )
            return _ArrayStub()
        if role == "dtype":
            typestr = self._text(args[0]) if args else None
            if typestr is None or len(args) != 3:
                raise self._fail(f"numpy.dtype called with {len(args)} arguments")
            if not _NUMERIC_TYPESTR.fullmatch(typestr):
                kind = "object" if typestr.startswith("O") else f"{typestr!r}"
                raise self._refuse(
                    f"asks for a numpy array of dtype {kind}; only numeric dtypes are accepted"
                )
            return _DTypeStub(typestr)
        if role == "scalar":
            if len(args) != 2:
                raise self._fail("numpy scalar needs (dtype, bytes)")
            dtype = self._dtype(args[0])
            data = args[1]
            if isinstance(data, str):
                data = data.encode("latin-1")
            if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
                raise self._fail(f"numpy scalar payload does not match dtype {dtype}")
            return np.frombuffer(bytes(data), dtype=dtype)[0]
        if role == "frombuffer":
            if len(args) != 4:
                raise self._fail("_frombuffer needs (buffer, dtype, shape, order)")
            buf, dtype_arg, shape, order = args
            dtype = self._dtype(dtype_arg) if isinstance(dtype_arg, _DTypeStub) else None
            if dtype is None:
                raise self._fail("_frombuffer without a numpy dtype")
            return self._make_array(shape, dtype, self._text(order) == "F", buf)
        if role == "codecs_encode":
            if (
                len(args) != 2
                or not isinstance(args[0], str)
                or self._text(args[1]) not in ("latin1", "latin-1")
            ):
                raise self._refuse("calls _codecs.encode with arguments other than (str, 'latin1')")
            return args[0].encode("latin-1")
        raise self._refuse(f"calls {func.qualname}")

    def _make_array(self, shape: Any, dtype: np.dtype, fortran: bool, data: Any) -> Any:
        if not isinstance(shape, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise self._fail(f"invalid array shape {shape!r}")
        if isinstance(data, str):  # a Python-3 reader's latin-1 view of Python-2 bytes
            data = data.encode("latin-1")
        if isinstance(data, list):
            raise self._refuse("holds an object array; only numeric arrays are accepted")
        if not isinstance(data, (bytes, bytearray, LazyBytes)):
            raise self._fail(f"array payload of type {type(data).__name__}")
        nbytes = math.prod(shape) * dtype.itemsize
        if len(data) != nbytes:
            raise self._fail(
                f"array of shape {shape} and dtype {dtype} needs {nbytes} bytes, the payload has "
                f"{len(data)}"
            )
        if isinstance(data, LazyBytes):
            return LazyArray(shape, dtype, fortran, data)
        arr = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
        return arr if isinstance(data, bytearray) else arr.copy(order="K")

    def _build(self, obj: Any, state: Any) -> None:
        if isinstance(obj, _DTypeStub):
            if (
                not isinstance(state, tuple)
                or len(state) not in (8, 9)
                or state[0] not in (3, 4)
                or any(s is not None for s in state[2:5])
                or (len(state) == 9 and state[8])
            ):
                raise self._refuse(
                    "sets a numpy dtype state with sub-arrays, fields or metadata; only plain "
                    "numeric dtypes are accepted"
                )
            order = self._text(state[1])
            if order not in _BYTE_ORDERS:
                raise self._fail(f"invalid dtype byte order {state[1]!r}")
            base = np.dtype(obj.typestr)
            obj.dtype = base.newbyteorder(order) if order in ("<", ">") else base
            return
        if isinstance(obj, _ArrayStub):
            if not isinstance(state, tuple) or len(state) not in (4, 5):
                raise self._fail("array state must be (version, shape, dtype, fortran, data)")
            if len(state) == 5:
                if state[0] != 1:
                    raise self._fail(f"unknown array state version {state[0]!r}")
                state = state[1:]
            shape, dtype, fortran, data = state
            obj.value = self._make_array(shape, self._dtype(dtype), bool(fortran), data)
            return
        raise self._refuse(f"sets the state of a {type(obj).__name__} object (BUILD)")

    # ----------------------------------------------------------------------------- main loop
    def load(self) -> Any:
        """Interpret the pickle up to its STOP opcode and return the object it built."""
        try:
            return self._load()
        except Caffe2FormatError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as e:
            # anything else a malformed file provokes (bad escapes, odd argument types, ...)
            raise self._fail(f"{type(e).__name__}: {e}") from e

    def _load(self) -> Any:
        f = self.f
        handlers = _HANDLERS
        while True:
            self._op_pos = f.tell()
            op = f.read(1)
            if not op:
                self._op_name = "end of file"
                raise Caffe2FormatError(
                    f"{self.path}: truncated file: it ends at byte {self._op_pos} before the "
                    f"pickle's end (STOP opcode); the download or copy is incomplete"
                )
            self._op_name = _OPCODE_NAMES.get(op, f"opcode {op!r}")
            if not self._declared and _OPCODE_PROTOCOL.get(op, 0) > self.protocol:
                self.protocol = _OPCODE_PROTOCOL[op]
            handler = handlers.get(op)
            if handler is None:
                if op in _REFUSED_OPCODES:
                    raise self._refuse(self._describe_refused(op))
                raise self._fail(f"{op!r} is not a pickle opcode")
            if op == b".":  # STOP
                return self._stop()
            handler(self)

    # ------------------------------------------------------------------ opcode handlers
    # One method per opcode (or family); _HANDLERS below maps opcode bytes to them.
    def _op_proto(self) -> None:
        self._declared = True
        self.protocol = self._read(1)[0]
        if self.protocol > 5:
            raise self._fail(f"unsupported pickle protocol {self.protocol}")

    def _op_frame(self) -> None:
        self._read(8)

    def _stop(self) -> Any:
        if len(self.stack) != 1 or self.metastack:
            raise self._fail("the stack does not hold exactly one object at STOP")
        return self._finalize(self.stack.pop())

    def _op_mark(self) -> None:
        if len(self.metastack) >= MAX_NESTING:
            raise self._fail(f"more than {MAX_NESTING} nested MARKs")
        self.metastack.append(self.stack)
        self.stack = []

    def _op_pop(self) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self._pop_mark()

    def _op_pop_mark(self) -> None:
        self._pop_mark()

    def _op_dup(self) -> None:
        self.stack.append(self._top())

    def _push(value: Any) -> Any:
        def handler(self: SafeUnpickler) -> None:
            self.stack.append(value)

        return handler

    _op_none, _op_newtrue, _op_newfalse = _push(None), _push(True), _push(False)
    _op_empty_tuple = _push(())

    def _op_int(self) -> None:  # INT (text); I01/I00 are Python 2's True/False
        line = self._readline()
        self.stack.append(True if line == b"01" else False if line == b"00" else self._int(line))

    def _op_binint(self) -> None:
        self.stack.append(struct.unpack("<i", self._read(4))[0])

    def _op_binint1(self) -> None:
        self.stack.append(self._read(1)[0])

    def _op_binint2(self) -> None:
        self.stack.append(struct.unpack("<H", self._read(2))[0])

    def _op_long(self) -> None:  # LONG (text)
        line = self._readline()
        self.stack.append(self._int(line[:-1] if line.endswith(b"L") else line))

    def _op_long1(self) -> None:
        n = self._read(1)[0]
        self.stack.append(int.from_bytes(self._read(n), "little", signed=True))

    def _op_long4(self) -> None:
        n = struct.unpack("<i", self._read(4))[0]
        if n < 0 or n > 1 << 16:
            raise self._fail(f"LONG4 of {n} bytes")
        self.stack.append(int.from_bytes(self._read(n), "little", signed=True))

    def _op_float(self) -> None:
        try:
            self.stack.append(float(self._readline()))
        except ValueError as e:
            raise self._fail(str(e)) from None

    def _op_binfloat(self) -> None:
        self.stack.append(struct.unpack(">d", self._read(8))[0])

    def _op_string(self) -> None:  # STRING: Python 2 repr of a str
        self.stack.append(self._string(self._readline()))

    def _sized(fmt: str, *, short: bool = False, mutable: bool = False) -> Any:
        """A handler for a length-prefixed byte string (``fmt``: the length's struct format)."""
        width = struct.calcsize(fmt)

        def handler(self: SafeUnpickler) -> None:
            n = struct.unpack(fmt, self._read(width))[0]
            self.stack.append(self._read(n) if short else self._read_payload(n, mutable=mutable))

        return handler

    _op_binstring = _sized("<i")
    _op_short_binstring = _sized("<B", short=True)
    _op_binbytes = _sized("<I")
    _op_short_binbytes = _sized("<B", short=True)
    _op_binbytes8 = _sized("<Q")
    _op_bytearray8 = _sized("<Q", mutable=True)

    def _op_unicode(self) -> None:  # UNICODE (text)
        self.stack.append(self._readline().decode("raw-unicode-escape"))

    def _unicode_op(fmt: str) -> Any:
        width = struct.calcsize(fmt)

        def handler(self: SafeUnpickler) -> None:
            self.stack.append(self._unicode(struct.unpack(fmt, self._read(width))[0]))

        return handler

    _op_binunicode = _unicode_op("<I")
    _op_short_binunicode = _unicode_op("<B")
    _op_binunicode8 = _unicode_op("<Q")

    def _op_tuple(self) -> None:
        items = self._pop_mark()
        self.stack.append(tuple(items))

    def _op_tuple1(self) -> None:
        self.stack.append((self._pop(),))

    def _op_tuple2(self) -> None:
        b = self._pop()
        self.stack.append((self._pop(), b))

    def _op_tuple3(self) -> None:
        c = self._pop()
        b = self._pop()
        self.stack.append((self._pop(), b, c))

    def _op_empty_list(self) -> None:
        self.stack.append([])

    def _op_list(self) -> None:
        items = self._pop_mark()
        self.stack.append(items)

    def _op_append(self) -> None:
        value = self._pop()
        target = self._top()
        if not isinstance(target, list):
            raise self._fail(f"APPEND to a {type(target).__name__}")
        target.append(value)

    def _op_appends(self) -> None:
        items = self._pop_mark()
        target = self._top()
        if not isinstance(target, list):
            raise self._fail(f"APPENDS to a {type(target).__name__}")
        target.extend(items)

    def _op_empty_dict(self) -> None:
        self.stack.append({})

    def _op_dict(self) -> None:
        items = self._pop_mark()
        d: dict = {}
        self._setitems(d, items)
        self.stack.append(d)

    def _op_setitem(self) -> None:
        value = self._pop()
        key = self._pop()
        self._setitems(self._top(), [key, value])

    def _op_setitems(self) -> None:
        items = self._pop_mark()
        self._setitems(self._top(), items)

    def _op_global(self) -> None:
        module = self._readline().decode("utf-8", "replace")
        name = self._readline().decode("utf-8", "replace")
        self.stack.append(self._global(module, name))

    def _op_stack_global(self) -> None:
        name = self._pop()
        module = self._pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise self._fail("STACK_GLOBAL needs two strings")
        self.stack.append(self._global(module, name))

    def _op_reduce(self) -> None:
        args = self._pop()
        func = self._pop()
        self.stack.append(self._reduce(func, args))

    def _op_build(self) -> None:
        state = self._pop()
        self._build(self._top(), state)

    def _memo_put(self, index: int) -> None:
        if len(self.memo) >= MAX_MEMO and index not in self.memo:
            raise self._fail(f"more than {MAX_MEMO} memo entries")
        self.memo[index] = self._top()

    def _op_put(self) -> None:
        self._memo_put(self._int(self._readline()))

    def _op_binput(self) -> None:
        self._memo_put(self._read(1)[0])

    def _op_long_binput(self) -> None:
        self._memo_put(struct.unpack("<I", self._read(4))[0])

    def _op_memoize(self) -> None:
        self._memo_put(len(self.memo))

    def _op_get(self) -> None:
        self.stack.append(self._memo_get(self._int(self._readline())))

    def _op_binget(self) -> None:
        self.stack.append(self._memo_get(self._read(1)[0]))

    def _op_long_binget(self) -> None:
        self.stack.append(self._memo_get(struct.unpack("<I", self._read(4))[0]))

    del _push, _sized, _unicode_op

    def _finalize(self, root: Any) -> Any:
        """Replace reconstruction stubs by their results, in ``root`` and in its dict values
        (recursively through dicts, which is where Caffe2 checkpoints keep their arrays).

        Each shared dict (a memo reference) is finalised once and the result shared again, so
        the work is linear in the pickle's size whatever its sharing; nesting deeper than
        :data:`MAX_NESTING` and a dict that contains itself are refused."""
        done: dict[int, Any] = {}
        active: set[int] = set()

        def visit(value: Any, depth: int) -> Any:
            if isinstance(value, _ArrayStub):
                if value.value is None:
                    raise self._fail("a numpy array whose state was never set")
                return value.value
            if isinstance(value, _DTypeStub):
                return value.dtype
            if not isinstance(value, dict):
                return value
            key = id(value)
            if key in done:
                return done[key]
            if key in active:
                raise self._fail("a dict that contains itself")
            if depth >= MAX_NESTING:
                raise self._fail(f"dicts nested more than {MAX_NESTING} deep")
            active.add(key)
            result = {k: visit(v, depth + 1) for k, v in value.items()}
            active.discard(key)
            done[key] = result
            return result

        return visit(root, 0)

    def _describe_refused(self, op: bytes) -> str:
        name = _REFUSED_OPCODES[op]
        if op == b"i":  # INST names its class inline: say which (it is not imported)
            module = self.f.readline().strip().decode("utf-8", "replace")
            cls = self.f.readline().strip().decode("utf-8", "replace")
            return f"instantiates {module}.{cls} (INST opcode)"
        if op in (b"\x82", b"\x83", b"\x84"):
            width = {b"\x82": 1, b"\x83": 2, b"\x84": 4}[op]
            code = int.from_bytes(self.f.read(width), "little")
            return f"refers to a global through the extension registry ({name} code {code})"
        if op in (b"P", b"Q"):
            return f"uses a persistent id ({name} opcode)"
        if op in (b"o", b"\x81", b"\x92"):
            return f"creates an object of a class ({name} opcode)"
        return f"uses the {name} opcode"

    def _int(self, line: bytes) -> int:
        try:
            return int(line)
        except ValueError:
            raise self._fail(f"invalid integer {line[:20]!r}") from None

    def _string(self, line: bytes) -> bytes:
        if len(line) < 2 or line[:1] != line[-1:] or line[:1] not in (b"'", b'"'):
            raise self._fail("STRING argument is not a quoted string")
        try:
            with warnings.catch_warnings():  # "invalid escape": kept literally, as Python 2 did
                warnings.simplefilter("ignore", DeprecationWarning)
                return codecs.escape_decode(line[1:-1])[0]
        except ValueError as e:
            raise self._fail(f"invalid STRING escape ({e})") from None

    def _unicode(self, n: int) -> str:
        if self.size is not None and self.f.tell() + n > self.size:
            raise self._truncated()
        try:
            return self._read(n).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as e:
            raise self._fail(f"invalid UTF-8 in a unicode string ({e})") from None


_OPCODE_NAMES = {
    b"\x80": "PROTO",
    b"\x95": "FRAME",
    b".": "STOP",
    b"(": "MARK",
    b"0": "POP",
    b"1": "POP_MARK",
    b"2": "DUP",
    b"N": "NONE",
    b"\x88": "NEWTRUE",
    b"\x89": "NEWFALSE",
    b"I": "INT",
    b"J": "BININT",
    b"K": "BININT1",
    b"M": "BININT2",
    b"L": "LONG",
    b"\x8a": "LONG1",
    b"\x8b": "LONG4",
    b"F": "FLOAT",
    b"G": "BINFLOAT",
    b"S": "STRING",
    b"T": "BINSTRING",
    b"U": "SHORT_BINSTRING",
    b"B": "BINBYTES",
    b"C": "SHORT_BINBYTES",
    b"\x8e": "BINBYTES8",
    b"\x96": "BYTEARRAY8",
    b"V": "UNICODE",
    b"X": "BINUNICODE",
    b"\x8c": "SHORT_BINUNICODE",
    b"\x8d": "BINUNICODE8",
    b")": "EMPTY_TUPLE",
    b"t": "TUPLE",
    b"\x85": "TUPLE1",
    b"\x86": "TUPLE2",
    b"\x87": "TUPLE3",
    b"]": "EMPTY_LIST",
    b"l": "LIST",
    b"a": "APPEND",
    b"e": "APPENDS",
    b"}": "EMPTY_DICT",
    b"d": "DICT",
    b"s": "SETITEM",
    b"u": "SETITEMS",
    b"c": "GLOBAL",
    b"\x93": "STACK_GLOBAL",
    b"R": "REDUCE",
    b"b": "BUILD",
    b"p": "PUT",
    b"q": "BINPUT",
    b"r": "LONG_BINPUT",
    b"\x94": "MEMOIZE",
    b"g": "GET",
    b"h": "BINGET",
    b"j": "LONG_BINGET",
    **_REFUSED_OPCODES,
}


_HANDLERS: dict[bytes, Any] = {
    code: getattr(SafeUnpickler, "_op_" + name.lower())
    for code, name in _OPCODE_NAMES.items()
    if code not in _REFUSED_OPCODES and name != "STOP"
}
_HANDLERS[b"."] = SafeUnpickler._stop  # handled in _load (returns the object)
