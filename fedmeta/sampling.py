"""Which clients take part in a round, and which local data they train on: seeded, never arrival-ordered."""

from __future__ import annotations

import numpy as np

from fedmeta.tasks.base import ClientData, task_rng
from fedmeta.types import Task


def sample_clients(*, seed: int, round_index: int, num_clients: int, count: int) -> list[int]:
    """Sorted indices of `count` distinct clients for `round_index`, a function of (seed, round) alone."""
    if not 0 < count <= num_clients:
        raise ValueError(f"cannot sample {count} of {num_clients} clients")
    rng = task_rng(seed, "clients", round_index)
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))


def local_tasks(
    client: ClientData,
    rng: np.random.Generator,
    *,
    data_kind: str,
    num_tasks: int,
    ways: int,
    shots: int,
    queries: int,
    batch_size: int,
    support: float = 0.0,
    samples: int = 0,
) -> list[Task]:
    """A client's local work for one round: few-shot episodes (or, with `support` > 0, splits of `samples` (0:
    all) of the client's own data into support and query: FedMeta's tasks), or minibatches for FedAvg.

    A minibatch travels as a `Task` whose support set is the batch and whose query set is empty.
    """
    if data_kind == "episodes" and support > 0:
        return [client.sample_split(rng, support, samples or None) for _ in range(num_tasks)]
    if data_kind == "episodes":
        return [client.sample_task(rng, ways=ways, shots=shots, queries=queries) for _ in range(num_tasks)]
    if data_kind == "batches":
        batches = [client.sample_batch(rng, batch_size) for _ in range(num_tasks)]
        return [Task(support_x=x, support_y=y, query_x=x[:0], query_y=y[:0]) for x, y in batches]
    raise ValueError(f"data_kind must be 'episodes' or 'batches', got {data_kind!r}")
