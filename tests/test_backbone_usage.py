"""benchmarks/backbone_usage.py end to end on tiny pretraining and the suite's tiny splits: every arm per
seed, the report's numbers read back from the runs, the paired differences, and a rerun that trains nothing."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from adaptor_peft.provenance import describe_machine
from adaptor_peft.reports.paired import paired_difference
from benchmarks import backbone_usage


def test_backbone_usage_pretrains_every_arm_transfers_and_resumes(tmp_path):
    argv = ["--quick", "--seeds", "0,1", "--epochs", "1", "--compute-ratio", "2", "--tasks", "count"]
    argv += ["--methods", "linear_probe", "--output-dir", str(tmp_path), "--workers", "1"]
    text = backbone_usage.main([*argv, "--output", str(tmp_path / "report.md")])

    files = sorted((tmp_path / "pretrain").glob("*.safetensors"))
    arms = ("adaptor_epochs1", "plain_epochs1", "plain_epochs2")
    assert [f.name for f in files] == [f"{arm}_seed{seed}.safetensors" for arm in arms for seed in (0, 1)]
    held_out = {}
    for f in files:
        with safe_open(str(f), "pt") as weights:
            history = json.loads(weights.metadata()["history"])
        assert len(history) == (2 if "epochs2" in f.name else 1)  # equal compute: epochs times the ratio
        held_out[f.stem] = history[-1]["held_out_top1"]
    equal_compute = f"{held_out['plain_epochs2_seed0']:.1f} | {held_out['plain_epochs2_seed1']:.1f}"
    assert f"| plain, equal compute | 2 | {equal_compute} |" in text
    assert f"Pretrained on: {describe_machine()} (6)." in text  # read from the weights, where the script wrote it
    pretrained = paired_difference(
        [held_out["adaptor_epochs1_seed0"], held_out["adaptor_epochs1_seed1"]],
        [held_out["plain_epochs1_seed0"], held_out["plain_epochs1_seed1"]],
    )
    assert f"- adaptor − plain: {pretrained.mean:+.2f} [{pretrained.low:+.2f}, {pretrained.high:+.2f}], n = 2" in text

    top1 = {}
    for results in (tmp_path / "transfer").rglob("results.json"):
        arm, seed = results.parts[-5], results.parts[-4]
        top1[arm, seed] = json.loads(results.read_text())["top1"]
    assert len(top1) == 6
    for arm, name in (("adaptor_epochs1", "adaptor"), ("plain_epochs2", "plain, equal compute")):
        assert f"| linear_probe | {name} | {top1[arm, 'seed_0']:.2f} | {top1[arm, 'seed_1']:.2f} |" in text
    assert (tmp_path / "report.md").read_text() == text

    transferred = paired_difference(
        [top1["adaptor_epochs1", "seed_0"], top1["adaptor_epochs1", "seed_1"]],
        [top1["plain_epochs1", "seed_0"], top1["plain_epochs1", "seed_1"]],
    )
    assert f"- linear_probe, adaptor − plain: {transferred.mean:+.2f} [{transferred.low:+.2f}," in text
    assert "Runs whose loss became non-finite (scored 0): none." in text

    stamps = {f: f.stat().st_mtime_ns for f in [*files, *(tmp_path / "transfer").rglob("results.json")]}
    again = backbone_usage.main(argv)
    assert again[again.index("## Pretraining") :] == text[text.index("## Pretraining") :]  # read back, not retrained
    assert all(f.stat().st_mtime_ns == stamp for f, stamp in stamps.items())

    other_size = [*backbone_usage.QUICK_PRETRAINING[:-1], "8"]  # a batch of 8, not 4: not this arm's backbone
    with pytest.raises(SystemExit, match=r"plain_epochs1_seed0\.safetensors: pretrained with other.*batch_size"):
        backbone_usage.pretrain(backbone_usage.arms(1, 2)[1], 0, tmp_path, other_size)


def test_the_report_gives_the_measured_cost_of_an_adaptor_epoch_beside_the_assumed_one():
    setup = backbone_usage.arms(8, 1.25)  # the equal-compute arm: 10 epochs
    minutes = {"adaptor": (24.0, 28.0), "plain": (16.0, 16.0), "plain, equal compute": (20.0, 20.0)}
    pretraining = {
        (arm.name, s): {"held_out_top1": 50.0, "minutes": minutes[arm.name][s]} for arm in setup for s in (0, 1)
    }
    transfer = {(arm.name, s, "count", "lora"): 60.0 for arm in setup for s in (0, 1)}
    text = backbone_usage.report("# t", setup, [0, 1], pretraining, transfer, ["count"], ["lora"])
    # means 26 / 8 against 16 / 8 minutes per epoch; per seed 3.0 / 2.0 and 3.5 / 2.0
    assert "An adaptor epoch took 1.62 plain epochs here (per seed: 1.50, 1.75;" in text
    assert "equal compute assumed 1.25." in text
    assert "Pretrained on: unrecorded (6)." in text  # records without a machine: weights from before it was kept
    pretraining[setup[0].name, 0]["machine"] = "CPU A, x86_64, AVX2, 2 cores"
    text = backbone_usage.report("# t", setup, [0, 1], pretraining, transfer, ["count"], ["lora"])
    assert "Pretrained on: unrecorded (5); CPU A, x86_64, AVX2, 2 cores (1)." in text


def test_transfer_is_paired_over_pretraining_seeds_and_diverged_runs_are_named():
    setup = backbone_usage.arms(8, 1.25)
    seeds, tasks = [0, 1, 2], ["count", "digits"]
    pretraining = {(arm.name, s): {"held_out_top1": 50.0, "minutes": 10.0} for arm in setup for s in seeds}
    scores = {"adaptor": [[60, 70], [50, 64], [62, 72]], "plain": [[55, 61], [52, 58], [50, 60]]}
    scores["plain, equal compute"] = scores["plain"]
    transfer = {
        (arm.name, s, t, "lora"): float(scores[arm.name][i][j]) for arm in setup for i, s in enumerate(seeds)
        for j, t in enumerate(tasks)
    }  # fmt: skip
    text = backbone_usage.report("# t", setup, seeds, pretraining, transfer, tasks, ["lora"], ["plain / 1 / count"])
    # task means per seed: adaptor 65, 57, 67; plain 58, 55, 55; differences 7, 2, 12: mean 7, sd 5,
    # half-width t(0.975, 2) 4.3027 * 5 / sqrt(3) = 12.42
    assert "- lora, adaptor − plain: +7.00 [-5.42, +19.42], n = 3, within noise" in text
    assert "| lora | adaptor | 65.00 | 57.00 | 67.00 | 63.00 ± 5.29 |" in text
    assert "Runs whose loss became non-finite (scored 0): plain / 1 / count." in text
