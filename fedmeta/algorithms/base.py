"""What every algorithm offers: a client part, an evaluation curve, and fresh parameters.

The server part is the same for all of them (`fedmeta.round.apply_round`): each client returns a descent
direction averaged over its tasks, the server averages directions weighted by task count and hands the mean
to its outer optimizer. Algorithms differ only in the direction they compute and in how they adapt.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from fedmeta import batched
from fedmeta.batched import TaskBatch
from fedmeta.functional import (
    SGD,
    InnerLR,
    InnerOptimizer,
    StepOverrides,
    adapt_trajectory,
    forward,
    loss_fn_for,
    metric_for,
    tree_mean,
)
from fedmeta.models import init_params
from fedmeta.types import ClientUpdate, Params, Task

# Tasks per vectorised call on a CPU when the chunk is automatic: measured fastest for Conv4 on Omniglot
# (larger chunks leave the caches; benchmarks/RESULTS.md) - at least 8 tasks, and as many more as hold no
# more input values than 8 Omniglot 5-way 1-shot episodes (so a cohort of tiny sinusoid tasks is one call).
CPU_TASK_CHUNK = 8
CPU_CHUNK_VALUES = CPU_TASK_CHUNK * 80 * 28 * 28


class Algorithm(ABC):
    """Base class; subclasses implement `task_direction` and may override adaptation."""

    name: ClassVar[str]
    # "episodes": the client's local data arrives as few-shot tasks; "batches": as plain minibatches (FedAvg).
    data_kind: ClassVar[str] = "episodes"
    # The random stream a client's local data is drawn from (`fedmeta.tasks.task_rng`).
    data_stream: ClassVar[str] = "meta-data"
    # Metric-based methods learn an embedding: the model has no classification head.
    embedding_only: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str,
        inner_lr: float,
        inner_steps: int,
        batched: bool = True,
        task_chunk: int = 0,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        inner_optimizer: InnerOptimizer = SGD,
    ) -> None:
        self.model = model
        self.kind = kind
        self.loss_fn = loss_fn_for(kind)
        self.metric_name, self.metric_fn = metric_for(kind)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.inner_optimizer = inner_optimizer
        # How the client part is computed (not what): batched (the default) or the per-task reference loop.
        self.batched = batched
        self.task_chunk = task_chunk
        self.device = torch.device(device)
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision

    def at_round(self, round_index: int) -> Algorithm:
        """This algorithm as it trains in round `round_index` (0-based); most do not depend on the round."""
        return self

    # -- parameters -------------------------------------------------------------------------------------
    def init_params(self, generator: torch.Generator) -> Params:
        """Fresh meta-parameters (model weights, plus any learned extras such as Meta-SGD's rates)."""
        return init_params(self.model, generator)

    # -- client part ------------------------------------------------------------------------------------
    @abstractmethod
    def task_direction(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        """Descent direction for one task, and that task's metrics (the per-task reference)."""

    @abstractmethod
    def batch_direction(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """The batched client part: the *sum* of the tasks' directions, and each task's metrics, shape (T,)."""

    def client_update(self, params: Params, tasks: Sequence[Task]) -> ClientUpdate:
        """The client part: mean direction over the client's tasks, with the task count and mean metrics.

        Batched by default (tasks in vectorised chunks on `self.device`); `batched=False` runs the per-task
        reference loop. Both return the direction on the CPU, in the dtype of `params`.
        """
        if not tasks:
            raise ValueError("client_update needs at least one task")
        alike = self._stack_alike([tasks])
        if alike is not None:  # a cohort of one: the same computation as in any cohort, the same bits
            directions, metrics = self._cohort_directions(params, alike, clients=1, per_client=len(tasks))
            return ClientUpdate(
                {k: v[0] for k, v in directions.items()}, len(tasks), {k: v[0] for k, v in metrics.items()}
            )
        device_params = self._to_device(params)
        if not self.batched:
            results = [self.task_direction(device_params, self._task_to_device(task)) for task in tasks]
            directions, metrics = zip(*results, strict=True)
            mean_metrics = {k: float(sum(m[k] for m in metrics) / len(metrics)) for k in metrics[0]}
            direction = self._to_host(tree_mean(list(directions)), params)
            return ClientUpdate(direction=direction, num_tasks=len(tasks), metrics=mean_metrics)
        total: Params = {}
        per_task: dict[str, list[Tensor]] = {}
        for chunk in self._chunks(tasks):
            with self._precision():
                direction_sum, chunk_metrics = self.batch_direction(device_params, chunk)
            total = direction_sum if not total else {k: total[k] + direction_sum[k] for k in total}
            for name, values in chunk_metrics.items():
                per_task.setdefault(name, []).append(values.detach().double())
        direction = self._to_host({k: v / len(tasks) for k, v in total.items()}, params)
        # One transfer for every metric (no host synchronisation per task).
        means = torch.stack([torch.cat(v).mean() for v in per_task.values()]).tolist()
        return ClientUpdate(direction=direction, num_tasks=len(tasks), metrics=dict(zip(per_task, means, strict=True)))

    # -- cohorts: many clients' parts in one call ----------------------------------------------------------
    # Whether `task_directions` gives each task's own direction, so that a cohort of clients is one vectorised
    # computation; otherwise a cohort is a loop over its clients (the same updates, no faster).
    has_task_directions: ClassVar[bool] = False

    def task_directions(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """Each task's own direction, stacked (T, ...), and each task's metrics (T,)."""
        raise NotImplementedError(f"{self.name} has no per-task directions; use batch_direction")

    def cohort_update(
        self, params: Params, tasks_by_client: Sequence[Sequence[Task]]
    ) -> tuple[Params, dict[str, tuple[float, ...]]]:
        """The client parts of several clients: their directions stacked (clients, ...) on the CPU, and each
        client's metrics. Every client's row equals its own `client_update`: with per-task directions the
        cohort's tasks go through the vectorised engine together (a client's own update is a cohort of one,
        so both take the same computation), otherwise the clients are computed one after another."""
        if not tasks_by_client or not all(tasks_by_client):
            raise ValueError("a cohort needs at least one client, each with at least one task")
        alike = self._stack_alike(tasks_by_client)
        if alike is None:
            updates = [self.client_update(params, tasks) for tasks in tasks_by_client]
            return (
                {k: torch.stack([u.direction[k] for u in updates]) for k in updates[0].direction},
                {name: tuple(u.metrics[name] for u in updates) for name in updates[0].metrics},
            )
        return self._cohort_directions(params, alike, clients=len(tasks_by_client), per_client=len(tasks_by_client[0]))

    def _cohort_directions(
        self, params: Params, alike: TaskBatch, *, clients: int, per_client: int
    ) -> tuple[Params, dict[str, tuple[float, ...]]]:
        """`cohort_update` of `clients` clients whose `per_client` tasks each are stacked in `alike`, client by
        client: through `task_directions` in chunks of whole clients, then each client's mean."""
        device_params = self._to_device(params)
        parts: list[Params] = []
        per_task: dict[str, list[Tensor]] = {}
        # Chunks of whole clients, so that a chunk never mixes parts of a client with other clients' tasks.
        first = Task(alike.support_x[0], alike.support_y[0], alike.query_x[0], alike.query_y[0])
        clients_per_chunk = max(1, self._chunk_size(len(alike), first) // per_client)
        for chunk in alike.chunks(clients_per_chunk * per_client):
            with self._precision():
                directions, chunk_metrics = self.task_directions(device_params, chunk)
            parts.append({k: v.detach() for k, v in directions.items()})
            for name, values in chunk_metrics.items():
                per_task.setdefault(name, []).append(values.detach().double())
        if per_client == 1:  # each row is its client's direction already
            stacked = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        else:
            stacked = {
                k: torch.cat([part[k] for part in parts]).view(clients, per_client, *params[k].shape).sum(1)
                / per_client
                for k in parts[0]
            }
        metrics = {name: torch.cat(v).view(clients, per_client).mean(1).tolist() for name, v in per_task.items()}
        return self._to_host(stacked, params), {name: tuple(v) for name, v in metrics.items()}

    def _stack_alike(self, tasks_by_client: Sequence[Sequence[Task]]) -> TaskBatch | None:
        """These clients' tasks stacked on the device if they go through `task_directions` together (per-task
        directions, the batched engine, one task count and one task shape for all), else None."""
        if not (self.has_task_directions and self.batched):
            return None
        if any(len(tasks) != len(tasks_by_client[0]) for tasks in tasks_by_client):
            return None
        return TaskBatch.stack_alike([task for tasks in tasks_by_client for task in tasks], self.device)

    # -- compute placement --------------------------------------------------------------------------------
    def _chunk_size(self, num_tasks: int, task: Task) -> int:
        if self.task_chunk > 0:
            return self.task_chunk
        if self.device.type != "cpu":
            return num_tasks
        values = task.support_x.numel() + task.query_x.numel()
        return max(CPU_TASK_CHUNK, CPU_CHUNK_VALUES // max(values, 1))

    def _chunks(self, tasks: Sequence[Task]) -> Iterator[TaskBatch]:
        """The tasks stacked, moved to the device once, and cut into chunks of at most `task_chunk` tasks."""
        return TaskBatch.stack(tasks, self.device).chunks(self._chunk_size(len(tasks), tasks[0]))

    def _precision(self) -> contextlib.AbstractContextManager[None]:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, params: Params) -> Params:
        return {k: v.to(self.device, non_blocking=True) for k, v in params.items()}

    def _task_to_device(self, task: Task) -> Task:
        if self.device.type == "cpu":
            return task
        return Task(
            *(
                t.to(self.device, non_blocking=True)
                for t in (task.support_x, task.support_y, task.query_x, task.query_y)
            )
        )

    @staticmethod
    def _to_host(direction: Params, like: Params) -> Params:
        return {k: v.detach().to("cpu", like[k].dtype if k in like else v.dtype) for k, v in direction.items()}

    # -- adaptation and evaluation ----------------------------------------------------------------------
    def model_params(self, params: Params) -> Params:
        """The entries of `params` that are model weights (all of them, unless the algorithm adds extras)."""
        return params

    def adaptation_lr(self, params: Params) -> InnerLR:
        return self.inner_lr

    def fixed_rate_refusal(self, params: Params) -> str | None:
        """Why adaptation does not step at the fixed `inner_lr` (so another rate means nothing), or None when it
        does: `fedmeta evaluate --inner-lr` asks this before evaluating a checkpoint at another rate."""
        if self.embedding_only:
            return "it classifies by comparing embeddings, with no inner loop"
        if not isinstance(self.adaptation_lr(params), int | float):
            return "its inner learning rates are learned meta-parameters, saved in the checkpoint"
        return None

    def adapt_keys(self, params: Params) -> set[str] | None:
        return None  # all parameters

    def adaptation_state(self, params: Params) -> Params | None:
        """The inner optimizer's state that adaptation starts from (Reptile's carried Adam); None: fresh."""
        return None

    def step_overrides(self, params: Params) -> StepOverrides | None:
        """Entries that replace the fast weights' in step s's forward (MAML++'s per-step batch norm); none here."""
        return None

    def _trajectory(self, params: Params, task: Task, steps: int, *, first_order: bool = False) -> Iterator[Params]:
        """Fast weights after 0..steps inner steps on the support set, each with its step's overrides applied
        (differentiable when called under an outer `grad`)."""
        weights = self.model_params(params)
        overrides = self.step_overrides(params)
        trajectory = adapt_trajectory(
            self.model,
            self.loss_fn,
            weights,
            task.support_x,
            task.support_y,
            steps=steps,
            inner_lr=self.adaptation_lr(params),
            adapt_keys=self.adapt_keys(weights),
            optimizer=self.inner_optimizer,
            overrides=overrides,
            first_order=first_order,
            carried=self.adaptation_state(params),
        )
        for step, fast in enumerate(trajectory):
            yield fast if overrides is None else {**fast, **overrides(step)}

    def predict_curve(self, params: Params, task: Task, steps: int) -> list[Tensor]:
        """Query predictions after 0..steps adaptation steps on the support set."""
        return [forward(self.model, fast, task.query_x).detach() for fast in self._trajectory(params, task, steps)]

    def evaluate_curve(self, params: Params, task: Task, steps: int) -> list[float]:
        """The query metric (accuracy or MSE) after 0..steps adaptation steps on the support set."""
        return [float(self.metric_fn(pred, task.query_y)) for pred in self.predict_curve(params, task, steps)]

    def batch_predictions(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Tensor]:
        """Query predictions (T, n_query, ...) after 0..steps adaptation steps, all tasks at once."""
        weights = self.model_params(params)
        trajectory = batched.adapt_trajectory(
            self.model,
            self.kind,
            batched.per_task(weights, len(batch)),
            batch.support_x,
            batch.support_y,
            steps=steps,
            inner_lr=self.adaptation_lr(params),
            adapt_keys=self.adapt_keys(weights),
            optimizer=self.inner_optimizer,
            carried=self.adaptation_state(params),
        )
        for fast in trajectory:
            yield batched.batched_forward(self.model, fast, batch.query_x).detach()

    def evaluate_curves(self, params: Params, tasks: Sequence[Task], steps: int) -> np.ndarray:
        """Metric after 0..steps adaptation steps for each task: array (tasks, steps + 1).

        Batched like `client_update` (the per-task `evaluate_curve` with `batched=False`).
        """
        device_params = self._to_device(params)
        if not self.batched:
            return np.array([self.evaluate_curve(device_params, self._task_to_device(t), steps) for t in tasks])
        curves = []
        for chunk in self._chunks(tasks):
            with self._precision():
                predictions = self.batch_predictions(device_params, chunk, steps)
                curves.append(
                    torch.stack(
                        [batched.task_metrics(self.kind, batched.at_least_fp32(p), chunk.query_y) for p in predictions],
                        1,
                    )
                )
        return torch.cat(curves).double().cpu().numpy()

    def transfer(self, pretrained: Params, fresh: Params) -> Params:
        """Meta-parameters made from a conventionally trained model (the FedAvg baseline).

        Every entry of `pretrained` whose name and shape match is kept; the rest comes from `fresh`. For
        classification the FedAvg head spans the global label space while episodes use `ways` local labels, so
        the head is fresh; for regression the whole model carries over.
        """
        return {k: pretrained[k] if k in pretrained and pretrained[k].shape == v.shape else v for k, v in fresh.items()}

    def _batch_metrics(self, losses: Tensor, predictions: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Per-task metrics (T,) of a batch: the same names as `_metrics`."""
        return {
            "query_loss": losses,
            f"query_{self.metric_name}": batched.task_metrics(self.kind, batched.at_least_fp32(predictions), y),
        }

    def _metrics(self, loss: Tensor, logits: Tensor, y: Tensor) -> dict[str, float]:
        return {"query_loss": float(loss), f"query_{self.metric_name}": float(self.metric_fn(logits.detach(), y))}


class SequentialLocal(Algorithm):
    """A client part that is one sequence of local steps over the tasks, each starting where the last ended
    (FedAvg, Per-FedAvg): nothing to batch. The direction is `params - local` after the last step."""

    @abstractmethod
    def local_step(self, local: Params, task: Task) -> tuple[Params, dict[str, float]]:
        """The local weights after one step on `task`, and that step's metrics."""

    def client_update(self, params: Params, tasks: Sequence[Task]) -> ClientUpdate:
        if not tasks:
            unit = "minibatch" if self.data_kind == "batches" else "task"
            raise ValueError(f"client_update needs at least one {unit}")
        start = self._to_device(params)
        local = start
        metrics = []
        for task in map(self._task_to_device, tasks):
            local, step_metrics = self.local_step(local, task)
            metrics.append(step_metrics)
        mean_metrics = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
        direction = self._to_host({k: start[k] - local[k] for k in start}, params)
        return ClientUpdate(direction=direction, num_tasks=len(tasks), metrics=mean_metrics)

    def task_direction(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        raise NotImplementedError(f"{self.name}'s local work is a sequence over the tasks; use client_update")

    def batch_direction(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        raise NotImplementedError(f"{self.name}'s local work is a sequence over the tasks; use client_update")
