"""Results tables of many runs: per task, per VTAB-1k group, both averaging conventions, trainable parameters.

VTAB-1k papers average two ways: the mean over the 19 tasks, and the mean of the three group means
(natural, specialized, structured). They differ by a point or more, so both are always printed, each
labelled. An average is only given when every task it covers has a result; a partial average would be
compared with complete ones.
"""

from __future__ import annotations

import io
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_atomically

VTAB1K_GROUPS = {
    "natural": ("caltech101", "cifar", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
                   "smallnorb_ele"),
}  # fmt: skip
"""The 19 tasks by group, in the order of the usual VTAB-1k tables (docs/method.md#vtab-1k)."""
VTAB1K_TASKS = tuple(task for tasks in VTAB1K_GROUPS.values() for task in tasks)


def _mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


@dataclass
class Summary:
    """Top-1 per (model, method) and task, with averages; ``str()`` is Markdown. A summary of several seeds
    (:func:`combine`) holds their means and, in ``spread``, their standard deviations (same keys as ``top1``
    and ``averages``), shown as ``mean ± sd``."""

    columns: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    top1: dict[str, dict[str, float]] = field(default_factory=dict)
    trainable: dict[str, int] = field(default_factory=dict)
    trainable_percent: dict[str, float] = field(default_factory=dict)
    averages: dict[str, dict[str, float | None]] = field(default_factory=dict)
    spread: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        keys = ("columns", "tasks", "top1", "trainable", "trainable_percent", "averages", "spread")
        return {k: getattr(self, k) for k in keys}

    def to_markdown(self) -> str:
        def cell(column: str, key: str, values: dict[str, dict[str, float | None]]) -> str:
            value, sd = values[column].get(key), self.spread.get(column, {}).get(key)
            return "–" if value is None else f"{value:.2f}" + ("" if sd is None else f" ± {sd:.2f}")

        lines = ["| task | " + " | ".join(self.columns) + " |", "|---|" + "---:|" * len(self.columns)]
        lines += [f"| {t} | " + " | ".join(cell(c, t, self.top1) for c in self.columns) + " |" for t in self.tasks]
        labels = next(iter(self.averages.values()), {})
        for label in labels:
            lines.append(f"| **{label}** | " + " | ".join(cell(c, label, self.averages) for c in self.columns) + " |")
        trainable = (f"{self.trainable[c] / 1e6:.3f} M ({self.trainable_percent[c]:.2f} %)" for c in self.columns)
        lines.append("| trainable w/o head | " + " | ".join(trainable) + " |")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()

    def plot(self, path: str | Path, average: str | None = None) -> Path:
        """Mean top-1 (``average``, default the first) against trainable parameters, one point per column."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = next(iter(self.averages.values()), {})
        average = average or next(iter(labels), None)
        figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
        models = {column.split(" / ")[0] for column in self.columns}
        for column in self.columns:
            accuracy = self.averages[column].get(average) if average else None
            if accuracy is None:
                continue
            label = column.split(" / ")[-1] if len(models) == 1 else column
            axes.scatter(max(self.trainable[column], 1), accuracy, label=label)
        axes.set_xscale("log")
        if axes.collections:  # a legend, not labels at the points: methods of close size and score overlap there
            axes.legend(fontsize=8, loc="best")
        axes.set_xlabel("trainable parameters without head (log; none drawn at 1)")
        if len(models) == 1:
            axes.set_title(models.pop(), fontsize=9)
        axes.set_ylabel(f"top-1 % ({average})")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        image = io.BytesIO()
        figure.savefig(image, format="png")
        plt.close(figure)
        return write_atomically(path, image.getvalue())


def summarize(results: list[dict[str, Any]], groups: Mapping[str, Sequence[str]] | None = None) -> Summary:
    """Builds the table from ``results.json`` contents (one per run): a column per (model, method), a row
    per task, group means and both VTAB-1k averages (mean of the tasks, mean of the group means) over
    ``groups`` (task names by group; VTAB-1k's for its runs), or the plain mean for other benchmarks."""
    summary = Summary()
    seen_tasks: dict[str, str] = {}
    for result in results:
        column = f"{result['model']} / {result['method']}"
        if column not in summary.top1:
            summary.columns.append(column)
            summary.top1[column] = {}
            summary.trainable[column] = result["parameters"]["trainable_without_head"]
            summary.trainable_percent[column] = result["parameters"]["trainable_percent"]
        if result["task"] in summary.top1[column]:
            where = [
                r.get("run_dir", "?")
                for r in results
                if r["task"] == result["task"] and f"{r['model']} / {r['method']}" == column
            ]
            raise ValueError(
                f"two runs of {column} on {result['task']} ({', '.join(where)}): summarize the folders of "
                "different recipes separately"
            )
        summary.top1[column][result["task"]] = result["top1"]
        seen_tasks[result["task"]] = result.get("benchmark") or ""
    if groups is None and any(b == "vtab1k" for b in seen_tasks.values()):
        groups = VTAB1K_GROUPS
    grouped = [task for tasks in (groups or {}).values() for task in tasks]
    order = {task: i for i, task in enumerate(grouped or VTAB1K_TASKS)}
    summary.tasks = sorted(seen_tasks, key=lambda t: (order.get(t, len(order)), t))
    for column in summary.columns:
        scores = summary.top1[column]
        if groups:
            means = {g: _mean([scores.get(t) for t in tasks]) for g, tasks in groups.items()}
            summary.averages[column] = {
                **{f"{g} mean": v for g, v in means.items()},
                f"mean of {len(grouped)} tasks": _mean([scores.get(t) for t in grouped]),
                f"mean of {len(means)} group means": _mean(list(means.values())),
            }
        else:
            summary.averages[column] = {"mean": _mean([scores.get(t) for t in summary.tasks])}
    return summary


def combine(summaries: Sequence[Summary]) -> Summary:
    """One summary of several runs of the same table (seeds): every cell and average is the mean over
    ``summaries``, with the sample standard deviation in ``spread`` (0 for one summary); a cell missing
    from any of them is missing (None)."""
    first = summaries[0]

    def spread(cells: Sequence[float | None]) -> tuple[float | None, float | None]:
        if any(v is None for v in cells):
            return None, None
        return statistics.fmean(cells), statistics.stdev(cells) if len(cells) > 1 else 0.0

    combined = Summary(
        list(first.columns),
        list(first.tasks),
        trainable=dict(first.trainable),
        trainable_percent=dict(first.trainable_percent),
    )
    for column in first.columns:
        cells = {t: spread([s.top1[column].get(t) for s in summaries]) for t in first.tasks}
        labels = {k: spread([s.averages[column][k] for s in summaries]) for k in first.averages[column]}
        combined.top1[column] = {t: mean for t, (mean, _) in cells.items() if mean is not None}
        combined.averages[column] = {k: mean for k, (mean, _) in labels.items()}
        combined.spread[column] = {k: sd for k, (_, sd) in {**cells, **labels}.items()}
    return combined


def collect_results(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``results.json`` under ``runs_dir``, in path order."""
    paths = sorted(Path(runs_dir).rglob("results.json"))
    if not paths:
        raise FileNotFoundError(f"no results.json under {runs_dir}: no run has finished there")
    results = []
    for path in paths:
        try:
            results.append({**json.loads(path.read_text()), "run_dir": str(path.parent)})
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
    return results


def write_summary(runs_dir: str | Path) -> tuple[Summary, dict[str, Path]]:
    """Summarises every finished run under ``runs_dir`` into ``summary.md``, ``summary.json`` and
    ``summary.png`` there."""
    summary = summarize(collect_results(runs_dir))
    runs_dir = Path(runs_dir)
    files = {
        "markdown": write_atomically(runs_dir / "summary.md", summary.to_markdown()),
        "json": write_atomically(runs_dir / "summary.json", json.dumps(summary.to_dict(), indent=2) + "\n"),
        "plot": summary.plot(runs_dir / "summary.png"),
    }
    return summary, files
