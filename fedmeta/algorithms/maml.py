"""MAML, first-order MAML and ANIL as client parts.

MAML: Finn, Abbeel, Levine 2017, arXiv:1703.03400. The meta-gradient is the gradient of the query loss of
the adapted weights with respect to the *initial* weights, differentiated through every inner step
(second order). First-order MAML (same paper, section 5.2) drops the second-order terms: it is the gradient of
the query loss at the adapted weights. ANIL: Raghu et al. 2020, arXiv:1909.09157 - the inner loop adapts
only the head; the outer loop still updates everything.
"""

from __future__ import annotations

from torch import Tensor
from torch.func import grad

from fedmeta.algorithms.base import Algorithm
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


class FOMAML(MAML):
    """First-order MAML: the query gradient at the adapted weights, no differentiation through the loop."""

    name = "fomaml"
    first_order = True


class ANIL(MAML):
    """Almost No Inner Loop: MAML whose inner loop adapts only `head.*` (second order through the head)."""

    name = "anil"

    def adapt_keys(self, params: Params) -> set[str]:
        return {k for k in params if k.startswith("head.")}
