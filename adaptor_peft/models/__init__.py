"""Backbones (Vim, VMamba, MambaVision) with the official state-dict layouts, and checkpoint loading."""

from . import mambavision, vim, vmamba
from .checkpoint import CheckpointError, classifier_name, load_checkpoint, read_state_dict
from .layers import keep_activations
from .protocol import AdaptableBlock, SSMMixer, find_blocks, find_mixers
from .registry import create_model, list_models, resolve_checkpoint
from .vim import VisionMamba
from .vmamba import VSSM

__all__ = [
    "VSSM",
    "AdaptableBlock",
    "CheckpointError",
    "SSMMixer",
    "VisionMamba",
    "classifier_name",
    "create_model",
    "find_blocks",
    "find_mixers",
    "keep_activations",
    "list_models",
    "load_checkpoint",
    "mambavision",
    "read_state_dict",
    "resolve_checkpoint",
    "vim",
    "vmamba",
]
