"""``AdaptorConfig``: which adaptors go into which blocks, and their shapes.

The Mamba-Adaptor paper's public text fixes the idea (Adaptor-T mixes hidden states from K predicted
locations in S channel groups; Adaptor-S is multi-scale depthwise convolution on the 2D map) but not
the details; every field below marked *ours* is a choice of this package, with its default stated.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

ANCHOR_MODES = ("learned", "static")
SPATIAL_POSITIONS = ("output", "inner")


@dataclass
class AdaptorConfig:
    """Configuration of :func:`adaptor_peft.inject_adaptor`; JSON round-trips with ``to_dict`` / ``from_dict``."""

    temporal: bool = True
    """Insert Adaptor-T (a memory of hidden states from learned locations, read by every position)."""
    spatial: bool = True
    """Insert Adaptor-S (multi-scale dilated convolution on the 2D patch map)."""
    blocks: list[int] | None = None
    """Indices of the blocks to adapt, counted over the backbone's mixers in order; None: all."""

    t_locations: int = 2
    """Adaptor-T: K, memory locations per sequence and channel group, read by every position with its own
    weights (ours: 2; each location snapshots its two neighbouring states for the interpolation)."""
    t_groups: int = 4
    """Adaptor-T: S, channel groups with their own locations and weights, like heads (ours: 4)."""
    t_rank: int = 4
    """Adaptor-T: rank of the low-rank predictor of locations and weights from the scan input (ours: 4)."""
    t_anchor: str = "learned"
    """Adaptor-T locations (ours): "learned" = trained anchors spread over the sequence plus offsets predicted
    from the mean scan input (so each sequence has its own), read at fractional positions by linear
    interpolation; "static" = fixed, evenly spread anchors and no offsets (the paper's static-location
    ablation)."""
    s_kernel_size: int = 3
    """Adaptor-S: depthwise kernel size (3)."""
    s_dilations: tuple[int, ...] = (1, 2, 3)
    """Adaptor-S: dilation rates of the parallel branches (1, 2, 3)."""
    s_share_kernel: bool = True
    """Adaptor-S (ours): one depthwise kernel per channel shared by all dilations, each branch with its
    own zero-initialised per-channel scale (True, a third of the parameters). False is Adaptor-S as the
    paper describes it: every dilation its own kernel, the branches summed and scaled by one zero-initialised
    per-channel scale (79.8 % against 82.5 % for this default on the offline suite's val splits, both at
    ``lr_scale`` 10)."""
    s_position: str = "output"
    """Adaptor-S placement (ours): "output" = on the mixer output (model width); "inner" = on the
    gated scan output before ``out_proj`` (inner width, about twice the parameters)."""
    dropout: float = 0.0
    """Dropout on the adaptors' added branches (0)."""
    lr_scale: float = 16.0
    """Learning rate of the adaptors' zero-initialised parameters (γ, the Adaptor-S scales, the predictor's
    output layers) as a multiple of the recipe's (ours: 16). They start every adaptor at the identity, and
    with Adam a parameter moves about one learning rate per step, so their rate sets how soon the adaptors
    act at all; LoRA+ (Hayou et al., 2024) scales LoRA's zero-initialised B the same way, and the package
    offers the same option to LoRA and the parallel adapter. The package's training loop applies it; a loop
    of your own gets it from ``adaptor_peft.param_groups(model, lr, weight_decay)``. Chosen by the equal-tuning
    study on the design tasks' val200 splits, each multiplier at its best learning rate, mean of two
    training seeds: 16 gave 82.06 % mean top-1 against 78.25 % for 1 and 79.50 % for 4
    (``benchmarks/results/adaptor_ablation.md``)."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Free-form notes carried into saved adapter files; not read by the package."""

    def __post_init__(self) -> None:
        self.s_dilations = tuple(self.s_dilations)
        if self.blocks is not None:
            self.blocks = sorted(set(int(b) for b in self.blocks))
        checks = {
            "t_locations": self.t_locations >= 1,
            "t_groups": self.t_groups >= 1,
            "t_rank": self.t_rank >= 1,
            "t_anchor": self.t_anchor in ANCHOR_MODES,
            "s_kernel_size": self.s_kernel_size >= 1 and self.s_kernel_size % 2 == 1,
            "s_dilations": len(self.s_dilations) >= 1 and all(d >= 1 for d in self.s_dilations),
            "s_position": self.s_position in SPATIAL_POSITIONS,
            "dropout": 0.0 <= self.dropout < 1.0,
            "lr_scale": self.lr_scale > 0,
            "temporal/spatial": self.temporal or self.spatial,
        }
        allowed = {
            "t_anchor": ANCHOR_MODES,
            "s_position": SPATIAL_POSITIONS,
        }
        for name, ok in checks.items():
            if not ok:
                value = getattr(self, name, None) if "/" not in name else (self.temporal, self.spatial)
                hint = f"; expected one of {allowed[name]}" if name in allowed else ""
                raise ValueError(f"AdaptorConfig.{name}: invalid value {value!r}{hint}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["s_dilations"] = list(self.s_dilations)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaptorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"AdaptorConfig: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> AdaptorConfig:
        return cls.from_dict(json.loads(text))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
