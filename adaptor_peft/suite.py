"""``adaptor-peft suite``: the offline transfer suite's protocol, in one resumable command.

For each task of ``recipes/offline_vtab/`` and each method: the learning rate is chosen from a grid of at
least three rates on the mean val200 top-1 of two training seeds (trained on ``train800``), so that one
collapsed run does not decide. Where the choice is an edge of the grid, the grid is extended one step on
that side, once, and the choice made again (recorded as ``extended``). Then the method is trained on
``train800val200`` with that rate and read on ``test``, once per final seed; final seed ``i`` draws its own
data (the generator's data seed + ``i``) and its own training seed (the recipe's + ``i``). The test split
chooses nothing. Run folders::

    OUT/select/<task>/<method>/lr_<lr>/           model selection, training seed 0 (train800 -> val200)
    OUT/select/<task>/<method>/seed_1/lr_<lr>/    the same, training seed 1
    OUT/test/seed_<i>/<task>/<method>/            the reported runs (train800val200 -> test)

A finished run is skipped when the command runs again, so an interrupted suite resumes (an interrupted run
resumes after its last epoch); a run of another code version is refused unless ``--allow-other-version``.
The report, ``suite.md`` / ``suite.json`` / ``suite.png``, gives mean ± sd over seeds per task, per group,
both VTAB-1k averages and per task role (design, reported, held-out: :func:`~.data.synthetic.task_roles`),
every per-seed value, the val200 scores, the chosen and extended learning rates, and the headline
comparisons as paired mean differences with 95 % intervals over tasks × seeds (:data:`COMPARISONS`), the
held-out tasks first. ``adaptor-peft summarize OUT/test/seed_0`` gives one seed's table.

``--calibrate`` runs only the selection stage at each recipe's own learning rate (by default for
``linear_probe`` and ``full``) and writes ``calibration.md``: the check that the tasks discriminate.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .atomic import write_atomically
from .data.synthetic import TASKS, suite_groups, task_roles
from .reports import combine, paired_difference, summarize
from .training import load_recipe
from .training.pool import train_runs
from .training.progress import show_runs
from .training.recipe import recipes_dir

SUITE = "offline_vtab"
TUNED = "_tuned.yaml"
"""The suite's tuned method options, in its recipes folder."""
METHODS = (
    "linear_probe",
    "bias",
    "lora",
    "lora_x_proj",
    "lora_p_x",
    "parallel_adapter",
    "adaptor_t",
    "adaptor_s",
    "adaptor",
    "adaptor+lora",
    "full",
    "adaptor_booster",
)
"""Every method of the suite's table (``--methods all``)."""
DEFAULT_METHODS = ("linear_probe", "lora", "adaptor", "full")
"""The default run: the adaptor against its references."""
LEARNING_RATES = (1e-3, 3e-3, 1e-2)
"""The grid every method's learning rate is chosen from on val200 (extended at an edge that is chosen); it
holds the recipes' own (3e-3), so the calibration runs count as selection runs."""
SELECTION_SEEDS = 2
"""Training seeds whose mean val200 top-1 chooses the learning rate."""
LORA_METHODS = ("lora", "lora_x_proj", "lora_p_x")
"""The LoRA variants; per task, the one of best mean val200 (at its chosen rate) is the "best LoRA"."""
BEST_LORA = "best LoRA"
COMPARISONS = (("adaptor", BEST_LORA), ("adaptor", "parallel_adapter"), ("adaptor_booster", "full"))
"""The headline comparisons (first minus second), each made where both methods ran."""
QUICK = (
    "data.builtin.sizes.train800=8",
    "data.builtin.sizes.val200=4",
    "data.builtin.sizes.test=8",
    "epochs=1",
    "batch_size=4",
    "eval_batch_size=8",
)
"""``--quick``: tiny splits and one epoch, a smoke test of the whole protocol in seconds per run."""
SELECT = ("train_split=train800", "eval_split=val200")


class SuiteError(ValueError):
    """A suite asked for with an unknown method or task, no seed or too small a learning-rate grid."""


def tuned_options() -> dict[str, dict[str, Any]]:
    """Method -> the options chosen for it on the design tasks' val (``recipes/offline_vtab/_tuned.yaml``,
    written by ``benchmarks/ablation.py --choose``), so that every method is tuned with the same budget."""
    path = recipes_dir() / SUITE / TUNED
    tuned = yaml.safe_load(path.read_text()) if path.exists() else None
    if not isinstance(tuned or {}, dict) or not all(isinstance(v, dict) for v in (tuned or {}).values()):
        raise SuiteError(f"{path}: expected a mapping of method to its options")
    return tuned or {}


def _recipe(task: str, method: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The task's recipe with ``method``, the method's tuned options under the recipe's, and ``overrides``; a
    run that diverges is recorded as a failed setting (``record_divergence``), so that the grid goes on."""
    recipe = load_recipe(f"{SUITE}/{task}", [f"method={method}", "record_divergence=true", *overrides])
    recipe["method_options"] = {**tuned_options().get(method, {}), **recipe["method_options"]}
    return recipe


def _progress(enabled: bool, console: Console) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, TextColumn("{task.fields[run]}"), console=console, disable=not enabled)


def choose_rate(val: Mapping[float, Sequence[float]]) -> float:
    """The learning rate of the highest mean val top-1 over its training seeds (``val``: rate -> one score
    per seed); the smallest of equals."""
    return max(sorted(val), key=lambda lr: statistics.fmean(val[lr]))


def edge_step(grid: Sequence[float], chosen: float) -> float | None:
    """The rate one step beyond the edge of ``grid`` that ``chosen`` is (the grid's ratio at that edge,
    rounded to 3 significant digits); None where ``chosen`` lies inside."""
    rates = sorted(grid)
    if len(rates) < 2 or rates[0] < chosen < rates[-1]:
        return None
    step = rates[0] ** 2 / rates[1] if chosen == rates[0] else rates[-1] ** 2 / rates[-2]
    return float(f"{step:.3g}")


def final_recipe(recipe: dict[str, Any], index: int) -> dict[str, Any]:
    """Final run ``index``'s recipe: the training seed and the generated data's seed both moved by ``index``."""
    builtin = recipe["data"]["builtin"]
    data = {**recipe["data"], "builtin": {**builtin, "seed": builtin.get("seed", 0) + index}}
    return {**recipe, "seed": recipe["seed"] + index, "data": data}


def run_suite(
    output_dir: str | Path = "runs/suite",
    methods: Sequence[str] = DEFAULT_METHODS,
    tasks: Sequence[str] = tuple(TASKS),
    seeds: int = 3,
    learning_rates: Sequence[float] = LEARNING_RATES,
    overrides: Sequence[str] = (),
    *,
    quick: bool = False,
    workers: int | None = None,
    progress: bool = True,
    console: Console | None = None,
    selection_seeds: int = SELECTION_SEEDS,
    allow_other_version: bool = False,
) -> dict[str, Any]:
    """Runs the protocol (module docstring) under ``output_dir`` and writes its report there; returns the
    report's JSON content. ``overrides`` (``key=value``) apply to every run, after ``--quick``'s; ``workers``
    runs train at once (default: :func:`~adaptor_peft.training.pool.default_workers`; from a script, call it
    under ``if __name__ == "__main__":``); ``allow_other_version`` reuses runs of another code version."""
    console = console or Console()
    output, overrides = Path(output_dir), [*(QUICK if quick else ()), *overrides]
    methods, tasks = list(dict.fromkeys(methods)), list(dict.fromkeys(tasks))
    learning_rates = sorted(set(learning_rates))
    _check(methods, tasks)
    if seeds < 1 or selection_seeds < 1 or len(learning_rates) < 3:
        raise SuiteError(
            f"the suite needs at least one seed (got {seeds}), one selection seed (got {selection_seeds}) and "
            f"three learning rates (got {learning_rates})"
        )
    pairs = [(task, method) for task in tasks for method in methods]
    total = len(pairs) * (len(learning_rates) * selection_seeds + seeds)
    minutes: list[float] = []
    results: list[dict[str, Any]] = []
    with _progress(progress, console) as bar:
        job = bar.add_task("offline_vtab suite", total=total, run="")

        def stage(jobs: list[tuple[dict[str, Any], Path]]) -> list[dict[str, Any]]:
            labels = [str(run.relative_to(output)) for _, run in jobs]

            def finished(index: int, result: dict[str, Any], took: float | None) -> None:
                minutes.extend([took] if took is not None else [])
                bar.update(job, advance=1, run=labels[index])

            with show_runs(labels, live=False, console=console) as lines:  # on a terminal the bar stands for them
                shown = None if progress and console.is_terminal else lines
                outcomes = train_runs(jobs, workers, finished, show=shown, allow_other_version=allow_other_version)
            found = [result for result, _ in outcomes]
            results.extend(found)
            return found

        val: dict[tuple[str, str], dict[float, list[float]]] = {pair: {} for pair in pairs}

        def select(rates: dict[tuple[str, str], list[float]]) -> None:
            keys, jobs = [], []
            for pair, grid in rates.items():
                for index in range(selection_seeds):
                    for lr, run, recipe in selection_runs(output, *pair, grid, overrides, seed_index=index):
                        keys.append((pair, lr))
                        jobs.append((recipe, run))
            for (pair, lr), result in zip(keys, stage(jobs), strict=True):
                val[pair].setdefault(lr, []).append(result["top1"])

        select({pair: learning_rates for pair in pairs})
        first = {pair: choose_rate(val[pair]) for pair in pairs}
        steps = {pair: step for pair in pairs if (step := edge_step(learning_rates, first[pair])) is not None}
        bar.update(job, total=total + len(steps) * selection_seeds)
        if steps:
            select({pair: [step] for pair, step in steps.items()})
        chosen = {pair: choose_rate(val[pair]) for pair in pairs}
        jobs = [
            (
                final_recipe(_recipe(*pair, [f"lr={chosen[pair]}", *overrides]), index),
                _final_folder(output, index, pair),
            )
            for index in range(seeds)
            for pair in pairs
        ]
        tested = stage(jobs)
    per_seed = [tested[i * len(pairs) : (i + 1) * len(pairs)] for i in range(seeds)]
    summary = combine([summarize(runs, suite_groups()) for runs in per_seed])
    scores = {method: {task: [] for task in tasks} for method in methods}
    for result in tested:
        scores[result["method"]][result["task"]].append(result["top1"])
    best_lora = _best_lora(val, chosen, tasks, methods)
    report = {
        "protocol": {
            "methods": list(methods),
            "tasks": list(tasks),
            "seeds": seeds,
            "selection_seeds": selection_seeds,
            "final_runs": [
                {"index": i, "training_seed": recipe["seed"], "data_seed": recipe["data"]["builtin"]["seed"]}
                for i, (recipe, _) in enumerate(jobs[:: len(pairs)])
            ],
            "quick": quick,
            "learning_rates": list(learning_rates),
            "overrides": list(overrides),
            "tuned_options": {method: options for method, options in tuned_options().items() if method in methods},
        },
        "code_versions": sorted({str(result.get("code")) for result in results}),
        "roles": {role: [t for t in names if t in tasks] for role, names in task_roles().items()},
        "learning_rate": {task: {m: chosen[task, m] for m in methods} for task in tasks},
        "extended": {
            task: {m: {"added": steps[task, m], "chosen_before": first[task, m]} for m in methods if (task, m) in steps}
            for task in tasks
        },
        "val": {
            task: {m: {f"{lr:g}": val[task, m][lr] for lr in sorted(val[task, m])} for m in methods} for task in tasks
        },
        "per_seed": scores,
        "best_lora": best_lora,
        "role_means": _role_means(scores, tasks),
        "comparisons": comparisons(scores, best_lora, tasks),
        "diverged": sorted(_diverged(r) for r in results if r.get("diverged")),
        "minutes_per_run": round(sum(minutes) / len(minutes), 3) if minutes else None,
        "runs_trained_now": len(minutes),
        **summary.to_dict(),
    }
    write_atomically(output / "suite.json", json.dumps(report, indent=2) + "\n")
    write_atomically(output / "suite.md", _markdown(report, summary.to_markdown()))
    summary.plot(output / "suite.png", f"mean of {len(TASKS)} tasks")  # no point where a task is missing
    console.print(summary.to_markdown())
    console.print(_comparison_table(report["comparisons"]))
    console.print(f"written: {output / 'suite.md'}, {output / 'suite.json'}, {output / 'suite.png'}")
    return report


def _diverged(result: dict[str, Any]) -> str:
    """A diverged run, named for the report."""
    where = result["diverged"]
    return f"{result['task']}/{result['method']} on {result['eval_split']} (lr {where['lr']:g}, seed {where['seed']})"


def _final_folder(output: Path, index: int, pair: tuple[str, str]) -> Path:
    return output / "test" / f"seed_{index}" / pair[0] / pair[1]


def _best_lora(
    val: Mapping[tuple[str, str], Mapping[float, Sequence[float]]],
    chosen: Mapping[tuple[str, str], float],
    tasks: Sequence[str],
    methods: Sequence[str],
) -> dict[str, str]:
    """Per task, the LoRA variant run whose mean val200 top-1 at its chosen rate is highest (first of equals)."""
    loras = [m for m in LORA_METHODS if m in methods]
    if not loras:
        return {}
    return {t: max(loras, key=lambda m: statistics.fmean(val[t, m][chosen[t, m]])) for t in tasks}


def _role_means(scores: Mapping[str, Mapping[str, Sequence[float]]], tasks: Sequence[str]) -> dict[str, Any]:
    """Per method and role: mean and sd over seeds of the mean over the role's tasks; None where a task of
    the role did not run."""
    means: dict[str, Any] = {}
    for method, per_task in scores.items():
        means[method] = {}
        for role, names in task_roles().items():
            if not all(t in tasks for t in names):
                means[method][role] = None
                continue
            seeds = [statistics.fmean(per_task[t][i] for t in names) for i in range(len(per_task[names[0]]))]
            sd = statistics.stdev(seeds) if len(seeds) > 1 else 0.0
            means[method][role] = {"mean": statistics.fmean(seeds), "sd": sd}
    return means


def comparisons(
    scores: Mapping[str, Mapping[str, Sequence[float]]], best_lora: Mapping[str, str], tasks: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    """The headline comparisons (:data:`COMPARISONS`) per role and over all ``tasks``: paired mean
    differences of test top-1 over the role's tasks × final seeds (a pair: one task, one data and training
    seed), with 95 % t-intervals; "within noise" where the interval holds 0. ``scores``: method -> task ->
    per-seed top-1; ``best_lora``: task -> LoRA variant."""
    scores = {**scores, BEST_LORA: {t: scores[m][t] for t, m in best_lora.items()}}
    groups = {**{role: [t for t in names if t in tasks] for role, names in task_roles().items()}, "all": list(tasks)}
    out: dict[str, list[dict[str, Any]]] = {}
    for group, names in groups.items():
        out[group] = []
        for a, b in COMPARISONS:
            if a not in scores or b not in scores or not names:
                continue
            left = [x for t in names for x in scores[a][t]]
            right = [x for t in names for x in scores[b][t]]
            if len(left) < 2:
                continue
            difference = paired_difference(left, right)
            out[group].append({"a": a, "b": b, "tasks": names, **difference.to_dict()})
    return out


def selection_runs(
    output_dir: str | Path,
    task: str,
    method: str,
    learning_rates: Sequence[float],
    overrides: Sequence[str] = (),
    label: str | None = None,
    seed_index: int = 0,
) -> list[tuple[float, Path, dict[str, Any]]]:
    """The model-selection runs of ``method`` on ``task``, one per learning rate: ``(lr, run folder, recipe)``,
    trained on train800 and read on val200. ``label`` names the folder in place of the method (a variant of
    it, made by ``overrides`` such as ``method_options.s_rank=8``); ``seed_index`` moves the training seed
    (its runs are kept under ``seed_<index>/``, seed 0's directly)."""
    folder = Path(output_dir) / "select" / task / (label or method)
    folder = folder / f"seed_{seed_index}" if seed_index else folder
    runs = []
    for lr in learning_rates:
        recipe = _recipe(task, method, [f"lr={lr}", *overrides, *SELECT])
        runs.append((lr, folder / f"lr_{lr:g}", {**recipe, "seed": recipe["seed"] + seed_index}))
    return runs


def _check(methods: Sequence[str], tasks: Sequence[str]) -> None:
    from .adaptors import METHODS as KNOWN

    unknown = [m for m in methods if m not in KNOWN] + [t for t in tasks if t not in TASKS]
    if unknown:
        raise SuiteError(
            f"unknown method(s) or task(s) {unknown}; methods: {', '.join(KNOWN)}; tasks: {', '.join(TASKS)}"
        )


def _comparison_table(groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Markdown table of :func:`comparisons`, the held-out tasks first (the headline)."""
    lines = [
        "| tasks | comparison | pairs | mean difference | 95 % interval | verdict |",
        "|---|---|---:|---:|---|---|",
    ]
    for group in ("held-out", *(g for g in groups if g != "held-out")):
        for row in groups.get(group, ()):
            ahead = row["a"] if row["mean"] > 0 else row["b"]
            verdict = "within noise" if row["within_noise"] else f"{ahead} ahead"
            lines.append(
                f"| {group} | {row['a']} − {row['b']} | {row['n']} | {row['mean']:+.2f} | "
                f"[{row['low']:+.2f}, {row['high']:+.2f}] | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def _markdown(report: dict[str, Any], table: str) -> str:
    protocol = report["protocol"]
    lrs = ", ".join(f"{lr:g}" for lr in protocol["learning_rates"])
    seeds = ", ".join(f"{run['training_seed']}/{run['data_seed']}" for run in protocol["final_runs"])

    def rate(task: str, method: str) -> str:
        extended = report["extended"][task].get(method)
        chosen = f"{report['learning_rate'][task][method]:g}"
        return f"{chosen} (grid extended by {extended['added']:g})" if extended else chosen

    def role_cell(value: dict[str, float] | None) -> str:
        return "–" if value is None else f"{value['mean']:.2f} ± {value['sd']:.2f}"

    methods = protocol["methods"]
    lines = [
        f"# Offline VTAB-1k-style suite: top-1 % on test, mean ± sd over {protocol['seeds']} seed(s)",
        "",
        f"Code version(s): {', '.join(report['code_versions'])}. Learning rate chosen per task and method from "
        f"{{{lrs}}} on the mean val200 top-1 of {protocol['selection_seeds']} training seed(s) after training on "
        "train800, the grid extended one step where an edge was chosen; then trained on train800val200 and read "
        f"on test, each final run with its own training/data seed ({seeds}). Quick mode (tiny splits, one "
        f"epoch): {'yes' if protocol['quick'] else 'no'}. Overrides: {' '.join(protocol['overrides']) or 'none'}.",
        "",
        "Headline: paired differences of test top-1 over tasks × seeds (held-out tasks first; every method's "
        "options were chosen on the design tasks' val200):",
        "",
        _comparison_table(report["comparisons"]),
        "Mean over each role's tasks, ± sd over seeds:",
        "",
        "| role | tasks | " + " | ".join(methods) + " |",
        "|---|---|" + "---:|" * len(methods),
        *(
            f"| {role} | {', '.join(names)} | "
            + " | ".join(role_cell(report["role_means"][m][role]) for m in methods)
            + " |"
            for role, names in report["roles"].items()
            if names
        ),
        "",
        table,
        "Learning rate chosen on val200:",
        "",
        "| task | " + " | ".join(methods) + " |",
        "|---|" + "---:|" * len(methods),
        *(f"| {t} | " + " | ".join(rate(t, m) for m in methods) + " |" for t in report["learning_rate"]),
        "",
        "Runs whose loss became non-finite (scored 0): " + (", ".join(report["diverged"]) or "none") + ".",
        "",
    ]
    return "\n".join(lines)


def calibrate(
    output_dir: str | Path = "runs/suite",
    methods: Sequence[str] = ("linear_probe", "full"),
    tasks: Sequence[str] = tuple(TASKS),
    overrides: Sequence[str] = (),
    *,
    quick: bool = False,
    workers: int | None = None,
    console: Console | None = None,
    allow_other_version: bool = False,
) -> str:
    """Trains each method on each task's train800 at the recipe's own learning rate and seed (``workers`` at
    a time, as :func:`run_suite`), reads val200 (never test), and writes ``calibration.md`` under
    ``output_dir``; returns its table. Its runs are the selection runs of :func:`run_suite` at that learning
    rate, so a suite run later reuses them."""
    console = console or Console()
    output, overrides = Path(output_dir), [*(QUICK if quick else ()), *overrides]
    methods, tasks = list(dict.fromkeys(methods)), list(dict.fromkeys(tasks))
    _check(methods, tasks)
    pairs = [(task, method) for task in tasks for method in methods]
    jobs = [
        (recipe, run)
        for task, method in pairs
        for _, run, recipe in selection_runs(output, task, method, [_recipe(task, method, overrides)["lr"]], overrides)
    ]
    outcomes = train_runs(jobs, workers, allow_other_version=allow_other_version)
    results = dict(zip(pairs, (result for result, _ in outcomes), strict=True))
    header = "| task | group | stands in for | " + " | ".join(methods) + " | gap (last − first) | minutes training |"
    lines = [header, "|---|---|---|" + "---:|" * (len(methods) + 2)]
    for task in tasks:
        scores = [results[task, method]["top1"] for method in methods]
        took = [results[task, method].get("minutes") for method in methods]
        minutes = "–" if None in took else f"{sum(took):.1f}"  # None: an epoch logged by an older version
        console.print(
            f"{task}: val200 top-1 " + ", ".join(f"{m} {s:.2f} %" for m, s in zip(methods, scores, strict=True))
        )
        cells, entry, gap = " | ".join(f"{s:.2f}" for s in scores), TASKS[task], scores[-1] - scores[0]
        lines.append(f"| {task} | {entry.group} | {entry.stands_in_for} | {cells} | {gap:.2f} | {minutes} |")
    table = "\n".join(lines) + "\n"
    write_atomically(output / "calibration.md", table)
    console.print(table)
    return table
