"""Adaptor-T's memory read in PyTorch, over a scan's snapshots: what every backend but the compiled CPU
one runs (that one reads inside the scan). :class:`~adaptor_peft.ops.records.MemoryRead` gives the
formula; here every position's read is one matrix product per channel group, ``R_g = M_g Ĉ_g`` with
``M[e, (k, n)] = scale_e h_e(p_k)[n]`` and ``Ĉ[(k, n), t] = weights[k, t] C_t[n]``, so no (batch, dim, len,
K, nstate) tensor exists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def add_read(
    out: torch.Tensor,
    snapshots: torch.Tensor,
    frac: torch.Tensor,
    weights: torch.Tensor,
    scale: torch.Tensor,
    C_seen: torch.Tensor,
    z: torch.Tensor | None,
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A gated scan's ``out`` (batch, dim, len) with the read added, gated as the scan gated its own output
    (the gate is linear in what it gates). ``snapshots`` (batch, dim, 2 K, nstate): each location's state
    below, then above it; ``frac`` (batch, groups, K) the fractions between them; ``weights`` (batch, groups,
    K, len); ``scale`` (dim,); ``C_seen`` (batch, groups, nstate, len), C per group; ``dropout`` applied
    to the read. In the snapshots' precision (float32, also under autocast)."""
    with torch.autocast(out.device.type, enabled=False):
        return _add_read(out, snapshots, frac, weights, scale, C_seen, z, dropout)


def _add_read(out, snapshots, frac, weights, scale, C_seen, z, dropout):
    batch, groups, locations, length = weights.shape
    width = out.shape[1] // groups
    below, above = snapshots.view(batch, groups, width, 2, locations, -1).unbind(3)
    scale = scale.to(below.dtype).view(1, groups, width, 1, 1)
    memory = torch.lerp(below, above, frac[:, :, None, :, None].to(below.dtype)) * scale
    memory = memory.view(batch * groups, width, -1)  # (B G, width, K N)
    weights, C_seen, y = weights.to(memory.dtype), C_seen.to(memory.dtype), out.to(memory.dtype)
    if dropout is not None:
        read = dropout(torch.bmm(memory, _weighted(weights, C_seen)).view(y.shape))
        return y + (read if z is None else read * F.silu(z.to(read.dtype)))
    if z is None:
        return torch.baddbmm(y.view(batch * groups, width, length), memory, _weighted(weights, C_seen)).view(y.shape)
    return _GatedRead.apply(y, memory, weights, C_seen, z.to(y.dtype))


def _weighted(weights: torch.Tensor, C_seen: torch.Tensor) -> torch.Tensor:
    """``Ĉ`` (B G, K N, L): every position's ``C_t`` (B, G, N, L) times its weight on each location (B, G, K, L)."""
    batch, groups, _, length = weights.shape
    return (weights[:, :, :, None] * C_seen[:, :, None]).view(batch * groups, -1, length)


class _GatedRead(torch.autograd.Function):
    """``y + (memory @ Ĉ) silu(z)``, keeping for the backward neither ``y`` (its gradient is the incoming one)
    nor the read or ``Ĉ``: both are rebuilt there from the small ``weights`` and ``C_seen``, so the read costs
    no (B, E, L) activation. ``y`` and ``z`` (B, G width, L), ``memory`` (B G, width, K N), ``weights`` (B, G,
    K, L), ``C_seen`` (B, G, N, L)."""

    @staticmethod
    def forward(ctx, y, memory, weights, C_seen, z):
        ctx.save_for_backward(memory, weights, C_seen, z)
        read = torch.bmm(memory, _weighted(weights, C_seen)).view(y.shape)
        return torch.addcmul(y, read, F.silu(z))

    @staticmethod
    def backward(ctx, grad):
        memory, weights, C_seen, z = ctx.saved_tensors
        C_hat = _weighted(weights, C_seen)
        read = torch.bmm(memory, C_hat).view(grad.shape)
        dread, dz = grad * F.silu(z), torch.ops.aten.silu_backward(grad * read, z)
        dread = dread.reshape(memory.shape[0], -1, grad.shape[-1])
        dmemory, dC_hat = torch.bmm(dread, C_hat.transpose(1, 2)), torch.bmm(memory.transpose(1, 2), dread)
        dC_hat = dC_hat.view(*weights.shape[:3], -1, grad.shape[-1])  # (B, G, K, N, L)
        dweights = (dC_hat * C_seen[:, :, None]).sum(3)
        dC_seen = (dC_hat * weights[:, :, :, None]).sum(2)
        return grad, dmemory, dweights, dC_seen, dz
