"""The gated add of Adaptor-T's read onto a gated scan's output, on every CPU backend, against autograd."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from adaptor_peft.ops import native
from adaptor_peft.ops.dispatch import BACKEND_ENV, gated_add, gated_add_backward

CPU_BACKENDS = [
    "torch",
    pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="no C compiler")),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dim", [40, 16, 5])  # two full lane blocks and a part-filled one; one; a part-filled one
def test_gated_add_and_its_gradients_match_autograd_in_a_mixers_layouts(monkeypatch, backend, dtype, dim):
    """``z`` a slice of a (batch, len, 2 dim) projection and the incoming gradient transposed, as Vim's mixer
    gives them; fresh random inputs, checked against PyTorch's autograd in float64."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    batch, length = 3, 11
    g = torch.Generator().manual_seed(dim)
    y, read = (torch.randn(batch, dim, length, generator=g, dtype=torch.float64) for _ in range(2))
    z = (torch.randn(batch, length, 2 * dim, generator=g, dtype=torch.float64) * 3)[..., dim:].transpose(1, 2)
    grad = torch.randn(batch, length, dim, generator=g, dtype=torch.float64).transpose(1, 2)
    leaves = [t.clone().requires_grad_() for t in (read, z)]
    expected = y + leaves[0] * F.silu(leaves[1])
    expected_dread, expected_dz = torch.autograd.grad(expected, leaves, grad)

    cast = [t.to(dtype) for t in (y, read, z, grad)]
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gated_add(*cast[:3]).double(), expected.detach(), **tolerance)
    dread, dz = gated_add_backward(cast[3], cast[1], cast[2])
    torch.testing.assert_close(dread.double(), expected_dread, **tolerance)
    torch.testing.assert_close(dz.double(), expected_dz, **tolerance)


@pytest.mark.skipif(not native.available(), reason="no C compiler")
def test_a_compiler_refusing_the_gcc_flags_still_builds_with_openmp(monkeypatch, tmp_path):
    """A compiler without GCC's optimisation flags (Clang may refuse some) still gives the compiled kernels."""
    real = shutil.which("gcc") or shutil.which("cc")
    refusing = tmp_path / "cc"
    flags = " ".join(native.GCC_FLAGS)
    refusing.write_text(f'#!/bin/sh\ncase "$*" in *"{flags}"*) exit 1;; esac\nexec {real} "$@"\n')
    refusing.chmod(0o755)
    monkeypatch.setenv("CC", str(refusing))
    monkeypatch.setenv("ADAPTOR_PEFT_CACHE", str(tmp_path / "cache"))
    native._build.cache_clear()
    try:
        assert native.available()
        (build,) = (tmp_path / "cache").glob("*.so")
        assert b"GOMP_parallel" in build.read_bytes()  # the second try: OpenMP without the GCC flags
        y = torch.randn(2, 3, 4)
        torch.testing.assert_close(gated_add(y, y, y), y + y * F.silu(y))
    finally:
        native._build.cache_clear()
