"""The selective scan in Triton, with a hand-written backward: for GPUs, where mamba-ssm's kernel does not
run or a scan takes snapshots (Adaptor-T's memory).

Same contract as :mod:`adaptor_peft.ops.scan_torch` (``forward`` / ``backward``), except that inputs may
be float32, bfloat16 or float16 (each tensor in its own dtype, outputs and input gradients in their
inputs'); states and accumulations are float32 (float64 for float64 inputs). A program owns one batch row
and ``block`` consecutive channels, all inside one B/C group and one snapshot group, and walks the
sequence with its (block, nstate) state in registers, each step's loads issued before the previous
step's arithmetic. Two kernels:

- ``_scan_kernel``: the forward recurrence; writes the gated ``y = C·h + D u``, the snapshots as the
  recurrence passes their positions, and, when a backward will follow, the state entering every chunk of
  :data:`CHUNK` positions; the last state and the whole state history only when asked for.
- ``_backward_kernel``: chunk by chunk from the last, recomputes the chunk's states from its checkpoint
  into a small per-program scratch, then runs the adjoint ``g_t = a_{t+1} g_{t+1} + dy_t C_t (+ a
  snapshot's gradient)`` back through it, writing du, dΔ and dz (the gate's and skip's gradients fused
  in) and adding into dB, dC (atomically) and per-batch-row sums of dA, dD and the Δ bias.

Memory: besides its inputs and outputs, a scan keeps ``batch·dim·(len/CHUNK)·nstate`` float32
checkpoints from the forward to the backward; no (batch, dim, len, nstate) tensor exists unless the
caller asks for the hidden states. Forward and backward take four launches (the two kernels, the zeroed
dB / dC sums and the batch sum), plus a cast of dB / dC for half-precision inputs.

No host synchronisation: snapshot positions are not checked here (see the dispatcher); the kernels
clamp them to [0, len).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .records import GradsOut, ScanGrads, ScanInputs, ScanOutput

MAX_BLOCK = 32  # channels per program
CHUNK = 32
"""Positions per chunk of the backward: the forward keeps the state entering each chunk, and the
backward recomputes a chunk's states from it (mamba-ssm's kernels do the same) instead of keeping them all."""


@triton.jit
def _softplus(x):
    # log1p(exp(x)) without log1p (Kahan's trick), the identity above 20 as torch does
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    log1p = tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _bias(bias_ptr, d, mask, BLOCK: tl.constexpr, ACC: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The channel block's Δ bias, read once before a sequential loop (zeros without one)."""
    if HAS_BIAS:
        return tl.load(bias_ptr + d, mask=mask, other=0.0).to(ACC)
    return tl.zeros((BLOCK,), dtype=ACC)


@triton.jit
def _snapshot_rows(index_ptr, b, d, first, dim, length, nsnap, sgroups, s: tl.constexpr):
    """Snapshot ``s`` of the channel block ``d`` starting at channel ``first``: its position, clamped into
    the sequence, and the channels' (BLOCK,) rows of (batch, dim, nsnap)."""
    position = tl.load(index_ptr + (b * sgroups + first // (dim // sgroups)) * nsnap + s)
    return tl.minimum(tl.maximum(position, 0), length - 1), (b * dim + d) * nsnap + s


@triton.jit
def _inputs(
    u_ptr, delta_ptr, B_row, C_row, u_at, delta_at, t, su_t, sd_t, sB_t, sC_t, bias, dmask, nmask, ACC: tl.constexpr
):
    """One position's inputs of a channel block: u, x = delta + bias (BLOCK,), B_t and C_t (NP,)."""
    u = tl.load(u_ptr + u_at + t * su_t, mask=dmask, other=0.0).to(ACC)
    x = tl.load(delta_ptr + delta_at + t * sd_t, mask=dmask, other=0.0).to(ACC) + bias
    Bt = tl.load(B_row + t * sB_t, mask=nmask, other=0.0).to(ACC)
    Ct = tl.load(C_row + t * sC_t, mask=nmask, other=0.0).to(ACC)
    return u, x, Bt, Ct


@triton.jit
def _dt(x, SOFTPLUS: tl.constexpr):
    if SOFTPLUS:
        return _softplus(x)
    return x


@triton.jit
def _scan_kernel(
    u_ptr, delta_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr, hidden_ptr, last_ptr,
    snap_index_ptr, snap_ptr, ckpt_ptr,
    dim, length, nstate, cpg, sgroups, nckpt,
    su_b, su_d, su_t, sd_b, sd_d, sd_t, sz_b, sz_d, sz_t,
    sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
    BLOCK: tl.constexpr, NP: tl.constexpr, ACC: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, GATE: tl.constexpr, STORE_HIDDEN: tl.constexpr, STORE_LAST: tl.constexpr,
    NSNAP: tl.constexpr, CHUNK: tl.constexpr, CHECKPOINTS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * BLOCK
    d = first + tl.arange(0, BLOCK)
    n = tl.arange(0, NP)
    dmask, nmask = d < dim, n < nstate
    mask2 = dmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + d[:, None] * nstate + n[None, :], mask=mask2, other=0.0).to(ACC)
    if HAS_D:
        Dskip = tl.load(D_ptr + d, mask=dmask, other=0.0).to(ACC)
    B_row = B_ptr + b * sB_b + (first // cpg) * sB_g + n * sB_n
    C_row = C_ptr + b * sC_b + (first // cpg) * sC_g + n * sC_n
    u_at, delta_at, z_at = b * su_b + d * su_d, b * sd_b + d * sd_d, b * sz_b + d * sz_d
    row = b * dim * length + d * length  # contiguous (batch, dim, len) outputs
    states = (b * dim + d)[:, None] * nstate + n[None, :]
    bias = _bias(bias_ptr, d, dmask, BLOCK, ACC, HAS_BIAS)
    h = tl.zeros((BLOCK, NP), dtype=ACC)
    u, x, Bt, Ct = _inputs(
        u_ptr, delta_ptr, B_row, C_row, u_at, delta_at, 0, su_t, sd_t, sB_t, sC_t, bias, dmask, nmask, ACC
    )
    for t in range(0, length):
        # the next position's loads go out before this one's arithmetic, which hides their latency
        following = tl.minimum(t + 1, length - 1)
        u_next, x_next, B_next, C_next = _inputs(
            u_ptr, delta_ptr, B_row, C_row, u_at, delta_at, following, su_t, sd_t, sB_t, sC_t, bias, dmask, nmask, ACC
        )
        if GATE:
            zt = tl.load(z_ptr + z_at + t * sz_t, mask=dmask, other=0.0).to(ACC)
        dt = _dt(x, SOFTPLUS)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)
        if HAS_D:
            y += Dskip * u
        if GATE:
            y = y * zt * tl.sigmoid(zt)
        tl.store(out_ptr + row + t, y, mask=dmask)
        if STORE_HIDDEN:
            tl.store(hidden_ptr + (row + t)[:, None] * nstate + n[None, :], h, mask=mask2)
        for s in tl.static_range(NSNAP):  # a masked store: no branch, and only the due ones write
            position, rows = _snapshot_rows(snap_index_ptr, b, d, first, dim, length, NSNAP, sgroups, s)
            tl.store(snap_ptr + rows[:, None] * nstate + n[None, :], h, mask=mask2 & (position == t))
        if CHECKPOINTS:  # the state entering each chunk but the first, for the backward's recomputation
            chunk_end = (t + 1) % CHUNK == 0
            slot = (t + 1) // CHUNK - 1
            at = ((b * dim + d)[:, None] * nckpt + slot) * nstate + n[None, :]
            tl.store(ckpt_ptr + at, h, mask=mask2 & chunk_end & (t + 1 < length))
        u, x, Bt, Ct = u_next, x_next, B_next, C_next
    if STORE_LAST:
        tl.store(last_ptr + states, h, mask=mask2)


@triton.jit
def _backward_kernel(
    u_ptr, delta_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dout_ptr, ckpt_ptr, scratch_ptr,
    snap_index_ptr, dsnap_ptr, du_ptr, ddelta_ptr, dz_ptr, dBC_ptr, dsmall_ptr,
    dim, length, nstate, cpg, blocks, sgroups, nckpt,
    su_b, su_d, su_t, sd_b, sd_d, sd_t, sz_b, sz_d, sz_t, so_b, so_d, so_t, sg_b, sg_d, sg_t,
    sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
    BLOCK: tl.constexpr, NP: tl.constexpr, ACC: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, GATE: tl.constexpr, NSNAP: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    first = blk * BLOCK
    d = first + tl.arange(0, BLOCK)
    n = tl.arange(0, NP)
    dmask, nmask = d < dim, n < nstate
    mask2 = dmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + d[:, None] * nstate + n[None, :], mask=mask2, other=0.0).to(ACC)
    Dskip = tl.zeros((BLOCK,), dtype=ACC)
    if HAS_D:
        Dskip = tl.load(D_ptr + d, mask=dmask, other=0.0).to(ACC)
    B_row = B_ptr + b * sB_b + (first // cpg) * sB_g + n * sB_n
    C_row = C_ptr + b * sC_b + (first // cpg) * sC_g + n * sC_n
    u_at, delta_at = b * su_b + d * su_d, b * sd_b + d * sd_d
    row = b * dim * length + d * length  # contiguous (batch, dim, len) du and dz
    # this program's chunk of recomputed states, CHUNK + 1 rows of (BLOCK, NP): the state entering the chunk,
    # then the chunk's own; written and read back by the same program while it is in cache
    scratch = scratch_ptr + (b * blocks + blk) * (CHUNK + 1) * BLOCK * NP + tl.arange(0, BLOCK)[:, None] * NP + n
    bc_rows = (b * (dim // cpg) + first // cpg) * 2 * nstate * length + n * length  # this group's dB, dC rows
    bias = _bias(bias_ptr, d, dmask, BLOCK, ACC, HAS_BIAS)
    g = tl.zeros((BLOCK, NP), dtype=ACC)
    a_next = tl.zeros((BLOCK, NP), dtype=ACC)
    dA = tl.zeros((BLOCK, NP), dtype=ACC)
    dD = tl.zeros((BLOCK,), dtype=ACC)
    dbias = tl.zeros((BLOCK,), dtype=ACC)
    chunks = tl.cdiv(length, CHUNK)
    for done in range(0, chunks):
        chunk = chunks - 1 - done
        t0 = chunk * CHUNK
        steps = tl.minimum(length - t0, CHUNK)
        at = ((b * dim + d)[:, None] * nckpt + chunk - 1) * nstate + n[None, :]
        h = tl.load(ckpt_ptr + at, mask=mask2 & (chunk > 0), other=0.0)
        tl.store(scratch, h)
        u, x, Bt, _ = _inputs(
            u_ptr, delta_ptr, B_row, C_row, u_at, delta_at, t0, su_t, sd_t, sB_t, sC_t, bias, dmask, nmask, ACC
        )
        for j in range(0, steps):  # the chunk's states again, from its checkpoint
            following = tl.minimum(t0 + j + 1, length - 1)
            u_next, x_next, B_next, _ = _inputs(
                u_ptr,
                delta_ptr,
                B_row,
                C_row,
                u_at,
                delta_at,
                following,
                su_t,
                sd_t,
                sB_t,
                sC_t,
                bias,
                dmask,
                nmask,
                ACC,
            )
            dt = _dt(x, SOFTPLUS)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(scratch + (j + 1) * BLOCK * NP, h)
            u, x, Bt = u_next, x_next, B_next
        tl.debug_barrier()
        t = t0 + steps - 1
        u, x, Bt, Ct = _inputs(
            u_ptr, delta_ptr, B_row, C_row, u_at, delta_at, t, su_t, sd_t, sB_t, sC_t, bias, dmask, nmask, ACC
        )
        for back in range(0, steps):  # the adjoint recurrence through the chunk, latest position first
            j = steps - 1 - back
            t = t0 + j
            earlier = tl.maximum(t - 1, 0)
            u_next, x_next, B_next, C_next = _inputs(
                u_ptr, delta_ptr, B_row, C_row, u_at, delta_at, earlier, su_t, sd_t, sB_t, sC_t, bias, dmask, nmask, ACC
            )
            dout = tl.load(dout_ptr + b * so_b + d * so_d + t * so_t, mask=dmask, other=0.0).to(ACC)
            h = tl.load(scratch + (j + 1) * BLOCK * NP)
            h_prev = tl.load(scratch + j * BLOCK * NP)
            dt = _dt(x, SOFTPLUS)
            dy = dout
            if GATE:  # the gate's gradient, from y recomputed off the state
                zt = tl.load(z_ptr + b * sz_b + d * sz_d + t * sz_t, mask=dmask, other=0.0).to(ACC)
                sig = tl.sigmoid(zt)
                y = tl.sum(h * Ct[None, :], axis=1) + Dskip * u
                tl.store(dz_ptr + row + t, dout * y * sig * (1 + zt * (1 - sig)), mask=dmask)
                dy = dout * zt * sig
            dD += dy * u
            g = a_next * g + dy[:, None] * Ct[None, :]
            for s in tl.static_range(NSNAP):  # a snapshot taken here sends its gradient into the adjoint
                position, rows = _snapshot_rows(snap_index_ptr, b, d, first, dim, length, NSNAP, sgroups, s)
                due = mask2 & (position == t)
                g += tl.load(dsnap_ptr + rows[:, None] * nstate + n[None, :], mask=due, other=0.0).to(ACC)
            a = tl.exp(dt[:, None] * A)
            g_a_hprev = g * a * h_prev
            ddt = tl.sum(g_a_hprev * A + g * u[:, None] * Bt[None, :], axis=1)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(x)
            dbias += ddt
            dA += g_a_hprev * dt[:, None]
            tl.store(du_ptr + row + t, tl.sum(g * Bt[None, :], axis=1) * dt + Dskip * dy, mask=dmask)
            tl.store(ddelta_ptr + b * sg_b + d * sg_d + t * sg_t, ddt, mask=dmask)
            # summed over the group's channel blocks in L2, where atomics run, not in a partial-sum tensor
            tl.atomic_add(dBC_ptr + bc_rows + t, tl.sum(g * (dt * u)[:, None], axis=0), mask=nmask)
            tl.atomic_add(dBC_ptr + bc_rows + nstate * length + t, tl.sum(dy[:, None] * h, axis=0), mask=nmask)
            a_next = a
            u, x, Bt, Ct = u_next, x_next, B_next, C_next
        tl.debug_barrier()  # the next chunk overwrites the scratch rows this one read
    small = (b * dim + d) * (nstate + 2)  # rows of (dA, dD, dΔ bias) per batch row, summed over batch later
    tl.store(dsmall_ptr + small[:, None] + n[None, :], dA, mask=mask2)
    tl.store(dsmall_ptr + small + nstate, dD, mask=dmask)
    tl.store(dsmall_ptr + small + nstate + 1, dbias, mask=dmask)


INTERPRETED = not isinstance(_scan_kernel, triton.runtime.JITFunction)  # built for Triton's CPU interpreter


def block_size(*channels_per_group: int) -> int:
    """Channels per program: a power of two dividing the channels of every B/C and snapshot group."""
    common = math.gcd(*channels_per_group)
    return min(MAX_BLOCK, common & -common)


def _layout(x: ScanInputs):
    """Sizes of a scan: batch, dim, len, nstate, channels per B/C group, channels per program, nstate padded
    to a power of two."""
    batch, dim, length = x.u.shape
    cpg = dim // x.B.shape[1]
    spg = dim // x.snapshot_index.shape[1] if x.snapshot_index is not None else cpg
    nstate = x.A.shape[1]
    return batch, dim, length, nstate, cpg, block_size(cpg, spg), triton.next_power_of_2(nstate)


def _accumulator(u: torch.Tensor) -> tuple[torch.dtype, object]:
    return (torch.float64, tl.float64) if u.dtype == torch.float64 else (torch.float32, tl.float32)


def warps(elements: int) -> int:
    return max(1, min(8, elements // 128))


def _snapshot_args(x: ScanInputs) -> tuple[int, int]:
    """(snapshot groups, snapshots per group) as the kernels take them: (1, 0) without snapshots."""
    index = x.snapshot_index
    return (1, 0) if index is None else (index.shape[1], index.shape[2])


def _scan(x: ScanInputs, want_hidden: bool, want_last: bool, snapshots: bool, checkpoints: bool):
    """Runs ``_scan_kernel``: (gated output in the input's dtype, history, last state, snapshots, chunk
    checkpoints), None where not asked for."""
    batch, dim, length, nstate, cpg, block, np2 = _layout(x)
    acc, ACC = _accumulator(x.u)
    new = functools.partial(torch.empty, device=x.u.device, dtype=acc)
    sgroups, nsnap = _snapshot_args(x) if snapshots else (1, 0)
    nckpt = max(1, triton.cdiv(length, CHUNK) - 1)
    out = new(batch, dim, length, dtype=x.u.dtype)
    hidden = new(batch, dim, length, nstate) if want_hidden else None
    last = new(batch, dim, nstate) if want_last else None
    snaps = new(batch, dim, nsnap, nstate) if nsnap else None
    ckpt = new(batch, dim, nckpt, nstate) if checkpoints else None
    zs = x.z.stride() if x.z is not None else (0, 0, 0)
    _scan_kernel[(batch, triton.cdiv(dim, block))](
        x.u,
        x.delta,
        x.delta_bias,
        x.A,
        x.B,
        x.C,
        x.D,
        x.z,
        out,
        hidden,
        last,
        x.snapshot_index,
        snaps,
        ckpt,
        dim,
        length,
        nstate,
        cpg,
        sgroups,
        nckpt,
        *x.u.stride(),
        *x.delta.stride(),
        *zs,
        *x.B.stride(),
        *x.C.stride(),
        BLOCK=block,
        NP=np2,
        ACC=ACC,
        HAS_BIAS=x.delta_bias is not None,
        SOFTPLUS=bool(x.softplus),
        HAS_D=x.D is not None,
        GATE=x.z is not None,
        STORE_HIDDEN=want_hidden,
        STORE_LAST=want_last,
        NSNAP=nsnap,
        CHUNK=CHUNK,
        CHECKPOINTS=checkpoints,
        num_warps=warps(block * np2),
    )
    return out, hidden, last, snaps, ckpt


def forward(x: ScanInputs, want_last: bool, want_hidden: bool, for_backward: bool = False):
    """The scan's :class:`ScanOutput` and what :func:`backward` needs from it: the states entering each chunk
    of :data:`CHUNK` positions, where a backward will follow."""
    out, hidden, last, snaps, ckpt = _scan(x, want_hidden, want_last, True, for_backward)
    return ScanOutput(out, last, hidden, snaps), (ckpt,) if for_backward else ()


def backward(x: ScanInputs, grads: GradsOut, saved: tuple[torch.Tensor, ...] = ()) -> ScanGrads:
    """The inputs' gradients, each in its input's dtype: one ``_backward_kernel`` launch, states recomputed
    chunk by chunk from the forward's checkpoints (``saved``; recomputed here when there are none), and every
    gradient of the chunk written as the adjoint passes, the gate's and the skip's included; then one sum
    over the batch (dA, dD, dΔ bias). dB and dC are summed over a group's channels with atomic adds, so
    their last bits may differ between runs."""
    checkpoints = saved[0] if saved else _scan(x, False, False, False, True)[4]
    u, z = x.u, x.z
    batch, dim, length, nstate, cpg, block, np2 = _layout(x)
    acc, ACC = _accumulator(u)
    blocks = triton.cdiv(dim, block)
    with_snapshots = grads.snapshots is not None and x.snapshot_index is not None
    sgroups, nsnap = _snapshot_args(x) if with_snapshots else (1, 0)
    du, ddelta = torch.empty(u.shape, device=u.device, dtype=u.dtype), torch.empty_like(x.delta)
    dz = torch.empty(z.shape, device=u.device, dtype=z.dtype) if z is not None else None
    scratch = torch.empty(batch * blocks * (CHUNK + 1) * block * np2, device=u.device, dtype=acc)
    dBC = torch.zeros(batch, x.B.shape[1], 2, nstate, length, device=u.device, dtype=acc)
    small = torch.empty(batch, dim, nstate + 2, device=u.device, dtype=acc)
    zs = z.stride() if z is not None else (0, 0, 0)
    _backward_kernel[(batch, blocks)](
        u,
        x.delta,
        x.delta_bias,
        x.A,
        x.B,
        x.C,
        x.D,
        z,
        grads.out,
        checkpoints,
        scratch,
        x.snapshot_index,
        grads.snapshots.contiguous() if with_snapshots else None,
        du,
        ddelta,
        dz,
        dBC,
        small,
        dim,
        length,
        nstate,
        cpg,
        blocks,
        sgroups,
        checkpoints.shape[2],
        *u.stride(),
        *x.delta.stride(),
        *zs,
        *grads.out.stride(),
        *ddelta.stride(),
        *x.B.stride(),
        *x.C.stride(),
        BLOCK=block,
        NP=np2,
        ACC=ACC,
        HAS_BIAS=x.delta_bias is not None,
        SOFTPLUS=bool(x.softplus),
        HAS_D=x.D is not None,
        GATE=z is not None,
        NSNAP=nsnap,
        CHUNK=CHUNK,
        num_warps=warps(block * np2),
    )
    dBC = dBC.to(x.B.dtype)
    small = small.sum(0)
    return ScanGrads(
        du,
        ddelta,
        small[:, nstate + 1].to(x.delta_bias.dtype) if x.delta_bias is not None else None,
        small[:, :nstate].to(x.A.dtype),
        dBC[:, :, 0],
        dBC[:, :, 1].to(x.C.dtype),
        small[:, nstate].to(x.D.dtype) if x.D is not None else None,
        dz,
    )


__all__ = ["backward", "block_size", "forward"]
