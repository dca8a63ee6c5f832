"""``pretrained=True`` and zoo names: the download cache (torch hub dir, atomic, resumable,
SHA-256 recorded and checked), the converted-weights cache and ``VNL_ZOO_URL``, against a
loopback HTTP server on 127.0.0.1 and local mirror folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hub_helpers import TINY, loopback_server, tiny_entry, write_release

import nonlocal_net as nl
from nonlocal_net import pretrained
from nonlocal_net.converters.cli import main as vnl_convert
from nonlocal_net.converters.errors import UnsafePickleError
from nonlocal_net.core import hub, zoo
from nonlocal_net.utils.download import ChecksumError, DownloadError, file_sha256


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    """A mirror folder holding the tiny stand-in's synthetic release."""
    folder = tmp_path_factory.mktemp("mirror")
    write_release(folder)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh torch home (so a fresh cache) with the stand-in in the zoo."""
    monkeypatch.setitem(zoo.ZOO, TINY, tiny_entry())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(hub.ENV_ZOO_URL, raising=False)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrained_downloads_converts_and_caches(mirror, cache, monkeypatch, tmp_path, capsys):
    with loopback_server(mirror) as (url, state):
        monkeypatch.setenv(hub.ENV_ZOO_URL, url)
        model = nl.create_model(TINY, pretrained=True)
        assert state.requests == [(f"/{TINY}.pkl", None)]
    assert hub.cache_dir() == str(cache)  # TORCH_HOME moved it
    assert sorted(os.listdir(cache)) == sorted(
        f"{TINY}{s}" for s in (".pkl", ".pkl.sha256", ".pt", ".pt.json")
    )
    pkl = mirror / f"{TINY}.pkl"
    assert (cache / f"{TINY}.pkl").read_bytes() == pkl.read_bytes()
    assert (cache / f"{TINY}.pkl.sha256").read_text().split()[0] == file_sha256(pkl)
    # bit for bit what vnl-convert + load_model give
    dst = tmp_path / "converted.pt"
    assert vnl_convert([str(pkl), str(dst), "--model", TINY]) == 0
    capsys.readouterr()
    _same_weights(model, nl.load_model(dst))
    assert model.cfg == nl.load_model(dst).cfg and not model.training


def test_warm_cache_needs_no_server_and_no_conversion(mirror, cache, monkeypatch):
    with loopback_server(mirror) as (url, _):
        monkeypatch.setenv(hub.ENV_ZOO_URL, url)
        first = nl.load_model(TINY, split="val")
    # the server is gone; a conversion would fail loudly
    monkeypatch.setattr(pretrained, "convert_caffe2_pkl", _must_not_run)
    again = nl.load_model(TINY, split="val")
    _same_weights(first, again)
    assert nl.create_model(TINY, pretrained=True, split="val").cfg == first.cfg


def _must_not_run(*args, **kwargs):
    raise AssertionError("converted again although the cache holds the conversion")


def test_a_cold_cache_with_the_server_gone_names_url_and_file(cache, monkeypatch):
    with loopback_server(Path("/nonexistent")) as (url, _):
        pass
    monkeypatch.setenv(hub.ENV_ZOO_URL, url)
    with pytest.raises(DownloadError) as info:
        nl.create_model(TINY, pretrained=True)
    message = str(info.value)
    assert f"{url}{TINY}.pkl" in message and str(cache / f"{TINY}.pkl") in message
    assert "\n" not in message and not cache.joinpath(f"{TINY}.pkl").exists()


def test_404_names_url_and_file(mirror, cache, monkeypatch, tmp_path):
    with loopback_server(tmp_path) as (url, _):  # serves an empty folder
        monkeypatch.setenv(hub.ENV_ZOO_URL, url)
        with pytest.raises(DownloadError, match="HTTP 404") as info:
            hub.fetch_released(TINY)
    assert f"{url}{TINY}.pkl" in str(info.value) and str(cache) in str(info.value)


def test_truncated_download_is_never_final_and_resumes(mirror, cache, monkeypatch):
    size = (mirror / f"{TINY}.pkl").stat().st_size
    final, part = cache / f"{TINY}.pkl", cache / f"{TINY}.pkl.part"
    with loopback_server(mirror) as (url, state):
        monkeypatch.setenv(hub.ENV_ZOO_URL, url)
        state.truncate = 1
        with pytest.raises(DownloadError, match="truncated") as info:
            nl.create_model(TINY, pretrained=True)
        assert f"{url}{TINY}.pkl" in str(info.value) and str(final) in str(info.value)
        assert not final.exists() and part.stat().st_size == size // 2
        model = nl.create_model(TINY, pretrained=True)
        assert state.requests[-1] == (f"/{TINY}.pkl", f"bytes={size // 2}-")
    assert not part.exists() and file_sha256(final) == file_sha256(mirror / f"{TINY}.pkl")
    _same_weights(model, nl.load_model(TINY))


def test_a_server_ignoring_range_restarts_the_download(mirror, cache, monkeypatch):
    part = cache / f"{TINY}.pkl.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage that is not the start of the file")
    with loopback_server(mirror) as (url, state):
        state.ranges = False
        monkeypatch.setenv(hub.ENV_ZOO_URL, url)
        path = hub.fetch_released(TINY)
        assert state.requests[0][1] == f"bytes={len(b'garbage that is not the start of the file')}-"
    assert file_sha256(path) == file_sha256(mirror / f"{TINY}.pkl") and not part.exists()


def test_a_part_longer_than_the_file_restarts(mirror, cache, monkeypatch):
    part = cache / f"{TINY}.pkl.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * ((mirror / f"{TINY}.pkl").stat().st_size + 10))
    with loopback_server(mirror) as (url, _):  # answers 416 to the range
        monkeypatch.setenv(hub.ENV_ZOO_URL, url)
        path = hub.fetch_released(TINY)
    assert file_sha256(path) == file_sha256(mirror / f"{TINY}.pkl")


@pytest.mark.parametrize("which", [".pkl", ".pt"])
def test_a_changed_file_is_refused_in_one_line(which, mirror, cache, monkeypatch):
    monkeypatch.setenv(hub.ENV_ZOO_URL, str(mirror))
    nl.load_model(TINY)
    changed = cache / f"{TINY}{which}"
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed.write_bytes(bytes(data))
    for load in (lambda: nl.load_model(TINY), lambda: nl.create_model(TINY, pretrained=True)):
        with pytest.raises(ChecksumError) as info:
            load()
        message = str(info.value)
        assert message.startswith(f"{changed}: sha256 ") and "the file changed" in message
        assert "\n" not in message
    if which == ".pkl":  # the original's files are checked too
        with pytest.raises(ChecksumError):
            pretrained.resolve_weights(TINY, caffe2=True)


def test_a_deleted_file_is_fetched_again_and_must_match_its_record(
    mirror, cache, monkeypatch, tmp_path
):
    monkeypatch.setenv(hub.ENV_ZOO_URL, str(mirror))
    hub.fetch_released(TINY)
    os.unlink(cache / f"{TINY}.pkl")
    assert hub.fetch_released(TINY) == str(cache / f"{TINY}.pkl")  # same bytes: accepted
    os.unlink(cache / f"{TINY}.pkl")
    other = tmp_path / "other_mirror"
    write_release(other, seed=3)  # the mirror now serves other bytes under the same name
    monkeypatch.setenv(hub.ENV_ZOO_URL, str(other))
    with pytest.raises(ChecksumError, match=r"recorded in .*\.sha256"):
        hub.fetch_released(TINY)
    assert not (cache / f"{TINY}.pkl").exists() and not (cache / f"{TINY}.pkl.part").exists()


def test_a_pinned_sha256_is_checked_instead(mirror, cache, monkeypatch):
    monkeypatch.setenv(hub.ENV_ZOO_URL, str(mirror))
    monkeypatch.setitem(zoo.ZOO, TINY, tiny_entry(sha256="0" * 64))
    with pytest.raises(ChecksumError, match="the zoo pins it"):
        nl.create_model(TINY, pretrained=True)
    assert not (cache / f"{TINY}.pkl").exists()
    good = file_sha256(mirror / f"{TINY}.pkl")
    monkeypatch.setitem(zoo.ZOO, TINY, tiny_entry(sha256=good))
    nl.create_model(TINY, pretrained=True)
    (cache / f"{TINY}.pkl.sha256").write_text("f" * 64 + "\n")  # a record is not the pin
    nl.load_model(TINY)
    monkeypatch.setitem(zoo.ZOO, TINY, tiny_entry(sha256="1" * 64))
    with pytest.raises(ChecksumError, match="pins"):
        nl.load_model(TINY)


@pytest.mark.parametrize("form", ["folder", "file_url"])
def test_vnl_zoo_url_as_folder_and_file_url(form, mirror, cache, monkeypatch):
    monkeypatch.setenv(hub.ENV_ZOO_URL, mirror.as_uri() if form == "file_url" else str(mirror))
    path = pretrained.resolve_weights(TINY, caffe2=True)
    assert path == str(cache / f"{TINY}.pkl")
    assert Path(path).read_bytes() == (mirror / f"{TINY}.pkl").read_bytes()


def test_vnl_zoo_url_errors(mirror, cache, monkeypatch, tmp_path):
    for value, error in (
        ("ftp://host/models", "expected an http"),
        (str(tmp_path / "missing"), "no such folder"),
        ((tmp_path / "missing").as_uri(), "no such file"),
    ):
        monkeypatch.setenv(hub.ENV_ZOO_URL, value)
        with pytest.raises((ValueError, OSError), match=error):
            hub.fetch_released(TINY)


def test_a_new_converter_version_converts_again(mirror, cache, monkeypatch):
    monkeypatch.setenv(hub.ENV_ZOO_URL, str(mirror))
    nl.load_model(TINY)
    record = cache / f"{TINY}.pt.json"
    data = json.loads(record.read_text())
    assert data["converter_version"] == pretrained.converter_version()
    data["converter_version"] = "an older converter"
    record.write_text(json.dumps(data))
    calls = []
    real = pretrained.convert_caffe2_pkl
    monkeypatch.setattr(
        pretrained, "convert_caffe2_pkl", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    nl.load_model(TINY)
    assert len(calls) == 1
    assert json.loads(record.read_text())["converter_version"] == pretrained.converter_version()


def test_a_downloaded_file_is_as_untrusted_as_any_other(cache, monkeypatch, tmp_path):
    evil = tmp_path / "evil_mirror"
    evil.mkdir()
    marker = tmp_path / "pwned"
    (evil / f"{TINY}.pkl").write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with loopback_server(evil) as (url, _):
        monkeypatch.setenv(hub.ENV_ZOO_URL, url)
        with pytest.raises(UnsafePickleError):
            nl.create_model(TINY, pretrained=True)
    assert not marker.exists() and not (cache / f"{TINY}.pt").exists()


def test_paths_win_over_names_and_other_text_is_unchanged(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(TINY).write_bytes(b"a local file named like a model")
    assert pretrained.resolve_weights(TINY) == TINY
    assert pretrained.resolve_weights("no_such_file.pt") == "no_such_file.pt"
    assert not cache.exists()


def test_pretrained_needs_a_released_name(cache):
    with pytest.raises(ValueError, match="released model"):
        nl.create_model("not_a_model", pretrained=True)
    with pytest.raises(ValueError, match="not both"):
        nl.create_model(TINY, weights="x.pt", pretrained=True)


def test_concurrent_loads_share_one_download(mirror, cache, monkeypatch):
    """Two threads standing in for two ranks: one downloads, the other waits for its file."""
    import threading

    results: list[object] = []
    with loopback_server(mirror) as (url, state):
        monkeypatch.setenv(hub.ENV_ZOO_URL, url)
        threads = [
            threading.Thread(target=lambda: results.append(hub.fetch_released(TINY)))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(state.requests) == 1
    assert results == [str(cache / f"{TINY}.pkl")] * 2


def test_cache_dir_follows_torch_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))
    assert hub.cache_dir() == str(tmp_path / "elsewhere" / "hub" / "checkpoints")
    shutil.rmtree(tmp_path / "elsewhere", ignore_errors=True)
