"""The Triton scan, without a GPU: Triton's interpreter against the float64 reference, and every kernel
compiled for sm_80 and sm_90 with its registers and spills reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adaptor_peft.ops import dispatch, selective_scan, selective_scan_fn, selective_scan_reference
from adaptor_peft.ops.dispatch import select_backend
from tests.support.scans import CASES, assert_close, make_inputs, run_with_grads

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    dispatch.triton_backend() is None or not dispatch.triton_backend().INTERPRETED,
    reason="needs triton and TRITON_INTERPRET=1 (set by tests/conftest.py)",
)


def triton_scan(**kwargs):
    return selective_scan(**kwargs, return_last_state=True, return_hidden_states=True, backend="triton")


def check_against_reference(inputs, snapshots, dtype, rtol):
    """Output, last and hidden states, snapshots and every gradient against the float64 reference."""
    expected, expected_grads = run_with_grads(selective_scan_reference, inputs, torch.float64, snapshots)
    actual, grads = run_with_grads(triton_scan, inputs, dtype, snapshots)
    assert actual.out.dtype == dtype
    assert_close(actual.out, expected.out, rtol, "out")
    assert_close(actual.last_state, expected.last_state, rtol, "last_state")
    assert_close(actual.hidden_states, expected.hidden_states, rtol, "hidden_states")
    assert_close(actual.snapshots, expected.snapshots, rtol, "snapshots")
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        assert_close(grads[name], expected_grads[name], rtol, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}d{c[1]}l{c[2]}n{c[3]}g{c[4]}-{c[5]}-{c[6]}-p{c[7]}")
def test_matches_reference_with_snapshots(dtype, case):
    """Snapshots (the sequence's ends and a repeated position among them) and every gradient through them."""
    batch, dim, length, nstate, groups, bc, extras, sgroups = case
    inputs = make_inputs(batch, dim, length, nstate, groups, z=extras, D=extras, bias=extras, bc=bc, seed=length)
    g = torch.Generator().manual_seed(dim)
    positions = torch.randint(0, length, (batch, sgroups, 4), generator=g)
    positions[..., 0], positions[..., 1], positions[..., 2] = 0, length - 1, positions[..., 3]
    expected, expected_grads = run_with_grads(selective_scan_reference, inputs, torch.float64, positions)
    actual, grads = run_with_grads(lambda **kw: selective_scan(**kw, backend="triton"), inputs, dtype, positions)
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    assert actual.snapshots.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(actual.out, expected.out, rtol, "out")
    assert_close(actual.snapshots, expected.snapshots, rtol, "snapshots")
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        assert_close(grads[name], expected_grads[name], rtol, f"d{name}")


class KernelWatch(TorchDispatchMode):
    """Records, from a Triton scan, every kernel launch (``"triton <name>"``) and every PyTorch operation run
    outside the kernels (the interpreter's own are not the scan's) as ``(name, numel of its largest output)``;
    views and allocations are marked, since they launch no work."""

    ALLOCATIONS = ("empty", "empty_like", "empty_strided", "new_empty")

    def __init__(self, monkeypatch):
        super().__init__()
        self.launches, self.ops, self.quiet = [], [], 0
        module = dispatch.triton_backend()
        for name in ("_scan_kernel", "_backward_kernel"):
            monkeypatch.setattr(module, name, self._launcher(getattr(module, name), name))

    def _launcher(self, kernel, name):
        watch = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    watch.launches.append(f"triton {name}")
                    watch.quiet += 1
                    try:
                        return kernel[grid](*args, **kwargs)
                    finally:
                        watch.quiet -= 1

                return launch

        return Launcher()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not self.quiet:
            leaves = [t for t in torch.utils._pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
            self.ops.append((str(func.overloadpacket).split(".")[-1], max((t.numel() for t in leaves), default=0)))
            if not (func.is_view or self.ops[-1][0] in self.ALLOCATIONS):
                self.launches.append(self.ops[-1][0])
        return result


def test_the_backward_recomputes_chunks_from_checkpoints_and_keeps_no_state_history(monkeypatch):
    """Chunks of 4 positions over 18 (the last one partial), snapshots at chunk edges, a gate and a skip:
    every gradient as the reference's, and no tensor the size of the (batch, dim, len, nstate) history is
    ever made, in the forward or the backward."""
    monkeypatch.setattr(dispatch.triton_backend(), "CHUNK", 4)
    batch, dim, length, nstate = 2, 32, 18, 4
    inputs = make_inputs(batch, dim, length, nstate, 2, seed=11)
    positions = torch.tensor([0, 3, 4, 17, 8, 8]).expand(batch, 2, 6).contiguous()
    expected, expected_grads = run_with_grads(selective_scan_reference, inputs, torch.float64, positions)
    with KernelWatch(monkeypatch) as watch:
        actual, grads = run_with_grads(
            lambda **kw: selective_scan(**kw, backend="triton"), inputs, torch.float64, positions
        )
    assert {"triton _scan_kernel", "triton _backward_kernel"} <= set(watch.launches)
    assert max(numel for _, numel in watch.ops) < batch * dim * length * nstate
    assert_close(actual.out, expected.out, 1e-10, "out")
    assert_close(actual.snapshots, expected.snapshots, 1e-10, "snapshots")
    for name in grads:
        assert_close(grads[name], expected_grads[name], 1e-10, f"d{name}")


def test_a_scan_with_snapshots_takes_at_most_six_launches(monkeypatch):
    """Forward and backward of Adaptor-T's memory scan as a Vim direction runs it: every Triton kernel
    launch and every PyTorch operation that computes counts."""
    inputs = make_inputs(2, 32, 9, 4, 1, bc="variable", seed=12)
    leaves = {k: v.float().requires_grad_() for k, v in inputs.items()}
    index = torch.tensor([[[1, 2, 7, 8]]]).expand(2, 2, 4).contiguous()
    result = selective_scan(**leaves, delta_softplus=True, snapshot_index=index, backend="triton")
    cotangents = [torch.ones_like(result.out), torch.ones_like(result.snapshots)]
    with KernelWatch(monkeypatch) as watch:
        result = selective_scan(**leaves, delta_softplus=True, snapshot_index=index, backend="triton")
        torch.autograd.grad([result.out, result.snapshots], list(leaves.values()), cotangents)
    assert watch.launches.count("triton _scan_kernel") == watch.launches.count("triton _backward_kernel") == 1
    assert len(watch.launches) <= 6, watch.launches


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"b{c[0]}d{c[1]}l{c[2]}n{c[3]}g{c[4]}-{c[5]}-{c[6]}")
def test_plain_scan_matches_reference(case):
    """Without snapshots or hidden states, through mamba-ssm's entry point."""
    batch, dim, length, nstate, groups, bc, extras, _ = case
    inputs = make_inputs(batch, dim, length, nstate, groups, z=extras, D=extras, bias=extras, bc=bc, seed=length)
    expected, expected_grads = run_with_grads(selective_scan_reference, inputs, torch.float64)
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, backend="triton")
    assert_close(out, expected.out, 1e-10, "out")
    assert_close(last, expected.last_state, 1e-10, "last_state")
    g = torch.Generator().manual_seed(1)
    (out * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum().backward()
    for name, leaf in leaves.items():
        if leaf is not None:
            assert_close(leaf.grad, expected_grads[name], 1e-10, f"d{name}")


def test_raw_step_without_softplus_or_bias():
    inputs = make_inputs(2, 32, 6, 4, 1, bias=False, seed=4)
    inputs["delta"] = inputs["delta"].abs()
    reference, ours = ({k: None if v is None else v.clone().requires_grad_() for k, v in inputs.items()} for _ in "ab")
    expected, actual = selective_scan_reference(**reference).out, selective_scan(**ours, backend="triton").out
    assert_close(actual, expected, 1e-10, "out")
    expected.sum().backward()
    actual.sum().backward()
    for name, leaf in ours.items():
        if leaf is not None:
            assert_close(leaf.grad, reference[name].grad, 1e-10, f"d{name}")


def test_single_position_sequence_with_snapshots_and_states():
    inputs = make_inputs(3, 32, 1, 4, 1, bc="variable", seed=2)
    check_against_reference(inputs, torch.zeros(3, 2, 2, dtype=torch.long), torch.float64, 1e-10)


def test_bfloat16_inputs_accumulate_in_float32():
    """bf16 activations with float32 parameters, as under autocast: each read in its own dtype, states and
    sums in float32, so the result equals the float64 reference on the bf16-rounded inputs up to the output's
    own bf16 rounding."""
    batch, dim, length = 2, 32, 24
    inputs = make_inputs(batch, dim, length, 8, 1, bc="variable", seed=3)
    index = torch.randint(0, length, (batch, 2, 4), generator=torch.Generator().manual_seed(3))
    activations = ("u", "delta", "B", "C", "z")
    rounded = {k: v.to(torch.bfloat16).double() if k in activations else v for k, v in inputs.items()}
    reference = {k: v.detach().clone().requires_grad_() for k, v in rounded.items()}
    expected = selective_scan_reference(**reference, delta_softplus=True, snapshot_index=index)
    g = torch.Generator().manual_seed(1)
    cotangent = torch.randn(expected.out.shape, generator=g, dtype=torch.float64)
    snap_cotangent = torch.randn(expected.snapshots.shape, generator=g, dtype=torch.float64)
    ((expected.out * cotangent).sum() + (expected.snapshots * snap_cotangent).sum()).backward()
    leaves = {
        k: (v.to(torch.bfloat16) if k in activations else v.float()).detach().requires_grad_()
        for k, v in inputs.items()
    }
    result = triton_scan(**leaves, delta_softplus=True, snapshot_index=index)
    assert result.out.dtype == torch.bfloat16 and result.hidden_states.dtype == result.snapshots.dtype == torch.float32
    assert_close(result.hidden_states, expected.hidden_states, 1e-5, "hidden_states (float32)")
    assert_close(result.snapshots, expected.snapshots, 1e-5, "snapshots (float32)")
    assert_close(result.out, expected.out, 1e-2, "out (bf16)")
    ((result.out.float() * cotangent.float()).sum() + (result.snapshots * snap_cotangent.float()).sum()).backward()
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == leaf.dtype, name
        assert_close(leaf.grad, reference[name].grad, 2e-2, f"d{name}")


def test_backend_selection_on_cuda(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(dispatch.triton_backend(), "INTERPRETED", False)  # kernels built for GPUs
    assert not dispatch._triton_runs_on(torch.device("cpu"))
    monkeypatch.setattr(dispatch, "mamba_ssm_runs", lambda device: True)
    assert select_backend(cuda, torch.bfloat16) == "mamba_ssm"  # plain scans: mamba-ssm where it imports
    assert select_backend(cuda, torch.float32, needs_states=True) == "triton"  # snapshots: always ours
    monkeypatch.setattr(dispatch, "mamba_ssm_runs", lambda device: False)
    assert select_backend(cuda, torch.float32) == "triton"
    monkeypatch.setattr(dispatch, "triton_backend", lambda: None)
    assert select_backend(cuda, torch.float32, needs_states=True) == "torch"
    with pytest.raises(RuntimeError, match="'triton' needs"):
        select_backend(cuda, torch.float32, requested="triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    cpu = torch.device("cpu")
    assert select_backend(cpu, torch.float32, requested="triton") == "triton"
    assert select_backend(cpu, torch.float32, needs_states=True) != "triton"  # never chosen on CPU by itself
    monkeypatch.setattr(dispatch.triton_backend(), "INTERPRETED", False)  # kernels built for GPUs
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend(cpu, torch.float32, requested="triton")


def test_position_range_check_does_not_stall_the_triton_backend(monkeypatch):
    """The check reads positions back to the host, which would stall a GPU: the Triton kernels clamp them
    instead, and every other backend (which would crash on a bad position) is checked. Meta tensors stand in
    for a GPU's: reading one back fails, so any read shows."""
    index = torch.full((1, 1, 2), 7, device="meta", dtype=torch.long)
    dispatch._check_range(index, 5, "triton")
    with pytest.raises((RuntimeError, NotImplementedError)):
        dispatch._check_range(index, 5, "torch")
    monkeypatch.setenv(dispatch.CHECK_POSITIONS_ENV, "1")
    with pytest.raises((RuntimeError, NotImplementedError)):
        dispatch._check_range(index, 5, "triton")
    with pytest.raises(ValueError, match=r"snapshot_index values must lie in \[0, 5\), got \[7, 7\]"):
        dispatch._check_range(torch.full((1, 1, 2), 7), 5, "triton")


def test_clamped_positions_snapshot_the_sequence_ends():
    """Without the check, positions past either end snapshot the first or the last state."""
    inputs = make_inputs(1, 32, 6, 4, 1, bc="variable", seed=6)
    outside, clamped = torch.tensor([[[-3, 9]]]), torch.tensor([[[0, 5]]])
    got = selective_scan(**inputs, snapshot_index=outside, backend="triton").snapshots
    expected = selective_scan_reference(**inputs, snapshot_index=clamped).snapshots
    assert_close(got, expected, 1e-10, "snapshots")


def test_non_contiguous_parameters():
    """A, D and the Δ bias as strided or expanded views give the same numbers as contiguous ones."""
    inputs = make_inputs(2, 32, 7, 4, 1, bc="variable", seed=7)
    strided = dict(inputs, A=inputs["A"].t().contiguous().t(), D=inputs["D"][0].expand(32),
                   delta_bias=torch.stack([inputs["delta_bias"]] * 2, 1)[:, 0])  # fmt: skip
    assert not strided["A"].is_contiguous() and strided["D"].stride() == (0,)
    expected = selective_scan_reference(**strided, delta_softplus=True).out
    assert_close(selective_scan(**strided, delta_softplus=True, backend="triton").out, expected, 1e-10, "out")


# --- compiled for real GPUs ---------------------------------------------------------------------------------

KERNEL_REPORT = Path(__file__).resolve().parents[2] / "benchmarks" / "triton_kernels.py"
NVIDIA_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (NVIDIA_TOOLS / "cuobjdump").exists(), reason="triton without its NVIDIA tools")
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(capsys):
    """Compiled (not interpreted, so in a fresh process) at the Vim-S layout with bf16 activations."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, str(KERNEL_REPORT), "--json"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout)
    kernels = ("scan, plain (inference)", "scan, 4 snapshots and checkpoints (training)",
               "scan, writing the hidden states", "backward, chunked, 4 snapshots")  # fmt: skip
    assert sorted((r["kernel"], r["capability"]) for r in rows) == sorted((k, c) for k in kernels for c in (80, 90))
    with capsys.disabled():
        print("".join(f"\nsm_{r['capability']} {r['kernel']}: {r['REG']} registers, {r['STACK']} stack bytes"
                      for r in rows))  # fmt: skip
    spilling = [f"{r['kernel']} on sm_{r['capability']}: {r}" for r in rows if r["STACK"] or r["LOCAL"]]
    assert not spilling, f"register spills: {spilling}"
