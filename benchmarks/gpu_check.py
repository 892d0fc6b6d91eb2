"""One-shot GPU check: the scan backends against the CPU float64 reference, their speed at the Vim-S shape,
and one Vim-S training step per method. Writes one Markdown report (and prints it as it goes).

For a machine with a CUDA GPU; mamba-ssm is optional (its rows appear where it imports). Runs from the
source tree (``PYTHONPATH=.``), needs no network and no ``datasets``, and takes a few minutes:

    python benchmarks/gpu_check.py [--output benchmarks/results/gpu_check.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adaptor_peft
from adaptor_peft.adaptors import prepare_model
from adaptor_peft.atomic import write_atomically
from adaptor_peft.ops import selective_scan, selective_scan_reference
from adaptor_peft.ops.dispatch import mamba_ssm_kernel, triton_backend
from benchmarks.overhead import CLASSES, batch, trained_like, trainer, training_rows

STEP_METHODS = ("linear_probe", "lora", "adaptor", "full")
ACTIVATION_DTYPES = dict.fromkeys(("u", "delta", "B", "C", "z", "probe_weight"), torch.bfloat16)  # as under autocast
REPORT: list[str] = []


def emit(line: str = "") -> None:
    print(line, flush=True)
    REPORT.append(line)


def cuda_time(fn: Callable[[], object], repeats: int = 10) -> float:
    """Median milliseconds of ``fn`` on the GPU, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(fn: Callable[[], object]) -> float:
    """Extra GPU memory ``fn`` reaches at its peak, over what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def scan_inputs(batch_size: int, dim: int = 768, length: int = 197, nstate: int = 16, probes: bool = False):
    """Vim-S-shaped scan inputs in float64 on the CPU; with Adaptor-T-like probes (4 groups, 4 reads)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    inputs = dict(
        u=rand(batch_size, dim, length), delta=rand(batch_size, dim, length, scale=0.5),
        A=-torch.rand(dim, nstate, generator=g, dtype=torch.float64) - 0.1, B=rand(batch_size, nstate, length),
        C=rand(batch_size, nstate, length), D=rand(dim), z=rand(batch_size, dim, length),
        delta_bias=rand(dim, scale=0.1),
    )  # fmt: skip
    if probes:
        inputs["probe_index"] = torch.randint(0, length, (batch_size, 4, length, 4), generator=g)
        inputs["probe_weight"] = torch.rand(batch_size, 4, length, 4, generator=g, dtype=torch.float64)
        inputs["probe_scale"] = rand(dim)
    return inputs


def leaves_of(inputs: dict, device: str, dtype: torch.dtype) -> dict:
    return {
        k: v.to(device) if k == "probe_index" else v.detach().to(device, dtype).requires_grad_()
        for k, v in inputs.items()
    }


def scan_loss(leaves: dict, backend: str | None, cotangent: torch.Tensor) -> torch.Tensor:
    result = selective_scan(**leaves, delta_softplus=True, backend=backend)
    return (result.out * cotangent).sum(), result


def check_scan_accuracy(backends: list[str]) -> None:
    emit("## Scan against the CPU float64 reference (Vim-S shape, batch 4, float32 on the GPU)\n")
    emit("| backend | probes | out rel. err | readout rel. err | worst grad rel. err (input) |")
    emit("|---|---|---:|---:|---|")
    for probes in (False, True):
        inputs = scan_inputs(4, probes=probes)
        reference = leaves_of(inputs, "cpu", torch.float64)
        expected = selective_scan_reference(**reference, delta_softplus=True)
        cotangent = torch.randn(expected.out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (expected.out * cotangent).sum().backward()
        for backend in backends:
            if probes and backend == "mamba_ssm":
                continue
            leaves = leaves_of(inputs, "cuda", torch.float32)
            loss, result = scan_loss(leaves, backend, cotangent.float().cuda())
            loss.backward()
            errors = {k: relative_error(v.grad, reference[k].grad) for k, v in leaves.items() if v.grad is not None}
            worst = max(errors, key=errors.get)
            readout = f"{relative_error(result.readout, expected.readout):.1e}" if probes else ""
            emit(f"| {backend} | {'yes' if probes else 'no'} | {relative_error(result.out, expected.out):.1e} | "
                 f"{readout} | {errors[worst]:.1e} ({worst}) |")  # fmt: skip


def time_scans(backends: list[str], batch_size: int) -> None:
    emit(f"\n## Scan speed, Vim-S shape at batch {batch_size} (768 channels, 197 tokens, 16 states), bf16 inputs\n")
    emit("| backend | probes | forward ms | forward + backward ms | peak extra MiB (fwd + bwd) |")
    emit("|---|---|---:|---:|---:|")
    for probes in (False, True):
        inputs = scan_inputs(batch_size, probes=probes)
        for backend in backends:
            if probes and backend == "mamba_ssm":
                continue
            leaves = {
                k: v.cuda() if k == "probe_index" else v.to("cuda", ACTIVATION_DTYPES.get(k, torch.float32))
                for k, v in inputs.items()
            }
            leaves = {k: v if k == "probe_index" else v.requires_grad_() for k, v in leaves.items()}
            cotangent = torch.randn(batch_size, 768, 197, device="cuda", dtype=torch.bfloat16)

            def forward(leaves=leaves, backend=backend):
                return selective_scan(**leaves, delta_softplus=True, backend=backend).out

            def both(forward=forward, cotangent=cotangent):
                (forward() * cotangent).sum().backward()

            with torch.no_grad():
                t_fwd = cuda_time(forward)
            t_both, peak = cuda_time(both), peak_mib(both)
            emit(f"| {backend} | {'yes' if probes else 'no'} | {t_fwd:.2f} | {t_both:.2f} | {peak:.0f} |")


def time_training(model_name: str, batch_size: int) -> None:
    emit(f"\n## {model_name}: one training step at batch {batch_size}, 224 px, bf16 autocast (AdamW)\n")
    emit("| method | trainable params | ms per step | vs lora | peak MiB |")
    emit("|---|---:|---:|---:|---:|")
    images, labels = batch(batch_size, 224)
    images, labels = images.cuda(), labels.cuda()
    results = {}
    rows = training_rows(STEP_METHODS, kept=("adaptor",))
    for row, (method, keep_all) in rows.items():
        torch.manual_seed(0)
        model = adaptor_peft.create_model(model_name, num_classes=CLASSES)
        model = prepare_model(model, method)
        model = (trained_like(model) if method.startswith("adaptor") else model).cuda()
        step = trainer(model, keep_all)

        def autocast_step(step=step):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                step(images, labels)

        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        results[row] = (trainable, cuda_time(autocast_step, repeats=5), peak_mib(autocast_step))
        del model, step
        torch.cuda.empty_cache()
    for method, (trainable, ms, peak) in results.items():
        ratio = ms / results["lora"][1]
        emit(f"| {method} | {trainable:,} | {ms:.1f} | {ratio:.2f}x | {peak:.0f} |")
    emit(f"\nGoal: adaptor within 1.3x of lora's step: {results['adaptor'][1] / results['lora'][1]:.2f}x.")


def time_inference(model_name: str, batch_size: int) -> None:
    emit(f"\n## {model_name}: inference at batch {batch_size}, 224 px, bf16 autocast\n")
    emit("| model | ms per batch | vs plain |\n|---|---:|---:|")
    images = batch(batch_size, 224)[0].cuda()
    times = {}
    for method in ("plain", "adaptor"):
        torch.manual_seed(0)
        model = adaptor_peft.create_model(model_name, num_classes=CLASSES)
        model = (model if method == "plain" else trained_like(prepare_model(model, method))).cuda().eval()

        def infer(model=model):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(images)

        times[method] = cuda_time(infer)
    for method, ms in times.items():
        emit(f"| {method} | {ms:.1f} | {ms / times['plain']:.2f}x |")


def check_backbone(model_name: str = "vim_tiny_patch16_224", batch_size: int = 8) -> None:
    torch.manual_seed(0)
    model = adaptor_peft.create_model(model_name).eval()
    images = torch.randn(batch_size, 3, 224, 224)
    with torch.no_grad():
        expected = model.double()(images.double())
        logits = model.float().cuda()(images.cuda())
    emit(f"\n{model_name}, batch {batch_size}: logits rel. err vs CPU float64 {relative_error(logits, expected):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "gpu_check.md"))
    parser.add_argument("--model", default="vim_small_patch16_224")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU")
    start = time.perf_counter()
    import triton

    emit(f"# GPU check: {torch.cuda.get_device_name()}\n")
    capability = ".".join(map(str, torch.cuda.get_device_capability()))
    emit(f"torch {torch.__version__}, triton {triton.__version__}, capability {capability}, "
         f"mamba-ssm: {mamba_ssm_kernel() is not None}\n")  # fmt: skip
    backends = [b for b, ok in (("triton", triton_backend()), ("mamba_ssm", mamba_ssm_kernel()), ("torch", True)) if ok]
    sections = (
        lambda: check_scan_accuracy(backends),
        lambda: time_scans(backends, args.batch),
        lambda: time_training(args.model, args.batch),
        lambda: time_inference(args.model, args.batch),
        check_backbone,
    )
    for section in sections:
        try:
            section()
        except Exception as err:  # one failing part must not cost the rest of a lent GPU's time
            emit(f"\n**failed**: {type(err).__name__}: {err}")
        write_atomically(args.output, "\n".join(REPORT) + "\n")
    emit(f"\nTotal {time.perf_counter() - start:.0f} s.")
    write_atomically(args.output, "\n".join(REPORT) + "\n")


if __name__ == "__main__":
    main()
