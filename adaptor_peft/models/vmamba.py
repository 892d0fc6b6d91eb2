"""VMamba (MzeroMiko/VMamba, classification): hierarchical VSSM with the 2D-selective-scan SS2D mixer.

State-dict keys and shapes follow the official ``classification/models/vmamba.py`` for the v2 models
(``s1l*`` / ``s2l*``: d_state 1, no z gate, MLP, conv patch embed and downsampling) and the vanilla v0
models (d_state 16, z gate, no MLP, patch merging); checkpoints with the legacy v0 key names
(``self_attention``, ``ln_1``, top-level ``head`` / ``norm``) are renamed on load. Blocks work
channels-last, which is numerically the same as the official channels-first ``LayerNorm2d`` path.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import nn

from .checkpoint import Loadable
from .layers import (
    Permute,
    checkpointed,
    drop_path_rates,
    full_precision,
    init_dt_,
    pool_choice,
    s4d_real_a_log,
    ssm,
)
from .protocol import AdaptableBlock, SSMMixer, declared
from .registry import build, register

DIRECTIONS = 4  # row-major, column-major, and both reversed


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 4, C, H*W): the four scan orders of the 2D map."""
    rows, cols = x.flatten(2), x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 4, C, H*W) scan outputs → (B, C, H*W) in row-major order: each direction put back in place,
    then summed."""
    rows = ys[:, 0] + ys[:, 2].flip(-1)
    cols = ys[:, 1] + ys[:, 3].flip(-1)
    batch, channels, _ = rows.shape
    return rows + cols.view(batch, channels, width, height).transpose(2, 3).reshape(batch, channels, -1)


class SS2D(SSMMixer):
    """2D selective scan: in_proj, depthwise 3x3 conv + SiLU, four directional scans with their own
    projections and SSM parameters, merge, LayerNorm, optional SiLU(z) gate, out_proj."""

    ssm_parameters = ("A_logs", "Ds", "conv2d", "dt_projs_bias")
    ssm_biases = ("dt_projs_bias",)
    no_decay = ("A_logs",)

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        d_conv: int = 3,
        conv_bias: bool = True,
        z_gate: bool = True,
        dt_rank: int | None = None,
    ):
        super().__init__()
        inner = int(ssm_ratio * d_model)
        self.d_state, self.dt_rank, self.z_gate = d_state, dt_rank or math.ceil(d_model / 16), z_gate
        self.x_proj_weight = nn.Parameter(torch.empty(DIRECTIONS, self.dt_rank + 2 * d_state, inner))
        self.A_logs = nn.Parameter(s4d_real_a_log(DIRECTIONS * inner, d_state))
        self.Ds = nn.Parameter(torch.ones(DIRECTIONS * inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(DIRECTIONS, inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(DIRECTIONS, inner))
        self.in_proj = nn.Linear(d_model, inner * (2 if z_gate else 1), bias=False)
        self.conv2d = nn.Conv2d(inner, inner, d_conv, padding=(d_conv - 1) // 2, groups=inner, bias=conv_bias)
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, d_model, bias=False)
        bound = inner**-0.5
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        init_dt_(self.dt_projs_weight, self.dt_projs_bias)

    def scan_shape(self) -> tuple[int, int]:
        return self.dt_projs_weight.shape[1], self.dt_projs_weight.shape[0]

    def spatial_width(self, position: str) -> int:
        return self.out_proj.out_features if position == "output" else self.out_proj.in_features

    def scan(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E, H, W) after conv → merged scan output (B, H, W, E), before out_norm."""
        batch, inner, height, width = x.shape
        xs = cross_scan(x)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        ys = ssm(
            self.adaptor_t,
            xs.flatten(1, 2),
            dts.flatten(1, 2),
            -torch.exp(full_precision(self.A_logs)),
            Bs,
            Cs,
            full_precision(self.Ds),
            delta_bias=full_precision(self.dt_projs_bias.flatten()),
            delta_softplus=True,
        )
        y = cross_merge(ys.view(batch, DIRECTIONS, inner, -1), height, width)
        return y.transpose(1, 2).reshape(batch, height, width, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(x)
        if self.z_gate:
            x, z = x.chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))
        y = self.out_norm(self.scan(x))
        if self.z_gate:
            y = y * F.silu(z)
        return self.spatial(self.out_proj(self.spatial(y, "inner")), "output")

    def spatial(self, x: torch.Tensor, position: str) -> torch.Tensor:
        """Adaptor-S at ``position`` on a (B, H, W, C) map."""
        return x if self.adaptor_s is None or self.adaptor_s.position != position else self.adaptor_s(x)


class VSSBlock(AdaptableBlock):
    """``x + drop_path(SS2D(norm(x)))``, then ``x + drop_path(mlp(norm2(x)))`` when ``mlp_ratio > 0``."""

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0, **ss2d_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, **ss2d_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    @property
    def width(self) -> int:
        return self.norm.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm(x)
        mixed = self.op(normed)
        if self.parallel_adapter is not None:
            mixed = mixed + self.parallel_adapter(normed)
        x = x + self.drop_path(mixed)
        if hasattr(self, "mlp"):
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class PatchMerging2D(nn.Module):
    """v0 downsampling: 2x2 neighbours concatenated (zero-padded to even sides), LayerNorm, Linear."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


def _patch_embed(version: str, in_chans: int, dim: int, patch_size: int) -> nn.Sequential:
    if version == "v1":
        return nn.Sequential(nn.Conv2d(in_chans, dim, patch_size, patch_size), Permute(0, 2, 3, 1), nn.LayerNorm(dim))
    stride = patch_size // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, stride + 1, stride, 1),
        Permute(0, 2, 3, 1),
        nn.LayerNorm(dim // 2),
        Permute(0, 3, 1, 2),
        nn.GELU(),
        nn.Conv2d(dim // 2, dim, stride + 1, stride, 1),
        Permute(0, 2, 3, 1),
        nn.LayerNorm(dim),
    )


def _downsample(version: str, dim: int, out_dim: int) -> nn.Module:
    if version == "v1":
        return PatchMerging2D(dim, out_dim)
    return nn.Sequential(
        Permute(0, 3, 1, 2), nn.Conv2d(dim, out_dim, 3, 2, 1), Permute(0, 2, 3, 1), nn.LayerNorm(out_dim)
    )


class VSSM(Loadable, nn.Module):
    """VMamba: patch embed, four stages of VSS blocks with downsampling between them, then norm, global
    average pooling and a linear head (``classifier.norm`` / ``classifier.head``).

    timm's model contract: ``forward_features`` gives the normed last-stage map channels-last,
    (B, H, W, C), as timm's Swin and MambaOut (and as the blocks compute); ``forward_head`` averages it
    (``global_pool`` "avg"; "" keeps the map) and applies the head.
    """

    POOLS = ("avg", "")

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: tuple[int, ...] = (2, 2, 9, 2),
        dims: int = 96,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        z_gate: bool = True,
        conv_bias: bool = True,
        mlp_ratio: float = 0.0,
        version: str = "v0",
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        if version not in ("v0", "v2"):
            raise ValueError(f"VSSM version must be 'v0' or 'v2', got {version!r}")
        widths = [dims * 2**i for i in range(len(depths))]
        self.num_classes, self.num_features, self.img_size = num_classes, widths[-1], img_size
        self.global_pool = pool_choice(global_pool, self.POOLS, "VMamba")
        self.grad_checkpointing = False
        self.feature_info = [
            dict(num_chs=width, reduction=patch_size * 2**i, module=f"layers.{i}") for i, width in enumerate(widths)
        ]
        embed, down = ("v1", "v1") if version == "v0" else ("v2", "v3")
        self.patch_embed = _patch_embed(embed, in_chans, dims, patch_size)
        rates = drop_path_rates(drop_path_rate, sum(depths))
        ssm = dict(d_state=d_state, ssm_ratio=ssm_ratio, z_gate=z_gate, conv_bias=conv_bias, mlp_ratio=mlp_ratio)
        self.layers = nn.ModuleList()
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            first = sum(depths[:i])
            blocks = nn.Sequential(*(VSSBlock(width, rates[first + j], **ssm) for j in range(depth)))
            last = i == len(depths) - 1
            self.layers.append(
                nn.Sequential(
                    OrderedDict(
                        blocks=blocks, downsample=nn.Identity() if last else _downsample(down, width, widths[i + 1])
                    )
                )
            )
        self.classifier = nn.Sequential(
            OrderedDict(
                norm=nn.LayerNorm(self.num_features),
                head=nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity(),
            )
        )

    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def no_weight_decay(self) -> set[str]:
        """Parameters weight decay must leave alone (timm's hook): A."""
        return declared(self, "no_decay")

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for ``num_classes`` (0: none), and the pooling if ``global_pool`` is given."""
        if global_pool is not None:
            self.global_pool = pool_choice(global_pool, self.POOLS, "VMamba")
        self.num_classes = num_classes
        self.classifier.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def _stages(
        self, x: torch.Tensor, take: Sequence[int] = (), stop: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images through the first ``stop`` stages (all if None): the last one's output before the norm,
        and the output of each stage in ``take`` before its downsampling, all (B, H, W, C)."""
        x, taken = self.patch_embed(x), []
        stages = self.layers[:stop]
        for i, stage in enumerate(stages):
            for block in stage.blocks:
                x = checkpointed(block, x, enabled=self.grad_checkpointing)
            if i in take:
                taken.append(x)
            if i < len(stages) - 1:
                x = stage.downsample(x)
        return x, taken

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) → the normed last-stage map (B, H / 32, W / 32, C)."""
        return self.classifier.norm(self._stages(x)[0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """A map from :meth:`forward_features` → logits, or the pooled feature with ``pre_logits``."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.classifier.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature extraction: the output of the stages in ``indices`` (the last n if an int, all
        if None) before their downsampling, as (B, C, H, W) ("NCHW") or (B, H, W, C) ("NHWC"); with
        ``norm`` the last stage's goes through ``classifier.norm`` (sized for it only, as timm's Swin);
        with ``stop_early`` no stage after the last of them runs. Returns them, or ``(final map, them)``
        unless ``intermediates_only``; the final map is normed only when the last stage ran."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"VMamba: output_fmt {output_fmt!r} is not supported; expected 'NCHW' or 'NHWC'")
        take, last = feature_take_indices(len(self.layers), indices)
        x, taken = self._stages(x, take, last + 1 if stop_early else None)
        final = len(self.layers) - 1
        intermediates = [
            self.classifier.norm(t) if norm and i == final else t for i, t in zip(take, taken, strict=True)
        ]
        if output_fmt == "NCHW":
            intermediates = [t.permute(0, 3, 1, 2) for t in intermediates]
        if intermediates_only:
            return intermediates
        return (self.classifier.norm(x) if not stop_early or last == final else x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drops the stages after the last of ``indices`` and its downsampling (and the norm, the head,
        if asked, or if the last stage goes: both are sized for it); returns the indices."""
        take, last = feature_take_indices(len(self.layers), indices)
        prune_end = last < len(self.layers) - 1
        self.layers = self.layers[: last + 1]
        self.layers[-1].downsample = nn.Identity()
        if prune_end:
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_norm or prune_end:
            self.classifier.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Renames the legacy v0 keys as the official loader does."""
        renames = [
            (r"^patch_embed\.proj\.", "patch_embed.0."),
            (r"^patch_embed\.norm\.", "patch_embed.2."),
            (r"^(layers\.\d+\.blocks\.\d+\.)ln_1\.", r"\1norm."),
            (r"^(layers\.\d+\.blocks\.\d+\.)self_attention\.", r"\1op."),
            (r"^norm\.", "classifier.norm."),
            (r"^head\.", "classifier.head."),
        ]
        adapted = {}
        for key, value in state_dict.items():
            for pattern, replacement in renames:
                key = re.sub(pattern, replacement, key)
            adapted[key] = value
        return adapted


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.0",
        "classifier": "classifier.head",
        "custom_load": True,
        "license": "mit",
        **kwargs,
    }


_V2 = dict(d_state=1, z_gate=False, conv_bias=False, mlp_ratio=4.0, version="v2")
_V0 = dict(d_state=16, ssm_ratio=2.0, z_gate=True, conv_bias=True, mlp_ratio=0.0, version="v0")
_CONFIGS = {
    "vmamba_tiny_s1l8": dict(depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0, **_V2),
    "vmamba_small_s1l20": dict(depths=(2, 2, 20, 2), dims=96, ssm_ratio=1.0, **_V2),
    "vmamba_base_s1l20": dict(depths=(2, 2, 20, 2), dims=128, ssm_ratio=1.0, **_V2),
    "vmamba_tiny_s2l5": dict(depths=(2, 2, 5, 2), dims=96, ssm_ratio=2.0, **_V2),
    "vmamba_small_s2l15": dict(depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0, **_V2),
    "vmamba_base_s2l15": dict(depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0, **_V2),
    "vmamba_tiny_v0": dict(depths=(2, 2, 9, 2), dims=96, **_V0),
    "vmamba_small_v0": dict(depths=(2, 2, 27, 2), dims=96, **_V0),
    "vmamba_base_v0": dict(depths=(2, 2, 27, 2), dims=128, **_V0),
}
default_cfgs = generate_default_cfgs({name: _cfg() for name in _CONFIGS})


def _create(variant: str, pretrained: bool, **kwargs) -> VSSM:
    features = dict(out_indices=(0, 1, 2, 3), feature_cls="getter")
    return build(VSSM, variant, pretrained, feature_cfg=features, **{**_CONFIGS[variant], **kwargs})


@register
def vmamba_tiny_s1l8(pretrained: bool = False, **kwargs) -> VSSM:
    return _create("vmamba_tiny_s1l8", pretrained, **kwargs)


@register
def vmamba_small_s1l20(pretrained: bool = False, **kwargs) -> VSSM:
    return _create("vmamba_small_s1l20", pretrained, **kwargs)


@register
def vmamba_base_s1l20(pretrained: bool = False, **kwargs) -> VSSM:
    return _create("vmamba_base_s1l20", pretrained, **kwargs)


@register
def vmamba_tiny_s2l5(pretrained: bool = False, **kwargs) -> VSSM:
    return _create("vmamba_tiny_s2l5", pretrained, **kwargs)


@register
def vmamba_small_s2l15(pretrained: bool = False, **kwargs) -> VSSM:
    return _create("vmamba_small_s2l15", pretrained, **kwargs)


@register
def vmamba_base_s2l15(pretrained: bool = False, **kwargs) -> VSSM:
    return _create("vmamba_base_s2l15", pretrained, **kwargs)


@register
def vmamba_tiny_v0(pretrained: bool = False, **kwargs) -> VSSM:
    return _create("vmamba_tiny_v0", pretrained, **kwargs)


@register
def vmamba_small_v0(pretrained: bool = False, **kwargs) -> VSSM:
    return _create("vmamba_small_v0", pretrained, **kwargs)


@register
def vmamba_base_v0(pretrained: bool = False, **kwargs) -> VSSM:
    return _create("vmamba_base_v0", pretrained, **kwargs)
