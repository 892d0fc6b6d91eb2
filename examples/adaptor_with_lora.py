"""Adaptor-T + Adaptor-S together with LoRA, then LoRA merged into the weights for inference.

``prepare_model(model, "adaptor+lora", r=4, targets=["in_proj", "out_proj"])`` adds both adaptors and
HF peft LoRA on the Mamba projections. After training, ``merge_adaptor`` folds LoRA's low-rank update
into ``in_proj`` / ``out_proj`` and removes its wrappers: the logits stay the same and inference pays
nothing for LoRA. The adaptors act on activations (locations, 2D neighbourhoods) and stay as modules.

    python examples/adaptor_with_lora.py [--rank 4 --steps 10]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from adaptor_peft import create_model, param_groups
from adaptor_peft.adaptors import merge_adaptor, prepare_model
from adaptor_peft.data import build_transform, data_config, load_split
from adaptor_peft.reports import parameter_report

MODEL = "vim_nano_patch4_32"


def lora_parameters(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help=f"backbone weights (default: the shipped {MODEL} weights)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    model = create_model(MODEL, checkpoint=args.checkpoint or "pretrained", num_classes=10)
    prepare_model(model, "adaptor+lora", r=args.rank, targets=["in_proj", "out_proj"])
    report = parameter_report(model)
    for group, count in report.groups.items():  # Adaptor-T, Adaptor-S, LoRA, head
        print(f"{group:>10}: {count:>7,} trainable")
    print(f"{'total':>10}: {report.trainable_without_head:>7,} without the head ({report.trainable_percent:.2f} %)")

    cfg = data_config(model)
    transform = build_transform("vtab", True, cfg["img_size"], cfg["mean"], cfg["std"])
    loader = DataLoader(load_split({"kind": "sklearn_digits"}, "train", transform=transform), args.batch_size, True)
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=1e-4))
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch, reshuffled
    for step, (x, y) in enumerate(itertools.islice(batches, args.steps), start=1):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")

    x, projection = next(iter(loader))[0], model.layers[0].mixer.in_proj
    base_weight, lora_before = projection.base_layer.weight.detach().clone(), lora_parameters(model)
    with torch.no_grad():
        before = model.eval()(x)
        merge_adaptor(model)
        after = model(x)
    difference = (after - before).abs().max().item()
    update = (model.layers[0].mixer.in_proj.weight - base_weight).abs().max().item()
    print(f"merged: layers.0 in_proj weight moved by up to {update:.2e}; LoRA parameters {lora_before:,} -> "
          f"{lora_parameters(model):,}; max |logits difference| = {difference:.2e}")  # fmt: skip
    print(f"left to run besides the backbone: {parameter_report(model).groups}")
    return {"max_abs_diff": difference, "weight_update": update, "lora_before": lora_before,
            "lora_after": lora_parameters(model), "groups": report.groups}  # fmt: skip


if __name__ == "__main__":
    main()
