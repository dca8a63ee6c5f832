"""``make test-wheel``: the package as ``pip install .`` installs it (not editable) works.

Builds the wheel from a copy of the sources (so the checkout gets no ``build/`` or egg-info),
installs it with ``--no-deps`` into a fresh virtual environment whose dependencies (torch,
numpy, ...) are borrowed from the running environment through a ``.pth`` file (no download,
no second copy of torch), then, from a folder outside the checkout:

* checks the wheel holds every module and every data file of ``lib/`` and ``converters/``
  (a package data file missing from ``pyproject.toml`` fails here) and no test;
* imports ``nonlocal_net`` and checks it is the installed copy, not the checkout;
* runs ``--help`` of every console script the wheel declares (``pyproject.toml``'s);
* writes a small synthetic Caffe2 checkpoint, converts it with the installed ``vnl-convert``
  and loads the result with the installed API.

Usage: ``python tests/wheel_check.py [--work DIR] [--keep]`` (default DIR: a temporary folder).
Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the import package is made of: pyproject's package-dir mapping
SOURCES = {"nonlocal_net": ROOT / "lib", "nonlocal_net/converters": ROOT / "converters"}
# the runtime dependencies whose installed copies the fresh environment borrows
BORROWED = ("torch", "numpy", "yaml", "yacs", "h5py", "cv2", "tqdm", "av", "safetensors")
SMALL_NETWORK = ["RESNETS.WIDTH_PER_GROUP", "8", "MODEL.NUM_CLASSES", "10"]
MODEL = "c2d_baseline_8x8_IN_pretrain_400k"


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    print("+", " ".join(map(str, cmd)), flush=True)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"wheel check: {cmd[0]} failed with exit status {result.returncode}")
    return result.stdout


def expected_files() -> set[str]:
    """Every file the installed package must have, as wheel paths (``nonlocal_net/...``)."""
    files = set()
    for prefix, source in SOURCES.items():
        for path in source.rglob("*"):
            rel = path.relative_to(source)
            if path.is_dir() or "__pycache__" in rel.parts or path.suffix == ".pyc":
                continue
            if prefix == "nonlocal_net" and rel.parts[0] == "converters":
                continue
            files.add(f"{prefix}/{rel.as_posix()}")
    return files


def build_wheel(work: Path) -> Path:
    """The wheel of a copy of the sources (pyproject, README, lib/, converters/)."""
    src = work / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("lib", "converters"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    dist = work / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(dist),
            str(src),
        ],
        cwd=work,
    )
    (wheel,) = dist.glob("video_nonlocal_net-*.whl")
    return wheel


def check_wheel_contents(wheel: Path) -> list[str]:
    """Check the wheel's files; return its console scripts (from its entry points)."""
    with zipfile.ZipFile(wheel) as z:
        names = {n for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}
        (entry_points,) = (n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        parser = ConfigParser()
        parser.read_string(z.read(entry_points).decode("utf-8"))
    scripts = sorted(parser["console_scripts"])
    missing = sorted(expected_files() - names)
    if missing:
        raise SystemExit(f"wheel check: {wheel.name} lacks {missing} (package list or data?)")
    extra = sorted(n for n in names if not n.startswith("nonlocal_net/"))
    if extra:
        raise SystemExit(f"wheel check: {wheel.name} has files outside nonlocal_net: {extra}")
    print(f"  {wheel.name}: {len(names)} files, every module and data file of lib/, converters/")
    return scripts


def fresh_environment(work: Path) -> tuple[Path, Path]:
    """A new venv that sees the running environment's dependencies but not this checkout."""
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=work)
    python = venv / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work
    ).strip()
    dirs = []
    for module in BORROWED:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            parent = Path(spec.origin).resolve().parent.parent
            if parent not in dirs:
                dirs.append(parent)
    # the checkout's own .venv may hold the dependencies; its sources must not be on the path
    if any(d == ROOT or (ROOT in d.parents and "site-packages" not in d.parts) for d in dirs):
        raise SystemExit(f"wheel check: a dependency is borrowed from the checkout {dirs}")
    (Path(purelib) / "zz_borrowed_dependencies.pth").write_text(
        "".join(f"{d}\n" for d in dirs), encoding="utf-8"
    )
    return python, Path(purelib)


def check_installed(
    python: Path, purelib: Path, wheel: Path, scripts: list[str], work: Path
) -> None:
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], work)
    bindir = python.parent
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    run_dir = work / "run"
    run_dir.mkdir()
    where = _run(
        [str(python), "-c", "import nonlocal_net as nl; print(nl.__file__, nl.__version__)"],
        run_dir,
        env,
    ).split()[0]
    if not Path(where).resolve().is_relative_to(purelib.resolve()):
        raise SystemExit(f"wheel check: nonlocal_net imported from {where}, not from {purelib}")
    print(f"  nonlocal_net imported from the installed copy {where}")
    for script in scripts:
        out = _run([str(bindir / script), "--help"], run_dir, env)
        if "usage:" not in out:
            raise SystemExit(f"wheel check: {script} --help printed no usage")
    print(f"  --help of {', '.join(scripts)}")
    overrides = repr(SMALL_NETWORK)
    _run(
        [
            str(python),
            "-c",
            "import nonlocal_net as nl\n"
            "from nonlocal_net.converters.synthetic import write_synthetic_checkpoint\n"
            f"write_synthetic_checkpoint('small.pkl', nl.get_cfg({MODEL!r}, {overrides}))\n",
        ],
        run_dir,
        env,
    )
    _run(
        [str(bindir / "vnl-convert"), "small.pkl", "small.pt", "--model", MODEL, *SMALL_NETWORK],
        run_dir,
        env,
    )
    out = _run(
        [
            str(python),
            "-c",
            "import torch, nonlocal_net as nl\n"
            "m = nl.load_model('small.pt', split='test')\n"
            "with torch.inference_mode():\n"
            "    y = m(torch.randn(1, 3, 8, 224, 224))\n"
            "assert y.shape == (1, 10) and torch.isfinite(y).all(), y\n"
            "print(m.cfg.RESNETS.WIDTH_PER_GROUP, tuple(y.shape))\n",
        ],
        run_dir,
        env,
    )
    if out.split() != ["8", "(1,", "10)"]:
        raise SystemExit(f"wheel check: the converted model printed {out!r}")
    print("  vnl-convert of a synthetic checkpoint, loaded and run with the installed API")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="vnl-wheel-"))
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"wheel check: {work} is not empty")
    work.mkdir(parents=True, exist_ok=True)
    try:
        wheel = build_wheel(work)
        scripts = check_wheel_contents(wheel)
        python, purelib = fresh_environment(work)
        check_installed(python, purelib, wheel, scripts, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("wheel check: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
