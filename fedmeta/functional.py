"""The inner loop as pure functions over parameter dicts (`torch.func.functional_call` and `torch.func.grad`).

Nothing here mutates a module: `params` go in, new `params` come out. Called inside an outer
`torch.func.grad`, `adapt` is differentiated through (second-order MAML for free); called at top level it
returns plain tensors with no graph, which is how first-order methods and evaluation use it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from fedmeta.types import Params

LossFn = Callable[[Tensor, Tensor], Tensor]  # (prediction, target) -> scalar


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


def forward(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    return functional_call(model, params, (x,))


def task_loss(model: nn.Module, loss_fn: LossFn, params: Params, x: Tensor, y: Tensor) -> Tensor:
    return loss_fn(forward(model, params, x), y)


def adapt_trajectory(
    model: nn.Module,
    loss_fn: LossFn,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    inner_lr: float | Params,
    adapt_keys: Collection[str] | None = None,
) -> Iterator[Params]:
    """Yield the fast weights after 0, 1, ..., `steps` steps of gradient descent on (x, y).

    `inner_lr` is a float, or a per-parameter tensor dict keyed like `params` (Meta-SGD).
    `adapt_keys` limits adaptation to those parameters (ANIL adapts only the head); the rest stay fixed.
    """
    keys = list(params) if adapt_keys is None else [k for k in params if k in adapt_keys]
    fast = dict(params)
    yield fast
    for _ in range(steps):
        frozen = {k: v for k, v in fast.items() if k not in keys}

        def loss_of(adapted: Params, frozen: Params = frozen) -> Tensor:
            return task_loss(model, loss_fn, {**frozen, **adapted}, x, y)

        grads = grad(loss_of)({k: fast[k] for k in keys})
        fast = {**fast, **{k: fast[k] - _lr(inner_lr, k) * grads[k] for k in keys}}
        yield fast


def adapt(
    model: nn.Module,
    loss_fn: LossFn,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    inner_lr: float | Params,
    adapt_keys: Collection[str] | None = None,
) -> Params:
    """The fast weights after `steps` steps (the last element of `adapt_trajectory`)."""
    *_, fast = adapt_trajectory(model, loss_fn, params, x, y, steps=steps, inner_lr=inner_lr, adapt_keys=adapt_keys)
    return fast


def _lr(inner_lr: float | Params, key: str) -> float | Tensor:
    return inner_lr[key] if isinstance(inner_lr, dict) else inner_lr


def tree_mean(trees: list[Params], weights: list[float] | None = None) -> Params:
    """Weighted mean of parameter dicts with identical keys (weights default to equal)."""
    if not trees:
        raise ValueError("cannot average an empty list of parameter dicts")
    w = torch.tensor(weights if weights is not None else [1.0] * len(trees), dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {w.tolist()}")
    w = w / w.sum()
    keys = trees[0].keys()
    return {
        k: sum((wi * t[k].double() for wi, t in zip(w, trees, strict=True)), torch.zeros(())).to(trees[0][k].dtype)
        for k in keys
    }
