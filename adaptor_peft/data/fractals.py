"""Formula-driven pretraining images: fractal classes drawn from iterated function systems.

In the spirit of FractalDB (Kataoka et al., ACCV 2020): a class is an iterated function system (IFS),
a few random 2D affine maps; its images are renderings of the system's attractor, each with its own
random view (scale, shift, rotation, flip), colours and point count. Everything follows from a seed, so
the data set is reproducible and nothing is stored or downloaded. Systems whose attractor collapses to a
line or a dot, or fills the whole frame, are rejected by how much of the frame they cover.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

MIN_COVER, MAX_COVER = 0.08, 0.45  # fraction of a 32x32 frame an accepted class covers


def _render_points(maps: np.ndarray, weights: np.ndarray, rng: np.random.Generator, chains: int, steps: int):
    """Points of the attractor by the chaos game, run as ``chains`` parallel chains after a burn-in."""
    points = rng.uniform(-1, 1, size=(chains, 2))
    kept = []
    for step in range(steps):
        chosen = rng.choice(len(maps), size=chains, p=weights)
        linear, shift = maps[chosen, :, :2], maps[chosen, :, 2]
        points = np.einsum("cij,cj->ci", linear, points) + shift
        if step >= 8:
            kept.append(points)
    return np.concatenate(kept)


def _raster(points: np.ndarray, size: int, zoom: float = 1.0, shift: np.ndarray | None = None) -> np.ndarray:
    """A (size, size) coverage map of ``points``: fitted to the frame, then zoomed about its centre and
    shifted (in frame units)."""
    low, high = points.min(0), points.max(0)
    unit = 0.5 + ((points - low) / np.maximum(high - low, 1e-6) - 0.5) * zoom
    if shift is not None:
        unit = unit + shift
    pixels = np.rint(unit * (size - 1)).astype(int)
    inside = ((pixels >= 0) & (pixels < size)).all(axis=1)
    image = np.zeros((size, size), dtype=np.float32)
    image[pixels[inside, 1], pixels[inside, 0]] = 1.0
    return image


def sample_system(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One accepted IFS: (maps (M, 2, 3), probabilities (M,)) with 2 to 4 contractive affine maps."""
    while True:
        count = int(rng.integers(2, 5))
        maps = rng.uniform(-1, 1, size=(count, 2, 3))
        scale = np.abs(np.linalg.det(maps[:, :, :2])) + 1e-3
        if np.any(np.linalg.norm(maps[:, :, :2], ord=2, axis=(1, 2)) >= 1):  # must contract
            continue
        weights = scale / scale.sum()
        cover = _raster(_render_points(maps, weights, rng, 256, 24), size).mean()
        if MIN_COVER <= cover <= MAX_COVER:
            return maps, weights


class FractalImages(Dataset):
    """``classes`` IFS classes with ``per_class`` images each, as (3, size, size) tensors in [-1, 1].

    The classes follow from ``seed``; image ``i`` is class ``i % classes``, rendered on access from
    ``(view_seed, i)``. Two data sets with the same arguments hold the same images and take no memory; a
    different ``view_seed`` gives new images of the same classes (a held-out set).
    """

    def __init__(self, classes: int, per_class: int, seed: int = 0, size: int = 32, view_seed: int | None = None):
        rng = np.random.default_rng(seed)
        self.systems = [sample_system(rng, size) for _ in range(classes)]
        self.classes, self.per_class, self.size = classes, per_class, size
        self.view_seed = seed if view_seed is None else view_seed

    def __len__(self) -> int:
        return self.classes * self.per_class

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"FractalImages has {len(self)} images, not index {index}")
        label = index % self.classes
        rng = np.random.default_rng((self.view_seed, index))
        maps, weights = self.systems[label]
        points = _render_points(maps, weights, rng, int(rng.integers(48, 160)), 24)
        angle = rng.uniform(0, 2 * np.pi)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = points @ rotation.T
        if rng.random() < 0.5:
            points[:, 0] = -points[:, 0]
        zoom = rng.uniform(0.6, 1.0)
        shape = _raster(points, self.size, zoom, rng.uniform(-(1 - zoom) / 2, (1 - zoom) / 2, size=2))
        colour, background = rng.uniform(0.3, 1.0, size=3), rng.uniform(0.0, 0.3, size=3)
        image = shape[None] * colour[:, None, None] + (1 - shape[None]) * background[:, None, None]
        return torch.from_numpy(image.astype(np.float32) * 2 - 1), label
