"""Adaptor-T and Adaptor-S into every selective-scan mixer of a backbone: the module work of the adaptor
methods, of :func:`adaptor_peft.inject_adaptor` and of backbones with adaptors built in.

Mixers are found by their base class (:class:`~adaptor_peft.models.protocol.SSMMixer`), whose
declarations give the adaptors' shapes; the adaptors become their ``adaptor_t`` / ``adaptor_s``
submodules, which the mixers' own forward passes call. Nothing is monkey-patched, ``print(model)``
shows every adaptor, and a parameter's name says what it belongs to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..models import classifier_name
from ..models.protocol import SSMMixer, find_mixers
from .config import AdaptorConfig
from .spatial import AdaptorS
from .temporal import AdaptorT


def is_head(model: nn.Module) -> Callable[[str], bool]:
    """A predicate on parameter names: does this one belong to the classification head?"""
    head = classifier_name(model)
    return lambda name: head is not None and name.startswith(head + ".")


def has_builtin_adaptors(model: nn.Module | None) -> bool:
    """Are ``model``'s adaptors part of its backbone (:mod:`adaptor_peft.adaptors.backbones`), not a
    transfer method's?"""
    return getattr(model, "builtin_adaptors", None) is not None


def set_trainable(model: nn.Module, trainable: Callable[[str], bool]) -> nn.Module:
    """``requires_grad`` = ``trainable(name)`` for every parameter; the rest is frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))
    return model


def chosen_mixers(model: nn.Module, config: AdaptorConfig) -> list[tuple[str, SSMMixer]]:
    """The mixers of ``model`` that ``config`` adapts. Raises ``TypeError`` for a model without selective-scan
    mixers, ``RuntimeError`` for one that has adaptors already, and ``ValueError`` for a config that does not
    fit it (blocks out of range, ``t_groups`` not dividing a scan's width, nothing to add)."""
    mixers = find_mixers(model)
    if not mixers:
        children = ", ".join(f"{n}: {type(m).__name__}" for n, m in model.named_children()) or "none"
        raise TypeError(
            f"inject_adaptor: {type(model).__name__} has no selective-scan mixers (SSMMixer) "
            f"(its children: {children}); build the backbone with adaptor_peft.create_model"
        )
    injected = [name for name, m in mixers if m.adaptor_t is not None or m.adaptor_s is not None]
    if injected:
        raise RuntimeError(
            f"inject_adaptor: {type(model).__name__} already has adaptors ({injected[0]} and "
            f"{len(injected) - 1} more mixers); inject once, or start from a fresh backbone"
        )
    indices = range(len(mixers)) if config.blocks is None else config.blocks
    if any(not 0 <= i < len(mixers) for i in indices):
        raise ValueError(
            f"AdaptorConfig.blocks={config.blocks}: the model has {len(mixers)} blocks (0..{len(mixers) - 1})"
        )
    chosen = [mixers[i] for i in indices]
    for name, mixer in chosen:
        if config.temporal and mixer.scan_shape()[0] % config.t_groups:
            raise ValueError(
                f"AdaptorConfig.t_groups={config.t_groups} does not divide the scan width "
                f"{mixer.scan_shape()[0]} of {name}"
            )
    if not config.temporal and not any(mixer.takes_adaptor_s for _, mixer in chosen):
        raise ValueError(
            f"inject_adaptor: {config} adds nothing to {type(model).__name__}: its chosen mixers take no "
            "Adaptor-S (it could not reach the logits, as in a Vim's last block); choose other blocks or enable "
            "Adaptor-T"
        )
    return chosen


def add_adaptors(model: nn.Module, config: AdaptorConfig) -> nn.Module:
    """Builds ``config``'s adaptors into ``model``'s mixers and returns it; trainability and the method
    record are the caller's (:func:`adaptor_peft.inject_adaptor`, :func:`adaptor_peft.prepare_model`).
    Every check (:func:`chosen_mixers`) runs before the first adaptor goes in, so a refused config leaves
    the model as it was.

    The adaptors start as the identity: the model computes what it computed before, to float rounding.
    A mixer whose Adaptor-S could not reach the logits gets none (a Vim's last block: the head reads the
    class token, which is not on the patch grid Adaptor-S works on). In a bfloat16 / float16 backbone the
    adaptors' parameters stay float32 (as peft's ``autocast_adapter_dtype``): they take the backbone's
    activations and give back its dtype."""
    for _, mixer in chosen_mixers(model, config):
        weight = next(mixer.parameters())
        dtype = torch.promote_types(weight.dtype, torch.float32)  # float32 adaptors in a half-precision backbone
        if config.temporal:
            channels, directions = mixer.scan_shape()
            mixer.adaptor_t = AdaptorT(
                channels,
                directions,
                config.t_locations,
                config.t_groups,
                config.t_rank,
                config.t_anchor,
                config.dropout,
                config.lr_scale,
            ).to(weight.device, dtype)
        if config.spatial and mixer.takes_adaptor_s:
            mixer.adaptor_s = AdaptorS(
                mixer.spatial_width(config.s_position),
                config.s_kernel_size,
                config.s_dilations,
                config.s_share_kernel,
                config.s_position,
                config.dropout,
                config.lr_scale,
            ).to(weight.device, dtype)
    return model
