"""What the benchmarks ran on, for their results files."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_description() -> str:
    """'N cores, <model> (<vector extensions>)': the facts that decide CPU training speed."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in info.splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    extras = [flag for flag in ("avx512f", "avx512_bf16", "amx_bf16") if flag in info]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores, {model} ({', '.join(extras) or 'no AVX-512'})"
