"""Test-session set-up: Triton kernels run in Triton's CPU interpreter, so the GPU scan is tested here too.

Set before anything imports Triton's ``jit``: it decides at decoration time whether a kernel is compiled
for a GPU or interpreted. The compile tests build GPU kernels from the same functions explicitly.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
