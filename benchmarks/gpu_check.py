"""One-shot GPU check: the scan backends against the CPU float64 reference, their speed on the inputs a Vim
mixer hands them, and one training step per method. Writes one Markdown report (and prints it as it goes).

For a machine with a CUDA GPU, torch, triton, timm, peft and accelerate; mamba-ssm is optional (its rows
appear where it imports). Runs from the source tree, needs no network and no ``datasets``, and is sized to
take under 5 minutes on an H100 at its defaults (Vim-S, batch 64; an estimate, not yet measured on one):
sections that would start after ``--budget`` seconds are skipped, not run. The report is rewritten
(atomically) after every section, so a run cut short still leaves what it measured:

    python benchmarks/gpu_check.py [--output benchmarks/results/gpu_check.md --model vim_small_patch16_224]

The scans run in Vim's own layouts (:func:`vim_layout`): ``z`` a transposed half of ``in_proj``'s output,
``delta`` a transposed ``dt_proj`` output, ``B`` and ``C`` transposed slices of ``x_proj``'s output, ``u`` the
conv's output with channels adjacent, as :meth:`adaptor_peft.models.vim.BiMambaMixer.scan` passes them (in
both directions), and not the contiguous tensors a kernel finds easiest.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adaptor_peft
from adaptor_peft.adaptors import prepare_model
from adaptor_peft.atomic import write_atomically
from adaptor_peft.models.vim import VisionMamba
from adaptor_peft.ops import selective_scan, selective_scan_reference
from adaptor_peft.ops.dispatch import mamba_ssm_kernel, mamba_ssm_runs, triton_backend
from benchmarks.overhead import CLASSES, batch, trained_like, trainer, training_rows

DEVICE = "cuda"
"""Where everything but the float64 reference runs (the tests run the script on the CPU, torch.cuda stubbed)."""
STEP_METHODS = ("linear_probe", "lora", "adaptor", "full")
ACCURACY_BATCH = 2
BACKBONE_BATCH = 8
ACTIVATIONS = ("in_proj", "u", "dt_proj", "x_proj")
"""Scan inputs that are activations: bf16 under autocast, as in training; the parameters stay float32."""
HOLDS = {"in_proj": "in_proj (z)", "dt_proj": "dt_proj (delta)", "x_proj": "x_proj (B, C)"}
"""The layer outputs :func:`scan_inputs` holds, with the scan arguments :func:`vim_layout` takes out of each."""
REPORT: list[str] = []


class ScanShape(NamedTuple):
    """The scan of one Vim mixer: ``dim`` inner channels, ``length`` tokens, ``nstate`` states, and the rank
    of Δ (``x_proj`` outputs ``rank + 2 * nstate`` features: Δ's low-rank input, then B, then C)."""

    dim: int
    length: int
    nstate: int
    rank: int


def vim_shapes(model_name: str) -> tuple[ScanShape, int]:
    """The scan shape of Vim ``model_name``'s mixers and its image size, read off a model built on the meta
    device (no memory, no weights)."""
    with torch.device("meta"):
        model = adaptor_peft.create_model(model_name)
    if not isinstance(model, VisionMamba):
        raise ValueError(f"{type(model).__name__} is not a Vim model, whose scans gpu_check times")
    mixer, (height, width) = model.layers[0].mixer, model.patch_embed.grid_size
    shape = ScanShape(mixer.D.shape[0], height * width + 1, mixer.d_state, mixer.dt_rank)
    return shape, model.pretrained_cfg["input_size"][-1]


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


def scan_inputs(batch_size: int, shape: ScanShape, snapshots: bool = False) -> dict[str, torch.Tensor]:
    """Random scan inputs in float64 on the CPU, held as the tensors a Vim mixer makes them from (``in_proj``,
    ``dt_proj`` and ``x_proj`` outputs, (batch, len, features); ``u`` the conv's (batch, dim, len) output);
    :func:`vim_layout` takes the scan's arguments out of them. With the default Adaptor-T's snapshots (4 groups,
    4 positions each)."""
    g = torch.Generator().manual_seed(0)
    dim, length, nstate, rank = shape

    def rand(*size: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*size, generator=g, dtype=torch.float64) * scale

    inputs = dict(
        in_proj=rand(batch_size, length, 2 * dim),
        u=rand(batch_size, dim, length),
        dt_proj=rand(batch_size, length, dim, scale=0.5),
        x_proj=rand(batch_size, length, rank + 2 * nstate),
        A=-torch.rand(dim, nstate, generator=g, dtype=torch.float64) - 0.1,
        D=rand(dim),
        delta_bias=rand(dim, scale=0.1),
    )
    if snapshots:
        inputs["snapshot_index"] = torch.randint(0, length, (batch_size, 4, 4), generator=g)
    return inputs


def vim_layout(inputs: dict[str, torch.Tensor], shape: ScanShape) -> dict[str, torch.Tensor]:
    """:func:`selective_scan`'s arguments taken out of :func:`scan_inputs` by the views
    :meth:`~adaptor_peft.models.vim.BiMambaMixer.scan` takes in its forward direction: ``z`` the second half
    of ``in_proj``'s output, ``delta`` ``dt_proj``'s output and ``B``, ``C`` slices of ``x_proj``'s, each
    transposed to (batch, features, len), so that consecutive positions lie a whole row apart; ``u``, the
    causal conv's output, likewise, with channels adjacent."""
    scan = {k: v for k, v in inputs.items() if k not in HOLDS}
    _, B, C = inputs["x_proj"].split([shape.rank, shape.nstate, shape.nstate], dim=-1)
    z = inputs["in_proj"].chunk(2, dim=-1)[1]
    return {
        **scan,
        "u": scan["u"].transpose(1, 2).contiguous().transpose(1, 2),
        "z": z.transpose(1, 2),
        "delta": inputs["dt_proj"].transpose(1, 2),
        "B": B.transpose(1, 2),
        "C": C.transpose(1, 2),
    }


def leaves_of(inputs: dict[str, torch.Tensor], device: str, dtype: Callable[[str], torch.dtype]) -> dict:
    """``inputs`` on ``device`` as leaves that take gradients, each in ``dtype(name)``; positions as given."""
    return {
        k: v.to(device) if k == "snapshot_index" else v.detach().to(device, dtype(k)).requires_grad_()
        for k, v in inputs.items()
    }


def check_scan_accuracy(backends: list[str], shape: ScanShape) -> None:
    """Each backend's output, snapshots and gradients in float32 against the float64 reference on the CPU."""
    emit(
        f"## Scan against the CPU float64 reference ({shape_text(shape)}, batch {ACCURACY_BATCH}, float32 on the "
        f"{DEVICE} device, Vim's layouts)\n"
    )
    emit("| backend | snapshots | out rel. err | snapshots rel. err | worst grad rel. err (input) |")
    emit("|---|---|---:|---:|---|")
    for snapshots in (False, True):
        inputs = scan_inputs(ACCURACY_BATCH, shape, snapshots=snapshots)
        reference = leaves_of(inputs, "cpu", lambda name: torch.float64)
        expected = selective_scan_reference(**vim_layout(reference, shape), delta_softplus=True)
        g = torch.Generator().manual_seed(1)
        cotangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in used(expected)]
        sum((t * c).sum() for t, c in zip(used(expected), cotangents, strict=True)).backward()
        for backend in backends:
            if snapshots and backend == "mamba_ssm":
                continue
            leaves = leaves_of(inputs, DEVICE, lambda name: torch.float32)
            result = selective_scan(**vim_layout(leaves, shape), delta_softplus=True, backend=backend)
            sum((t * c.float().to(DEVICE)).sum() for t, c in zip(used(result), cotangents, strict=True)).backward()
            errors = {k: relative_error(v.grad, reference[k].grad) for k, v in leaves.items() if v.grad is not None}
            worst = max(errors, key=errors.get)
            snapshot_error = f"{relative_error(result.snapshots, expected.snapshots):.1e}" if snapshots else ""
            emit(
                f"| {backend} | {'yes' if snapshots else 'no'} | {relative_error(result.out, expected.out):.1e} | "
                f"{snapshot_error} | {errors[worst]:.1e} ({HOLDS.get(worst, worst)}) |"
            )


def used(result) -> list[torch.Tensor]:
    """The outputs of a scan that a loss reads: ``out``, and the snapshots where there are some."""
    return [result.out, *(t for t in (result.snapshots,) if t is not None)]


def time_scans(backends: list[str], shape: ScanShape, batch_size: int) -> None:
    """Each backend's forward and forward + backward time and peak memory, without and with Adaptor-T's
    snapshots (their gradient sent back too)."""
    emit(f"\n## Scan speed, {shape_text(shape)} at batch {batch_size}, bf16 activations in Vim's layouts\n")
    emit("| backend | snapshots | forward ms | forward + backward ms | peak extra MiB (fwd + bwd) |")
    emit("|---|---|---:|---:|---:|")
    for snapshots in (False, True):
        inputs = scan_inputs(batch_size, shape, snapshots=snapshots)
        for backend in backends:
            if snapshots and backend == "mamba_ssm":
                continue
            leaves = leaves_of(inputs, DEVICE, lambda name: torch.bfloat16 if name in ACTIVATIONS else torch.float32)
            cotangent = torch.randn(batch_size, shape.dim, shape.length, device=DEVICE, dtype=torch.bfloat16)

            def forward(leaves=leaves, backend=backend):
                return selective_scan(**vim_layout(leaves, shape), delta_softplus=True, backend=backend)

            def both(forward=forward, cotangent=cotangent):
                result = forward()
                loss = (result.out * cotangent).sum()
                (loss if result.snapshots is None else loss + result.snapshots.sum()).backward()

            with torch.no_grad():
                t_fwd = cuda_time(forward)
            t_both, peak = cuda_time(both), peak_mib(both)
            emit(f"| {backend} | {'yes' if snapshots else 'no'} | {t_fwd:.2f} | {t_both:.2f} | {peak:.0f} |")


def time_training(model_name: str, img_size: int, batch_size: int) -> None:
    """One AdamW step per method (and the adaptor keeping every activation) under bf16 autocast."""
    emit(f"\n## {model_name}: one training step at batch {batch_size}, {img_size} px, bf16 autocast (AdamW)\n")
    emit("| method | trainable params | ms per step | vs lora | peak MiB |")
    emit("|---|---:|---:|---:|---:|")
    images, labels = (t.to(DEVICE) for t in batch(batch_size, img_size))
    results = {}
    rows = training_rows(STEP_METHODS, kept=("adaptor",))
    for row, (method, keep_all) in rows.items():
        torch.manual_seed(0)
        model = adaptor_peft.create_model(model_name, num_classes=CLASSES)
        model = prepare_model(model, method)
        model = (trained_like(model) if method.startswith("adaptor") else model).to(DEVICE)
        step = trainer(model, keep_all)

        def autocast_step(step=step):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                step(images, labels)

        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        results[row] = (trainable, cuda_time(autocast_step, repeats=5), peak_mib(autocast_step))
        del model, step
        torch.cuda.empty_cache()
    for method, (trainable, ms, peak) in results.items():
        ratio = ms / results["lora"][1]
        emit(f"| {method} | {trainable:,} | {ms:.1f} | {ratio:.2f}x | {peak:.0f} |")
    emit(f"\nGoal: adaptor within 1.3x of lora's step: {results['adaptor'][1] / results['lora'][1]:.2f}x.")


def time_inference(model_name: str, img_size: int, batch_size: int) -> None:
    """The plain backbone's forward against the adaptor's, under bf16 autocast."""
    emit(f"\n## {model_name}: inference at batch {batch_size}, {img_size} px, bf16 autocast\n")
    emit("| model | ms per batch | vs plain |\n|---|---:|---:|")
    images = batch(batch_size, img_size)[0].to(DEVICE)
    times = {}
    for method in ("plain", "adaptor"):
        torch.manual_seed(0)
        model = adaptor_peft.create_model(model_name, num_classes=CLASSES)
        model = (model if method == "plain" else trained_like(prepare_model(model, method))).to(DEVICE).eval()

        def infer(model=model):
            with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
                model(images)

        times[method] = cuda_time(infer)
    for method, ms in times.items():
        emit(f"| {method} | {ms:.1f} | {ms / times['plain']:.2f}x |")


def check_backbone(model_name: str, img_size: int) -> None:
    """The whole model's logits in float32 on the device against float64 on the CPU (random weights)."""
    torch.manual_seed(0)
    model = adaptor_peft.create_model(model_name).eval()
    images = torch.randn(BACKBONE_BATCH, 3, img_size, img_size)
    with torch.no_grad():
        expected = model.double()(images.double())
        logits = model.float().to(DEVICE)(images.to(DEVICE))
    emit(
        f"\n{model_name}, batch {BACKBONE_BATCH}, float32 on the {DEVICE} device: logits rel. err vs CPU float64 "
        f"{relative_error(logits, expected):.1e}"
    )


def shape_text(shape: ScanShape) -> str:
    return f"{shape.dim} channels, {shape.length} tokens, {shape.nstate} states"


def installed(package: str) -> str:
    """``package``'s installed version, or "absent"; read from its metadata, without importing it."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def report_path(parser: argparse.ArgumentParser, output: str) -> Path:
    """``--output`` as a file path whose folder exists (made if missing), checked before any GPU time is spent."""
    path = Path(output).expanduser()
    if path.is_dir():
        parser.error(f"--output {output} is a folder; give the path of the report file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--output {output}: cannot make its folder {path.parent}: {err}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        default=str(Path(__file__).parent / "results" / "gpu_check.md"),
        help="the Markdown report, rewritten atomically after every section",
    )
    parser.add_argument("--model", default="vim_small_patch16_224", help="the Vim model whose scans and steps run")
    parser.add_argument("--batch", type=int, default=64, help="batch of the timed scans, steps and inference")
    parser.add_argument("--budget", type=float, default=240, help="seconds after which no further section starts")
    args = parser.parse_args()
    output = report_path(parser, args.output)
    try:
        shape, img_size = vim_shapes(args.model)
    except ValueError as err:  # an unknown model, or one that is not a Vim
        parser.error(f"--model {args.model}: {err}")
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU")
    start = time.perf_counter()
    emit(f"# GPU check: {torch.cuda.get_device_name()}\n")
    capability = ".".join(map(str, torch.cuda.get_device_capability()))
    mamba_runs = mamba_ssm_runs(torch.device(DEVICE))
    emit(
        f"torch {torch.__version__}, triton {installed('triton')}, capability {capability}, "
        f"mamba-ssm imports: {mamba_ssm_kernel() is not None}, its kernel runs: {mamba_runs}\n"
    )
    write_atomically(output, "\n".join(REPORT) + "\n")
    backends = [b for b, ok in (("triton", triton_backend()), ("mamba_ssm", mamba_runs), ("torch", True)) if ok]
    sections = {
        "scan accuracy": lambda: check_scan_accuracy(backends, shape),
        "scan speed": lambda: time_scans(backends, shape, args.batch),
        "training step": lambda: time_training(args.model, img_size, args.batch),
        "inference": lambda: time_inference(args.model, img_size, args.batch),
        "backbone": lambda: check_backbone(args.model, img_size),
    }
    for name, section in sections.items():
        spent = time.perf_counter() - start
        if spent > args.budget:
            emit(f"\n**skipped**: {name}, {spent:.0f} s into a --budget of {args.budget:.0f} s")
            continue
        try:
            section()
        except Exception as err:  # one failing part must not cost the rest of a lent GPU's time
            emit(f"\n**failed**: {name}: {type(err).__name__}: {err}")
        write_atomically(output, "\n".join(REPORT) + "\n")
    emit(f"\nTotal {time.perf_counter() - start:.0f} s.")
    write_atomically(output, "\n".join(REPORT) + "\n")


if __name__ == "__main__":
    main()
