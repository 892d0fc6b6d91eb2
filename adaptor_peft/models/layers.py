"""Pieces both backbones share: RMSNorm, a permute module, Mamba's parameter initialisation, activation
recomputation, and the helpers of timm's model contract (activation checkpointing, pooling choice)."""

from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops import selective_scan
from ..ops.records import full_precision


def ssm(
    adaptor_t: nn.Module | None,
    *args,
    direction: int | None = None,
    projected: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """The selective scan of a mixer, run through its Adaptor-T when one is injected.

    Extension points of every mixer and block (all None until ``inject_adaptor`` / ``prepare_model``
    sets them, so official state dicts still load): ``mixer.adaptor_t`` (a module whose
    ``scan(*args, direction=..., **kwargs)`` replaces :func:`selective_scan`, given ``projected`` where
    :func:`project_scan_input` made one), ``mixer.adaptor_s`` (a module on (B, H, W, C) maps, with
    ``position`` "inner" or "output") and ``block.parallel_adapter`` (a module whose output is added to the
    mixer's).
    """
    if adaptor_t is None:
        return selective_scan(*args, **kwargs).out
    if projected is not None:
        kwargs["projected"] = projected
    return adaptor_t.scan(*args, direction=direction, **kwargs)


def project_scan_input(
    adaptor_t: nn.Module | None, x_proj: nn.Module, u: torch.Tensor, direction: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x_proj`` on the rows of the scan input ``u`` (B, E, L), and what the Adaptor-T's ``project`` makes
    of the two for :func:`ssm`'s ``projected`` (else None): the predictor's input, taken in the same matrix
    product, so that the scan input is read once (for a plain Linear without bias: ``project`` reads only the
    weight)."""
    rows = u.transpose(1, 2)
    project = getattr(adaptor_t, "project", None)
    if project is None or type(x_proj) is not nn.Linear or x_proj.bias is not None:
        return x_proj(rows), None
    return project(x_proj.weight, rows, direction)


def checkpointed(module: nn.Module, *args, enabled: bool) -> torch.Tensor:
    """``module(*args)``; when ``enabled`` and gradients are on, its activations are not kept for the
    backward pass but recomputed there (``torch.utils.checkpoint``, same RNG draws, so same gradients)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class Recipe:
    """How to rebuild one activation: run at most once, its value kept while the graph needs it."""

    def __init__(self, rebuild: Callable[[], torch.Tensor], like: torch.Tensor):
        self.rebuild, self.value = rebuild, None
        self.device_type, self.dtype, self.shape, self.stride = like.device.type, like.dtype, like.shape, like.stride()
        self.autocast = (torch.is_autocast_enabled(self.device_type), torch.get_autocast_dtype(self.device_type))

    def __call__(self) -> torch.Tensor:
        if self.value is None:
            enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(self.device_type, dtype, enabled=enabled):
                value = self.rebuild()
            if value.shape != self.shape or value.stride() != self.stride or value.dtype != self.dtype:
                raise RuntimeError(
                    f"Recompute: a recipe rebuilt shape {tuple(value.shape)}, strides {value.stride()}, {value.dtype}; "
                    f"the forward had {tuple(self.shape)}, {self.stride}, {self.dtype}"
                )
            self.value = value
        return self.value


def _outer_saved_tensors_hooks() -> bool:
    """Whether saved-tensor hooks are already in force (activation checkpointing, offloading), as
    ``torch.utils.checkpoint`` itself asks."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


_KEEPING: contextvars.ContextVar[bool] = contextvars.ContextVar("adaptor_peft_keep_activations", default=False)


@contextlib.contextmanager
def keep_activations() -> Iterator[None]:
    """A context in which forward passes keep every activation for the backward pass: Vim's blocks then
    rebuild nothing (:class:`Recompute` stands aside), a training step is a few percent faster on a CPU
    and holds about twice the tensor memory (``benchmarks/overhead.py`` measures both)."""
    token = _KEEPING.set(True)
    try:
        yield
    finally:
        _KEEPING.reset(token)


class Recompute:
    """Activations rebuilt in the backward pass instead of kept: inside ``with Recompute() as recompute:``,
    a tensor saved for backward that lies in the memory of a tensor given to :meth:`add` is kept as its
    :class:`Recipe` (run under the forward's autocast, without gradients) and rebuilt when the backward
    first needs it. Meant for activations that are cheap to rebuild from tensors the graph keeps anyway,
    as mamba-ssm's fused Mamba block recomputes its conv and Δ. A recipe must give the forward's values
    and layout (nothing random), and must not hold the activations it replaces.

    Without gradients, under :func:`keep_activations`, or inside other saved-tensor hooks (activation
    checkpointing, which already recomputes everything, or offloading), it does nothing."""

    def __init__(self) -> None:
        self._recipes: dict[int, tuple[weakref.ref, Recipe]] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def add(self, tensor: torch.Tensor, rebuild: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Registers ``tensor``, which must own its memory whole (a fresh result, not a view), to be
        rebuilt by ``rebuild``; returns what later recipes call to get it back."""
        if self._hooks is None:
            return lambda: tensor
        if tensor.storage_offset() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            raise ValueError("Recompute.add: the tensor must own its memory whole, not be a view into a larger one")
        recipe = Recipe(rebuild, tensor)
        self._recipes[tensor.untyped_storage().data_ptr()] = (weakref.ref(tensor), recipe)
        return recipe

    def _pack(self, t: torch.Tensor) -> torch.Tensor | tuple:
        """``t``'s recipe if ``t`` lies in a registered tensor's memory while that tensor lives (once it is
        freed, another tensor may come to lie at its address)."""
        ref, recipe = self._recipes.get(t.untyped_storage().data_ptr(), (None, None)) if t.numel() else (None, None)
        owner = ref() if ref is not None else None
        if owner is None or owner.dtype != t.dtype or owner.untyped_storage().nbytes() != t.untyped_storage().nbytes():
            return t
        return recipe, t.shape, t.stride(), t.storage_offset()

    @staticmethod
    def _unpack(packed: torch.Tensor | tuple) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        recipe, shape, stride, offset = packed
        return recipe().as_strided(shape, stride, offset)

    def __enter__(self) -> Recompute:
        if torch.is_grad_enabled() and not _KEEPING.get() and not _outer_saved_tensors_hooks():
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        """From here on, only the saved tensors hold their recipes (and what those capture)."""
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
        self._hooks = None
        self._recipes.clear()


def pool_choice(global_pool: str, allowed: Sequence[str], model: str) -> str:
    """``global_pool`` if ``model`` supports it, else a ValueError naming the choices."""
    if global_pool not in allowed:
        raise ValueError(f"{model}: global_pool {global_pool!r} is not supported; expected one of {tuple(allowed)}")
    return global_pool


class DeltaProjection(nn.Linear):
    """The Δ projection ``dt_proj``: a Linear whose forward leaves its bias out. The bias is the scan's
    ``delta_bias``, added in float32 inside the scan as the official kernel does, so that under autocast
    it is not rounded to half precision (in bfloat16 a bias near -6.9, Δ = 0.001, rounds to 1/32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a weight and no bias, computed in (at least) float32 and returned in the
    weight's dtype, the model's: as mamba-ssm's fused kernel, which returns the blocks' dtype from a
    float32 residual."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = full_precision(x)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * full_precision(self.weight)
        return normed.to(self.weight.dtype)


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module, so that it can sit in an ``nn.Sequential`` with official indices."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def drop_path_rates(rate: float, count: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to ``rate`` over ``count`` blocks."""
    return [rate * i / max(count - 1, 1) for i in range(count)]


def init_dt_(
    weight: torch.Tensor,
    bias: torch.Tensor,
    dt_min: float = 1e-3,
    dt_max: float = 0.1,
    dt_init_floor: float = 1e-4,
) -> None:
    """Mamba's Δ projection init: weight uniform in ±rank^-0.5, bias the inverse softplus of a step
    drawn log-uniformly from [dt_min, dt_max]. ``weight`` (..., dim, rank), ``bias`` (..., dim)."""
    with torch.no_grad():
        bound = weight.shape[-1] ** -0.5
        weight.uniform_(-bound, bound)
        dt = torch.exp(torch.rand_like(bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def s4d_real_a_log(dim: int, d_state: int) -> torch.Tensor:
    """``log(A)`` with ``A[d, n] = n + 1`` (S4D-real), the init of every Mamba ``A_log``."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(dim, 1).contiguous()
