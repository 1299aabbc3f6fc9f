"""The machine a benchmark ran on: CPU model, the vector/matrix flags that decide fast paths, cores.

Every benchmark prints it first, because a figure holds only for the CPU class it was measured on.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["describe", "machine"]

_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def machine() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    from deepfeat.models.backends import cpu_class, isa_cap

    return {
        "cpu": model,
        "class": cpu_class(),
        "isa_cap": isa_cap(),
        "flags": [f for f in _FLAGS if f in flags],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
    }


def describe() -> str:
    info = machine()
    flags = " ".join(info["flags"]) or "none of " + "/".join(_FLAGS)
    capped = (
        f" (kernels capped at {info['isa_cap']} by ONEDNN_MAX_CPU_ISA/ATEN_CPU_CAPABILITY)"
        if info["isa_cap"]
        else ""
    )
    return f"machine: {info['cpu']}, {info['cores']} cores, flags: {flags}; class {info['class']}{capped}"
