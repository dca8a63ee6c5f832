"""The offline demo runs the whole chain: checkpoint -> convert -> verify -> videos -> evaluate."""

from __future__ import annotations

import json

import pytest

from nonlocal_net.datasets.synthetic import DEFAULT_SPECS
from nonlocal_net.tools import demo


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0
    assert "convert it, verify it" in capsys.readouterr().out


@pytest.mark.slow
def test_chain_on_one_video(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO_VIDEOS", (DEFAULT_SPECS[3],))  # the 5-frame clip that wraps
    assert demo.run_chain("c2d_baseline_8x8_IN_pretrain_400k", tmp_path, workers=0) == 0
    out = capsys.readouterr().out
    assert "PASS: all" in out and "top-1 accuracy" in out
    name = "c2d_baseline_8x8_IN_pretrain_400k"
    assert (tmp_path / f"{name}.pkl").is_file() and (tmp_path / f"{name}.pt").is_file()
    report = json.loads((tmp_path / "results.report.json").read_text())
    # one video with 30 views, plus the undecodable and the empty file in the denominator
    assert report["num_entries"] == 3 and report["num_views"] == 30
    assert report["num_empty_videos"] == 2
