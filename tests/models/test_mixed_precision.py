"""Mixed precision: adaptors stay float32 in a bfloat16 backbone, Adaptor-T's locations and weights are
computed in float32 under autocast, and Vim's Δ bias reaches the scan in float32 (as the official code)."""

from __future__ import annotations

import pytest
import torch

import adaptor_peft.models.layers
from adaptor_peft.adaptors import AdaptorConfig, AdaptorT, inject_adaptor, prepare_model
from tests.support.models import tiny

SIZES = {"vim": 32, "vmamba_v2": 64}
MARKERS = (".adaptor_t.", ".adaptor_s.")


def injected(kind: str, dtype: torch.dtype = torch.float32, **options) -> torch.nn.Module:
    """A tiny backbone in ``dtype`` with both adaptors (``AdaptorConfig`` ``options``), moved off their zero
    init."""
    model = inject_adaptor(tiny(kind).to(dtype), AdaptorConfig(**options))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in f".{name}" for m in MARKERS):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def adaptor_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if any(m in f".{n}" for m in MARKERS)}


@pytest.mark.parametrize("kind", list(SIZES))
def test_adaptors_stay_float32_in_a_bfloat16_backbone(kind):
    model = injected(kind, torch.bfloat16).train()
    adaptors = adaptor_parameters(model)
    assert adaptors and all(p.dtype == torch.float32 for p in adaptors.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in adaptors)
    logits = model(torch.randn(2, 3, SIZES[kind], SIZES[kind], dtype=torch.bfloat16))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().square().mean().backward()
    for name, p in adaptors.items():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().max() > 0 for n, p in adaptors.items() if n.endswith(("gamma", "scale")))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "method, options, marker",
    [
        ("lora", {}, ".lora_"),
        ("lora", {"targets": ["in_proj", "x_proj", "dt_proj", "out_proj"]}, ".lora_"),  # dt_proj: no bias in forward
        ("parallel_adapter", {}, ".parallel_adapter."),
    ],
)
def test_lora_and_parallel_adapters_stay_float32_in_a_half_precision_backbone(dtype, method, options, marker):
    """As peft's autocast_adapter_dtype: a bf16 LoRA B would round away small updates to a zero init. The
    backbone's output keeps its dtype, and every added weight gets a finite float32 gradient."""
    model = prepare_model(tiny("vim").to(dtype), method, **options).train()
    added = {n: p for n, p in model.named_parameters() if marker in f".{n}"}
    assert added and all(p.dtype == torch.float32 for p in added.values())
    assert all(p.dtype == dtype for n, p in model.named_parameters() if n not in added)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {*added, "head.weight", "head.bias"}
    with torch.no_grad():
        for p in added.values():
            p.add_(torch.randn_like(p) * 0.1)
    logits = model(torch.randn(2, 3, 32, 32, dtype=dtype))
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    logits.float().square().mean().backward()
    for name, p in added.items():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


@pytest.mark.parametrize("kind", list(SIZES))
def test_injected_model_under_bfloat16_autocast(kind):
    model = injected(kind).train()
    images = torch.randn(2, 3, SIZES[kind], SIZES[kind])
    with torch.no_grad():
        full = model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    assert torch.isfinite(logits).all()
    assert (logits.float() - full).abs().max() < 0.05 * full.abs().max()
    logits.float().square().mean().backward()
    for name, p in adaptor_parameters(model).items():
        assert p.dtype == p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_adaptor_t_locations_and_weights_are_float32_under_autocast():
    """Against float64 on the same inputs: to float32 rounding, where bfloat16 would be off by 1e-2."""
    torch.manual_seed(0)
    adaptor = AdaptorT(16, 2, locations=2, groups=2, rank=3)
    with torch.no_grad():
        for p in (adaptor.offset_up, adaptor.weight_up, adaptor.weight_bias):
            p.normal_(0, 0.3)
    u = torch.randn(2, 32, 300)
    for inputs in (u, u.bfloat16()):  # a float32 activation, and a bfloat16 backbone's
        location, weights = adaptor.double().locations_and_weights(inputs.double(), None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            location32, weights32 = adaptor.float().locations_and_weights(inputs, None)
        assert location32.dtype == weights32.dtype == torch.float32
        assert torch.allclose(location32, location.float(), atol=1e-3)  # positions up to 299
        assert torch.allclose(weights32, weights.float(), atol=1e-5)


def test_adaptor_t_memory_is_read_in_float32_under_autocast(monkeypatch):
    """In a bfloat16 backbone under autocast, the memory's location at 130.5 keeps its fraction (so its two
    neighbours are read), its weights are float32, and the adapted output matches float64 up to its own
    bfloat16 rounding."""
    adaptor = injected("vim", torch.bfloat16).layers[0].mixer.adaptor_t
    with torch.no_grad():
        adaptor.anchor.fill_(0.5)  # position 0.5 * (262 - 1) = 130.5: bfloat16 has no fraction at 130
        adaptor.offset_up.zero_()
    generator = torch.Generator().manual_seed(0)
    E, N, L = adaptor.channels, 4, 262
    u, delta, z = (torch.randn(1, E, L, generator=generator).bfloat16() for _ in range(3))
    B, C = (torch.randn(1, N, L, generator=generator).bfloat16() for _ in range(2))
    A = -torch.rand(E, N, generator=generator) - 0.5
    seen = []
    scan = adaptor_peft.adaptors.temporal.selective_scan

    def recording(*args, **kwargs):
        result = scan(*args, **kwargs)
        seen.append((kwargs["memory"].location, kwargs["memory"].weights.dtype))
        return result

    monkeypatch.setattr(adaptor_peft.adaptors.temporal, "selective_scan", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = adaptor.scan(u, delta * 0.1, A, B, C, None, z, direction=0)
    location, dtype = seen[-1]
    assert (location == 130.5).all() and location.dtype == dtype == torch.float32
    inputs = [t.double() for t in (u, delta * 0.1, A, B, C)]
    exact = adaptor.double().scan(*inputs, None, z.double(), direction=0)
    memory_term = exact - scan(*inputs, None, z.double()).out
    assert memory_term.abs().max() > 0.05 * exact.abs().max()  # the memory term is there to be checked
    assert half.dtype == torch.bfloat16
    assert ((half.double() - exact).abs() <= 2**-7 * exact.abs() + 1e-3 * exact.abs().max()).all()


def test_vim_delta_bias_reaches_the_scan_in_float32_under_autocast(monkeypatch):
    """As the official code: Δ = dt_proj.weight @ dt in the autocast dtype, dt_proj.bias.float() as delta_bias."""
    model = tiny("vim")
    calls = []
    scan = adaptor_peft.models.layers.selective_scan

    def recording(u, delta, *args, **kwargs):
        calls.append((delta.dtype, kwargs.get("delta_bias")))
        return scan(u, delta, *args, **kwargs)

    monkeypatch.setattr(adaptor_peft.models.layers, "selective_scan", recording)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 3, 32, 32))
    mixers = [layer.mixer for layer in model.layers]
    biases = [p.bias for m in mixers for p in (m.dt_proj, m.dt_proj_b)]
    assert [dtype for dtype, _ in calls] == [torch.bfloat16] * len(biases)
    assert all(
        b is not None and b.dtype == torch.float32 and torch.equal(b, e)
        for (_, b), e in zip(calls, biases, strict=True)
    )


def test_vim_under_bfloat16_autocast_is_close_to_float32():
    model = tiny("vim")
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(images)
    assert (half.float() - full).abs().max() < 0.01 * full.abs().max()  # measured: 0.005
