"""Prototypical Networks: Snell, Swersky, Zemel 2017, arXiv:1703.05175.

No inner loop: a class prototype is the mean embedding of its support examples, and a query's logits are
minus its squared Euclidean distances to the prototypes. The client returns the gradient of the query
cross-entropy. "Adaptation steps" do not exist, so the evaluation curve is flat over steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.func import grad

from fedmeta import batched
from fedmeta.algorithms.base import Algorithm
from fedmeta.batched import TaskBatch
from fedmeta.functional import forward
from fedmeta.types import Params, Task


def prototype_logits(support_emb: Tensor, support_y: Tensor, query_emb: Tensor, ways: int) -> Tensor:
    """Logits (..., queries, ways) = -||query - prototype_c||^2, prototypes = per-class mean support embedding.

    Any leading dimensions (tasks) are batch dimensions: support_emb (..., support, features).
    """
    one_hot = torch.nn.functional.one_hot(support_y, ways).to(support_emb.dtype)  # (..., support, ways)
    prototypes = (one_hot.transpose(-2, -1) @ support_emb) / one_hot.sum(-2).unsqueeze(-1)  # (..., ways, features)
    return -torch.cdist(query_emb, prototypes).pow(2)


class ProtoNet(Algorithm):
    name = "protonet"
    embedding_only = True  # the model is an embedding: no classification head

    def _logits(self, params: Params, task: Task) -> Tensor:
        ways = int(task.support_y.max()) + 1
        support_emb = forward(self.model, params, task.support_x)
        query_emb = forward(self.model, params, task.query_x)
        return prototype_logits(support_emb, task.support_y, query_emb, ways)

    def task_direction(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        def query_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            logits = self._logits(p, task)
            loss = self.loss_fn(logits, task.query_y)
            return loss, (loss.detach(), logits.detach())

        meta_grad, (loss, logits) = grad(query_loss, has_aux=True)(params)
        return meta_grad, self._metrics(loss, logits, task.query_y)

    def _batch_logits(self, params: Params, batch: TaskBatch) -> Tensor:
        # The same network for every task (no inner loop): shared weights, one convolution over all tasks.
        ways = int(batch.support_y.max()) + 1
        support_emb = batched.batched_forward(self.model, params, batch.support_x, shared=True)
        query_emb = batched.batched_forward(self.model, params, batch.query_x, shared=True)
        return prototype_logits(
            batched.at_least_fp32(support_emb), batch.support_y, batched.at_least_fp32(query_emb), ways
        )

    def batch_direction(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        def query_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            logits = self._batch_logits(p, batch)
            losses = batched.task_losses(self.kind, logits, batch.query_y)
            return losses.sum(), (losses.detach(), logits.detach())

        direction, (losses, logits) = grad(query_loss, has_aux=True)(params)
        return direction, self._batch_metrics(losses, logits, batch.query_y)

    def batch_predictions(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Tensor]:
        with torch.no_grad():
            logits = self._batch_logits(params, batch)
        for _ in range(steps + 1):
            yield logits

    def predict_curve(self, params: Params, task: Task, steps: int) -> list[Tensor]:
        with torch.no_grad():
            logits = self._logits(params, task)
        return [logits] * (steps + 1)
