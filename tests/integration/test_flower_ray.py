"""Flower's Ray simulation engine against the in-process loop: same seed, same meta-parameters, bit for bit, and
the same summary (FedAvg baseline included) and learning-curve rows.

Why exact equality holds: every client derives its tasks from (seed, round, client index), the server sorts
replies by client id before averaging, and parameters travel as raw float32 bytes (no quantisation). One
condition: the same number of intra-op threads. Ray gives each virtual client `num_cpus` threads (here 1), and
PyTorch's CPU kernels reduce in a different order with another thread count (differences of about 1e-8), so
the in-process reference runs with 1 thread too.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from fedmeta.checkpoint import load_checkpoint
from fedmeta.metrics import read_jsonl
from simulations.cli import main
from tests.flower_fakes import assert_same_results, assert_same_rows
from tests.processes import private_homes

pytestmark = pytest.mark.ray
ARGS = [
    "--algorithm",
    "maml",
    "--inner-steps",
    "2",
    "--num-clients",
    "5",
    "--num-unseen-clients",
    "2",
    "--rounds",
    "3",
    "--clients-per-round",
    "3",
    "--tasks-per-client",
    "2",
    "--eval-clients",
    "2",
    "--eval-tasks",
    "3",
    "--eval-steps",
    "2",
    "--no-progress",
]
# The whole run: the FedAvg baseline (2 rounds) and the unseen-client learning curve (every 2 rounds) included.
FULL = [*ARGS, "--fedavg-rounds", "2", "--curve-every", "2"]


def _ray_then_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, argv: list[str]) -> tuple[str, str]:
    """Run `fedmeta simulate argv` on Flower's Ray engine (into tmp_path/ray), then in-process with the same
    thread count (into tmp_path/local); return what each printed."""
    with private_homes() as env:
        for key in ("FLWR_HOME", "RAY_TMPDIR", "FLWR_TELEMETRY_ENABLED"):
            monkeypatch.setitem(os.environ, key, env[key])
        ray = ["simulate", "--engine", "ray", "--cpus-per-client", "1"]
        assert main([*ray, *argv, "--out", str(tmp_path / "ray")]) == 0
    ray_printed = capsys.readouterr().out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["simulate", "--engine", "local", *argv, "--out", str(tmp_path / "local")]) == 0
    finally:
        torch.set_num_threads(threads)
    return ray_printed, capsys.readouterr().out


def test_ray_simulation_equals_the_in_process_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    ray_printed, local_printed = _ray_then_local(tmp_path, monkeypatch, capsys, FULL)

    ray_state = load_checkpoint(tmp_path / "ray" / "checkpoint.pt")[1]
    local_state = load_checkpoint(tmp_path / "local" / "checkpoint.pt")[1]
    assert ray_state.round == local_state.round == 3
    assert all(torch.equal(ray_state.params[k], local_state.params[k]) for k in local_state.params)
    table = [line for line in ray_printed.splitlines() if line.strip().startswith(("meta", "random_init", "fedavg"))]
    assert len(table) == 3 and all(line in local_printed for line in table)  # the same personalised result
    ray_summary, local_summary = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ray", "local"))
    assert ray_summary["results"].keys() == {"meta", "random_init", "fedavg"}
    assert_same_results(ray_summary["results"], local_summary["results"])
    rows = read_jsonl(tmp_path / "ray" / "metrics.jsonl")
    assert [r["round"] for r in rows if "unseen_accuracy" in r or "unseen_mse" in r] == [2, 3]
    assert_same_rows(rows, read_jsonl(tmp_path / "local" / "metrics.jsonl"))


def test_ray_simulation_with_secagg_matches_the_plain_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One round, where the bound is exact: each client's update is rounded to within one quantisation level
    # (2 R / Q) per coordinate, so the mean is too, and the step moves the parameters by at most lr times that,
    # plus a float32 rounding of the new value. Over several rounds the error compounds through the clients'
    # MAML (a level can move a later update across a ReLU's kink), so no fixed bound holds there.
    lr = 0.1
    one = [*ARGS, "--rounds", "1", "--fedavg-rounds", "1", "--outer-optimizer", "sgd", "--outer-lr", str(lr)]
    with private_homes() as env:
        for key in ("FLWR_HOME", "RAY_TMPDIR", "FLWR_TELEMETRY_ENABLED"):
            monkeypatch.setitem(os.environ, key, env[key])
        assert main(["simulate", "--engine", "ray", "--secagg", *one, "--out", str(tmp_path / "sa")]) == 0
    assert main(["simulate", "--engine", "local", *one, "--out", str(tmp_path / "local")]) == 0

    secure = load_checkpoint(tmp_path / "sa" / "checkpoint.pt")[1]
    plain = load_checkpoint(tmp_path / "local" / "checkpoint.pt")[1]
    assert secure.round == plain.round == 1
    level = 2 * 8.0 / 2**22  # secagg.clipping_range 8, quantization_range 2**22 (the defaults)
    for k, p in plain.params.items():
        ulp = torch.finfo(p.dtype).eps * p.abs().max().item()
        assert (secure.params[k] - p).abs().max().item() <= lr * level + ulp, k
    assert not all(torch.equal(secure.params[k], plain.params[k]) for k in plain.params)  # it did quantise


@pytest.mark.parametrize(
    "algorithm",
    [
        ["matching", "--fce", "--fce-steps", "2"],
        ["siamese"],
        ["relation"],
        ["metalstm"],
        ["reptile", "--inner-optimizer", "adam", "--inner-adam-state", "carried", "--outer-optimizer", "sgd"],
    ],
    ids=str,
)
def test_the_metric_methods_and_the_meta_lstm_through_ray_equal_the_in_process_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, algorithm: list[str]
) -> None:
    from tests.unit.test_tasks import _write_zip

    data = tmp_path / "data"
    (data / "omniglot").mkdir(parents=True)
    _write_zip(data / "omniglot" / "images_background.zip", "background", {"Alpha": 2, "Beta": 2})
    _write_zip(data / "omniglot" / "images_evaluation.zip", "evaluation", {"Gamma": 2}, start_id=5)
    argv = [
        "--algorithm", *algorithm, "--dataset", "omniglot", "--data-dir", str(data),
        "--ways", "3", "--shots", "1", "--queries", "2", "--inner-steps", "1", "--inner-lr", "0.1",
        "--eval-steps", "1", "--rounds", "2", "--clients-per-round", "2", "--tasks-per-client", "2",
        "--eval-clients", "1", "--eval-tasks", "2", "--fedavg-rounds", "0", "--curve-every", "1", "--threads", "1",
        "--no-progress",
    ]  # fmt: skip

    _ray_then_local(tmp_path, monkeypatch, capsys, argv)

    ray_state = load_checkpoint(tmp_path / "ray" / "checkpoint.pt")[1]
    local_state = load_checkpoint(tmp_path / "local" / "checkpoint.pt")[1]
    assert ray_state.round == local_state.round == 2
    assert ray_state.params.keys() == local_state.params.keys()
    assert all(torch.equal(ray_state.params[k], local_state.params[k]) for k in local_state.params)
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ray", "local")]
    assert summaries[0]["results"].keys() == {"meta", "random_init"}
    assert_same_results(summaries[0]["results"], summaries[1]["results"])
    rows = read_jsonl(tmp_path / "ray" / "metrics.jsonl")
    assert [r["round"] for r in rows if "unseen_accuracy" in r] == [1, 2]
    assert_same_rows(rows, read_jsonl(tmp_path / "local" / "metrics.jsonl"))


@pytest.mark.parametrize("algorithm", ["perfedavg-hf", "fedrep"])
def test_client_tasks_and_the_baselines_through_ray_equal_the_in_process_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, algorithm: str
) -> None:
    """FedMeta's client tasks on a tiny LEAF FEMNIST: the evaluation protocol's support and sample counts
    travel in Flower's messages, and the personalisation baselines run through the ClientApp."""
    from tests.unit.test_femnist import _leaf_file

    root = tmp_path / "data" / "femnist" / "leaf_niid_sf005"
    writers = {f"w{i}": (10 + i, 3 * i) for i in range(4)}
    _leaf_file(root / "train" / "all.json", writers, seed=1)
    _leaf_file(root / "test" / "all.json", {w: (3, first + 1) for w, (_, first) in writers.items()}, seed=2)
    argv = [
        "--algorithm", algorithm, "--dataset", "femnist", "--data-dir", str(tmp_path / "data"),
        "--num-unseen-clients", "1", "--client-tasks", "--support", "0.25", "--client-samples", "12",
        "--inner-steps", "1", "--inner-lr", "0.1", "--eval-steps", "1", "--rounds", "2", "--clients-per-round", "2",
        "--tasks-per-client", "2", "--eval-clients", "1", "--eval-tasks", "2", "--fedavg-rounds", "1",
        "--curve-every", "1", "--threads", "1", "--no-progress",
    ]  # fmt: skip

    _ray_then_local(tmp_path, monkeypatch, capsys, argv)

    ray_state = load_checkpoint(tmp_path / "ray" / "checkpoint.pt")[1]
    local_state = load_checkpoint(tmp_path / "local" / "checkpoint.pt")[1]
    assert ray_state.params["head.weight"].shape[0] == 62
    assert all(torch.equal(ray_state.params[k], local_state.params[k]) for k in local_state.params)
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ray", "local")]
    assert summaries[0]["results"].keys() == {"meta", "random_init", "fedavg"}
    assert_same_results(summaries[0]["results"], summaries[1]["results"])
    assert_same_rows(read_jsonl(tmp_path / "ray" / "metrics.jsonl"), read_jsonl(tmp_path / "local" / "metrics.jsonl"))


def test_cohort_workers_through_ray_equal_the_in_process_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    # Two virtual SuperNodes compute 12 training and 4 unseen clients between them (client c on worker c mod 2),
    # with client-side DP noise drawn per client: the meta-parameters, the privacy spent, the summary and every
    # metrics row equal the in-process run's. Reptile vectorises across each worker's clients (algorithms without
    # per-task directions loop inside the worker: tests/unit/test_cohorts.py shows both give each client's own row).
    preset = tmp_path / "preset.toml"
    default = (Path(__file__).parents[2] / "simulations" / "presets" / "sinusoid-reptile.toml").read_text()
    preset.write_text(default + "\n[privacy]\nreproducible_noise = true\n")
    argv = [
        *ARGS[:1],
        "reptile",
        *ARGS[2:5],
        "12",
        "--num-unseen-clients",
        "4",
        *ARGS[8:],
        "--eval-clients",
        "4",
        "--fedavg-rounds",
        "2",
        "--curve-every",
        "2",
        "--dp",
        "distributed",
        "--noise-multiplier",
        "0.5",
        "--preset",
        str(preset),
    ]
    argv[argv.index("--clients-per-round") + 1] = "7"
    with caplog.at_level(logging.INFO, logger="simulations.flower_sim"):
        _ray_then_local(tmp_path, monkeypatch, capsys, [*argv, "--workers", "2"])

    assert "2 virtual SuperNodes (cohort workers for 12 training and 4 unseen clients)" in caplog.text

    ray_state = load_checkpoint(tmp_path / "ray" / "checkpoint.pt")[1]
    local_state = load_checkpoint(tmp_path / "local" / "checkpoint.pt")[1]
    assert ray_state.round == local_state.round == 3
    assert all(torch.equal(ray_state.params[k], local_state.params[k]) for k in local_state.params)
    assert ray_state.dp_releases == local_state.dp_releases
    ray_summary, local_summary = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ray", "local"))
    assert ray_summary["unseen_clients"] == 4
    assert_same_results(ray_summary["results"], local_summary["results"])
    rows = read_jsonl(tmp_path / "ray" / "metrics.jsonl")
    assert [r["clients"] for r in rows if r["phase"] == "meta"] == [7, 7, 7]
    assert_same_rows(rows, read_jsonl(tmp_path / "local" / "metrics.jsonl"))
