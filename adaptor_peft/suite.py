"""``adaptor-peft suite``: the offline transfer suite's protocol, in one resumable command.

For each task of ``recipes/offline_vtab/`` and each method: the learning rate is picked from a small grid
by training on ``train800`` and reading ``val200`` (one seed), then the method is trained on
``train800val200`` with that learning rate and read on ``test``, once per seed. The test split chooses
nothing. Run folders::

    OUT/select/<task>/<method>/lr_<lr>/      model selection (train800 -> val200)
    OUT/test/seed_<i>/<task>/<method>/       the reported runs (train800val200 -> test)

A finished run is skipped when the command runs again, so an interrupted suite resumes (an interrupted run
resumes after its last epoch). The report, ``suite.md`` / ``suite.json`` / ``suite.png``, gives mean ± sd
over seeds per task, per group and both VTAB-1k averages, the chosen learning rates and the trainable
parameters; ``adaptor-peft summarize OUT/test/seed_0`` gives one seed's table.

``--calibrate`` runs only the selection stage at each recipe's own learning rate (by default for
``linear_probe`` and ``full``) and writes ``calibration.md``: the check that the tasks discriminate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .atomic import write_atomically
from .data.synthetic import TASKS, suite_groups
from .reports import combine, summarize
from .training import load_recipe
from .training.pool import train_runs
from .training.progress import show_runs

SUITE = "offline_vtab"
METHODS = (
    "linear_probe",
    "bias",
    "lora",
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
"""The default run: the adaptor against its references, as many methods as fit in 90 minutes on 2 CPU cores."""
LEARNING_RATES = (3e-3, 1e-2)
"""The grid every method's learning rate is chosen from on val200; it holds the recipes' own (3e-3), so the
calibration runs count as selection runs."""
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
    """A suite asked for with an unknown method or task, no seed or no learning rate."""


def _recipe(task: str, method: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The task's recipe with ``method`` and ``overrides``."""
    return load_recipe(f"{SUITE}/{task}", [f"method={method}", *overrides])


def _progress(enabled: bool, console: Console) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, TextColumn("{task.fields[run]}"), console=console, disable=not enabled)


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
) -> dict[str, Any]:
    """Runs the protocol (module docstring) under ``output_dir`` and writes its report there; returns the
    report's JSON content. ``overrides`` (``key=value``) apply to every run, after ``--quick``'s; ``workers``
    runs train at once (default: :func:`~adaptor_peft.training.pool.default_workers`; from a script, call it
    under ``if __name__ == "__main__":``)."""
    console = console or Console()
    output, overrides = Path(output_dir), [*(QUICK if quick else ()), *overrides]
    methods, tasks, learning_rates = (list(dict.fromkeys(x)) for x in (methods, tasks, learning_rates))
    _check(methods, tasks)
    if seeds < 1 or not learning_rates:
        raise SuiteError(
            f"the suite needs at least one seed (got {seeds}) and one learning rate (got {learning_rates})"
        )
    total = len(tasks) * len(methods) * (len(learning_rates) + seeds)
    minutes: list[float] = []
    with _progress(progress, console) as bar:
        job = bar.add_task("offline_vtab suite", total=total, run="")

        def stage(jobs: list[tuple[dict[str, Any], Path]]) -> list[dict[str, Any]]:
            labels = [str(run.relative_to(output)) for _, run in jobs]

            def finished(index: int, result: dict[str, Any], took: float | None) -> None:
                minutes.extend([took] if took is not None else [])
                bar.update(job, advance=1, run=labels[index])

            with show_runs(labels, live=False, console=console) as lines:  # on a terminal the bar stands for them
                shown = None if progress and console.is_terminal else lines
                return [result for result, _ in train_runs(jobs, workers, finished, show=shown)]

        pairs = [(task, method) for task in tasks for method in methods]
        selection = {pair: selection_runs(output, *pair, learning_rates, overrides) for pair in pairs}
        scores = iter(stage([(recipe, run) for runs in selection.values() for _, run, recipe in runs]))
        chosen: dict[str, dict[str, float]] = {task: {} for task in tasks}
        for (task, method), runs in selection.items():
            val = {lr: next(scores)["top1"] for lr, _, _ in runs}
            chosen[task][method] = max(learning_rates, key=lambda lr: val[lr])  # the first of equals
        jobs = []
        for index in range(seeds):
            for task, method in pairs:
                recipe = _recipe(task, method, [f"lr={chosen[task][method]}", *overrides])
                jobs.append(
                    ({**recipe, "seed": recipe["seed"] + index}, output / "test" / f"seed_{index}" / task / method)
                )
        tested = stage(jobs)
    results = [tested[i * len(pairs) : (i + 1) * len(pairs)] for i in range(seeds)]
    summary = combine([summarize(per_seed, suite_groups()) for per_seed in results])
    report = {
        "protocol": {
            "methods": list(methods),
            "tasks": list(tasks),
            "seeds": seeds,
            "quick": quick,
            "learning_rates": list(learning_rates),
            "overrides": list(overrides),
        },
        "learning_rate": chosen,
        "minutes_per_run": round(sum(minutes) / len(minutes), 3) if minutes else None,
        "runs_trained_now": len(minutes),
        **summary.to_dict(),
    }
    write_atomically(output / "suite.json", json.dumps(report, indent=2) + "\n")
    write_atomically(output / "suite.md", _markdown(report, summary.to_markdown()))
    summary.plot(output / "suite.png", f"mean of {len(TASKS)} tasks")  # no point where a task is missing
    console.print(summary.to_markdown())
    console.print(f"written: {output / 'suite.md'}, {output / 'suite.json'}, {output / 'suite.png'}")
    return report


def selection_runs(
    output_dir: str | Path,
    task: str,
    method: str,
    learning_rates: Sequence[float],
    overrides: Sequence[str] = (),
    label: str | None = None,
) -> list[tuple[float, Path, dict[str, Any]]]:
    """The model-selection runs of ``method`` on ``task``, one per learning rate: ``(lr, run folder, recipe)``,
    trained on train800 and read on val200. ``label`` names the folder in place of the method (a variant of
    it, made by ``overrides`` such as ``method_options.s_rank=8``)."""
    folder = Path(output_dir) / "select" / task / (label or method)
    return [
        (lr, folder / f"lr_{lr:g}", _recipe(task, method, [f"lr={lr}", *overrides, *SELECT])) for lr in learning_rates
    ]


def _check(methods: Sequence[str], tasks: Sequence[str]) -> None:
    from .adaptors import METHODS as KNOWN

    unknown = [m for m in methods if m not in KNOWN] + [t for t in tasks if t not in TASKS]
    if unknown:
        raise SuiteError(
            f"unknown method(s) or task(s) {unknown}; methods: {', '.join(KNOWN)}; tasks: {', '.join(TASKS)}"
        )


def _markdown(report: dict[str, Any], table: str) -> str:
    protocol = report["protocol"]
    lrs = ", ".join(f"{lr:g}" for lr in protocol["learning_rates"])
    lines = [
        f"# Offline VTAB-1k-style suite: top-1 % on test, mean ± sd over {protocol['seeds']} seed(s)",
        "",
        f"Learning rate chosen per task and method from {{{lrs}}} on val200 after training on train800; then "
        "trained on train800val200 and read on test. Quick mode (tiny splits, one epoch): "
        f"{'yes' if protocol['quick'] else 'no'}. Overrides: {' '.join(protocol['overrides']) or 'none'}.",
        "",
        table,
        "Learning rate chosen on val200:",
        "",
        "| task | " + " | ".join(protocol["methods"]) + " |",
        "|---|" + "---:|" * len(protocol["methods"]),
        *(
            f"| {t} | " + " | ".join(f"{lr:g}" for lr in row.values()) + " |"
            for t, row in report["learning_rate"].items()
        ),
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
    results = dict(zip(pairs, (result for result, _ in train_runs(jobs, workers)), strict=True))
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
