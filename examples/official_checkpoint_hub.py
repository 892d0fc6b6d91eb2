"""Fine-tune an official Vim checkpoint on a Hugging Face hub data set with Adaptor-T + Adaptor-S.

The library API without recipes: ``create_model`` reads the official training checkpoint as it is
released, ``prepare_model(model, "adaptor")`` adds both adaptors and freezes the backbone,
``parameter_report`` shows what trains, a plain PyTorch loop trains it, and ``save_adaptor`` writes only
the trained weights (hundreds of KB, not the 100 MB backbone).

    # vim_s_midclstok_80p5acc.pth from https://huggingface.co/hustvl/Vim-small-midclstok
    python examples/official_checkpoint_hub.py --checkpoint vim_s_midclstok_80p5acc.pth \\
        --dataset uoft-cs/cifar100 --split "train[:1000]" --image-column img --label-column fine_label

    # offline, in seconds: the embedded vim_nano_patch4_32 on scikit-learn's digits
    python examples/official_checkpoint_hub.py --offline-demo
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch.utils.data import DataLoader

from adaptor_peft import create_model, param_groups, save_adaptor
from adaptor_peft.adaptors import prepare_model
from adaptor_peft.data import build_transform, data_config, load_split
from adaptor_peft.reports import parameter_report

EMBEDDED = "vim_nano_patch4_32"


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="official Vim .pth (with --offline-demo: default the embedded weights)")
    parser.add_argument("--model", default="vim_small_patch16_224", help="architecture of --checkpoint")
    parser.add_argument("--dataset", default="uoft-cs/cifar100", help="hub id (or a local data set folder)")
    parser.add_argument("--config", help="hub data set config name")
    parser.add_argument("--split", default="train[:1000]", help="hub split expression")
    parser.add_argument("--image-column", default="img")
    parser.add_argument("--label-column", default="fine_label")
    parser.add_argument("--offline-demo", action="store_true", help=f"{EMBEDDED} on scikit-learn digits, no network")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", type=Path, default=Path("adapter-official-hub"))
    args = parser.parse_args(argv)

    if args.offline_demo:
        name, checkpoint, source = EMBEDDED, args.checkpoint or "pretrained", {"kind": "sklearn_digits"}
    elif args.checkpoint is None:
        parser.error("pass --checkpoint (an official Vim file), or --offline-demo")
    else:
        name, checkpoint = args.model, args.checkpoint
        source = {"kind": "hub", "id": args.dataset, "config": args.config, "splits": {"train": args.split},
                  "image_column": args.image_column, "label_column": args.label_column}  # fmt: skip
    images = load_split(source, "train")  # the head's size comes from the data; the transform from the model
    print(f"{images.describe()}; backbone {name} from {checkpoint or 'random weights (no checkpoint)'}")
    model = prepare_model(create_model(name, checkpoint=checkpoint, num_classes=images.num_classes), "adaptor")
    Console().print(parameter_report(model))

    cfg = data_config(model)  # input size, mean and std the checkpoint was trained with
    images.transform = build_transform("vtab", True, cfg["img_size"], cfg["mean"], cfg["std"], cfg["interpolation"])
    loader = DataLoader(images, args.batch_size, shuffle=True)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch, reshuffled
    optimizer = torch.optim.AdamW(param_groups(model, lr=args.lr, weight_decay=1e-4))
    model.train()
    for step, (x, y) in enumerate(itertools.islice(batches, args.steps), start=1):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(f"step {step}/{args.steps}: loss {loss.item():.4f}")

    folder = save_adaptor(model, args.output)
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"adapter written to {folder} ({size:,} bytes); reload it with load_adaptor(create_model(...), folder)")
    return folder


if __name__ == "__main__":
    main()
