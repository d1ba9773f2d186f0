"""The interactive client's parts that need no node: how messages become
conversations and unread counts, how a message is drawn, and how ``chatctl
chat`` starts (the scenarios against a cluster are in
tests/integration/test_chat_tui.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from service import cli
from service.tui import Conversations, message_line

REPO = Path(__file__).resolve().parents[2]


def message(
    message_id: int, sender: str, to: str, body: str = "hi", read: bool = False
) -> dict[str, Any]:
    return {
        "id": message_id,
        "from": sender,
        "to": to,
        "body": body,
        "sent_at": 1716200000.0,
        "read": read,
    }


def test_messages_are_filed_under_the_other_user_and_counted_unread() -> None:
    model = Conversations("alice")
    model.add(message(1, "bob", "alice"))
    model.add(message(2, "Bob", "alice", read=True))  # names compare without case
    model.add(message(3, "alice", "carol"))
    model.add(message(4, "alice", "alice"))  # a note to self
    assert [(c.peer, c.last_id, sorted(c.unread)) for c in model.ordered()] == [
        ("alice", 4, [4]),
        ("carol", 3, []),
        ("Bob", 2, [1]),
    ]
    assert model.unread_total() == 2


def test_a_read_page_counts_as_read_and_shown_messages_are_taken_for_marking() -> None:
    model = Conversations("alice")
    for i in (1, 2, 3):
        model.add(message(i, "bob", "alice"))
    bob = model.ensure("bob")
    assert bob.messages is None  # a summary until opened
    bob.messages = {}
    model.shown_by_read(bob, [message(2, "bob", "alice"), message(3, "bob", "alice")])
    assert sorted(bob.unread) == [1]
    model.add(message(5, "bob", "alice"))  # arrives while open
    assert model.take_shown_unread(bob) == [5]
    assert [m["id"] for m in bob.ordered()] == [2, 3, 5]
    assert sorted(bob.unread) == [1]  # never shown: still unread
    model.forget(3)
    assert [m["id"] for m in bob.ordered()] == [2, 5]


def test_the_same_message_twice_is_one_message() -> None:
    model = Conversations("alice")
    bob = model.ensure("bob")
    bob.messages = {}
    model.add(message(7, "bob", "alice"))
    model.shown_by_read(bob, [message(7, "bob", "alice", read=False)])
    assert [m["id"] for m in bob.ordered()] == [7]
    assert bob.unread == set()


def test_a_body_is_shown_as_chatctl_shows_it_and_never_as_markup() -> None:
    line = message_line(message(1, "bob", "alice", "[b]not bold[/b] \u202e\x1b[31m\nsecond"))
    first, second = str(line).split("\n")
    assert first.endswith("bob: [b]not bold[/b] \\u202e\\u001b[31m")
    assert second == " " * first.index("[b]") + "second"


def test_the_other_commands_do_not_import_textual() -> None:
    code = "import sys, service.cli; print('textual' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"


def test_chat_needs_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATCTL_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli.app, ["chat"])
    assert result.exit_code == 2
    assert result.output.strip() == "chatctl: chatctl chat needs a terminal"
