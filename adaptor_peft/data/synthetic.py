"""An offline transfer suite in the VTAB-1k mould, generated on demand from fixed seeds.

Twelve tasks at the embedded backbone's resolution (32x32 RGB), in VTAB-1k's three groups, each standing
in for the VTAB-1k task named in its :class:`Task` entry. Nothing is stored or downloaded: a split is
drawn from ``(seed, split)``, so ``train800`` is the same images whatever size the other splits have, and
two calls with the same arguments give the same pixels. Splits follow the NOAH layout: ``train800``,
``val200``, ``train800val200`` (the two together, in that order) and ``test``.

Each task has a role (:func:`task_roles`): the four *design* tasks are those the adaptor's defaults were
chosen on (their val200 splits, ``benchmarks/ablation.py``); the four *reported* ones had test results in
earlier tables, but nothing was chosen on them; the *held-out* ones were fixed before any run and nothing
has been tuned on them, so they carry the suite's headline.

Every generated image is rendered at twice the size and averaged down 2x2 (anti-aliased edges), then takes
Gaussian pixel noise. Generation is fast (about half a second per 1,000 images) and kept in memory per
process, so nothing is cached on disk. Difficulty (noise, clutter, class count) was set with the calibration run in
``benchmarks/results/suite_calibration.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import numpy as np

SIZE = 32
_HI = 2 * SIZE  # rendering size before the 2x2 average
SPLITS = ("train800", "val200", "test")
"""The generated splits, in the order their seeds are numbered; ``train800val200`` joins the first two."""
_Y, _X = np.mgrid[0:_HI, 0:_HI].astype(np.float32) / _HI  # pixel centres in [0, 1)


class Task(NamedTuple):
    """A generated task: its VTAB-1k group, the VTAB-1k task it stands in for, class count and renderer
    (``render(rng, n)`` -> ``(images (n, 32, 32, 3) uint8, labels (n,))``; None for digits, which are
    scikit-learn's 8x8 grayscale images, dealt out by :func:`generate`) and role (:data:`ROLES`)."""

    group: str
    stands_in_for: str
    num_classes: int
    render: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]] | None
    role: str = "reported"


def _finish(canvas: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """(n, 64, 64, 3) floats in [0, 1] -> (n, 32, 32, 3) uint8: 2x2 average, Gaussian noise, clipped."""
    n = canvas.shape[0]
    small = canvas.reshape(n, SIZE, 2, SIZE, 2, 3).mean(axis=(2, 4))
    small = small + rng.normal(0.0, noise, size=small.shape)
    return np.rint(np.clip(small, 0, 1) * 255).astype(np.uint8)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """Paints ``colour`` (3,) over one (64, 64, 3) ``canvas`` where ``mask`` is true."""
    canvas[mask] = colour


def _disc(cx: float, cy: float, r: float) -> np.ndarray:
    return (_X - cx) ** 2 + (_Y - cy) ** 2 <= r * r


def _square(cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    u, v = _rotate(_X - cx, _Y - cy, -angle)
    return (np.abs(u) <= r) & (np.abs(v) <= r)


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * x - s * y, s * x + c * y


def _colours(rng: np.random.Generator, n: int, low: float = 0.2, high: float = 1.0) -> np.ndarray:
    return rng.uniform(low, high, size=(n, 3))


def _background(rng: np.random.Generator, n: int, clutter: float) -> np.ndarray:
    """(n, 64, 64, 3) backgrounds: a random dark colour with a smooth random gradient of amplitude ``clutter``."""
    base = _colours(rng, n, 0.0, 0.35)[:, None, None, :]
    gx, gy = rng.uniform(-clutter, clutter, size=(2, n, 1, 1, 1))
    return np.clip(base + gx * (_X[None, :, :, None] - 0.5) + gy * (_Y[None, :, :, None] - 0.5), 0, 1)


# --- natural ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.rint(digits.images * (255 / 16)).astype(np.uint8), digits.target.astype(np.int64)


def _texture_field(kind: int, rng: np.random.Generator) -> np.ndarray:
    """One (64, 64) texture in [0, 1] of class ``kind`` with a random scale, orientation and phase."""
    freq = rng.uniform(3.0, 7.0) * 2 * np.pi
    u, v = _rotate(_X - 0.5, _Y - 0.5, rng.uniform(0, np.pi))
    phase = rng.uniform(0, 2 * np.pi)
    wave = rng.uniform(0.05, 0.12)
    if kind == 0:  # striped
        return (np.sin(freq * u + phase) > 0).astype(np.float32)
    if kind == 1:  # wavy (banded)
        return (np.sin(freq * u + phase + np.sin(freq * v) * 2.0) > 0).astype(np.float32)
    if kind == 2:  # chequered
        return ((np.sin(freq * u + phase) > 0) ^ (np.sin(freq * v) > 0)).astype(np.float32)
    if kind == 3:  # dotted (regular)
        return ((np.sin(freq * u + phase) * np.sin(freq * v)) > 0.6).astype(np.float32)
    if kind == 4:  # grid
        return ((np.abs(np.sin(freq * u / 2 + phase)) < 0.3) | (np.abs(np.sin(freq * v / 2)) < 0.3)).astype(np.float32)
    if kind == 5:  # zigzagged
        return (np.sin(freq * u + phase + 3.0 * np.abs(((v * freq / np.pi) % 2) - 1)) > 0).astype(np.float32)
    if kind == 6:  # crosshatched
        d1, d2 = np.sin(freq * (u + v) + phase), np.sin(freq * (u - v))
        return ((np.abs(d1) < 0.35) | (np.abs(d2) < 0.35)).astype(np.float32)
    if kind == 7:  # spotted (random blobs)
        field = np.zeros_like(_X)
        for cx, cy, r in zip(*rng.uniform(0, 1, size=(2, 14)), rng.uniform(0.03, 0.08, size=14), strict=True):
            field = np.maximum(field, _disc(cx, cy, r).astype(np.float32))
        return field
    if kind == 8:  # marbled (smooth noise, thresholded into veins)
        coarse = rng.normal(size=(6, 6))
        field = np.kron(coarse, np.ones((11, 11)))[:_HI, :_HI]
        return (np.abs(np.sin(4 * field + freq * u * wave)) < 0.4).astype(np.float32)
    # 9: concentric (spiralled / swirly)
    r = np.hypot(_X - rng.uniform(0.2, 0.8), _Y - rng.uniform(0.2, 0.8))
    return (np.sin(freq * r + phase) > 0).astype(np.float32)


def _textures(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, size=n)
    canvas = np.empty((n, _HI, _HI, 3), dtype=np.float32)
    for i, kind in enumerate(labels):
        field = _texture_field(int(kind), rng)[..., None]
        low, high = _colours(rng, 1, 0.0, 0.4)[0], _colours(rng, 1, 0.6, 1.0)[0]
        canvas[i] = low + field * (high - low)
    return _finish(canvas, rng, 0.04), labels


def _polygon(u: np.ndarray, v: np.ndarray, r: float, sides: int) -> np.ndarray:
    """Inside a regular polygon of circumradius ``r`` centred at (0, 0) of the rotated frame (u, v)."""
    sector = np.mod(np.arctan2(v, u), 2 * np.pi / sides) - np.pi / sides
    return np.hypot(u, v) * np.cos(sector) <= r * np.cos(np.pi / sides)


def _object(kind: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """One (64, 64) silhouette mask of class ``kind`` (:data:`OBJECTS`) at (cx, cy), size ``r``, turned by ``angle``."""
    u, v = _rotate(_X - cx, _Y - cy, -angle)
    radius = np.hypot(u, v)
    if kind == 0:
        return radius <= r
    if kind in (1, 2):  # square, triangle
        return _polygon(u, v, r, 4 if kind == 1 else 3)
    if kind == 3:  # five-pointed star
        return radius <= r * (0.55 + 0.45 * np.cos(5 * np.arctan2(v, u)))
    if kind == 4:  # cross
        return ((np.abs(u) <= r) & (np.abs(v) <= r / 3)) | ((np.abs(v) <= r) & (np.abs(u) <= r / 3))
    if kind == 5:  # ring
        return (radius <= r) & (radius >= 0.6 * r)
    if kind == 6:  # crescent
        return (radius <= r) & (np.hypot(u - 0.45 * r, v) > 0.8 * r)
    if kind == 7:  # heart-like
        return _sprite_heart(u, v, r)
    if kind == 8:  # L shape
        return ((u >= -r) & (u <= -r / 3) & (np.abs(v) <= r)) | ((v >= r / 3) & (v <= r) & (np.abs(u) <= r))
    return (np.abs(u) <= r) & (np.abs(v) <= r / 4)  # 9: bar


def _sprite_heart(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """A heart-like pair of discs over a square turned 45 degrees, in the rotated frame (u, v)."""
    lobes = (np.hypot(u + 0.4 * r, v + 0.3 * r) <= 0.5 * r) | (np.hypot(u - 0.4 * r, v + 0.3 * r) <= 0.5 * r)
    p, q = _rotate(u, v - 0.15 * r, -np.pi / 4)
    return lobes | ((np.abs(p) <= 0.5 * r) & (np.abs(q) <= 0.5 * r))


OBJECTS = ("disc", "square", "triangle", "star", "cross", "ring", "crescent", "heart", "L shape", "bar")
"""The ten classes of :func:`_objects`."""


def _objects(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Caltech101-like: one object of ten silhouettes (:data:`OBJECTS`), any colour, size, place and turn, on
    a shaded background with a few small blobs as clutter."""
    labels = rng.integers(0, 10, size=n)
    canvas = _background(rng, n, 0.3)
    for i, label in enumerate(labels):
        for cx, cy in rng.uniform(0.05, 0.95, size=(int(rng.integers(1, 4)), 2)):
            _paint(canvas[i], _disc(cx, cy, rng.uniform(0.02, 0.04)), _colours(rng, 1, 0.2, 0.7)[0])
        r = rng.uniform(0.2, 0.3)
        cx, cy = rng.uniform(0.1 + r, 0.9 - r, 2)
        _paint(canvas[i], _object(int(label), cx, cy, r, rng.uniform(0, 2 * np.pi)), _colours(rng, 1, 0.45)[0])
    return _finish(canvas, rng, 0.05), labels


# --- specialized -------------------------------------------------------------------------------------------


def _cells(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """H&E-like tissue: pink stroma, many purple nuclei; label 1 when the centre 32x32 (of 64) holds
    tumour-like nuclei (larger, darker), as PatchCamelyon labels its centre region. Both classes may hold
    tumour-like decoys outside the centre, so the amount of dark tissue tells only part of the answer."""
    labels = rng.integers(0, 2, size=n)
    canvas = np.empty((n, _HI, _HI, 3), dtype=np.float32)
    for i, label in enumerate(labels):
        stroma = np.array([0.93, 0.70, 0.80]) + rng.normal(0, 0.05, 3)
        canvas[i] = stroma + 0.06 * (np.sin(_X * rng.uniform(5, 15) + _Y * rng.uniform(5, 15))[..., None])
        nuclei = rng.integers(10, 22)
        for _ in range(nuclei):
            cx, cy = rng.uniform(0, 1, 2)
            _paint(
                canvas[i], _disc(cx, cy, rng.uniform(0.02, 0.035)), np.array([0.45, 0.25, 0.6]) + rng.normal(0, 0.06, 3)
            )
        centres = [rng.uniform(0.3, 0.7, 2) for _ in range(rng.integers(2, 5) if label else 0)]
        for _ in range(rng.integers(0, 3)):  # tumour-like decoys outside the centre, in both classes
            side = rng.uniform(0.0, 0.22)
            centres.append(rng.permutation([side if rng.random() < 0.5 else 1 - side, rng.uniform(0, 1)]))
        for cx, cy in centres:
            r = rng.uniform(0.035, 0.05)
            _paint(canvas[i], _disc(cx, cy, r), np.array([0.33, 0.15, 0.45]) + rng.normal(0, 0.06, 3))
    return _finish(canvas, rng, 0.06), labels


LAND_COVER = (
    "annual crop",
    "forest",
    "herbaceous",
    "highway",
    "industrial",
    "pasture",
    "permanent crop",
    "residential",
    "river",
    "sea or lake",
)
"""EuroSAT's ten classes, in its order."""


def _landcover(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, size=n)
    canvas = np.empty((n, _HI, _HI, 3), dtype=np.float32)
    green = np.array([0.25, 0.45, 0.2])
    for i, label in enumerate(labels):
        jitter = rng.normal(0, 0.06, 3)
        blotch = np.kron(rng.normal(size=(8, 8)), np.ones((8, 8)))[..., None]
        u, v = _rotate(_X - 0.5, _Y - 0.5, rng.uniform(0, np.pi))
        freq = rng.uniform(4, 9) * 2 * np.pi
        if label == 0:  # annual crop: broad coloured strips
            strips = (np.floor(u * rng.uniform(4, 8)) % 3)[..., None]
            canvas[i] = np.array([0.55, 0.5, 0.3]) + jitter + 0.1 * strips - 0.1
        elif label == 1:  # forest: dark, blotchy green
            canvas[i] = green * 0.7 + jitter + 0.05 * blotch
        elif label == 2:  # herbaceous vegetation: light green, blotchy with brown
            canvas[i] = np.array([0.45, 0.55, 0.3]) + jitter + 0.08 * blotch
        elif label == 3:  # highway: a grey band across vegetation
            canvas[i] = green + jitter + 0.04 * blotch
            _paint(canvas[i], np.abs(u + rng.uniform(-0.2, 0.2)) < 0.04, np.array([0.6, 0.6, 0.6]) + jitter)
        elif label == 4:  # industrial: large grey and white blocks
            cells = np.kron(rng.uniform(0.4, 0.85, size=(4, 4)), np.ones((16, 16)))[..., None]
            canvas[i] = cells + jitter
        elif label == 5:  # pasture: smooth mid green
            canvas[i] = np.array([0.35, 0.55, 0.25]) + jitter + 0.02 * blotch
        elif label == 6:  # permanent crop: rows of dots
            canvas[i] = np.array([0.5, 0.45, 0.3]) + jitter
            _paint(canvas[i], (np.sin(freq * u) * np.sin(freq * v)) > 0.5, green + jitter)
        elif label == 7:  # residential: a regular grid of small roofs
            canvas[i] = np.array([0.5, 0.5, 0.45]) + jitter
            _paint(canvas[i], (np.sin(freq * u) > 0.3) & (np.sin(freq * v) > 0.3), np.array([0.7, 0.35, 0.3]) + jitter)
        elif label == 8:  # river: a winding blue band across vegetation
            canvas[i] = green + jitter + 0.04 * blotch
            bend = 0.1 * np.sin(v * rng.uniform(6, 12) + rng.uniform(0, 6))
            _paint(canvas[i], np.abs(u - bend) < rng.uniform(0.04, 0.08), np.array([0.15, 0.3, 0.55]) + jitter)
        else:  # sea or lake: blue with ripples
            canvas[i] = np.array([0.1, 0.25, 0.45]) + jitter + 0.03 * blotch
    return _finish(np.clip(canvas, 0, 1), rng, 0.05), labels


RETINA_LESIONS = ((0, 0), (1, 2), (3, 5), (6, 9), (10, 14))
"""Haemorrhages (fewest, most) per grade of :func:`_retina`; from grade 3 on, bright exudates too."""


def _retina(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Diabetic-retinopathy-like: an orange fundus with a bright optic disc and dark vessels; the grade (5)
    is how many small dark-red haemorrhages it shows (:data:`RETINA_LESIONS`), with yellow exudates from
    grade 3, as retinopathy grades count lesions."""
    labels = rng.integers(0, 5, size=n)
    canvas = np.zeros((n, _HI, _HI, 3), dtype=np.float32)
    for i, label in enumerate(labels):
        fundus = _disc(0.5, 0.5, 0.47)
        shade = 1 - 0.5 * np.hypot(_X - 0.5, _Y - 0.5)[..., None]
        canvas[i] = np.where(fundus[..., None], (np.array([0.85, 0.4, 0.15]) + rng.normal(0, 0.05, 3)) * shade, 0)
        ox, oy = rng.uniform(0.25, 0.75), rng.uniform(0.35, 0.65)
        for _ in range(4):  # vessels leaving the optic disc
            bend, turn = rng.uniform(2, 5), rng.uniform(0, 2 * np.pi)
            u, v = _rotate(_X - ox, _Y - oy, -turn)
            _paint(
                canvas[i], fundus & (u > 0) & (np.abs(v - 0.08 * np.sin(bend * u)) < 0.012), np.array([0.5, 0.1, 0.1])
            )
        _paint(canvas[i], _disc(ox, oy, 0.07), np.array([1.0, 0.9, 0.6]))
        low, high = RETINA_LESIONS[label]
        for _ in range(int(rng.integers(low, high + 1))):
            x, y = (0.5 + c for c in _rotate(rng.uniform(0, 0.4), 0.0, rng.uniform(0, 2 * np.pi)))
            _paint(canvas[i], _disc(x, y, rng.uniform(0.015, 0.03)), np.array([0.35, 0.02, 0.05]))
        for _ in range(int(rng.integers(1, 5)) if label >= 3 else 0):
            x, y = (0.5 + c for c in _rotate(rng.uniform(0, 0.4), 0.0, rng.uniform(0, 2 * np.pi)))
            _paint(canvas[i], _disc(x, y, rng.uniform(0.012, 0.022)), np.array([0.95, 0.9, 0.35]))
    return _finish(np.clip(canvas, 0, 1), rng, 0.04), labels


# --- structured -------------------------------------------------------------------------------------------


def _scatter(rng: np.random.Generator, count: int, radius: float, gap: float = 0.0) -> list[tuple[float, float]]:
    """``count`` centres in the frame at least ``2 * radius + gap`` apart (best effort after 200 draws)."""
    centres: list[tuple[float, float]] = []
    for _ in range(200 * count):
        if len(centres) == count:
            break
        x, y = rng.uniform(radius, 1 - radius, 2)
        if all((x - a) ** 2 + (y - b) ** 2 >= (2 * radius + gap) ** 2 for a, b in centres):
            centres.append((x, y))
    return centres


def _count(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """CLEVR-count-like: 1 to 6 objects (discs and squares, random colours and sizes) on a shaded floor."""
    labels = rng.integers(0, 6, size=n)
    canvas = _background(rng, n, 0.2)
    for i, label in enumerate(labels):
        for cx, cy in _scatter(rng, int(label) + 1, 0.09, 0.02):
            r = rng.uniform(0.06, 0.09)
            shape = _disc(cx, cy, r) if rng.random() < 0.5 else _square(cx, cy, r * 0.85, rng.uniform(0, np.pi))
            _paint(canvas[i], shape, _colours(rng, 1, 0.35)[0])
    return _finish(canvas, rng, 0.06), labels


def _distance(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """CLEVR-dist-like: objects on a floor seen in perspective (lower and larger is nearer); the label is
    the depth bin (6) of the nearest object."""
    labels = rng.integers(0, 6, size=n)
    canvas = _background(rng, n, 0.2)
    for i, label in enumerate(labels):
        horizon = rng.uniform(0.2, 0.3)
        canvas[i][horizon > _Y] *= 0.5
        nearest = (label + rng.uniform(0.1, 0.9)) / 6  # 0: nearest bin
        depths = [nearest, *rng.uniform(nearest + 0.05, 1.05, size=rng.integers(0, 3))]
        for depth in sorted(depths, reverse=True):  # far ones first, near ones drawn over them
            scale = 1.0 / (1.0 + 3.0 * depth)
            cy = horizon + (1 - horizon) * scale * 0.95
            r = 0.13 * scale
            cx = rng.uniform(0.15, 0.85)
            shape = _disc(cx, cy - r, r) if rng.random() < 0.5 else _square(cx, cy - r, r * 0.85, 0.0)
            _paint(canvas[i], shape, _colours(rng, 1, 0.35)[0])
    return _finish(canvas, rng, 0.05), labels


def _sprite(rng: np.random.Generator, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """One dSprites-like shape (square, ellipse or heart-like pair of discs over a square) at (cx, cy)."""
    kind = rng.integers(0, 3)
    if kind == 0:
        return _square(cx, cy, r * 0.8, angle)
    if kind == 1:
        u, v = _rotate(_X - cx, _Y - cy, -angle)
        return (u / r) ** 2 + (v / (0.55 * r)) ** 2 <= 1
    return (
        _disc(cx - 0.4 * r, cy - 0.3 * r, 0.5 * r)
        | _disc(cx + 0.4 * r, cy - 0.3 * r, 0.5 * r)
        | _square(cx, cy + 0.15 * r, 0.5 * r, np.pi / 4)
    )


def _position(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """dSprites-loc-like: one sprite on a plain background, with a smaller distractor of another colour;
    the label is the sprite's x position in 8 bins."""
    labels = rng.integers(0, 8, size=n)
    canvas = _background(rng, n, 0.3)
    for i, label in enumerate(labels):
        r = rng.uniform(0.07, 0.11)
        cx = r + (label + rng.uniform(0.1, 0.9)) / 8 * (1 - 2 * r)
        colour = np.array([1.0, 1.0, 1.0]) * rng.uniform(0.75, 1.0)
        _paint(canvas[i], _disc(*rng.uniform(0.05, 0.95, 2), 0.025), _colours(rng, 1, 0.2, 0.6)[0])
        _paint(canvas[i], _sprite(rng, cx, rng.uniform(r, 1 - r), r, rng.uniform(0, 2 * np.pi)), colour)
    return _finish(canvas, rng, 0.06), labels


def _orientation(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """dSprites-orientation / smallNORB-azimuth-like: an arrow anywhere in the frame; the label is its
    heading in 8 bins of 45 degrees."""
    labels = rng.integers(0, 8, size=n)
    canvas = _background(rng, n, 0.3)
    for i, label in enumerate(labels):
        angle = (label + rng.uniform(0.1, 0.9)) / 8 * 2 * np.pi
        length = rng.uniform(0.18, 0.28)
        cx, cy = rng.uniform(0.3, 0.7, 2)
        u, v = _rotate(_X - cx, _Y - cy, -angle)
        shaft = (u >= -length) & (u <= 0.2 * length) & (np.abs(v) <= 0.09 * length / 0.23)
        head = (u >= 0.2 * length) & (u <= length) & (np.abs(v) <= (length - u) * 0.7)
        _paint(canvas[i], shaft | head, _colours(rng, 1, 0.45)[0])
    return _finish(canvas, rng, 0.06), labels


def _elevation(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """smallNORB-elevation-like: a can (cylinder) seen from an elevation of 5 to 80 degrees; its top shows as
    an ellipse whose height is the sine of the elevation, its side as a band the cosine tall. The label is
    the elevation in 6 bins."""
    labels = rng.integers(0, 6, size=n)
    canvas = _background(rng, n, 0.3)
    for i, label in enumerate(labels):
        elevation = np.radians(5 + (label + rng.uniform(0.1, 0.9)) / 6 * 75)
        r, height = rng.uniform(0.14, 0.22), rng.uniform(0.25, 0.4)
        cx, top = rng.uniform(0.1 + r, 0.9 - r), rng.uniform(0.2, 0.35)
        squash, tall = r * np.sin(elevation), height * np.cos(elevation)
        colour = _colours(rng, 1, 0.35, 0.8)[0]
        ellipse = ((_X - cx) / r) ** 2 + ((_Y - top - tall) / max(squash, 1e-3)) ** 2 <= 1
        side = (np.abs(_X - cx) <= r) & (top <= _Y) & (top + tall >= _Y)
        _paint(canvas[i], side | ellipse, colour * 0.6)  # side and bottom rim in shade
        _paint(
            canvas[i], ((_X - cx) / r) ** 2 + ((_Y - top) / max(squash, 1e-3)) ** 2 <= 1, np.minimum(colour + 0.2, 1)
        )
    return _finish(canvas, rng, 0.05), labels


def _vehicles(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """KITTI-distance-like: 1 to 3 cars on a road seen in perspective (lower and larger is nearer); the label
    is the depth bin (4) of the nearest car."""
    labels = rng.integers(0, 4, size=n)
    canvas = np.empty((n, _HI, _HI, 3), dtype=np.float32)
    for i, label in enumerate(labels):
        horizon = rng.uniform(0.3, 0.4)
        canvas[i] = np.where((horizon > _Y)[..., None], np.array([0.5, 0.7, 0.9]), np.array([0.3, 0.5, 0.25]))
        canvas[i] += rng.normal(0, 0.05, 3)
        spread = (_Y - horizon) / (1 - horizon)
        _paint(canvas[i], (horizon <= _Y) & (np.abs(_X - 0.5) <= 0.05 + 0.5 * spread), np.array([0.4, 0.4, 0.42]))
        nearest = (label + rng.uniform(0.1, 0.9)) / 4
        for depth in sorted([nearest, *rng.uniform(nearest + 0.05, 1.05, size=rng.integers(0, 3))], reverse=True):
            scale = 1.0 / (1.0 + 4.0 * depth)
            bottom = horizon + (1 - horizon) * scale
            width, tall = 0.4 * scale, 0.22 * scale
            cx = 0.5 + rng.uniform(-0.35, 0.35) * scale
            body = (np.abs(_X - cx) <= width / 2) & (bottom >= _Y) & (bottom - tall <= _Y)
            _paint(canvas[i], body, _colours(rng, 1, 0.2, 0.9)[0])
            window = (np.abs(_X - cx) <= width / 3) & (bottom - tall / 2 >= _Y) & (bottom - tall * 0.9 <= _Y)
            _paint(canvas[i], window, np.array([0.1, 0.1, 0.15]))
    return _finish(np.clip(canvas, 0, 1), rng, 0.05), labels


TASKS: dict[str, Task] = {
    "digits": Task("natural", "svhn (digit recognition)", 10, None, "design"),  # scikit-learn's digits
    "textures": Task("natural", "dtd (Describable Textures)", 10, _textures),
    "objects": Task("natural", "caltech101 (object silhouettes)", 10, _objects, "held-out"),
    "cells": Task("specialized", "patch_camelyon (tumour tissue in the centre)", 2, _cells),
    "landcover": Task("specialized", "eurosat (land cover from above)", 10, _landcover, "design"),
    "retina": Task("specialized", "diabetic_retinopathy (grade by lesion count)", 5, _retina, "held-out"),
    "count": Task("structured", "clevr_count (how many objects)", 6, _count, "design"),
    "distance": Task("structured", "clevr_dist (depth of the nearest object)", 6, _distance, "design"),
    "position": Task("structured", "dsprites_loc (x position, 8 bins)", 8, _position),
    "orientation": Task("structured", "dsprites_ori / smallnorb_azi (heading, 8 bins)", 8, _orientation),
    "elevation": Task("structured", "smallnorb_ele (elevation, 6 bins)", 6, _elevation, "held-out"),
    "vehicles": Task("structured", "kitti (depth of the nearest car, 4 bins)", 4, _vehicles, "held-out"),
}
"""The suite's tasks in table order: natural, specialized, structured."""
ROLES = ("design", "reported", "held-out")
"""Task roles (module docstring), in report order; the last is the headline."""
_STREAMS = (
    "digits",
    "textures",
    "cells",
    "landcover",
    "count",
    "distance",
    "position",
    "orientation",
    "objects",
    "retina",
    "elevation",
    "vehicles",
)
"""Each task's random stream number: its index here, fixed (the first eight in their first order), so a new
task in :data:`TASKS` changes no other task's images."""


def task_roles() -> dict[str, tuple[str, ...]]:
    """Task names by role (:data:`ROLES`), in table order."""
    return {role: tuple(name for name, task in TASKS.items() if task.role == role) for role in ROLES}


def suite_groups() -> dict[str, tuple[str, ...]]:
    """Task names by VTAB-1k group, in table order."""
    groups: dict[str, tuple[str, ...]] = {}
    for name, task in TASKS.items():
        groups[task.group] = (*groups.get(task.group, ()), name)
    return groups


@lru_cache(maxsize=64)
def generate(task: str, split: str, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``size`` images of ``task`` for ``split`` (one of :data:`SPLITS`) as ``(pixels, labels)``, drawn
    from ``(seed, task, split)`` (a smaller ``size`` gives a prefix of the same draw only for ``digits``).

    ``digits`` deals scikit-learn's 1,797 images out once, by a permutation from ``seed``: the first 800 to
    ``train800``, the next 200 to ``val200``, the other 797 to ``test`` (below VTAB-1k's 1,000: there are no
    more), and refuses a size beyond a split's share."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; tasks: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"synthetic split {split!r} is not one of {list(SPLITS)}")
    if task == "digits":
        pixels, labels = _digits()
        order = np.random.default_rng(seed).permutation(len(labels))
        start, share = {"train800": (0, 800), "val200": (800, 200), "test": (1000, len(labels) - 1000)}[split]
        if size > share:
            raise ValueError(f"digits split {split!r} has {share} images, not {size}")
        chosen = order[start : start + size]
        return pixels[chosen], labels[chosen]
    rng = np.random.default_rng((seed, _STREAMS.index(task), SPLITS.index(split)))
    images, labels = TASKS[task].render(rng, size)
    return images, labels.astype(np.int64)
