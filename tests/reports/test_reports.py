"""parameter_report: counts checked against sums written out here, and its renderings."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from adaptor_peft import save_adaptor
from adaptor_peft.adaptors import inject_adaptor, prepare_model
from adaptor_peft.reports import ParameterReport, parameter_report
from adaptor_peft.reports.results import VTAB1K_GROUPS, VTAB1K_TASKS, combine, summarize
from tests.support.models import tiny

HEADS = ("head.", "classifier.head.")
MARKERS = {
    ".adaptor_t.": "Adaptor-T",
    ".adaptor_s.": "Adaptor-S",
    ".lora_": "LoRA",
    ".parallel_adapter.": "parallel adapter",
}
CASES = [
    ("vim", "adaptor"),
    ("vim", "lora"),
    ("vim", "parallel_adapter"),
    ("vim", "bias"),
    ("vim", "full"),
    ("vim", "adaptor_booster"),
    ("vim", "linear_probe"),
    ("vmamba_v2", "adaptor+lora"),
    ("vmamba_v2", "adaptor_s"),
]
ADDING = {"adaptor", "adaptor_s", "adaptor_t", "lora", "parallel_adapter", "adaptor+lora", "adaptor_booster"}


def expected_counts(model: torch.nn.Module) -> dict:
    """The report's numbers, by hand from ``named_parameters``."""
    named = list(model.named_parameters())
    head = sum(p.numel() for n, p in named if n.startswith(HEADS))
    added = sum(p.numel() for n, p in named if any(m in "." + n for m in MARKERS))
    groups: dict[str, int] = {}
    for name, p in named:
        if p.requires_grad:
            group = "head" if name.startswith(HEADS) else next((g for m, g in MARKERS.items() if m in "." + name), None)
            group = group or "other trainable"
            groups[group] = groups.get(group, 0) + p.numel()
    total = sum(p.numel() for _, p in named)
    return dict(
        total=total,
        trainable=sum(p.numel() for _, p in named if p.requires_grad),
        head=head,
        added=added,
        backbone=total - head - added,
        groups=groups,
    )


@pytest.mark.parametrize("kind, method", CASES)
def test_counts_are_the_sums_of_the_parameters(tmp_path, kind, method):
    plain = tiny(kind)
    plain_total = sum(p.numel() for p in plain.parameters())
    plain_head = sum(p.numel() for n, p in plain.named_parameters() if n.startswith(HEADS))
    model = prepare_model(tiny(kind), method)
    report = parameter_report(model)
    want = expected_counts(model)
    assert report.model == plain.pretrained_cfg["architecture"] and report.method == method
    for key in ("total", "trainable", "head", "added", "backbone"):
        assert getattr(report, key) == want[key], key
    assert report.backbone == plain_total - plain_head  # what a method adds never counts as backbone
    assert report.groups == want["groups"] and sum(report.groups.values()) == report.trainable
    assert report.frozen == report.total - report.trainable
    assert (report.added > 0) == (method in ADDING)
    if method == "full":
        assert report.trainable == report.total and report.trainable_without_head == report.backbone
    if method == "linear_probe":
        assert report.trainable == report.head == plain_head and report.trainable_percent == 0
    trainable_without_head = want["trainable"] - want["groups"].get("head", 0)
    assert report.trainable_without_head == trainable_without_head
    assert report.trainable_percent == pytest.approx(100 * trainable_without_head / want["backbone"], rel=1e-12)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ in ("VimBlock", "VSSBlock")]
    assert list(report.blocks) == blocks
    for block in blocks:
        prefix = block + "."
        count = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad)
        assert report.blocks[block] == count
    if method == "adaptor_booster":  # the whole backbone and the adaptors: more than 100 % of the backbone
        assert report.trainable_without_head == report.backbone + report.added and report.trainable_percent > 100
        assert report.groups["other trainable"] == report.backbone
    elif method in ADDING:
        assert sum(report.blocks.values()) == report.trainable - report.head
    save_adaptor(model, tmp_path)
    assert report.adapter_file_bytes == (tmp_path / "adaptor.safetensors").stat().st_size


def test_group_order_and_unprepared_models():
    model = prepare_model(tiny("vim"), "adaptor+lora")
    assert list(parameter_report(model).groups) == ["Adaptor-T", "Adaptor-S", "LoRA", "head"]
    plain = parameter_report(tiny("vim"))
    assert plain.method == "none" and plain.added == 0 and plain.trainable == plain.total
    assert parameter_report(inject_adaptor(tiny("vim"))).method == "adaptor"


def test_json_and_markdown_carry_the_numbers():
    report = parameter_report(prepare_model(tiny("vim"), "adaptor", blocks=[0]))
    data = json.loads(report.to_json())
    for key in ("model", "method", "total", "trainable", "backbone", "head", "added", "groups", "blocks"):
        assert data[key] == getattr(report, key), key
    assert data["adapter_file_bytes"] == report.adapter_file_bytes
    assert data["frozen"] == report.total - report.trainable
    assert data["trainable_without_head"] == report.trainable - report.head
    assert data["trainable_percent"] == pytest.approx(100 * (report.trainable - report.head) / report.backbone)
    markdown = report.to_markdown()
    assert str(report) == markdown
    assert "method `adaptor`" in markdown and "vim_tiny_patch16_224" in markdown
    assert f"| trainable | {report.trainable:,} |" in markdown
    assert f"| total | {report.total:,} |" in markdown
    assert f"({report.trainable_percent:.2f} % of backbone)" in markdown
    # blocks=[0]: block 1 trains nothing, so it gets its own row
    assert f"| layers.0 | {report.blocks['layers.0']:,} |" in markdown and "| layers.1 | 0 |" in markdown


def test_rich_rendering_shows_the_numbers():
    report = parameter_report(prepare_model(tiny("vmamba_v2"), "lora", r=2))
    console = Console(record=True, width=120)
    console.print(report)
    text = console.export_text()
    assert "vmamba_tiny_s1l8" in text and "lora" in text
    for number in (report.total, report.trainable, report.frozen, report.backbone, report.groups["LoRA"]):
        assert f"{number:,}" in text
    assert f"{report.trainable_percent:.2f} % of backbone" in text
    assert "trainable per block" in text and "(5 blocks)" not in text  # stages differ in width
    assert "layers.0.blocks.0" in text


def test_block_rows_collapse_runs_of_equal_blocks():
    report = ParameterReport(
        "m", "x", 0, 0, 1, 0, 0, blocks={"a": 5, "b": 5, "c": 5, "d": 1234, "e": 5, "f": 7, "g": 7}
    )
    assert report.block_rows() == [
        ("a … c (3 blocks)", "5 each"),
        ("d", "1,234"),
        ("e", "5"),
        ("f … g (2 blocks)", "7 each"),
    ]
    assert ParameterReport("m", "x", 0, 0, 1, 0, 0).block_rows() == []
    model = prepare_model(tiny("vim"), "adaptor")
    rows = parameter_report(model).block_rows()

    def block(i: int) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(f"layers.{i}.") and p.requires_grad)

    assert rows == [("layers.0", f"{block(0):,}"), ("layers.1", f"{block(1):,}")]  # the last has no Adaptor-S
    model = prepare_model(tiny("vim", depth=3), "adaptor")
    assert parameter_report(model).block_rows()[0] == ("layers.0 … layers.1 (2 blocks)", f"{block(0):,} each")


def run_result(task: str, top1: float, method: str = "adaptor", benchmark: str = "vtab1k") -> dict:
    parameters = {"trainable_without_head": 1000, "trainable_percent": 1.0}
    return {
        "task": task,
        "top1": top1,
        "model": "m",
        "method": method,
        "benchmark": benchmark,
        "parameters": parameters,
    }


def test_summary_gives_both_vtab_averages_only_when_complete():
    tasks = list(VTAB1K_TASKS)
    scores = {t: float(i) for i, t in enumerate(tasks)}
    complete = summarize([run_result(t, s) for t, s in scores.items()] + [run_result("cifar", 50.0, "lora")])
    assert complete.tasks == tasks
    averages = complete.averages["m / adaptor"]
    groups = {g: sum(scores[t] for t in ts) / len(ts) for g, ts in VTAB1K_GROUPS.items()}
    assert averages["mean of 19 tasks"] == pytest.approx(sum(scores.values()) / 19)
    assert averages["mean of 3 group means"] == pytest.approx(sum(groups.values()) / 3)
    assert averages["natural mean"] == pytest.approx(groups["natural"])
    assert complete.averages["m / lora"]["mean of 19 tasks"] is None  # one task is no average
    table = complete.to_markdown()
    assert "| **mean of 3 group means** |" in table and "–" in table
    fgvc = summarize([run_result("cub", 80.0, benchmark="fgvc"), run_result("nabirds", 70.0, benchmark="fgvc")])
    assert fgvc.averages["m / adaptor"] == {"mean": pytest.approx(75.0)}


def test_summary_refuses_two_runs_for_one_cell():
    with pytest.raises(ValueError, match="two runs of m / adaptor on cifar"):
        summarize([run_result("cifar", 50.0), run_result("cifar", 60.0)])


def test_summary_over_other_groups_and_the_mean_and_sd_of_seeds():
    groups = {"natural": ("a", "b"), "structured": ("c",)}
    seeds = [
        summarize(
            [run_result(t, s + k, benchmark="offline_vtab") for t, s in {"c": 60, "a": 10, "b": 20}.items()], groups
        )
        for k in (0, 2)
    ]
    assert seeds[0].tasks == ["a", "b", "c"]  # in the groups' order
    assert seeds[0].averages["m / adaptor"] == pytest.approx(
        {"natural mean": 15, "structured mean": 60, "mean of 3 tasks": 30, "mean of 2 group means": 37.5}
    )
    both = combine(seeds)
    assert both.top1["m / adaptor"] == pytest.approx({"a": 11, "b": 21, "c": 61})
    assert both.spread["m / adaptor"]["a"] == pytest.approx(2**0.5)
    assert both.averages["m / adaptor"]["mean of 2 group means"] == pytest.approx(38.5)
    assert both.spread["m / adaptor"]["mean of 3 tasks"] == pytest.approx(2**0.5)
    assert "| a | 11.00 ± 1.41 |" in both.to_markdown() and both.to_dict()["spread"] == both.spread
    assert combine(seeds[:1]).spread["m / adaptor"]["b"] == 0.0  # one seed: no spread
    partial = summarize([run_result("a", 10.0, benchmark="offline_vtab")], groups)
    assert combine([seeds[0], partial]).averages["m / adaptor"]["mean of 3 tasks"] is None
    assert "b" not in combine([seeds[0], partial]).top1["m / adaptor"]  # missing in one seed: missing
