"""Adapter files: only what was trained, plus what it takes to put it back on the right backbone.

``write_adaptor(model, dir)`` (what :func:`adaptor_peft.save_adaptor` calls) writes
``adaptor.safetensors`` (the trainable parameters and the adaptors' buffers) and ``adaptor_config.json``
(method, options, base model, and fingerprints of the frozen backbone weights), each to a temporary file
first and then renamed, so an interrupted save never leaves a half-written adapter behind
(:mod:`adaptor_peft.hub` also uploads both to the Hugging Face hub with a model card).
``load_adaptor(model, source)`` reads a local folder or, where no such folder exists, a hub repo; checks
the fingerprint; applies the method unless the model already carries the same one; and loads the weights.

The fingerprint identifies the backbone's values, not the precision they are held in. It is a SHA-256
over the parameters' names, shapes and values cast to one dtype, recorded for the model's own dtype and
every one a cast from it rounds to (float32: float32, bfloat16 and float16), and a load compares at the
finest dtype both sides have. So an adapter saved on a float32 backbone loads onto that backbone cast to
bfloat16 or float16 (the weights rounded as ``model.to(dtype)`` rounds them), and one saved on a
bfloat16 copy loads onto the float32 original. "The same backbone" thus means the same weights up to the
rounding of the coarser side; weights that differ beyond it are refused. A bfloat16 copy and a float16
copy of one backbone cannot be matched: no exact hash survives both roundings (a value just below a
bfloat16 rounding boundary rounds to it in float16), so that pair is refused with a message saying so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..atomic import write_atomically
from ..models import classifier_name
from .methods import from_record, prepare_model
from .state import FORMAT, adapter_bytes, adapter_state, backbone_fingerprints, canonical

WEIGHTS, CONFIG = "adaptor.safetensors", "adaptor_config.json"
LEGACY_FORMAT = "adaptor_peft.adapter/1"  # one fingerprint, taken at the dtype the adapter was saved in
PER_POSITION_FORMATS = (LEGACY_FORMAT, "adaptor_peft.adapter/2")
"""Formats written by adaptor_peft 0.1, whose Adaptor-T read per-position locations: its weights mean
something else in the memory Adaptor-T of 0.2, so such an adapter with Adaptor-T is refused (other methods
load as before)."""
REPO_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")


class AdapterFileError(ValueError):
    """An adapter directory or hub repo that is missing, corrupt, or made for another backbone."""


def _refuse_sharded(model: nn.Module, action: str) -> None:
    """Adapter files and fingerprints need whole parameters: a model sharded by FSDP (DTensors of
    ``fully_shard``; FSDP1's wrapper, whose flat parameters and, with ``use_orig_params=True``, views into
    them are shards) is refused rather than read shard by shard."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    sharded = [n for n, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)]
    sharded += [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise AdapterFileError(
            f"{action}: {sharded[0] or 'the model'} is sharded by FSDP; adapter files need whole parameters: use "
            "the model before sharding, with the gathered weights (FSDP training is not supported; DDP is)"
        )


def base_model(model: nn.Module) -> str:
    """The model's architecture name, as adapter configs record it."""
    return getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)


def _method_of(model: nn.Module) -> dict[str, Any] | None:
    """The record (``{"method", "options"}``) of the transfer method on ``model``; None for a plain model."""
    method = getattr(model, "peft_method", None)
    return None if method is None else method.record()


UNCOMPARED = ("adaptor.extra", "adaptor.lr_scale", "lora.lr_scale", "parallel_adapter.lr_scale")
"""Settings that leave the modules and their loaded weights as they are: free-form notes and the learning-rate
multiples of zero-initialised parameters (optimizer settings)."""


def _settings(method: dict[str, Any]) -> dict[str, Any]:
    """Everything a method record adds, flat and comparable (:meth:`~adaptor_peft.adaptors.Method.settings`) but for
    :data:`UNCOMPARED`."""
    flat = from_record(method).settings()
    return {key: value for key, value in flat.items() if key not in UNCOMPARED}


def write_adaptor(model: nn.Module, directory: str | Path) -> dict[str, Any]:
    """Writes the adapter of a model prepared with :func:`prepare_model` (or :func:`inject_adaptor`) to
    ``directory`` and returns the config it wrote (:func:`adaptor_peft.save_adaptor` also shares it)."""
    _refuse_sharded(model, "save_adaptor")
    method = _method_of(model)
    if method is None:
        raise AdapterFileError("save_adaptor: the model has no transfer method; call prepare_model or inject_adaptor")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model)
    config = {
        "format": FORMAT,
        **method,
        "base_model": base_model(model),
        "backbone_fingerprints": backbone_fingerprints(model, {canonical(n) for n in state}),
        "num_classes": getattr(model, "num_classes", None),
        "tensors": len(state),
        "parameters": sum(t.numel() for t in state.values()),
    }
    weights, text = adapter_bytes(model), json.dumps(config, indent=2) + "\n"  # both before either file is replaced
    write_atomically(directory / WEIGHTS, weights)
    write_atomically(directory / CONFIG, text)
    return config


def read_adaptor_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterFileError(f"no adapter at {directory}: {path.name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"adapter config {path} is corrupt: {err}") from err
    found = config.get("format") if isinstance(config, dict) else type(config).__name__
    if found not in (FORMAT, *PER_POSITION_FORMATS):
        raise AdapterFileError(f"{path} is not an adaptor_peft adapter config of format {FORMAT} (found {found!r})")
    if found in PER_POSITION_FORMATS and _has_adaptor_t(config):
        raise AdapterFileError(
            f"{path} holds an Adaptor-T of adaptor_peft 0.1 (format {found!r}), which read per-position "
            "locations; this version's Adaptor-T reads a memory of per-sequence locations, and those weights "
            "would compute something else. Load it with adaptor_peft 0.1 (pip install 'adaptor-peft<0.2'), "
            "or retrain it"
        )
    return config


def _has_adaptor_t(config: dict[str, Any]) -> bool:
    """Does the adapter record ``config`` put an Adaptor-T on the model?"""
    try:
        return bool(from_record(config).settings().get("adaptor.temporal"))
    except ValueError:  # a method or options this version does not know: refused later, by name
        return False


def _adapter_folder(source: str | Path) -> Path:
    """The local folder ``source``; if there is none and ``source`` reads as a hub repo id (``user/name``),
    the adapter files of that repo, downloaded once into the hub cache."""
    if Path(source).is_dir() or not REPO_ID.fullmatch(str(source)):
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=[WEIGHTS, CONFIG]))
    except (OSError, ValueError) as err:  # hub errors: not found, offline and not cached, invalid id
        raise AdapterFileError(f"no adapter at {source}: no such folder, nor a readable hub repo ({err})") from err


def _check_backbone(model: nn.Module, directory: Path, config: dict[str, Any], exclude: set[str]) -> None:
    """Refuses an adapter whose backbone fingerprint, at the finest dtype both sides have, is not the model's."""
    ours = backbone_fingerprints(model, exclude)
    saved = config.get("backbone_fingerprints")
    if config["format"] == LEGACY_FORMAT:  # one fingerprint, at its own dtype: one of ours if the weights match
        legacy = config["backbone_fingerprint"]
        saved = {dtype: legacy for dtype, digest in ours.items() if digest == legacy} or {next(iter(ours)): legacy}
    common = [dtype for dtype in ours if dtype in saved]
    if not common:
        raise AdapterFileError(
            f"adapter {directory} was saved on a {next(iter(saved), '?')} backbone and this model is "
            f"{next(iter(ours), '?')}: the two roundings of the weights cannot be compared; load it onto the "
            "float32 backbone or a copy in the adapter's dtype"
        )
    dtype = common[0]
    if ours[dtype] != saved[dtype]:
        raise AdapterFileError(
            f"adapter {directory} was trained on other backbone weights: {config['base_model']} with {dtype} "
            f"fingerprint {saved[dtype][:12]}, this model is {base_model(model)} with {ours[dtype][:12]}"
        )


def load_adaptor(model: nn.Module, source: str | Path) -> nn.Module:
    """Puts the adapter in ``source`` (a local folder, else a hub repo id ``user/name``) on ``model`` and
    returns it. ``model`` is the backbone the adapter was trained on (in any dtype it casts to, see the
    module docstring): a fresh one, which gets the adapter's method, or one that already carries exactly
    that method (as after ``inject_adaptor``), whose weights are then replaced. Refuses an adapter made
    for other backbone weights and a model prepared with another method or other options."""
    _refuse_sharded(model, "load_adaptor")
    directory = _adapter_folder(source)
    config = read_adaptor_config(directory)
    try:
        state = load_file(str(directory / WEIGHTS))
    except FileNotFoundError:
        raise AdapterFileError(f"no adapter weights at {directory / WEIGHTS}") from None
    except Exception as err:
        raise AdapterFileError(f"adapter weights {directory / WEIGHTS} are corrupt: {err}") from err
    _check_backbone(model, directory, config, {canonical(n) for n in state})
    current = _method_of(model)
    if current is not None:
        ours, theirs = _settings(current), _settings(config)
        keys = dict.fromkeys([*theirs, *ours])  # the method first
        differences = [
            f"{k}: model {ours.get(k)!r}, adapter {theirs.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)
        ]
        if differences:
            raise AdapterFileError(
                f"adapter {directory} does not match the transfer method already on the model "
                f"({'; '.join(differences)}); load it onto a fresh backbone"
            )
    if current is None:  # first: a method that does not fit the model leaves it as it was, head included
        method = from_record(config)
        prepare_model(model, method.name, **method.given)
    head = classifier_name(model)
    saved_classes = state.get(f"{head}.weight")
    if saved_classes is not None and saved_classes.shape[0] != getattr(model, "num_classes", None):
        backbone = next(model.parameters())  # a new (trainable) head goes where the backbone is, in its dtype
        model.reset_classifier(saved_classes.shape[0])
        model.get_classifier().to(backbone.device, backbone.dtype)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{n}: file {tuple(t.shape)} vs model {tuple(own[n].shape)}"
        for n, t in state.items()
        if n in own and own[n].shape != t.shape
    ]
    missing = sorted(n for n in adapter_state(model) if n not in state)
    if unexpected or mismatched or missing:
        raise AdapterFileError(
            f"adapter {directory} does not fit the prepared model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, mismatched {mismatched[:5]}"
        )
    model.load_state_dict(state, strict=False)
    return model


def merge_adaptor(model: nn.Module) -> nn.Module:
    """Folds what the method on ``model`` can fold into the weights it wraps (LoRA) and removes its
    wrappers. Adaptor-T, Adaptor-S and parallel adapters act on activations (locations, 2D
    neighbourhoods) and stay as modules. The merged weights are now the backbone: what is left to save is
    the rest of the method, and its adapter file belongs to the merged backbone (whose fingerprint it
    records)."""
    method = getattr(model, "peft_method", None)
    if method is not None:
        model.peft_method = method.merge(model)
    return model


def unload_adaptor(model: nn.Module) -> nn.Module:
    """Removes every module the transfer method on ``model`` added (adaptors, parallel adapters, unmerged
    LoRA): the plain backbone, with any adaptors built into it."""
    method = getattr(model, "peft_method", None)
    if method is not None:
        method.unload(model)
        del model.peft_method
    return model
