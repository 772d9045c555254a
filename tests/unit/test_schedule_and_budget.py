"""The outer learning-rate schedules, and training within a time budget (issue #10)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedmeta import loop
from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import ConfigError, RunConfig
from fedmeta.server_opt import OuterOptimizer
from simulations.inprocess import simulate


def test_linear_schedule_follows_reptiles_annealing() -> None:
    # Reptile's code: step i (0-based) of n uses lr * (1 - i/n) + final * i/n.
    opt = OuterOptimizer("sgd", 1.0, schedule="linear", final_lr=0.0, total_steps=4)
    assert [opt.lr_at(s) for s in (1, 2, 3, 4, 5, 9)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_cosine_schedule_is_a_half_cosine_from_lr_to_final() -> None:
    opt = OuterOptimizer("adam", 1e-3, schedule="cosine", final_lr=1e-5, total_steps=10)
    for step in (1, 4, 11):
        done = min(1.0, (step - 1) / 10)
        assert opt.lr_at(step) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * done)))
    assert opt.lr_at(1) == pytest.approx(1e-3) and opt.lr_at(11) == pytest.approx(1e-5)


def test_scheduled_sgd_and_adam_steps_use_the_scheduled_rate() -> None:
    params, direction = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.5, 0.5])}
    sgd = OuterOptimizer("sgd", 1.0, schedule="linear", total_steps=2)
    state = sgd.init(params)
    p1, state = sgd.step(params, direction, state)
    p2, state = sgd.step(p1, direction, state)
    assert torch.equal(p1["w"], params["w"] - 1.0 * direction["w"])
    assert torch.equal(p2["w"], p1["w"] - 0.5 * direction["w"])

    constant = OuterOptimizer("adam", 0.1, total_steps=2)
    cosine = OuterOptimizer("adam", 0.1, schedule="cosine", final_lr=0.0, total_steps=2)
    a, sa = constant.step(params, direction, constant.init(params))
    b, sb = cosine.step(params, direction, cosine.init(params))
    assert torch.equal(a["w"], b["w"])  # step 1: the full rate
    a, _ = constant.step(a, direction, sa)
    b, _ = cosine.step(b, direction, sb)
    # Step 2 of 2 is half way along the cosine: half the rate, so half of Adam's (sign-like) step.
    torch.testing.assert_close(b["w"] - params["w"] + 0.1, (a["w"] - params["w"] + 0.1) / 2, atol=1e-6, rtol=0)


def test_bad_schedules_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="outer.schedule must be one of"):
        RunConfig().replace(**{"outer.schedule": "step"})
    with pytest.raises(ConfigError, match="outer.final_lr must be a non-negative"):
        RunConfig().replace(**{"outer.final_lr": -1.0})
    with pytest.raises(ConfigError, match="time_budget"):
        RunConfig().replace(**{"federation.time_budget": 0})


def small_run(**overrides: object) -> RunConfig:
    base = {
        "data.num_train_clients": 6,
        "data.num_unseen_clients": 2,
        "federation.rounds": 50,
        "federation.clients_per_round": 2,
        "eval.eval_clients": 2,
        "eval.eval_tasks_per_client": 2,
        "eval.fedavg_rounds": None,
        "inner.eval_steps": 1,
    }
    return RunConfig().replace(**{**base, **overrides})


def test_a_time_budget_stops_after_the_round_that_crosses_it_and_resume_stays_within_it(tmp_path: Path) -> None:
    # A budget of 1 ms: the first round crosses it, so exactly one round is trained.
    config = small_run(**{"federation.time_budget": 1e-3 / 60})

    summary = simulate(config, tmp_path, progress=False)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    meta = [r for r in rows if r["phase"] == "meta"]
    assert summary["rounds"] == 1 and [r["round"] for r in meta] == [1]
    assert meta[0]["elapsed"] == pytest.approx(meta[0]["seconds"]) and meta[0]["elapsed"] > 0
    # The FedAvg baseline gets as many rounds as the budget allowed the meta-model.
    assert len([r for r in rows if r["phase"] == "fedavg"]) == 1
    _, state, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state.elapsed == pytest.approx(meta[0]["elapsed"])

    resumed = simulate(config, tmp_path, progress=False, resume=True)

    assert resumed["rounds"] == 1  # the budget is already spent: no further round


def test_metrics_carry_elapsed_training_seconds_and_the_outer_rate(tmp_path: Path) -> None:
    config = small_run(**{"federation.rounds": 3, "outer.schedule": "linear", "outer.final_lr": 0.0})

    simulate(config, tmp_path, progress=False)

    meta = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    meta = [r for r in meta if r["phase"] == "meta"]
    elapsed = [r["elapsed"] for r in meta]
    assert elapsed == sorted(elapsed) and elapsed[-1] == pytest.approx(sum(r["seconds"] for r in meta))
    lr = config.outer.outer_lr
    assert [r["outer_lr"] for r in meta] == pytest.approx([lr, lr * 2 / 3, lr / 3])


class TickingClock:
    """`time.perf_counter` for `fedmeta.loop`, advancing `tick` seconds at every call: each round, timed by two
    calls, takes exactly `tick` seconds."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def fitted_run(out: Path) -> tuple[RunConfig, dict, list[dict]]:
    """A run of at most 1,000 rounds, fitted to a 100 s budget, on a linear schedule to 0: its config, summary and
    meta rows."""
    config = small_run(
        **{
            "federation.rounds": 1000,
            "federation.time_budget": 100 / 60,
            "federation.fit_rounds": True,
            "outer.schedule": "linear",
            "outer.final_lr": 0.0,
            "eval.fedavg_rounds": 0,
        }
    )
    summary = simulate(config, out, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return config, summary, [r for r in rows if r["phase"] == "meta"]


def test_fit_rounds_spreads_the_schedule_over_the_rounds_that_fit_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rounds of exactly 1 s against a 100 s budget: after 11 rounds (10 timed beyond the first, 11 s >= 2% of the
    # budget) the remaining 89 s fit 89 rounds, of which FIT_MARGIN (0.9) are planned: 11 + 80 = 91.
    monkeypatch.setattr(loop, "time", TickingClock(1.0))
    config, summary, meta = fitted_run(tmp_path)
    assert summary["rounds"] == 91 and [r["round"] for r in meta] == list(range(1, 92))
    assert [r["round"] for r in meta if "planned_rounds" in r] == [11] and meta[10]["planned_rounds"] == 91
    assert meta[-1]["elapsed"] == pytest.approx(91.0)  # ended by the plan, before the budget
    lr = config.outer.outer_lr
    assert meta[0]["outer_lr"] == pytest.approx(lr)  # the first rounds follow the schedule over --rounds ...
    assert meta[10]["outer_lr"] == pytest.approx(lr * (1 - 10 / 1000))
    assert meta[11]["outer_lr"] == pytest.approx(lr * (1 - 11 / 91))  # ... then the one over the fitted rounds
    assert meta[-1]["outer_lr"] == pytest.approx(lr / 91)  # its last step: the schedule ends with the run
    _, state, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state.planned_rounds == 91  # kept for a resume, which has nothing left to train
    assert simulate(config, tmp_path, progress=False, resume=True)["rounds"] == 91


class SlowStartClock(TickingClock):
    """Rounds of `slow` seconds for the first `slow_rounds` rounds (another job beside them), then of 1 s. The
    run reads the clock once before its first round (its own start), then twice a round."""

    def __init__(self, slow: float, slow_rounds: int) -> None:
        super().__init__(slow)
        self.calls, self.slow_calls = 0, 1 + 2 * slow_rounds

    def perf_counter(self) -> float:
        self.calls += 1
        self.tick = self.tick if self.calls <= self.slow_calls else 1.0
        return super().perf_counter()


def test_fit_rounds_fits_again_when_the_first_rounds_were_slow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 100 s budget; the first 11 rounds take 2 s, then 1 s. The first fit (round 11, 22 s spent) plans
    # 11 + int(78 / 2 * 0.9) = 46 rounds, which would end at 57 s. Past the 30% mark, once 10 rounds are timed
    # since (round 21, 32 s), 1 s rounds fit 21 + int(68 * 0.9) = 82; the looks at 40% and 50% find 83 and 84,
    # within REFIT_CHANGE of 82, so the plan holds.
    monkeypatch.setattr(loop, "time", SlowStartClock(2.0, 11))
    config, summary, meta = fitted_run(tmp_path)
    assert [(r["round"], r["planned_rounds"]) for r in meta if "planned_rounds" in r] == [(11, 46), (21, 82)]
    assert summary["rounds"] == 82 and meta[-1]["elapsed"] == pytest.approx(22.0 + 71.0)
    lr = config.outer.outer_lr
    assert meta[20]["outer_lr"] == pytest.approx(lr * (1 - 20 / 46))  # the first fit's schedule ...
    assert meta[21]["outer_lr"] == pytest.approx(lr * (1 - 21 / 82))  # ... then the one over the refitted rounds
    assert meta[-1]["outer_lr"] == pytest.approx(lr / 82)
    assert load_checkpoint(tmp_path / "checkpoint.pt")[1].planned_rounds == 82


def test_fit_rounds_never_plans_past_the_rounds_asked_for_and_needs_a_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "time", TickingClock(1.0))
    config = small_run(**{"federation.rounds": 30, "federation.time_budget": 10.0, "federation.fit_rounds": True})

    assert simulate(config, tmp_path, progress=False)["rounds"] == 30
    assert load_checkpoint(tmp_path / "checkpoint.pt")[1].planned_rounds == 30
    with pytest.raises(ConfigError, match="fit_rounds fits the rounds to federation.time_budget, which is not set"):
        small_run(**{"federation.fit_rounds": True})
