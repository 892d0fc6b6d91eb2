"""How long the offline suite's runs take, read from finished runs rather than timed again: per method, the
mean training minutes of a selection run (train800 -> val200) and of a test run (train800val200 -> test),
and what one task costs (every run of it, summed).

The default source is the evidence rerun's archive of its suite stage, so the table describes the runs of
``suite.md`` at their code version, on the machines that trained them (``evidence.md`` names them).

Usage:

    python benchmarks/suite_timing.py [--archive benchmarks/results/evidence_runs/suite.jsonl]
        [--output benchmarks/results/suite_timing.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptor_peft.atomic import write_atomically
from adaptor_peft.training.runs import RESULTS as RUN_RESULTS
from benchmarks.evidence import ARCHIVE, RESULTS, read_archive
from benchmarks.machine import provenance

SPLITS = {"val200": "selection", "test": "test"}
"""A run's eval split -> its part of the protocol."""


def run_minutes(archive: Path) -> tuple[dict[str, dict[str, list[float]]], dict[str, set[str]], set[str]]:
    """Method -> protocol part -> each finished run's training minutes; method -> its tasks; the code
    versions seen."""
    minutes: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    tasks: dict[str, set[str]] = defaultdict(set)
    versions = set()
    for run, record in read_archive(archive).items():
        results = json.loads(record["files"][RUN_RESULTS])
        if results.get("minutes") is None or results["eval_split"] not in SPLITS:
            raise SystemExit(f"{archive}: run {run} has no training minutes or an unknown eval split")
        minutes[results["method"]][SPLITS[results["eval_split"]]].append(float(results["minutes"]))
        tasks[results["method"]].add(results["task"])
        versions.add(results["code"])
    return minutes, tasks, versions


def table(archive: Path, argv: list[str] | None = None) -> str:
    """The timing report of the runs in ``archive``."""
    minutes, tasks, versions = run_minutes(archive)
    if not minutes:
        raise SystemExit(f"{archive}: no finished runs")
    runs = sum(len(times) for parts in minutes.values() for times in parts.values())
    lines = [
        "# The offline suite: how long its runs take",
        "",
        provenance(argv),
        "",
        f"Read from {runs} finished runs on {len(set().union(*tasks.values()))} tasks (`{archive.name}`, code "
        f"version {', '.join(sorted(versions))}), not timed again, on the machines that trained them. Minutes "
        "are the runs' training steps (forward, backward, optimizer step) as `results.json` records them, "
        "without building the model, generating the data or evaluating; each run had one core, another run "
        "the other. A method's minutes per task are all its runs' minutes over the tasks it ran on.",
        "",
        "| method | selection runs | minutes each | test runs | minutes each | minutes per task |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    spent = {method: sum(map(sum, parts.values())) for method, parts in minutes.items()}
    for method in sorted(minutes, key=spent.get):
        cells = []
        for part in SPLITS.values():
            times = minutes[method].get(part, [])
            cells += [str(len(times)), f"{sum(times) / len(times):.2f}" if times else "-"]
        lines.append(f"| {method} | {' | '.join(cells)} | {spent[method] / len(tasks[method]):.1f} |")
    lines += ["", f"All {runs} runs: {sum(spent.values()) / 60:.1f} hours of training on one core each.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=ARCHIVE / "suite.jsonl")
    parser.add_argument("--output", type=Path, default=RESULTS / "suite_timing.md")
    args = parser.parse_args(argv)
    text = table(args.archive, argv)
    write_atomically(args.output, text)
    print(text)
    return text


if __name__ == "__main__":
    main()
