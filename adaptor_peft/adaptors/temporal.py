"""Adaptor-T: every position reads hidden states from K learned locations of its scan (Mamba-Adaptor).

For one scan direction with inner width E, state size N and length L the scan gives
``y_i = C_i h_i + D u_i``. Adaptor-T makes it ``y_i = C_i h̃_i + D u_i`` with

    h̃_i = h_i + γ ⊙ Σ_k c_{i,k} h(p_k)

where, for each of S channel groups, a low-rank predictor on the scan input gives K softmax weights
``c_{i,k}`` from ``u_i`` and K locations. Locations may lie after ``i``, which lets a causal scan see
later tokens; a fractional location is read by linear interpolation between its two neighbouring states.
Two ways to choose the locations (``AdaptorConfig.t_mode``):

- ``"memory"``: K locations per sequence, ``p_k = (anchor_k + offset_k) (L - 1)`` with the offset
  predicted from the mean scan input. The scan hands back only the 2K states they need
  (``snapshot_index``), and every position's read is one matrix product per group,
  ``R_g = Ĉ_g H_gᵀ`` with ``Ĉ[i, (k, n)] = c_{i,k} C_i[n]`` and ``H[e, (k, n)] = h_e(p_k)[n]``: the scan
  costs what a plain one does, and the read runs at matrix-product speed.
- ``"per_position"``: K locations for every position, ``p_{i,k} = (anchor_k + offset_{i,k}) (L - 1)``,
  read inside the scan as probe readouts ``C_i · h_j``: every position reads its own states, which the
  scan must either reach while it runs (CPU) or keep (GPU).

Neither builds a (B, E, L, K, N) tensor. ``γ`` starts at zero, so an injected model computes exactly
what the pretrained one did; so do, by default (``t_init``), the predictor's offsets and weight logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import selective_scan
from ..ops.dispatch import as_grouped
from .config import AdaptorConfig


class AdaptorT(nn.Module):
    """Adaptor-T for a mixer with ``directions`` scans of ``channels`` channels each; the other
    arguments are :class:`AdaptorConfig`'s ``t_*`` fields and ``dropout``, with its defaults.

    A mixer that runs its directions as separate scans (Vim) calls :meth:`scan` with ``direction``;
    one that stacks them along the channels of a single scan (VMamba's four) passes ``direction=None``.
    ``lr_scale`` is read by :func:`adaptor_peft.training.optim.build_optimizer`.
    """

    def __init__(
        self,
        channels: int,
        directions: int = 1,
        locations: int = AdaptorConfig.t_locations,
        groups: int = AdaptorConfig.t_groups,
        rank: int = AdaptorConfig.t_rank,
        anchor: str = AdaptorConfig.t_anchor,
        dropout: float = AdaptorConfig.dropout,
        lr_scale: float = AdaptorConfig.lr_scale,
        init: float = AdaptorConfig.t_init,
        mode: str = AdaptorConfig.t_mode,
    ):
        super().__init__()
        self.lr_scale, self.mode = lr_scale, mode
        if channels % groups:
            raise ValueError(f"Adaptor-T: t_groups={groups} must divide the scan width {channels}")
        self.channels, self.directions, self.locations, self.groups = channels, directions, locations, groups
        self.learned = anchor == "learned"
        outputs = groups * locations
        self.down = nn.Parameter(torch.empty(directions, rank, channels))
        self.weight_up = nn.Parameter(torch.zeros(directions, outputs, rank))
        self.weight_bias = nn.Parameter(torch.zeros(directions, outputs))
        spread = ((torch.arange(locations) + 0.5) / locations).repeat(directions, groups, 1)
        if self.learned:
            self.anchor = nn.Parameter(spread)
            self.offset_up = nn.Parameter(torch.zeros(directions, outputs, rank))
        else:
            self.register_buffer("anchor", spread)
        self.gamma = nn.Parameter(torch.zeros(directions, channels))
        self.dropout = nn.Dropout(dropout)
        # per direction as nn.Linear(channels, rank) is: uniform in ±1/sqrt(fan-in), fan-in = channels
        nn.init.uniform_(self.down, -(channels**-0.5), channels**-0.5)
        if init:  # the predictor's output layers; γ stays zero
            nn.init.normal_(self.weight_up, std=init)
            if self.learned:
                nn.init.normal_(self.offset_up, std=init)

    def zero_initialised(self) -> list[nn.Parameter]:
        """The parameters that start at zero (the predictor's output layers unless ``init``), whose learning
        rate ``lr_scale`` multiplies."""
        names = ("gamma", "weight_up", "weight_bias", "offset_up")
        return [getattr(self, n) for n in names if isinstance(getattr(self, n, None), nn.Parameter)]

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, directions={self.directions}, locations={self.locations}, "
            f"groups={self.groups}, rank={self.down.shape[1]}, anchor={'learned' if self.learned else 'static'}, "
            f"mode={self.mode}"
        )

    def _predict(self, u: torch.Tensor, direction: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax weights (B, dirs, S, K, L) of every position's K locations, and the locations in [0, L - 1]:
        (B, dirs, S, K, L) per position, or (B, dirs, S, K, 1) per sequence in memory mode."""
        picked = slice(None) if direction is None else slice(direction, direction + 1)
        dirs = self.directions if direction is None else 1
        batch, _, length = u.shape
        shape = (batch, dirs, self.groups, self.locations, length)
        # In the parameters' precision (float32), also under autocast: in bfloat16 a position above 128
        # would lose its fraction, and with it the interpolation.
        with torch.autocast(u.device.type, enabled=False):
            hidden = torch.matmul(self.down[picked], u.to(self.down.dtype).view(batch, dirs, self.channels, length))
            logits = torch.matmul(self.weight_up[picked], hidden) + self.weight_bias[picked, :, None]
            weights = logits.view(shape).softmax(dim=3)
            position = self.anchor[picked][None, :, :, :, None]
            if self.learned:
                source = hidden.mean(-1, keepdim=True) if self.mode == "memory" else hidden
                position = position + torch.matmul(self.offset_up[picked], source).view(*shape[:4], -1)
        position = position.expand(*shape[:4], position.shape[-1])
        return weights, (position * (length - 1)).clamp(0, length - 1)

    def probes(self, u: torch.Tensor, direction: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position mode: probe positions (B, P, L, 2K) and their weights (B, P, L, 2K) for scan input
        ``u`` (B, dirs * E, L), with P = dirs * S groups: each location's floor and ceiling state, weighted
        by its softmax weight times its interpolation weight."""
        weights, position = self._predict(u, direction)
        batch, dirs, _, _, length = weights.shape
        position = position.expand(weights.shape)
        floor = position.detach().floor()
        frac = position - floor
        index = torch.cat([floor, (floor + 1).clamp(max=length - 1)], dim=3).long()
        mix = torch.cat([weights * (1 - frac), weights * frac], dim=3)
        groups = dirs * self.groups
        return (
            index.view(batch, groups, -1, length).transpose(2, 3),
            mix.view(batch, groups, -1, length).transpose(2, 3),
        )

    def scan(
        self,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        delta_bias: torch.Tensor | None = None,
        delta_softplus: bool = False,
        direction: int | None = None,
    ) -> torch.Tensor:
        """The selective scan's output with the adapted states, then the silu(z) gate."""
        gamma = self.gamma.flatten() if direction is None else self.gamma[direction]
        if self.mode == "memory":
            return self._memory_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, direction, gamma)
        index, mix = self.probes(u, direction)
        if self.dropout.p == 0 or not self.training:  # the common case, fused into the scan
            return selective_scan(
                u, delta, A, B, C, D, z, delta_bias, delta_softplus, probe_index=index, probe_weight=mix,
                probe_scale=gamma,
            ).out  # fmt: skip
        result = selective_scan(
            u, delta, A, B, C, D, None, delta_bias, delta_softplus, probe_index=index, probe_weight=mix
        )
        out = result.out + gamma[:, None].to(result.readout.dtype) * self.dropout(result.readout)
        return out if z is None else out * F.silu(z)

    def _memory_scan(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus, direction, gamma) -> torch.Tensor:
        """Memory mode: a plain scan that snapshots each location's two neighbouring states, then every
        position's read of the interpolated memory through its own ``C_i``, as one matrix product per
        group, in float32 also under autocast."""
        weights, position = self._predict(u, direction)
        batch, dirs, _, locations, length = weights.shape
        groups, width = dirs * self.groups, self.channels // self.groups
        position = position.reshape(batch, groups, locations)
        floor = position.detach().floor()
        index = torch.cat([floor, (floor + 1).clamp(max=length - 1)], dim=-1).long()
        result = selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, snapshot_index=index
        )  # snapshots (B, dirs * E, 2K, N)
        with torch.autocast(u.device.type, enabled=False):
            frac = (position - floor)[:, :, None, :, None]
            below, above = result.snapshots.view(batch, groups, width, 2, locations, -1).unbind(3)
            memory = (below + frac * (above - below)).flatten(3)  # (B, groups, width, K * N)
            C_seen = as_grouped(C, batch, length, groups).to(memory.dtype)  # (B, groups, N, L)
            C_hat = (weights.view(batch, groups, locations, 1, length) * C_seen[:, :, None]).flatten(2, 3)
            readout = torch.matmul(memory, C_hat).view(batch, -1, length)
            if self.training and self.dropout.p:
                readout = self.dropout(readout)
            added = gamma[:, None] * readout
            if z is not None:
                added = added * F.silu(z.to(added.dtype))
        return result.out + added.to(result.out.dtype)
