"""Backbones with the adaptors built in: the Mamba-Adaptor paper's "backbone" use, where a model is
pretrained with Adaptor-T and Adaptor-S in every block and they stay part of its architecture.

Their adaptors are backbone parameters like any other. The transfer methods that add adaptors refuse such
a model (it has them already); the others (``linear_probe``, ``lora``, ``full``, ...) tune or freeze the
built-in adaptors with the rest of the backbone, at the backbone's learning rate, and adapter files
fingerprint them as backbone weights.
"""

from __future__ import annotations

from timm.models import generate_default_cfgs
from torch import nn

from ..models import load_checkpoint
from ..models.registry import register
from ..models.vim import build_nano, embedded_cfg
from .config import AdaptorConfig
from .inject import add_adaptors

BUILTIN_ADAPTORS = AdaptorConfig(
    t_locations=2,
    t_groups=4,
    t_rank=4,
    t_anchor="learned",
    s_kernel_size=3,
    s_dilations=(1, 2, 3),
    s_share_kernel=True,
    s_position="output",
    dropout=0.0,
    lr_scale=1.0,
)
"""The adaptors of the built-in backbones, every field spelled out so that a change of AdaptorConfig's
defaults cannot change the architecture; ``lr_scale`` 1 since they are pretrained, not zero."""

default_cfgs = generate_default_cfgs({"vim_nano_patch4_32_adaptor": embedded_cfg("vim_nano_patch4_32_adaptor")})


def with_builtin_adaptors(model: nn.Module, config: AdaptorConfig = BUILTIN_ADAPTORS) -> nn.Module:
    """Builds ``config``'s adaptors into ``model`` as backbone parameters, all trainable, and returns it."""
    add_adaptors(model, config)
    model.builtin_adaptors = config
    return model


@register
def vim_nano_patch4_32_adaptor(pretrained: bool = False, **kwargs) -> nn.Module:
    """``vim_nano_patch4_32`` with Adaptor-T and Adaptor-S in every block, pretrained with them from random
    weights on the same data and budget as the embedded default (``examples/pretrain_tiny.py --adaptor``;
    model card in ``adaptor_peft/models/weights/vim_nano_patch4_32_adaptor.md``): 80.0 % held-out top-1
    against the default's 60.8 %. Its transfer is within noise of a plain backbone pretrained as long
    (three seeds, ``benchmarks/results/backbone_usage.md``)."""
    if kwargs.get("features_only"):
        raise TypeError("vim_nano_patch4_32_adaptor: features_only is not supported; use forward_intermediates")
    model = build_nano("vim_nano_patch4_32_adaptor", **kwargs)
    with_builtin_adaptors(model)
    if pretrained:
        load_checkpoint(model, model.pretrained_cfg["file"])
    return model
