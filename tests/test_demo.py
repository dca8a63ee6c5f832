"""The offline demo runs the whole chain (checkpoint -> convert -> verify -> videos -> evaluate)
and explains it; its log lines never share a line with its progress bar."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest
from tqdm import tqdm

import nonlocal_net as nl
from nonlocal_net.core.zoo import get_zoo_entry
from nonlocal_net.datasets.synthetic import DEFAULT_SPECS
from nonlocal_net.tools import demo
from nonlocal_net.utils.log import setup_logging

LOG_RECORD = re.compile(r"\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
BAR = re.compile(r"\d+%\|.*\| *\d+/\d+")


def visible_lines(text: str) -> list[str]:
    """What a terminal shows of ``text``: each ``\\r`` returns to column 0 and later characters
    overwrite earlier ones (how progress bars redraw their line)."""
    shown = []
    for raw in text.split("\n"):
        screen: list[str] = []
        for segment in raw.split("\r"):
            for i, ch in enumerate(segment):
                if i < len(screen):
                    screen[i] = ch
                else:
                    screen.append(ch)
        shown.append("".join(screen).rstrip())
    return shown


def glued_lines(text: str) -> list[str]:
    """Lines on which a log record does not stand alone: it starts after other text, or a
    bar is visible on the same line."""
    return [
        line
        for line in visible_lines(text)
        if LOG_RECORD.search(line) and (not LOG_RECORD.match(line) or BAR.search(line))
    ]


def _log_during_bar(capsys) -> str:
    log = logging.getLogger("nonlocal_net.test_demo")
    # renders to the captured stderr (not a terminal), every update drawn
    bar = tqdm(total=3, unit="video", file=sys.stderr, mininterval=0, miniters=1)
    bar.update(1)
    log.error("video 1 has no views: a message shorter than the bar")
    bar.update(1)
    log.warning("another record")
    bar.update(1)
    bar.close()
    return capsys.readouterr().err


def test_log_lines_through_the_bar_writer_stand_alone(capsys):
    setup_logging(0)
    err = _log_during_bar(capsys)
    assert len(LOG_RECORD.findall(err)) == 2 and BAR.search(err)
    assert glued_lines(err) == []
    shown = visible_lines(err)
    assert any(
        line.endswith("video 1 has no views: a message shorter than the bar") for line in shown
    )


def test_a_plain_stream_handler_would_glue_the_line_to_the_bar(capsys):
    """The check above can fail: a handler writing straight to stderr continues the bar's
    line, as the demo did before its log lines went through the bar's writer."""
    handler = logging.StreamHandler(sys.stderr)  # bound to the captured stderr
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    try:
        err = _log_during_bar(capsys)
    finally:
        setup_logging(0)
    assert len(glued_lines(err)) == 2


def test_help_says_what_it_writes_and_where(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "convert it, verify it" in out and "30-view" in out
    for written in ("--output", "./demo_output", "<model>.pkl", "<model>.pt", "vallist.txt"):
        assert written in out
    assert "results.h5" in out and "results.report.json" in out and "docs/costs.md" in out


@pytest.mark.slow
def test_demo_command_on_one_video(tmp_path, monkeypatch, capsys):
    """``vnl-demo`` from its command line, on one video plus the two broken files: the whole
    chain (the released network's checkpoint, 30 views), a bar that moves, log lines apart
    from it, the summary. 2-frame clips instead of the demo's 4 halve the time."""
    monkeypatch.setattr(demo, "DEMO_VIDEOS", (DEFAULT_SPECS[3],))  # the 5-frame clip that wraps
    overrides = list(demo.DEMO_OVERRIDES)
    overrides[overrides.index("TRAIN.VIDEO_LENGTH") + 1] = "2"
    monkeypatch.setattr(demo, "DEMO_OVERRIDES", tuple(overrides))
    out_dir = tmp_path / "out"
    assert demo.main(["--output", str(out_dir), "--workers", "0"]) == 0
    captured = capsys.readouterr()
    out, err = captured.out, captured.err

    name = demo.DEFAULT_MODEL
    assert (out_dir / f"{name}.pkl").is_file() and (out_dir / f"{name}.pt").is_file()
    assert "PASS: all" in out and "top-1 accuracy" in out
    # the converted file keeps the demo's input size; the network is the released one
    model = nl.load_model(out_dir / f"{name}.pt", split="test")
    assert model.cfg.TRAIN.VIDEO_LENGTH == 2 and model.cfg.TEST.SCALE == 224
    assert model.cfg.MODEL.NUM_CLASSES == 400
    report = json.loads((out_dir / "results.report.json").read_text())
    # one video with its 30 views, plus the undecodable and the empty file in the denominator
    assert report["num_entries"] == 3 and report["num_views"] == 30
    assert report["views_per_video"] == 30 and report["num_empty_videos"] == 2
    assert (out_dir / "results.h5").is_file()

    # the progress bar moved over the 3 entries; the broken files were logged, each on a line
    # of its own, never glued to the bar
    for count in range(4):
        assert re.search(rf"\| *{count}/3 \[", err), f"the bar never showed {count}/3"
    assert len(re.findall(r"ERROR nonlocal_net\.engine\.\w+: video \d", err)) == 2
    assert glued_lines(err) == []

    # the closing summary: what was shown, what the numbers mean, what to run next
    summary = " ".join(out[out.index("What this showed") :].split())  # lines unwrapped
    assert "What the numbers mean" in summary and "chance" in summary
    assert "1 in 400" in summary and f"here {report['top1_correct']}/3" in summary
    assert "nearly the same scores" in summary
    top = demo.video_top_classes(out_dir / "results.h5")
    assert list(top) == [0] and len(top[0]) == 5
    assert "video 0: " + " ".join(map(str, top[0])) in summary
    for command in ("wget https://", "vnl-convert", "vnl-verify", "vnl-predict", "vnl-test"):
        assert command in summary
    assert "docs/quickstart.md" in summary and "docs/costs.md" in summary


def test_closing_summary_says_whether_the_top_classes_agree():
    entry = get_zoo_entry(demo.DEFAULT_MODEL)

    class Parity:
        def verdict(self) -> str:
            return "PASS: all 27 layers agree; float32 ..."

    report = {"num_entries": 4, "top1_correct": 0, "top5_correct": 1}

    def text(top):
        return demo.closing_summary(entry, Parity(), report, top, num_classes=400)

    assert "the same top-5 classes" in text({0: (1, 2, 3, 4, 5), 1: (2, 1, 3, 5, 4)})
    assert "the same top class" in text({0: (1, 2, 3, 4, 5), 1: (1, 9, 3, 5, 4)})
    assert "similar top classes" in text({0: (1, 2, 3, 4, 5), 1: (7, 9, 3, 5, 4)})
    assert "here 0/4 and 1/4" in text({0: (1, 2, 3, 4, 5)})
