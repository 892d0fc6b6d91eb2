"""The selective scan in Triton, with a hand-written backward: GPUs without mamba-ssm, and Adaptor-T's probes.

Same contract as :mod:`adaptor_peft.ops.scan_torch` (``forward`` / ``backward``), except that inputs may
be float32, bfloat16 or float16 (each tensor in its own dtype); states and accumulations are float32
(float64 for float64 inputs). A program owns one batch row and ``block`` consecutive channels, all
inside one B/C group and one probe group, and walks the sequence with its (block, nstate) state in
registers. Kernels:

- ``_scan_kernel``: the forward recurrence; writes ``y = C·h + D u`` (gated unless probes follow) and,
  when asked, the float32 state history (batch, dim, len, nstate) and the last state.
- ``_readout_kernel``: probe readout ``r_i = Σ_k w_ik C_i·h(p_ik)`` off the history, in parallel over
  positions, then ``out = (y + scale r) silu(z)``. Programs of neighbouring positions of one channel
  block run together, so the history rows they probe are read from cache, not memory, after the first.
- ``_probe_grad_kernel``: probe backward: weights' and C's gradients by gathering from the history, and
  the states' gradient ``w_ik dr_i C_i`` scattered (atomically) onto positions ``p_ik``.
- ``_adjoint_kernel``: the reverse recurrence ``g_t = a_{t+1} g_{t+1} + dy_t C_t (+ scattered)`` with
  ``h_{t-1}`` read from the history; writes du, dΔ and per-block partial sums for dA, dB, dC (each
  partial sum written by one program only, and never read back by a kernel: no races between warps).

Memory: the forward without probes keeps no history. The probe forward and every backward hold one
float32 history for the duration of the call (and the backward with probes a second one for the
scattered gradient): ``batch·dim·len·nstate·4`` bytes each, 591 MiB for one Vim-S scan direction at
batch 64 (768 channels, 197 tokens, 16 states); it is freed before the next scan runs. Nothing of size
(batch, dim, len, k, nstate) exists. Partial sums are reduced with PyTorch, not atomics, except the
scattered state gradient, so results are deterministic without probes.

No host synchronisation: probe positions are not checked here (see the dispatcher); the kernels clamp
them to [0, len) so a bad position cannot read outside the history.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .records import GradsOut, ScanGrads, ScanInputs, ScanOutput

MAX_BLOCK = 32  # channels per program
TIME_BLOCK = 8  # positions per program in the parallel probe kernels
CHUNK = 32
"""Positions per chunk of the plain backward: the forward keeps the state entering each chunk, and the
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
def _step(delta_ptr, offset, bias, mask, ACC: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(x, dt) for one position of a channel block: x = delta + bias, dt = softplus(x) or x."""
    x = tl.load(delta_ptr + offset, mask=mask, other=0.0).to(ACC) + bias
    if SOFTPLUS:
        return x, _softplus(x)
    return x, x


@triton.jit
def _snapshot_rows(index_ptr, b, d, first, dim, length, nsnap, sgroups, s: tl.constexpr):
    """Snapshot ``s`` of the channel block ``d`` starting at channel ``first``: its position, clamped into
    the sequence, and the channels' (BLOCK,) rows of (batch, dim, nsnap)."""
    position = tl.load(index_ptr + (b * sgroups + first // (dim // sgroups)) * nsnap + s)
    return tl.minimum(tl.maximum(position, 0), length - 1), (b * dim + d) * nsnap + s


@triton.jit
def _inputs(u_ptr, delta_ptr, B_row, C_row, u_at, delta_at, t, su_t, sd_t, sB_t, sC_t, bias, dmask, nmask,
            ACC: tl.constexpr):  # fmt: skip
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
    u, x, Bt, Ct = _inputs(u_ptr, delta_ptr, B_row, C_row, u_at, delta_at, 0, su_t, sd_t, sB_t, sC_t, bias, dmask,
                           nmask, ACC)  # fmt: skip
    for t in range(0, length):
        # the next position's loads go out before this one's arithmetic, which hides their latency
        following = tl.minimum(t + 1, length - 1)
        u_next, x_next, B_next, C_next = _inputs(u_ptr, delta_ptr, B_row, C_row, u_at, delta_at, following, su_t,
                                                 sd_t, sB_t, sC_t, bias, dmask, nmask, ACC)  # fmt: skip
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
def _probe_tile(probe_ptr, weight_ptr, b, pgroup, t, tmask, k, pgroups, length, nprobe):
    """Clamped positions and weights of probe ``k`` for a tile of query positions: two (TIME,) vectors."""
    offset = ((b * pgroups + pgroup) * length + t) * nprobe + k
    p = tl.load(probe_ptr + offset, mask=tmask, other=0)
    p = tl.minimum(tl.maximum(p, 0), length - 1)
    return p, tl.load(weight_ptr + offset, mask=tmask, other=0.0)


@triton.jit
def _readout_kernel(
    hidden_ptr, C_ptr, probe_ptr, weight_ptr, scale_ptr, y_ptr, z_ptr, out_ptr, readout_ptr,
    dim, length, nstate, cpg, ppg, pgroups, nprobe,
    sC_b, sC_g, sC_n, sC_t, sz_b, sz_d, sz_t,
    BLOCK: tl.constexpr, TIME: tl.constexpr, NP: tl.constexpr, ACC: tl.constexpr, HAS_SCALE: tl.constexpr,
    GATE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * TIME + tl.arange(0, TIME)  # positions vary fastest: neighbours share history rows
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    b = tl.program_id(2).to(tl.int64)
    n = tl.arange(0, NP)
    dmask, tmask, nmask = d < dim, t < length, n < nstate
    group, pgroup = (tl.program_id(1) * BLOCK) // cpg, (tl.program_id(1) * BLOCK) // ppg
    Ct = tl.load(
        C_ptr + b * sC_b + group * sC_g + n[None, :] * sC_n + t[:, None] * sC_t,
        mask=tmask[:, None] & nmask[None, :], other=0.0,
    ).to(ACC)  # fmt: skip
    rows = (b * dim + d) * length  # (BLOCK,)
    mask3 = dmask[:, None, None] & tmask[None, :, None] & nmask[None, None, :]
    acc = tl.zeros((BLOCK, TIME), dtype=ACC)
    for k in range(0, nprobe):
        p, w = _probe_tile(probe_ptr, weight_ptr, b, pgroup, t, tmask, k, pgroups, length, nprobe)
        at = (rows[:, None] + p[None, :])[:, :, None] * nstate + n[None, None, :]
        hp = tl.load(hidden_ptr + at, mask=mask3, other=0.0)
        acc += w.to(ACC)[None, :] * tl.sum(hp * Ct[None, :, :], axis=2)
    mask2 = dmask[:, None] & tmask[None, :]
    at2 = rows[:, None] + t[None, :]
    tl.store(readout_ptr + at2, acc, mask=mask2)
    y = tl.load(y_ptr + at2, mask=mask2, other=0.0)
    if HAS_SCALE:
        y += tl.load(scale_ptr + d, mask=dmask, other=0.0).to(ACC)[:, None] * acc
    if GATE:
        zt = tl.load(z_ptr + b * sz_b + d[:, None] * sz_d + t[None, :] * sz_t, mask=mask2, other=0.0).to(ACC)
        y = y * zt * tl.sigmoid(zt)
    tl.store(out_ptr + at2, y, mask=mask2)


@triton.jit
def _probe_grad_kernel(
    hidden_ptr, C_ptr, probe_ptr, weight_ptr, dr_ptr, scatter_ptr, dweight_ptr, dC_ptr,
    dim, length, nstate, cpg, ppg, pgroups, nprobe, blocks,
    sC_b, sC_g, sC_n, sC_t,
    BLOCK: tl.constexpr, TIME: tl.constexpr, NP: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * TIME + tl.arange(0, TIME)
    blk = tl.program_id(1)
    d = blk * BLOCK + tl.arange(0, BLOCK)
    b = tl.program_id(2).to(tl.int64)
    n = tl.arange(0, NP)
    dmask, tmask, nmask = d < dim, t < length, n < nstate
    group, pgroup = (blk * BLOCK) // cpg, (blk * BLOCK) // ppg
    mask_tn = tmask[:, None] & nmask[None, :]
    Ct = tl.load(C_ptr + b * sC_b + group * sC_g + n[None, :] * sC_n + t[:, None] * sC_t, mask=mask_tn, other=0.0)
    Ct = Ct.to(ACC)
    rows = (b * dim + d) * length
    mask2 = dmask[:, None] & tmask[None, :]
    mask3 = mask2[:, :, None] & nmask[None, None, :]
    dr = tl.load(dr_ptr + rows[:, None] + t[None, :], mask=mask2, other=0.0)
    dC = tl.zeros((TIME, NP), dtype=ACC)
    partial = (b * blocks + blk) * length + t  # (TIME,) rows of the per-block partial sums
    for k in range(0, nprobe):
        p, w = _probe_tile(probe_ptr, weight_ptr, b, pgroup, t, tmask, k, pgroups, length, nprobe)
        at = (rows[:, None] + p[None, :])[:, :, None] * nstate + n[None, None, :]
        hp = tl.load(hidden_ptr + at, mask=mask3, other=0.0)
        seen = tl.sum(hp * Ct[None, :, :], axis=2)  # (BLOCK, TIME): C_i · h(p_ik)
        tl.store(dweight_ptr + partial * nprobe + k, tl.sum(dr * seen, axis=0), mask=tmask)
        drw = dr * w.to(ACC)[None, :]
        dC += tl.sum(drw[:, :, None] * hp, axis=0)
        tl.atomic_add(scatter_ptr + at, drw[:, :, None] * Ct[None, :, :], mask=mask3)
    tl.store(dC_ptr + (b * blocks + blk) * nstate * length + n[None, :] * length + t[:, None], dC, mask=mask_tn)


@triton.jit
def _adjoint_kernel(
    u_ptr, delta_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, hidden_ptr, scatter_ptr, dy_ptr, snap_index_ptr, dsnap_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr,
    dim, length, nstate, cpg, blocks, sgroups,
    su_b, su_d, su_t, sd_b, sd_d, sd_t,
    sB_b, sB_g, sB_n, sB_t, sC_b, sC_g, sC_n, sC_t,
    BLOCK: tl.constexpr, NP: tl.constexpr, ACC: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SCATTERED: tl.constexpr, NSNAP: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    d = blk * BLOCK + tl.arange(0, BLOCK)
    n = tl.arange(0, NP)
    dmask, nmask = d < dim, n < nstate
    mask2 = dmask[:, None] & nmask[None, :]
    group = (blk * BLOCK) // cpg
    A = tl.load(A_ptr + d[:, None] * nstate + n[None, :], mask=mask2, other=0.0).to(ACC)
    B_row = B_ptr + b * sB_b + group * sB_g + n * sB_n
    C_row = C_ptr + b * sC_b + group * sC_g + n * sC_n
    row = b * dim * length + d * length
    partial = (b * blocks + blk) * nstate * length + n * length  # (NP,) offsets of the per-block partial sums
    bias = _bias(bias_ptr, d, dmask, BLOCK, ACC, HAS_BIAS)
    g = tl.zeros((BLOCK, NP), dtype=ACC)
    a_next = tl.zeros((BLOCK, NP), dtype=ACC)
    dA = tl.zeros((BLOCK, NP), dtype=ACC)
    for step in range(0, length):
        t = length - 1 - step
        x, dt = _step(delta_ptr, b * sd_b + d * sd_d + t * sd_t, bias, dmask, ACC, SOFTPLUS)
        u = tl.load(u_ptr + b * su_b + d * su_d + t * su_t, mask=dmask, other=0.0).to(ACC)
        Bt = tl.load(B_row + t * sB_t, mask=nmask, other=0.0).to(ACC)
        Ct = tl.load(C_row + t * sC_t, mask=nmask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + row + t, mask=dmask, other=0.0)
        states = hidden_ptr + (row + t)[:, None] * nstate + n[None, :]
        h = tl.load(states, mask=mask2, other=0.0)
        h_prev = tl.load(states - nstate, mask=mask2 & (t > 0), other=0.0)
        a = tl.exp(dt[:, None] * A)
        g = a_next * g + dy[:, None] * Ct[None, :]
        if SCATTERED:
            g += tl.load(scatter_ptr + (row + t)[:, None] * nstate + n[None, :], mask=mask2, other=0.0)
        for s in tl.static_range(NSNAP):
            position, rows = _snapshot_rows(snap_index_ptr, b, d, blk * BLOCK, dim, length, NSNAP, sgroups, s)
            due = mask2 & (position == t)
            g += tl.load(dsnap_ptr + rows[:, None] * nstate + n[None, :], mask=due, other=0.0).to(ACC)
        g_a_hprev = g * a * h_prev
        ddt = tl.sum(g_a_hprev * A + g * u[:, None] * Bt[None, :], axis=1)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(x)
        dA += g_a_hprev * dt[:, None]
        tl.store(du_ptr + row + t, tl.sum(g * Bt[None, :], axis=1) * dt, mask=dmask)
        tl.store(ddelta_ptr + row + t, ddt, mask=dmask)
        tl.store(dB_ptr + partial + t, tl.sum(g * (dt * u)[:, None], axis=0), mask=nmask)
        tl.store(dC_ptr + partial + t, tl.sum(dy[:, None] * h, axis=0), mask=nmask)
        a_next = a
    tl.store(dA_ptr + (b * dim + d)[:, None] * nstate + n[None, :], dA, mask=mask2)


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
        u, x, Bt, _ = _inputs(u_ptr, delta_ptr, B_row, C_row, u_at, delta_at, t0, su_t, sd_t, sB_t, sC_t, bias,
                              dmask, nmask, ACC)  # fmt: skip
        for j in range(0, steps):  # the chunk's states again, from its checkpoint
            following = tl.minimum(t0 + j + 1, length - 1)
            u_next, x_next, B_next, _ = _inputs(u_ptr, delta_ptr, B_row, C_row, u_at, delta_at, following, su_t,
                                                sd_t, sB_t, sC_t, bias, dmask, nmask, ACC)  # fmt: skip
            dt = _dt(x, SOFTPLUS)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(scratch + (j + 1) * BLOCK * NP, h)
            u, x, Bt = u_next, x_next, B_next
        tl.debug_barrier()
        t = t0 + steps - 1
        u, x, Bt, Ct = _inputs(u_ptr, delta_ptr, B_row, C_row, u_at, delta_at, t, su_t, sd_t, sB_t, sC_t, bias,
                               dmask, nmask, ACC)  # fmt: skip
        for back in range(0, steps):  # the adjoint recurrence through the chunk, latest position first
            j = steps - 1 - back
            t = t0 + j
            earlier = tl.maximum(t - 1, 0)
            u_next, x_next, B_next, C_next = _inputs(u_ptr, delta_ptr, B_row, C_row, u_at, delta_at, earlier,
                                                     su_t, sd_t, sB_t, sC_t, bias, dmask, nmask, ACC)  # fmt: skip
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
    """Channels per program: a power of two dividing the channels of every B/C, probe and snapshot group."""
    common = math.gcd(*channels_per_group)
    return min(MAX_BLOCK, common & -common)


def _layout(x: ScanInputs):
    """Sizes of a scan: batch, dim, len, nstate, channels per B/C group and per probe group, channels per
    program, nstate padded to a power of two."""
    batch, dim, length = x.u.shape
    cpg = dim // x.B.shape[1]
    ppg = dim // x.probe.shape[1] if x.probe is not None else cpg
    spg = dim // x.snapshot_index.shape[1] if x.snapshot_index is not None else cpg
    nstate = x.A.shape[1]
    return batch, dim, length, nstate, cpg, ppg, block_size(cpg, ppg, spg), triton.next_power_of_2(nstate)


def _accumulator(u: torch.Tensor) -> tuple[torch.dtype, object]:
    return (torch.float64, tl.float64) if u.dtype == torch.float64 else (torch.float32, tl.float32)


def warps(elements: int) -> int:
    return max(1, min(8, elements // 128))


def _snapshot_args(x: ScanInputs) -> tuple[int, int]:
    """(snapshot groups, snapshots per group) as the kernels take them: (1, 0) without snapshots."""
    index = x.snapshot_index
    return (1, 0) if index is None else (index.shape[1], index.shape[2])


def _scan(x: ScanInputs, gate: bool, want_hidden: bool, want_last: bool, snapshots: bool, checkpoints: bool = False):
    """Runs ``_scan_kernel``: (y or gated out, history, last state, snapshots, chunk checkpoints), None where
    not asked for. The gated output is the scan's result and is written in the input's dtype (no cast
    after); an ungated one feeds the probes and stays in the accumulation dtype."""
    batch, dim, length, nstate, cpg, _, block, np2 = _layout(x)
    acc, ACC = _accumulator(x.u)
    new = functools.partial(torch.empty, device=x.u.device, dtype=acc)
    sgroups, nsnap = _snapshot_args(x) if snapshots else (1, 0)
    nckpt = max(1, triton.cdiv(length, CHUNK) - 1)
    y = new(batch, dim, length, dtype=x.u.dtype if gate else acc)
    hidden = new(batch, dim, length, nstate) if want_hidden else None
    last = new(batch, dim, nstate) if want_last else None
    snaps = new(batch, dim, nsnap, nstate) if nsnap else None
    ckpt = new(batch, dim, nckpt, nstate) if checkpoints else None
    zs = x.z.stride() if x.z is not None else (0, 0, 0)
    _scan_kernel[(batch, triton.cdiv(dim, block))](
        x.u, x.delta, x.delta_bias, x.A, x.B, x.C, x.D, x.z, y, hidden, last, x.snapshot_index, snaps, ckpt,
        dim, length, nstate, cpg, sgroups, nckpt, *x.u.stride(), *x.delta.stride(), *zs, *x.B.stride(),
        *x.C.stride(),
        BLOCK=block, NP=np2, ACC=ACC, HAS_BIAS=x.delta_bias is not None, SOFTPLUS=bool(x.softplus),
        HAS_D=x.D is not None, GATE=gate and x.z is not None, STORE_HIDDEN=want_hidden, STORE_LAST=want_last,
        NSNAP=nsnap, CHUNK=CHUNK, CHECKPOINTS=checkpoints, num_warps=warps(block * np2),
    )  # fmt: skip
    return y, hidden, last, snaps, ckpt


def _readout(x: ScanInputs, hidden, y, gate):
    """Runs ``_readout_kernel``: (out, readout)."""
    batch, dim, length, nstate, cpg, ppg, block, np2 = _layout(x)
    out, readout = torch.empty_like(y), torch.empty_like(y)
    zs = x.z.stride() if x.z is not None else (0, 0, 0)
    grid = (triton.cdiv(length, TIME_BLOCK), triton.cdiv(dim, block), batch)
    _readout_kernel[grid](
        hidden, x.C, x.probe, x.probe_weight, x.probe_scale, y, x.z, out, readout, dim, length, nstate, cpg, ppg,
        x.probe.shape[1], x.probe.shape[3], *x.C.stride(), *zs,
        BLOCK=block, TIME=TIME_BLOCK, NP=np2, ACC=_accumulator(hidden)[1], HAS_SCALE=x.probe_scale is not None,
        GATE=gate and x.z is not None, num_warps=warps(block * TIME_BLOCK * np2),
    )  # fmt: skip
    return out, readout


def forward(x: ScanInputs, want_last: bool, want_hidden: bool, for_backward: bool = False):
    """The scan's :class:`ScanOutput` and what :func:`backward` needs from it: the
    states entering each chunk of :data:`CHUNK` positions (without probes, where a backward will follow)."""
    probes = x.probe is not None
    chunked = for_backward and not probes
    y, hidden, last, snaps, ckpt = _scan(x, not probes, want_hidden or probes, want_last, True, chunked)
    saved = (ckpt,) if chunked else ()
    if not probes:
        return ScanOutput(y, last, None, hidden, snaps), saved
    out, readout = _readout(x, hidden, y, gate=True)
    return ScanOutput(out, last, readout, hidden if want_hidden else None, snaps), saved


def _chunked_backward(x: ScanInputs, grads: GradsOut, checkpoints: torch.Tensor) -> ScanGrads:
    """One ``_backward_kernel`` launch: states recomputed chunk by chunk from ``checkpoints``, and every
    gradient of the chunk written as the adjoint passes, the gate's and the skip's included; then one sum
    over the batch (dA, dD, dΔ bias). dB and dC are summed over a group's channels with atomic adds, so
    their last bits may differ between runs."""
    u, z = x.u, x.z
    batch, dim, length, nstate, cpg, _, block, np2 = _layout(x)
    acc, ACC = _accumulator(u)
    blocks = triton.cdiv(dim, block)
    with_snapshots = grads.snapshots is not None and x.snapshot_index is not None
    sgroups, nsnap = _snapshot_args(x) if with_snapshots else (1, 0)
    new = functools.partial(torch.empty, device=u.device, dtype=acc)
    du, ddelta = torch.empty(u.shape, device=u.device, dtype=u.dtype), torch.empty_like(x.delta)
    dz = torch.empty(z.shape, device=u.device, dtype=z.dtype) if z is not None else None
    scratch = new(batch * blocks * (CHUNK + 1) * block * np2)
    dBC = torch.zeros(batch, x.B.shape[1], 2, nstate, length, device=u.device, dtype=acc)
    small = new(batch, dim, nstate + 2)
    zs = z.stride() if z is not None else (0, 0, 0)
    _backward_kernel[(batch, blocks)](
        u, x.delta, x.delta_bias, x.A, x.B, x.C, x.D, z, grads.out, checkpoints, scratch, x.snapshot_index,
        grads.snapshots.contiguous() if with_snapshots else None, du, ddelta, dz, dBC, small,
        dim, length, nstate, cpg, blocks, sgroups, checkpoints.shape[2], *u.stride(), *x.delta.stride(), *zs,
        *grads.out.stride(), *ddelta.stride(), *x.B.stride(), *x.C.stride(),
        BLOCK=block, NP=np2, ACC=ACC, HAS_BIAS=x.delta_bias is not None, SOFTPLUS=bool(x.softplus),
        HAS_D=x.D is not None, GATE=z is not None, NSNAP=nsnap, CHUNK=CHUNK, num_warps=warps(block * np2),
    )  # fmt: skip
    dBC = dBC.to(x.B.dtype)
    small = small.sum(0)
    return ScanGrads(
        du, ddelta, small[:, nstate + 1].to(x.delta_bias.dtype) if x.delta_bias is not None else None,
        small[:, :nstate].to(x.A.dtype), dBC[:, :, 0], dBC[:, :, 1].to(x.C.dtype),
        small[:, nstate].to(x.D.dtype) if x.D is not None else None, dz, None, None,
    )  # fmt: skip


def _group_sum(partial: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-block partial sums (batch, blocks, ...) summed into (batch, groups, ...)."""
    return partial.view(partial.shape[0], groups, -1, *partial.shape[2:]).sum(2)


def backward(x: ScanInputs, grads: GradsOut, saved: tuple[torch.Tensor, ...] = ()) -> ScanGrads:
    """The inputs' gradients, each in its input's dtype; ``saved`` is what :func:`forward` kept for it."""
    if x.probe is None:
        checkpoints = saved[0] if saved else _scan(x, False, False, False, False, True)[4]
        return _chunked_backward(x, grads, checkpoints)
    u, A, B, C, D, z, probe, weight, scale = x.u, x.A, x.B, x.C, x.D, x.z, x.probe, x.probe_weight, x.probe_scale
    batch, dim, length, nstate, cpg, ppg, block, np2 = _layout(x)
    acc, ACC = _accumulator(u)
    blocks = triton.cdiv(dim, block)
    y, hidden, _, _, _ = _scan(x, False, True, False, False)
    readout = None
    if probe is not None:
        y, readout = _readout(x, hidden, y, gate=False)
    dy = grads.out.to(acc)
    dz = dscale = dweight = None
    if z is not None:
        zf = z.to(acc)
        sig = torch.sigmoid(zf)
        dz = dy * y * sig * (1 + zf * (1 - sig))
        dy = dy * zf * sig
    dr = None if grads.readout is None else grads.readout.to(acc)
    if scale is not None:
        dscale = (dy * readout).sum((0, 2))
        dr = dy * scale.to(acc)[:, None] + (dr if dr is not None else 0)
    dD = (dy * u.to(acc)).sum((0, 2)) if D is not None else None
    dy = dy.contiguous()
    dC_partial = torch.empty(batch, blocks, nstate, length, device=u.device, dtype=acc)
    scatter = dC_probes = None
    if probe is not None and dr is not None:
        scatter, dC_probes = torch.zeros_like(hidden), torch.empty_like(dC_partial)
        dweight_partial = torch.empty(batch, blocks, length, probe.shape[3], device=u.device, dtype=acc)
        _probe_grad_kernel[(triton.cdiv(length, TIME_BLOCK), blocks, batch)](
            hidden, C, probe, weight, dr.contiguous(), scatter, dweight_partial, dC_probes,
            dim, length, nstate, cpg, ppg, probe.shape[1], probe.shape[3], blocks, *C.stride(),
            BLOCK=block, TIME=TIME_BLOCK, NP=np2, ACC=ACC, num_warps=warps(block * TIME_BLOCK * np2),
        )  # fmt: skip
        dweight = _group_sum(dweight_partial, probe.shape[1])
    elif weight is not None:
        dweight = torch.zeros(weight.shape, device=u.device, dtype=acc)
    dsnap = grads.snapshots if x.snapshot_index is not None else None
    sgroups, nsnap = _snapshot_args(x) if dsnap is not None else (1, 0)
    du, ddelta = torch.empty_like(dy), torch.empty_like(dy)
    dA_partial = torch.empty(batch, dim, nstate, device=u.device, dtype=acc)
    dB_partial = torch.empty_like(dC_partial)
    _adjoint_kernel[(batch, blocks)](
        u, x.delta, x.delta_bias, A, B, C, hidden, scatter, dy, x.snapshot_index,
        None if dsnap is None else dsnap.contiguous(), du, ddelta, dA_partial, dB_partial, dC_partial,
        dim, length, nstate, cpg, blocks, sgroups, *u.stride(), *x.delta.stride(), *B.stride(), *C.stride(),
        BLOCK=block, NP=np2, ACC=ACC, HAS_BIAS=x.delta_bias is not None, SOFTPLUS=bool(x.softplus),
        SCATTERED=scatter is not None, NSNAP=nsnap, num_warps=warps(block * np2),
    )  # fmt: skip
    if D is not None:
        du += dy * D.to(acc)[:, None]
    groups = B.shape[1]
    dC = _group_sum(dC_partial if dC_probes is None else dC_partial + dC_probes, groups)
    result = ScanGrads(
        du, ddelta, ddelta.sum((0, 2)) if x.delta_bias is not None else None, dA_partial.sum(0),
        _group_sum(dB_partial, groups), dC, dD, dz, dweight, dscale,
    )  # fmt: skip
    return ScanGrads(*(None if g is None else g.to(getattr(x, name).dtype) for name, g in result._asdict().items()))


__all__ = ["backward", "block_size", "forward"]
