"""Restoring a backup (``storage.prepare_restore``, ``python -m ops.restore``) on real files.

The restored database must keep every replicated row and lose what described
the node it was copied from: its database id, its votes, its log; its sync set
must name the restored node alone, with its new database. Bad input (not a
database, an occupied data dir) is refused with one message and changes nothing.
So is a file that is no longer the one its manifest describes: a row changed on
the backup's disk, which SQLite's checks pass, is never installed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ops import manifest
from ops.backup import check
from ops.chaos.corrupt import flip_payload
from service.chat_schema import MIGRATIONS
from service.errors import Internal
from service.replication.types import NodeState, Position, SyncSet
from service.storage import Storage, prepare_restore
from tests.helpers.cluster import REPO_ROOT


def _source(path: Path) -> Storage:
    """A node's database: two users, a sync set naming three databases, a vote."""
    storage = Storage(path, migrations=MIGRATIONS)
    for name in ("Alice", "Bob"):
        batch = storage.begin_batch()
        batch.db.execute(
            "INSERT INTO users(name, name_key, password_hash, created_at) VALUES (?, ?, 'h', 1.0)",
            (name, name.lower()),
        )
        batch.set_sync_set((1, 2, 3), 3, ((1, "a" * 32), (2, "b" * 32), (3, "c" * 32)))
        assert batch.seal(3) is not None
        batch.commit()
    storage.save_node_state(NodeState(current_epoch=4, voted_epoch=4, voted_for=2))
    return storage


@pytest.fixture
def backup_file(tmp_path: Path) -> tuple[Path, Storage]:
    """A copy of the source as ``ops.backup`` leaves it: the file and its manifest."""
    source = _source(tmp_path / "node.db")
    path = tmp_path / "backup.db"
    assert source.make_snapshot(path) == Position(3, 2)
    content = path.read_bytes()
    tag = {"position": [3, 2], "bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    manifest.write(path, tag)
    return path, source


def test_a_restored_database_keeps_the_rows_and_forgets_the_node(
    backup_file: tuple[Path, Storage],
) -> None:
    path, source = backup_file
    position, database_id = prepare_restore(path, 2)
    assert position == Position(3, 2)
    restored = Storage(path, migrations=MIGRATIONS)
    try:
        assert restored.position() == position
        assert restored.database_id == database_id != source.database_id
        assert restored.node_state() == NodeState(current_epoch=4, voted_epoch=0, voted_for=None)
        assert restored.first_log_seq() is None, "no record of the old cluster is kept"
        assert restored.sync_set() == SyncSet(3, (2,), 3, ((2, database_id),))
        before, after = source.checksums(), restored.checksums()
        assert {t: s for t, s in after.items() if t != "cluster"} == {
            t: s for t, s in before.items() if t != "cluster"
        }
        assert restored.integrity_check() == "ok"
    finally:
        restored.close()
        source.close()


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"not a database at all, but long enough to look like a header" * 20)
    with pytest.raises(Internal):
        prepare_restore(path, 1)


def _restore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.restore", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_tool_restores_into_a_new_private_data_dir(
    backup_file: tuple[Path, Storage], tmp_path: Path
) -> None:
    path, source = backup_file
    source.close()
    data_dir = tmp_path / "var" / "node1"
    done = _restore("--from", str(path), "--data-dir", str(data_dir), "--node-id", "1")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["position"] == [3, 2]
    assert result["verified"] is True
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in data_dir.iterdir()) == ["chat.db"]
    assert (data_dir / "chat.db").stat().st_mode & 0o777 == 0o600
    again = _restore("--from", str(path), "--data-dir", str(data_dir), "--node-id", "1")
    assert again.returncode == 2
    assert "exists" in again.stderr


def test_the_tool_leaves_nothing_behind_when_the_backup_is_unusable(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    data_dir = tmp_path / "node1"
    args = ("--from", str(bad), "--data-dir", str(data_dir), "--node-id", "1")
    done = _restore(*args, "--unverified")
    assert done.returncode == 1
    assert done.stderr.startswith("not restored:"), done.stderr
    assert list(data_dir.iterdir()) == []


def test_a_backup_changed_on_its_disk_is_not_restored(
    backup_file: tuple[Path, Storage], tmp_path: Path
) -> None:
    path, source = backup_file
    source.close()
    flip_payload(path, "users", b"Alice")  # a bit flipped inside a row: Alice -> alice
    changed = path.read_bytes()
    check(path)  # ops.backup's integrity check passes: SQLite cannot see the change
    data_dir = tmp_path / "node1"
    done = _restore("--from", str(path), "--data-dir", str(data_dir), "--node-id", "1")
    assert done.returncode == 1, done.stdout
    assert done.stderr.startswith("not restored: the file is not the backup its manifest"), (
        done.stderr
    )
    assert done.stderr.count("\n") == 1, "one message, no traceback"
    assert list(data_dir.iterdir()) == []
    assert path.read_bytes() == changed, "the backup is never changed"


def test_a_backup_without_a_readable_manifest_needs_unverified(
    backup_file: tuple[Path, Storage], tmp_path: Path
) -> None:
    path, source = backup_file
    source.close()
    tag = manifest.path_of(path)
    args = ("--from", str(path), "--data-dir", str(tmp_path / "node1"), "--node-id", "1")
    tag.write_text('{"position": [3, 2], "bytes": "many"}')
    damaged = _restore(*args)
    assert damaged.returncode == 1
    assert "is not a backup's manifest" in damaged.stderr, damaged.stderr
    tag.unlink()
    missing = _restore(*args)
    assert missing.returncode == 1
    assert "backup.db.json is missing" in missing.stderr
    assert "--unverified" in missing.stderr
    assert not (tmp_path / "node1").exists()
    done = _restore(*args, "--unverified")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["verified"] is False
    assert (tmp_path / "node1" / "chat.db").exists()
