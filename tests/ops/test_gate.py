"""Adaptor-T's gated read onto a gated scan's output, on every CPU backend, against autograd."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from adaptor_peft.ops import native
from adaptor_peft.ops.dispatch import BACKEND_ENV, gated_read, gated_read_backward

CPU_BACKENDS = [
    "torch",
    pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="no C compiler")),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("groups", "width"), [(2, 20), (1, 16), (3, 5)])  # lane blocks of 16 + 4; 16; 5
def test_gated_read_and_its_gradients_match_autograd_in_a_mixers_layouts(monkeypatch, backend, dtype, groups, width):
    """``z`` a slice of a (batch, len, 2 dim) projection and the incoming gradient transposed, as Vim's mixer
    gives them; fresh random inputs, checked against PyTorch's autograd in float64."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    batch, length, terms = 3, 11, 6
    dim = groups * width
    g = torch.Generator().manual_seed(dim)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    y, memory = randn(batch, dim, length), randn(batch * groups, width, terms)
    C_hat = randn(batch * groups, terms, length)
    z = (randn(batch, length, 2 * dim) * 3)[..., dim:].transpose(1, 2)
    grad = randn(batch, length, dim).transpose(1, 2)
    read = torch.bmm(memory, C_hat).view(y.shape).requires_grad_()
    z_leaf = z.clone().requires_grad_()
    expected = y + read * F.silu(z_leaf)
    expected_dread, expected_dz = torch.autograd.grad(expected, [read, z_leaf], grad)

    y, memory, C_hat, z, grad = (t.detach().to(dtype) for t in (y, memory, C_hat, z, grad))
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gated_read(y, memory, C_hat, z).double(), expected.detach(), **tolerance)
    dread, dz = gated_read_backward(grad, memory, C_hat, z)
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
        y, memory = torch.randn(1, 2, 3), torch.randn(1, 2, 1)
        expected = y + torch.bmm(memory, y[:, :1]) * F.silu(y)
        torch.testing.assert_close(gated_read(y, memory, y[:, :1], y), expected)
    finally:
        native._build.cache_clear()


def test_a_gated_read_of_mixed_dtypes_is_computed_in_pytorch_not_misread():
    """The compiled kernel reads every tensor in one dtype; given a float64 ``z`` with float32 others, the
    dispatcher must not hand it raw float64 memory, but compute the PyTorch formula."""
    g = torch.Generator().manual_seed(3)
    y, memory, C_hat = (torch.randn(*shape, generator=g) for shape in ((2, 4, 5), (2, 4, 3), (2, 3, 5)))
    z = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    expected = y.double() + torch.bmm(memory, C_hat).double() * F.silu(z)
    torch.testing.assert_close(gated_read(y, memory, C_hat, z).double(), expected, rtol=1e-5, atol=1e-5)
