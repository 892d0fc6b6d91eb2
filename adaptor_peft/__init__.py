"""adaptor_peft: parameter-efficient transfer of pretrained vision state-space models (Vim, VMamba,
MambaVision).

The whole workflow is here at the top level, as in HF ``peft``: ``create_model``, then ``inject_adaptor``
(or ``prepare_model`` for any method; ``Method`` and ``register_method`` add your own),
``parameter_report``, ``param_groups`` for an optimizer of your own, ``save_adaptor`` / ``load_adaptor``,
and ``merge_adaptor`` / ``unload_adaptor``.
"""

from .adaptors import (
    AdapterFileError,
    AdaptorConfig,
    Method,
    MethodOptionError,
    inject_adaptor,
    load_adaptor,
    merge_adaptor,
    prepare_model,
    register_method,
    unload_adaptor,
)
from .hub import save_adaptor
from .models import CheckpointError, create_model, list_models, load_checkpoint, read_state_dict
from .ops import selective_scan, selective_scan_fn
from .reports import parameter_report
from .training.optim import param_groups

__version__ = "0.3.0"

__all__ = [
    "AdapterFileError",
    "AdaptorConfig",
    "CheckpointError",
    "Method",
    "MethodOptionError",
    "create_model",
    "inject_adaptor",
    "list_models",
    "load_adaptor",
    "load_checkpoint",
    "merge_adaptor",
    "param_groups",
    "parameter_report",
    "prepare_model",
    "read_state_dict",
    "register_method",
    "save_adaptor",
    "selective_scan",
    "selective_scan_fn",
    "unload_adaptor",
]
