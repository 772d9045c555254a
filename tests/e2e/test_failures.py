"""A SuperNode killed with SIGKILL in the middle of a round, on a real loopback deployment (1 SuperLink, 4 training
SuperNodes + 1 unseen): the round completes with the replies that arrived, the loss is counted in the round's
metrics, later rounds go on, and the node, restarted, rejoins under a new node id."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from fedmeta.metrics import read_jsonl
from tests.processes import FEDMETA, LocalDeployment, private_homes, stop

# About 3 minutes (a 40 s round timeout, then a restarted node rejoining): behind `slow` with the other long
# deployments, so that `make test` stays within 12 minutes; `.ci/run` runs them after it (`make test-slow`).
pytestmark = [pytest.mark.deployment, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 5  # 4 training clients + 1 unseen
ROUNDS = 4


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return read_jsonl(path) if path.is_file() else []


def _wait(condition, what: str, timeout: float, run: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.poll() is None, f"the run ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_killed_supernode_is_survived_and_rejoins(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with private_homes() as env:
        local = LocalDeployment(env, tmp_path, REPO)
        run = None
        try:
            local.start_superlink()
            for p in range(PARTITIONS):
                local.start_supernode(p, PARTITIONS)
            config = [
                "data.num_train_clients=4",
                "data.num_unseen_clients=1",
                f"federation.rounds={ROUNDS}",
                "federation.clients_per_round=4",
                "federation.tasks_per_client=2",
                "eval.eval_clients=1",
                "eval.eval_tasks_per_client=2",
                "inner.eval_steps=2",
                "eval.fedavg_rounds=0",
                "server.min_replies=3",
                "server.round_timeout=40.0",
                f'server.out_dir="{out}"',
            ]
            args = [*FEDMETA, "run", "--insecure", "--superlink", local.address, "--timeout", "400"]
            for item in config:
                args += ["--run-config", item]
            run = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

            # Round 1 done; in round 2, kill client 0's SuperNode while it runs its ClientApp (mid-round).
            _wait(lambda: any(r.get("phase") == "meta" for r in _rows(out)), "round 1", 200, run)
            victim = psutil.Process(local.supernodes[0].pid)
            _wait(lambda: bool(victim.children()), "client 0 to start training in round 2", 60, run)
            orphans = victim.children(recursive=True)
            local.supernodes[0].send_signal(signal.SIGKILL)
            local.supernodes[0].wait(timeout=10)
            for child in orphans:  # its ClientApp process dies with it, as on a machine that lost power
                child.kill()

            # Once a round has gone without it, restart the node: it comes back under a new node id.
            _wait(
                lambda: any(r.get("failed", 0) + r.get("timed_out", 0) > 0 for r in _rows(out)),
                "a short round",
                200,
                run,
            )
            local.start_supernode(0, PARTITIONS)
            output, _ = run.communicate(timeout=400)
        finally:
            if run is not None and run.poll() is None:
                stop([run])
            local.stop_all()

    assert run.returncode == 0, output
    rows = [r for r in _rows(out) if r.get("phase") == "meta"]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    short = [r for r in rows if r["failed"] + r["timed_out"] > 0]
    assert short and all(r["clients"] == 3 and "skipped" not in r for r in short)  # applied with 3 of 4
    first_short = rows.index(short[0])
    assert any(r["clients"] == 4 for r in rows[first_short + 1 :]), "client 0 never rejoined"
    assert "replacing node" in (tmp_path / "superlink.log").read_text() + output
