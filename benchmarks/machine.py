"""The line every results file opens with (command, date, commit, code version, machine) and the CPU facts
the scan benchmark's roofline needs. The machine's description itself is the package's
(:func:`adaptor_peft.provenance.describe_machine`), which model cards and the evidence ledger record too."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

from adaptor_peft.provenance import code_version, cpu_fields, describe_machine

FLOAT_LANES = {"AVX-512": 16, "AVX2": 8, "SVE": 4, "NEON": 4, "SSE4.2": 4, "scalar": 1}


def cpu_ghz() -> float | None:
    """The clock /proc/cpuinfo reports (nominal, not turbo), or None."""
    mhz = cpu_fields().get("cpu MHz")
    return float(mhz) / 1e3 if mhz else None


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
    command = " ".join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    today = datetime.date.today().isoformat()
    return f"`{command}`: {today}, commit {commit()}, code version {code_version()}; {describe_machine()}"
