"""Tiny recipes and VTAB-1k-style folders for training tests."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from adaptor_peft.training import load_recipe

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
TINY_RECIPE = [
    *("model=vim_tiny_patch16_224", "model_options.depth=2", "img_size=32", "epochs=2", "warmup_epochs=1"),
    *("batch_size=8", "eval_batch_size=8", "num_workers=0", "drop_path=0"),
]
"""Overrides that make any recipe a tiny two-epoch run on the CPU."""


def picture(path: Path, label: int, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in COLOURS[label])
    Image.new("RGB", (24, 20), colour).save(path)


def vtab_task(root: Path, task: str = "cifar", train: int = 32, test: int = 12) -> Path:
    """A VTAB-1k task folder in the NOAH layout with three colour classes."""
    rng = random.Random(task)
    folder = root / task
    lines: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    sizes = {"train800": train * 3 // 4, "val200": train - train * 3 // 4, "test": test}
    for split, count in sizes.items():
        for i in range(count):
            name = f"images/{split}_{i}.png"
            picture(folder / name, i % 3, rng)
            lines[split].append(f"{name} {i % 3}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, entries in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return root


def tiny_recipe(checkpoint: Path, *overrides: str, name: str = "vtab1k/cifar") -> dict:
    return load_recipe(name, [*TINY_RECIPE, f"checkpoint={checkpoint}", *overrides])


def interrupt(epoch: int) -> None:
    """An ``after_epoch`` hook that kills the run after its first epoch's checkpoint."""
    raise KeyboardInterrupt
