"""The ``python -m service`` command lines the README shows are ones a node accepts.

Each is parsed by the node's own argument parser and loaded into a config, in
the repository root (where the README's relative paths point), so the README
cannot drift from the flags, the INI file option or the ``--nodes`` syntax.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from service import config
from service.__main__ import parse_args

ROOT = Path(__file__).resolve().parents[2]
COMMAND = ".venv/bin/python -m service "


def readme_commands() -> list[list[str]]:
    """The arguments of every node command line of the README (continuations joined)."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line)[3:] for line in text.splitlines() if line.strip().startswith(COMMAND)]


def test_the_readme_shows_how_to_start_a_node_from_a_file_and_from_flags() -> None:
    commands = readme_commands()
    assert any("--config" in argv for argv in commands), commands
    assert any("--nodes" in argv and "--config" not in argv for argv in commands), commands


def test_every_node_command_of_the_readme_loads_a_three_node_config() -> None:
    for argv in readme_commands():
        path, overrides = parse_args(argv)
        loaded = config.load(None if path is None else ROOT / path, overrides)
        assert loaded.node_id == 1, argv
        assert [peer.address for peer in loaded.nodes] == [
            "127.0.0.1:7001",
            "127.0.0.1:7002",
            "127.0.0.1:7003",
        ], argv
