"""A method's options: checked by name and type before the model changes, with one-line errors.

A recipe's ``method_options`` arrive here unchanged from YAML or JSON, where tuples are lists; an error
names the method, the option and what is allowed, and suggests the closest name for a misspelling.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import re
import types
import typing
from typing import Any


class MethodOptionError(ValueError):
    """An unknown transfer method, or an option it does not take, of the wrong type or out of range."""


def fits(value: Any, hint: Any) -> bool:
    """Is ``value`` of type ``hint``? Lists and tuples stand for each other (JSON and YAML have only lists),
    an int is a float, and a bool is not a number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(fits(value, arg) for arg in args)
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple)) and all(fits(item, args[0]) for item in value)
    if hint is Any:
        return True
    if origin is dict:
        return isinstance(value, dict)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe_type(hint: Any) -> str:
    """``hint`` as an error message spells it: ``list[str]``, ``AdaptorConfig | dict[str, Any]``."""
    return re.sub(r"\b(\w+\.)+(?=\w)", "", inspect.formatannotation(hint))  # without module names


def check_options(method: str, options: dict[str, Any], types_: dict[str, Any], prefix: str = "") -> None:
    """Raises :class:`MethodOptionError` for an option of ``method`` that is not in ``types_`` (name ->
    type) or not of its type; ``prefix`` names where the options sit (``config.``, ``lora.``)."""
    for name in sorted(set(options) - set(types_)):
        close = difflib.get_close_matches(name, types_, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        takes = ", ".join(sorted(types_)) or "none"
        raise MethodOptionError(f"method {method!r} has no option {prefix}{name}{hint}; it takes: {takes}")
    for name, value in options.items():
        if not fits(value, types_[name]):
            expected = describe_type(types_[name])
            raise MethodOptionError(f"method {method!r}: option {prefix}{name}={value!r} must be of type {expected}")


def field_types(options_class: type) -> dict[str, Any]:
    """Name -> type of every field of the dataclass ``options_class``."""
    hints = typing.get_type_hints(options_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(options_class)}


def build_options(method: str, options_class: type, options: dict[str, Any], prefix: str = "") -> Any:
    """``options_class(**options)`` after :func:`check_options`; its own value checks (a ``ValueError``
    naming the field) become :class:`MethodOptionError`."""
    check_options(method, options, field_types(options_class), prefix)
    try:
        return options_class(**options)
    except ValueError as err:
        raise MethodOptionError(f"method {method!r}: {err}") from None


def as_json(value: Any) -> Any:
    """``value`` as JSON holds it: dataclasses as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(item) for item in value]
    return value
