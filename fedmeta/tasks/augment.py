"""Random affine distortions of training images (Koch, Zemel, Salakhutdinov 2015, "Siamese Neural Networks for
One-shot Image Recognition", sec. 4.4): rotation, shear, scale and shift drawn independently for every image.

Only training episodes are distorted (`episode.augment`); evaluation tasks never are. The draws come from the
client's task generator after its tasks, so a run stays a function of its seed on every transport, and with the
factor at 0 nothing is drawn at all.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedmeta.types import Task

# Koch et al.'s ranges: rotation +-10 degrees, shear +-0.3, scale 0.8-1.2, shift +-2 pixels of 105 (as a fraction
# of the side, so the same on 28x28 images).
MAX_ROTATION = math.radians(10.0)
MAX_SHEAR = 0.3
MAX_SCALE = 0.2
MAX_SHIFT = 2 / 105


def affine_images(x: Tensor, theta: Tensor) -> Tensor:
    """Images (n, C, H, W) resampled through `F.affine_grid`'s matrices theta (n, 2, 3): output pixel at normalised
    position p takes the input at theta @ [p, 1] (bilinear, zero outside: no ink)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_thetas(rng: np.random.Generator, count: int, strength: float) -> Tensor:
    """`count` random distortions (count, 2, 3): rotation x shear x scale, then a shift, each range x strength."""
    u = rng.uniform(-1.0, 1.0, size=(count, 7)) * strength
    angle, shear_x, shear_y = u[:, 0] * MAX_ROTATION, u[:, 1] * MAX_SHEAR, u[:, 2] * MAX_SHEAR
    scale_x, scale_y = 1 + u[:, 3] * MAX_SCALE, 1 + u[:, 4] * MAX_SCALE
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shear = np.stack([np.stack([np.ones(count), shear_x], -1), np.stack([shear_y, np.ones(count)], -1)], -2)
    scale = np.stack([np.stack([scale_x, np.zeros(count)], -1), np.stack([np.zeros(count), scale_y], -1)], -2)
    linear = rotation @ shear @ scale
    shift = u[:, 5:7] * MAX_SHIFT * 2  # normalised coordinates span 2 across the image
    return torch.from_numpy(np.concatenate([linear, shift[:, :, None]], axis=2)).float()


def distort_task(task: Task, rng: np.random.Generator, strength: float) -> Task:
    """The task with every support and query image distorted independently (labels unchanged)."""
    if strength == 0:
        return task
    if task.support_x.dim() != 4:
        raise ValueError(
            f"augmentation distorts images (n, C, H, W), got inputs of shape {tuple(task.support_x.shape)}"
        )
    x = torch.cat([task.support_x, task.query_x])
    distorted = affine_images(x, random_thetas(rng, x.shape[0], strength))
    n = task.support_x.shape[0]
    return dataclasses.replace(task, support_x=distorted[:n], query_x=distorted[n:])
