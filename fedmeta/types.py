"""The few value types that cross every boundary: parameters, tasks and client updates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

# Parameters travel as name -> tensor, never by position.
Params = dict[str, Tensor]


@dataclass(frozen=True)
class Task:
    """One episode: a support set to adapt on and a query set to score the adapted model.

    Classification: x is (n, 1, 28, 28) float, y is (n,) int64 with episode-local labels 0..ways-1.
    Regression: x is (n, 1) float, y is (n, 1) float.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back after one round.

    `direction` is a descent direction for the server's outer optimizer, averaged over the client's tasks:
    the meta-gradient for MAML-type algorithms and ProtoNet, the pseudo-gradient `params - adapted` for
    Reptile and FedAvg. The server weights clients by `num_tasks`.
    """

    direction: Params
    num_tasks: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientRows:
    """Many clients' updates stacked: row i of every direction entry, of `num_tasks` and of every metric is
    client `client_ids[i]`'s. What a cohort of clients computed in one call returns, and the form in which the
    server aggregates a round (one row per client, whichever transport and grouping brought it)."""

    client_ids: tuple[str, ...]
    directions: Params  # name -> (clients, ...)
    num_tasks: tuple[int, ...]
    metrics: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        count = len(self.client_ids)
        if len(self.num_tasks) != count or any(len(m) != count for m in self.metrics.values()):
            raise ValueError("every field of ClientRows needs one entry per client")
        if any(v.shape[0] != count for v in self.directions.values()):
            raise ValueError(f"directions must have {count} rows")

    def __len__(self) -> int:
        return len(self.client_ids)

    def update(self, i: int) -> ClientUpdate:
        """Client i's update (views of the rows)."""
        return ClientUpdate(
            {k: v[i] for k, v in self.directions.items()},
            self.num_tasks[i],
            {name: values[i] for name, values in self.metrics.items()},
        )

    def take(self, indices: list[int]) -> ClientRows:
        """The rows `indices`, in that order."""
        index = torch.tensor(indices, dtype=torch.long)
        return ClientRows(
            tuple(self.client_ids[i] for i in indices),
            {k: v.index_select(0, index) for k, v in self.directions.items()},
            tuple(self.num_tasks[i] for i in indices),
            {name: tuple(values[i] for i in indices) for name, values in self.metrics.items()},
        )

    @classmethod
    def of(cls, updates: Sequence[tuple[str, ClientUpdate]]) -> ClientRows:
        """Individual updates (identical keys, shapes and metric names) stacked into rows."""
        if not updates:
            raise ValueError("no updates to stack")
        first = updates[0][1]
        return cls(
            tuple(client_id for client_id, _ in updates),
            {k: torch.stack([u.direction[k] for _, u in updates]) for k in first.direction},
            tuple(u.num_tasks for _, u in updates),
            {name: tuple(float(u.metrics[name]) for _, u in updates) for name in first.metrics},
        )

    @classmethod
    def concat(cls, parts: Sequence[ClientRows]) -> ClientRows:
        """Several cohorts' rows as one (keys and metric names must agree)."""
        if not parts:
            raise ValueError("no rows to concatenate")
        if len(parts) == 1:
            return parts[0]
        keys, names = list(parts[0].directions), list(parts[0].metrics)
        for part in parts[1:]:
            if list(part.directions) != keys or list(part.metrics) != names:
                raise ValueError("rows to concatenate differ in their keys or metric names")
        return cls(
            tuple(c for part in parts for c in part.client_ids),
            {k: torch.cat([part.directions[k] for part in parts]) for k in keys},
            tuple(n for part in parts for n in part.num_tasks),
            {name: tuple(m for part in parts for m in part.metrics[name]) for name in names},
        )


@dataclass(frozen=True)
class CohortSum:
    """A cohort's updates reduced to what a mean-aggregating server needs: their weighted sum and its weight.

    What a cohort worker returns instead of its rows when the server only averages (`compute.reply = "sum"`):
    one model-sized message whatever the cohort's size. `total` is the float64 sum of weight x direction over the
    accepted clients (under DP every client weighs 1 and its direction is clipped first); `metrics` are the
    per-client metrics summed weighted by task count (`tasks` is that count's sum); `clipped` counts the
    directions the clip shortened; `rejected` names each refused client with the reason. Parts from several
    workers add up (`combine`).
    """

    total: Params  # name -> float64 tensor shaped like the parameter
    weight: float
    count: int
    tasks: int
    metrics: dict[str, float] = field(default_factory=dict)
    clipped: int = 0
    rejected: tuple[tuple[str, str], ...] = ()
    first_id: str = ""  # the smallest client id in the cohort: orders parts, so sums do not depend on arrival

    @classmethod
    def combine(cls, parts: Sequence[CohortSum]) -> CohortSum:
        """Several workers' sums as one, added in the order of their first client id."""
        if not parts:
            raise ValueError("no sums to combine")
        ordered = sorted(parts, key=lambda part: part.first_id)
        if len(ordered) == 1:
            return ordered[0]
        names = set(ordered[0].metrics)
        for part in ordered[1:]:
            if set(part.total) != set(ordered[0].total) or set(part.metrics) != names:
                raise ValueError("sums to combine differ in their keys or metric names")
        return cls(
            {k: sum((part.total[k] for part in ordered[1:]), ordered[0].total[k]) for k in ordered[0].total},
            sum(part.weight for part in ordered),
            sum(part.count for part in ordered),
            sum(part.tasks for part in ordered),
            {name: sum(part.metrics[name] for part in ordered) for name in ordered[0].metrics},
            sum(part.clipped for part in ordered),
            tuple(r for part in ordered for r in part.rejected),
            ordered[0].first_id,
        )
