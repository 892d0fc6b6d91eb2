"""Train and evaluate through the CLI on tiny 3-class data sets in the FGVC, image-folder, parquet and local-hub
layouts (the VTAB-1k layout is in test_training.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from adaptor_peft.cli import main
from tests.support.data import write_parquet
from tests.support.training import TINY_RECIPE, picture

TRAIN, TEST = 24, 12
FGVC_IDS = (17, 5, 200)  # sparse VPT class ids, mapped to 0, 1, 2 in sorted order: 5 -> 0, 17 -> 1, 200 -> 2
COLUMNS = {"image_column": "img", "label_column": "fine_label"}


def pictures(folder: Path, split: str, count: int) -> list[tuple[Path, int]]:
    """``count`` noisy colour pictures ``folder/<split>_<i>.png`` of class ``i % 3``."""
    rng = random.Random(f"{folder.name}/{split}")
    drawn = [(folder / f"{split}_{i}.png", i % 3) for i in range(count)]
    for path, label in drawn:
        picture(path, label, rng)
    return drawn


def parquet_split(path: Path, scratch: Path, split: str, count: int) -> None:
    drawn = pictures(scratch, split, count)
    write_parquet(path, [p.read_bytes() for p, _ in drawn], [label for _, label in drawn], **COLUMNS)


def fgvc(root: Path) -> dict:
    birds = root / "birds"
    for part, count in {"train": TRAIN * 3 // 4, "val": TRAIN // 4, "test": TEST}.items():
        drawn = pictures(birds / "images" / part, part, count)
        mapping = {p.relative_to(birds / "images").as_posix(): FGVC_IDS[label] for p, label in drawn}
        (birds / f"{part}.json").write_text(json.dumps(mapping))
    local = {"kind": "fgvc", "dir": "birds", "image_dir": "images"}
    return {"transform": "fgvc", "train_split": "trainval", "eval_split": "test", "data": {"local": local}}


def folder(root: Path) -> dict:
    for split, count in {"train": TRAIN, "test": TEST}.items():
        for path, label in pictures(root / "scratch", split, count):
            target = root / "colours" / split / ("red", "green", "blue")[label] / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
    local = {"kind": "folder", "dir": "colours"}
    return {"transform": "vtab", "train_split": "train", "eval_split": "test", "data": {"local": local}}


def parquet(root: Path) -> dict:
    for split, count in {"train": TRAIN, "test": TEST}.items():
        parquet_split(root / "pq" / f"{split}-00000.parquet", root / "scratch", split, count)
    files = {"train": "pq/train-*.parquet", "test": "pq/test-*.parquet"}
    local = {"kind": "parquet", "files": files, **COLUMNS}
    return {"transform": "vtab", "train_split": "train", "eval_split": "test", "data": {"local": local}}


def hub(root: Path) -> dict:
    for split, count in {"train": TRAIN, "test": TEST}.items():
        parquet_split(root / "hubset" / "data" / f"{split}-00000-of-00001.parquet", root / "scratch", split, count)
    splits = {"train800val200": "train", "test": "test"}
    entry = {"kind": "hub", "id": str(root / "hubset"), "config": None, "splits": splits, **COLUMNS}
    return {"transform": "vtab", "train_split": "train800val200", "eval_split": "test", "data": {"hub": entry}}


@pytest.mark.parametrize("layout", [fgvc, folder, parquet, hub], ids=lambda layout: layout.__name__)
def test_train_and_eval_through_the_cli(layout, tmp_path, checkpoint):
    root, run = tmp_path / "data", tmp_path / "run"
    recipe = {"task": f"tiny_{layout.__name__}", "benchmark": "test", "num_classes": 3, **layout(root)}
    yaml_path = tmp_path / "tiny.yaml"
    yaml_path.write_text(yaml.safe_dump(recipe))
    where = ["--data-root", str(root)] if "local" in recipe["data"] else []
    main(["train", "--recipe", str(yaml_path), "--checkpoint", str(checkpoint), "--output-dir", str(run),
          "--no-progress", *TINY_RECIPE, "epochs=1", *where])  # fmt: skip
    results = json.loads((run / "results.json").read_text())
    assert results["train_images"] == TRAIN and results["images"] == TEST and len(results["per_class"]) == 3
    assert results["task"] == recipe["task"] and results["eval_split"] == recipe["eval_split"]

    main(["eval", str(run), "--no-progress", *where])
    evaluated = json.loads((run / f"eval_{recipe['eval_split']}.json").read_text())
    assert evaluated["top1"] == pytest.approx(results["top1"]) and evaluated["per_class"] == results["per_class"]
    assert evaluated["images"] == TEST


def test_a_vtab_recipe_on_its_hub_copy_warns_that_its_numbers_are_not_comparable(tmp_path, checkpoint):
    """The hub stands in for VTAB-1k without --data-root; here a local copy stands in for the hub."""
    recipe = {"task": "tiny_vtab", "benchmark": "vtab1k", "num_classes": 3, **hub(tmp_path / "data")}
    yaml_path = tmp_path / "tiny.yaml"
    yaml_path.write_text(yaml.safe_dump(recipe))
    with pytest.warns(UserWarning, match=r"tiny_vtab: no --data-root.*hub.*not comparable with published VTAB-1k"):
        main(["train", "--recipe", str(yaml_path), "--checkpoint", str(checkpoint), "--output-dir",
              str(tmp_path / "run"), "--no-progress", *TINY_RECIPE, "epochs=1"])  # fmt: skip
    assert json.loads((tmp_path / "run" / "results.json").read_text())["data_source"] == "hub"
