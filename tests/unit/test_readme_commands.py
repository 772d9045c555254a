"""Every `fedmeta` command in the README parses with the CLI as written (options, choices, subcommands).

Running each to completion is issue #12's README test; this catches a renamed or removed option at once.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from simulations.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(".venv/bin/fedmeta "):
                commands.append(line.removeprefix(".venv/bin/fedmeta "))
    return commands


def test_the_readme_has_fedmeta_commands() -> None:
    assert len(readme_commands()) >= 10


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses_as_written(command: str) -> None:
    try:
        build_parser().parse_args(shlex.split(command))
    except SystemExit as exit:  # argparse exits 2 on an unknown option or choice, 0 after --help
        assert exit.code == 0, f"README command does not parse: fedmeta {command}"
