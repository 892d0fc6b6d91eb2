"""Adapter files: only what was trained, plus what it takes to put it back on the right backbone.

``save_adaptor(model, dir)`` writes ``adaptor.safetensors`` (the trainable parameters and the adaptors'
buffers) and ``adaptor_config.json`` (method, options, base model, and a fingerprint of the frozen
backbone weights), each to a temporary file first and then renamed, so an interrupted save never
leaves a half-written adapter behind. ``load_adaptor(model, dir)`` checks the fingerprint on a fresh
backbone, applies the same method and loads the weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from ..atomic import write_atomically
from ..models import classifier_name
from .inject import ADAPTOR_MARKERS, find_mixers
from .methods import BLOCK_TYPES, LORA_OPTIONS, is_peft_parameter, prepare_model

WEIGHTS, CONFIG = "adaptor.safetensors", "adaptor_config.json"
FORMAT = "adaptor_peft.adapter/1"


class AdapterFileError(ValueError):
    """An adapter directory that is missing, corrupt, or made for another backbone."""


def _canonical(name: str) -> str:
    """A backbone parameter's name without peft's ``base_layer`` wrapping."""
    return name.replace(".base_layer.", ".")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: every trainable parameter and the adaptors' buffers."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b for n, b in model.named_buffers() if any(m in f".{n}" for m in ADAPTOR_MARKERS)})
    return state


def adapter_bytes(model: nn.Module) -> bytes:
    """The exact contents of the adapter's ``adaptor.safetensors``."""
    state = {n: t.detach().cpu().contiguous() for n, t in adapter_state(model).items()}
    return save(state, metadata={"format": FORMAT})


def backbone_fingerprint(model: nn.Module, exclude: set[str] = frozenset()) -> str:
    """SHA-256 over the names, shapes and bytes of the backbone's parameters, leaving out the head,
    anything a transfer method added, and the ``exclude`` names (those an adapter file carries)."""
    head = classifier_name(model)
    digest = hashlib.sha256()
    named = sorted((_canonical(n), p) for n, p in model.named_parameters() if not is_peft_parameter(n))
    for name, p in named:
        if name in exclude or (head is not None and name.startswith(head + ".")):
            continue
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_adaptor(model: nn.Module, directory: str | Path) -> Path:
    """Writes the adapter of a model prepared with :func:`prepare_model` (or :func:`inject_adaptor`)."""
    method = getattr(model, "peft_method", None)
    if method is None and getattr(model, "adaptor_config", None) is not None:
        config = model.adaptor_config  # the method that rebuilds it: "adaptor" would add both adaptors
        name = "adaptor" if config.temporal and config.spatial else "adaptor_t" if config.temporal else "adaptor_s"
        method = {"method": name, "options": {"config": config.to_dict()}}
    if method is None:
        raise AdapterFileError("save_adaptor: the model has no transfer method; call prepare_model or inject_adaptor")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model)
    config = {
        "format": FORMAT,
        **method,
        "base_model": getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__),
        "backbone_fingerprint": backbone_fingerprint(model, {_canonical(n) for n in state}),
        "num_classes": getattr(model, "num_classes", None),
        "tensors": len(state),
        "parameters": sum(t.numel() for t in state.values()),
    }
    weights, text = adapter_bytes(model), json.dumps(config, indent=2) + "\n"  # both before either file is replaced
    write_atomically(directory / WEIGHTS, weights)
    write_atomically(directory / CONFIG, text)
    return directory


def read_adaptor_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterFileError(f"no adapter at {directory}: {path.name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"adapter config {path} is corrupt: {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is not an adaptor_peft adapter config (format {FORMAT})")
    return config


def load_adaptor(model: nn.Module, directory: str | Path) -> nn.Module:
    """Puts the adapter in ``directory`` on ``model``, a fresh backbone (as created for training, with the
    same pretrained weights), and returns it. Refuses an adapter made for other backbone weights."""
    directory = Path(directory)
    config = read_adaptor_config(directory)
    try:
        state = load_file(str(directory / WEIGHTS))
    except FileNotFoundError:
        raise AdapterFileError(f"no adapter weights at {directory / WEIGHTS}") from None
    except Exception as err:
        raise AdapterFileError(f"adapter weights {directory / WEIGHTS} are corrupt: {err}") from err
    fingerprint = backbone_fingerprint(model, {_canonical(n) for n in state})
    if fingerprint != config["backbone_fingerprint"]:
        base = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise AdapterFileError(
            f"adapter {directory} was trained on other backbone weights: {config['base_model']} with fingerprint "
            f"{config['backbone_fingerprint'][:12]}, this model is {base} with {fingerprint[:12]}"
        )
    head = classifier_name(model)
    saved_classes = state.get(f"{head}.weight")
    if saved_classes is not None and saved_classes.shape[0] != getattr(model, "num_classes", None):
        model.reset_classifier(saved_classes.shape[0])
    prepare_model(model, config["method"], **config["options"])
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{n}: file {tuple(t.shape)} vs model {tuple(own[n].shape)}" for n, t in state.items()
                  if n in own and own[n].shape != t.shape]  # fmt: skip
    missing = sorted(n for n in adapter_state(model) if n not in state)
    if unexpected or mismatched or missing:
        raise AdapterFileError(
            f"adapter {directory} does not fit the prepared model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, mismatched {mismatched[:5]}"
        )
    model.load_state_dict(state, strict=False)
    return model


def _remove_lora(model: nn.Module, merge: bool) -> None:
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            if merge:
                module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())


def merge_adaptor(model: nn.Module) -> nn.Module:
    """Folds LoRA into the weights it wraps and removes its wrappers. Adaptor-T, Adaptor-S and parallel
    adapters act on activations (locations, 2D neighbourhoods) and stay as modules."""
    _remove_lora(model, merge=True)
    method = getattr(model, "peft_method", None)
    if method is not None and method["method"] in ("lora", "adaptor+lora"):
        # The merged weights are now the backbone: what is left to save is the rest of the method, and its
        # adapter file belongs to the merged backbone (whose fingerprint it records).
        rest = {k: v for k, v in method["options"].items() if k not in LORA_OPTIONS}
        model.peft_method = {"method": "linear_probe" if method["method"] == "lora" else "adaptor", "options": rest}
    return model


def unload_adaptor(model: nn.Module) -> nn.Module:
    """Removes every transfer module (adaptors, parallel adapters, unmerged LoRA): the plain backbone."""
    for _, mixer in find_mixers(model):
        mixer.adaptor_t = mixer.adaptor_s = None
    for block in model.modules():
        if isinstance(block, BLOCK_TYPES):
            block.parallel_adapter = None
    _remove_lora(model, merge=False)
    for attribute in ("peft_method", "adaptor_config"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model
