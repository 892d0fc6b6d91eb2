"""MambaVision (NVlabs/MambaVision, CVPR 2025): a hierarchical hybrid of convolution, Mamba and attention.

A convolutional stem (stride 4), then four levels at strides 4, 8, 16 and 32. The first two hold
residual conv blocks; the last two cut the map into non-overlapping windows (zero-padded to whole
windows) and run on each window's tokens blocks whose first half mixes them with the MambaVision mixer
(a selective scan beside an un-scanned convolutional branch) and whose second half with self-attention.
A convolution halves the map between levels; BatchNorm, global average pooling and a linear head close.

State-dict keys and shapes follow the official ``mambavision/models/mamba_vision.py`` (pip package
``mambavision``), so the release files (``*.pth.tar``, weights under ``state_dict``) load with
``strict=True``, and so do the Hugging Face hub's (``nvidia/MambaVision-*-1K``, whose ``transformers``
wrapper keeps every key under ``model.``; :meth:`MambaVision.adapt_state_dict` strips it). This is an
implementation of the architecture, not the official code, which is under NVIDIA's non-commercial
source code licence; the released weights are under that licence too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, Mlp
from timm.models import generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import nn

from .checkpoint import Loadable
from .layers import (
    DeltaProjection,
    checkpointed,
    drop_path_rates,
    full_precision,
    pool_choice,
    project_scan_input,
    s4d_real_a_log,
    ssm,
)
from .protocol import AdaptableBlock, SSMMixer, declared
from .registry import build, register

Grid = tuple[int, int]  # (height, width) of the token map a block's tokens come from: a window's
Indices = int | list[int] | None  # forward_intermediates' choice of levels: the last n, these, or all
Intermediates = list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]  # what forward_intermediates returns
POOLS = ("avg", "")
"""``global_pool`` choices: the average over the last map, or none (the map itself)."""


def to_windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """A (B, C, H, W) map whose sides are multiples of ``size`` → the tokens of its ``size`` x ``size``
    windows, (B * windows, size * size, C): windows in row-major order, tokens row-major within each."""
    batch, channels, height, width = x.shape
    windows = x.view(batch, channels, height // size, size, width // size, size).permute(0, 2, 4, 3, 5, 1)
    return windows.reshape(-1, size * size, channels)


def from_windows(tokens: torch.Tensor, size: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`to_windows`: window tokens → the (B, C, height, width) map."""
    channels = tokens.shape[-1]
    windows = tokens.view(-1, height // size, width // size, size, size, channels)
    return windows.permute(0, 5, 1, 3, 2, 4).reshape(-1, channels, height, width)


class MambaVisionMixer(SSMMixer):
    """The MambaVision mixer: ``in_proj`` splits the tokens into halves x and z; each goes through its
    own depthwise conv (non-causal, 'same' padding) and SiLU; x is selectively scanned (no gate), z is
    not scanned at all, and the two are concatenated for ``out_proj``. One scan direction, row-major
    over the window.

    The official forward adds ``dt_proj``'s bias to Δ twice, once in the Linear and once as the scan's
    ``delta_bias``, and the released weights were trained so: here Δ's projection leaves its bias out
    (:class:`~adaptor_peft.models.layers.DeltaProjection`) and the scan adds it twice, in float32."""

    ssm_parameters = ("A_log", "D", "conv1d_x", "conv1d_z", "dt_proj.bias")
    no_decay = ("A_log",)

    def __init__(self, d_model: int, d_state: int = 8, d_conv: int = 3, expand: float = 1.0):
        super().__init__()
        half = int(expand * d_model) // 2
        self.d_state, self.dt_rank = d_state, math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * half, bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = DeltaProjection(self.dt_rank, half)
        self.A_log = nn.Parameter(s4d_real_a_log(half, d_state))
        self.D = nn.Parameter(torch.ones(half))
        self.out_proj = nn.Linear(2 * half, d_model, bias=False)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=False)
        self.conv1d_z = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=False)

    def scan_shape(self) -> tuple[int, int]:
        return self.A_log.shape[0], 1

    def spatial_width(self, position: str) -> int:
        return self.out_proj.out_features if position == "output" else self.out_proj.in_features

    def spatial(self, tokens: torch.Tensor, grid: Grid | None, position: str) -> torch.Tensor:
        """Adaptor-S at ``position`` on (B, L, C) tokens laid out row-major on ``grid`` (a window)."""
        if self.adaptor_s is None or self.adaptor_s.position != position:
            return tokens
        if grid is None:
            raise ValueError("MambaVisionMixer: Adaptor-S needs the (height, width) grid of the tokens")
        return self.adaptor_s(tokens.reshape(tokens.shape[0], *grid, -1)).flatten(1, 2)

    def forward(self, tokens: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        """(B, L, C) tokens of one window (or any sequence when no Adaptor-S is injected) → (B, L, C)."""
        x, z = (half.transpose(1, 2) for half in self.in_proj(tokens).chunk(2, dim=-1))
        u, gate = F.silu(self.conv1d_x(x)), F.silu(self.conv1d_z(z))
        x_dbl, projected = project_scan_input(self.adaptor_t, self.x_proj, u, 0)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        y = ssm(
            self.adaptor_t,
            u,
            self.dt_proj(dt).transpose(1, 2),
            -torch.exp(full_precision(self.A_log)),
            B.transpose(1, 2),
            C.transpose(1, 2),
            full_precision(self.D),
            delta_bias=2 * full_precision(self.dt_proj.bias),
            delta_softplus=True,
            direction=0,
            projected=projected,
        )
        mixed = self.spatial(torch.cat([y, gate], dim=1).transpose(1, 2), grid, "inner")
        return self.spatial(self.out_proj(mixed), grid, "output")


class ConvBlock(nn.Module):
    """``x + drop_path(norm2(conv2(GELU(norm1(conv1(x))))))`` on (B, C, H, W): 3x3 convs, BatchNorm."""

    def __init__(self, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(dim)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x))))))


class HybridBlock(AdaptableBlock):
    """``x + drop_path(gamma_1 * mixer(norm1(x)))``, then ``x + drop_path(gamma_2 * mlp(norm2(x)))``, on a
    window's tokens (B, L, C); the mixer is a :class:`MambaVisionMixer` or multi-head self-attention, and
    the layer scales ``gamma_*`` exist only with ``layer_scale`` (MambaVision-B). A parallel adapter's
    output joins the mixer's after its layer scale: it learns its own scale, and a 1e-5 one would mute it."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = Attention(dim, num_heads, qkv_bias=qkv_bias) if attention else MambaVisionMixer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        scales = layer_scale is not None
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale))) if scales else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale))) if scales else None

    @property
    def width(self) -> int:
        return self.norm1.weight.shape[0]

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        normed = self.norm1(x)
        mixed = self.mixer(normed, grid) if isinstance(self.mixer, SSMMixer) else self.mixer(normed)
        if self.gamma_1 is not None:
            mixed = self.gamma_1 * mixed
        if self.parallel_adapter is not None:
            mixed = mixed + self.parallel_adapter(normed)
        x = x + self.drop_path(mixed)
        out = self.mlp(self.norm2(x))
        return x + self.drop_path(out if self.gamma_2 is None else self.gamma_2 * out)


class MambaVisionLevel(nn.Module):
    """One level: its blocks (conv blocks on the map, or hybrid blocks on ``window_size`` windows of it),
    then ``downsample`` (a stride-2 3x3 conv doubling the channels; the identity after the last level)."""

    def __init__(self, blocks: list[nn.Module], window_size: int | None, downsample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.window_size = window_size
        self.downsample = downsample

    def forward(self, x: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
        """(B, C, H, W) → the blocks' output (B, C, H, W), before ``downsample``. Hybrid blocks see each
        window's tokens and its grid; the padding to whole windows is cut off again afterwards."""
        if self.window_size is None:
            for block in self.blocks:
                x = checkpointed(block, x, enabled=grad_checkpointing)
            return x
        size, (height, width) = self.window_size, x.shape[-2:]
        padded = F.pad(x, (0, -width % size, 0, -height % size))
        tokens = to_windows(padded, size)
        for block in self.blocks:
            tokens = checkpointed(block, tokens, (size, size), enabled=grad_checkpointing)
        return from_windows(tokens, size, *padded.shape[-2:])[:, :, :height, :width]


class ConvStem(nn.Module):
    """Images → the first level's map at stride 4: two stride-2 3x3 convs, each with BatchNorm and ReLU."""

    def __init__(self, in_chans: int, in_dim: int, dim: int):
        super().__init__()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(in_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(dim, eps=1e-4),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_down(x)


class Downsample(nn.Module):
    """Between levels: a stride-2 3x3 conv that halves the map and doubles the channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(x)


def _head(width: int, num_classes: int) -> nn.Module:
    return nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()


class MambaVision(Loadable, nn.Module):
    """MambaVision: conv stem, four levels (conv, conv, hybrid, hybrid), BatchNorm, average pooling and a
    linear head. A hybrid level of depth d runs the MambaVision mixer in its first ceil(d / 2) blocks and
    attention in the rest. Any input size works: hybrid levels pad their map to whole windows.

    timm's model contract: ``forward_features`` gives the normed last-level map (B, C, H / 32, W / 32),
    channels-first as the official model and timm's convolutional networks; ``forward_head`` averages it
    (``global_pool`` "avg"; "" keeps the map) and applies the head. ``img_size`` is accepted as by every
    backbone of the package and only recorded: the model does not depend on it.
    """

    def __init__(
        self,
        dim: int = 80,
        in_dim: int = 32,
        depths: Sequence[int] = (1, 3, 8, 4),
        window_size: Sequence[int] = (8, 8, 14, 7),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_scale: float | None = None,
        drop_path_rate: float = 0.2,
        in_chans: int = 3,
        num_classes: int = 1000,
        img_size: int = 224,
        global_pool: str = "avg",
    ):
        super().__init__()
        if len(depths) != 4 or len(window_size) != 4 or len(num_heads) != 4:
            raise ValueError(
                f"MambaVision has four levels: depths {tuple(depths)}, window_size {tuple(window_size)} and "
                f"num_heads {tuple(num_heads)} need four entries each"
            )
        widths = [dim * 2**i for i in range(4)]
        self.num_classes, self.num_features, self.img_size = num_classes, widths[-1], img_size
        self.global_pool = pool_choice(global_pool, POOLS, "MambaVision")
        self.grad_checkpointing = False
        self.feature_info = [dict(num_chs=w, reduction=4 * 2**i, module=f"levels.{i}") for i, w in enumerate(widths)]
        self.patch_embed = ConvStem(in_chans, in_dim, dim)
        rates = drop_path_rates(drop_path_rate, sum(depths))
        self.levels = nn.ModuleList()
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            level_rates = rates[sum(depths[:i]) : sum(depths[: i + 1])]
            if i < 2:
                blocks, window = [ConvBlock(width, rate) for rate in level_rates], None
            else:
                first_attention = (depth + 1) // 2
                blocks = [
                    HybridBlock(width, num_heads[i], j >= first_attention, mlp_ratio, qkv_bias, rate, layer_scale)
                    for j, rate in enumerate(level_rates)
                ]
                window = window_size[i]
            self.levels.append(MambaVisionLevel(blocks, window, Downsample(width) if i < 3 else nn.Identity()))
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = _head(self.num_features, num_classes)
        for module in self.modules():  # the official init; it also overrides Mamba's Δ init (bias 0)
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    def no_weight_decay(self) -> set[str]:
        """Parameters weight decay must leave alone (timm's hook): A."""
        return declared(self, "no_decay")

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for ``num_classes`` (0: none), and the pooling if ``global_pool`` is given."""
        pool = self.global_pool if global_pool is None else global_pool
        self.global_pool = pool_choice(pool, POOLS, "MambaVision")
        self.num_classes, self.head = num_classes, _head(self.num_features, num_classes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def _levels(
        self, x: torch.Tensor, take: Sequence[int] = (), stop: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images through the first ``stop`` levels (all if None): the last one's output before the norm,
        and the output of each level in ``take`` before its downsampling, all (B, C, H, W)."""
        x, taken = self.patch_embed(x), []
        levels = self.levels[:stop]
        for i, level in enumerate(levels):
            x = level(x, self.grad_checkpointing)
            if i in take:
                taken.append(x)
            if i < len(levels) - 1:
                x = level.downsample(x)
        return x, taken

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) → the normed last-level map (B, C, H / 32, W / 32)."""
        return self.norm(self._levels(x)[0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """A map from :meth:`forward_features` → logits, or the pooled feature with ``pre_logits``."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Intermediates:
        """timm's feature extraction: the output of the levels in ``indices`` (the last n if an int, all
        if None) before their downsampling, as (B, C, H, W) ("NCHW") or (B, H, W, C) ("NHWC"); with
        ``norm`` the last level's goes through ``norm`` (sized for it only); with ``stop_early`` no level
        after the last of them runs. Returns them, or ``(final map, them)`` unless ``intermediates_only``;
        the final map is normed only when the last level ran."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"MambaVision: output_fmt {output_fmt!r} is not supported; expected 'NCHW' or 'NHWC'")
        take, last = feature_take_indices(len(self.levels), indices)
        x, taken = self._levels(x, take, last + 1 if stop_early else None)
        final = len(self.levels) - 1
        intermediates = [self.norm(t) if norm and i == final else t for i, t in zip(take, taken, strict=True)]
        if output_fmt == "NHWC":
            intermediates = [t.permute(0, 2, 3, 1) for t in intermediates]
        if intermediates_only:
            return intermediates
        return (self.norm(x) if not stop_early or last == final else x), intermediates

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drops the levels after the last of ``indices`` and its downsampling (and the norm, the head,
        if asked, or if the last level goes: both are sized for it); returns the indices."""
        take, last = feature_take_indices(len(self.levels), indices)
        prune_end = last < len(self.levels) - 1
        self.levels = self.levels[: last + 1]
        self.levels[-1].downsample = nn.Identity()
        if prune_end:
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Strips the ``model.`` prefix of the hub's safetensors (its ``transformers`` wrapper's attribute)."""
        if state_dict and all(key.startswith("model.") for key in state_dict):
            return {key.removeprefix("model."): value for key, value in state_dict.items()}
        return state_dict


def _cfg(url: str, crop_pct: float) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": crop_pct,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv_down.0",
        "classifier": "head",
        "custom_load": True,
        "license": "other",  # NVIDIA Source Code License-NC (non-commercial), as the hub's model cards say
    }


# The release files, on the hub repos nvidia/MambaVision-{T,T2,S,B}-1K (whose model.safetensors load too). No
# hf_hub_id: timm would then prefer the hub, which it does not support for custom-loaded models.
_RELEASE = "https://huggingface.co/nvidia/MambaVision-{}-1K/resolve/main/{}.pth.tar"
_CONFIGS = {
    "mambavision_tiny_1k": dict(depths=(1, 3, 8, 4), dim=80, in_dim=32, drop_path_rate=0.2),
    "mambavision_tiny2_1k": dict(depths=(1, 3, 11, 4), dim=80, in_dim=32, drop_path_rate=0.2),
    "mambavision_small_1k": dict(depths=(3, 3, 7, 5), dim=96, in_dim=64, drop_path_rate=0.2),
    "mambavision_base_1k": dict(depths=(3, 3, 10, 5), dim=128, in_dim=64, drop_path_rate=0.3, layer_scale=1e-5),
}
default_cfgs = generate_default_cfgs(
    {
        "mambavision_tiny_1k": _cfg(_RELEASE.format("T", "mambavision_tiny_1k"), 1.0),
        "mambavision_tiny2_1k": _cfg(_RELEASE.format("T2", "mambavision_tiny2_1k"), 0.98),
        "mambavision_small_1k": _cfg(_RELEASE.format("S", "mambavision_small_1k"), 0.93),
        "mambavision_base_1k": _cfg(_RELEASE.format("B", "mambavision_base_1k"), 1.0),
    }
)


def _create(variant: str, pretrained: bool, **kwargs) -> MambaVision:
    features = dict(out_indices=(0, 1, 2, 3), feature_cls="getter")
    return build(MambaVision, variant, pretrained, feature_cfg=features, **{**_CONFIGS[variant], **kwargs})


@register
def mambavision_tiny_1k(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-T (31.8 M parameters), ImageNet-1k."""
    return _create("mambavision_tiny_1k", pretrained, **kwargs)


@register
def mambavision_tiny2_1k(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-T2 (35.1 M parameters), ImageNet-1k."""
    return _create("mambavision_tiny2_1k", pretrained, **kwargs)


@register
def mambavision_small_1k(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-S (50.1 M parameters), ImageNet-1k."""
    return _create("mambavision_small_1k", pretrained, **kwargs)


@register
def mambavision_base_1k(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-B (97.7 M parameters, layer scale 1e-5), ImageNet-1k."""
    return _create("mambavision_base_1k", pretrained, **kwargs)
