"""Selective scan, forward + backward, side by side in one run: sequential references, mambapy, ours.

Every method computes the same thing (softplus(delta + bias), the scan, the D skip and the silu(z)
gate) and its gradients with respect to all eight inputs. Times are medians over interleaved rounds,
so machine noise hits all methods alike; peak memory is each method's extra resident memory in a
fresh process. The native kernel runs twice on x86: built for this CPU (``-march=native``) and for
AVX2 + FMA alone (``x86-64-v3``, what most laptops and older servers have); its state updates per
second per thread are set against the arithmetic bound of one update (an exp of Δ·A, about 16 vector
operations with the state's two FMAs and the output's one) at two vector issues per cycle. The native
kernel also runs with the default Adaptor-T's memory read (4 channel groups, each with 2 locations read
by every position, with the gradients of the locations, weights and scale), whose cost over the plain
scan is reported; the goal is 1.1x.
Usage (Vim-S shape by default):

    python benchmarks/scan.py [--batch 4 --dim 768 --length 197 --nstate 16 --rounds 7]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptor_peft.ops import native, selective_scan, selective_scan_reference
from adaptor_peft.ops.records import MemoryRead
from adaptor_peft.provenance import cpu_fields, cpu_flags, describe_machine, vector_isa
from benchmarks.machine import FLOAT_LANES, cpu_ghz
from tests.support.memory import in_fresh_process
from tests.support.official import scan_ref


def mambapy_scan(u, delta, A, B, C, D, z, delta_bias):
    """The same op on mambapy's parallel scan (Blelloch, over the full (B, L, D, N) tensors)."""
    from mambapy.pscan import pscan

    dt = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)
    x = u.transpose(1, 2)
    hs = pscan(torch.exp(dt.unsqueeze(-1) * A), (dt * x).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2))
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3) + D * x
    return y.transpose(1, 2) * F.silu(z)


METHODS = {
    "sequential: mamba-ssm selective_scan_ref algorithm": lambda *a: scan_ref(*a),
    "sequential: step loop (adaptor_peft reference)": lambda *a: selective_scan_reference(*a, delta_softplus=True).out,
    "mambapy pscan": mambapy_scan,
    "adaptor_peft torch backend": lambda *a: selective_scan(*a, delta_softplus=True, backend="torch").out,
    "adaptor_peft native backend": lambda *a: selective_scan(*a, delta_softplus=True, backend="native").out,
}
NATIVE = "adaptor_peft native backend"
GROUPS, LOCATIONS = 4, 2  # AdaptorConfig's t_groups and t_locations


@functools.cache
def memory_read(batch: int, dim: int, length: int) -> MemoryRead:
    """A random read of the default memory Adaptor-T's shape, its tensors trained (their gradients made)."""
    g = torch.Generator().manual_seed(2)
    location = torch.rand(batch, GROUPS, LOCATIONS, generator=g) * (length - 1)
    weights = torch.randn(batch, GROUPS, LOCATIONS, length, generator=g).softmax(2)
    return MemoryRead(*(t.requires_grad_() for t in (location, weights, torch.randn(dim, generator=g))))


def memory_scan(u, *rest):
    """The scan with Adaptor-T's memory read added."""
    memory = memory_read(*u.shape)
    return selective_scan(u, *rest, delta_softplus=True, backend="native", memory=memory).out


MEMORY = "adaptor_peft native backend, with Adaptor-T's memory read"
METHODS[MEMORY] = memory_scan
AVX2 = "adaptor_peft native backend, x86-64-v3 build"
if platform.machine() in ("x86_64", "AMD64"):
    METHODS[AVX2] = METHODS[NATIVE]  # the same call, run with $ADAPTOR_PEFT_CPU_TARGET set (see step)
GOAL_RATE, GOAL_AVX2 = 2.0, 1.5  # G state updates / s at the Vim-S shape (on 2 cores); AVX2 / native fwd+bwd
OPS_PER_UPDATE = 19  # exp(Δ·A) ~16 vector operations, the state's two FMAs, the output's one
SLOW = {"sequential: mamba-ssm selective_scan_ref algorithm"}  # seconds per call: fewer rounds


def make_inputs(batch, dim, length, nstate, seed=0):
    """u, Δ, A, B, C, D, z, the Δ bias, and the output's cotangent; u, Δ, z and the cotangent (batch, dim,
    length) with channels adjacent in memory, as Vim's mixer hands them to the scan."""
    g = torch.Generator().manual_seed(seed)

    def per_position(scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(batch, length, dim, generator=g) * scale).transpose(1, 2)

    inputs = [
        per_position(),
        per_position(0.5),
        -torch.rand(dim, nstate, generator=g) - 0.1,
        torch.randn(batch, nstate, length, generator=g),
        torch.randn(batch, nstate, length, generator=g),
        torch.randn(dim, generator=g),
        per_position(),
        torch.randn(dim, generator=g) * 0.1,
    ]
    return [t.requires_grad_() for t in inputs], per_position()


def step(method, inputs, cotangent, backward=True):
    for t in inputs:
        t.grad = None
    if method == AVX2:
        os.environ[native.TARGET_ENV] = "x86-64-v3"
    try:
        if not backward:
            with torch.no_grad():
                METHODS[method](*inputs)
            return
        (METHODS[method](*inputs) * cotangent).sum().backward()
    finally:
        if method == AVX2:
            del os.environ[native.TARGET_ENV]


def peak_memory_mb(method: str, shape: list[int]) -> float | None:
    """Extra peak resident memory of one forward + backward, measured in a fresh process."""
    if not Path("/proc/self/status").exists():
        return None
    code = (
        "import sys, json; sys.argv = ['scan.py']; from benchmarks.scan import *\n"
        "from tests.support.memory import rss_kb\n"
        f"inputs, cot = make_inputs(*{shape}); base = rss_kb('VmRSS'); step({method!r}, inputs, cot)\n"
        "print(json.dumps((rss_kb('VmHWM') - base) / 1024))"
    )
    return in_fresh_process(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--length", type=int, default=197)
    parser.add_argument("--nstate", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    shape = [args.batch, args.dim, args.length, args.nstate]
    inputs, cotangent = make_inputs(*shape)
    methods = [m for m in METHODS if m not in (NATIVE, AVX2, MEMORY) or native.available()]
    try:
        import mambapy
    except ImportError:
        methods.remove("mambapy pscan")
    times: dict[str, dict[str, list[float]]] = {m: {"fwd": [], "fwd+bwd": []} for m in methods}
    for m in methods:  # warm-up: builds the compiled kernel, fills allocator caches
        step(m, inputs, cotangent)
    for r in range(args.rounds):
        for m in methods:
            if m in SLOW and r >= 2:
                continue
            for kind in ("fwd", "fwd+bwd"):
                if m not in SLOW:  # once untimed: the previous method's memory is freed and reallocated here
                    step(m, inputs, cotangent, backward=kind == "fwd+bwd")
                start = time.perf_counter()
                step(m, inputs, cotangent, backward=kind == "fwd+bwd")
                times[m][kind].append(time.perf_counter() - start)
    median = {m: {k: statistics.median(v) * 1e3 for k, v in times[m].items()} for m in methods}
    seq, lean, mambapy = methods[0], methods[1], "mambapy pscan"
    threads = torch.get_num_threads()
    print(f"{describe_machine()}; selective scan, batch {args.batch}, dim {args.dim}, len {args.length}, nstate "
          f"{args.nstate}, {threads} threads, torch {torch.__version__}; medians of interleaved rounds\n")  # fmt: skip
    print("| method | fwd ms | fwd+bwd ms | fwd+bwd speed-up vs mamba ref / step loop / mambapy | peak extra MB |")
    print("|---|---:|---:|---|---:|")
    for m in methods:
        t = median[m]["fwd+bwd"]
        ratios = [median[base]["fwd+bwd"] / t if base in median else float("nan") for base in (seq, lean, mambapy)]
        memory = peak_memory_mb(m, shape)
        mem = f"{memory:.0f}" if memory is not None else "n/a"
        print(f"| {m} | {median[m]['fwd']:.1f} | {t:.1f} | {' / '.join(f'{x:.1f}x' for x in ratios)} | {mem} |")

    updates = args.batch * args.dim * args.length * args.nstate
    ghz, isa = cpu_ghz(), vector_isa(cpu_flags(cpu_fields()))
    print(f"\nState updates per second per thread (forward) against the arithmetic bound: {OPS_PER_UPDATE} vector "
          f"operations per update at two issues per cycle, {ghz or float('nan'):.2f} GHz nominal\n")  # fmt: skip
    print("| native build | lanes | G updates / s / thread | bound | share of bound | fwd+bwd vs -march=native |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, lanes in ((NATIVE, FLOAT_LANES[isa]), (AVX2, 8)):
        if m in median:
            rate = updates / (median[m]["fwd"] / 1e3) / threads / 1e9
            bound = lanes * 2 * (ghz or float("nan")) / OPS_PER_UPDATE
            ratio = median[m]["fwd+bwd"] / median[NATIVE]["fwd+bwd"]
            name = "-march=native" if m == NATIVE else "-march=x86-64-v3"
            print(f"| {name} | {lanes} | {rate:.2f} | {bound:.2f} | {rate / bound:.0%} | {ratio:.2f}x |")
    if NATIVE in median:
        rates = {m: updates / (median[m]["fwd"] / 1e3) / 1e9 for m in (NATIVE, AVX2) if m in median}
        print(f"\nGoals: at least {GOAL_RATE:g} G state updates / s on {threads} threads, and the AVX2 build's "
              f"fwd+bwd within {GOAL_AVX2:g}x of -march=native's:\n")  # fmt: skip
        for m, rate in rates.items():
            verdict = "met" if rate >= GOAL_RATE else f"missed: {rate / GOAL_RATE:.0%} of it"
            print(f"- {'-march=native' if m == NATIVE else '-march=x86-64-v3'}: {rate:.2f} G/s, {verdict}")
        if AVX2 in median:
            ratio = median[AVX2]["fwd+bwd"] / median[NATIVE]["fwd+bwd"]
            print(f"- AVX2 build: {ratio:.2f}x the native build, {'met' if ratio <= GOAL_AVX2 else 'missed'}")
    if MEMORY in median:
        fwd, both = (median[MEMORY][k] / median[NATIVE][k] for k in ("fwd", "fwd+bwd"))
        verdict = "met" if both <= 1.1 else "missed"
        print(f"\nAdaptor-T's memory read ({GROUPS} groups x {LOCATIONS} locations) in the native kernel: "
              f"forward {fwd:.2f}x, fwd+bwd {both:.2f}x the plain scan (goal 1.1x: {verdict})")  # fmt: skip


if __name__ == "__main__":
    main()
