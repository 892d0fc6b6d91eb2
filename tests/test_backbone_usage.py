"""benchmarks/backbone_usage.py end to end on tiny pretraining and the suite's tiny splits: every arm per
seed, the report's numbers read back from the runs, the paired differences, and a rerun that trains nothing."""

from __future__ import annotations

import json

from safetensors import safe_open

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

    stamps = {f: f.stat().st_mtime_ns for f in [*files, *(tmp_path / "transfer").rglob("results.json")]}
    again = backbone_usage.main(argv)
    assert again[again.index("## Pretraining") :] == text[text.index("## Pretraining") :]  # read back, not retrained
    assert all(f.stat().st_mtime_ns == stamp for f, stamp in stamps.items())


def test_the_report_gives_the_measured_cost_of_an_adaptor_epoch_beside_the_assumed_one():
    setup = backbone_usage.arms(8, 1.25)  # the equal-compute arm: 10 epochs
    minutes = {"adaptor": 24.0, "plain": 16.0, "plain, equal compute": 20.0}  # 3.0 and 2.0 minutes per epoch
    pretraining = {(arm.name, s): {"held_out_top1": 50.0, "minutes": minutes[arm.name]} for arm in setup for s in (0,)}
    transfer = {(arm.name, 0, "count", "lora"): 60.0 for arm in setup}
    text = backbone_usage.report("# t", setup, [0], pretraining, transfer, ["count"], ["lora"])
    assert "An adaptor epoch took 1.50 plain epochs here; equal compute assumed 1.25." in text
