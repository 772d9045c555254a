"""The deployment commands' choices, checked before any Flower process starts."""

from __future__ import annotations

import argparse
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
