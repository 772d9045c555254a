"""Sum-only cohort replies (`compute.reply = "sum"`): a cohort's clipped, weighted sum gives the server the step
it takes from the same cohort's rows (to float64 rounding), with the same refusals, clipping and DP releases."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import ConfigError, RunConfig
from fedmeta.metrics import read_jsonl
from fedmeta.privacy.mechanism import ServerPrivacy, global_norm
from fedmeta.round import apply_round, apply_sum, init_state, sum_rows
from fedmeta.server_opt import OuterOptimizer
from fedmeta.types import ClientRows, ClientUpdate, CohortSum
from simulations.inprocess import simulate

PARAMS = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}


def rows_of(norms: list[float], tasks: list[int], seed: int = 0) -> ClientRows:
    """Rows of clients c<i> with directions of the given global norms."""
    generator = torch.Generator().manual_seed(seed)
    updates = []
    for i, (norm, n) in enumerate(zip(norms, tasks, strict=True)):
        direction = {k: torch.randn(v.shape, generator=generator) for k, v in PARAMS.items()}
        scale = norm / global_norm(direction)
        updates.append((f"c{i}", ClientUpdate({k: v * scale for k, v in direction.items()}, n, {"loss": float(i + 1)})))
    return ClientRows.of(updates[::-1])  # out of client order: both paths sort


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_the_sum_is_the_weighted_sum_of_the_accepted_rows_and_names_the_refused_ones() -> None:
    rows = rows_of([1.0, 2.0, 9.0, 0.5, 1.5], [1, 2, 3, 0, 2])
    rows.directions["b"][rows.client_ids.index("c4"), 1] = float("inf")

    cohort = sum_rows(rows, PARAMS, max_norm=5.0)

    kept = ["c0", "c1"]  # c2 too long, c3 no tasks, c4 not finite
    expected = {k: sum(rows.num_tasks[rows.client_ids.index(c)] * v[rows.client_ids.index(c)].double() for c in kept)
                for k, v in rows.directions.items()}  # fmt: skip
    close(cohort.total, expected)
    assert cohort.total["w"].dtype == torch.float64
    assert (cohort.weight, cohort.count, cohort.tasks, cohort.first_id) == (3.0, 2, 3, "c0")
    assert cohort.metrics == {"loss": 1 * 1.0 + 2 * 2.0}
    assert [c for c, _ in cohort.rejected] == ["c2", "c3", "c4"]
    reasons = dict(cohort.rejected)
    assert "exceeds robust.max_update_norm 5" in reasons["c2"]
    assert "num_tasks must be positive" in reasons["c3"] and "NaN or Inf" in reasons["c4"]


def test_the_server_steps_from_a_sum_as_from_its_rows(caplog: pytest.LogCaptureFixture) -> None:
    rows = rows_of([1.0, 2.0, 3.0, 0.7], [1, 2, 3, 1])
    rows.directions["w"][rows.client_ids.index("c2"), 0, 0] = float("nan")
    optimizer = OuterOptimizer("adam", 0.01)
    state = init_state(PARAMS, optimizer)

    with caplog.at_level(logging.WARNING):
        from_rows, row_metrics = apply_round(state, rows, optimizer)
        from_sum, sum_metrics = apply_sum(state, sum_rows(rows, PARAMS), optimizer)

    close(from_sum.params, from_rows.params)
    assert sum_metrics.keys() == row_metrics.keys()
    assert sum_metrics == pytest.approx(row_metrics, rel=1e-9)
    assert (sum_metrics["clients"], sum_metrics["rejected"]) == (3, 1)
    assert sum("client c2" in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records) == 2


def test_parts_from_several_workers_add_up_in_client_order_whatever_the_arrival() -> None:
    rows = rows_of([1.0, 2.0, 3.0, 0.7, 1.2], [1, 2, 3, 1, 2])
    whole = sum_rows(rows, PARAMS)
    parts = [sum_rows(rows.take(index), PARAMS) for index in ([0, 2], [1, 4], [3])]

    combined, reversed_ = CohortSum.combine(parts), CohortSum.combine(parts[::-1])

    assert all(torch.equal(combined.total[k], reversed_.total[k]) for k in PARAMS)
    close(combined.total, whole.total)
    assert (combined.weight, combined.count, combined.tasks) == (whole.weight, whole.count, whole.tasks)
    assert combined.metrics == pytest.approx(whole.metrics) and combined.first_id == "c0"


def test_under_central_dp_the_worker_clips_and_the_server_releases_as_for_rows() -> None:
    rows = rows_of([0.2, 2.0, 5.0, 0.4], [1, 2, 3, 1])
    privacy = ServerPrivacy(mode="central", noise_multiplier=0.9, accounted_multiplier=0.9)
    optimizer = OuterOptimizer("sgd", 1.0)
    state = init_state(PARAMS, optimizer, clip_norm=1.0)

    def step(updates: ClientRows | CohortSum) -> tuple:
        generator = torch.Generator().manual_seed(7)
        run = apply_sum if isinstance(updates, CohortSum) else apply_round
        return run(state, updates, optimizer, privacy=privacy, sampled=5, generator=generator)

    cohort = sum_rows(rows, PARAMS, clip_norm=1.0, equal_weights=True)
    (from_rows, row_metrics), (from_sum, sum_metrics) = step(rows), step(cohort)

    assert (cohort.weight, cohort.clipped) == (4.0, 2)  # every client counts once; two were longer than C
    close(from_sum.params, from_rows.params)
    assert from_sum.dp_releases == from_rows.dp_releases == (0.9,)
    assert sum_metrics["clipped_fraction"] == row_metrics["clipped_fraction"] == 0.5
    adaptive = ServerPrivacy(mode="central", noise_multiplier=0.9, accounted_multiplier=0.9, adaptive=True)
    with pytest.raises(ValueError, match="adaptive clipping"):
        apply_sum(state, cohort, optimizer, privacy=adaptive, sampled=5, generator=torch.Generator())


def test_a_bad_sum_is_refused_whole_and_leaves_the_state(caplog: pytest.LogCaptureFixture) -> None:
    optimizer = OuterOptimizer("adam", 0.01)
    state = init_state(PARAMS, optimizer)
    nan = CohortSum({k: torch.full(v.shape, float("nan"), dtype=torch.float64) for k, v in PARAMS.items()}, 2.0, 2, 2)
    wrong = ClientRows(("x", "y"), {"w": torch.zeros(2, 2, 3), "b": torch.zeros(2, 2)}, (1, 1))

    with caplog.at_level(logging.WARNING):
        after_nan, nan_metrics = apply_sum(state, nan, optimizer)
        after_wrong, wrong_metrics = apply_sum(state, sum_rows(wrong, PARAMS), optimizer)

    for after in (after_nan, after_wrong):
        assert after.round == 1 and all(torch.equal(after.params[k], PARAMS[k]) for k in PARAMS)
    assert nan_metrics == {"clients": 0, "rejected": 2} and "rejected the cohorts' sum" in caplog.text
    assert wrong_metrics == {"clients": 0, "rejected": 2} and "w: got (2, 3)" in caplog.text


def sinusoid(**overrides: object) -> RunConfig:
    return RunConfig().replace(
        **{
            "algorithm": "reptile",
            "data.num_train_clients": 60,
            "data.num_unseen_clients": 3,
            "federation.tasks_per_client": 3,
            "federation.rounds": 5,
            "federation.clients_per_round": 12,
            "inner.inner_steps": 2,
            "eval.eval_clients": 2,
            "eval.eval_tasks_per_client": 2,
            "eval.fedavg_rounds": 0,
            "privacy.reproducible_noise": True,
            **overrides,
        }
    )


@pytest.mark.parametrize(
    "privacy",
    [
        {},
        {"privacy.mode": "central", "privacy.noise_multiplier": 0.8, "privacy.clip_norm": 0.3},
        {"privacy.mode": "distributed", "privacy.noise_multiplier": 0.8, "privacy.clip_norm": 0.3},
    ],
    ids=["plain", "central", "distributed"],
)
def test_a_run_on_sums_equals_the_run_on_rows(tmp_path: Path, privacy: dict) -> None:
    config = sinusoid(**privacy)
    simulate(config, tmp_path / "rows", progress=False)
    simulate(config.replace(**{"compute.reply": "sum"}), tmp_path / "sum", progress=False)

    rows, sums = (load_checkpoint(tmp_path / name / "checkpoint.pt")[1] for name in ("rows", "sum"))
    close(sums.params, rows.params)
    assert sums.dp_releases == rows.dp_releases
    row_metrics = [r for r in read_jsonl(tmp_path / "rows" / "metrics.jsonl") if r.get("phase") == "meta"]
    sum_metrics = [r for r in read_jsonl(tmp_path / "sum" / "metrics.jsonl") if r.get("phase") == "meta"]
    for a, b in zip(row_metrics, sum_metrics, strict=True):
        assert a.keys() == b.keys()
        for key in ("clients", "rejected", "tasks", "epsilon", "clipped_fraction"):
            assert a.get(key) == pytest.approx(b.get(key))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"compute.cohorts": False}, "needs cohorts"),
        ({"robust.aggregator": "median"}, "needs the mean aggregator"),
        (
            {"privacy.mode": "central", "privacy.noise_multiplier": 1.0, "privacy.adaptive_clipping": True},
            "needs a fixed clip norm",
        ),
        ({"compute.reply": "all"}, "compute.reply must be one of"),
    ],
)
def test_a_sum_reply_where_the_server_needs_more_is_refused_in_one_line(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sinusoid(**{"compute.reply": "sum", **overrides})


def test_a_cohort_whose_every_update_is_refused_sums_to_nothing_and_the_server_does_not_step() -> None:
    rows = rows_of([1.0, 2.0], [1, 1])
    rows.directions["b"][:] = float("nan")
    optimizer = OuterOptimizer("adam", 0.01)
    state = init_state(PARAMS, optimizer)

    cohort = sum_rows(rows, PARAMS)
    empty = sum_rows(ClientRows((), {k: v.new_zeros((0, *v.shape)) for k, v in PARAMS.items()}, ()), PARAMS)
    after, metrics = apply_sum(state, cohort, optimizer)

    assert (cohort.count, cohort.weight, len(cohort.rejected)) == (0, 0.0, 2)
    assert (empty.count, empty.rejected) == (0, ()) and all(not v.any() for v in empty.total.values())
    assert metrics == {"clients": 0, "rejected": 2} and after.round == 1
    assert all(torch.equal(after.params[k], PARAMS[k]) for k in PARAMS)
