"""benchmarks/suite_timing.py: the timing table read from archived suite runs, against a hand computation."""

from __future__ import annotations

import json

import pytest

from benchmarks import suite_timing


def archive_line(run: str, **results) -> str:
    return json.dumps({"run": run, "files": {"results.json": json.dumps({"code": "1.0+abc", **results})}})


def test_the_table_gives_each_methods_mean_minutes_and_cost_per_task(tmp_path):
    runs = [
        ("select/a/lora/lr_1", "a", "lora", "val200", 0.5),
        ("select/a/lora/lr_2", "a", "lora", "val200", 0.7),
        ("a/lora/seed_42", "a", "lora", "test", 1.0),
        ("select/b/lora/lr_1", "b", "lora", "val200", 0.4),
        ("select/a/full/lr_1", "a", "full", "val200", 2.0),
    ]
    archive = tmp_path / "suite.jsonl"
    lines = [archive_line(r, task=t, method=m, eval_split=s, minutes=x) for r, t, m, s, x in runs]
    archive.write_text("\n".join(lines) + "\n")
    output = tmp_path / "suite_timing.md"
    text = suite_timing.main(["--archive", str(archive), "--output", str(output)])
    assert output.read_text() == text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["| lora"] == "| lora | 3 | 0.53 | 1 | 1.00 | 1.3 |"  # (0.5 + 0.7 + 0.4) / 3; 2.6 over 2 tasks
    assert rows["| full"] == "| full | 1 | 2.00 | 0 | - | 2.0 |"
    assert "5 finished runs on 2 tasks" in text and "code version 1.0+abc" in text
    assert "All 5 runs: 0.1 hours" in text


def test_a_run_without_minutes_is_named(tmp_path):
    archive = tmp_path / "suite.jsonl"
    archive.write_text(archive_line("a/lora/seed_42", task="a", method="lora", eval_split="test", minutes=None) + "\n")
    with pytest.raises(SystemExit, match=r"suite\.jsonl: run a/lora/seed_42 has no training minutes"):
        suite_timing.main(["--archive", str(archive), "--output", str(tmp_path / "out.md")])
