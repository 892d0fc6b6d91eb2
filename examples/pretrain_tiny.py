"""Pretrains the embedded default backbone, ``vim_nano_patch4_32``, on formula-driven fractal images.

Official Vim and VMamba weights cannot be downloaded on an offline machine, yet ``adaptor-peft demo``
must show a pretrained backbone being transferred. This script makes one from nothing but a seed:
FractalDB-style classes (:class:`adaptor_peft.data.fractals.FractalImages`), rendered once, trained
with AdamW, a cosine schedule and label smoothing, then checked on new renderings of the same classes.
It writes the weights as safetensors and a model card (``<name>.md``) beside them. On 2 CPU cores it
runs in well under an hour with its defaults:

    python examples/pretrain_tiny.py [--classes 100 --per-class 100 --epochs 12 --seed 0]

``--adaptor`` trains the same backbone with Adaptor-T and Adaptor-S in every block from the start
(``inject_adaptor(freeze_backbone=False)`` on random weights: the Mamba-Adaptor paper's "backbone" use),
on the same data and budget, so that the two held-out accuracies can be set side by side. Its weights
ship as ``vim_nano_patch4_32_adaptor``, whose adaptors are built into the backbone.

An interrupted run resumes: after every epoch the whole training state (weights, optimizer, schedule,
random streams, history) goes to ``<output>.resume.pt``, and the same command started again continues
after the last finished epoch, as if it had never stopped. The file is removed when the weights are
written; a run with other settings refuses it, naming both.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch.utils.data import DataLoader, TensorDataset

from adaptor_peft import create_model
from adaptor_peft.adaptors.backbones import BUILTIN_ADAPTORS, with_builtin_adaptors
from adaptor_peft.atomic import write_atomically
from adaptor_peft.data.fractals import FractalImages
from adaptor_peft.models.vim import EMBEDDED_WEIGHTS
from adaptor_peft.provenance import code_version, describe_machine
from adaptor_peft.training.optim import build_optimizer, build_scheduler

MODEL = "vim_nano_patch4_32"
ADAPTOR_LR_SCALE = 10.0
"""The adaptors' zero-initialised parameters learn at 10x while the backbone is trained with them.
Pretraining was not tuned: 10 was AdaptorConfig.lr_scale's default before the equal-tuning study chose 16
for transfer, and is kept so that the model card's recipe reproduces the shipped weights. The shipped
model's adaptors, pretrained, learn at the backbone's rate when it is transferred."""


def rendered(images: FractalImages) -> TensorDataset:
    """All images of a data set as tensors: rendering once keeps the epochs for training."""
    pairs = [images[i] for i in range(len(images))]
    return TensorDataset(torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]))


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in DataLoader(data, batch_size=256))
    return 100 * correct / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adaptor", action="store_true", help="train with both adaptors in every block")
    parser.add_argument("--output", type=Path, help="weights file (default: the embedded model's, in the package)")
    args = parser.parse_args()
    args.output = args.output or EMBEDDED_WEIGHTS / f"{name(args)}.safetensors"
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    train = rendered(FractalImages(args.classes, args.per_class, seed=args.seed))
    held_out = rendered(FractalImages(args.classes, 20, seed=args.seed, view_seed=args.seed + 1))
    print(f"rendered {len(train)} + {len(held_out)} images in {time.perf_counter() - started:.0f} s")

    model = create_model(MODEL, num_classes=args.classes, drop_path_rate=0.05)
    if args.adaptor:
        with_builtin_adaptors(model, dataclasses.replace(BUILTIN_ADAPTORS, lr_scale=ADAPTOR_LR_SCALE))
    optimizer = build_optimizer(model, "adamw", args.lr, weight_decay=0.05)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    schedule = build_scheduler(optimizer, "cosine", len(loader), args.epochs * len(loader), min_lr_ratio=0.0)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    resume = args.output.with_name(args.output.name + ".resume.pt")
    # the resume file lies beside the output, so the output's spelling (relative or absolute) is no setting
    settings = {key: str(value) for key, value in vars(args).items() if key != "output"}
    history, minutes_before = resumed(resume, settings, model, optimizer, schedule, loader.generator)
    for epoch in range(len(history) + 1, args.epochs + 1):
        model.train()
        losses = []
        for images, labels in loader:
            flip = torch.rand(len(images)) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
            loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        record = {"epoch": epoch, "loss": sum(losses) / len(losses), "held_out_top1": accuracy(model, held_out),
                  "minutes": round(minutes_before + (time.perf_counter() - started) / 60, 1)}  # fmt: skip
        history.append(record)
        print(json.dumps(record), flush=True)
        state = {"settings": settings, "history": history, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                 "shuffle": loader.generator.get_state(), "rng": torch.get_rng_state()}  # fmt: skip
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomically(resume, buffer.getvalue())

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "model": name(args),
        "script": "examples/pretrain_tiny.py",
        "code": code_version(),
        "machine": describe_machine(),
        **vars(args),
    }
    metadata["history"] = json.dumps(history)  # every epoch's record, for scripts that compare runs
    write_atomically(args.output, save(state, metadata={k: str(v) for k, v in metadata.items()}))
    card = args.output.with_suffix(".md")
    size = sum(p.numel() for p in model.parameters())
    write_atomically(card, model_card(args, history, train_images=len(train), held_out=len(held_out), size=size))
    resume.unlink(missing_ok=True)
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB) and {card}")


def resumed(resume: Path, settings: dict, model, optimizer, schedule, shuffle: torch.Generator) -> tuple[list, float]:
    """Restores an interrupted run's training state from ``resume`` if there is one: returns the finished
    epochs' history and the minutes they took (none and 0 for a fresh run). Refuses one of other settings."""
    if not resume.exists():
        return [], 0.0
    state = torch.load(resume, weights_only=True)
    there = state["settings"]  # a file of older code may hold settings no longer compared, such as the output
    differ = ", ".join(f"{k}: {there.get(k)} there, {v} here" for k, v in settings.items() if there.get(k) != v)
    if differ:
        raise SystemExit(
            f"{resume}: an interrupted run with other settings ({differ}); start it again with its settings to "
            "finish it, or delete the file to start afresh"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    shuffle.set_state(state["shuffle"])
    torch.set_rng_state(state["rng"])
    print(f"resuming {resume} after epoch {len(state['history'])}", flush=True)
    return state["history"], state["history"][-1]["minutes"]


def name(args: argparse.Namespace) -> str:
    """The registered name of the model the script trains."""
    return f"{MODEL}_adaptor" if args.adaptor else MODEL


def model_card(args: argparse.Namespace, history: list[dict], train_images: int, held_out: int, size: int) -> str:
    last = history[-1]
    rows = "\n".join(f"| {r['epoch']} | {r['loss']:.3f} | {r['held_out_top1']:.1f} | {r['minutes']} |" for r in history)
    flag = " --adaptor" if args.adaptor else ""
    rate = f", the adaptors' zero-initialised parameters at {ADAPTOR_LR_SCALE:g}x the rate" if args.adaptor else ""
    what = (
        f"`{MODEL}` with Adaptor-T and Adaptor-S built into every block and pretrained with them from random\n"
        "weights (the Mamba-Adaptor paper's backbone use). Transfer it with a method that adds no adaptors\n"
        "(`linear_probe`, `lora`, `full`, ...): its adaptors are part of the backbone."
        if args.adaptor
        else "The embedded default backbone."
    )
    return f"""# {name(args)}

{what}

A Vim (Zhu et al., 2024) with 8 blocks of width 96, 4x4 patches on 32x32 images (64 patches and a middle
class token), {size / 1e6:.2f} M parameters with the {args.classes}-class head, pretrained by adaptor_peft
itself so that `adaptor-peft demo` works offline. It is a small model trained on synthetic images: a
stand-in for the official weights, not a replacement for them.

- **Script**: `python examples/pretrain_tiny.py --classes {args.classes} --per-class {args.per_class} \\
  --epochs {args.epochs} --batch-size {args.batch_size} --lr {args.lr} --seed {args.seed}{flag}`
- **Data**: {args.classes} formula-driven fractal classes (iterated function systems, in the spirit of
  FractalDB, Kataoka et al., ACCV 2020) from seed {args.seed}: {train_images} training renderings, and
  {held_out} held-out renderings of the same classes (new views) for the accuracy below.
- **Training**: AdamW (lr {args.lr}, weight decay 0.05 on matrices, none on norms, biases and
  embeddings), one warm-up epoch then cosine, label smoothing 0.1, horizontal flips, drop path 0.05,
  gradient clipping at 1, batch {args.batch_size}, {args.epochs} epochs on CPU{rate}.
- **Result**: held-out top-1 {last["held_out_top1"]:.1f} % over {args.classes} classes after
  {last["minutes"]} minutes on {describe_machine()}.
- **Code**: adaptor_peft {code_version()}, finished on {datetime.date.today().isoformat()}.
- **File**: safetensors, the full state dict including the {args.classes}-class head (dropped when a task
  asks for another number of classes).

| epoch | train loss | held-out top-1 % | minutes |
|---:|---:|---:|---:|
{rows}
"""


if __name__ == "__main__":
    main()
