"""One decoding configuration everywhere: on a damaged H.264 file (index at the start, tail cut)
every backend returns the same frames in the main process, in DataLoader workers and through
the path of every command (evaluation and extraction's view loader with and without workers,
prediction's single-video load, training's clip dataset), and they are the frames of a
single-threaded decode written here by hand. Also the decoding signature a resume checks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from eval_helpers import small_cfg
from torch.utils.data import DataLoader, Dataset

from nonlocal_net.datasets import (
    DECODER_THREADS,
    TestProtocol,
    VideoItem,
    available_backends,
    decode_video,
    decoding_signature,
    load_test_video,
    read_video_list,
)
from nonlocal_net.datasets.stream import view_loader
from nonlocal_net.datasets.synthetic import (
    h264_unavailable_reason,
    write_h264_video,
    write_list_file,
    write_truncated_copy,
)
from nonlocal_net.datasets.train_clips import TrainClipDataset, TrainSampling

BACKENDS = available_backends()
NO_H264 = h264_unavailable_reason()
needs_h264 = pytest.mark.skipif(bool(NO_H264), reason=NO_H264 or "H.264 writable")
FRAMES = 150  # frames the file's index promises


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A 150-frame H.264 mp4 with its index at the start and the last 10% of its bytes cut."""
    if NO_H264:
        pytest.skip(NO_H264)
    root = tmp_path_factory.mktemp("damaged")
    full = write_h264_video(root / "full.mp4", FRAMES, 320, 240, seed=3)
    return write_truncated_copy(full, root / "cut.mp4", keep=0.9)


def decode_by_hand(path, backend: str) -> list[np.ndarray]:
    """Every frame, single-threaded, written without the package: PyAV skipping the packets
    that fail (as the original), or OpenCV's reader until its first failure."""
    frames = []
    if backend == "pyav":
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            stream.codec_context.thread_type = "NONE"
            for packet in container.demux(stream):
                try:
                    decoded = packet.decode()
                except av.error.FFmpegError:
                    continue
                frames += [
                    f.to_ndarray(format="rgb24", interpolation="FAST_BILINEAR", threads=1)
                    for f in decoded
                ]
        return frames
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(bgr[:, :, ::-1].copy())
    cap.release()
    return frames


class DecodeEach(Dataset):
    """Item ``i``: the frame count and frames of ``paths[i]`` decoded with ``backends[i]``
    (run in DataLoader workers)."""

    def __init__(self, paths, backends):
        self.paths, self.backends = [str(p) for p in paths], list(backends)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        decoded = decode_video(self.paths[i], self.backends[i], memory_budget=None)
        frames = np.stack([decoded.frames[k] for k in range(decoded.num_frames)])
        return decoded.num_frames, torch.from_numpy(frames)


def loader_views(path, protocol, backend: str, workers: int) -> tuple[int, torch.Tensor]:
    """N and all views of ``path`` through the view loader vnl-test and vnl-extract use."""
    chunks = list(view_loader([VideoItem(0, str(path))], protocol, 7, backend, workers=workers))
    assert all(not c.error for c in chunks), [c.error for c in chunks]
    chunks.sort(key=lambda c: c.view_ids[0])
    return chunks[0].meta.num_frames, torch.cat([c.views for c in chunks])


@needs_h264
@pytest.mark.parametrize("backend", BACKENDS)
def test_damaged_file_decodes_to_the_single_threaded_frames(damaged, backend):
    import av

    with av.open(str(damaged)) as container:
        assert container.streams.video[0].frames == FRAMES  # the index promises all frames
    expected = decode_by_hand(damaged, backend)
    assert 2 <= len(expected) < FRAMES  # the cut tail is really missing
    decoded = decode_video(damaged, backend, memory_budget=None)
    assert decoded.num_frames == len(expected)
    for k, frame in enumerate(expected):
        assert np.array_equal(decoded.frames[k], frame), k


@needs_h264
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_command_path_sees_the_same_views(damaged, backend):
    """Prediction (one video in this process) and evaluation/extraction (the view loader,
    decoding here or in 2 spawned workers) cut identical views from identical frames."""
    protocol = TestProtocol.from_cfg(small_cfg())
    predicted = load_test_video(damaged, protocol, backend)
    n = decode_video(damaged, backend, memory_budget=None).num_frames
    assert predicted.meta.num_frames == n
    views = predicted.views_uint8()
    for workers in (0, 2):
        got_n, got_views = loader_views(damaged, protocol, backend, workers)
        assert got_n == n, workers
        assert torch.equal(got_views, views), workers


@needs_h264
def test_dataloader_workers_decode_what_the_main_process_decodes(damaged):
    """Both backends inside 2 spawned DataLoader workers (the workers of every command are
    spawned) against the same decode in this process, frame for frame."""
    backends = [b for b in BACKENDS for _ in range(2)]
    dataset = DecodeEach([damaged] * len(backends), backends)
    in_main = [dataset[i] for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    for (n, frames), (main_n, main_frames) in zip(loader, in_main, strict=True):
        assert n == main_n
        assert torch.equal(frames, main_frames)


@needs_h264
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_clips_do_not_depend_on_the_workers(damaged, backend, tmp_path):
    """Training's clips are a function of N (the temporal jitter draws in [0, N - L*r]): the
    same clips in this process and in 2 spawned workers."""
    list_file = write_list_file(tmp_path / "train.txt", [(str(damaged), 1)])
    cfg = small_cfg(["TRAIN.CROP_SIZE", "112", "TRAIN.JITTER_SCALES", "[120, 140]"])
    dataset = TrainClipDataset(
        read_video_list(list_file, num_classes=7), TrainSampling.from_cfg(cfg), 5, backend
    )
    positions = list(range(4))
    in_main = [dataset[p]["clip"] for p in positions]
    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=positions,
        num_workers=2,
        multiprocessing_context="spawn",
    )
    for sample, clip in zip(loader, in_main, strict=True):
        assert torch.equal(sample["clip"], clip)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_signature_names_the_configuration(backend):
    signature = decoding_signature(backend)
    assert signature["backend"] == backend
    assert signature["decoder_threads"] == DECODER_THREADS == 1
    assert signature["max_decoding_frames"] == 10000
    assert all(isinstance(v, str | int) for v in signature.values())
    library = "opencv" if backend == "opencv" else "av"
    assert signature[library]  # the library version decides the frames too
    with pytest.raises(ValueError, match="unknown video backend"):
        decoding_signature("ffmpeg-cli")


def test_opencv_environment_options_enter_the_signature(monkeypatch):
    monkeypatch.delenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", raising=False)
    before = decoding_signature("opencv")
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", "threads;4")
    after = decoding_signature("opencv")
    assert "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in before
    assert after["OPENCV_FFMPEG_CAPTURE_OPTIONS"] == "threads;4"
    assert after != before


def convert_by_hand(path, interpolation: str) -> list[np.ndarray]:
    """FFmpeg's own conversion of every decoded frame to RGB24 with swscale ``interpolation``
    (``FAST_BILINEAR``: the original's ``sws_getContext(..., SWS_FAST_BILINEAR)``)."""
    import av

    with av.open(str(path)) as container:
        return [
            f.to_ndarray(format="rgb24", interpolation=interpolation, threads=1)
            for f in container.decode(video=0)
        ]


def max_level_error(frames: dict[int, np.ndarray], reference: list[np.ndarray]) -> int:
    assert len(frames) == len(reference)
    return max(
        int(np.abs(frames[k].astype(np.int16) - ref.astype(np.int16)).max())
        for k, ref in enumerate(reference)
    )


# What docs/evaluating.md states: the PyAV backend is FFmpeg's FAST_BILINEAR conversion on every
# format; OpenCV's reader converts with bicubic chroma, the same on 8-bit 4:2:0 / 4:2:2 (swscale
# converts those without filtering), not on 4:4:4 (FAST_BILINEAR halves the chroma
# horizontally there, as the original's FFmpeg did) nor on 10-bit video.
COLOUR_FORMATS = ["yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv444p10le"]


@pytest.mark.skipif("pyav" not in BACKENDS, reason="PyAV (optional extra 'pyav') not installed")
@pytest.mark.parametrize("pix_fmt", COLOUR_FORMATS)
def test_what_each_backend_colour_conversion_matches(pix_fmt, tmp_path):
    reason = h264_unavailable_reason(pix_fmt)
    if reason:
        pytest.skip(reason)
    # lossless coding keeps the synthetic pattern's sharp colour edges, where conversions differ
    path = write_h264_video(tmp_path / "v.mp4", 4, 320, 240, pix_fmt=pix_fmt, options={"qp": "0"})
    fast_bilinear = convert_by_hand(path, "FAST_BILINEAR")
    pyav = decode_video(path, "pyav", memory_budget=None).frames
    assert max_level_error(pyav, fast_bilinear) == 0
    opencv = decode_video(path, "opencv", memory_budget=None).frames
    error = max_level_error(opencv, fast_bilinear)
    if pix_fmt in ("yuv420p", "yuv422p"):
        assert error == 0
    elif pix_fmt == "yuv444p":
        assert error > 100  # chroma edges FAST_BILINEAR blurs and bicubic keeps
        assert max_level_error(opencv, convert_by_hand(path, "BICUBIC")) == 0
    else:  # 10-bit: neither FAST_BILINEAR nor this FFmpeg's bicubic, exactly
        assert error > 0


@needs_h264
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_commands_agree_on_a_damaged_file(damaged, backend, tmp_path, capsys):
    """From the command line: vnl-test with --workers 0 and 2 records the same N and bitwise
    the same scores, and vnl-predict prints that N."""
    import h5py
    from eval_helpers import write_checkpoint

    from nonlocal_net.tools.predict_video import main as predict
    from nonlocal_net.tools.test_net_video import main as test

    checkpoint = write_checkpoint(tmp_path / "small.pt", small_cfg(["TEST.NUM_TEST_CLIPS", "6"]))
    list_file = write_list_file(tmp_path / "val.txt", [(str(damaged), 1)])
    n = decode_video(damaged, backend, memory_budget=None).num_frames
    runs = []
    for workers in (0, 2):
        results = tmp_path / f"results_{workers}.h5"
        args = ["--weights", checkpoint, "--list", list_file, "--results", results]
        args += ["--backend", backend, "--workers", workers, "--no-progress"]
        assert test([str(a) for a in args]) == 0
        with h5py.File(results, "r") as f:
            runs.append((f["videos/num_frames"][()].tolist(), f["views/scores"][()]))
    assert runs[0][0] == runs[1][0] == [n]
    assert np.array_equal(runs[0][1], runs[1][1])
    capsys.readouterr()
    args = [str(damaged), "--weights", str(checkpoint), "--backend", backend]
    assert predict(args) == 0
    assert capsys.readouterr().out.startswith(f"{damaged}: {n} frames")
