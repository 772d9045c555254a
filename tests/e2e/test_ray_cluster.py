"""Flower's simulation engine on a Ray cluster started as separate processes: a head and a worker node, both on
127.0.0.1 (`ray start --head`, `ray start --address`), the way a federation grows beyond one machine. The run
attaches with `fedmeta simulate --engine ray --ray-address HOST:PORT`, its two cohort workers need a CPU each
(one per Ray node), and it equals the in-process run bit for bit. Every process is stopped by PID."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedmeta.checkpoint import load_checkpoint
from tests.flower_fakes import assert_same_results
from tests.processes import FEDMETA, free_port, private_homes, stop, wait_for_port

pytestmark = [pytest.mark.ray, pytest.mark.deployment]
RAY = str(Path(sys.executable).with_name("ray"))
RUN = [
    "--algorithm", "reptile", "--num-clients", "40", "--num-unseen-clients", "4", "--rounds", "3",
    "--clients-per-round", "10", "--tasks-per-client", "2", "--eval-clients", "4", "--eval-tasks", "3",
    "--eval-steps", "2", "--fedavg-rounds", "0", "--workers", "2", "--threads", "1", "--no-progress",
]  # fmt: skip


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    probe = "import ray; ray.init(address=%r, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    result = subprocess.run(
        [sys.executable, "-c", probe % address], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    return int(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 and result.stdout.strip() else 0


def test_a_simulation_on_a_two_node_ray_cluster_equals_the_in_process_run(tmp_path: Path) -> None:
    processes: list[subprocess.Popen] = []
    with private_homes() as env:
        port = free_port()
        address = f"127.0.0.1:{port}"
        common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
        logs = tmp_path / "logs"
        logs.mkdir()
        try:
            head_log = open(logs / "head.log", "w")  # noqa: SIM115 (closed with the process)
            head = subprocess.Popen(
                [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                env=env,
                stdout=head_log,
                stderr=subprocess.STDOUT,
            )
            processes.append(head)
            wait_for_port(port, head, timeout=120)
            worker_log = open(logs / "worker.log", "w")  # noqa: SIM115
            processes.append(
                subprocess.Popen(
                    [RAY, "start", f"--address={address}", *common],
                    env=env,
                    stdout=worker_log,
                    stderr=subprocess.STDOUT,
                )
            )
            deadline = time.monotonic() + 180
            while _alive_nodes(address, env) < 2:
                assert time.monotonic() < deadline, "the Ray worker node did not join the head within 180 s"
                time.sleep(2)

            attached = subprocess.run(
                [
                    *FEDMETA,
                    "simulate",
                    "--engine",
                    "ray",
                    "--ray-address",
                    address,
                    *RUN,
                    "--out",
                    str(tmp_path / "ray"),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=400,
                check=False,
            )
            assert attached.returncode == 0, attached.stderr[-3000:]
            assert _alive_nodes(address, env) == 2  # the run attached to the cluster and left it running
        finally:
            stop(processes)
    assert all(p.poll() is not None for p in processes)

    local = subprocess.run(
        [*FEDMETA, "simulate", *RUN, "--out", str(tmp_path / "local")], capture_output=True, text=True, check=False
    )
    assert local.returncode == 0, local.stderr[-3000:]
    on_cluster = load_checkpoint(tmp_path / "ray" / "checkpoint.pt")[1]
    in_process = load_checkpoint(tmp_path / "local" / "checkpoint.pt")[1]
    assert on_cluster.round == 3
    assert all(torch.equal(on_cluster.params[k], in_process.params[k]) for k in in_process.params)
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ray", "local")]
    assert_same_results(summaries[0]["results"], summaries[1]["results"])
