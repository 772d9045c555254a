"""The inner loop's update rules (Reptile's Adam, minibatches) and training shots (issue #10)."""

from __future__ import annotations

import pytest
import torch

from fedmeta.algorithms import ALGORITHMS
from fedmeta.config import ConfigError, RunConfig
from fedmeta.experiment import Experiment
from fedmeta.functional import InnerOptimizer, adapt_trajectory
from fedmeta.models import SinusoidMLP, init_params
from tests.conftest import double_task, record_training_tasks, to_double
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
    algorithm = experiment.algorithm
    seen = record_training_tasks(algorithm)
    experiment.client_update(experiment.initial_params(), 0, 0)

    assert [(t.support_x.shape[0], t.query_x.shape[0]) for t in seen] == [(7, 0)] * config.federation.tasks_per_client
    assert algorithm.inner_optimizer == InnerOptimizer("adam", batch=5)
    assert experiment.eval_kwargs()["shots"] == 2


def _adam_reference(model, params, tasks, steps: int, lr: float) -> list[dict[str, torch.Tensor]]:
    """torch.optim.Adam (beta1 0) whose state runs on across tasks while the weights are restored between
    them (openai/supervised-reptile): each task's final weights."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    reference = torch.optim.Adam(leaves.values(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    finals = []
    for task in tasks:
        with torch.no_grad():
            for k in leaves:
                leaves[k].copy_(params[k])
        for _ in range(steps):
            reference.zero_grad()
            out = torch.func.functional_call(model, leaves, (task.support_x,))
            torch.nn.functional.mse_loss(out, task.support_y).backward()
            reference.step()
        finals.append({k: v.detach().clone() for k, v in leaves.items()})
    return finals


def test_carried_adam_state_continues_torch_adam_across_tasks() -> None:
    from fedmeta.functional import WEIGHT, adapt_states

    model = SinusoidMLP(hidden=8).double()
    params = to_double(init_params(model, torch.Generator().manual_seed(4)))
    tasks = [double_task(seed, shots=10) for seed in (5, 6, 7)]
    inner = InnerOptimizer("adam")
    expected = _adam_reference(model, params, tasks, steps=3, lr=0.01)

    carried = None
    for task, want in zip(tasks, expected, strict=True):
        *_, (fast, state) = adapt_states(
            model, torch.nn.functional.mse_loss, params, task.support_x, task.support_y,
            steps=3, inner_lr=0.01, optimizer=inner, carried=carried,
        )  # fmt: skip
        for k in params:
            torch.testing.assert_close(fast[k], want[k], atol=1e-12, rtol=1e-10)
        carried = {f"v.{k}": state[k] for k in params} | {
            WEIGHT: state.get(WEIGHT, torch.tensor([1 - 0.999**3], dtype=torch.float64))
        }
    assert carried[WEIGHT].item() == pytest.approx(1 - 0.999**9, rel=1e-12)  # the running bias correction
    # A noised state below zero is read as zero.
    negative = {f"v.{k}": -torch.ones_like(v) for k, v in params.items()} | {WEIGHT: torch.tensor([-0.5])}
    assert all((v == 0).all() for k, v in inner.init(params, list(params), negative).items())


def _carrying_reptile(batched: bool, **kw):
    from fedmeta.models import Conv4

    return ALGORITHMS["reptile"](
        Conv4(3, channels=4),
        kind="classification",
        inner_lr=0.01,
        inner_steps=3,
        inner_optimizer=InnerOptimizer("adam", batch=4),
        batched=batched,
        task_chunk=2,
        carry_state=True,
        **kw,
    )


def test_reptile_with_carried_state_starts_like_fresh_adam_and_returns_the_state_it_reached() -> None:
    from fedmeta.algorithms.reptile import STATE_PREFIX
    from fedmeta.functional import adapt_states

    algo = _carrying_reptile(batched=False)
    params = to_double(algo.init_params(torch.Generator().manual_seed(8)))
    weights = algo.model_params(params)
    assert set(params) - set(weights) == {f"{STATE_PREFIX}v.{k}" for k in weights} | {f"{STATE_PREFIX}weight"}
    fresh = ALGORITHMS["reptile"](
        algo.model, kind="classification", inner_lr=0.01, inner_steps=3, inner_optimizer=algo.inner_optimizer
    )
    tasks = image_tasks(3, seed=9)

    update = algo.client_update(params, tasks)
    # From zero state the weights move as with Adam's fresh state (1e-8: the conv biases before batch norm have
    # round-off gradients, see above).
    for k, v in fresh.client_update(weights, tasks).direction.items():
        torch.testing.assert_close(update.direction[k], v, atol=1e-8, rtol=0)
    # The state entries' direction is held - mean(final): an outer SGD step of 1 lands on the tasks' mean state.
    finals = [
        list(adapt_states(
            algo.model, algo.loss_fn, weights, torch.cat([t.support_x, t.query_x]), torch.cat([t.support_y, t.query_y]),
            steps=3, inner_lr=0.01, optimizer=algo.inner_optimizer, carried=algo.adaptation_state(params),
        ))[-1][1]
        for t in tasks
    ]  # fmt: skip
    for k in weights:
        mean_v = torch.stack([f[k] for f in finals]).mean(0)
        torch.testing.assert_close(params[f"{STATE_PREFIX}v.{k}"] - update.direction[f"{STATE_PREFIX}v.{k}"], mean_v)
    stepped = params[f"{STATE_PREFIX}weight"] - update.direction[f"{STATE_PREFIX}weight"]
    assert stepped.item() == pytest.approx(1 - 0.999**3, rel=1e-12)


def test_reptile_with_carried_state_batched_equals_the_reference_in_training_and_evaluation() -> None:
    from fedmeta.algorithms.reptile import STATE_PREFIX

    params = to_double(_carrying_reptile(False).init_params(torch.Generator().manual_seed(10)))
    # A state some tasks have built (and a negative entry, as noise may leave: read as zero).
    params = {
        k: (torch.rand(v.shape, generator=torch.Generator().manual_seed(11), dtype=v.dtype) * 1e-3 - 1e-4)
        if k.startswith(f"{STATE_PREFIX}v.")
        else v
        for k, v in params.items()
    }
    params[f"{STATE_PREFIX}weight"] = torch.tensor([0.02], dtype=torch.float64)
    tasks = image_tasks(3, seed=12)
    batched, reference = _carrying_reptile(True), _carrying_reptile(False)

    assert_updates_equal(batched.client_update(params, tasks), reference.client_update(params, tasks), atol=1e-8)
    curves = batched.evaluate_curves(params, tasks, 3)
    torch.testing.assert_close(
        torch.from_numpy(curves), torch.from_numpy(reference.evaluate_curves(params, tasks, 3)), atol=1e-10, rtol=0
    )
    # Evaluation adapts from the carried state: with a state of large second moments the steps are tiny, so the
    # first adapted predictions differ from fresh Adam's (whose first step is lr x sign(gradient)).
    large = {k: torch.full_like(v, 1e3) if k.startswith(f"{STATE_PREFIX}v.") else v for k, v in params.items()}
    task = tasks[0]
    carried_pred = reference.predict_curve(large, task, 1)
    fresh = ALGORITHMS["reptile"](
        reference.model, kind="classification", inner_lr=0.01, inner_steps=3, inner_optimizer=reference.inner_optimizer
    )
    fresh_pred = fresh.predict_curve(reference.model_params(large), task, 1)
    torch.testing.assert_close(carried_pred[0], fresh_pred[0])  # the same weights before any step
    moved = lambda preds: (preds[1] - preds[0]).abs().max().item()  # noqa: E731
    assert moved(carried_pred) < moved(fresh_pred) / 10


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "reference"])
def test_reptile_scores_the_adapted_weights_on_the_last_inner_minibatch(batched: bool) -> None:
    from fedmeta.functional import adapt, forward

    algorithm = _carrying_reptile(batched)
    params = to_double(algorithm.init_params(torch.Generator().manual_seed(13)))
    task = image_tasks(1, seed=14)[0]
    x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
    weights = algorithm.model_params(params)
    fast = adapt(
        algorithm.model, torch.nn.functional.cross_entropy, weights, x, y, steps=3, inner_lr=0.01,
        optimizer=algorithm.inner_optimizer, carried=algorithm.adaptation_state(params),
    )  # fmt: skip
    parts = -(-len(y) // 4)  # minibatches of about 4: step 3 (0-based 2) takes examples 2, 2 + parts, ...
    last = torch.arange(2 % parts, len(y), parts)
    logits = forward(algorithm.model, fast, x[last])

    metrics = algorithm.client_update(params, [task]).metrics

    assert metrics["query_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y[last]).item(), rel=1e-8)
    assert metrics["query_accuracy"] == pytest.approx((logits.argmax(1) == y[last]).double().mean().item(), abs=1e-12)


@pytest.mark.parametrize(
    "changes",
    [{"algorithm": "fomaml"}, {"outer.optimizer": "adam"}, {"inner.inner_optimizer": "sgd"}],
    ids=["fomaml", "outer-adam", "inner-sgd"],
)
def test_carried_adam_state_is_refused_where_it_has_no_meaning(changes: dict[str, str]) -> None:
    recipe = {
        "algorithm": "reptile",
        "inner.inner_optimizer": "adam",
        "inner.adam_state": "carried",
        "outer.optimizer": "sgd",
        "outer.outer_lr": 1.0,
    }
    RunConfig().replace(**recipe)  # valid as it stands
    with pytest.raises(ConfigError, match="adam_state 'carried' needs algorithm reptile"):
        RunConfig().replace(**(recipe | changes))
