"""The safe Caffe2 reader: what it accepts, what it refuses (without running anything), and the
errors it gives for files that are not checkpoints."""

from __future__ import annotations

import contextlib
import copyreg
import gzip
import io
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from caffe2_pickles import Py2Key, dump_py2, script_file_keys, training_checkpoint_keys

from nonlocal_net.converters import (
    ArrayInfo,
    Caffe2FormatError,
    UnsafePickleError,
    read_caffe2_pkl,
)

RNG = np.random.default_rng(0)
BIG = RNG.standard_normal((64, 3, 5, 7, 7), dtype=np.float32)  # 188 KB: read lazily
SMALL = RNG.standard_normal((64,), dtype=np.float32)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _checkpoint(tmp_path: Path, name: str = "ckpt.pkl", **extra) -> Path:
    blobs = {
        "model_iter": 400000,
        "lr": np.array(1e-4, dtype=np.float32),
        "conv1_w_momentum": BIG * np.float32(0.01),
        "conv1_w": BIG,
        "res_conv1_bn_riv": SMALL,
        **extra,
    }
    with open(tmp_path / name, "wb") as f:
        dump_py2({"blobs": training_checkpoint_keys(blobs)}, f, protocol=2)
    return tmp_path / name


# ------------------------------------------------------------------------------------------
# What is accepted


def test_training_checkpoint_contents(tmp_path):
    ckpt = read_caffe2_pkl(_checkpoint(tmp_path))
    assert ckpt.wrapped and ckpt.protocol == 2
    assert ckpt.model_iter == 400000 and ckpt.lr == float(np.float32(1e-4))
    assert list(ckpt.blobs) == ["conv1_w", "res_conv1_bn_riv"]
    assert ckpt.blobs["conv1_w"].tobytes() == BIG.tobytes()
    assert ckpt.blobs["res_conv1_bn_riv"].tobytes() == SMALL.tobytes()
    assert ckpt.momentum["conv1_w_momentum"].tobytes() == (BIG * np.float32(0.01)).tobytes()
    assert all(a.flags.writeable and a.flags.c_contiguous for a in ckpt.blobs.values())
    assert "protocol 2" in ckpt.describe() and "model_iter 400000" in ckpt.describe()


def test_momentum_payloads_can_be_skipped(tmp_path):
    ckpt = read_caffe2_pkl(_checkpoint(tmp_path), load_momentum=False)
    assert ckpt.momentum == {}
    assert ckpt.momentum_info == {"conv1_w_momentum": ArrayInfo(BIG.shape, np.dtype("<f4"))}
    entries = ckpt.entries()
    assert list(entries) == ckpt.names
    assert isinstance(entries["conv1_w_momentum"], ArrayInfo)
    assert entries["lr"] == ckpt.lr and entries["model_iter"] == 400000


def test_protocol0_flat_file_with_float_lr(tmp_path):
    blobs = {"conv1_w": BIG, "res_conv1_bn_s": SMALL, "lr": 0.00125}
    path = tmp_path / "affine.pkl"
    with open(path, "wb") as f:
        dump_py2(script_file_keys(blobs), f, protocol=0)
    ckpt = read_caffe2_pkl(path)
    assert not ckpt.wrapped and ckpt.protocol == 0 and ckpt.lr == 0.00125
    assert ckpt.model_iter is None and ckpt.momentum_info == {}
    assert ckpt.blobs["conv1_w"].tobytes() == BIG.tobytes()


def test_unicode_and_str_keys_alike(tmp_path):
    blobs = {Py2Key("conv1_w", unicode=True): SMALL, Py2Key("pred_b", memo=False): SMALL}
    path = tmp_path / "keys.pkl"
    with open(path, "wb") as f:
        dump_py2(blobs, f, protocol=2)
    assert list(read_caffe2_pkl(path).blobs) == ["conv1_w", "pred_b"]


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_python3_pickles_of_numpy2_arrays(tmp_path, protocol):
    # a checkpoint re-saved by Python 3 + numpy 2 (numpy._core names, _codecs.encode bytes,
    # protocol-5 _frombuffer), with a Fortran-ordered and a big-endian array and a numpy scalar
    blobs = {
        "conv1_w": BIG,
        "fortran": np.asfortranarray(RNG.standard_normal((300, 70)).astype(np.float32)),
        "big_endian": SMALL.astype(">f4"),
        "lr": np.float32(0.01),
    }
    path = _write(tmp_path / "py3.pkl", pickle.dumps({"blobs": blobs}, protocol=protocol))
    ckpt = read_caffe2_pkl(path)
    assert ckpt.lr == float(np.float32(0.01)) and ckpt.protocol == protocol
    for name in ("conv1_w", "fortran", "big_endian"):
        np.testing.assert_array_equal(ckpt.blobs[name], blobs[name])


def test_extra_top_level_entries_are_reported(tmp_path, caplog):
    path = _write(tmp_path / "x.pkl", pickle.dumps({"blobs": {"conv1_w": SMALL}, "cfg": "..."}))
    ckpt = read_caffe2_pkl(path)
    assert ckpt.top_level_extra == ["cfg"] and "cfg" in caplog.text


# ------------------------------------------------------------------------------------------
# Malicious pickles: refused, and their payload never runs


def _marker_payloads(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}".encode()
    py = f"open({str(marker)!r}, 'w').close()".encode()
    q = lambda s: b"S'" + s + b"'\n"  # noqa: E731 - protocol-0 string
    s2 = lambda s: b"U" + bytes([len(s)]) + s  # noqa: E731 - SHORT_BINSTRING
    array_prefix = (
        b"\x80\x02}q\x01U\x07conv1_wq\x02cnumpy.core.multiarray\n_reconstruct\nq\x03"
        b"cnumpy\nndarray\nq\x04K\x00\x85U\x01b\x87Rq\x05(K\x01K\x01\x85cnumpy\ndtype\nq\x06"
        b"U\x02f4K\x00K\x01\x87Rq\x07(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
    )
    return {
        "os.system REDUCE (protocol 0)": b"cos\nsystem\n(" + q(touch) + b"tR.",
        "posix.system REDUCE (protocol 2)": b"\x80\x02cposix\nsystem\n" + s2(touch) + b"\x85R.",
        "builtins.eval": b"\x80\x02cbuiltins\neval\n" + s2(py) + b"\x85R.",
        "__builtin__.eval (Python 2 name)": b"c__builtin__\neval\n(" + q(py) + b"tR.",
        "subprocess.Popen": b"csubprocess\nPopen\n((S'touch'\n" + q(str(marker).encode()) + b"ltR.",
        "global nested in an array's BUILD state": array_prefix
        + b"cos\nsystem\n"
        + s2(touch)
        + b"\x85RtbU\x02lrG?\x1a6\xe2\xeb\x1cC-u.",
        "global in a nested blob value": b"\x80\x02}U\x05blobs}U\x07conv1_wcos\nsystem\n"
        + s2(touch)
        + b"\x85Rss.",
        "STACK_GLOBAL (protocol 4)": b"\x80\x04\x8c\x02os\x8c\x06system\x93"
        + b"\x8c"
        + bytes([len(touch)])
        + touch
        + b"\x85R.",
        "copyreg._reconstructor": b"ccopy_reg\n_reconstructor\n(cos\n_wrap_close\nc__builtin__"
        b"\nobject\nNtR.",
        "INST": b"(" + q(touch) + b"ios\nsystem\n.",
        "OBJ": b"(cos\nsystem\n" + q(touch) + b"o.",
    }


@pytest.mark.parametrize("case", list(_marker_payloads(Path("m"))))
def test_malicious_pickles_are_refused_and_never_run(tmp_path, case):
    marker = tmp_path / "PWNED"
    data = _marker_payloads(marker)[case]
    path = _write(tmp_path / "evil.pkl", data)
    with pytest.raises(UnsafePickleError) as info:
        read_caffe2_pkl(path)
    message = str(info.value)
    assert str(path) in message and "nothing from the file was executed" in message
    if "INST" in case:
        assert "os.system (INST opcode)" in message
    elif "eval" in case:
        assert "eval" in message
    elif "Popen" in case:
        assert "subprocess.Popen" in message
    elif "copyreg" in case:
        assert "copy_reg._reconstructor" in message
    else:
        assert "system" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "case", ["os.system REDUCE (protocol 0)", "builtins.eval", "subprocess.Popen"]
)
def test_the_malicious_payloads_are_live(tmp_path, case):
    # the same bytes run their payload under the standard unpickler: the refusal above matters
    marker = tmp_path / "RAN"
    with contextlib.suppress(Exception):  # eval returns None, Popen a process: both "fail" later
        pickle.loads(_marker_payloads(marker)[case])
    if case == "subprocess.Popen":
        import time

        for _ in range(100):
            if marker.exists():
                break
            time.sleep(0.05)
    assert marker.exists()


@pytest.fixture
def extension_for_os_system():
    code = 0xF1
    copyreg.add_extension("os", "system", code)
    yield code
    copyreg.remove_extension("os", "system", code)


@pytest.mark.parametrize("opcode, width", [(b"\x82", 1), (b"\x83", 2), (b"\x84", 4)])
def test_extension_codes_are_refused(tmp_path, extension_for_os_system, opcode, width):
    def payload(marker: Path) -> bytes:
        touch = f"touch {marker}".encode()
        code = extension_for_os_system.to_bytes(width, "little")
        return b"\x80\x02" + opcode + code + b"U" + bytes([len(touch)]) + touch + b"\x85R."

    live = tmp_path / "LIVE"
    pickle.loads(payload(live))  # the standard unpickler runs it
    assert live.exists()
    marker = tmp_path / "PWNED"
    path = _write(tmp_path / "ext.pkl", payload(marker))
    with pytest.raises(UnsafePickleError, match=r"extension registry \(EXT\d code 241\)"):
        read_caffe2_pkl(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "data, what",
    [
        (b"Pfoo\n.", "persistent id"),
        (b"\x80\x02U\x03fooQ.", "persistent id"),
        (b"(cnumpy\ndtype\nS'f4'\no.", "OBJ opcode"),
        (b"\x80\x02cnumpy\ndtype\nU\x02f4\x85\x81.", "NEWOBJ opcode"),
        (b"\x80\x02cnumpy\nload\nU\x01x\x85R.", "numpy.load"),
        (b"\x80\x02cnumpy\nndarray\nK\x01\x85R.", "calls numpy.ndarray"),
        (
            b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85U\x01b\x87R.",
            "ndarray subclass or another type",
        ),
    ],
)
def test_other_unsafe_constructs(tmp_path, data, what):
    path = _write(tmp_path / "bad.pkl", data)
    with pytest.raises(UnsafePickleError, match=what):
        read_caffe2_pkl(path)


def test_object_and_structured_arrays_are_refused(tmp_path):
    obj = np.array([1, "a", None], dtype=object)
    path = _write(tmp_path / "obj.pkl", pickle.dumps({"conv1_w": obj}, protocol=2))
    with pytest.raises(UnsafePickleError, match="dtype object"):
        read_caffe2_pkl(path)
    rec = np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")])
    path = _write(tmp_path / "rec.pkl", pickle.dumps({"conv1_w": rec}, protocol=2))
    with pytest.raises(UnsafePickleError, match="dtype 'V8'"):
        read_caffe2_pkl(path)


# ------------------------------------------------------------------------------------------
# Files that are not (readable) checkpoints: the message names the file and says what it is


def _targz(tmp_path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("pretrained_model/r50_pretrain_c2_model_iter450450_clean.pkl", "b.pkl"):
            info = tarfile.TarInfo(name)
            payload = pickle.dumps({"lr": 0.1}, protocol=2)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _tar(tmp_path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("model.pkl")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    return buf.getvalue()


def _zip(tmp_path: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.pkl", b"abc")
    return buf.getvalue()


def _torch_file(tmp_path: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(2)}, buf)
    return buf.getvalue()


BAD_FILES = {
    "empty": (lambda p: b"", r"empty file \(0 bytes\): the download failed"),
    "tar.gz": (
        _targz,
        r"gzip-compressed tar archive \(its first member is "
        r"'pretrained_model/r50_pretrain_c2_model_iter450450_clean.pkl'\).*extract it first",
    ),
    "gzip": (lambda p: gzip.compress(b"x" * 100), r"gzip-compressed data.*gunzip"),
    "tar": (_tar, r"a tar archive \(its first member is 'model.pkl'\).*extract it first"),
    "zip": (_zip, r"a zip archive, not a checkpoint: extract it first"),
    "torch.save": (_torch_file, r"PyTorch file written by torch.save.*--to-caffe2"),
    "html": (
        lambda p: b"\n<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>",
        r"an HTML page, not a checkpoint: the download failed",
    ),
    "xml": (
        lambda p: b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>',
        r"an XML document \(typically a download server's error response\)",
    ),
    "text": (lambda p: b"model weights go here\n", r"a text file \(it starts with 'model weig"),
    "binary": (lambda p: b"\x00\x01\x02\x03garbage", r"unrecognised binary data"),
    "bzip2": (lambda p: b"BZh91AY&SY", r"bzip2-compressed data"),
    "lfs": (
        lambda p: b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n",
        r"Git LFS pointer",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_non_pickle_files_are_described(tmp_path, kind):
    make, pattern = BAD_FILES[kind]
    path = _write(tmp_path / "i3d_nonlocal_8x8_IN_pretrain_400k.pkl", make(tmp_path))
    with pytest.raises(Caffe2FormatError) as info:
        read_caffe2_pkl(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a Caffe2 checkpoint (a Python pickle): it is ")
    assert _search(pattern, message), message


def _search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text, re.S) is not None


def test_truncated_downloads(tmp_path):
    data = _checkpoint(tmp_path).read_bytes()
    big_at = data.index(BIG.tobytes()[:64])
    for cut, pattern in [
        (
            big_at + 1000,
            r"truncated file: a 188160-byte string starts at byte \d+ but the file "
            r"has only \d+ bytes; the download or copy is incomplete",
        ),
        (len(data) - 1, r"truncated file: it ends at byte \d+ before the pickle's end"),
        (40, r"truncated file"),
    ]:
        path = _write(tmp_path / f"cut{cut}.pkl", data[:cut])
        with pytest.raises(Caffe2FormatError) as info:
            read_caffe2_pkl(path)
        assert str(path) in str(info.value)
        assert _search(pattern, str(info.value)), str(info.value)


def test_corrupt_pickles(tmp_path):
    data = bytearray(_checkpoint(tmp_path).read_bytes())
    data[2] = 0xFF  # not an opcode
    path = _write(tmp_path / "corrupt.pkl", bytes(data))
    with pytest.raises(
        Caffe2FormatError,
        match=r"corrupt\.pkl: corrupt pickle at byte 2 .*"
        r"is not a pickle opcode",
    ):
        read_caffe2_pkl(path)
    path = _write(tmp_path / "short.pkl", b"\x80\x02}q\x01U\x07conv1_wtu.")  # stack/mark errors
    with pytest.raises(Caffe2FormatError, match=r"short\.pkl: corrupt pickle at byte \d+"):
        read_caffe2_pkl(path)
    # an array payload that does not match its shape
    bad = pickle.dumps({"w": SMALL}, protocol=2).replace(
        struct.pack("<B", 64) + b"\x85", struct.pack("<B", 65) + b"\x85"
    )
    path = _write(tmp_path / "size.pkl", bad)
    with pytest.raises(Caffe2FormatError, match=r"needs 260 bytes, the payload has 256"):
        read_caffe2_pkl(path)


def test_wrong_structures(tmp_path):
    cases = [
        (pickle.dumps([1, 2], protocol=2), r"holds a list, not a dict of blobs"),
        (pickle.dumps({1: SMALL}, protocol=2), r"blob names must be strings, found 1"),
        (pickle.dumps({"lr": SMALL}, protocol=2), r"entry 'lr' must be a single number"),
        (pickle.dumps({"model_iter": 1.5}, protocol=2), r"entry 'model_iter' must be an integer"),
    ]
    for i, (data, pattern) in enumerate(cases):
        path = _write(tmp_path / f"s{i}.pkl", data)
        with pytest.raises(Caffe2FormatError, match=pattern) as info:
            read_caffe2_pkl(path)
        assert str(path) in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(Caffe2FormatError, match=r"nope\.pkl: no such file"):
        read_caffe2_pkl(tmp_path / "nope.pkl")
    with pytest.raises(Caffe2FormatError, match="is a directory"):
        read_caffe2_pkl(tmp_path)


def test_damaged_files_only_ever_give_format_errors(tmp_path):
    # random byte flips, cuts and insertions in real Python 2 pickles: the reader either reads
    # the result or raises Caffe2FormatError naming the file, never anything else
    import random
    import warnings

    rng = random.Random(1234)
    golden = Path(__file__).parent / "data" / "caffe2_golden"
    path = tmp_path / "damaged.pkl"
    outcomes = {"read": 0, "refused": 0}
    for name in ("checkpoint_p2_wrapped.pkl", "affine_p0_flat.pkl", "imagenet_p2_flat.pkl"):
        data = (golden / name).read_bytes()
        for _ in range(150):
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(len(damaged))
                choice = rng.random()
                if choice < 0.5:
                    damaged[pos] = rng.randrange(256)
                elif choice < 0.75:
                    del damaged[pos : pos + rng.randint(1, 20)]
                else:
                    damaged[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 5)))
            path.write_bytes(bytes(damaged))
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                try:
                    read_caffe2_pkl(path)
                    outcomes["read"] += 1
                except Caffe2FormatError as e:
                    assert str(e).startswith(str(path))
                    outcomes["refused"] += 1
    assert outcomes["refused"] > 300  # most damage is detected
