"""The suite's protocol (issue 20): a grid that cannot hide the optimum, selection on the mean of two seeds,
seeds over data with every per-seed value kept, and paired comparisons with 95 % intervals."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml

from adaptor_peft.cli import main
from adaptor_peft.provenance import code_version
from adaptor_peft.reports.paired import t_quantile
from adaptor_peft.suite import (
    BEST_LORA,
    LEARNING_RATES,
    SuiteError,
    _comparison_table,
    _diverged,
    choose_rate,
    comparisons,
    edge_step,
    final_recipe,
    run_suite,
)
from adaptor_peft.training import load_recipe


def test_the_default_grid_has_three_rates_and_a_smaller_one_is_refused(tmp_path):
    assert len(LEARNING_RATES) >= 3
    with pytest.raises(SuiteError, match=r"three learning rates \(got \[0.001, 0.01\]\)"):
        run_suite(tmp_path, learning_rates=(1e-3, 1e-2), progress=False)


def test_a_diverged_run_is_named_with_its_rate_and_seed():
    result = {"task": "count", "method": "lora", "eval_split": "val200", "diverged": {"lr": 0.03, "seed": 43}}
    assert _diverged(result) == "count/lora on val200 (lr 0.03, seed 43)"


def test_one_collapsed_seed_does_not_choose_the_rate():
    """Seed 0 alone would pick 3e-3 (82 > 80); its seed 1 collapsed to chance, so the mean picks 1e-3."""
    val = {1e-3: [80.0, 79.0], 3e-3: [82.0, 12.5], 1e-2: [60.0, 61.0]}
    assert max(val, key=lambda lr: val[lr][0]) == 3e-3
    assert choose_rate(val) == 1e-3
    collapsed_first = {1e-3: [12.5, 81.0], 3e-3: [70.0, 71.0], 1e-2: [60.0, 61.0]}  # and the other way round
    assert max(collapsed_first, key=lambda lr: collapsed_first[lr][1]) == 1e-3 and choose_rate(collapsed_first) == 3e-3
    assert choose_rate({3e-3: [50.0, 60.0], 1e-3: [55.0, 55.0]}) == 1e-3  # the smallest of equals


def test_an_edge_choice_extends_the_grid_one_step_by_its_ratio_and_an_inner_one_does_not():
    assert edge_step(LEARNING_RATES, 1e-2) == pytest.approx(3.33e-2)
    assert edge_step(LEARNING_RATES, 1e-3) == pytest.approx(3.33e-4)
    assert edge_step(LEARNING_RATES, 3e-3) is None
    assert edge_step((1e-3, 1e-2, 2e-2), 2e-2) == pytest.approx(4e-2)  # the ratio at that edge
    # The extension is chosen again with the rest, on the same mean of seeds:
    val = {1e-3: [50.0, 52.0], 3e-3: [60.0, 61.0], 1e-2: [70.0, 69.0]}
    step = edge_step(val, choose_rate(val))
    assert step == pytest.approx(3.33e-2)
    assert choose_rate({**val, step: [75.0, 10.0]}) == 1e-2 and choose_rate({**val, step: [72.0, 71.0]}) == step


def test_each_final_run_has_its_own_data_seed_and_training_seed():
    recipe = load_recipe("offline_vtab/count", ["lr=0.01"])
    finals = [final_recipe(recipe, i) for i in range(3)]
    assert [(r["seed"], r["data"]["builtin"]["seed"]) for r in finals] == [(42, 0), (43, 1), (44, 2)]
    assert all(r["data"]["builtin"]["sizes"] == recipe["data"]["builtin"]["sizes"] and r["lr"] == 0.01 for r in finals)
    assert recipe["seed"] == 42 and recipe["data"]["builtin"]["seed"] == 0  # the recipe itself is left as it was


def test_comparisons_pair_tasks_and_seeds_per_role_with_the_best_lora_chosen_on_val():
    scores = {
        "adaptor": {"count": [70.0, 72.0], "objects": [80.0, 81.0], "retina": [60.0, 61.0]},
        "lora": {"count": [60.0, 61.0], "objects": [70.0, 70.0], "retina": [50.0, 50.0]},
        "lora_x_proj": {"count": [80.0, 80.0], "objects": [79.0, 80.0], "retina": [60.0, 59.0]},
    }
    best = {"count": "lora", "objects": "lora_x_proj", "retina": "lora_x_proj"}  # as val chose, not test
    out = comparisons(scores, best, ["count", "objects", "retina"])
    held_out = out["held-out"][0]
    assert (held_out["a"], held_out["b"], held_out["tasks"], held_out["n"]) == (
        "adaptor",
        BEST_LORA,
        ["objects", "retina"],
        4,
    )
    differences = [1.0, 1.0, 0.0, 2.0]  # objects seeds 0, 1 then retina seeds 0, 1
    assert held_out["mean"] == pytest.approx(statistics.fmean(differences))
    half = t_quantile(0.95, 3) * statistics.stdev(differences) / 2
    assert held_out["low"] == pytest.approx(1.0 - half) and held_out["within_noise"] is True
    design = out["design"][0]
    assert design["tasks"] == ["count"] and design["mean"] == pytest.approx(10.5)  # count: adaptor vs lora
    assert [row["n"] for row in out["all"]] == [6] and out["reported"] == []  # no reported task ran
    table = _comparison_table(out)
    assert table.splitlines()[2].startswith("| held-out | adaptor − best LoRA | 4 | +1.00 |")
    assert "within noise" in table.splitlines()[2] and "adaptor ahead" in table.splitlines()[3]


def test_suite_quick_extends_the_grid_selects_on_two_seeds_and_keeps_every_seed(tmp_path, capsys):
    out = tmp_path / "suite"
    argv = ["suite", "--quick", "--no-progress", "--methods", "lora,adaptor", "--tasks", "count", "--seeds", "2"]
    argv += ["--lrs", "1e-3,1e-2,1e-1", "--output-dir", str(out)]
    main(argv)
    report = json.loads((out / "suite.json").read_text())
    extended = report["extended"]["count"]
    assert report["runs_trained_now"] == 2 * (3 * 2 + 2) + 2 * len(extended)
    assert report["code_versions"] == [code_version()]
    for method in ("lora", "adaptor"):
        folder = out / "select" / "count" / method
        grid = [1e-3, 1e-2, 1e-1] + ([extended[method]["added"]] if method in extended else [])
        val = {}
        for lr in grid:
            runs = [folder / f"lr_{lr:g}", folder / "seed_1" / f"lr_{lr:g}"]
            configs = [yaml.safe_load((run / "config.yaml").read_text()) for run in runs]
            assert [c["seed"] for c in configs] == [42, 43] and {c["eval_split"] for c in configs} == {"val200"}
            val[lr] = [json.loads((run / "results.json").read_text())["top1"] for run in runs]
            assert report["val"]["count"][method][f"{lr:g}"] == val[lr]
        before = choose_rate({lr: v for lr, v in val.items() if lr in (1e-3, 1e-2, 1e-1)})
        assert (method in extended) == (before in (1e-3, 1e-1))  # an edge, and only an edge, is extended
        if method in extended:
            assert extended[method] == {"added": edge_step([1e-3, 1e-2, 1e-1], before), "chosen_before": before}
        assert report["learning_rate"]["count"][method] == choose_rate(val)
        tops = []
        for seed in (0, 1):
            run = out / "test" / f"seed_{seed}" / "count" / method
            config = yaml.safe_load((run / "config.yaml").read_text())
            assert (config["seed"], config["data"]["builtin"]["seed"], config["eval_split"]) == (
                42 + seed,
                seed,
                "test",
            )
            tops.append(json.loads((run / "results.json").read_text())["top1"])
        assert report["per_seed"][method]["count"] == tops
    assert [(r["training_seed"], r["data_seed"]) for r in report["protocol"]["final_runs"]] == [(42, 0), (43, 1)]
    assert report["best_lora"] == {"count": "lora"}
    design = report["comparisons"]["design"][0]
    scores = report["per_seed"]
    differences = [a - b for a, b in zip(scores["adaptor"]["count"], scores["lora"]["count"], strict=True)]
    assert (design["b"], design["n"]) == (BEST_LORA, 2) and design["mean"] == pytest.approx(
        statistics.fmean(differences)
    )
    assert report["role_means"]["adaptor"]["design"] is None  # not every design task ran
    text = (out / "suite.md").read_text()
    assert "| design | adaptor − best LoRA | 2 |" in text and "Code version(s): " + code_version() in text
    configs = [yaml.safe_load(p.read_text()) for p in out.rglob("config.yaml")]
    assert configs and all(c["record_divergence"] is True for c in configs)  # a diverged run ends, not the suite
    diverged = sorted(
        _diverged(r) for p in out.rglob("results.json") if (r := json.loads(p.read_text())).get("diverged")
    )
    assert report["diverged"] == diverged
    assert f"Runs whose loss became non-finite (scored 0): {', '.join(diverged) or 'none'}." in text
    capsys.readouterr()
    main(argv)  # finished runs are read back
    assert json.loads((out / "suite.json").read_text())["runs_trained_now"] == 0
