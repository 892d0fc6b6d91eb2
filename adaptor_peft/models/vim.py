"""Vision Mamba (Vim, hustvl/Vim): bidirectional "bimamba v2" blocks with a middle class token.

State-dict keys and shapes are those of the official releases (``vim_{t,s,b}_midclstok_*.pth``), so
their ``model`` entry loads with ``strict=True``. Unlike the official code, every projection is called
as a module (``self.in_proj(x)``), so wrappers such as HF ``peft`` LoRA take effect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import nn

from ..ops.depthwise import causal_conv1d
from .checkpoint import Loadable
from .layers import (
    DeltaProjection,
    Recompute,
    RMSNorm,
    checkpointed,
    drop_path_rates,
    full_precision,
    init_dt_,
    pool_choice,
    project_scan_input,
    s4d_real_a_log,
    ssm,
)
from .protocol import AdaptableBlock, SSMMixer, declared
from .registry import build, register

TokenLayout = tuple[tuple[int, int], int]  # (patch grid (height, width), index of the class token)


def grid_size(img_size: tuple[int, int], patch_size: int, stride: int) -> tuple[int, int]:
    return tuple((s - patch_size) // stride + 1 for s in img_size)


def without_token(tokens: torch.Tensor, index: int) -> torch.Tensor:
    """(B, M + 1, C) tokens without the class token at ``index``: the M patch tokens, in grid order."""
    return torch.cat([tokens[:, :index], tokens[:, index + 1 :]], dim=1)


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically resizes a (1, M + 1, C) position embedding whose class token sits at index M // 2,
    keeping that token's embedding and putting it back in the middle of the new sequence."""
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    m = old_grid[0] * old_grid[1]
    if pos_embed.shape[1] != m + 1:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} tokens, expected {m + 1} for grid {tuple(old_grid)}")
    cls = pos_embed[:, m // 2 : m // 2 + 1]
    patches = torch.cat([pos_embed[:, : m // 2], pos_embed[:, m // 2 + 1 :]], dim=1)
    patches = full_precision(patches.reshape(1, *old_grid, -1).permute(0, 3, 1, 2))
    patches = F.interpolate(patches, size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    mid = new_grid[0] * new_grid[1] // 2
    return torch.cat([patches[:, :mid], cls, patches[:, mid:]], dim=1)


class PatchEmbed(nn.Module):
    """Image → patch tokens (B, M, C) by one strided convolution; overlapping when stride < patch."""

    def __init__(self, img_size: int, patch_size: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size, self.stride = patch_size, stride
        self.grid_size = grid_size((img_size, img_size), patch_size, stride)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        if min(h, w) < self.patch_size or (h - self.patch_size) % self.stride or (w - self.patch_size) % self.stride:
            raise ValueError(
                f"Vim: image size {h}x{w} does not tile into {self.patch_size}-pixel patches at stride {self.stride}; "
                f"use sides of the form {self.patch_size} + k*{self.stride}"
            )
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), tuple(x.shape[-2:])


class BiMambaMixer(SSMMixer):
    """Bimamba-v2 mixer: one shared ``in_proj``, a forward scan and a reverse one (official Vim's scan over the
    flipped sequence), each with its own causal depthwise conv, ``x_proj``, ``dt_proj``, ``A`` and ``D``; the
    two outputs are averaged and projected back."""

    ssm_parameters = ("A_log", "A_b_log", "D", "D_b", "conv1d", "conv1d_b", "dt_proj.bias", "dt_proj_b.bias")
    no_decay = ("A_log", "A_b_log")

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, d_conv: int = 4, dt_rank: int | None = None):
        super().__init__()
        inner = expand * d_model
        self.d_state, self.dt_rank = d_state, dt_rank or math.ceil(d_model / 16)
        self.A_log = nn.Parameter(s4d_real_a_log(inner, d_state))
        self.D = nn.Parameter(torch.ones(inner))
        self.A_b_log = nn.Parameter(s4d_real_a_log(inner, d_state))
        self.D_b = nn.Parameter(torch.ones(inner))
        self.in_proj = nn.Linear(d_model, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = DeltaProjection(self.dt_rank, inner)
        self.conv1d_b = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj_b = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj_b = DeltaProjection(self.dt_rank, inner)
        self.out_proj = nn.Linear(inner, d_model, bias=False)
        init_dt_(self.dt_proj.weight, self.dt_proj.bias)
        init_dt_(self.dt_proj_b.weight, self.dt_proj_b.bias)

    def scan_shape(self) -> tuple[int, int]:
        return self.A_log.shape[0], 2

    def spatial_width(self, position: str) -> int:
        return self.out_proj.out_features if position == "output" else self.out_proj.in_features

    def directions(self):
        """Per scan direction: (conv1d, x_proj, dt_proj, A_log, D); forward first, then reversed."""
        return (
            (self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D),
            (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b),
        )

    def scan(self, x_seq: torch.Tensor, z_seq: torch.Tensor, direction: int, recompute: Recompute) -> torch.Tensor:
        """One direction on ``in_proj``'s two halves (B, E, L); returns (B, E, L). Everything stays in
        sequence order: the reversed direction's conv looks ahead and its scan runs from the last position,
        which computes what official Vim's flips, forward conv and scan and flip back do, without the flips.

        The direction's conv, SiLU and Δ are left to ``recompute``: rebuilt in the backward pass from
        ``in_proj``'s half and ``x_proj``'s output, which the graph keeps anyway (a conv or Δ projection wrapped
        by another module, such as LoRA's, is kept instead)."""
        conv, x_proj, dt_proj, A_log, D = self.directions()[direction]
        length, reverse = x_seq.shape[-1], bool(direction)
        if type(conv) is nn.Conv1d:
            conved = causal_conv1d(x_seq, conv.weight, conv.bias, reverse)
            rebuild_conved = recompute.add(conved, lambda: causal_conv1d(x_seq, conv.weight, conv.bias, reverse))
        else:  # a wrapped conv (LoRA's) runs as itself, over the flipped sequence if reversed, and keeps its output
            seq = x_seq
            if reverse:
                seq = x_seq.flip(-1)
                recompute.add(seq, lambda: x_seq.flip(-1))
            conved = conv(seq)[..., :length]
            conved = conved.flip(-1) if reverse else conved
            rebuild_conved = lambda: conved  # noqa: E731
        u = F.silu(conved)
        recompute.add(u, lambda: F.silu(rebuild_conved()))
        x_dbl, projected = project_scan_input(self.adaptor_t, x_proj, u, direction)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = dt_proj(dt)
        if type(dt_proj) is DeltaProjection:
            recompute.add(delta, lambda: F.linear(dt, dt_proj.weight))
        A = -torch.exp(full_precision(A_log))
        return ssm(
            self.adaptor_t,
            u,
            delta.transpose(1, 2),
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            full_precision(D),
            z_seq,
            delta_bias=full_precision(dt_proj.bias),
            delta_softplus=True,
            reverse=reverse,
            direction=direction,
            projected=projected,
        )

    def spatial(self, tokens: torch.Tensor, layout: TokenLayout | None, position: str) -> torch.Tensor:
        """Adaptor-S at ``position`` on (B, L, C) tokens: patch tokens as a 2D map, class token untouched."""
        if self.adaptor_s is None or self.adaptor_s.position != position:
            return tokens
        if layout is None:
            raise ValueError("BiMambaMixer: Adaptor-S needs the token layout (patch grid, class token index)")
        grid, cls = layout
        return self.adaptor_s(tokens, grid, cls)

    def forward(self, hidden: torch.Tensor, layout: TokenLayout | None = None) -> torch.Tensor:
        # split before transposing: the halves' gradients then meet in in_proj's own layout, not copied twice
        x, z = (half.transpose(1, 2) for half in self.in_proj(hidden).chunk(2, dim=-1))
        with Recompute() as recompute:
            forward = self.scan(x, z, 0, recompute)
            backward = self.scan(x, z, 1, recompute)
        y = self.spatial(((forward + backward) / 2).transpose(1, 2), layout, "inner")
        return self.spatial(self.out_proj(y), layout, "output")


class VimBlock(AdaptableBlock):
    """``residual += drop_path(hidden)`` (first block: ``residual = hidden``), then
    ``hidden = mixer(norm(residual))``; the residual stream is kept in (at least) float32."""

    def __init__(self, dim: int, drop_path: float = 0.0, norm_eps: float = 1e-5, **mixer_kwargs):
        super().__init__()
        self.mixer = BiMambaMixer(dim, **mixer_kwargs)
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def width(self) -> int:
        return self.norm.weight.shape[0]

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, layout: TokenLayout | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        residual = full_precision(residual)
        normed = self.norm(residual)
        hidden = self.mixer(normed, layout)
        if self.parallel_adapter is not None:
            hidden = hidden + self.parallel_adapter(normed)
        return hidden, residual


class VisionMamba(Loadable, nn.Module):
    """Vim: patch tokens with a class token in the middle, 24 bidirectional Mamba blocks, and the
    normed class token as the pooled feature.

    timm's model contract: ``forward_features`` gives the normed token sequence (B, M + 1, C), class
    token included at index M // 2; ``forward_head`` pools it (``global_pool``: "token", the class token
    as the official model; "avg", the mean over all tokens; "", none) and applies the head.
    """

    POOLS = ("token", "avg", "")

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        stride: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        global_pool: str = "token",
    ):
        super().__init__()
        self.num_classes, self.num_features, self.embed_dim = num_classes, embed_dim, embed_dim
        self.global_pool = pool_choice(global_pool, self.POOLS, "Vim")
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)
        num_patches = self.patch_embed.grid_size[0] * self.patch_embed.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # As the official code: block i drops with the rate of block i - 1; the final add uses the full rate.
        rates = [0.0, *drop_path_rates(drop_path_rate, depth)]
        self.layers = nn.ModuleList(
            VimBlock(embed_dim, drop_path=rates[i], norm_eps=norm_eps, d_state=d_state) for i in range(depth)
        )
        self.layers[-1].mixer.takes_adaptor_s = False  # the head reads the class token, off the 2D map
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=stride, module=f"layers.{i}") for i in range(depth)]
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def get_classifier(self) -> nn.Module:
        return self.head

    def no_weight_decay(self) -> set[str]:
        """Parameters weight decay must leave alone (timm's hook): the token and position embeddings, A."""
        return {"cls_token", "pos_embed", *declared(self, "no_decay")}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for ``num_classes`` (0: none), and the pooling if ``global_pool`` is given."""
        if global_pool is not None:
            self.global_pool = pool_choice(global_pool, self.POOLS, "Vim")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def _stream(
        self, x: torch.Tensor, take: Sequence[int] = (), stop: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], TokenLayout]:
        """Images through the first ``stop`` blocks (all if None): the residual stream before ``norm_f``
        (B, M + 1, C), the stream after each block in ``take`` (without drop path), and the token layout."""
        x, grid = self.patch_embed(x)
        token = x.shape[1] // 2
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :token], cls, x[:, token:]], dim=1)
        x = self.pos_drop(x + resample_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size))
        hidden, residual, layout, taken = x, None, (grid, token), []
        for i, layer in enumerate(self.layers[:stop]):
            hidden, residual = checkpointed(layer, hidden, residual, layout, enabled=self.grad_checkpointing)
            if i in take:
                taken.append(residual + hidden)
        return residual + self.drop_path(hidden), taken, layout

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) → normed tokens (B, M + 1, C), the class token at index M // 2."""
        return self.norm_f(self._stream(x)[0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens from :meth:`forward_features` → logits, or the pooled feature with ``pre_logits``."""
        if self.global_pool == "token":
            x = x[:, (x.shape[1] - 1) // 2]
        elif self.global_pool == "avg":
            x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

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
        """timm's feature extraction: the patch tokens after the blocks in ``indices`` (the last n if an
        int, all if None), normed by ``norm_f`` with ``norm``, without the class token (as timm's ViT
        drops its prefix tokens), as (B, C, H, W) maps ("NCHW") or (B, M, C) ("NLC"); with
        ``stop_early`` no block after the last of them runs. Returns them, or ``(forward_features
        output, them)`` unless ``intermediates_only``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"Vim: output_fmt {output_fmt!r} is not supported; expected 'NCHW' or 'NLC'")
        take, last = feature_take_indices(len(self.layers), indices)
        stream, taken, ((height, width), token) = self._stream(x, take, last + 1 if stop_early else None)
        intermediates = [without_token(self.norm_f(t) if norm else t, token) for t in taken]
        if output_fmt == "NCHW":
            intermediates = [t.reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2) for t in intermediates]
        return intermediates if intermediates_only else (self.norm_f(stream), intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drops the blocks after the last of ``indices`` (and ``norm_f``, the head, if asked); returns
        the indices, counted from the first block."""
        take, last = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: last + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resizes a checkpoint's position embedding to this model's patch grid."""
        pos = state_dict.get("pos_embed")
        if pos is not None and pos.shape != self.pos_embed.shape:
            side = math.isqrt(pos.shape[1] - 1)
            if side * side == pos.shape[1] - 1:
                state_dict = {
                    **state_dict,
                    "pos_embed": resample_pos_embed(pos, self.patch_embed.grid_size, (side, side)),
                }
        return state_dict


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "custom_load": True,
        "license": "apache-2.0",
        **kwargs,
    }


_HUB = "https://huggingface.co/hustvl/{}/resolve/main/{}"
EMBEDDED_WEIGHTS = Path(__file__).with_name("weights")
NANO = dict(img_size=32, patch_size=4, stride=4, embed_dim=96, depth=8)
"""The architecture of the embedded 32x32 backbones."""


def build_nano(variant: str, **kwargs) -> VisionMamba:
    """An unloaded model of the embedded backbones' architecture under timm variant ``variant`` (whose
    pretrained config its registering module gives), for backbones built on it elsewhere."""
    return build(VisionMamba, variant, False, **{**NANO, **kwargs})


def embedded_cfg(name: str) -> dict:
    """The pretrained config of a backbone whose weights ship in ``weights/`` (``<name>.safetensors``, model
    card ``<name>.md``), trained on 32x32 images normalised to [-1, 1]."""
    return _cfg(
        file=str(EMBEDDED_WEIGHTS / f"{name}.safetensors"),
        input_size=(3, 32, 32),
        crop_pct=1.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


default_cfgs = generate_default_cfgs(
    {
        "vim_tiny_patch16_224": _cfg(_HUB.format("Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth")),
        "vim_small_patch16_224": _cfg(_HUB.format("Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth")),
        "vim_base_patch16_224": _cfg(_HUB.format("Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth")),
        "vim_tiny_patch16_stride8_224": _cfg(crop_pct=1.0),
        "vim_small_patch16_stride8_224": _cfg(crop_pct=1.0),
        "vim_nano_patch4_32": embedded_cfg("vim_nano_patch4_32"),
    }
)


def _create(variant: str, pretrained: bool, **kwargs) -> VisionMamba:
    return build(VisionMamba, variant, pretrained, feature_cfg=dict(out_indices=3, feature_cls="getter"), **kwargs)


@register
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    return _create("vim_tiny_patch16_224", pretrained, **{"embed_dim": 192, "depth": 24, **kwargs})


@register
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    return _create("vim_small_patch16_224", pretrained, **{"embed_dim": 384, "depth": 24, **kwargs})


@register
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    return _create("vim_base_patch16_224", pretrained, **{"embed_dim": 768, "depth": 24, **kwargs})


@register
def vim_nano_patch4_32(pretrained: bool = False, **kwargs) -> VisionMamba:
    """A 0.6 M-parameter Vim for 32x32 images, pretrained by this package on formula-driven fractal images
    (``examples/pretrain_tiny.py``; model card in ``adaptor_peft/models/weights/vim_nano_patch4_32.md``): the
    offline default that ``adaptor-peft demo`` transfers."""
    return _create("vim_nano_patch4_32", pretrained, **{**NANO, **kwargs})


@register
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    return _create("vim_tiny_patch16_stride8_224", pretrained, **{"embed_dim": 192, "depth": 24, "stride": 8, **kwargs})


@register
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    return _create(
        "vim_small_patch16_stride8_224", pretrained, **{"embed_dim": 384, "depth": 24, "stride": 8, **kwargs}
    )
