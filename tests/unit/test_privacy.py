"""Client-level DP: clipping bounds, the noise's statistics, accounting against dp-accounting computed here
independently, the zero-noise degenerate case, budgets and adaptive clipping."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_accounting import NeighboringRelation, dp_event, rdp

from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import ConfigError, RunConfig
from fedmeta.experiment import Experiment, Outer
from fedmeta.metrics import read_jsonl
from fedmeta.privacy import ClientPrivacy, ServerPrivacy, clip_to_norm, epsilon_spent, global_norm
from fedmeta.types import ClientUpdate
from simulations.inprocess import simulate

SMALL = {
    "data.num_train_clients": 20,
    "data.num_unseen_clients": 2,
    "federation.rounds": 4,
    "federation.clients_per_round": 5,
    "federation.tasks_per_client": 2,
    "eval.eval_clients": 2,
    "eval.eval_tasks_per_client": 2,
    "inner.eval_steps": 1,
    "eval.fedavg_rounds": 0,
}


def random_update(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(7, 3, generator=g) * scale, "b": torch.randn(3, generator=g) * scale}


def test_every_clipped_update_has_norm_at_most_c() -> None:
    for seed, scale in enumerate([0.0, 1e-6, 0.1, 1.0, 10.0, 1e6]):
        update = random_update(seed, scale)
        clipped, norm = clip_to_norm(update, clip_norm=0.5)
        assert global_norm(clipped) <= 0.5 * (1 + 1e-6)
        assert norm == pytest.approx(global_norm(update))
        if norm <= 0.5:  # below the bound nothing changes
            assert all(torch.equal(clipped[k], update[k]) for k in update)
    with pytest.raises(ValueError, match="cannot clip an update of norm nan"):
        clip_to_norm({"w": torch.tensor([float("nan")])}, 1.0)


def test_central_noise_has_std_z_times_c_on_the_sum() -> None:
    # Zero updates isolate the noise: sum = N(0, (zC)^2) per coordinate, mean = sum / m.
    z, c, m = 1.3, 0.7, 4
    privacy = ServerPrivacy(mode="central", noise_multiplier=z, accounted_multiplier=z)
    zeros = [{"w": torch.zeros(200_000)} for _ in range(m)]

    mean, _, _ = privacy.aggregate(zeros, clip_norm=c, sampled=m, generator=torch.Generator().manual_seed(0))

    std = float((mean["w"] * m).std())
    # 200k samples: the relative standard error of a sample std is 1/sqrt(2n) = 0.16%; allow 1%.
    assert std == pytest.approx(z * c, rel=0.01)
    assert abs(float(mean["w"].mean())) < 5 * z * c / m / math.sqrt(200_000)


def test_distributed_shares_add_up_to_the_central_noise() -> None:
    z, c, m = 0.8, 2.0, 9
    client = ClientPrivacy(clip_norm=c, noise_std=z * c / math.sqrt(m))
    zero = ClientUpdate({"w": torch.zeros(100_000)}, num_tasks=1)
    shares = [client.privatize(zero, torch.Generator().manual_seed(s)).direction["w"] for s in range(m)]
    assert float(torch.stack(shares).sum(0).std()) == pytest.approx(z * c, rel=0.01)


def test_noise_multiplier_zero_gives_exactly_the_non_private_run(tmp_path: Path) -> None:
    base = RunConfig().replace(**SMALL)
    private = base.replace(**{"privacy.mode": "central", "privacy.noise_multiplier": 0.0, "privacy.clip_norm": 1e9})

    simulate(base, tmp_path / "plain", progress=False)
    simulate(private, tmp_path / "dp", progress=False)

    plain = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")[1].params
    dp = load_checkpoint(tmp_path / "dp" / "checkpoint.pt")[1].params
    assert all(torch.equal(plain[k], dp[k]) for k in plain)


@pytest.mark.parametrize(
    "z, m, n, rounds, delta", [(1.0, 10, 1000, 100, 1e-5), (0.7, 50, 2000, 300, 1e-6), (2.0, 5, 20, 10, 1e-3)]
)
def test_epsilon_equals_an_independent_dp_accounting_computation(z, m, n, rounds, delta) -> None:
    # The mechanism: fixed-size sampling of m of n clients without replacement, replace-one neighbours, noise
    # std z C on a sum whose replace-one sensitivity is 2C -> Gaussian with multiplier z / 2.
    accountant = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_event.SampledWithoutReplacementDpEvent(n, m, dp_event.GaussianDpEvent(z / 2)), rounds)

    assert epsilon_spent(noise_multiplier=z, sample_size=m, population=n, rounds=rounds, delta=delta) == pytest.approx(
        accountant.get_epsilon(delta), rel=1e-12
    )


def test_epsilon_grows_round_by_round_in_the_metrics_and_lands_in_the_summary(tmp_path: Path) -> None:
    config = RunConfig().replace(**{**SMALL, "privacy.mode": "central", "privacy.noise_multiplier": 1.1})

    summary = simulate(config, tmp_path, progress=False)

    epsilons = [r["epsilon"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["phase"] == "meta"]
    assert len(epsilons) == 4 and all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False))
    expected = epsilon_spent(noise_multiplier=1.1, sample_size=5, population=20, rounds=4, delta=1 / 20**1.1)
    assert summary["privacy"]["epsilon"] == pytest.approx(expected) == pytest.approx(epsilons[-1])
    assert summary["privacy"]["delta"] == pytest.approx(1 / 20**1.1)


def test_a_run_over_its_target_epsilon_refuses_to_start() -> None:
    config = RunConfig().replace(
        **{**SMALL, "privacy.mode": "central", "privacy.noise_multiplier": 0.5, "privacy.target_epsilon": 1.0}
    )
    with pytest.raises(
        ConfigError, match=r"4 rounds at noise multiplier 0.5 would spend epsilon .* > target_epsilon 1"
    ):
        Experiment.from_config(config)
    Outer(config.replace(**{"privacy.noise_multiplier": 20.0}), 20).check_budget()  # within budget: no error


def test_local_dp_is_accounted_without_amplification() -> None:
    config = RunConfig().replace(**{**SMALL, "privacy.mode": "local", "privacy.noise_multiplier": 2.0})
    outer = Outer(config, 20)
    local = outer.epsilon(outer.initial_state({}), [2.0] * 4)
    central = Outer(config.replace(**{"privacy.mode": "central"}), 20).epsilon(outer.initial_state({}), [2.0] * 4)
    assert local == pytest.approx(
        epsilon_spent(noise_multiplier=2.0, sample_size=20, population=20, rounds=4, delta=outer.delta)
    )
    assert local > central


def test_adaptive_clipping_moves_c_towards_the_target_quantile() -> None:
    privacy = ServerPrivacy(
        mode="central",
        noise_multiplier=0.0,
        accounted_multiplier=1.0,
        adaptive=True,
        target_quantile=0.5,
        clip_lr=0.2,
        count_noise_std=0.0,
    )
    big = [random_update(s, 100.0) for s in range(8)]  # every norm above C: C must grow
    small = [random_update(s, 1e-4) for s in range(8)]  # every norm below C: C must shrink
    gen = torch.Generator().manual_seed(0)

    _, grown, _ = privacy.aggregate(big, clip_norm=1.0, sampled=8, generator=gen)
    _, shrunk, _ = privacy.aggregate(small, clip_norm=1.0, sampled=8, generator=gen)

    assert grown == pytest.approx(math.exp(0.2 * 0.5)) and shrunk == pytest.approx(math.exp(-0.2 * 0.5))


def test_adaptive_clipping_state_is_checkpointed(tmp_path: Path) -> None:
    config = RunConfig().replace(
        **{
            **SMALL,
            "privacy.mode": "central",
            "privacy.noise_multiplier": 0.5,
            "privacy.adaptive_clipping": True,
            "federation.clients_per_round": 20,
            "privacy.clip_norm": 100.0,
        }
    )
    simulate(config, tmp_path, progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt")[1]
    assert state.clip_norm is not None and state.clip_norm < 100.0  # updates are far below 100: C shrinks
    assert state.dp_releases == (0.5,) * 4
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["phase"] == "meta"]
    assert [r["clip_norm"] for r in rows][0] == 100.0 and np.all(np.diff([r["clip_norm"] for r in rows]) < 0)


def test_bad_privacy_settings_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="privacy mode must be one of"):
        RunConfig().replace(**{"privacy.mode": "on"})
    with pytest.raises(ConfigError, match="adaptive_clipping needs privacy mode 'central', got 'distributed'"):
        RunConfig().replace(**{"privacy.mode": "distributed", "privacy.adaptive_clipping": True})
    with pytest.raises(ConfigError, match="noise_multiplier must be >= 0, got -1"):
        RunConfig().replace(**{"privacy.noise_multiplier": -1})


def test_the_fedavg_baseline_trains_under_the_runs_privacy_and_its_epsilon_is_reported(tmp_path: Path) -> None:
    # The baseline is trained on the same clients' data: it leaves a client with the same protection.
    config = RunConfig().replace(
        **{
            **SMALL,
            "privacy.mode": "distributed",
            "privacy.clip_norm": 0.5,
            "privacy.noise_multiplier": 1.0,
            "eval.fedavg_rounds": 2,
        }
    )
    summary = simulate(config, tmp_path, progress=False)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["phase"] == "fedavg"]
    assert len(rows) == 2 and all(r["epsilon"] > 0 for r in rows)
    assert summary["privacy"]["fedavg_epsilon"] == rows[-1]["epsilon"]
    plain = simulate(config.replace(**{"privacy.mode": "off"}), tmp_path / "plain", progress=False)
    assert plain["results"]["fedavg"] != summary["results"]["fedavg"]  # the noise reached the baseline


def test_reptiles_carried_adam_state_is_noised_with_the_direction_and_read_clamped(tmp_path: Path) -> None:
    from fedmeta.algorithms.reptile import STATE_PREFIX

    recipe = {
        "inner.inner_optimizer": "adam",
        "inner.adam_state": "carried",
        "outer.optimizer": "sgd",
        "outer.outer_lr": 1.0,
    }
    config = RunConfig().replace(**{**SMALL, **recipe, "privacy.mode": "central", "privacy.noise_multiplier": 1.0})

    summary = simulate(config, tmp_path, progress=False)

    params = load_checkpoint(tmp_path / "checkpoint.pt")[1].params
    state = [v for k, v in params.items() if k.startswith(f"{STATE_PREFIX}v.")]
    assert state and all(torch.isfinite(v).all() for v in state)
    assert any((v < 0).any() for v in state)  # the noise reached the state: a negative second moment, read as 0
    assert all(math.isfinite(s["mean"]) for s in summary["results"]["meta"]["over_tasks"])
