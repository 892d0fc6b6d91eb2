"""Depthwise convolution given by taps: Adaptor-S's multi-scale branches as one op with a cheap backward,
and Mamba's causal conv, a 1 x L grid of taps.

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
from .records import full_precision

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


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, reverse):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias, ctx.reverse = bias is not None, reverse
        return _conv_taps(_padded(x, weight.shape[-1], reverse), weight, bias, reverse).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        taps, length, reverse, grad_in = weight.shape[-1], grad.shape[-1], ctx.reverse, full_precision(grad)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:  # the same taps, run the other way in time over the gradient
            dx = _conv_taps(_padded(grad, taps, not reverse), weight, None, not reverse).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            rows, padded = grad_in.transpose(1, 2), _padded(x, taps, reverse)
            dweight = torch.stack(
                [(rows * _tap(padded, k, taps, length, reverse)).sum((0, 1)) for k in range(taps)], -1
            )
            dweight = dweight.unsqueeze(1).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = grad_in.sum((0, 2)).to(weight.dtype)
        return dx, dweight, dbias, None


def _padded(x: torch.Tensor, taps: int, reverse: bool) -> torch.Tensor:
    """(B, E, L) as a contiguous (B, L + taps - 1, E) in at least float32, zero-padded before the sequence
    (after it when ``reverse``)."""
    return F.pad(full_precision(x).transpose(1, 2), (0, 0, 0, taps - 1) if reverse else (0, 0, taps - 1, 0))


def _tap(padded: torch.Tensor, k: int, taps: int, length: int, reverse: bool) -> torch.Tensor:
    """The positions of :func:`_padded`'s output that tap ``k`` multiplies, for every output position."""
    start = taps - 1 - k if reverse else k
    return padded[:, start : start + length]


def _conv_taps(padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """sum_k weight[:, 0, k] * tap k (+ bias) in padded's dtype, in conv1d's order of summation, for padded
    from :func:`_padded`; returns (B, E, L) with channels adjacent in memory."""
    taps = weight.shape[-1]
    length = padded.shape[1] - taps + 1
    rows = weight[:, 0, :].t().to(padded.dtype).contiguous()  # (K, E): each tap's channels adjacent, as padded's
    first = _tap(padded, 0, taps, length, reverse)
    out = first * rows[0] if bias is None else torch.addcmul(bias.to(padded.dtype), first, rows[0])
    for k in range(1, taps):
        out.addcmul_(_tap(padded, k, taps, length, reverse), rows[k])
    return out.transpose(1, 2)


@cache
def _causal_offsets(taps: int, reverse: bool) -> torch.Tensor:
    """The conv weight's taps as :func:`depthwise_taps` offsets on a 1 x L grid: tap k reads K - 1 - k
    positions back (ahead when ``reverse``)."""
    return torch.tensor([(0, taps - 1 - k if reverse else k - taps + 1) for k in range(taps)])


class _NativeCausalConv1d(torch.autograd.Function):
    """The compiled taps kernel on x's rows (B, L, E), read in place, with the bias; the input gradient
    is the conv the other way in time over the gradient's rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, reverse):
        offsets, rows = _causal_offsets(weight.shape[-1], reverse), weight[:, 0, :].t()
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, rows, offsets)
        ctx.has_bias = bias is not None
        out = native.depthwise_taps(x.transpose(1, 2), rows, offsets, (1, x.shape[-1]), None, False, bias)
        return out.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, rows, offsets = ctx.saved_tensors
        g, grid = grad.transpose(1, 2), (1, grad.shape[-1])
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = native.depthwise_taps(g, rows, -offsets, grid, None, False).transpose(1, 2)
        if ctx.needs_input_grad[1]:
            dweight = native.depthwise_taps_grad(x.transpose(1, 2), g, offsets, grid, None).t().unsqueeze(1)
            dweight = dweight.to(rows.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = g.sum((0, 1)).to(rows.dtype)
        return dx, dweight, dbias, None


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, reverse: bool = False
) -> torch.Tensor:
    """Mamba's depthwise causal convolution: ``conv1d(x, weight, bias, padding=K - 1, groups=E)[..., :L]`` for
    x (B, E, L) and weight (E, 1, K), summed in at least float32 (as mamba-ssm's causal-conv1d kernel) and
    returned in x's dtype, with channels adjacent in memory (a transposed (B, L, E) tensor): the layout in
    which the scan reads one vector per position and ``x_proj`` reads positions as rows, with no copy.
    ``reverse``: causal in the reversed sequence (each position sees itself and the K - 1 after it), what
    flipping x, convolving and flipping back gives, without the flips. A frozen weight keeps nothing for
    the backward pass.

    On a CPU in float32 or float64 the compiled taps kernel reads x's rows in place (Vim's x is one half of
    ``in_proj``'s output) and adds the bias in the same pass; elsewhere it runs as K shifted multiply-adds.
    Either is several times faster than ``conv1d``, which copies a strided x, then runs a general kernel."""
    compiled = x.device.type == "cpu" and native.available(x.dtype)
    return (_NativeCausalConv1d if compiled else _CausalConv1d).apply(x, weight, bias, reverse)
