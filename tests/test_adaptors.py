"""Adaptor-T / Adaptor-S injection, prepare_model methods and adapter files (first tests of issue 3)."""

from __future__ import annotations

import pytest
import torch

from adaptor_peft.adaptors import AdapterFileError, inject_adaptor, load_adaptor, prepare_model, save_adaptor

from .test_models import tiny

SIZES = {"vim": 32, "vmamba_v2": 64, "vmamba_v0": 64}


@pytest.mark.parametrize("kind", list(SIZES))
def test_injection_is_exact_at_init_and_trains_only_adaptors_and_head(kind):
    model = tiny(kind)
    images = torch.randn(2, 3, SIZES[kind], SIZES[kind])
    with torch.no_grad():
        before = model(images)
    inject_adaptor(model)
    with torch.no_grad():
        assert torch.allclose(model(images), before, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adaptor_" in n or n.startswith(("head.", "classifier.head.")) for n in trainable)
    model.train()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    with pytest.raises(RuntimeError, match="already has adaptors"):
        inject_adaptor(model)


def test_inject_rejects_unsupported_models():
    with pytest.raises(TypeError, match="no Vim"):
        inject_adaptor(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("method", ["adaptor", "lora", "parallel_adapter", "bias", "adaptor+lora"])
def test_adapter_file_round_trip(tmp_path, method):
    torch.manual_seed(0)
    model = prepare_model(tiny("vim"), method)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    save_adaptor(model, tmp_path / "adapter")
    fresh = load_adaptor(tiny("vim"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(fresh(images), expected, atol=1e-6)
    other = tiny("vim")
    with torch.no_grad():
        other.layers[0].mixer.in_proj.weight.add_(1.0)
    with pytest.raises(AdapterFileError, match="other backbone weights"):
        load_adaptor(other, tmp_path / "adapter")
