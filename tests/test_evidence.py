"""benchmarks/evidence.py: its plan names real scripts, variants and methods; its ledger sums wall time over
interruptions, skips finished stages, keeps a failed step's time and refuses another code version's rerun."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from adaptor_peft.adaptors import METHODS
from benchmarks import ablation, evidence


def test_the_plan_names_real_scripts_variants_and_methods(tmp_path):
    steps = evidence.plan(tmp_path)
    assert list(steps) == ["study", "suite", "backbone", "shipped"]
    for name, stage in steps.items():
        for step in stage:
            if isinstance(step, partial):
                continue
            script = step[1] if step[1] != "-m" else None
            assert script is None or (evidence.ROOT / script).exists(), (name, script)
    multipliers = {}
    for family, (variants, _) in evidence.STUDY.items():
        for name in variants.split(","):
            method, options = ablation.FAMILIES[family][name]
            multipliers.setdefault(method, set()).add(options["lr_scale"])
    assert set(multipliers) == {"lora", "lora_x_proj", "lora_p_x", "parallel_adapter", "adaptor"}
    assert all(m == set(evidence.MULTIPLIERS) for m in multipliers.values())  # the same budget for every method
    assert set(evidence.SUITE_METHODS.split(",")) <= set(METHODS)
    assert set(evidence.DEMO_METHODS.split(",")) <= set(METHODS)
    shown = evidence.main(["--dry-run", "--output-dir", str(tmp_path)]).splitlines()
    assert len(shown) == sum(map(len, steps.values())) and not (tmp_path / "ledger.json").exists()


def stub_plan(marker: Path):
    python = sys.executable
    fails_until = f"import os, sys, time; time.sleep(0.2); sys.exit(not os.path.exists({str(marker)!r}))"

    def plan(output_dir: Path) -> dict[str, list[evidence.Step]]:
        return {
            "first": [[python, "-c", "import time; time.sleep(0.2)"]],
            "second": [[python, "-c", fails_until]],
        }

    return plan


def test_the_ledger_sums_time_skips_finished_stages_and_refuses_other_versions(tmp_path, monkeypatch):
    marker, out = tmp_path / "allowed", tmp_path / "out"
    monkeypatch.setattr(evidence, "plan", stub_plan(marker))
    monkeypatch.setattr(evidence, "RESULTS", tmp_path)
    argv = ["--stages", "first,second", "--output-dir", str(out)]

    with pytest.raises(subprocess.CalledProcessError):  # the second stage fails: its time is kept, not done
        evidence.main(argv)
    ledger = json.loads((out / "ledger.json").read_text())
    first = ledger["stages"]["first"]
    assert first["done"] and first["seconds"] >= 0.2
    assert not ledger["stages"]["second"]["done"] and ledger["stages"]["second"]["seconds"] > 0

    marker.touch()
    text = evidence.main(argv)
    again = json.loads((out / "ledger.json").read_text())
    assert again["stages"]["first"] == first  # finished: not run again
    assert again["stages"]["second"]["done"]
    assert again["stages"]["second"]["seconds"] > ledger["stages"]["second"]["seconds"]  # both tries counted
    total = sum(s["seconds"] for s in again["stages"].values()) / 3600
    assert f"Total {total:.2f} h, within the budget of 6 h" in text
    assert (tmp_path / "evidence.md").read_text() == text

    again["code_version"] = "0.0.0+other"
    (out / "ledger.json").write_text(json.dumps(again))
    with pytest.raises(SystemExit, match=r"code version 0\.0\.0\+other"):
        evidence.main(argv)


def test_an_unknown_stage_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown stage.*'pretrain'"):
        evidence.main(["--stages", "study,pretrain", "--output-dir", str(tmp_path)])


def test_a_running_step_adds_its_time_as_it_goes_and_when_stopped(tmp_path, monkeypatch):
    out, seen = tmp_path / "out", []

    def look() -> None:  # a step that sleeps, then reads what the ledger holds of it so far
        time.sleep(0.45)
        seen.append(json.loads((out / "ledger.json").read_text())["stages"]["slow"]["seconds"])

    monkeypatch.setattr(evidence, "plan", lambda output_dir: {"slow": [partial(look)]})
    monkeypatch.setattr(evidence, "RESULTS", tmp_path)
    monkeypatch.setattr(evidence, "HEARTBEAT_SECONDS", 0.1)
    evidence.main(["--stages", "slow", "--output-dir", str(out)])
    assert seen and 0.3 <= seen[0] <= 0.5  # the heartbeats, before the step ended

    script = f"""
import sys
from pathlib import Path
from benchmarks import evidence
evidence.plan = lambda output_dir: {{"slow": [[sys.executable, "-c", "import time; time.sleep(60)"]]}}
evidence.RESULTS = Path({str(tmp_path)!r})
evidence.main(["--stages", "slow", "--output-dir", {str(tmp_path / "killed")!r}])
"""
    child = subprocess.Popen([sys.executable, "-c", script], cwd=evidence.ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().startswith("[slow]")  # the step has started
    time.sleep(1.5)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) != 0
    stage = json.loads((tmp_path / "killed" / "ledger.json").read_text())["stages"]["slow"]
    assert stage["seconds"] >= 1 and not stage["done"]  # the stopped step's time, before any heartbeat
