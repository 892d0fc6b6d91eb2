"""A slow, obviously-correct selective scan: the test oracle for every fast path.

One step per position, in whatever dtype it is given (the tests use float64); gradients come from
autograd. Semantics follow mamba-ssm's ``selective_scan_ref``, plus the snapshots of
:func:`adaptor_peft.ops.selective_scan`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import as_grouped
from .records import ScanOutput


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    snapshot_index: torch.Tensor | None = None,
) -> ScanOutput:
    """Sequential scan; returns every field of :class:`ScanOutput` (snapshots only with their positions)."""
    batch, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bg, Cg = as_grouped(B, batch, length), as_grouped(C, batch, length)
    channel_B = Bg.repeat_interleave(dim // Bg.shape[1], dim=1)  # (batch, dim, nstate, len)
    channel_C = Cg.repeat_interleave(dim // Cg.shape[1], dim=1)
    h = u.new_zeros(batch, dim, A.shape[1])
    states, ys = [], []
    steps = zip(u.unbind(-1), delta.unbind(-1), channel_B.unbind(-1), channel_C.unbind(-1), strict=True)
    for u_t, delta_t, B_t, C_t in steps:
        h = torch.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t
        states.append(h)
        ys.append((h * C_t).sum(-1))
    hidden = torch.stack(states, dim=2)  # (batch, dim, len, nstate)
    out = torch.stack(ys, dim=-1)
    if D is not None:
        out = out + D[:, None] * u
    if z is not None:
        out = out * F.silu(z)
    snapshots = None
    if snapshot_index is not None:
        per_channel = snapshot_index.repeat_interleave(dim // snapshot_index.shape[1], dim=1)  # (batch, dim, s)
        snapshots = hidden.gather(2, per_channel[..., None].expand(-1, -1, -1, A.shape[1]))
    return ScanOutput(out, h, hidden, snapshots)
