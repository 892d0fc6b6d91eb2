"""Adaptor-S: multi-scale depthwise convolution on the 2D patch map (Mamba-Adaptor).

Flattening an image into a scan loses its 2D neighbourhoods; Adaptor-S restores them on the mixer's
output: parallel depthwise convolutions at several dilation rates, summed, scaled per channel by a
zero-initialised scale and added back, so the shape is unchanged and an injected model starts out
computing exactly what the pretrained one did. The branches are summed in weight space: one depthwise
convolution with the dilated kernels laid into a single (k-1)·max(d)+1 kernel, which is the same sum
and, on CPU, an order of magnitude faster than separate dilated convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdaptorConfig


class AdaptorS(nn.Module):
    """Adaptor-S on (B, H, W, C) maps; ``position`` says where in the mixer it sits. The arguments
    are :class:`AdaptorConfig`'s ``s_*`` fields and ``dropout``, with its defaults."""

    def __init__(
        self,
        channels: int,
        kernel_size: int = AdaptorConfig.s_kernel_size,
        dilations: tuple[int, ...] = AdaptorConfig.s_dilations,
        share_kernel: bool = AdaptorConfig.s_share_kernel,
        position: str = AdaptorConfig.s_position,
        dropout: float = AdaptorConfig.dropout,
    ):
        super().__init__()
        self.dilations, self.position, self.share_kernel = tuple(dilations), position, share_kernel
        kernels = 1 if share_kernel else len(self.dilations)
        self.kernel = nn.Parameter(torch.empty(kernels, channels, 1, kernel_size, kernel_size))
        self.scale = nn.Parameter(torch.zeros(len(self.dilations) if share_kernel else 1, channels))
        self.dropout = nn.Dropout(dropout)
        for k in self.kernel:
            nn.init.kaiming_uniform_(k, a=5**0.5)

    def extra_repr(self) -> str:
        return (
            f"channels={self.kernel.shape[1]}, kernel_size={self.kernel.shape[-1]}, dilations={self.dilations}, "
            f"share_kernel={self.share_kernel}, position={self.position!r}"
        )

    def effective_kernel(self) -> torch.Tensor:
        """The single depthwise kernel (C, 1, S, S) equal to the scaled sum of the dilated branches."""
        channels, size = self.kernel.shape[1], self.kernel.shape[-1]
        span = (size - 1) * max(self.dilations) + 1
        center, reach = span // 2, size // 2
        kernel = self.kernel.new_zeros(channels, 1, span, span)
        for i, d in enumerate(self.dilations):
            scale = self.scale[i] if self.share_kernel else self.scale[0]
            branch = self.kernel[0 if self.share_kernel else i] * scale[:, None, None, None]
            taps = slice(center - d * reach, center + d * reach + 1, d)
            kernel[:, :, taps, taps] += branch
        return kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus the branches, computed in the parameters' precision (float32 in a half-precision
        backbone, as peft's adapters) and added back in ``x``'s."""
        kernel = self.effective_kernel()
        maps = x.to(kernel.dtype).permute(0, 3, 1, 2)
        mixed = F.conv2d(maps, kernel, padding=kernel.shape[-1] // 2, groups=maps.shape[1])
        return x + self.dropout(mixed.permute(0, 2, 3, 1)).to(x.dtype)
