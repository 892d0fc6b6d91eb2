"""Checkpoint files in every supported format, written by the tests themselves, and their errors."""

from __future__ import annotations

import argparse
import sys
import types

import pytest
import timm
import torch
from safetensors.torch import save_file

import adaptor_peft
from adaptor_peft import CheckpointError, load_checkpoint, read_state_dict
from tests.support.models import tiny


class _FakeCfgNode(dict):
    """Pickles under the name ``yacs.config.CfgNode``, like VMamba's training config."""


_FakeCfgNode.__module__, _FakeCfgNode.__qualname__ = "yacs.config", "CfgNode"


def save_official(path, model_state, *, ema_state=None):
    """A training checkpoint as the official scripts write it, with a yacs config that will not import."""
    yacs = types.ModuleType("yacs")
    yacs.config = types.ModuleType("yacs.config")
    yacs.config.CfgNode = _FakeCfgNode
    sys.modules.update({"yacs": yacs, "yacs.config": yacs.config})
    try:
        config = _FakeCfgNode(MODEL=_FakeCfgNode(NAME="vssm", DROP_PATH_RATE=0.2))
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict()
        torch.save(
            {
                "model": model_state,
                "model_ema": ema_state if ema_state is not None else {k: v + 1 for k, v in model_state.items()},
                "optimizer": optimizer,
                "args": argparse.Namespace(model="vim", lr=5e-4),
                "config": config,
                "epoch": 299,
                "max_accuracy": 80.5,
            },
            path,
        )
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]
    with pytest.raises(ImportError):  # the loader must not need it
        __import__("yacs.config")


@pytest.mark.parametrize("kind", ["vim", "vmamba_v2", "vmamba_v0"])
def test_official_training_checkpoint_round_trips(tmp_path, kind):
    source = tiny(kind)
    path = tmp_path / "official.pth"
    save_official(path, source.state_dict())
    loaded = tiny(kind, num_classes=1000)
    with torch.no_grad():
        for p in loaded.parameters():
            p.zero_()
    load_checkpoint(loaded, path)
    size = 32 if kind == "vim" else 64
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(images), source(images))  # `model`, not the EMA copy


def test_formats_safetensors_plain_and_ddp(tmp_path):
    source = tiny("vim")
    state = source.state_dict()
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    for name in ("w.safetensors", "plain.pth", "ddp.pth"):
        read = read_state_dict(tmp_path / name)
        assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)


def test_create_model_and_timm_load_the_same_file(tmp_path):
    source = tiny("vim")
    path = tmp_path / "vim.pth"
    save_official(path, source.state_dict())
    config = dict(embed_dim=32, depth=2, img_size=32, patch_size=8, stride=8)
    ours = adaptor_peft.create_model("vim_tiny_patch16_224", checkpoint=path, **config).eval()
    via_timm = timm.create_model(
        "vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **config
    ).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(images), source(images)) and torch.equal(via_timm(images), source(images))


def test_other_num_classes_keeps_the_backbone_and_a_fresh_head(tmp_path):
    source = tiny("vmamba_v2")
    path = tmp_path / "vmamba.pth"
    torch.save(source.state_dict(), path)
    model = adaptor_peft.create_model("vmamba_tiny_s1l8", checkpoint=path, num_classes=10, dims=16, depths=(1, 2, 1, 1))
    assert model.classifier.head.out_features == 10
    assert torch.equal(model.classifier.norm.weight, source.classifier.norm.weight)
    assert torch.equal(model.layers[1].blocks[1].op.A_logs, source.layers[1].blocks[1].op.A_logs)


def test_vim_checkpoint_at_another_image_size(tmp_path):
    source = tiny("vim")  # 4x4 patches
    path = tmp_path / "vim.safetensors"
    save_file(source.state_dict(), path)
    model = adaptor_peft.create_model(
        "vim_tiny_patch16_224", checkpoint=path, img_size=48, embed_dim=32, depth=2, patch_size=8, stride=8
    )
    assert model.pos_embed.shape == (1, 37, 32)
    assert torch.equal(model.pos_embed[0, 18], source.pos_embed[0, 8])  # class token kept, moved to the middle


def test_legacy_vmamba_v0_key_names_load(tmp_path):
    source = tiny("vmamba_v0")
    legacy = {}
    for key, value in source.state_dict().items():
        key = key.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm.")
        key = key.replace(".op.", ".self_attention.").replace("blocks.0.norm.", "blocks.0.ln_1.")
        key = key.replace("blocks.1.norm.", "blocks.1.ln_1.").replace("classifier.", "")
        legacy[key] = value
    assert "head.weight" in legacy and "layers.0.blocks.0.self_attention.A_logs" in legacy
    model = tiny("vmamba_v0")
    load_checkpoint(model, legacy)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


def test_mismatches_give_one_error_listing_everything(tmp_path):
    state = tiny("vim").state_dict()
    state.pop("norm_f.weight")
    state["layers.0.mixer.surprise"] = torch.zeros(1)
    state["layers.1.mixer.D"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tiny("vim"), state)
    message = str(info.value)
    assert "missing (1):\n    norm_f.weight" in message
    assert "unexpected (1):\n    layers.0.mixer.surprise" in message
    assert "layers.1.mixer.D: checkpoint (5,) vs model (64,)" in message


def test_unreadable_files_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"corrupt\.pth"):
        read_state_dict(corrupt)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")
    torch.save({"epoch": 3, "notes": "no weights"}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no weights"):
        read_state_dict(tmp_path / "empty.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors"):
        read_state_dict(bad)


class _RunsCode:
    """Pickles as a call to a numpy helper that executes a string: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from numpy.testing._private.utils import runstring

        return runstring, (f"open({str(self.marker)!r}, 'w').write('code ran')", {})


def test_a_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "ran.txt"
    torch.save({"model": {"w": torch.zeros(1)}, "args": _RunsCode(marker)}, tmp_path / "evil.pth")
    assert read_state_dict(tmp_path / "evil.pth").keys() == {"w"}
    assert not marker.exists()


def test_legacy_non_zip_torch_save_files(tmp_path):
    state = tiny("vim").state_dict()
    torch.save({"model": state}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert read_state_dict(tmp_path / "legacy.pth").keys() == state.keys()


def test_num_classes_zero_gives_a_feature_extractor(tmp_path):
    path = tmp_path / "vim.pth"
    torch.save(tiny("vim").state_dict(), path)
    config = dict(embed_dim=32, depth=2, img_size=32, patch_size=8, stride=8)
    model = adaptor_peft.create_model("vim_tiny_patch16_224", checkpoint=path, num_classes=0, **config)
    via_timm = timm.create_model(
        "vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=0, **config
    )
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model(images).shape == (1, 32) and torch.equal(model(images), via_timm(images))


def test_checkpoint_urls_must_be_https():
    from adaptor_peft.models import CheckpointError, resolve_checkpoint

    with pytest.raises(CheckpointError, match="only https"):
        resolve_checkpoint("http://example.com/vim.pth", "vim_tiny_patch16_224")
    with pytest.raises(CheckpointError, match="not a file"):
        resolve_checkpoint("missing.pth", "vim_tiny_patch16_224")


def test_create_model_loads_a_checkpoint_into_a_features_only_model(tmp_path):
    source = tiny("vmamba_v2")
    path = tmp_path / "vmamba.pth"
    save_official(path, source.state_dict())
    config = dict(dims=16, depths=(1, 2, 1, 1))
    extractor = adaptor_peft.create_model("vmamba_tiny_s1l8", checkpoint=path, features_only=True, **config).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source.forward_intermediates(images, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(extractor(images), expected, strict=True))
    with pytest.raises(TypeError, match="features_only needs the checkpoint as a file"):
        adaptor_peft.create_model("vmamba_tiny_s1l8", checkpoint=source.state_dict(), features_only=True, **config)
