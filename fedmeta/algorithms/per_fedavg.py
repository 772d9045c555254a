"""Per-FedAvg: Fallah, Mokhtari, Ozdaglar 2020, "Personalized Federated Learning with Theoretical Guarantees:
A Model-Agnostic Meta-Learning Approach", arXiv:2002.07948 (Algorithm 1).

A personalisation baseline that is itself MAML-shaped, but federated the FedAvg way: each selected client
takes tau local meta-steps on its own data, one per task (tau = `federation.tasks_per_client`),

    temp = w - alpha grad f(w; D)                       (the inner step: `inner_lr`, `inner_steps`)
    w   <- w - beta (I - alpha hess f(w; D'')) grad f(temp; D')

and returns `w_start - w`; with outer SGD at lr 1 the server averages the clients' models, as the paper's
server does. D is the task's support set and D' its query set; D'', the batch of the Hessian-vector product,
is the support set again (the paper draws a third independent batch). Two variants, as in the paper:
first-order (`perfedavg`, the Hessian term dropped) and Hessian-free (`perfedavg-hf`, the Hessian-vector
product computed exactly by differentiating twice; the paper estimates it by finite
differences). A new client personalises by the same SGD steps at `inner_lr` as every other method.
"""

from __future__ import annotations

from torch import Tensor
from torch.func import grad

from fedmeta.algorithms.base import SequentialLocal
from fedmeta.functional import adapt, forward, task_loss
from fedmeta.types import Params, Task


class PerFedAvg(SequentialLocal):
    name = "perfedavg"
    hessian_free = False

    def __init__(self, *args: object, local_lr: float = 0.001, **kwargs: object) -> None:
        """`local_lr`: the paper's beta, the step of each local meta-update."""
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.local_lr = local_lr

    def _loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return task_loss(self.model, self.loss_fn, params, x, y)

    def meta_gradient(self, params: Params, task: Task) -> tuple[Params, Params]:
        """(the local meta-gradient at `params` on `task`, the weights after the inner step)."""
        temp = adapt(
            self.model, self.loss_fn, params, task.support_x, task.support_y,
            steps=self.inner_steps, inner_lr=self.inner_lr,
        )  # fmt: skip
        g = grad(self._loss)(temp, task.query_x, task.query_y)
        if self.hessian_free:
            g = {k: v.detach() for k, v in g.items()}

            def directional(p: Params) -> Tensor:  # <grad f(p; D''), g>, whose gradient is hess f(p; D'') g
                support_grad = grad(self._loss)(p, task.support_x, task.support_y)
                return sum((support_grad[k] * g[k]).sum() for k in g)  # type: ignore[return-value]

            hvp = grad(directional)(params)
            g = {k: g[k] - self.inner_lr * hvp[k] for k in g}
        return g, temp

    def local_step(self, local: Params, task: Task) -> tuple[Params, dict[str, float]]:
        g, temp = self.meta_gradient(local, task)
        logits = forward(self.model, temp, task.query_x).detach()
        metrics = self._metrics(self.loss_fn(logits, task.query_y), logits, task.query_y)
        return {k: local[k] - self.local_lr * g[k] for k in local}, metrics


class PerFedAvgHF(PerFedAvg):
    name = "perfedavg-hf"
    hessian_free = True


__all__ = ["PerFedAvg", "PerFedAvgHF"]
