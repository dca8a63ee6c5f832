"""Helpers for the download-cache tests: a tiny stand-in zoo entry and a loopback HTTP server.

The released names map to full-size networks (checkpoints of 100+ MB), so the tests add one
zoo entry of the same kind made tiny (:data:`TINY`: the I3D 8x8 baseline recipe with narrow
bottlenecks, 2-frame clips and 224 crops, still 400 classes) and serve its synthetic checkpoint
from a server bound to 127.0.0.1 that stops itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from nonlocal_net.converters.synthetic import write_synthetic_checkpoint
from nonlocal_net.core import zoo
from nonlocal_net.core.config import get_cfg

TINY = "i3d_baseline_tiny_test_400k"
TINY_OVERRIDES = (
    "TRAIN.VIDEO_LENGTH", "2", "TRAIN.SAMPLE_RATE", "4", "TEST.VIDEO_LENGTH", "2",
    "TEST.SAMPLE_RATE", "4", "RESNETS.WIDTH_PER_GROUP", "4", "TRAIN.CROP_SIZE", "224",
    "TRAIN.JITTER_SCALES", "[224,224]", "TEST.SCALE", "224", "TEST.CROP_SIZE", "224",
    "NUM_GPUS", "1", "TRAIN.BATCH_SIZE", "2",
)  # fmt: skip


BASE = "i3d_baseline_8x8_IN_pretrain_400k"


def tiny_entry(sha256: str | None = None) -> zoo.ZooEntry:
    base = zoo.ZOO[BASE]
    return dataclasses.replace(
        base, name=TINY, overrides=base.overrides + TINY_OVERRIDES, sha256=sha256
    )


def install_tiny_entry(sha256: str | None = None) -> None:
    """Add :data:`TINY` to the zoo of this process (for subprocesses of a test)."""
    zoo.ZOO[TINY] = tiny_entry(sha256)


def write_release(folder: Path, seed: int = 0) -> Path:
    """The stand-in's synthetic checkpoint under its released file name, as a mirror holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY}.pkl"
    cfg = get_cfg(BASE, TINY_OVERRIDES)  # what the stand-in entry's name gives
    write_synthetic_checkpoint(path, cfg, seed=seed, momentum=False)
    return path


@dataclasses.dataclass
class ServerState:
    """What the handler does and saw: ``truncate`` answers the next N full-file requests with
    half the bytes (the full ``Content-Length`` announced); ``ranges`` honours ``Range``."""

    root: Path
    truncate: int = 0
    ranges: bool = True
    requests: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)


def _handler(state: ServerState):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            state.requests.append((self.path, rng))
            path = state.root / os.path.basename(self.path)
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            start = 0
            if rng and state.ranges:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if state.truncate and start == 0:
                state.truncate -= 1
                body = body[: len(body) // 2]
                self.close_connection = True
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def loopback_server(root: Path) -> Iterator[tuple[str, ServerState]]:
    """Serve ``root`` on 127.0.0.1 (a free port) for the block; yields ``(base URL, state)``."""
    state = ServerState(root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
