"""The offline transfer suite: generated tasks, their recipes, the protocol command and a NOAH-layout task."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import yaml
from PIL import Image

from adaptor_peft.cli import main
from adaptor_peft.data import DataError, load_split
from adaptor_peft.data.synthetic import TASKS, generate, suite_groups
from adaptor_peft.training import RecipeError, load_recipe, recipes_dir, train


def test_tasks_cover_the_three_vtab_groups():
    groups = suite_groups()
    assert list(groups) == ["natural", "specialized", "structured"]
    assert len(groups["natural"]) >= 2 and len(groups["specialized"]) >= 2 and len(groups["structured"]) >= 4
    assert "digits" in groups["natural"] and len(TASKS) >= 8
    assert [t for ts in groups.values() for t in ts] == list(TASKS)  # table order


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_is_an_ordinary_vtab1k_sized_recipe(task):
    recipe = load_recipe(f"offline_vtab/{task}")
    entry = TASKS[task]
    assert (recipe["task"], recipe["group"], recipe["num_classes"]) == (task, entry.group, entry.num_classes)
    assert (recipe["train_split"], recipe["eval_split"], recipe["model"]) == (
        "train800val200",
        "test",
        "vim_nano_patch4_32",
    )
    sizes = recipe["data"]["builtin"]["sizes"]
    assert sizes["train800"] == 800 and sizes["val200"] == 200
    assert sizes["test"] >= 1000 or (task == "digits" and sizes["test"] == 797)
    assert entry.stands_in_for.split()[0] in (recipes_dir() / "offline_vtab" / f"{task}.yaml").read_text()


@pytest.mark.parametrize("task", [t for t in TASKS if t != "digits"])
def test_generated_images_are_32px_rgb_seeded_and_split_apart(task):
    images, labels = generate(task, "train800", 24)
    assert images.shape == (24, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < TASKS[task].num_classes and images.std() > 5
    generate.cache_clear()
    again, same = generate(task, "train800", 24)
    assert np.array_equal(again, images) and np.array_equal(same, labels)  # the seed fixes the pixels
    assert not np.array_equal(generate(task, "val200", 24)[0], images)
    assert not np.array_equal(generate(task, "train800", 24, seed=1)[0], images)


def test_digits_are_dealt_out_once_800_200_797():
    from sklearn.datasets import load_digits

    sizes = {"train800": 800, "val200": 200, "test": 797}
    parts = [generate("digits", split, size) for split, size in sizes.items()]
    dealt = np.concatenate([np.c_[pixels.reshape(len(pixels), -1), labels] for pixels, labels in parts])
    digits = load_digits()
    every = np.c_[np.rint(digits.images * (255 / 16)).reshape(1797, -1), digits.target]
    assert np.array_equal(dealt[np.lexsort(dealt.T)], every[np.lexsort(every.T)])  # each image exactly once
    with pytest.raises(ValueError, match="'test' has 797 images, not 1000"):
        generate("digits", "test", 1000)


def test_labels_follow_the_pictures():
    """Position: the bright sprite moves right with the label; cells: tumour nuclei darken the centre."""
    images, labels = generate("position", "test", 200)
    bright = images.max(axis=3) > 170
    columns = np.array([np.nonzero(b)[1].mean() if b.any() else np.nan for b in bright])
    ok = ~np.isnan(columns)
    assert np.corrcoef(columns[ok], labels[ok])[0, 1] > 0.9
    images, labels = generate("cells", "test", 200)
    dark = (images[:, 8:24, 8:24].mean(axis=3) < 90).mean(axis=(1, 2))
    assert dark[labels == 1].mean() > 2 * dark[labels == 0].mean()


def test_load_split_builds_the_noah_splits_and_names_bad_options():
    source = {"kind": "synthetic", "task": "count", "sizes": {"train800": 6, "val200": 3, "test": 4}}
    both, train, val = (load_split(source, s) for s in ("train800val200", "train800", "val200"))
    assert len(both) == 9 and both.labels == train.labels + val.labels and both.num_classes == 6
    assert np.array_equal(both[7][0].numpy(), val[1][0].numpy()) and both[0][0].shape == (3, 32, 32)
    with pytest.raises(DataError, match=r"no size for split 'test' in its 'sizes' option"):
        load_split({**source, "sizes": {"train800": 2}}, "test")
    with pytest.raises(DataError, match=r"unknown synthetic task 'cont'"):
        load_split({**source, "task": "cont"}, "test")
    with pytest.raises(DataError, match=r"needs option 'sizes'"):
        load_split({"kind": "synthetic", "task": "count"}, "test")


def test_calibration_reads_val_at_the_recipe_lr_and_its_runs_are_reused(tmp_path):
    out = tmp_path / "suite"
    main(["suite", "--calibrate", "--quick", "--tasks", "cells", "--output-dir", str(out)])
    lr = load_recipe("offline_vtab/cells")["lr"]
    table = (out / "calibration.md").read_text()
    assert (
        table.startswith("| task | group | stands in for | linear_probe | full |")
        and "| cells | specialized |" in table
    )
    for method in ("linear_probe", "full"):
        assert (
            json.loads((out / "select" / "cells" / method / f"lr_{lr:g}" / "results.json").read_text())["eval_split"]
            == "val200"
        )


@pytest.mark.parametrize(
    "args, message",
    [(["--methods", "adaptor,prompt"], r"unknown method\(s\) or task\(s\) \['prompt'\]"),
     (["--tasks", "cifar"], r"SuiteError: .*\['cifar'\]"), (["--seeds", "0"], "at least one seed")],
)  # fmt: skip
def test_suite_rejects_unknown_methods_tasks_and_seeds(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        main(["suite", "--quick", "--output-dir", str(tmp_path), *args])


def test_suite_rejects_a_bad_learning_rate_grid(tmp_path, capsys):
    for grid in ("1e-3,fast", "0,1e-3"):
        with pytest.raises(SystemExit):
            main(["suite", "--quick", "--output-dir", str(tmp_path), "--lrs", grid])
        assert "argument --lrs" in capsys.readouterr().err


def test_a_noah_layout_task_is_one_short_recipe_and_eval_reports_its_test_top1(tmp_path, capsys):
    """A new task folder (images and the four list files) on the embedded backbone: train, then
    ``adaptor-peft eval RUN_DIR --split test`` without repeating where the data is."""
    rng, folder = random.Random(0), tmp_path / "data" / "squares"
    lines: dict[str, list[str]] = {}
    for split, count in {"train800": 6, "val200": 3, "test": 5}.items():
        lines[split] = []
        for i in range(count):
            label = i % 2
            pixels = np.full((20, 20, 3), 40 + 160 * label + rng.randint(-20, 20), dtype=np.uint8)
            (folder / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / "images" / f"{split}_{i}.png")
            lines[split].append(f"images/{split}_{i}.png {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, entries in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(entries) + "\n")
    recipe = tmp_path / "squares.yaml"
    recipe.write_text(
        "task: squares\nnum_classes: 2\ntransform: vtab\ntrain_split: train800val200\neval_split: test\n"
        "data: {local: {kind: vtab1k, dir: squares}}\nmodel: vim_nano_patch4_32\ncheckpoint: pretrained\n"
        "epochs: 1\nwarmup_epochs: 0\nbatch_size: 4\nnum_workers: 0\n"
    )
    run = tmp_path / "run"
    main(["train", "--recipe", str(recipe), "--data-root", str(tmp_path / "data"), "--output-dir", str(run),
          "--method", "adaptor", "--no-progress"])  # fmt: skip
    trained = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    main(["eval", str(run), "--split", "test", "--no-progress"])
    assert capsys.readouterr().out.startswith("squares test: top-1 ")
    evaluated = json.loads((run / "eval_test.json").read_text())
    assert evaluated["images"] == 5 and evaluated["top1"] == pytest.approx(trained["top1"])


def test_the_booster_trains_from_scratch_like_full_and_a_frozen_method_does_not(tmp_path):
    """The paper's "backbone" use: adaptors trained with the whole model from random weights."""
    tiny = ["data.builtin.sizes.train800=4", "data.builtin.sizes.val200=2", "data.builtin.sizes.test=4", "epochs=1",
            "batch_size=2"]  # fmt: skip
    recipe = {**load_recipe("offline_vtab/cells", ["method=adaptor_booster", *tiny]), "checkpoint": None}
    with pytest.warns(UserWarning, match="from random weights"):
        results = train(recipe, tmp_path / "booster", progress=False)
    assert results["parameters"]["trainable_percent"] > 100
    with pytest.raises(RecipeError, match="'adaptor' freezes the backbone, but the recipe has no checkpoint"):
        train({**recipe, "method": "adaptor"}, tmp_path / "adaptor", progress=False)


def load_ablation():
    """benchmarks/ablation.py as a module (benchmarks/ is not a package the tests import)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"
    spec = importlib.util.spec_from_file_location("ablation", path)
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    return ablation


def test_the_ablation_benchmark_reads_val_per_variant_and_reuses_its_runs(tmp_path):
    ablation = load_ablation()
    report = tmp_path / "ablation.md"
    argv = ["--quick", "--workers", "1", "--variants", "lr_scale=1", "--variant",
            "rank=adaptor:t_rank=2,t_anchor=static", "--tasks", "count", "--lrs", "1e-3,5e-2",
            "--output-dir", str(tmp_path / "runs"), "--output", str(report)]  # fmt: skip
    text = ablation.main(argv)
    assert report.read_text() == text
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if "| adaptor |" in line}
    assert rows["rank"][2] == "t_rank=2, t_anchor=static" and rows["lr_scale=1"][2] == "lr_scale=1.0"
    assert int(rows["rank"][3].replace(",", "")) != int(rows["lr_scale=1"][3].replace(",", ""))
    for name in ("lr_scale=1", "rank"):
        runs = tmp_path / "runs" / "select" / "count" / name
        vals = {float(p.parent.name[3:]): json.loads(p.read_text())["top1"] for p in runs.glob("lr_*/results.json")}
        assert len(vals) == 3  # a two-rate grid's choice is an edge: one step beyond it, once
        assert {0.001, 0.05} < set(vals) and rows[name][-1].endswith("* |")
        best = min(vals, key=lambda lr: (-vals[lr], lr))  # val200, the best rate, the smallest of equals
        assert float(rows[name][4]) == pytest.approx(vals[best], abs=0.01)
        assert rows[name][-1].strip("|* ") == f"{best:g}"
        recipe = yaml.safe_load((runs / "lr_0.05" / "config.yaml").read_text())
        assert recipe["eval_split"] == "val200" and recipe["train_split"] == "train800"
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("results.json"))
    assert ablation.main(argv) == text  # finished runs are read back, not trained again
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("results.json")) == stamps
    with pytest.raises(SystemExit, match="unknown variant"):
        ablation.main(["--variants", "nonsense"])


def test_the_ablation_benchmark_chooses_the_rate_on_the_mean_val_of_its_seeds(tmp_path):
    ablation = load_ablation()
    argv = ["--quick", "--workers", "1", "--variants", "lr_scale=1", "--tasks", "count", "--lrs", "1e-3,5e-2",
            "--seeds", "1,2", "--output-dir", str(tmp_path / "runs")]  # fmt: skip
    text = ablation.main(argv)
    row = next(line.split(" | ") for line in text.splitlines() if "| adaptor |" in line)
    runs = tmp_path / "runs" / "select" / "count" / "lr_scale=1"
    val = {
        (seed, float(p.parent.name[3:])): json.loads(p.read_text())["top1"]
        for seed in (1, 2)
        for p in (runs / f"seed_{seed}").glob("lr_*/results.json")
    }
    for seed in (1, 2):
        recipe = yaml.safe_load((runs / f"seed_{seed}" / "lr_0.05" / "config.yaml").read_text())
        assert recipe["seed"] == seed
    rates = {lr for _, lr in val}
    assert len(rates) == 3 and len(val) == 6  # the extension step, with both seeds
    mean = {lr: (val[1, lr] + val[2, lr]) / 2 for lr in rates}
    best = min(mean, key=lambda lr: (-mean[lr], lr))
    assert float(row[4]) == pytest.approx(mean[best], abs=0.01) and row[-1].strip("|* ") == f"{best:g}"
    assert "mean of seeds 1, 2" in text
