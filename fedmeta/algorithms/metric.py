"""The shared shape of the metric-based methods (ProtoNet, Matching Networks, Siamese, Relation Network).

None has an inner loop: the model embeds the support and query sets, a method-specific head compares them
(`scores`), the client returns the gradient of the method's query loss, and evaluation is flat over
"adaptation steps". A subclass defines `scores`, `task_loss` and, when its scores are not already per class,
`class_scores`; extra learned parameters of its head live under `head_prefix`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from fedmeta import batched
from fedmeta.algorithms.base import Algorithm
from fedmeta.batched import TaskBatch
from fedmeta.functional import forward
from fedmeta.types import Params, Task


class MetricBased(Algorithm):
    embedding_only = True  # the model is an embedding: no classification head
    # Parameters of the comparison head (not of the embedding) start with this; None: the head has none.
    head_prefix: str | None = None
    # Convolutions on channels-last memory (`fedmeta.batched`): measured faster for these episodes, whose
    # tasks hold many images (benchmarks/RESULTS.md, "ProtoNet's client part on channels-last memory").
    channels_last: bool = True

    def __init__(self, *args: Any, joint_embedding: bool = False, **kwargs: Any) -> None:
        """`joint_embedding`: embed a task's support and query images in one forward pass, so that batch norm
        normalises both with one set of statistics (the ProtoNet reference code encodes the concatenated
        episode); otherwise each set is embedded with its own statistics."""
        super().__init__(*args, **kwargs)
        self.joint_embedding = joint_embedding

    # -- the method -----------------------------------------------------------------------------------------
    def scores(self, params: Params, query: Tensor, support: Tensor, support_y: Tensor, ways: int) -> Tensor:
        """Compare query embeddings (..., queries, F) with the support set (..., support, F)."""
        raise NotImplementedError

    def task_loss(self, scores: Tensor, query_y: Tensor, support_y: Tensor) -> Tensor:
        """Each task's query loss, shape (...,): cross-entropy of per-class logits unless overridden."""
        per_query = torch.nn.functional.cross_entropy(
            scores.reshape(-1, scores.shape[-1]), query_y.reshape(-1), reduction="none"
        )
        return per_query.view(query_y.shape).mean(-1)

    def class_scores(self, scores: Tensor, support_y: Tensor, ways: int) -> Tensor:
        """Per-class scores (..., queries, ways) whose argmax is the prediction."""
        return scores

    # -- shared machinery -----------------------------------------------------------------------------------
    def embedding_size(self) -> int:
        size = getattr(self.model, "num_features", None) or getattr(self.model, "out_features", None)
        if size is None:
            raise ValueError(f"{self.name}'s head needs the embedding size (model.num_features)")
        return int(size)

    def model_params(self, params: Params) -> Params:
        if self.head_prefix is None:
            return params
        return {k: v for k, v in params.items() if not k.startswith(self.head_prefix)}

    def _embed(self, embed: Callable[[Tensor], Tensor], support_x: Tensor, query_x: Tensor, dim: int) -> list[Tensor]:
        """Support and query embeddings (`embed` over the example axis `dim`): jointly or one set at a time."""
        if not self.joint_embedding:
            return [embed(support_x), embed(query_x)]
        return list(embed(torch.cat([support_x, query_x], dim)).split([support_x.shape[dim], query_x.shape[dim]], dim))

    def _task_scores(self, params: Params, task: Task) -> Tensor:
        weights = self.model_params(params)
        ways = int(task.support_y.max()) + 1
        support, query = self._embed(partial(forward, self.model, weights), task.support_x, task.query_x, 0)
        return self.scores(params, query, support, task.support_y, ways)

    def _batch_scores(self, params: Params, batch: TaskBatch, *, per_task: bool = False) -> Tensor:
        # The same network for every task (no inner loop): shared weights, one convolution over all tasks; or,
        # `per_task`, the model's weights with a leading task axis (T, ...) (`task_directions`).
        weights = self.model_params(params)
        ways = int(batch.support_y.max()) + 1
        embed = partial(
            batched.batched_forward, self.model, weights, shared=not per_task, channels_last=self.channels_last
        )
        support, query = self._embed(embed, batch.support_x, batch.query_x, 1)
        return self.scores(params, batched.at_least_fp32(query), batched.at_least_fp32(support), batch.support_y, ways)

    def task_direction(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        ways = int(task.support_y.max()) + 1

        def query_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            scores = self._task_scores(p, task)
            loss = self.task_loss(scores, task.query_y, task.support_y)
            return loss, (loss.detach(), self.class_scores(scores.detach(), task.support_y, ways))

        direction, (loss, logits) = grad(query_loss, has_aux=True)(params)
        return direction, self._metrics(loss, logits, task.query_y)

    def batch_direction(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        ways = int(batch.support_y.max()) + 1

        def query_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            scores = self._batch_scores(p, batch)
            losses = self.task_loss(scores, batch.query_y, batch.support_y)
            return losses.sum(), (losses.detach(), self.class_scores(scores.detach(), batch.support_y, ways))

        direction, (losses, logits) = grad(query_loss, has_aux=True)(params)
        return direction, self._batch_metrics(losses, logits, batch.query_y)

    def task_directions(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """Each task's own gradient (T, ...): the gradient of the summed query losses with respect to per-task
        copies of the weights, so that a cohort of clients is one vectorised call. Only for methods whose
        head has no parameters of its own (`has_task_directions`)."""
        if self.head_prefix is not None:
            raise NotImplementedError(f"{self.name}'s head has parameters: it has no per-task directions")
        ways = int(batch.support_y.max()) + 1

        def query_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            scores = self._batch_scores(p, batch, per_task=True)
            losses = self.task_loss(scores, batch.query_y, batch.support_y)
            return losses.sum(), (losses.detach(), self.class_scores(scores.detach(), batch.support_y, ways))

        copies = {k: v.clone() for k, v in batched.per_task(params, len(batch)).items()}
        directions, (losses, logits) = grad(query_loss, has_aux=True)(copies)
        return directions, self._batch_metrics(losses, logits, batch.query_y)

    def batch_predictions(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Tensor]:
        with torch.no_grad():
            logits = self.class_scores(
                self._batch_scores(params, batch), batch.support_y, int(batch.support_y.max()) + 1
            )
        for _ in range(steps + 1):
            yield logits

    def predict_curve(self, params: Params, task: Task, steps: int) -> list[Tensor]:
        with torch.no_grad():
            logits = self.class_scores(self._task_scores(params, task), task.support_y, int(task.support_y.max()) + 1)
        return [logits] * (steps + 1)
