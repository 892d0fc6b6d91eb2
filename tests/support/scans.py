"""Scan inputs of every layout, runs with gradients, and the comparisons the scan tests share."""

from __future__ import annotations

import torch


def make_inputs(batch, dim, length, nstate, groups, *, z=True, D=True, bias=True, bc="grouped", seed=0):
    """Random scan inputs in float64; ``bc`` picks the B/C layout: 'grouped', 'variable' or 'fixed'."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    shapes = {"grouped": (batch, groups, nstate, length), "variable": (batch, nstate, length), "fixed": (dim, nstate)}
    return dict(
        u=rand(batch, dim, length),
        delta=rand(batch, dim, length) * 0.5,
        A=-torch.rand(dim, nstate, generator=g, dtype=torch.float64) * 2 - 0.1,
        B=rand(*shapes[bc]),
        C=rand(*shapes[bc]),
        D=rand(dim) if D else None,
        z=rand(batch, dim, length) if z else None,
        delta_bias=rand(dim) * 0.3 if bias else None,
    )


def run_with_grads(fn, inputs, dtype, snapshots=None, seed=1):
    """Output, snapshots and the gradient of every tensor input for a fixed random cotangent on the output
    and the snapshots (with ``snapshots``, their positions)."""
    leaves = {k: (v.detach().to(dtype).clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    result = fn(**leaves, delta_softplus=True, snapshot_index=snapshots)
    g = torch.Generator().manual_seed(seed)
    used = [result.out, *(t for t in (result.snapshots,) if t is not None)]
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum() for t in used)
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return result, grads


def assert_close(actual, expected, rtol, what):
    scale = expected.abs().max().clamp_min(1e-12)
    err = ((actual.double() - expected).abs().max() / scale).item()
    assert err < rtol, f"{what}: relative error {err:.2e} >= {rtol:.0e}"


CASES = [
    # batch, dim, length, nstate, B/C groups, layout, with z / D / delta_bias, snapshot groups
    (2, 32, 7, 4, 1, "grouped", True, 2),
    (1, 64, 1, 3, 2, "grouped", True, 2),  # L = 1
    (3, 32, 33, 16, 2, "variable", False, 2),  # odd L, no z / D / bias
    (2, 96, 20, 1, 3, "grouped", True, 2),  # d_state 1, three groups (VMamba-like)
    (2, 96, 12, 4, 3, "grouped", True, 1),  # more B/C groups than snapshot groups
    (2, 16, 9, 5, 1, "fixed", True, 2),  # time-invariant B, C of shape (dim, nstate)
    (2, 48, 9, 4, 2, "grouped", True, 2),  # 24 channels a group: lane blocks of 16 and 8 (VMamba v2 s1 stage 1)
    (2, 32, 21, 16, 1, "grouped", True, 2),  # d_state 16 (Vim's, the native kernel's unrolled loops) with z / D / bias
]
