"""The selective scan entry point, and the one place that chooses how it runs.

``selective_scan_fn`` has mamba-ssm's signature and semantics. ``selective_scan`` is the full interface:
it can also return the hidden states, or a *probe readout*: for chosen positions ``p(i, k)`` and
weights ``w(i, k)`` of every query position ``i``, the weighted states seen through that query's ``C``,
``r[b, d, i] = Σ_k w(i, k) C_i · h_{p(i,k)}``. Because ``C_i · h`` is linear in ``h``, a caller can mix
hidden states from anywhere in the sequence into position ``i``'s output (what Adaptor-T does) without
ever holding a (batch, dim, len, k, nstate) tensor, and gets gradients for the weights too.

Backends (argument ``backend=`` or environment variable ``ADAPTOR_PEFT_SCAN_BACKEND``):

- ``mamba_ssm``: mamba-ssm's CUDA kernel; CUDA tensors only, no probes or hidden states.
- ``triton``: the Triton kernels (:mod:`adaptor_peft.ops.scan_triton`); CUDA tensors, or CPU tensors
  under Triton's interpreter (``TRITON_INTERPRET=1``, for tests and debugging).
- ``native``: the compiled CPU kernel (:mod:`adaptor_peft.ops.native`), float32 / float64.
- ``torch``: plain PyTorch (:mod:`adaptor_peft.ops.scan_torch`), any device.
- ``auto`` (default): on CUDA, ``mamba_ssm`` for plain scans when it imports, else ``triton`` where
  Triton imports, else ``torch``; on CPU, ``native`` where it builds, else ``torch``.

Probe positions are range-checked before every backend but ``triton``, whose kernels clamp them into
the sequence instead: on a GPU the check would stall it (it reads the positions back to the host).
``ADAPTOR_PEFT_CHECK_PROBES=1`` checks them before ``triton`` too.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from functools import cache
from types import ModuleType
from typing import NamedTuple

import torch

from . import native, scan_torch

BACKEND_ENV = "ADAPTOR_PEFT_SCAN_BACKEND"
CHECK_PROBES_ENV = "ADAPTOR_PEFT_CHECK_PROBES"
BACKENDS = ("auto", "mamba_ssm", "triton", "native", "torch")


class ScanOutput(NamedTuple):
    """Result of :func:`selective_scan`; fields not asked for are None.

    ``out`` (batch, dim, len); ``last_state`` (batch, dim, nstate); ``readout`` (batch, dim, len);
    ``hidden_states`` (batch, dim, len, nstate). ``last_state`` and ``hidden_states`` carry no gradient.
    """

    out: torch.Tensor
    last_state: torch.Tensor | None = None
    readout: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


@cache
def mamba_ssm_kernel() -> Callable | None:
    """mamba-ssm's ``selective_scan_fn`` if its compiled extension imports, else None."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as kernel
    except Exception:  # ImportError, or OSError / RuntimeError from a broken CUDA extension
        return None
    return kernel


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


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, probe_index, probe_weight, probe_scale) -> None:
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
        ("probe_scale", probe_scale, (dim,)),
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
    if (probe_index is None) != (probe_weight is None) or (probe_scale is not None and probe_index is None):
        raise ValueError("selective_scan: probe_index and probe_weight go together; probe_scale needs both")
    if probe_index is not None:
        p = probe_index
        if tuple(probe_weight.shape) != tuple(p.shape):
            raise ValueError(
                f"selective_scan: probe_weight must have probe_index's shape {tuple(p.shape)}, "
                f"got {tuple(probe_weight.shape)}"
            )
        if p.dim() != 4 or p.shape[0] != batch or p.shape[2] != length or dim % p.shape[1] != 0:
            raise ValueError(
                f"selective_scan: probe_index must be (batch={batch}, groups dividing {dim}, len={length}, k), "
                f"got shape {tuple(p.shape)}"
            )
        if p.dtype.is_floating_point or p.dtype == torch.bool:
            raise TypeError(f"selective_scan: probe_index must hold integer positions, got {p.dtype}")


def _check_probe_range(probe_index: torch.Tensor, length: int, backend: str) -> None:
    """Positions outside [0, length) are an error, checked unless ``backend`` clamps them (module docstring)."""
    p = probe_index
    if (backend != "triton" or os.environ.get(CHECK_PROBES_ENV) == "1") and p.numel():
        low, high = int(p.min()), int(p.max())
        if low < 0 or high >= length:
            raise ValueError(f"selective_scan: probe_index values must lie in [0, {length}), got [{low}, {high}]")


def select_backend(
    device: torch.device, dtype: torch.dtype, needs_states: bool = False, requested: str | None = None
) -> str:
    """The backend that runs a scan on ``device`` (``needs_states``: with probes or hidden states); see the
    module docstring for the rules. Raises if ``requested`` (or ``$ADAPTOR_PEFT_SCAN_BACKEND``) names a
    backend that cannot run this scan."""
    requested = requested or os.environ.get(BACKEND_ENV) or "auto"
    if requested not in BACKENDS:
        raise ValueError(
            f"selective_scan backend {requested!r} (argument or ${BACKEND_ENV}): expected one of {BACKENDS}"
        )
    device = torch.device(device)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    mamba_ok = device.type == "cuda" and not needs_states and mamba_ssm_kernel() is not None
    native_ok = device.type == "cpu" and native.available(compute)
    if requested == "auto":
        if device.type == "cuda":
            return "mamba_ssm" if mamba_ok else "triton" if _triton_runs_on(device) else "torch"
        return "native" if native_ok else "torch"
    if requested == "mamba_ssm" and not mamba_ok:
        raise RuntimeError(
            "selective_scan backend 'mamba_ssm' needs CUDA tensors, an importable mamba-ssm "
            f"(importable: {mamba_ssm_kernel() is not None}) and no probes or hidden states; got device {device}"
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


class _ScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, backend, u, delta, delta_bias, softplus, A, B, C, D, z, probe, weight, scale, want_last, want_hidden
    ):
        impl = _implementation(backend)
        out, readout, last, hidden = impl.forward(
            u, delta, delta_bias, softplus, A, B, C, D, z, probe, weight, scale, want_last, want_hidden
        )
        ctx.impl, ctx.softplus = impl, softplus
        ctx.save_for_backward(u, delta, delta_bias, A, B, C, D, z, probe, weight, scale)
        ctx.mark_non_differentiable(*(t for t in (last, hidden) if t is not None))
        return out, readout, last, hidden

    @staticmethod
    def backward(ctx, dout, dreadout, _dlast, _dhidden):
        u, delta, delta_bias, A, B, C, D, z, probe, weight, scale = ctx.saved_tensors
        grads = ctx.impl.backward(
            u, delta, delta_bias, ctx.softplus, A, B, C, D, z, probe, weight, scale, dout, dreadout
        )
        du, ddelta, ddelta_bias, dA, dB, dC, dD, dz, dweight, dscale = grads
        return None, du, ddelta, ddelta_bias, None, dA, dB, dC, dD, dz, None, dweight, dscale, None, None


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
    probe_index: torch.Tensor | None = None,
    probe_weight: torch.Tensor | None = None,
    probe_scale: torch.Tensor | None = None,
    return_last_state: bool = False,
    return_hidden_states: bool = False,
    backend: str | None = None,
) -> ScanOutput:
    """Selective scan ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t``, ``y_t = C_t h_t + D u_t``, gated by silu(z).

    Shapes as mamba-ssm: ``u``, ``delta``, ``z`` (batch, dim, len); ``A`` (dim, nstate); ``B``, ``C``
    (dim, nstate), (batch, nstate, len) or (batch, groups, nstate, len); ``D``, ``delta_bias`` (dim,).
    ``probe_index`` (batch, probe_groups, len, k): integer positions whose states each query position
    reads through its own ``C``, summed with ``probe_weight`` (same shape; differentiable) into
    ``readout``; channels are split into ``probe_groups`` contiguous groups, each with its own positions
    and weights. The readout is raw: no ``D`` term, no gate. With ``probe_scale`` (dim,), ``out`` is
    ``(y + probe_scale * readout) * silu(z)``: Adaptor-T's adapted states, in one pass.
    ``hidden_states`` is (batch, dim, len, nstate) and is only built when asked for.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, probe_index, probe_weight, probe_scale)
    batch, dim, length = u.shape
    groups = math.lcm(*(dim if X.dim() == 2 else 1 if X.dim() == 3 else X.shape[1] for X in (B, C)))
    Bg, Cg = as_grouped(B, batch, length, groups), as_grouped(C, batch, length, groups)
    needs_states = probe_index is not None or return_hidden_states
    name = select_backend(u.device, u.dtype, needs_states, backend)
    if probe_index is not None:
        _check_probe_range(probe_index, length, name)
    if name == "mamba_ssm":
        result = mamba_ssm_kernel()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        return ScanOutput(*result) if return_last_state else ScanOutput(result)
    dtype, compute = u.dtype, torch.float64 if u.dtype == torch.float64 else torch.float32
    floats = (u, delta, delta_bias, A, Bg, Cg, D, z, probe_weight, probe_scale)
    if name != "triton":  # the Triton kernels read each input in its own dtype and accumulate in float32
        floats = (None if t is None else t.to(compute) for t in floats)
    u, delta, delta_bias, A, Bg, Cg, D, z, weight, scale = floats
    small = (A, D, delta_bias, weight, scale)  # parameters and probe weights: every backend indexes them flat
    A, D, delta_bias, weight, scale = (None if t is None else t.contiguous() for t in small)
    probe = None if probe_index is None else probe_index.long().contiguous()
    out, readout, last, hidden = _ScanFunction.apply(
        name, u, delta, delta_bias, delta_softplus, A, Bg, Cg, D, z, probe, weight, scale, return_last_state,
        return_hidden_states,
    )  # fmt: skip
    return ScanOutput(out.to(dtype), last, None if readout is None else readout.to(dtype), hidden)


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
