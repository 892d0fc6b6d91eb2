"""The method registry: a new method is one class, combinations namespace their parts' options."""

import dataclasses

import pytest
import torch

from adaptor_peft import (
    Method,
    create_model,
    load_adaptor,
    parameter_report,
    prepare_model,
    register_method,
    save_adaptor,
)
from adaptor_peft.adaptors import METHODS, MethodOptionError, merge_adaptor, unload_adaptor
from adaptor_peft.adaptors.methods import LoRA, LoRAOptions, from_record, resolved_settings
from adaptor_peft.training.pool import expected_cost
from tests.support.models import perturb


def vim() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2,
                        num_classes=3).eval()  # fmt: skip


@dataclasses.dataclass
class XProjOptions(LoRAOptions):
    targets: list[str] = dataclasses.field(default_factory=lambda: ["x_proj", "x_proj_b"])


class XProjLoRA(LoRA):
    """MambaPEFT's LoRA on x_proj, as a user would add it: one class."""

    name = "test_lora_x_proj"
    Options = XProjOptions
    step_cost = 2.5


@pytest.fixture
def registered():
    register_method(XProjLoRA)
    yield XProjLoRA
    del METHODS[XProjLoRA.name]


def test_a_method_of_one_class_works_everywhere(registered, tmp_path):
    model = prepare_model(vim(), "test_lora_x_proj", r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all((".x_proj" in n and ".lora_" in n) or n.startswith("head.") for n in trainable)
    report = parameter_report(model)
    assert report.method == "test_lora_x_proj" and report.groups["LoRA"] == sum(
        p.numel() for n, p in model.named_parameters() if ".lora_" in n
    )
    assert resolved_settings("test_lora_x_proj", {"r": 2})["lora.targets"] == ["x_proj", "x_proj_b"]
    assert expected_cost({"method": "test_lora_x_proj", "epochs": 2}) == 5.0
    perturb(model, ".lora_B.", scale=1.0)  # B starts at zero
    images = torch.randn(2, 3, 32, 32)
    expected = model(images)
    save_adaptor(model, tmp_path)
    fresh = load_adaptor(vim(), tmp_path)
    assert fresh.peft_method.name == "test_lora_x_proj" and fresh.peft_method.options.r == 2
    torch.testing.assert_close(fresh(images), expected)
    merged = merge_adaptor(fresh)
    assert merged.peft_method.name == "linear_probe" and not any(".lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(images), expected, rtol=1e-5, atol=1e-5)


def test_a_name_is_registered_once(registered):
    with pytest.raises(ValueError, match="'test_lora_x_proj' is registered already"):
        register_method(XProjLoRA)


def test_option_values_are_checked_by_the_methods_dataclass():
    for method, options, message in [
        ("lora", dict(r=0), "LoRA option r: invalid value 0"),
        ("lora", dict(dropout=1.0), "LoRA option dropout"),
        ("parallel_adapter", dict(rank=0), "parallel adapter option rank: invalid value 0"),
    ]:
        with pytest.raises(MethodOptionError, match=f"method '{method}': {message}"):
            prepare_model(vim(), method, **options)


def test_a_combination_takes_namespaced_options_and_refuses_ambiguous_ones():
    model = prepare_model(vim(), "adaptor+lora", lora={"dropout": 0.25, "r": 2}, adaptor={"dropout": 0.1}, t_rank=2)
    in_proj = model.layers[0].mixer.in_proj
    assert in_proj.lora_dropout["default"].p == 0.25 and in_proj.lora_A["default"].weight.shape[0] == 2
    assert model.layers[0].mixer.adaptor_t.dropout.p == 0.1 and model.layers[0].mixer.adaptor_t.down.shape[1] == 2
    settings = model.peft_method.settings()
    assert settings["lora.dropout"] == 0.25 and settings["adaptor.dropout"] == 0.1 and settings["adaptor.t_rank"] == 2
    with pytest.raises(MethodOptionError, match=r"option dropout is ambiguous; give it as adaptor=\{'dropout'"):
        prepare_model(vim(), "adaptor+lora", dropout=0.1)
    with pytest.raises(
        MethodOptionError,
        match=r"'adaptor\+lora' has no option lora\.rank; it takes: alpha, dropout, lr_scale, r, targets",
    ):
        prepare_model(vim(), "adaptor+lora", lora={"rank": 2})
    with pytest.raises(MethodOptionError, match="option r is given twice, flat and in lora"):
        prepare_model(vim(), "adaptor+lora", r=2, lora={"r": 4})
    with pytest.raises(MethodOptionError, match="option lora must be a mapping"):
        prepare_model(vim(), "adaptor+lora", lora=4)


def test_merging_a_combination_leaves_the_part_that_cannot_merge():
    model = prepare_model(vim(), "adaptor+lora", t_rank=2, lora={"r": 2})
    merged = merge_adaptor(model)
    assert merged.peft_method.name == "adaptor" and merged.peft_method.record()["options"] == {"t_rank": 2}
    unload_adaptor(merged)
    assert merged.layers[0].mixer.adaptor_t is None and not hasattr(merged, "peft_method")


def test_every_registered_method_says_how_it_trains_and_costs():
    for name, method in METHODS.items():
        assert method.name == name and method.step_cost > 0
    assert {n for n, m in METHODS.items() if m.trains_backbone} == {"full", "adaptor_booster"}
    assert expected_cost({"method": "linear_probe", "epochs": 3}) < expected_cost({"method": "lora", "epochs": 3})
    assert expected_cost({"method": "lora"}) < expected_cost({"method": "adaptor"})


def test_a_method_without_options_refuses_any():
    class Frozen(Method):
        name = "test_frozen"

    with pytest.raises(MethodOptionError, match="'test_frozen' has no option r; it takes: none"):
        Frozen(r=2)


def test_records_of_removed_options_load_when_they_change_nothing_and_are_refused_by_name_otherwise():
    plain = {
        "method": "adaptor",
        "options": {"config": {"t_init": 0.0, "s_init": "kaiming", "s_rank": 0}, "t_init": 0.1},
    }
    assert from_record(plain).settings() == prepare_model(vim(), "adaptor").peft_method.settings()
    for options in ({"s_rank": 8}, {"config": {"s_rank": 8}}):
        with pytest.raises(MethodOptionError, match=r"s_rank=8: Adaptor-S's channel bottleneck was removed"):
            from_record({"method": "adaptor", "options": options})
    with pytest.raises(MethodOptionError, match="has no option t_init"):
        prepare_model(vim(), "adaptor", t_init=0.1)  # no longer an option of this version


def test_an_error_inside_a_method_is_not_blamed_on_its_options():
    class Broken(Method):
        name = "test_broken"

        def apply(self, model):
            raise ValueError("a bug in apply")

    register_method(Broken)
    try:
        with pytest.raises(ValueError, match="a bug in apply") as raised:
            prepare_model(vim(), "test_broken")
        assert not isinstance(raised.value, MethodOptionError)
    finally:
        del METHODS["test_broken"]
