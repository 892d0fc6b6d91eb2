"""Activation recomputation (``models.layers.Recompute``) and its use in Vim's mixer, whose cheap
activations are rebuilt in the backward pass, so a training step holds less memory for the very same
gradients."""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptor_peft.adaptors import prepare_model
from adaptor_peft.models import keep_activations
from adaptor_peft.models.layers import Recompute
from tests.support.memory import PeakTensorMemory
from tests.support.models import tiny


def toy(x: torch.Tensor, w: torch.Tensor, calls: list[str], rebuilt: bool = True):
    """flip(x) * w + sin(flip(x)[..., :2]): two savers of the flipped tensor, one of them through a view."""
    with Recompute() as recompute:
        flipped = x.flip(-1)

        def rebuild():
            calls.append("flip")
            return x.flip(-1)

        if rebuilt:
            recompute.add(flipped, rebuild)
        out = (flipped * w).sum() + flipped[..., :2].sin().sum()
    return out, weakref.ref(flipped)


def test_a_registered_activation_is_freed_after_the_forward_and_rebuilt_once_for_the_same_gradients():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    calls: list[str] = []
    out, alive = toy(x, w, calls)
    gc.collect()
    assert alive() is None and calls == []  # nothing holds it until the backward asks
    gx, gw = torch.autograd.grad(out, (x, w))
    assert calls == ["flip"]  # two savers (one through a view), one rebuild
    out, _ = toy(x, w, [], rebuilt=False)
    expected = torch.autograd.grad(out, (x, w))
    assert torch.equal(gx, expected[0]) and torch.equal(gw, expected[1])
    assert torch.equal(gw, x.flip(-1))


def test_recompute_stands_aside_without_gradients_under_keep_activations_and_under_other_hooks():
    x = torch.randn(4, requires_grad=True)
    outer_hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    for context in (torch.no_grad(), keep_activations(), outer_hooks):
        calls: list[str] = []
        with context:
            out, alive = toy(x, x.detach(), calls)
        gc.collect()
        assert calls == []
        assert (alive() is None) == isinstance(context, torch.no_grad)  # else kept by the graph
        del out


def test_a_freed_registered_tensors_address_does_not_pass_its_recipe_to_a_newcomer():
    """Once a registered tensor is freed, another may come to lie at its address (here for certain: the
    two share one block of memory in turn)."""
    x, w = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    memory = torch.empty(64, dtype=torch.float64).untyped_storage()

    def tensor_in_memory(values: torch.Tensor) -> torch.Tensor:
        return torch.tensor([], dtype=torch.float64).set_(memory, 0, (8, 8)).copy_(values)

    with Recompute() as recompute:
        gone = tensor_in_memory(x.flip(0))
        recompute.add(gone, lambda: x.flip(0))
        del gone
        newcomer = tensor_in_memory(x.flip(1))  # unregistered, at the freed tensor's address
        out = (newcomer * w).sum()
    assert torch.equal(torch.autograd.grad(out, w)[0], x.flip(1))


def test_recipes_run_under_the_forwards_autocast():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    grads, calls = [], []

    def rebuild():
        calls.append(torch.is_autocast_enabled("cpu"))
        return F.linear(x, w)

    for context in (Recompute(), keep_activations()):
        with torch.autocast("cpu", torch.bfloat16), context as recompute:
            y = F.linear(x, w)
            if isinstance(recompute, Recompute):
                recompute.add(y, rebuild)
            out = (y * y).float().sum()  # the product saves y
        grads.append(torch.autograd.grad(out, (x, w)))
    assert calls == [True]  # rebuilt once, in bfloat16 as in the forward (else a dtype error)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_a_view_cannot_be_registered_and_a_recipe_must_give_the_forwards_layout():
    x = torch.randn(4, 6, requires_grad=True)
    with Recompute() as recompute, pytest.raises(ValueError, match="own its memory whole"):
        recompute.add(x.exp()[:2], lambda: x.exp()[:2])
    with Recompute() as recompute:
        y = x.exp()
        recompute.add(y, lambda: x.exp().t().contiguous().t())  # same values, other layout
        out = (y * y).sum()
    with pytest.raises(
        RuntimeError,
        match=r"rebuilt shape \(4, 6\), strides \(1, 4\), torch.float32; the forward had \(4, 6\), \(6, 1\)",
    ):
        out.backward()


@pytest.mark.parametrize(
    ("method", "options"),
    [("full", {}), ("adaptor", {}), ("lora", {}), ("lora", {"targets": ["in_proj", "x_proj", "dt_proj"]})],
)
def test_vim_training_holds_less_memory_for_identical_gradients(method, options):
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    peaks, grads = [], []
    for context in (keep_activations(), contextlib.nullcontext()):
        model = tiny("vim", num_classes=10).double()
        model = model if method == "full" else prepare_model(model, method, **options)
        torch.manual_seed(1)
        with torch.no_grad():  # trained-like adaptors, so that every gradient path is exercised
            for p in (p for p in model.parameters() if p.requires_grad):
                p.add_(0.05 * torch.randn_like(p))
        with PeakTensorMemory() as memory, context:
            model(images).square().mean().backward()
        peaks.append(memory.peak)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert peaks[1] < 0.85 * peaks[0], peaks


class WrappedConv(nn.Conv1d):
    """Stands for a conv that another library wrapped (peft's LoRA, say): the mixer runs it as itself."""


def test_a_wrapped_conv_runs_as_itself_in_both_directions_for_the_same_outputs_and_gradients():
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = tiny("vim", num_classes=10).double()
    expected = model(images)
    for block in model.layers:
        for name in ("conv1d", "conv1d_b"):
            conv = getattr(block.mixer, name)
            wrapped = WrappedConv(conv.in_channels, conv.out_channels, conv.kernel_size, groups=conv.groups,
                                  padding=conv.padding).double()  # fmt: skip
            wrapped.load_state_dict(conv.state_dict())
            setattr(block.mixer, name, wrapped)
    torch.testing.assert_close(model(images), expected, rtol=1e-12, atol=1e-12)
    grads = []
    for context in (keep_activations(), contextlib.nullcontext()):
        model.zero_grad()
        with context:
            model(images).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
