"""One line naming the machine a benchmark ran on: CPU model, widest vector ISA, cores. CPU figures move
several times between machines (AVX-512 against AVX2 alone), so every table carries this line."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
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


SHOWN_EDITS = 3
"""How many edited files :func:`commit` names before it counts the rest."""


def commit() -> str:
    """The checkout's short commit, with ``+edits`` and the files when tracked files differ from it (a
    rerun's own outputs, such as the tuned options a study writes, are edits too: the names tell them
    from code); ``unknown`` outside git."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        edited = git("diff", "--name-only", "HEAD").splitlines()
        head = git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not edited:
        return head
    more = len(edited) - SHOWN_EDITS
    return f"{head}+edits ({', '.join(edited[:SHOWN_EDITS])}{f' and {more} more' if more > 0 else ''})"


def provenance(argv: list[str] | None = None) -> str:
    """What a results file opens with: the command, the date, the commit, the package's code version (what run
    folders record) and the machine."""
    from adaptor_peft.provenance import code_version

    command = " ".join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    today = datetime.date.today().isoformat()
    return f"`{command}`: {today}, commit {commit()}, code version {code_version()}; {describe()}"
