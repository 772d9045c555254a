"""The batched engine: all of a client's tasks in one vectorised computation.

A `TaskBatch` stacks T tasks of one shape: support_x is (T, n_support, ...), and so on. Parameters come in two
forms: shared (`{name: (...)}`, the meta-parameters) and per task (`{name: (T, ...)}`, fast weights after
adaptation). `per_task` turns the first into the second with `expand`, so that the gradient of the *sum* of the
T task losses with respect to per-task weights is every task's own gradient (tasks do not interact), and the
gradient with respect to the shared weights is the sum of the tasks' gradients.

`batched_forward` runs a model on per-task weights without a Python loop over tasks. Convolutional layers use
the "tasks in channels" layout (n, T*C, H, W): a convolution with per-task weights is one grouped convolution
with T groups, and batch norm with statistics per (task, channel) - exactly what the per-task model computes -
is a plain `F.batch_norm`. Linear layers are one batched matrix product. Modules it does not know run under
`torch.func.vmap` over tasks, which is correct for any module, only slower.

Measured on 2 CPU cores (benchmarks/RESULTS.md): this layout beat `vmap` of the whole inner loop, a per-task
loop of convolutions inside the batch, and convolution as unfold + batched GEMM. With `channels_last` the layout
is kept in channels-last memory (n, H, W, T*C), where a network shared by all tasks also runs as a grouped
convolution (its weights repeated over the T groups): faster for many images per task (ProtoNet's episodes),
slower for MAML's small support sets under second-order differentiation, so the caller chooses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fedmeta.functional import inner_loop
from fedmeta.models import BodyHead
from fedmeta.types import Params, Task

_FIELDS = ("support_x", "support_y", "query_x", "query_y")


def _shapes(task: Task) -> tuple[torch.Size, ...]:
    return tuple(getattr(task, f).shape for f in _FIELDS)


@dataclass(frozen=True)
class TaskBatch:
    """T tasks of one shape, stacked: support_x (T, n_support, ...), support_y (T, n_support, ...), etc."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @classmethod
    def stack(cls, tasks: Sequence[Task], device: torch.device | str | None = None) -> TaskBatch:
        """Stack tasks (on the CPU) and move them to `device` in one copy per tensor."""
        if not tasks:
            raise ValueError("cannot batch an empty list of tasks")
        batch = cls.stack_alike(tasks, device)
        if batch is None:
            shapes = {_shapes(t) for t in tasks}
            raise ValueError(f"tasks in one batch must have the same shapes, got {len(shapes)} different ones")
        return batch

    @classmethod
    def stack_alike(cls, tasks: Sequence[Task], device: torch.device | str | None = None) -> TaskBatch | None:
        """`stack`, or None if the tasks' shapes differ. The stacking itself compares the shapes (in C++), so
        ten thousand tasks cost no Python loop over their shapes unless they differ."""
        try:
            fields = [torch.stack([getattr(t, f) for t in tasks]) for f in _FIELDS]
        except RuntimeError:
            if len({_shapes(t) for t in tasks}) > 1:
                return None
            raise
        return cls(*(x.to(device, non_blocking=True) if device is not None else x for x in fields))

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def chunks(self, size: int) -> Iterator[TaskBatch]:
        """Consecutive batches of at most `size` tasks (views, no copies)."""
        if size <= 0:
            raise ValueError(f"chunk size must be positive, got {size}")
        for start in range(0, len(self), size):
            part = slice(start, start + size)
            yield TaskBatch(self.support_x[part], self.support_y[part], self.query_x[part], self.query_y[part])

    def pooled(self) -> tuple[Tensor, Tensor]:
        """Support and query of every task concatenated along the example axis (Reptile trains on both)."""
        return torch.cat([self.support_x, self.query_x], dim=1), torch.cat([self.support_y, self.query_y], dim=1)


def per_task(params: Params, num_tasks: int) -> Params:
    """Shared parameters as per-task ones: a (T, ...) view of each tensor, differentiable back to the original."""
    return {k: v.expand(num_tasks, *v.shape) for k, v in params.items()}


# -- forward ---------------------------------------------------------------------------------------------------
# A hidden state travels in one of two layouts: ("tasks", (T, n, ...)) or ("channels", (n, T*C, H, W)).
_State = tuple[str, Tensor]


def batched_forward(
    model: nn.Module, params: Params, x: Tensor, *, shared: bool = False, channels_last: bool = False
) -> Tensor:
    """`model` applied to each task's inputs with that task's weights: x (T, n, ...) -> (T, n, out...).

    Every tensor in `params` has a leading task dimension T, or, with `shared=True`, none: one network for all
    tasks (ProtoNet, ANIL's body), whose convolutions then run as one ordinary convolution over all tasks'
    images (the (n, T*C, H, W) layout is (n*T, C, H, W) in memory). Use `per_task` instead where each task's
    own gradient with respect to the weights is needed (an inner loop). `channels_last`: convolutions on
    channels-last memory (see the module's docstring; the same function, other rounding).
    """
    num_tasks = x.shape[0]
    layout, h = _run(model, "", params, ("tasks", x), _Mode(num_tasks, shared, channels_last))
    return _to_tasks((layout, h), num_tasks)


@dataclass(frozen=True)
class _Mode:
    num_tasks: int
    shared: bool
    channels_last: bool


def _run(module: nn.Module, prefix: str, params: Params, state: _State, mode: _Mode) -> _State:
    num_tasks, shared = mode.num_tasks, mode.shared
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            state = _run(child, f"{prefix}{name}.", params, state, mode)
        return state
    if isinstance(module, BodyHead):
        state = _run(module.body, f"{prefix}body.", params, state, mode)
        return _run(module.head, f"{prefix}head.", params, state, mode)
    if isinstance(module, nn.Identity):
        return state
    if isinstance(module, nn.ReLU):
        return state[0], F.relu(state[1])
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
        h = _to_channels(state, mode)
        weight = params[prefix + "weight"]  # (T, out, in / groups, kh, kw), or (out, ...) when shared
        bias = params.get(prefix + "bias")
        if shared and mode.channels_last:  # the same weights in every task's group
            weight = weight.repeat(num_tasks, *[1] * (weight.dim() - 1))
            bias = None if bias is None else bias.repeat(num_tasks)
        elif shared:
            n = h.shape[0]
            out = F.conv2d(
                h.reshape(n * num_tasks, -1, *h.shape[2:]),
                weight,
                bias,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
            )
            return "channels", out.reshape(n, -1, *out.shape[2:])
        else:
            weight = weight.reshape(-1, *weight.shape[2:])
            bias = None if bias is None else bias.reshape(-1)
        out = F.conv2d(
            h,
            weight,
            bias,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups * num_tasks,
        )
        return "channels", out
    if isinstance(module, nn.BatchNorm2d) and not module.track_running_stats:
        # Statistics per (task, channel) over (n, H, W): the per-task model's training-mode batch norm.
        h = _to_channels(state, mode)
        weight, bias = params.get(prefix + "weight"), params.get(prefix + "bias")
        if shared:
            weight = None if weight is None else weight.repeat(num_tasks)
            bias = None if bias is None else bias.repeat(num_tasks)
        return "channels", F.batch_norm(
            h,
            None,
            None,
            None if weight is None else weight.reshape(-1),
            None if bias is None else bias.reshape(-1),
            training=True,
            eps=module.eps,
        )
    if isinstance(module, nn.MaxPool2d):
        h = _to_channels(state, mode)
        return "channels", F.max_pool2d(
            h, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode
        )
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        h = _to_tasks(state, num_tasks)
        return "tasks", h.flatten(2)
    if isinstance(module, nn.Linear):
        h = _to_tasks(state, num_tasks)  # (T, n, ..., in)
        if shared:
            return "tasks", F.linear(h, params[prefix + "weight"], params.get(prefix + "bias"))
        weight = params[prefix + "weight"]  # (T, out, in)
        flat = h.reshape(num_tasks, -1, h.shape[-1])
        bias = params.get(prefix + "bias")
        out = (
            torch.bmm(flat, weight.transpose(1, 2))
            if bias is None
            else torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
        )
        return "tasks", out.reshape(*h.shape[:-1], out.shape[-1])
    return "tasks", _vmapped(module, prefix, params, _to_tasks(state, num_tasks), shared)


def _vmapped(module: nn.Module, prefix: str, params: Params, h: Tensor, shared: bool) -> Tensor:
    """Any other module: `functional_call` under `vmap` over tasks (correct for every module, not the fastest)."""
    names = [name for name, _ in module.named_parameters()]
    own = {name: params[prefix + name] for name in names}
    return vmap(lambda p, x: functional_call(module, p, (x,)), in_dims=(None if shared else 0, 0))(own, h)


def _to_channels(state: _State, mode: _Mode) -> Tensor:
    layout, h = state
    if layout == "channels":
        return h
    # (T, n, C, H, W) -> (n, T*C, H, W)
    h = h.transpose(0, 1).reshape(h.shape[1], mode.num_tasks * h.shape[2], *h.shape[3:])
    return h.contiguous(memory_format=torch.channels_last) if mode.channels_last and h.dim() == 4 else h


def _to_tasks(state: _State, num_tasks: int) -> Tensor:
    layout, h = state
    if layout == "tasks":
        return h
    # (n, T*C, ...) -> (T, n, C, ...)
    n = h.shape[0]
    return h.reshape(n, num_tasks, h.shape[1] // num_tasks, *h.shape[2:]).transpose(0, 1)


def at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision activations (bf16 autocast) lifted to fp32 for losses and distances; fp64 stays fp64."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


# -- losses and the inner loop ------------------------------------------------------------------------------------
def task_losses(kind: str, prediction: Tensor, target: Tensor) -> Tensor:
    """Each task's mean loss, shape (T,): cross-entropy on logits (T, n, classes), or MSE."""
    num_tasks = prediction.shape[0]
    if kind == "classification":
        per_example = F.cross_entropy(
            prediction.reshape(-1, prediction.shape[-1]), target.reshape(-1), reduction="none"
        )
        return per_example.view(num_tasks, -1).mean(1)
    if kind == "regression":
        return (prediction - target).pow(2).reshape(num_tasks, -1).mean(1)
    raise ValueError(f"task kind must be 'regression' or 'classification', got {kind!r}")


def task_metrics(kind: str, prediction: Tensor, target: Tensor) -> Tensor:
    """Each task's figure, shape (T,): accuracy for classification, MSE for regression."""
    if kind == "classification":
        return (prediction.argmax(-1) == target).double().reshape(prediction.shape[0], -1).mean(1)
    return task_losses(kind, prediction, target)


def adapt_states(
    model: nn.Module, kind: str, fast: Params, x: Tensor, y: Tensor, **options: Any
) -> Iterator[tuple[Params, Params]]:
    """Per-task fast weights after 0..steps steps of gradient descent on each task's (x, y), each with the
    inner optimizer's per-task state: `fedmeta.functional.inner_loop`'s keyword options (`steps`, `inner_lr`,
    `adapt_keys`, `optimizer`, `overrides`, `first_order`, `carried`).

    `fast` holds per-task weights (T, ...); `inner_lr` is a float or shared per-parameter tensors (Meta-SGD),
    broadcast over tasks, as are `overrides(s)` (expanded here) and a `carried` optimizer state. The inner
    gradient is that of the summed task losses: each task's own gradient. Differentiable when called under an
    outer `torch.func.grad` (second order), plain tensors otherwise.
    """
    num_tasks = x.shape[0]
    return inner_loop(
        lambda p, xb, yb: task_losses(kind, batched_forward(model, p, xb), yb).sum(),
        fast,
        x,
        y,
        example_dim=1,
        expand=lambda shared: per_task(shared, num_tasks),
        **options,
    )


def adapt_trajectory(
    model: nn.Module, kind: str, fast: Params, x: Tensor, y: Tensor, **options: Any
) -> Iterator[Params]:
    """Per-task fast weights after 0..steps steps (`adapt_states` without the states)."""
    return (weights for weights, _ in adapt_states(model, kind, fast, x, y, **options))


def adapt(model: nn.Module, kind: str, fast: Params, x: Tensor, y: Tensor, **options: Any) -> Params:
    """The per-task fast weights after `steps` steps (the last of `adapt_trajectory`)."""
    *_, (last, _) = adapt_states(model, kind, fast, x, y, **options)
    return last
