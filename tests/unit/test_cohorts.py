"""Cohorts: many logical clients computed in one call give exactly the updates they compute alone; the server
aggregates rows of cohorts bit for bit like individual updates; a million-client population costs nothing
until sampled."""

from __future__ import annotations

import logging
import math
import tracemalloc
from pathlib import Path

import pytest
import torch

from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import RunConfig
from fedmeta.experiment import Experiment
from fedmeta.functional import rows_mean, tree_mean
from fedmeta.metrics import read_jsonl
from fedmeta.round import apply_round
from fedmeta.server_opt import OuterOptimizer
from fedmeta.tasks.sinusoid import sinusoid_federation
from fedmeta.types import ClientRows, ClientUpdate
from simulations.inprocess import simulate


def sinusoid(algorithm: str, **overrides: object) -> RunConfig:
    return RunConfig().replace(
        **{
            "algorithm": algorithm,
            "data.num_train_clients": 60,
            "data.num_unseen_clients": 3,
            "federation.tasks_per_client": 3,
            "inner.inner_steps": 2,
            **overrides,
        }
    )


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml", "maml", "metasgd", "fedavg"])
def test_a_cohort_gives_each_client_exactly_its_own_update(algorithm: str) -> None:
    # reptile and fomaml go through the vectorised per-task path together; maml, metasgd and fedavg are computed
    # one after another inside the cohort. Either way, row i is bit for bit what client i computes alone.
    experiment = Experiment.from_config(sinusoid(algorithm))
    params = experiment.initial_params()
    clients = [0, 7, 12, 33, 59]

    rows = experiment.cohort_update(params, clients, round_index=4)

    assert rows.client_ids == tuple(f"train-{c}" for c in clients)
    for i, c in enumerate(clients):
        alone = experiment.client_update(params, c, round_index=4)
        assert all(torch.equal(rows.directions[k][i], alone.direction[k]) for k in params)
        assert rows.num_tasks[i] == alone.num_tasks
        assert {k: v[i] for k, v in rows.metrics.items()} == alone.metrics


def test_the_vectorised_cohort_matches_the_per_task_reference_loop() -> None:
    # The cohort path against the readable reference (per task, per client), to float32 rounding.
    config = sinusoid("reptile")
    fast = Experiment.from_config(config)
    slow = Experiment.from_config(config.replace(**{"compute.batched": False}))
    params = fast.initial_params()

    rows = fast.cohort_update(params, [1, 2, 3], round_index=0)

    for i, c in enumerate([1, 2, 3]):
        reference = slow.client_update(params, c, round_index=0)
        for k in params:
            torch.testing.assert_close(rows.directions[k][i], reference.direction[k], rtol=1e-5, atol=1e-6)


def test_client_side_privacy_is_applied_to_each_client_of_a_cohort_with_its_own_noise() -> None:
    config = sinusoid(
        "fomaml",
        **{
            "privacy.mode": "distributed",
            "privacy.noise_multiplier": 1.0,
            "privacy.clip_norm": 0.5,
            "privacy.reproducible_noise": True,
            "federation.clients_per_round": 4,
        },
    )
    experiment = Experiment.from_config(config)
    params = experiment.initial_params()

    rows = experiment.cohort_update(params, [3, 9, 21, 40], round_index=2)

    for i, c in enumerate([3, 9, 21, 40]):
        alone = experiment.client_update(params, c, round_index=2)
        assert all(torch.equal(rows.directions[k][i], alone.direction[k]) for k in params)
        assert rows.metrics["update_norm"][i] == alone.metrics["update_norm"] > 0
    noises = [torch.cat([rows.directions[k][i].flatten() for k in params]) for i in range(2)]
    assert not torch.equal(noises[0], noises[1])


def test_rows_mean_is_the_weighted_mean_accumulated_row_after_row_in_float64() -> None:
    generator = torch.Generator().manual_seed(0)
    rows = {"w": torch.randn(5, 3, 2, generator=generator), "b": torch.randn(5, generator=generator)}
    weights = [1.0, 3.0, 2.0, 0.5, 4.0]

    mean = rows_mean(rows, weights)

    w = [x / sum(weights) for x in weights]
    for k, v in rows.items():
        expected = torch.zeros(v.shape[1:], dtype=torch.float64)
        for i in range(5):
            expected = expected + w[i] * v[i].double()
        assert torch.equal(mean[k], expected.float())
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            mean.values(),
            tree_mean([{k: v[i] for k, v in rows.items()} for i in range(5)], weights).values(),
            strict=True,
        )
    )
    with pytest.raises(ValueError, match="positive sum"):
        rows_mean(rows, [0.0] * 5)


def test_the_server_aggregates_rows_exactly_like_individual_updates_and_rejects_bad_rows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    params = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    generator = torch.Generator().manual_seed(1)
    updates = [
        (
            f"c{i}",
            ClientUpdate(
                {k: torch.randn(v.shape, generator=generator) for k, v in params.items()}, i + 1, {"m": float(i)}
            ),
        )
        for i in (3, 0, 2, 1)
    ]
    updates[1][1].direction["w"][0, 0] = float("nan")  # client c0 is refused either way
    optimizer = OuterOptimizer("adam", 0.01)
    from fedmeta.round import init_state

    state = init_state(params, optimizer)
    with caplog.at_level(logging.WARNING):
        from_pairs, pair_metrics = apply_round(state, updates, optimizer)
        from_rows, row_metrics = apply_round(state, ClientRows.of(updates), optimizer)

    assert all(torch.equal(from_pairs.params[k], from_rows.params[k]) for k in params)
    assert pair_metrics == row_metrics and row_metrics["rejected"] == 1 and row_metrics["clients"] == 3
    assert sum("client c0" in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records) == 2

    wrong = ClientRows(("x", "y"), {"w": torch.zeros(2, 2, 3), "b": torch.zeros(2, 2)}, (1, 1))
    unchanged, metrics = apply_round(state, wrong, optimizer)
    assert metrics == {"clients": 0, "rejected": 2} and unchanged.round == 1
    assert "w: got (2, 3)" in caplog.text


@pytest.mark.parametrize(
    "privacy",
    [
        {},
        {
            "privacy.mode": "central",
            "privacy.noise_multiplier": 0.8,
            "privacy.clip_norm": 0.3,
            "privacy.adaptive_clipping": True,
        },
        {"privacy.mode": "distributed", "privacy.noise_multiplier": 0.8, "privacy.clip_norm": 0.3},
    ],
    ids=["plain", "central-adaptive", "distributed"],
)
def test_a_run_with_cohorts_equals_the_run_one_client_at_a_time(tmp_path: Path, privacy: dict) -> None:
    config = sinusoid(
        "reptile",
        **{
            "federation.rounds": 5,
            "federation.clients_per_round": 12,
            "eval.eval_clients": 2,
            "eval.eval_tasks_per_client": 2,
            "eval.fedavg_rounds": 0,
            "privacy.reproducible_noise": True,
            **privacy,
        },
    )
    simulate(config, tmp_path / "cohorts", progress=False)
    simulate(config.replace(**{"compute.cohorts": False}), tmp_path / "loop", progress=False)

    cohorts, loop = (load_checkpoint(tmp_path / name / "checkpoint.pt")[1] for name in ("cohorts", "loop"))
    assert all(torch.equal(cohorts.params[k], loop.params[k]) for k in loop.params)
    assert cohorts.dp_releases == loop.dp_releases and cohorts.clip_norm == loop.clip_norm
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "elapsed", "run_id")} for r in rows]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "cohorts" / "metrics.jsonl")) == strip(
        read_jsonl(tmp_path / "loop" / "metrics.jsonl")
    )


def test_a_million_clients_cost_nothing_until_sampled() -> None:
    tracemalloc.start()
    federation = sinusoid_federation(num_train_clients=1_000_000, num_unseen_clients=20, window=0.3, seed=3)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert len(federation.train_clients) == 1_000_000
    assert size < 1_000_000  # bytes: no client has been made
    last = federation.train_clients[999_999]
    again = sinusoid_federation(num_train_clients=10, num_unseen_clients=20, window=0.3, seed=3)
    # A client is a function of (seed, index) alone: the same in any population and whenever it is made.
    assert federation.train_clients[5] == again.train_clients[5]
    assert federation.train_clients[-1] == last and last.client_id == "train-999999"
    lo, hi = last.amplitude
    assert 0.1 <= lo < hi <= 5.0 and math.isclose(hi - lo, 0.3 * 4.9)
    with pytest.raises(IndexError, match="client 1000000 of a population of 1000000"):
        federation.train_clients[1_000_000]


def test_a_run_over_a_million_clients_samples_only_what_it_needs(tmp_path: Path) -> None:
    config = sinusoid(
        "reptile",
        **{
            "data.num_train_clients": 1_000_000,
            "federation.rounds": 2,
            "federation.clients_per_round": 50,
            "eval.eval_clients": 2,
            "eval.eval_tasks_per_client": 2,
            "eval.fedavg_rounds": 0,
            "privacy.mode": "central",
            "privacy.noise_multiplier": 1.0,
        },
    )
    summary = simulate(config, tmp_path, progress=False)

    assert summary["privacy"]["population"] == 1_000_000
    assert summary["privacy"]["delta"] == pytest.approx(1_000_000**-1.1)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["phase"] == "meta"]
    assert [r["clients"] for r in rows] == [50, 50]
