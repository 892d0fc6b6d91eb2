"""``prepare_model``: every transfer method — the adaptors and the baselines — through one code path.

| method | trains (besides the head) |
|---|---|
| ``linear_probe`` | nothing |
| ``full`` | everything |
| ``bias`` | every bias |
| ``partial`` | the SSM's own parameters: ``A_log`` / ``D`` / conv / Δ bias (MambaPEFT's partial tuning) |
| ``lora`` | HF ``peft`` LoRA on ``targets`` (default ``in_proj``) |
| ``parallel_adapter`` | a bottleneck MLP beside every mixer, zero-initialised output (``rank``, default 32) |
| ``adaptor_t`` / ``adaptor_s`` / ``adaptor`` | Adaptor-T, Adaptor-S, both (options: :class:`AdaptorConfig` fields) |
| ``adaptor+lora`` | both adaptors and LoRA (options of both) |
| ``adaptor_booster`` | everything, with both adaptors added (the paper's "booster"; options: :class:`AdaptorConfig`) |

Options are checked before the model changes: an unknown option, a value of the wrong type or range, or
one that contradicts the method raises :class:`MethodOptionError`, one line naming the option and what
is allowed (a recipe's ``method_options`` arrive here unchanged). The method and its options are recorded
on the model (``model.peft_method``), which is what :func:`adaptor_peft.save_adaptor` writes next to
the weights; :func:`resolve_options` fills in every default, so that two records can be compared.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from ..models.protocol import declared, find_blocks
from .config import AdaptorConfig
from .inject import ADAPTOR_MARKERS, has_builtin_adaptors, inject_adaptor, is_head, set_trainable

OTHER_MARKERS = (".parallel_adapter.", ".lora_")
LORA_DEFAULTS = dict(r=8, alpha=16, dropout=0.0, targets=("in_proj",))
PARALLEL_RANK = 32
OPTION_TYPES: dict[str, Any] = {
    **typing.get_type_hints(AdaptorConfig),
    "config": AdaptorConfig | dict[str, Any],
    "r": int,
    "alpha": float,
    "targets": list[str],
    "rank": int,
}
"""The type of every method option (LoRA's ``dropout`` shares AdaptorConfig's, a float)."""


class MethodOptionError(ValueError):
    """An unknown transfer method, or an option it does not take, of the wrong type or out of range."""


class ParallelAdapter(nn.Module):
    """Bottleneck MLP on the mixer's input whose output is added to the mixer's (zero at init)."""

    def __init__(self, dim: int, rank: int = PARALLEL_RANK):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In the adapter's precision (float32 in a half-precision backbone), given back in ``x``'s."""
        return self.up(self.act(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


def is_peft_parameter(name: str, model: nn.Module | None = None) -> bool:
    """Was this parameter (of ``model``) added by a transfer method (adaptors, LoRA, parallel adapters)?
    Adaptors built into ``model``'s backbone (:mod:`adaptor_peft.adaptors.backbones`) were not."""
    markers = OTHER_MARKERS if has_builtin_adaptors(model) else (*ADAPTOR_MARKERS, *OTHER_MARKERS)
    return any(marker in f".{name}" for marker in markers)


def _fits(value: Any, hint: Any) -> bool:
    """Is ``value`` of type ``hint``? Lists and tuples stand for each other (JSON and YAML have only lists),
    an int is a float, and a bool is not a number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, arg) for arg in args)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_fits(item, args[0]) for item in value)
    if hint is Any:
        return True
    if origin is dict:
        return isinstance(value, dict)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check(method: str, options: dict[str, Any], allowed: frozenset[str], prefix: str = "") -> None:
    """Raises :class:`MethodOptionError` for an option not in ``allowed`` or of the wrong type; ``prefix``
    names the option the ones checked sit in (``config.``)."""
    for name in sorted(set(options) - allowed):
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        takes = ", ".join(sorted(allowed)) or "none"
        raise MethodOptionError(f"method {method!r} has no option {prefix}{name}{hint}; it takes: {takes}")
    for name, value in options.items():
        if not _fits(value, OPTION_TYPES[name]):
            expected = re.sub(r"\b(\w+\.)+(?=\w)", "", inspect.formatannotation(OPTION_TYPES[name]))  # no modules
            raise MethodOptionError(f"method {method!r}: option {prefix}{name}={value!r} must be of type {expected}")


def _adaptor_config(method: str, options: dict[str, Any], temporal: bool, spatial: bool) -> AdaptorConfig:
    """The AdaptorConfig of ``options`` (a ``config`` and field overrides, taken out of ``options``) with
    the method's switches, which an option may only repeat. A ``config`` (dict or AdaptorConfig) gives the
    shapes and the method which adaptors, but one that turns off an adaptor the method adds is refused.
    (A switch left on is AdaptorConfig's default, and what files recorded before this check hold.)"""
    config = options.pop("config", None) or AdaptorConfig()
    if isinstance(config, dict):
        _check(method, config, ADAPTOR_FIELDS, "config.")
    switches = config if isinstance(config, dict) else dataclasses.asdict(config)
    given = {name: False for name in ("temporal", "spatial") if switches.get(name) is False}
    chosen = {k: options.pop(k) for k in list(options) if k in ADAPTOR_FIELDS}
    for name, value in dict(temporal=temporal, spatial=spatial).items():
        for source, prefix in ((chosen, ""), (given, "config.")):
            if source.get(name, value) != value:
                raise MethodOptionError(
                    f"method {method!r}: option {prefix}{name}={source[name]!r}, but the method sets {value!r}"
                )
    try:
        config = AdaptorConfig.from_dict(config) if isinstance(config, dict) else config
        return dataclasses.replace(config, **{**chosen, "temporal": temporal, "spatial": spatial})
    except ValueError as err:  # AdaptorConfig's own checks of values, naming the field
        raise MethodOptionError(f"method {method!r}: {err}") from None


def _lora(model: nn.Module, r: int, alpha: float, dropout: float, targets: list[str]) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets), model)
    for name, parameter in model.named_parameters():  # float32 in a half-precision backbone, as the adaptors
        if ".lora_" in f".{name}":
            parameter.data = parameter.data.to(torch.promote_types(parameter.dtype, torch.float32))


def _parallel_adapter(model: nn.Module, rank: int) -> None:
    blocks = find_blocks(model)
    if not blocks:
        raise TypeError(f"parallel_adapter: {type(model).__name__} has no blocks with a token mixer (AdaptableBlock)")
    for _, block in blocks:
        weight = next(block.parameters())
        dtype = torch.promote_types(weight.dtype, torch.float32)
        block.parallel_adapter = ParallelAdapter(block.width, rank).to(weight.device, dtype)


class Method(NamedTuple):
    """A transfer method: the options it takes, which backbone parameters it trains besides what it adds,
    and, for the adaptor methods, which adaptors (Adaptor-T, Adaptor-S) it adds."""

    options: frozenset[str]
    trains: Callable[[nn.Module], Callable[[str], bool]]
    adaptors: tuple[bool, bool] | None = None


ADAPTOR_FIELDS = frozenset(f.name for f in dataclasses.fields(AdaptorConfig))
ADAPTOR_OPTIONS = ADAPTOR_FIELDS | {"config"}
LORA_OPTIONS = frozenset(LORA_DEFAULTS)
NO_OPTIONS: frozenset[str] = frozenset()


def _nothing(model: nn.Module) -> Callable[[str], bool]:
    return lambda name: False


def _everything(model: nn.Module) -> Callable[[str], bool]:
    return lambda name: True


def _biases(model: nn.Module) -> Callable[[str], bool]:
    declared_biases = declared(model, "ssm_biases")
    return lambda name: name.endswith(".bias") or name in declared_biases


def _ssm_parameters(model: nn.Module) -> Callable[[str], bool]:
    return declared(model, "ssm_parameters").__contains__


METHODS: dict[str, Method] = {
    "linear_probe": Method(NO_OPTIONS, _nothing),
    "full": Method(NO_OPTIONS, _everything),
    "bias": Method(NO_OPTIONS, _biases),
    "partial": Method(NO_OPTIONS, _ssm_parameters),
    "lora": Method(LORA_OPTIONS, _nothing),
    "parallel_adapter": Method(frozenset({"rank"}), _nothing),
    "adaptor_t": Method(ADAPTOR_OPTIONS, _nothing, (True, False)),
    "adaptor_s": Method(ADAPTOR_OPTIONS, _nothing, (False, True)),
    "adaptor": Method(ADAPTOR_OPTIONS, _nothing, (True, True)),
    "adaptor+lora": Method(ADAPTOR_OPTIONS | LORA_OPTIONS, _nothing, (True, True)),
    "adaptor_booster": Method(ADAPTOR_OPTIONS, _everything, (True, True)),
}
WHOLE_BACKBONE = ("full", "adaptor_booster")
"""Methods that train every backbone parameter: they need no pretrained checkpoint, and their adapter files
hold the whole backbone (see :func:`adaptor_peft.save_adaptor`)."""


def resolve_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Everything ``prepare_model(model, method, **options)`` adds, with every default filled in:
    ``config`` (an :class:`AdaptorConfig`), ``lora`` (r, alpha, dropout, targets) and ``rank`` (parallel
    adapter), as the method takes them. Two calls that resolve equal add the same modules. In
    ``adaptor+lora``, ``dropout`` is the adaptors' (LoRA keeps none). Raises :class:`MethodOptionError`."""
    if method not in METHODS:
        raise MethodOptionError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    spec = METHODS[method]
    _check(method, options, spec.options)
    rest = dict(options)
    settings: dict[str, Any] = {}
    if spec.adaptors is not None:
        settings["config"] = _adaptor_config(method, rest, *spec.adaptors)
    if spec.options >= LORA_OPTIONS:
        settings["lora"] = {k: rest.pop(k, default) for k, default in LORA_DEFAULTS.items()}
        settings["lora"]["targets"] = list(settings["lora"]["targets"])
    if "rank" in spec.options:
        settings["rank"] = rest.pop("rank", PARALLEL_RANK)
    return settings


def resolved_settings(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every setting ``prepare_model(model, method, **options)`` uses, flat and JSON-ready: ``method``,
    ``config.<AdaptorConfig field>``, ``lora.<r, alpha, dropout, targets>`` and ``rank``, as the method
    takes them. Two equal results train the same modules the same way. Raises :class:`MethodOptionError`."""
    flat: dict[str, Any] = {"method": method}
    for key, value in resolve_options(method, options).items():
        value = value.to_dict() if isinstance(value, AdaptorConfig) else value
        if isinstance(value, dict):
            flat.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            flat[key] = value
    return json.loads(json.dumps(flat))  # tuples as lists, as they read back from a file


def prepare_model(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Applies transfer ``method`` to ``model`` (see the module docstring) and returns it, with exactly the
    method's parameters and the classification head trainable. Raises :class:`MethodOptionError` for
    options the method does not take, before the model changes (a corrected call can follow on it)."""
    settings = resolve_options(method, options)
    if getattr(model, "peft_method", None) is not None:
        raise RuntimeError(f"prepare_model: the model was already prepared with {model.peft_method['method']!r}")
    if "config" in settings and has_builtin_adaptors(model):
        plain = ", ".join(m for m, spec in METHODS.items() if spec.adaptors is None)
        raise MethodOptionError(
            f"method {method!r}: the backbone has Adaptor-T and Adaptor-S built in; transfer it with {plain}"
        )
    if "lora" in settings:  # checked first: an adaptor injected before LoRA failed would stay behind
        names = [name for name, _ in model.named_modules()]
        missing = [t for t in settings["lora"]["targets"] if not any(n == t or n.endswith(f".{t}") for n in names)]
        if missing:
            raise MethodOptionError(f"method {method!r}: LoRA targets {missing} match no module of the model")
    try:
        if "config" in settings:
            inject_adaptor(model, settings["config"], freeze_backbone=False)
        if "lora" in settings:
            _lora(model, **settings["lora"])
        if "rank" in settings:
            _parallel_adapter(model, settings["rank"])
    except ValueError as err:  # an option that does not fit this model: blocks, t_groups, LoRA targets
        raise MethodOptionError(f"method {method!r}: {err}") from err
    head = is_head(model)
    trains = METHODS[method].trains(model)
    set_trainable(model, lambda n: is_peft_parameter(n, model) or head(n) or trains(n))
    model.peft_method = {
        "method": method,
        "options": {k: (v.to_dict() if isinstance(v, AdaptorConfig) else v) for k, v in options.items()},
    }
    return model
