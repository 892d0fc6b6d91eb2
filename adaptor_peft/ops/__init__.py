"""Kernels: the selective scan and its references. Models call :func:`selective_scan` only."""

from .reference import selective_scan_reference
from .selective_scan import BACKENDS, ScanOutput, select_backend, selective_scan, selective_scan_fn

__all__ = [
    "BACKENDS",
    "ScanOutput",
    "select_backend",
    "selective_scan",
    "selective_scan_fn",
    "selective_scan_reference",
]
