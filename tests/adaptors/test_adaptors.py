"""Adaptor-T / Adaptor-S against explicit float64 references, injection, prepare_model methods and adapter files."""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adaptor_peft import save_adaptor
from adaptor_peft.adaptors import (
    METHODS,
    AdapterFileError,
    AdaptorConfig,
    AdaptorS,
    AdaptorT,
    MethodOptionError,
    find_mixers,
    inject_adaptor,
    load_adaptor,
    merge_adaptor,
    prepare_model,
    unload_adaptor,
)
from adaptor_peft.adaptors.methods import from_record
from adaptor_peft.models.layers import project_scan_input
from adaptor_peft.ops import native
from tests.support.models import SIZES, assert_shared_projection_changes_nothing, images_for, logits, perturb, tiny

BACKEND_ENV = "ADAPTOR_PEFT_SCAN_BACKEND"
BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="no C compiler"))]


# --- Adaptor-T against the formula -------------------------------------------------------------------------


def adaptor_t_reference(t, u, delta, A, B, C, D, z, delta_bias, direction, mask=None):
    """``y_i = (C_i · h̃_i + D u_i) silu(z_i)`` with ``h̃_i = h_i + γ ⊙ Σ_k c_{i,k} h(p_k)``, written out
    loop by loop from the formula (plain recurrence, literal positions and interpolation, softmax per group;
    the offsets from the mean of the scan input, the same for every position).
    ``mask`` (batch, dim, len) multiplies the memory term, as a fixed dropout mask would."""
    batch, dim, length = u.shape
    E, S, K = t.channels, t.groups, t.locations
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    delta = torch.log1p(torch.exp(delta))  # softplus
    per_channel = []
    for X in (B, C):  # (batch, groups, N, L) or (batch, N, L) -> (batch, dim, N, L)
        X = X[:, None] if X.dim() == 3 else X
        per_channel.append(
            torch.cat([X[:, g : g + 1].expand(-1, dim // X.shape[1], -1, -1) for g in range(X.shape[1])], 1)
        )
    Bc, Cc = per_channel
    h, states = torch.zeros(batch, dim, A.shape[1], dtype=u.dtype), []
    for i in range(length):
        h = torch.exp(delta[:, :, i, None] * A) * h + delta[:, :, i, None] * u[:, :, i, None] * Bc[:, :, :, i]
        states.append(h)
    H = torch.stack(states, dim=2)  # (batch, dim, L, N)
    out = torch.zeros(batch, dim, length, dtype=u.dtype)
    directions = range(t.directions) if direction is None else [direction]
    width = E // S
    for j, d in enumerate(directions):
        for i in range(length):
            low = u[:, j * E : (j + 1) * E, i] @ t.down[d].T  # (batch, rank)
            weight_logits = low @ t.weight_up[d].T + t.weight_bias[d]  # (batch, S*K), group-major
            pooled = u[:, j * E : (j + 1) * E].mean(-1) @ t.down[d].T
            offsets = pooled @ t.offset_up[d].T if t.learned else torch.zeros_like(weight_logits)
            for g in range(S):
                cs = slice(j * E + g * width, j * E + (g + 1) * width)
                c = torch.softmax(weight_logits[:, g * K : (g + 1) * K], dim=-1)
                for b in range(batch):
                    memory = torch.zeros(width, A.shape[1], dtype=u.dtype)
                    for k in range(K):
                        p = ((t.anchor[d, g, k] + offsets[b, g * K + k]) * (length - 1)).clamp(0, length - 1)
                        lo = math.floor(p.item())
                        hi = min(lo + 1, length - 1)
                        frac = p - lo
                        memory = memory + c[b, k] * ((1 - frac) * H[b, cs, lo] + frac * H[b, cs, hi])
                    gamma = t.gamma[d, g * width : (g + 1) * width]
                    if mask is not None:
                        gamma = gamma * mask[b, cs, i]
                    adapted = H[b, cs, i] + gamma[:, None] * memory
                    y = (adapted * Cc[b, cs, :, i]).sum(-1) + D[cs] * u[b, cs, i]
                    out[b, cs, i] = y if z is None else y * z[b, cs, i] * torch.sigmoid(z[b, cs, i])
    return out


def random_adaptor_t(style: str, anchor: str, channels: int = 32, seed: int = 0) -> AdaptorT:
    torch.manual_seed(seed)
    directions = 2 if style == "vim" else 4
    t = AdaptorT(channels, directions, locations=2, groups=2, rank=3, anchor=anchor).double()
    with torch.no_grad():
        t.weight_up.normal_(0, 0.5)
        t.weight_bias.normal_(0, 0.5)
        t.gamma.normal_(0, 1.0)
        if t.learned:
            t.offset_up.normal_(0, 0.3)
            t.anchor.uniform_(-0.1, 1.1)  # some locations clamp to the first or last state
            t.anchor[0, 0, 0], t.anchor[-1, -1, -1] = -0.5, 1.5
    return t


def scan_inputs(style: str, t: AdaptorT, length: int = 7, nstate: int = 3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    dim = t.channels * (1 if style == "vim" else t.directions)
    batch = 2

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    def sequence(scale=1.0):  # (batch, dim, length) in the layout the mixer gives: Vim's channels adjacent
        if style == "vim":
            return randn(batch, length, dim, scale=scale).detach().transpose(1, 2).requires_grad_()
        return randn(batch, dim, length, scale=scale)

    bc_shape = (batch, nstate, length) if style == "vim" else (batch, t.directions, nstate, length)
    return dict(
        u=sequence(),
        delta=sequence(scale=0.5),
        A=(-torch.exp(torch.randn(dim, nstate, generator=g, dtype=torch.float64) * 0.5)).requires_grad_(),
        B=randn(*bc_shape),
        C=randn(*bc_shape),
        D=randn(dim),
        z=sequence() if style == "vim" else None,  # as the mixers call it: Vim gates, VMamba not
        delta_bias=None if style == "vim" else randn(dim, scale=0.5),
        delta_softplus=True,
        direction=1 if style == "vim" else None,
    )


def gradients(output: torch.Tensor, tensors: dict[str, torch.Tensor], seed: int = 2) -> dict[str, torch.Tensor]:
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=output.dtype)
    names = [n for n, x in tensors.items() if x is not None and x.requires_grad]
    grads = torch.autograd.grad((output * weights).sum(), [tensors[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(tensors[n]) if g is None else g for n, g in zip(names, grads, strict=True)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("anchor", ["learned", "static"])
@pytest.mark.parametrize("style", ["vim", "vmamba"])
def test_adaptor_t_scan_equals_the_formula_with_gradients(monkeypatch, style, anchor, backend):
    monkeypatch.setenv(BACKEND_ENV, backend)
    t = random_adaptor_t(style, anchor)
    inputs = scan_inputs(style, t)
    args = {k: v for k, v in inputs.items() if k not in ("delta_softplus", "direction")}
    expected = adaptor_t_reference(t, direction=inputs["direction"], **args)
    got = t.scan(**inputs)
    assert got.dtype == torch.float64 and got.shape == inputs["u"].shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    tensors = {**dict(t.named_parameters()), **args}
    # read through a transpose, as Vim's mixer reads it: the gradient reaching the scan is not contiguous
    want = gradients(expected.transpose(1, 2), tensors)
    have = gradients(t.scan(**inputs).transpose(1, 2), tensors)
    assert set(have) >= {"gamma", "down", "weight_up", "weight_bias", "u", "delta", "B", "C", "D"}
    if anchor == "learned":
        assert {"offset_up", "anchor"} <= set(have) and want["offset_up"].abs().max() > 1e-3
        assert "anchor" in dict(t.named_parameters())
    else:
        assert "anchor" not in dict(t.named_parameters()) and "anchor" in dict(t.named_buffers())
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")
    assert want["down"].abs().max() > 1e-3 and want["weight_up"].abs().max() > 1e-3


@pytest.mark.parametrize("direction", [None, 1])
def test_adaptor_t_predictor_is_the_same_in_either_layout_of_u(direction):
    """Vim hands the scan input with channels adjacent, the other mixers with positions adjacent; the predictor
    takes a different product for each, and both must give the same locations, weights and gradients."""
    t = random_adaptor_t("vmamba", "learned")
    width = t.channels * (t.directions if direction is None else 1)
    values = torch.randn(2, width, 9, dtype=torch.float64)
    results = []
    for u in (values.clone(), values.transpose(1, 2).contiguous().transpose(1, 2)):
        u.requires_grad_()
        location, weights = t.locations_and_weights(u, direction)
        assert location.shape == (2, width // t.channels * t.groups, t.locations)
        assert weights.shape == (2, width // t.channels * t.groups, t.locations, 9)
        mixed = (location * torch.arange(location.numel()).view(location.shape)).sum() + (weights**3).sum()
        results.append((location, weights, *torch.autograd.grad(mixed, [u, t.down, t.offset_up])))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_vim_takes_adaptor_t_predictor_input_in_x_proj_product_for_the_same_results():
    model = prepare_model(tiny("vim", num_classes=10), "adaptor_t").double()
    perturb(model, ".adaptor_t.")
    assert_shared_projection_changes_nothing(model, images_for("vim").double())


def test_an_x_proj_with_a_bias_keeps_its_own_product():
    t = AdaptorT(8, 2, locations=2, groups=2, rank=3)
    u = torch.randn(2, 8, 5)
    for bias in (False, True):
        x_proj = torch.nn.Linear(8, 6, bias=bias)
        out, projected = project_scan_input(t, x_proj, u, 1)
        torch.testing.assert_close(out, x_proj(u.transpose(1, 2)))
        assert (projected is None) == bias
        if not bias:
            torch.testing.assert_close(projected, F.linear(u.transpose(1, 2), t.down[1]))


def test_adaptor_t_memory_term_is_not_negligible_in_the_reference_test():
    t = random_adaptor_t("vim", "learned")
    inputs = scan_inputs("vim", t)
    args = {k: v for k, v in inputs.items() if k not in ("delta_softplus", "direction")}
    with_memory = adaptor_t_reference(t, direction=1, **args)
    with torch.no_grad():
        t.gamma.zero_()
    without = adaptor_t_reference(t, direction=1, **args)
    assert (with_memory - without).abs().max() > 1e-2
    torch.testing.assert_close(t.scan(**inputs), without, rtol=1e-10, atol=1e-10)


def test_adaptor_t_starts_as_the_plain_scan():
    torch.manual_seed(0)
    t = AdaptorT(32, 2, locations=2, groups=2, rank=3).double()
    inputs = scan_inputs("vim", t)
    args = {k: v for k, v in inputs.items() if k not in ("delta_softplus", "direction")}
    with torch.no_grad():
        plain = adaptor_t_reference(t, direction=1, **args)  # gamma is zero at init
    assert t.gamma.abs().max() == 0
    torch.testing.assert_close(t.scan(**inputs), plain, rtol=1e-12, atol=1e-12)


def test_adaptor_t_gradcheck_on_its_parameters(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    torch.manual_seed(3)
    t = AdaptorT(4, 2, locations=2, groups=2, rank=2).double()
    with torch.no_grad():
        for p in (t.weight_up, t.weight_bias, t.offset_up, t.gamma):
            p.normal_(0, 0.5)
        t.anchor.uniform_(0.1, 0.9)
    g = torch.Generator().manual_seed(4)
    u, delta, Bm, Cm = (torch.randn(1, 4, 5, generator=g, dtype=torch.float64) for _ in range(4))
    Bm, Cm = Bm[:, :3], Cm[:, :3]
    A = -torch.rand(4, 3, generator=g, dtype=torch.float64) - 0.5
    D, z = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(1, 4, 5, generator=g, dtype=torch.float64)
    names = ["gamma", "down", "offset_up", "weight_up", "weight_bias", "anchor"]
    params = tuple(getattr(t, n).detach().clone().requires_grad_() for n in names)

    def run(*values):
        state = dict(zip(names, values, strict=True))
        return torch.func.functional_call(t, state, (u, delta, A, Bm, Cm, D, z), dict(delta_softplus=True, direction=0))

    t.forward = t.scan  # functional_call calls forward
    assert torch.autograd.gradcheck(run, params, eps=1e-6, atol=1e-7)


def test_adaptor_t_dropout_path_applies_the_mask_to_the_memory_term(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    t = random_adaptor_t("vim", "learned")
    inputs = scan_inputs("vim", t)
    mask = (torch.rand(inputs["u"].shape, generator=torch.Generator().manual_seed(5)) > 0.5).double() * 2

    class FixedMask(torch.nn.Module):
        p = 0.5

        def forward(self, x):
            return x * mask

    t.dropout = FixedMask()
    t.train()
    args = {k: v for k, v in inputs.items() if k not in ("delta_softplus", "direction")}
    expected = adaptor_t_reference(t, direction=1, mask=mask, **args)
    torch.testing.assert_close(t.scan(**inputs), expected, rtol=1e-10, atol=1e-10)
    t.eval()  # eval: no dropout, the fused path
    torch.testing.assert_close(t.scan(**inputs), adaptor_t_reference(t, direction=1, **args), rtol=1e-10, atol=1e-10)


def test_adaptor_t_rejects_groups_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="t_groups=3"):
        AdaptorT(32, 2, groups=3)


# --- Adaptor-S against separate dilated convolutions -------------------------------------------------------


@pytest.mark.parametrize("dilations", [(1, 2, 3), (1,)])
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("share", [True, False])
def test_adaptor_s_equals_the_sum_of_dilated_depthwise_convolutions(share, kernel_size, dilations):
    torch.manual_seed(0)
    channels = width = 6
    s = AdaptorS(channels, kernel_size, dilations, share_kernel=share).double()
    x = torch.randn(2, 9, 11, channels, dtype=torch.float64)
    assert torch.equal(s(x), x)  # zero scale at init: the identity
    with torch.no_grad():
        s.scale.normal_()
    assert s.kernel.shape == (1 if share else len(dilations), width, 1, kernel_size, kernel_size)
    assert s.scale.shape == (len(dilations) if share else 1, width)
    tensors = {"kernel": s.kernel, "scale": s.scale}
    maps = x.permute(0, 3, 1, 2)
    branches = []
    for i, d in enumerate(dilations):
        kernel = s.kernel[0 if share else i]
        scale = s.scale[i if share else 0]
        conv = F.conv2d(maps, kernel, dilation=d, padding=d * (kernel_size // 2), groups=width)
        branches.append(conv * scale[None, :, None, None])
    added = sum(branches).permute(0, 2, 3, 1)
    expected = x + added
    got = s(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    want, have = gradients(expected, tensors), gradients(s(x), tensors)
    for name in want:
        assert want[name].abs().max() > 0
        torch.testing.assert_close(have[name], want[name], rtol=1e-12, atol=1e-12)
    weights, offsets = s.taps()
    assert weights.shape == (kernel_size**2 * len(dilations), width) and len(offsets) == len(weights)


# --- injection ---------------------------------------------------------------------------------------------


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
    with pytest.raises(RuntimeError, match="already prepared with 'adaptor'"):
        inject_adaptor(model)


def test_inject_rejects_unsupported_models():
    with pytest.raises(TypeError, match="no selective-scan mixers"):
        inject_adaptor(torch.nn.Sequential(torch.nn.Linear(2, 2)))


VARIANTS = {
    "static": dict(t_anchor="static"),
    "separate_kernels": dict(s_share_kernel=False),
    "inner": dict(s_position="inner"),
    "block0": dict(blocks=[0]),
    "spatial_only": dict(temporal=False),
    "temporal_only": dict(spatial=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["vim", "vmamba_v2"])
def test_injection_variants_are_exact_at_init_and_their_parameters_matter(kind, variant):
    config = AdaptorConfig(**VARIANTS[variant])
    model = tiny(kind).double()
    images = images_for(kind)
    before = logits(model, images)
    inject_adaptor(model, config)
    assert torch.equal(logits(model, images), before) or torch.allclose(logits(model, images), before, atol=1e-12)
    mixers = find_mixers(model)
    for i, (_, mixer) in enumerate(mixers):
        chosen = config.blocks is None or i in config.blocks
        assert (mixer.adaptor_t is not None) == (chosen and config.temporal)
        reaches_logits = kind != "vim" or i < len(mixers) - 1  # a Vim's head reads the class token only
        assert (mixer.adaptor_s is not None) == (chosen and config.spatial and reaches_logits)
        if mixer.adaptor_s is not None:
            assert mixer.adaptor_s.position == config.s_position
            assert mixer.adaptor_s.share_kernel == config.s_share_kernel
            width = mixer.out_proj.out_features if config.s_position == "output" else mixer.out_proj.in_features
            assert mixer.adaptor_s.channels == width
            assert mixer.adaptor_s.kernel.shape[1] == width
        if mixer.adaptor_t is not None:
            assert mixer.adaptor_t.learned == (config.t_anchor == "learned")
            assert not mixer.adaptor_t.weight_up.any()
            assert not mixer.adaptor_t.gamma.any()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".adaptor_" in n or n.startswith(("head.", "classifier.head.")) for n in names)
    if config.blocks == [0]:
        first = mixers[0][0]
        assert all(n.startswith(first + ".") for n in names if ".adaptor_" in n)
    if config.t_anchor == "static":
        assert not any(n.endswith("adaptor_t.anchor") for n, _ in model.named_parameters())
        assert sum(n.endswith("adaptor_t.anchor") for n, _ in model.named_buffers()) == len(mixers)
    for marker in (".adaptor_t.", ".adaptor_s."):
        if not any(marker in n for n in names):
            continue
        probe = tiny(kind).double()
        inject_adaptor(probe, config)
        torch.manual_seed(7)
        assert perturb(probe, marker) > 0
        assert (logits(probe, images) - before).abs().max() > 1e-4, f"{marker} changes nothing"


def test_static_anchors_are_saved_and_restored(tmp_path):
    model = inject_adaptor(tiny("vim"), AdaptorConfig(t_anchor="static"))
    torch.manual_seed(1)
    perturb(model, ".adaptor_")
    with torch.no_grad():  # a buffer the file must carry: changing it must survive a round trip
        model.layers[0].mixer.adaptor_t.anchor.mul_(0.5)
    images = images_for("vim")
    expected = logits(model, images)
    save_adaptor(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adaptor.safetensors")
    assert torch.equal(saved["layers.0.mixer.adaptor_t.anchor"], model.layers[0].mixer.adaptor_t.anchor)
    fresh = load_adaptor(tiny("vim"), tmp_path)
    assert not fresh.layers[0].mixer.adaptor_t.learned
    assert torch.equal(fresh.layers[0].mixer.adaptor_t.anchor, model.layers[0].mixer.adaptor_t.anchor)
    torch.testing.assert_close(logits(fresh, images), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("config", [dict(temporal=False), dict(spatial=False), dict(blocks=[1], s_position="inner")])
def test_injected_partial_configs_round_trip_through_files(tmp_path, config):
    model = inject_adaptor(tiny("vim"), AdaptorConfig(**config))
    torch.manual_seed(2)
    perturb(model, ".adaptor_")
    images = images_for("vim")
    expected = logits(model, images)
    save_adaptor(model, tmp_path)
    fresh = load_adaptor(tiny("vim"), tmp_path)
    assert fresh.peft_method.options == model.peft_method.options
    torch.testing.assert_close(logits(fresh, images), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "options, option",
    [
        (dict(t_anchor="sideways"), "t_anchor"),
        (dict(s_kernel_size=4), "s_kernel_size"),
        (dict(s_position="middle"), "s_position"),
        (dict(s_dilations=()), "s_dilations"),
        (dict(t_locations=0), "t_locations"),
        (dict(dropout=1.0), "dropout"),
        (dict(temporal=False, spatial=False), "temporal/spatial"),
    ],
)
def test_config_validation_names_the_option(options, option):
    with pytest.raises(ValueError, match=f"AdaptorConfig.{option}"):
        AdaptorConfig(**options)


def test_config_blocks_and_groups_are_checked_against_the_model():
    with pytest.raises(ValueError, match=r"AdaptorConfig.blocks=\[5\].*2 blocks"):
        inject_adaptor(tiny("vim"), AdaptorConfig(blocks=[5]))
    with pytest.raises(ValueError, match=r"AdaptorConfig\.blocks"):
        inject_adaptor(tiny("vim"), AdaptorConfig(blocks=[-1]))
    with pytest.raises(ValueError, match="t_groups=5"):
        inject_adaptor(tiny("vim"), AdaptorConfig(t_groups=5))


def test_config_round_trips_through_dict_and_json():
    config = AdaptorConfig(
        blocks=[3, 1, 1], t_anchor="static", s_dilations=[1, 4], s_share_kernel=False, extra={"a": 1}
    )
    assert config.blocks == [1, 3] and config.s_dilations == (1, 4)
    data = config.to_dict()
    assert data["s_dilations"] == [1, 4] and data["extra"] == {"a": 1}
    assert AdaptorConfig.from_dict(data) == config
    assert AdaptorConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json()) == data
    assert AdaptorConfig.from_dict({}) == AdaptorConfig()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['t_rnak'\]"):
        AdaptorConfig.from_dict({"t_rnak": 2})


# --- training steps ----------------------------------------------------------------------------------------


def sgd_step(model: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """One SGD step on all parameters (frozen ones included, as a careless caller would); returns the
    parameters before the step."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(images_for(kind)), torch.tensor([1, 2]))
    loss.backward()
    optimizer.step()
    return before


@pytest.mark.parametrize("kind", ["vim", "vmamba_v2"])
def test_a_peft_training_step_changes_only_trainable_parameters(kind):
    model = inject_adaptor(tiny(kind))
    before = sgd_step(model, kind)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if name in trainable:
            continue
        assert p.grad is None and torch.equal(p, before[name]), name
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    # at init only gamma, the Adaptor-S scales and the head see a gradient (everything else is multiplied by them)
    assert {n.rsplit(".", 1)[1] for n in changed} == {"gamma", "scale", "weight", "bias"}
    assert any(n.endswith("adaptor_t.gamma") for n in changed) and any(n.endswith("adaptor_s.scale") for n in changed)


def test_booster_keeps_everything_trainable():
    kind = "vim"
    model = inject_adaptor(tiny(kind), freeze_backbone=False)
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    model.eval()
    assert all(p.requires_grad for p in model.parameters())
    before = sgd_step(model, kind)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    backbone = {n for n in before if ".adaptor_" not in n}
    assert len(changed & backbone) > len(backbone) // 2
    assert any(n.endswith("in_proj.weight") for n in changed)


# --- prepare_model -----------------------------------------------------------------------------------------

VIM_BLOCK = {
    "bias": ["conv1d.bias", "dt_proj.bias", "conv1d_b.bias", "dt_proj_b.bias"],
    "partial": [
        "A_log",
        "D",
        "A_b_log",
        "D_b",
        "conv1d.weight",
        "conv1d.bias",
        "conv1d_b.weight",
        "conv1d_b.bias",
        "dt_proj.bias",
        "dt_proj_b.bias",
    ],
    "lora": ["in_proj.lora_A.default.weight", "in_proj.lora_B.default.weight"],
    "adaptor_t": [
        "adaptor_t.down",
        "adaptor_t.weight_up",
        "adaptor_t.weight_bias",
        "adaptor_t.anchor",
        "adaptor_t.offset_up",
        "adaptor_t.gamma",
    ],
    "adaptor_s": ["adaptor_s.kernel", "adaptor_s.scale"],
}


def expected_vim_trainable(method: str, names: set[str]) -> set[str]:
    head = {"head.weight", "head.bias"}
    mixer = {
        "linear_probe": [],
        "full": None,
        "adaptor_booster": None,
        "bias": VIM_BLOCK["bias"],
        "partial": VIM_BLOCK["partial"],
        "lora": VIM_BLOCK["lora"],
        "parallel_adapter": [],
        "adaptor_t": VIM_BLOCK["adaptor_t"],
        "adaptor_s": VIM_BLOCK["adaptor_s"],
        "adaptor": VIM_BLOCK["adaptor_t"] + VIM_BLOCK["adaptor_s"],
        "adaptor+lora": VIM_BLOCK["adaptor_t"] + VIM_BLOCK["adaptor_s"] + VIM_BLOCK["lora"],
        "lora_x_proj": [f"{p}.lora_{ab}.default.weight" for p in ("x_proj", "x_proj_b") for ab in "AB"],
        "lora_p_x": ["in_proj.lora_A.weight", "in_proj.lora_B.weight"],
    }[method]
    if mixer is None:
        return names
    expected = head | {f"layers.{i}.mixer.{n}" for i in range(2) for n in mixer}
    expected -= {f"layers.1.mixer.{n}" for n in VIM_BLOCK["adaptor_s"]}  # the last Vim block has no Adaptor-S
    if method == "bias":
        expected.add("patch_embed.proj.bias")
    if method == "parallel_adapter":
        expected |= {
            f"layers.{i}.parallel_adapter.{m}.{p}" for i in range(2) for m in ("down", "up") for p in ("weight", "bias")
        }
    return expected


@pytest.mark.parametrize("method", sorted(METHODS))
def test_prepare_model_trains_exactly_the_methods_parameters(method):
    model = prepare_model(tiny("vim"), method)
    names = {n for n, _ in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_vim_trainable(method, names)
    assert model.peft_method.record() == {"method": method, "options": {}}
    images = images_for("vim")
    plain = logits(tiny("vim"), images)
    torch.testing.assert_close(logits(model, images), plain, rtol=0, atol=1e-5)  # every method starts exact
    with pytest.raises(RuntimeError, match=re.escape(f"already prepared with '{method}'")):
        prepare_model(model, "bias")


def test_every_method_has_an_expected_trainable_set():
    assert set(METHODS) == {
        *("linear_probe", "full", "bias", "partial", "lora", "parallel_adapter", "lora_x_proj", "lora_p_x"),
        *("adaptor_t", "adaptor_s", "adaptor", "adaptor+lora", "adaptor_booster"),
    }


@pytest.mark.parametrize("kind, blocks, conv_bias", [("vmamba_v2", 5, False), ("vmamba_v0", 5, True)])
def test_partial_on_vmamba_trains_the_ssm_parameters_and_head(kind, blocks, conv_bias):
    model = prepare_model(tiny(kind), "partial")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = sorted({n.split(".op.")[0] for n, _ in model.named_parameters() if ".op." in n})
    assert len(names) == blocks
    per_block = ["A_logs", "Ds", "dt_projs_bias", "conv2d.weight"] + (["conv2d.bias"] if conv_bias else [])
    expected = {f"{b}.op.{n}" for b in names for n in per_block}
    assert trainable == {"classifier.head.weight", "classifier.head.bias"} | expected


def test_bias_on_vmamba_trains_every_bias_including_the_delta_biases():
    model = prepare_model(tiny("vmamba_v2"), "bias")
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    delta_biases = {n for n in names if n.endswith(".op.dt_projs_bias")}
    assert len(delta_biases) == 5
    assert trainable == {n for n in names if n.endswith(".bias")} | delta_biases | {"classifier.head.weight"}
    assert {"classifier.head.weight", "layers.0.blocks.0.op.out_norm.bias"} <= trainable


def test_prepare_model_rejects_unknown_methods_and_options():
    with pytest.raises(ValueError, match=r"unknown method 'lorra'.*'adaptor\+lora'.*'linear_probe'"):
        prepare_model(tiny("vim"), "lorra")
    for method, option in [("bias", "r"), ("lora", "rank"), ("adaptor", "t_rnak"), ("parallel_adapter", "r")]:
        with pytest.raises(MethodOptionError, match=f"'{re.escape(method)}' has no option {option}"):
            prepare_model(tiny("vim"), method, **{option: 4})
    model = tiny("vim")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(MethodOptionError, match=r"t_rnak \(did you mean t_rank\?\)"):
        prepare_model(model, "adaptor", t_rnak=2)
    assert model.state_dict().keys() == before.keys()  # refused before anything was added
    prepare_model(model, "adaptor", t_rank=2)  # so the corrected call works on the same model
    assert model.layers[0].mixer.adaptor_t.down.shape[1] == 2


def test_prepare_model_passes_adaptor_options():
    model = prepare_model(tiny("vim"), "adaptor", t_rank=2, config=AdaptorConfig(t_groups=2, s_kernel_size=5))
    t, s = model.layers[0].mixer.adaptor_t, model.layers[0].mixer.adaptor_s
    assert t.down.shape == (2, 2, 64) and t.groups == 2 and s.kernel.shape[-1] == 5
    assert model.peft_method.record()["options"]["t_rank"] == 2
    assert model.peft_method.record()["options"]["config"]["t_groups"] == 2
    json.dumps(model.peft_method.record())  # what save_adaptor writes must be JSON
    model = prepare_model(tiny("vim"), "parallel_adapter", rank=3)
    assert model.layers[0].parallel_adapter.down.weight.shape == (3, 32)


def test_adaptor_methods_accept_agreeing_and_reject_conflicting_switches():
    model = prepare_model(tiny("vim"), "adaptor_t", spatial=False, temporal=True)
    assert model.layers[0].mixer.adaptor_s is None and model.layers[0].mixer.adaptor_t is not None
    with pytest.raises(MethodOptionError, match=r"'adaptor_t': option spatial=True, but the method sets False"):
        prepare_model(tiny("vim"), "adaptor_t", spatial=True)
    # a full config passed to a one-adaptor method: the method decides which adaptors, the config their shapes
    model = prepare_model(tiny("vim"), "adaptor_s", config=AdaptorConfig(s_kernel_size=5))
    assert model.layers[0].mixer.adaptor_t is None and model.layers[0].mixer.adaptor_s.kernel.shape[-1] == 5
    # a config that turns off an adaptor the method adds is refused, dict or AdaptorConfig alike
    for config in ({"temporal": False}, AdaptorConfig(temporal=False)):
        with pytest.raises(MethodOptionError, match=r"'adaptor': option config.temporal=False, but the method sets"):
            prepare_model(tiny("vim"), "adaptor", config=config)
    model = prepare_model(tiny("vim"), "adaptor_t", config={"spatial": False, "t_rank": 2})  # repeated: fine
    assert model.layers[0].mixer.adaptor_s is None and model.layers[0].mixer.adaptor_t.down.shape[1] == 2


SWITCHES = [("spatial", True, "adaptor_t"), ("temporal", True, "adaptor_s"), ("temporal", False, "adaptor")]


@pytest.mark.parametrize("switch, value, method", SWITCHES)
def test_a_switch_behaves_alike_as_an_option_and_in_a_config_dict(switch, value, method):
    for options, where in (({switch: value}, ""), ({"config": {switch: value}}, "config.")):
        message = rf"'{method}': option {where}{switch}={value}, but the method sets"
        with pytest.raises(MethodOptionError, match=message):
            prepare_model(tiny("vim"), method, **options)


def test_records_keep_no_default_switches_and_old_records_with_them_still_load():
    model = prepare_model(tiny("vim"), "adaptor_t", config=AdaptorConfig(t_rank=2))
    assert "spatial" not in model.peft_method.record()["options"]["config"]
    old = {"method": "adaptor_t", "options": {"config": {**AdaptorConfig(t_rank=2).to_dict()}}}  # 0.2.0's record
    assert from_record(old).settings() == model.peft_method.settings()
    old_both = {"method": "adaptor+lora", "options": {"config": AdaptorConfig().to_dict(), "r": 4}}
    assert from_record(old_both).settings()["lora.r"] == 4


def test_lora_options_are_respected():
    fresh = tiny("vim")
    model = prepare_model(tiny("vim"), "lora", r=4, alpha=12, targets=["in_proj", "out_proj"])
    lora = {n: p.numel() for n, p in model.named_parameters() if ".lora_" in n}
    expected = 0
    for block in fresh.layers:
        for linear in (block.mixer.in_proj, block.mixer.out_proj):
            expected += 4 * (linear.in_features + linear.out_features)
    assert sum(lora.values()) == expected and len(lora) == 8
    assert not any("x_proj" in n or "dt_proj" in n for n in lora)
    assert model.layers[0].mixer.in_proj.scaling["default"] == 3.0
    assert model.layers[0].mixer.in_proj.r["default"] == 4


# --- adapter files -----------------------------------------------------------------------------------------


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


def test_a_booster_adapter_holds_the_whole_backbone_and_reloads_it_trainable(tmp_path):
    torch.manual_seed(0)
    model = prepare_model(tiny("vim"), "adaptor_booster")
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():  # fine-tuned: the backbone moved as well as the adaptors
            p.add_(torch.randn_like(p) * 0.1)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    save_adaptor(model, tmp_path / "booster")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "booster" / "adaptor.safetensors")
    assert {n for n, _ in model.named_parameters()} <= set(saved)  # every backbone weight, adaptors and head
    other = tiny("vim")  # the file restores the weights, so the backbone's own values do not matter
    with torch.no_grad():
        other.layers[0].mixer.in_proj.weight.add_(1.0)
    fresh = load_adaptor(other, tmp_path / "booster")
    assert fresh.peft_method.name == "adaptor_booster"
    assert all(p.requires_grad for p in fresh.parameters())  # fine-tuning can go on
    with torch.no_grad():
        assert torch.allclose(fresh(images), expected, atol=1e-6)


def adapter_weights_on(model: torch.nn.Module, folder: Path) -> None:
    """Asserts that ``model`` holds the adapter in ``folder`` (cast to each parameter's dtype)."""
    from safetensors.torch import load_file

    own = model.state_dict()
    assert all(torch.equal(own[n], t.to(own[n].dtype)) for n, t in load_file(folder / "adaptor.safetensors").items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_adapter_loads_onto_its_backbone_cast_to_half_precision(tmp_path, dtype):
    model = tiny("vim")
    model.reset_classifier(5)
    prepare_model(model, "adaptor+lora")
    torch.manual_seed(8)
    perturb(model, ".adaptor_")
    perturb(model, ".lora_")
    folder = save_adaptor(model, tmp_path / "float32")
    half = load_adaptor(tiny("vim").to(dtype), folder)
    adapter_weights_on(half, folder)
    assert half.head.weight.shape == (5, 32) and half.head.weight.dtype == dtype
    other = tiny("vim")
    with torch.no_grad():
        other.layers[1].mixer.x_proj.weight[0, 0] += 0.05  # one weight, well beyond half-precision rounding
    with pytest.raises(AdapterFileError, match=f"other backbone weights: .* with {str(dtype)[6:]} fingerprint"):
        load_adaptor(other.to(dtype), folder)


def format_1_fingerprint(model: torch.nn.Module, exclude: set[str]) -> str:
    """The fingerprint adapter files of format 1 carry, as that format defined it: names, shapes, dtypes
    and raw bytes of the backbone's parameters in their own dtype (head and method parameters left out)."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted((n.replace(".base_layer.", "."), p) for n, p in model.named_parameters()):
        if name in exclude or name.startswith("head.") or any(m in name for m in (".adaptor_", "lora_")):
            continue
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        digest.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapters_of_format_1_still_load(tmp_path, dtype):
    """Adapters saved before fingerprints were taken per dtype load onto the same weights, in the dtype
    they were saved in or the float32 original of a half-precision copy; other weights are still refused."""
    from safetensors.torch import load_file

    model = prepare_model(tiny("vim").to(dtype), "adaptor_s")
    perturb(model, ".adaptor_")
    folder = save_adaptor(model, tmp_path / "adapter")
    config = json.loads((folder / "adaptor_config.json").read_text())
    del config["backbone_fingerprints"]
    exclude = set(load_file(folder / "adaptor.safetensors"))
    config.update(format="adaptor_peft.adapter/1", backbone_fingerprint=format_1_fingerprint(model, exclude))
    (folder / "adaptor_config.json").write_text(json.dumps(config))
    adapter_weights_on(load_adaptor(tiny("vim").to(dtype), folder), folder)
    adapter_weights_on(load_adaptor(tiny("vim"), folder), folder)
    other = tiny("vim")
    with torch.no_grad():
        other.layers[1].mixer.x_proj.weight[0, 0] += 0.05
    with pytest.raises(AdapterFileError, match="other backbone weights"):
        load_adaptor(other.to(dtype), folder)


@pytest.mark.parametrize("old_format", ["adaptor_peft.adapter/1", "adaptor_peft.adapter/2"])
@pytest.mark.parametrize("method", ["adaptor", "adaptor_t", "adaptor+lora", "lora"])
def test_adapters_of_the_per_position_adaptor_t_are_refused_by_version(tmp_path, old_format, method):
    """Files of adaptor_peft 0.1 with an Adaptor-T (which read per-position locations) are refused with the
    version that reads them; those without one still load."""
    model = prepare_model(tiny("vim"), method)
    folder = save_adaptor(model, tmp_path / "adapter")
    config = json.loads((folder / "adaptor_config.json").read_text())
    assert config["format"] == "adaptor_peft.adapter/3"
    (folder / "adaptor_config.json").write_text(json.dumps({**config, "format": old_format}))
    if method == "lora":
        if old_format == "adaptor_peft.adapter/2":  # format 1's fingerprint is another test's
            load_adaptor(tiny("vim"), folder)
        return
    with pytest.raises(AdapterFileError, match=r"adaptor_peft 0\.1 .*pip install 'adaptor-peft<0\.2'"):
        load_adaptor(tiny("vim"), folder)


def test_fingerprints_compare_at_the_finest_precision_both_sides_have(tmp_path):
    model = prepare_model(tiny("vim"), "adaptor")
    exact = save_adaptor(model, tmp_path / "float32")
    fingerprints = json.loads((exact / "adaptor_config.json").read_text())["backbone_fingerprints"]
    assert list(fingerprints) == ["float32", "bfloat16", "float16"]
    nudged = tiny("vim")
    weight = nudged.layers[0].mixer.in_proj.weight
    with torch.no_grad():  # below bfloat16's rounding, so only the float32 comparison sees it
        weight[0, 0] *= 1 + 2**-20
    assert torch.equal(weight.bfloat16(), tiny("vim").layers[0].mixer.in_proj.weight.bfloat16())
    with pytest.raises(AdapterFileError, match="with float32 fingerprint"):
        load_adaptor(nudged, exact)
    half = save_adaptor(prepare_model(tiny("vim").to(torch.bfloat16), "adaptor"), tmp_path / "bfloat16")
    adapter_weights_on(load_adaptor(tiny("vim"), half), half)  # a bfloat16 copy's adapter on the float32 original
    with pytest.raises(AdapterFileError, match=r"saved on a bfloat16 backbone and this model is float16: .* cannot be"):
        load_adaptor(tiny("vim").to(torch.float16), half)


@pytest.fixture
def saved(tmp_path) -> Path:
    model = prepare_model(tiny("vim"), "adaptor", t_rank=4)
    torch.manual_seed(3)
    perturb(model, ".adaptor_")
    return save_adaptor(model, tmp_path / "adapter")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_are_reported_with_the_file(saved, damage):
    path = saved / "adaptor.safetensors"
    data = path.read_bytes()
    garbage = random.Random(0).randbytes(len(data))
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": garbage, "empty": b""}[damage])
    with pytest.raises(AdapterFileError, match=r"adaptor\.safetensors"):
        load_adaptor(tiny("vim"), saved)


def test_missing_or_corrupt_files_are_reported(saved, tmp_path):
    with pytest.raises(AdapterFileError, match=r"adaptor_config\.json is missing"):
        load_adaptor(tiny("vim"), tmp_path / "nowhere")
    (saved / "adaptor.safetensors").rename(tmp_path / "weights")
    with pytest.raises(AdapterFileError, match=r"no adapter weights at .*adaptor\.safetensors"):
        load_adaptor(tiny("vim"), saved)
    (tmp_path / "weights").rename(saved / "adaptor.safetensors")
    config = saved / "adaptor_config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    with pytest.raises(AdapterFileError, match=r"adaptor_config\.json is corrupt"):
        load_adaptor(tiny("vim"), saved)
    config.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(AdapterFileError, match=r"adaptor_config\.json is corrupt"):
        load_adaptor(tiny("vim"), saved)
    config.write_text(json.dumps({**json.loads(text), "format": "something else"}))
    with pytest.raises(AdapterFileError, match="not an adaptor_peft adapter config"):
        load_adaptor(tiny("vim"), saved)
    config.write_text("[1, 2]")
    with pytest.raises(AdapterFileError, match="not an adaptor_peft adapter config"):
        load_adaptor(tiny("vim"), saved)


def test_weights_that_do_not_fit_the_config_are_listed(saved):
    config = saved / "adaptor_config.json"
    data = json.loads(config.read_text())
    assert data["options"] == {"t_rank": 4}
    config.write_text(json.dumps({**data, "options": {"t_rank": 8}}))
    with pytest.raises(
        AdapterFileError,
        match=r"mismatched \['layers\.0\.mixer\.adaptor_t\.down: file \(2, 4, 64\) vs model \(2, 8, 64\)",
    ):
        load_adaptor(tiny("vim"), saved)
    config.write_text(json.dumps({**data, "method": "adaptor+lora", "options": {"t_rank": 4}}))
    with pytest.raises(AdapterFileError, match=r"missing \['layers\.0\.mixer\.in_proj\.lora_A"):
        load_adaptor(tiny("vim"), saved)
    config.write_text(json.dumps({**data, "method": "adaptor_t"}))
    with pytest.raises(AdapterFileError, match=r"unexpected \['layers\.0\.mixer\.adaptor_s\.kernel"):
        load_adaptor(tiny("vim"), saved)


def test_a_different_head_is_restored_on_load(tmp_path):
    model = tiny("vim")
    model.reset_classifier(5)
    prepare_model(model, "adaptor")
    torch.manual_seed(4)
    perturb(model, ".adaptor_")
    images = images_for("vim")
    expected = logits(model, images)
    assert expected.shape == (2, 5)
    save_adaptor(model, tmp_path)
    assert json.loads((tmp_path / "adaptor_config.json").read_text())["num_classes"] == 5
    fresh = load_adaptor(tiny("vim"), tmp_path)  # a 1000-class backbone
    assert fresh.num_classes == 5 and fresh.head.weight.shape == (5, 32)
    torch.testing.assert_close(logits(fresh, images), expected, rtol=0, atol=1e-6)


def test_save_leaves_no_temporary_files(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["adaptor.safetensors", "adaptor_config.json"]
    data = json.loads((saved / "adaptor_config.json").read_text())
    assert data["method"] == "adaptor" and data["format"] == "adaptor_peft.adapter/3"
    from safetensors.torch import load_file

    weights = load_file(saved / "adaptor.safetensors")
    assert data["tensors"] == len(weights) and data["parameters"] == sum(t.numel() for t in weights.values())


def failing_save(monkeypatch, saved: Path, failure: str) -> None:
    """Saves another adapter over ``saved`` while ``failure`` happens; the old adapter must survive whole."""
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    other = prepare_model(tiny("vim"), "adaptor", t_rank=4)
    torch.manual_seed(9)
    perturb(other, ".adaptor_")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    if failure == "serialize":
        monkeypatch.setattr("adaptor_peft.adaptors.state.save", fail)
    elif failure == "rename":
        monkeypatch.setattr(os, "replace", fail)
    else:  # options that JSON cannot hold: known only once the config is written
        other.peft_method.given["extra"] = {"when": object()}
    with pytest.raises((OSError, TypeError)):
        save_adaptor(other, saved)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


@pytest.mark.parametrize("failure", ["serialize", "rename", "config"])
def test_a_failed_save_leaves_the_existing_adapter_intact(saved, monkeypatch, failure):
    failing_save(monkeypatch, saved, failure)
    load_adaptor(tiny("vim"), saved)


@pytest.mark.parametrize("wrapper", ["fully_shard", "FSDP1", "FSDP1 use_orig_params"])
def test_a_model_sharded_by_fsdp_is_refused_not_read_shard_by_shard(saved, tmp_path, wrapper):
    from torch import distributed
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = prepare_model(tiny("vim"), "adaptor_booster" if wrapper == "FSDP1" else "adaptor")  # flat: one grad
        if wrapper == "fully_shard":
            model = fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        else:  # FSDP1 with one process falls back to no sharding (a warning), but is refused all the same
            with pytest.warns(UserWarning, match="NO_SHARD"):
                model = FullyShardedDataParallel(
                    model, use_orig_params="orig" in wrapper, device_id=torch.device("cpu")
                )
        with pytest.raises(
            AdapterFileError, match=r"save_adaptor: (\S+|the model) is sharded by FSDP; .* whole parameters"
        ):
            save_adaptor(model, tmp_path / "sharded")
        with pytest.raises(AdapterFileError, match=r"load_adaptor: (\S+|the model) is sharded by FSDP"):
            load_adaptor(model, saved)
    finally:
        distributed.destroy_process_group()
    assert not (tmp_path / "sharded").exists()


def test_save_refuses_a_plain_model(tmp_path):
    with pytest.raises(AdapterFileError, match="no transfer method"):
        save_adaptor(tiny("vim"), tmp_path)
    assert not any(tmp_path.iterdir())


# --- merge and unload --------------------------------------------------------------------------------------


def test_merged_lora_gives_the_same_logits_and_the_merged_weights():
    model = prepare_model(tiny("vim").double(), "lora", r=4, alpha=8, targets=["in_proj", "out_proj"])
    torch.manual_seed(5)
    assert perturb(model, ".lora_B.") == 4  # lora_B starts at zero
    images = images_for("vim")
    expected = logits(model, images)
    layer = model.layers[1].mixer.in_proj
    base = layer.base_layer.weight.detach().clone()
    A, B = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    merge_adaptor(model)
    assert not any(".lora_" in n or "base_layer" in n for n, _ in model.named_parameters())
    assert type(model.layers[1].mixer.in_proj) is torch.nn.Linear
    torch.testing.assert_close(model.layers[1].mixer.in_proj.weight, base + 2.0 * B @ A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits(model, images), expected, rtol=1e-10, atol=1e-10)
    assert (expected - logits(tiny("vim").double(), images)).abs().max() > 1e-4


def test_an_adapter_saved_after_a_merge_belongs_to_the_merged_backbone(tmp_path):
    model = prepare_model(tiny("vim"), "adaptor+lora", r=4, t_rank=2)
    torch.manual_seed(7)
    perturb(model, ".lora_B.")
    perturb(model, ".adaptor_")
    merge_adaptor(model)
    assert model.peft_method.record() == {"method": "adaptor", "options": {"t_rank": 2}}
    save_adaptor(model, tmp_path / "merged")
    images = images_for("vim")
    merged_backbone = tiny("vim")
    merged_backbone.load_state_dict({k: v for k, v in model.state_dict().items() if ".adaptor_" not in k})
    reloaded = load_adaptor(merged_backbone, tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded, images), logits(model, images), rtol=0, atol=0)
    with pytest.raises(AdapterFileError, match="other backbone weights"):  # the unmerged backbone is another one
        load_adaptor(tiny("vim"), tmp_path / "merged")


@pytest.mark.parametrize("method", ["adaptor+lora", "parallel_adapter", "adaptor"])
@pytest.mark.parametrize("kind", ["vim", "vmamba_v2"])
def test_unload_restores_the_plain_backbone(kind, method):
    images = images_for(kind)
    plain = logits(tiny(kind), images)
    model = prepare_model(tiny(kind), method)
    torch.manual_seed(6)
    assert perturb(model, ".adaptor_") + perturb(model, ".lora_") + perturb(model, ".parallel_adapter.") > 0
    assert (logits(model, images) - plain).abs().max() > 1e-4
    unload_adaptor(model)
    assert torch.equal(logits(model, images), plain)
    names = [n for n, _ in model.named_parameters()]
    assert not any(m in n for n in names for m in (".adaptor_", ".lora_", "base_layer", "parallel_adapter"))
    assert names == [n for n, _ in tiny(kind).named_parameters()]
    assert not hasattr(model, "peft_method")
    prepare_model(model, "bias")  # a plain backbone again


def test_injecting_nothing_is_refused():
    with pytest.raises(ValueError, match="adds nothing"):
        inject_adaptor(tiny("vim"), AdaptorConfig(temporal=False, blocks=[1]))  # the last block of a depth-2 Vim


def test_resolved_settings_spell_out_every_default_a_method_uses():
    from adaptor_peft.adaptors.methods import resolved_settings

    assert resolved_settings("linear_probe", {}) == {"method": "linear_probe"}
    both = resolved_settings("adaptor+lora", {"t_rank": 2, "r": 4})
    defaults = AdaptorConfig().to_dict()
    assert both["adaptor.t_rank"] == 2 and both["adaptor.lr_scale"] == defaults["lr_scale"]
    assert both["adaptor.s_dilations"] == list(defaults["s_dilations"])  # as JSON reads it back
    assert {k: both[k] for k in ("lora.r", "lora.alpha", "lora.targets")} == {
        "lora.r": 4, "lora.alpha": 16, "lora.targets": ["in_proj"]
    }  # fmt: skip
    assert resolved_settings("parallel_adapter", {}) == {
        "method": "parallel_adapter",
        "parallel_adapter.rank": 32,
        "parallel_adapter.lr_scale": 1.0,
    }
    assert json.loads(json.dumps(both)) == both
    with pytest.raises(MethodOptionError, match="has no option rank"):
        resolved_settings("lora", {"rank": 4})
