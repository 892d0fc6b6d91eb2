"""Adaptor-T: every position reads a memory of hidden states from K learned locations of its scan
(Mamba-Adaptor).

For one scan direction with inner width E, state size N and length L the scan gives
``y_i = C_i h_i + D u_i``. Adaptor-T makes it ``y_i = C_i h̃_i + D u_i`` with

    h̃_i = h_i + γ ⊙ Σ_k c_{i,k} h(p_k)

where, for each of S channel groups, a low-rank predictor on the scan input gives K locations per
sequence, ``p_k = (anchor_k + offset_k) (L - 1)`` with the offset predicted from the mean scan input, and
every position's K softmax weights ``c_{i,k}`` from its own ``u_i``. Locations may lie after ``i``, which
lets a causal scan see later tokens; a fractional location is read by linear interpolation between its two
neighbouring states, so its gradient reaches the location.

The read is the scan's own (:class:`~adaptor_peft.ops.records.MemoryRead`): it keeps only the 2K states
the locations need, and every position reads them through ``Σ_k c_{i,k} C_i`` (on CPU inside the
compiled scan, elsewhere one matrix product per group), so the scan costs little more than a plain one and
no (B, E, L, K, N) tensor exists. ``γ`` starts at zero, so an injected model computes exactly
what the pretrained one did; the predictor's offsets and weight logits start at zero too, so every position
first reads the anchors with equal weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import selective_scan
from ..ops.records import MemoryRead
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
    ):
        super().__init__()
        self.lr_scale = lr_scale
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

    def zero_initialised(self) -> list[nn.Parameter]:
        """The parameters that start at zero (γ and the predictor's output layers), whose learning rate
        ``lr_scale`` multiplies."""
        names = ("gamma", "weight_up", "weight_bias", "offset_up")
        return [getattr(self, n) for n in names if isinstance(getattr(self, n, None), nn.Parameter)]

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, directions={self.directions}, locations={self.locations}, "
            f"groups={self.groups}, rank={self.down.shape[1]}, anchor={'learned' if self.learned else 'static'}"
        )

    def project(
        self, weight: torch.Tensor, rows: torch.Tensor, direction: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``F.linear(rows, weight)``, a mixer's own projection of the scan input's rows (B, L, E), and this
        direction's predictor input (B, L, rank) from the same matrix product, so that the scan input is read
        once; :meth:`scan` takes the second as ``projected``. Only in the predictor's dtype without autocast
        (the predictor keeps its float32): otherwise the second is None and the predictor reads ``u`` itself."""
        if not (weight.dtype == rows.dtype == self.down.dtype) or torch.is_autocast_enabled(rows.device.type):
            return F.linear(rows, weight), None
        both = F.linear(rows, torch.cat([weight, self.down[direction]]))
        return both.split([weight.shape[0], self.down.shape[1]], dim=-1)

    def locations_and_weights(
        self, u: torch.Tensor, direction: int | None, projected: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For scan input ``u`` (B, dirs * E, L): the K locations of every group, in [0, L - 1] (B, dirs * S,
        K), and every position's softmax weights over them (B, dirs * S, K, L); ``projected``: the
        predictor's input from :meth:`project`, if the mixer took it. In the parameters' precision (float32),
        also under autocast: in bfloat16 a location above 128 would lose its fraction, and with it the
        interpolation."""
        picked = slice(None) if direction is None else slice(direction, direction + 1)
        dirs = self.directions if direction is None else 1
        batch, _, length = u.shape
        groups = dirs * self.groups
        with torch.autocast(u.device.type, enabled=False):
            if projected is None:
                hidden = _per_direction(self.down[picked], u.to(self.down.dtype))  # (B, dirs, rank, L)
            else:
                hidden = projected.transpose(1, 2).unsqueeze(1)
            logits = torch.matmul(self.weight_up[picked], hidden) + self.weight_bias[picked, :, None]
            weights = logits.view(batch, groups, self.locations, length).softmax(dim=2)
            location = self.anchor[picked].reshape(1, groups, self.locations)
            if self.learned:
                offset = torch.matmul(self.offset_up[picked], hidden.mean(-1, keepdim=True))
                location = location + offset.view(batch, groups, self.locations)
        return (location.expand(batch, -1, -1) * (length - 1)).clamp(0, length - 1), weights

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
        reverse: bool = False,
        direction: int | None = None,
        projected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The selective scan's output with the adapted states, then the silu(z) gate: the scan reads its
        memory (γ folded in) at this sequence's locations with every position's weights. The locations and
        weights are computed in float32, also under autocast. ``reverse`` (a scan from the last position,
        every tensor in sequence order): the locations count scan steps, as in a scan of the flipped sequence.
        ``projected``: the predictor's input, where the mixer took it with :meth:`project`."""
        gamma = self.gamma.flatten() if direction is None else self.gamma[direction]
        location, weights = self.locations_and_weights(u, direction, projected)
        memory = MemoryRead(location, weights, gamma, self.dropout if self.training and self.dropout.p else None)
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, memory=memory, reverse=reverse).out


def _per_direction(weight: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each direction's ``weight`` (dirs, out, E) applied to its channels of ``u`` (B, dirs * E, L): (B, dirs,
    out, L), arranged so that ``u``'s gradient comes out in ``u``'s own layout and joins the scan's without a
    transposing copy."""
    batch, _, length = u.shape
    dirs = weight.shape[0]
    if u.stride(1) != 1:
        return torch.matmul(weight, u.view(batch, dirs, -1, length))
    # channels adjacent, as Vim's scans have them: one product over all positions, the weight block-diagonal
    tokens = u.transpose(1, 2).reshape(batch * length, -1)
    return (torch.block_diag(*weight) @ tokens.t()).view(dirs, -1, batch, length).permute(2, 0, 1, 3)
