"""Robust aggregation: numeric references, the norm bound, and a federation with malicious clients."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmeta.config import ConfigError, RobustConfig, RunConfig
from fedmeta.experiment import Experiment
from fedmeta.robust import coordinate_median, trimmed_mean
from fedmeta.round import apply_round, init_state
from fedmeta.server_opt import OuterOptimizer
from fedmeta.types import ClientUpdate
from simulations.inprocess import simulate


def _trees(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for _ in range(n)]


@pytest.mark.parametrize("n", [5, 6])
def test_coordinate_median_equals_numpy(n: int) -> None:
    trees = _trees(n)
    median = coordinate_median(trees)
    for k in trees[0]:
        expected = np.median(np.stack([t[k].numpy() for t in trees]), axis=0)
        np.testing.assert_allclose(median[k].numpy(), expected, rtol=1e-6)


def test_trimmed_mean_equals_a_sorted_numpy_slice() -> None:
    trees = _trees(10)
    trimmed = trimmed_mean(trees, 0.2)  # drops 2 at each end
    for k in trees[0]:
        s = np.sort(np.stack([t[k].numpy().astype(np.float64) for t in trees]), axis=0)
        np.testing.assert_allclose(trimmed[k].numpy(), s[2:8].mean(axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="trimming 1 from each end of 2 updates leaves nothing"):
        trimmed_mean(trees[:2], 0.5)


def test_an_update_with_an_absurd_norm_is_rejected_and_logged(caplog) -> None:
    params = {"w": torch.zeros(3)}
    optimizer = OuterOptimizer("sgd", 1.0)
    good = ClientUpdate({"w": torch.tensor([0.1, 0.0, 0.0])}, 1)
    huge = ClientUpdate({"w": torch.tensor([1e6, 0.0, 0.0])}, 1)
    with caplog.at_level(logging.WARNING):
        state, metrics = apply_round(
            init_state(params, optimizer),
            [("a", good), ("b", huge)],
            optimizer,
            robust=RobustConfig(max_update_norm=10.0),
        )
    assert metrics["rejected"] == 1 and torch.allclose(state.params["w"], torch.tensor([-0.1, 0.0, 0.0]))
    assert "rejected update from client b: norm 1e+06 exceeds robust.max_update_norm 10" in caplog.text


def test_robust_aggregation_is_refused_with_privacy_or_secagg() -> None:
    with pytest.raises(ConfigError, match="'median' needs individual updates in the clear"):
        RunConfig().replace(**{"robust.aggregator": "median", "privacy.mode": "central"})
    with pytest.raises(ConfigError, match="robust.aggregator must be one of"):
        RunConfig().replace(**{"robust.aggregator": "krum"})


MALICIOUS = {0, 1}  # 2 of 12 training clients send their update flipped and scaled by 20


def _attacked_run(tmp_path: Path, monkeypatch, aggregator: str, attack: bool) -> tuple[float, float]:
    """(meta-model MSE, random-init MSE) on unseen clients after 5 adaptation steps."""
    honest = Experiment.client_update

    def client_update(self, params, client_index, round_index):
        update = honest(self, params, client_index, round_index)
        if attack and client_index in MALICIOUS:
            return ClientUpdate({k: -20 * v for k, v in update.direction.items()}, update.num_tasks, update.metrics)
        return update

    monkeypatch.setattr(Experiment, "client_update", client_update)
    config = RunConfig().replace(
        **{
            "data.num_train_clients": 12,
            "data.num_unseen_clients": 5,
            "federation.rounds": 40,
            "federation.clients_per_round": 8,
            "federation.tasks_per_client": 2,
            "eval.eval_clients": 5,
            "eval.eval_tasks_per_client": 5,
            "inner.eval_steps": 5,
            "eval.fedavg_rounds": 0,
            "outer.outer_lr": 0.02,
            "robust.aggregator": aggregator,
            "robust.trim_fraction": 0.25,  # drops 2 of 8 at each end: as many as there are liars
            "compute.cohorts": False,  # one client_update per client: the liars are patched in there
        }
    )
    summary = simulate(config, tmp_path / f"{aggregator}-{attack}", progress=False)
    results = summary["results"]
    return results["meta"]["over_tasks"][5]["mean"], results["random_init"]["over_tasks"][5]["mean"]


def test_median_and_trimmed_mean_still_learn_under_attack(tmp_path: Path, monkeypatch) -> None:
    clean, random_init = _attacked_run(tmp_path, monkeypatch, "mean", attack=False)
    broken, _ = _attacked_run(tmp_path, monkeypatch, "mean", attack=True)
    median, _ = _attacked_run(tmp_path, monkeypatch, "median", attack=True)
    trimmed, _ = _attacked_run(tmp_path, monkeypatch, "trimmed-mean", attack=True)
    print(
        f"MSE after 5 steps: random init {random_init:.3f}, clean {clean:.3f}, attacked mean {broken:.3f}, "
        f"median {median:.3f}, trimmed {trimmed:.3f}"
    )
    assert not broken < random_init  # the plain mean is wrecked by 2 liars (inf or NaN here)
    for robust in (median, trimmed):  # the robust aggregates learn: well below random init, near the clean run
        assert robust < 0.6 * random_init and robust < 2 * clean
