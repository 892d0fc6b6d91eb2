"""Test support: a fresh interpreter made to look like a lent GPU box, without Hugging Face ``datasets``
and, for the CPU run of ``benchmarks/gpu_check.py``, with the CUDA calls it makes answered on the CPU.

Used in subprocesses (the package must be imported after ``datasets`` is hidden), so that nothing here
leaks into the test session.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import torch


def hide_datasets() -> None:
    """Makes ``import datasets`` fail as it does where the package is not installed (and
    ``importlib.util.find_spec("datasets")`` answer None, as libraries probing for it expect)."""
    sys.modules["datasets"] = None


class CpuEvent:
    """``torch.cuda.Event`` timed by the host clock: on the CPU every call has finished when it returns."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.at = 0.0

    def record(self, stream: object = None) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: CpuEvent) -> float:
        return (end.at - self.at) * 1e3


class TorchWithCpuCuda:
    """``torch`` as ``benchmarks/gpu_check.py`` sees it in the tests: torch itself, but for ``torch.cuda``, whose
    calls that script makes are answered as a CPU-only machine can (a device is there, its clock is the
    host's, and nothing is allocated on it); a call not answered here fails with AttributeError. torch's
    own code still sees no GPU (its optimizers would otherwise ask the CUDA driver about graph capture)."""

    def __init__(self) -> None:
        self.cuda = SimpleNamespace(
            is_available=lambda: True,
            get_device_name=lambda device=None: "CPU standing in for a GPU",
            get_device_capability=lambda device=None: (0, 0),
            Event=CpuEvent,
            synchronize=lambda device=None: None,
            empty_cache=lambda: None,
            reset_peak_memory_stats=lambda device=None: None,
            memory_allocated=lambda device=None: 0,
            max_memory_allocated=lambda device=None: 0,
        )

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)


def run_gpu_check(argv: list[str]) -> None:
    """``benchmarks/gpu_check.py`` with ``argv``, without ``datasets``, on the CPU with the CUDA calls stubbed,
    and with the torch scan as its only backend (Triton's and mamba-ssm's need a GPU)."""
    hide_datasets()
    from benchmarks import gpu_check

    gpu_check.torch = TorchWithCpuCuda()
    gpu_check.DEVICE = "cpu"
    gpu_check.triton_backend = lambda: None
    gpu_check.mamba_ssm_kernel = lambda: None
    sys.argv = ["gpu_check.py", *argv]
    gpu_check.main()


if __name__ == "__main__":
    run_gpu_check(sys.argv[1:])
