"""The tap-wise depthwise convolution (Adaptor-S's op) and Mamba's causal conv against float64 references:
outputs and gradients, on the compiled CPU kernel and on the PyTorch path it falls back to."""

from __future__ import annotations

import functools
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from adaptor_peft.ops import depthwise, native
from adaptor_peft.ops.depthwise import causal_conv1d, depthwise_taps

PATHS = [
    pytest.param("native", marks=pytest.mark.skipif(not native.available(torch.float64), reason="no C compiler")),
    "torch",
]


def reference(x: torch.Tensor, weight: torch.Tensor, offsets) -> torch.Tensor:
    """One shifted, weighted copy of the map per tap, summed: the definition, written out."""
    height, width = x.shape[1:3]
    out = torch.zeros_like(x)
    for (dy, dx), w in zip(offsets, weight, strict=True):
        shifted = torch.zeros_like(x)
        rows, cols = slice(max(0, -dy), min(height, height - dy)), slice(max(0, -dx), min(width, width - dx))
        source_rows = slice(rows.start + dy, rows.stop + dy)
        source_cols = slice(cols.start + dx, cols.stop + dx)
        shifted[:, rows, cols] = x[:, source_rows, source_cols]
        out = out + shifted * w
    return out


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(native, "available", lambda dtype=torch.float32: False)
    return request.param


OFFSETS = {
    "multi-scale 3x3": tuple((dy * d, dx * d) for d in (1, 2, 3) for dy in (-1, 0, 1) for dx in (-1, 0, 1)),
    "asymmetric, repeated": ((0, 0), (2, -1), (-3, 0), (2, -1), (0, 4)),
}


@pytest.mark.parametrize("channels", [5, 32, 70])
@pytest.mark.parametrize("offsets", list(OFFSETS), ids=str)
@pytest.mark.parametrize("plus_input", [False, True], ids=["convolution", "plus-input"])
def test_matches_the_definition_with_gradients(path, channels, offsets, plus_input):
    offsets = OFFSETS[offsets]
    g = torch.Generator().manual_seed(channels)
    x = torch.randn(2, 6, 9, channels, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(offsets), channels, generator=g, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn(x.shape, generator=g, dtype=torch.float64)
    expected = reference(x, weight, offsets) + (x if plus_input else 0)
    want = torch.autograd.grad((expected * cotangent).sum(), (x, weight))
    got = depthwise_taps(x, weight, offsets, plus_input=plus_input)
    have = torch.autograd.grad((got * cotangent).sum(), (x, weight))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("x", "weight"), have, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"d{name}: {m}")


def test_float32_and_gradcheck(path):
    offsets = OFFSETS["asymmetric, repeated"]
    x = torch.randn(1, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(offsets), 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: depthwise_taps(a, b, offsets), (x, weight))
    single = depthwise_taps(x.float(), weight.float(), offsets)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), reference(x, weight, offsets), rtol=1e-5, atol=1e-5)


def test_runs_in_the_inputs_dtype_under_autocast():
    offsets = OFFSETS["multi-scale 3x3"]
    x = torch.randn(2, 5, 5, 8, requires_grad=True)
    weight = torch.randn(len(offsets), 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_taps(x, weight, offsets)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(out, reference(x, weight, offsets), rtol=1e-5, atol=1e-5)


def test_dense_kernel_places_taps_and_adds_repeats():
    weight = torch.arange(6.0).view(3, 2)
    kernel = depthwise.dense_kernel(weight, ((0, 0), (-1, 1), (0, 0)))
    assert kernel.shape == (2, 1, 3, 3)
    assert kernel[:, 0, 1, 1].tolist() == [0 + 4, 1 + 5] and kernel[:, 0, 0, 2].tolist() == [2, 3]
    assert kernel.abs().sum() == weight.sum()


def test_a_wrong_weight_shape_is_named():
    with pytest.raises(ValueError, match=r"weight must be \(taps=2, channels=4\), got \(3, 4\)"):
        depthwise_taps(torch.zeros(1, 3, 3, 4), torch.zeros(3, 4), ((0, 0), (1, 1)))


def test_matches_pytorch_depthwise_convolution():
    """The same numbers as PyTorch's own convolution with the dense kernel, forward and both gradients."""
    offsets = OFFSETS["multi-scale 3x3"]
    x = torch.randn(3, 7, 7, 40, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(offsets), 40, dtype=torch.float64, requires_grad=True)
    kernel = depthwise.dense_kernel(weight, offsets)
    expected = F.conv2d(x.permute(0, 3, 1, 2), kernel, padding=3, groups=40).permute(0, 2, 3, 1)
    got = depthwise_taps(x, weight, offsets)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.sum(), (x, weight)), torch.autograd.grad(expected.sum(), (x, weight)),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("skip", [None, 0, 8, 10, 20], ids=lambda s: f"skip{s}")  # none, first, row end, mid-row, last
@pytest.mark.parametrize("plus_input", [False, True], ids=["convolution", "plus-input"])
def test_tokens_with_a_token_that_is_no_patch(path, skip, plus_input):
    """A (batch, tokens, channels) sequence of a 5x4 grid with one more token at ``skip`` (Vim's class token):
    the patches are convolved as the map they form, the extra token gets nothing from the convolution (its
    own value with ``plus_input``), in value and in gradient, float64."""
    offsets = OFFSETS["multi-scale 3x3"]
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(2, 20 + (skip is not None), 70, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(offsets), 70, generator=g, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn(tokens.shape, generator=g, dtype=torch.float64)
    patches = tokens if skip is None else torch.cat([tokens[:, :skip], tokens[:, skip + 1 :]], dim=1)
    convolved = reference(patches.view(2, 5, 4, 70), weight, offsets).flatten(1, 2) + (patches if plus_input else 0)
    if skip is not None:
        extra = tokens[:, skip : skip + 1] if plus_input else torch.zeros_like(tokens[:, :1])
        convolved = torch.cat([convolved[:, :skip], extra, convolved[:, skip:]], dim=1)
    want = torch.autograd.grad((convolved * cotangent).sum(), (tokens, weight))
    got = depthwise_taps(tokens, weight, offsets, plus_input, grid=(5, 4), skip=skip)
    have = torch.autograd.grad((got * cotangent).sum(), (tokens, weight))
    torch.testing.assert_close(got, convolved, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("tokens", "weight"), have, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"d{name}: {m}")


def test_tokens_that_do_not_fill_the_grid_are_named():
    with pytest.raises(ValueError, match=r"do not hold a 5x4 grid of patches and the token at 3"):
        depthwise_taps(torch.zeros(1, 20, 2), torch.zeros(1, 2), ((0, 0),), grid=(5, 4), skip=3)


def conv_reference(x, weight, bias):
    return F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=weight.shape[0])[..., : x.shape[-1]]


@pytest.mark.parametrize(
    ("taps", "length", "channels"), [(1, 11, 8), (4, 11, 8), (4, 11, 70), (4, 3, 8), (4, 2, 8), (4, 1, 8)]
)
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_causal_conv1d_matches_conv1d_in_float64_on_strided_inputs_with_every_gradient(
    path, taps, length, channels, reverse
):
    """Also on sequences no longer than the kernel, where some taps read only the zeros before the start;
    ``reverse`` against conv1d of the flipped sequence, flipped back."""
    g = torch.Generator().manual_seed(taps * 100 + length + int(torch.randint(1 << 20, ())))
    rows = torch.randn(3, length, 2 * channels, generator=g, dtype=torch.float64)  # a (B, L, 2E) projection (Vim's)
    weight = torch.randn(channels, 1, taps, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(channels, generator=g, dtype=torch.float64, requires_grad=True)
    leaf = rows.clone().requires_grad_()
    x = leaf[..., channels:].transpose(1, 2)
    cotangent = torch.randn(3, length, channels, generator=g, dtype=torch.float64).transpose(1, 2)
    grads = []
    convolve = functools.partial(causal_conv1d, reverse=reverse)
    reference = (lambda x, w, b: conv_reference(x.flip(-1), w, b).flip(-1)) if reverse else conv_reference
    for conv in (convolve, reference):
        out = conv(x, weight, bias)
        grads.append((out, *torch.autograd.grad((out * cotangent).sum(), (leaf, weight, bias))))
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert grads[0][0].stride(1) == 1, "channels adjacent, as the scan and x_proj read them"
    compiled = "Native" in type(convolve(x, weight, bias).grad_fn).__name__
    assert compiled == (path == "native"), "the compiled kernel runs on the CPU, and only there"
    assert torch.autograd.gradcheck(convolve, (x.detach().requires_grad_(), weight, bias))
    assert torch.autograd.gradcheck(lambda x, w: convolve(x, w), (x.detach().requires_grad_(), weight))


def test_causal_conv1d_keeps_nothing_for_a_frozen_weight_and_sums_half_precision_in_float32(path):
    x = torch.randn(2, 8, 9, requires_grad=True)
    weight, bias = torch.randn(8, 1, 4), torch.randn(8)
    holder = x * 1
    out, alive = causal_conv1d(holder, weight, bias), weakref.ref(holder)
    del holder
    gc.collect()
    assert alive() is None  # only a trained weight's gradient needs the input
    out.sum().backward()
    half = x.detach().bfloat16()
    expected = conv_reference(half.float(), weight, bias).bfloat16()
    assert causal_conv1d(half, weight, bias).dtype == torch.bfloat16
    assert torch.equal(causal_conv1d(half, weight, bias), expected)
