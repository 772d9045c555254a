"""TLS and SuperNode authentication end to end on loopback: certificates and node keys from `fedmeta certs`, a
SuperLink with TLS and `--node-auth`, two registered SuperNodes that train, and three that must be refused:
an unregistered key, TLS without a key, and plain text."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.processes import FEDMETA, LocalDeployment, private_homes

# About 2 minutes (certificates, five SuperNodes, a run over TLS): behind `slow` with the other long deployments,
# so that `make test` stays within 12 minutes; `.ci/run` runs them after it (`make test-slow`).
pytestmark = [pytest.mark.deployment, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDMETA, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_registered_nodes_train_and_strangers_are_refused(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    with private_homes() as env:
        made = _cli(env, "certs", str(certs), "--nodes", "3")
        assert made.returncode == 0, made.stderr
        ca = str(certs / "ca.crt")
        local = LocalDeployment(env, tmp_path, REPO, extra=[])
        try:
            local.start_superlink("--certificates", str(certs), "--node-auth")
            for i in (0, 1):
                registered = _cli(
                    env,
                    "register",
                    str(certs / f"node-{i}.pub"),
                    "--superlink",
                    local.address,
                    "--root-certificates",
                    ca,
                )
                assert registered.returncode == 0, registered.stdout + registered.stderr
            for partition in (0, 1):  # 1 training + 1 unseen client, each with its registered key
                local.start_supernode(
                    partition, 2, "--root-certificates", ca, "--auth-key", str(certs / f"node-{partition}")
                )
            # Strangers claim the same partitions: had any been admitted, the run would fail on a duplicate.
            unregistered = local.start_supernode(0, 2, "--root-certificates", ca, "--auth-key", str(certs / "node-2"))
            keyless = local.start_supernode(1, 2, "--root-certificates", ca)
            plain = local.start_supernode(1, 2, "--insecure")
            time.sleep(5)  # let the strangers try

            run = _cli(
                env,
                "run",
                "--superlink",
                local.address,
                "--root-certificates",
                ca,
                "--timeout",
                "300",
                "--run-config",
                "data.num_train_clients=1",
                "--run-config",
                "data.num_unseen_clients=1",
                "--run-config",
                "federation.rounds=1",
                "--run-config",
                "federation.clients_per_round=1",
                "--run-config",
                "eval.eval_tasks_per_client=2",
                "--run-config",
                f'server.out_dir="{tmp_path / "run"}"',
                timeout=360,
            )
            assert run.returncode == 0, run.stdout + run.stderr
            assert "finished:completed" in run.stdout
            assert (tmp_path / "run" / "summary.json").is_file()
            # The two with a key were refused at once and exited; the plain-text one never got through.
            assert unregistered.wait(timeout=60) != 0 and keyless.wait(timeout=60) != 0
            assert plain.poll() is None
        finally:
            local.stop_all()

    unregistered_log = (tmp_path / "supernode0.log").read_text()
    assert "Failed to activate SuperNode" in unregistered_log  # Flower's words; fedmeta's line names the reason
    assert f"refused this node: its key {certs / 'node-2'}.pub is not registered there" in unregistered_log
    partition1_log = (tmp_path / "supernode1.log").read_text()
    assert "All SuperNodes must be registered" in partition1_log  # the keyless node
    assert "refused this node: it admits only registered nodes (--node-auth)" in partition1_log
    assert "Connection attempt failed" in partition1_log  # the plain-text node (same log file)
