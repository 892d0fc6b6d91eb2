"""Tiny backbones with their weights moved off init, images for them, and logits."""

from __future__ import annotations

import torch

import adaptor_peft

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
