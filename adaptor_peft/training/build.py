"""What a recipe builds: the backbone, the model with its method, the data splits and the Accelerator.

One place turns a resolved recipe into objects, so that training (:func:`~adaptor_peft.training.train`),
evaluating a finished run (:func:`~adaptor_peft.training.evaluate_run`) and the demo build them the same way,
and a recipe whose options do not fit fails here with the recipe key at fault, before a run folder is claimed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from ..adaptors import MethodOptionError, prepare_model
from ..adaptors.options import describe_type, fits
from ..data import LabelledImages, build_transform, data_config, load_split
from ..models import create_model, list_models
from ..models.registry import option_types
from .recipe import RecipeError

_UNEXPECTED_KEYWORD = re.compile(r"got an unexpected keyword argument '(\w+)'")


def _takes_no(error: Exception, options: dict[str, Any]) -> bool:
    """Is ``error`` a constructor's refusal of one of ``options`` (Python's "unexpected keyword argument")?"""
    match = _UNEXPECTED_KEYWORD.search(str(error)) if isinstance(error, TypeError) else None
    return match is not None and match.group(1) in options


@contextmanager
def _blamed_on(recipe: dict[str, Any], options: str, of: str, caused: Callable[[Exception], bool]) -> Iterator[None]:
    """Turns an error that the recipe's ``options`` caused (``caused(error)``) into a RecipeError naming the
    recipe's keys ``of`` and ``options`` with their values. Any other error, a bug or a checkpoint that
    cannot be read, is raised unchanged: blaming the options would send the user to change what is fine."""
    try:
        yield
    except Exception as error:
        if not caused(error):
            raise
        raise RecipeError(f"{of}={recipe[of]!r} with {options}={recipe[options]!r}: {error}") from error


def build_backbone(recipe: dict[str, Any]) -> nn.Module:
    """The recipe's backbone with its checkpoint and a fresh head for the task. A ``model_options`` key
    that the backbone's constructor does not take is a RecipeError; the constructor checks the values."""
    if recipe["model"] not in list_models():
        raise RecipeError(f"model={recipe['model']!r} is not a backbone of this package; choose from {list_models()}")
    types = option_types(recipe["model"])
    for key, value in recipe["model_options"].items():
        if key in types and not fits(value, types[key]):
            expected = describe_type(types[key])
            raise RecipeError(f"model={recipe['model']!r}: model_options.{key}={value!r} must be of type {expected}")
    with _blamed_on(recipe, "model_options", "model", lambda error: _takes_no(error, recipe["model_options"])):
        return create_model(
            recipe["model"],
            checkpoint=recipe["checkpoint"],
            num_classes=recipe["num_classes"],
            img_size=recipe["img_size"],
            drop_path_rate=recipe["drop_path"],
            **recipe["model_options"],
        )


def build_model(recipe: dict[str, Any]) -> nn.Module:
    """The recipe's backbone with its method applied: what a run trains. A method or ``method_options`` that
    :func:`~adaptor_peft.prepare_model` refuses (:class:`~adaptor_peft.MethodOptionError`) is a RecipeError."""
    backbone = build_backbone(recipe)
    with _blamed_on(recipe, "method_options", "method", lambda error: isinstance(error, MethodOptionError)):
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


def build_accelerator(recipe: dict[str, Any], **options: Any) -> Accelerator:
    """The recipe's Accelerator. ``cpu=True`` without CUDA: otherwise accelerate runs processes started by
    torchrun on CPUs as separate single-process trainings that never meet."""
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(recipe["mixed_precision"]), **options
    )
