"""The transfer methods: Adaptor-T, Adaptor-S, their injection, the baselines, and adapter files
(saving with a hub push is :func:`adaptor_peft.save_adaptor`, above the reports it puts in its card)."""

from ..models.protocol import find_mixers
from . import mambapeft  # registers MambaPEFT's LoRA variants
from .backbones import vim_nano_patch4_32_adaptor
from .config import AdaptorConfig
from .files import AdapterFileError, load_adaptor, merge_adaptor, unload_adaptor, write_adaptor
from .methods import (
    METHODS,
    Method,
    MethodOptionError,
    ParallelAdapter,
    get_method,
    inject_adaptor,
    is_peft_parameter,
    prepare_model,
    register_method,
)
from .spatial import AdaptorS
from .temporal import AdaptorT

__all__ = [
    "METHODS",
    "AdapterFileError",
    "AdaptorConfig",
    "AdaptorS",
    "AdaptorT",
    "Method",
    "MethodOptionError",
    "ParallelAdapter",
    "find_mixers",
    "get_method",
    "inject_adaptor",
    "is_peft_parameter",
    "load_adaptor",
    "mambapeft",
    "merge_adaptor",
    "prepare_model",
    "register_method",
    "unload_adaptor",
    "vim_nano_patch4_32_adaptor",
    "write_adaptor",
]
