"""Backbones: official key layouts, official computation, and the Vim / VMamba specifics."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch

import adaptor_peft
from adaptor_peft.models.vim import BiMambaMixer, resample_pos_embed
from adaptor_peft.models.vmamba import cross_merge, cross_scan
from tests.support.models import TINY, tiny
from tests.support.official import vim_forward, vmamba_forward

REFERENCE = Path(__file__).parents[1] / "support" / "reference"  # copies of the official state-dict listings
OFFICIAL_NAMES = {
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny_patch16_224",
    "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny_patch16_stride8_224",  # noqa: E501
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small_patch16_224",
    "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small_patch16_stride8_224",  # noqa: E501
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": "vim_base_patch16_224",
    "vmamba_tiny_s1l8": "vmamba_tiny_s1l8",
    "vmamba_small_s2l15": "vmamba_small_s2l15",
    "vmamba_base_s2l15": "vmamba_base_s2l15",
    "vanilla_vmamba_tiny": "vmamba_tiny_v0",
}


def official_listing() -> dict[str, dict[str, tuple[int, ...]]]:
    """Keys and shapes per official model, from the reference listings (block 0 of each stage shown)."""
    listing, current = {}, None
    for path in sorted(REFERENCE.glob("*_state_dict.txt")):
        for line in path.read_text().splitlines():
            if line.startswith("== "):
                current = listing.setdefault(line.split()[1], {})
            elif (m := re.match(r"\s+(\S+) \(([\d, ]*)\)", line)) and current is not None:
                current[m.group(1)] = tuple(int(x) for x in m.group(2).split(",") if x.strip())
    return listing


@pytest.mark.parametrize("official", list(OFFICIAL_NAMES))
def test_keys_and_shapes_equal_the_official_listing(official):
    expected = official_listing()[official]
    with torch.device("meta"):
        model = adaptor_peft.create_model(OFFICIAL_NAMES[official])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: ours.get(k) for k in expected} == expected
    declared = re.search(rf"== {official} params=([\d.]+)M nkeys= (\d+)", "".join(
        p.read_text() for p in REFERENCE.glob("*.txt")))  # fmt: skip
    assert len(ours) == int(declared.group(2))
    assert f"{sum(v.numel() for v in model.state_dict().values()) / 1e6:.2f}" == declared.group(1)


def test_every_registered_model_builds_and_is_a_timm_model():
    for name in adaptor_peft.list_models():
        with torch.device("meta"):
            model = timm.create_model(name)
        assert model.pretrained_cfg["classifier"] in dict(model.named_modules())
        assert model.get_classifier().out_features == 1000


@pytest.mark.parametrize("kind", ["vim", "vim_stride"])
def test_vim_computes_what_the_official_code_computes(kind):
    model = tiny(kind).double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = vim_forward(model.state_dict(), images, stride=TINY[kind]["stride"])
    with torch.no_grad():
        assert torch.allclose(model(images), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["vmamba_v2", "vmamba_v2_ratio2", "vmamba_v0"])
def test_vmamba_computes_what_the_official_code_computes(kind):
    model = tiny(kind).double()
    images = torch.randn(2, 3, 64, 48, dtype=torch.float64)  # non-square: rows and columns must not swap
    expected = vmamba_forward(model.state_dict(), images, v0=kind == "vmamba_v0")
    with torch.no_grad():
        assert torch.allclose(model(images), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", list(TINY))
def test_float32_forward_and_backward(kind):
    model = tiny(kind).train()
    size = (32, 32) if kind.startswith("vim") else (64, 64)
    logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_vim_middle_class_token_lands_at_m_over_2():
    model = tiny("vim", img_size=40)  # 5x5 = 25 patches: the class token goes to index 12
    captured = {}
    model.layers[0].register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    with torch.no_grad():
        model.pos_embed.zero_()
        patches, _ = model.patch_embed(torch.randn(1, 3, 40, 40))
        model.patch_embed.register_forward_hook(lambda module, args, out: (patches, out[1]))
        model(torch.randn(1, 3, 40, 40))
    x = captured["x"]
    assert x.shape[1] == 26
    assert torch.equal(x[0, 12], model.cls_token[0, 0])
    assert torch.equal(x[0, :12], patches[0, :12]) and torch.equal(x[0, 13:], patches[0, 12:])


def test_vim_backward_branch_is_the_exact_mirror_of_the_forward_branch():
    """With the backward branch's weights equal to the forward ones, the mixer commutes with flipping."""
    torch.manual_seed(0)
    mixer = BiMambaMixer(16, d_state=4).double()
    with torch.no_grad():
        for forward, backward in zip(*mixer.directions(), strict=True):
            if isinstance(forward, torch.nn.Module):
                forward, backward = torch.nn.utils.parameters_to_vector(forward.parameters()), backward
                torch.nn.utils.vector_to_parameters(forward, backward.parameters())
            else:
                backward.copy_(forward)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(mixer(x.flip(1)), mixer(x).flip(1), atol=1e-12)
        mixer.dt_proj_b.bias.add_(0.5)  # and the check has teeth: different weights break the symmetry
        assert not torch.allclose(mixer(x.flip(1)), mixer(x).flip(1), atol=1e-6)


def test_resample_pos_embed_keeps_the_class_token_in_the_middle():
    old = torch.randn(1, 4 * 4 + 1, 8)
    assert resample_pos_embed(old, (4, 4), (4, 4)) is old
    new = resample_pos_embed(old, (6, 5), (4, 4))
    assert new.shape == (1, 31, 8)
    assert torch.equal(new[0, 15], old[0, 8])
    constant = torch.ones(1, 17, 8)  # a constant field stays constant under bicubic resizing
    assert torch.allclose(resample_pos_embed(constant, (3, 7), (4, 4)), torch.ones(1, 22, 8), atol=1e-6)
    with pytest.raises(ValueError, match="expected 10"):
        resample_pos_embed(torch.randn(1, 17, 8), (4, 4), (3, 3))


def test_vim_runs_at_other_image_sizes():
    model = tiny("vim")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 40)).shape == (1, 1000)
        with pytest.raises(ValueError, match="does not tile"):
            model(torch.randn(1, 3, 36, 36))


def test_vmamba_cross_scan_and_merge():
    x = torch.randn(2, 3, 4, 5)
    xs = cross_scan(x)
    assert torch.equal(xs[:, 0], x.flatten(2)) and torch.equal(xs[:, 1], x.transpose(2, 3).flatten(2))
    assert torch.equal(xs[:, 2], xs[:, 0].flip(-1)) and torch.equal(xs[:, 3], xs[:, 1].flip(-1))
    # With an identity scan, every direction lands back in row-major order: the merge is 4x the input.
    assert torch.allclose(cross_merge(xs, 4, 5), 4 * x.flatten(2))
    only_columns = torch.zeros_like(xs)
    only_columns[:, 1] = xs[:, 1]
    assert torch.equal(cross_merge(only_columns, 4, 5), x.flatten(2))


def test_reset_classifier_and_features():
    for kind in ("vim", "vmamba_v0"):
        model = tiny(kind)
        model.reset_classifier(7)
        size = 32 if kind == "vim" else 64
        images = torch.randn(2, 3, size, size)
        features = model.forward_features(images)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        assert torch.equal(model.forward_head(features), model(images))
        assert model(images).shape == (2, 7)


def test_peft_lora_on_vim_projections_changes_the_output():
    """Every projection is called as a module, so LoRA wrappers from HF peft are on the compute path."""
    from peft import LoraConfig, get_peft_model

    model = tiny("vim")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
    targets = ["in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj"]
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    for target in targets:
        wrapped = lora.base_model.model.layers[0].mixer.get_submodule(target)
        assert hasattr(wrapped, "lora_B"), target
        with torch.no_grad():
            torch.nn.init.zeros_(wrapped.lora_B["default"].weight)
    with torch.no_grad():
        assert torch.allclose(lora(images), before, atol=1e-6)  # LoRA starts as a no-op
        for target in targets:  # and each wrapped projection, alone, is on the compute path
            weight = lora.base_model.model.layers[0].mixer.get_submodule(target).lora_B["default"].weight
            weight.fill_(0.5)
            assert (lora(images) - before).abs().max() > 1e-4, target  # float noise is ~1e-7
            weight.zero_()


@pytest.mark.parametrize("kind", ["vim", "vmamba_v2"])
def test_bfloat16_autocast_on_cpu(kind):
    model = tiny(kind)
    size = 32 if kind == "vim" else 64
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        full = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(images)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.05 * full.abs().max()
