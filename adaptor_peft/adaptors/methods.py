"""Transfer methods as classes in one registry, and ``prepare_model``, which applies one.

| method | trains (besides the head) |
|---|---|
| ``linear_probe`` | nothing |
| ``full`` | everything |
| ``bias`` | every bias |
| ``partial`` | the SSM's own parameters: A / D / conv / Δ bias (MambaPEFT's partial tuning) |
| ``lora`` | HF ``peft`` LoRA on ``targets`` (default ``in_proj``) |
| ``parallel_adapter`` | a bottleneck MLP beside every mixer, zero-initialised output (``rank``, default 32) |
| ``adaptor_t`` / ``adaptor_s`` / ``adaptor`` | Adaptor-T, Adaptor-S, both (options: :class:`AdaptorConfig` fields) |
| ``adaptor+lora`` | both adaptors and LoRA (options of both; ``lora={...}`` / ``adaptor={...}`` name the part) |
| ``adaptor_booster`` | everything, with the adaptors added (the paper's "booster"; options: :class:`AdaptorConfig`) |

A method is a :class:`Method` subclass registered with :func:`register_method`, as peft's tuners are: it
owns its name, its options (a dataclass that checks its values), how it changes a model, which backbone
parameters it trains, how its parameters are grouped in reports, how it merges and unloads, and what an
adapter file records of it. ``prepare_model``, the reports, adapter files, the process pool and the suite
read the registry, so a new method is one class.

Options are checked before the model changes: an unknown option, a value of the wrong type or range, or
one that contradicts the method raises :class:`MethodOptionError`, one line naming the option and what is
allowed (a recipe's ``method_options`` arrive here unchanged). The applied method is recorded on the model
as ``model.peft_method``; everything that asks what a model was prepared with reads that attribute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..models.protocol import declared, find_blocks, find_mixers
from .config import AdaptorConfig
from .inject import add_adaptors, chosen_mixers, has_builtin_adaptors, is_head, set_trainable
from .options import MethodOptionError, as_json, build_options, check_options, field_types

__all__ = ["METHODS", "Method", "MethodOptionError", "get_method", "prepare_model", "register_method"]


class Method:
    """A transfer method. A subclass sets :attr:`name` and, if it takes options, :attr:`Options`, and
    overrides what it does differently from this base (which adds nothing and trains nothing)."""

    name: ClassVar[str]
    """What users, recipes and adapter files call the method."""
    key: ClassVar[str] = ""
    """The namespace of its options: in flat settings (``lora.r``) and in a combination (``lora={...}``)."""
    Options: ClassVar[type | None] = None
    """A dataclass whose fields are the options and whose ``__post_init__`` raises ``ValueError`` for a bad
    value, naming the field; None: no options."""
    groups: ClassVar[tuple[tuple[str, str], ...]] = ()
    """(marker in the names of the parameters it adds, their group in parameter reports) pairs."""
    trains_backbone: ClassVar[bool] = False
    """Does it train every backbone parameter? Then it needs no pretrained checkpoint, and its adapter files
    hold the whole backbone."""
    step_cost: ClassVar[float] = 3.0
    """A training step's cost relative to a frozen backbone's forward pass (forward + backward is about 3):
    the process pool starts the most expensive runs first."""

    def __init__(self, **options: Any):
        self.given = self.recorded(options)
        """The options as the user gave them: what adapter files and ``model.peft_method`` record."""
        self.options = self.parse(options)

    @classmethod
    def recorded(cls, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` as a record keeps them: JSON-ready."""
        return as_json(options)

    @classmethod
    def normalised(cls, options: dict[str, Any]) -> dict[str, Any]:
        """A record's options as this version reads them (older records spelled some differently)."""
        return options

    @classmethod
    def part_of(cls, combination: str, options: dict[str, Any]) -> Method:
        """The method as a part of ``combination``, which names it in errors, its options under its key."""
        member = cls.__new__(cls)
        member.given = cls.recorded(options)
        member.options = cls.parse(options, combination, f"{cls.key}.")
        return member

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        """Option name -> type."""
        return field_types(cls.Options) if cls.Options is not None else {}

    @classmethod
    def parse(cls, options: dict[str, Any], method: str | None = None, prefix: str = "") -> Any:
        """The checked options (an :attr:`Options` instance, or None); ``method`` and ``prefix`` name them
        in errors when the method is part of a combination. Raises :class:`MethodOptionError`."""
        method = method or cls.name
        if cls.Options is None:
            check_options(method, options, {}, prefix)
            return None
        return build_options(method, cls.Options, options, prefix)

    def check(self, model: nn.Module) -> None:
        """Raises ``ValueError`` if the options do not fit ``model``; runs before anything changes."""

    def apply(self, model: nn.Module) -> None:
        """Adds the method's modules to ``model``."""

    def trains(self, model: nn.Module) -> Callable[[str], bool]:
        """Which of ``model``'s backbone parameters (by name) it trains, besides those it adds and the head."""
        return lambda name: self.trains_backbone

    def adds(self, name: str) -> bool:
        """Was parameter (or buffer) ``name`` added by this method?"""
        return any(marker in f".{name}" for marker, _ in self.groups)

    def lr_scales(self, model: nn.Module) -> dict[int, float]:
        """``id(parameter)`` -> learning-rate multiple for parameters of ``model`` it adds that do not say their
        own (modules with ``zero_initialised()`` and ``lr_scale`` do; see
        :func:`adaptor_peft.training.optim.lr_scales`)."""
        return {}

    def merge(self, model: nn.Module) -> Method:
        """Folds what it can into the backbone's weights and returns the method left on the model."""
        return self

    def unload(self, model: nn.Module) -> None:
        """Removes the modules it added."""

    def settings(self) -> dict[str, Any]:
        """Every setting with its default filled in, flat and JSON-ready (``lora.r``): two methods with
        equal settings train the same modules the same way."""
        return {"method": self.name, **{f"{self.key}.{k}": v for k, v in as_json(self.options or {}).items()}}

    def record(self) -> dict[str, Any]:
        """``{"method", "options"}``, JSON-ready: what an adapter file stores to rebuild the method."""
        return {"method": self.name, "options": self.given}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.given})"


METHODS: dict[str, type[Method]] = {}
"""Every registered method by name, in registration order."""


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: makes ``cls`` available to :func:`prepare_model`, recipes and the CLI by its name."""
    if cls.name in METHODS:
        raise ValueError(f"register_method: a method named {cls.name!r} is registered already ({METHODS[cls.name]})")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The registered method ``name``; raises :class:`MethodOptionError` naming the choices."""
    if name not in METHODS:
        raise MethodOptionError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def report_groups() -> dict[str, str]:
    """Marker -> report group of every registered method's parameters."""
    return {marker: group for method in METHODS.values() for marker, group in method.groups}


@register_method
class LinearProbe(Method):
    name = "linear_probe"
    step_cost = 1.0  # a frozen backbone needs no backward


@register_method
class FullTuning(Method):
    name = "full"
    trains_backbone = True


@register_method
class BiasTuning(Method):
    name = "bias"

    def trains(self, model: nn.Module) -> Callable[[str], bool]:
        extra = declared(model, "ssm_biases")  # VMamba's Δ bias
        return lambda name: name.endswith(".bias") or name in extra


@register_method
class PartialTuning(Method):
    name = "partial"

    def trains(self, model: nn.Module) -> Callable[[str], bool]:
        return declared(model, "ssm_parameters").__contains__


class AdaptorMethod(Method):
    """Adds Adaptor-T and/or Adaptor-S. Options: :class:`AdaptorConfig`'s fields, and ``config`` (an
    AdaptorConfig or a dict of its fields) which they override. ``switches`` fixes ``temporal`` and
    ``spatial``: an option or a config dict may repeat them but not contradict them, and an AdaptorConfig
    may not turn off an adaptor the method adds (its switches are on by default, so on says nothing, and
    a record leaves them out)."""

    key = "adaptor"
    Options = AdaptorConfig
    groups = ((".adaptor_t.", "Adaptor-T"), (".adaptor_s.", "Adaptor-S"))
    switches: ClassVar[tuple[tuple[str, bool], ...]] = ()
    """(``temporal`` / ``spatial``, the value the method sets) pairs."""

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        return {**field_types(AdaptorConfig), "config": AdaptorConfig | dict[str, Any]}

    @classmethod
    def parse(cls, options: dict[str, Any], method: str | None = None, prefix: str = "") -> AdaptorConfig:
        method = method or cls.name
        check_options(method, options, cls.option_types(), prefix)
        chosen = dict(options)
        config = chosen.pop("config", None) or {}
        if isinstance(config, dict):
            check_options(method, config, field_types(AdaptorConfig), f"{prefix}config.")
            stated = config
        else:
            config = config.to_dict()
            stated = {name: False for name in ("temporal", "spatial") if config[name] is False}
        for name, value in cls.switches:
            for source, where in ((chosen, prefix), (stated, f"{prefix}config.")):
                if source.get(name, value) != value:
                    raise MethodOptionError(
                        f"method {method!r}: option {where}{name}={source[name]!r}, but the method sets {value!r}"
                    )
        return build_options(method, AdaptorConfig, {**config, **chosen, **dict(cls.switches)}, prefix)

    @classmethod
    def recorded(cls, options: dict[str, Any]) -> dict[str, Any]:
        options = dict(options)
        if isinstance(options.get("config"), AdaptorConfig):
            config = options["config"].to_dict()
            options["config"] = {k: v for k, v in config.items() if k not in ("temporal", "spatial") or v is False}
        return as_json(options)

    @classmethod
    def normalised(cls, options: dict[str, Any]) -> dict[str, Any]:
        """As this version reads a record of adaptor_peft 0.2.0: without the switches its records kept in
        ``config`` (the method's name decides them), and without the options since removed that leave the
        loaded modules as they are (``t_init``, ``s_init``: initialisations the weights replace, and
        ``s_rank=0``). An Adaptor-S with a channel bottleneck (``s_rank`` > 0) is refused by name."""
        dropped = ("t_init", "s_init")
        config = options.get("config") if isinstance(options.get("config"), dict) else {}
        for where, values in (("", options), ("config.", config)):
            if values.get("s_rank", 0):
                raise MethodOptionError(
                    f"method {cls.name!r}: option {where}s_rank={values['s_rank']}: Adaptor-S's channel "
                    "bottleneck was removed after adaptor_peft 0.2.0 (it lost the ablation); load this adapter "
                    "with that version (pip install 'adaptor-peft==0.2.0')"
                )
        options = {k: v for k, v in options.items() if k not in (*dropped, "s_rank")}
        if config:
            gone = (*dropped, "s_rank", "temporal", "spatial")
            options["config"] = {k: v for k, v in config.items() if k not in gone}
        return options

    def check(self, model: nn.Module) -> None:
        if has_builtin_adaptors(model):
            plain = ", ".join(name for name, m in METHODS.items() if not issubclass(m, AdaptorMethod | Combination))
            raise ValueError(f"the backbone has Adaptor-T and Adaptor-S built in; transfer it with {plain}")
        chosen_mixers(model, self.options)

    def apply(self, model: nn.Module) -> None:
        add_adaptors(model, self.options)

    def unload(self, model: nn.Module) -> None:
        for _, mixer in find_mixers(model):
            mixer.adaptor_t = mixer.adaptor_s = None


@register_method
class AdaptorTOnly(AdaptorMethod):
    name = "adaptor_t"
    switches = (("temporal", True), ("spatial", False))
    step_cost = 3.3  # the memory read adds about a tenth (benchmarks/overhead.py)


@register_method
class AdaptorSOnly(AdaptorMethod):
    name = "adaptor_s"
    switches = (("temporal", False), ("spatial", True))


@register_method
class Adaptors(AdaptorMethod):
    name = "adaptor"
    switches = (("temporal", True), ("spatial", True))
    step_cost = 3.3


@register_method
class AdaptorBooster(AdaptorMethod):
    """The adaptors on a backbone that trains too; which adaptors is the options' choice (both by default)."""

    name = "adaptor_booster"
    trains_backbone = True
    step_cost = 3.3


@dataclass
class LoRAOptions:
    r: int = 8
    """Rank of the update."""
    alpha: float = 16.0
    """Scale: the update is ``alpha / r * B A``."""
    dropout: float = 0.0
    """Dropout on LoRA's input."""
    targets: list[str] = field(default_factory=lambda: ["in_proj"])
    """Module names (or name endings) to wrap."""
    lr_scale: float = 1.0
    """Learning rate of the zero-initialised B as a multiple of the recipe's (LoRA+, Hayou et al., 2024,
    as the adaptors' ``lr_scale``); 1: plain LoRA."""

    def __post_init__(self) -> None:
        self.targets = list(self.targets)
        valid = {
            "r": self.r >= 1,
            "alpha": self.alpha > 0,
            "dropout": 0 <= self.dropout < 1,
            "targets": bool(self.targets),
            "lr_scale": self.lr_scale > 0,
        }
        for name, ok in valid.items():
            if not ok:
                raise ValueError(f"LoRA option {name}: invalid value {getattr(self, name)!r}")


def names_target(name: str, target: str) -> bool:
    """Does module ``name`` match ``target``, a module name or a name ending (as peft's ``target_modules``)?"""
    return name == target or name.endswith(f".{target}")


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Puts ``module`` in the place of ``model``'s submodule ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _remove_lora(model: nn.Module, merge: bool) -> None:
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            if merge:
                module.merge()
            replace_module(model, name, module.get_base_layer())


@register_method
class LoRA(Method):
    """HF ``peft``'s LoRA, with its weights float32 in a half-precision backbone (as the adaptors)."""

    name = key = "lora"
    Options = LoRAOptions
    groups = ((".lora_", "LoRA"),)

    def targets(self, model: nn.Module) -> list[str]:
        """The targets to wrap in ``model``: every one given, each of which must match a module."""
        return self.options.targets

    def check(self, model: nn.Module) -> None:
        names = [name for name, _ in model.named_modules()]
        missing = [t for t in self.targets(model) if not any(names_target(n, t) for n in names)]
        if missing:
            raise ValueError(f"LoRA targets {missing} match no module of the model")

    def apply(self, model: nn.Module) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        o = self.options
        config = LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=self.targets(model))
        inject_adapter_in_model(config, model)
        for name, parameter in model.named_parameters():
            if self.adds(name):
                parameter.data = parameter.data.to(torch.promote_types(parameter.dtype, torch.float32))

    def lr_scales(self, model: nn.Module) -> dict[int, float]:
        return {id(p): self.options.lr_scale for n, p in model.named_parameters() if ".lora_B." in f".{n}"}

    def merge(self, model: nn.Module) -> Method:
        _remove_lora(model, merge=True)
        return LinearProbe()

    def unload(self, model: nn.Module) -> None:
        _remove_lora(model, merge=False)


class ParallelAdapter(nn.Module):
    """Bottleneck MLP on the mixer's input whose output is added to the mixer's (zero at init)."""

    def __init__(self, dim: int, rank: int = 32, lr_scale: float = 1.0):
        super().__init__()
        self.lr_scale = lr_scale
        self.down = nn.Linear(dim, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def zero_initialised(self) -> list[nn.Parameter]:
        """The up-projection, zero at init, whose learning rate ``lr_scale`` multiplies."""
        return [self.up.weight, self.up.bias]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In the adapter's precision (float32 in a half-precision backbone), given back in ``x``'s."""
        return self.up(self.act(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


@dataclass
class ParallelAdapterOptions:
    rank: int = 32
    """Width of the bottleneck."""
    lr_scale: float = 1.0
    """Learning rate of the zero-initialised up-projection as a multiple of the recipe's; 1: plain."""

    def __post_init__(self) -> None:
        for name, ok in {"rank": self.rank >= 1, "lr_scale": self.lr_scale > 0}.items():
            if not ok:
                raise ValueError(f"parallel adapter option {name}: invalid value {getattr(self, name)!r}")


@register_method
class ParallelAdapterTuning(Method):
    name = key = "parallel_adapter"
    Options = ParallelAdapterOptions
    groups = ((".parallel_adapter.", "parallel adapter"),)

    def check(self, model: nn.Module) -> None:
        if not find_blocks(model):
            raise TypeError(f"parallel_adapter: {type(model).__name__} has no blocks with a mixer (AdaptableBlock)")

    def apply(self, model: nn.Module) -> None:
        for _, block in find_blocks(model):
            weight = next(block.parameters())
            dtype = torch.promote_types(weight.dtype, torch.float32)
            adapter = ParallelAdapter(block.width, self.options.rank, self.options.lr_scale)
            block.parallel_adapter = adapter.to(weight.device, dtype)

    def unload(self, model: nn.Module) -> None:
        for _, block in find_blocks(model):
            block.parallel_adapter = None


class Combination(Method):
    """Methods applied together. Each part's options go under its key (``lora={"dropout": 0.1}``); a flat
    option goes to the one part that takes it, and one that several parts take must be given under a key."""

    parts: ClassVar[tuple[type[Method], ...]]

    def __init__(self, **options: Any):
        self.given = as_json(options)
        self.members = self._split(options)
        self.options = None

    @classmethod
    def normalised(cls, options: dict[str, Any]) -> dict[str, Any]:
        for part in cls.parts:
            options = part.normalised(options)
            if isinstance(options.get(part.key), dict):
                options = {**options, part.key: part.normalised(options[part.key])}
        return options

    def _split(self, options: dict[str, Any]) -> list[Method]:
        keys = {part.key: part for part in self.parts}
        nested = {key: options[key] for key in keys if key in options}
        for key, value in nested.items():
            if not isinstance(value, dict):
                raise MethodOptionError(f"method {self.name!r}: option {key} must be a mapping of {key}'s options")
        flat: dict[str, dict[str, Any]] = {key: {} for key in keys}
        for name, value in options.items():
            if name in nested:
                continue
            owners = [key for key, part in keys.items() if name in part.option_types()]
            if len(owners) > 1:
                spelled = " or ".join(f"{key}={{{name!r}: ...}}" for key in owners)
                raise MethodOptionError(f"method {self.name!r}: option {name} is ambiguous; give it as {spelled}")
            if not owners:
                takes = sorted({*keys, *(n for part in self.parts for n in part.option_types())})
                raise MethodOptionError(f"method {self.name!r} has no option {name}; it takes: {', '.join(takes)}")
            flat[owners[0]][name] = value
        members = []
        for key, part in keys.items():
            both = set(flat[key]) & set(nested.get(key, {}))
            if both:
                raise MethodOptionError(
                    f"method {self.name!r}: option {sorted(both)[0]} is given twice, flat and in {key}"
                )
            members.append(part.part_of(self.name, {**flat[key], **nested.get(key, {})}))
        return members

    def check(self, model: nn.Module) -> None:
        for member in self.members:
            member.check(model)

    def apply(self, model: nn.Module) -> None:
        for member in self.members:
            member.apply(model)

    def trains(self, model: nn.Module) -> Callable[[str], bool]:
        tests = [member.trains(model) for member in self.members]
        return lambda name: any(test(name) for test in tests)

    def adds(self, name: str) -> bool:
        return any(member.adds(name) for member in self.members)

    def merge(self, model: nn.Module) -> Method:
        left = [kept for member in self.members if not isinstance(kept := member.merge(model), LinearProbe)]
        return left[0] if len(left) == 1 else LinearProbe() if not left else self

    def unload(self, model: nn.Module) -> None:
        for member in self.members:
            member.unload(model)

    def settings(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for member in self.members:
            merged.update(member.settings())
        return {**merged, "method": self.name}


@register_method
class AdaptorsWithLoRA(Combination):
    name = "adaptor+lora"
    parts = (Adaptors, LoRA)
    groups = (*Adaptors.groups, *LoRA.groups)
    step_cost = Adaptors.step_cost


def resolved_settings(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``get_method(method)(**options).settings()``: every setting, flat (see :meth:`Method.settings`)."""
    return get_method(method)(**options).settings()


def from_record(record: dict[str, Any]) -> Method:
    """The method of an adapter file's record ``{"method", "options"}``. Raises :class:`MethodOptionError`."""
    method = get_method(record.get("method"))
    return method(**method.normalised(record.get("options", {})))


def is_peft_parameter(name: str, model: nn.Module) -> bool:
    """Was this parameter (or buffer) of ``model`` added by the transfer method on it? Adaptors built into
    the backbone (:mod:`adaptor_peft.adaptors.backbones`) were not."""
    method = getattr(model, "peft_method", None)
    return method is not None and method.adds(name)


def prepare_model(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Applies transfer ``method`` to ``model`` (see the module docstring) and returns it, with exactly the
    method's parameters and the classification head trainable. Raises :class:`MethodOptionError` for
    options the method does not take or that do not fit the model, before the model changes (a corrected
    call can follow on it)."""
    chosen = get_method(method)(**options)
    if getattr(model, "peft_method", None) is not None:
        raise RuntimeError(f"prepare_model: the model was already prepared with {model.peft_method.name!r}")
    try:
        chosen.check(model)
    except ValueError as err:  # an option that does not fit this model: blocks, t_groups, LoRA targets
        raise MethodOptionError(f"method {method!r}: {err}") from err
    chosen.apply(model)
    model.peft_method = chosen
    head, trains = is_head(model), chosen.trains(model)
    set_trainable(model, lambda name: chosen.adds(name) or head(name) or trains(name))
    return model


def inject_adaptor(model: nn.Module, config: AdaptorConfig | None = None, freeze_backbone: bool = True) -> nn.Module:
    """Inserts the adaptors of ``config`` (default :class:`AdaptorConfig`) into ``model`` and returns it:
    ``prepare_model`` with the adaptor method that ``config``'s switches name (``adaptor``, ``adaptor_t``,
    ``adaptor_s``), or with ``freeze_backbone=False`` the booster, which keeps every parameter trainable
    (the paper's "booster" use on a pretrained model, or its "backbone" use when training from scratch).
    The adaptors start as the identity: the injected model computes what it computed before."""
    config = config or AdaptorConfig()
    if not freeze_backbone:
        return prepare_model(model, AdaptorBooster.name, config=config)
    switches = (("temporal", config.temporal), ("spatial", config.spatial))
    name = next(m.name for m in (Adaptors, AdaptorTOnly, AdaptorSOnly) if m.switches == switches)
    return prepare_model(model, name, config=config)
