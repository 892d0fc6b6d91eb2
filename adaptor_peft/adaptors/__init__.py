"""The transfer methods: Adaptor-T, Adaptor-S, their injection, the baselines, and adapter files."""

from ..models.protocol import find_mixers
from .backbones import vim_nano_patch4_32_adaptor
from .config import AdaptorConfig
from .files import AdapterFileError, load_adaptor, merge_adaptor, save_adaptor, unload_adaptor
from .inject import inject_adaptor
from .methods import METHODS, MethodOptionError, ParallelAdapter, is_peft_parameter, prepare_model
from .spatial import AdaptorS
from .temporal import AdaptorT

__all__ = [
    "METHODS",
    "AdapterFileError",
    "AdaptorConfig",
    "AdaptorS",
    "AdaptorT",
    "MethodOptionError",
    "ParallelAdapter",
    "find_mixers",
    "inject_adaptor",
    "is_peft_parameter",
    "load_adaptor",
    "merge_adaptor",
    "prepare_model",
    "save_adaptor",
    "unload_adaptor",
    "vim_nano_patch4_32_adaptor",
]
