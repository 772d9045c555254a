"""Meta-learner LSTM: Ravi & Larochelle 2017, "Optimization as a Model for Few-Shot Learning" (ICLR).

The inner loop is a learned optimiser: a coordinate-wise LSTM cell whose cell state is the learner's weights.
Each inner step t updates every weight coordinate by

    c_t = f_t * c_{t-1} - i_t * grad_t                                   (eq. 2)
    i_t = sigmoid(W_I . [grad_t, L_t, c_{t-1}, i_{t-1}] + b_I)           (eq. 3)
    f_t = sigmoid(W_F . [grad_t, L_t, c_{t-1}, f_{t-1}] + b_F)           (eq. 4)

with the gradient and the loss preprocessed as in Andrychowicz et al. 2016 (each becomes two numbers, sec. 3.2
there), and the parameters W_I, b_I, W_F, b_F shared by every coordinate. The meta-parameters are these gate
parameters and the learner's initial weights c_0; the meta-gradient of the query loss after the last step
flows through the cell updates and the gates, but not through the gradients and losses fed to the LSTM: as
in the paper (sec. 3.2), they are treated as inputs, so no second derivative is taken. The paper's
meta-learner has a first, ordinary LSTM layer (hidden size 20) under this cell; here the gates read the
preprocessed inputs directly. The gates start close to SGD: f = sigmoid(6) = 0.998 and i = the inner learning
rate (the paper initialises the forget gate close to 1 and the input gate small).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.func import grad

from fedmeta.algorithms.base import Algorithm
from fedmeta.batched import TaskBatch
from fedmeta.functional import forward
from fedmeta.models import init_params
from fedmeta.types import Params, Task

PREFIX = "metalstm."
INPUTS = 6  # preprocessed gradient (2), preprocessed loss (2), the weight itself, the previous gate
P = 10.0  # Andrychowicz et al.'s preprocessing constant
FORGET_START = 6.0  # sigmoid(6) = 0.9975: the forget gate starts close to 1


def preprocess(x: Tensor) -> Tensor:
    """Andrychowicz et al. 2016: x -> (log|x| / p, sign x) if |x| >= e^-p, else (-1, e^p x); shape (..., 2)."""
    big = x.abs() >= math.exp(-P)
    first = torch.where(big, x.abs().clamp_min(math.exp(-P)).log() / P, torch.full_like(x, -1.0))
    second = torch.where(big, torch.sign(x), math.exp(P) * x)
    return torch.stack([first, second], dim=-1)


def lstm_step(
    weight: Tensor, gradient: Tensor, loss: Tensor, i_prev: Tensor, f_prev: Tensor, gates: Params
) -> tuple[Tensor, Tensor, Tensor]:
    """One meta-learner step for one weight tensor: (new weight c_t, i_t, f_t). `gradient` and `loss` are
    inputs (the caller detaches them)."""
    inputs = torch.cat([preprocess(gradient), preprocess(loss).expand(*gradient.shape, 2)], dim=-1)  # (..., 4)
    w_i, w_f = gates[PREFIX + "w_i"], gates[PREFIX + "w_f"]
    i_t = torch.sigmoid((inputs * w_i[:4]).sum(-1) + w_i[4] * weight + w_i[5] * i_prev + gates[PREFIX + "b_i"])
    f_t = torch.sigmoid((inputs * w_f[:4]).sum(-1) + w_f[4] * weight + w_f[5] * f_prev + gates[PREFIX + "b_f"])
    return f_t * weight - i_t * gradient, i_t, f_t


class MetaLSTM(Algorithm):
    name = "metalstm"

    def init_params(self, generator: torch.Generator) -> Params:
        weights = init_params(self.model, generator)
        dtype = next(iter(weights.values())).dtype
        lr = min(max(self.inner_lr, 1e-6), 1 - 1e-6)
        gates = {
            PREFIX + "w_i": torch.zeros(INPUTS, dtype=dtype),
            PREFIX + "b_i": torch.tensor(math.log(lr / (1 - lr)), dtype=dtype),  # sigmoid(b_i) = inner_lr
            PREFIX + "w_f": torch.zeros(INPUTS, dtype=dtype),
            PREFIX + "b_f": torch.tensor(FORGET_START, dtype=dtype),
        }
        return {**weights, **gates}

    def model_params(self, params: Params) -> Params:
        return {k: v for k, v in params.items() if not k.startswith(PREFIX)}

    def fixed_rate_refusal(self, params: Params) -> str | None:
        return "its learned LSTM optimizer takes the inner steps (the inner rate only sets its gates' start)"

    def trajectory(self, params: Params, task: Task, steps: int) -> Iterator[Params]:
        """The learner's weights after 0..steps meta-learner steps on the support set (differentiable in the
        gates and the initial weights; the gradients and losses fed in are constants)."""
        gates = {k: v for k, v in params.items() if k.startswith(PREFIX)}
        # The gates are shared by every weight tensor, so their gradient sums one term per tensor, in the order
        # the tensors are updated: name order, not the dict's (a Flower message sorts by name, the model does not).
        weights = dict(sorted(self.model_params(params).items()))
        i_prev = {k: torch.sigmoid(gates[PREFIX + "b_i"]).expand_as(v) for k, v in weights.items()}
        f_prev = {k: torch.sigmoid(gates[PREFIX + "b_f"]).expand_as(v) for k, v in weights.items()}
        yield weights
        for _ in range(steps):

            def support_loss(w: Params) -> tuple[Tensor, Tensor]:
                loss = self.loss_fn(forward(self.model, w, task.support_x), task.support_y)
                return loss, loss.detach()

            gradient, loss = grad(support_loss, has_aux=True)({k: v.detach() for k, v in weights.items()})
            updated = {
                k: lstm_step(weights[k], gradient[k].detach(), loss, i_prev[k], f_prev[k], gates) for k in weights
            }
            weights = {k: u[0] for k, u in updated.items()}
            i_prev = {k: u[1] for k, u in updated.items()}
            f_prev = {k: u[2] for k, u in updated.items()}
            yield weights

    def task_direction(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        def query_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            *_, fast = self.trajectory(p, task, self.inner_steps)
            predictions = forward(self.model, fast, task.query_x)
            loss = self.loss_fn(predictions, task.query_y)
            return loss, (loss.detach(), predictions.detach())

        direction, (loss, predictions) = grad(query_loss, has_aux=True)(params)
        return direction, self._metrics(loss, predictions, task.query_y)

    # The meta-learner's steps differ per task and per coordinate state; the client part runs task by task
    # (the batched engine's vectorised inner loop is SGD-shaped). Equal to the reference by construction.
    def batch_direction(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        total: Params = {}
        metrics: dict[str, list[Tensor]] = {}
        for task in _tasks(batch):
            direction, task_metrics = self.task_direction(params, task)
            total = direction if not total else {k: total[k] + direction[k] for k in total}
            for name, value in task_metrics.items():
                metrics.setdefault(name, []).append(torch.tensor(value, dtype=torch.float64))
        return total, {name: torch.stack(values) for name, values in metrics.items()}

    def predict_curve(self, params: Params, task: Task, steps: int) -> list[Tensor]:
        return [forward(self.model, w, task.query_x).detach() for w in self.trajectory(params, task, steps)]

    def batch_predictions(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Tensor]:
        curves = [self.predict_curve(params, task, steps) for task in _tasks(batch)]
        for step in range(steps + 1):
            yield torch.stack([curve[step] for curve in curves])


def _tasks(batch: TaskBatch) -> list[Task]:
    return [Task(batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]) for t in range(len(batch))]
