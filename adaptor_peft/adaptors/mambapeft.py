"""MambaPEFT's LoRA variants for Mamba mixers (Yoshimura et al., ICLR 2025), each one method class.

- ``lora_x_proj``: LoRA on ``x_proj``, the projection that gives the SSM its Δ, B and C (both of Vim's
  directions). A VMamba keeps its ``x_proj`` as a raw weight, not a module, so it has none to wrap.
- ``lora_p_x``: LoRA_p(X), a low-rank update of only the x half of ``in_proj``'s output (the half that
  feeds the scan), leaving the gate half z as pretrained.

MambaPEFT's hybrid adds methods this package does not have (affix and prefix tuning), so it is not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .methods import LinearProbe, LoRA, LoRAOptions, Method, names_target, register_method, replace_module


@dataclass
class XProjOptions(LoRAOptions):
    targets: list[str] = field(default_factory=lambda: ["x_proj", "x_proj_b"])
    """The SSM input projections, of every direction that has its own."""


@register_method
class LoRAXProj(LoRA):
    """LoRA on ``x_proj`` (MambaPEFT's LoRA(x_proj)); a target some backbone lacks (Vim's second direction's
    ``x_proj_b``) is skipped as long as one matches."""

    name = "lora_x_proj"
    Options = XProjOptions

    def targets(self, model: nn.Module) -> list[str]:
        names = [name for name, _ in model.named_modules()]
        found = [t for t in self.options.targets if any(names_target(n, t) for n in names)]
        return found or self.options.targets  # none found: check names them all


class HalfLoRALinear(nn.Module):
    """``base(x)`` with a low-rank update ``alpha / r * B A x`` on its first ``width`` outputs only (B zero
    at init). Parameters are named as peft's (``base_layer``, ``lora_A``, ``lora_B``), so fingerprints and
    reports read them as they read LoRA's."""

    def __init__(self, base: nn.Linear, width: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer, self.width, self.scaling = base, width, alpha / r
        dtype = torch.promote_types(base.weight.dtype, torch.float32)  # float32 in a half-precision backbone
        self.lora_A = nn.Linear(base.in_features, r, bias=False).to(base.weight.device, dtype)
        self.lora_B = nn.Linear(r, width, bias=False).to(base.weight.device, dtype)
        self.dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling
        return torch.cat([out[..., : self.width] + update.to(out.dtype), out[..., self.width :]], dim=-1)

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its first ``width`` rows."""
        with torch.no_grad():
            delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
            self.base_layer.weight[: self.width] += delta.to(self.base_layer.weight.dtype)
        return self.base_layer


@register_method
class LoRAPartialX(LoRA):
    """LoRA_p(X): LoRA on the x half of ``in_proj`` (each target's output is [x; z], x first). The options,
    report group and ``lr_scale`` of B are LoRA's; the wrapping is its own."""

    name = "lora_p_x"

    def _targets(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        return [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(names_target(name, t) for t in self.options.targets)
        ]

    def check(self, model: nn.Module) -> None:
        targets = self._targets(model)
        if not targets:
            raise ValueError(f"LoRA_p(X) targets {self.options.targets} match no Linear of the model")
        odd = [name for name, m in targets if m.out_features % 2]
        if odd:
            raise ValueError(f"LoRA_p(X): {odd[0]} has an odd output width, not an [x; z] projection")

    def apply(self, model: nn.Module) -> None:
        o = self.options
        for name, linear in self._targets(model):
            replace_module(model, name, HalfLoRALinear(linear, linear.out_features // 2, o.r, o.alpha, o.dropout))

    def _replace(self, model: nn.Module, merge: bool) -> None:
        for name, module in list(model.named_modules()):
            if isinstance(module, HalfLoRALinear):
                replace_module(model, name, module.merged() if merge else module.base_layer)

    def merge(self, model: nn.Module) -> Method:
        self._replace(model, merge=True)
        return LinearProbe()

    def unload(self, model: nn.Module) -> None:
        self._replace(model, merge=False)
