"""The identity file (``service/identity.py``): a wiped, replaced or rolled-back
database is recognised at start, and the suspicion survives a restart until proven."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from service import identity
from service.identity import Before, Identity

RAN = Identity("aaaa", clean=False, suspect=None)
STOPPED = Identity("aaaa", clean=True, suspect=None)


@pytest.mark.parametrize(
    ("recorded", "database_id", "before", "expected"),
    [
        pytest.param(None, "aaaa", Before(True, True), None, id="no-file-proves-nothing"),
        pytest.param(RAN, "aaaa", Before(True, True), None, id="crash-with-wal"),
        pytest.param(STOPPED, "aaaa", Before(True, False), None, id="clean-stop-without-wal"),
        pytest.param(RAN, "aaaa", Before(True, False), "write-ahead log is gone", id="wal-lost"),
        pytest.param(RAN, "bbbb", Before(True, True), "replaced", id="replaced"),
        pytest.param(STOPPED, "bbbb", Before(False, False), "gone", id="wiped"),
        pytest.param(
            Identity("aaaa", True, "earlier doubt"),
            "aaaa",
            Before(True, True),
            "earlier doubt",
            id="suspicion-kept",
        ),
    ],
)
def test_verdict(
    recorded: Identity | None, database_id: str, before: Before, expected: str | None
) -> None:
    found = identity.verdict(recorded, database_id, before)
    if expected is None:
        assert found is None
    else:
        assert found is not None
        assert expected in found


def test_write_then_read_round_trips_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / identity.FILE_NAME
    record = Identity("cafe", clean=True, suspect="why")
    identity.write(path, record)
    assert identity.read(path) == record
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize("content", ["", "{", "[]", '{"database_id": 3}'])
def test_an_unreadable_file_proves_nothing(tmp_path: Path, content: str) -> None:
    path = tmp_path / identity.FILE_NAME
    path.write_text(content)
    assert identity.read(path) is None


def test_observe_notes_the_wal_before_the_database_is_opened(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    assert identity.observe(db) == Before(False, False)
    db.write_bytes(b"")
    (tmp_path / "chat.db-wal").write_bytes(b"")
    assert identity.observe(db) == Before(True, True)
