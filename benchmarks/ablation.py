"""Each method's own choices on the design tasks' val200 splits of the offline suite (never test): the
adaptor's design, every method's rate multiplier, LoRA's placement and rank.

Each variant is a method with method options (``--variant NAME=METHOD[:key=value,...]``, or the
built-in ones below). On every task it is trained on train800 at each learning rate of the grid and each
training seed, and read on val200, as the suite's model selection does; the learning rate is chosen on
the mean val200 top-1 over the seeds, so that one collapsed run does not decide, and a choice at an edge
of the grid extends it one step on that side, once. The table gives that mean
at the chosen rate per task, their mean, the rate chosen and the trainable parameters (head excluded).
Runs are kept under ``--output-dir`` and skipped when the command runs again, so the table grows and
resumes. Usage:

    python benchmarks/ablation.py [--variants "lr_scale=1,lr_scale=10,..."] [--variant "NAME=adaptor:t_rank=8"]
        [--tasks count,...] [--lrs 0.001,0.003,0.01] [--seeds 42,43] [--workers N] [--output-dir runs/ablation]
        [--output benchmarks/results/adaptor_ablation.md] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptor_peft import create_model
from adaptor_peft.adaptors import prepare_model
from adaptor_peft.atomic import write_atomically
from adaptor_peft.data.synthetic import task_roles
from adaptor_peft.reports import parameter_report
from adaptor_peft.suite import LEARNING_RATES, QUICK, choose_rate, edge_step, selection_runs
from adaptor_peft.training.pool import train_runs
from benchmarks.machine import provenance

VARIANTS = {
    "lora": ("lora", {}),
    "lr_scale=1": ("adaptor", {"lr_scale": 1.0}),
    "lr_scale=4": ("adaptor", {"lr_scale": 4.0}),
    "lr_scale=16": ("adaptor", {"lr_scale": 16.0}),
    "lr_scale=10": ("adaptor", {"lr_scale": 10.0}),
    "K=1 lr_scale=10": ("adaptor", {"t_locations": 1, "lr_scale": 10.0}),
    "t_anchor=static": ("adaptor", {"t_anchor": "static", "lr_scale": 10}),
    "lr_scale=3": ("adaptor", {"lr_scale": 3}),
    "lr_scale=30": ("adaptor", {"lr_scale": 30}),
    "t_groups=1": ("adaptor", {"t_groups": 1, "lr_scale": 10}),
    "t_rank=8": ("adaptor", {"t_rank": 8, "lr_scale": 10}),
    "s_position=inner": ("adaptor", {"s_position": "inner", "lr_scale": 10}),
    "s_share_kernel=False": ("adaptor", {"s_share_kernel": False, "lr_scale": 10}),
}
"""name -> (method, options): LoRA as the bar, the adaptor before the study (lr_scale=1), the default it
chose then (lr_scale=10; the equal-tuning study of the ``adaptor`` family later chose 16),
and one more choice changed at a time. lr_scale is spelled out in every row; should
another default change, the run folders' records refuse the old runs instead of reading them back as
the new setting."""
FAMILIES = {
    "adaptor": VARIANTS,
    "lora": {
        "lora r=8": ("lora", {"r": 8, "lr_scale": 1.0}),
        "lora lr_scale=4": ("lora", {"r": 8, "lr_scale": 4.0}),
        "lora lr_scale=16": ("lora", {"r": 8, "lr_scale": 16.0}),
        "lora r=4": ("lora", {"r": 4, "lr_scale": 1.0}),
        "lora r=16": ("lora", {"r": 16, "lr_scale": 1.0}),
        "lora in+out_proj": ("lora", {"r": 8, "lr_scale": 1.0, "targets": ["in_proj", "out_proj"]}),
        "lora_x_proj": ("lora_x_proj", {"r": 8, "lr_scale": 1.0}),
        "lora_x_proj lr_scale=4": ("lora_x_proj", {"r": 8, "lr_scale": 4.0}),
        "lora_x_proj lr_scale=16": ("lora_x_proj", {"r": 8, "lr_scale": 16.0}),
        "lora_p_x": ("lora_p_x", {"r": 8, "lr_scale": 1.0}),
        "lora_p_x lr_scale=4": ("lora_p_x", {"r": 8, "lr_scale": 4.0}),
        "lora_p_x lr_scale=16": ("lora_p_x", {"r": 8, "lr_scale": 16.0}),
    },
    "parallel_adapter": {
        "rank=32": ("parallel_adapter", {"rank": 32, "lr_scale": 1.0}),
        "rank=32 lr_scale=4": ("parallel_adapter", {"rank": 32, "lr_scale": 4.0}),
        "rank=32 lr_scale=16": ("parallel_adapter", {"rank": 32, "lr_scale": 16.0}),
        "rank=8": ("parallel_adapter", {"rank": 8, "lr_scale": 1.0}),
        "rank=8 lr_scale=16": ("parallel_adapter", {"rank": 8, "lr_scale": 16.0}),
        "rank=16": ("parallel_adapter", {"rank": 16, "lr_scale": 1.0}),
        "rank=64": ("parallel_adapter", {"rank": 64, "lr_scale": 1.0}),
        "rank=64 lr_scale=16": ("parallel_adapter", {"rank": 64, "lr_scale": 16.0}),
        "rank=32 lr_scale=64": ("parallel_adapter", {"rank": 32, "lr_scale": 64.0}),
        "rank=128": ("parallel_adapter", {"rank": 128, "lr_scale": 1.0}),
    },
}
"""Each family's variants, run on the design tasks' val at every learning rate and seed: the rate multiplier
of the zero-initialised parameters (``lr_scale``: LoRA's B as in LoRA+, the parallel adapter's
up-projection, the adaptors) for every method, LoRA's placement (in_proj, x_proj, the x half of in_proj,
in and out projections) and rank, the parallel adapter's rank. ``--choose`` writes each method's best row
into the suite's tuned options."""
FOLLOWS = {"adaptor_booster": "adaptor"}
"""A method whose options ``--choose`` sets to another's choice: the booster's adaptors are the adaptor's."""
TUNED = Path(__file__).resolve().parents[1] / "recipes" / "offline_vtab" / "_tuned.yaml"
TASKS = task_roles()["design"]
"""The design tasks (digits, landcover, count, distance): one natural and one specialized task and two
structured ones, the largest linear-to-full gaps of each group in ``benchmarks/results/suite_calibration.md``.
Only these are tuned on; the suite's held-out tasks must never be."""


def parse_variant(text: str) -> tuple[str, tuple[str, dict[str, object]]]:
    """``NAME=METHOD[:key=value,...]`` -> (name, (method, options)); values are read as YAML scalars."""
    import yaml

    name, _, spec = text.partition("=")
    method, _, options = spec.partition(":")
    if not name or not method:
        raise SystemExit(f"--variant {text!r}: expected NAME=METHOD[:key=value,...]")
    pairs = (item.partition("=") for item in options.split(",") if item)
    return name, (method, {key: yaml.safe_load(value) for key, _, value in pairs})


def seed_label(name: str, seed: int, seeds: list[int]) -> str:
    """The run folder of a variant's seed: the variant's own with one seed (as runs made before seeds were
    an option), else one folder per seed inside it."""
    return name if len(seeds) == 1 else f"{name}/seed_{seed}"


def selection_val(
    output_dir: Path,
    name: str,
    method: str,
    overrides: list[str],
    seeds: list[int],
    grids: dict[str, list[float]],
    workers: int | None,
) -> dict[str, dict[float, list[float]]]:
    """Trains variant ``name`` at each task's rates (``grids``: task -> rates) with every training seed, as the
    suite's model selection does, and returns the val200 top-1s: task -> rate -> one per seed."""
    keys, jobs = [], []
    for task, grid in grids.items():
        for seed in seeds:
            folder = seed_label(name, seed, seeds)
            for lr, run, recipe in selection_runs(output_dir, task, method, grid, [*overrides, f"seed={seed}"], folder):
                keys.append((task, lr))
                jobs.append((recipe, run))
    val: dict[str, dict[float, list[float]]] = {task: {} for task in grids}
    for (task, lr), (result, _) in zip(keys, train_runs(jobs, workers) if jobs else [], strict=True):
        val[task].setdefault(lr, []).append(result["top1"])
    return val


def trainable(method: str, options: dict[str, object], model: str, num_classes: int) -> int:
    """Trainable parameters of the variant on ``model``, head excluded."""
    built = prepare_model(create_model(model, num_classes=num_classes), method, **options)
    return parameter_report(built).trainable_without_head


def table(rows: dict[str, dict[str, object]], tasks: list[str], lrs: list[float], seeds: list[int], title: str) -> str:
    head = "| variant | method | options | trainable | " + " | ".join(tasks) + " | mean | lr chosen |"
    lines = [title, "", head, "|---|---|---|---:|" + "---:|" * (len(tasks) + 2)]
    for name, row in rows.items():
        scores = [row["val"].get(t) for t in tasks]
        done = [s for s in scores if s is not None]
        cells = " | ".join("" if s is None else f"{s:.2f}" for s in scores)
        mean = f"{sum(done) / len(done):.2f}" if len(done) == len(tasks) else ""
        options = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "defaults"
        chosen = " ".join(f"{row['lr'][t]:g}{'*' * (t in row['extended'])}" for t in tasks if t in row["lr"])
        lines.append(f"| {name} | {row['method']} | {options} | {row['trainable']:,} | {cells} | {mean} | {chosen} |")
    grid = ", ".join(f"{lr:g}" for lr in lrs)
    over = "one seed" if len(seeds) == 1 else f"mean of seeds {', '.join(map(str, seeds))}"
    lines += ["", f"Best val200 top-1 % over lr in {{{grid}}}, {over}, trained on train800; *: the grid was extended"]
    lines += ["one step beyond the edge chosen, once, and the rate chosen again (the smallest of equals).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=list(FAMILIES), default="adaptor", help="whose variants to run")
    parser.add_argument("--variants", help="built-in variants of the family to run, in order (default: all)")
    parser.add_argument("--choose", action="store_true", help=f"write each method's best variant to {TUNED.name}")
    parser.add_argument("--variant", action="append", default=[], help="NAME=METHOD[:key=value,...], added")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LEARNING_RATES), help="the suite's grid")
    parser.add_argument("--seeds", default="42", help="training seeds; the rate is chosen on their mean val")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--output", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--quick", action="store_true", help="the suite's tiny splits: a smoke test")
    parser.add_argument("--workers", type=int, help="runs trained at once (default: one per CPU core)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    family = FAMILIES[args.family]
    chosen = args.variants.split(",") if args.variants else list(family)
    unknown = [v for v in chosen if v and v not in family]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; {args.family}'s: {', '.join(family)}")
    variants = {v: family[v] for v in chosen if v}
    variants.update(parse_variant(text) for text in args.variant)
    tasks, lrs = args.tasks.split(","), [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    overrides = [*(QUICK if args.quick else ()), *args.overrides]
    title = f"# {args.family} variants on the design tasks' val200\n\n{provenance(argv)}"
    rows: dict[str, dict[str, object]] = {}
    for name, (method, options) in variants.items():
        extra = [*overrides, *(f"method_options.{key}={value}" for key, value in options.items())]
        row = rows[name] = {"method": method, "options": options, "val": {}, "lr": {}, "trainable": 0}
        variant = (args.output_dir, name, method, extra, seeds)
        val = selection_val(*variant, {task: lrs for task in tasks}, args.workers)
        row["extended"] = {t: step for t in tasks if (step := edge_step(lrs, choose_rate(val[t]))) is not None}
        beyond = selection_val(*variant, {t: [step] for t, step in row["extended"].items()}, args.workers)
        for task, rates in beyond.items():  # an edge was chosen: one step beyond it, once, as the suite does
            val[task].update(rates)
        for task in tasks:
            row["lr"][task] = best = choose_rate(val[task])
            row["val"][task] = sum(val[task][best]) / len(seeds)
        recipe = selection_runs(args.output_dir, tasks[0], method, lrs, extra)[0][2]
        row["trainable"] = trainable(method, recipe["method_options"], recipe["model"], recipe["num_classes"])
        text = table(rows, tasks, lrs, seeds, title)
        if args.output:
            write_atomically(args.output, text)
        print(f"{name}: " + ", ".join(f"{t} {row['val'][t]:.2f}" for t in tasks), flush=True)
    if args.choose:
        command = f"benchmarks/ablation.py {' '.join(argv or sys.argv[1:])}"
        write_tuned(chosen_options(rows, tasks, args.family), command)
    print(text)
    return text


def best_options(rows: dict[str, dict[str, object]], tasks: list[str]) -> dict[str, dict[str, object]]:
    """Each method's options of its row with the best mean val over ``tasks`` (the first row on a tie)."""
    best: dict[str, tuple[float, dict[str, object]]] = {}
    for row in rows.values():
        mean = sum(row["val"][t] for t in tasks) / len(tasks)
        if row["method"] not in best or mean > best[row["method"]][0]:
            best[row["method"]] = (mean, row["options"])
    return {method: options for method, (_, options) in best.items()}


def chosen_options(rows: dict[str, dict[str, object]], tasks: list[str], family: str) -> dict[str, dict[str, object]]:
    """What ``--choose`` writes: the best options of the family's own methods (the adaptor family's rows hold
    LoRA as an untuned bar), and the same for the methods that follow one of them (:data:`FOLLOWS`)."""
    best = {m: o for m, o in best_options(rows, tasks).items() if m.startswith(family)}
    return {**best, **{follower: best[leader] for follower, leader in FOLLOWS.items() if leader in best}}


def write_tuned(chosen: dict[str, dict[str, object]], command: str, path: Path = TUNED) -> None:
    """Merges ``chosen`` into the suite's tuned options (other methods' entries stay), saying what chose them;
    every method's options are spelled out, none written as a YAML alias of another's."""
    import yaml

    class Spelled(yaml.SafeDumper):
        def ignore_aliases(self, data: object) -> bool:
            return True

    tuned = {**(yaml.safe_load(path.read_text()) or {} if path.exists() else {}), **chosen}
    header = f"# Method options chosen on the design tasks' val200; the suite applies them. Last: {command}\n"
    write_atomically(path, header + yaml.dump(tuned, Dumper=Spelled, sort_keys=True))


if __name__ == "__main__":
    main()
