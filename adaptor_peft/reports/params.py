"""``parameter_report``: exactly what a transfer method trains, as a terminal table, Markdown or JSON.

Percentages are of the *backbone*: every parameter of the model as created, without its
classification head and without what a method added. The head is counted apart because its size is
set by the task (10 classes or 397), not by the method; this is the convention of MambaPEFT's and
VPT's tables. The adapter size is the exact byte count of the ``adaptor.safetensors`` that
:func:`~adaptor_peft.save_adaptor` would write now.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from torch import nn

from ..adaptors.inject import is_head
from ..adaptors.methods import is_peft_parameter, report_groups
from ..adaptors.state import adapter_bytes
from ..models.protocol import find_blocks

HEAD, OTHER = "head", "other trainable"


def group_order() -> list[str]:
    """Report groups in the order tables show them: every registered method's, then the rest, then the head."""
    return [*dict.fromkeys(report_groups().values()), OTHER, HEAD]


def _group(name: str, head: bool, groups: dict[str, str]) -> str:
    """Which report group a trainable parameter belongs to (``groups``: marker -> group of every method)."""
    if head:
        return HEAD
    return next((group for marker, group in groups.items() if marker in f".{name}"), OTHER)


@dataclass
class ParameterReport:
    """Parameter counts of a prepared model; ``str()`` is Markdown, ``rich`` renders it as a table."""

    model: str
    method: str
    total: int
    trainable: int
    backbone: int
    head: int
    added: int
    groups: dict[str, int] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=dict)
    adapter_file_bytes: int = 0

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def trainable_without_head(self) -> int:
        return self.trainable - self.groups.get(HEAD, 0)

    @property
    def trainable_percent(self) -> float:
        """Trainable parameters outside the head, in percent of the backbone's."""
        return 100.0 * self.trainable_without_head / self.backbone

    def summary(self) -> list[tuple[str, str]]:
        """(label, value) rows shared by every rendering."""
        return [
            ("total", f"{self.total:,}"),
            ("trainable", f"{self.trainable:,}"),
            ("frozen", f"{self.frozen:,}"),
            ("backbone (head excluded)", f"{self.backbone:,}"),
            ("added by the method", f"{self.added:,}"),
            ("trainable without head", f"{self.trainable_without_head:,} ({self.trainable_percent:.2f} % of backbone)"),
            *((f"  {group}", f"{count:,}") for group, count in self.groups.items()),
            ("adapter file", f"{self.adapter_file_bytes:,} bytes ({self.adapter_file_bytes / 2**20:.2f} MiB)"),
        ]

    def block_rows(self) -> list[tuple[str, str]]:
        """(blocks, trainable) rows with runs of equal blocks collapsed into one row."""
        runs: list[list[Any]] = []
        for name, count in self.blocks.items():
            if runs and runs[-1][2] == count:
                runs[-1][1] = name
                runs[-1][3] += 1
            else:
                runs.append([name, name, count, 1])
        return [
            (first if n == 1 else f"{first} … {last} ({n} blocks)", f"{count:,}" + ("" if n == 1 else " each"))
            for first, last, count, n in runs
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "frozen": self.frozen,
            "trainable_without_head": self.trainable_without_head,
            "trainable_percent": self.trainable_percent,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        lines = [f"**{self.model}**, method `{self.method}`", "", "| | parameters |", "|---|---:|"]
        lines += [f"| {label.strip()} | {value} |" for label, value in self.summary()]
        if self.blocks:
            lines += ["", "| block | trainable |", "|---|---:|"]
            lines += [f"| {name} | {count} |" for name, count in self.block_rows()]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = Table(title=f"{self.model} — {self.method}")
        table.add_column("")
        table.add_column("parameters", justify="right")
        for label, value in self.summary():
            table.add_row(label, value)
        yield table
        if self.blocks:
            per_block = Table(title="trainable per block")
            per_block.add_column("block")
            per_block.add_column("trainable", justify="right")
            for row in self.block_rows():
                per_block.add_row(*row)
            yield per_block


def parameter_report(model: nn.Module) -> ParameterReport:
    """Counts ``model``'s parameters: totals, per group (Adaptor-T, Adaptor-S, LoRA, parallel adapter,
    head, other trainable backbone parameters) and per block (every :class:`~adaptor_peft.models.AdaptableBlock`)."""
    head, markers = is_head(model), report_groups()
    total = trainable = head_size = added = 0
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        count = p.numel()
        total += count
        in_head = head(name)
        head_size += count if in_head else 0
        added += count if is_peft_parameter(name, model) else 0
        if p.requires_grad:
            trainable += count
            group = _group(name, in_head, markers)
            groups[group] = groups.get(group, 0) + count
    blocks = {name: sum(p.numel() for p in block.parameters() if p.requires_grad) for name, block in find_blocks(model)}
    method = getattr(model, "peft_method", None)
    order = group_order()
    return ParameterReport(
        model=getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__),
        method=method.name if method is not None else "none",
        total=total,
        trainable=trainable,
        backbone=total - head_size - added,
        head=head_size,
        added=added,
        groups=dict(sorted(groups.items(), key=lambda item: order.index(item[0]))),
        blocks=blocks,
        adapter_file_bytes=len(adapter_bytes(model)),
    )
