"""The original's 30 test views, checked against the spec's formulas computed by hand here and
against an independent decode + resize + crop of the same files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import nonlocal_net as nl
from nonlocal_net.core.config import ConfigError
from nonlocal_net.datasets import (
    TestProtocol,
    VideoDecodeError,
    available_backends,
    clip_start,
    decode_selected,
    decode_video,
    load_test_video,
    scaled_size,
    test_views,
)
from nonlocal_net.datasets.synthetic import render_frame, write_video

CFG = nl.get_cfg("i3d_nonlocal_8x8_IN_pretrain_400k")  # L=8, r=8, 256 crops, 30 views
L, R = 8, 8
HAVE_PYAV = "pyav" in available_backends()
needs_pyav = pytest.mark.skipif(not HAVE_PYAV, reason="PyAV (optional extra 'pyav') not installed")

# (newH, newW) and the (h_off, w_off) of spatial positions 0, 1, 2, worked out by hand from
# spec 6.5 (float32 ratio 256/short side, truncation; offsets (new - 256) / 2 truncated, times
# the position along the long side). 166 wide -> 255 columns, the spec's own example.
EXPECTED = {
    "class_a/landscape_340.mp4": ((256, 340), [(0, 0), (0, 42), (0, 84)]),
    "class_a/portrait_166.avi": ((394, 255), [(0, 0), (69, 0), (138, 0)]),
    "class_b/square.mkv": ((256, 256), [(0, 0), (0, 0), (0, 0)]),
    "class_b/short_wrap.mp4": ((256, 320), [(0, 0), (0, 32), (0, 64)]),
    "class_c/landscape_hd.avi": ((256, 455), [(0, 0), (0, 99), (0, 198)]),
    "class_c/portrait_tall.mp4": ((455, 256), [(0, 0), (99, 0), (198, 0)]),
}


def hand_indices(j: int, n: int) -> list[int]:
    start = (j * n) // 10
    return [(start + k * R) % n for k in range(L)]


def decode_by_hand(path) -> list[np.ndarray]:
    """Every frame with a plain cv2.VideoCapture.read() loop, RGB."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(bgr[:, :, ::-1].copy())
    cap.release()
    return frames


def decode_with_pyav(path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [
            f.to_ndarray(format="rgb24", interpolation="FAST_BILINEAR")
            for f in container.decode(video=0)
        ]


def normalise_by_hand(values: np.ndarray) -> np.ndarray:
    inv_std = np.float32(1.0) / np.float32(57.375)  # spec 6.5.5: float32 1/std
    return (values.astype(np.float32) - np.float32(114.75)) * inv_std


def view_by_hand(frames, view: int, size, offsets) -> np.ndarray:
    """(3, L, 256, 256) float32 of view ``view`` = 10*ct + j, from decoded RGB frames."""
    ct, j = divmod(view, 10)
    new_h, new_w = size
    h_off, w_off = offsets[ct]
    clip = []
    for index in hand_indices(j, len(frames)):
        frame = frames[index]
        if frame.shape[:2] != (new_h, new_w):
            frame = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        clip.append(frame)
    clip = np.stack(clip)  # (L, newH, newW, 3)
    if new_w >= 256:
        crop = clip[:, h_off : h_off + 256, w_off : w_off + 256]
        return normalise_by_hand(crop.transpose(3, 0, 1, 2))
    # 255 columns: row h of the crop is row h_off+h plus the first pixel of the next row of
    # the (3, L, newH, newW) buffer (next frame / next channel at a plane's end; 0 past the end)
    planes = clip.transpose(3, 0, 1, 2)  # (3, L, newH, 255)
    out = np.zeros((3, L, 256, 256), dtype=np.uint8)
    for c in range(3):
        for t in range(L):
            for h in range(256):
                row = h_off + h
                out[c, t, h, :255] = planes[c, t, row]
                if row + 1 < new_h:
                    nxt = planes[c, t, row + 1, 0]
                elif t + 1 < L:
                    nxt = planes[c, t + 1, 0, 0]
                elif c + 1 < 3:
                    nxt = planes[c + 1, 0, 0, 0]
                else:
                    nxt = 0  # the original reads one element past its buffer
                out[c, t, h, 255] = nxt
    return normalise_by_hand(out)


def test_clip_start_is_floor_j_n_over_10():
    for n in range(1, 3001):
        for j in range(10):
            assert clip_start(j, n, 10) == (j * n) // 10, (n, j)


def test_float32_resize_truncation_matches_the_spec():
    affected = [w for w in range(1, 2000) if scaled_size(2000, w, 256)[1] == 255]
    assert len(affected) == 271  # spec 6.5.1
    assert affected[:6] == [41, 47, 55, 61, 82, 83]
    assert scaled_size(256, 166, 256) == (394, 255)  # spec example: W=166 -> 394x255
    assert scaled_size(256, 454, 256) == (256, 454)  # landscape copies are not resized
    assert scaled_size(720, 1280, 256) == (256, 455)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_frame_indices_and_offsets_of_every_view(eval_videos, name):
    spec = next(s for s in eval_videos.specs if s.name == name)
    size, offsets = EXPECTED[name]
    video = load_test_video(eval_videos.root / name, TestProtocol.from_cfg(CFG))
    assert video.meta.num_frames == spec.num_frames  # N = frames actually decoded
    assert (video.meta.height, video.meta.width) == (spec.height, spec.width)
    assert (video.meta.scaled_height, video.meta.scaled_width) == size
    assert video.num_views == 30
    for view in range(30):
        ct, j = view // 10, view % 10
        assert video.view_frames(view).tolist() == hand_indices(j, spec.num_frames), view
        assert video.view_offset(view) == offsets[ct], view


def test_short_video_wraps(eval_videos):
    video = load_test_video(eval_videos.root / "class_b/short_wrap.mp4", TestProtocol.from_cfg(CFG))
    # N = 5: clip 0 = 0, 8, 16, ... mod 5 = 0, 3, 1, 4, 2, 0, 3, 1; clip 9 starts at 4
    assert video.view_frames(0).tolist() == [0, 3, 1, 4, 2, 0, 3, 1]
    assert video.view_frames(9).tolist() == [4, 2, 0, 3, 1, 4, 2, 0]


@pytest.mark.parametrize(
    "name, views",
    [
        ("class_a/landscape_340.mp4", range(30)),
        ("class_a/portrait_166.avi", [0, 5, 10, 19, 20, 29]),  # 255 columns: row wrap
        ("class_c/landscape_hd.avi", [0, 13, 26]),  # scaled down 480x270 -> 455x256
        ("class_c/portrait_tall.mp4", [9, 11, 22]),  # scaled up, vertical crops
        ("class_b/short_wrap.mp4", [3, 17, 29]),
    ],
)
def test_view_pixels_match_an_independent_computation(eval_videos, name, views):
    size, offsets = EXPECTED[name]
    frames = decode_by_hand(eval_videos.root / name)
    all_views, meta = test_views(eval_videos.root / name, CFG)
    assert all_views.shape == (30, 3, L, 256, 256) and all_views.dtype == torch.float32
    assert meta.num_frames == len(frames)
    for view in views:
        expected = view_by_hand(frames, view, size, offsets)
        assert np.array_equal(all_views[view].numpy(), expected), (name, view)


def test_row_wrap_of_255_wide_frames(eval_videos):
    """The original's column 255 is the next row's first pixel; its very last element reads
    past the buffer (0 here)."""
    views, _ = test_views(eval_videos.root / "class_a/portrait_166.avi", CFG)
    pixels = views.numpy() * np.float32(57.375) + np.float32(114.75)
    assert np.allclose(pixels[20, 2, L - 1, 255, 255], 0.0, atol=1e-3)  # past the end
    assert np.allclose(pixels[10, 0, 0, :-1, 255], pixels[10, 0, 0, 1:, 0], atol=1e-3)


def test_decoded_pixels_are_rgb_and_exact_for_a_lossless_file(eval_videos):
    spec = next(s for s in eval_videos.specs if s.name.endswith(".mkv"))  # FFV1, lossless
    decoded = decode_video(eval_videos.root / spec.name)
    assert decoded.num_frames == spec.num_frames
    for index in (0, 7, spec.num_frames - 1):
        assert np.array_equal(
            decoded.frames[index], render_frame(index, spec.height, spec.width, spec.seed)
        )


def test_bgr_option_reverses_channels(eval_videos):
    path = eval_videos.root / "class_a/portrait_166.avi"
    rgb, _ = test_views(path, CFG)
    bgr, _ = test_views(path, nl.get_cfg(CFG, ["MODEL.USE_BGR", "True"]))
    assert torch.equal(bgr[:, 0, :, :, :255], rgb[:, 2, :, :, :255])
    assert torch.equal(bgr[:, 2, :, :, :255], rgb[:, 0, :, :, :255])


def test_second_decode_pass_for_videos_over_the_memory_budget(eval_videos):
    path = eval_videos.root / "class_a/landscape_340.mp4"
    protocol = TestProtocol.from_cfg(CFG)
    once = load_test_video(path, protocol)
    twice = load_test_video(path, protocol, memory_budget=3 * 340 * 256 * 3)
    assert once.meta.decode_passes == 1 and twice.meta.decode_passes == 2
    assert twice.meta.num_frames == once.meta.num_frames
    assert torch.equal(twice.views([0, 17, 29]), once.views([0, 17, 29]))


def test_max_decoding_frames(eval_videos):
    path = eval_videos.root / "class_a/landscape_340.mp4"
    decoded = decode_selected(path, lambda n: range(n), max_frames=7)
    assert decoded.num_frames == 7 and sorted(decoded.frames) == list(range(7))


@pytest.mark.parametrize("backend", ["opencv", pytest.param("pyav", marks=needs_pyav)])
def test_unusable_files_raise_errors_naming_the_path(eval_videos, tmp_path, backend):
    one_frame = write_video(tmp_path / "one.mp4", 1, 64, 48)
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    cases = [
        (eval_videos.undecodable, "cannot be opened"),
        (eval_videos.empty, "empty file"),
        (tmp_path / "missing.mp4", "no such file"),
        (one_frame, "only 1 frame"),
        (folder, "directory"),
    ]
    for path, message in cases:
        with pytest.raises(VideoDecodeError, match=message) as info:
            decode_video(path, backend)
        assert str(info.value).startswith(str(path))


def test_protocol_needs_a_multiple_of_three_views():
    with pytest.raises(ConfigError, match=r"TEST\.NUM_TEST_CLIPS"):
        TestProtocol.from_cfg(nl.get_cfg(CFG, ["TEST.NUM_TEST_CLIPS", "10"]))
    protocol = TestProtocol.from_cfg(nl.get_cfg(CFG, ["TEST.NUM_TEST_CLIPS", "6"]))
    assert (protocol.num_temporal, protocol.num_views) == (2, 6)
    assert protocol.crop_size == 256 and protocol.scale == 256  # JITTER_SCALES[0], TEST.SCALE


@needs_pyav
@pytest.mark.parametrize(
    "name, views",
    [("class_b/square.mkv", range(0, 30, 4)), ("class_a/portrait_166.avi", [2, 21])],
)
def test_pyav_backend_matches_an_independent_pyav_computation(eval_videos, name, views):
    size, offsets = EXPECTED[name]
    frames = decode_with_pyav(eval_videos.root / name)
    got, meta = test_views(eval_videos.root / name, CFG, backend="pyav")
    assert meta.backend == "pyav" and meta.num_frames == len(frames)
    for view in views:
        assert np.array_equal(got[view].numpy(), view_by_hand(frames, view, size, offsets))


@needs_pyav
def test_backends_agree(eval_videos):
    for spec in eval_videos.specs:
        path = eval_videos.root / spec.name
        a = decode_video(path, "opencv")
        b = decode_video(path, "pyav")
        assert a.num_frames == b.num_frames == spec.num_frames, spec.name
        diff = np.abs(a.frames[3].astype(int) - b.frames[3].astype(int))
        if spec.name.endswith(".mkv"):  # lossless RGB-family stream: no colour conversion
            assert diff.max() == 0
        else:  # YUV -> RGB conversions differ slightly (spec trap 20)
            assert diff.mean() < 3.0, spec.name
