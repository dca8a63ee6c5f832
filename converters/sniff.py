"""Say what a file that is not a pickle looks like, so that the error tells the user what to do.

Downloads of the released checkpoints go wrong in typical ways: the tarball of initialisation
files is passed instead of one ``.pkl`` from it, a server error page is saved under the ``.pkl``
name, the transfer stops half way, or a converted PyTorch file is passed back in.
"""

from __future__ import annotations

import struct
import zipfile
import zlib

__all__ = ["describe_file_head", "describe_known_format", "looks_like_pickle"]

_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<!--")


def looks_like_pickle(head: bytes) -> bool:
    """Whether ``head`` starts the way a pickle of a dict starts (protocol 2+ header, or the
    ``MARK``/``EMPTY_DICT`` opening of protocol 0/1 dicts)."""
    if head[:1] == b"\x80":
        return len(head) >= 2 and head[1] <= 5
    return head[:1] in (b"(", b"}")


def _tar_member_name(block: bytes) -> str | None:
    if len(block) >= 512 and block[257:262] == b"ustar":
        return block[:100].split(b"\0", 1)[0].decode("utf-8", "replace") or "?"
    return None


def _describe_gzip(head: bytes) -> str:
    try:
        inner = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 4096)
    except zlib.error:
        inner = b""
    member = _tar_member_name(inner)
    if member is not None:
        return (
            f"a gzip-compressed tar archive (its first member is {member!r}), not a checkpoint: "
            f"extract it first (tar xzf FILE) and convert the .pkl files inside one by one"
        )
    return "gzip-compressed data, not a checkpoint: decompress it first (gunzip FILE)"


def _describe_zip(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "a (damaged) zip archive, not a checkpoint"
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return (
            "a PyTorch file written by torch.save (a zip archive), not a Caffe2 checkpoint: load "
            "it with nonlocal_net.load_model, or turn it back into a Caffe2 .pkl with "
            "vnl-convert FILE OUT.pkl --to-caffe2"
        )
    return "a zip archive, not a checkpoint: extract it first"


def _printable(data: bytes) -> bool:
    return all(32 <= b < 127 or b in (9, 10, 13) for b in data)


def describe_known_format(head: bytes, path: str | None = None) -> str | None:
    """A description of ``head`` if it starts with the signature of a known non-pickle format
    (archives, compressed data, HTML/XML pages, ...), else ``None``. ``path`` lets zip archives
    be inspected further."""
    if not head:
        return "an empty file (0 bytes): the download failed or was interrupted"
    lowered = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head[:2] == b"\x1f\x8b":
        return _describe_gzip(head)
    if head[:3] == b"BZh":
        return "bzip2-compressed data, not a checkpoint: decompress it first (bunzip2 FILE)"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz-compressed data, not a checkpoint: decompress it first (unxz FILE)"
    if head[:4] == b"PK\x03\x04":
        return _describe_zip(path) if path else "a zip archive, not a checkpoint"
    member = _tar_member_name(head)
    if member is not None:
        return (
            f"a tar archive (its first member is {member!r}), not a checkpoint: extract it "
            f"first (tar xf FILE)"
        )
    if lowered.startswith(_HTML_STARTS) or b"<html" in lowered[:1024]:
        return (
            "an HTML page, not a checkpoint: the download failed (an error or sign-in page was "
            "saved under the checkpoint's name); download the file again"
        )
    if lowered.startswith(b"<?xml"):
        return (
            "an XML document (typically a download server's error response), not a checkpoint: "
            "download the file again"
        )
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer file, not the checkpoint itself: fetch it with git lfs pull"
    if head[:4] == b"\x89HDF":
        return "an HDF5 file, not a Caffe2 checkpoint"
    if head[:6] == b"\x93NUMPY":
        return "a NumPy .npy file, not a Caffe2 checkpoint (a pickled dict of arrays)"
    if len(head) >= 9 and head[8:9] == b"{":
        (length,) = struct.unpack("<Q", head[:8])
        if 0 < length < 100_000_000:
            return "a safetensors file, not a Caffe2 checkpoint"
    return None


def describe_file_head(head: bytes, path: str | None = None) -> str:
    """A short description of a file from its first bytes (up to a few KiB), e.g. "an HTML page
    ...: the download failed"."""
    known = describe_known_format(head, path)
    if known is not None:
        return known
    sample = head[:64]
    if _printable(sample):
        text = sample.decode("ascii").splitlines()[0][:40] if sample.strip() else ""
        return f"a text file (it starts with {text!r}), not a Caffe2 checkpoint"
    return f"unrecognised binary data (it starts with bytes {head[:8].hex(' ')}), not a pickle"
