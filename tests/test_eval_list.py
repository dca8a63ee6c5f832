"""The original's list files: line index = video id, bad lines kept and reported."""

from __future__ import annotations

import logging
import os

import pytest

from nonlocal_net.datasets import read_class_names, read_video_list, resolve_video_path


def test_entries_labels_and_bad_lines(tmp_path, caplog):
    lst = tmp_path / "vallist.txt"
    lst.write_text(
        "/data/val_256/abseiling/a.mp4 0\n"
        "/data/val_256/b c/with space.mp4 3\n"
        "/data/x.mkv 2,5\n"
        "/data/y.mp4 seven\n"
        "\n"
        "/data/z.mp4 400\n"
        "only_a_path.mp4\n"
        "/data/last.webm 399\n"
        "\n\n"
    )
    with caplog.at_level(logging.ERROR):
        vlist = read_video_list(lst, num_classes=400)
    assert len(vlist) == 8  # trailing blank lines are not entries; the middle one is
    assert [e.video_id for e in vlist.entries] == list(range(8))
    assert vlist.labels == [0, 3, 2, -1, -1, -1, -1, 399]
    assert vlist.entries[1].path == "/data/val_256/b c/with space.mp4"
    assert vlist.entries[2].labels == (2, 5)  # multi-label: first label scored
    bad = {e.line_no: e.error for e in vlist.bad_entries}
    assert sorted(bad) == [4, 5, 6, 7]
    assert "not an integer" in bad[4] and "empty line" in bad[5]
    assert "out of range (0..399)" in bad[6] and "expected '<path> <label>'" in bad[7]
    for line in (4, 5, 6, 7):
        assert f"{lst}:{line}" in caplog.text


def test_relative_and_rerooted_paths(tmp_path):
    root = tmp_path / "k400"
    (root / "val_256" / "abseiling").mkdir(parents=True)
    (root / "val_256" / "abseiling" / "a.mp4").write_bytes(b"x")
    (root / "zumba").mkdir()
    (root / "zumba" / "z.mp4").write_bytes(b"x")
    data_root = str(root)
    old = "/scratch/someone/kinetics/compress"
    assert resolve_video_path(f"{old}/val_256/abseiling/a.mp4", data_root) == os.path.join(
        data_root, "val_256", "abseiling", "a.mp4"
    )
    assert resolve_video_path(f"{old}/val_256/zumba/z.mp4", data_root) == os.path.join(
        data_root, "zumba", "z.mp4"
    )
    assert resolve_video_path(f"{old}/val_256/cls/missing.mp4", data_root) == os.path.join(
        data_root, "cls", "missing.mp4"
    )
    assert resolve_video_path("/abs/x.mp4", None) == "/abs/x.mp4"
    assert resolve_video_path("cls/x.mp4", data_root) == os.path.join(data_root, "cls/x.mp4")
    lst = tmp_path / "lists" / "val.txt"
    lst.parent.mkdir()
    lst.write_text("cls/x.mp4 1\n")
    vlist = read_video_list(lst)
    assert vlist.resolve(vlist.entries[0]) == os.path.join(str(lst.parent), "cls/x.mp4")


def test_missing_list_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        read_video_list(tmp_path / "nope.txt")


def test_class_names_from_classids_json_and_text(tmp_path):
    ids = tmp_path / "classids.json"
    ids.write_text('{"\\"air drumming\\"": 1, "abseiling": 0, "\\"zumba class\\"": 2}')
    assert read_class_names(ids) == ["abseiling", "air drumming", "zumba class"]
    names = tmp_path / "names.txt"
    names.write_text("abseiling\nair drumming\n\n")
    assert read_class_names(names, num_classes=2) == ["abseiling", "air drumming"]
    with pytest.raises(ValueError, match="2 class names for a model with 400"):
        read_class_names(names, num_classes=400)
    gap = tmp_path / "gap.json"
    gap.write_text('{"a": 0, "b": 2}')
    with pytest.raises(ValueError, match="missing"):
        read_class_names(gap)
