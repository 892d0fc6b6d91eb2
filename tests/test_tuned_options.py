"""Equal tuning: every method's own options chosen on the design tasks' val, and applied by the suite."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml

from adaptor_peft.suite import TUNED, SuiteError, _recipe, tuned_options
from adaptor_peft.training.recipe import list_recipes, recipes_dir

ROOT = Path(__file__).resolve().parents[1]


def ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def suite_recipes(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "recipes"
    shutil.copytree(recipes_dir(), folder)
    monkeypatch.setenv("ADAPTOR_PEFT_RECIPES", str(folder))
    return folder / "offline_vtab" / TUNED


def test_the_study_tunes_only_on_design_tasks():
    assert set(ablation().TASKS) == {"digits", "landcover", "count", "distance"}


def test_the_booster_takes_the_adaptors_chosen_options():
    module = ablation()
    rows = {
        "a": {"method": "adaptor", "options": {"lr_scale": 4.0}, "val": {"x": 80.0}},
        "b": {"method": "adaptor", "options": {"lr_scale": 16.0}, "val": {"x": 81.0}},
        "bar": {"method": "lora", "options": {}, "val": {"x": 99.0}},
    }
    chosen = {"adaptor": {"lr_scale": 16.0}, "adaptor_booster": {"lr_scale": 16.0}}
    assert module.chosen_options(rows, ["x"], "adaptor") == chosen  # LoRA's bar row chooses nothing
    assert module.chosen_options({"bar": rows["bar"]}, ["x"], "lora") == {"lora": {}}


def test_the_tuned_file_spells_out_every_methods_options(tmp_path):
    """A follower shares its leader's options; the file spells them out for each, not as a YAML alias."""
    module = ablation()
    rows = {"a": {"method": "adaptor", "options": {"lr_scale": 16.0}, "val": {"x": 80.0}}}
    path = tmp_path / "_tuned.yaml"
    module.write_tuned(module.chosen_options(rows, ["x"], "adaptor"), "test", path)
    assert "&" not in path.read_text() and "*" not in path.read_text()
    assert yaml.safe_load(path.read_text()) == {"adaptor": {"lr_scale": 16.0}, "adaptor_booster": {"lr_scale": 16.0}}


def test_the_best_row_per_method_is_written_and_other_methods_entries_stay(tmp_path):
    module = ablation()
    rows = {
        "a": {"method": "lora", "options": {"r": 8}, "val": {"x": 80.0, "y": 70.0}},
        "b": {"method": "lora", "options": {"r": 16}, "val": {"x": 90.0, "y": 62.0}},  # mean 76 > 75
        "c": {"method": "lora_p_x", "options": {"r": 4}, "val": {"x": 50.0, "y": 50.0}},
    }
    assert module.best_options(rows, ["x", "y"]) == {"lora": {"r": 16}, "lora_p_x": {"r": 4}}
    path = tmp_path / "_tuned.yaml"
    path.write_text(yaml.safe_dump({"parallel_adapter": {"rank": 8}}))
    module.write_tuned({"lora": {"r": 16}}, "test", path)
    assert yaml.safe_load(path.read_text()) == {"lora": {"r": 16}, "parallel_adapter": {"rank": 8}}
    assert path.read_text().startswith("# Method options chosen")


def test_the_suite_applies_tuned_options_under_the_recipes_own(suite_recipes):
    suite_recipes.write_text(yaml.safe_dump({"lora": {"r": 16, "lr_scale": 4.0}}))
    assert tuned_options() == {"lora": {"r": 16, "lr_scale": 4.0}}
    assert _recipe("count", "lora", [])["method_options"] == {"r": 16, "lr_scale": 4.0}
    assert _recipe("count", "lora", ["method_options.r=2"])["method_options"] == {"r": 2, "lr_scale": 4.0}
    assert _recipe("count", "adaptor", [])["method_options"] == {}
    assert "offline_vtab/_tuned" not in list_recipes()
    suite_recipes.write_text("- not a mapping\n")
    with pytest.raises(SuiteError, match=r"_tuned\.yaml: expected a mapping of method to its options"):
        tuned_options()
