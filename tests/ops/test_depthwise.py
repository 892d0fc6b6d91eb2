"""The tap-wise depthwise convolution (Adaptor-S's op) against a float64 reference: outputs and gradients,
on the compiled CPU kernel and on the PyTorch path it falls back to."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptor_peft.ops import depthwise, native
from adaptor_peft.ops.depthwise import depthwise_taps

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
