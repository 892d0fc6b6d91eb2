"""The backbone protocol: what mixers and blocks declare, and how the methods read it."""

import pytest
import torch
from torch import nn

from adaptor_peft import create_model, prepare_model
from adaptor_peft.models import AdaptableBlock, SSMMixer, find_blocks, find_mixers
from adaptor_peft.models.protocol import declared


def test_vim_declares_its_ssm_parameters_biases_and_no_decay():
    model = create_model("vim_tiny_patch16_224", depth=2, num_classes=3)
    ssm = declared(model, "ssm_parameters")
    assert {"layers.0.mixer.A_log", "layers.1.mixer.D_b", "layers.0.mixer.conv1d.weight"} <= ssm
    assert {"layers.0.mixer.dt_proj.bias", "layers.0.mixer.dt_proj_b.bias"} <= ssm
    assert not any("in_proj" in n or "x_proj" in n or "dt_proj.weight" in n for n in ssm)
    assert declared(model, "no_decay") == {f"layers.{i}.mixer.{a}" for i in (0, 1) for a in ("A_log", "A_b_log")}
    assert declared(model, "ssm_biases") == set()
    assert [name for name, _ in find_mixers(model)] == ["layers.0.mixer", "layers.1.mixer"]
    assert [name for name, _ in find_blocks(model)] == ["layers.0", "layers.1"]
    assert [m.takes_adaptor_s for _, m in find_mixers(model)] == [True, False]


def test_declarations_look_through_lora_wrappers():
    model = create_model("vim_tiny_patch16_224", depth=1, num_classes=3)
    prepare_model(model, "lora", targets=["dt_proj"])
    assert "layers.0.mixer.dt_proj.base_layer.bias" in declared(model, "ssm_parameters")
    assert not any("lora_" in n for n in declared(model, "ssm_parameters"))


def test_vmamba_declares_its_delta_bias_as_a_bias():
    model = create_model("vmamba_tiny_s1l8", dims=16, depths=(1, 1, 1, 1), num_classes=3)
    assert "layers.0.blocks.0.op.dt_projs_bias" in declared(model, "ssm_biases")
    prepare_model(model, "bias")
    assert model.get_parameter("layers.0.blocks.0.op.dt_projs_bias").requires_grad
    assert not model.get_parameter("layers.0.blocks.0.op.A_logs").requires_grad


def test_an_unknown_declaration_and_an_undeclared_shape_are_named():
    with pytest.raises(ValueError, match="'ssm_weights' is not one of"):
        declared(nn.Linear(2, 2), "ssm_weights")

    class Bare(SSMMixer):
        pass

    class BareBlock(AdaptableBlock):
        pass

    with pytest.raises(NotImplementedError, match="Bare must say its scan's shape"):
        Bare().scan_shape()
    with pytest.raises(NotImplementedError, match="BareBlock must say its width"):
        _ = BareBlock().width


def test_a_new_mixer_and_block_take_every_method_without_package_changes():
    """A backbone outside the package, written only against the protocol, takes the adaptors and the
    parallel adapter, and ``partial`` finds its SSM's parameters."""

    class ToyMixer(SSMMixer):
        ssm_parameters = ("A",)

        def __init__(self, width: int):
            super().__init__()
            self.A = nn.Parameter(torch.zeros(width))
            self.proj = nn.Linear(width, width)

        def scan_shape(self) -> tuple[int, int]:
            return 8, 1

        def spatial_width(self, position: str) -> int:
            return 8

    class ToyBlock(AdaptableBlock):
        def __init__(self):
            super().__init__()
            self.mixer = ToyMixer(8)

        @property
        def width(self) -> int:
            return 8

    model = nn.Sequential(ToyBlock(), nn.Linear(8, 2))
    prepare_model(model, "partial")
    assert [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("1.")] == ["0.mixer.A"]
    model = prepare_model(nn.Sequential(ToyBlock(), nn.Linear(8, 2)), "parallel_adapter", rank=2)
    assert model[0].parallel_adapter.up.out_features == 8
    model = prepare_model(nn.Sequential(ToyBlock(), nn.Linear(8, 2)), "adaptor", t_groups=2)
    assert model[0].mixer.adaptor_t is not None and model[0].mixer.adaptor_s is not None
