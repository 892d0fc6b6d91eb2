"""Trainable parameters of every transfer method on Vim-T/S/B and VMamba-T/S, side by side.

Counts come from :func:`adaptor_peft.reports.parameter_report` on freshly built backbones (random
weights: counts do not depend on them). Trainable parameters exclude the classification head and are
given in percent of the backbone's; the adapter file size includes a 100-class head (VTAB-1k cifar). A
method placed on modules an architecture lacks (MambaPEFT's LoRA variants on VMamba) is marked n/a.
Usage:

    python benchmarks/params.py [--models Vim-T,Vim-S,...] [--output benchmarks/results/params.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptor_peft import create_model
from adaptor_peft.adaptors import METHODS, MethodOptionError, prepare_model
from adaptor_peft.atomic import write_atomically
from adaptor_peft.reports import ParameterReport, parameter_report
from adaptor_peft.reports.params import group_order
from benchmarks.machine import provenance

MODELS = {
    "Vim-T": "vim_tiny_patch16_224",
    "Vim-S": "vim_small_patch16_224",
    "Vim-B": "vim_base_patch16_224",
    "VMamba-T": "vmamba_tiny_s1l8",
    "VMamba-S": "vmamba_small_s1l20",
}
DETAIL = "Vim-S"
"""The backbone shown per parameter group (the first one chosen when it is not among them)."""


NA = "n/a"
"""The cell of a method that does not apply to a backbone (a LoRA placed on modules it does not have)."""


def report(name: str, method: str) -> ParameterReport | None:
    """The parameter report of ``method`` on a fresh ``name`` with a 100-class head; None where the method
    does not apply to that architecture."""
    try:
        return parameter_report(prepare_model(create_model(name, num_classes=100), method))
    except MethodOptionError:
        return None


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"columns, of {', '.join(MODELS)}")
    parser.add_argument("--output", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    labels = args.models.split(",")
    unknown = [label for label in labels if label not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    models = {label: MODELS[label] for label in labels}
    detail = DETAIL if DETAIL in models else next(iter(models))
    reports = {(label, method): report(name, method) for label, name in models.items() for method in METHODS}
    backbones = {label: reports[label, "full"].backbone for label in models}
    lines = [
        "Trainable parameters without the head (% of the backbone)",
        "",
        "| method | " + " | ".join(f"{label} ({backbones[label] / 1e6:.1f} M)" for label in models) + " |",
        "|---|" + "---:|" * len(models),
    ]
    for method in METHODS:
        cells = [reports[label, method] for label in models]
        lines.append(
            f"| {method} | "
            + " | ".join(
                f"{r.trainable_without_head / 1e6:.3f} M ({r.trainable_percent:.2f} %)" if r else NA for r in cells
            )
            + " |"
        )
    applicable = [m for m in METHODS if reports[detail, m]]
    groups = [g for g in group_order() if any(g in reports[detail, m].groups for m in applicable)]
    lines += [
        "",
        f"{detail} ({models[detail]}, 100-class head) in detail",
        "",
        "| method | trainable w/o head | % of backbone | " + " | ".join(groups) + " | adapter file |",
        "|---|---:|---:|" + "---:|" * len(groups) + "---:|",
    ]
    for method in applicable:
        r = reports[detail, method]
        cells = [f"{r.groups[g]:,}" if g in r.groups else "" for g in groups]
        lines.append(
            f"| {method} | {r.trainable_without_head:,} | {r.trainable_percent:.2f} % | "
            + " | ".join(cells)
            + f" | {r.adapter_file_bytes / 2**20:.2f} MiB |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        write_atomically(args.output, f"{provenance(argv)}\n\n{text}")
    return text


if __name__ == "__main__":
    main()
