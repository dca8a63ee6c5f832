"""``vnl-convert --ftvideo / --blob-rm / --to-caffe2`` refuse what plain conversion refuses
(NaN/Inf, negative variances, a foreign destination), clear the temporaries of a killed run,
take only a finite positive ``--lr``, refuse non-array blobs the original scripts would keep,
and exit 130/143 on SIGINT/SIGTERM during any write (``torch.save`` included) with the
temporary removed and the destination untouched."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nonlocal_net as nl
from nonlocal_net.converters import ConversionError, export_caffe2, write_caffe2_pkl
from nonlocal_net.converters.checks import is_caffe2_checkpoint
from nonlocal_net.converters.cli import main
from nonlocal_net.converters.convert_file import convert_checkpoint
from nonlocal_net.converters.synthetic import synthetic_checkpoint_blobs

NAME = "i3d_baseline_8x8_IN_pretrain_400k"
SMALL = ["RESNETS.WIDTH_PER_GROUP", "4"]
MODES = ["--ftvideo", "--blob-rm", "--to-caffe2"]
CONV = "res2_0_branch2a_w"
RIV = "res2_0_branch2a_bn_riv"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good, NaN and negative-variance sources, each as a Caffe2 .pkl and a converted .pt."""
    root = tmp_path_factory.mktemp("hardening")
    cfg = nl.get_cfg(NAME, SMALL)
    good = synthetic_checkpoint_blobs(cfg, seed=5)
    nan = dict(good, **{CONV: good[CONV].copy()})
    nan[CONV][0, 0, 0, 0, 0] = np.nan
    negative = dict(good, **{RIV: -np.abs(good[RIV])})
    out = {}
    for label, blobs in (("good", good), ("nan", nan), ("negative", negative)):
        pkl = root / f"{label}.pkl"
        write_caffe2_pkl(blobs, pkl, protocol=2, wrapped=True)
        pt = root / f"{label}.pt"
        convert_checkpoint(pkl, pt, cfg, allow_nonfinite=True)
        out[f"{label}.pkl"], out[f"{label}.pt"] = pkl, pt
    return out


def _source(files: dict[str, Path], label: str, mode: str) -> Path:
    return files[f"{label}.pt" if mode == "--to-caffe2" else f"{label}.pkl"]


def _run(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("label", "named"), [("nan", f"{CONV}: 1 NaN"), ("negative", RIV)])
def test_nonfinite_and_negative_variances_are_refused(files, tmp_path, capsys, mode, label, named):
    src = _source(files, label, mode)
    dst = tmp_path / "out.pkl"
    rc, err = _run([src, dst, mode], capsys)
    assert rc == 2 and not dst.exists()
    (line,) = [x for x in err.splitlines() if x.startswith("vnl-convert: error:")]
    assert named in line and "--allow-nonfinite" in line
    # the escape hatch writes them, with a warning naming the blob
    rc, err = _run([src, dst, mode, "--allow-nonfinite"], capsys)
    assert rc == 0 and is_caffe2_checkpoint(dst)
    assert named in err and "written anyway" in err


def test_a_fold_that_overflows_is_refused(files, tmp_path, capsys):
    """Valid blobs whose fold overflows float32 (a huge scale over std = sqrt(0 + 1e-5)): the
    folded result is checked too."""
    blobs = synthetic_checkpoint_blobs(nl.get_cfg(NAME, SMALL), seed=6)
    prefix = RIV[: -len("_riv")]
    blobs[RIV] = np.zeros_like(blobs[RIV])
    blobs[f"{prefix}_s"] = np.full_like(blobs[f"{prefix}_s"], 3e38)
    src = tmp_path / "overflow.pkl"
    write_caffe2_pkl(blobs, src)
    rc, err = _run([src, tmp_path / "out.pkl", "--ftvideo"], capsys)
    assert rc == 2 and "after --ftvideo" in err and f"{prefix}_s" in err and "Inf" in err


@pytest.mark.parametrize("mode", MODES)
def test_foreign_destinations_need_overwrite(files, tmp_path, capsys, mode):
    src = _source(files, "good", mode)
    own = tmp_path / "own.pkl"
    own.write_bytes(pickle.dumps({"notes": ["mine"], "n": 3}, protocol=2))  # a user's pickle
    text = tmp_path / "notes.pkl"
    text.write_bytes(b"(this starts like a protocol-0 pickle\n")
    py3 = tmp_path / "py3.pkl"
    py3.write_bytes(pickle.dumps({"conv1_w": np.ones(3, np.float32)}, protocol=4))
    for dst in (own, text, py3):
        before = dst.read_bytes()
        rc, err = _run([src, dst, mode], capsys)
        assert rc == 2 and "--overwrite" in err and str(dst) in err
        assert dst.read_bytes() == before
    # its own kind of output is replaced; a foreign one with --overwrite
    out = tmp_path / "out.pkl"
    assert _run([src, out, mode], capsys)[0] == 0 and is_caffe2_checkpoint(out)
    assert _run([src, out, mode], capsys)[0] == 0
    assert _run([src, own, mode, "--overwrite"], capsys)[0] == 0 and is_caffe2_checkpoint(own)
    # never the input, not even with --overwrite
    rc, err = _run([src, src, mode, "--overwrite"], capsys)
    assert rc == 2 and "same file as the input" in err


@pytest.mark.parametrize("mode", MODES)
def test_stale_temporaries_of_a_killed_run_are_removed(files, tmp_path, capsys, mode):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dst = tmp_path / "out.pkl"
    stale = tmp_path / f".out.pkl.{dead.pid}-0123456789ab.tmp"
    stale.write_bytes(b"partial")
    assert _run([_source(files, "good", mode), dst, mode], capsys)[0] == 0
    assert not stale.exists() and dst.exists()


@pytest.mark.parametrize("lr", ["-1", "0", "nan", "inf", "-inf"])
def test_lr_must_be_finite_and_positive(files, tmp_path, capsys, lr):
    with pytest.raises(SystemExit) as e:
        main([str(files["good.pt"]), str(tmp_path / "o.pkl"), "--to-caffe2", "--lr", lr])
    assert e.value.code == 2 and "--lr" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="finite and positive"):
        export_caffe2(files["good.pt"], tmp_path / "o.pkl", lr=float(lr))
    assert not (tmp_path / "o.pkl").exists()


@pytest.mark.parametrize("mode", ["--ftvideo", "--blob-rm"])
def test_non_array_blobs_are_refused_unless_the_script_drops_them(tmp_path, capsys, mode):
    blobs = synthetic_checkpoint_blobs(nl.get_cfg(NAME, SMALL), seed=7)
    kept = dict(blobs, extra_list=[1, 2], extra_dict={"a": np.ones(2, np.float32)})
    src = tmp_path / "lists.pkl"
    with open(src, "wb") as f:
        pickle.dump({"blobs": kept}, f, protocol=2)
    rc, err = _run([src, tmp_path / "out.pkl", mode], capsys)
    assert rc == 2 and "extra_list (list)" in err and "extra_dict (dict)" in err
    assert not (tmp_path / "out.pkl").exists()
    # entries the original script deletes by name go, whatever they hold
    dropped = dict(blobs, pred_notes=[1, 2], conv_momentum_info={"a": 1})
    with open(src, "wb") as f:
        pickle.dump({"blobs": dropped}, f, protocol=2)
    assert _run([src, tmp_path / "out.pkl", mode], capsys)[0] == 0
    with open(tmp_path / "out.pkl", "rb") as f:
        written = pickle.load(f, encoding="latin1")
    assert not {"pred_notes", "conv_momentum_info"} & set(written)


# --------------------------------------------------------------------------- signals
# Every binary file the command opens for writing announces itself and then blocks in its second
# write, so the signal lands inside the writer: for a .pt inside torch.save's C++ zip writer
# (which turns the exception of its write callback into a RuntimeError, once the archive has
# begun), for a .pkl inside the Python 2 pickler.
_DRIVER = """
import os, sys, time
real_fdopen = os.fdopen
class SlowFile:
    def __init__(self, f):
        self._f, self._writes = f, 0
    def write(self, data):
        n = self._f.write(data)
        self._writes += 1
        if self._writes == 2:
            self._f.flush()
            print("writing", flush=True)
            time.sleep(120)
        return n
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self._f.__exit__(*exc)
    def __getattr__(self, name):
        return getattr(self._f, name)
def slow_fdopen(fd, mode="r", *args, **kwargs):
    f = real_fdopen(fd, mode, *args, **kwargs)
    return SlowFile(f) if mode == "wb" else f
os.fdopen = slow_fdopen
from nonlocal_net.converters.cli import main
sys.exit(main(sys.argv[1:]))
"""

SIGNAL_CASES = [
    ("plain", signal.SIGINT),
    ("plain", signal.SIGTERM),
    ("--to-caffe2", signal.SIGTERM),
    ("--ftvideo", signal.SIGINT),
    # the other signal of each conversion (the same handler) with the full suite
    pytest.param("--to-caffe2", signal.SIGINT, marks=pytest.mark.parity_full),
    pytest.param("--ftvideo", signal.SIGTERM, marks=pytest.mark.parity_full),
    ("--blob-rm", signal.SIGINT),
    pytest.param("--blob-rm", signal.SIGTERM, marks=pytest.mark.parity_full),
]


@pytest.mark.parametrize(("mode", "sig"), SIGNAL_CASES)
def test_a_signal_during_the_write_exits_130_or_143_and_leaves_nothing(files, tmp_path, mode, sig):
    if mode == "plain":
        dst = tmp_path / "out.pt"
        argv = [files["good.pkl"], dst, "--model", NAME, *SMALL]
    else:
        dst = tmp_path / "out.pkl"
        argv = [_source(files, "good", mode), dst, mode]
    dst.write_bytes(b"the old contents")
    argv = [*map(str, argv), "--overwrite", "-q"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert list(tmp_path.glob(f".{dst.name}.*.tmp"))  # the write is under way
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "enforce fail" not in err
    assert not list(tmp_path.glob(f".{dst.name}.*"))
    assert not Path(f"{dst}.lock").exists()
    assert dst.read_bytes() == b"the old contents"
