"""The batched engine against the per-task reference: every algorithm, float64, ragged chunks, one task.

The reference is each algorithm's own per-task loop (`batched=False`), itself checked against hand-unrolled
autograd, finite differences and closed forms in test_algorithms.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedmeta import batched as batched_module
from fedmeta.algorithms import ALGORITHMS, Algorithm
from fedmeta.batched import TaskBatch, batched_forward, per_task
from fedmeta.config import ConfigError
from fedmeta.models import Conv4, SinusoidMLP, init_params
from fedmeta.runtime import resolve_device
from fedmeta.types import Task
from tests.conftest import double_task, to_double

WAYS, SHOTS, QUERIES = 3, 2, 2


def image_tasks(count: int, seed: int, *, image: int = 28, dtype: torch.dtype = torch.float64) -> list[Task]:
    gen = torch.Generator().manual_seed(seed)

    def part(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(WAYS * per_class, 1, image, image, generator=gen, dtype=dtype)
        return x, torch.arange(WAYS).repeat_interleave(per_class)

    return [Task(*part(SHOTS), *part(QUERIES)) for _ in range(count)]


def build(name: str, model: nn.Module, *, kind: str, batched: bool, task_chunk: int = 0, **kw: object) -> Algorithm:
    steps = 0 if ALGORITHMS[name].embedding_only else 2
    return ALGORITHMS[name](
        model, kind=kind, inner_lr=0.1, inner_steps=steps, batched=batched, task_chunk=task_chunk, **kw
    )


def conv_model(name: str, downsample: str = "stride") -> nn.Module:
    return Conv4(None if ALGORITHMS[name].embedding_only else WAYS, channels=4, downsample=downsample)


def assert_updates_equal(a, b, atol: float = 1e-10) -> None:
    assert a.num_tasks == b.num_tasks
    assert a.direction.keys() == b.direction.keys()
    for k in a.direction:
        torch.testing.assert_close(a.direction[k], b.direction[k], atol=atol, rtol=atol, msg=lambda m, k=k: f"{k}: {m}")
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        assert a.metrics[k] == pytest.approx(b.metrics[k], abs=atol), k


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize(("num_tasks", "chunk"), [(5, 2), (1, 0), (4, 0)])
def test_batched_client_update_equals_the_per_task_reference_on_conv4(name: str, num_tasks: int, chunk: int) -> None:
    model = conv_model(name)
    reference = build(name, model, kind="classification", batched=False)
    params = to_double(reference.init_params(torch.Generator().manual_seed(1)))
    tasks = image_tasks(num_tasks, seed=num_tasks)

    expected = reference.client_update(params, tasks)
    actual = build(name, model, kind="classification", batched=True, task_chunk=chunk).client_update(params, tasks)

    assert_updates_equal(actual, expected)


@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "metasgd", "reptile"])
def test_batched_client_update_equals_the_reference_on_regression(name: str) -> None:
    model = SinusoidMLP(hidden=8)
    reference = build(name, model, kind="regression", batched=False)
    params = to_double(reference.init_params(torch.Generator().manual_seed(2)))
    tasks = [double_task(s) for s in range(7)]

    expected = reference.client_update(params, tasks)
    actual = build(name, model, kind="regression", batched=True, task_chunk=3).client_update(params, tasks)

    assert_updates_equal(actual, expected)


@pytest.mark.parametrize("name, downsample", [("maml", "maxpool"), ("protonet", "maxpool"), ("protonet", "maxpool3")])
def test_maxpool_conv4_batched_equals_reference(name: str, downsample: str) -> None:
    model = conv_model(name, downsample=downsample)
    reference = build(name, model, kind="classification", batched=False)
    params = to_double(reference.init_params(torch.Generator().manual_seed(3)))
    tasks = image_tasks(3, seed=3)

    assert_updates_equal(
        build(name, model, kind="classification", batched=True).client_update(params, tasks),
        reference.client_update(params, tasks),
    )


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_batched_evaluation_curves_equal_the_per_task_curves(name: str) -> None:
    model = conv_model(name)
    reference = build(name, model, kind="classification", batched=False)
    params = to_double(reference.init_params(torch.Generator().manual_seed(4)))
    tasks = image_tasks(5, seed=5)

    expected = reference.evaluate_curves(params, tasks, steps=3)
    actual = build(name, model, kind="classification", batched=True, task_chunk=2).evaluate_curves(params, tasks, 3)

    assert actual.shape == (5, 4)
    np.testing.assert_allclose(actual, expected, atol=1e-10)


class Tanh(nn.Module):
    """A module the batched engine has no rule for: it must fall back to vmap and stay exact."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.scale)


def test_unknown_modules_fall_back_to_vmap_and_stay_exact() -> None:
    model = nn.Sequential(nn.Linear(1, 8), Tanh(), nn.Linear(8, 1))
    reference = build("maml", model, kind="regression", batched=False)
    params = to_double(init_params(model, torch.Generator().manual_seed(6)))
    tasks = [double_task(s) for s in range(3)]

    assert_updates_equal(
        build("maml", model, kind="regression", batched=True).client_update(params, tasks),
        reference.client_update(params, tasks),
    )


@pytest.mark.parametrize("model", [Conv4(5, channels=4), Conv4(None, channels=4, downsample="maxpool"), SinusoidMLP()])
def test_fedmeta_models_never_take_the_slow_vmap_fallback(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("vmap fallback used")

    monkeypatch.setattr(batched_module, "_vmapped", refuse)
    x = torch.rand(2, 3, 1, 28, 28) if isinstance(model, Conv4) else torch.rand(2, 3, 1)
    params = init_params(model, torch.Generator().manual_seed(0))

    batched_forward(model, per_task(params, 2), x)
    batched_forward(model, params, x, shared=True)


def test_batched_forward_equals_the_model_applied_task_by_task() -> None:
    model = Conv4(5, channels=4)
    gen = torch.Generator().manual_seed(7)
    weights = [to_double(init_params(model, gen)) for _ in range(3)]
    x = torch.rand(3, 6, 1, 28, 28, generator=gen, dtype=torch.float64)
    stacked = {k: torch.stack([w[k] for w in weights]) for k in weights[0]}

    out = batched_forward(model, stacked, x)

    expected = torch.stack([torch.func.functional_call(model, w, (xi,)) for w, xi in zip(weights, x, strict=True)])
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    shared = batched_forward(model, per_task(weights[0], 3), x)
    torch.testing.assert_close(shared[1], torch.func.functional_call(model, weights[0], (x[1],)))


def test_float32_batched_equals_reference_within_float32_tolerance() -> None:
    model = conv_model("maml")
    reference = build("maml", model, kind="classification", batched=False)
    params = reference.init_params(torch.Generator().manual_seed(8))
    tasks = image_tasks(6, seed=8, dtype=torch.float32)

    expected = reference.client_update(params, tasks)
    actual = build("maml", model, kind="classification", batched=True, task_chunk=4).client_update(params, tasks)

    for k in expected.direction:
        torch.testing.assert_close(actual.direction[k], expected.direction[k], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_keeps_fp32_outputs_and_roughly_the_same_meta_gradient() -> None:
    model = conv_model("fomaml")
    fp32 = build("fomaml", model, kind="classification", batched=True)
    params = fp32.init_params(torch.Generator().manual_seed(9))
    tasks = image_tasks(4, seed=9, dtype=torch.float32)

    exact = fp32.client_update(params, tasks).direction
    rounded = build("fomaml", model, kind="classification", batched=True, precision="bf16").client_update(params, tasks)

    a = torch.cat([exact[k].flatten() for k in exact])
    b = torch.cat([rounded.direction[k].flatten() for k in exact])
    assert all(v.dtype == torch.float32 for v in rounded.direction.values())
    assert torch.isfinite(b).all()
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.95
    assert not torch.equal(a, b), "bf16 autocast had no effect"


def test_task_batch_refuses_mixed_shapes_and_empty_lists() -> None:
    tasks = image_tasks(1, seed=10) + [double_task()]
    with pytest.raises(ValueError, match="same shapes"):
        TaskBatch.stack(tasks)
    with pytest.raises(ValueError, match="empty"):
        TaskBatch.stack([])
    batch = TaskBatch.stack(image_tasks(5, seed=11))
    assert [len(c) for c in batch.chunks(2)] == [2, 2, 1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="sees no GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_shared_weights_forward_equals_per_task_views_and_sums_their_gradients() -> None:
    model = Conv4(None, channels=4)
    params = to_double(init_params(model, torch.Generator().manual_seed(12)))
    x = torch.rand(3, 4, 1, 28, 28, generator=torch.Generator().manual_seed(13), dtype=torch.float64)

    def loss(p: dict, shared: bool) -> torch.Tensor:
        weights = p if shared else per_task(p, 3)
        return batched_forward(model, weights, x, shared=shared).pow(2).sum()

    torch.testing.assert_close(
        batched_forward(model, params, x, shared=True), batched_forward(model, per_task(params, 3), x)
    )
    g_shared, g_views = torch.func.grad(loss)(params, True), torch.func.grad(loss)(params, False)
    for k in params:
        torch.testing.assert_close(g_shared[k], g_views[k], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("downsample", ["stride", "maxpool", "maxpool3"])
@pytest.mark.parametrize("shared", [True, False])
def test_channels_last_layout_is_the_same_function_with_the_same_gradients(downsample: str, shared: bool) -> None:
    # Shared weights then run as a grouped convolution with the weights repeated over tasks: the gradient must
    # still be the sum over tasks, and per-task weights each task's own gradient.
    model = Conv4(None, channels=4, downsample=downsample)
    params = to_double(init_params(model, torch.Generator().manual_seed(14)))
    x = torch.rand(3, 5, 1, 28, 28, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    weights = params if shared else {k: v.expand(3, *v.shape).clone() for k, v in params.items()}

    def loss(p: dict, channels_last: bool) -> torch.Tensor:
        out = batched_forward(model, p, x, shared=shared, channels_last=channels_last)
        return (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).pow(2).sum()

    torch.testing.assert_close(
        batched_forward(model, weights, x, shared=shared, channels_last=True),
        batched_forward(model, weights, x, shared=shared),
        atol=1e-12,
        rtol=1e-12,
    )
    plain, last = torch.func.grad(loss)(weights, False), torch.func.grad(loss)(weights, True)
    for k in weights:
        assert last[k].shape == weights[k].shape
        torch.testing.assert_close(last[k], plain[k], atol=1e-10, rtol=1e-10, msg=lambda m, k=k: f"{k}: {m}")


def test_protonet_cohort_rows_are_each_clients_own_gradient() -> None:
    # ProtoNet's per-task directions (a cohort of clients in one channels-last call) against the per-task
    # reference, client by client, in float64; and its chunks of whole clients give the same rows.
    model = conv_model("protonet", downsample="maxpool")
    reference = build("protonet", model, kind="classification", batched=False)
    params = to_double(reference.init_params(torch.Generator().manual_seed(16)))
    clients = [image_tasks(2, seed=s) for s in range(4)]
    algo = build("protonet", model, kind="classification", batched=True)
    assert algo.has_task_directions

    rows, metrics = algo.cohort_update(params, clients)
    chunked, _ = build("protonet", model, kind="classification", batched=True, task_chunk=2).cohort_update(
        params, clients
    )

    for i, tasks in enumerate(clients):
        expected = reference.client_update(params, tasks)
        for k in params:
            torch.testing.assert_close(rows[k][i], expected.direction[k], atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(chunked[k][i], expected.direction[k], atol=1e-10, rtol=1e-10)
        assert metrics["query_loss"][i] == pytest.approx(expected.metrics["query_loss"], abs=1e-10)
        assert metrics["query_accuracy"][i] == pytest.approx(expected.metrics["query_accuracy"], abs=1e-10)


@pytest.mark.parametrize("name", ["protonet", "matching", "siamese", "relation"])
def test_joint_embedding_normalises_support_and_query_with_one_set_of_statistics(name: str) -> None:
    model = conv_model(name)
    joint = build(name, model, kind="classification", batched=False, joint_embedding=True)
    params = to_double(joint.init_params(torch.Generator().manual_seed(17)))
    task = image_tasks(1, seed=17)[0]

    both = torch.func.functional_call(model, joint.model_params(params), (torch.cat([task.support_x, task.query_x]),))
    support, query = both[: len(task.support_x)], both[len(task.support_x) :]
    expected = joint.scores(params, query, support, task.support_y, WAYS)
    apart = build(name, model, kind="classification", batched=False)._task_scores(params, task)

    torch.testing.assert_close(joint._task_scores(params, task), expected, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(apart, expected), "support and query were normalised apart all the same"
    # The batched engine and a cohort's per-task directions compute the same function.
    tasks = image_tasks(3, seed=18)
    fast = build(name, model, kind="classification", batched=True, joint_embedding=True)
    assert_updates_equal(fast.client_update(params, tasks), joint.client_update(params, tasks))
    if fast.has_task_directions:
        rows, _ = fast.cohort_update(params, [tasks[:1], tasks[1:2]])
        for i in range(2):
            expected_row = joint.client_update(params, tasks[i : i + 1]).direction
            for k in params:
                torch.testing.assert_close(rows[k][i], expected_row[k], atol=1e-10, rtol=1e-10)
