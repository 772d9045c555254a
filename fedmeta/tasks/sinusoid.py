"""Sinusoid regression, the MAML paper's toy family (Finn et al. 2017, arXiv:1703.03400, section 5.1).

A task is y = A sin(x - phase) with A in [0.1, 5], phase in [0, pi], x uniform in [-5, 5]. To make the
federation non-IID, each client owns a window of the (amplitude, phase) square and draws its tasks from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedmeta.tasks.base import Federation
from fedmeta.types import Task

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


@dataclass(frozen=True)
class SinusoidClient:
    client_id: str
    amplitude: tuple[float, float]
    phase: tuple[float, float]

    def _points(
        self, rng: np.random.Generator, n: int, amplitude: np.ndarray | float, phase: np.ndarray | float
    ) -> tuple[Tensor, Tensor]:
        x = rng.uniform(*X_RANGE, size=(n, 1))
        y = amplitude * np.sin(x - phase)
        return torch.from_numpy(x).float(), torch.from_numpy(y).float()

    def sample_task(self, rng: np.random.Generator, *, ways: int, shots: int, queries: int) -> Task:
        del ways  # regression: one "class"
        amplitude = rng.uniform(*self.amplitude)
        phase = rng.uniform(*self.phase)
        x, y = self._points(rng, shots + queries, np.float64(amplitude), np.float64(phase))
        return Task(support_x=x[:shots], support_y=y[:shots], query_x=x[shots:], query_y=y[shots:])

    def sample_batch(self, rng: np.random.Generator, size: int) -> tuple[Tensor, Tensor]:
        # Every point from its own task of this client: what a FedAvg model sees as "the client's data".
        amplitude = rng.uniform(*self.amplitude, size=(size, 1))
        phase = rng.uniform(*self.phase, size=(size, 1))
        return self._points(rng, size, amplitude, phase)

    def check_episode(self, *, ways: int, shots: int, queries: int) -> None:
        return None  # a sinusoid client can draw any number of points


def _window(rng: np.random.Generator, bounds: tuple[float, float], width: float) -> tuple[float, float]:
    lo, hi = bounds
    start = rng.uniform(0.0, 1.0 - width)
    return lo + (hi - lo) * start, lo + (hi - lo) * (start + width)


def sinusoid_federation(*, num_train_clients: int, num_unseen_clients: int, window: float, seed: int) -> Federation:
    """Clients with random windows of the task square; train and unseen clients come from separate streams."""

    def clients(prefix: str, count: int, stream: int) -> list[SinusoidClient]:
        rng = np.random.default_rng([seed, stream])
        return [
            SinusoidClient(f"{prefix}{i}", _window(rng, AMPLITUDE, window), _window(rng, PHASE, window))
            for i in range(count)
        ]

    return Federation(
        name="sinusoid",
        kind="regression",
        train_clients=clients("train-", num_train_clients, 0),
        unseen_clients=clients("unseen-", num_unseen_clients, 1),
        num_global_outputs=1,
    )
