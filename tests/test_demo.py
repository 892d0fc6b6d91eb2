"""The offline demo: the embedded pretrained backbone, digits from scikit-learn, every method one code path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from adaptor_peft import create_model
from adaptor_peft.cli import main
from adaptor_peft.demo import run_demo
from adaptor_peft.models import resolve_checkpoint

QUICK = ["epochs=1", "warmup_epochs=0", "data.builtin.train_per_class=3", "eval_batch_size=512"]


@pytest.mark.parametrize("name", ["vim_nano_patch4_32", "vim_nano_patch4_32_adaptor"])
def test_the_embedded_backbones_ship_with_their_model_cards(name):
    weights = resolve_checkpoint("pretrained", name)
    assert weights.endswith(f"{name}.safetensors")
    model = create_model(name, checkpoint=weights, num_classes=10)  # loads strictly, new head
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    card = Path(weights).with_suffix(".md").read_text()
    assert card.startswith(f"# {name}\n") and "examples/pretrain_tiny.py" in card and "held-out top-1" in card


def test_demo_trains_each_method_writes_the_table_and_skips_finished_runs(tmp_path):
    console = Console(record=True, width=140)
    rows = run_demo(tmp_path, ["linear_probe", "adaptor"], QUICK, progress=False, console=console)
    assert [r["method"] for r in rows] == ["linear_probe", "adaptor"]
    assert rows[0]["trainable"] == 0 and rows[1]["trainable"] > 0 and 0 <= rows[1]["top1"] <= 100
    results = json.loads((tmp_path / "adaptor" / "results.json").read_text())
    assert results["images"] == 1797 - 30 and results["train_images"] == 30 and results["task"] == "digits"
    table = (tmp_path / "demo.md").read_text()
    assert "| linear_probe | 0 |" in table and "| adaptor |" in table
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    text = console.export_text()
    assert "Adaptor-T" in text and "top-1 %" in text  # the parameter report and the results table
    assert "[linear_probe] epoch 1/1: " in text and "[adaptor] epoch 1/1: " in text  # off a terminal: plain lines
    again = run_demo(tmp_path, ["adaptor"], QUICK, progress=False, console=console)
    text = console.export_text().replace("\n", "")
    assert again[0]["top1"] == rows[1]["top1"] and f"adaptor: top-1 {rows[1]['top1']:.2f} %" in text
    assert f"finished before in {tmp_path / 'adaptor'}" in text


def test_demo_command_rejects_unknown_methods(tmp_path):
    with pytest.raises(SystemExit, match="unknown method"):
        main(["demo", "--output-dir", str(tmp_path), "--methods", "adaptor,prompt"])
