"""The selective scan: every backend against the float64 sequential reference, outputs and gradients."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import time
from types import SimpleNamespace

import pytest
import torch

from adaptor_peft.ops import dispatch as scan_module
from adaptor_peft.ops import native, scan_torch, selective_scan, selective_scan_fn, selective_scan_reference
from adaptor_peft.ops.dispatch import select_backend
from adaptor_peft.ops.records import GradsOut, ScanInputs
from tests.support.official import scan_ref
from tests.support.scans import CASES, assert_close, make_inputs, run_with_grads

CPU_BACKENDS = [
    "torch",
    pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="no C compiler")),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}d{c[1]}l{c[2]}n{c[3]}g{c[4]}-{c[5]}-{c[6]}-p{c[7]}")
@pytest.mark.parametrize("states", [True, False], ids=["with-states", "training"])
@pytest.mark.parametrize("with_snapshots", [True, False], ids=["snapshots", "plain"])
def test_matches_reference_outputs_and_gradients(backend, dtype, case, states, with_snapshots):
    """``states``: also the last and every hidden state; without them, the path an adaptor trains on.
    ``with_snapshots``: Adaptor-T's memory, repeated positions included."""
    batch, dim, length, nstate, groups, bc, extras, sgroups = case
    inputs = make_inputs(batch, dim, length, nstate, groups, z=extras, D=extras, bias=extras, bc=bc, seed=dim + length)
    g = torch.Generator().manual_seed(length)
    snapshots = torch.randint(0, length, (batch, sgroups, 5), generator=g) if with_snapshots else None
    expected, expected_grads = run_with_grads(selective_scan_reference, inputs, torch.float64, snapshots)
    actual, grads = run_with_grads(
        lambda **kw: selective_scan(**kw, return_last_state=states, return_hidden_states=states, backend=backend),
        inputs,
        dtype,
        snapshots,
    )
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    assert actual.out.dtype == dtype
    assert_close(actual.out, expected.out, rtol, "out")
    if with_snapshots:
        assert actual.snapshots.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(actual.snapshots, expected.snapshots, rtol, "snapshots")
    if states:
        assert_close(actual.last_state, expected.last_state, rtol, "last_state")
        assert_close(actual.hidden_states, expected.hidden_states, rtol, "hidden_states")
    else:
        assert actual.last_state is None and actual.hidden_states is None
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        assert_close(grads[name], expected_grads[name], rtol, f"d{name}")


def in_sequence_order(scan):
    """``scan`` run on the flipped sequence, its output and hidden states flipped back: what a reverse scan
    computes (snapshot positions count scan steps, so they pass unchanged)."""

    def reversed_scan(**kw):
        kw.update({k: kw[k].flip(-1) for k in ("u", "delta", "B", "C", "z") if kw[k] is not None and kw[k].dim() > 2})
        result = scan(**kw)
        hidden = None if result.hidden_states is None else result.hidden_states.flip(2)
        return result._replace(out=result.out.flip(-1), hidden_states=hidden)

    return reversed_scan


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}d{c[1]}l{c[2]}n{c[3]}g{c[4]}-{c[5]}-{c[6]}-p{c[7]}")
def test_a_reverse_scan_is_the_scan_of_the_flipped_sequence(backend, dtype, case):
    """Every output and gradient, with states and snapshots, in the mixer's layouts (u, Δ and z views of
    (batch, len, dim) tensors): the compiled kernel reads them backwards in place."""
    batch, dim, length, nstate, groups, bc, extras, sgroups = case
    inputs = make_inputs(batch, dim, length, nstate, groups, z=extras, D=extras, bias=extras, bc=bc, seed=dim + length)
    inputs.update({k: v.transpose(1, 2).contiguous().transpose(1, 2) for k, v in inputs.items()
                   if k in ("u", "delta", "z") and v is not None})  # fmt: skip
    snapshots = torch.randint(0, length, (batch, sgroups, 5), generator=torch.Generator().manual_seed(length))
    flipped = in_sequence_order(lambda **kw: selective_scan_reference(**kw))
    expected, expected_grads = run_with_grads(flipped, inputs, torch.float64, snapshots)
    actual, grads = run_with_grads(
        lambda **kw: selective_scan(**kw, return_last_state=True, return_hidden_states=True, reverse=True,
                                    backend=backend), inputs, dtype, snapshots,
    )  # fmt: skip
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    for name in ("out", "snapshots", "last_state", "hidden_states"):
        assert_close(getattr(actual, name), getattr(expected, name), rtol, name)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        assert_close(grads[name], expected_grads[name], rtol, f"d{name}")


def test_a_reverse_scan_on_flipped_copies_keeps_the_callers_tensors_for_the_backward():
    """A backend without a reverse scan flips in its forward and again in its backward, so that what autograd
    keeps is the caller's u and z, which a mixer's activation recomputation can drop and rebuild."""
    inputs = make_inputs(2, 16, 9, 4, 1, bc="variable", seed=4)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.data_ptr()) or t, lambda t: t):
        out = selective_scan(**leaves, delta_softplus=True, reverse=True, backend="torch").out
    assert leaves["u"].data_ptr() in kept and leaves["z"].data_ptr() in kept
    out.sum().backward()  # gradients: test_a_reverse_scan_is_the_scan_of_the_flipped_sequence


@pytest.mark.parametrize("last", [False, True])
def test_a_reverse_scan_through_mamba_ssms_kernel_flips_around_it(monkeypatch, last):
    """mamba-ssm's kernel has no reverse scan: it gets flipped copies (a stand-in with its signature here)."""
    kernel = functools.partial(selective_scan_fn, backend="torch")
    monkeypatch.setattr(scan_module, "mamba_ssm_kernel", lambda: kernel)
    auto = scan_module.select_backend
    monkeypatch.setattr(scan_module, "select_backend", lambda *args: "mamba_ssm" if args[-1] is None else auto(*args))
    inputs = make_inputs(2, 16, 9, 4, 1, bc="variable", seed=4)
    ours = selective_scan(**inputs, delta_softplus=True, reverse=True, return_last_state=last)
    expected = in_sequence_order(selective_scan_reference)(**inputs, delta_softplus=True)
    assert_close(ours.out, expected.out, 1e-10, "out")
    assert (ours.last_state is not None) == last
    if last:
        assert_close(ours.last_state, expected.last_state, 1e-10, "last_state")


def test_reference_follows_mamba_semantics():
    """Our oracle agrees with mamba-ssm's selective_scan_ref algorithm (written out independently)."""
    inputs = make_inputs(2, 8, 11, 4, 1, bc="variable")
    ours = selective_scan_reference(**inputs, delta_softplus=True).out
    theirs = scan_ref(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"],
                      inputs["delta_bias"])  # fmt: skip
    assert_close(ours, theirs, 1e-12, "out")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_snapshots_are_the_states_at_their_positions(backend):
    """snapshots[b, d, s] = h[b, d, index[b, g(d), s]], each channel group with its own positions."""
    inputs = make_inputs(2, 48, 11, 4, 1, bc="variable", seed=8)
    index = torch.tensor([[[10, 0, 3], [5, 5, 1], [2, 9, 9]], [[0, 1, 2], [10, 10, 10], [7, 4, 0]]])
    result = selective_scan(
        **inputs, delta_softplus=True, snapshot_index=index, return_hidden_states=True, backend=backend
    )
    h = result.hidden_states
    assert result.snapshots.shape == (2, 48, 3, 4)
    for b, d, s in [(0, 0, 0), (0, 47, 2), (1, 16, 1), (1, 33, 0), (0, 20, 1)]:
        assert torch.equal(result.snapshots[b, d, s], h[b, d, index[b, d // 16, s]])


def test_bad_snapshot_positions_are_rejected():
    inputs = make_inputs(1, 16, 5, 2, 1, bc="variable")
    with pytest.raises(ValueError, match=r"snapshot_index values must lie in \[0, 5\)"):
        selective_scan(**inputs, snapshot_index=torch.full((1, 2, 3), 5))
    with pytest.raises(TypeError, match="snapshot_index must hold integer"):
        selective_scan(**inputs, snapshot_index=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="snapshot_index must be"):
        selective_scan(**inputs, snapshot_index=torch.zeros(1, 3, 2, dtype=torch.long))


@pytest.mark.skipif(not native.available(), reason="no C compiler")
def test_native_library_and_its_python_mirror_agree_on_the_arguments(monkeypatch):
    """The C library reports its ScanArgs' size; a mirror that lost a field is refused, naming both sizes."""
    lib = native._library(False)
    assert lib.scan_args_size() == ctypes.sizeof(native._ScanArgs)

    class Shorter(ctypes.Structure):
        _fields_ = native._ScanArgs._fields_[:-1]

    monkeypatch.setattr(native, "_ScanArgs", Shorter)
    native._build.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"ScanArgs of .* bytes, its Python mirror"):
            native.available()
    finally:
        native._build.cache_clear()


def test_selective_scan_fn_has_mamba_return_contract():
    inputs = make_inputs(1, 16, 5, 2, 1, bc="variable")
    out = selective_scan_fn(**inputs, delta_softplus=True)
    out2, last = selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True)
    assert torch.equal(out, out2)
    assert last.shape == (1, 16, 2)


def test_torch_path_bounds_its_blocks(monkeypatch):
    """With a tiny element budget the PyTorch scan works channel by channel and gives the same result."""
    inputs = make_inputs(2, 24, 9, 3, 3)
    index = torch.randint(0, 9, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    whole = selective_scan(**inputs, delta_softplus=True, snapshot_index=index, backend="torch")
    monkeypatch.setenv("ADAPTOR_PEFT_SCAN_BLOCK", "1")
    assert len(scan_torch._blocks(2, 24, 9, 3, torch.zeros(1))) == 24
    blocked = selective_scan(**inputs, delta_softplus=True, snapshot_index=index, backend="torch")
    assert torch.allclose(whole.out, blocked.out, atol=1e-12)
    assert torch.allclose(whole.snapshots, blocked.snapshots, atol=1e-12)


def test_torch_path_sizes_blocks_for_the_device(monkeypatch):
    """On a GPU the blocks follow free memory (few large ones); on the CPU a cache-sized budget."""
    monkeypatch.delenv("ADAPTOR_PEFT_SCAN_BLOCK", raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * 2**30)  # 4 GiB cached, unused
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * 2**30)
    cuda = torch.device("cuda")
    shape = (64, 768, 197, 16)  # Vim-S at batch 64
    assert len(scan_torch._blocks(*shape, torch.zeros(1))) == 77  # 10 channels a block
    assert scan_torch.element_budget(cuda) == 64 * 2**30 // (4 * scan_torch.LIVE_BLOCKS)
    assert scan_torch.element_budget(cuda, 8) == scan_torch.element_budget(cuda) // 2  # float64
    on_gpu = SimpleNamespace(device=cuda, element_size=lambda: 4)  # a CUDA float32 tensor, as _blocks sees it
    assert len(scan_torch._blocks(*shape, on_gpu)) == 1
    monkeypatch.setenv("ADAPTOR_PEFT_SCAN_BLOCK", "4096")
    assert scan_torch.element_budget(torch.device("cuda")) == 4096


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(u=torch.zeros(2, 8)), "u must be"),
        (dict(A=torch.zeros(7, 4)), "A must be"),
        (dict(delta=torch.zeros(1, 8, 6)), "delta must have shape"),
        (dict(B=torch.zeros(1, 3, 4, 5)), "B must be"),
        (dict(D=torch.zeros(3)), "D must have shape"),
    ],
)
def test_bad_shapes_name_the_input(change, message):
    inputs = {**make_inputs(1, 8, 5, 4, 1, bc="variable"), **change}
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs)


def test_backend_selection(monkeypatch):
    """The rules without Triton (tests/test_scan_triton.py has them with it)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(scan_module, "triton_backend", lambda: None)
    monkeypatch.setattr(scan_module, "mamba_ssm_runs", lambda device: True)
    assert select_backend(cuda, torch.float16) == "mamba_ssm"
    assert select_backend(cuda, torch.float32, needs_states=True) == "torch"  # snapshots need our scan
    assert select_backend(cuda, torch.float32, requested="torch") == "torch"
    monkeypatch.setattr(scan_module, "mamba_ssm_runs", lambda device: False)
    assert select_backend(cuda, torch.float32) == "torch"
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        select_backend(cuda, torch.float32, requested="mamba_ssm")
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        select_backend(cpu, torch.float32, requested="mamba_ssm")
    expected_cpu = "native" if native.available() else "torch"
    assert select_backend(cpu, torch.float32) == expected_cpu
    assert select_backend(cpu, torch.bfloat16, needs_states=True) == expected_cpu  # computed in float32
    with pytest.raises(ValueError, match="expected one of"):
        select_backend(cpu, torch.float32, requested="cuda-please")
    with pytest.raises(RuntimeError, match="'native' needs CPU tensors"):
        select_backend(cuda, torch.float32, requested="native")
    monkeypatch.setenv("ADAPTOR_PEFT_SCAN_BACKEND", "torch")
    assert select_backend(cpu, torch.float32) == "torch"


def test_mamba_ssm_is_chosen_only_where_its_kernel_runs(monkeypatch):
    """mamba-ssm 2.3 and later, installed plainly, import but raise at the first scan: such a kernel is
    found out by one tiny call (once per device, with a warning) and plain scans go to our kernels."""

    def broken(*args, **kwargs):
        raise RuntimeError("selective_scan_cuda was not built")

    def working(u, delta, A, B, C, *args, **kwargs):
        return selective_scan_reference(u, delta, A, B, C).out

    cpu = torch.device("cpu")
    assert scan_module.kernel_runs(working, cpu) and not scan_module.kernel_runs(broken, cpu)
    monkeypatch.setattr(scan_module, "mamba_ssm_kernel", lambda: broken)
    monkeypatch.setattr(scan_module, "triton_backend", lambda: None)
    scan_module.mamba_ssm_runs.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="MAMBA_KEEP_CUDA_BUILD=TRUE"):
            assert not scan_module.mamba_ssm_runs(cpu)
        assert not scan_module.mamba_ssm_runs(cpu)  # cached: no second call, no second warning
        with pytest.warns(RuntimeWarning, match="kernel fails on cuda"):
            assert select_backend(torch.device("cuda"), torch.float32) == "torch"
        monkeypatch.setattr(scan_module, "mamba_ssm_kernel", lambda: working)
        scan_module.mamba_ssm_runs.cache_clear()
        assert scan_module.mamba_ssm_runs(cpu)
    finally:
        scan_module.mamba_ssm_runs.cache_clear()


def test_damaged_kernel_cache_is_rebuilt(monkeypatch, tmp_path):
    if not native.available():
        pytest.skip("no C compiler")
    monkeypatch.setenv("ADAPTOR_PEFT_CACHE", str(tmp_path))
    native._build.cache_clear()
    try:
        assert native.available()
        for built in tmp_path.glob("*.so"):  # replaced, not overwritten: this process has the old one mapped
            damaged = built.with_suffix(".tmp")
            damaged.write_bytes(b"not a shared library")
            damaged.replace(built)
        native._build.cache_clear()
        assert native.available()
        inputs = make_inputs(1, 16, 5, 2, 1, bc="variable")
        expected = selective_scan_reference(**inputs, delta_softplus=True).out
        assert torch.allclose(selective_scan(**inputs, delta_softplus=True, backend="native").out, expected)
    finally:
        native._build.cache_clear()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not native.available(), reason="x86 compiler")
def test_kernel_built_for_another_cpu_target(monkeypatch, tmp_path):
    """$ADAPTOR_PEFT_CPU_TARGET builds (and caches) the kernels for that -march target, here AVX2 + FMA,
    with the same results; a target the compiler does not know warns and falls back to PyTorch."""
    monkeypatch.setenv("ADAPTOR_PEFT_CACHE", str(tmp_path))
    inputs = make_inputs(2, 48, 9, 4, 2, seed=3)
    expected = selective_scan_reference(**inputs, delta_softplus=True).out
    monkeypatch.setenv(native.TARGET_ENV, "x86-64-v3")
    assert native.cpu_target() == "x86-64-v3" and native.available()
    assert_close(selective_scan(**inputs, delta_softplus=True, backend="native").out, expected, 1e-10, "out")
    monkeypatch.setenv(native.TARGET_ENV, "no-such-cpu")
    with pytest.warns(RuntimeWarning, match="using the PyTorch scan"):
        assert not native.available()
    assert select_backend(torch.device("cpu"), torch.float32) == "torch"
    assert len(list(tmp_path.glob("*.so"))) == 2  # x86-64-v3 in float32 and float64; the failed builds left none


@pytest.mark.skipif(not native.available(), reason="no C compiler")
def test_a_new_build_prunes_builds_not_loaded_for_a_month(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTOR_PEFT_CACHE", str(tmp_path))
    month_ago = time.time() - (native.STALE_DAYS + 1) * 86400
    names = {"adaptor_peft_cpu_f32_0ld.so": month_ago, "building_x.so": month_ago,
             "adaptor_peft_cpu_f32_rec3nt.so": time.time() - 86400, "not_ours.so": month_ago}  # fmt: skip
    for name, when in names.items():
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (when, when))
    native._build.cache_clear()
    try:
        assert native.available()
        built = set(tmp_path.glob("*.so")) - {tmp_path / n for n in names}
        assert len(built) == 1
        build = built.pop()
        assert time.time() - build.stat().st_mtime < 600
        assert sorted(p.name for p in tmp_path.glob("*.so") if p.name in names) == [
            "adaptor_peft_cpu_f32_rec3nt.so",
            "not_ours.so",
        ]
        os.utime(build, (month_ago, month_ago))
        native._build.cache_clear()
        assert native.available() and time.time() - build.stat().st_mtime < 600  # loading keeps it fresh
    finally:
        native._build.cache_clear()


def test_native_build_failure_falls_back_to_torch(monkeypatch, tmp_path):
    """A compiler that fails gives a warning and the PyTorch scan, never an error."""
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("ADAPTOR_PEFT_CACHE", str(tmp_path))
    native._build.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="using the PyTorch scan"):
            assert not native.available()
        assert select_backend(torch.device("cpu"), torch.float32) == "torch"
    finally:
        native._build.cache_clear()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inputs_and_output_gradient_in_a_mixers_layouts(backend):
    """As a Vim mixer calls it: u and z the two halves of a (batch, len, 2 dim) projection, Δ a view of a
    (batch, len, dim) one, and the output's gradient arriving transposed. The native kernel writes dΔ in Δ's
    layout, and out, du and dz with channels adjacent like u and z, so that the projections around the scan
    need no copies."""
    batch, dim, length, nstate = 2, 40, 13, 16  # 40: two full lane blocks and a part-filled one
    ref = make_inputs(batch, dim, length, nstate, 1, bc="variable", seed=5)
    g = torch.Generator().manual_seed(6)
    cotangent = torch.randn(batch, length, dim, generator=g, dtype=torch.float64)
    grads = []
    for laid_out in (False, True):
        leaves = {k: v.clone().requires_grad_() for k, v in ref.items()}
        if laid_out:
            delta_rows = ref["delta"].transpose(1, 2).contiguous().requires_grad_()
            xz = torch.cat([ref["u"], ref["z"]], dim=1).transpose(1, 2).contiguous().requires_grad_()
            leaves.update(delta=delta_rows, u=xz, z=xz)
            halves = xz.transpose(1, 2).split(dim, dim=1)
            args = {**leaves, "delta": delta_rows.transpose(1, 2), "u": halves[0], "z": halves[1]}
        else:
            args = leaves
        fn = selective_scan_reference if not laid_out else lambda **kw: selective_scan(**kw, backend=backend)
        out = fn(**args, delta_softplus=True).out
        (out.transpose(1, 2) * cotangent).sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
        if laid_out:
            grads[-1].update(delta=delta_rows.grad.transpose(1, 2), u=xz.grad.transpose(1, 2)[:, :dim],
                             z=xz.grad.transpose(1, 2)[:, dim:])  # fmt: skip
            if backend == "native":
                assert out.stride(1) == 1, "out: channels adjacent, like u"
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], 1e-10, f"d{name}")
    if backend == "native":
        delta = ref["delta"].transpose(1, 2).contiguous().transpose(1, 2)
        u, z = (h.transpose(1, 2).contiguous().transpose(1, 2) for h in (ref["u"], ref["z"]))
        A, B, C, dout = ref["A"], ref["B"].unsqueeze(1), ref["C"].unsqueeze(1), cotangent.transpose(1, 2)
        grads = native.backward(ScanInputs(u, delta, A, B, C, z=z, softplus=True), GradsOut(dout))
        assert grads.u.stride() == u.stride() and grads.z.stride() == z.stride()
        record = ScanInputs(ref["u"], delta, A, B, C, softplus=True)
        assert native.forward(record, False, False)[0].out.is_contiguous(), "out: contiguous, like u"
        assert native.backward(record, GradsOut(dout)).delta.stride() == delta.stride()
