"""The Triton scan's kernels compiled for GPUs, on any machine: registers and spills, and the memory-traffic
bound of one scan. Needs no GPU (Triton compiles for a target it is told) but Triton's NVIDIA tools.

Registers and stack bytes per thread are read from each compiled kernel with the ``cuobjdump`` that
ships with Triton; register spills go to the stack, so a kernel that does not spill has none. The
traffic model counts the bytes each kernel must move through GPU memory for one Vim-S scan direction
(bf16 activations, float32 states) and divides by the memory bandwidth: the time no implementation of
the same algorithm can beat, the bound to compare a GPU measurement with.

    python benchmarks/triton_kernels.py [--batch 64 --dim 768 --length 197 --nstate 16 --probes 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile real kernels even when run from the test session
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from adaptor_peft.ops import scan_triton as st

BANDWIDTH_TBS = {"A100 80GB (sm_80)": 2.0, "H100 SXM (sm_90)": 3.35, "H200 (sm_90)": 4.8}


def tool(name: str) -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def kernel_configs(nstate: int) -> dict:
    """Every kernel as the dispatcher launches it at the Vim-S layout (32 channels a program), bf16 activations."""
    activations = {name: "*bf16" for name in ("u_ptr", "delta_ptr", "z_ptr", "B_ptr", "C_ptr")}
    activations["snap_index_ptr"] = "*i64"
    probes = {**activations, "probe_ptr": "*i64"}
    common = dict(BLOCK=st.MAX_BLOCK, NP=triton.next_power_of_2(nstate), ACC=tl.float32)
    step = dict(HAS_BIAS=True, SOFTPLUS=True)
    scan = dict(**common, **step, HAS_D=True, STORE_LAST=False)
    tile = st.MAX_BLOCK * st.TIME_BLOCK * common["NP"]
    sequential = st.MAX_BLOCK * common["NP"]
    return {
        "scan, plain (gated, no history)": (
            st._scan_kernel, {**scan, "GATE": True, "STORE_HIDDEN": False, "NSNAP": 0}, activations, sequential
        ),
        "scan, with 4 snapshots": (
            st._scan_kernel, {**scan, "GATE": True, "STORE_HIDDEN": False, "NSNAP": 4}, activations, sequential
        ),
        "scan, writing the history": (
            st._scan_kernel, {**scan, "GATE": False, "STORE_HIDDEN": True, "NSNAP": 0}, activations, sequential
        ),
        "probe readout": (
            st._readout_kernel, {**common, "TIME": st.TIME_BLOCK, "HAS_SCALE": True, "GATE": True}, probes, tile
        ),
        "probe gradients": (st._probe_grad_kernel, {**common, "TIME": st.TIME_BLOCK}, probes, tile),
        "adjoint scan": (
            st._adjoint_kernel, {**common, **step, "SCATTERED": True, "NSNAP": 0}, activations, sequential
        ),
        "adjoint scan, with 4 snapshots' gradients": (
            st._adjoint_kernel, {**common, **step, "SCATTERED": False, "NSNAP": 4}, activations, sequential
        ),
    }  # fmt: skip


def compile_for(kernel, constexprs: dict, pointer_types: dict, capability: int, num_warps: int):
    signature = {
        p.name: "constexpr" if p.is_constexpr else pointer_types.get(p.name, "*fp32") if p.name.endswith("_ptr")
        else "i32"
        for p in kernel.params
    }  # fmt: skip
    source = ASTSource(kernel, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=num_warps))


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack bytes (where spills go) and local-memory bytes per thread, as cuobjdump reports them."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        report = subprocess.run(
            [tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
        )
    fields = dict(item.split(":", 1) for item in report.stdout.split() if ":" in item and item[:1].isupper())
    return {name: int(fields[name]) for name in ("REG", "STACK", "LOCAL")}


def compile_all(nstate: int = 16) -> list[dict]:
    rows = []
    for capability in (80, 90):
        for name, (kernel, constexprs, pointers, elements) in kernel_configs(nstate).items():
            compiled = compile_for(kernel, constexprs, pointers, capability, st.warps(elements))
            rows.append(dict(kernel=name, capability=capability, **resource_usage(compiled.asm["cubin"])))
    return rows


def traffic(batch: int, dim: int, length: int, nstate: int, probes: int) -> dict[str, float]:
    """Bytes one scan direction moves through GPU memory, per pass (bf16 activations, float32 states).

    Sequence tensors (batch, dim, len): u, Δ, z read as bf16; the float32 output written and cast to bf16.
    B and C are read once per channel block from L2, so they count once. The history is float32 states.
    Probe reads are counted two ways: from cache after a history row's first read (the probe kernels walk
    the positions of one channel block together, so rows probed by neighbouring queries stay in L2), and
    every read from memory (the worst case).
    """
    seq = batch * dim * length
    history = seq * nstate * 4
    bc = 2 * batch * nstate * length * 2
    plain_forward = seq * (3 * 2 + 4 + 4 + 2) + bc
    plain_backward = seq * (3 * 2 + 4) + bc + 3 * history + seq * (4 * 4)  # recompute, adjoint, gradients
    rows = {"plain forward": plain_forward, "plain forward + backward": plain_forward + plain_backward}
    for label, reads in (("cached", history), ("all from memory", seq * probes * nstate * 4)):
        forward = plain_forward + history + reads  # history written, then probed
        scatter = 2 * history + 2 * reads  # zeroed, atomically added to (read and write), read by the adjoint
        rows[f"with probes, forward (probe reads {label})"] = forward
        rows[f"with probes, forward + backward (probe reads {label})"] = forward + plain_backward + reads + scatter
    rows["history (float32 states)"] = history
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--length", type=int, default=197)
    parser.add_argument("--nstate", type=int, default=16)
    parser.add_argument(
        "--probes",
        type=int,
        default=4,
        help="probe reads per position (Adaptor-T: 2 per location, 2 locations by default)",
    )
    parser.add_argument("--json", action="store_true", help="print the compile report as JSON")
    args = parser.parse_args()
    rows = compile_all(args.nstate)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"triton {triton.__version__}; compiled without a GPU for the targets named\n")
    print("| kernel | target | registers | stack bytes (spills) | local bytes |\n|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['kernel']} | sm_{row['capability']} | {row['REG']} | {row['STACK']} | {row['LOCAL']} |")
    shape = f"batch {args.batch}, {args.dim} channels, {args.length} positions, {args.nstate} states"
    print(f"\nMemory traffic of one scan direction ({shape}) and its bound at each GPU's bandwidth:\n")
    gpus = list(BANDWIDTH_TBS)
    print("| pass | MiB | " + " | ".join(f"{g} µs" for g in gpus) + " |\n|---|---:|" + "---:|" * len(gpus))
    for name, nbytes in traffic(args.batch, args.dim, args.length, args.nstate, args.probes).items():
        bounds = " | ".join(f"{nbytes / (BANDWIDTH_TBS[g] * 1e12) * 1e6:.0f}" for g in gpus)
        print(f"| {name} | {nbytes / 2**20:.0f} | {bounds} |")


if __name__ == "__main__":
    main()
