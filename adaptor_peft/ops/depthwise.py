"""Depthwise convolution given by taps: Adaptor-S's multi-scale branches as one op with a cheap backward.

A tap is an offset ``(dy, dx)`` with one weight per channel, on channels-last maps:
``y[b, h, w, c] = Σ_t weight[t, c] x[b, h + dy_t, w + dx_t, c]`` (zero outside the map). The maps may be
given as a model's tokens: the patches in grid order and one more token that is no patch (Vim's class
token), which passes through. On CPUs the compiled kernel (:mod:`adaptor_peft.ops.native`) reads and
writes the tokens in place, the repeated taps of the branches merged, the input gradient as the same
convolution with the offsets negated. Elsewhere the taps are laid into one dense square kernel for
PyTorch's depthwise convolution (the class token taken out and put back), its weight gradient read at
the taps. Everything runs in the inputs' dtype with autocast off.
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
    """``dweight[t, c] = Σ_{b,h,w} x[b, h + dy_t, w + dx_t, c] g[b, h, w, c]``: (taps, channels), PyTorch's
    dense kernel gradient read at the taps."""
    size, channels = 2 * _reach(offsets) + 1, x.shape[-1]
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


class _NativeTaps(torch.autograd.Function):
    """The compiled kernel on tokens (batch, tokens, channels) of a ``grid``, the token at ``skip`` kept
    (``keep_skip``) or zeroed; ``offsets`` an int64 (taps, 2) tensor."""

    @staticmethod
    def forward(ctx, tokens, weight, offsets, grid, skip, keep_skip):
        ctx.save_for_backward(tokens, weight, offsets)
        ctx.grid, ctx.skip, ctx.keep_skip = grid, skip, keep_skip
        return native.depthwise_taps(tokens, weight, offsets, grid, skip, keep_skip)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        tokens, weight, offsets = ctx.saved_tensors
        g = g.contiguous()
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            dx = native.depthwise_taps(g, weight, -offsets, ctx.grid, ctx.skip, ctx.keep_skip)
        if ctx.needs_input_grad[1]:
            dweight = native.depthwise_taps_grad(tokens, g, offsets, ctx.grid, ctx.skip)
        return dx, dweight, None, None, None, None


@cache
def _merged(offsets: Offsets, plus_input: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The distinct offsets (with the centre where ``plus_input`` adds it) as an int64 tensor, where each
    given tap lands among them, and the centre's index."""
    distinct = tuple(dict.fromkeys((*offsets, *(((0, 0),) if plus_input else ()))))
    where = torch.tensor([distinct.index(offset) for offset in offsets], device=device)
    return torch.tensor(distinct, dtype=torch.int64), where, distinct.index((0, 0)) if plus_input else -1


def _compiled(tokens, weight, offsets, plus_input, grid, skip):
    distinct, where, centre = _merged(offsets, plus_input, weight.device)
    merged = weight.new_zeros(len(distinct), weight.shape[1]).index_add(0, where, weight)
    if plus_input:
        merged = merged + F.one_hot(torch.tensor(centre), len(distinct)).to(merged.dtype)[:, None]
    return _NativeTaps.apply(tokens, merged, distinct, grid, skip, plus_input)


def _dense(tokens, weight, offsets, plus_input, grid, skip):
    patches = tokens if skip is None else torch.cat([tokens[:, :skip], tokens[:, skip + 1 :]], dim=1)
    out = _DepthwiseTaps.apply(patches.reshape(len(tokens), *grid, -1), weight, offsets, plus_input).flatten(1, 2)
    if skip is None:
        return out
    kept = tokens[:, skip : skip + 1] if plus_input else torch.zeros_like(tokens[:, :1])
    return torch.cat([out[:, :skip], kept, out[:, skip:]], dim=1)


def depthwise_taps(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: Offsets,
    plus_input: bool = False,
    grid: tuple[int, int] | None = None,
    skip: int | None = None,
) -> torch.Tensor:
    """The depthwise convolution by the taps ``weight`` (taps, channels) at ``offsets`` ((dy, dx) per tap) of
    channels-last ``x``: maps (batch, height, width, channels), or with ``grid`` = (height, width) tokens
    (batch, tokens, channels), the patches in grid order and, at index ``skip``, one more token that is no
    patch, to which the convolution gives nothing. Same shape as ``x``. ``plus_input``: ``x`` plus the
    convolution (so the token at ``skip`` keeps its value), in one pass over the maps instead of two (the
    centre tap plus one)."""
    if weight.shape != (len(offsets), x.shape[-1]):
        raise ValueError(
            f"depthwise_taps: weight must be (taps={len(offsets)}, channels={x.shape[-1]}), got {tuple(weight.shape)}"
        )
    tokens, grid = (x, tuple(grid)) if grid is not None else (x.flatten(1, 2), tuple(x.shape[1:3]))
    if tokens.dim() != 3 or tokens.shape[1] != grid[0] * grid[1] + (skip is not None):
        raise ValueError(
            f"depthwise_taps: tokens of shape {tuple(x.shape)} do not hold a {grid[0]}x{grid[1]} grid of patches"
            + ("" if skip is None else f" and the token at {skip}")
        )
    offsets = tuple(map(tuple, offsets))
    compiled = x.device.type == "cpu" and native.available(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        out = (_compiled if compiled else _dense)(tokens, weight.to(x.dtype), offsets, plus_input, grid, skip)
    return out.view(x.shape)
