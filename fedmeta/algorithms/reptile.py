"""Reptile: Nichol, Achiam, Schulman 2018, arXiv:1803.02999.

The client runs `inner_steps` steps of SGD on each task (support and query pooled: Reptile has no
train/test split inside a task) and returns the pseudo-gradient `params - adapted`. With an outer SGD step
of size epsilon the server moves towards the adapted weights: `params + epsilon * mean(adapted - params)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedmeta import batched
from fedmeta.algorithms.base import Algorithm, SequentialLocal
from fedmeta.batched import TaskBatch
from fedmeta.functional import adapt, forward
from fedmeta.types import Params, Task


class Reptile(Algorithm):
    name = "reptile"
    has_task_directions = True

    def task_direction(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        x = torch.cat([task.support_x, task.query_x])
        y = torch.cat([task.support_y, task.query_y])
        fast = adapt(
            self.model,
            self.loss_fn,
            params,
            x,
            y,
            steps=self.inner_steps,
            inner_lr=self.inner_lr,
            optimizer=self.inner_optimizer,
        )
        pseudo_grad = {k: params[k] - fast[k] for k in params}
        logits = forward(self.model, fast, x).detach()
        return pseudo_grad, self._metrics(self.loss_fn(logits, y), logits, y)

    def batch_direction(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        directions, metrics = self.task_directions(params, batch)
        return {k: v.sum(0) for k, v in directions.items()}, metrics

    def task_directions(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        x, y = batch.pooled()
        fast = batched.adapt(
            self.model,
            self.kind,
            batched.per_task(params, len(batch)),
            x,
            y,
            steps=self.inner_steps,
            inner_lr=self.inner_lr,
            optimizer=self.inner_optimizer,
        )
        pseudo_grads = {k: params[k].unsqueeze(0) - fast[k] for k in params}
        with torch.no_grad():
            logits = batched.batched_forward(self.model, fast, x)
        return pseudo_grads, self._batch_metrics(batched.task_losses(self.kind, logits, y), logits, y)


class FedAvg(SequentialLocal):
    """FedAvg (McMahan et al. 2017, arXiv:1602.05629) as the personalisation baseline, not a meta-learner.

    Each `Task` is one local minibatch with global labels (support only); the client takes one SGD step per
    minibatch and returns `params - local`. With outer SGD at lr 1 the server step is exactly FedAvg.
    """

    name = "fedavg"
    data_kind = "batches"
    data_stream = "fedavg-data"

    def local_step(self, local: Params, task: Task) -> tuple[Params, dict[str, float]]:
        local = adapt(self.model, self.loss_fn, local, task.support_x, task.support_y, steps=1, inner_lr=self.inner_lr)
        logits = forward(self.model, local, task.support_x).detach()
        return local, self._metrics(self.loss_fn(logits, task.support_y), logits, task.support_y)
