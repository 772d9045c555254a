"""Affine distortions of training images: exact on known matrices, bounded, seeded, labels untouched."""

from __future__ import annotations

import numpy as np
import torch

from fedmeta.tasks.augment import MAX_SHIFT, affine_images, distort_task, random_thetas
from fedmeta.types import Task


def _images(n: int = 6, size: int = 28) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0))


def test_identity_matrix_returns_the_images() -> None:
    x = _images()
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(len(x), 2, 3)
    torch.testing.assert_close(affine_images(x, identity), x, rtol=0, atol=1e-5)


def test_a_one_pixel_shift_moves_every_pixel_and_fills_with_no_ink() -> None:
    x = _images()
    width = x.shape[-1]
    theta = torch.tensor([[1.0, 0.0, 2.0 / width], [0.0, 1.0, 0.0]]).expand(len(x), 2, 3)  # sample one column right
    shifted = affine_images(x, theta)
    torch.testing.assert_close(shifted[..., :-1], x[..., 1:], rtol=0, atol=1e-5)
    assert shifted[..., -1].abs().max() < 1e-5


def test_random_distortions_stay_within_koch_ranges_and_vanish_at_strength_zero() -> None:
    rng = np.random.default_rng(1)
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(random_thetas(rng, 5, 0.0), identity.expand(5, 2, 3))
    thetas = random_thetas(rng, 4000, 1.0)
    det = torch.linalg.det(thetas[:, :, :2])
    # det = det(shear) x det(scale): (1 - 0.3^2 .. 1 + 0.3^2) x (0.8^2 .. 1.2^2); rotations keep it
    assert det.min() >= 0.91 * 0.64 - 1e-6 and det.max() <= 1.09 * 1.44 + 1e-6
    assert thetas[:, :, 2].abs().max() <= 2 * MAX_SHIFT + 1e-6
    assert thetas[:, :, 2].abs().max() > 1.8 * MAX_SHIFT  # the whole range is used
    half = random_thetas(np.random.default_rng(1), 4000, 0.5)
    assert half[:, :, 2].abs().max() <= MAX_SHIFT + 1e-6


def test_distort_task_is_seeded_keeps_labels_and_distorts_every_image() -> None:
    x = _images(8)
    y = torch.arange(4).repeat(2)
    task = Task(support_x=x[:4], support_y=y[:4], query_x=x[4:], query_y=y[4:])
    assert distort_task(task, np.random.default_rng(3), 0.0) is task
    a = distort_task(task, np.random.default_rng(3), 1.0)
    b = distort_task(task, np.random.default_rng(3), 1.0)
    c = distort_task(task, np.random.default_rng(4), 1.0)
    torch.testing.assert_close(a.support_x, b.support_x)
    torch.testing.assert_close(a.query_x, b.query_x)
    assert not torch.allclose(a.support_x, c.support_x)
    assert torch.equal(a.support_y, task.support_y) and torch.equal(a.query_y, task.query_y)
    assert a.support_x.shape == task.support_x.shape and a.query_x.shape == task.query_x.shape
    moved = (a.support_x - task.support_x).flatten(1).abs().amax(1)
    assert bool((moved > 1e-3).all())  # every image, support and query, got its own distortion
    assert not torch.allclose(a.support_x[0], a.query_x[0])
