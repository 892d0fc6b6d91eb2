"""One line naming the machine a benchmark ran on: CPU model, widest vector ISA, cores. CPU figures move
several times between machines (AVX-512 against AVX2 alone), so every table carries this line."""

from __future__ import annotations

import os
import platform
from pathlib import Path

ISA = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sve", "SVE"), ("asimd", "NEON"), ("sse4_2", "SSE4.2"))


def cpu_fields() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    if info.exists():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields


def vector_isa(flags: str) -> str:
    """The widest vector instruction set among ``flags`` (/proc/cpuinfo's flags or Features line)."""
    present = set(flags.split())
    return next((name for flag, name in ISA if flag in present), "scalar")


FLOAT_LANES = {"AVX-512": 16, "AVX2": 8, "SVE": 4, "NEON": 4, "SSE4.2": 4, "scalar": 1}


def cpu_ghz() -> float | None:
    """The clock /proc/cpuinfo reports (nominal, not turbo), or None."""
    mhz = cpu_fields().get("cpu MHz")
    return float(mhz) / 1e3 if mhz else None


def describe() -> str:
    fields = cpu_fields()
    model = fields.get("model name") or fields.get("CPU part") or platform.processor() or "unknown CPU"
    isa = vector_isa(fields.get("flags") or fields.get("Features") or "")
    return f"{model}, {platform.machine()}, {isa}, {os.cpu_count()} cores"
