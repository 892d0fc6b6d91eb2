"""What a backbone tells the transfer methods about itself: the one protocol a new backbone implements.

The methods (``adaptor_peft.adaptors``) never look for a model class. They look for two base classes:

- :class:`SSMMixer`, a token mixer built on a selective scan. It owns two adaptor slots, ``adaptor_t``
  (called inside its scan through :func:`adaptor_peft.models.layers.ssm`) and ``adaptor_s`` (called on
  its tokens laid out as a 2D map, by the mixer itself, since only it knows where its class tokens and
  windows are). It declares its scan's shape, its SSM's own parameters (what ``partial`` tunes and what
  weight decay must leave alone) and whether Adaptor-S can reach the logits from it.
- :class:`AdaptableBlock`, a residual block whose mixer a parallel adapter can sit beside. It owns the
  ``parallel_adapter`` slot and declares the width of the tokens its mixer reads; parameter reports
  count trainable parameters per such block.

A backbone with other token mixers (attention, convolution) simply has fewer of these; the methods adapt
what is there.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn


def _matches(name: str, names: tuple[str, ...]) -> bool:
    """Is ``name`` (a parameter's name relative to its module) one of ``names``, or inside a submodule one
    of them names? A wrapper's ``base_layer`` (LoRA's) is looked through."""
    name = name.replace(".base_layer.", ".")
    return any(name == entry or name.startswith(f"{entry}.") for entry in names)


class SSMMixer(nn.Module):
    """Base of every selective-scan mixer: the place where Adaptor-T and Adaptor-S go."""

    ssm_parameters: ClassVar[tuple[str, ...]] = ()
    """The SSM's own parameters, by name relative to the mixer (a submodule's name covers its parameters):
    A, D, the convolution, the Δ bias. What MambaPEFT's ``partial`` tuning trains."""
    ssm_biases: ClassVar[tuple[str, ...]] = ()
    """Parameters that are biases although their name does not end in ``bias`` (``bias`` tuning trains them)."""
    no_decay: ClassVar[tuple[str, ...]] = ()
    """Parameters that weight decay must not pull to zero (``A_log``: zero changes the SSM's decay)."""

    def __init__(self) -> None:
        super().__init__()
        self.adaptor_t: nn.Module | None = None
        self.adaptor_s: nn.Module | None = None
        self.takes_adaptor_s = True
        """False where Adaptor-S could not change the logits (a Vim's last block: the head reads the class
        token, which has no place on the 2D map); the model sets it."""

    def scan_shape(self) -> tuple[int, int]:
        """(channels per scan direction, scan directions): the shape Adaptor-T is built for."""
        raise NotImplementedError(f"{type(self).__name__} must say its scan's shape")

    def spatial_width(self, position: str) -> int:
        """Channels of the tokens Adaptor-S works on at ``position`` ("output": the mixer's output,
        "inner": the scan's output before ``out_proj``)."""
        raise NotImplementedError(f"{type(self).__name__} must say its tokens' width")


class AdaptableBlock(nn.Module):
    """Base of every residual block with a token mixer that a parallel adapter can sit beside."""

    def __init__(self) -> None:
        super().__init__()
        self.parallel_adapter: nn.Module | None = None

    @property
    def width(self) -> int:
        """Channels of the tokens the block's mixer reads (and the parallel adapter too)."""
        raise NotImplementedError(f"{type(self).__name__} must say its width")


def find_mixers(model: nn.Module) -> list[tuple[str, SSMMixer]]:
    """Every selective-scan mixer in ``model``, in order, with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SSMMixer)]


def find_blocks(model: nn.Module) -> list[tuple[str, AdaptableBlock]]:
    """Every adaptable block in ``model``, in order, with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptableBlock)]


DECLARATIONS = ("ssm_parameters", "ssm_biases", "no_decay")


def declared(model: nn.Module, declaration: str) -> set[str]:
    """Qualified names of ``model``'s parameters that their mixers declare in ``declaration`` (one of
    :data:`DECLARATIONS`), as they are named now (LoRA's ``base_layer`` included)."""
    if declaration not in DECLARATIONS:
        raise ValueError(f"declared: {declaration!r} is not one of {DECLARATIONS}")
    return {
        f"{prefix}.{name}"
        for prefix, mixer in find_mixers(model)
        for name, _ in mixer.named_parameters()
        if _matches(name, getattr(mixer, declaration))
    }
