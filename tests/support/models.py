"""Tiny backbones with their weights moved off init, images for them, and logits."""

from __future__ import annotations

import torch
from torch import nn

import adaptor_peft
from adaptor_peft.adaptors.temporal import AdaptorT

TINY = {
    "vim": dict(name="vim_tiny_patch16_224", embed_dim=32, depth=2, img_size=32, patch_size=8, stride=8),
    "vim_stride": dict(name="vim_tiny_patch16_stride8_224", embed_dim=32, depth=2, img_size=32, patch_size=8, stride=4),
    "vmamba_v2": dict(name="vmamba_tiny_s1l8", dims=16, depths=(1, 2, 1, 1)),
    "vmamba_v2_ratio2": dict(name="vmamba_tiny_s2l5", dims=16, depths=(1, 1, 2, 1)),
    "vmamba_v0": dict(name="vmamba_tiny_v0", dims=16, depths=(1, 1, 2, 1)),
}


def tiny(kind: str, **kwargs) -> torch.nn.Module:
    config = {**TINY[kind], **kwargs}
    torch.manual_seed(0)
    model = adaptor_peft.create_model(config.pop("name"), **config).eval()
    with torch.no_grad():  # move every parameter off its init so that a wrong formula shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


SIZES = {"vim": 32, "vmamba_v2": 64, "vmamba_v0": 64}


def images_for(kind: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, SIZES[kind], SIZES[kind], generator=generator)


def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images.to(next(model.parameters()).dtype))


def perturb(model: torch.nn.Module, marker: str, scale: float = 0.3) -> int:
    """Adds noise to every parameter whose name contains ``marker``; returns how many were changed."""
    changed = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                p.add_(torch.randn_like(p) * scale)
                changed += 1
    return changed


class _WrappedLinear(nn.Linear):
    """Stands for an ``x_proj`` that another library wrapped: a mixer then runs it as itself, and Adaptor-T's
    predictor takes its own product of the scan input."""


def assert_shared_projection_changes_nothing(model: torch.nn.Module, images: torch.Tensor) -> None:
    """``model`` (with an Adaptor-T, float64) gives the same outputs, input gradients and parameter gradients
    on ``images`` with the predictor's input taken in ``x_proj``'s product (which the mixers must take) as
    with it taken apart."""
    shared: list[bool] = []
    original = AdaptorT.locations_and_weights

    def spy(self, u, direction, projected=None):
        shared.append(projected is not None)
        return original(self, u, direction, projected)

    results = []
    for run in range(2):
        if run:
            for module in model.modules():
                for name in ("x_proj", "x_proj_b"):
                    if type(getattr(module, name, None)) is nn.Linear:
                        getattr(module, name).__class__ = _WrappedLinear
        inputs = images.clone().requires_grad_()
        model.zero_grad()
        AdaptorT.locations_and_weights = spy
        try:
            out = model(inputs)
        finally:
            AdaptorT.locations_and_weights = original
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), inputs.grad, grads))
        assert shared and all(s == (run == 0) for s in shared), (run, shared)
        shared.clear()
    (out, dx, grads), (out_apart, dx_apart, grads_apart) = results
    torch.testing.assert_close(out, out_apart, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, dx_apart, rtol=1e-12, atol=1e-14)
    assert grads.keys() == grads_apart.keys() and any(".adaptor_t.down" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_apart[name], rtol=1e-10, atol=1e-14, msg=name)
