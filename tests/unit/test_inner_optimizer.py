"""The inner loop's update rules (Reptile's Adam, minibatches) and training shots (issue #10)."""

from __future__ import annotations

import pytest
import torch

from fedmeta.algorithms import ALGORITHMS
from fedmeta.config import ConfigError, RunConfig
from fedmeta.experiment import Experiment
from fedmeta.functional import InnerOptimizer, adapt_trajectory
from fedmeta.models import SinusoidMLP, init_params
from tests.conftest import double_task, to_double
from tests.unit.test_batched import assert_updates_equal, image_tasks


def test_inner_adam_equals_torch_adam_step_by_step() -> None:
    model = SinusoidMLP(hidden=8).double()
    params = to_double(init_params(model, torch.Generator().manual_seed(0)))
    task = double_task(0, shots=12)
    inner = InnerOptimizer("adam", beta1=0.0)

    ours = list(
        adapt_trajectory(
            model,
            torch.nn.functional.mse_loss,
            params,
            task.support_x,
            task.support_y,
            steps=4,
            inner_lr=0.01,
            optimizer=inner,
        )
    )

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    reference = torch.optim.Adam(leaves.values(), lr=0.01, betas=(0.0, 0.999), eps=1e-8)
    for step in range(1, 5):
        reference.zero_grad()
        loss = torch.nn.functional.mse_loss(
            torch.func.functional_call(model, leaves, (task.support_x,)), task.support_y
        )
        loss.backward()
        reference.step()
        for k in params:
            torch.testing.assert_close(ours[step][k], leaves[k].detach(), atol=1e-12, rtol=1e-10)


def test_minibatches_are_strided_parts_that_cycle() -> None:
    x, y = torch.arange(25).view(25, 1), torch.arange(25)
    inner = InnerOptimizer(batch=10)  # ceil(25 / 10) = 3 parts: 0::3, 1::3, 2::3

    parts = [inner.minibatch(x, y, step, dim=0)[1].tolist() for step in range(4)]

    assert parts[0] == list(range(0, 25, 3)) and parts[1] == list(range(1, 25, 3)) and parts[2] == list(range(2, 25, 3))
    assert parts[3] == parts[0]
    assert InnerOptimizer(batch=0).minibatch(x, y, 5, dim=0)[1].tolist() == list(range(25))
    batched_x = torch.stack([x, x + 100])  # (tasks, examples, 1): the example axis is 1
    assert inner.minibatch(batched_x, batched_x[..., 0], 1, dim=1)[1][1].tolist() == [100 + i for i in range(1, 25, 3)]


def test_reptile_first_adam_step_is_sign_like() -> None:
    # beta1 = 0, step 1: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps).
    model = SinusoidMLP(hidden=8)
    params = to_double(init_params(model, torch.Generator().manual_seed(1)))
    task = double_task(1)
    algo = ALGORITHMS["reptile"](
        model, kind="regression", inner_lr=0.001, inner_steps=1, inner_optimizer=InnerOptimizer("adam")
    )

    pseudo_grad, _ = algo.task_direction(params, task)

    x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
    g = torch.func.grad(lambda p: torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (x,)), y))(params)
    for k in params:
        torch.testing.assert_close(pseudo_grad[k], 0.001 * g[k] / (g[k].abs() + 1e-8), atol=1e-14, rtol=1e-10)


@pytest.mark.parametrize("name", ["reptile", "fomaml"])
def test_adam_and_minibatches_batched_equal_the_reference(name: str) -> None:
    from fedmeta.models import Conv4

    model = Conv4(3, channels=4)
    inner = InnerOptimizer("adam", batch=4)
    make = lambda batched: ALGORITHMS[name](  # noqa: E731
        model,
        kind="classification",
        inner_lr=0.01,
        inner_steps=3,
        inner_optimizer=inner,
        batched=batched,
        task_chunk=2,
    )
    params = to_double(make(False).init_params(torch.Generator().manual_seed(2)))
    tasks = image_tasks(3, seed=3)

    # Adam divides by sqrt(v) + eps, so a gradient that is zero up to round-off (a conv bias before batch norm,
    # ~1e-17) becomes a step of up to ~1e-9 whose value depends on that round-off: 1e-8 absolute, not 1e-10.
    assert_updates_equal(make(True).client_update(params, tasks), make(False).client_update(params, tasks), atol=1e-8)
    torch.testing.assert_close(
        torch.from_numpy(make(True).evaluate_curves(params, tasks, 3)),
        torch.from_numpy(make(False).evaluate_curves(params, tasks, 3)),
        atol=1e-10,
        rtol=0,
    )


@pytest.mark.parametrize("name", ["maml", "anil", "metasgd"])
def test_second_order_methods_refuse_an_adam_inner_loop(name: str) -> None:
    with pytest.raises(ConfigError, match="is for first-order methods"):
        RunConfig().replace(**{"algorithm": name, "inner.inner_optimizer": "adam"})


def test_only_reptile_trains_without_queries() -> None:
    with pytest.raises(ConfigError, match="leaves fomaml no query set"):
        RunConfig().replace(**{"algorithm": "fomaml", "episode.train_queries": 0})


def test_training_episodes_use_train_shots_and_evaluation_keeps_shots() -> None:
    config = RunConfig().replace(
        **{
            "algorithm": "reptile",
            "episode.shots": 2,
            "episode.train_shots": 7,
            "episode.train_queries": 0,
            "episode.queries": 3,
            "inner.inner_optimizer": "adam",
            "inner.inner_batch": 5,
            "data.num_train_clients": 3,
            "federation.clients_per_round": 3,
            "data.num_unseen_clients": 2,
        }
    )
    experiment = Experiment.from_config(config)
    seen: list[int] = []
    algorithm = experiment.algorithm
    original = algorithm.cohort_update

    def spy(params, tasks_by_client):
        seen.extend((t.support_x.shape[0], t.query_x.shape[0]) for tasks in tasks_by_client for t in tasks)
        return original(params, tasks_by_client)

    algorithm.cohort_update = spy  # type: ignore[method-assign]
    experiment.client_update(experiment.initial_params(), 0, 0)

    assert seen == [(7, 0)] * config.federation.tasks_per_client
    assert algorithm.inner_optimizer == InnerOptimizer("adam", batch=5)
    assert experiment.eval_kwargs()["shots"] == 2
