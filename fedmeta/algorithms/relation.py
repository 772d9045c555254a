"""Relation Network: Sung, Yang, Zhang, Xiang, Torr, Hospedales 2018, arXiv:1711.06025.

An embedding f and a learned relation module g: the relation score of a query x and class c is
r = g([f(x), e_c]) in (0, 1), with e_c the sum of the class's support embeddings (sec. 3.2, K-shot), and the
network is trained with the mean squared error of r against the one-hot match (eq. 3). The paper's relation
module is two conv blocks and two fully connected layers (8 hidden units) on 64x5x5 feature maps; fedmeta's
Omniglot embedding is a flattened vector (Conv4), so the relation module here is its fully connected part:
Linear(2F, 8) -> ReLU -> Linear(8, 1) -> sigmoid. No inner loop; evaluation is flat over steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.func import grad

from fedmeta import batched
from fedmeta.algorithms.base import Algorithm
from fedmeta.batched import TaskBatch
from fedmeta.functional import forward
from fedmeta.models import init_params
from fedmeta.types import Params, Task

PREFIX = "relation."
HIDDEN = 8  # the paper's relation module: 8 hidden units


def relation_scores(query_emb: Tensor, support_emb: Tensor, support_y: Tensor, ways: int, module: Params) -> Tensor:
    """Relation scores (..., queries, ways) in (0, 1): g([f(query), sum of class c's support embeddings])."""
    one_hot = torch.nn.functional.one_hot(support_y, ways).to(support_emb.dtype)  # (..., support, ways)
    classes = one_hot.transpose(-2, -1) @ support_emb  # (..., ways, features)
    queries, features = query_emb.shape[-2], query_emb.shape[-1]
    pairs = torch.cat(
        [
            query_emb.unsqueeze(-2).expand(*query_emb.shape[:-1], ways, features),
            classes.unsqueeze(-3).expand(*classes.shape[:-2], queries, ways, features),
        ],
        dim=-1,
    )  # (..., queries, ways, 2F)
    hidden = torch.relu(pairs @ module[PREFIX + "0.weight"].T + module[PREFIX + "0.bias"])
    return torch.sigmoid(hidden @ module[PREFIX + "1.weight"].T + module[PREFIX + "1.bias"]).squeeze(-1)


def relation_loss(scores: Tensor, query_y: Tensor) -> Tensor:
    """Mean squared error against the one-hot match (eq. 3), per task (...,)."""
    target = torch.nn.functional.one_hot(query_y, scores.shape[-1]).to(scores.dtype)
    return (scores - target).pow(2).mean((-2, -1))


class RelationNet(Algorithm):
    name = "relation"
    embedding_only = True  # the embedding has no head; the relation module scores pairs

    def init_params(self, generator: torch.Generator) -> Params:
        weights = init_params(self.model, generator)
        features = getattr(self.model, "num_features", None) or getattr(self.model, "out_features", None)
        if features is None:
            raise ValueError("the relation module needs the embedding size (model.num_features)")
        dtype = next(iter(weights.values())).dtype

        def uniform(fan_in: int, *shape: int) -> Tensor:  # PyTorch's default Linear init, from `generator`
            bound = 1 / math.sqrt(fan_in)
            return (torch.rand(*shape, generator=generator, dtype=dtype) * 2 - 1) * bound

        module = {
            PREFIX + "0.weight": uniform(2 * features, HIDDEN, 2 * features),
            PREFIX + "0.bias": uniform(2 * features, HIDDEN),
            PREFIX + "1.weight": uniform(HIDDEN, 1, HIDDEN),
            PREFIX + "1.bias": uniform(HIDDEN, 1),
        }
        return {**weights, **module}

    def model_params(self, params: Params) -> Params:
        return {k: v for k, v in params.items() if not k.startswith(PREFIX)}

    def _scores(self, params: Params, task: Task) -> Tensor:
        ways = int(task.support_y.max()) + 1
        weights = self.model_params(params)
        support = forward(self.model, weights, task.support_x)
        query = forward(self.model, weights, task.query_x)
        return relation_scores(query, support, task.support_y, ways, params)

    def task_direction(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        def loss_of(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            scores = self._scores(p, task)
            loss = relation_loss(scores, task.query_y)
            return loss, (loss.detach(), scores.detach())

        direction, (loss, scores) = grad(loss_of, has_aux=True)(params)
        return direction, self._metrics(loss, scores, task.query_y)

    def _batch_scores(self, params: Params, batch: TaskBatch) -> Tensor:
        ways = int(batch.support_y.max()) + 1
        weights = self.model_params(params)
        support = batched.batched_forward(self.model, weights, batch.support_x, shared=True)
        query = batched.batched_forward(self.model, weights, batch.query_x, shared=True)
        return relation_scores(
            batched.at_least_fp32(query), batched.at_least_fp32(support), batch.support_y, ways, params
        )

    def batch_direction(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        def loss_of(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            scores = self._batch_scores(p, batch)
            losses = relation_loss(scores, batch.query_y)
            return losses.sum(), (losses.detach(), scores.detach())

        direction, (losses, scores) = grad(loss_of, has_aux=True)(params)
        return direction, self._batch_metrics(losses, scores, batch.query_y)

    def batch_predictions(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Tensor]:
        with torch.no_grad():
            scores = self._batch_scores(params, batch)
        for _ in range(steps + 1):
            yield scores

    def predict_curve(self, params: Params, task: Task, steps: int) -> list[Tensor]:
        with torch.no_grad():
            scores = self._scores(params, task)
        return [scores] * (steps + 1)
