"""The machine line every generated table starts with (CPU model, cores, RAM, Python), so the
benchmark scripts describe their machine the same way."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine(*extra: str) -> str:
    """``"<CPU>, <n> cores, <RAM>; Python <v>"`` followed by ``extra`` (library versions)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{mem_kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        mem = "RAM unknown"
    return ", ".join(
        [f"{cpu}, {os.cpu_count()} cores, {mem}; Python {platform.python_version()}", *extra]
    )
