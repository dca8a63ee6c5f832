"""Training clips against an independent computation of the original's augmentation, and the
replacement of videos that cannot be decoded."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import nonlocal_net as nl
from nonlocal_net.datasets import read_video_list
from nonlocal_net.datasets.synthetic import (
    write_empty_file,
    write_list_file,
    write_undecodable_file,
    write_video,
)
from nonlocal_net.datasets.train_clips import (
    TrainClipDataset,
    TrainSampler,
    TrainSampling,
    clip_rng,
    epoch_order,
    normalise_clips,
)

CFG = ["TRAIN.VIDEO_LENGTH", "4", "TRAIN.SAMPLE_RATE", "3", "TRAIN.JITTER_SCALES", "[112, 140]"]


def cfg(extra=()):
    return nl.get_cfg("i3d_nonlocal_8x8_IN_pretrain_400k", [*CFG, "TRAIN.CROP_SIZE", "100", *extra])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_videos")
    write_video(root / "a/landscape.avi", 30, 170, 96, seed=1)  # long: jittered start
    write_video(root / "b/portrait.avi", 9, 82, 128, seed=2)  # shorter than L*r: loops
    write_undecodable_file(root / "broken/bad.mp4")
    write_empty_file(root / "broken/empty.mp4")
    lines = [("a/landscape.avi", 0), ("b/portrait.avi", 1)]
    write_list_file(root / "train.txt", lines)
    write_list_file(
        root / "with_bad.txt",
        [*lines, ("broken/bad.mp4", 0), ("broken/empty.mp4", 1), ("no_label_here", "x")],
    )
    return root


def decode_all(path):
    """Every frame with OpenCV directly, RGB."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return frames


def by_hand(frames, seed, epoch, index, L, r, lo, hi, c):
    """The original's training augmentation, written out from its description."""
    rng = np.random.default_rng([seed, epoch, index, 0])
    n = len(frames)
    start = int(rng.integers(0, n - L * r + 1)) if n - L * r > 0 else 0
    s = int(rng.integers(lo, hi + 1))
    h, w = frames[0].shape[:2]
    short = w if h > w else h
    ratio = np.float32(s) / np.float32(short)
    nh, nw = int(np.float32(h) * ratio), int(np.float32(w) * ratio)
    h_off = int(rng.integers(0, nh - c + 1))
    w_off = int(rng.integers(0, nw - c + 1))
    flip = rng.random() < 0.5
    out = np.zeros((3, L, c, c), np.float32)
    for k in range(L):
        f = cv2.resize(frames[(start + k * r) % n], (nw, nh), interpolation=cv2.INTER_LINEAR)
        crop = f[h_off : h_off + c, w_off : w_off + c].astype(np.float32)
        if flip:
            crop = crop[:, ::-1]
        out[:, k] = crop.transpose(2, 0, 1)
    out = (out - np.float32(114.75)) * (np.float32(1) / np.float32(57.375))
    return out, dict(start=start, scale=s, h_off=h_off, w_off=w_off, flip=flip, size=(nh, nw))


def test_clip_equals_the_augmentation_by_hand(videos):
    c = cfg()
    vlist = read_video_list(videos / "train.txt", num_classes=c.MODEL.NUM_CLASSES)
    ds = TrainClipDataset(vlist, TrainSampling.from_cfg(c), seed=5)
    names = ["a/landscape.avi", "b/portrait.avi"]
    flips, starts = set(), set()
    for position in range(12):
        epoch, index = divmod(position, 2)
        entry = int(epoch_order(5, epoch, 2)[index])
        item = ds[position]
        assert item["label"] == entry and item["failures"] == []
        clip = normalise_clips(item["clip"][None], ds.sampling)[0]
        frames = decode_all(videos / names[entry])
        expected, draws = by_hand(frames, 5, epoch, index, 4, 3, 112, 140, 100)
        np.testing.assert_array_equal(clip.numpy(), expected)
        flips.add(draws["flip"])
        starts.add((entry, draws["start"]))
    assert flips == {True, False}  # both branches were compared
    assert len({s for e, s in starts if e == 0}) > 1  # the long video's start is jittered
    assert {s for e, s in starts if e == 1} == {0}  # the short one starts at 0 and loops


def test_draws_are_a_function_of_seed_and_position(videos):
    c = cfg()
    vlist = read_video_list(videos / "train.txt")
    a = TrainClipDataset(vlist, TrainSampling.from_cfg(c), seed=5)
    b = TrainClipDataset(vlist, TrainSampling.from_cfg(c), seed=5)
    other = TrainClipDataset(vlist, TrainSampling.from_cfg(c), seed=6)
    assert torch.equal(a[7]["clip"], b[7]["clip"])
    assert not all(torch.equal(a[p]["clip"], other[p]["clip"]) for p in range(4))
    assert clip_rng(5, 1, 2).integers(1 << 30) != clip_rng(5, 2, 1).integers(1 << 30)


def test_sampler_positions_split_the_global_batch():
    one = list(TrainSampler(3, 5, 4, 0, 1))
    two = [list(TrainSampler(3, 5, 4, q, 2)) for q in range(2)]
    assert one == [12, 13, 14, 15, 16, 17, 18, 19]
    assert two == [[12, 13, 16, 17], [14, 15, 18, 19]]


def test_undecodable_videos_are_replaced_and_bad_lines_left_out(videos, caplog):
    c = cfg()
    vlist = read_video_list(videos / "with_bad.txt", num_classes=c.MODEL.NUM_CLASSES)
    ds = TrainClipDataset(vlist, TrainSampling.from_cfg(c), seed=1)
    assert len(ds) == 4  # the line without a label is left out, with a message
    assert "1 of 5 list lines are bad" in caplog.text
    items = [ds[p] for p in range(8)]  # two epochs: the epoch keeps its length
    failures = [f for x in items for f in x["failures"]]
    assert sorted(set(failures)) == [2, 3]  # both broken files, each time they came up
    assert len(failures) >= 4
    assert all(x["clip"].shape == (3, 4, 100, 100) for x in items)
    assert "bad.mp4" in caplog.text and "replaced by another sample" in caplog.text


def test_crop_larger_than_jitter_scale_is_refused():
    with pytest.raises(nl.ConfigError, match="JITTER_SCALES"):
        TrainSampling.from_cfg(cfg(["TRAIN.CROP_SIZE", "120"]))


def test_training_lists_take_only_ascii_digit_labels(videos, caplog):
    """The training list is read by the evaluation's parser: '+2', an Arabic-Indic digit or
    '1_0' (all of which int() takes) are bad lines, logged with file:line and left out."""
    lst = videos / "odd_labels.txt"
    lst.write_text(
        "a/landscape.avi 0\nb/portrait.avi +1\na/landscape.avi \u0661\nb/portrait.avi 1_0\n"
        "b/portrait.avi 1\n",
        encoding="utf-8",
    )
    with caplog.at_level("ERROR"):
        vlist = read_video_list(lst, data_root=videos, num_classes=400)
        dataset = TrainClipDataset(vlist, TrainSampling.from_cfg(cfg()), seed=0)
    assert [e.label for e in dataset.entries] == [0, 1]
    for line in (2, 3, 4):
        assert f"{lst}:{line}" in caplog.text
    assert "3 of 5 list lines are bad" in caplog.text
