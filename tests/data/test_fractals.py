"""Formula-driven pretraining images: reproducible from a seed, distinct classes, accepted systems contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptor_peft.data.fractals import MAX_COVER, MIN_COVER, FractalImages, _raster, _render_points, sample_system


def test_same_seed_same_images_other_view_seed_new_views_of_the_same_classes():
    a, b = FractalImages(5, 4, seed=3), FractalImages(5, 4, seed=3)
    held_out = FractalImages(5, 4, seed=3, view_seed=4)
    assert len(a) == 20
    for i in (0, 7, 19):
        image, label = a[i]
        assert image.shape == (3, 32, 32) and label == i % 5 and image.min() >= -1 and image.max() <= 1
        assert torch.equal(image, b[i][0])
        assert not torch.equal(image, held_out[i][0]) and held_out[i][1] == label
    assert all(np.array_equal(m1, m2) for (m1, _), (m2, _) in zip(a.systems, held_out.systems, strict=True))
    with pytest.raises(IndexError, match="20 images"):
        a[20]


def test_accepted_systems_contract_and_cover_part_of_the_frame():
    rng = np.random.default_rng(0)
    for _ in range(5):
        maps, weights = sample_system(rng)
        assert 2 <= len(maps) <= 4 and weights.sum() == pytest.approx(1)
        assert np.all(np.linalg.norm(maps[:, :, :2], ord=2, axis=(1, 2)) < 1)
        cover = _raster(_render_points(maps, weights, rng, 256, 24), 32).mean()
        assert MIN_COVER <= cover <= MAX_COVER


def test_raster_fits_zooms_and_shifts_points():
    square = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    full = _raster(square, 5)
    assert full[0, 0] == full[4, 4] == full[0, 4] == full[4, 0] == 1 and full.sum() == 4
    half = _raster(square, 5, zoom=0.5)
    assert half[1, 1] == half[3, 3] == 1 and half.sum() == 4
    moved = _raster(square, 5, zoom=0.5, shift=np.array([0.25, 0.0]))  # right by a quarter frame
    assert moved[1, 2] == moved[3, 4] == 1 and moved.sum() == 4
