"""One VTAB-1k task through a recipe: ``load_recipe`` + ``train``, the library form of ``adaptor-peft train``.

    python examples/vtab_task.py --task cifar --data-root vtab-1k --checkpoint vim_s_midclstok_80p5acc.pth \\
        --output-dir runs/vtab1k/cifar epochs=10

is the same run as

    adaptor-peft train --recipe vtab1k/cifar --data-root vtab-1k --checkpoint vim_s_midclstok_80p5acc.pth \\
        --output-dir runs/vtab1k/cifar epochs=10

``--data-root`` holds the NOAH / RepAdapter layout, one folder per task:

    vtab-1k/cifar/images/...              the images
    vtab-1k/cifar/train800val200.txt      the training split: "<path relative to cifar/> <int label>" a line
    vtab-1k/cifar/test.txt                the evaluation split (also train800.txt and val200.txt)

Without ``--data-root`` the recipe's hub copy is used, an approximation that is not VTAB-1k (see
``recipes/vtab1k/cifar.yaml``). Trailing ``key=value`` arguments override recipe keys (``method=lora``,
``epochs=1``, ``model_options.depth=2``). The run folder gets ``results.json``, ``log.jsonl``, ``adapter/`` and
resumable checkpoints; running the command again in the same folder resumes or re-reports it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adaptor_peft.training import load_recipe, train


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="cifar", help="a VTAB-1k task: recipes/vtab1k/<task>.yaml")
    parser.add_argument("--data-root", help="folder holding <task>/ in the NOAH layout (default: the hub copy)")
    parser.add_argument("--checkpoint", help="file, https URL or 'pretrained' (default: the recipe's)")
    parser.add_argument("--method", help="transfer method (default: the recipe's, adaptor)")
    parser.add_argument("--output-dir", type=Path, help="run folder (default: runs/vtab1k/<task>)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. epochs=1 lr=5e-4")
    args = parser.parse_args(argv)

    named = {"checkpoint": args.checkpoint, "method": args.method}
    overrides = [f"{key}={value}" for key, value in named.items() if value is not None] + args.overrides
    recipe = load_recipe(f"vtab1k/{args.task}", overrides)
    run = args.output_dir or Path("runs/vtab1k") / args.task
    weights = recipe["checkpoint"] or "scratch"
    print(f"{recipe['task']} ({recipe['group']}, {recipe['num_classes']} classes): {recipe['model']} + "
          f"{recipe['method']} from {weights}, {recipe['epochs']} epochs -> {run}")  # fmt: skip

    results = train(recipe, run, args.data_root, progress=not args.no_progress)
    trained = results["parameters"]
    print(f"{results['task']}: top-1 {results['top1']:.2f} %, top-5 {results['top5']:.2f} % on {results['eval_split']}")
    print(f"trained {trained['trainable_without_head']:,} parameters besides the head "
          f"({trained['trainable_percent']:.2f} % of the backbone) on {results['train_images']} images")  # fmt: skip
    print(f"run folder {run}: {', '.join(sorted(p.name for p in run.iterdir()))}")
    return results


if __name__ == "__main__":
    main()
