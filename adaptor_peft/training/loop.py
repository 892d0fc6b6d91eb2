"""The training loop: a resolved recipe in, a run folder out.

A run folder holds ``config.yaml`` (the resolved recipe), ``resolved.json`` (every setting of its method,
defaults included, and a fingerprint of the backbone weights it started from), ``log.jsonl`` (one line per
epoch), ``checkpoints/epoch_NNN/`` (the training state after each epoch, the last two kept), ``adapter/`` (what
:func:`~adaptor_peft.save_adaptor` writes: only the trained weights) and ``results.json``. Starting a run
in a folder that holds the same recipe resumes it after its last complete checkpoint, with the same data
order, augmentation and dropout draws as an uninterrupted run: the sampler is seeded per epoch and
accelerate restores every random state.

An epoch checkpoint is accelerate's ``save_state`` (optimizer, scheduler, random states and, where it has
any, the sampler's) with the model's part cut down to what training changes: the trainable parameters and
every buffer (buffers such as BatchNorm statistics can change in a frozen module). The frozen backbone is
not written every epoch: a resumed run rebuilds it from the recipe's checkpoint, as the interrupted run
did. Under DeepSpeed accelerate saves the model itself, whole (FSDP is not supported: adapter files
need whole parameters).

The loop reads top to bottom in the style of accelerate's examples: prepare, loop, ``accumulate``,
``backward``, ``gather_for_metrics``, ``save_state``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import SAFE_WEIGHTS_NAME, DataLoaderConfiguration, set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from ..adaptors import load_adaptor, prepare_model
from ..adaptors.methods import get_method, resolved_settings
from ..adaptors.state import backbone_fingerprints
from ..atomic import write_atomically
from ..data import LabelledImages, build_transform, data_config, load_split
from ..hub import save_adaptor
from ..models import CheckpointError, create_model
from ..reports import parameter_report
from .metrics import ClassificationMetrics
from .optim import build_optimizer, build_scheduler
from .recipe import RecipeError

CONFIG, LOG, RESULTS, ADAPTER, CHECKPOINTS = "config.yaml", "log.jsonl", "results.json", "adapter", "checkpoints"
RESOLVED = "resolved.json"
KEEP_CHECKPOINTS = 2
COMPLETE = "complete"  # marker written after a checkpoint is fully saved


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss, a run folder holding another recipe)."""


@contextmanager
def _blamed_on(recipe: dict[str, Any], options: str, of: str) -> Iterator[None]:
    """Turns a TypeError or ValueError into a RecipeError naming the recipe's keys ``of`` and ``options`` with
    their values (a CheckpointError keeps its own message): what the user wrote is at fault."""
    try:
        yield
    except CheckpointError:
        raise
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{of}={recipe[of]!r} with {options}={recipe[options]!r}: {error}") from error


def build_backbone(recipe: dict[str, Any]) -> nn.Module:
    """The recipe's backbone with its checkpoint and a fresh head for the task."""
    with _blamed_on(recipe, "model_options", "model"):
        return create_model(
            recipe["model"],
            checkpoint=recipe["checkpoint"],
            num_classes=recipe["num_classes"],
            img_size=recipe["img_size"],
            drop_path_rate=recipe["drop_path"],
            **recipe["model_options"],
        )


def build_model(recipe: dict[str, Any]) -> nn.Module:
    """The recipe's backbone with its method applied: what a run trains."""
    backbone = build_backbone(recipe)
    with _blamed_on(recipe, "method_options", "method"):
        return prepare_model(backbone, recipe["method"], **recipe["method_options"])


def data_source(recipe: dict[str, Any], data_root: str | Path | None) -> tuple[str, dict[str, Any], Path | None]:
    """Where the recipe's images come from, as (``local`` / ``builtin`` / ``hub``, data entry, root): its
    local layout under ``data_root`` when one is given, else its ``builtin`` data (shipped inside an
    installed package), else its hub copy."""
    sources = recipe["data"]
    if data_root is not None:
        if not sources.get("local"):
            raise RecipeError(f"recipe {recipe['task']!r} has no local data layout; drop --data-root")
        return "local", sources["local"], Path(data_root)
    for name in ("builtin", "hub"):
        if sources.get(name):
            return name, sources[name], None
    raise RecipeError(
        f"recipe {recipe['task']!r} has no hub copy of its data; download it and pass --data-root "
        f"(expected layout: {sources.get('local')})"
    )


def build_split(recipe: dict[str, Any], model: nn.Module, train: bool, data_root: str | Path | None) -> LabelledImages:
    """The recipe's train or eval split with its transform, labels checked against the head."""
    _, source, root = data_source(recipe, data_root)
    config = data_config(model)
    transform = build_transform(
        recipe["transform"],
        train,
        recipe["img_size"] or config["img_size"],
        config["mean"],
        config["std"],
        config["interpolation"],
    )
    split = recipe["train_split"] if train else recipe["eval_split"]
    images = load_split(source, split, root=root, transform=transform, skip_bad_images=recipe["skip_bad_images"])
    images.check_labels(recipe["num_classes"])
    return images


def mixed_precision(value: str) -> str:
    """``auto``: bf16 on GPUs that support it, else fp16 on GPUs, else none."""
    if value != "auto":
        return value
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _accelerator(recipe: dict[str, Any], **options: Any) -> Accelerator:
    """The recipe's Accelerator. ``cpu=True`` without CUDA: otherwise accelerate runs processes started by
    torchrun on CPUs as separate single-process trainings that never meet."""
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(recipe["mixed_precision"]), **options
    )


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
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


def _trained_keys(model: nn.Module) -> set[str]:
    """Names in ``model``'s state dict that training changes: trainable parameters and all buffers."""
    parameters = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return parameters | {name for name, _ in model.named_buffers(remove_duplicate=False)}


def _keep_trained_state(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
    """accelerate ``save_state`` pre-hook: drops the frozen parameters from the state dicts it is about to
    write, in place (``weights`` is empty under FSDP and DeepSpeed, which save the models themselves)."""
    for model, state in zip(models, weights, strict=False):
        for key in state.keys() - _trained_keys(model):
            del state[key]


def _load_trained_state(models: list[nn.Module], input_dir: str) -> None:
    """accelerate ``load_state`` pre-hook: loads what :func:`_keep_trained_state` kept of the loop's one model
    (a checkpoint holding everything loads too) and takes the model off accelerate's list, whose loader
    would require every tensor."""
    for model in models:
        path = Path(input_dir) / SAFE_WEIGHTS_NAME
        missing, unexpected = model.load_state_dict(load_file(path), strict=False)
        lacking = sorted(_trained_keys(model).intersection(missing))
        if unexpected or lacking:
            raise TrainingError(
                f"{path} does not fit the run's model: unknown tensors {sorted(unexpected)}, missing trained "
                f"tensors {lacking}"
            )
    models.clear()


def _checkpoints(run: Path) -> list[Path]:
    """Complete epoch checkpoints of a run folder, oldest first."""
    folder = run / CHECKPOINTS
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("epoch_*") if (p / COMPLETE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def _checkpoint_file(value: str | None) -> str | None:
    """The absolute path of the file a recipe's ``checkpoint`` names; None for none, ``pretrained`` and URLs."""
    if value is None or value == "pretrained" or "://" in value:
        return None
    return os.path.abspath(os.path.expanduser(value))


def _as_recorded(recipe: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` as a run folder records it: a checkpoint file as an absolute path, so that the run resumes
    and evaluates from any working directory."""
    file = _checkpoint_file(recipe["checkpoint"])
    return {**recipe, "checkpoint": file} if file else recipe


def same_recipe(run: Path, recipe: dict[str, Any]) -> bool:
    """Does the run folder hold ``recipe``? Raises if it holds another one that got anywhere (a finished
    epoch or results), which must not be mixed with or overwritten by this one."""
    recipe = _as_recorded(recipe)
    written = run / CONFIG
    if not written.is_file():
        return False
    try:
        previous = yaml.safe_load(written.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        previous = error
    if not isinstance(previous, dict):
        raise TrainingError(
            f"{written} is not a readable recipe ({previous!r:.200}); the run folder is damaged: move it away "
            "or choose another --output-dir"
        )
    previous = _as_recorded(previous)  # older runs recorded a path as given
    started = bool(_checkpoints(run)) or (run / RESULTS).is_file()
    if previous != recipe and started:
        changed = sorted(k for k in {*previous, *recipe} if previous.get(k) != recipe.get(k))
        raise TrainingError(
            f"{run} holds a run of another recipe (differs in {changed}); resume it with the same recipe "
            "or choose another --output-dir"
        )
    if previous != recipe:
        return False
    recorded, method = _recorded(run).get("method"), _method_settings(recipe)
    # A setting the record lacks was added since, with a default that keeps what the run did.
    changed = [f"{k}: run {v!r}, now {method.get(k)!r}" for k, v in (recorded or {}).items() if method.get(k) != v]
    if not changed:  # also runs from before the record: their recipe is all there is
        return True
    if started:
        raise TrainingError(
            f"{run} was trained with other settings of method {recipe['method']!r} than its recipe gives now "
            f"({'; '.join(changed)}): a default changed since. Set them in method_options to go on with the run, "
            "or choose another --output-dir"
        )
    return False


def _method_settings(recipe: dict[str, Any]) -> dict[str, Any]:
    return resolved_settings(recipe["method"], dict(recipe["method_options"]))


def _recorded(run: Path) -> dict[str, Any]:
    """What a run folder records beyond its recipe: ``method``, every setting of the method
    (:func:`~adaptor_peft.adaptors.methods.resolved_settings`), and ``backbone``, the fingerprint of the
    backbone weights it started from (:func:`~adaptor_peft.adaptors.files.backbone_fingerprints`); empty
    for a folder made before the record."""
    try:
        recorded = json.loads((run / RESOLVED).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        recorded = error
    if not isinstance(recorded, dict):
        raise TrainingError(f"{run / RESOLVED} is damaged ({recorded!r:.200}): move the run folder away")
    return recorded


def _claim_run_folder(run: Path, recipe: dict[str, Any], model: nn.Module) -> None:
    """Creates the run folder with the recipe, or checks that an existing one holds the same recipe (a
    folder where no epoch finished takes the new recipe: a corrected retry) and, if an epoch finished, was
    started from the same backbone weights: a checkpoint file replaced mid-run must not be resumed."""
    backbone = next(iter(backbone_fingerprints(model).values()))  # at the finest dtype
    if same_recipe(run, recipe):
        recorded = _recorded(run).get("backbone")
        if recorded is not None and recorded != backbone and _checkpoints(run):
            raise TrainingError(
                f"{run} started from other backbone weights than {recipe['checkpoint']!r} holds now (fingerprint "
                f"{recorded[:12]}, now {backbone[:12]}): resume it with the weights it started from, or choose "
                "another --output-dir"
            )
        return
    run.mkdir(parents=True, exist_ok=True)
    record = {"method": _method_settings(recipe), "backbone": backbone}
    write_atomically(run / RESOLVED, json.dumps(record, indent=2) + "\n")
    write_atomically(run / CONFIG, yaml.safe_dump(recipe, sort_keys=False))


def _append_log(run: Path, record: dict[str, Any]) -> None:
    with (run / LOG).open("a") as log:
        log.write(json.dumps(record) + "\n")


def train(
    recipe: dict[str, Any],
    output_dir: str | Path,
    data_root: str | Path | None = None,
    *,
    progress: bool = True,
    after_epoch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Trains ``recipe`` into the run folder ``output_dir`` (resuming it if it holds the same recipe) and
    returns the final results, also written to ``results.json``. ``after_epoch(epoch)`` runs after each
    epoch's checkpoint (a hook for tests and callers that watch a run)."""
    run, recipe = Path(output_dir), _as_recorded(recipe)
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    accelerator = _accelerator(
        recipe,
        log_with="tensorboard" if tensorboard else None,
        project_dir=run,
        gradient_accumulation_steps=recipe["grad_accum_steps"],
        dataloader_config=DataLoaderConfiguration(
            split_batches=True, use_seedable_sampler=True, data_seed=recipe["seed"]
        ),
    )
    accelerator.register_save_state_pre_hook(_keep_trained_state)
    accelerator.register_load_state_pre_hook(_load_trained_state)
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
    report = parameter_report(model)
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
        _claim_run_folder(run, recipe, model)
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
    finished = _checkpoints(run)
    if finished:
        accelerator.load_state(str(finished[-1]))
        start_epoch = int(finished[-1].name.split("_")[1])
        accelerator.print(f"resuming {run} after epoch {start_epoch}")
    started = time.perf_counter()
    metrics: dict[str, Any] = {}
    with _progress(progress and accelerator.is_local_main_process) as bar:
        for epoch in range(start_epoch + 1, recipe["epochs"] + 1):
            model.train()
            train_loader.set_epoch(epoch)
            task = bar.add_task(f"epoch {epoch}/{recipe['epochs']}", total=len(train_loader), info="")
            loss_sum, batches = torch.zeros((), device=accelerator.device), 0
            for images, labels in train_loader:
                with accelerator.accumulate(model):
                    loss = F.cross_entropy(model(images), labels, label_smoothing=recipe["label_smoothing"])
                    if not torch.isfinite(accelerator.reduce(loss.detach(), "mean")):
                        done = _checkpoints(run)
                        last = done[-1] if done else "none (no epoch finished)"
                        raise TrainingError(
                            f"loss is {loss.item()} in epoch {epoch}, batch {batches + 1}; stopped. The last good "
                            f"checkpoint is {last}; the recipe must change (lower lr, set clip_grad_norm), so "
                            "start it in another --output-dir."
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and recipe["clip_grad_norm"]:
                        accelerator.clip_grad_norm_(model.parameters(), recipe["clip_grad_norm"])
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                batches += 1
                bar.update(task, advance=1, info=f"loss {loss.item():.4f}")
            bar.remove_task(task)
            record: dict[str, Any] = {
                "epoch": epoch,
                "lr": scheduler.get_last_lr()[0],
                "train_loss": accelerator.reduce(loss_sum / max(batches, 1), "mean").item(),
            }
            if epoch == recipe["epochs"] or (recipe["eval_every"] and epoch % recipe["eval_every"] == 0):
                metrics = evaluate(model, eval_loader, accelerator, recipe["num_classes"])
                record.update(eval_top1=metrics["top1"], eval_top5=metrics["top5"])
            record["seconds"] = round(time.perf_counter() - started, 2)
            _save_checkpoint(accelerator, run, epoch)
            accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
            if accelerator.is_main_process:
                _append_log(run, record)
                accelerator.print(json.dumps(record))
            if after_epoch is not None:
                after_epoch(epoch)
    if not metrics:  # resumed after the last epoch's checkpoint: evaluate again
        metrics = evaluate(model, eval_loader, accelerator, recipe["num_classes"])
    results = {
        **{key: recipe.get(key) for key in ("task", "benchmark", "group", "model", "method", "num_classes")},
        "eval_split": recipe["eval_split"],
        "data_source": source,
        "data_root": str(Path(data_root).expanduser().resolve()) if data_root is not None else None,
        **metrics,
        "train_images": len(train_set),
        "skipped_images": {"train": train_set.skipped, "eval": eval_set.skipped},
        "parameters": report.to_dict(),
        "epochs": recipe["epochs"],
        "checkpoint": recipe["checkpoint"],
        "processes": accelerator.num_processes,
    }
    if accelerator.is_main_process:
        save_adaptor(accelerator.unwrap_model(model), run / ADAPTER)
        write_atomically(run / RESULTS, json.dumps(results, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def train_once(
    recipe: dict[str, Any], output_dir: str | Path, data_root: str | Path | None = None, *, progress: bool = False
) -> tuple[dict[str, Any], float | None]:
    """The results of ``recipe`` in the run folder ``output_dir`` and the minutes it took to train: read back
    (minutes None) when the folder holds this recipe's results, else trained (resuming what is there), with
    ``minutes`` added to ``results.json``. What the suites and the demo run, so a rerun skips finished runs."""
    run = Path(output_dir)
    if (run / RESULTS).is_file() and same_recipe(run, recipe):
        return json.loads((run / RESULTS).read_text()), None
    started = time.perf_counter()
    results = train(recipe, run, data_root, progress=progress)
    results["minutes"] = round((time.perf_counter() - started) / 60, 3)
    write_atomically(run / RESULTS, json.dumps(results, indent=2) + "\n")
    return results, results["minutes"]


def _save_checkpoint(accelerator: Accelerator, run: Path, epoch: int) -> None:
    """Saves the training state after ``epoch``, marks it complete, then drops all but the newest ones."""
    path = run / CHECKPOINTS / f"epoch_{epoch:03d}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()  # every process's random states are in before the checkpoint counts
    if accelerator.is_main_process:
        write_atomically(path / COMPLETE, f"{epoch}\n")
        for old in _checkpoints(run)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


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
        data_root = json.loads((run / RESULTS).read_text()).get("data_root")
    recipe = yaml.safe_load((run / CONFIG).read_text())
    if split is not None:
        recipe["eval_split"] = split
    recorded = _checkpoint_file(recipe["checkpoint"])
    if checkpoint is not None:
        recipe = _as_recorded({**recipe, "checkpoint": checkpoint})
    elif recorded and not os.path.isfile(recorded):
        raise TrainingError(
            f"{run}: the backbone checkpoint {recorded} that {CONFIG} records is not a file; if it moved, pass "
            "its new path as --checkpoint"
        )
    accelerator = _accelerator(recipe)
    set_seed(recipe["seed"])  # a backbone trained from scratch is re-created from the run's seed
    model = load_adaptor(build_backbone(recipe), run / ADAPTER)
    images = build_split(recipe, model, False, data_root)
    loader = DataLoader(images, recipe["eval_batch_size"], num_workers=recipe["num_workers"])
    model, loader = accelerator.prepare(model, loader)
    with _progress(progress and accelerator.is_local_main_process) as bar:
        bar.add_task(f"evaluating {recipe['task']} {recipe['eval_split']}", total=None, info="")
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
