"""Dependencies point inward: replication and storage do not know the chat.

The chat is handed to them by the composition root (``node.py``): its schema to
storage, its write function to the replicator (``replication/app.py``). These
tests import a module alone, in a fresh interpreter, and look at what came with it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TYPES = {"Position", "LogRecord", "NodeState", "SyncSet", "NO_SYNC_SET"}


def loaded_with(module: str) -> set[str]:
    """The ``service`` modules that importing ``module`` alone loads."""
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return {name for name in out.split() if name.startswith("service")}


@pytest.mark.parametrize(
    ("module", "unknown"),
    [
        ("service.replication.runtime", {"service.chat", "service.chat_schema"}),
        ("service.replication.state", {"service.chat", "service.chat_schema", "service.storage"}),
        ("service.storage", {"service.chat", "service.chat_schema"}),
    ],
)
def test_a_module_does_not_load_the_chat(module: str, unknown: set[str]) -> None:
    assert loaded_with(module) & unknown == set()


def test_the_replication_types_come_from_replication_types_only() -> None:
    offenders = []
    for path in sorted([*REPO.glob("service/**/*.py"), *REPO.glob("tests/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").endswith("storage")
                and TYPES & {alias.name for alias in node.names}
            ):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_chatctl_does_not_load_the_replication() -> None:
    """``chatctl`` is a one-shot command: what it imports is waited for at every
    call. It reads ``service.config`` for its address parsing, and that module
    once brought the replication's modules with it (LeaseTiming): 55 of 138 ms of
    chatctl's imports."""
    loaded = loaded_with("service.cli") | loaded_with("service.client")
    assert {name for name in loaded if name.startswith("service.replication.")} == set()
