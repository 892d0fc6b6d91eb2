"""Adaptor-T's memory read (``selective_scan(..., memory=MemoryRead(...))``): the compiled scan that reads
inside and the PyTorch read over snapshots, against a float64 reference built from the sequential scan's
hidden states, outputs and every gradient."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from adaptor_peft.ops import dispatch, native, selective_scan, selective_scan_reference
from adaptor_peft.ops.dispatch import as_grouped
from adaptor_peft.ops.records import MemoryRead
from tests.support.scans import assert_close, make_inputs

COMPILED = pytest.mark.skipif(not native.available(), reason="no C compiler")
INTERPRETED = pytest.mark.skipif(
    dispatch.triton_backend() is None or not dispatch.triton_backend().INTERPRETED,
    reason="needs triton and TRITON_INTERPRET=1 (set by tests/conftest.py)",
)
CPU_BACKENDS = ["torch", pytest.param("native", marks=COMPILED)]
PATHS = [
    ("torch", torch.float64),
    ("torch", torch.float32),
    pytest.param("native", torch.float64, marks=COMPILED),
    pytest.param("native", torch.float32, marks=COMPILED),
    pytest.param("triton", torch.float32, marks=INTERPRETED),  # the GPU's path, as its kernels accumulate
]

CASES = {
    # groups, width, nstate, K, B/C layout and groups, z
    "vim": (4, 20, 16, 2, ("variable", 1), True),  # lane blocks of 16 + 4; the kernel's unrolled (16, 2)
    "vmamba": (4, 6, 4, 2, ("grouped", 2), False),  # B/C groups coarser than the memory's, no gate
    "generic": (1, 16, 5, 3, ("grouped", 1), True),  # K = 3, nstate 5: the kernel's generic loops
}


def memory_reference(inputs: dict, location, weights, scale) -> torch.Tensor:
    """``(C_t h_t + D u_t + Σ_k w_{t,k} C_t m_k) silu(z_t)`` from the sequential scan's hidden states."""
    z = inputs["z"]
    plain = selective_scan_reference(**{**inputs, "z": None}, delta_softplus=True)
    hidden = plain.hidden_states  # (batch, dim, len, nstate)
    batch, dim, length, nstate = hidden.shape
    per_channel = dim // location.shape[1]
    floor = location.detach().floor()
    frac = (location - floor).repeat_interleave(per_channel, dim=1)[..., None]  # (batch, dim, K, 1)

    def states_at(positions):
        index = positions.long().repeat_interleave(per_channel, dim=1)[..., None].expand(-1, -1, -1, nstate)
        return hidden.gather(2, index)  # (batch, dim, K, nstate)

    below, above = states_at(floor), states_at((floor + 1).clamp(max=length - 1))
    memory = scale[None, :, None, None] * (below + frac * (above - below))
    C = as_grouped(inputs["C"], batch, length)
    C = C.repeat_interleave(dim // C.shape[1], dim=1)  # (batch, dim, nstate, len)
    seen = torch.einsum("bdkn,bdnt->bdkt", memory, C)
    read = (weights.repeat_interleave(per_channel, dim=1) * seen).sum(2)
    out = plain.out + read
    return out if z is None else out * F.silu(z)


def memory_inputs(case: str, batch: int = 2, length: int = 13, seed: int = 0):
    groups, width, nstate, K, (layout, bc_groups), z = CASES[case]
    inputs = make_inputs(batch, groups * width, length, nstate, bc_groups, z=z, bc=layout, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    location = torch.rand(batch, groups, K, generator=g, dtype=torch.float64) * (length - 1)
    location[0, 0, 0], location[-1, -1, -1] = length - 1, 3.0  # the last state (no state above), an exact one
    weights = torch.randn(batch, groups, K, length, generator=g, dtype=torch.float64).softmax(2)
    scale = torch.randn(groups * width, generator=g, dtype=torch.float64)
    return inputs, (location, weights, scale)


def in_mixer_layouts(inputs: dict) -> dict:
    """u, Δ and z as (batch, len, dim) views transposed, C as a (batch, len, nstate) view: Vim's mixer's."""
    laid = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z") and v is not None else v)
            for k, v in inputs.items()}  # fmt: skip
    if inputs["C"].dim() == 3:
        laid["C"] = inputs["C"].transpose(1, 2).contiguous().transpose(1, 2)
    return laid


def reversed_reference(inputs: dict, location, weights, scale) -> torch.Tensor:
    """:func:`memory_reference` of the flipped sequence, flipped back: a reverse scan's read, its locations
    counted in scan steps."""
    flipped = {k: v.flip(-1) if v is not None and v.dim() > 2 else v for k, v in inputs.items()}
    return memory_reference(flipped, location, weights.flip(-1), scale).flip(-1)


@pytest.mark.parametrize(("backend", "dtype"), PATHS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_memory_read_matches_the_reference_outputs_and_gradients(backend, dtype, case, reverse):
    """The GPU's path (snapshots from the Triton kernels, then the read in PyTorch) runs in Triton's
    interpreter, in float32 as its kernels accumulate."""
    inputs, read = memory_inputs(case, seed=len(case))
    g = torch.Generator().manual_seed(7)
    cotangent = torch.randn(2, inputs["u"].shape[1], 13, generator=g, dtype=torch.float64)
    names = [k for k, v in inputs.items() if v is not None]

    def run(fn, dtype, layouts):
        leaves = {k: (v.to(dtype).requires_grad_() if v is not None else None) for k, v in inputs.items()}
        location, weights, scale = (t.to(dtype).requires_grad_() for t in read)
        laid = in_mixer_layouts(leaves) if layouts else leaves
        out = fn(laid, location, weights, scale)
        grads = torch.autograd.grad(out, [leaves[k] for k in names] + [location, weights, scale], cotangent.to(dtype))
        return out, dict(zip([*names, "location", "weights", "scale"], grads, strict=True))

    expected, expected_grads = run(reversed_reference if reverse else memory_reference, torch.float64, False)

    def scan(laid, location, weights, scale):
        memory = MemoryRead(location, weights, scale)
        return selective_scan(**laid, delta_softplus=True, memory=memory, reverse=reverse, backend=backend).out

    actual, grads = run(scan, dtype, True)
    rtol = 1e-10 if dtype == torch.float64 else 2e-4
    assert actual.dtype == dtype
    assert_close(actual, expected, rtol, "out")
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, rtol, f"d{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_read_dropped_entirely_leaves_the_plain_scan(backend):
    """``dropout`` drops the read (here all of it: p = 1), not the scan's own output; without it the read
    changes the output."""
    inputs, (location, weights, scale) = memory_inputs("vim")
    inputs = {k: None if v is None else v.float() for k, v in inputs.items()}
    plain = selective_scan(**inputs, delta_softplus=True, backend=backend).out
    kept = MemoryRead(location.float(), weights.float(), scale.float())
    dropped = kept._replace(dropout=torch.nn.Dropout(1.0))
    none = selective_scan(**inputs, delta_softplus=True, memory=dropped, backend=backend).out
    torch.testing.assert_close(none, plain)
    read = selective_scan(**inputs, delta_softplus=True, memory=kept, backend=backend).out
    assert (read - plain).abs().max() > 1e-2


@COMPILED
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_the_read_behind_a_dropout_is_the_read_inside_the_kernel(reverse):
    """With a dropout the compiled scan hands back snapshots and the read runs in PyTorch after it; with one
    that keeps everything, that read equals the one fused into the kernel, in either scan direction."""
    inputs, read = memory_inputs("vim", seed=3)
    cotangent = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    results = []
    for dropout in (None, lambda t: t):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
        location, weights, scale = (t.clone().requires_grad_() for t in read)
        memory = MemoryRead(location, weights, scale, dropout)
        out = selective_scan(**leaves, delta_softplus=True, memory=memory, reverse=reverse, backend="native").out
        grads = torch.autograd.grad(out, [*leaves.values(), location, weights, scale], cotangent)
        results.append((out, *grads))
    for name, fused, after in zip(["out", *leaves, "location", "weights", "scale"], *results, strict=True):
        assert_close(after, fused, 1e-12, name)


def test_bad_memory_reads_are_rejected_with_the_field_at_fault():
    inputs, (location, weights, scale) = memory_inputs("generic")
    with pytest.raises(ValueError, match=r"memory\.weights must have shape"):
        selective_scan(**inputs, memory=MemoryRead(location, weights[..., :-1], scale))
    with pytest.raises(ValueError, match=r"memory\.scale must have shape"):
        selective_scan(**inputs, memory=MemoryRead(location, weights, scale[:-1]))
    with pytest.raises(ValueError, match=r"memory\.location must be"):
        selective_scan(**inputs, memory=MemoryRead(location[:, :, 0], weights, scale))
    with pytest.raises(ValueError, match=r"needs an input-dependent C.*got C of shape \(16, 5\)"):
        selective_scan(**{**inputs, "C": torch.randn(16, 5)}, memory=MemoryRead(location, weights, scale))
    with pytest.raises(ValueError, match="snapshot_index or memory, not both"):
        index = torch.zeros(2, 1, 2, dtype=torch.long)
        selective_scan(**inputs, snapshot_index=index, memory=MemoryRead(location, weights, scale))


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
        inputs, read = memory_inputs("vim")
        expected = memory_reference(inputs, *read)
        actual = selective_scan(**inputs, delta_softplus=True, memory=MemoryRead(*read), backend="native").out
        assert_close(actual, expected, 1e-10, "out")
    finally:
        native._build.cache_clear()
