"""Optimizer and learning-rate schedule of a recipe.

Weight decay pulls weights towards zero. That is a prior for matrices, but for norms, biases and the
adaptors' scales and anchors zero is the wrong target: a zero scale switches an adaptor off, a zero
anchor moves every Adaptor-T location to the first token, a zero ``A_log`` changes the SSM's decay.
Those get no decay (as timm and the VTAB-1k PEFT code bases do for norms and biases, and Mamba and
VMamba for ``A_log``). A backbone names its own through timm's ``no_weight_decay()`` hook; the adaptors'
are named here.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import nn

NO_DECAY_SUFFIXES = ("bias", "gamma", "scale", "anchor")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "constant")


def decays(name: str, parameter: nn.Parameter, exempt: Collection[str] = ()) -> bool:
    """Does weight decay apply to this parameter? Not to vectors (norms, biases, D), nor to names ending as
    above, nor to the ``exempt`` ones (a backbone's ``no_weight_decay()``)."""
    return parameter.ndim >= 2 and name not in exempt and not name.rsplit(".", 1)[-1].endswith(NO_DECAY_SUFFIXES)


def lr_scales(model: nn.Module) -> dict[int, float]:
    """``id(parameter)`` -> learning-rate multiple of the zero-initialised parameters: those of modules with an
    ``lr_scale`` (the adaptors, :attr:`adaptor_peft.AdaptorConfig.lr_scale`, the parallel adapter) and those
    the model's method names (LoRA's B); the rest take 1."""
    scales = {
        id(p): module.lr_scale
        for module in model.modules()
        if hasattr(module, "zero_initialised")
        for p in module.zero_initialised()
    }
    method = getattr(model, "peft_method", None)
    return scales if method is None else {**scales, **method.lr_scales(model)}


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """The trainable parameters in optimizer groups by weight decay (on or off, see :func:`decays`) and
    learning rate (``lr`` times the parameter's :func:`lr_scales`): what any ``torch.optim`` optimizer takes,
    for a training loop of your own that should train the adaptors as this package's does."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: prepare it with a method first")
    scales = lr_scales(model)
    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    keys = {id(p): (decays(n, p, exempt), scales.get(id(p), 1.0)) for n, p in trainable}
    return [
        {
            "params": [p for _, p in trainable if keys[id(p)] == key],
            "weight_decay": weight_decay if key[0] else 0.0,
            "lr": lr * key[1],
        }
        for key in dict.fromkeys(keys.values())
    ]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``adamw`` or ``sgd`` (momentum 0.9) over :func:`param_groups`, with PyTorch's fused update (on CPUs as
    on GPUs): one pass over each parameter instead of about ten small operations, which is most of the
    optimizer's time for an adaptor's many small tensors and for full fine-tuning's many large ones."""
    groups = param_groups(model, lr, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, fused=True)
    raise ValueError(f"optimizer {name!r} is not one of {OPTIMIZERS}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then ``cosine`` decay to ``min_lr_ratio`` of the peak
    at ``total_steps``, or ``constant``. Stepped once per optimizer step."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not one of {SCHEDULERS}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
