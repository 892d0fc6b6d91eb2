"""Run folders (adaptor_peft.training.runs): what a folder records, what counts as the same recipe, which
checkpoints count, and that nothing of another recipe is resumed, read back or overwritten."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adaptor_peft.cli import main
from adaptor_peft.training import TrainingError, build_model, train
from adaptor_peft.training.loop import train_once
from adaptor_peft.training.runs import (
    COMPLETE,
    append_log,
    as_recorded,
    checkpoints,
    same_recipe,
    training_minutes,
)
from tests.support.training import TINY_RECIPE, interrupt, tiny_recipe, vtab_task


def test_only_complete_checkpoints_count_oldest_first(tmp_path):
    for epoch, complete in [(10, True), (2, True), (3, False), (9, True)]:
        folder = tmp_path / "checkpoints" / f"epoch_{epoch:03d}"
        folder.mkdir(parents=True)
        if complete:
            (folder / COMPLETE).write_text(f"{epoch}\n")
    assert [p.name for p in checkpoints(tmp_path)] == ["epoch_002", "epoch_009", "epoch_010"]  # by number
    assert checkpoints(tmp_path / "elsewhere") == []


def test_training_minutes_count_the_last_line_of_each_epoch_once(tmp_path):
    for epoch, seconds in [(1, 60), (2, 30)]:
        append_log(tmp_path, {"epoch": epoch, "train_seconds": seconds})
    with (tmp_path / "log.jsonl").open("a") as log:
        log.write('{"epoch": 3, "tra')  # a crash while writing a line
    for epoch, seconds in [(2, 40), (3, 20)]:  # resumed after epoch 1's checkpoint: epoch 2's never completed
        append_log(tmp_path, {"epoch": epoch, "train_seconds": seconds})
    assert training_minutes(tmp_path, 3) == 2.0  # epoch 2 trained again after a crash: its last line counts
    assert training_minutes(tmp_path, 4) is None  # an epoch without a line
    with (tmp_path / "log.jsonl").open("a") as log:
        log.write(json.dumps({"epoch": 1, "train_loss": 0.5}) + "\n")  # logged before lines held the time
    assert training_minutes(tmp_path, 3) is None
    assert training_minutes(tmp_path / "elsewhere", 1) is None


def test_a_recipe_is_recorded_with_its_checkpoint_file_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = {"checkpoint": "weights/w.pth", "lr": 0.1}
    assert as_recorded(recipe) == {"checkpoint": str(tmp_path / "weights" / "w.pth"), "lr": 0.1}
    for kept in (None, "pretrained", "https://example.org/w.pth"):
        assert as_recorded({"checkpoint": kept}) == {"checkpoint": kept}
    assert same_recipe(tmp_path / "no-run", recipe) is False  # nothing recorded: not the same


def test_a_run_folder_refuses_another_recipe(tmp_path, recipes, checkpoint):
    data = vtab_task(tmp_path / "vtab-1k")
    train(tiny_recipe(checkpoint, "epochs=1"), tmp_path / "run", data, progress=False)
    with pytest.raises(TrainingError, match=r"another recipe \(differs in \['lr'\]\)"):
        train(tiny_recipe(checkpoint, "epochs=1", "lr=0.5"), tmp_path / "run", data, progress=False)


def test_a_finished_run_is_not_read_back_once_a_method_default_changed(tmp_path, recipes, checkpoint):
    data = vtab_task(tmp_path / "vtab-1k")
    recipe = tiny_recipe(checkpoint, "epochs=1", "method=adaptor")
    first = train(recipe, tmp_path / "run", data, progress=False)
    record = json.loads((tmp_path / "run" / "resolved.json").read_text())
    settings = record["method"]
    assert settings["method"] == "adaptor" and settings["adaptor.lr_scale"] == 16.0 and settings["adaptor.t_rank"] == 4
    assert train_once(recipe, tmp_path / "run") == (first, None)  # read back
    before_field = {k: v for k, v in settings.items() if k != "adaptor.s_position"}  # made before it existed
    (tmp_path / "run" / "resolved.json").write_text(json.dumps({**record, "method": before_field}))
    assert train_once(recipe, tmp_path / "run") == (first, None)  # its default keeps the run's

    older = {**record, "method": {**settings, "adaptor.lr_scale": 1.0}}  # made under an older default
    (tmp_path / "run" / "resolved.json").write_text(json.dumps(older))
    with pytest.raises(TrainingError, match=r"other settings of method 'adaptor'.*adaptor.lr_scale: run 1.0, now 16.0"):
        train_once(recipe, tmp_path / "run")
    with pytest.raises(TrainingError, match=r"adaptor\.lr_scale: run 1\.0, now 16\.0"):
        train(recipe, tmp_path / "run", data, progress=False)  # nor resumed or overwritten

    (tmp_path / "run" / "resolved.json").unlink()  # a run from before the record: its recipe is all there is
    with pytest.raises(TrainingError, match=r"code version unrecorded"):  # and its code is unknown
        train_once(recipe, tmp_path / "run")
    assert train_once(recipe, tmp_path / "run", allow_other_version=True)[0]["top1"] == first["top1"]
    (tmp_path / "run" / "resolved.json").write_text("[1, 2]")
    with pytest.raises(TrainingError, match=r"resolved\.json is damaged"):
        train_once(recipe, tmp_path / "run")


def test_a_run_is_not_resumed_on_other_backbone_weights(tmp_path, recipes, checkpoint):
    data = vtab_task(tmp_path / "vtab-1k")
    weights = tmp_path / "backbone.pth"
    shutil.copy(checkpoint, weights)
    recipe = tiny_recipe(weights, "epochs=2", "method=lora")
    with pytest.raises(KeyboardInterrupt):
        train(recipe, tmp_path / "run", data, progress=False, after_epoch=interrupt)
    state = torch.load(weights)["model"]
    first = next(k for k in state if k.endswith("in_proj.weight"))
    torch.save({"model": {**state, first: state[first] + 0.01}}, weights)  # the file replaced mid-run
    with pytest.raises(TrainingError, match="started from other backbone weights"):
        train(recipe, tmp_path / "run", data, progress=False)
    shutil.copy(checkpoint, weights)  # the weights it started from: it resumes
    assert train(recipe, tmp_path / "run", data, progress=False)["epochs"] == 2


@pytest.mark.parametrize("damage", [b"a: [unclosed", b"\xff\xfe", b"- just\n- a list\n"])
def test_a_damaged_run_config_is_named_not_a_traceback(tmp_path, recipes, checkpoint, damage):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(damage)
    with pytest.raises(
        TrainingError, match=rf"{re.escape(str(run / 'config.yaml'))} is damaged, not a readable recipe"
    ):
        train(tiny_recipe(checkpoint, "epochs=1"), run, vtab_task(tmp_path / "vtab-1k"), progress=False)
    assert (run / "config.yaml").read_bytes() == damage  # left as it was


@pytest.mark.parametrize(
    "name, damage, what",
    [("config.yaml", b"a: [unclosed", "recipe"), ("config.yaml", b"- a list\n", "recipe"),
     ("results.json", b"{not json", "results")],
)  # fmt: skip
def test_evaluating_a_damaged_run_names_the_file_and_changes_nothing(tmp_path, name, damage, what):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("task: cifar\n")
    (run / name).write_bytes(damage)
    message = rf"TrainingError: {re.escape(str(run / name))} is damaged, not a readable {what} .*move the run folder"
    with pytest.raises(SystemExit, match=message):
        main(["eval", str(run), "--no-progress"])
    assert (run / name).read_bytes() == damage


def test_evaluating_a_run_whose_recipe_lacks_keys_names_them_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("task: cifar\nseed: 3\n")
    message = rf"TrainingError: {re.escape(str(run / 'config.yaml'))} lacks .*'model'.*'method'.*'checkpoint'"
    with pytest.raises(SystemExit, match=message):
        main(["eval", str(run), "--no-progress"])
    assert (run / "config.yaml").read_text() == "task: cifar\nseed: 3\n"


def test_a_folder_where_no_epoch_finished_takes_a_corrected_recipe(tmp_path, recipes, checkpoint):
    data = vtab_task(tmp_path / "vtab-1k")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_recipe(checkpoint, "epochs=1", "lr=0.5")))  # crashed early
    train(tiny_recipe(checkpoint, "epochs=1"), run, data, progress=False)
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 1e-3
    assert json.loads((run / "results.json").read_text())["data_source"] == "local"


def test_epoch_checkpoints_hold_what_training_changes_not_the_frozen_backbone(tmp_path, recipes, checkpoint):
    data = vtab_task(tmp_path / "vtab-1k")
    saved = {}
    for method in ("adaptor", "full"):
        recipe = tiny_recipe(checkpoint, "epochs=2", f"method={method}")
        with pytest.raises(KeyboardInterrupt):
            train(recipe, tmp_path / method, data, progress=False, after_epoch=interrupt)
        epoch = tmp_path / method / "checkpoints" / "epoch_001"
        assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= {
            p.name for p in epoch.iterdir()
        }
        with safe_open(epoch / "model.safetensors", "pt") as weights:
            saved[method] = set(weights.keys())
        model = build_model(recipe)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert saved[method] == trainable, method
    assert "layers.0.mixer.in_proj.weight" in saved["full"] and "patch_embed.proj.weight" in saved["full"]
    assert all(".adaptor_" in name or name.startswith("head.") for name in saved["adaptor"])

    weights = tmp_path / "adaptor" / "checkpoints" / "epoch_001" / "model.safetensors"
    state = load_file(weights)
    state["layers.0.mixer.surprise"] = state.pop("head.bias")  # a checkpoint that does not fit the model
    save_file(state, weights)
    with pytest.raises(TrainingError, match=r"epoch_001/model\.safetensors.*surprise.*head\.bias"):
        train(tiny_recipe(checkpoint, "epochs=2"), tmp_path / "adaptor", data, progress=False)


def test_a_run_records_its_checkpoint_as_an_absolute_path_and_evaluates_anywhere(
    tmp_path, recipes, checkpoint, monkeypatch, capsys
):
    data, work = vtab_task(tmp_path / "vtab-1k"), tmp_path / "work"
    (work / "weights").mkdir(parents=True)
    shutil.copy(checkpoint, work / "weights" / "tiny.pth")
    monkeypatch.chdir(work)
    command = ["vtab", "--tasks", "cifar", "--checkpoint", "weights/tiny.pth", "--data-root", str(data),
               "--output-dir", "runs", "--no-progress", *TINY_RECIPE, "epochs=1"]  # fmt: skip
    main(command)
    run = work / "runs" / "cifar"
    recorded = Path(yaml.safe_load((run / "config.yaml").read_text())["checkpoint"])
    assert recorded.is_absolute() and recorded.resolve() == (work / "weights" / "tiny.pth").resolve()
    main(command)  # the same relative path from the same folder: the same recipe
    assert "cifar: finished before, skipped" in capsys.readouterr().out
    recorded_config = (run / "config.yaml").read_text()
    config = yaml.safe_load(recorded_config)
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "checkpoint": "weights/tiny.pth"}))  # older runs
    main(command)
    assert "cifar: finished before, skipped" in capsys.readouterr().out
    (run / "config.yaml").write_text(recorded_config)
    trained = json.loads((run / "results.json").read_text())

    monkeypatch.chdir(tmp_path)
    main(["eval", str(run), "--data-root", str(data), "--no-progress"])
    assert json.loads((run / "eval_test.json").read_text())["top1"] == pytest.approx(trained["top1"])
    (work / "weights" / "tiny.pth").rename(tmp_path / "moved.pth")
    with pytest.raises(SystemExit, match=r"tiny\.pth.*not a file.*--checkpoint"):
        main(["eval", str(run), "--data-root", str(data), "--no-progress"])
    main(["eval", str(run), "--data-root", str(data), "--no-progress", "--checkpoint", "moved.pth"])
    evaluated = json.loads((run / "eval_test.json").read_text())
    assert evaluated["top1"] == pytest.approx(trained["top1"]) and evaluated["per_class"] == trained["per_class"]
    assert Path(evaluated["checkpoint"]).resolve() == (tmp_path / "moved.pth").resolve()
