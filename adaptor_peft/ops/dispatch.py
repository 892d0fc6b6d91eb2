"""The selective scan entry point, and the one place that chooses how it runs.

``selective_scan_fn`` has mamba-ssm's signature and semantics. ``selective_scan`` is the full interface:
it can also return the hidden states, or *snapshots*: the states at a few chosen positions, whose
gradients flow back into the recurrence. A snapshot costs one state copy, so a scan with a few costs what
a plain one does. Adaptor-T's memory read (:class:`~adaptor_peft.ops.records.MemoryRead`) is one argument
more: the compiled CPU scan reads the memory inside, while each lane block's output is still in cache;
every other backend hands back snapshots that :mod:`adaptor_peft.ops.memory_read` reads by matrix
products.

Backends (argument ``backend=`` or environment variable ``ADAPTOR_PEFT_SCAN_BACKEND``):

- ``mamba_ssm``: mamba-ssm's CUDA kernel; CUDA tensors only, no snapshots or hidden states.
- ``triton``: the Triton kernels (:mod:`adaptor_peft.ops.scan_triton`); CUDA tensors, or CPU tensors
  under Triton's interpreter (``TRITON_INTERPRET=1``, for tests and debugging).
- ``native``: the compiled CPU kernel (:mod:`adaptor_peft.ops.native`), float32 / float64.
- ``torch``: plain PyTorch (:mod:`adaptor_peft.ops.scan_torch`), any device.
- ``auto`` (default): on CUDA, ``mamba_ssm`` for plain scans when its kernel runs (a tiny call on first
  use per device: since mamba-ssm 2.3 a plain install imports but has no kernel), else ``triton`` where
  Triton imports, else ``torch``; on CPU, ``native`` where it builds, else ``torch``.

Every backend takes and gives the records of :mod:`adaptor_peft.ops.records`. Snapshot positions are
range-checked before every backend but ``triton``, whose kernels clamp them into the sequence instead:
on a GPU the check would stall it (it reads the positions back to the host).
``ADAPTOR_PEFT_CHECK_POSITIONS=1`` checks them before ``triton`` too.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import warnings
from collections.abc import Callable
from functools import cache
from types import ModuleType

import torch

from . import native, scan_torch
from .memory_read import add_read
from .records import TENSOR_FIELDS, GradsOut, MemoryRead, ScanGrads, ScanInputs, ScanOutput, reverse_positions

BACKEND_ENV = "ADAPTOR_PEFT_SCAN_BACKEND"
CHECK_POSITIONS_ENV = "ADAPTOR_PEFT_CHECK_POSITIONS"
BACKENDS = ("auto", "mamba_ssm", "triton", "native", "torch")


@cache
def mamba_ssm_kernel() -> Callable | None:
    """mamba-ssm's ``selective_scan_fn`` if its compiled extension imports, else None."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as kernel
    except Exception:  # ImportError, or OSError / RuntimeError from a broken CUDA extension
        return None
    return kernel


@cache
def mamba_ssm_runs(device: torch.device) -> bool:
    """Whether mamba-ssm's kernel imports and runs on ``device``: one tiny scan, once per device. Since
    mamba-ssm 2.3 a plain ``pip install mamba-ssm`` builds no Mamba-1 kernel (unless
    ``MAMBA_KEEP_CUDA_BUILD=TRUE``): ``selective_scan_fn`` still imports, then raises at its first call."""
    kernel = mamba_ssm_kernel()
    if kernel is None:
        return False
    if kernel_runs(kernel, device):
        return True
    warnings.warn(
        f"adaptor_peft: mamba-ssm imports but its selective-scan kernel fails on {device}; plain scans use the "
        "Triton kernels instead (mamba-ssm 2.3 and later build that kernel only with MAMBA_KEEP_CUDA_BUILD=TRUE "
        "set at install)",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def kernel_runs(kernel: Callable, device: torch.device) -> bool:
    """Whether ``kernel`` (``selective_scan_fn``'s signature) scans a one-channel, two-step sequence on
    ``device`` without raising."""
    try:
        u = torch.ones(1, 1, 2, device=device)
        B = torch.ones(1, 1, 2, device=device)
        out = kernel(u, u, -torch.ones(1, 1, device=device), B, B)
        return bool(torch.isfinite(out).all())
    except Exception:  # RuntimeError, NotImplementedError, ...: anything the broken build raises
        return False


@cache
def triton_backend() -> ModuleType | None:
    """:mod:`adaptor_peft.ops.scan_triton` if Triton imports, else None (imported on first use only)."""
    try:
        return importlib.import_module(".scan_triton", __package__)
    except ImportError:
        return None


def _triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels run tensors on ``device``: CUDA ones, or CPU ones when the kernels were
    built for Triton's interpreter (``TRITON_INTERPRET=1`` when :mod:`adaptor_peft.ops.scan_triton` was
    first imported: Triton decides then, not per call). A plain CPU scan never imports Triton."""
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET")):
        return False
    module = triton_backend()
    return module is not None and (device.type == "cpu") == module.INTERPRETED


_BUILT_IN = {"native": native, "torch": scan_torch}


def _implementation(name: str) -> ModuleType:
    return _BUILT_IN.get(name) or triton_backend()


def as_grouped(X: torch.Tensor, batch: int, length: int, groups: int | None = None) -> torch.Tensor:
    """B or C as (batch, groups, nstate, len): (dim, nstate) becomes one group per channel.

    With ``groups``, a coarser grouping is repeated to that many groups, so B and C can share one.
    """
    if X.dim() == 2:
        X = X.t()[None, :, :, None].expand(batch, -1, -1, length).transpose(1, 2)
    elif X.dim() == 3:
        X = X.unsqueeze(1)
    if groups is not None and groups != X.shape[1]:
        X = X.repeat_interleave(groups // X.shape[1], dim=1)
    return X


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, len), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, nstate), got shape {tuple(A.shape)}")
    nstate = A.shape[1]
    for name, t, shape in (
        ("delta", delta, u.shape),
        ("z", z, u.shape),
        ("D", D, (dim,)),
        ("delta_bias", delta_bias, (dim,)),
    ):
        if t is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"selective_scan: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    for name, X in (("B", B), ("C", C)):
        ok = (
            (X.dim() == 2 and tuple(X.shape) == (dim, nstate))
            or (X.dim() == 3 and tuple(X.shape) == (batch, nstate, length))
            or (X.dim() == 4 and X.shape[0] == batch and X.shape[2:] == (nstate, length) and dim % X.shape[1] == 0)
        )
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be (dim, nstate)={(dim, nstate)}, (batch, nstate, len)="
                f"{(batch, nstate, length)} or (batch, groups, nstate, len) with groups dividing {dim}; "
                f"got shape {tuple(X.shape)}"
            )


def _check_snapshots(index: torch.Tensor | None, shape: torch.Size) -> None:
    if index is None:
        return
    batch, dim, _ = shape
    if index.dim() != 3 or index.shape[0] != batch or dim % index.shape[1] != 0:
        raise ValueError(
            f"selective_scan: snapshot_index must be (batch={batch}, groups dividing {dim}, nsnap), "
            f"got shape {tuple(index.shape)}"
        )
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise TypeError(f"selective_scan: snapshot_index must hold integer positions, got {index.dtype}")


def _check_memory(memory: MemoryRead, shape: torch.Size, C: torch.Tensor) -> None:
    batch, dim, length = shape
    if C.dim() == 2:  # the read mixes a group's states through one C_t per position (memory_read.py)
        raise ValueError(
            "selective_scan: the memory read needs an input-dependent C, (batch, nstate, len) or (batch, groups, "
            f"nstate, len); got C of shape {tuple(C.shape)}"
        )
    location, weights, scale = memory.location, memory.weights, memory.scale
    if location.dim() != 3 or location.shape[0] != batch or dim % location.shape[1]:
        raise ValueError(
            f"selective_scan: memory.location must be (batch={batch}, groups dividing {dim}, K), got shape "
            f"{tuple(location.shape)}"
        )
    expected = {"weights": (*location.shape, length), "scale": (dim,)}
    for name, t in (("weights", weights), ("scale", scale)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"selective_scan: memory.{name} must have shape {expected[name]}, got {tuple(t.shape)}")


def _check_range(index: torch.Tensor, length: int, backend: str) -> None:
    """Snapshot positions outside [0, length) are an error, checked unless ``backend`` clamps them (module
    docstring)."""
    if (backend != "triton" or os.environ.get(CHECK_POSITIONS_ENV) == "1") and index.numel():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= length:
            raise ValueError(f"selective_scan: snapshot_index values must lie in [0, {length}), got [{low}, {high}]")


def select_backend(
    device: torch.device, dtype: torch.dtype, needs_states: bool = False, requested: str | None = None
) -> str:
    """The backend that runs a scan on ``device`` (``needs_states``: with snapshots or hidden states); see the
    module docstring for the rules. Raises if ``requested`` (or ``$ADAPTOR_PEFT_SCAN_BACKEND``) names a
    backend that cannot run this scan."""
    requested = requested or os.environ.get(BACKEND_ENV) or "auto"
    if requested not in BACKENDS:
        raise ValueError(
            f"selective_scan backend {requested!r} (argument or ${BACKEND_ENV}): expected one of {BACKENDS}"
        )
    device = torch.device(device)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    mamba_ok = device.type == "cuda" and not needs_states and mamba_ssm_runs(device)
    native_ok = device.type == "cpu" and native.available(compute)
    if requested == "auto":
        if device.type == "cuda":
            return "mamba_ssm" if mamba_ok else "triton" if _triton_runs_on(device) else "torch"
        return "native" if native_ok else "torch"
    if requested == "mamba_ssm" and not mamba_ok:
        raise RuntimeError(
            "selective_scan backend 'mamba_ssm' needs CUDA tensors, a mamba-ssm whose kernel runs "
            f"(importable: {mamba_ssm_kernel() is not None}) and no snapshots or hidden states; got device "
            f"{device}"
        )
    if requested == "triton" and not _triton_runs_on(device):
        raise RuntimeError(
            f"selective_scan backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1) and an "
            f"importable triton (importable: {triton_backend() is not None}); got device {device}"
        )
    if requested == "native" and not native_ok:
        raise RuntimeError(
            f"selective_scan backend 'native' needs CPU tensors and a working C compiler (other float dtypes than "
            f"float32 / float64 are computed in float32); got device {device}, dtype {dtype}"
        )
    return requested


class _OnFlippedCopies:
    """A backend without a reverse scan, run on flipped copies of the per-position tensors. Autograd keeps the
    caller's own tensors, which activation recomputation may rebuild; the backward flips them again."""

    FLIPPED = ("u", "delta", "z", "B", "C", "read_weights")

    def __init__(self, impl: ModuleType):
        self.impl = impl

    def _flipped(self, x: ScanInputs) -> ScanInputs:
        return dataclasses.replace(x, reverse=False, **{k: reverse_positions(getattr(x, k)) for k in self.FLIPPED})

    def forward(self, x: ScanInputs, want_last: bool, want_hidden: bool, for_backward: bool):
        result, saved = self.impl.forward(self._flipped(x), want_last, want_hidden, for_backward)
        hidden = None if result.hidden_states is None else result.hidden_states.flip(2)
        return result._replace(out=result.out.flip(-1), hidden_states=hidden), saved

    def backward(self, x: ScanInputs, grads: GradsOut, saved: tuple) -> ScanGrads:
        grads = self.impl.backward(self._flipped(x), grads._replace(out=grads.out.flip(-1)), saved)
        return grads._replace(**{k: reverse_positions(getattr(grads, k)) for k in self.FLIPPED})


class _ScanFunction(torch.autograd.Function):
    """Autograd around one backend; the record's tensors travel as arguments, so that autograd sees them."""

    @staticmethod
    def forward(ctx, backend, inputs, want_last, want_hidden, *tensors):
        impl = _implementation(backend)
        impl = _OnFlippedCopies(impl) if inputs.reverse and backend != "native" else impl
        inputs = inputs.with_tensors(tensors)
        result, saved = impl.forward(inputs, want_last, want_hidden, any(ctx.needs_input_grad))
        # the record without its tensors: those go through save_for_backward, whose hooks may free them
        ctx.impl, ctx.inputs, ctx.inputs_saved = impl, inputs.with_tensors((None,) * len(tensors)), len(tensors)
        ctx.save_for_backward(*tensors, *saved)
        ctx.mark_non_differentiable(*(t for t in (result.last_state, result.hidden_states) if t is not None))
        return tuple(result)

    @staticmethod
    def backward(ctx, dout, _dlast, _dhidden, dsnapshots):
        everything = ctx.saved_tensors  # once: under activation checkpointing every access unpacks again
        tensors, saved = everything[: ctx.inputs_saved], everything[ctx.inputs_saved :]
        inputs = ctx.inputs.with_tensors(tensors)
        grads = ctx.impl.backward(inputs, GradsOut(dout, dsnapshots), saved)._asdict()
        return None, None, None, None, *(grads.get(name) for name in TENSOR_FIELDS)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    snapshot_index: torch.Tensor | None = None,
    memory: MemoryRead | None = None,
    return_last_state: bool = False,
    return_hidden_states: bool = False,
    reverse: bool = False,
    backend: str | None = None,
) -> ScanOutput:
    """Selective scan ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t``, ``y_t = C_t h_t + D u_t``, gated by silu(z).

    Shapes as mamba-ssm: ``u``, ``delta``, ``z`` (batch, dim, len); ``A`` (dim, nstate); ``B``, ``C``
    (dim, nstate), (batch, nstate, len) or (batch, groups, nstate, len); ``D``, ``delta_bias`` (dim,).
    ``snapshot_index`` (batch, snapshot_groups, nsnap): integer positions whose states come back as
    ``snapshots`` (batch, dim, nsnap, nstate), float32 (float64 for float64 inputs); the channels are split
    into ``snapshot_groups`` contiguous groups, each with its own positions. Their gradient flows back into
    the recurrence. A snapshot costs one state copy, so a scan with a few costs what a plain one does.
    ``memory`` adds Adaptor-T's read of the scan's own states to ``out`` (:class:`MemoryRead`; not with
    ``snapshot_index``). ``hidden_states`` is (batch, dim, len, nstate) and is only built when asked for.
    ``reverse``: the recurrence runs from the last position to the first, as a scan of the flipped sequence
    would, with every tensor in sequence order; snapshot positions and memory locations then count scan
    steps (step s is position len - 1 - s). The compiled CPU scan reads its inputs backwards in place;
    the other backends scan flipped copies, made again in the backward pass.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    _check_snapshots(snapshot_index, u.shape)
    batch, dim, length = u.shape
    if memory is not None:
        if snapshot_index is not None:
            raise ValueError("selective_scan: give snapshot_index or memory, not both")
        _check_memory(memory, u.shape, C)
        floor = memory.location.detach().floor()
        snapshot_index = torch.cat([floor, (floor + 1).clamp(max=length - 1)], dim=-1).long()
    groups = math.lcm(*(dim if X.dim() == 2 else 1 if X.dim() == 3 else X.shape[1] for X in (B, C)))
    Bg, Cg = as_grouped(B, batch, length, groups), as_grouped(C, batch, length, groups)
    needs_states = snapshot_index is not None or return_hidden_states
    name = select_backend(u.device, u.dtype, needs_states, backend)
    if snapshot_index is not None:
        _check_range(snapshot_index, length, name)
    fused = memory is not None and name == "native" and memory.dropout is None
    if name == "mamba_ssm":
        u, delta, B, C, z = (reverse_positions(X, reverse) for X in (u, delta, B, C, z))
        result = mamba_ssm_kernel()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        out, last = result if return_last_state else (result, None)
        return ScanOutput(reverse_positions(out, reverse), last)
    dtype, compute = u.dtype, torch.float64 if u.dtype == torch.float64 else torch.float32
    floats = dict(u=u, delta=delta, delta_bias=delta_bias, A=A, B=Bg, C=Cg, D=D, z=z)
    if name != "triton":  # the Triton kernels read each input in its own dtype and accumulate in float32
        floats = {k: None if t is None else t.to(compute) for k, t in floats.items()}
    flat = ("A", "D", "delta_bias")  # every backend indexes these flat
    floats.update({k: None if floats[k] is None else floats[k].contiguous() for k in flat})
    index = None if snapshot_index is None else snapshot_index.long().contiguous()
    frac = None if memory is None else memory.location - floor
    if fused:
        read = dict(read_frac=frac, read_weights=memory.weights, read_scale=memory.scale)
        floats.update({k: t.to(compute).contiguous() for k, t in read.items()})
    inputs = ScanInputs(**floats, snapshot_index=index, softplus=delta_softplus, reverse=reverse)
    result = ScanOutput(*_ScanFunction.apply(name, inputs, return_last_state, return_hidden_states, *inputs.tensors()))
    if memory is not None and not fused:
        C_seen = as_grouped(C, batch, length, memory.location.shape[1])
        out = add_read(result.out, result.snapshots, frac, memory.weights, memory.scale, C_seen, z, memory.dropout)
        result = result._replace(out=out, snapshots=None)
    return result._replace(out=result.out.to(dtype))


def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for mamba-ssm's ``selective_scan_fn``: ``out``, or ``(out, last_state)``."""
    result = selective_scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=return_last_state, backend=backend
    )
    return (result.out, result.last_state) if return_last_state else result.out
