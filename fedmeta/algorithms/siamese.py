"""Siamese networks for one-shot learning: Koch, Zemel, Salakhutdinov 2015 (ICML Deep Learning Workshop).

Twin embeddings h(x1), h(x2) share their weights; a pair's logit of "same class" is the weighted L1 distance
sum_j alpha_j |h(x1)_j - h(x2)_j| + b (sec. 3.1, with alpha and b learned), trained with binary
cross-entropy on same/different pairs. Here the pairs come from the client's own task: every (query, support)
pair, labelled same when their classes agree. Koch et al. train on balanced pairs; a task has one positive per
N - 1 negatives, so the loss averages the positive and the negative pairs' cross-entropies separately (the
balanced objective). One-shot classification picks the class of the most similar support example (sec. 4.3):
a class's logit is the best pair logit among its support examples.
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
from fedmeta.models import init_params
from fedmeta.types import Params, Task

ALPHA, BIAS = "siamese.alpha", "siamese.bias"


def pair_logits(query_emb: Tensor, support_emb: Tensor, alpha: Tensor, bias: Tensor) -> Tensor:
    """Logit of "same class" for every (query, support) pair, shape (..., queries, support)."""
    distance = (query_emb.unsqueeze(-2) - support_emb.unsqueeze(-3)).abs()  # (..., queries, support, features)
    return distance @ alpha + bias


def verification_loss(logits: Tensor, query_y: Tensor, support_y: Tensor) -> Tensor:
    """Balanced binary cross-entropy of the pairs, per task (...,): mean over positive pairs and mean over
    negative pairs, averaged."""
    same = (query_y.unsqueeze(-1) == support_y.unsqueeze(-2)).to(logits.dtype)
    per_pair = torch.nn.functional.binary_cross_entropy_with_logits(logits, same, reduction="none")
    dims = (-2, -1)
    positive = (per_pair * same).sum(dims) / same.sum(dims).clamp_min(1)
    negative = (per_pair * (1 - same)).sum(dims) / (1 - same).sum(dims).clamp_min(1)
    return (positive + negative) / 2


def class_logits(logits: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """Per class, the best pair logit among its support examples: (..., queries, ways)."""
    one_hot = torch.nn.functional.one_hot(support_y, ways).to(torch.bool)  # (..., support, ways)
    masked = logits.unsqueeze(-1).masked_fill(~one_hot.unsqueeze(-3), float("-inf"))  # (..., q, support, ways)
    return masked.amax(-2)


class Siamese(Algorithm):
    name = "siamese"
    embedding_only = True  # the twin network is an embedding; the pair scorer is alpha and b

    def init_params(self, generator: torch.Generator) -> Params:
        weights = init_params(self.model, generator)
        features = getattr(self.model, "num_features", None) or getattr(self.model, "out_features", None)
        if features is None:
            raise ValueError("the siamese scorer needs the embedding size (model.num_features)")
        dtype = next(iter(weights.values())).dtype
        # alpha starts negative: a larger distance means "different" before any training.
        return {
            **weights,
            ALPHA: torch.full((features,), -1.0 / features, dtype=dtype),
            BIAS: torch.ones((), dtype=dtype),
        }

    def model_params(self, params: Params) -> Params:
        return {k: v for k, v in params.items() if k not in (ALPHA, BIAS)}

    def _pairs(self, params: Params, task: Task) -> Tensor:
        weights = self.model_params(params)
        support = forward(self.model, weights, task.support_x)
        query = forward(self.model, weights, task.query_x)
        return pair_logits(query, support, params[ALPHA], params[BIAS])

    def task_direction(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        ways = int(task.support_y.max()) + 1

        def loss_of(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            logits = self._pairs(p, task)
            loss = verification_loss(logits, task.query_y, task.support_y)
            return loss, (loss.detach(), class_logits(logits.detach(), task.support_y, ways))

        direction, (loss, logits) = grad(loss_of, has_aux=True)(params)
        return direction, self._metrics(loss, logits, task.query_y)

    def _batch_pairs(self, params: Params, batch: TaskBatch) -> Tensor:
        weights = self.model_params(params)
        support = batched.batched_forward(self.model, weights, batch.support_x, shared=True)
        query = batched.batched_forward(self.model, weights, batch.query_x, shared=True)
        return pair_logits(batched.at_least_fp32(query), batched.at_least_fp32(support), params[ALPHA], params[BIAS])

    def batch_direction(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        ways = int(batch.support_y.max()) + 1

        def loss_of(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            logits = self._batch_pairs(p, batch)
            losses = verification_loss(logits, batch.query_y, batch.support_y)
            return losses.sum(), (losses.detach(), class_logits(logits.detach(), batch.support_y, ways))

        direction, (losses, logits) = grad(loss_of, has_aux=True)(params)
        return direction, self._batch_metrics(losses, logits, batch.query_y)

    def batch_predictions(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Tensor]:
        ways = int(batch.support_y.max()) + 1
        with torch.no_grad():
            logits = class_logits(self._batch_pairs(params, batch), batch.support_y, ways)
        for _ in range(steps + 1):
            yield logits

    def predict_curve(self, params: Params, task: Task, steps: int) -> list[Tensor]:
        ways = int(task.support_y.max()) + 1
        with torch.no_grad():
            logits = class_logits(self._pairs(params, task), task.support_y, ways)
        return [logits] * (steps + 1)
