"""Reptile: Nichol, Achiam, Schulman 2018, arXiv:1803.02999.

The client runs `inner_steps` steps of SGD on each task (support and query pooled: Reptile has no
train/test split inside a task) and returns the pseudo-gradient `params - adapted`. With an outer SGD step
of size epsilon the server moves towards the adapted weights: `params + epsilon * mean(adapted - params)`.
A task's metrics (`query_loss`, `query_accuracy`) score the adapted weights on the last inner step's minibatch.

Carried Adam state (`carry_state`). The paper's inner loop is Adam with beta1 = 0, and its released code
(github.com/openai/supervised-reptile, `reptile.py`) restores only the model's weights between tasks: Adam's
second moments run on across tasks and meta-steps, so a weight's step is its gradient over the long-run RMS of
its gradients, not lr x sign(gradient) as with fresh state. Federated, the server holds that state among the
meta-parameters - `inner_adam.v.<name>` (the second moments) and `inner_adam.weight` (their running bias
correction, `fedmeta.functional.InnerOptimizer.step`); each task starts Adam from it, and the client's
direction for those entries is `state - state after the task`, so an outer SGD step of 1 replaces the state by
the mean of the tasks' final states (every entry is linear in the state, so the mean is the state of a mean
history), and a smaller step blends the two. The entries travel, are clipped and noised with the direction
like any other: differential privacy covers them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedmeta import batched
from fedmeta.algorithms.base import Algorithm, SequentialLocal
from fedmeta.batched import TaskBatch
from fedmeta.functional import WEIGHT, adapt, adapt_states, forward
from fedmeta.models import init_params
from fedmeta.types import Params, Task

STATE_PREFIX = "inner_adam."


class Reptile(Algorithm):
    name = "reptile"
    has_task_directions = True

    def __init__(self, model: nn.Module, *, carry_state: bool = False, **kwargs) -> None:
        super().__init__(model, **kwargs)
        if carry_state and self.inner_optimizer.name != "adam":
            raise ValueError("reptile carries the inner optimizer's state only for an Adam inner loop")
        self.carry_state = carry_state

    def init_params(self, generator: torch.Generator) -> Params:
        weights = init_params(self.model, generator)
        if not self.carry_state:
            return weights
        state = {f"{STATE_PREFIX}v.{k}": torch.zeros_like(v) for k, v in weights.items()}
        return weights | state | {f"{STATE_PREFIX}weight": torch.zeros(1)}

    def model_params(self, params: Params) -> Params:
        return {k: v for k, v in params.items() if not k.startswith(STATE_PREFIX)}

    def adaptation_state(self, params: Params) -> Params | None:
        if not self.carry_state:
            return None
        carried = {k[len(STATE_PREFIX) :]: v for k, v in params.items() if k.startswith(STATE_PREFIX)}
        return {k: v for k, v in carried.items() if k != "weight"} | {WEIGHT: carried["weight"]}

    def _state_directions(self, params: Params, state: Params, weights: Params, tasks: int | None) -> Params:
        """The direction of the carried entries, `held - final` (per task: a leading axis of `tasks`)."""
        if not self.carry_state:
            return {}
        final = {f"v.{k}": state[k] for k in weights} | {"weight": state[WEIGHT]}
        directions = {}
        for name, value in final.items():
            held = params[STATE_PREFIX + name]
            if tasks is not None:
                held, value = held.unsqueeze(0), torch.broadcast_to(value, (tasks, *held.shape))
            directions[STATE_PREFIX + name] = held - value
        return directions

    def task_direction(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        x = torch.cat([task.support_x, task.query_x])
        y = torch.cat([task.support_y, task.query_y])
        weights = self.model_params(params)
        *_, (fast, state) = adapt_states(
            self.model,
            self.loss_fn,
            weights,
            x,
            y,
            steps=self.inner_steps,
            inner_lr=self.inner_lr,
            optimizer=self.inner_optimizer,
            carried=self.adaptation_state(params),
        )
        pseudo_grad = {k: weights[k] - fast[k] for k in weights} | self._state_directions(params, state, weights, None)
        xb, yb = self._scored(x, y, dim=0)
        logits = forward(self.model, fast, xb).detach()
        return pseudo_grad, self._metrics(self.loss_fn(logits, yb), logits, yb)

    def batch_direction(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        directions, metrics = self.task_directions(params, batch)
        return {k: v.sum(0) for k, v in directions.items()}, metrics

    def task_directions(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        x, y = batch.pooled()
        weights = self.model_params(params)
        *_, (fast, state) = batched.adapt_states(
            self.model,
            self.kind,
            batched.per_task(weights, len(batch)),
            x,
            y,
            steps=self.inner_steps,
            inner_lr=self.inner_lr,
            optimizer=self.inner_optimizer,
            carried=self.adaptation_state(params),
        )
        pseudo_grads = {k: weights[k].unsqueeze(0) - fast[k] for k in weights}
        pseudo_grads |= self._state_directions(params, state, weights, len(batch))
        xb, yb = self._scored(x, y, dim=1)
        with torch.no_grad():
            logits = batched.batched_forward(self.model, fast, xb)
        return pseudo_grads, self._batch_metrics(batched.task_losses(self.kind, logits, yb), logits, yb)

    def _scored(self, x: Tensor, y: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """The examples a task's metrics score the adapted weights on: its last inner step's minibatch (all
        of the task without minibatches). Scoring all 50 examples of a 10-shot task instead cost about a fifth
        of a round of the Omniglot preset (benchmarks/RESULTS.md)."""
        return self.inner_optimizer.minibatch(x, y, self.inner_steps - 1, dim=dim)


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
