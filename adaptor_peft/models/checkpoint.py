"""Reading checkpoint files and loading them into a backbone, with one clear error when they do not fit.

Official training checkpoints are pickles of a dict holding ``model`` (and ``model_ema``, an optimizer
state, an argparse ``Namespace`` or a yacs ``CfgNode``). They are read with ``torch.load(weights_only=
True)``: classes the file names besides tensors become inert dicts, so no code from the file runs and
yacs need not be installed. Only the weights are used.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

STATE_DICT_KEYS = ("model", "state_dict", "module")  # where training checkpoints keep the weights; EMA ignored


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose tensors do not fit the model."""


class _Inert:
    """Stands in for any class a checkpoint names that is not needed to rebuild its tensors."""

    def __new__(cls, *args, **kwargs):
        return OrderedDict()


# Globals that only rebuild plain data (numpy arrays and scalars, argparse namespaces), allowed by exact
# name; any other global a file names becomes an inert dict, so nothing in the file can run code.
_DATA_GLOBALS = {f"numpy.{core}.multiarray.{fn}" for core in ("core", "_core") for fn in ("scalar", "_reconstruct")} | {
    "numpy.ndarray",
    "numpy.dtype",
    "argparse.Namespace",
}


def _rebuilt_as(name: str):
    """What the unpickler may build for a global the file names."""
    dtype_class = name.startswith("numpy.dtypes.") and name.endswith("DType") and name.count(".") == 2
    if name in _DATA_GLOBALS or dtype_class:
        module, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            pass
    return (_Inert, name)


def _allowed_globals(path: Path) -> list:
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    allowed = [_rebuilt_as(name) for name in names]
    if "numpy.dtype" in names:  # a dtype rebuilds as its concrete class, which the file does not name
        import numpy as np

        allowed += [t for t in vars(np.dtypes).values() if isinstance(t, type) and t.__name__.endswith("DType")]
    return allowed


def _torch_load(path: Path):
    try:
        try:
            extra = _allowed_globals(path)
        except (RuntimeError, ValueError):  # not a zip archive: a legacy torch.save file; default allowlist
            extra = []
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {err}\nIf the file is yours and trusted, load it with "
            f"torch.load({str(path)!r}, weights_only=False) and pass the state dict instead."
        ) from err


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The weights in ``path``: a ``.safetensors`` file, a plain state dict, or a training checkpoint
    (its ``key`` entry, by default the first of ``model`` / ``state_dict`` / ``module``; never the EMA)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            obj = load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {err}") from err
    else:
        obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    if key is not None or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = key or next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None or key not in obj:
            raise CheckpointError(f"checkpoint {path} has no weights under {key or STATE_DICT_KEYS}; keys: {list(obj)}")
        obj = obj[key]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path}: entries {bad[:5]} are not tensors")
    if obj and all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {i}" for i in items[:limit]) + more


def classifier_name(model: nn.Module) -> str | None:
    """Qualified name of the model's classification head (timm's ``get_classifier``), if it has one."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return next((name for name, m in model.named_modules() if m is head), None) if head is not None else None


def load_checkpoint(
    model: nn.Module, checkpoint: str | Path | Mapping[str, torch.Tensor], strict: bool = True
) -> nn.Module:
    """Loads ``checkpoint`` (a file or a state dict) into ``model``.

    The model adapts the checkpoint first where it knows how (``adapt_state_dict``: legacy key names,
    position-embedding size). A classifier whose shape differs (another ``num_classes``) is skipped and
    keeps its fresh initialisation. Anything else that does not fit raises one :class:`CheckpointError`
    listing missing, unexpected and mis-shaped keys with both shapes.
    """
    source = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "state dict"
    state = read_state_dict(checkpoint) if isinstance(checkpoint, (str, Path)) else dict(checkpoint)
    if hasattr(model, "adapt_state_dict"):
        state = model.adapt_state_dict(state)
    own = model.state_dict()
    head = classifier_name(model)
    skipped = [  # another num_classes, or none (num_classes=0): the head stays fresh
        k for k, v in state.items() if head and k.startswith(head + ".") and (k not in own or own[k].shape != v.shape)
    ]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched or (strict and (missing or unexpected)):
        parts = [("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)]
        raise CheckpointError(
            f"checkpoint {source} does not fit {type(model).__name__}:\n"
            + "\n".join(_listing(title, items) for title, items in parts if items)
        )
    model.load_state_dict(state, strict=False)
    return model


class Loadable:
    """Gives a backbone timm's ``load_pretrained`` hook (used with ``custom_load``) and a default,
    identity ``adapt_state_dict``."""

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state_dict

    def load_pretrained(self, path: str | Path) -> None:
        load_checkpoint(self, path)
