"""Adaptor-S: multi-scale depthwise convolution on the 2D patch map (Mamba-Adaptor).

Flattening an image into a scan loses its 2D neighbourhoods; Adaptor-S restores them on the mixer's
output: parallel depthwise convolutions at several dilation rates, summed, scaled per channel by a
zero-initialised scale and added back, so the shape is unchanged and an injected model starts out
computing exactly what the pretrained one did. The branches are summed in weight space: every kernel
entry times its branch's scale is one tap of a single depthwise convolution
(:func:`adaptor_peft.ops.depthwise.depthwise_taps`), the same sum as separate dilated convolutions and,
on CPU, an order of magnitude faster forward and backward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.depthwise import depthwise_taps
from .config import AdaptorConfig


class AdaptorS(nn.Module):
    """Adaptor-S on (B, H, W, C) maps; ``position`` says where in the mixer it sits, ``lr_scale`` the
    learning-rate multiple of the scales (read by :func:`adaptor_peft.training.optim.build_optimizer`). The
    arguments are :class:`AdaptorConfig`'s ``s_*`` fields and ``dropout``, with its defaults."""

    def __init__(
        self,
        channels: int,
        kernel_size: int = AdaptorConfig.s_kernel_size,
        dilations: tuple[int, ...] = AdaptorConfig.s_dilations,
        share_kernel: bool = AdaptorConfig.s_share_kernel,
        position: str = AdaptorConfig.s_position,
        dropout: float = AdaptorConfig.dropout,
        lr_scale: float = AdaptorConfig.lr_scale,
    ):
        super().__init__()
        self.lr_scale = lr_scale
        self.dilations, self.position, self.share_kernel = tuple(dilations), position, share_kernel
        self.channels = channels
        kernels = 1 if share_kernel else len(self.dilations)
        self.kernel = nn.Parameter(torch.empty(kernels, channels, 1, kernel_size, kernel_size))
        self.scale = nn.Parameter(torch.zeros(len(self.dilations) if share_kernel else 1, channels))
        self.dropout = nn.Dropout(dropout)
        for k in self.kernel:  # as nn.Conv2d initialises its weight
            nn.init.kaiming_uniform_(k, a=5**0.5)
        reach = range(-(kernel_size // 2), kernel_size // 2 + 1)
        self.offsets = tuple((dy * d, dx * d) for d in self.dilations for dy in reach for dx in reach)

    def zero_initialised(self) -> list[nn.Parameter]:
        """The parameters that start at zero (the scales), whose learning rate ``lr_scale`` multiplies."""
        return [self.scale]

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel.shape[-1]}, dilations={self.dilations}, "
            f"share_kernel={self.share_kernel}, position={self.position!r}"
        )

    def taps(self) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
        """The branches as taps of one depthwise convolution: weights (taps, C), each kernel entry times its
        branch's scale, and their (dy, dx) offsets (centres repeat, one per branch, and add up)."""
        branches = self.kernel[:, :, 0] * self.scale[:, :, None, None]  # (branches, C, size, size)
        return branches.permute(0, 2, 3, 1).reshape(-1, self.kernel.shape[1]), self.offsets

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None, skip: int | None = None) -> torch.Tensor:
        """``x`` plus the branches: ``x`` (B, H, W, C) maps, or (B, tokens, C) tokens of a ``grid`` of
        patches with one more token at ``skip`` that is no patch and is left as it is (Vim's class token),
        read in place. Computed in the parameters' precision (float32 in a half-precision backbone, as peft's
        adapters) and returned in ``x``'s; without dropout the convolution adds ``x`` itself, one pass over
        the maps instead of two."""
        weights, offsets = self.taps()
        if self.training and self.dropout.p:
            mixed = depthwise_taps(x.to(weights.dtype), weights, offsets, grid=grid, skip=skip)
            return x + self.dropout(mixed).to(x.dtype)
        return depthwise_taps(x.to(weights.dtype), weights, offsets, True, grid, skip).to(x.dtype)
