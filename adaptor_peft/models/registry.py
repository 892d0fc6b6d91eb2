"""The model registry: every backbone is a timm model too, and ``create_model`` builds and loads one."""

from __future__ import annotations

import hashlib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models import build_model_with_cfg, register_model
from timm.models._registry import model_entrypoint
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint

_MODELS: list[str] = []


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers a model entry point with timm and in :func:`list_models`."""
    _MODELS.append(fn.__name__)
    return register_model(fn)


def build(
    model_cls: type[nn.Module], variant: str, pretrained: bool, feature_cfg: dict | None = None, **kwargs
) -> nn.Module:
    """timm's ``build_model_with_cfg``, with weights (also a user's ``pretrained_cfg_overlay=dict(file=...)``)
    always read by the model's ``load_pretrained``, which understands the official checkpoint formats.
    ``features_only=True`` wraps the model in timm's ``FeatureGetterNet`` (its ``forward_intermediates``),
    by default with ``feature_cfg``'s ``out_indices``."""
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    overlay.setdefault("custom_load", True)
    return build_model_with_cfg(
        model_cls, variant, pretrained, pretrained_cfg_overlay=overlay, feature_cfg=feature_cfg, **kwargs
    )


def resolve_checkpoint(value: str | None, model_name: str) -> str | None:
    """Where the weights named by ``value`` are: a file, an https URL (downloaded once into the torch hub
    cache), ``"pretrained"`` (the weights this package ships for the model, else its official release
    URL), or None (none: train from scratch)."""
    if value is None:
        return None
    if value == "pretrained":  # a file shipped with the package, else the official release URL
        from timm.models import get_pretrained_cfg

        config = get_pretrained_cfg(model_name)
        value = getattr(config, "file", None) or getattr(config, "url", None)
        if not value:
            raise CheckpointError(f"checkpoint=pretrained: {model_name} has no released weights; pass a file")
    if value.startswith("http://"):
        raise CheckpointError(f"checkpoint {value!r}: only https downloads are allowed")
    if value.startswith("https://"):
        name = Path(urlparse(value).path).name or "checkpoint"  # two URLs with one file name get two files
        target = Path(torch.hub.get_dir()) / "checkpoints" / f"{hashlib.sha256(value.encode()).hexdigest()[:12]}-{name}"
        if not target.is_file():  # download_url_to_file writes a temporary file and renames it
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(value, str(target))
        return str(target)
    if not Path(value).expanduser().is_file():
        raise CheckpointError(f"checkpoint {value!r} is not a file (nor an URL, nor 'pretrained')")
    return str(Path(value).expanduser())


def option_types(name: str) -> dict[str, Any]:
    """Keyword -> type of the constructor of the class that model ``name`` builds (as its entry point
    declares it); empty where the entry point does not name the class."""
    built = typing.get_type_hints(model_entrypoint(name)).get("return")
    if not isinstance(built, type) or built is nn.Module:
        return {}
    return {key: hint for key, hint in typing.get_type_hints(built.__init__).items() if key != "return"}


def list_models() -> list[str]:
    """Names of every backbone this package provides."""
    return sorted(_MODELS)


def create_model(
    name: str,
    checkpoint: str | Path | Mapping[str, torch.Tensor] | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    **kwargs,
) -> nn.Module:
    """Builds ``name`` (keyword overrides such as ``depth=2`` change the architecture) and, if given,
    loads ``checkpoint``: a file in any format :func:`~adaptor_peft.models.read_state_dict` reads, a state
    dict, an https URL, or ``"pretrained"`` (see :func:`resolve_checkpoint`). A ``num_classes`` other
    than the checkpoint's leaves the head freshly initialised. With ``features_only=True`` (timm's
    feature extractor) the checkpoint must be a file: timm loads it before wrapping and pruning the model."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    overrides = {k: v for k, v in dict(num_classes=num_classes, img_size=img_size).items() if v is not None}
    if isinstance(checkpoint, str):
        checkpoint = resolve_checkpoint(checkpoint, name)
    if kwargs.get("features_only") and checkpoint is not None:
        if isinstance(checkpoint, Mapping):
            raise TypeError(f"create_model({name!r}, features_only=True): features_only needs the checkpoint as a file")
        overrides.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)))
        checkpoint = None
    model = timm.create_model(name, **{"pretrained": False, **overrides}, **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model
