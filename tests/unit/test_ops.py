"""One list of op names (``protocol.OPS``): chat's handlers, the server's dispatch, the
replicator's session-ending writes and PROTOCOL.md all name the same operations."""

from __future__ import annotations

import re
from pathlib import Path

from service import chat, protocol, server

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "service" / "PROTOCOL.md"


def test_chat_handles_exactly_the_write_ops() -> None:
    assert set(chat.WRITE_HANDLERS) == protocol.WRITE_OPS


def test_the_server_serves_every_client_op() -> None:
    # The server reads the arguments of the ops it serves itself and passes every
    # write on to chat: together, every op and nothing else.
    assert set(server.CLIENT_FIELDS) | protocol.WRITE_OPS == protocol.CLIENT_OPS
    assert set(server.CLIENT_FIELDS) >= protocol.READ_OPS


def test_session_ending_ops_are_writes_with_a_session() -> None:
    assert {"logout", "delete_account"} == protocol.SESSION_ENDING_OPS
    assert protocol.SESSION_ENDING_OPS <= protocol.WRITE_OPS
    assert all(protocol.OPS[op].session for op in protocol.SESSION_ENDING_OPS)


def test_protocol_md_lists_the_same_ops_and_tokens() -> None:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    table = text.split("### Operations", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `(\w+)` \| (yes|no) \|", table, flags=re.MULTILINE)
    assert {op: token == "yes" for op, token in rows} == {
        name: op.session for name, op in protocol.OPS.items()
    }


def test_protocol_md_names_the_same_write_ops() -> None:
    text = " ".join(PROTOCOL_MD.read_text(encoding="utf-8").split())
    sentence = text.split("The **write operations** are ", 1)[1].split(". ", 1)[0]
    assert set(re.findall(r"`(\w+)`", sentence)) == protocol.WRITE_OPS
