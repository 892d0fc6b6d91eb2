"""Recipes: one YAML file per benchmark task, over ``defaults.yaml``, with ``key=value`` overrides.

A recipe is data, not code: the resolved recipe is a plain dict that a run writes next to its results. A
task file may set any key of ``defaults.yaml`` plus the task keys below; anything else is a typo, and a
typo in a hyper-parameter silently trains the wrong thing, so it is an error that suggests the close
match. Values are checked against the type of the value they replace.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

RECIPES_ENV = "ADAPTOR_PEFT_RECIPES"
DEFAULTS = "defaults"
TASK_KEYS = ("task", "benchmark", "group", "num_classes", "transform", "train_split", "eval_split", "data")
"""Keys a task recipe adds to the defaults (``group`` only for VTAB-1k)."""
REQUIRED_KEYS = ("task", "num_classes", "transform", "train_split", "eval_split", "data")
FREE_FORM_KEYS = ("method_options", "model_options")
"""Mappings whose keys belong to another component (the method's config, the model's constructor) and
are checked there."""


BOUNDS = (
    *((key, 0, True) for key in ("epochs", "batch_size", "eval_batch_size", "grad_accum_steps", "lr", "num_classes")),
    *((key, 0, False) for key in ("warmup_epochs", "min_lr", "weight_decay", "drop_path", "label_smoothing")),
    *((key, 0, False) for key in ("num_workers", "eval_every")),
)
"""(key, bound, strict): numbers a recipe must keep above (strict) or at least at the bound."""


class RecipeError(ValueError):
    """A recipe that cannot be resolved; the message names the key, the file and what would fit."""


def recipes_dir() -> Path:
    """``$ADAPTOR_PEFT_RECIPES``, else the recipes shipped with the package (in a checkout, ``adaptor_peft/
    recipes`` links to the repository's top-level ``recipes/`` folder; a wheel holds a copy)."""
    env = os.environ.get(RECIPES_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / "recipes"


def list_recipes() -> list[str]:
    """Names of all recipes, such as ``vtab1k/cifar``, sorted; a file whose name starts with ``_`` holds
    something else (the offline suite's tuned method options)."""
    base = recipes_dir()
    names = (path.relative_to(base).with_suffix("").as_posix() for path in base.rglob("*.yaml"))
    return sorted(name for name in names if name != DEFAULTS and not name.rsplit("/", 1)[-1].startswith("_"))


def load_recipe(name_or_path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The recipe ``name_or_path`` (a name under the recipes folder, or a YAML file) over ``defaults.yaml``.

    ``overrides`` are ``key=value`` strings applied last; the value is read as a YAML scalar and a dotted
    key (``data.local.dir=cifar100``) reaches into nested mappings.
    """
    path = _recipe_path(name_or_path)
    defaults_path = recipes_dir() / f"{DEFAULTS}.yaml"
    recipe = _read(defaults_path)
    task = _read(path)
    for key, value in task.items():
        if key not in recipe and key not in TASK_KEYS:
            raise RecipeError(f"unknown key {key!r} in {path}{_suggest(key, [*recipe, *TASK_KEYS])}")
        recipe[key] = _merge(recipe.get(key), value, key, path)
    for override in overrides:
        _apply(recipe, override, path)
    missing = [key for key in REQUIRED_KEYS if recipe.get(key) is None]
    if missing:
        raise RecipeError(f"recipe {path} does not set {missing}")
    for key, low, strict in BOUNDS:
        value = recipe.get(key)
        if value is not None and (value <= low if strict else value < low):
            raise RecipeError(f"{key}={value!r} (recipe {path}) must be {'>' if strict else '>='} {low}")
    return recipe


def _recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found")
        return path
    path = recipes_dir() / f"{name_or_path}.yaml"
    if name_or_path == DEFAULTS or not path.is_file():
        raise RecipeError(
            f"unknown recipe {name_or_path!r}{_suggest(name_or_path, list_recipes())}; "
            f"available in {recipes_dir()}: {', '.join(list_recipes())}"
        )
    return path


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe file {path} not found (set ${RECIPES_ENV} to the recipes folder)")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(content, dict):
        raise RecipeError(f"{path} must hold a mapping of keys to values, not {type(content).__name__}")
    return content


def _suggest(key: str, known: Sequence[str]) -> str:
    matches = difflib.get_close_matches(key, known, n=3)
    return f" (did you mean {', '.join(repr(m) for m in matches)}?)" if matches else ""


def _merge(old: Any, new: Any, key: str, source: Path | str) -> Any:
    """``new`` over ``old``: mappings merge key by key; other values must keep the type of ``old``."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        return {**old, **{k: _merge(old.get(k), v, f"{key}.{k}", source) for k, v in new.items()}}
    return _coerce(old, new, key, source)


def _coerce(old: Any, new: Any, key: str, source: Path | str) -> Any:
    """``new`` checked against the type of ``old`` (anything goes where ``old`` is null); a float also takes
    an int or a string such as ``1e-3``, which YAML 1.1 reads as a string."""
    if old is None:
        return new
    if isinstance(old, float) and not isinstance(new, bool):
        try:
            return float(new)
        except (TypeError, ValueError):
            pass
    elif isinstance(old, bool) == isinstance(new, bool) and isinstance(new, type(old)):
        return new
    expected = "a mapping" if isinstance(old, Mapping) else type(old).__name__
    raise RecipeError(f"{key} must be {expected} like {old!r}, got {new!r} (from {source})")


def _dotted_keys(mapping: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in mapping.items():
        keys.append(prefix + key)
        if isinstance(value, Mapping):
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _apply(recipe: dict[str, Any], override: str, path: Path) -> None:
    """Set ``key=value`` in ``recipe`` in place; the key must exist already, except inside a free-form
    mapping such as ``method_options``."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {override!r} is not of the form key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"override {override!r}: the value is not a YAML scalar: {error}") from None
    *parents, leaf = key.split(".")
    node = recipe
    for part in parents:
        node = node.get(part) if isinstance(node, Mapping) else None
    if isinstance(node, dict) and leaf not in node and parents and parents[0] in FREE_FORM_KEYS:
        node[leaf] = value
        return
    if not isinstance(node, dict) or leaf not in node:
        raise RecipeError(f"unknown key {key!r} for recipe {path}{_suggest(key, _dotted_keys(recipe))}")
    node[leaf] = _coerce(node[leaf], value, key, f"override {override!r}")
