"""MambaVision: parity with the official code, its state-dict layout, timm's contract, every transfer
method and a CLI recipe run, on reduced sizes.

The official model comes from the ``mambavision`` pip package (``pip install --no-deps mambavision==1.2.0``,
as CI does), imported with its mamba-ssm CUDA scan replaced by the package's float64 reference scan.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import warnings
from unittest import mock

import pytest
import timm
import torch
from safetensors.torch import save_file

from adaptor_peft import parameter_report, prepare_model
from adaptor_peft.adaptors import METHODS
from adaptor_peft.cli import main
from adaptor_peft.models import create_model, find_blocks, find_mixers
from adaptor_peft.models.mambavision import HybridBlock, MambaVision, MambaVisionMixer
from adaptor_peft.ops.reference import selective_scan_reference
from tests.support.models import assert_shared_projection_changes_nothing, perturb

INSTALL = "pip install --no-deps mambavision==1.2.0"
VARIANTS = {  # ours → the official registry's name
    "mambavision_tiny_1k": "mamba_vision_T",
    "mambavision_tiny2_1k": "mamba_vision_T2",
    "mambavision_small_1k": "mamba_vision_S",
    "mambavision_base_1k": "mamba_vision_B",
}
TINY = dict(dim=16, in_dim=8, depths=(1, 2, 3, 2), window_size=(4, 4, 2, 2), num_heads=(2, 2, 2, 4), mlp_ratio=2.0)
"""Every kind of block at a few seconds' cost: level 2 has two Mamba blocks and one attention block on a 3x3
map padded to four 2x2 windows; level 3 one of each on one 2x2 window (48x40 images)."""
HEIGHT, WIDTH = 48, 40
ADDED = (".adaptor_t.", ".adaptor_s.", ".parallel_adapter.", ".lora_")
"""Markers of the parameters the methods add."""


@pytest.fixture(scope="session")
def official() -> types.ModuleType:
    """``mambavision.models.mamba_vision`` with ``selective_scan_fn`` the float64 reference scan; the stub
    mamba-ssm modules are in ``sys.modules`` only while it imports."""
    if importlib.util.find_spec("mambavision") is None:
        pytest.fail(f"the official MambaVision package is not installed; run: {INSTALL}")
    if importlib.util.find_spec("einops") is None:
        pytest.fail("the official MambaVision package imports einops, which is not installed; run: pip install einops")

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **_):
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus).out

    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = selective_scan_fn
    stubs = {"mamba_ssm": types.ModuleType("mamba_ssm"), "mamba_ssm.ops": types.ModuleType("mamba_ssm.ops")}
    with mock.patch.dict(sys.modules, {**stubs, interface.__name__: interface}), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its imports of timm's deprecated module paths
        import mambavision.models.mamba_vision as module
    return module


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic drawn at random, so that every key counts (the official init
    zeroes the biases and the Δ bias)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(-1, 1) if name.endswith("A_log") else p.normal_(0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2)
            elif name.endswith("running_mean"):
                b.normal_()
    return model.eval()


def official_tiny(official: types.ModuleType, **kwargs) -> torch.nn.Module:
    return randomised(official.MambaVision(**{**TINY, "num_classes": 10, "drop_path_rate": 0.0, **kwargs}))


def tiny(**kwargs) -> MambaVision:
    torch.manual_seed(0)
    return create_model("mambavision_tiny_1k", num_classes=10, **{**TINY, **kwargs}).eval()


def images(batch: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1), dtype=dtype)


# --- the official model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_scale", [None, 0.5], ids=["T-like", "B-like layer scale"])
def test_logits_match_the_official_model_in_float64(official, layer_scale):
    """To 1e-5 as the official code runs; to 1e-12 with its ``.float()`` casts of A, D and the Δ bias (its only
    float32 rounding in a float64 model) made no-ops."""
    theirs = official_tiny(official, layer_scale=layer_scale).double()
    ours = MambaVision(**TINY, num_classes=10, layer_scale=layer_scale).double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = images(dtype=torch.float64)
    with torch.no_grad():
        have, want = ours(x), theirs(x)
        with mock.patch.object(torch.Tensor, "float", lambda tensor: tensor):
            want64 = theirs(x)
    error, error64 = (((have - w).abs().max() / w.abs().max()).item() for w in (want, want64))
    print(f"MambaVision {TINY} layer_scale={layer_scale}: max rel error {error:.2e}, {error64:.2e} without casts")
    assert error <= 1e-5 and error64 <= 1e-12


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_has_the_official_keys_and_shapes(official, name):
    """Built on the meta device; the official constructor reads its drop-path rates with ``.item()``, which
    needs them on the CPU."""
    linspace = torch.linspace
    on_cpu = mock.patch("torch.linspace", lambda *args, **kwargs: linspace(*args, **{**kwargs, "device": "cpu"}))
    with torch.device("meta"), warnings.catch_warnings(), on_cpu:
        warnings.simplefilter("ignore")
        theirs = getattr(official, VARIANTS[name])()
    with torch.device("meta"):
        ours = create_model(name)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_release_and_hub_files_load(official, tmp_path):
    """The release ``.pth.tar`` (a training checkpoint, weights under ``state_dict``) and the hub's safetensors
    (every key under ``model.``) load into the same model and compute the official logits."""
    theirs = official_tiny(official)
    state = theirs.state_dict()
    torch.save({"epoch": 300, "state_dict": state, "optimizer": {}}, tmp_path / "release.pth.tar")
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    with torch.no_grad():
        want = theirs(images())
        for path in ("release.pth.tar", "model.safetensors"):
            model = create_model("mambavision_tiny_1k", checkpoint=str(tmp_path / path), **TINY, num_classes=10)
            torch.testing.assert_close(model.eval()(images()), want, rtol=1e-4, atol=1e-4)


# --- timm's contract ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_timm_builds_every_variant_with_its_release_url(name):
    cfg = timm.models.get_pretrained_cfg(name)
    size = cfg.url.rsplit("/", 1)[1].removesuffix(".pth.tar")
    assert cfg.url.startswith("https://huggingface.co/nvidia/MambaVision-") and size == name
    model = timm.create_model(name, pretrained=False, **TINY)
    assert isinstance(model, MambaVision) and model.pretrained_cfg["url"] == cfg.url


def test_timm_contract():
    model = timm.create_model("mambavision_tiny_1k", pretrained=False, num_classes=10, **TINY).eval()
    x = images()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 128, 2, 2)
        torch.testing.assert_close(model.forward_head(features), model(x))
        assert model.forward_head(features, pre_logits=True).shape == (2, 128)
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, features)
        assert [tuple(m.shape) for m in maps] == [(2, 16, 12, 10), (2, 32, 6, 5), (2, 64, 3, 3), (2, 128, 2, 2)]
        early = model.forward_intermediates(x, indices=[1], stop_early=True, output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(early[0], maps[1].permute(0, 2, 3, 1))
    assert model.get_classifier() is model.head
    assert model.no_weight_decay() == {n for n, _ in model.named_parameters() if n.endswith("A_log")} != set()
    model.reset_classifier(5)
    assert model.head.out_features == 5
    assert model.prune_intermediate_layers([1]) == [1] and len(model.levels) == 2 and model.num_features == 32


def test_features_only_gives_every_level():
    model = timm.create_model("mambavision_tiny_1k", pretrained=False, features_only=True, **TINY).eval()
    with torch.no_grad():
        maps = model(images())
    assert [m.shape[1] for m in maps] == model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


def test_gradient_checkpointing_gives_the_same_gradients():
    x, grads = images(), []
    for enabled in (False, True):
        model = tiny()
        model.set_grad_checkpointing(enabled)
        model(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# --- transfer methods -----------------------------------------------------------------------------------------


def test_the_protocol_finds_the_mamba_mixers_and_every_hybrid_block():
    model = tiny()
    mixers, blocks = find_mixers(model), find_blocks(model)
    assert [n for n, _ in mixers] == ["levels.2.blocks.0.mixer", "levels.2.blocks.1.mixer", "levels.3.blocks.0.mixer"]
    assert len(blocks) == 5 and all(isinstance(b, HybridBlock) for _, b in blocks)
    assert [m.scan_shape() for _, m in mixers] == [(32, 1), (32, 1), (64, 1)]
    assert all(isinstance(m, MambaVisionMixer) for _, m in mixers)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_is_exact_at_init_and_trains(method):
    model, x = tiny(), images()
    with torch.no_grad():
        before = model(x)
    prepare_model(model, method)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    settings = model.peft_method.settings()
    if "adaptor.temporal" in settings:
        assert all((m.adaptor_t is not None) == settings["adaptor.temporal"] for _, m in find_mixers(model))
        assert all((m.adaptor_s is not None) == settings["adaptor.spatial"] for _, m in find_mixers(model))
    report = parameter_report(model)
    assert 0 < report.trainable <= report.total
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for p in trainable.values())
    added = [p for n, p in trainable.items() if any(k in n for k in ADDED)]
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    if model.peft_method.groups:
        assert added and any(p.grad.abs().sum() > 0 for p in added)


def test_the_mixer_takes_adaptor_t_predictor_input_in_x_proj_product_for_the_same_results():
    model = prepare_model(tiny(), "adaptor_t").double()
    perturb(model, ".adaptor_t.")
    assert_shared_projection_changes_nothing(model, images(dtype=torch.float64))


def test_adaptor_s_works_on_each_window_grid():
    model = prepare_model(tiny(), "adaptor_s")
    seen = []
    for _, mixer in find_mixers(model):
        torch.nn.init.normal_(mixer.adaptor_s.scale)
        mixer.adaptor_s.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        model(images())
    assert seen == [(2 * 4, 2, 2, 64), (2 * 4, 2, 2, 64), (2, 2, 2, 128)]


# --- a recipe run ---------------------------------------------------------------------------------------------


def test_a_recipe_trains_a_small_mambavision_with_the_adaptors(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "mambavision_tiny.pth.tar"
    torch.save({"state_dict": create_model("mambavision_tiny_1k", **TINY).state_dict()}, checkpoint)
    options = [f"model_options.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY.items()]
    sizes = ["data.builtin.sizes.train800=8", "data.builtin.sizes.val200=4", "data.builtin.sizes.test=8"]
    run = tmp_path / "run"
    main(["train", "--recipe", "offline_vtab/digits", "--output-dir", str(run), "--no-progress",
          "model=mambavision_tiny_1k", f"checkpoint={checkpoint}", "method=adaptor", "img_size=32", "epochs=1",
          "warmup_epochs=0", "batch_size=4", "eval_batch_size=8", *options, *sizes])  # fmt: skip
    results = json.loads((run / "results.json").read_text())
    assert 0 <= results["top1"] <= 100 and results["parameters"]["trainable"] > 0
    assert (run / "adapter" / "adaptor.safetensors").is_file()
