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
