"""Backbone usage: the embedded nano Vim pretrained with Adaptor-T and Adaptor-S built in, against the same
backbone pretrained plain, over pretraining seeds, at equal epochs and at equal compute; then every
backbone transferred to the offline suite's tasks by methods that add no adaptors.

Three arms per pretraining seed, each seed's fractal data shared by all three
(``examples/pretrain_tiny.py --seed``): ``adaptor`` (``--adaptor``, ``--epochs``), ``plain`` (the same
epochs) and ``plain, equal compute`` (``--epochs`` times ``--compute-ratio``, rounded: what an adaptor
epoch costs in plain epochs). Every backbone is then transferred at each task recipe's own learning rate
(nothing is chosen, so nothing is tuned), one run per task, method and pretraining seed, with the data
seed and training seed moved by the seed's index as the suite's final runs are. The report gives each
arm's held-out pretraining top-1 and transfer test top-1 as mean ± sd over seeds, and the paired
differences of the adaptor arm against each plain arm with 95 % t-intervals over pretraining seeds (for
transfer, of each seed's mean over the tasks: the tasks of a seed share its backbones), labelled "within
noise" where the interval holds 0, and names any transfer run that diverged. Every pretraining
and every transfer run is kept under ``--output-dir`` and read back when the command runs again, so an
interrupted study resumes. Usage:

    python benchmarks/backbone_usage.py [--seeds 0,1,2] [--epochs 8] [--compute-ratio 1.25]
        [--classes 100 --per-class 100] [--tasks digits,landcover,count,distance]
        [--methods linear_probe,bias,lora,full] [--output-dir runs/backbone]
        [--output benchmarks/results/backbone_usage.md] [--workers N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptor_peft.atomic import write_atomically
from adaptor_peft.data.synthetic import task_roles
from adaptor_peft.provenance import code_version
from adaptor_peft.reports.paired import PairedDifference, paired_difference
from adaptor_peft.suite import QUICK, final_recipe
from adaptor_peft.training.pool import train_runs
from adaptor_peft.training.recipe import load_recipe
from benchmarks.machine import provenance

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "examples" / "pretrain_tiny.py"
METHODS = ("linear_probe", "bias", "lora", "full")
"""Methods that add no adaptors: the adaptor arm's built-in adaptors are backbone weights to them."""
QUICK_PRETRAINING = ("--classes", "3", "--per-class", "4", "--batch-size", "4")
PAIRED_TRANSFER = (
    "Paired differences of the task means, over pretraining seeds (95 % t-intervals): a seed's tasks share "
    "its pair of backbones, so the seed, not the task, is the independent unit."
)


class Arm(NamedTuple):
    name: str
    adaptor: bool
    epochs: int
    model: str


def arms(epochs: int, compute_ratio: float) -> list[Arm]:
    """The adaptor arm and the two plain ones it is compared with."""
    return [
        Arm("adaptor", True, epochs, "vim_nano_patch4_32_adaptor"),
        Arm("plain", False, epochs, "vim_nano_patch4_32"),
        Arm("plain, equal compute", False, round(epochs * compute_ratio), "vim_nano_patch4_32"),
    ]


def label(arm: Arm) -> str:
    """The arm's folder name: what it pretrained with and how long (the two plain arms differ in epochs)."""
    return f"{'adaptor' if arm.adaptor else 'plain'}_epochs{arm.epochs}"


def weights_file(output_dir: Path, arm: Arm, seed: int) -> Path:
    return output_dir / "pretrain" / f"{label(arm)}_seed{seed}.safetensors"


UNRECORDED = "unrecorded"
"""The machine of a pretraining whose weights do not name one."""


def machines(records: Iterable[dict]) -> str:
    """Where ``records``' minutes were measured: each machine with its number of pretrainings."""
    counts = Counter(record.get("machine", UNRECORDED) for record in records)
    return "; ".join(f"{machine} ({count})" for machine, count in counts.most_common())


def pretrain(arm: Arm, seed: int, output_dir: Path, size: list[str]) -> dict:
    """The arm's backbone for ``seed`` (pretrained unless its weights exist; an interrupted run resumes), and
    its final record: held-out top-1 %, minutes and the machine that measured them ("unrecorded" for weights
    from before the pretraining script recorded it)."""
    path = weights_file(output_dir, arm, seed)
    settings = [*size, "--epochs", str(arm.epochs), "--seed", str(seed)]
    if not path.exists():
        command = [sys.executable, str(PRETRAIN), *settings, "--output", str(path), *(["--adaptor"] * arm.adaptor)]
        subprocess.run(command, check=True, cwd=ROOT)
    with safe_open(str(path), "pt") as weights:
        metadata = weights.metadata()
    expected = {flag[2:].replace("-", "_"): value for flag, value in zip(settings[::2], settings[1::2], strict=True)}
    expected.update(adaptor=str(arm.adaptor), code=code_version())  # the transfer runs check theirs alike
    differ = {key: (metadata.get(key), value) for key, value in expected.items() if metadata.get(key) != value}
    if differ:
        raise SystemExit(f"{path}: pretrained with other settings than the arm's (file, arm): {differ}; remove it")
    return {**json.loads(metadata["history"])[-1], "machine": metadata.get("machine", UNRECORDED)}


def transfer_jobs(
    arm: Arm, seed_index: int, seed: int, output_dir: Path, tasks: list[str], methods: list[str], quick: bool
) -> list[tuple[dict, Path]]:
    """One run per task and method on the arm's backbone of ``seed``, at the recipe's learning rate."""
    checkpoint = weights_file(output_dir, arm, seed)
    overrides = [f"model={arm.model}", f"checkpoint={checkpoint}", "record_divergence=true", *(QUICK if quick else ())]
    jobs = []
    for task in tasks:
        for method in methods:
            recipe = final_recipe(load_recipe(f"offline_vtab/{task}", [f"method={method}", *overrides]), seed_index)
            jobs.append((recipe, output_dir / "transfer" / label(arm) / f"seed_{seed}" / task / method))
    return jobs


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}"


def difference(pair: PairedDifference) -> str:
    verdict = "within noise" if pair.within_noise else "beyond noise"
    return f"{pair.mean:+.2f} [{pair.low:+.2f}, {pair.high:+.2f}], n = {pair.n}, {verdict}"


def report(
    title: str,
    setup: list[Arm],
    seeds: list[int],
    pretraining: dict[tuple[str, int], dict],
    transfer: dict[tuple[str, int, str, str], float],
    tasks: list[str],
    methods: list[str],
    diverged: Sequence[str] = (),
) -> str:
    """The Markdown report: pretraining and transfer per arm, the adaptor arm's paired differences, and the
    transfer runs that diverged (named in ``diverged``; they count as 0 in the means)."""
    adaptor, plains = setup[0], setup[1:]
    seed_cells = " | ".join(f"seed {s}" for s in seeds)
    lines = [title, "", "## Pretraining: held-out top-1 % on the pretraining classes", ""]
    lines += [f"| arm | epochs | {seed_cells} | mean ± sd | minutes, mean |", "|---|---:|" + "---:|" * (len(seeds) + 2)]
    minutes = {arm: statistics.fmean(pretraining[arm.name, s]["minutes"] for s in seeds) for arm in setup}
    for arm in setup:
        top1 = [pretraining[arm.name, s]["held_out_top1"] for s in seeds]
        cells = " | ".join(f"{v:.1f}" for v in top1)
        lines.append(f"| {arm.name} | {arm.epochs} | {cells} | {spread(top1)} | {minutes[arm]:.1f} |")
    lines += ["", f"Pretrained on: {machines(pretraining.values())}."]
    if all(pretraining[plains[0].name, s]["minutes"] > 0 for s in seeds):  # rounded to 0.1: a tiny one has none

        def cost(adaptor_minutes: float, plain_minutes: float) -> float:  # an adaptor epoch, in plain epochs
            return (adaptor_minutes / adaptor.epochs) / (plain_minutes / plains[0].epochs)

        per_seed = ", ".join(
            f"{cost(pretraining[adaptor.name, s]['minutes'], pretraining[plains[0].name, s]['minutes']):.2f}"
            for s in seeds
        )
        lines += [
            "",
            f"An adaptor epoch took {cost(minutes[adaptor], minutes[plains[0]]):.2f} plain epochs here (per seed: "
            f"{per_seed}; a seed's pretrainings ran one after the other); equal compute assumed "
            f"{plains[-1].epochs / adaptor.epochs:.2f}.",
        ]
    if len(seeds) > 1:
        lines.append("")
        for plain in plains:
            a, b = ([pretraining[arm.name, s]["held_out_top1"] for s in seeds] for arm in (adaptor, plain))
            lines.append(f"- adaptor − {plain.name}: {difference(paired_difference(a, b))}")
    lines += ["", "## Transfer: test top-1 %, mean over the tasks per pretraining seed", ""]
    lines += [f"| method | arm | {seed_cells} | mean ± sd |", "|---|---|" + "---:|" * (len(seeds) + 1)]
    task_means = {
        (arm, method): [statistics.fmean(transfer[arm.name, s, t, method] for t in tasks) for s in seeds]
        for method in methods
        for arm in setup
    }
    for (arm, method), per_seed in task_means.items():
        lines.append(f"| {method} | {arm.name} | {' | '.join(f'{v:.2f}' for v in per_seed)} | {spread(per_seed)} |")
    if len(seeds) > 1:
        lines += ["", PAIRED_TRANSFER, ""]
        for method in methods:
            for plain in plains:
                pair = paired_difference(task_means[adaptor, method], task_means[plain, method])
                lines.append(f"- {method}, adaptor − {plain.name}: {difference(pair)}")
    lines += ["", f"Runs whose loss became non-finite (scored 0): {', '.join(diverged) or 'none'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="pretraining seeds (each seed's data shared by the arms)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--compute-ratio", type=float, default=1.25, help="an adaptor epoch's cost in plain epochs")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--tasks", default=",".join(task_roles()["design"]))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--output-dir", type=Path, default=Path("runs/backbone"))
    parser.add_argument("--output", type=Path, help="also write the report to this Markdown file")
    parser.add_argument("--workers", type=int, help="transfer runs trained at once (default: one per CPU core)")
    parser.add_argument("--quick", action="store_true", help="tiny pretraining and the suite's tiny splits")
    args = parser.parse_args(argv)
    seeds, tasks, methods = [int(s) for s in args.seeds.split(",")], args.tasks.split(","), args.methods.split(",")
    size = [*QUICK_PRETRAINING] if args.quick else ["--classes", str(args.classes), "--per-class", str(args.per_class)]
    output_dir = args.output_dir.resolve()
    setup = arms(args.epochs, args.compute_ratio)
    pretraining = {(arm.name, s): pretrain(arm, s, output_dir, size) for s in seeds for arm in setup}
    keys, jobs = [], []
    for index, seed in enumerate(seeds):
        for arm in setup:
            for recipe, folder in transfer_jobs(arm, index, seed, output_dir, tasks, methods, args.quick):
                keys.append((arm.name, seed, recipe["task"], recipe["method"]))
                jobs.append((recipe, folder))
    results = train_runs(jobs, args.workers)
    finished = [(key, outcome[0]) for key, outcome in zip(keys, results, strict=True)]
    transfer = {key: result["top1"] for key, result in finished}
    diverged = [" / ".join(map(str, key)) for key, result in finished if result.get("diverged")]
    title = f"# Backbone usage: pretrained with the adaptors built in, or plain\n\n{provenance(argv)}"
    text = report(title, setup, seeds, pretraining, transfer, tasks, methods, diverged)
    if args.output:
        write_atomically(args.output, text)
    print(text)
    return text


if __name__ == "__main__":
    main()
