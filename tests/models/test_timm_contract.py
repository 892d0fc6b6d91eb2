"""timm's model contract on Vim and VMamba, checked against timm's own ViT, MambaOut and Swin.

``forward_features`` returns unpooled features (Vim: the normed token sequence with its class token;
VMamba: the normed last-stage map, channels-last like timm's Swin and MambaOut), ``forward_head`` pools,
``forward_intermediates`` / ``prune_intermediate_layers`` / ``features_only`` extract intermediate
features, and ``set_grad_checkpointing`` trades compute for activation memory.
"""

from __future__ import annotations

import inspect

import pytest
import timm
import torch

from tests.support.memory import PeakTensorMemory
from tests.support.models import TINY, tiny

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)  # the shape of TINY["vim"]
METHODS = ("forward_head", "prune_intermediate_layers", "reset_classifier", "set_grad_checkpointing")


def parameters(method) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(method).parameters.values()]


def vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**VIT, **kwargs}).eval()


def shapes(result) -> object:
    """The structure of a result with tensors replaced by their shapes."""
    if isinstance(result, torch.Tensor):
        return tuple(result.shape)
    return type(result), [shapes(r) for r in result]


@pytest.mark.parametrize("kind", ["vim", "vmamba_v2"])
def test_method_signatures_are_timms(kind):
    ours, theirs = tiny(kind), vit()
    for name in METHODS:
        assert parameters(getattr(ours, name)) == parameters(getattr(theirs, name)), name
    # ViT's forward_intermediates adds ViT-only options; the common ones are MambaOut's, in its order
    with torch.device("meta"):
        mambaout = timm.create_model("mambaout_femto")
    assert parameters(ours.forward_intermediates) == parameters(mambaout.forward_intermediates)
    assert set(parameters(ours.forward_intermediates)) <= set(parameters(theirs.forward_intermediates))


def test_vim_features_are_the_normed_tokens_and_the_head_reads_the_middle_class_token():
    model, reference = tiny("vim", num_classes=10), vit(num_classes=10)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(images)
        assert features.shape == reference.forward_features(images).shape == (2, 17, 32)
        assert torch.equal(model.forward_head(features, pre_logits=True), features[:, 8])
        assert torch.equal(model.forward_head(features), model(images))
        assert torch.equal(model(images), model.head(features[:, 8]))
        model.reset_classifier(5, "avg")
        assert torch.equal(model.forward_head(features, pre_logits=True), features.mean(1))
        model.reset_classifier(0, "")
        reference.reset_classifier(0, "")
        assert model(images).shape == reference(images).shape == (2, 17, 32)
        model.reset_classifier(3)  # global_pool None keeps the pooling
        assert model.global_pool == "" and model(images).shape == (2, 17, 3)
    with pytest.raises(ValueError, match=r"global_pool 'max'.*'token'"):
        model.reset_classifier(3, "max")


def test_vmamba_features_are_the_normed_channels_last_map():
    model = tiny("vmamba_v2", num_classes=10)
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        features = model.forward_features(images)
        assert features.shape == (2, 2, 2, model.num_features)  # (B, H, W, C), as timm's Swin and MambaOut
        assert torch.equal(model.forward_head(features, pre_logits=True), features.mean(dim=(1, 2)))
        assert torch.equal(model(images), model.forward_head(features))
        model.reset_classifier(4, "")
        assert model(images).shape == (2, 2, 2, 4)
    with pytest.raises(ValueError, match=r"global_pool 'token'.*'avg'"):
        model.reset_classifier(3, "token")


@pytest.mark.parametrize("options", [{}, dict(indices=1), dict(indices=[0], stop_early=True), dict(norm=True)])
@pytest.mark.parametrize("output_fmt", ["NCHW", "NLC"])
def test_vim_intermediates_have_vits_structure(options, output_fmt):
    model, reference = tiny("vim"), vit()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for only in (False, True):
            kwargs = dict(options, output_fmt=output_fmt, intermediates_only=only)
            result = model.forward_intermediates(images, **kwargs)
            assert shapes(result) == shapes(reference.forward_intermediates(images, **kwargs))
        final, intermediates = model.forward_intermediates(images, norm=True, output_fmt="NLC")
        features = model.forward_features(images)
        assert torch.equal(final, features)
        # the last intermediate, normed, is the feature sequence without its class token
        assert torch.equal(intermediates[-1], torch.cat([features[:, :8], features[:, 9:]], dim=1))
        nlc = model.forward_intermediates(images, output_fmt="NLC", intermediates_only=True)
        nchw = model.forward_intermediates(images, intermediates_only=True)
        assert torch.equal(nchw[0], nlc[0].reshape(2, 4, 4, 32).permute(0, 3, 1, 2))


def test_vmamba_intermediates_are_the_stages_before_downsampling():
    model = tiny("vmamba_v2")
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        final, maps = model.forward_intermediates(images, norm=True)
        assert [m.shape for m in maps] == [(2, 16, 16, 12), (2, 32, 8, 6), (2, 64, 4, 3), (2, 128, 2, 2)]
        assert [m.shape[1] for m in maps] == [info["num_chs"] for info in model.feature_info]
        assert [64 // m.shape[2] for m in maps] == [info["reduction"] for info in model.feature_info]
        assert torch.equal(final, model.forward_features(images))
        assert torch.equal(maps[-1], final.permute(0, 3, 1, 2))  # only the last stage is normed
        nhwc = model.forward_intermediates(images, indices=[1], stop_early=True, output_fmt="NHWC")
        assert torch.equal(nhwc[1][0], maps[1].permute(0, 2, 3, 1))
        assert torch.equal(nhwc[0], nhwc[1][0])  # stopped early: the final output is stage 1's, unnormed


@pytest.mark.parametrize("kind", ["vim", "vmamba_v2", "vmamba_v0"])
def test_features_only_and_pruning_keep_the_intermediates(kind):
    config = dict(TINY[kind])
    name, indices = config.pop("name"), (0, 1) if kind == "vim" else (1, 2)
    size = 32 if kind == "vim" else 64
    images = torch.randn(2, 3, size, size)
    model = tiny(kind)
    with torch.no_grad():
        expected = model.forward_intermediates(images, indices=indices, intermediates_only=True)
        torch.manual_seed(0)
        extractor = timm.create_model(name, features_only=True, out_indices=indices, **config)
        extractor.load_state_dict({f"model.{k}": v for k, v in model.state_dict().items()}, strict=False)
        extracted = extractor.eval()(images)
        assert [e.shape for e in extracted] == [e.shape for e in expected]
        assert all(torch.equal(a, b) for a, b in zip(extracted, expected, strict=True))
        assert extractor.feature_info.channels() == [e.shape[1] for e in expected]
        assert model.prune_intermediate_layers(indices) == list(indices)
        pruned = model.forward_intermediates(images, indices=indices, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(pruned, expected, strict=True))
    assert model.get_classifier().__class__ is torch.nn.Identity


@pytest.mark.parametrize(
    ("kind", "extra", "batch"),
    [("vim", dict(depth=4, img_size=64), 4), ("vmamba_v2", dict(depths=(2, 2, 2, 1)), 8)],
)
def test_grad_checkpointing_lowers_peak_memory_and_keeps_the_gradients(kind, extra, batch):
    images = torch.randn(batch, 3, 64, 64)
    peaks, grads = [], []
    for checkpointing in (False, True):
        model = tiny(kind, drop_path_rate=0.2, **extra).train()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)  # the same drop-path draws: checkpointing replays the RNG state
        with PeakTensorMemory() as memory:
            model(images).square().mean().backward()
        peaks.append(memory.peak)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert peaks[1] < 0.75 * peaks[0], peaks  # Vim's plain step already rebuilds its mixers' cheap activations
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in grads[0])
