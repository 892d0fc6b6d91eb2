"""Kernels: the selective scan and its references. Models call :func:`selective_scan` only."""

from .dispatch import BACKENDS, ScanOutput, select_backend, selective_scan, selective_scan_fn
from .reference import selective_scan_reference

__all__ = [
    "BACKENDS",
    "ScanOutput",
    "select_backend",
    "selective_scan",
    "selective_scan_fn",
    "selective_scan_reference",
]
