"""The training loop: a resolved recipe in, a run folder out (:mod:`.runs` says what the folder holds).

Starting a run in a folder that holds the same recipe resumes it after its last complete checkpoint, with
the same data order, augmentation and dropout draws as an uninterrupted run: the sampler is seeded per epoch
and accelerate restores every random state.

The loop reads top to bottom in the style of accelerate's examples: prepare, loop, ``accumulate``,
``backward``, ``gather_for_metrics``, ``save_state``. What it builds comes from :mod:`.build`, what it
keeps from :mod:`.runs`, so this module is only the order of the steps.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from rich.progress import BarColumn, Progress, TextColumn
from torch import nn
from torch.utils.data import DataLoader

from ..adaptors import load_adaptor
from ..adaptors.methods import get_method
from ..atomic import write_atomically
from ..hub import save_adaptor
from ..reports import parameter_report
from .build import build_accelerator, build_backbone, build_model, build_split, data_source
from .metrics import ClassificationMetrics
from .optim import build_optimizer, build_scheduler
from .progress import Report, Update, quiet, reporting
from .recipe import RecipeError
from .runs import (
    ADAPTER,
    CONFIG,
    RESULTS,
    TrainingError,
    append_log,
    as_recorded,
    check_code_version,
    checkpoint_file,
    checkpoints,
    claim_run_folder,
    keep_trained_state,
    load_trained_state,
    read_config,
    read_results,
    recorded_code_version,
    same_recipe,
    save_checkpoint,
    training_minutes,
)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator, num_classes: int) -> dict[str, Any]:
    """Top-1, top-5 and per-class accuracy of ``model`` over ``loader`` (every process's share gathered)."""
    model.eval()
    metrics = ClassificationMetrics(num_classes, accelerator.device)
    for images, labels in loader:
        logits, labels = accelerator.gather_for_metrics((model(images), labels))
        metrics.update(logits, labels)
    return metrics.compute()


def train(
    recipe: dict[str, Any],
    output_dir: str | Path,
    data_root: str | Path | None = None,
    *,
    progress: bool = True,
    after_epoch: Callable[[int], None] | None = None,
    report: Report | None = None,
    allow_other_version: bool = False,
) -> dict[str, Any]:
    """Trains ``recipe`` into the run folder ``output_dir`` (resuming it if it holds the same recipe) and
    returns the final results, also written to ``results.json``. ``after_epoch(epoch)`` runs after each
    epoch's checkpoint (a hook for tests and callers that watch a run). ``report`` takes the run's progress
    (:class:`~.progress.Update`); by default it is shown here, live if ``progress`` and stdout is a terminal,
    else as one labelled line per epoch.

    The results' ``minutes`` are the time the run's epochs spent in training steps (forward, backward,
    optimizer), summed over every session that trained them (:func:`~.runs.training_minutes`): set-up,
    evaluation and checkpoints are left out, so that methods compare by what training them costs. A folder
    that got anywhere under another code version is refused unless ``allow_other_version``
    (:func:`~.runs.check_code_version`). A non-finite loss stops the run with an error, or, with the recipe's
    ``record_divergence``, ends it as diverged: results with top-1 0 and a ``diverged`` entry (epoch, batch,
    learning rate, seed)."""
    run, recipe = Path(output_dir), as_recorded(recipe)
    check_code_version(run, allow_other_version)
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    accelerator = build_accelerator(
        recipe,
        log_with="tensorboard" if tensorboard else None,
        project_dir=run,
        gradient_accumulation_steps=recipe["grad_accum_steps"],
        dataloader_config=DataLoaderConfiguration(
            split_batches=True, use_seedable_sampler=True, data_seed=recipe["seed"]
        ),
    )
    accelerator.register_save_state_pre_hook(keep_trained_state)
    accelerator.register_load_state_pre_hook(load_trained_state)
    for key in ("batch_size", "eval_batch_size"):
        if recipe[key] % accelerator.num_processes:
            raise RecipeError(
                f"{key}={recipe[key]} is the global batch, split across {accelerator.num_processes} processes: "
                "it must be a multiple of the process count"
            )
    if recipe["checkpoint"] is None and not get_method(recipe["method"]).trains_backbone:
        raise RecipeError(
            f"method {recipe['method']!r} freezes the backbone, but the recipe has no checkpoint: pass "
            "--checkpoint FILE, an https URL or 'pretrained' (a frozen random backbone learns nothing)"
        )
    set_seed(recipe["seed"])
    model = build_model(recipe)
    parameters = parameter_report(model)
    source, entry, _ = data_source(recipe, data_root)
    if source == "hub" and recipe.get("benchmark") == "vtab1k" and accelerator.is_main_process:
        warnings.warn(
            f"{recipe['task']}: no --data-root, so this run uses the hub approximation {entry['id']} (random "
            "images of the source data set, not VTAB-1k's train800val200 split): its numbers are not comparable "
            "with published VTAB-1k results. Pass --data-root with the VTAB-1k folders for those.",
            stacklevel=2,
        )
    train_set = build_split(recipe, model, True, data_root)
    eval_set = build_split(recipe, model, False, data_root)
    if accelerator.is_main_process:  # only once model and data are known to work, so a fixed retry may reuse it
        claim_run_folder(run, recipe, model)
    accelerator.wait_for_everyone()
    if tensorboard:
        accelerator.init_trackers("tensorboard")
    if recipe["checkpoint"] is None:
        warnings.warn(f"{run}: no checkpoint, fine-tuning {recipe['model']} from random weights", stacklevel=2)

    loader_options = dict(num_workers=recipe["num_workers"], persistent_workers=False)
    train_loader = DataLoader(train_set, recipe["batch_size"], shuffle=True, drop_last=False, **loader_options)
    eval_loader = DataLoader(eval_set, recipe["eval_batch_size"], **loader_options)
    optimizer = build_optimizer(model, recipe["optimizer"], recipe["lr"], recipe["weight_decay"])
    steps_per_epoch = math.ceil(len(train_loader) / recipe["grad_accum_steps"])
    scheduler = build_scheduler(
        optimizer,
        recipe["scheduler"],
        recipe["warmup_epochs"] * steps_per_epoch,
        recipe["epochs"] * steps_per_epoch,
        recipe["min_lr"] / recipe["lr"],
    )
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )

    start_epoch = 0
    finished = checkpoints(run)
    if finished:
        accelerator.load_state(str(finished[-1]))
        start_epoch = int(finished[-1].name.split("_")[1])
        accelerator.print(f"resuming {run} after epoch {start_epoch}")
    metrics: dict[str, Any] = {}
    diverged: dict[str, float] | None = None
    shown = report if accelerator.is_local_main_process else quiet
    epochs, total = recipe["epochs"], len(train_loader)
    with reporting(shown, f"{recipe['task']}/{recipe['method']}", live=progress) as report:
        for epoch in range(start_epoch + 1, epochs + 1):
            model.train()
            train_loader.set_epoch(epoch)
            loss_sum, batches = torch.zeros((), device=accelerator.device), 0
            started = time.perf_counter()
            for images, labels in train_loader:
                with accelerator.accumulate(model):
                    loss = F.cross_entropy(model(images), labels, label_smoothing=recipe["label_smoothing"])
                    if not torch.isfinite(accelerator.reduce(loss.detach(), "mean")):
                        diverged = {"epoch": epoch, "batch": batches + 1, "lr": recipe["lr"], "seed": recipe["seed"]}
                        if not recipe["record_divergence"]:
                            done = checkpoints(run)
                            last = done[-1] if done else "none (no epoch finished)"
                            raise TrainingError(
                                f"loss is {loss.item()} in epoch {epoch}, batch {batches + 1}; stopped. The last "
                                f"good checkpoint is {last}; the recipe must change (lower lr, set clip_grad_norm), "
                                "so start it in another --output-dir."
                            )
                        break
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and recipe["clip_grad_norm"]:
                        accelerator.clip_grad_norm_(model.parameters(), recipe["clip_grad_norm"])
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                batches += 1
                report(Update(epoch, epochs, batches, total, loss.item()))
            if diverged:
                break
            train_seconds = round(time.perf_counter() - started, 3)
            record: dict[str, Any] = {
                "epoch": epoch,
                "lr": scheduler.get_last_lr()[0],
                "train_loss": accelerator.reduce(loss_sum / max(batches, 1), "mean").item(),
                "train_seconds": train_seconds,
            }
            if epoch == epochs or (recipe["eval_every"] and epoch % recipe["eval_every"] == 0):
                metrics = evaluate(model, eval_loader, accelerator, recipe["num_classes"])
                record.update(eval_top1=metrics["top1"], eval_top5=metrics["top5"])
            if accelerator.is_main_process:  # before the checkpoint, so that every complete epoch has its line
                append_log(run, record)
            save_checkpoint(accelerator, run, epoch)
            accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
            report(Update(epoch, epochs, batches, total, record["train_loss"], record))
            if after_epoch is not None:
                after_epoch(epoch)
    if diverged:  # recorded, not raised: a failed setting of a grid, scored 0 and flagged
        metrics = {"top1": 0.0, "top5": 0.0, "per_class": [0.0] * recipe["num_classes"], "diverged": diverged}
    elif not metrics:  # resumed after the last epoch's checkpoint: evaluate again
        metrics = evaluate(model, eval_loader, accelerator, recipe["num_classes"])
    results = {
        **{key: recipe.get(key) for key in ("task", "benchmark", "group", "model", "method", "num_classes")},
        "eval_split": recipe["eval_split"],
        "data_source": source,
        "data_root": str(Path(data_root).expanduser().resolve()) if data_root is not None else None,
        **metrics,
        "train_images": len(train_set),
        "skipped_images": {"train": train_set.skipped, "eval": eval_set.skipped},
        "parameters": parameters.to_dict(),
        "epochs": recipe["epochs"],
        "minutes": training_minutes(run, recipe["epochs"]),
        "checkpoint": recipe["checkpoint"],
        "processes": accelerator.num_processes,
        "code": recorded_code_version(run),
    }
    if accelerator.is_main_process:
        if not diverged:  # its weights hold non-finite values: nothing to keep
            save_adaptor(accelerator.unwrap_model(model), run / ADAPTER)
        write_atomically(run / RESULTS, json.dumps(results, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def train_once(
    recipe: dict[str, Any],
    output_dir: str | Path,
    data_root: str | Path | None = None,
    *,
    progress: bool = False,
    report: Report | None = None,
    allow_other_version: bool = False,
) -> tuple[dict[str, Any], float | None]:
    """The results of ``recipe`` in the run folder ``output_dir`` and its training minutes (:func:`train`):
    read back (minutes None) when the folder holds this recipe's results, else trained (resuming what is
    there), showing or passing on its progress as :func:`train` does. What the suites and the demo run, so a
    rerun skips finished runs, but refuses one of another code version unless ``allow_other_version``; the
    results carry the ``code`` version of the run."""
    run = Path(output_dir)
    check_code_version(run, allow_other_version)
    if (run / RESULTS).is_file() and same_recipe(run, recipe):
        return {**read_results(run), "code": recorded_code_version(run)}, None
    results = train(recipe, run, data_root, progress=progress, report=report, allow_other_version=allow_other_version)
    return results, results["minutes"]


def evaluate_run(
    output_dir: str | Path,
    data_root: str | Path | None = None,
    split: str | None = None,
    *,
    checkpoint: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates a finished run's adapter on a fresh backbone, on its eval split or ``split``; writes and
    returns ``eval_<split>.json`` in the run folder. ``checkpoint`` points at the backbone weights where the
    run's recorded file has moved to (the adapter checks that they are the same weights). Without
    ``data_root``, the images come from where the run was trained (its ``results.json`` records the root)."""
    run = Path(output_dir)
    if not (run / CONFIG).is_file() or not (run / ADAPTER).is_dir():
        raise TrainingError(f"{run} is not a finished run folder (it needs {CONFIG} and {ADAPTER}/)")
    if data_root is None and (run / RESULTS).is_file():
        data_root = read_results(run).get("data_root")
    recipe = read_config(run)
    if split is not None:
        recipe["eval_split"] = split
    recorded = checkpoint_file(recipe["checkpoint"])
    if checkpoint is not None:
        recipe = as_recorded({**recipe, "checkpoint": checkpoint})
    elif recorded and not os.path.isfile(recorded):
        raise TrainingError(
            f"{run}: the backbone checkpoint {recorded} that {CONFIG} records is not a file; if it moved, pass "
            "its new path as --checkpoint"
        )
    accelerator = build_accelerator(recipe)
    set_seed(recipe["seed"])  # a backbone trained from scratch is re-created from the run's seed
    model = load_adaptor(build_backbone(recipe), run / ADAPTER)
    images = build_split(recipe, model, False, data_root)
    loader = DataLoader(images, recipe["eval_batch_size"], num_workers=recipe["num_workers"])
    model, loader = accelerator.prepare(model, loader)
    shown = progress and accelerator.is_local_main_process
    with Progress(TextColumn("{task.description}"), BarColumn(), disable=not shown, transient=True) as bar:
        bar.add_task(f"evaluating {recipe['task']} {recipe['eval_split']}", total=None)
        metrics = evaluate(model, loader, accelerator, recipe["num_classes"])
    results = {
        "task": recipe["task"],
        "eval_split": recipe["eval_split"],
        **metrics,
        "skipped_images": images.skipped,
        "checkpoint": recipe["checkpoint"],
    }
    if accelerator.is_main_process:
        write_atomically(run / f"eval_{recipe['eval_split']}.json", json.dumps(results, indent=2) + "\n")
    return results
