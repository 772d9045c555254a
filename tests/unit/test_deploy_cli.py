"""The deployment commands' choices, checked before any Flower process starts."""

from __future__ import annotations

import argparse
import os
from contextlib import suppress
from pathlib import Path

import pytest

from fedmeta.config import ConfigError
from simulations import deploy
from simulations.cli import _require_security_choice, main


def test_insecure_mode_warns_and_no_choice_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    _require_security_choice(argparse.Namespace(insecure=True, root_certificates=None))
    assert (
        "WARNING: insecure mode - traffic is not encrypted and nodes are not authenticated" in capsys.readouterr().err
    )
    with pytest.raises(ConfigError, match="choose --insecure .* or TLS certificates"):
        _require_security_choice(argparse.Namespace(insecure=False, root_certificates=None))


def test_node_authentication_without_tls_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["server", "--insecure", "--node-auth"]) == 2
    assert "--node-auth needs TLS (--certificates)" in capsys.readouterr().err


def test_secure_commands_carry_flowers_tls_and_auth_options(tmp_path: Path) -> None:
    link = deploy.superlink_command(host="127.0.0.1", port=9092, insecure=False, certificates=tmp_path, node_auth=True)
    assert link[link.index("--ssl-certfile") + 1] == str(tmp_path / "server.pem")
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    node = deploy.supernode_command(
        superlink="127.0.0.1:9092",
        partition=0,
        num_partitions=2,
        port=9100,
        insecure=False,
        root_certificates=tmp_path / "ca.crt",
        auth_key=tmp_path / "node-0",
        device="cuda",
    )
    assert node[node.index("--node-config") + 1] == 'partition-id=0 num-partitions=2 device="cuda"'
    assert node[node.index("--auth-supernode-private-key") + 1] == str(tmp_path / "node-0")
    assert node[node.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("federation.roundz=5", "unknown run-config key 'federation.roundz'; known keys here: federation.client_"),
        ("server.out_dir=runs/x", "the value of server.out_dir (runs/x) is not a TOML value; strings need quotes"),
        ('federation.rounds="ten"', "bad run config: rounds must be a positive integer, got 'ten'"),
        ("server.min_replies=-1", "bad run config: server.min_replies must be a non-negative integer, got -1"),
        ("federation.rounds", "--run-config 'federation.rounds' is not KEY=VALUE"),
    ],
)
def test_a_bad_run_config_is_one_line_before_anything_is_submitted(
    item: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    submitted = []
    monkeypatch.setattr(deploy, "submit_and_wait", lambda *a, **k: submitted.append(a) or (1, "finished:completed"))
    assert main(["run", "--insecure", "--run-config", item]) == 2
    err = capsys.readouterr().err
    assert f"fedmeta: error: {message}" in err and "Traceback" not in err
    assert not submitted and not (tmp_path / "flwr" / "config.toml").exists()  # nothing written, nothing sent


def test_paths_reach_flower_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    calls: list[tuple] = []
    monkeypatch.setattr(deploy, "submit_and_wait", lambda *a, **k: calls.append(a) or (7, "finished:completed"))
    argv = ["run", "--root-certificates", "certs/ca.crt", "--run-config", 'server.out_dir="runs/x"']
    assert main(argv) == 0
    written = (tmp_path / "flwr" / "config.toml").read_text()
    assert f'root-certificates = "{tmp_path / "certs" / "ca.crt"}"' in written
    assert calls[0][1] == [f'server.out_dir="{tmp_path / "runs" / "x"}"']
    node = deploy.supernode_command(
        superlink="127.0.0.1:9092", partition=0, num_partitions=2, port=9100, insecure=True, max_retries=3, max_wait=9
    )
    assert node[node.index("--max-retries") + 1] == "3" and node[node.index("--max-wait-time") + 1] == "9"


def test_an_unreachable_superlink_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deploy, "SUBMIT_TIMEOUT", 0.01)
    with pytest.raises(deploy.DeployError, match=r"the SuperLink at 127.0.0.1:9199 did not answer within 0.01 s"):
        deploy.submit_and_wait("nowhere", [], address="127.0.0.1:9199")


def test_certificates_into_an_impossible_directory_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "/proc/nope"]) == 2
    err = capsys.readouterr().err
    assert "fedmeta: error: cannot create the certificate directory /proc/nope" in err and "Traceback" not in err


def test_help_does_not_import_torch() -> None:
    # `fedmeta --help` must be instant: the parser is built from fedmeta.config alone.
    import subprocess
    import sys

    code = "import sys, simulations.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_streamed_run_log_is_plain_text_outside_a_terminal() -> None:
    coloured = "\x1b[92mINFO \x1b[0m:      round 1/20\n"
    assert deploy.log_line(coloured, terminal=False) == "INFO :      round 1/20\n"
    assert deploy.log_line("\x1b[94mDEBUG \x1b[0m: Pulling messages\n", terminal=False) is None
    assert deploy.log_line(coloured, terminal=True) == coloured


def test_a_refused_supernode_ends_with_the_reason_and_leaves_no_process_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SuperNode whose key the SuperLink refuses prints Flower's "could not establish a connection" and
    exits, while the SuperExec it started keeps retrying: the wrapper must return, name the reason in one
    line, and stop the leftover (here a shell loop standing in for flower-supernode and its SuperExec)."""
    import psutil

    leftover = tmp_path / "leftover.pid"
    script = (
        "echo '[code: 2004] Failed to activate SuperNode.'; echo 'could not establish a connection'; "
        f"(while true; do echo 'Connection attempt failed, retrying'; sleep 0.1; done) & echo $! > {leftover}; "
        "exit 1"
    )
    key = tmp_path / "node-3"
    code = deploy.run_supernode(
        ["bash", "-c", script], dict(os.environ), superlink="127.0.0.1:9", port=9103, auth_key=key
    )

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "Failed to activate SuperNode" in err[0]
    assert err[-1] == (
        f"fedmeta: the SuperLink at 127.0.0.1:9 refused this node: its key {key}.pub is not registered there "
        f"(register it with: fedmeta register {key}.pub --root-certificates CA)"
    )
    with suppress(psutil.NoSuchProcess):
        psutil.Process(int(leftover.read_text())).wait(timeout=10)
    assert not psutil.pid_exists(int(leftover.read_text()))


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via the CLI.",
         "refused this node: it admits only registered nodes (--node-auth)"),
        ("RuntimeError: SuperNode Runtime HTTP API failed to start.",
         "this SuperNode's port 127.0.0.1:9100 is taken: another SuperNode with the same --partition"),
        ("WARNING :   Connection attempt failed, retrying in 0.48 seconds",
         "gave up on the SuperLink at 127.0.0.1:9092: no answer within the retries"),
        ("something else\nKeyError: 'x'\n", "the SuperNode stopped: KeyError: 'x'"),
    ],
)  # fmt: skip
def test_each_supernode_failure_is_named(output: str, reason: str) -> None:
    assert reason in deploy.supernode_failure(output, superlink="127.0.0.1:9092", port=9100, auth_key=None)
