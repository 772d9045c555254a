"""MAML++ (arXiv:1810.09502) options of MAML, each against an independent reference (issue #10)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedmeta.algorithms import MAML
from fedmeta.algorithms.maml import BN_PREFIX, LSLR_PREFIX, MamlPlusPlus
from fedmeta.config import ConfigError, RunConfig
from fedmeta.models import Conv4, SinusoidMLP
from tests.conftest import double_task, to_double
from tests.unit.test_algorithms import assert_close, finite_difference, hand_maml_grad, hand_mlp
from tests.unit.test_batched import assert_updates_equal, image_tasks

LR = 0.05


def mlp_maml(steps: int, plus: MamlPlusPlus, **kw: object) -> MAML:
    return MAML(SinusoidMLP(hidden=8), kind="regression", inner_lr=LR, inner_steps=steps, plus=plus, **kw)


def test_multi_step_loss_weights_follow_the_paper() -> None:
    plus = MamlPlusPlus(multi_step_loss=True, msl_anneal_rounds=10)

    assert plus.step_weights(5, 0) == pytest.approx([0, 0.2, 0.2, 0.2, 0.2, 0.2])
    # Half way: non-final 1/S - 0.5/S = 0.1; final 1/S + 0.5 (S-1)/S = 0.6.
    assert plus.step_weights(5, 5) == pytest.approx([0, 0.1, 0.1, 0.1, 0.1, 0.6])
    assert plus.step_weights(5, 9)[1] == pytest.approx(0.02)
    late = MamlPlusPlus(multi_step_loss=True, msl_anneal_rounds=100).step_weights(5, 99)
    assert late[1] == pytest.approx(0.03 / 5) and late[5] == pytest.approx(1 - 4 * 0.03 / 5)  # floored, capped
    assert plus.step_weights(5, 10) == [0, 0, 0, 0, 0, 1]  # annealed: the last step alone
    assert MamlPlusPlus().step_weights(3, 0) == [0, 0, 0, 1]


def hand_weighted_loss(p, task, lrs_by_step, weights):
    """sum_s w_s L_query(theta_s), with theta_s from s steps of SGD at lrs_by_step[s][key], by plain autograd."""
    fast = dict(p)
    total = weights[0] * torch.mean((hand_mlp(fast, task.query_x) - task.query_y) ** 2)
    for s in range(len(weights) - 1):
        loss = torch.mean((hand_mlp(fast, task.support_x) - task.support_y) ** 2)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {k: fast[k] - lrs_by_step[s][k] * g for k, g in zip(fast, grads, strict=True)}
        total = total + weights[s + 1] * torch.mean((hand_mlp(fast, task.query_x) - task.query_y) ** 2)
    return total


@pytest.mark.parametrize("engine", ["reference", "batched"])
def test_multi_step_loss_gradient_is_that_of_the_hand_written_weighted_sum(engine: str) -> None:
    plus = MamlPlusPlus(multi_step_loss=True, msl_anneal_rounds=4)
    algo = mlp_maml(3, plus).at_round(1)
    params = to_double(algo.init_params(torch.Generator().manual_seed(0)))
    task = double_task(0)

    direction = (
        algo.task_direction(params, task)[0] if engine == "reference" else algo.client_update(params, [task]).direction
    )

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    weights = plus.step_weights(3, 1)
    total = hand_weighted_loss(leaves, task, [dict.fromkeys(params, LR)] * 3, weights)
    expected = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values())), strict=True))
    assert_close(direction, expected)


@pytest.mark.parametrize("engine", ["reference", "batched"])
def test_learned_per_step_rates_get_the_finite_difference_gradient(engine: str) -> None:
    algo = mlp_maml(2, MamlPlusPlus(per_step_lr=True))
    params = to_double(algo.init_params(torch.Generator().manual_seed(1)))
    gen = torch.Generator().manual_seed(2)
    params = {
        k: v * (0.5 + torch.rand(v.shape, generator=gen, dtype=v.dtype)) if k.startswith(LSLR_PREFIX) else v
        for k, v in params.items()
    }  # unequal rates per layer and step
    assert params[LSLR_PREFIX + "head.weight"].shape == (2,)
    task = double_task(1)
    weights = {k: v for k, v in params.items() if not k.startswith(LSLR_PREFIX)}

    def query_loss(rates: dict[str, torch.Tensor]) -> float:
        by_step = [{k: rates[LSLR_PREFIX + k][s] for k in weights} for s in range(2)]
        leaves = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
        return float(hand_weighted_loss(leaves, task, by_step, [0, 0, 1]).detach())

    direction = (
        algo.task_direction(params, task)[0] if engine == "reference" else algo.client_update(params, [task]).direction
    )
    rates = {k: v for k, v in params.items() if k.startswith(LSLR_PREFIX)}

    assert_close({k: direction[k] for k in rates}, finite_difference(query_loss, rates), atol=1e-6, rtol=1e-4)


def test_derivative_order_annealing_is_first_order_then_second_order() -> None:
    algo = mlp_maml(2, MamlPlusPlus(first_order_rounds=3))
    params = to_double(algo.init_params(torch.Generator().manual_seed(3)))
    task = double_task(3)

    early = algo.at_round(2).task_direction(params, task)[0]
    late = algo.at_round(3).task_direction(params, task)[0]
    early_batched = algo.at_round(2).client_update(params, [task]).direction

    assert_close(early, hand_maml_grad(params, task, 2, LR, second_order=False))
    assert_close(early_batched, early)
    assert_close(late, hand_maml_grad(params, task, 2, LR, second_order=True))


def test_per_step_batch_norm_uses_row_s_at_step_s() -> None:
    model = Conv4(3, channels=4)
    algo = MAML(model, kind="classification", inner_lr=0.1, inner_steps=1, plus=MamlPlusPlus(per_step_bn=True))
    params = to_double(algo.init_params(torch.Generator().manual_seed(4)))
    bn = [k.removeprefix(BN_PREFIX) for k in params if k.startswith(BN_PREFIX)]
    assert len(bn) == 8 and params[BN_PREFIX + bn[0]].shape == (2, 4)  # 4 layers x (weight, bias); steps + 1 rows
    gen = torch.Generator().manual_seed(5)
    params = {
        k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if k.startswith(BN_PREFIX) else v
        for k, v in params.items()
    }  # rows differ
    (task,) = image_tasks(1, seed=6)

    predicted = algo.predict_curve(params, task, 1)[1]

    weights = {k: v for k, v in params.items() if not k.startswith(BN_PREFIX)}
    row = lambda s: {k: params[BN_PREFIX + k][s] for k in bn}  # noqa: E731
    loss = lambda w: F.cross_entropy(functional_call(model, {**w, **row(0)}, (task.support_x,)), task.support_y)  # noqa: E731
    g = torch.func.grad(loss)(weights)
    fast = {k: weights[k] - 0.1 * g[k] for k in weights}
    expected = functional_call(model, {**fast, **row(1)}, (task.query_x,))
    torch.testing.assert_close(predicted, expected, atol=1e-12, rtol=1e-10)


def test_every_maml_plus_plus_option_batched_equals_the_reference() -> None:
    plus = MamlPlusPlus(multi_step_loss=True, msl_anneal_rounds=10, per_step_lr=True, per_step_bn=True)
    make = lambda batched: MAML(  # noqa: E731
        Conv4(3, channels=4),
        kind="classification",
        inner_lr=0.1,
        inner_steps=2,
        plus=plus,
        batched=batched,
        task_chunk=2,
    ).at_round(3)
    params = to_double(make(False).init_params(torch.Generator().manual_seed(7)))
    tasks = image_tasks(3, seed=8)

    reference, batched = make(False), make(True)
    assert_updates_equal(batched.client_update(params, tasks), reference.client_update(params, tasks))
    torch.testing.assert_close(
        torch.from_numpy(batched.evaluate_curves(params, tasks, 3)),
        torch.from_numpy(reference.evaluate_curves(params, tasks, 3)),
        atol=1e-10,
        rtol=0,
    )


def test_maml_plus_plus_options_belong_to_maml() -> None:
    with pytest.raises(ConfigError, match="apply to algorithm 'maml', not 'reptile'"):
        RunConfig().replace(**{"maml.per_step_lr": True})
    RunConfig().replace(**{"algorithm": "maml", "maml.per_step_lr": True, "maml.msl_anneal_rounds": 7})
    RunConfig().replace(**{"maml.msl_anneal_rounds": 7})  # an inert value alone is not an option in use
