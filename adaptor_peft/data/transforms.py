"""Image transforms of the two transfer protocols, and the backbone's own input statistics.

``build_transform`` knows the presets the benchmarks use (docs/method.md#transfer-protocols); ``data_config`` reads the
size, mean, std and interpolation from the backbone's timm ``pretrained_cfg`` so that a recipe never
repeats numbers the checkpoint already fixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torchvision import transforms as T

PRESETS = ("vtab", "fgvc")
FGVC_CROP_PCT = 0.875  # eval: resize the short side to img_size / 0.875, then centre-crop img_size (VPT)


def build_transform(
    preset: str,
    train: bool,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> T.Compose:
    """PIL image -> normalised tensor for ``preset``.

    ``"vtab"``: resize to ``img_size`` x ``img_size``, no augmentation, in training as in evaluation (the
    VTAB-1k protocol). ``"fgvc"``: training takes a RandomResizedCrop and a horizontal flip; evaluation
    resizes to ``int(img_size / 0.875)`` and centre-crops ``img_size``.
    """
    modes = [mode.value for mode in T.InterpolationMode]
    if interpolation not in modes:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from {modes}")
    mode = T.InterpolationMode(interpolation)
    if preset == "vtab":
        steps = [T.Resize((img_size, img_size), interpolation=mode)]
    elif preset == "fgvc" and train:
        steps = [T.RandomResizedCrop(img_size, interpolation=mode), T.RandomHorizontalFlip()]
    elif preset == "fgvc":
        steps = [T.Resize(int(img_size / FGVC_CROP_PCT), interpolation=mode), T.CenterCrop(img_size)]
    else:
        raise ValueError(f"unknown transform preset {preset!r}; presets: {', '.join(PRESETS)}")
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def data_config(model: nn.Module) -> dict[str, Any]:
    """``img_size``, ``mean``, ``std`` and ``interpolation`` from the model's timm ``pretrained_cfg``."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg:
        raise ValueError(f"{type(model).__name__} has no timm pretrained_cfg to read input size, mean and std from")
    return {
        "img_size": int(cfg["input_size"][-1]),
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
        "interpolation": cfg.get("interpolation", "bicubic"),
    }
