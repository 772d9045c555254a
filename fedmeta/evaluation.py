"""Personalised evaluation: how well does a model adapt to clients it has never seen?

For every unseen client, tasks are drawn from that client's own data (the same tasks for every model being
compared), the model adapts on each task's support set for 0..steps steps, and the query metric is recorded
after each step. Results are summarised over tasks (all tasks pooled) and over clients (one mean per client),
each as a mean with a normal-approximation 95% confidence interval (1.96 standard errors), the convention
of the few-shot literature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedmeta.algorithms.base import Algorithm
from fedmeta.tasks.base import ClientData, task_rng
from fedmeta.types import Params


def mean_ci95(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Mean and half-width of the 95% interval (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("no values to summarise")
    half = 1.96 * array.std(ddof=1) / math.sqrt(array.size) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "ci95": float(half), "n": int(array.size)}


def personalised_curves(
    algorithm: Algorithm,
    models: Mapping[str, Params],
    clients: Sequence[ClientData],
    *,
    seed: int,
    tasks_per_client: int,
    ways: int,
    shots: int,
    queries: int,
    steps: int,
    on_client: Callable[[], None] | None = None,
) -> dict[str, np.ndarray]:
    """Metric after 0..steps steps for every (client, task): {model name: array (clients, tasks, steps + 1)}."""
    curves = {name: np.zeros((len(clients), tasks_per_client, steps + 1)) for name in models}
    for c, client in enumerate(clients):
        rng = task_rng(seed, "eval", c)
        for t in range(tasks_per_client):
            task = client.sample_task(rng, ways=ways, shots=shots, queries=queries)
            for name, params in models.items():
                curves[name][c, t] = algorithm.evaluate_curve(params, task, steps)
        if on_client is not None:
            on_client()
    return curves


def summarise(curves: np.ndarray, metric: str) -> dict[str, object]:
    """Per-step mean/CI over tasks and over client means, for one model's (clients, tasks, steps+1) array."""
    per_step_tasks = [mean_ci95(curves[:, :, s].reshape(-1)) for s in range(curves.shape[2])]
    per_step_clients = [mean_ci95(curves[:, :, s].mean(axis=1)) for s in range(curves.shape[2])]
    return {
        "metric": metric,
        "steps": list(range(curves.shape[2])),
        "over_tasks": per_step_tasks,
        "over_clients": per_step_clients,
    }
