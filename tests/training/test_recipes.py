"""Recipes: every benchmark task against docs/method.md#transfer-protocols, defaults, overrides, errors."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml
from PIL import Image

from adaptor_peft.data import load_split
from adaptor_peft.data.synthetic import TASKS
from adaptor_peft.training import RecipeError, list_recipes, load_recipe, recipes_dir

VTAB = {  # docs/method.md#vtab-1k: task -> (group, classes)
    "caltech101": ("natural", 102),
    "cifar": ("natural", 100),
    "dtd": ("natural", 47),
    "oxford_flowers102": ("natural", 102),
    "oxford_iiit_pet": ("natural", 37),
    "svhn": ("natural", 10),
    "sun397": ("natural", 397),
    "patch_camelyon": ("specialized", 2),
    "eurosat": ("specialized", 10),
    "resisc45": ("specialized", 45),
    "diabetic_retinopathy": ("specialized", 5),
    "clevr_count": ("structured", 8),
    "clevr_dist": ("structured", 6),
    "dmlab": ("structured", 6),
    "kitti": ("structured", 4),
    "dsprites_loc": ("structured", 16),
    "dsprites_ori": ("structured", 16),
    "smallnorb_azi": ("structured", 18),
    "smallnorb_ele": ("structured", 9),
}
FGVC = {"cub": 200, "nabirds": 555, "oxford_flowers": 102, "stanford_dogs": 120, "stanford_cars": 196}


def test_every_benchmark_task_has_a_recipe():
    expected = ["demo/digits"] + [f"fgvc/{name}" for name in FGVC] + [f"vtab1k/{task}" for task in VTAB]
    expected += [f"offline_vtab/{task}" for task in TASKS]
    assert list_recipes() == sorted(expected)


def test_vtab1k_recipes_match_the_design():
    recipes = {task: load_recipe(f"vtab1k/{task}") for task in VTAB}
    assert {task: (r["group"], r["num_classes"]) for task, r in recipes.items()} == VTAB
    assert Counter(r["group"] for r in recipes.values()) == {"natural": 7, "specialized": 4, "structured": 8}
    for task, recipe in recipes.items():
        assert recipe["task"] == task and recipe["benchmark"] == "vtab1k" and recipe["transform"] == "vtab"
        assert (recipe["train_split"], recipe["eval_split"]) == ("train800val200", "test")
        assert recipe["data"]["local"] == {"kind": "vtab1k", "dir": task}
        hub = recipe["data"]["hub"]
        if hub is not None:
            assert hub["kind"] == "hub" and {"train800val200", "test"} <= set(hub["splits"])
            assert hub["subsample"] == {"train800val200": 1000} and hub["image_column"] and hub["label_column"]


def test_fgvc_recipes_follow_the_vpt_protocol():
    for name, classes in FGVC.items():
        recipe = load_recipe(f"fgvc/{name}")
        assert (recipe["task"], recipe["benchmark"], recipe["num_classes"]) == (name, "fgvc", classes)
        assert (recipe["transform"], recipe["train_split"], recipe["eval_split"]) == ("fgvc", "trainval", "test")
        assert recipe["data"]["local"]["kind"] == "fgvc" and recipe["data"]["local"]["image_dir"]
        hub = recipe["data"]["hub"]
        assert hub is None or {"trainval", "test"} <= set(hub["splits"])


def test_defaults_are_merged_under_the_task():
    recipe = load_recipe("vtab1k/cifar")
    defaults = yaml.safe_load((recipes_dir() / "defaults.yaml").read_text())
    assert {key: recipe[key] for key in defaults} == defaults
    assert recipe["lr"] == 1e-3 and recipe["epochs"] == 100 and recipe["method_options"] == {}
    assert yaml.safe_load(yaml.safe_dump(recipe)) == recipe  # plain data, ready for the run folder


def test_overrides_parse_yaml_scalars_and_reach_nested_keys():
    overrides = ["epochs=5", "lr=5e-4", "skip_bad_images=true", "img_size=384", "clip_grad_norm=1", "seed=0"]
    overrides += ["data.local.dir=cifar100", "method_options.t_rank=8", "weight_decay=0"]
    recipe = load_recipe("vtab1k/cifar", overrides)
    assert (recipe["epochs"], recipe["lr"], recipe["skip_bad_images"], recipe["img_size"]) == (5, 5e-4, True, 384)
    assert recipe["weight_decay"] == 0.0 and isinstance(recipe["weight_decay"], float)
    assert recipe["data"]["local"] == {"kind": "vtab1k", "dir": "cifar100"}
    assert recipe["method_options"] == {"t_rank": 8} and recipe["data"]["hub"]["id"] == "uoft-cs/cifar100"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epoch=5", r"unknown key 'epoch' for recipe .*cifar\.yaml \(did you mean 'epochs'"),
        ("data.local.dri=x", r"unknown key 'data\.local\.dri'.*did you mean 'data\.local\.dir'"),
        ("data.hub.id.x=1", r"unknown key 'data\.hub\.id\.x'"),
        ("epochs=abc", r"epochs must be int like 100, got 'abc' \(from override 'epochs=abc'\)"),
        ("epochs=2.5", r"epochs must be int"),
        ("lr=fast", r"lr must be float like 0\.001, got 'fast'"),
        ("skip_bad_images=3", r"skip_bad_images must be bool"),
        ("method_options=fast", r"method_options must be a mapping"),
        ("epochs", r"not of the form key=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("vtab1k/cifar", [override])


def test_recipe_files_are_checked_too(tmp_path):
    base = yaml.safe_load((recipes_dir() / "vtab1k" / "dtd.yaml").read_text())
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({**base, "epochz": 3}))
    with pytest.raises(RecipeError, match=r"unknown key 'epochz' in .*mine\.yaml \(did you mean 'epochs'"):
        load_recipe(str(path))
    path.write_text(yaml.safe_dump({**base, "epochs": "ten"}))
    with pytest.raises(RecipeError, match=rf"epochs must be int like 100, got 'ten' \(from {path}\)"):
        load_recipe(str(path))
    path.write_text(yaml.safe_dump({**base, "lr": "3e-4"}))  # YAML 1.1 reads 3e-4 as a string
    assert load_recipe(str(path))["lr"] == 3e-4
    path.write_text(yaml.safe_dump({key: value for key, value in base.items() if key != "num_classes"}))
    with pytest.raises(RecipeError, match=r"does not set \['num_classes'\]"):
        load_recipe(str(path))
    path.write_text("- a list\n")
    with pytest.raises(RecipeError, match="must hold a mapping"):
        load_recipe(str(path))


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(RecipeError, match=r"unknown recipe 'vtab1k/cifar10' \(did you mean 'vtab1k/cifar'.*fgvc/cub"):
        load_recipe("vtab1k/cifar10")
    with pytest.raises(RecipeError, match="unknown recipe 'defaults'"):
        load_recipe("defaults")
    with pytest.raises(RecipeError, match=r"recipe file .*nothing\.yaml not found"):
        load_recipe("nothing.yaml")


def test_recipes_folder_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "toy").mkdir()
    (tmp_path / "defaults.yaml").write_text("epochs: 3\nlr: 0.1\n")
    task = {"task": "toy", "num_classes": 2, "transform": "vtab", "train_split": "a", "eval_split": "b"}
    (tmp_path / "toy" / "one.yaml").write_text(yaml.safe_dump({**task, "data": {"local": None}}))
    monkeypatch.setenv("ADAPTOR_PEFT_RECIPES", str(tmp_path))
    assert list_recipes() == ["toy/one"] and load_recipe("toy/one", ["lr=1"])["lr"] == 1.0


def test_a_recipe_local_entry_feeds_load_split(tmp_path):
    recipe = load_recipe("vtab1k/eurosat")
    folder = tmp_path / recipe["data"]["local"]["dir"]
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "images" / "a.png")
    (folder / f"{recipe['train_split']}.txt").write_text("images/a.png 9\n")
    split = load_split(recipe["data"]["local"], recipe["train_split"], root=tmp_path)
    split.check_labels(recipe["num_classes"])
    assert split.labels == [9]
