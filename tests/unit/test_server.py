"""The server part: outer optimizers against torch.optim, task-weighted aggregation against numpy,
rejection of bad updates, and the Reptile degenerate case."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from fedmeta.algorithms import Reptile
from fedmeta.functional import adapt
from fedmeta.models import SinusoidMLP, init_params
from fedmeta.round import apply_round, init_state
from fedmeta.server_opt import OuterOptimizer
from fedmeta.types import ClientUpdate
from tests.conftest import double_task, to_double


def params_like(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)}


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_outer_optimizer_matches_torch_optim_over_many_steps(name: str) -> None:
    params = params_like(0)
    directions = [params_like(s) for s in range(1, 8)]
    optimizer = OuterOptimizer(name, lr=0.01)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    reference = (
        torch.optim.Adam(leaves.values(), lr=0.01, betas=(0.9, 0.999), eps=1e-8)
        if name == "adam"
        else torch.optim.SGD(leaves.values(), lr=0.01)
    )

    state = optimizer.init(params)
    for direction in directions:
        params, state = optimizer.step(params, direction, state)
        for k, leaf in leaves.items():
            leaf.grad = direction[k].clone()
        reference.step()

    for k in params:
        torch.testing.assert_close(params[k], leaves[k].detach(), rtol=1e-6, atol=1e-7)
    assert state["step"] == len(directions)


def test_adam_state_persists_across_rounds() -> None:
    # Two rounds with the same direction: a fresh Adam each round would take two identical steps of size lr.
    optimizer = OuterOptimizer("adam", lr=0.1)
    state = init_state(params_like(0), optimizer)
    update = ClientUpdate(direction=params_like(1), num_tasks=1)
    first, _ = apply_round(state, [("c", update)], optimizer)
    second, _ = apply_round(first, [("c", update)], optimizer)
    assert second.opt_state["step"] == 2
    torch.testing.assert_close(second.opt_state["exp_avg"]["a"], (1 - 0.9**2) * update.direction["a"])


def test_aggregation_is_weighted_by_task_count() -> None:
    params = params_like(0)
    updates = [(f"c{i}", ClientUpdate(direction=params_like(10 + i), num_tasks=n)) for i, n in enumerate([1, 3, 6])]
    optimizer = OuterOptimizer("sgd", lr=1.0)

    state, metrics = apply_round(init_state(params, optimizer), updates, optimizer)

    for k in params:
        mean = (
            sum(n * u.direction[k].numpy().astype(np.float64) for n, (_, u) in zip([1, 3, 6], updates, strict=True))
            / 10
        )
        np.testing.assert_allclose(state.params[k].numpy(), params[k].numpy() - mean, rtol=1e-5, atol=1e-6)
    assert metrics["clients"] == 3 and metrics["tasks"] == 10 and state.round == 1


def test_result_does_not_depend_on_reply_order() -> None:
    optimizer = OuterOptimizer("adam", lr=0.01)
    updates = [(f"c{i}", ClientUpdate(direction=params_like(20 + i), num_tasks=i + 1)) for i in range(6)]
    shuffled = updates[:]
    random.Random(0).shuffle(shuffled)

    a, _ = apply_round(init_state(params_like(0), optimizer), updates, optimizer)
    b, _ = apply_round(init_state(params_like(0), optimizer), shuffled, optimizer)

    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda d: {**d, "a": torch.full_like(d["a"], float("nan"))}, "NaN or Inf"),
        (lambda d: {**d, "a": torch.full_like(d["a"], float("inf"))}, "NaN or Inf"),
        (lambda d: {**d, "a": d["a"][:2]}, "expected"),
        (lambda d: {**d, "a": d["a"].double()}, "expected"),
        (lambda d: {"a": d["a"]}, "missing"),
        (lambda d: {**d, "zzz": d["a"]}, "extra"),
    ],
)
def test_bad_updates_are_rejected_logged_and_never_reach_the_parameters(corrupt, reason, caplog) -> None:
    optimizer = OuterOptimizer("sgd", lr=1.0)
    good = ClientUpdate(direction=params_like(1), num_tasks=2)
    bad = ClientUpdate(direction=corrupt(params_like(2)), num_tasks=5)
    state = init_state(params_like(0), optimizer)

    with caplog.at_level(logging.WARNING):
        new, metrics = apply_round(state, [("good", good), ("bad", bad)], optimizer)
    expected, _ = apply_round(state, [("good", good)], optimizer)

    assert metrics["rejected"] == 1 and metrics["clients"] == 1
    assert all(torch.equal(new.params[k], expected.params[k]) for k in new.params)
    assert "client bad" in caplog.text and reason in caplog.text


def test_a_round_with_no_acceptable_update_keeps_the_parameters() -> None:
    optimizer = OuterOptimizer("adam", lr=0.1)
    state = init_state(params_like(0), optimizer)
    nan = ClientUpdate(direction={k: torch.full_like(v, float("nan")) for k, v in params_like(1).items()}, num_tasks=1)

    new, metrics = apply_round(state, [("x", nan)], optimizer)
    empty, _ = apply_round(state, [], optimizer)

    assert metrics["clients"] == 0 and new.round == 1 and empty.round == 1
    assert all(torch.equal(new.params[k], state.params[k]) for k in state.params)
    assert new.opt_state["step"] == 0


def test_reptile_with_outer_lr_one_and_one_client_gives_that_clients_adapted_weights() -> None:
    model = SinusoidMLP(hidden=8)
    params = to_double(init_params(model, torch.Generator().manual_seed(0)))
    task = double_task(0)
    algo = Reptile(model, kind="regression", inner_lr=0.05, inner_steps=3)
    optimizer = OuterOptimizer("sgd", lr=1.0)

    state, _ = apply_round(init_state(params, optimizer), [("only", algo.client_update(params, [task]))], optimizer)

    x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
    adapted = adapt(model, algo.loss_fn, params, x, y, steps=3, inner_lr=0.05)
    for k in params:
        torch.testing.assert_close(state.params[k], adapted[k], rtol=0, atol=1e-12)
