"""Matching Networks: Vinyals, Blundell, Lillicrap, Kavukcuoglu, Wierstra 2016, arXiv:1606.04080.

No inner loop: a query's label distribution is an attention-weighted sum of the support labels,
P(y = c | x) = sum_i a(x, x_i) [y_i = c], with a(x, x_i) the softmax over the support set of the cosine
similarity between the embeddings f(x) and g(x_i) (eq. 1-2; here f = g: the full-context embeddings of
sec. 2.1.2 are not built yet). The client returns the gradient of the query negative log-likelihood (the
cross-entropy of the log-probabilities, which sum to one). Like ProtoNet, evaluation is flat over
"adaptation steps".
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

EPS = 1e-8  # in the cosine's norms, and under the log of a class probability


def matching_log_probs(support_emb: Tensor, support_y: Tensor, query_emb: Tensor, ways: int) -> Tensor:
    """log P(y = c | query), shape (..., queries, ways): attention (softmax over the support set of the cosine
    similarities) summed per support label. Leading dimensions (tasks) are batch dimensions."""
    support = support_emb / support_emb.norm(dim=-1, keepdim=True).clamp_min(EPS)
    query = query_emb / query_emb.norm(dim=-1, keepdim=True).clamp_min(EPS)
    attention = torch.softmax(query @ support.transpose(-2, -1), dim=-1)  # (..., queries, support)
    one_hot = torch.nn.functional.one_hot(support_y, ways).to(attention.dtype)  # (..., support, ways)
    return (attention @ one_hot).clamp_min(EPS).log()


class MatchingNet(Algorithm):
    name = "matching"
    embedding_only = True  # the model is an embedding: no classification head

    def _log_probs(self, params: Params, task: Task) -> Tensor:
        ways = int(task.support_y.max()) + 1
        support_emb = forward(self.model, params, task.support_x)
        query_emb = forward(self.model, params, task.query_x)
        return matching_log_probs(support_emb, task.support_y, query_emb, ways)

    def task_direction(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        def query_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            log_probs = self._log_probs(p, task)
            loss = self.loss_fn(log_probs, task.query_y)  # cross-entropy of log-probabilities: their NLL
            return loss, (loss.detach(), log_probs.detach())

        meta_grad, (loss, log_probs) = grad(query_loss, has_aux=True)(params)
        return meta_grad, self._metrics(loss, log_probs, task.query_y)

    def _batch_log_probs(self, params: Params, batch: TaskBatch) -> Tensor:
        ways = int(batch.support_y.max()) + 1
        support_emb = batched.batched_forward(self.model, params, batch.support_x, shared=True)
        query_emb = batched.batched_forward(self.model, params, batch.query_x, shared=True)
        return matching_log_probs(
            batched.at_least_fp32(support_emb), batch.support_y, batched.at_least_fp32(query_emb), ways
        )

    def batch_direction(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        def query_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            log_probs = self._batch_log_probs(p, batch)
            losses = batched.task_losses(self.kind, log_probs, batch.query_y)
            return losses.sum(), (losses.detach(), log_probs.detach())

        direction, (losses, log_probs) = grad(query_loss, has_aux=True)(params)
        return direction, self._batch_metrics(losses, log_probs, batch.query_y)

    def batch_predictions(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Tensor]:
        with torch.no_grad():
            log_probs = self._batch_log_probs(params, batch)
        for _ in range(steps + 1):
            yield log_probs

    def predict_curve(self, params: Params, task: Task, steps: int) -> list[Tensor]:
        with torch.no_grad():
            log_probs = self._log_probs(params, task)
        return [log_probs] * (steps + 1)
