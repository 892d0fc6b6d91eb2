"""Adapter files: only what was trained, plus what it takes to put it back on the right backbone.

``save_adaptor(model, dir)`` writes ``adaptor.safetensors`` (the trainable parameters and the adaptors'
buffers) and ``adaptor_config.json`` (method, options, base model, and fingerprints of the frozen
backbone weights), each to a temporary file first and then renamed, so an interrupted save never
leaves a half-written adapter behind; ``push_to_hub="user/name"`` also uploads both to the Hugging Face
hub with a model card. ``load_adaptor(model, source)`` reads a local folder or, where no such folder
exists, a hub repo; checks the fingerprint; applies the method unless the model already carries the
same one; and loads the weights.

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

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save
from torch import nn

from ..atomic import write_atomically
from ..models import classifier_name
from .methods import from_record, is_peft_parameter, prepare_model

WEIGHTS, CONFIG, CARD = "adaptor.safetensors", "adaptor_config.json", "README.md"
FORMAT = "adaptor_peft.adapter/3"
LEGACY_FORMAT = "adaptor_peft.adapter/1"  # one fingerprint, taken at the dtype the adapter was saved in
PER_POSITION_FORMATS = (LEGACY_FORMAT, "adaptor_peft.adapter/2")
"""Formats written by adaptor_peft 0.1, whose Adaptor-T read per-position locations: its weights mean
something else in the memory Adaptor-T of 0.2, so such an adapter with Adaptor-T is refused (other methods
load as before)."""
PRECISIONS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
"""Finest first; a cast from float64 or float32 rounds to every later one, bfloat16 and float16 to none."""
REPO_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")
HUB_URL = re.compile(r"https://huggingface\.co/([\w.-]+/[\w.-]+)/")


class AdapterFileError(ValueError):
    """An adapter directory or hub repo that is missing, corrupt, or made for another backbone."""


def _canonical(name: str) -> str:
    """A backbone parameter's name without peft's ``base_layer`` wrapping."""
    return name.replace(".base_layer.", ".")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: every trainable parameter and the adaptors' buffers."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b for n, b in model.named_buffers() if is_peft_parameter(n, model)})
    return state


def adapter_bytes(model: nn.Module) -> bytes:
    """The exact contents of the adapter's ``adaptor.safetensors``."""
    state = {n: t.detach().cpu().contiguous() for n, t in adapter_state(model).items()}
    return save(state, metadata={"format": FORMAT})


def _roundings(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes a fingerprint of ``dtype`` values can be taken at: itself and those a cast rounds it to."""
    return PRECISIONS[PRECISIONS.index(dtype) :] if dtype in PRECISIONS[:2] else (dtype,)


def backbone_fingerprints(model: nn.Module, exclude: set[str] = frozenset()) -> dict[str, str]:
    """SHA-256 per dtype, finest first, over the names, shapes and values cast to that dtype of the
    backbone's parameters, leaving out the head, anything a transfer method added, and the ``exclude``
    names (those an adapter file carries); taken at each dtype that a cast from every parameter's own
    dtype reaches (module docstring)."""
    head = classifier_name(model)
    named = sorted((_canonical(n), p) for n, p in model.named_parameters() if not is_peft_parameter(n, model))
    named = [(n, p) for n, p in named if n not in exclude and not (head is not None and n.startswith(head + "."))]
    common = set(PRECISIONS).intersection(*(_roundings(p.dtype) for _, p in named))
    digests = {dtype: hashlib.sha256() for dtype in PRECISIONS if dtype in common}
    for name, p in named:
        for dtype, digest in digests.items():
            digest.update(f"{name}:{tuple(p.shape)}:{dtype}".encode())  # as format 1 hashed its own dtype
            digest.update(p.detach().to("cpu", dtype).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {str(dtype).removeprefix("torch."): digest.hexdigest() for dtype, digest in digests.items()}


def _refuse_sharded(model: nn.Module, action: str) -> None:
    """Adapter files and fingerprints need whole parameters: a model sharded by FSDP (DTensors, FSDP1's flat
    parameters) is refused rather than read shard by shard."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor) or "_flat_param" in n]
    if sharded:
        raise AdapterFileError(
            f"{action}: {sharded[0]} is sharded by FSDP; adapter files need whole parameters: use the model "
            "before sharding, with the gathered weights (FSDP training is not supported; DDP is)"
        )


def _base_model(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)


def _method_of(model: nn.Module) -> dict[str, Any] | None:
    """The record (``{"method", "options"}``) of the transfer method on ``model``; None for a plain model."""
    method = getattr(model, "peft_method", None)
    return None if method is None else method.record()


UNCOMPARED = ("adaptor.extra", "adaptor.lr_scale", "adaptor.t_init", "adaptor.s_init")
"""AdaptorConfig fields that leave the modules and their loaded weights as they are: free-form notes, an
optimizer setting and the initialisations, which the loaded weights replace."""


def _settings(method: dict[str, Any]) -> dict[str, Any]:
    """Everything a method record adds, flat and comparable (:meth:`~adaptor_peft.adaptors.Method.settings`) but for
    :data:`UNCOMPARED`."""
    flat = from_record(method).settings()
    return {key: value for key, value in flat.items() if key not in UNCOMPARED}


def model_card(model: nn.Module, config: dict[str, Any], repo_id: str) -> str:
    """The hub README of the adapter ``config`` of ``model`` in ``repo_id``: HF model-card front matter
    (library, base model where it is on the hub, tags), how to load it, its fingerprints and the
    parameter report."""
    from ..reports import parameter_report  # reports reads this module: imported when needed

    hub = HUB_URL.match(getattr(model, "pretrained_cfg", {}).get("url") or "")
    front = {
        "library_name": "adaptor-peft",
        **({"base_model": hub.group(1), "base_model_relation": "adapter"} if hub else {}),
        "tags": ["adaptor-peft", "mamba-adaptor", "image-classification", config["method"]],
    }
    fingerprints = "\n".join(f"- {dtype}: `{digest}`" for dtype, digest in config["backbone_fingerprints"].items())
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# {config['method']} adapter for {config['base_model']}\n\n"
        f"An adaptor_peft adapter: method `{config['method']}` with "
        f"options `{json.dumps(config['options'])}`, {config['num_classes']} classes, on the backbone "
        f"`{config['base_model']}`{f' ({hub.group(1)})' if hub else ''}. It holds only the trained weights "
        f"({config['parameters']:,} values).\n\n"
        "```python\nimport adaptor_peft\n\n"
        f'model = adaptor_peft.create_model("{config["base_model"]}", checkpoint=...)  # its backbone\n'
        f'adaptor_peft.load_adaptor(model, "{repo_id}")\n```\n\n'
        "`load_adaptor` refuses other backbone weights: the frozen weights must have these fingerprints "
        f"(SHA-256 per dtype; a copy cast to bfloat16 or float16 matches too):\n\n{fingerprints}\n\n"
        f"## Parameters\n\n{parameter_report(model).to_markdown()}"
    )


def _push(directory: Path, repo_id: str, card: str, method: str) -> None:
    """Uploads the adapter files and ``card`` (as README.md) to the hub model repo ``repo_id`` in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    files = [CommitOperationAdd(name, str(directory / name)) for name in (WEIGHTS, CONFIG)]
    api.create_commit(
        repo_id, [*files, CommitOperationAdd(CARD, card.encode())], commit_message=f"adaptor-peft {method} adapter"
    )


def save_adaptor(model: nn.Module, directory: str | Path, push_to_hub: str | None = None) -> Path:
    """Writes the adapter of a model prepared with :func:`prepare_model` (or :func:`inject_adaptor`) to
    ``directory`` and returns it. ``push_to_hub="user/name"`` then uploads it to that hub model repo
    (created if needed) with a model card as its README.md, replacing the repo's files of those names."""
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
        "base_model": _base_model(model),
        "backbone_fingerprints": backbone_fingerprints(model, {_canonical(n) for n in state}),
        "num_classes": getattr(model, "num_classes", None),
        "tensors": len(state),
        "parameters": sum(t.numel() for t in state.values()),
    }
    weights, text = adapter_bytes(model), json.dumps(config, indent=2) + "\n"  # both before either file is replaced
    write_atomically(directory / WEIGHTS, weights)
    write_atomically(directory / CONFIG, text)
    if push_to_hub is not None:
        _push(directory, push_to_hub, model_card(model, config, push_to_hub), method["method"])
    return directory


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
            f"fingerprint {saved[dtype][:12]}, this model is {_base_model(model)} with {ours[dtype][:12]}"
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
    _check_backbone(model, directory, config, {_canonical(n) for n in state})
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
