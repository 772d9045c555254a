"""The server's outer optimizer as explicit state: `init(params) -> state`, `step(...) -> (params, state)`.

The learning rate may follow a schedule over `total_steps` steps; it is a function of the step count kept in
the state, so a resumed run continues the schedule exactly.

The state is a plain dict of tensors and numbers, so it is checkpointed with the meta-parameters and
survives every round (Flower's FedMeta baseline re-created its Adam each round, losing the moments).
Adam: Kingma & Ba 2014, arXiv:1412.6980, with the bias correction of torch.optim.Adam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedmeta.types import Params

OptState = dict[str, Any]


@dataclass(frozen=True)
class OuterOptimizer:
    """SGD or Adam on the aggregated descent direction, at a constant or annealed learning rate."""

    name: str = "adam"
    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"
    final_lr: float = 0.0
    total_steps: int = 1

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adam"):
            raise ValueError(f"outer optimizer must be 'sgd' or 'adam', got {self.name!r}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule must be 'constant', 'linear' or 'cosine', got {self.schedule!r}")

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (1-based): `lr` at step 1, reaching `final_lr` after `total_steps`.

        As in Reptile's code, step i of n uses the fraction done (i - 1) / n; past `total_steps` it stays at
        `final_lr`.
        """
        if self.schedule == "constant":
            return self.lr
        done = min(1.0, max(0.0, (step - 1) / max(1, self.total_steps)))
        if self.schedule == "linear":
            return self.lr + (self.final_lr - self.lr) * done
        return self.final_lr + 0.5 * (self.lr - self.final_lr) * (1 + math.cos(math.pi * done))

    def init(self, params: Params) -> OptState:
        if self.name == "sgd":
            return {"step": 0}
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        return {"step": 0, "exp_avg": zeros, "exp_avg_sq": {k: v.clone() for k, v in zeros.items()}}

    def step(self, params: Params, direction: Params, state: OptState) -> tuple[Params, OptState]:
        """Apply one step along `-direction`; returns new params and new state (inputs are not modified)."""
        if set(direction) != set(params):
            raise ValueError(
                f"direction keys differ from parameter keys: "
                f"missing {sorted(set(params) - set(direction))}, extra {sorted(set(direction) - set(params))}"
            )
        step = state["step"] + 1
        lr = self.lr_at(step)
        if self.name == "sgd":
            return {k: params[k] - lr * direction[k] for k in params}, {"step": step}
        exp_avg = {k: self.beta1 * state["exp_avg"][k] + (1 - self.beta1) * direction[k] for k in params}
        exp_avg_sq = {k: self.beta2 * state["exp_avg_sq"][k] + (1 - self.beta2) * direction[k] ** 2 for k in params}
        bias1 = 1 - self.beta1**step
        bias2 = 1 - self.beta2**step
        new = {k: params[k] - (lr / bias1) * exp_avg[k] / ((exp_avg_sq[k] / bias2).sqrt() + self.eps) for k in params}
        return new, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
