"""What a recipe builds (adaptor_peft.training.build): the model with its method, where the data comes from,
the precision, and which recipe key an error is blamed on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptor_peft.training import RecipeError, build_model, load_recipe
from adaptor_peft.training.build import data_source, mixed_precision

TINY = ["model=vim_tiny_patch16_224", "model_options.depth=2", "img_size=32"]


def test_data_comes_from_the_local_layout_then_the_builtin_data_then_the_hub():
    recipe = {"task": "t", "data": {"local": {"dir": "t"}, "builtin": {"name": "digits"}, "hub": {"id": "x/t"}}}
    assert data_source(recipe, "/data") == ("local", {"dir": "t"}, Path("/data"))
    assert data_source(recipe, None) == ("builtin", {"name": "digits"}, None)
    assert data_source({**recipe, "data": {"hub": {"id": "x/t"}}}, None) == ("hub", {"id": "x/t"}, None)
    with pytest.raises(RecipeError, match="'t' has no local data layout; drop --data-root"):
        data_source({**recipe, "data": {"hub": {"id": "x/t"}}}, "/data")
    with pytest.raises(RecipeError, match=r"no hub copy.*expected layout: \{'dir': 't'\}"):
        data_source({**recipe, "data": {"local": {"dir": "t"}}}, None)


def test_auto_precision_is_none_without_a_gpu_and_a_named_one_is_kept():
    assert mixed_precision("bf16") == "bf16" and mixed_precision("no") == "no"
    if not torch.cuda.is_available():
        assert mixed_precision("auto") == "no"


def test_the_model_is_the_backbone_with_its_method_applied():
    model = build_model(load_recipe("vtab1k/cifar", [*TINY, "method=lora"]))
    assert model.peft_method.name == "lora" and model.head.out_features == 100
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("head.") for name in trainable)


def test_options_the_backbone_or_method_does_not_take_are_blamed_on_the_recipe():
    with pytest.raises(RecipeError, match=r"model_options=\{'depth': 2, 'deptj': 2\}.*unexpected keyword.*'deptj'"):
        build_model(load_recipe("vtab1k/cifar", [*TINY, "model_options.deptj=2"]))
    with pytest.raises(RecipeError, match=r"method='lora' with method_options=\{'r': 'eight'\}.*must be of type int"):
        build_model(load_recipe("vtab1k/cifar", [*TINY, "method=lora", "method_options.r=eight"]))
    with pytest.raises(RecipeError, match=r"model='vim_tiny' is not a backbone.*vim_tiny_patch16_224"):
        build_model(load_recipe("vtab1k/cifar", [*TINY, "model=vim_tiny"]))


@pytest.mark.parametrize(
    "model, option, expected",
    [("vim_tiny_patch16_224", "d_state=two", "int"), ("vmamba_tiny_s1l8", "depths=two", r"tuple\[int, \.\.\.\]"),
     ("mambavision_tiny_1k", "depths=two", r"Sequence\[int\]")],
)  # fmt: skip
def test_a_model_option_of_the_wrong_type_is_named_before_the_model_is_built(model, option, expected):
    key, _, value = option.partition("=")
    message = rf"model='{model}': model_options\.{key}='{value}' must be of type {expected}$"
    with pytest.raises(RecipeError, match=message):
        build_model(load_recipe("vtab1k/cifar", [*TINY, f"model={model}", f"model_options.{option}"]))


def test_an_error_that_the_options_did_not_cause_is_not_blamed_on_them(monkeypatch, checkpoint):
    """A bug or a failing checkpoint read is raised as it is: a RecipeError would send the user to fix
    options that are fine."""

    def broken(*args, **kwargs):
        raise TypeError("a bug while loading")

    monkeypatch.setattr("adaptor_peft.models.registry.load_checkpoint", broken)
    with pytest.raises(TypeError, match="a bug while loading") as raised:
        build_model(load_recipe("vtab1k/cifar", [*TINY, "model_options.d_state=8", f"checkpoint={checkpoint}"]))
    assert type(raised.value) is TypeError
    monkeypatch.undo()

    def unlucky(*args, **kwargs):
        raise ValueError("a bug while freezing")

    monkeypatch.setattr("adaptor_peft.adaptors.methods.set_trainable", unlucky)
    with pytest.raises(ValueError, match="a bug while freezing") as raised:
        build_model(load_recipe("vtab1k/cifar", [*TINY, "method=lora", "method_options.r=4"]))
    assert not isinstance(raised.value, RecipeError)
