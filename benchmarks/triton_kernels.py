"""The Triton scan's kernels compiled for GPUs, on any machine: registers and spills, and the memory-traffic
bound of one scan. Needs no GPU (Triton compiles for a target it is told) but Triton's NVIDIA tools.

Registers and stack bytes per thread are read from each compiled kernel with the ``cuobjdump`` that
ships with Triton; register spills go to the stack, so a kernel that does not spill has none. The byte
model (:func:`traffic`) counts the bytes our kernels move through GPU memory for one scan, against the
least any implementation must move, at Vim-S and VMamba-T shapes; divided by the memory bandwidth, the
time no implementation of the same algorithm can beat, the bound to compare a GPU measurement with.

    python benchmarks/triton_kernels.py [--json]
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
    gradients = {**activations, **{name: "*bf16" for name in ("dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr")}}
    common = dict(BLOCK=st.MAX_BLOCK, NP=triton.next_power_of_2(nstate), ACC=tl.float32)
    step = dict(HAS_BIAS=True, SOFTPLUS=True, HAS_D=True)
    scan = dict(**common, **step, GATE=True, STORE_LAST=False, CHUNK=st.CHUNK)
    sequential = st.MAX_BLOCK * common["NP"]
    return {
        "scan, plain (inference)": (
            st._scan_kernel, {**scan, "STORE_HIDDEN": False, "NSNAP": 0, "CHECKPOINTS": False}, activations, sequential
        ),
        "scan, 4 snapshots and checkpoints (training)": (
            st._scan_kernel, {**scan, "STORE_HIDDEN": False, "NSNAP": 4, "CHECKPOINTS": True}, activations, sequential
        ),
        "scan, writing the hidden states": (
            st._scan_kernel, {**scan, "STORE_HIDDEN": True, "NSNAP": 0, "CHECKPOINTS": False}, activations, sequential
        ),
        "backward, chunked, 4 snapshots": (
            st._backward_kernel, {**common, **step, "GATE": True, "NSNAP": 4, "CHUNK": st.CHUNK}, gradients, sequential
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


SHAPES = {
    "Vim-S direction, batch 64": dict(batch=64, dim=768, length=197, nstate=16, groups=1),
    "VMamba-T stage 1 (4 orders), batch 64": dict(batch=64, dim=4 * 192, length=56 * 56, nstate=16, groups=4),
}
"""The shapes of the byte model: one Vim-S scan direction, and VMamba-T's first stage, whose four scan orders
run as one scan of 4 x 192 channels over 56 x 56 positions, each order with its own B and C."""


def traffic(batch: int, dim: int, length: int, nstate: int, groups: int, snapshots: int = 4) -> dict[str, tuple]:
    """Bytes one scan moves through GPU memory, ours against the least any implementation must move (each
    input read once per pass, each output written once), with bf16 activations and float32 states:
    ``{pass: (ours, minimum)}``.

    Sequence tensors (batch, dim, len): u, Δ, z, the output and their gradients, bf16. B and C are read once
    per channel block from L2, so they count once. Snapshots (Adaptor-T's memory, ``snapshots`` per channel)
    and their gradients are float32. Ours adds: the checkpoints (the state entering every chunk of
    ``CHUNK`` positions but the first, written in the forward and read in the backward), dB and dC summed in
    float32 (zeroed, added to atomically in L2, read by the cast to bf16), and the per-batch-row partial sums
    of dA, dD and the Δ bias (written, read by their sum). The backward's recomputed chunk of states is
    written and read by one program while it is in L2, and is not counted.
    """
    seq, act = batch * dim * length, 2
    bc = batch * groups * nstate * length
    snaps = batch * dim * snapshots * nstate * 4
    checkpoints = batch * dim * (triton.cdiv(length, st.CHUNK) - 1) * nstate * 4
    small = batch * dim * (nstate + 2) * 4
    inference = 3 * seq * act + 2 * bc * act + seq * act
    forward = inference + snaps
    backward = 4 * seq * act + 2 * bc * act + snaps + 3 * seq * act + 2 * bc * act
    ours_backward = backward + checkpoints + 2 * (2 * bc * 4) + 2 * small
    return {
        "inference forward": (inference, inference),
        "training forward (snapshots)": (forward + checkpoints, forward),
        "training forward + backward (snapshots)": (forward + checkpoints + ours_backward, forward + backward),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the compile report as JSON")
    args = parser.parse_args()
    rows = compile_all()
    if args.json:
        print(json.dumps(rows))
        return
    print(f"triton {triton.__version__}; compiled without a GPU for the targets named\n")
    print("| kernel | target | registers | stack bytes (spills) | local bytes |\n|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['kernel']} | sm_{row['capability']} | {row['REG']} | {row['STACK']} | {row['LOCAL']} |")
    gpus = list(BANDWIDTH_TBS)
    for name, shape in SHAPES.items():
        print(f"\nBytes moved by one scan, {name} ({shape['dim']} channels, {shape['length']} positions, "
              f"{shape['nstate']} states), against the least any implementation moves, and ours at each GPU's "
              "bandwidth:\n")  # fmt: skip
        print("| pass | ours MiB | minimum MiB | ratio | " + " | ".join(f"{g} µs" for g in gpus) + " |")
        print("|---|---:|---:|---:|" + "---:|" * len(gpus))
        for label, (ours, least) in traffic(**shape).items():
            bounds = " | ".join(f"{ours / (BANDWIDTH_TBS[g] * 1e12) * 1e6:.0f}" for g in gpus)
            print(f"| {label} | {ours / 2**20:.0f} | {least / 2**20:.0f} | {ours / least:.2f}x | {bounds} |")


if __name__ == "__main__":
    main()
