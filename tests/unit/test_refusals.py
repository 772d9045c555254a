"""Refuse or warn, never silently change (issue #12): too many clients per round, DP without noise, a resume
from another run's checkpoint; summary.json is strict JSON."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from fedmeta.checkpoint import CheckpointError
from fedmeta.config import ConfigError
from fedmeta.metrics import read_jsonl
from simulations.inprocess import simulate
from tests.flower_fakes import small


def test_more_clients_per_round_than_exist_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="clients_per_round is 50, but the federation has only 4 training clients"):
        simulate(small(**{"federation.clients_per_round": 50}), "/nonexistent/never-written", progress=False)


def test_dp_without_noise_warns_and_summary_json_stays_strict(tmp_path: Path, caplog) -> None:
    config = small(**{"privacy.mode": "central", "privacy.noise_multiplier": 0.0, "federation.rounds": 1})
    with caplog.at_level(logging.WARNING):
        summary = simulate(config, tmp_path, progress=False)
    assert "epsilon is infinite" in caplog.text
    assert summary["privacy"]["epsilon"] == float("inf")
    text = (tmp_path / "summary.json").read_text()

    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    on_disk = json.loads(text, parse_constant=refuse)  # strict: no Infinity / NaN tokens
    assert on_disk["privacy"]["epsilon"] is None
    assert all(
        row.get("epsilon", 0) is None for row in read_jsonl(tmp_path / "metrics.jsonl") if row["phase"] == "meta"
    )


def test_resume_refuses_a_checkpoint_from_another_run(tmp_path: Path) -> None:
    config = small(**{"federation.rounds": 2})
    simulate(config, tmp_path / "a", progress=False)
    simulate(config, tmp_path / "b", progress=False)
    shutil.copy(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")  # same config, other run
    before = (tmp_path / "b" / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=r"belongs to run [0-9a-f]+ but .*metrics.jsonl to run [0-9a-f]+"):
        simulate(config, tmp_path / "b", progress=False, resume=True)
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == before  # nothing lost
    # Its own checkpoint resumes (nothing left to do: the run is complete) and keeps the run id.
    again = simulate(config, tmp_path / "a", progress=False, resume=True)
    assert again["run_id"] == read_jsonl(tmp_path / "a" / "metrics.jsonl")[0]["run_id"]


def test_the_printed_summary_of_a_diverged_run_says_so(tmp_path: Path) -> None:
    # summary.json keeps non-finite values as null; the table printed from it says "not finite".
    from fedmeta.evaluation import format_summary

    config = small(**{"federation.rounds": 2, "outer.optimizer": "sgd", "outer.outer_lr": 1e30})
    simulate(config, tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["results"]["meta"]["over_tasks"][-1]["mean"] is None
    assert "not finite" in format_summary(on_disk).splitlines()[2]
