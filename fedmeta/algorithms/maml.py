"""MAML (with the MAML++ options), first-order MAML and ANIL as client parts.

MAML: Finn, Abbeel, Levine 2017, arXiv:1703.03400. The meta-gradient is the gradient of the query loss of
the adapted weights with respect to the *initial* weights, differentiated through every inner step
(second order). First-order MAML (same paper, section 5.2) drops the second-order terms: it is the gradient of
the query loss at the adapted weights. ANIL: Raghu et al. 2020, arXiv:1909.09157 - the inner loop adapts
only the head; the outer loop still updates everything.

MAML++: Antoniou, Edwards, Storkey 2019, arXiv:1810.09502, section 4, as options of MAML (`MamlPlusPlus`):
the multi-step loss (MSL), per-step batch-norm weights and biases (BNWB), learned per-layer per-step inner
learning rates (LSLR) and derivative-order annealing (DA). The cosine-annealed outer learning rate (CA) is the
server's `outer.schedule = "cosine"`. Their "epochs" are rounds here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad

from fedmeta import batched
from fedmeta.algorithms.base import Algorithm
from fedmeta.batched import TaskBatch
from fedmeta.functional import InnerLR, StepOverrides, forward
from fedmeta.models import init_params
from fedmeta.types import Params, Task

LSLR_PREFIX = "lslr."  # lslr.<weight name>: (inner_steps,) learned rates of that layer, one per step
BN_PREFIX = "bn."  # bn.<batch-norm weight or bias name>: (inner_steps + 1, channels), one row per step


@dataclass(frozen=True)
class MamlPlusPlus:
    """MAML++'s options; all off (the default) is plain MAML."""

    # MSL: the meta-loss is a weighted sum of the query losses after every inner step, the weights moving
    # from uniform to the last step over `msl_anneal_rounds` rounds, then the last step's loss alone.
    multi_step_loss: bool = False
    msl_anneal_rounds: int = 0
    # LSLR: one learned inner learning rate per parameter tensor and per step.
    per_step_lr: bool = False
    # BNWB: batch-norm weights and biases per step (meta-learned, not adapted in the inner loop).
    per_step_bn: bool = False
    # DA: first-order meta-gradients for the first rounds, second order afterwards.
    first_order_rounds: int = 0

    def step_weights(self, steps: int, round_index: int) -> list[float]:
        """Weights of the query losses after steps 0..steps (MAML++'s per-step loss importance vector).

        Non-final weights start at 1/S and fall by 1/S per annealing span down to 0.03/S; the final weight
        rises correspondingly to 1 - 0.03 (S - 1)/S. After `msl_anneal_rounds` only the final loss counts.
        """
        if steps == 0:
            return [1.0]
        last_only = [0.0] * steps + [1.0]
        if not self.multi_step_loss or round_index >= self.msl_anneal_rounds:
            return last_only
        done = round_index / self.msl_anneal_rounds
        floor = 0.03 / steps
        rest = [max(1.0 / steps - done / steps, floor) for _ in range(steps - 1)]
        final = min(1.0 / steps + done * (steps - 1) / steps, 1.0 - (steps - 1) * floor)
        return [0.0, *rest, final]


def _batch_norm_names(model: nn.Module) -> list[str]:
    return [
        f"{name}.{p}"
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for p, _ in module.named_parameters(recurse=False)
    ]


class MAML(Algorithm):
    """Second-order MAML: `torch.func.grad` of the post-adaptation query loss through the inner loop."""

    name = "maml"
    first_order = False

    def __init__(self, *args: object, plus: MamlPlusPlus | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.plus = plus or MamlPlusPlus()
        self.round_index = 0
        self._bn_names = _batch_norm_names(self.model) if self.plus.per_step_bn else []

    def at_round(self, round_index: int) -> MAML:
        """This algorithm as it trains in round `round_index` (MSL weights, DA phase)."""
        if self.plus == MamlPlusPlus():
            return self
        configured = copy.copy(self)
        configured.round_index = round_index
        return configured

    # -- MAML++'s extra meta-parameters -------------------------------------------------------------------
    def init_params(self, generator: torch.Generator) -> Params:
        weights = init_params(self.model, generator)
        extra: Params = {}
        steps = max(1, self.inner_steps)
        if self.plus.per_step_lr:
            adapted = self.adapt_keys(weights)
            extra |= {
                LSLR_PREFIX + k: torch.full((steps,), self.inner_lr, dtype=v.dtype)
                for k, v in weights.items()
                if adapted is None or k in adapted
            }
        if self.plus.per_step_bn:
            extra |= {BN_PREFIX + k: weights.pop(k).expand(steps + 1, -1).clone() for k in self._bn_names}
        return weights | extra

    def model_params(self, params: Params) -> Params:
        weights = {k: v for k, v in params.items() if not k.startswith((LSLR_PREFIX, BN_PREFIX))}
        return weights | {k: params[BN_PREFIX + k][0] for k in self._bn_names}

    def adapt_keys(self, params: Params) -> set[str] | None:
        return {k for k in params if k not in self._bn_names} if self._bn_names else None

    def adaptation_lr(self, params: Params) -> InnerLR:
        if not self.plus.per_step_lr:
            return self.inner_lr
        rates = {k.removeprefix(LSLR_PREFIX): v for k, v in params.items() if k.startswith(LSLR_PREFIX)}
        # Evaluation may take more steps than training: the last learned rate continues.
        return lambda step: {k: v[min(step, v.shape[0] - 1)] for k, v in rates.items()}

    def step_overrides(self, params: Params) -> StepOverrides | None:
        """Per-step batch-norm weights: step s's forward uses row s (the last row beyond the trained steps)."""
        if not self._bn_names:
            return None
        rows = {k: params[BN_PREFIX + k] for k in self._bn_names}
        return lambda step: {k: v[min(step, v.shape[0] - 1)] for k, v in rows.items()}

    @property
    def _first_order_now(self) -> bool:
        return self.round_index < self.plus.first_order_rounds

    # -- per-task reference ---------------------------------------------------------------------------------
    def _query_loss(self, fast: Params, task: Task) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        logits = forward(self.model, fast, task.query_x)
        loss = self.loss_fn(logits, task.query_y)
        return loss, (loss.detach(), logits.detach())

    def task_direction(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        if self.first_order:
            # By definition: adapt with no graph (plain tensors out), then differentiate at the adapted point.
            *_, fast = self._trajectory(params, task, self.inner_steps)
            meta_grad, (loss, logits) = grad(self._query_loss, has_aux=True)(fast, task)
            return meta_grad, self._metrics(loss, logits, task.query_y)
        weights = self.plus.step_weights(self.inner_steps, self.round_index)

        # Differentiate the (weighted sum of) query losses through every inner step: second order, or first
        # order in MAML++'s annealing phase.
        def meta_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            total = torch.zeros(())
            for step, fast in enumerate(self._trajectory(p, task, self.inner_steps, first_order=self._first_order_now)):
                if weights[step] == 0.0:
                    continue
                loss, (final_loss, final_logits) = self._query_loss(fast, task)
                total = total + weights[step] * loss
            return total, (final_loss, final_logits)

        meta_grad, (loss, logits) = grad(meta_loss, has_aux=True)(params)
        return meta_grad, self._metrics(loss, logits, task.query_y)

    # -- batched ------------------------------------------------------------------------------------------
    def _batch_inner_loop(
        self, params: Params, batch: TaskBatch, steps: int, *, first_order: bool = False
    ) -> tuple[nn.Module, Iterator[Params], Tensor]:
        """The inner loop on every task's support set: (network, per-task fast weights after 0..steps steps
        with their step's overrides applied, query inputs of that network).

        When only the head adapts (ANIL) the network is the head and its inputs are the body's features,
        computed once per task instead of once per step: the body's weights do not change in the inner loop,
        so the values are those of the reference.
        """
        weights = self.model_params(params)
        keys = self.adapt_keys(weights)
        lr = self.adaptation_lr(params)
        overrides = self.step_overrides(params)
        model, x, query_x = self.model, batch.support_x, batch.query_x
        if keys is not None and not self._bn_names and _head_only(self.model, weights, keys):
            # The body is one network for all tasks: shared weights, its gradient the sum over tasks.
            body = {k.removeprefix("body."): v for k, v in weights.items() if k.startswith("body.")}
            model = self.model.head  # type: ignore[assignment]
            x = batched.batched_forward(self.model.body, body, x, shared=True)  # type: ignore[arg-type]
            query_x = batched.batched_forward(self.model.body, body, query_x, shared=True)  # type: ignore[arg-type]
            weights = {k.removeprefix("head."): v for k, v in weights.items() if k.startswith("head.")}
            lr = _strip_head(lr)
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
            overrides=overrides,
            first_order=first_order,
        )
        if overrides is not None:
            num_tasks = len(batch)
            trajectory = (
                {**fast, **batched.per_task(overrides(step), num_tasks)} for step, fast in enumerate(trajectory)
            )
        return model, trajectory, query_x

    def batch_predictions(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Tensor]:
        """Query predictions after 0..steps inner steps, all tasks at once."""
        model, trajectory, query_x = self._batch_inner_loop(params, batch, steps)
        for fast in trajectory:
            yield batched.batched_forward(model, fast, query_x)

    def batch_direction(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        if self.first_order:
            directions, metrics = self._first_order_directions(params, batch)
            return {k: g.sum(0) for k, g in directions.items()}, metrics
        step_weights = self.plus.step_weights(self.inner_steps, self.round_index)

        # Second order (or DA's first order): the summed, step-weighted query losses, differentiated through
        # every inner step back to the shared meta-parameters, give the sum of the tasks' meta-gradients.
        def meta_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            model, trajectory, query_x = self._batch_inner_loop(
                p, batch, self.inner_steps, first_order=self._first_order_now
            )
            total = torch.zeros(())
            for step, fast in enumerate(trajectory):
                if step_weights[step] == 0.0:
                    continue
                logits = batched.batched_forward(model, fast, query_x)
                losses = batched.task_losses(self.kind, logits, batch.query_y)
                total = total + step_weights[step] * losses.sum()
            return total, (losses.detach(), logits.detach())

        direction, (losses, logits) = grad(meta_loss, has_aux=True)(params)
        return direction, self._batch_metrics(losses, logits, batch.query_y)

    def _first_order_directions(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """Each task's first-order direction (T, ...): adapt with no graph (plain tensors at top level), then
        each task's query gradient at its own adapted weights - the gradient of the summed query losses with
        respect to the per-task weights."""
        model, trajectory, query_x = self._batch_inner_loop(params, batch, self.inner_steps)
        *_, fast = trajectory
        fast = {k: v.detach() for k, v in fast.items()}

        def query_loss(f: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            logits = batched.batched_forward(model, f, query_x)
            losses = batched.task_losses(self.kind, logits, batch.query_y)
            return losses.sum(), (losses.detach(), logits.detach())

        per_task_grads, (losses, logits) = grad(query_loss, has_aux=True)(fast)
        return per_task_grads, self._batch_metrics(losses, logits, batch.query_y)


def _strip_head(lr: InnerLR) -> InnerLR:
    """The inner learning rate with the `head.` prefix removed from per-parameter keys."""
    if callable(lr):
        inner: Callable[[int], float | Params] = lr
        return lambda step: _strip_head(inner(step))  # type: ignore[return-value]
    if isinstance(lr, dict):
        return {k.removeprefix("head."): v for k, v in lr.items() if k.startswith("head.")}
    return lr


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
    has_task_directions = True

    def task_directions(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        return self._first_order_directions(params, batch)


class ANIL(MAML):
    """Almost No Inner Loop: MAML whose inner loop adapts only `head.*` (second order through the head)."""

    name = "anil"

    def adapt_keys(self, params: Params) -> set[str]:
        return {k for k in params if k.startswith("head.")}


class FedRep(ANIL):
    """FedRep: Collins, Hassani, Mokhtari, Shakkottai 2021, arXiv:2102.07078 (Algorithm 1) - a shared
    representation (the body) and a head of each client's own.

    A client fits its head with the body frozen (`inner_steps` SGD steps at `inner_lr` on the task's support
    set), then returns the gradient of the query loss with respect to the body at that head, and the server's
    outer step applies the clients' mean (the paper's local body update, one step long, then averaged; the
    paper takes several local body steps and averages the bodies). The head is never shared: its direction
    is zero, so the global head stays at its initial value, from which every client fits its own - an unseen
    client at evaluation too (head-only adaptation, body fixed, as the paper personalises new clients).
    fedmeta's clients keep no state between rounds, so a training client re-fits its head each time it is
    sampled instead of resuming the one it had.
    """

    name = "fedrep"
    first_order = True

    @staticmethod
    def _body_only(direction: Params) -> Params:
        return {k: torch.zeros_like(v) if k.startswith("head.") else v for k, v in direction.items()}

    def task_direction(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        direction, metrics = super().task_direction(params, task)
        return self._body_only(direction), metrics

    def batch_direction(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        # Every task's head fitted at once on the body's features (no graph), then the gradient of the summed
        # query losses with respect to the body, shared by all tasks: the sum of the tasks' body gradients.
        _, trajectory, _ = self._batch_inner_loop(params, batch, self.inner_steps)
        *_, heads = trajectory
        heads = {k: v.detach() for k, v in heads.items()}
        body = {k.removeprefix("body."): v for k, v in params.items() if k.startswith("body.")}

        def query_loss(b: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            features = batched.batched_forward(self.model.body, b, batch.query_x, shared=True)  # type: ignore[arg-type]
            logits = batched.batched_forward(self.model.head, heads, features)  # type: ignore[arg-type]
            losses = batched.task_losses(self.kind, logits, batch.query_y)
            return losses.sum(), (losses.detach(), logits.detach())

        body_grad, (losses, logits) = grad(query_loss, has_aux=True)(body)
        direction = {f"body.{k}": g for k, g in body_grad.items()}
        return self._body_only({**params, **direction}), self._batch_metrics(losses, logits, batch.query_y)
