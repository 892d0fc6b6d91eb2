"""MambaPEFT's LoRA variants: LoRA on x_proj, and LoRA_p(X) on the x half of in_proj."""

import pytest
import torch

from adaptor_peft import create_model, load_adaptor, param_groups, prepare_model, save_adaptor
from adaptor_peft.adaptors import MethodOptionError, merge_adaptor, unload_adaptor
from adaptor_peft.adaptors.mambapeft import HalfLoRALinear
from tests.support.models import perturb


def vim(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2,
                         num_classes=3)  # fmt: skip
    return model.to(dtype).eval()


def test_half_lora_updates_only_the_x_half_against_a_float64_reference():
    torch.manual_seed(1)
    base = torch.nn.Linear(6, 8, bias=False).double()
    layer = HalfLoRALinear(base, 4, r=2, alpha=3.0, dropout=0.0).double()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    A, B, W = layer.lora_A.weight, layer.lora_B.weight, base.weight
    expected = torch.cat([x @ W[:4].T + 1.5 * x @ A.T @ B.T, x @ W[4:].T], dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, A, B), grad)
    want = torch.autograd.grad(expected, (x, A, B), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_lora_p_x_is_exact_at_init_merges_unloads_and_round_trips(tmp_path):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = vim()(images)
    model = prepare_model(vim(), "lora_p_x", r=4, lr_scale=16.0)
    with torch.no_grad():
        torch.testing.assert_close(model(images), plain)
        perturb(model, ".lora_B.", scale=0.1)  # B starts at zero
        tuned = model(images)
    assert (tuned - plain).abs().max() > 1e-3
    groups = param_groups(model, 1e-3, 0.0)
    lora_b = {id(p) for n, p in model.named_parameters() if ".lora_B." in n}
    assert any(g["lr"] == pytest.approx(16e-3) and {id(p) for p in g["params"]} == lora_b for g in groups)
    save_adaptor(model, tmp_path)
    fresh = load_adaptor(vim(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), tuned)
        merged = merge_adaptor(fresh)
        assert not any(isinstance(m, HalfLoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(images), tuned, rtol=1e-5, atol=1e-5)
    unloaded = unload_adaptor(model)
    with torch.no_grad():
        torch.testing.assert_close(unloaded(images), plain)


def test_lora_x_proj_wraps_the_projections_a_backbone_has_and_refuses_one_without():
    model = prepare_model(vim(), "lora_x_proj", r=2)
    wrapped = {n.rsplit(".lora_", 1)[0] for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}
    assert wrapped == {f"layers.{i}.mixer.{p}" for i in range(2) for p in ("x_proj", "x_proj_b")}
    vmamba = create_model("vmamba_tiny_s1l8", dims=16, depths=(1, 1, 1, 1), num_classes=3)
    missing = r"'lora_x_proj': LoRA targets \['x_proj', 'x_proj_b'\] match no module"
    with pytest.raises(MethodOptionError, match=missing):
        prepare_model(vmamba, "lora_x_proj")
    with pytest.raises(MethodOptionError, match=r"LoRA_p\(X\): .* has an odd output width"):
        prepare_model(vim(), "lora_p_x", targets=["head"])
