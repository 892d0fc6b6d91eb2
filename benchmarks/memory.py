"""Peak-memory helpers shared by the benchmarks: resident memory of this process, and a snippet run in a
fresh process (so that one method's allocations never count towards another's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def rss_kb(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS now, VmHWM the peak), in KiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1])


def in_fresh_process(code: str) -> Any | None:
    """Runs ``code`` in a new interpreter at the repository root and returns the JSON value its last output
    line holds, or None if it failed."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
