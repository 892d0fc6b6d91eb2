"""``prepare_model``: every transfer method — the adaptors and the baselines — through one code path.

| method | trains (besides the head) |
|---|---|
| ``linear_probe`` | nothing |
| ``full`` | everything |
| ``bias`` | every bias |
| ``partial`` | the SSM's own parameters: ``A_log`` / ``D`` / conv / Δ bias (MambaPEFT's partial tuning) |
| ``lora`` | HF ``peft`` LoRA on ``targets`` (default ``in_proj``) |
| ``parallel_adapter`` | a bottleneck MLP beside every mixer, zero-initialised output (``rank``, default 32) |
| ``adaptor_t`` / ``adaptor_s`` / ``adaptor`` | Adaptor-T, Adaptor-S, both (options: :class:`AdaptorConfig` fields) |
| ``adaptor+lora`` | both adaptors and LoRA (options of both) |

The method and its options are recorded on the model (``model.peft_method``), which is what
:func:`~adaptor_peft.save_adaptor` writes next to the weights.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..models.vim import VimBlock
from ..models.vmamba import VSSBlock
from .config import AdaptorConfig
from .inject import ADAPTOR_MARKERS, inject_adaptor, is_head, set_trainable

BLOCK_TYPES = (VimBlock, VSSBlock)
PARTIAL = re.compile(
    r"\.(A_log|A_b_log|A_logs|D|D_b|Ds|dt_projs_bias)$|\.(conv1d|conv1d_b|conv2d)\.|\.(dt_proj|dt_proj_b)\.(base_layer\.)?bias$"
)
PEFT_MARKERS = (*ADAPTOR_MARKERS, ".parallel_adapter.", ".lora_")
LORA_DEFAULTS = dict(r=8, alpha=16, dropout=0.0, targets=("in_proj",))


class ParallelAdapter(nn.Module):
    """Bottleneck MLP on the mixer's input whose output is added to the mixer's (zero at init)."""

    def __init__(self, dim: int, rank: int = 32):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


def is_peft_parameter(name: str) -> bool:
    """Was this parameter added by a transfer method (adaptors, LoRA, parallel adapters)?"""
    return any(marker in f".{name}" for marker in PEFT_MARKERS)


def _adaptor_config(options: dict[str, Any], **fixed: Any) -> AdaptorConfig:
    config = options.pop("config", None) or AdaptorConfig()
    if isinstance(config, dict):
        config = AdaptorConfig.from_dict(config)
    fields = {f.name for f in dataclasses.fields(AdaptorConfig)}
    chosen = {k: options.pop(k) for k in list(options) if k in fields}
    for name, value in fixed.items():  # the method sets these; an option may only agree with it
        if name in chosen and chosen[name] != value:
            raise TypeError(f"AdaptorConfig.{name}={chosen[name]!r}: this method sets {name}={value!r}")
    return dataclasses.replace(config, **{**chosen, **fixed})


def _lora(model: nn.Module, options: dict[str, Any]) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    settings = {k: options.pop(k, default) for k, default in LORA_DEFAULTS.items()}
    config = LoraConfig(
        r=settings["r"],
        lora_alpha=settings["alpha"],
        lora_dropout=settings["dropout"],
        target_modules=list(settings["targets"]),
    )
    inject_adapter_in_model(config, model)


def _parallel_adapter(model: nn.Module, options: dict[str, Any]) -> None:
    rank = options.pop("rank", 32)
    blocks = [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]
    if not blocks:
        raise TypeError(f"parallel_adapter: {type(model).__name__} has no Vim or VMamba blocks")
    for block in blocks:
        dim = block.norm.weight.shape[0]
        block.parallel_adapter = ParallelAdapter(dim, rank).to(block.norm.weight.device, block.norm.weight.dtype)


def _adaptors(temporal: bool, spatial: bool, lora: bool = False) -> Callable[[nn.Module, dict[str, Any]], None]:
    def apply(model: nn.Module, options: dict[str, Any]) -> None:
        inject_adaptor(model, _adaptor_config(options, temporal=temporal, spatial=spatial), freeze_backbone=False)
        if lora:
            _lora(model, options)

    return apply


def _nothing(model: nn.Module, options: dict[str, Any]) -> None:
    return None


ADAPTOR_OPTIONS = frozenset({"config", *(f.name for f in dataclasses.fields(AdaptorConfig))})
LORA_OPTIONS = frozenset(LORA_DEFAULTS)
NO_OPTIONS: frozenset[str] = frozenset()

# method -> (what it adds to the model, which backbone parameters it trains besides the added ones,
#            the options it takes)
METHODS: dict[str, tuple[Callable[[nn.Module, dict[str, Any]], None], Callable[[str], bool], frozenset[str]]] = {
    "linear_probe": (_nothing, lambda name: False, NO_OPTIONS),
    "full": (_nothing, lambda name: True, NO_OPTIONS),
    "bias": (_nothing, lambda name: name.endswith((".bias", ".dt_projs_bias")), NO_OPTIONS),  # VMamba's Δ bias too
    "partial": (_nothing, lambda name: PARTIAL.search(name) is not None, NO_OPTIONS),
    "lora": (_lora, lambda name: False, LORA_OPTIONS),
    "parallel_adapter": (_parallel_adapter, lambda name: False, frozenset({"rank"})),
    "adaptor_t": (_adaptors(True, False), lambda name: False, ADAPTOR_OPTIONS),
    "adaptor_s": (_adaptors(False, True), lambda name: False, ADAPTOR_OPTIONS),
    "adaptor": (_adaptors(True, True), lambda name: False, ADAPTOR_OPTIONS),
    "adaptor+lora": (_adaptors(True, True, lora=True), lambda name: False, ADAPTOR_OPTIONS | LORA_OPTIONS),
}


def prepare_model(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Applies transfer ``method`` to ``model`` (see the module docstring) and returns it, with exactly the
    method's parameters and the classification head trainable."""
    if method not in METHODS:
        raise ValueError(f"prepare_model: unknown method {method!r}; choose from {sorted(METHODS)}")
    if getattr(model, "peft_method", None) is not None:
        raise RuntimeError(f"prepare_model: the model was already prepared with {model.peft_method['method']!r}")
    add, trains, accepted = METHODS[method]
    unknown = sorted(set(options) - accepted)
    if unknown:  # checked before the model changes, so that a corrected call can follow on the same model
        raise TypeError(
            f"prepare_model: method {method!r} does not take option(s) {unknown}; it takes {sorted(accepted)}"
        )
    recorded = {k: (v.to_dict() if isinstance(v, AdaptorConfig) else v) for k, v in options.items()}
    add(model, dict(options))
    head = is_head(model)
    set_trainable(model, lambda n: is_peft_parameter(n) or head(n) or trains(n))
    model.peft_method = {"method": method, "options": recorded}
    return model
