"""The selective scan in plain PyTorch, with a hand-written backward; runs on any device.

Channels are processed in blocks small enough that a block's (batch, channels, len, nstate) states fit an
element budget: ``ADAPTOR_PEFT_SCAN_BLOCK`` where set, else 2**21 elements on the CPU (cache-sized) and a
share of the free memory on a GPU (so a GPU runs few, large blocks); within a block the linear
recurrence ``h_t = a_t h_{t-1} + x_t`` is solved by a log-depth (Hillis-Steele) scan, so the cost is a
handful of large tensor operations instead of one small operation per position. The backward pass
recomputes each block's states and runs the adjoint recurrence with the same scan, reversed.

Contract shared with every backend: :mod:`adaptor_peft.ops.records`.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F

from .records import GradsOut, ScanGrads, ScanInputs, ScanOutput


def linear_scan(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Solves ``h_t = a_t * h_{t-1} + x_t`` (``h_{-1} = 0``) along dim -2 of (..., len, n) tensors."""
    a, h = a.clone(), x.clone()
    length, step = a.shape[-2], 1
    while step < length:
        h[..., step:, :] += a[..., step:, :] * h[..., :-step, :].clone()
        if 2 * step < length:
            a[..., step:, :] *= a[..., :-step, :].clone()
        step *= 2
    return h


CPU_BUDGET = 2**21
LIVE_BLOCKS = 32  # block-sized float tensors alive at once in the backward, with room to spare


def element_budget(device: torch.device, element_size: int = 4) -> int:
    """Elements of one channel block's state tensor: the environment's setting, else sized for ``device``
    (on a GPU, from its free memory, PyTorch's cached but unused blocks included)."""
    if os.environ.get("ADAPTOR_PEFT_SCAN_BLOCK"):
        return int(os.environ["ADAPTOR_PEFT_SCAN_BLOCK"])
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(CPU_BUDGET, free // (element_size * LIVE_BLOCKS))
    return CPU_BUDGET


def _blocks(batch: int, dim: int, length: int, nstate: int, like: torch.Tensor):
    """Channel ranges whose working set fits the element budget of ``like``'s device and dtype."""
    budget = element_budget(like.device, like.element_size())
    size = max(1, min(dim, budget // max(1, batch * length * nstate)))
    return [(d0, min(dim, d0 + size)) for d0 in range(0, dim, size)]


def _per_channel(X: torch.Tensor, d0: int, d1: int, dim: int) -> torch.Tensor:
    """(batch, groups, nstate, len) → (batch, d1 - d0, len, nstate), each channel seeing its group's row."""
    group = torch.arange(d0, d1, device=X.device) // (dim // X.shape[1])
    return X[:, group].transpose(-1, -2)


def _group(index: torch.Tensor, d0: int, d1: int, dim: int) -> torch.Tensor:
    """The snapshot group of each channel in [d0, d1)."""
    return torch.arange(d0, d1, device=index.device) // (dim // index.shape[1])


def _states(u, dt, A, B, d0, d1, dim):
    dtb, ub = dt[:, d0:d1, :, None], u[:, d0:d1, :, None]
    a = torch.exp(dtb * A[d0:d1, None, :])
    Bc = _per_channel(B, d0, d1, dim)
    return a, Bc, linear_scan(a, dtb * ub * Bc)


def _step(delta, delta_bias, softplus):
    x = delta if delta_bias is None else delta + delta_bias[:, None]
    return x, F.softplus(x) if softplus else x


def _snapshot_index(index: torch.Tensor, d0: int, d1: int, dim: int, nstate: int) -> torch.Tensor:
    """Per-channel snapshot positions, expanded over the state dim for ``gather``: (b, c, nsnap, n)."""
    return index[:, _group(index, d0, d1, dim)].unsqueeze(-1).expand(-1, -1, -1, nstate)


def forward(
    x: ScanInputs, want_last: bool, want_hidden: bool, for_backward: bool = False
) -> tuple[ScanOutput, tuple[()]]:
    """The scan's :class:`ScanOutput`, fields other than ``out`` only where asked for, and what the backward
    needs from it: nothing, since it recomputes the states."""
    u, A, B, C, D, z = x.u, x.A, x.B, x.C, x.D, x.z
    snap = x.snapshot_index
    _, dt = _step(x.delta, x.delta_bias, x.softplus)
    batch, dim, length = u.shape
    nstate = A.shape[1]
    out = u.new_empty(batch, dim, length)
    last = u.new_empty(batch, dim, nstate) if want_last else None
    hidden = u.new_empty(batch, dim, length, nstate) if want_hidden else None
    snapshots = u.new_empty(batch, dim, snap.shape[2], nstate) if snap is not None else None
    for d0, d1 in _blocks(batch, dim, length, nstate, u):
        _, _, h = _states(u, dt, A, B, d0, d1, dim)
        out[:, d0:d1] = (h * _per_channel(C, d0, d1, dim)).sum(-1)
        if snap is not None:
            snapshots[:, d0:d1] = h.gather(2, _snapshot_index(snap, d0, d1, dim, nstate))
        if want_last:
            last[:, d0:d1] = h[:, :, -1]
        if want_hidden:
            hidden[:, d0:d1] = h
    if D is not None:
        out += D[:, None] * u
    if z is not None:
        out *= F.silu(z)
    return ScanOutput(out, last, hidden, snapshots), ()


def backward(x: ScanInputs, grads: GradsOut, saved: tuple[()] = ()) -> ScanGrads:
    """The inputs' gradients given those reaching the outputs."""
    u, A, B, C, D, z = x.u, x.A, x.B, x.C, x.D, x.z
    snap = x.snapshot_index
    dout, dsnapshots = grads
    pre, dt = _step(x.delta, x.delta_bias, x.softplus)
    batch, dim, length = u.shape
    nstate = A.shape[1]
    dz = None
    if z is not None:
        y = forward(dataclasses.replace(x, z=None, snapshot_index=None), False, False)[0].out
        sig = torch.sigmoid(z)
        dz = dout * y * sig * (1 + z * (1 - sig))
        dout = dout * z * sig
    du = dout * D[:, None] if D is not None else torch.zeros_like(u)
    dD = (dout * u).sum((0, 2)) if D is not None else None
    ddt, dA = torch.zeros_like(dt), torch.zeros_like(A)
    dB, dC = B.new_zeros(B.shape), C.new_zeros(C.shape)
    for d0, d1 in _blocks(batch, dim, length, nstate, u):
        group = torch.arange(d0, d1, device=u.device) // (dim // B.shape[1])
        a, Bc, h = _states(u, dt, A, B, d0, d1, dim)
        Cc = _per_channel(C, d0, d1, dim)
        dy = dout[:, d0:d1, :, None]
        direct = Cc * dy
        dC_block = dy * h
        if snap is not None and dsnapshots is not None:
            direct = direct.scatter_add(2, _snapshot_index(snap, d0, d1, dim, nstate), dsnapshots[:, d0:d1])
        # Adjoint recurrence g_t = direct_t + a_{t+1} g_{t+1}, solved as a forward scan on reversed time.
        a_next = F.pad(a[:, :, 1:], (0, 0, 0, 1))
        g = linear_scan(a_next.flip(2), direct.flip(2)).flip(2)
        h_prev = F.pad(h[:, :, :-1], (0, 0, 1, 0))
        dtb, ub = dt[:, d0:d1, :, None], u[:, d0:d1, :, None]
        g_a_hprev = g * a * h_prev
        ddt[:, d0:d1] = (g_a_hprev * A[d0:d1, None, :] + g * ub * Bc).sum(-1)
        dA[d0:d1] = (g_a_hprev * dtb).sum((0, 2))
        du[:, d0:d1] += (g * Bc).sum(-1) * dt[:, d0:d1]
        dB.index_add_(1, group, (g * dtb * ub).transpose(-1, -2))
        dC.index_add_(1, group, dC_block.transpose(-1, -2))
    ddelta = ddt * torch.sigmoid(pre) if x.softplus else ddt
    dbias = ddelta.sum((0, 2)) if x.delta_bias is not None else None
    return ScanGrads(du, ddelta, dbias, dA, dB, dC, dD, dz)
