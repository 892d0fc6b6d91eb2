"""An adapter's contents and its backbone's identity: what is saved, its exact bytes, and fingerprints.

Read by adapter files (:mod:`adaptor_peft.adaptors.files`) and by parameter reports (the adapter's size),
so it sits below both. The fingerprints' rules are in the files module's docstring.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import save
from torch import nn

from ..models import classifier_name
from .methods import is_peft_parameter

FORMAT = "adaptor_peft.adapter/3"
"""The adapter file format this version writes."""
PRECISIONS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
"""Finest first; a cast from float64 or float32 rounds to every later one, bfloat16 and float16 to none."""


def canonical(name: str) -> str:
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
    named = sorted((canonical(n), p) for n, p in model.named_parameters() if not is_peft_parameter(n, model))
    named = [(n, p) for n, p in named if n not in exclude and not (head is not None and n.startswith(head + "."))]
    common = set(PRECISIONS).intersection(*(_roundings(p.dtype) for _, p in named))
    digests = {dtype: hashlib.sha256() for dtype in PRECISIONS if dtype in common}
    for name, p in named:
        for dtype, digest in digests.items():
            digest.update(f"{name}:{tuple(p.shape)}:{dtype}".encode())  # as format 1 hashed its own dtype
            digest.update(p.detach().to("cpu", dtype).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {str(dtype).removeprefix("torch."): digest.hexdigest() for dtype, digest in digests.items()}
