"""The inner loop as pure functions over parameter dicts (`torch.func.functional_call` and `torch.func.grad`).

Nothing here mutates a module: `params` go in, new `params` come out. Called inside an outer
`torch.func.grad`, `adapt` is differentiated through (second-order MAML for free); called at top level it
returns plain tensors with no graph, which is how first-order methods and evaluation use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from fedmeta.types import Params

LossFn = Callable[[Tensor, Tensor], Tensor]  # (prediction, target) -> scalar
# A learning rate for the inner loop: one number, one tensor per parameter (Meta-SGD), or either per step
# (MAML++'s learned per-step rates): step index (0-based) -> rate.
InnerLR = float | Params | Callable[[int], "float | Params"]
# Parameters that replace the fast weights' entries in the forward pass of step s (MAML++'s per-step
# batch-norm weights); they are not adapted.
StepOverrides = Callable[[int], Params]


def lr_of_step(inner_lr: InnerLR, step: int) -> float | Params:
    return inner_lr(step) if callable(inner_lr) else inner_lr


def loss_fn_for(kind: str) -> LossFn:
    """Mean squared error for regression, cross-entropy (on logits) for classification."""
    if kind == "regression":
        return F.mse_loss
    if kind == "classification":
        return F.cross_entropy
    raise ValueError(f"task kind must be 'regression' or 'classification', got {kind!r}")


def metric_for(kind: str) -> tuple[str, Callable[[Tensor, Tensor], Tensor]]:
    """The figure users read: MSE for regression (lower is better), accuracy for classification."""
    if kind == "regression":
        return "mse", F.mse_loss
    return "accuracy", lambda logits, y: (logits.argmax(dim=-1) == y).double().mean()


# The key of carried Adam state's running bias correction (no parameter name starts with "#").
WEIGHT = "#weight"


@dataclass(frozen=True)
class InnerOptimizer:
    """The inner loop's update rule, as pure functions: plain gradient descent, or Adam with per-task state.

    Adam with beta1 = 0 is Reptile's inner optimizer (Nichol et al. 2018, arXiv:1803.02999, sec. 6); its state
    starts afresh for every task. `batch` > 0 takes each step on a minibatch of about that many examples:
    the examples are split into ceil(n / batch) strided parts (part j holds examples j, j + parts, ...), so a
    class-ordered task gives every part a near-equal share of every class, and step s uses part s mod parts.
    Shapes are free: the same functions serve the per-task path and the batched one (leading task axis).
    """

    name: str = "sgd"
    batch: int = 0
    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adam"):
            raise ValueError(f"inner optimizer must be 'sgd' or 'adam', got {self.name!r}")

    def init(self, fast: Params, keys: Collection[str], carried: Params | None = None) -> Params:
        """Fresh state, or Adam's state carried over from earlier tasks: `carried` holds the second moments
        `v.<key>` and their total weight `WEIGHT` (see `step`); first moments start at zero either way."""
        if self.name == "sgd":
            return {}
        first = {f"m.{k}": torch.zeros_like(fast[k]) for k in keys}
        if carried is None:
            return {k: torch.zeros_like(fast[k]) for k in keys} | first
        # Clamped: a noised (differentially private) estimate may dip below zero.
        return {k: carried[f"v.{k}"].clamp_min(0) for k in keys} | first | {WEIGHT: carried[WEIGHT].clamp_min(0)}

    def step(
        self, fast: Params, grads: Params, inner_lr: float | Params, state: Params, t: int
    ) -> tuple[Params, Params]:
        """Step number `t` (1-based) on the keys of `grads`; returns new fast weights and state.

        Fresh state divides v by Adam's bias correction 1 - beta2^t. Carried state keeps that correction's
        running value as `WEIGHT`, updated like v itself (weight' = beta2 weight + 1 - beta2): v / weight is
        then the weighted mean of the squared gradients whatever the history, and averaging several tasks'
        states (v and weight alike) keeps it one. From zero, weight after t steps is 1 - beta2^t: the same rule.
        """
        if self.name == "sgd":
            return {**fast, **{k: fast[k] - _lr(inner_lr, k) * g for k, g in grads.items()}}, state
        new_state = dict(state)
        if WEIGHT in state:
            new_state[WEIGHT] = self.beta2 * state[WEIGHT] + (1 - self.beta2)
        # Fused forms (lerp, addcmul, addcdiv): half the tensor operations of the textbook lines, the same
        # arithmetic up to rounding; Reptile takes this step 5 times per task.
        correction1 = 1 - self.beta1**t
        correction2 = new_state[WEIGHT] if WEIGHT in state else 1 - self.beta2**t
        updated = {}
        for k, g in grads.items():
            m = state[f"m.{k}"].lerp(g, 1 - self.beta1)  # beta1 m + (1 - beta1) g
            v = torch.addcmul(state[k] * self.beta2, g, g, value=1 - self.beta2)
            denominator = (v / correction2).sqrt() + self.eps
            lr = _lr(inner_lr, k)
            if isinstance(lr, Tensor):  # Meta-SGD's or MAML++'s rates: differentiable, so kept as a product
                updated[k] = fast[k] - lr * (m / correction1) / denominator
            else:
                updated[k] = torch.addcdiv(fast[k], m, denominator, value=-lr / correction1)
            new_state[k], new_state[f"m.{k}"] = v, m
        return {**fast, **updated}, new_state

    def minibatch(self, x: Tensor, y: Tensor, step: int, dim: int) -> tuple[Tensor, Tensor]:
        """The examples of inner step `step` (0-based) along the example axis `dim`."""
        n = x.shape[dim]
        if self.batch <= 0 or self.batch >= n:
            return x, y
        parts = math.ceil(n / self.batch)
        index = torch.arange(step % parts, n, parts, device=x.device)
        return x.index_select(dim, index), y.index_select(dim, index)


SGD = InnerOptimizer()


def forward(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    return functional_call(model, params, (x,))


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """One step of a standard LSTM cell (PyTorch's gate order i, f, g, o) over leading batch dimensions:
    x (..., in), h and c (..., hidden) -> (h', c'); w_ih (4 hidden, in), w_hh (4 hidden, h's size)."""
    i, f, g, o = (x @ w_ih.T + h @ w_hh.T + bias).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def task_loss(model: nn.Module, loss_fn: LossFn, params: Params, x: Tensor, y: Tensor) -> Tensor:
    return loss_fn(forward(model, params, x), y)


def inner_loop(
    loss_of: Callable[[Params, Tensor, Tensor], Tensor],
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    inner_lr: InnerLR,
    adapt_keys: Collection[str] | None = None,
    optimizer: InnerOptimizer = SGD,
    overrides: StepOverrides | None = None,
    first_order: bool = False,
    example_dim: int = 0,
    expand: Callable[[Params], Params] = lambda p: p,
    carried: Params | None = None,
) -> Iterator[tuple[Params, Params]]:
    """Yield the fast weights after 0, 1, ..., `steps` steps of gradient descent of `loss_of(params, x, y)`,
    each with the inner optimizer's state after that step.

    The one inner loop of both engines: `adapt_states` below (one task) and `fedmeta.batched` (all tasks,
    example axis 1, overrides expanded over tasks by `expand`). `inner_lr` is a float, a per-parameter tensor
    dict keyed like `params` (Meta-SGD), or a function of the step giving either (MAML++'s per-step rates).
    `adapt_keys` limits adaptation to those parameters (ANIL adapts only the head); the rest stay fixed.
    `optimizer`: plain SGD on all of (x, y) by default; Adam and minibatches on request (`InnerOptimizer`).
    `overrides(s)` replaces entries in step s's forward (they must then also be applied to any forward with
    the yielded weights). `first_order`: the inner gradients are constants to an outer `grad` (MAML++'s
    derivative-order annealing); the update arithmetic, and so the rates, stay differentiable.
    `carried`: the optimizer's state from earlier tasks (`InnerOptimizer.init`; Reptile's carried Adam).
    """
    keys = list(params) if adapt_keys is None else [k for k in params if k in adapt_keys]
    fast = dict(params)
    state = optimizer.init(fast, keys, carried)
    yield fast, state
    for step in range(steps):
        frozen = {k: v for k, v in fast.items() if k not in keys}
        if overrides is not None:
            frozen = {**frozen, **expand(overrides(step))}
        xb, yb = optimizer.minibatch(x, y, step, dim=example_dim)

        def loss(adapted: Params, frozen: Params = frozen, xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
            return loss_of({**adapted, **frozen}, xb, yb)

        grads = grad(loss)({k: fast[k] for k in keys})
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        fast, state = optimizer.step(fast, grads, lr_of_step(inner_lr, step), state, step + 1)
        yield fast, state


def adapt_states(
    model: nn.Module, loss_fn: LossFn, params: Params, x: Tensor, y: Tensor, **options: Any
) -> Iterator[tuple[Params, Params]]:
    """One task's fast weights after 0..steps steps on (x, y), each with the optimizer's state: `inner_loop`
    with the model's loss, and its keyword options (`steps`, `inner_lr`, ...)."""
    return inner_loop(lambda p, xb, yb: task_loss(model, loss_fn, p, xb, yb), params, x, y, **options)


def adapt_trajectory(
    model: nn.Module, loss_fn: LossFn, params: Params, x: Tensor, y: Tensor, **options: Any
) -> Iterator[Params]:
    """One task's fast weights after 0..steps steps on (x, y) (`adapt_states` without the states)."""
    return (fast for fast, _ in adapt_states(model, loss_fn, params, x, y, **options))


def adapt(model: nn.Module, loss_fn: LossFn, params: Params, x: Tensor, y: Tensor, **options: Any) -> Params:
    """The fast weights after `steps` steps (the last of `adapt_trajectory`)."""
    *_, (fast, _) = adapt_states(model, loss_fn, params, x, y, **options)
    return fast


def _lr(inner_lr: float | Params, key: str) -> float | Tensor:
    return inner_lr[key] if isinstance(inner_lr, dict) else inner_lr


def tree_mean(trees: list[Params], weights: list[float] | None = None) -> Params:
    """Weighted mean of parameter dicts with identical keys (weights default to equal)."""
    if not trees:
        raise ValueError("cannot average an empty list of parameter dicts")
    return rows_mean({k: torch.stack([t[k] for t in trees]) for k in trees[0]}, weights)


def rows_mean(rows: Params, weights: Sequence[float] | None = None) -> Params:
    """Weighted mean over the leading axis of stacked parameters (row i of every entry is one client's).

    Accumulated in float64, row after row in order: the result is a function of the rows and their order
    alone, never of how they were batched or of the thread count, so every transport gets the same bits.
    """
    count = next(iter(rows.values())).shape[0]
    w = torch.tensor(list(weights) if weights is not None else [1.0] * count, dtype=torch.float64)
    if len(w) != count:
        raise ValueError(f"{len(w)} weights for {count} rows")
    if count == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {w.tolist()}")
    w = w / w.sum()
    flat = torch.cat([v.reshape(count, -1).double() for v in rows.values()], 1)
    total = torch.zeros(())
    for i in range(count):
        total = total + w[i] * flat[i]
    sizes = [v[0].numel() if count else 0 for v in rows.values()]
    parts = torch.split(total, sizes)
    return {k: part.reshape(v.shape[1:]).to(v.dtype) for (k, v), part in zip(rows.items(), parts, strict=True)}
