"""The few value types that cross every boundary: parameters, tasks and client updates."""

from __future__ import annotations

from dataclasses import dataclass, field

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
