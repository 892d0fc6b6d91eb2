"""Share a trained adapter: save it, reload it on a fresh backbone, and see a wrong backbone refused.

An adapter folder holds only what was trained (``adaptor.safetensors``) and how to rebuild it
(``adaptor_config.json``: method, options, and a fingerprint of the frozen backbone weights). Reloaded on a
fresh copy of the same backbone it gives the same logits to the last bit; on a backbone with other weights
``load_adaptor`` raises ``AdapterFileError`` instead of silently giving wrong predictions.

    python examples/share_adapter.py [--steps 10 --output adapter-digits]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from adaptor_peft import create_model, param_groups, save_adaptor
from adaptor_peft.adaptors import AdapterFileError, load_adaptor, prepare_model
from adaptor_peft.data import build_transform, data_config, load_split

MODEL = "vim_nano_patch4_32"


def backbone(checkpoint: str | None, seed: int = 0) -> nn.Module:
    """A fresh backbone; the seed makes a random one (no checkpoint) the same on every call."""
    torch.manual_seed(seed)
    return create_model(MODEL, checkpoint=checkpoint, num_classes=10)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help=f"backbone weights (default: the shipped {MODEL} weights)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, default=Path("adapter-digits"))
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or "pretrained"

    model = prepare_model(backbone(checkpoint), "adaptor")
    cfg = data_config(model)
    transform = build_transform("vtab", True, cfg["img_size"], cfg["mean"], cfg["std"])
    loader = DataLoader(load_split({"kind": "sklearn_digits"}, "train", transform=transform), args.batch_size, True)
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=1e-4))
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch, reshuffled
    for x, y in itertools.islice(batches, args.steps):  # a few steps move the adaptors off their zero init
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    folder = save_adaptor(model, args.output)
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir())}
    backbone_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    for name, size in files.items():
        print(f"{folder / name}: {size:,} bytes")
    print(f"adapter: {sum(files.values()):,} bytes; the frozen backbone it needs: {backbone_bytes:,} bytes")

    x = next(iter(loader))[0]
    fresh = load_adaptor(backbone(checkpoint), folder)
    with torch.no_grad():
        difference = (model.eval()(x) - fresh.eval()(x)).abs().max().item()
    print(f"reloaded on a fresh {MODEL}: max |logits difference| = {difference}")

    refused = None
    try:
        load_adaptor(backbone(None, seed=1), folder)  # same architecture, other (random) weights
    except AdapterFileError as error:
        refused = str(error)
        print(f"refused on another backbone: {refused}")
    return {"files": files, "max_abs_diff": difference, "refused": refused}


if __name__ == "__main__":
    main()
