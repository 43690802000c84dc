"""What a benchmark ran on, for its JSON: the CPU model (results differ between hosts: on an AMD
EPYC torch's float32 gemv reads half as fast as XLA's, on other hosts the two are even)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """/proc/cpuinfo's model name, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
