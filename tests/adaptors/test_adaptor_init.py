"""Adaptor initialisation: the predictor's fan-in, and AdaptorConfig as the one source of the defaults."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from adaptor_peft.adaptors import AdaptorConfig, AdaptorS, AdaptorT

CONFIG_FIELDS = {  # constructor argument -> AdaptorConfig field
    AdaptorT: dict(
        locations="t_locations",
        groups="t_groups",
        rank="t_rank",
        anchor="t_anchor",
        dropout="dropout",
        lr_scale="lr_scale",
    ),
    AdaptorS: dict(
        kernel_size="s_kernel_size",
        dilations="s_dilations",
        share_kernel="s_share_kernel",
        position="s_position",
        dropout="dropout",
        lr_scale="lr_scale",
    ),
}


@pytest.mark.parametrize("directions", [1, 2, 4])
def test_adaptor_t_down_is_initialised_with_the_fan_in_of_one_direction(directions):
    """As nn.Linear(channels, rank) per direction: uniform in ±1/sqrt(channels), whatever the rank."""
    torch.manual_seed(0)
    channels = 768
    down = AdaptorT(channels, directions, rank=8).down.detach()
    bound = channels**-0.5  # 0.036; a fan-in over the 3-D tensor (rank * channels) gives 0.013
    assert down.abs().max() <= bound and down.abs().max() > 0.99 * bound
    assert down.std().item() == pytest.approx(bound / 3**0.5, rel=0.03)
    assert all(d.std().item() == pytest.approx(bound / 3**0.5, rel=0.05) for d in down)


@pytest.mark.parametrize("adaptor", [AdaptorT, AdaptorS])
def test_adaptor_defaults_are_adaptor_configs(adaptor):
    defaults = {f.name: f.default for f in dataclasses.fields(AdaptorConfig)}
    signature = inspect.signature(adaptor).parameters
    for argument, field in CONFIG_FIELDS[adaptor].items():
        assert signature[argument].default == defaults[field], argument
