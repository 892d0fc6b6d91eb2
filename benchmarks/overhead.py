"""What the adaptors cost: inference against the plain backbone, and a PEFT training step against full
fine-tuning, side by side in one run.

Inference: every configuration runs the same batch in interleaved rounds; the ratio to the plain
backbone is taken per round and its median reported, so machine noise hits all alike. Training: one
step (forward, cross-entropy, backward, AdamW) per method, timed the same way. Peak memory twice: the
peak of live tensors over one step (exact, what CUDA's ``max_memory_allocated`` counts), and each
method's extra resident memory over two steps in a fresh process (activations, gradients and optimizer
state, with what the C allocator holds on to: it moves by 10 % or more between runs). Full fine-tuning
and the adaptor are also run keeping every activation, to show what the mixers' rebuilding of their
cheap activations in the backward pass saves and costs. Usage (CPU, Vim-T at 224, batch 8 by default):

    python benchmarks/overhead.py [--model vim_tiny_patch16_224 --batch 8 --rounds 12]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptor_peft import create_model
from adaptor_peft.adaptors import AdaptorS, prepare_model
from adaptor_peft.models import keep_activations
from adaptor_peft.provenance import describe_machine
from adaptor_peft.reports import parameter_report
from adaptor_peft.training.optim import build_optimizer
from tests.support.memory import PeakTensorMemory, in_fresh_process

INFERENCE = ("plain", "adaptor", "adaptor_t", "adaptor_s")
GOALS = {"inference vs plain": 1.07, "step vs full": 0.9, "step vs lora": 1.1, "peak memory vs full": 0.6}
"""The project's goals for the default adaptor (the paper reports under 7 % extra FLOPs)."""
TRAINING = ("full", "adaptor", "adaptor_t", "adaptor_s", "lora", "linear_probe")
KEPT = ("full", "adaptor")
"""Also timed under ``keep_activations()``: the mixers rebuild nothing in the backward pass (``Recompute``)."""
CLASSES = 100


def build(model_name: str, method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=CLASSES)
    return model if method == "plain" else prepare_model(model, method)


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Moves the trainable weights off their init (zero scales and offsets would put every location at
    its anchor, a case no trained adaptor is in)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def batch(size: int, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(size, 3, img_size, img_size, generator=g), torch.randint(0, CLASSES, (size,), generator=g)


def trainer(model: torch.nn.Module, keep_all: bool = False):
    """One training step of ``model`` (AdamW on its trainable parameters, as the training loop builds it) as a
    closure; ``keep_all``: keeping every activation (:func:`adaptor_peft.models.keep_activations`)."""
    model.train()
    optimizer = build_optimizer(model, "adamw", 1e-4, 0.05)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with keep_activations() if keep_all else contextlib.nullcontext():
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def interleaved(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call, for every call in each round in turn (after one warm-up call each); each round
    starts one call later than the previous, so that no call always runs first."""
    names = list(calls)
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def training_rows(methods: tuple[str, ...], kept: tuple[str, ...] = KEPT) -> dict[str, tuple[str, bool]]:
    """Training-table rows, name -> (method, keep every activation): ``methods`` as they run, then ``kept``
    under :func:`adaptor_peft.models.keep_activations`."""
    return {**{m: (m, False) for m in methods}, **{f"{m}, every activation kept": (m, True) for m in kept}}


def training_peak_mb(model_name: str, method: str, size: int, img_size: int, keep_all: bool = False) -> float | None:
    """Extra peak resident memory of two training steps, in a fresh process (Linux only)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    code = (
        "import sys, json; from pathlib import Path; sys.argv = ['overhead.py']; from benchmarks.overhead import *\n"
        "from tests.support.memory import rss_kb\n"
        f"step = trainer(build({model_name!r}, {method!r}), {keep_all}); data = batch({size}, {img_size})\n"
        "base = rss_kb('VmRSS'); Path('/proc/self/clear_refs').write_text('5')\n"
        "step(*data); step(*data); print(json.dumps((rss_kb('VmHWM') - base) / 1024))"
    )
    return in_fresh_process(code)


def tensor_peak_mb(step, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Peak live tensor memory of one more training step (the optimizer's state already made)."""
    with PeakTensorMemory() as memory:
        step(images, labels)
    return memory.peak / 2**20


def goal_line(name: str, measured: float) -> str:
    """One line saying whether the default adaptor meets a goal of :data:`GOALS`, and by how much if not."""
    goal = GOALS[name]
    verdict = "met" if measured <= goal else f"missed by {measured - goal:.2f}x"
    return f"- {name}: {measured:.2f}x against a goal of at most {goal:.2f}x: {verdict}"


def adaptor_s_alone(rounds: int) -> None:
    """Adaptor-S's forward and forward + backward on the maps of the demo's backbone and of Vim-S."""
    print("\n| Adaptor-S alone, (B, H, W, C) | fwd ms | fwd+bwd ms | fwd+bwd / fwd |\n|---|---:|---:|---:|")
    for shape in ((32, 8, 8, 96), (8, 14, 14, 384)):
        adaptor = AdaptorS(shape[-1])
        with torch.no_grad():
            adaptor.scale.normal_()
        x, cotangent = torch.randn(shape, requires_grad=True), torch.randn(shape)

        def forward(adaptor=adaptor, x=x):
            with torch.no_grad():
                adaptor(x)

        times = interleaved({"fwd": forward, "both": lambda a=adaptor, x=x, c=cotangent: a(x).backward(c)}, rounds)
        fwd, both = statistics.median(times["fwd"]) * 1e3, statistics.median(times["both"]) * 1e3
        print(f"| {shape} | {fwd:.2f} | {both:.2f} | {both / fwd:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vim_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--inference-only", action="store_true")
    args = parser.parse_args()
    images, labels = batch(args.batch, args.img_size)
    threads = torch.get_num_threads()
    print(f"{describe_machine()}; {args.model} at {args.img_size}, batch {args.batch}, {threads} threads, "
          f"torch {torch.__version__}; medians over {args.rounds} interleaved rounds\n")  # fmt: skip

    base = build(args.model, "plain").eval()  # every model a copy of it, so that all sit in fresh memory alike
    models = {m: copy.deepcopy(base) if m == "plain" else trained_like(prepare_model(copy.deepcopy(base), m))
              for m in INFERENCE}  # fmt: skip
    with torch.no_grad():
        times = interleaved({m: (lambda model=model: model(images)) for m, model in models.items()}, args.rounds)
    print("| inference | ms per batch | vs plain (median of per-round ratios) |")
    print("|---|---:|---:|")
    ratios = {}
    for m in INFERENCE:
        ratios[m] = statistics.median(t / p for t, p in zip(times[m], times["plain"], strict=True))
        print(f"| {m} | {statistics.median(times[m]) * 1e3:.0f} | {ratios[m]:.3f}x |")
    goals = [goal_line("inference vs plain", ratios["adaptor"])]
    del models
    adaptor_s_alone(args.rounds)
    if args.inference_only:
        print("\nThe default adaptor against the goals:\n\n" + "\n".join(goals))
        return

    rows = training_rows(TRAINING)
    steps = {row: trainer(build(args.model, m), keep_all) for row, (m, keep_all) in rows.items()}
    times = interleaved({m: (lambda step=step: step(images, labels)) for m, step in steps.items()}, args.rounds)
    tensors = {row: tensor_peak_mb(step, images, labels) for row, step in steps.items()}
    resident = {
        row: training_peak_mb(args.model, m, args.batch, args.img_size, keep_all) for row, (m, keep_all) in rows.items()
    }
    print("\n| training step | trainable w/o head | ms per step | vs full | vs lora | peak tensors MB | vs full "
          "| peak resident extra MB | vs full |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, (m, _) in rows.items():
        full, lora = (statistics.median(t / b for t, b in zip(times[row], times[base], strict=True))
                      for base in ("full", "lora"))  # fmt: skip
        trainable = parameter_report(build(args.model, m)).trainable_without_head
        peaks = [f"{p[row]:.0f} | {p[row] / p['full']:.2f}x" if p[row] and p["full"] else "n/a | n/a"
                 for p in (tensors, resident)]  # fmt: skip
        ms = statistics.median(times[row]) * 1e3
        print(f"| {row} | {trainable:,} | {ms:.0f} | {full:.2f}x | {lora:.2f}x | {' | '.join(peaks)} |")
        if row == "adaptor":
            goals += [goal_line("step vs full", full), goal_line("step vs lora", lora)]
            goals.append(goal_line("peak memory vs full", tensors[row] / tensors["full"]) + " (tensors)")
            if resident[row] and resident["full"]:
                goals.append(goal_line("peak memory vs full", resident[row] / resident["full"]) + " (resident)")
    print("\nThe default adaptor against the goals:\n\n" + "\n".join(goals))


if __name__ == "__main__":
    main()
