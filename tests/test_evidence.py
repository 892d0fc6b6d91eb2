"""benchmarks/evidence.py: its plan names real scripts, variants and methods; its ledger sums wall time over
interruptions, skips finished stages, keeps a failed step's time and refuses another code version's rerun."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import yaml

from adaptor_peft.adaptors import METHODS
from adaptor_peft.models import resolve_checkpoint
from adaptor_peft.provenance import code_version
from adaptor_peft.suite import QUICK, selection_runs, tuned_options
from adaptor_peft.training import load_recipe
from adaptor_peft.training.loop import train_once
from adaptor_peft.training.runs import same_recipe
from benchmarks import ablation, evidence


def test_the_plan_names_real_scripts_variants_and_methods(tmp_path):
    steps = evidence.plan(tmp_path)
    assert list(steps) == ["study", "suite", "backbone", "shipped"]
    for name, stage in steps.items():
        for step in stage:
            if isinstance(step, partial):
                if step.func is not evidence.run_unless_made:
                    continue
                step = step.args[0]
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
    monkeypatch.setattr(evidence, "ARCHIVE", tmp_path / "archive")
    argv = ["--stages", "first,second", "--output-dir", str(out)]
    monkeypatch.setattr(evidence, "describe_machine", lambda: "machine A")

    with pytest.raises(subprocess.CalledProcessError):  # the second stage fails: its time is kept, not done
        evidence.main(argv)
    ledger = json.loads((out / "ledger.json").read_text())
    first = ledger["stages"]["first"]
    assert first["done"] and first["seconds"] >= 0.2
    assert not ledger["stages"]["second"]["done"] and ledger["stages"]["second"]["seconds"] > 0

    marker.touch()
    monkeypatch.setattr(evidence, "describe_machine", lambda: "machine B")  # the next session's machine
    text = evidence.main(argv)
    again = json.loads((out / "ledger.json").read_text())
    assert again["stages"]["first"] == first  # finished: not run again
    second = again["stages"]["second"]
    assert second["done"]
    assert second["seconds"] > ledger["stages"]["second"]["seconds"]  # both tries counted
    assert set(second["machines"]) == {"machine A", "machine B"}
    assert sum(second["machines"].values()) == pytest.approx(second["seconds"], abs=0.2)
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert set(first["machines"]) == {"machine A"} and rows["| first"].endswith("| machine A: 0.00 |")
    assert "machine A: " in rows["| second"] and "machine B: " in rows["| second"]
    assert evidence.by_machine({"seconds": 7200.0, "machines": {"A": 3600.0}}) == "A: 1.00; unrecorded: 1.00"
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
    monkeypatch.setattr(evidence, "ARCHIVE", tmp_path / "archive")
    monkeypatch.setattr(evidence, "HEARTBEAT_SECONDS", 0.1)
    evidence.main(["--stages", "slow", "--output-dir", str(out)])
    assert seen and 0.3 <= seen[0] <= 0.5  # the heartbeats, before the step ended

    pid_file = tmp_path / "grandchild.pid"  # the step starts a process of its own, as a pool or pretraining does
    step = f"import subprocess, time; open({str(pid_file)!r}, 'w').write(str(subprocess.Popen(['sleep', '60']).pid)); "
    step += "time.sleep(60)"
    script = f"""
import sys
from pathlib import Path
from benchmarks import evidence
evidence.plan = lambda output_dir: {{"slow": [[sys.executable, "-c", {step!r}]]}}
evidence.RESULTS = Path({str(tmp_path)!r})
evidence.ARCHIVE = evidence.RESULTS / "archive"
evidence.main(["--stages", "slow", "--output-dir", {str(tmp_path / "killed")!r}])
"""
    child = subprocess.Popen([sys.executable, "-c", script], cwd=evidence.ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().startswith("[slow]")  # the step has started
    time.sleep(1.5)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) != 0
    stage = json.loads((tmp_path / "killed" / "ledger.json").read_text())["stages"]["slow"]
    assert stage["seconds"] >= 1 and not stage["done"]  # the stopped step's time, before any heartbeat
    status = Path(f"/proc/{pid_file.read_text()}/status")
    time.sleep(0.5)
    assert not status.exists() or "State:\tZ" in status.read_text()  # stopped with its step, not orphaned


def test_finished_runs_are_archived_and_a_fresh_folder_reads_them_back_untrained(tmp_path):
    out, into, fresh = tmp_path / "out", tmp_path / "archive", tmp_path / "fresh"
    recipe = load_recipe("offline_vtab/digits", ["method=linear_probe", *QUICK])
    folder = "suite/select/digits/linear_probe"
    results, minutes = train_once(recipe, out / folder)
    assert minutes is not None
    (out / "suite" / "unfinished").mkdir()  # a run that got nowhere: nothing to archive
    (out / "suite" / "unfinished" / "config.yaml").write_text("task: digits\n")
    (out / "ledger.json").write_text('{"code_version": "v", "stages": {}}\n')

    assert evidence.archive(out, into) == 1
    assert [json.loads(line)["run"] for line in (into / "suite.jsonl").read_text().splitlines()] == [folder]
    assert (into / "ledger.json").read_text() == (out / "ledger.json").read_text()

    assert evidence.restore(fresh, into) == 1
    assert not (fresh / folder / "checkpoints").exists()  # the small files only
    again, minutes = train_once(recipe, fresh / folder)
    assert minutes is None and again == json.loads(json.dumps(results))  # read back, not trained

    (fresh / folder / "results.json").write_text("{}")  # a folder that exists is never overwritten
    assert evidence.restore(fresh, into) == 0 and (fresh / folder / "results.json").read_text() == "{}"

    shutil.rmtree(out / "suite" / "select")
    (out / "suite" / "other" / "run").mkdir(parents=True)
    for name in ("config.yaml", "results.json"):
        shutil.copy(fresh / folder / name, out / "suite" / "other" / "run" / name)
    assert evidence.archive(out, into) == 1  # the archive keeps the runs the folder no longer has
    runs = [json.loads(line)["run"] for line in (into / "suite.jsonl").read_text().splitlines()]
    assert runs == ["suite/other/run", folder]


def test_a_damaged_archive_line_is_named(tmp_path):
    (tmp_path / "suite.jsonl").write_text('{"run": "a", "files": {}}\nnot json\n')
    with pytest.raises(SystemExit, match=r"suite\.jsonl, line 2: not a run record"):
        evidence.restore(tmp_path / "out", tmp_path)


def test_a_rerun_restores_the_archive_before_it_runs(tmp_path, monkeypatch):
    into, out = tmp_path / "archive", tmp_path / "out"
    record = {"run": "first/done", "files": {"config.yaml": "task: digits\n", "results.json": "{}"}}
    into.mkdir()
    (into / "first.jsonl").write_text(json.dumps(record) + "\n")
    (into / "ledger.json").write_text(
        json.dumps({"code_version": code_version(), "stages": {"first": {"seconds": 5.0, "done": False}}})
    )
    seen = []
    monkeypatch.setattr(evidence, "plan", lambda output_dir: {"first": [partial(seen.append, 1)]})
    monkeypatch.setattr(evidence, "RESULTS", tmp_path)
    monkeypatch.setattr(evidence, "ARCHIVE", into)
    evidence.main(["--stages", "first", "--output-dir", str(out)])
    assert (out / "first" / "done" / "results.json").read_text() == "{}" and seen == [1]
    assert json.loads((out / "ledger.json").read_text())["stages"]["first"]["seconds"] >= 5.0  # the time goes on

    (into / "ledger.json").write_text(json.dumps({"code_version": "0.0.0+other", "stages": {}}))
    with pytest.raises(SystemExit, match=r"code version 0\.0\.0\+other"):
        evidence.main(["--stages", "first", "--output-dir", str(tmp_path / "elsewhere")])
    assert not (tmp_path / "elsewhere" / "first").exists()  # nothing restored from another version's archive


def finished_study_run(out: Path, label: str, seed: int, options: dict) -> Path:
    """A study run folder as ``benchmarks/ablation.py`` makes it, finished (recipe and results)."""
    extra = [f"seed={seed}", *(f"method_options.{key}={value}" for key, value in options.items())]
    [(_, run, recipe)] = selection_runs(out / "study-lora", "digits", "lora", [0.01], extra, f"{label}/seed_{seed}")
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (run / "results.json").write_text(json.dumps({"top1": float(seed)}))
    (run / "checkpoints").mkdir()
    return run


def test_the_suite_shares_the_study_runs_of_the_chosen_variant_only(tmp_path):
    tuned = tuned_options()["lora"]
    other = {**tuned, "lr_scale": float(tuned["lr_scale"]) * 4}
    for seed in (42, 43):
        finished_study_run(tmp_path, "chosen", seed, tuned)
        finished_study_run(tmp_path, "other", seed, other)
    kept = tmp_path / "suite" / "select" / "digits" / "lora" / "seed_1" / "lr_0.01"
    kept.mkdir(parents=True)

    assert evidence.share_study_runs(tmp_path) == 1
    shared = tmp_path / "suite" / "select" / "digits" / "lora" / "lr_0.01"
    assert json.loads((shared / "results.json").read_text()) == {"top1": 42.0}
    assert not (shared / "checkpoints").exists() and not any(kept.iterdir())  # a folder there is kept as it is
    [(_, folder, recipe)] = selection_runs(tmp_path / "suite", "digits", "lora", [0.01])
    assert folder == shared and same_recipe(shared, recipe)  # the suite reads it back as its own run


def test_pretrained_backbones_and_their_cards_are_archived_and_restored(tmp_path):
    out, into, fresh = tmp_path / "out", tmp_path / "archive", tmp_path / "fresh"
    files = {
        "backbone/pretrain/adaptor_epochs8_seed0.safetensors": b"weights",
        "backbone/pretrain/adaptor_epochs8_seed0.md": b"card",
        "shipped/vim_nano_patch4_32_adaptor.safetensors": b"shipped",
    }
    for name, data in {**files, "backbone/pretrain/plain_epochs8_seed1.safetensors.resume.pt": b"partial"}.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    evidence.archive(out, into)
    assert sorted(p.relative_to(into / "backbones").as_posix() for p in (into / "backbones").rglob("*.*")) == sorted(
        files
    )

    (fresh / "shipped").mkdir(parents=True)
    (fresh / "shipped" / "vim_nano_patch4_32_adaptor.safetensors").write_bytes(b"newer")  # kept as it is
    evidence.restore(fresh, into)
    assert (fresh / "backbone/pretrain/adaptor_epochs8_seed0.safetensors").read_bytes() == b"weights"
    assert (fresh / "backbone/pretrain/adaptor_epochs8_seed0.md").read_bytes() == b"card"
    assert (fresh / "shipped/vim_nano_patch4_32_adaptor.safetensors").read_bytes() == b"newer"
    assert not (fresh / "backbone/pretrain/plain_epochs8_seed1.safetensors.resume.pt").exists()


def test_the_demo_rows_of_both_backbones_go_into_one_report_and_the_card(tmp_path, monkeypatch):
    monkeypatch.setattr(evidence, "RESULTS", tmp_path)
    shipped, weights = tmp_path / "shipped", tmp_path / "shipped" / "vim_nano_patch4_32_adaptor.safetensors"
    top1 = {"demo-plain": 80.0, "demo-adaptor": 90.0}
    for folder, score in top1.items():
        (shipped / folder).mkdir(parents=True)
        (shipped / folder / "demo.md").write_text(f"| method | top-1 |\n|---|---:|\n| lora | {score} |\n")
        for i, method in enumerate(evidence.DEMO_METHODS.split(",")):
            (shipped / folder / method).mkdir()
            (shipped / folder / method / "results.json").write_text(json.dumps({"top1": score + i, "images": 1497}))
    weights.with_suffix(".md").write_text("# vim_nano_patch4_32_adaptor\n\n| epoch | top-1 |\n")
    evidence.write_demo_rows(shipped, weights)
    text = (tmp_path / "demo_builtin_adaptor.md").read_text()
    plain, adaptor = text.index("## Default backbone"), text.index("## With built-in adaptors")
    assert plain < text.index("| lora | 80.0 |") < adaptor < text.index("| lora | 90.0 |")
    assert f"code version {code_version()}" in text and "--seed 0 --adaptor" in text
    assert "`vim_nano_patch4_32_adaptor.safetensors`" in text

    card = weights.with_suffix(".md").read_text()
    assert card.startswith("# vim_nano_patch4_32_adaptor\n\n| epoch | top-1 |\n\n## Transfer\n")
    assert "| linear_probe | 80.00 | 90.00 |" in card and "| full | 83.00 | 93.00 |" in card
    assert "1,497 test images" in card and "standard error of about 0.8 points" in card
    evidence.write_demo_rows(shipped, weights)  # a second run replaces the section, not adds another
    assert weights.with_suffix(".md").read_text() == card


def test_a_made_output_is_not_made_again(tmp_path):
    made = tmp_path / "weights.safetensors"
    command = [sys.executable, "-c", f"open({str(made)!r}, 'a').write('x')"]
    evidence.run_unless_made(command, made)
    evidence.run_unless_made(command, made)
    assert made.read_text() == "x"
    pretrain = evidence.plan(tmp_path)["shipped"][0]  # the shipped backbone's pretraining
    weights = tmp_path / "shipped" / "vim_nano_patch4_32_adaptor.safetensors"
    assert pretrain.func is evidence.run_unless_made and pretrain.args[1] == weights
    assert pretrain.args[0][-2:] == ["--output", str(weights)]


def test_a_step_imports_the_package_of_its_own_checkout(tmp_path):
    script, seen = tmp_path / "script.py", tmp_path / "seen"
    found = "importlib.util.find_spec('adaptor_peft').origin"
    script.write_text(f"import importlib.util; open({str(seen)!r}, 'w').write({found})")
    evidence.run_command([sys.executable, "-S", str(script)])  # no site packages: no installed adaptor_peft
    assert Path(seen.read_text()).is_relative_to(evidence.ROOT)
    with pytest.raises(subprocess.CalledProcessError):
        evidence.run_command([sys.executable, "-c", "raise SystemExit(3)"])


def test_a_run_trained_from_a_backbone_in_the_folder_is_restored_at_another_path(tmp_path):
    out, into, fresh = tmp_path / "first" / "runs", tmp_path / "archive", tmp_path / "second" / "runs"
    backbone = Path("backbone/pretrain/plain_epochs1_seed0.safetensors")
    (out / backbone).parent.mkdir(parents=True)
    shutil.copy(resolve_checkpoint("pretrained", "vim_nano_patch4_32"), out / backbone)
    folder = "backbone/transfer/plain_epochs1/seed_0/digits/linear_probe"

    def recipe(root: Path) -> dict:
        return load_recipe("offline_vtab/digits", [f"checkpoint={root / backbone}", "method=linear_probe", *QUICK])

    results, _ = train_once(recipe(out), out / folder)

    evidence.archive(out, into)
    assert str(out) not in (into / "backbone.jsonl").read_text()  # its absolute path is not archived
    assert evidence.restore(fresh, into) == 1
    again, minutes = train_once(recipe(fresh), fresh / folder)
    assert minutes is None and again["top1"] == results["top1"]  # read back at the new path, not trained


def test_a_package_report_is_copied_under_the_reruns_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(evidence, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    suite, out = tmp_path / "suite", tmp_path / "out"
    suite.mkdir()
    out.mkdir()
    (suite / "suite.md").write_text("# The suite\n\n| task | top-1 |\n")
    (suite / "suite.json").write_text('{"tasks": []}')
    ledger = {"code_version": "v", "stages": {"suite": {"seconds": 7200.0, "done": False, "machines": {"M": 3600.0}}}}
    (out / "ledger.json").write_text(json.dumps(ledger))
    evidence.copy_reports(suite, ("suite.md", "suite.json"), out, "suite")
    title, blank, header, rest = (tmp_path / "results" / "suite.md").read_text().split("\n", 3)
    assert (title, blank) == ("# The suite", "") and rest == "\n| task | top-1 |\n"
    assert f"code version {code_version()}" in header and "trained on: M: 1.00; unrecorded: 1.00 (hours)" in header
    assert (tmp_path / "results" / "suite.json").read_text() == '{"tasks": []}'
