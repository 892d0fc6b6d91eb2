"""Depthwise convolution given by taps: Adaptor-S's multi-scale branches as one op with a cheap backward.

A tap is an offset ``(dy, dx)`` with one weight per channel, on channels-last maps:
``y[b, h, w, c] = Σ_t weight[t, c] x[b, h + dy_t, w + dx_t, c]`` (zero outside the map). The forward and
the input gradient run as one dense depthwise convolution (the taps laid into a square kernel), PyTorch's
fastest path on every device. The weight gradient does not: PyTorch's CPU depthwise backward computes it
about fifteen times slower than the forward, so on CPUs it comes from the compiled kernel
(:func:`adaptor_peft.ops.native.depthwise_taps_grad`, float32 / float64); elsewhere PyTorch's dense
kernel gradient is read at the taps.
Everything runs in the inputs' dtype with autocast off.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import native

Offsets = tuple[tuple[int, int], ...]


def _reach(offsets: Offsets) -> int:
    return max(abs(v) for offset in offsets for v in offset)


@cache
def _kernel_positions(offsets: Offsets, device: torch.device) -> torch.Tensor:
    """Where each tap sits in the flattened square kernel; made once per device, not per call."""
    reach = _reach(offsets)
    size = 2 * reach + 1
    return torch.tensor([(dy + reach) * size + dx + reach for dy, dx in offsets], device=device)


def dense_kernel(weight: torch.Tensor, offsets: Offsets) -> torch.Tensor:
    """The (channels, 1, S, S) depthwise kernel equal to the taps (repeated offsets add up)."""
    size = 2 * _reach(offsets) + 1
    index = _kernel_positions(offsets, weight.device)
    kernel = weight.new_zeros(size * size, weight.shape[1]).index_add(0, index, weight)
    return kernel.t().reshape(weight.shape[1], 1, size, size)


def _conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    maps = x.permute(0, 3, 1, 2)
    return F.conv2d(maps, kernel, padding=kernel.shape[-1] // 2, groups=maps.shape[1]).permute(0, 2, 3, 1)


def taps_grad(x: torch.Tensor, g: torch.Tensor, offsets: Offsets) -> torch.Tensor:
    """``dweight[t, c] = Σ_{b,h,w} x[b, h + dy_t, w + dx_t, c] g[b, h, w, c]``: (taps, channels)."""
    if x.device.type == "cpu" and native.available(x.dtype):
        return native.depthwise_taps_grad(x, g, torch.tensor(offsets, dtype=torch.int64))
    size, channels = 2 * _reach(offsets) + 1, x.shape[-1]  # elsewhere: PyTorch's dense gradient, read at the taps
    kernel = x.new_empty(channels, 1, size, size)
    maps, grads = x.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    dense = torch.ops.aten.convolution_backward(
        grads, maps, kernel, None, [1, 1], [size // 2] * 2, [1, 1], False, [0, 0], channels, [False, True, False]
    )[1]
    return dense.reshape(channels, size * size).t()[_kernel_positions(offsets, x.device)]


class _DepthwiseTaps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offsets, plus_input):
        kernel = dense_kernel(weight, offsets)
        if plus_input:
            kernel[:, 0, kernel.shape[-2] // 2, kernel.shape[-1] // 2] += 1
        ctx.save_for_backward(x, kernel)
        ctx.offsets = offsets
        return _conv(x, kernel)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, kernel = ctx.saved_tensors
        with torch.autocast(g.device.type, enabled=False):
            dx = _conv(g, kernel.flip(-1, -2)) if ctx.needs_input_grad[0] else None
            dweight = taps_grad(x, g, ctx.offsets) if ctx.needs_input_grad[1] else None
        return dx, dweight, None, None


def depthwise_taps(x: torch.Tensor, weight: torch.Tensor, offsets: Offsets, plus_input: bool = False) -> torch.Tensor:
    """The depthwise convolution of channels-last ``x`` (batch, height, width, channels) by the taps
    ``weight`` (taps, channels) at ``offsets`` ((dy, dx) per tap); same shape as ``x``. ``plus_input``:
    ``x`` plus the convolution, in one pass over the maps instead of two (the centre tap plus one)."""
    if weight.shape != (len(offsets), x.shape[-1]):
        raise ValueError(
            f"depthwise_taps: weight must be (taps={len(offsets)}, channels={x.shape[-1]}), got {tuple(weight.shape)}"
        )
    with torch.autocast(x.device.type, enabled=False):
        return _DepthwiseTaps.apply(x, weight.to(x.dtype), tuple(map(tuple, offsets)), plus_input)
