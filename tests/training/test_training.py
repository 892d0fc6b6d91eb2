"""The training loop, its CLI (train / eval / vtab / summarize), resume, DDP and metrics, on tiny data sets
in the benchmark layouts that the tests write themselves."""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from adaptor_peft import create_model
from adaptor_peft.cli import main
from adaptor_peft.training import ClassificationMetrics, TrainingError, load_recipe, train
from adaptor_peft.training import loop as training_loop
from adaptor_peft.training.loop import train_once
from adaptor_peft.training.optim import build_optimizer, build_scheduler, decays, param_groups
from tests.support.training import TINY_RECIPE, interrupt, tiny_recipe, vtab_task


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_train_eval_summarize_through_the_cli(tmp_path, recipes, checkpoint, capsys):
    data, run = vtab_task(tmp_path / "vtab-1k"), tmp_path / "runs" / "cifar"
    main(["train", "--recipe", "vtab1k/cifar", "--checkpoint", str(checkpoint), "--method", "adaptor",
          "--data-root", str(data), "--output-dir", str(run), "--no-progress", *TINY_RECIPE, "lr=5e-3"])  # fmt: skip
    assert "top-1" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["lr"] == 5e-3 and config["method"] == "adaptor" and config["checkpoint"] == str(checkpoint)
    assert [r["epoch"] for r in logged(run)] == [1, 2] and results["epochs"] == 2
    assert results["images"] == 12 and results["train_images"] == 32 and len(results["per_class"]) == 3
    assert results["parameters"]["method"] == "adaptor" and results["parameters"]["trainable_without_head"] > 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_001", "epoch_002"]
    assert (run / "adapter" / "adaptor.safetensors").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # tensorboard is in the dev extras

    main(["eval", str(run), "--data-root", str(data), "--no-progress"])
    evaluated = json.loads((run / "eval_test.json").read_text())
    assert evaluated["top1"] == pytest.approx(results["top1"]) and evaluated["per_class"] == results["per_class"]

    main(["summarize", str(tmp_path / "runs")])
    table = capsys.readouterr().out
    assert "| cifar |" in table and "mean of 19 tasks" in table and "mean of 3 group means" in table
    assert {p.name for p in (tmp_path / "runs").glob("summary.*")} == {"summary.md", "summary.json", "summary.png"}


@pytest.mark.parametrize("method", ["adaptor", "full"])  # a checkpoint without / with the backbone
def test_resume_after_a_kill_gives_the_uninterrupted_run(tmp_path, recipes, checkpoint, method):
    data = vtab_task(tmp_path / "vtab-1k")
    # random crops, flips and drop path; an evaluation after every epoch
    recipe = tiny_recipe(checkpoint, "epochs=3", "transform=fgvc", "drop_path=0.2", f"method={method}", "eval_every=1")
    whole = train(recipe, tmp_path / "whole", data, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, tmp_path / "resumed", data, progress=False, after_epoch=interrupt)
    assert [r["epoch"] for r in logged(tmp_path / "resumed")] == [1]
    resumed = train(recipe, tmp_path / "resumed", data, progress=False)
    strip = [{k: v for k, v in r.items() if k != "train_seconds"} for r in logged(tmp_path / "whole")]
    assert [{k: v for k, v in r.items() if k != "train_seconds"} for r in logged(tmp_path / "resumed")] == strip
    assert resumed["top1"] == whole["top1"] and resumed["per_class"] == whole["per_class"]


def test_minutes_are_the_training_time_of_every_session_of_a_run(tmp_path, recipes, checkpoint, monkeypatch):
    """results.json's minutes: the epochs' training steps summed over every session that trained them, without
    set-up or evaluation (slow here), so that methods compare by what training them costs."""
    data, run = vtab_task(tmp_path / "vtab-1k"), tmp_path / "run"
    recipe = tiny_recipe(checkpoint, "epochs=2")
    with pytest.raises(KeyboardInterrupt):
        train(recipe, run, data, progress=False, after_epoch=interrupt)
    evaluate = training_loop.evaluate

    def slow(*args):
        time.sleep(2)
        return evaluate(*args)

    monkeypatch.setattr(training_loop, "evaluate", slow)
    started = time.perf_counter()
    results, minutes = training_loop.train_once(recipe, run, data)
    wall = time.perf_counter() - started
    epochs = logged(run)
    assert [r["epoch"] for r in epochs] == [1, 2] and all(r["train_seconds"] > 0 for r in epochs)
    assert epochs[1]["train_seconds"] < wall - 2  # the second session's epoch, without its evaluation
    assert minutes == results["minutes"] == round(sum(r["train_seconds"] for r in epochs) / 60, 3)
    assert json.loads((run / "results.json").read_text())["minutes"] == minutes


def test_nan_loss_stops_with_the_last_good_checkpoint_kept(tmp_path, recipes, checkpoint, monkeypatch):
    data = vtab_task(tmp_path / "vtab-1k")
    calls = {"n": 0}
    cross_entropy = training_loop.F.cross_entropy

    def poisoned(*args, **kwargs):  # the loss of the 6th batch (2nd epoch) is NaN
        calls["n"] += 1
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(training_loop.F, "cross_entropy", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan in epoch 2, batch 2.*epoch_001"):
        train(tiny_recipe(checkpoint), tmp_path / "run", data, progress=False)
    assert (tmp_path / "run" / "checkpoints" / "epoch_001" / "complete").is_file()
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_recorded_divergence_finishes_the_run_as_a_failed_setting(tmp_path, recipes, checkpoint, monkeypatch):
    data = vtab_task(tmp_path / "vtab-1k")
    cross_entropy = training_loop.F.cross_entropy
    monkeypatch.setattr(training_loop.F, "cross_entropy", lambda *a, **k: cross_entropy(*a, **k) * float("nan"))
    recipe = tiny_recipe(checkpoint, "record_divergence=true", "lr=0.25")
    results = train(recipe, tmp_path / "run", data, progress=False)
    assert results["diverged"] == {"epoch": 1, "batch": 1, "lr": 0.25, "seed": recipe["seed"]}
    assert results["top1"] == results["top5"] == 0.0 and results["per_class"] == [0.0] * recipe["num_classes"]
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    assert not (tmp_path / "run" / "adapter").exists()  # non-finite weights are not kept
    assert train_once(recipe, tmp_path / "run") == (results, None)  # finished: read back, not trained again


def test_bad_labels_bad_images_and_bad_keys_get_clear_errors(tmp_path, recipes, checkpoint):
    data = vtab_task(tmp_path / "vtab-1k")
    run = ["--data-root", str(data), "--no-progress", *TINY_RECIPE, f"checkpoint={checkpoint}", "epochs=1"]
    with pytest.raises(SystemExit, match=r"unknown key 'epochz'.*did you mean 'epochs'"):
        main(["train", "--recipe", "vtab1k/cifar", "--output-dir", str(tmp_path / "a"), *run, "epochz=3"])

    lists = data / "cifar" / "train800val200.txt"
    lines = lists.read_text().splitlines()
    lists.write_text("\n".join([*lines[:-1], lines[-1].rsplit(" ", 1)[0] + " 7"]) + "\n")
    with pytest.raises(SystemExit, match=r"DataError: .*label 7.*3"):
        main(["train", "--recipe", "vtab1k/cifar", "--output-dir", str(tmp_path / "b"), *run])

    lists.write_text("\n".join(lines) + "\n")
    (data / "cifar" / "images" / "train800_3.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"train800_3\.png"):
        main(["train", "--recipe", "vtab1k/cifar", "--output-dir", str(tmp_path / "c"), *run])
    main(["train", "--recipe", "vtab1k/cifar", "--output-dir", str(tmp_path / "d"), *run, "skip_bad_images=true"])
    results = json.loads((tmp_path / "d" / "results.json").read_text())
    assert results["train_images"] == 31 and len(results["skipped_images"]["train"]) == 1


def test_vtab_runs_tasks_in_a_row_and_skips_finished_ones(tmp_path, recipes, checkpoint, capsys):
    data = vtab_task(vtab_task(tmp_path / "vtab-1k", "cifar"), "dtd")
    command = ["vtab", "--tasks", "cifar,dtd", "--checkpoint", str(checkpoint), "--data-root", str(data),
               "--output-dir", str(tmp_path / "runs"), "--no-progress", *TINY_RECIPE, "epochs=1"]  # fmt: skip
    main(command)
    assert {p.parent.name for p in (tmp_path / "runs").glob("*/results.json")} == {"cifar", "dtd"}
    capsys.readouterr()
    main(command)
    assert "cifar: finished before, skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown task"):
        main([*command[:2], "cifar,imagenet", *command[3:]])


def test_two_processes_agree_with_one(tmp_path, recipes, checkpoint):
    """DDP on two CPU processes (gloo) through accelerate launch: the same losses and metrics as one process
    (32 training images split 4 + 4 per batch of 8, so no batch is padded)."""
    data = vtab_task(tmp_path / "vtab-1k")
    args = ["train", "--recipe", "vtab1k/cifar", "--checkpoint", str(checkpoint), "--data-root", str(data),
            "--no-progress", *TINY_RECIPE, "eval_every=1"]  # fmt: skip
    main([*args, "--output-dir", str(tmp_path / "one")])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    launch += ["-m", "adaptor_peft.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, *args, "--output-dir", str(tmp_path / "two")], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("one", "two"))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["images"] == one["images"] == 12
    for a, b in zip(logged(tmp_path / "one"), logged(tmp_path / "two"), strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["eval_top1"] == pytest.approx(a["eval_top1"])
    assert two["per_class"] == pytest.approx(one["per_class"])


def test_metrics_are_micro_top1_top5_and_per_class():
    metrics = ClassificationMetrics(6)
    logits = torch.eye(6)[[0, 0, 0, 0, 1, 2, 3, 4]] * 5 + torch.arange(6) * 0.1  # predicted classes
    labels = torch.tensor([0, 0, 0, 0, 1, 5, 5, 5])  # class 0 dominates: micro 5/8, macro over present classes 2/3
    metrics.update(logits[:5], labels[:5])
    metrics.update(logits[5:], labels[5:])
    result = metrics.compute()
    assert result["top1"] == pytest.approx(100 * 5 / 8)
    ranks = (logits > logits.gather(1, labels[:, None])).sum(1)
    assert result["top5"] == pytest.approx(100 * (ranks < 5).float().mean().item())
    assert result["per_class"][0] == 100 and result["per_class"][5] == 0 and result["images"] == 8


@pytest.mark.parametrize(
    ("name", "exempt"),
    [
        ("vim_tiny_patch16_224", {"pos_embed", "cls_token", "layers.1.mixer.A_log", "layers.0.mixer.A_b_log"}),
        ("vmamba_tiny_s1l8", {"layers.0.blocks.0.op.A_logs"}),
    ],
)
def test_backbones_exempt_their_embeddings_and_A_from_weight_decay(name, exempt):
    model = create_model(
        name, num_classes=3, **({"depth": 2} if name.startswith("vim") else {"dims": 16, "depths": (1, 1, 1, 1)})
    )
    assert exempt <= model.no_weight_decay()
    assert not any(".in_proj." in n or ".x_proj" in n for n in model.no_weight_decay())
    model.requires_grad_(True)
    groups = build_optimizer(model, "adamw", 1.0, 0.1).param_groups
    named = {id(p): n for n, p in model.named_parameters()}
    undecayed = {named[id(p)] for group in groups if group["weight_decay"] == 0 for p in group["params"]}
    assert exempt <= undecayed and "layers.0.mixer.in_proj.weight" not in undecayed


def test_weight_decay_groups_and_warmup_cosine_schedule():
    model = create_model("vim_tiny_patch16_224", depth=2, num_classes=3)
    from adaptor_peft.adaptors import prepare_model

    prepare_model(model, "adaptor", lr_scale=1.0)  # one learning rate: two groups, by weight decay
    named = dict(model.named_parameters())
    assert decays("layers.0.mixer.adaptor_t.down", named["layers.0.mixer.adaptor_t.down"])
    for name in ("layers.0.mixer.adaptor_t.gamma", "layers.0.mixer.adaptor_t.anchor", "head.bias",
                 "layers.0.mixer.adaptor_s.scale"):  # fmt: skip
        assert not decays(name, named[name]), name
    optimizer = build_optimizer(model, "adamw", 1.0, 0.1)
    decayed, plain = optimizer.param_groups
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in decayed["params"] + plain["params"]} == trainable
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    scheduler = build_scheduler(optimizer, "cosine", warmup_steps=4, total_steps=12, min_lr_ratio=0.01)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[8] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 8)).item()))
    assert all(a >= b for a, b in itertools.pairwise(rates[3:])) and rates[-1] > 0.01
    with pytest.raises(ValueError, match="optimizer 'lamb'"):
        build_optimizer(model, "lamb", 1.0, 0.1)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_fused_optimizer_takes_the_steps_of_pytorchs_loop(name):
    """build_optimizer runs PyTorch's fused update; it must move every parameter group as the reference
    for-loop implementation does, weight decay and per-group rates included."""
    from adaptor_peft.adaptors import prepare_model

    torch.manual_seed(0)
    model = prepare_model(create_model("vim_tiny_patch16_224", depth=2, num_classes=3), "adaptor").double()
    twin = copy.deepcopy(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fused = build_optimizer(model, name, 0.01, 0.1)
    assert fused.defaults["fused"] and len(fused.param_groups) > 2
    loop = type(fused)(param_groups(twin, 0.01, 0.1), lr=0.01, foreach=False, fused=False,
                       **({"momentum": 0.9} if name == "sgd" else {}))  # fmt: skip
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    for _ in range(3):
        for net, optimizer in ((model, fused), (twin, loop)):
            optimizer.zero_grad()
            net(images).square().mean().backward()
            optimizer.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=n)
    assert all(not torch.equal(p, initial[n]) for n, p in model.named_parameters() if n in initial)


def test_lr_scale_multiplies_the_rate_of_the_adaptors_zero_initialised_parameters_only():
    from adaptor_peft.adaptors import prepare_model

    model = prepare_model(create_model("vim_tiny_patch16_224", depth=2, num_classes=3), "adaptor", lr_scale=8.0)
    named = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, "adamw", 0.5, 0.1)
    rate = {named[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    mine = torch.optim.SGD(param_groups(model, 0.5, 0.1))  # the same groups for an optimizer of one's own
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in mine.param_groups] == [
        (g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups
    ]
    zero = ("gamma", "weight_up", "weight_bias", "offset_up", "adaptor_s.scale")
    assert rate and all(r == (4.0 if n.endswith(zero) else 0.5) for n, r in rate.items()), rate
    assert {n for n, r in rate.items() if r == 4.0} == {
        n for n, p in model.named_parameters() if p.requires_grad and ".adaptor_" in n and not p.any()
    }  # exactly the adaptor parameters that start at zero
    decay = {named[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay["layers.0.mixer.adaptor_t.weight_up"] == 0.1 and decay["layers.0.mixer.adaptor_t.gamma"] == 0
    scheduler = build_scheduler(optimizer, "cosine", warmup_steps=2, total_steps=4, min_lr_ratio=0.01)
    optimizer.step()
    scheduler.step()
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [0.5, 4.0]  # end of warm-up: both at peak
    with pytest.raises(ValueError, match="lr_scale"):
        prepare_model(create_model("vim_tiny_patch16_224", depth=2, num_classes=3), "adaptor", lr_scale=0.0)


def test_recipes_refuse_impossible_numbers_and_frozen_random_backbones(tmp_path, recipes, checkpoint):
    from adaptor_peft.training import RecipeError

    for override, message in [("epochs=0", "epochs=0"), ("eval_every=-1", "eval_every=-1"), ("lr=0", "lr=0.0")]:
        with pytest.raises(RecipeError, match=message):
            tiny_recipe(checkpoint, override)
    data = vtab_task(tmp_path / "vtab-1k")
    with pytest.raises(RecipeError, match="freezes the backbone"):
        train(load_recipe("vtab1k/cifar", [*TINY_RECIPE, "epochs=1"]), tmp_path / "random", data, progress=False)
    assert not (tmp_path / "random").exists()


def test_named_options_are_taken_literally_and_given_once(tmp_path, recipes, checkpoint):
    odd = tmp_path / "run #3" / "weights: v1.pth"  # YAML would cut this at '#' or read a mapping
    odd.parent.mkdir()
    shutil.copy(checkpoint, odd)
    data = vtab_task(tmp_path / "vtab-1k")
    args = ["train", "--recipe", "vtab1k/cifar", "--data-root", str(data), "--no-progress"]
    main([*args, "--checkpoint", str(odd), "--output-dir", str(tmp_path / "a"), *TINY_RECIPE, "epochs=1"])
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["checkpoint"] == str(odd)
    with pytest.raises(SystemExit, match="both as --method and as method="):
        main([*args, "--method", "lora", "--output-dir", str(tmp_path / "b"), *TINY_RECIPE, "method=bias"])


def test_vtab_does_not_take_a_finished_run_of_another_recipe_for_this_one(tmp_path, recipes, checkpoint, capsys):
    data = vtab_task(tmp_path / "vtab-1k", "cifar")
    command = ["vtab", "--tasks", "cifar", "--checkpoint", str(checkpoint), "--data-root", str(data),
               "--output-dir", str(tmp_path / "runs"), "--no-progress", *TINY_RECIPE, "epochs=1"]  # fmt: skip
    main(command)
    with pytest.raises(SystemExit, match="1 task"):
        main([*command, "--method", "lora"])
    assert "holds a run of another recipe" in capsys.readouterr().out


def test_metrics_match_a_count_over_all_images_whatever_the_batches():
    generator = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    logits, labels = torch.randn(50, 7, generator=generator), torch.randint(7, (50,), generator=generator)
    metrics = ClassificationMetrics(7)
    for cut in torch.tensor_split(torch.arange(50), [3, 4, 20, 41]):
        metrics.update(logits[cut], labels[cut])
    result = metrics.compute()
    ranks = [(row > row[label]).sum().item() for row, label in zip(logits, labels, strict=True)]
    assert result["top1"] == pytest.approx(100 * sum(r == 0 for r in ranks) / 50)
    assert result["top5"] == pytest.approx(100 * sum(r < 5 for r in ranks) / 50)
    for c in range(7):
        mine = [r for r, label in zip(ranks, labels.tolist(), strict=True) if label == c]
        expected = round(100 * sum(r == 0 for r in mine) / len(mine), 4) if mine else None
        assert result["per_class"][c] == expected


def test_metrics_name_the_bad_shape_or_label():
    with pytest.raises(ValueError, match=r"logits must be \(images=2, classes=3\), got \(2, 4\)"):
        ClassificationMetrics(3).update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got 0..3"):
        ClassificationMetrics(3).update(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_per_class_accuracy_is_none_for_absent_classes_and_empty_evaluations_fail():
    metrics = ClassificationMetrics(3)
    metrics.update(torch.eye(3)[[0, 1]], torch.tensor([0, 1]))
    assert metrics.compute()["per_class"] == [100.0, 100.0, None]
    with pytest.raises(ValueError, match="empty"):
        ClassificationMetrics(3).compute()


def test_benchmark_recipes_read_the_test_split_once_after_the_last_epoch(tmp_path, recipes, checkpoint):
    """VTAB-1k's protocol (and the default): evaluate after the last epoch only; eval_every=N adds every N-th."""
    assert {load_recipe(name)["eval_every"] for name in ("vtab1k/svhn", "fgvc/cub", "demo/digits")} == {0}
    data = vtab_task(tmp_path / "vtab-1k")
    train(tiny_recipe(checkpoint, "epochs=3"), tmp_path / "end", data, progress=False)
    assert ["eval_top1" in r for r in logged(tmp_path / "end")] == [False, False, True]
    train(tiny_recipe(checkpoint, "epochs=3", "eval_every=2"), tmp_path / "every2", data, progress=False)
    assert ["eval_top1" in r for r in logged(tmp_path / "every2")] == [False, True, True]
