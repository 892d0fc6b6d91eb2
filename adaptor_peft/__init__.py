"""adaptor_peft: parameter-efficient transfer of pretrained vision state-space models (Vim, VMamba)."""

from .models import CheckpointError, create_model, list_models, load_checkpoint, read_state_dict
from .ops import selective_scan, selective_scan_fn

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "create_model",
    "list_models",
    "load_checkpoint",
    "read_state_dict",
    "selective_scan",
    "selective_scan_fn",
]
