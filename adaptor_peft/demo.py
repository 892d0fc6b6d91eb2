"""``adaptor-peft demo``: the whole idea in one offline command.

The embedded backbone (``vim_nano_patch4_32``, pretrained by this package on fractal images) is
transferred to scikit-learn's handwritten digits with every method on the same split, seed and recipe
(``recipes/demo/digits.yaml``), each through the same training loop as the benchmarks. It prints what
each method trains and what it scores, and writes ``demo.md`` and ``demo.png`` (top-1 against trainable
parameters); its ``minutes`` are each method's training time (:func:`~adaptor_peft.training.train`), not
the command's wall time. Finished methods are skipped when the command is run again in the same folder. On
a CPU the methods train side by side, one process per core (:mod:`adaptor_peft.training.pool`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .atomic import write_atomically
from .reports import parameter_report, summarize
from .training import build_model, load_recipe
from .training.pool import default_workers, train_runs
from .training.progress import show_runs

RECIPE = "demo/digits"
METHODS = ("linear_probe", "adaptor_t", "adaptor_s", "adaptor", "lora", "full")


def _minutes(value: float | None) -> str:
    """A run's training minutes; a dash where its log does not give them (an epoch logged by an older version)."""
    return "–" if value is None else str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    header = "| method | trainable w/o head | % of backbone | top-1 % | top-5 % | minutes |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = (
            f"{r['trainable']:,}",
            f"{r['percent']:.2f}",
            f"{r['top1']:.2f}",
            f"{r['top5']:.2f}",
            _minutes(r["minutes"]),
        )
        lines.append(f"| {r['method']} | " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run_demo(
    output_dir: str | Path = "adaptor-peft-demo",
    methods: Sequence[str] = METHODS,
    overrides: Sequence[str] = (),
    *,
    workers: int | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Trains the demo recipe with each of ``methods`` under ``output_dir``, ``workers`` at a time (default:
    :func:`~adaptor_peft.training.pool.default_workers`; from a script, call it under
    ``if __name__ == "__main__":``), and returns one row per method."""
    console = console or Console()
    output = Path(output_dir)
    recipes = {method: load_recipe(RECIPE, [f"method={method}", *overrides]) for method in methods}
    console.print(parameter_report(build_model(recipes.get("adaptor") or next(iter(recipes.values())))))
    workers = default_workers(len(recipes)) if workers is None else workers
    console.print(f"training {len(recipes)} methods, {workers} at a time")

    names = list(recipes)

    def finished(index: int, result: dict[str, Any], minutes: float | None) -> None:
        method = names[index]
        took = f"trained for {minutes:.2f} min" if minutes is not None else f"finished before in {output / method}"
        console.print(f"{method}: top-1 {result['top1']:.2f} % ({took})")

    jobs = [(recipe, output / method) for method, recipe in recipes.items()]
    with show_runs(names, live=progress, console=console) as show:  # one labelled line per running method
        rows, results = [], [r for r, _ in train_runs(jobs, workers, finished, show=show)]
    for method, result in zip(recipes, results, strict=True):
        parameters = result["parameters"]
        rows.append(
            {
                "method": method,
                "trainable": parameters["trainable_without_head"],
                "percent": parameters["trainable_percent"],
                "top1": result["top1"],
                "top5": result["top5"],
                "minutes": result.get("minutes"),
            }
        )
    table = Table(title=f"{recipes[methods[0]]['model']} → digits ({results[0]['images']} test images)")
    for column in ("method", "trainable w/o head", "% of backbone", "top-1 %", "minutes"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in rows:
        table.add_row(
            r["method"], f"{r['trainable']:,}", f"{r['percent']:.2f}", f"{r['top1']:.2f}", _minutes(r["minutes"])
        )
    console.print(table)
    write_atomically(output / "demo.md", _table(rows))
    summarize(results).plot(output / "demo.png")
    console.print(f"written: {output / 'demo.md'}, {output / 'demo.png'}")
    return rows
