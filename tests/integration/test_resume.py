"""Crash-safe resume: SIGKILL a running `fedmeta simulate`, restart it with --resume, and get the very same
meta-parameters as an uninterrupted run; corrupt or mismatched checkpoints are clear errors, left untouched."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import RunConfig
from fedmeta.metrics import read_jsonl
from simulations.inprocess import simulate
from tests.processes import FEDMETA

REPO = Path(__file__).resolve().parents[2]
ARGS = [
    "simulate",
    "--rounds",
    "60",
    "--num-clients",
    "30",
    "--num-unseen-clients",
    "3",
    "--eval-clients",
    "3",
    "--eval-tasks",
    "3",
    "--fedavg-rounds",
    "0",
    "--no-progress",
]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FEDMETA, *ARGS, "--out", str(out), *extra], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def _meta_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in read_jsonl(path) if r.get("phase") == "meta"]


def test_a_killed_run_resumes_to_the_same_meta_parameters(tmp_path: Path) -> None:
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    process = subprocess.Popen([*FEDMETA, *ARGS, "--out", str(killed)], cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_meta_rows(killed)) < 10:  # in the middle of the run
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run did not reach round 10 in 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    at_kill = load_checkpoint(killed / "checkpoint.pt")[1].round
    assert 0 < at_kill < 60  # a kill between the metrics row and the checkpoint leaves the previous round

    resumed = _run(killed, "--resume")
    uninterrupted = _run(reference)

    assert resumed.returncode == 0, resumed.stderr
    assert f"after round {at_kill}" in resumed.stderr
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    a, b = load_checkpoint(killed / "checkpoint.pt")[1], load_checkpoint(reference / "checkpoint.pt")[1]
    assert a.round == b.round == 60
    assert all(torch.equal(a.params[k], b.params[k]) for k in b.params)
    assert a.opt_state["step"] == b.opt_state["step"] == 60
    assert all(torch.equal(a.opt_state["exp_avg_sq"][k], b.opt_state["exp_avg_sq"][k]) for k in b.params)
    # Every round logged exactly once, with the same values as the uninterrupted run.
    rows, ref = _meta_rows(killed), _meta_rows(reference)
    assert [r["round"] for r in rows] == list(range(1, 61))
    drop = {"seconds", "elapsed"}  # wall-clock times differ between runs
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == [
        {k: v for k, v in r.items() if k not in drop} for r in ref
    ]


SMALL = {
    "data.num_train_clients": 4,
    "data.num_unseen_clients": 1,
    "federation.rounds": 2,
    "federation.clients_per_round": 2,
    "eval.eval_clients": 1,
    "eval.eval_tasks_per_client": 2,
    "eval.fedavg_rounds": 0,
}


def test_resume_refuses_a_corrupt_checkpoint_and_leaves_it_alone(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00not a checkpoint")
    result = _run(tmp_path, "--resume")
    assert result.returncode == 2
    assert "is corrupt or not a fedmeta checkpoint" in result.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"\x00not a checkpoint"


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path: Path) -> None:
    simulate(RunConfig().replace(**SMALL), tmp_path, progress=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(RuntimeError, match=r"another configuration \(federation.rounds: checkpoint 2, now 3\)"):
        simulate(RunConfig().replace(**{**SMALL, "federation.rounds": 3}), tmp_path, progress=False, resume=True)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    with pytest.raises(RuntimeError, match="checkpoint not found"):
        simulate(RunConfig().replace(**SMALL), tmp_path / "empty", progress=False, resume=True)


def test_a_fresh_run_over_an_old_checkpoint_says_it_replaces_it(tmp_path: Path, caplog) -> None:
    simulate(RunConfig().replace(**SMALL), tmp_path, progress=False)
    with caplog.at_level("WARNING"):
        simulate(RunConfig().replace(**SMALL), tmp_path, progress=False)
    assert "of an earlier run will be replaced (pass --resume to continue it)" in caplog.text
