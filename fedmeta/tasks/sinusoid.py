"""Sinusoid regression, the MAML paper's toy family (Finn et al. 2017, arXiv:1703.03400, section 5.1).

A task is y = A sin(x - phase) with A in [0.1, 5], phase in [0, pi], x uniform in [-5, 5]. To make the
federation non-IID, each client owns a window of the (amplitude, phase) square and draws its tasks from it.
Client i's window is a function of (seed, i) alone, so a population of any size is made lazily
(`fedmeta.tasks.base.Population`): a million clients cost nothing until sampled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedmeta.tasks.base import Federation, Population, counter_uniforms
from fedmeta.types import Task

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
_TRAIN = ("train-", 0)  # training clients' id prefix and window stream (cohort_episodes draws them too)


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
        # One draw for the whole task (amplitude, phase, then the inputs): a task costs a few microseconds,
        # which matters when a cohort samples ten thousand clients.
        u = rng.random(2 + shots + queries)
        amplitude = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u[0]
        phase = self.phase[0] + (self.phase[1] - self.phase[0]) * u[1]
        x = X_RANGE[0] + (X_RANGE[1] - X_RANGE[0]) * u[2:, None]
        xy = torch.from_numpy(np.concatenate([x, amplitude * np.sin(x - phase)], axis=1)).float()
        x_t, y_t = xy[:, :1], xy[:, 1:]
        return Task(support_x=x_t[:shots], support_y=y_t[:shots], query_x=x_t[shots:], query_y=y_t[shots:])

    def sample_batch(self, rng: np.random.Generator, size: int) -> tuple[Tensor, Tensor]:
        # Every point from its own task of this client: what a FedAvg model sees as "the client's data".
        amplitude = rng.uniform(*self.amplitude, size=(size, 1))
        phase = rng.uniform(*self.phase, size=(size, 1))
        return self._points(rng, size, amplitude, phase)

    def check_episode(self, *, ways: int, shots: int, queries: int) -> None:
        return None  # a sinusoid client can draw any number of points


def _windows(u: np.ndarray, bounds: tuple[float, float], width: float) -> tuple[np.ndarray, np.ndarray]:
    """The windows of `bounds` of relative `width` starting at relative positions u (0..1) of the free room."""
    lo, hi = bounds
    start = u * (1.0 - width)
    return lo + (hi - lo) * start, lo + (hi - lo) * (start + width)


def sinusoid_federation(*, num_train_clients: int, num_unseen_clients: int, window: float, seed: int) -> Federation:
    """Clients with random windows of the task square; train and unseen clients come from separate streams.

    Client i's window comes from `counter_uniforms` keyed by (seed, stream, i), so a cohort's windows are one
    array operation (`cohort_episodes`) and equal to those of the clients made one by one."""

    def windows(stream: int, indices: np.ndarray) -> tuple[np.ndarray, ...]:
        u = counter_uniforms(seed, "sinusoid-window", [stream, indices], 2)
        return (*_windows(u[:, 0], AMPLITUDE, window), *_windows(u[:, 1], PHASE, window))

    def clients(prefix: str, count: int, stream: int) -> Population:
        def make(i: int) -> SinusoidClient:
            a_lo, a_hi, p_lo, p_hi = (float(v[0]) for v in windows(stream, np.array([i])))
            return SinusoidClient(f"{prefix}{i}", (a_lo, a_hi), (p_lo, p_hi))

        return Population(count, make)

    def cohort_episodes(
        task_seed: int, data_stream: str, round_index: int, indices: Sequence[int], tasks: int, shots: int, queries: int
    ) -> tuple[list[str], list[list[Task]]]:
        """Every task of training clients `indices` in one draw: task j of client c from (task_seed, data_stream,
        round, c, j) alone, so a client's tasks are the same drawn alone or in any cohort."""
        client = np.repeat(np.asarray(indices, dtype=np.int64), tasks)
        a_lo, a_hi, p_lo, p_hi = windows(_TRAIN[1], client)
        xy = _episodes(task_seed, data_stream, round_index, client, (a_lo, a_hi), (p_lo, p_hi), tasks, shots + queries)
        flat = [
            Task(support_x=sx, support_y=sy, query_x=qx, query_y=qy)
            for sx, sy, qx, qy in zip(
                xy[:, :shots, :1].unbind(0),
                xy[:, :shots, 1:].unbind(0),
                xy[:, shots:, :1].unbind(0),
                xy[:, shots:, 1:].unbind(0),
                strict=True,
            )
        ]
        return [f"{_TRAIN[0]}{i}" for i in indices], [flat[k : k + tasks] for k in range(0, len(flat), tasks)]

    return Federation(
        name="sinusoid",
        kind="regression",
        train_clients=clients(_TRAIN[0], num_train_clients, _TRAIN[1]),
        unseen_clients=clients("unseen-", num_unseen_clients, 1),
        num_global_outputs=1,
        cohort_episodes=cohort_episodes,
    )


def _episodes(
    seed: int,
    stream: str,
    round_index: int,
    client: np.ndarray,
    amplitude: tuple[np.ndarray, np.ndarray],
    phase: tuple[np.ndarray, np.ndarray],
    tasks: int,
    points: int,
) -> Tensor:
    """(len(client), points, 2) float32 (x, y) of task j = position mod `tasks` of each listed client, drawn
    from (seed, stream, round, client, j): amplitude, phase, then the inputs, all uniform in their windows."""
    task = np.tile(np.arange(tasks), len(client) // max(tasks, 1))
    u = counter_uniforms(seed, stream, [round_index, client, task], 2 + points)
    a = amplitude[0] + (amplitude[1] - amplitude[0]) * u[:, 0]
    p = phase[0] + (phase[1] - phase[0]) * u[:, 1]
    x = X_RANGE[0] + (X_RANGE[1] - X_RANGE[0]) * u[:, 2:]
    y = a[:, None] * np.sin(x - p[:, None])
    return torch.from_numpy(np.stack([x, y], axis=2)).float()
