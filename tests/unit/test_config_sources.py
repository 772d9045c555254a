"""One source for the configuration: the dataclasses in `fedmeta/config.py`. The `fedmeta simulate` options,
Flower's app config in pyproject.toml and the README's option table are derived from them or checked here."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from fedmeta.algorithms import ALGORITHMS, BASELINES
from fedmeta.config import ALGORITHM_NAMES, BASELINE_NAMES, RunConfig
from simulations.cli import build_parser, config_from_args, config_options
from simulations.deploy import app_config

ROOT = Path(__file__).resolve().parents[2]


def simulate(*argv: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["simulate", *argv]))


def test_the_config_knows_the_algorithm_registry_by_name() -> None:
    assert set(ALGORITHM_NAMES) == set(ALGORITHMS) and set(BASELINE_NAMES) == set(BASELINES)
    assert all(cls.name == name for name, cls in {**ALGORITHMS, **BASELINES}.items())


def test_every_simulate_option_sets_its_own_field_with_the_fields_type() -> None:
    defaults = RunConfig()
    flat = defaults.to_flat()
    options = config_options()
    assert len({flag for flag, _, _ in options}) == len(options) == len({key for _, key, _ in options})
    for flag, key, field in options:
        assert field.metadata["help"], key
        # Options that only make sense with another one get it (RunConfig refuses them alone, by name).
        needs = {
            "maml": ["--algorithm", "maml"],
            "matching": ["--algorithm", "matching", "--dataset", "omniglot"],
            "perfedavg": ["--algorithm", "perfedavg"],
            "privacy": ["--dp", "central"],
            "episode.client_tasks": ["--dataset", "femnist"],
            "episode.joint_embedding": ["--algorithm", "protonet", "--dataset", "omniglot"],
            "inner.adam_state": ["--inner-optimizer", "adam", "--outer-optimizer", "sgd"],
            "federation.fit_rounds": ["--time-budget", "3"],
        }
        needs = needs.get(key, needs.get(key.partition(".")[0], []))
        if isinstance(field.default, bool):  # a flag turns the default around
            changed = simulate(*needs, flag)
            expected = not field.default
        else:
            choices = ALGORITHM_NAMES if key == "algorithm" else field.metadata["choices"]
            value = next(c for c in choices if c != field.default) if choices else _another(key, field.default)
            changed = simulate(*needs, flag, str(value))
            expected = value
        after = changed.to_flat()
        assert after[key] == expected and type(after[key]) is type(expected), (flag, key, after[key])
        base = simulate(*needs).to_flat() if needs else flat
        moved = {k for k in after if k != key and after[k] != base.get(k)}
        assert not moved, (flag, moved)  # the option sets its own field and no other


def _another(key: str, default: object) -> object:
    """A valid value other than the default, of the field's type."""
    special = {
        "federation.client_fraction": 0.5,
        "privacy.delta": 1e-6,
        "privacy.target_epsilon": 50.0,
        "robust.trim_fraction": 0.2,
        "robust.max_update_norm": 10.0,
        "federation.time_budget": 3.0,
        "data.data_dir": "/tmp/data",
        "episode.train_ways": 5,  # = the default ways: valid for a head-based algorithm too
        "episode.train_shots": 3,
        "episode.train_queries": 4,
        "episode.client_samples": 16,
        "eval.fedavg_rounds": 7,
        "data.drawers_per_client": 4,
    }
    if key in special:
        return special[key]
    return default + 1 if isinstance(default, int) else default * 2


def test_options_that_need_another_option_are_still_refused_with_its_name() -> None:
    # The generated parser still goes through RunConfig's checks.
    with pytest.raises(ValueError, match="robust.aggregator 'median' needs individual updates"):
        simulate("--aggregator", "median", "--dp", "central")


def test_the_flower_app_config_is_derived_from_the_dataclasses() -> None:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    expected = app_config()
    missing, extra = sorted(set(expected) - set(table)), sorted(set(table) - set(expected))
    assert not missing and not extra, f"pyproject.toml app config: missing {missing}, unknown {extra}"
    wrong = {
        k: (table[k], expected[k])
        for k in expected
        if table[k] != expected[k] or type(table[k]) is not type(expected[k])
    }
    assert not wrong, (
        f"pyproject.toml disagrees with the dataclasses (regenerate: python -m simulations.deploy): {wrong}"
    )


def test_every_simulate_option_is_in_the_readme_option_table_and_back() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `--")]
    in_table = {flag for row in rows for flag in re.findall(r"--[a-z][a-z0-9-]*", row.split(" | ")[0])}
    parser_flags = {
        option for action in _simulate_parser()._actions for option in action.option_strings if option.startswith("--")
    }
    config_flags = {flag for flag, _, _ in config_options()}
    assert not config_flags - in_table, f"options missing from the README table: {sorted(config_flags - in_table)}"
    assert not in_table - parser_flags, f"README table names unknown options: {sorted(in_table - parser_flags)}"


def _simulate_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["simulate"]


def test_presets_only_name_real_fields() -> None:
    from simulations.cli import load_preset

    for preset in sorted((ROOT / "simulations" / "presets").glob("*.toml")):
        RunConfig.from_dict(load_preset(str(preset)))  # unknown keys are an error


def test_the_default_preset_spells_out_the_defaults() -> None:
    from simulations.cli import load_preset

    assert RunConfig.from_dict(load_preset("sinusoid-reptile")) == RunConfig()
    assert dataclasses.asdict(RunConfig()) == RunConfig().to_dict()
