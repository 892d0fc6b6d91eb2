"""The code version a run records, so that numbers of different code are never mixed unawares, and the
machine it ran on, since CPU figures move several times between machines (AVX-512 against AVX2 alone).

The version is the package's ``__version__`` plus a hash of its source: every ``.py`` and ``.c`` file of
the package, by relative path and content. Unlike a git commit it needs no git, is the same in a checkout
and an installed copy of the same files, and changes with uncommitted edits, which a commit hash would not
show. Recipes are left out: a run folder records its whole resolved recipe, which is compared on its own.
"""

from __future__ import annotations

import hashlib
import os
import platform
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SOURCES = ("*.py", "*.c")
"""The files whose content is the code version: Python source and native kernels."""


@lru_cache(maxsize=1)
def code_version() -> str:
    """``<__version__>+<first 12 hex digits of the source hash>``, e.g. ``0.3.0+3f9a0c1d2e4b``; computed once
    per process (the files a running process imported are the ones it runs)."""
    from . import __version__

    digest = hashlib.sha256()
    files = sorted({p for pattern in SOURCES for p in PACKAGE.rglob(pattern) if "__pycache__" not in p.parts})
    for path in files:
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{__version__}+{digest.hexdigest()[:12]}"


ISA = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sve", "SVE"), ("asimd", "NEON"), ("sse4_2", "SSE4.2"))
"""/proc/cpuinfo flags and the vector instruction sets they name, widest first."""


def cpu_fields(info: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields of ``info`` (empty where there is none)."""
    fields: dict[str, str] = {}
    if info.exists():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(fields: dict[str, str]) -> str:
    """The feature flags among ``fields`` (:func:`cpu_fields`): x86's flags line or Arm's Features line."""
    return fields.get("flags") or fields.get("Features") or ""


def vector_isa(flags: str) -> str:
    """The widest vector instruction set among ``flags`` (/proc/cpuinfo's flags or Features line)."""
    present = set(flags.split())
    return next((name for flag, name in ISA if flag in present), "scalar")


def describe_machine() -> str:
    """One line naming the machine: CPU model, architecture, widest vector ISA, cores, e.g. ``AMD EPYC,
    x86_64, AVX2, 2 cores``; what results files, model cards and the evidence ledger record."""
    fields = cpu_fields()
    model = fields.get("model name") or fields.get("CPU part") or platform.processor() or "unknown CPU"
    isa = vector_isa(cpu_flags(fields))
    return f"{model}, {platform.machine()}, {isa}, {os.cpu_count()} cores"
