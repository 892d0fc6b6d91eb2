"""Run folders: what a run writes, how a run in progress is found again, and what it must not overwrite.

A run folder holds ``config.yaml`` (the resolved recipe), ``resolved.json`` (every setting of its method,
defaults included, and a fingerprint of the backbone weights it started from), ``log.jsonl`` (one line per
epoch trained, with its ``train_seconds``; an epoch trained again after an interruption has a second line, and
the last one counts), ``checkpoints/epoch_NNN/`` (the training state after each epoch, the last two kept),
``adapter/`` (what :func:`~adaptor_peft.save_adaptor` writes: only the trained weights) and ``results.json``.
A folder that holds the same recipe is resumed after its last complete checkpoint; one that holds another
recipe that got anywhere is refused, so that no finished work is mixed with or overwritten by another
recipe's. So is one that got anywhere under another code version (:func:`check_code_version`), unless
the caller allows it.

An epoch checkpoint is accelerate's ``save_state`` (optimizer, scheduler, random states and, where it has
any, the sampler's) with the model's part cut down to what training changes: the trainable parameters and
every buffer (buffers such as BatchNorm statistics can change in a frozen module). The frozen backbone is
not written every epoch: a resumed run rebuilds it from the recipe's checkpoint, as the interrupted run
did. Under DeepSpeed accelerate saves the model itself, whole (FSDP is not supported: adapter files
need whole parameters).

Kept apart from the loop (:mod:`.loop`) so that these rules, which decide what a user's earlier work is
taken for, read and test on their own.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import SAFE_WEIGHTS_NAME
from safetensors.torch import load_file
from torch import nn

from ..adaptors.methods import resolved_settings
from ..adaptors.state import backbone_fingerprints
from ..atomic import write_atomically
from ..provenance import code_version
from .recipe import REQUIRED_KEYS

CONFIG, LOG, RESULTS, ADAPTER, CHECKPOINTS = "config.yaml", "log.jsonl", "results.json", "adapter", "checkpoints"
RESOLVED = "resolved.json"
UNRECORDED = "unrecorded (a run from before runs recorded it)"
KEEP_CHECKPOINTS = 2
COMPLETE = "complete"  # marker written after a checkpoint is fully saved


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss, a run folder holding another recipe)."""


def trained_keys(model: nn.Module) -> set[str]:
    """Names in ``model``'s state dict that training changes: trainable parameters and all buffers."""
    parameters = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return parameters | {name for name, _ in model.named_buffers(remove_duplicate=False)}


def keep_trained_state(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
    """accelerate ``save_state`` pre-hook: drops the frozen parameters from the state dicts it is about to
    write, in place (``weights`` is empty under FSDP and DeepSpeed, which save the models themselves)."""
    for model, state in zip(models, weights, strict=False):
        for key in state.keys() - trained_keys(model):
            del state[key]


def load_trained_state(models: list[nn.Module], input_dir: str) -> None:
    """accelerate ``load_state`` pre-hook: loads what :func:`keep_trained_state` kept of the loop's one model
    (a checkpoint holding everything loads too) and takes the model off accelerate's list, whose loader
    would require every tensor."""
    for model in models:
        path = Path(input_dir) / SAFE_WEIGHTS_NAME
        missing, unexpected = model.load_state_dict(load_file(path), strict=False)
        lacking = sorted(trained_keys(model).intersection(missing))
        if unexpected or lacking:
            raise TrainingError(
                f"{path} does not fit the run's model: unknown tensors {sorted(unexpected)}, missing trained "
                f"tensors {lacking}"
            )
    models.clear()


def checkpoints(run: Path) -> list[Path]:
    """Complete epoch checkpoints of a run folder, oldest first."""
    folder = run / CHECKPOINTS
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("epoch_*") if (p / COMPLETE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(accelerator: Accelerator, run: Path, epoch: int) -> None:
    """Saves the training state after ``epoch``, marks it complete, then drops all but the newest ones."""
    path = run / CHECKPOINTS / f"epoch_{epoch:03d}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()  # every process's random states are in before the checkpoint counts
    if accelerator.is_main_process:
        write_atomically(path / COMPLETE, f"{epoch}\n")
        for old in checkpoints(run)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def checkpoint_file(value: str | None) -> str | None:
    """The absolute path of the file a recipe's ``checkpoint`` names; None for none, ``pretrained`` and URLs."""
    if value is None or value == "pretrained" or "://" in value:
        return None
    return os.path.abspath(os.path.expanduser(value))


def as_recorded(recipe: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` as a run folder records it: a checkpoint file as an absolute path, so that the run resumes
    and evaluates from any working directory."""
    file = checkpoint_file(recipe["checkpoint"])
    return {**recipe, "checkpoint": file} if file else recipe


def _read_mapping(path: Path, parse: Callable[[str], Any], what: str) -> dict[str, Any]:
    """The mapping that the run folder's file ``path`` holds, read with ``parse``. A file that cannot be read
    or holds something else is a TrainingError naming it: the folder is left as it is for the user to mend
    or move, never overwritten."""
    try:
        content = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as error:  # JSON and Unicode decoding errors are ValueErrors
        content = error
    if not isinstance(content, dict):
        raise TrainingError(
            f"{path} is damaged, not a readable {what} ({content!r:.200}); nothing was changed. Restore the file, "
            "or move the run folder away and train again, or choose another --output-dir"
        )
    return content


ADDED_KEYS = {"record_divergence": False}
"""Recipe keys added since runs were first recorded, with the value that does what runs did before them."""
RECORDED_KEYS = (*REQUIRED_KEYS, "model", "model_options", "method", "method_options", "checkpoint", "seed")
"""What every recorded recipe holds, old or new: a run folder's ``config.yaml`` without one is damaged."""


def read_config(run: Path) -> dict[str, Any]:
    """The recipe that the run folder ``run`` records (``config.yaml``)."""
    recipe = _read_mapping(run / CONFIG, yaml.safe_load, "recipe")
    missing = [key for key in RECORDED_KEYS if key not in recipe]
    if missing:
        raise TrainingError(
            f"{run / CONFIG} lacks {missing}, which every recorded recipe holds; nothing was changed. Restore the "
            "file, or move the run folder away and train again, or choose another --output-dir"
        )
    return recipe


def read_results(run: Path) -> dict[str, Any]:
    """The results that the finished run folder ``run`` records (``results.json``)."""
    return _read_mapping(run / RESULTS, json.loads, "results")


def same_recipe(run: Path, recipe: dict[str, Any]) -> bool:
    """Does the run folder hold ``recipe``? Raises if it holds another one that got anywhere (a finished
    epoch or results), which must not be mixed with or overwritten by this one."""
    recipe = as_recorded(recipe)
    if not (run / CONFIG).is_file():
        return False
    # older runs recorded a path as given, and predate keys whose default keeps what they did
    previous = {**ADDED_KEYS, **as_recorded(read_config(run))}
    started = bool(checkpoints(run)) or (run / RESULTS).is_file()
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


def recorded_code_version(run: Path) -> str:
    """The code version (:func:`~adaptor_peft.provenance.code_version`) that started the run folder ``run``,
    or :data:`UNRECORDED`; followed by ``, resumed by <version>`` for each other version that resumed it
    (allowed by ``--allow-other-version``), so that a run of mixed code never passes for either."""
    record = _recorded(run)
    return ", resumed by ".join([record.get("code", UNRECORDED), *record.get("resumed_by", [])])


def check_code_version(run: Path, allow: bool = False) -> None:
    """Refuses a run folder that got anywhere (a finished epoch or results) under another code version than
    this one, so that no table mixes numbers of different code unawares; ``allow`` lets it be read back or
    resumed (the option ``--allow-other-version``)."""
    if allow or not (checkpoints(run) or (run / RESULTS).is_file()):
        return
    recorded, now = recorded_code_version(run), code_version()
    if recorded != now:
        raise TrainingError(
            f"{run} was trained by code version {recorded}, not this one ({now}); train it again in another "
            "--output-dir, or pass --allow-other-version (allow_other_version=True) to reuse it"
        )


def _method_settings(recipe: dict[str, Any]) -> dict[str, Any]:
    return resolved_settings(recipe["method"], dict(recipe["method_options"]))


def _recorded(run: Path) -> dict[str, Any]:
    """What a run folder records beyond its recipe: ``method``, every setting of the method
    (:func:`~adaptor_peft.adaptors.methods.resolved_settings`), ``backbone``, the fingerprint of the
    backbone weights it started from (:func:`~adaptor_peft.adaptors.state.backbone_fingerprints`), and
    ``code``, the code version that started it, and ``resumed_by``, the other versions that resumed it;
    empty for a folder made before the record."""
    return _read_mapping(run / RESOLVED, json.loads, "run record") if (run / RESOLVED).is_file() else {}


def claim_run_folder(run: Path, recipe: dict[str, Any], model: nn.Module) -> None:
    """Creates the run folder with the recipe, or checks that an existing one holds the same recipe (a
    folder where no epoch finished takes the new recipe: a corrected retry) and, if an epoch finished, was
    started from the same backbone weights: a checkpoint file replaced mid-run must not be resumed. A folder
    where no epoch finished takes this code's record (:func:`check_code_version` decides the others)."""
    backbone = next(iter(backbone_fingerprints(model).values()))  # at the finest dtype
    if same_recipe(run, recipe) and checkpoints(run):  # else the record is written anew, for this code
        record = _recorded(run)
        recorded = record.get("backbone")
        if recorded is not None and recorded != backbone:
            raise TrainingError(
                f"{run} started from other backbone weights than {recipe['checkpoint']!r} holds now (fingerprint "
                f"{recorded[:12]}, now {backbone[:12]}): resume it with the weights it started from, or choose "
                "another --output-dir"
            )
        now, resumed_by = code_version(), record.get("resumed_by", [])
        if record.get("code", UNRECORDED) != now and now not in resumed_by:  # resumed by other code: say so
            record["resumed_by"] = [*resumed_by, now]
            write_atomically(run / RESOLVED, json.dumps(record, indent=2) + "\n")
        return
    run.mkdir(parents=True, exist_ok=True)
    record = {"method": _method_settings(recipe), "backbone": backbone, "code": code_version()}
    write_atomically(run / RESOLVED, json.dumps(record, indent=2) + "\n")
    write_atomically(run / CONFIG, yaml.safe_dump(recipe, sort_keys=False))


def append_log(run: Path, record: dict[str, Any]) -> None:
    """Appends one epoch's record to the run's ``log.jsonl``, on a line of its own after a line that a crash
    cut short (which :func:`training_minutes` then passes over)."""
    before = (run / LOG).read_bytes() if (run / LOG).is_file() else b""
    with (run / LOG).open("a") as log:
        log.write(("\n" if before and not before.endswith(b"\n") else "") + json.dumps(record) + "\n")


def training_minutes(run: Path, epochs: int) -> float | None:
    """Minutes that the run folder's ``epochs`` spent training: the ``train_seconds`` of each epoch's last
    line in ``log.jsonl``, so that a resumed run counts the epochs of its earlier sessions once each. None
    where an epoch has no such line (logged before lines held it, or cut short by a crash)."""
    seconds: dict[int, float | None] = {}
    lines = (run / LOG).read_text().splitlines() if (run / LOG).is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash; its epoch was trained again
            continue
        seconds[record["epoch"]] = record.get("train_seconds")
    counted = [seconds.get(epoch) for epoch in range(1, epochs + 1)]
    return None if None in counted else round(sum(counted) / 60, 3)
