"""Built-in demo: build every released model and run it once (no downloads).

``python -m nonlocal_net.tools.demo`` builds each of the 15 released configurations in the
requested split, counts its parameters and running statistics, runs one random clip of the
configuration's length through it and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from tqdm import tqdm

from ..models import build_model, list_models
from ..utils.log import setup_logging

logger = logging.getLogger("nonlocal_net.demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vnl-demo",
        description="Build every released model, count its parameters and run one random clip "
        "through it (offline, no downloads).",
    )
    parser.add_argument(
        "--split",
        choices=["val", "test"],
        default="test",
        help="head to build: 'test' (fully convolutional, 256 crops; default) or "
        "'val' (FC logits, 224 crops)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        metavar="NAME",
        default=None,
        help="zoo names to build (default: all 15)",
    )
    parser.add_argument(
        "--no-forward", action="store_true", help="only build and count, do not run a clip"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    names = args.models or list_models()
    crop = 256 if args.split == "test" else 224
    rows = []
    for name in tqdm(names, desc=f"building ({args.split})", unit="model"):
        start = time.perf_counter()
        model = build_model(name, split=args.split)
        params = sum(p.numel() for p in model.parameters())
        blobs = len(model.state_dict())
        shape = "-"
        frames = model.cfg.TRAIN.VIDEO_LENGTH
        if not args.no_forward:
            with torch.inference_mode():
                out = model(torch.randn(1, 3, frames, crop, crop))
            shape = "x".join(map(str, out.shape))
        rows.append(
            (name, params, blobs, f"1x3x{frames}x{crop}x{crop}", shape, time.perf_counter() - start)
        )
        logger.debug("%s done", name)
    width = max(len(r[0]) for r in rows)
    print(
        f"{'model':<{width}}  {'params':>11}  {'blobs':>5}  {'input':>16}  {'output':>7}  "
        f"{'seconds':>7}"
    )
    for name, params, blobs, inp, shape, secs in rows:
        print(f"{name:<{width}}  {params:>11,}  {blobs:>5}  {inp:>16}  {shape:>7}  {secs:>7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
