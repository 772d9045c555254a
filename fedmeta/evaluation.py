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
from typing import Any

import numpy as np

from fedmeta.algorithms.base import Algorithm
from fedmeta.config import RunConfig
from fedmeta.tasks.base import ClientData, task_rng
from fedmeta.types import Params


def mean_ci95(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Mean and half-width of the 95% interval (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("no values to summarise")
    with np.errstate(invalid="ignore", over="ignore"):  # a diverged adaptation's inf: shown as "not finite"
        half = 1.96 * array.std(ddof=1) / math.sqrt(array.size) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "ci95": float(half), "n": int(array.size)}


def client_curves(
    algorithm: Algorithm,
    models: Mapping[str, Params],
    client: ClientData,
    client_index: int,
    *,
    seed: int,
    tasks_per_client: int,
    ways: int,
    shots: int,
    queries: int,
    steps: int,
    support: float = 0.0,
    samples: int = 0,
) -> dict[str, np.ndarray]:
    """One unseen client's curves: {model name: array (tasks, steps + 1)}, on tasks fixed by (seed, index).

    All tasks are drawn first (the same draws for every model), then each model adapts to all of them in the
    algorithm's batched engine.
    """
    rng = task_rng(seed, "eval", client_index)
    if support > 0:  # FedMeta's tasks: random support/query splits of the client's own data
        tasks = [client.sample_split(rng, support, samples or None) for _ in range(tasks_per_client)]
    else:
        tasks = [client.sample_task(rng, ways=ways, shots=shots, queries=queries) for _ in range(tasks_per_client)]
    return {name: algorithm.evaluate_curves(params, tasks, steps) for name, params in models.items()}


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
    support: float = 0.0,
    samples: int = 0,
    on_client: Callable[[], None] | None = None,
) -> dict[str, np.ndarray]:
    """Metric after 0..steps steps for every (client, task): {model name: array (clients, tasks, steps + 1)}."""
    per_client = []
    for index, client in enumerate(clients):
        per_client.append(
            client_curves(
                algorithm,
                models,
                client,
                index,
                seed=seed,
                tasks_per_client=tasks_per_client,
                ways=ways,
                shots=shots,
                queries=queries,
                steps=steps,
                support=support,
                samples=samples,
            )
        )
        if on_client is not None:
            on_client()
    return {name: np.stack([c[name] for c in per_client]) for name in models}


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


def make_summary(
    config: RunConfig,
    results: dict[str, Any],
    *,
    rounds: int,
    meta_seconds: float | None,
    total_seconds: float,
    privacy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "privacy": privacy,
        "config": config.to_dict(),
        "rounds": rounds,
        "meta_train_seconds": meta_seconds,
        "total_seconds": total_seconds,
        "unseen_clients": results[next(iter(results))]["over_clients"][0]["n"],
        "results": results,
    }


def _number(value: float | None) -> str:
    """A float in 3 significant digits; None (JSON's infinite epsilon) as 'infinite'."""
    return "infinite" if value is None or math.isinf(value) else f"{value:.3g}"


def _cell(stat: dict[str, Any], scale: float, unit: str, digits: int) -> str:
    """'mean +- ci', or 'not finite' for a diverged model (summary.json stores non-finite values as null)."""
    mean, ci = stat["mean"], stat["ci95"]
    if mean is None or ci is None or not math.isfinite(mean) or not math.isfinite(ci):
        return "not finite"
    return f"{mean * scale:.{digits}f}{unit} +- {ci * scale:.{digits}f}"


def format_summary(summary: dict[str, Any]) -> str:
    """A small table: the query metric after 0, 1, the training number and the maximum of adaptation steps."""
    results = summary["results"]
    first = next(iter(results.values()))
    metric, last = first["metric"], first["steps"][-1]
    train_steps = summary["config"]["inner"]["inner_steps"]
    steps = sorted({0, min(1, last), min(train_steps, last), last})
    scale, unit, digits = (100.0, "%", 1) if metric == "accuracy" else (1.0, "", 3)
    lines = [
        f"Personalised {metric} on {summary['unseen_clients']} unseen clients "
        f"(mean +- 95% CI over tasks), after k adaptation steps on each task's support set:"
    ]
    lines.append(f"  {'model':<12}" + "".join(f"{'k=' + str(s):>18}" for s in steps))
    for name, res in results.items():
        cells = [res["over_tasks"][s] for s in steps]
        lines.append(f"  {name:<12}" + "".join(_cell(c, scale, unit, digits).rjust(18) for c in cells))
    if summary.get("privacy"):
        p = summary["privacy"]
        lines.append(
            f"  privacy: {p['mode']} DP, epsilon {_number(p['epsilon'])} at delta {p['delta']:.3g} after "
            f"{p['private_rounds']} rounds (noise multiplier {p['noise_multiplier']:g})"
            + (
                f"; the FedAvg baseline's run spent epsilon {_number(p['fedavg_epsilon'])}"
                if "fedavg_epsilon" in p
                else ""
            )
        )
    best = "higher" if metric == "accuracy" else "lower"
    episode = summary["config"].get("episode", {})
    global_labels = episode.get("client_tasks", False) or summary["config"]["data"]["dataset"] == "sinusoid"
    fedavg = "a FedAvg model, whole" if global_labels else "a FedAvg model with a fresh head"
    lines.append(
        f"  ({best} is better; meta = the federated meta-model, random_init = its untrained start, fedavg = {fedavg})"
    )
    return "\n".join(lines)
