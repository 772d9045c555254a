"""Bad configuration gets one clear error each; checkpoints round-trip and refuse to load when damaged."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmeta.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedmeta.config import ALGORITHM_NAMES, ConfigError, RunConfig
from fedmeta.evaluation import mean_ci95, summarise
from fedmeta.experiment import build_run_algorithm
from fedmeta.round import init_state
from fedmeta.server_opt import OuterOptimizer
from simulations.cli import load_preset, main


@pytest.mark.parametrize(
    "override, message",
    [
        ({"algorithm": "mamal"}, "algorithm must be one of .* got 'mamal'"),
        ({"episode.ways": 0}, "ways must be a positive integer, got 0"),
        ({"episode.shots": 1.5}, "shots must be a positive integer, got 1.5"),
        ({"inner.inner_lr": -0.1}, "inner_lr must be a positive finite number, got -0.1"),
        ({"inner.inner_lr": float("nan")}, "inner_lr must be a positive finite number, got nan"),
        ({"outer.optimizer": "rmsprop"}, "optimizer must be one of .* got 'rmsprop'"),
        ({"federation.client_fraction": 1.5}, "client_fraction must be in \\(0, 1\\], got 1.5"),
        ({"data.dataset": "mnist"}, "dataset must be one of .* got 'mnist'"),
        ({"data.drawers_per_client": 3}, "drawers_per_client must divide the 20 Omniglot drawers, got 3"),
        ({"algorithm": "protonet"}, "protonet is a classification method"),
        ({"data.conv_downsample": "avgpool"}, "conv_downsample must be one of .* got 'avgpool'"),
        ({"data.conv_channels": 0}, "conv_channels must be a positive integer, got 0"),
    ],
)
def test_bad_config_values_name_the_offending_value(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig().replace(**override)


@pytest.mark.parametrize(
    "downsample, features, max_pools", [("stride", 64 * 2 * 2, 0), ("maxpool", 64, 4), ("maxpool3", 64 * 3 * 3, 3)]
)
def test_conv_downsample_builds_that_network(downsample: str, features: int, max_pools: int) -> None:
    config = RunConfig().replace(
        **{"algorithm": "protonet", "data.dataset": "omniglot", "data.conv_downsample": downsample}
    )
    model = build_run_algorithm(config, "classification", None).model
    pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]
    strides = {m.stride for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    assert (len(pools), strides) == (max_pools, {(2, 2)} if downsample == "stride" else {(1, 1)})
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, features)


@pytest.mark.parametrize("downsample, features", [("stride", 2 * 2), ("maxpool", 1)])
def test_conv_channels_sets_every_block_and_the_embedding(downsample: str, features: int) -> None:
    config = RunConfig().replace(
        **{"algorithm": "protonet", "data.dataset": "omniglot", "data.conv_downsample": downsample}
    )
    wide = config.replace(**{"data.conv_channels": 96})
    model = build_run_algorithm(wide, "classification", None).model
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 96), (96, 96), (96, 96), (96, 96)]
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 96 * features)
    default = build_run_algorithm(config, "classification", None).model
    assert {m.out_channels for m in default.modules() if isinstance(m, torch.nn.Conv2d)} == {64}


def test_only_models_that_step_at_the_fixed_inner_rate_take_another_at_evaluation() -> None:
    """`fedmeta evaluate --inner-lr` asks `fixed_rate_refusal`: a rate means something only where adaptation
    steps at `inner_lr` - not for learned rates (Meta-SGD, MAML++'s LSLR), a learned optimizer (Meta-LSTM), or
    metric-based methods, which have no inner loop."""

    def refusal(algorithm: str, **options: object) -> str | None:
        config = RunConfig().replace(**{"algorithm": algorithm, "data.dataset": "omniglot", **options})
        built = build_run_algorithm(config, "classification", 20)
        return built.fixed_rate_refusal(built.init_params(torch.Generator().manual_seed(0)))

    fixed = {name for name in ALGORITHM_NAMES if refusal(name) is None}
    assert fixed == {"maml", "fomaml", "anil", "reptile", "perfedavg", "perfedavg-hf", "fedrep"}
    assert "learned meta-parameters" in refusal("metasgd") and "learned meta-parameters" in refusal(
        "maml", **{"maml.per_step_lr": True}
    )
    assert "no inner loop" in refusal("protonet") and "LSTM" in refusal("metalstm")


def test_unknown_config_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[inner\]: \['inner_rl'\]"):
        RunConfig.from_dict({"inner": {"inner_rl": 0.1}})
    with pytest.raises(ConfigError, match="unknown config section"):
        RunConfig.from_dict({"inners": {}})


def test_every_preset_is_a_valid_config() -> None:
    presets = sorted((Path(__file__).parents[2] / "simulations" / "presets").glob("*.toml"))
    assert presets
    for path in presets:
        RunConfig.from_dict(load_preset(path.stem))


def test_cli_reports_bad_input_as_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["simulate", "--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["simulate", "--inner-lr", "-1", "--out", str(tmp_path)]) == 2
    assert "inner_lr must be a positive finite number, got -1.0" in capsys.readouterr().err
    assert (
        main(
            [
                "simulate",
                "--dataset",
                "omniglot",
                "--algorithm",
                "maml",
                "--data-dir",
                str(tmp_path),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "Omniglot file not found" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    config = RunConfig().replace(**{"inner.inner_lr": 0.123})
    optimizer = OuterOptimizer("adam")
    params = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    state, _ = init_state(params, optimizer), None
    _, opt_state = optimizer.step(params, {k: torch.ones_like(v) for k, v in params.items()}, state.opt_state)
    state = state.__class__(params=params, opt_state=opt_state, round=7)

    save_checkpoint(tmp_path / "ck.pt", config=config, state=state, baselines={"fedavg": params})
    loaded_config, loaded, baselines = load_checkpoint(tmp_path / "ck.pt")

    assert loaded_config == config and loaded.round == 7
    assert all(torch.equal(loaded.params[k], params[k]) for k in params)
    assert torch.equal(loaded.opt_state["exp_avg_sq"]["w"], opt_state["exp_avg_sq"]["w"])
    assert loaded.opt_state["step"] == 1 and torch.equal(baselines["fedavg"]["b"], params["b"])
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind


def _recorded_saves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The round of every checkpoint written from now on; no write is ever due by the clock alone."""
    from fedmeta import checkpoint

    rounds: list[int] = []

    def recording(path: Path, *, config: RunConfig, state, baselines=None) -> None:  # noqa: ANN001
        rounds.append(state.round)
        save_checkpoint(path, config=config, state=state, baselines=baselines)

    monkeypatch.setattr(checkpoint, "save_checkpoint", recording)
    monkeypatch.setattr(checkpoint, "CHECKPOINT_SECONDS", float("inf"))
    return rounds


def test_a_run_checkpoints_after_its_first_round_its_curve_points_and_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simulations.inprocess import simulate
    from tests.unit.test_schedule_and_budget import small_run

    saves = _recorded_saves(monkeypatch)
    config = small_run(**{"federation.rounds": 20, "eval.curve_every": 8, "eval.fedavg_rounds": 0})

    simulate(config, tmp_path, progress=False)

    assert saves == [1, 8, 16, 20]  # not every round: the clock never says one is due
    assert load_checkpoint(tmp_path / "checkpoint.pt")[1].round == 20

    saves.clear()  # with differential privacy, every round: a repeated round would release fresh noise
    simulate(config.replace(**{"privacy.mode": "central"}), tmp_path / "dp", progress=False)
    assert saves == list(range(1, 21))


def test_an_interrupted_run_checkpoints_its_last_round_and_resumes_to_the_same_bits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmeta import loop
    from simulations.inprocess import simulate
    from tests.unit.test_schedule_and_budget import small_run

    config = small_run(**{"federation.rounds": 12, "eval.fedavg_rounds": 0})
    reference = simulate(config, tmp_path / "reference", progress=False)
    saves = _recorded_saves(monkeypatch)
    sample = loop.sample_clients

    def interrupted(**kwargs: int) -> list[int]:
        if kwargs["round_index"] == 7:  # Ctrl-C during round 8
            raise KeyboardInterrupt
        return sample(**kwargs)

    monkeypatch.setattr(loop, "sample_clients", interrupted)
    with pytest.raises(KeyboardInterrupt):
        simulate(config, tmp_path / "run", progress=False)
    assert saves == [1, 7]  # the first round, then the last one finished before the interruption
    monkeypatch.setattr(loop, "sample_clients", sample)

    resumed = simulate(config, tmp_path / "run", progress=False, resume=True)

    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt")[1] for name in ("run", "reference"))
    assert a.round == b.round == 12
    assert all(torch.equal(a.params[k], b.params[k]) for k in b.params)
    assert resumed["results"] == reference["results"]


def test_damaged_checkpoints_are_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt or not a fedmeta checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is not a fedmeta-checkpoint-v1 file"):
        load_checkpoint(tmp_path / "other.pt")


def test_mean_ci95_matches_numpy() -> None:
    values = np.random.default_rng(0).normal(size=50)
    result = mean_ci95(values)
    assert result["mean"] == pytest.approx(values.mean())
    assert result["ci95"] == pytest.approx(1.96 * values.std(ddof=1) / np.sqrt(50))
    assert mean_ci95([3.0]) == {"mean": 3.0, "ci95": 0.0, "n": 1}


def test_mean_ci95_of_a_diverged_adaptation_is_not_finite_without_a_numpy_warning() -> None:
    """Too high an adaptation rate sends some tasks' loss to inf: the table says "not finite", and numpy's
    "invalid value encountered in subtract" must not reach the user's terminal."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = mean_ci95([0.5, float("inf")])
    assert result["mean"] == float("inf") and not np.isfinite(result["ci95"]) and result["n"] == 2


def test_summary_separates_tasks_and_clients() -> None:
    curves = np.array([[[0.0, 1.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])  # (3, 2, 2)
    summary = summarise(curves, "accuracy")
    assert summary["over_tasks"][1]["n"] == 6 and summary["over_clients"][1]["n"] == 3
    assert summary["over_clients"][1]["mean"] == pytest.approx(np.mean([1.0, 0.5, 0.5]))


def test_defaults_are_the_main_command_and_travel_flat() -> None:
    assert RunConfig() == RunConfig.from_dict(load_preset("sinusoid-reptile"))
    config = RunConfig().replace(**{"data.data_dir": "/data", "federation.client_fraction": 0.5, "algorithm": "maml"})
    flat = config.to_flat()
    assert all(isinstance(v, int | float | str | bool) for v in flat.values())
    assert RunConfig.from_flat(flat) == config


def test_a_command_line_override_is_read_as_json_or_kept_as_a_string() -> None:
    from fedmeta.config import parse_override

    assert parse_override("outer.eps=1e-3") == ("outer.eps", 0.001)
    assert parse_override("compute.cohorts=false") == ("compute.cohorts", False)
    assert parse_override("outer.schedule=cosine") == ("outer.schedule", "cosine")
    assert RunConfig().replace(**dict([parse_override("inner.inner_steps=3")])).inner.inner_steps == 3
    with pytest.raises(ConfigError, match="an override is KEY=VALUE .* got 'outer.eps'"):
        parse_override("outer.eps")
