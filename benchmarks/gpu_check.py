"""One-shot GPU check: the scan and a backbone on CUDA against the CPU float64 reference, with timings.

For a machine with a CUDA GPU (mamba-ssm optional). Prints a Markdown report; keep it under
``benchmarks/results/``:

    python benchmarks/gpu_check.py | tee benchmarks/results/gpu_check.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adaptor_peft
from adaptor_peft.ops import selective_scan, selective_scan_reference
from adaptor_peft.ops.dispatch import mamba_ssm_kernel


def cuda_time(fn, repeats: int = 20) -> float:
    """Median milliseconds of ``fn`` on the GPU."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected).abs().max() / expected.abs().max()).item()


def check_scan(batch=4, dim=768, length=197, nstate=16) -> None:
    g = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(batch, dim, length, generator=g, dtype=torch.float64),
        torch.randn(batch, dim, length, generator=g, dtype=torch.float64) * 0.5,
        -torch.rand(dim, nstate, generator=g, dtype=torch.float64) - 0.1,
        torch.randn(batch, nstate, length, generator=g, dtype=torch.float64),
        torch.randn(batch, nstate, length, generator=g, dtype=torch.float64),
        torch.randn(dim, generator=g, dtype=torch.float64),
        torch.randn(batch, dim, length, generator=g, dtype=torch.float64),
        torch.randn(dim, generator=g, dtype=torch.float64) * 0.1,
    ]
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    expected = selective_scan_reference(*ref_leaves, delta_softplus=True).out
    cotangent = torch.randn_like(expected)
    (expected * cotangent).sum().backward()
    backends = ["torch"] + (["mamba_ssm"] if mamba_ssm_kernel() is not None else [])
    print("| scan backend | out rel. err | worst grad rel. err | fwd ms | fwd+bwd ms |\n|---|---:|---:|---:|---:|")
    for backend in backends:
        leaves = [t.float().cuda().requires_grad_() for t in inputs]
        cot = cotangent.float().cuda()

        def fwd(leaves=leaves, backend=backend):
            return selective_scan(*leaves, delta_softplus=True, backend=backend).out

        def fwd_bwd(leaves=leaves, fwd=fwd, cot=cot):
            for t in leaves:
                t.grad = None
            (fwd() * cot).sum().backward()

        out = fwd()
        fwd_bwd()
        grad_err = max(relative_error(a.grad, b.grad) for a, b in zip(leaves, ref_leaves, strict=True))
        with torch.no_grad():
            t_fwd = cuda_time(fwd)
        t_all = cuda_time(fwd_bwd)
        out_err = relative_error(out, expected.detach())
        print(f"| {backend} | {out_err:.1e} | {grad_err:.1e} | {t_fwd:.2f} | {t_all:.2f} |")


def check_backbone(name="vim_tiny_patch16_224", batch=8) -> None:
    torch.manual_seed(0)
    model = adaptor_peft.create_model(name).eval()
    images = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        expected = model.double()(images.double())
        model = model.float().cuda()
        logits = model(images.cuda())
        t = cuda_time(lambda: model(images.cuda()))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            t_bf16 = cuda_time(lambda: model(images.cuda()))
    print(f"\n{name}, batch {batch}: logits rel. err vs CPU float64 {relative_error(logits, expected):.1e}; "
          f"forward {t:.1f} ms (fp32), {t_bf16:.1f} ms (bf16 autocast)")  # fmt: skip


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, mamba-ssm: {mamba_ssm_kernel() is not None}\n")
    check_scan()
    check_backbone()
