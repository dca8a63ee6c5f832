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


# Every character str.splitlines() breaks at, besides \n and \r: in a file name they are
# characters of the name (the original's Python 2 readers split byte strings at \n only).
UNICODE_BREAKS = ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e"]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_lines_end_at_newline_only(tmp_path, newline):
    names = [f"cls/a{c}b.mp4" for c in UNICODE_BREAKS]
    lst = tmp_path / "vallist.txt"
    lst.write_bytes("".join(f"{n} {i}{newline}" for i, n in enumerate(names)).encode())
    vlist = read_video_list(lst, num_classes=len(names))
    assert [e.path for e in vlist.entries] == names
    assert vlist.labels == list(range(len(names)))
    assert not vlist.bad_entries


def test_form_feed_name_keeps_the_video_ids(tmp_path):
    """4 lines are 4 entries even when a name holds a form feed or U+2028."""
    lst = tmp_path / "vallist.txt"
    lst.write_text("a.mp4 0\nb\x0cc.mp4 1\nd\u2028e.mp4 2\nf.mp4 3\n", newline="")
    vlist = read_video_list(lst, num_classes=4)
    assert len(vlist) == 4 and vlist.labels == [0, 1, 2, 3]
    assert vlist.entries[3].path == "f.mp4"


@pytest.mark.parametrize(
    "label, reason",
    [
        ("+2", "not an integer written in ASCII digits"),
        ("\u0663", "not an integer written in ASCII digits"),  # Arabic-Indic three
        ("\uff12", "not an integer written in ASCII digits"),  # fullwidth two
        ("2_0", "not an integer written in ASCII digits"),
        ("\u00a02", "not an integer written in ASCII digits"),  # no-break space, then 2
        ("2.0", "not an integer written in ASCII digits"),
        ("0x2", "not an integer written in ASCII digits"),
        ("1,+2", "not an integer written in ASCII digits"),
        ("3,", "not an integer written in ASCII digits"),
        ("-1", "out of range (labels are >= 0)"),
        ("7", "out of range (0..6)"),
        ("9" * 5000, "out of range (above 2147483647)"),
    ],
)
def test_labels_are_ascii_digits_in_range(tmp_path, caplog, label, reason):
    lst = tmp_path / "vallist.txt"
    lst.write_text(f"ok.mp4 1\nodd.mp4 {label}\n", encoding="utf-8")
    with caplog.at_level(logging.ERROR):
        vlist = read_video_list(lst, num_classes=7)
    assert vlist.labels == [1, -1] and len(vlist.bad_entries) == 1
    assert reason in vlist.entries[1].error
    assert f"{lst}:2" in caplog.text


def test_label_glued_by_a_non_ascii_space_is_not_split(tmp_path):
    lst = tmp_path / "vallist.txt"
    lst.write_text("a.mp4\u20032\n", encoding="utf-8")  # EM SPACE is not a separator
    (entry,) = read_video_list(lst).entries
    assert "expected '<path> <label>'" in entry.error


def test_leading_zeros_and_tabs_are_accepted(tmp_path):
    lst = tmp_path / "vallist.txt"
    lst.write_text("  dir with  spaces/a.mp4\t007 \nb.mp4 3,017\n")
    vlist = read_video_list(lst, num_classes=400)
    assert [e.path for e in vlist.entries] == ["dir with  spaces/a.mp4", "b.mp4"]
    assert vlist.entries[0].labels == (7,) and vlist.entries[1].labels == (3, 17)


def test_list_size_is_bounded(tmp_path):
    from nonlocal_net.datasets.text_lines import MAX_TEXT_BYTES

    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(MAX_TEXT_BYTES + 1)  # sparse: nothing is read
    with pytest.raises(ValueError, match=r"huge\.txt is larger than"):
        read_video_list(huge)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_devices_fifos_and_folders_are_refused_unread(tmp_path):
    with pytest.raises(OSError, match="/dev/zero is a device, FIFO or socket"):
        read_video_list("/dev/zero")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes to it: opening it for reading must not block
    with pytest.raises(OSError, match="fifo is a device, FIFO or socket"):
        read_video_list(fifo)
    with pytest.raises(OSError, match="is a directory"):
        read_video_list(tmp_path)
    with pytest.raises(OSError, match="is a device"):
        read_class_names("/dev/zero")


def test_class_names_split_at_newline_only(tmp_path):
    names = tmp_path / "names.txt"
    names.write_bytes("a\u2028b\r\nc\x0cd\n".encode())
    assert read_class_names(names, num_classes=2) == ["a\u2028b", "c\x0cd"]
