"""A real deployment on loopback: one SuperLink and three SuperNodes as separate processes, runs submitted with
`fedmeta run` (which checks the final run status, since `flwr run` may exit 0 for a failed run).

The deployed run must give the very same meta-parameters as the in-process loop with the same seed.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import RunConfig
from fedmeta.metrics import read_jsonl
from server.grid import parse_run_config
from simulations.inprocess import simulate
from tests.flower_fakes import assert_same_results, assert_same_rows
from tests.processes import FEDMETA, LocalDeployment, private_homes

pytestmark = pytest.mark.deployment
REPO = Path(__file__).resolve().parents[2]
NUM_PARTITIONS = 4  # 3 training clients + 1 unseen client
BASE = [
    "data.num_train_clients=3",
    "data.num_unseen_clients=1",
    "federation.rounds=3",
    "federation.clients_per_round=2",
    "federation.tasks_per_client=2",
    "eval.eval_tasks_per_client=3",
    "inner.eval_steps=2",
    "eval.eval_clients=1",
]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    with private_homes() as env:
        local = LocalDeployment(env, tmp_path_factory.mktemp("deployment-logs"), REPO)
        try:
            local.start_superlink()
            for p in range(NUM_PARTITIONS):
                local.start_supernode(p, NUM_PARTITIONS)
            yield local.address, env
        finally:
            local.stop_all()
            assert all(p.poll() is not None for p in local._all)


def merged(overrides: list[str]) -> list[str]:
    """BASE with `overrides` applied key by key (a key given twice would be a TOML error)."""
    pairs = dict(item.partition("=")[::2] for item in [*BASE, *overrides])
    return [f"{k}={v}" for k, v in pairs.items()]


def fedmeta_run(deployment: tuple[str, dict[str, str]], overrides: list[str]) -> subprocess.CompletedProcess:
    address, env = deployment
    args = [*FEDMETA, "run", "--insecure", "--superlink", address, "--timeout", "300"]
    for item in merged(overrides):
        args += ["--run-config", item]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=360)


def local_equivalent(overrides: list[str], out: Path) -> RunConfig:
    flat = {}
    for item in merged(overrides):
        key, _, value = item.partition("=")
        flat[key] = tomllib.loads(f"value = {value}")["value"]  # what Flower's run-config parser does
    config, _ = parse_run_config({k: v for k, v in flat.items() if not k.startswith("server.")})
    simulate(config, out, progress=False)
    return config


@pytest.mark.parametrize("algorithm", ["reptile"])  # MAML bit-identity over Flower: tests/integration (Ray)
def test_deployed_run_completes_and_equals_the_in_process_loop(deployment, tmp_path: Path, algorithm: str) -> None:
    # The whole run as in-process: the FedAvg baseline (as many rounds as the run) and the learning curve.
    experiment = [f'algorithm="{algorithm}"', "eval.curve_every=2"]

    result = fedmeta_run(deployment, [*experiment, f'server.out_dir="{tmp_path / "deployed"}"'])

    assert result.returncode == 0, result.stdout + result.stderr
    assert "finished:completed" in result.stdout
    local_equivalent(experiment, tmp_path / "local")
    deployed = load_checkpoint(tmp_path / "deployed" / "checkpoint.pt")[1]
    local = load_checkpoint(tmp_path / "local" / "checkpoint.pt")[1]
    assert deployed.round == 3
    assert all(torch.equal(deployed.params[k], local.params[k]) for k in local.params)
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("deployed", "local")]
    assert summaries[0]["results"].keys() == {"meta", "random_init", "fedavg"}
    assert_same_results(summaries[0]["results"], summaries[1]["results"])
    rows = read_jsonl(tmp_path / "deployed" / "metrics.jsonl")
    assert [r["round"] for r in rows if "unseen_mse" in r] == [2, 3]
    assert_same_rows(rows, read_jsonl(tmp_path / "local" / "metrics.jsonl"))


def test_a_failed_run_is_reported_as_failed(deployment, tmp_path: Path) -> None:
    # A valid config (a bad one is refused before submission) that fails on the server: too few nodes.
    failing = ["server.min_nodes=99", "server.discovery_timeout=1.0", f'server.out_dir="{tmp_path}"']
    result = fedmeta_run(deployment, failing)

    assert result.returncode == 1
    assert "finished:failed" in result.stdout
    # The reason reaches the user in fedmeta run's own output (the status details or the relayed log).
    assert "of the 99 required nodes answered within 1 s" in result.stdout


def test_a_bad_run_config_is_refused_before_submission(deployment, tmp_path: Path) -> None:
    result = fedmeta_run(deployment, ["inner.inner_lr=-1.0", f'server.out_dir="{tmp_path}"'])

    assert result.returncode == 2
    assert "fedmeta: error: bad run config: inner_lr must be a positive finite number, got -1.0" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_deployed_secagg_run_matches_the_in_process_loop_within_quantisation(deployment, tmp_path: Path) -> None:
    # SecAgg+ over gRPC with distributed DP: the clients clip and noise, the SuperLink relays masked vectors
    # only, and the result equals the plain in-process run up to SecAgg+'s quantisation.
    experiment = [
        'algorithm="reptile"',
        'outer.optimizer="sgd"',
        "outer.outer_lr=0.5",
        'privacy.mode="distributed"',
        "privacy.clip_norm=0.5",
        "privacy.reproducible_noise=true",
        "federation.rounds=1",  # each SecAgg+ stage is a round trip; in a deployment each costs a ClientApp start
        "eval.fedavg_rounds=0",
    ]
    result = fedmeta_run(deployment, [*experiment, "secagg.enabled=true", f'server.out_dir="{tmp_path / "sa"}"'])

    assert result.returncode == 0, result.stdout + result.stderr
    local_equivalent(experiment, tmp_path / "local")
    deployed = load_checkpoint(tmp_path / "sa" / "checkpoint.pt")[1]
    local = load_checkpoint(tmp_path / "local" / "checkpoint.pt")[1]
    assert deployed.round == 1 and deployed.dp_releases == local.dp_releases
    assert all(torch.allclose(deployed.params[k], local.params[k], rtol=0, atol=1e-4) for k in local.params)
    assert not all(torch.equal(deployed.params[k], local.params[k]) for k in local.params)
