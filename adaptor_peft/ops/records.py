"""The records every scan backend takes and gives: one scan's inputs, its outputs and its gradients.

The dispatcher (:mod:`adaptor_peft.ops.dispatch`) checks the user's tensors, puts B and C in the grouped
layout and hands one :class:`ScanInputs` to a backend's ``forward(inputs, want_last, want_hidden,
for_backward)``, which returns a :class:`ScanOutput` and a tuple of tensors its backward needs (empty for
a backend that recomputes everything), and to its ``backward(inputs, grads_out, saved)``, which returns a
:class:`ScanGrads`. Shapes, as a backend sees them: ``u``, ``delta``, ``z`` (batch, dim, len); ``A``
(dim, nstate); ``B``, ``C`` (batch, groups, nstate, len); ``D``, ``delta_bias`` (dim,);
``snapshot_index`` (batch, snapshot_groups, nsnap). The step is ``dt = softplus(delta + delta_bias)``
(bias optional, softplus if ``softplus``). ``reverse`` (only for ``native``, which reads every per-position
tensor backwards in place; the dispatcher flips them for the others): the recurrence runs from the last
position to the first, with snapshot positions counted in scan steps. The ``read_*`` fields
(:class:`MemoryRead`, as the dispatcher hands it to the one backend that fuses it, ``native``): ``read_frac``
(batch, snapshot_groups, K), ``read_weights`` (batch, snapshot_groups, K, len), ``read_scale`` (dim,), with
``nsnap = 2 K``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

Tensor = torch.Tensor


class MemoryRead(NamedTuple):
    """Adaptor-T's read of a memory of the scan's own states, added to its output before the gate:

        y_t += Σ_k weights[k, t] C_t m_k,   m_k = scale ⊙ h(location_k),

    per channel group, with a fractional location read by linear interpolation between its two neighbouring
    states (so its gradient reaches the location). ``location`` (batch, groups, K) in [0, len - 1];
    ``weights`` (batch, groups, K, len); ``scale`` (dim,); the channels are split into ``groups`` contiguous
    groups, each with its own locations and weights. ``dropout``: applied to the read (an ``nn.Dropout`` in
    training; None otherwise, which lets the compiled CPU scan read inside).
    """

    location: Tensor
    weights: Tensor
    scale: Tensor
    dropout: Callable[[Tensor], Tensor] | None = None


class ScanOutput(NamedTuple):
    """Result of a scan; fields not asked for are None.

    ``out`` (batch, dim, len); ``last_state`` (batch, dim, nstate); ``hidden_states`` (batch, dim, len,
    nstate); ``snapshots`` (batch, dim, nsnap, nstate), the states at ``snapshot_index``. ``last_state`` and
    ``hidden_states`` carry no gradient; ``snapshots`` does.
    """

    out: Tensor
    last_state: Tensor | None = None
    hidden_states: Tensor | None = None
    snapshots: Tensor | None = None


@dataclass(frozen=True)
class ScanInputs:
    """One scan's inputs, in the layouts of the module docstring; optional ones are None."""

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor | None = None
    z: Tensor | None = None
    delta_bias: Tensor | None = None
    softplus: bool = False
    reverse: bool = False
    snapshot_index: Tensor | None = None
    read_frac: Tensor | None = None
    read_weights: Tensor | None = None
    read_scale: Tensor | None = None

    def tensors(self) -> tuple[Tensor | None, ...]:
        """Every tensor field, in :data:`TENSOR_FIELDS` order (what autograd saves for the backward)."""
        return tuple(getattr(self, name) for name in TENSOR_FIELDS)

    def with_tensors(self, tensors: tuple[Tensor | None, ...]) -> ScanInputs:
        """This record with its tensor fields replaced, in :data:`TENSOR_FIELDS` order."""
        return dataclasses.replace(self, **dict(zip(TENSOR_FIELDS, tensors, strict=True)))


def full_precision(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it already is: where the official code says ``.float()``."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def reverse_positions(t: Tensor | None, reverse: bool = True) -> Tensor | None:
    """``t`` with its positions (last dimension) in reverse order when ``reverse``: a reverse scan's tensors
    between sequence order and scan-step order. None, and a (dim, nstate) B or C, which has no positions,
    pass unchanged."""
    return t.flip(-1) if reverse and t is not None and t.dim() > 2 else t


TENSOR_FIELDS = tuple(f.name for f in dataclasses.fields(ScanInputs) if f.name not in ("softplus", "reverse"))
"""The names of :class:`ScanInputs`' tensor fields, in field order."""


class GradsOut(NamedTuple):
    """Gradients reaching a scan's outputs: ``out``'s, and ``snapshots``' where those were used (else None)."""

    out: Tensor
    snapshots: Tensor | None = None


class ScanGrads(NamedTuple):
    """Gradients of a scan's differentiable inputs, named as :class:`ScanInputs`' fields; None where the
    input is None."""

    u: Tensor
    delta: Tensor
    delta_bias: Tensor | None
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor | None
    z: Tensor | None
    read_frac: Tensor | None = None
    read_weights: Tensor | None = None
    read_scale: Tensor | None = None
