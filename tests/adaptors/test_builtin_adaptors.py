"""A backbone with the adaptors built in (``vim_nano_patch4_32_adaptor``): its adaptors are backbone
parameters, which the transfer methods, adapter files and reports treat as such."""

from __future__ import annotations

import re
import warnings

import pytest
import timm
import torch

import adaptor_peft as ap
from adaptor_peft.adaptors import MethodOptionError, is_peft_parameter
from adaptor_peft.adaptors.backbones import BUILTIN_ADAPTORS
from adaptor_peft.training.optim import param_groups
from tests.support.models import perturb

NAME = "vim_nano_patch4_32_adaptor"
BUILTIN = (".adaptor_t.", ".adaptor_s.")


def builtin_names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if any(m in f".{n}" for m in BUILTIN)]


@pytest.fixture(scope="module")
def shipped() -> dict[str, torch.Tensor]:
    return ap.create_model(NAME, checkpoint="pretrained").state_dict()


def fresh(shipped: dict[str, torch.Tensor], num_classes: int = 5) -> torch.nn.Module:
    return ap.create_model(NAME, checkpoint=shipped, num_classes=num_classes).eval()


def test_the_model_is_the_default_backbone_with_every_adaptor_built_in_and_pretrained(shipped):
    model = ap.create_model(NAME)
    plain = ap.create_model("vim_nano_patch4_32")
    added = set(model.state_dict()) - set(plain.state_dict())
    assert added and all(any(m in f".{k}" for m in BUILTIN) for k in added)
    assert set(plain.state_dict()) <= set(model.state_dict())
    assert model.builtin_adaptors == BUILTIN_ADAPTORS and getattr(model, "peft_method", None) is None
    gammas = [v for k, v in shipped.items() if k.endswith("adaptor_t.gamma")]
    assert len(gammas) == 8 and all(g.abs().sum() > 0 for g in gammas)  # trained, not the identity at init
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped weights are this version's: nothing to warn about
        timm_model = timm.create_model(NAME, pretrained=True)  # timm's own entry point loads the shipped weights
    gamma = "layers.0.mixer.adaptor_t.gamma"
    assert torch.equal(timm_model.state_dict()[gamma], shipped[gamma])


def test_methods_that_add_adaptors_are_refused_before_the_model_changes(shipped):
    model = fresh(shipped)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("adaptor", "adaptor_t", "adaptor_s", "adaptor+lora", "adaptor_booster"):
        with pytest.raises(MethodOptionError, match=re.escape(f"method {method!r}") + ".*built in.*lora"):
            ap.prepare_model(model, method)
    with pytest.raises(MethodOptionError, match="built in"):
        ap.inject_adaptor(model)
    assert getattr(model, "peft_method", None) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="features_only"):
        ap.create_model(NAME, features_only=True)


def test_lora_freezes_the_builtin_adaptors_and_reports_only_what_it_added(shipped):
    model = ap.prepare_model(fresh(shipped), "lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or n.startswith("head.")}
    assert not trainable & set(builtin_names(model))
    assert not any(is_peft_parameter(n, model) for n in builtin_names(model))
    report = ap.parameter_report(model)
    assert report.added == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)


def test_full_trains_the_builtin_adaptors_at_the_backbones_learning_rate(shipped):
    model = ap.prepare_model(fresh(shipped), "full")
    assert all(p.requires_grad for p in model.parameters())
    assert {group["lr"] for group in param_groups(model, 1e-3, 0.05)} == {1e-3}


def test_an_adapter_file_fingerprints_the_builtin_adaptors_as_backbone(shipped, tmp_path):
    model = ap.prepare_model(fresh(shipped), "lora")
    perturb(model, ".lora_B.", scale=1.0)  # B starts at zero
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    ap.save_adaptor(model, tmp_path / "lora")
    saved = ap.load_adaptor(fresh(shipped), tmp_path / "lora")
    torch.testing.assert_close(saved(x), expected)
    stored = (tmp_path / "lora" / "adaptor.safetensors").read_bytes()
    assert b"adaptor_t" not in stored and b"adaptor_s" not in stored  # the backbone's, not the adapter's

    other = fresh(shipped)
    with torch.no_grad():
        other.get_parameter("layers.3.mixer.adaptor_t.gamma").add_(0.1)  # other built-in adaptor weights
    with pytest.raises(ap.AdapterFileError, match="other backbone weights"):
        ap.load_adaptor(other, tmp_path / "lora")


def test_unload_keeps_the_builtin_adaptors(shipped):
    model = fresh(shipped)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    ap.prepare_model(model, "lora")
    ap.unload_adaptor(model)
    assert builtin_names(model) and model.builtin_adaptors == BUILTIN_ADAPTORS
    torch.testing.assert_close(model(x), expected)
