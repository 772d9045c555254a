"""Flower's Ray simulation engine against the in-process loop: same seed, same meta-parameters, bit for bit.

Why exact equality holds: every client derives its tasks from (seed, round, client index), the server sorts
replies by client id before averaging, and parameters travel as raw float32 bytes (no quantisation). One
condition: the same number of intra-op threads. Ray gives each virtual client `num_cpus` threads (here 1), and
PyTorch's CPU kernels reduce in a different order with another thread count (differences of about 1e-8), so
the in-process reference runs with 1 thread too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import RunConfig
from simulations.inprocess import simulate
from tests.processes import private_homes

pytestmark = pytest.mark.ray


def test_ray_simulation_equals_the_in_process_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from simulations.flower_sim import simulate_flower

    config = RunConfig().replace(
        **{
            "algorithm": "maml",
            "inner.inner_steps": 2,
            "data.num_train_clients": 5,
            "data.num_unseen_clients": 2,
            "federation.rounds": 3,
            "federation.clients_per_round": 3,
            "federation.tasks_per_client": 2,
            "eval.eval_clients": 2,
            "eval.eval_tasks_per_client": 3,
            "inner.eval_steps": 2,
            "eval.fedavg_rounds": 0,
        }
    )
    with private_homes() as env:
        for key in ("FLWR_HOME", "RAY_TMPDIR", "FLWR_TELEMETRY_ENABLED"):
            monkeypatch.setitem(os.environ, key, env[key])
        ray_summary = simulate_flower(config, tmp_path / "ray", num_cpus=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local_summary = simulate(config, tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(threads)

    ray_state = load_checkpoint(tmp_path / "ray" / "checkpoint.pt")[1]
    local_state = load_checkpoint(tmp_path / "local" / "checkpoint.pt")[1]
    assert ray_state.round == local_state.round == 3
    assert all(torch.equal(ray_state.params[k], local_state.params[k]) for k in local_state.params)
    assert ray_summary["results"]["meta"] == local_summary["results"]["meta"]
