"""Peak-memory helpers shared by the benchmarks and tests: resident memory of this process, a snippet run
in a fresh process (so that one method's allocations never count towards another's), and the peak of
live tensor memory."""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[2]


def rss_kb(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS now, VmHWM the peak), in KiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1])


def in_fresh_process(code: str) -> Any | None:
    """Runs ``code`` in a new interpreter at the repository root and returns the JSON value its last output
    line holds, or None if it failed."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the mode and alive at once (what existed before, such
    as parameters, excluded): like CUDA's ``max_memory_allocated``, exact and repeatable, unlike the
    resident memory, which the C allocator's arenas and caching move by 10 % or more between runs. Memory
    that compiled kernels allocate for themselves is not seen."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self.seen:
                storage = t.untyped_storage()
                self.seen.add(id(storage))
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes
