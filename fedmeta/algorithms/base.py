"""What every algorithm offers: a client part, an evaluation curve, and fresh parameters.

The server part is the same for all of them (`fedmeta.round.apply_round`): each client returns a descent
direction averaged over its tasks, the server averages directions weighted by task count and hands the mean
to its outer optimizer. Algorithms differ only in the direction they compute and in how they adapt.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from fedmeta.functional import adapt_trajectory, forward, loss_fn_for, metric_for, tree_mean
from fedmeta.models import init_params
from fedmeta.types import ClientUpdate, Params, Task


class Algorithm(ABC):
    """Base class; subclasses implement `task_direction` and may override adaptation."""

    name: ClassVar[str]
    # "episodes": the client's local data arrives as few-shot tasks; "batches": as plain minibatches (FedAvg).
    data_kind: ClassVar[str] = "episodes"

    def __init__(self, model: nn.Module, *, kind: str, inner_lr: float, inner_steps: int) -> None:
        self.model = model
        self.kind = kind
        self.loss_fn = loss_fn_for(kind)
        self.metric_name, self.metric_fn = metric_for(kind)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps

    # -- parameters -------------------------------------------------------------------------------------
    def init_params(self, generator: torch.Generator) -> Params:
        """Fresh meta-parameters (model weights, plus any learned extras such as Meta-SGD's rates)."""
        return init_params(self.model, generator)

    # -- client part ------------------------------------------------------------------------------------
    @abstractmethod
    def task_direction(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        """Descent direction for one task, and that task's metrics."""

    def client_update(self, params: Params, tasks: Sequence[Task]) -> ClientUpdate:
        """The client part: mean direction over the client's tasks, with the task count and mean metrics."""
        if not tasks:
            raise ValueError("client_update needs at least one task")
        directions, metrics = zip(*(self.task_direction(params, task) for task in tasks), strict=True)
        mean_metrics = {k: float(sum(m[k] for m in metrics) / len(metrics)) for k in metrics[0]}
        return ClientUpdate(direction=tree_mean(list(directions)), num_tasks=len(tasks), metrics=mean_metrics)

    # -- adaptation and evaluation ----------------------------------------------------------------------
    def model_params(self, params: Params) -> Params:
        """The entries of `params` that are model weights (all of them, unless the algorithm adds extras)."""
        return params

    def adaptation_lr(self, params: Params) -> float | Params:
        return self.inner_lr

    def adapt_keys(self, params: Params) -> set[str] | None:
        return None  # all parameters

    def predict_curve(self, params: Params, task: Task, steps: int) -> list[Tensor]:
        """Query predictions after 0..steps adaptation steps on the support set."""
        weights = self.model_params(params)
        trajectory = adapt_trajectory(
            self.model,
            self.loss_fn,
            weights,
            task.support_x,
            task.support_y,
            steps=steps,
            inner_lr=self.adaptation_lr(params),
            adapt_keys=self.adapt_keys(weights),
        )
        return [forward(self.model, fast, task.query_x).detach() for fast in trajectory]

    def evaluate_curve(self, params: Params, task: Task, steps: int) -> list[float]:
        """The query metric (accuracy or MSE) after 0..steps adaptation steps on the support set."""
        return [float(self.metric_fn(pred, task.query_y)) for pred in self.predict_curve(params, task, steps)]

    def transfer(self, pretrained: Params, fresh: Params) -> Params:
        """Meta-parameters made from a conventionally trained model (the FedAvg baseline).

        Every entry of `pretrained` whose name and shape match is kept; the rest comes from `fresh`. For
        classification the FedAvg head spans the global label space while episodes use `ways` local labels, so
        the head is fresh; for regression the whole model carries over.
        """
        return {k: pretrained[k] if k in pretrained and pretrained[k].shape == v.shape else v for k, v in fresh.items()}

    def _metrics(self, loss: Tensor, logits: Tensor, y: Tensor) -> dict[str, float]:
        return {"query_loss": float(loss), f"query_{self.metric_name}": float(self.metric_fn(logits.detach(), y))}
