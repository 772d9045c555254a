"""MAML, first-order MAML and ANIL as client parts.

MAML: Finn, Abbeel, Levine 2017, arXiv:1703.03400. The meta-gradient is the gradient of the query loss of
the adapted weights with respect to the *initial* weights, differentiated through every inner step
(second order). First-order MAML (same paper, section 5.2) drops the second-order terms: it is the gradient of
the query loss at the adapted weights. ANIL: Raghu et al. 2020, arXiv:1909.09157 - the inner loop adapts
only the head; the outer loop still updates everything.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn
from torch.func import grad

from fedmeta import batched
from fedmeta.algorithms.base import Algorithm
from fedmeta.batched import TaskBatch
from fedmeta.functional import adapt, forward
from fedmeta.types import Params, Task


class MAML(Algorithm):
    """Second-order MAML: `torch.func.grad` of the post-adaptation query loss through the inner loop."""

    name = "maml"
    first_order = False

    def _fast_weights(self, params: Params, task: Task) -> Params:
        """The inner loop on the support set (differentiable when called under an outer `grad`)."""
        weights = self.model_params(params)
        return adapt(
            self.model,
            self.loss_fn,
            weights,
            task.support_x,
            task.support_y,
            steps=self.inner_steps,
            inner_lr=self.adaptation_lr(params),
            adapt_keys=self.adapt_keys(weights),
            optimizer=self.inner_optimizer,
        )

    def _query_loss(self, fast: Params, task: Task) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        logits = forward(self.model, fast, task.query_x)
        loss = self.loss_fn(logits, task.query_y)
        return loss, (loss.detach(), logits.detach())

    def task_direction(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        if self.first_order:
            # By definition: adapt with no graph (plain tensors out), then differentiate at the adapted point.
            fast = self._fast_weights(params, task)
            meta_grad, (loss, logits) = grad(self._query_loss, has_aux=True)(fast, task)
        else:
            # Differentiate the query loss through every inner step: second order.
            def meta_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
                return self._query_loss(self._fast_weights(p, task), task)

            meta_grad, (loss, logits) = grad(meta_loss, has_aux=True)(params)
        return meta_grad, self._metrics(loss, logits, task.query_y)

    # -- batched ------------------------------------------------------------------------------------------
    def _batch_inner_loop(
        self, params: Params, batch: TaskBatch, steps: int
    ) -> tuple[nn.Module, Iterator[Params], Tensor]:
        """The inner loop on every task's support set: (network, per-task fast weights after 0..steps steps,
        query inputs of that network).

        When only the head adapts (ANIL) the network is the head and its inputs are the body's features,
        computed once per task instead of once per step: the body's weights do not change in the inner loop,
        so the values are those of the reference.
        """
        weights = self.model_params(params)
        keys = self.adapt_keys(weights)
        lr = self.adaptation_lr(params)
        model, x, query_x = self.model, batch.support_x, batch.query_x
        if keys is not None and _head_only(self.model, weights, keys):
            # The body is one network for all tasks: shared weights, its gradient the sum over tasks.
            body = {k.removeprefix("body."): v for k, v in weights.items() if k.startswith("body.")}
            model = self.model.head  # type: ignore[assignment]
            x = batched.batched_forward(self.model.body, body, x, shared=True)  # type: ignore[arg-type]
            query_x = batched.batched_forward(self.model.body, body, query_x, shared=True)  # type: ignore[arg-type]
            weights = {k.removeprefix("head."): v for k, v in weights.items() if k.startswith("head.")}
            if isinstance(lr, dict):
                lr = {k.removeprefix("head."): v for k, v in lr.items() if k.startswith("head.")}
            keys = None
        trajectory = batched.adapt_trajectory(
            model,
            self.kind,
            batched.per_task(weights, len(batch)),
            x,
            batch.support_y,
            steps=steps,
            inner_lr=lr,
            adapt_keys=keys,
            optimizer=self.inner_optimizer,
        )
        return model, trajectory, query_x

    def batch_predictions(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Tensor]:
        """Query predictions after 0..steps inner steps, all tasks at once."""
        model, trajectory, query_x = self._batch_inner_loop(params, batch, steps)
        for fast in trajectory:
            yield batched.batched_forward(model, fast, query_x)

    def batch_direction(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        if self.first_order:
            # Adapt with no graph (plain tensors at top level), then each task's query gradient at its own
            # adapted weights: the gradient of the summed query losses with respect to the per-task weights.
            weights = self.model_params(params)
            fast = batched.adapt(
                self.model,
                self.kind,
                batched.per_task(weights, len(batch)),
                batch.support_x,
                batch.support_y,
                steps=self.inner_steps,
                inner_lr=self.adaptation_lr(params),
                adapt_keys=self.adapt_keys(weights),
                optimizer=self.inner_optimizer,
            )
            fast = {k: v.detach() for k, v in fast.items()}

            def query_loss(f: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
                logits = batched.batched_forward(self.model, f, batch.query_x)
                losses = batched.task_losses(self.kind, logits, batch.query_y)
                return losses.sum(), (losses.detach(), logits.detach())

            per_task_grads, (losses, logits) = grad(query_loss, has_aux=True)(fast)
            direction = {k: g.sum(0) for k, g in per_task_grads.items()}
        else:
            # Second order: the summed post-adaptation query losses, differentiated through every inner step
            # back to the shared initial weights, give the sum of the tasks' meta-gradients.
            def meta_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
                model, trajectory, query_x = self._batch_inner_loop(p, batch, self.inner_steps)
                *_, fast = trajectory  # only the adapted weights' query predictions enter the loss
                logits = batched.batched_forward(model, fast, query_x)
                losses = batched.task_losses(self.kind, logits, batch.query_y)
                return losses.sum(), (losses.detach(), logits.detach())

            direction, (losses, logits) = grad(meta_loss, has_aux=True)(params)
        return direction, self._batch_metrics(losses, logits, batch.query_y)


def _head_only(model: nn.Module, weights: Params, keys: set[str]) -> bool:
    """The model is body + head, and only head parameters adapt."""
    return (
        isinstance(getattr(model, "body", None), nn.Module)
        and isinstance(getattr(model, "head", None), nn.Module)
        and all(k.startswith("head.") for k in keys)
        and all(k.startswith(("body.", "head.")) for k in weights)
    )


class FOMAML(MAML):
    """First-order MAML: the query gradient at the adapted weights, no differentiation through the loop."""

    name = "fomaml"
    first_order = True


class ANIL(MAML):
    """Almost No Inner Loop: MAML whose inner loop adapts only `head.*` (second order through the head)."""

    name = "anil"

    def adapt_keys(self, params: Params) -> set[str]:
        return {k for k in params if k.startswith("head.")}
