"""Every algorithm against an independent reference: finite differences, a hand-unrolled autograd network,
closed-form linear-regression formulas in numpy, and a hand-computed ProtoNet."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedmeta.algorithms import ANIL, FOMAML, MAML, FedRep, MetaSGD, PerFedAvg, PerFedAvgHF, ProtoNet, Reptile
from fedmeta.algorithms.matching import FCE_PREFIX, MatchingNet, matching_log_probs
from fedmeta.algorithms.meta_lstm import MetaLSTM, lstm_step
from fedmeta.algorithms.protonet import prototype_logits
from fedmeta.algorithms.relation import RelationNet, relation_loss, relation_scores
from fedmeta.algorithms.siamese import Siamese, class_logits, pair_logits, verification_loss
from fedmeta.config import ConfigError, RunConfig
from fedmeta.models import Conv4, SinusoidMLP, init_params
from fedmeta.types import Task
from tests.conftest import double_task, to_double

INNER_LR = 0.05


@pytest.fixture(params=["reference", "batched"])
def engine(request: pytest.FixtureRequest) -> str:
    """Every reference check runs on the per-task path and on the batched engine (a batch of one task)."""
    return request.param


def direction_of(algo, params: dict[str, torch.Tensor], task: Task, engine: str) -> dict[str, torch.Tensor]:
    if engine == "reference":
        return algo.task_direction(params, task)[0]
    return algo.client_update(params, [task]).direction


def mlp_params(seed: int = 0) -> dict[str, torch.Tensor]:
    return to_double(init_params(SinusoidMLP(hidden=8), torch.Generator().manual_seed(seed)))


def hand_mlp(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The 1-H-H-1 ReLU MLP written out by hand: no nn.Module, no functional_call."""
    h = torch.relu(x @ p["body.0.weight"].T + p["body.0.bias"])
    h = torch.relu(h @ p["body.2.weight"].T + p["body.2.bias"])
    return h @ p["head.weight"].T + p["head.bias"]


def hand_maml_grad(
    p: dict[str, torch.Tensor],
    task: Task,
    steps: int,
    lr: float,
    *,
    second_order: bool,
    keys: list[str] | None = None,
    lrs: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """MAML's meta-gradient by plain autograd over a hand-unrolled inner loop (the `higher`-style reference)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    lr_leaves = {k: v.clone().requires_grad_(True) for k, v in (lrs or {}).items()}
    fast = dict(leaves)
    keys = keys or list(p)
    for _ in range(steps):
        loss = torch.mean((hand_mlp(fast, task.support_x) - task.support_y) ** 2)
        grads = torch.autograd.grad(loss, [fast[k] for k in keys], create_graph=second_order)
        for k, g in zip(keys, grads, strict=True):
            step = lr_leaves[k] if lrs else lr
            fast[k] = fast[k] - step * g
        if not second_order:
            fast = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
    query = torch.mean((hand_mlp(fast, task.query_x) - task.query_y) ** 2)
    wrt = fast if not second_order else leaves
    targets = [wrt[k] for k in p] + [lr_leaves[k] for k in lr_leaves]
    grads = torch.autograd.grad(query, targets, allow_unused=True)
    names = list(p) + ["inner_lr." + k for k in lr_leaves]
    return {n: (g if g is not None else torch.zeros_like(t)) for n, g, t in zip(names, grads, targets, strict=True)}


def finite_difference(loss_of, params: dict[str, torch.Tensor], eps: float = 1e-6) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in params.items():
        g = torch.zeros_like(v)
        for i in range(v.numel()):
            plus = {
                **params,
                k: v.flatten().clone().index_add_(0, torch.tensor([i]), torch.tensor([eps], dtype=v.dtype)).view_as(v),
            }
            minus = {
                **params,
                k: v.flatten().clone().index_add_(0, torch.tensor([i]), torch.tensor([-eps], dtype=v.dtype)).view_as(v),
            }
            g.view(-1)[i] = (loss_of(plus) - loss_of(minus)) / (2 * eps)
        out[k] = g
    return out


def maml_query_loss(p, task, steps, lr, keys=None, lrs=None):
    """Post-adaptation query loss by plain arithmetic, for finite differences."""
    with torch.enable_grad():
        fast = {k: v.clone().requires_grad_(True) for k, v in p.items()}
        for _ in range(steps):
            loss = torch.mean((hand_mlp(fast, task.support_x) - task.support_y) ** 2)
            names = keys or list(fast)
            grads = torch.autograd.grad(loss, [fast[k] for k in names])
            fast = {
                **fast,
                **{
                    k: (fast[k] - (lrs[k] if lrs else lr) * g).detach().requires_grad_(True)
                    for k, g in zip(names, grads, strict=True)
                },
            }
    return float(torch.mean((hand_mlp(fast, task.query_x) - task.query_y) ** 2).detach())


def assert_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-8, rtol: float = 1e-6
) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_matches_hand_unrolled_autograd(steps: int, engine: str) -> None:
    params, task = mlp_params(), double_task()
    algo = MAML(SinusoidMLP(hidden=8), kind="regression", inner_lr=INNER_LR, inner_steps=steps)

    meta_grad = direction_of(algo, params, task, engine)

    assert_close(meta_grad, hand_maml_grad(params, task, steps, INNER_LR, second_order=True))


def test_maml_meta_gradient_matches_finite_differences(engine: str) -> None:
    params, task = mlp_params(1), double_task(1)
    algo = MAML(SinusoidMLP(hidden=8), kind="regression", inner_lr=INNER_LR, inner_steps=2)

    meta_grad = direction_of(algo, params, task, engine)
    numeric = finite_difference(lambda p: maml_query_loss(p, task, 2, INNER_LR), params)

    assert_close(meta_grad, numeric, atol=1e-6, rtol=1e-4)


def test_maml_is_second_order_and_fomaml_drops_exactly_those_terms(engine: str) -> None:
    params, task = mlp_params(2), double_task(2)
    maml = MAML(SinusoidMLP(hidden=8), kind="regression", inner_lr=INNER_LR, inner_steps=2)
    fomaml = FOMAML(SinusoidMLP(hidden=8), kind="regression", inner_lr=INNER_LR, inner_steps=2)

    second = direction_of(maml, params, task, engine)
    first = direction_of(fomaml, params, task, engine)

    assert_close(first, hand_maml_grad(params, task, 2, INNER_LR, second_order=False))
    gap = max(float((second[k] - first[k]).abs().max()) for k in params)
    assert gap > 1e-4, "MAML's meta-gradient equals the first-order one: the inner loop's graph was cut"


def test_linear_regression_closed_form_for_maml_and_fomaml(engine: str) -> None:
    # Linear model y = w.x, MSE: grad L(w) = 2/n X^T(Xw - y), Hessian H = 2/n X^T X (constant).
    # One inner step: w' = w - a grad_s(w); MAML meta-grad = (I - a H_s) grad_q(w'); FOMAML = grad_q(w').
    rng = np.random.default_rng(3)
    xs, ys, xq, yq = rng.normal(size=(6, 3)), rng.normal(size=(6, 1)), rng.normal(size=(9, 3)), rng.normal(size=(9, 1))
    w = rng.normal(size=(1, 3))
    a = 0.1
    grad = lambda X, y, w: (2 / len(X)) * (X @ w.T - y).T @ X  # noqa: E731  (1, 3)
    h_s = (2 / len(xs)) * xs.T @ xs
    w_fast = w - a * grad(xs, ys, w)
    expected_fo = grad(xq, yq, w_fast)
    expected_maml = expected_fo @ (np.eye(3) - a * h_s)
    task = Task(*(torch.from_numpy(v) for v in (xs, ys, xq, yq)))
    params = {"weight": torch.from_numpy(w)}

    maml = MAML(nn.Linear(3, 1, bias=False), kind="regression", inner_lr=a, inner_steps=1)
    fomaml = FOMAML(nn.Linear(3, 1, bias=False), kind="regression", inner_lr=a, inner_steps=1)
    maml_grad = direction_of(maml, params, task, engine)
    fo_grad = direction_of(fomaml, params, task, engine)

    np.testing.assert_allclose(maml_grad["weight"].numpy(), expected_maml, rtol=1e-10)
    np.testing.assert_allclose(fo_grad["weight"].numpy(), expected_fo, rtol=1e-10)


def test_reptile_one_step_pseudo_gradient_is_lr_times_gradient(engine: str) -> None:
    # Reptile with one inner step: params - adapted = lr * grad L(params) on the task's pooled data.
    params, task = mlp_params(4), double_task(4)
    algo = Reptile(SinusoidMLP(hidden=8), kind="regression", inner_lr=INNER_LR, inner_steps=1)

    pseudo_grad = direction_of(algo, params, task, engine)

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
    grads = torch.autograd.grad(torch.mean((hand_mlp(leaves, x) - y) ** 2), list(leaves.values()))
    assert_close(pseudo_grad, {k: INNER_LR * g for k, g in zip(params, grads, strict=True)})


def test_reptile_k_steps_sums_the_trajectory_gradients(engine: str) -> None:
    params, task = mlp_params(5), double_task(5)
    algo = Reptile(SinusoidMLP(hidden=8), kind="regression", inner_lr=INNER_LR, inner_steps=4)
    x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])

    pseudo_grad = direction_of(algo, params, task, engine)

    fast = dict(params)
    for _ in range(4):
        leaves = {k: v.clone().requires_grad_(True) for k, v in fast.items()}
        grads = torch.autograd.grad(torch.mean((hand_mlp(leaves, x) - y) ** 2), list(leaves.values()))
        fast = {k: fast[k] - INNER_LR * g for k, g in zip(fast, grads, strict=True)}
    assert_close(pseudo_grad, {k: params[k] - fast[k] for k in params})


def test_meta_sgd_learning_rate_gradients_match_finite_differences(engine: str) -> None:
    model = SinusoidMLP(hidden=8)
    algo = MetaSGD(model, kind="regression", inner_lr=INNER_LR, inner_steps=2)
    params = to_double(algo.init_params(torch.Generator().manual_seed(6)))
    # Unequal rates, so a bug that shares one rate across entries would show.
    gen = torch.Generator().manual_seed(7)
    params = {
        k: (v * (0.5 + torch.rand(v.shape, generator=gen, dtype=v.dtype)) if k.startswith("inner_lr.") else v)
        for k, v in params.items()
    }
    task = double_task(6)
    weights = {k: v for k, v in params.items() if not k.startswith("inner_lr.")}
    lrs = {k.removeprefix("inner_lr."): v for k, v in params.items() if k.startswith("inner_lr.")}

    meta_grad = direction_of(algo, params, task, engine)
    numeric = finite_difference(
        lambda p: maml_query_loss(weights, task, 2, 0.0, lrs={k.removeprefix("inner_lr."): v for k, v in p.items()}),
        {"inner_lr." + k: v for k, v in lrs.items()},
    )

    assert_close({k: meta_grad[k] for k in numeric}, numeric, atol=1e-6, rtol=1e-4)
    reference = hand_maml_grad(weights, task, 2, 0.0, second_order=True, lrs=lrs)
    assert_close(meta_grad, reference)


def test_anil_adapts_only_the_head_but_updates_everything(engine: str) -> None:
    params, task = mlp_params(8), double_task(8)
    algo = ANIL(SinusoidMLP(hidden=8), kind="regression", inner_lr=INNER_LR, inner_steps=2)
    head = ["head.weight", "head.bias"]

    meta_grad = direction_of(algo, params, task, engine)
    numeric = finite_difference(lambda p: maml_query_loss(p, task, 2, INNER_LR, keys=head), params)

    assert_close(meta_grad, numeric, atol=1e-6, rtol=1e-4)
    assert_close(meta_grad, hand_maml_grad(params, task, 2, INNER_LR, second_order=True, keys=head))
    assert float(meta_grad["body.0.weight"].abs().sum()) > 0


def direction_and_metrics(algo, params, task: Task, engine: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The client part on one task through the per-task reference or the batched engine."""
    if engine == "reference":
        return algo.task_direction(params, task)
    update = algo.client_update(params, [task])
    return update.direction, update.metrics


def two_way_task(seed: int) -> Task:
    """A 2-way task on 3 features: 4 support and 6 query examples (float64)."""
    rng = np.random.default_rng(seed)
    return Task(
        torch.from_numpy(rng.normal(size=(4, 3))),
        torch.tensor([0, 1, 0, 1]),
        torch.from_numpy(rng.normal(size=(6, 3))),
        torch.tensor([0, 1, 1, 0, 1, 0]),
    )


def test_protonet_logits_match_a_hand_computation() -> None:
    rng = np.random.default_rng(9)
    support, query = rng.normal(size=(6, 4)), rng.normal(size=(5, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])
    prototypes = np.stack([support[labels == c].mean(axis=0) for c in range(3)])
    expected = np.array([[-np.sum((q - p) ** 2) for p in prototypes] for q in query])

    logits = prototype_logits(torch.from_numpy(support), torch.from_numpy(labels), torch.from_numpy(query), 3)

    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-10)


def test_protonet_direction_is_the_query_cross_entropy_gradient(engine: str) -> None:
    model = nn.Linear(3, 2)
    algo = ProtoNet(model, kind="classification", inner_lr=0.1, inner_steps=0)
    params = to_double(init_params(model, torch.Generator().manual_seed(10)))
    task = two_way_task(seed=10)

    direction, metrics = direction_and_metrics(algo, params, task, engine)

    def loss_of(p: dict[str, torch.Tensor]) -> float:
        emb = lambda x: x @ p["weight"].T + p["bias"]  # noqa: E731
        logits = prototype_logits(emb(task.support_x), task.support_y, emb(task.query_x), 2)
        return float(torch.nn.functional.cross_entropy(logits, task.query_y))

    assert_close(direction, finite_difference(loss_of, params), atol=1e-6, rtol=1e-4)
    assert metrics["query_loss"] == pytest.approx(loss_of(params))


def _matching_reference(
    support: np.ndarray, labels: np.ndarray, query: np.ndarray, ways: int, scale: float = 1.0
) -> np.ndarray:
    """Vinyals et al. eq. 1-2 written out: a(x, x_i) = exp(cos) / sum_j exp(cos_j); P(c) = sum_i a_i [y_i = c]
    (with TADAM's metric scaling, cos is `scale` x the cosine)."""
    probs = np.zeros((len(query), ways))
    for q, x in enumerate(query):
        cos = scale * np.array([x @ s / (np.linalg.norm(x) * np.linalg.norm(s)) for s in support])
        attention = np.exp(cos) / np.exp(cos).sum()
        for a, y in zip(attention, labels, strict=True):
            probs[q, y] += a
    return np.log(probs)


def test_matching_attention_and_log_probabilities_match_a_hand_computation() -> None:
    rng = np.random.default_rng(12)
    support, query = rng.normal(size=(6, 4)), rng.normal(size=(5, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])

    log_probs = matching_log_probs(torch.from_numpy(support), torch.from_numpy(labels), torch.from_numpy(query), 3)

    np.testing.assert_allclose(log_probs.numpy(), _matching_reference(support, labels, query, 3), rtol=1e-10)
    np.testing.assert_allclose(log_probs.exp().sum(-1).numpy(), 1.0, rtol=1e-12)
    scaled = matching_log_probs(*map(torch.from_numpy, (support, labels, query)), 3, scale=10.0)
    np.testing.assert_allclose(scaled.numpy(), _matching_reference(support, labels, query, 3, 10.0), rtol=1e-10)


def test_unscaled_matching_cannot_be_confident_in_twenty_ways_and_metric_scaling_can() -> None:
    # Non-negative (ReLU) embeddings, a query identical to its class's support example and orthogonal to the 19
    # others: the paper's attention gives its class at most e / (e + 19); scale 10 gives e^10 / (e^10 + 19).
    support = torch.eye(20, dtype=torch.float64)
    query, labels = support[:1], torch.arange(20)
    plain = matching_log_probs(support, labels, query, 20).exp()[0, 0]
    scaled = matching_log_probs(support, labels, query, 20, scale=10.0).exp()[0, 0]
    assert float(plain) == pytest.approx(math.e / (math.e + 19))
    assert float(scaled) == pytest.approx(math.exp(10) / (math.exp(10) + 19)) and scaled > 0.99


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_matching_direction_is_the_query_nll_gradient(engine: str, scale: float) -> None:
    model = nn.Linear(3, 4)
    algo = MatchingNet(model, kind="classification", inner_lr=0.1, inner_steps=0, scale=scale)
    params = to_double(init_params(model, torch.Generator().manual_seed(13)))
    task = two_way_task(seed=13)

    direction, metrics = direction_and_metrics(algo, params, task, engine)

    def loss_of(p: dict[str, torch.Tensor]) -> float:
        emb = lambda x: (x @ p["weight"].T + p["bias"]).numpy()  # noqa: E731
        log_probs = _matching_reference(emb(task.support_x), task.support_y.numpy(), emb(task.query_x), 2, scale)
        return float(-log_probs[np.arange(6), task.query_y.numpy()].mean())

    assert_close(direction, finite_difference(loss_of, params), atol=1e-6, rtol=1e-4)
    assert metrics["query_loss"] == pytest.approx(loss_of(params), rel=1e-10)


def _np_lstm_cell(x, h, c, w_ih, w_hh, bias):
    """An LSTM cell written out (gate order i, f, g, o), one example at a time."""
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    i, f, g, o = np.split(w_ih @ x + w_hh @ h + bias, 4)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    return sigmoid(o) * np.tanh(c), c


def _fce_reference(support, query, lstms, steps):
    """Vinyals et al. appendix A.2 written out: g = g' + forward + backward LSTM states over the support set;
    f = h_K of the attention LSTM, h_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1}) + f'(x), h_0 = c_0 = 0."""
    count, size = support.shape
    hidden = {}
    for name, order in (("support_fwd", range(count)), ("support_bwd", reversed(range(count)))):
        h = c = np.zeros(size)
        for i in order:
            h, c = _np_lstm_cell(support[i], h, c, *lstms[name])
            hidden[name, i] = h
    context = np.stack([support[i] + hidden["support_fwd", i] + hidden["support_bwd", i] for i in range(count)])
    refined = []
    for x in query:
        h = c = np.zeros(size)
        for _ in range(steps):
            logits = context @ h
            read = (np.exp(logits) / np.exp(logits).sum()) @ context
            h, c = _np_lstm_cell(x, np.concatenate([h, read]), c, *lstms["query"])
            h = h + x
        refined.append(h)
    return context, np.stack(refined)


def _np_lstms(p: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, ...]]:
    return {
        name: tuple(p[f"{FCE_PREFIX}{name}.{k}"].numpy() for k in ("w_ih", "w_hh", "bias"))
        for name in ("support_fwd", "support_bwd", "query")
    }


def test_matching_full_context_embeddings_match_a_hand_computation() -> None:
    model = nn.Linear(3, 4)
    algo = MatchingNet(model, kind="classification", inner_lr=0.1, inner_steps=0, fce_steps=3)
    params = to_double(algo.init_params(torch.Generator().manual_seed(18)))
    rng = np.random.default_rng(18)
    support, query, labels = rng.normal(size=(6, 4)), rng.normal(size=(5, 4)), np.array([0, 1, 2, 0, 1, 2])

    got = algo.scores(params, torch.from_numpy(query), torch.from_numpy(support), torch.from_numpy(labels), 3)

    context, refined = _fce_reference(support, query, _np_lstms(params), steps=3)
    np.testing.assert_allclose(got.numpy(), _matching_reference(context, labels, refined, 3), rtol=1e-10)
    plain = matching_log_probs(torch.from_numpy(support), torch.from_numpy(labels), torch.from_numpy(query), 3)
    assert not torch.allclose(got, plain)  # the context changed the answer


def test_matching_fce_direction_is_the_query_nll_gradient(engine: str) -> None:
    model = nn.Linear(3, 4)
    algo = MatchingNet(model, kind="classification", inner_lr=0.1, inner_steps=0, fce_steps=2)
    params = to_double(algo.init_params(torch.Generator().manual_seed(19)))
    task = two_way_task(seed=19)

    direction, metrics = direction_and_metrics(algo, params, task, engine)

    def loss_of(p: dict[str, torch.Tensor]) -> float:
        emb = lambda x: (x @ p["weight"].T + p["bias"]).numpy()  # noqa: E731
        context, refined = _fce_reference(emb(task.support_x), emb(task.query_x), _np_lstms(p), steps=2)
        log_probs = _matching_reference(context, task.support_y.numpy(), refined, 2)
        return float(-log_probs[np.arange(6), task.query_y.numpy()].mean())

    assert direction.keys() == params.keys() and sum(k.startswith(FCE_PREFIX) for k in params) == 9
    assert_close(direction, finite_difference(loss_of, params), atol=1e-6, rtol=1e-4)
    assert metrics["query_loss"] == pytest.approx(loss_of(params), rel=1e-10)


def test_full_context_embeddings_are_an_option_of_matching_only() -> None:
    with pytest.raises(ConfigError, match="apply to algorithm 'matching', not 'protonet'"):
        RunConfig().replace(**{"algorithm": "protonet", "data.dataset": "omniglot", "matching.fce": True})
    with pytest.raises(ConfigError, match="matching.fce_steps must be a positive integer, got 0"):
        RunConfig().replace(**{"matching.fce_steps": 0})
    with pytest.raises(ConfigError, match="apply to algorithm 'matching', not 'relation'"):
        RunConfig().replace(**{"algorithm": "relation", "data.dataset": "omniglot", "matching.scale": 10.0})


def _siamese_reference(query, support, query_y, support_y, alpha, bias, ways):
    """Koch et al.'s pair score written out, pair by pair: (balanced BCE, class logits = best pair per class)."""
    scores = np.array([[np.sum(alpha * np.abs(q - s)) + bias for s in support] for q in query])
    same = query_y[:, None] == support_y[None, :]
    bce = np.logaddexp(0, scores) - same * scores  # -[y log sigmoid(s) + (1 - y) log(1 - sigmoid(s))]
    loss = (bce[same].mean() + bce[~same].mean()) / 2
    best = np.array([[scores[q, support_y == c].max() for c in range(ways)] for q in range(len(query))])
    return loss, best


def test_siamese_scores_loss_and_one_shot_choice_match_a_hand_computation() -> None:
    rng = np.random.default_rng(14)
    query, support = rng.normal(size=(5, 4)), rng.normal(size=(6, 4))
    query_y, support_y = np.array([0, 1, 2, 0, 2]), np.array([0, 1, 2, 0, 1, 2])
    alpha, bias = rng.normal(size=4), 0.3
    loss, best = _siamese_reference(query, support, query_y, support_y, alpha, bias, 3)

    logits = pair_logits(
        torch.from_numpy(query),
        torch.from_numpy(support),
        torch.from_numpy(alpha),
        torch.tensor(bias, dtype=torch.float64),
    )
    got = verification_loss(logits, torch.from_numpy(query_y), torch.from_numpy(support_y))

    assert float(got) == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(class_logits(logits, torch.from_numpy(support_y), 3).numpy(), best, rtol=1e-12)


def test_siamese_direction_is_the_verification_loss_gradient(engine: str) -> None:
    model = nn.Linear(3, 4)
    algo = Siamese(model, kind="classification", inner_lr=0.1, inner_steps=0)
    params = to_double(algo.init_params(torch.Generator().manual_seed(15)))
    params["siamese.alpha"] = torch.tensor([0.5, -1.0, 0.25, -0.3], dtype=torch.float64)
    task = two_way_task(seed=15)

    direction, metrics = direction_and_metrics(algo, params, task, engine)

    def loss_of(p: dict[str, torch.Tensor]) -> float:
        emb = lambda x: (x @ p["weight"].T + p["bias"]).numpy()  # noqa: E731
        loss, _ = _siamese_reference(
            emb(task.query_x), emb(task.support_x), task.query_y.numpy(), task.support_y.numpy(),
            p["siamese.alpha"].numpy(), float(p["siamese.bias"]), 2,
        )  # fmt: skip
        return float(loss)

    assert direction.keys() == params.keys()
    assert_close(direction, finite_difference(loss_of, params), atol=1e-6, rtol=1e-4)
    assert metrics["query_loss"] == pytest.approx(loss_of(params), rel=1e-10)


def _relation_reference(query, support, support_y, ways, module, feature_map=None):
    """Sung et al.'s relation module written out: pairs built query by query and class by class, each 3x3 conv
    pixel by pixel, batch norm over all the task's pairs and pixels, 2x2 max-pool, then the two linear layers."""
    shape = feature_map or (query.shape[1], 1, 1)

    def conv(x, w, b):  # x (C, H, W), zero padding 1
        out = np.zeros((w.shape[0], *x.shape[1:]))
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                for di in range(3):
                    for dj in range(3):
                        if 0 <= i + di - 1 < x.shape[1] and 0 <= j + dj - 1 < x.shape[2]:
                            out[:, i, j] += w[:, :, di, dj] @ x[:, i + di - 1, j + dj - 1]
        return out + b[:, None, None]

    def block(maps, layer):  # maps: one (C, H, W) per pair
        out = np.stack([conv(m, module[f"relation.{layer}.weight"], module[f"relation.{layer}.bias"]) for m in maps])
        mean, var = out.mean(axis=(0, 2, 3), keepdims=True), out.var(axis=(0, 2, 3), keepdims=True)
        gamma, beta = module[f"relation.{layer}.bn.weight"], module[f"relation.{layer}.bn.bias"]
        out = np.maximum((out - mean) / np.sqrt(var + 1e-5) * gamma[:, None, None] + beta[:, None, None], 0)
        if min(out.shape[2:]) >= 2:
            h, w = out.shape[2] // 2, out.shape[3] // 2
            out = out[:, :, : 2 * h, : 2 * w].reshape(len(out), out.shape[1], h, 2, w, 2).max(axis=(3, 5))
        return out

    pairs = [
        np.concatenate([x.reshape(shape), support[support_y == c].sum(axis=0).reshape(shape)])
        for x in query
        for c in range(ways)
    ]
    flat = block(block(pairs, 0), 1).reshape(len(pairs), -1)
    hidden = np.maximum(flat @ module["relation.2.weight"].T + module["relation.2.bias"], 0)
    logits = (hidden @ module["relation.3.weight"].T + module["relation.3.bias"])[:, 0]
    return (1 / (1 + np.exp(-logits))).reshape(len(query), ways)


@pytest.mark.parametrize("feature_map", [None, (2, 2, 3)], ids=["flat", "maps"])
def test_relation_scores_and_loss_match_a_hand_computation(feature_map) -> None:
    rng = np.random.default_rng(16)
    features = 4 if feature_map is None else int(np.prod(feature_map))
    query, support = rng.normal(size=(5, features)), rng.normal(size=(6, features))
    support_y, query_y = np.array([0, 1, 2, 0, 1, 2]), np.array([2, 0, 1, 1, 0])
    channels = 2 * (feature_map or (features,))[0]  # 2x3 maps pool to 1x1: 64 features reach the linear part
    module = {
        "relation.0.weight": rng.normal(size=(64, channels, 3, 3)),
        "relation.0.bias": rng.normal(size=64),
        "relation.0.bn.weight": rng.normal(size=64),
        "relation.0.bn.bias": rng.normal(size=64),
        "relation.1.weight": rng.normal(size=(64, 64, 3, 3)) / 8,
        "relation.1.bias": rng.normal(size=64),
        "relation.1.bn.weight": rng.normal(size=64),
        "relation.1.bn.bias": rng.normal(size=64),
        "relation.2.weight": rng.normal(size=(8, 64)) / 8,
        "relation.2.bias": rng.normal(size=8),
        "relation.3.weight": rng.normal(size=(1, 8)),
        "relation.3.bias": rng.normal(size=1),
    }
    expected = _relation_reference(query, support, support_y, 3, module, feature_map)

    scores = relation_scores(
        torch.from_numpy(query), torch.from_numpy(support), torch.from_numpy(support_y), 3,
        {k: torch.from_numpy(v) for k, v in module.items()}, feature_map,
    )  # fmt: skip

    assert expected.std() > 0.01  # the pairs are told apart (no collapse to one score)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-10)
    mse = ((expected - np.eye(3)[query_y]) ** 2).mean()
    assert float(relation_loss(scores, torch.from_numpy(query_y))) == pytest.approx(mse, rel=1e-12)


def test_relation_direction_is_the_mse_gradient(engine: str) -> None:
    model = nn.Linear(3, 4)
    algo = RelationNet(model, kind="classification", inner_lr=0.1, inner_steps=0)
    algo.channels = 3  # few parameters for finite differences
    params = to_double(algo.init_params(torch.Generator().manual_seed(17)))
    task = two_way_task(seed=17)

    direction, metrics = direction_and_metrics(algo, params, task, engine)

    def loss_of(p: dict[str, torch.Tensor]) -> float:
        emb = lambda x: (x @ p["weight"].T + p["bias"]).numpy()  # noqa: E731
        module = {k: v.numpy() for k, v in p.items() if k.startswith("relation.")}
        scores = _relation_reference(emb(task.query_x), emb(task.support_x), task.support_y.numpy(), 2, module)
        return float(((scores - np.eye(2)[task.query_y.numpy()]) ** 2).mean())

    assert direction.keys() == params.keys()
    assert_close(direction, finite_difference(loss_of, params), atol=1e-6, rtol=1e-4)
    assert metrics["query_loss"] == pytest.approx(loss_of(params), rel=1e-10)


def _hand_preprocess(x: np.ndarray) -> np.ndarray:
    big = np.abs(x) >= np.exp(-10.0)
    first = np.where(big, np.log(np.maximum(np.abs(x), np.exp(-10.0))) / 10.0, -1.0)
    return np.stack([first, np.where(big, np.sign(x), np.exp(10.0) * x)], axis=-1)


def test_one_meta_lstm_step_matches_the_papers_cell_update() -> None:
    rng = np.random.default_rng(18)
    weight, gradient = rng.normal(size=(3, 2)), rng.normal(size=(3, 2)) * np.array([1.0, 1e-6])
    i_prev, f_prev, loss = rng.uniform(size=(3, 2)), rng.uniform(size=(3, 2)), 0.7
    w_i, w_f, b_i, b_f = rng.normal(size=6), rng.normal(size=6), -2.0, 3.0
    inputs = np.concatenate(
        [_hand_preprocess(gradient), np.broadcast_to(_hand_preprocess(np.array(loss)), (3, 2, 2))], -1
    )
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    i_t = sigmoid(inputs @ w_i[:4] + w_i[4] * weight + w_i[5] * i_prev + b_i)
    f_t = sigmoid(inputs @ w_f[:4] + w_f[4] * weight + w_f[5] * f_prev + b_f)
    expected = f_t * weight - i_t * gradient  # c_t = f_t * c_{t-1} - i_t * grad

    gates = {"metalstm.w_i": w_i, "metalstm.w_f": w_f, "metalstm.b_i": np.array(b_i), "metalstm.b_f": np.array(b_f)}
    t = torch.from_numpy
    c, i, f = lstm_step(t(weight), t(gradient), torch.tensor(loss, dtype=torch.float64), t(i_prev), t(f_prev),
                        {k: t(v) for k, v in gates.items()})  # fmt: skip

    np.testing.assert_allclose(c.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(i.numpy(), i_t, rtol=1e-12)
    np.testing.assert_allclose(f.numpy(), f_t, rtol=1e-12)


def test_meta_lstm_meta_gradient_treats_gradients_and_losses_as_inputs(engine: str) -> None:
    model = nn.Linear(3, 2)
    algo = MetaLSTM(model, kind="classification", inner_lr=0.1, inner_steps=2)
    params = to_double(algo.init_params(torch.Generator().manual_seed(19)))
    params["metalstm.w_i"] = torch.tensor([0.1, -0.2, 0.05, 0.3, -0.1, 0.2], dtype=torch.float64)
    params["metalstm.w_f"] = torch.tensor([-0.1, 0.1, 0.2, -0.05, 0.1, 0.3], dtype=torch.float64)
    task = two_way_task(seed=19)
    sigmoid = torch.sigmoid

    def unroll(p, inputs=None):
        """The two steps written out; with `inputs`, the gradients and losses are those constants."""
        w = {"weight": p["weight"], "bias": p["bias"]}
        i_prev = {k: sigmoid(p["metalstm.b_i"]) + 0 * v for k, v in w.items()}
        f_prev = {k: sigmoid(p["metalstm.b_f"]) + 0 * v for k, v in w.items()}
        seen = []
        for step in range(2):
            if inputs is None:
                leaf = {k: v.detach().requires_grad_() for k, v in w.items()}
                loss = torch.nn.functional.cross_entropy(
                    task.support_x @ leaf["weight"].T + leaf["bias"], task.support_y
                )
                grads = dict(zip(leaf, torch.autograd.grad(loss, list(leaf.values())), strict=True))
                seen.append((grads, loss.detach()))
            grads, loss = seen[step] if inputs is None else inputs[step]
            new = {}
            for k in w:
                g = grads[k].numpy()
                x = torch.from_numpy(
                    np.concatenate(
                        [_hand_preprocess(g), np.broadcast_to(_hand_preprocess(loss.numpy()), (*g.shape, 2))], -1
                    )
                )
                i_t = sigmoid(
                    x @ p["metalstm.w_i"][:4]
                    + p["metalstm.w_i"][4] * w[k]
                    + p["metalstm.w_i"][5] * i_prev[k]
                    + p["metalstm.b_i"]
                )
                f_t = sigmoid(
                    x @ p["metalstm.w_f"][:4]
                    + p["metalstm.w_f"][4] * w[k]
                    + p["metalstm.w_f"][5] * f_prev[k]
                    + p["metalstm.b_f"]
                )
                new[k] = f_t * w[k] - i_t * grads[k]
                i_prev[k], f_prev[k] = i_t, f_t
            w = new
        return w, seen

    _, inputs = unroll(params)  # the gradients and losses at the meta-parameters being differentiated

    def loss_of(p: dict[str, torch.Tensor]) -> float:
        w, _ = unroll(p, inputs)
        return float(torch.nn.functional.cross_entropy(task.query_x @ w["weight"].T + w["bias"], task.query_y))

    direction, metrics = direction_and_metrics(algo, params, task, engine)

    assert direction.keys() == params.keys()
    assert_close(direction, finite_difference(loss_of, params), atol=1e-6, rtol=1e-4)
    assert metrics["query_loss"] == pytest.approx(loss_of(params), rel=1e-10)
    assert float(direction["metalstm.w_i"].abs().sum()) > 0 and float(direction["metalstm.b_f"].abs()) > 0


def test_client_update_averages_task_directions() -> None:
    params = mlp_params(11)
    tasks = [double_task(s) for s in (11, 12, 13)]
    algo = MAML(SinusoidMLP(hidden=8), kind="regression", inner_lr=INNER_LR, inner_steps=1)

    update = algo.client_update(params, tasks)

    per_task = [algo.task_direction(params, t)[0] for t in tasks]
    assert update.num_tasks == 3
    assert_close(update.direction, {k: sum(d[k] for d in per_task) / 3 for k in params})
    with pytest.raises(ValueError, match="at least one task"):
        algo.client_update(params, [])


def test_adaptation_improves_the_support_fit_and_leaves_inputs_untouched() -> None:
    params, task = mlp_params(12), double_task(12, shots=10)
    before = {k: v.clone() for k, v in params.items()}
    algo = MAML(SinusoidMLP(hidden=8), kind="regression", inner_lr=0.01, inner_steps=1)
    support_as_query = Task(task.support_x, task.support_y, task.support_x, task.support_y)

    curve = algo.evaluate_curve(params, support_as_query, steps=5)

    assert len(curve) == 6 and curve[-1] < curve[0]
    assert all(torch.equal(before[k], params[k]) for k in params)


def _hand_perfedavg(p, tasks, alpha: float, beta: float, *, hessian_free: bool, eps: float = 1e-6):
    """Per-FedAvg's local steps written with plain autograd on the hand MLP; the Hessian-vector product by
    central finite differences of the support gradient (the paper's own estimate), independent of torch.func."""

    def grads(w, x, y):
        leaves = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        loss = torch.mean((hand_mlp(leaves, x) - y) ** 2)
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))

    local = dict(p)
    for task in tasks:
        g_support = grads(local, task.support_x, task.support_y)
        temp = {k: local[k] - alpha * g_support[k] for k in local}
        g = grads(temp, task.query_x, task.query_y)
        if hessian_free:
            plus = grads({k: local[k] + eps * g[k] for k in local}, task.support_x, task.support_y)
            minus = grads({k: local[k] - eps * g[k] for k in local}, task.support_x, task.support_y)
            g = {k: g[k] - alpha * (plus[k] - minus[k]) / (2 * eps) for k in g}
        local = {k: local[k] - beta * g[k] for k in local}
    return {k: p[k] - local[k] for k in p}


@pytest.mark.parametrize("cls", [PerFedAvg, PerFedAvgHF])
def test_per_fedavg_local_steps_match_a_hand_written_reference(cls) -> None:
    params = mlp_params(seed=20)
    tasks = [double_task(seed=20), double_task(seed=21, shots=4, queries=6)]
    algo = cls(SinusoidMLP(hidden=8), kind="regression", inner_lr=INNER_LR, inner_steps=1, local_lr=0.3)

    update = algo.client_update(params, tasks)

    expected = _hand_perfedavg(params, tasks, INNER_LR, 0.3, hessian_free=cls.hessian_free)
    assert_close(update.direction, expected, atol=1e-8, rtol=1e-6)
    assert update.num_tasks == 2
    # The Hessian term matters: the two variants differ by more than the tolerance above.
    other = _hand_perfedavg(params, tasks, INNER_LR, 0.3, hessian_free=not cls.hessian_free)
    assert max(float((expected[k] - other[k]).abs().max()) for k in expected) > 1e-4


@pytest.mark.parametrize("steps", [1, 3])
def test_fedrep_returns_the_body_gradient_at_a_locally_fitted_head(steps: int, engine: str) -> None:
    params, task = mlp_params(seed=22), double_task(seed=22)
    algo = FedRep(SinusoidMLP(hidden=8), kind="regression", inner_lr=INNER_LR, inner_steps=steps)

    direction = direction_of(algo, params, task, engine)

    head = [k for k in params if k.startswith("head.")]
    expected = hand_maml_grad(params, task, steps, INNER_LR, second_order=False, keys=head)
    expected = {k: torch.zeros_like(v) if k in head else v for k, v in expected.items()}
    assert_close(direction, expected, atol=1e-10, rtol=1e-8)
    assert any(float(v.abs().max()) > 0 for k, v in direction.items() if k not in head)


def test_meta_lstm_direction_does_not_depend_on_the_order_of_the_parameter_dict() -> None:
    # A Flower message carries parameters sorted by name; the in-process loop keeps the model's order. The gates
    # are shared by every weight tensor, so their gradient is a sum over the tensors: it must be summed in one
    # order whatever the dict's, or the Ray simulation drifts from the in-process loop by an ulp per round.
    algo = MetaLSTM(Conv4(3), kind="classification", inner_lr=0.1, inner_steps=2)
    params = algo.init_params(torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(6)
    task = Task(
        torch.rand(3, 1, 28, 28, generator=generator),
        torch.tensor([0, 1, 2]),
        torch.rand(6, 1, 28, 28, generator=generator),
        torch.tensor([0, 1, 2, 2, 1, 0]),
    )
    reference, _ = algo.task_direction(params, task)
    for order in (sorted(params), sorted(params, reverse=True)):
        direction, _ = algo.task_direction({k: params[k] for k in order}, task)
        assert all(torch.equal(direction[k], reference[k]) for k in params), order
