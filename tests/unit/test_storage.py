"""Storage on real SQLite files: batches, the log, catch-up, rewind, snapshots."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.chaos.corrupt import flip_payload
from service import storage as storage_module
from service.chat_schema import MIGRATIONS, TABLES
from service.errors import Internal, StorageCorrupt, StorageFault
from service.replication.types import LogRecord, NodeState, Position, SyncSet
from service.storage import (
    OWN_REPLICATED,
    ConstraintViolation,
    Db,
    Diverged,
    LogDamaged,
    SchemaMismatch,
    Storage,
    changes_cluster,
    check_database_file,
    copy_room,
    move_aside,
    prune_moved_aside,
    prune_rollback_files,
    schema_migrations,
)

REPLICATED_TABLES = {**TABLES, **OWN_REPLICATED}


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[Storage]:
    storage = Storage(tmp_path / "primary.db", migrations=MIGRATIONS)
    yield storage
    storage.close()


@pytest.fixture
def backup(tmp_path: Path) -> Iterator[Storage]:
    storage = Storage(tmp_path / "backup.db", migrations=MIGRATIONS)
    yield storage
    storage.close()


def add_user(storage: Storage, name: str, epoch: int = 1) -> LogRecord:
    """One committed batch that inserts a user; returns its record."""
    batch = storage.begin_batch()
    batch.db.execute(
        "INSERT INTO users(name, name_key, password_hash, created_at) VALUES (?, ?, 'h', 1.0)",
        (name, name.lower()),
    )
    record = batch.seal(epoch)
    batch.commit()
    assert record is not None
    return record


def write(storage: Storage, sql: str, params: tuple[object, ...] = (), epoch: int = 1) -> LogRecord:
    batch = storage.begin_batch()
    batch.db.execute(sql, params)
    record = batch.seal(epoch)
    batch.commit()
    assert record is not None
    return record


def plant_user(storage: Storage, user_id: int) -> None:
    """A user row written outside any record: a history that is not the primary's."""
    storage.db.execute(
        "INSERT INTO users(id, name, name_key, password_hash, created_at) "
        "VALUES (?, 'zed', 'zed', 'h', 1)",
        (user_id,),
    )


def names(storage: Storage) -> list[str]:
    return [row[0] for row in storage.db.execute("SELECT name FROM users ORDER BY id")]


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """The usual umask of a shell: files 0644 and folders 0755 unless made private."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- opening -----------------------------------------------------------------------------


def test_open_sets_wal_full_sync_and_schema(primary: Storage) -> None:
    assert primary.db.value("PRAGMA journal_mode") == "wal"
    assert primary.db.value("PRAGMA synchronous") == 2  # FULL
    assert primary.db.value("PRAGMA foreign_keys") == 0
    assert primary.db.value("PRAGMA user_version") == len(MIGRATIONS)
    tables = {row[0] for row in primary.db.execute("SELECT name FROM sqlite_master")}
    assert set(REPLICATED_TABLES) | {"txlog", "epochs", "node_state"} <= tables


def test_the_database_and_its_wal_and_shm_are_private_whatever_the_umask(
    tmp_path: Path, permissive_umask: None
) -> None:
    path = tmp_path / "chat.db"
    storage = Storage(path, migrations=MIGRATIONS)
    add_user(storage, "ann")
    snapshot = tmp_path / "snapshot.db"
    storage.make_snapshot(snapshot)
    files = [path, tmp_path / "chat.db-wal", tmp_path / "chat.db-shm", snapshot]
    assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    storage.close()


def test_synchronous_can_be_relaxed_to_normal(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "n.db", synchronous="normal", migrations=MIGRATIONS)
    assert storage.db.value("PRAGMA synchronous") == 1
    storage.save_node_state(NodeState(3, 3, 1))
    assert storage.db.value("PRAGMA synchronous") == 1
    storage.close()


def test_unknown_synchronous_level_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        Storage(tmp_path / "x.db", synchronous="OFF", migrations=MIGRATIONS)


def test_empty_node_is_at_position_zero(primary: Storage) -> None:
    assert primary.position() == Position.ZERO == Position(0, 0)
    assert primary.epoch_history() == []
    assert primary.sync_set() == SyncSet(0, (), 0)
    assert primary.node_state() == NodeState()
    assert primary.first_log_seq() is None


def test_reopen_keeps_data_position_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    storage = Storage(path, migrations=MIGRATIONS)
    add_user(storage, "ann")
    storage.save_node_state(NodeState(1, 1, 1))
    sums = storage.checksums()
    storage.close()
    again = Storage(path, migrations=MIGRATIONS)
    assert again.position() == Position(1, 1)
    assert again.node_state() == NodeState(1, 1, 1)
    assert again.checksums() == sums
    assert again.db.value("PRAGMA user_version") == len(MIGRATIONS)
    again.close()


# A process that opens the database, reads one value and closes it again: an
# operator's sqlite3 shell, say. Run apart, since POSIX locks are per process.
PEEK = (
    "import sqlite3, sys\n"
    "conn = sqlite3.connect(sys.argv[1])\n"
    "print(conn.execute('SELECT count(*) FROM users').fetchone()[0])\n"
    "conn.close()\n"
)
# A node that syncs records, lets another process peek at its database between
# them, and crashes (no close: nothing of its WAL is checkpointed on the way out).
CRASHING_NODE = (
    "import os, subprocess, sys\n"
    "from pathlib import Path\n"
    "from service.chat_schema import MIGRATIONS\n"
    "from service.storage import Storage\n"
    "from tests.unit.test_storage import PEEK, add_user\n"
    "storage = Storage(Path(sys.argv[1]), migrations=MIGRATIONS)\n"
    "storage.defer_sync()\n"
    "add_user(storage, 'ann')\n"
    "storage.sync()\n"
    "subprocess.run([sys.executable, '-c', PEEK, sys.argv[1]], check=True)\n"
    "add_user(storage, 'bob')\n"
    "add_user(storage, 'cy')\n"
    "storage.sync()\n"
    "print(storage.position().seq, flush=True)\n"
    "os._exit(9)\n"
)


def peek(path: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PEEK, str(path)], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_another_process_reading_the_database_leaves_the_nodes_wal_alone(
    tmp_path: Path,
) -> None:
    """In WAL mode the last connection to close checkpoints and deletes the WAL; it
    knows it is the last when it can lock the database file exclusively, which the
    node's connections prevent by holding a shared lock on it. The node must not drop
    those locks (closing any descriptor of the file would, POSIX): else a sqlite3 shell
    that only read deletes the WAL, and the node's next commits go where nobody sees
    them, and ``sync()``, finding no WAL, syncs nothing."""
    path = tmp_path / "node.db"
    storage = Storage(path, migrations=MIGRATIONS)
    storage.defer_sync()
    add_user(storage, "ann")
    storage.sync()
    wal = os.stat(storage.wal_path)
    assert peek(path) == 1
    assert os.stat(storage.wal_path).st_ino == wal.st_ino, "the WAL was deleted"
    add_user(storage, "bob")
    storage.sync()
    assert peek(path) == 2
    storage.close()


def test_records_synced_after_another_process_read_the_database_survive_a_crash(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.db"
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_NODE, str(path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert crashed.returncode == 9, crashed.stderr
    assert crashed.stdout.split() == ["1", "3"]  # the peek saw one user; seq 3 synced
    again = Storage(path, migrations=MIGRATIONS)
    assert again.position() == Position(1, 3)
    assert again.db.value("SELECT count(*) FROM users") == 3
    again.close()


def test_sessions_from_before_they_ended_get_the_default_ends(tmp_path: Path) -> None:
    """The v3 migration, on a database made by the code before it (schema v2)."""
    path = tmp_path / "v2.db"
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript("".join(schema_migrations(MIGRATIONS)[:2]))
        old.execute("INSERT INTO sessions VALUES ('aa', 1, 'r1', 1000.0)")
        old.execute("PRAGMA user_version=2")
        old.commit()
    storage = Storage(path, migrations=MIGRATIONS)
    row = storage.db.one("SELECT expires_at, idle_timeout, ends_at FROM sessions")
    assert row == (1000.0 + 30 * 86400, 7 * 86400, 1000.0 + 30 * 86400)
    assert storage.db.value("PRAGMA user_version") == len(MIGRATIONS)
    storage.close()


# ---- Db ----------------------------------------------------------------------------------


def test_db_helpers(primary: Storage) -> None:
    db = primary.db
    assert db.execute("SELECT 1, 'a'") == [(1, "a")]
    assert db.one("SELECT 1 WHERE 0") is None
    assert db.value("SELECT NULL", default=7) == 7
    assert db.value("SELECT 1 WHERE 0", default="none") == "none"
    db.execute("INSERT INTO cluster(key, value) VALUES ('a', '1'), ('b', '2')")
    assert db.changes() == 2


def test_constraint_errors_become_constraint_violation(primary: Storage) -> None:
    add_user(primary, "ann")
    batch = primary.begin_batch()
    with pytest.raises(ConstraintViolation):
        batch.db.execute(
            "INSERT INTO users(name, name_key, password_hash, created_at) "
            "VALUES ('ANN', 'ann', 'h', 1)"
        )
    batch.rollback()


def test_other_sqlite_errors_become_internal(primary: Storage) -> None:
    with pytest.raises(Internal, match="no such table"):
        primary.db.execute("SELECT * FROM nowhere")


# ---- batches -----------------------------------------------------------------------------


def test_batches_get_contiguous_seqs_and_positions(primary: Storage) -> None:
    records = [add_user(primary, name) for name in ("ann", "bob", "cy")]
    assert [r.seq for r in records] == [1, 2, 3]
    assert {r.epoch for r in records} == {1}
    assert primary.position() == Position(1, 3)
    assert primary.log_range(0, 10) == records
    assert primary.log_range(1, 1) == [records[1]]


def test_a_log_range_in_bytes_holds_what_fits_and_at_least_one_record(primary: Storage) -> None:
    records = [add_user(primary, name * 300) for name in ("a", "b", "c", "d")]
    size = len(records[0].changeset)
    assert all(len(r.changeset) == size for r in records)
    assert primary.log_range(0, 10, max_bytes=2 * size) == records[:2]
    assert primary.log_range(0, 10, max_bytes=2 * size + size // 2) == records[:2]
    assert primary.log_range(1, 10, max_bytes=1) == [records[1]], "one record, whatever its size"
    assert primary.log_range(0, 3, max_bytes=100 * size) == records[:3], "the count still bounds"


def test_empty_batch_seals_to_none_and_logs_nothing(primary: Storage) -> None:
    batch = primary.begin_batch()
    batch.db.execute("SELECT count(*) FROM users")
    assert batch.seal(1) is None
    batch.commit()
    assert primary.position() == Position.ZERO
    assert primary.log_range(0, 10) == []


def test_rolled_back_batch_changes_nothing(primary: Storage) -> None:
    add_user(primary, "ann")
    batch = primary.begin_batch()
    batch.db.execute("DELETE FROM users")
    batch.rollback()
    assert names(primary) == ["ann"]
    assert primary.position() == Position(1, 1)


def test_savepoint_undoes_only_the_failed_operation(primary: Storage) -> None:
    batch = primary.begin_batch()
    with batch.savepoint() as db:
        db.execute("INSERT INTO cluster(key, value) VALUES ('kept', '1')")

    def failing_operation() -> None:
        with batch.savepoint() as db:
            db.execute("INSERT INTO cluster(key, value) VALUES ('undone', '1')")
            db.execute("UPDATE cluster SET value = '2' WHERE key = 'kept'")
            raise RuntimeError("the operation failed")

    with pytest.raises(RuntimeError):
        failing_operation()
    record = batch.seal(1)
    batch.commit()
    assert primary.db.execute("SELECT key, value FROM cluster") == [("kept", "1")]
    # The changeset carries only what survived: a backup ends with the same rows.
    assert record is not None
    other = Storage(primary.path.with_name("other.db"), migrations=MIGRATIONS)
    other.apply_records([record])
    assert other.checksums() == primary.checksums()
    other.close()


def test_a_nested_savepoint_undoes_only_its_own_rows(primary: Storage) -> None:
    """Savepoints share one name (see Batch.savepoint): the inner one still rolls
    back alone, and the outer one keeps its rows."""
    batch = primary.begin_batch()

    def failing_inner_operation() -> None:
        with batch.savepoint() as inner:
            inner.execute("INSERT INTO cluster(key, value) VALUES ('inner', '1')")
            raise RuntimeError("the inner operation failed")

    with batch.savepoint() as db:
        db.execute("INSERT INTO cluster(key, value) VALUES ('outer', '1')")
        with pytest.raises(RuntimeError):
            failing_inner_operation()
        db.execute("UPDATE cluster SET value = '2' WHERE key = 'outer'")
    batch.seal(1)
    batch.commit()
    assert primary.db.execute("SELECT key, value FROM cluster") == [("outer", "2")]


def test_a_second_batch_cannot_open_while_one_is_open(primary: Storage) -> None:
    batch = primary.begin_batch()
    with pytest.raises(Internal):
        primary.begin_batch()
    batch.rollback()


def test_sealed_batch_refuses_more_writes(primary: Storage) -> None:
    batch = primary.begin_batch()
    batch.db.execute("INSERT INTO cluster(key, value) VALUES ('a', '1')")
    batch.seal(1)
    with pytest.raises(Internal):
        batch.db.execute("INSERT INTO cluster(key, value) VALUES ('b', '1')")
    batch.commit()


def test_seal_refuses_an_epoch_older_than_the_log(primary: Storage) -> None:
    add_user(primary, "ann", epoch=3)
    batch = primary.begin_batch()
    batch.db.execute("INSERT INTO cluster(key, value) VALUES ('a', '1')")
    with pytest.raises(Internal, match="epoch"):
        batch.seal(2)
    batch.rollback()
    assert primary.position() == Position(3, 1)


def test_sync_set_versions_grow_and_replicate(primary: Storage, backup: Storage) -> None:
    batch = primary.begin_batch()
    first = batch.set_sync_set((3, 1, 2), epoch=1)
    second = batch.set_sync_set((1, 2), epoch=1)
    record = batch.seal(1)
    batch.commit()
    assert first == SyncSet(1, (1, 2, 3), 1)
    assert second == primary.sync_set() == SyncSet(2, (1, 2), 1)
    assert record is not None
    backup.apply_records([record])
    assert backup.sync_set() == SyncSet(2, (1, 2), 1)


def test_only_records_that_change_the_sync_set_say_they_may(
    primary: Storage, backup: Storage
) -> None:
    """A backup reads its stored sync set again only after such records."""
    batch = primary.begin_batch()
    batch.set_sync_set((1, 2), epoch=1)
    change = batch.seal(1)
    batch.commit()
    assert change is not None
    assert changes_cluster(change)
    plain = add_user(primary, "ann")
    assert not changes_cluster(plain)
    backup.apply_records([change, plain])
    assert backup.sync_set() == SyncSet(1, (1, 2), 1)


def test_epoch_history_records_the_first_seq_of_each_epoch(primary: Storage) -> None:
    add_user(primary, "a", epoch=1)
    add_user(primary, "b", epoch=1)
    add_user(primary, "c", epoch=2)
    add_user(primary, "d", epoch=5)
    add_user(primary, "e", epoch=5)
    assert primary.epoch_history() == [(1, 1), (2, 3), (5, 4)]
    assert primary.position() == Position(5, 5)


# ---- node state --------------------------------------------------------------------------


def test_node_state_round_trip(primary: Storage) -> None:
    primary.save_node_state(NodeState(current_epoch=4, voted_epoch=4, voted_for=2))
    assert primary.node_state() == NodeState(4, 4, 2)
    primary.save_node_state(NodeState(current_epoch=5, voted_epoch=4, voted_for=None))
    assert primary.node_state() == NodeState(5, 4, None)


def test_node_state_is_not_replicated(primary: Storage, backup: Storage) -> None:
    batch = primary.begin_batch()
    batch.db.execute("INSERT INTO cluster(key, value) VALUES ('a', '1')")
    record = batch.seal(1)
    batch.commit()
    primary.save_node_state(NodeState(9, 9, 1))
    assert record is not None
    backup.apply_records([record])
    assert backup.node_state() == NodeState()


# ---- catch-up (apply_records) ------------------------------------------------------------


def test_apply_records_makes_a_backup_identical(primary: Storage, backup: Storage) -> None:
    records = [add_user(primary, n) for n in ("ann", "bob")]
    records.append(write(primary, "UPDATE users SET name = 'Bob' WHERE name = 'bob'", epoch=2))
    records.append(write(primary, "DELETE FROM users WHERE name = 'ann'", epoch=2))
    assert backup.apply_records(records[:2]) == Position(1, 2)
    assert backup.apply_records(records[2:]) == Position(2, 4)
    assert backup.checksums() == primary.checksums()
    assert backup.epoch_history() == primary.epoch_history() == [(1, 1), (2, 3)]
    assert backup.log_range(0, 10) == records


def test_records_that_change_a_row_again_apply_together_as_one_by_one(
    primary: Storage, backup: Storage, tmp_path: Path
) -> None:
    """Records applied in one call are applied as their combination (storage.py
    ``_apply_changesets``): rows inserted then updated, deleted, inserted again under
    a freed unique name, across tables and epochs, end as they do one by one."""
    records = [add_user(primary, n) for n in ("ann", "bob", "cy")]
    records.append(write(primary, "UPDATE users SET name = 'Ann' WHERE name = 'ann'"))
    records.append(write(primary, "DELETE FROM users WHERE name = 'bob'", epoch=2))
    records.append(add_user(primary, "Bob", epoch=2))  # bob's name_key, another id
    records.append(write(primary, "UPDATE users SET name = 'Ann2' WHERE name = 'Ann'", epoch=2))
    records.append(write(primary, "DELETE FROM users WHERE name = 'cy'", epoch=3))
    records.append(write(primary, "DELETE FROM users WHERE name = 'Bob'", epoch=3))
    assert backup.apply_records(records) == Position(3, 9)
    assert backup.checksums() == primary.checksums()
    assert backup.epoch_history() == primary.epoch_history() == [(1, 1), (2, 5), (3, 8)]
    assert backup.log_range(0, 20) == records
    one_by_one = Storage(tmp_path / "one-by-one.db", migrations=MIGRATIONS)
    for record in records:
        one_by_one.apply_records([record])
    assert one_by_one.checksums() == backup.checksums()
    one_by_one.close()


def test_a_conflict_among_records_applied_together_diverges_and_rolls_back(
    primary: Storage, backup: Storage
) -> None:
    ann, bob, cy = (add_user(primary, n) for n in ("ann", "bob", "cy"))
    backup.apply_records([ann])
    plant_user(backup, 3)
    before = backup.checksums()
    with pytest.raises(Diverged, match="seq 3 does not apply"):
        backup.apply_records([bob, cy])
    assert backup.checksums() == before
    assert backup.position() == Position(1, 1)
    assert len(backup.log_range(0, 10)) == 1


def test_apply_records_allows_empty_changesets(backup: Storage) -> None:
    assert backup.apply_records([LogRecord(1, 1, b""), LogRecord(1, 2, b"")]) == Position(1, 2)
    assert backup.epoch_history() == [(1, 1)]


def test_apply_no_records_keeps_position(backup: Storage) -> None:
    assert backup.apply_records([]) == Position.ZERO


def test_apply_records_with_a_gap_diverges_and_changes_nothing(
    primary: Storage, backup: Storage
) -> None:
    records = [add_user(primary, n) for n in ("ann", "bob", "cy")]
    backup.apply_records(records[:1])
    before = backup.checksums()
    with pytest.raises(Diverged, match="seq"):
        backup.apply_records([records[2]])
    with pytest.raises(Diverged, match="seq"):
        backup.apply_records([records[1], records[0]])
    assert backup.checksums() == before
    assert backup.position() == Position(1, 1)
    assert len(backup.log_range(0, 10)) == 1


def test_apply_records_from_an_older_epoch_diverges(backup: Storage) -> None:
    backup.apply_records([LogRecord(3, 1, b"")])
    with pytest.raises(Diverged, match="epoch"):
        backup.apply_records([LogRecord(2, 2, b"")])


def test_a_conflicting_changeset_diverges_and_rolls_back(primary: Storage, backup: Storage) -> None:
    ann = add_user(primary, "ann")
    bob = add_user(primary, "bob")
    # The backup already has another row with bob's id: its history is not the primary's.
    backup.apply_records([ann])
    plant_user(backup, 2)
    before = backup.checksums()
    with pytest.raises(Diverged, match="seq 2"):
        backup.apply_records([bob])
    assert backup.checksums() == before
    assert backup.position() == Position(1, 1)


def insert_message(storage: Storage, message_id: int, body: str) -> LogRecord:
    """A record of one new message row, with every kind of value a column holds."""
    return write(
        storage,
        "INSERT INTO messages(id, sender_id, recipient_id, body, sent_at, read_at, "
        "request_key, request_check) VALUES (?, 1, 2, ?, 1.5, NULL, ?, ?)",
        (message_id, body, os.urandom(16), b"\x00\xff" * 4),
    )


def many_messages(storage: Storage, first_id: int) -> LogRecord:
    """One record of more new messages than the plain INSERTs take, ids from ``first_id``."""
    batch = storage.begin_batch()
    for n in range(first_id, first_id + storage_module.PLAIN_INSERTS_MAX + 1):
        batch.db.execute(
            "INSERT INTO messages(id, sender_id, recipient_id, body, sent_at) "
            "VALUES (?, 2, 1, 'x', 2.0)",
            (n,),
        )
    record = batch.seal(1)
    batch.commit()
    assert record is not None
    return record


@pytest.mark.parametrize("plain_inserts", [True, False])
def test_records_of_new_rows_apply_as_sqlites_apply_would(
    primary: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plain_inserts: bool
) -> None:
    """Small records of new rows only are inserted by hand (storage.py
    ``_plain_inserts``), the rest by SQLite's changeset apply: both end with the
    primary's rows, in one call and one by one, whichever way each record went."""
    records = [add_user(primary, n) for n in ("ann", "bob")]
    records += [insert_message(primary, n, f"body {n} ✓") for n in range(1, 6)]
    records.append(many_messages(primary, 6))
    records.append(write(primary, "UPDATE messages SET read_at = 3.0 WHERE id = 1"))
    records.append(insert_message(primary, 100, ""))
    if not plain_inserts:
        monkeypatch.setattr(storage_module, "PLAIN_INSERTS_MAX", 0)
    together = Storage(tmp_path / "together.db", migrations=MIGRATIONS)
    one_by_one = Storage(tmp_path / "one-by-one.db", migrations=MIGRATIONS)
    assert together.apply_records(records[:4]) == Position(1, 4)
    assert together.apply_records(records[4:]) == primary.position()
    for record in records:
        one_by_one.apply_records([record])
    assert together.checksums() == one_by_one.checksums() == primary.checksums()
    assert together.log_range(0, 20) == one_by_one.log_range(0, 20) == records
    together.close()
    one_by_one.close()


def test_a_new_row_that_breaks_a_unique_column_diverges_and_rolls_back(
    primary: Storage, backup: Storage
) -> None:
    """A plain INSERT (``_plain_inserts``) that fails on a column other than its key is
    a conflict like SQLite's apply finds: the record diverges, nothing of it stays."""
    ann, bob = add_user(primary, "ann"), add_user(primary, "bob")
    backup.apply_records([ann])
    # Another row holds bob's name under another id: not a conflict of keys.
    backup.db.execute(
        "INSERT INTO users(id, name, name_key, password_hash, created_at) "
        "VALUES (9, 'Bob', 'bob', 'h', 1)"
    )
    before = backup.checksums()
    with pytest.raises(Diverged, match=r"seq 2 does not apply here: .*UNIQUE"):
        backup.apply_records([bob])
    assert backup.checksums() == before
    assert backup.position() == Position(1, 1)
    assert len(backup.log_range(0, 10)) == 1


# A later schema than the primary's: one column more in ``messages``.
LATER_SCHEMA = "ALTER TABLE messages ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;"


def test_a_table_of_another_shape_than_the_changeset_gets_sqlites_apply(
    primary: Storage, tmp_path: Path
) -> None:
    """A node whose table has a column more than the primary's (a later schema) fills
    it with its default, as SQLite's apply does: the plain INSERT does not fit it."""
    backup = Storage(tmp_path / "later.db", migrations=(*MIGRATIONS, LATER_SCHEMA))
    records = [add_user(primary, "ann"), insert_message(primary, 1, "hello")]
    assert backup.apply_records(records[:1]) == Position(1, 1)
    assert backup.apply_records(records[1:]) == Position(1, 2)
    assert backup.db.execute("SELECT id, body, pinned FROM messages") == [(1, "hello", 0)]
    backup.close()


# A later schema that adds a table the primary's records then change.
LATER_TABLE = "CREATE TABLE pins (id INTEGER PRIMARY KEY, message_id INTEGER NOT NULL);"


@pytest.mark.parametrize(
    "statement",
    [
        # A new row: of the backup's own shape it would take a plain INSERT.
        "INSERT INTO messages(id, sender_id, recipient_id, body, sent_at, pinned) "
        "VALUES (7, 1, 2, 'pinned', 1.5, 1)",
        # A changed row: SQLite's apply.
        "UPDATE messages SET pinned = 1 WHERE id = 1",
        # A table the backup does not have at all.
        "INSERT INTO pins(id, message_id) VALUES (1, 1)",
    ],
)
def test_a_record_of_a_later_schema_is_refused_not_skipped(
    tmp_path: Path, backup: Storage, statement: str
) -> None:
    """A backup on an older schema (a cluster upgraded one node at a time) would have
    SQLite's apply skip the record's rows without a word, commit it and acknowledge
    it. It refuses the record instead (``SchemaMismatch``, not a divergence: no
    rewind makes it fit), alone or with others, and changes nothing."""
    later = Storage(tmp_path / "later.db", migrations=(*MIGRATIONS, LATER_SCHEMA, LATER_TABLE))
    users = [add_user(later, "ann"), add_user(later, "bob")]  # a table both have alike
    assert backup.apply_records(users) == Position(1, 2)
    # Message 1 as both have it (the primary's record of it is the later shape too).
    for node in (later, backup):
        node.db.execute(
            "INSERT INTO messages(id, sender_id, recipient_id, body, sent_at) "
            "VALUES (1, 1, 2, 'hi', 1.0)"
        )
    newer = write(later, statement)
    before = backup.checksums()
    for records in ([newer], [newer, add_user(later, "cy")]):
        with pytest.raises(SchemaMismatch, match=r"seq 3 .*later schema; upgrade this node"):
            backup.apply_records(records)
        assert backup.checksums() == before
        assert backup.position() == Position(1, 2)
        assert len(backup.log_range(0, 10)) == 2
    later.close()


def test_records_of_an_earlier_schema_still_combine_and_apply(
    primary: Storage, tmp_path: Path
) -> None:
    """The other way round (an upgraded backup, a primary not yet): updates, and more
    rows than the plain INSERTs take, fill the later column with its default, in one
    call as one by one."""
    records = [add_user(primary, "ann"), insert_message(primary, 1, "hi")]
    records += [many_messages(primary, 2), write(primary, "UPDATE messages SET read_at = 3.0")]
    together = Storage(tmp_path / "together.db", migrations=(*MIGRATIONS, LATER_SCHEMA))
    one_by_one = Storage(tmp_path / "one.db", migrations=(*MIGRATIONS, LATER_SCHEMA))
    assert together.apply_records(records) == primary.position()
    for record in records:
        one_by_one.apply_records([record])
    for node in (together, one_by_one):
        rows = node.db.execute("SELECT count(*), sum(pinned), max(read_at) FROM messages")
        assert rows == [(2 + storage_module.PLAIN_INSERTS_MAX, 0, 3.0)]
    assert together.checksums() == one_by_one.checksums()
    together.close()
    one_by_one.close()


def test_a_database_of_a_later_schema_is_neither_opened_nor_set_back(tmp_path: Path) -> None:
    """A node run on an earlier version than its database's (a downgrade, or a later
    primary's snapshot) would set ``user_version`` back, and the later version would
    then run its migrations twice. It refuses to open instead, saying why (at start a
    ``StorageFault``: the node waits, retrying, for its operator)."""
    path = tmp_path / "later.db"
    later = Storage(path, migrations=(*MIGRATIONS, LATER_SCHEMA))
    later.close()
    with pytest.raises(StorageFault, match="schema version 6, made by a later version"):
        Storage(path, migrations=MIGRATIONS)
    again = Storage(path, migrations=(*MIGRATIONS, LATER_SCHEMA))
    assert again.db.value("PRAGMA user_version") == len(MIGRATIONS) + 1
    again.close()


def test_a_snapshot_of_a_later_schema_is_refused_and_changes_nothing(
    tmp_path: Path, backup: Storage
) -> None:
    later = Storage(tmp_path / "later.db", migrations=(*MIGRATIONS, LATER_SCHEMA))
    add_user(later, "ann")
    later.make_snapshot(tmp_path / "snap.db")
    before = backup.checksums()
    with pytest.raises(SchemaMismatch, match="made by a later version"):
        backup.install_snapshot(tmp_path / "snap.db")
    assert backup.checksums() == before
    assert backup.position() == Position.ZERO
    assert backup.db.value("PRAGMA user_version") == len(MIGRATIONS)
    assert not (tmp_path / "snap.db").exists(), "the refused snapshot was left on the disk"
    later.close()


def test_a_snapshot_file_that_is_gone_is_refused_not_installed_as_empty(
    tmp_path: Path, backup: Storage
) -> None:
    """Opening a missing file would make an empty database: installing that would
    empty this one."""
    add_user(backup, "ann")
    before = (backup.checksums(), backup.position())
    with pytest.raises(StorageFault, match=r"the snapshot received is gone: snap\.db"):
        backup.install_snapshot(tmp_path / "snap.db")
    assert (backup.checksums(), backup.position()) == before
    assert not (tmp_path / "snap.db").exists()


def test_a_text_value_that_is_not_utf8_is_damage_not_a_crash(primary: Storage) -> None:
    """This service writes only str, stored as UTF-8: other bytes in a text column
    were changed on the disk, inside a row, where SQLite's page checks cannot see
    them. A query that meets them says the database is damaged (the node then
    contains it as it does a malformed page) instead of raising a decoding error
    that nothing handles."""
    add_user(primary, "ann")
    primary.db.execute("UPDATE users SET name = CAST(x'41ae' AS TEXT) WHERE id = 1")
    with pytest.raises(StorageCorrupt, match="a text value is not UTF-8"):
        primary.db.execute("SELECT name FROM users")
    with pytest.raises(StorageCorrupt, match="a text value is not UTF-8"):
        primary.checksums_at(primary.position().seq)
    with pytest.raises(StorageCorrupt, match="a text value is not UTF-8"):
        primary.read(lambda db: db.execute("SELECT * FROM users"))


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("node_state", "current_epoch", '{"bad'),  # not JSON
        ("node_state", "voted_for", '"two"'),  # JSON, but not a node id
        ("node_state", "last_position", "[1]"),  # a position of one number
        ("node_state", "database_id", "[1, 2"),
        ("cluster", "sync_set", '{"version": 1}'),  # no members
    ],
)
def test_stored_state_that_does_not_parse_is_damage_found_at_open(
    tmp_path: Path, table: str, key: str, value: str
) -> None:
    """Values this module wrote itself that no longer parse were changed on the disk,
    inside a row: the open says the database is damaged (the node moves it aside)
    rather than raise a parse error at every start."""
    path = tmp_path / "chat.db"
    storage = Storage(path, migrations=MIGRATIONS)
    add_user(storage, "ann")
    storage.db.execute(
        f"INSERT INTO {table}(key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, value),
    )
    storage.close()
    with pytest.raises(StorageCorrupt, match=r"the database is damaged: .* does not parse"):
        Storage(path, migrations=MIGRATIONS)


# ---- the log's checksums -------------------------------------------------------------------


def assert_rewind_refused(storage: Storage, to_seq: int, why: str, folder: Path) -> None:
    """``rewind(to_seq)`` diverges saying ``why``, and changes nothing: no rows, no
    position, no rollback file."""
    before, position, rollback = storage.checksums(), storage.position(), folder / "rollback"
    with pytest.raises(Diverged, match=why):
        storage.rewind(to_seq, rollback)
    assert storage.checksums() == before
    assert storage.position() == position
    assert not rollback.exists()


def damage_record(storage: Storage, seq: int) -> None:
    """Flip one bit of a record's changeset behind the log's back, as a bad sector
    would: the row stays well formed and the changeset still parses."""
    changeset = bytes(storage.db.value("SELECT changeset FROM txlog WHERE seq = ?", (seq,)))
    flipped = changeset[:-1] + bytes([changeset[-1] ^ 0x20])
    storage.db.execute("UPDATE txlog SET changeset = ? WHERE seq = ?", (flipped, seq))


def test_every_record_is_logged_with_the_crc_of_its_changeset(
    primary: Storage, backup: Storage
) -> None:
    records = [add_user(primary, name) for name in ("ann", "bob")]
    backup.apply_records(records)
    for storage in (primary, backup):
        crcs = [row[0] for row in storage.db.execute("SELECT crc FROM txlog ORDER BY seq")]
        assert crcs == [zlib.crc32(record.changeset) for record in records]


def test_a_damaged_record_is_neither_read_back_nor_undone(primary: Storage, tmp_path: Path) -> None:
    records = [add_user(primary, name) for name in ("ann", "bob", "cy")]
    damage_record(primary, 2)
    assert primary.log_range(0, 1) == records[:1]
    assert primary.log_range(2, 10) == records[2:]
    with pytest.raises(LogDamaged, match="record of seq 2 does not match its checksum") as caught:
        primary.log_range(0, 10)
    assert caught.value.seq == 2
    # Its inverse would apply the damage: a rewind over it is refused (the backup
    # then asks for a snapshot).
    assert_rewind_refused(primary, 1, "seq 2 does not match its checksum", tmp_path)


def test_dropping_a_damaged_record_and_the_older_ones_keeps_the_position(
    primary: Storage,
) -> None:
    records = [add_user(primary, name) for name in ("ann", "bob", "cy")]
    damage_record(primary, 2)
    assert primary.drop_log_through(2) == 2
    assert primary.first_log_seq() == 3
    assert primary.log_range(0, 10) == records[2:]
    assert primary.position() == Position(1, 3)
    assert add_user(primary, "dee").seq == 4
    assert primary.log_bytes() == sum(len(r.changeset) for r in primary.log_range(0, 10))


def test_a_database_from_before_the_checksums_gains_them_and_keeps_its_records(
    tmp_path: Path,
) -> None:
    path = tmp_path / "chat.db"
    old = Storage(path, migrations=MIGRATIONS)
    first = add_user(old, "ann")
    old.db.execute("ALTER TABLE txlog DROP COLUMN crc")  # the layout before
    old.close()
    opened_as_is = Storage(path)  # a tool's open writes nothing
    assert "crc" not in [row[1] for row in opened_as_is.db.execute("PRAGMA table_info(txlog)")]
    opened_as_is.close()
    again = Storage(path, migrations=MIGRATIONS)
    second = add_user(again, "bob")
    rows = again.db.execute("SELECT crc FROM txlog ORDER BY seq")
    assert [row[0] for row in rows] == [None, zlib.crc32(second.changeset)]
    # A record from before has no checksum to fail: it is read back as it is.
    assert again.log_range(0, 10) == [first, second]
    again.close()


def test_a_snapshot_from_before_the_checksums_gains_them(tmp_path: Path, backup: Storage) -> None:
    old = Storage(tmp_path / "old.db", migrations=MIGRATIONS)
    first = add_user(old, "ann")
    old.db.execute("ALTER TABLE txlog DROP COLUMN crc")
    old.make_snapshot(tmp_path / "snap.db")
    old.close()
    backup.install_snapshot(tmp_path / "snap.db")
    assert backup.log_range(0, 10) == [first]
    second = add_user(backup, "bob")
    assert backup.db.value("SELECT crc FROM txlog WHERE seq = 2") == zlib.crc32(second.changeset)


# ---- the node's own values' checksums --------------------------------------------------------


def state_crc(storage: Storage, key: str) -> object:
    return storage.db.value("SELECT crc FROM node_state WHERE key = ?", (key,))


def test_the_nodes_own_values_and_epochs_are_written_with_their_checksums(
    primary: Storage,
) -> None:
    add_user(primary, "ann")
    add_user(primary, "bob", epoch=2)
    primary.save_node_state(NodeState(current_epoch=2, voted_epoch=2, voted_for=1))
    rows = primary.db.execute("SELECT key, value, crc FROM node_state")
    assert {key for key, _, _ in rows} >= {"last_position", "voted_epoch", "database_id"}
    for key, value, crc in rows:
        assert crc == zlib.crc32(f"{key}\x00{value}".encode()), key
    epochs = primary.db.execute("SELECT epoch, start_seq, crc FROM epochs")
    assert epochs == [(1, 1, zlib.crc32(b"1:1")), (2, 2, zlib.crc32(b"2:2"))]


@pytest.mark.parametrize(
    ("needle", "at", "what"),
    [
        # seq 5 becomes 7: the node would claim two records it does not hold.
        (b"5]", 0, "node_state last_position fails its checksum"),
        # The vote of epoch 7 becomes one of epoch 5: it could vote again in 7.
        (b"voted_epoch7", len("voted_epoch"), "node_state voted_epoch fails its checksum"),
    ],
)
def test_a_value_the_disk_changed_that_still_parses_is_damage_found_at_open(
    tmp_path: Path, needle: bytes, at: int, what: str
) -> None:
    """One bit of a row's payload, flipped in the file as a bad sector would: every
    page stays well formed and the value still parses. The open says the database
    is damaged (the node moves it aside) instead of taking it as its position or
    its vote."""
    path = tmp_path / "chat.db"
    storage = Storage(path, migrations=MIGRATIONS)
    for name in ("ann", "bob", "cy", "dee", "eve"):
        add_user(storage, name)
    storage.save_node_state(NodeState(current_epoch=7, voted_epoch=7, voted_for=3))
    storage.close()
    flip_payload(path, "node_state", needle, bit=0x02, at=at)
    with pytest.raises(StorageCorrupt, match=what):
        Storage(path, migrations=MIGRATIONS)


def test_an_epochs_row_the_disk_changed_is_damage_found_at_open(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    storage = Storage(path, migrations=MIGRATIONS)
    add_user(storage, "ann")
    add_user(storage, "bob", epoch=2)
    storage.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:  # the disk, not this module
        conn.execute("UPDATE epochs SET start_seq = 3 WHERE epoch = 2")
        conn.commit()
    with pytest.raises(StorageCorrupt, match="the epochs row 2:3 fails its checksum"):
        Storage(path, migrations=MIGRATIONS)


def test_a_value_an_older_version_rewrote_is_unchecked_until_written_again(
    primary: Storage,
) -> None:
    """A version from before the checksums updates a value and keeps the crc (an older
    backup installing this version's snapshot, a downgrade): the trigger forgets the
    crc rather than leave one that no longer matches a sound value."""
    add_user(primary, "ann")
    primary.db.execute(  # what the older version writes
        "INSERT INTO node_state(key, value) VALUES ('last_position', '[1, 1]') "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value"
    )
    assert state_crc(primary, "last_position") is not None  # the same value: still sound
    primary.db.execute("UPDATE node_state SET value = '[1, 2]' WHERE key = 'last_position'")
    assert state_crc(primary, "last_position") is None
    assert primary.position() == Position(1, 2)  # read as it is
    primary.db.execute("UPDATE node_state SET value = '[1, 1]' WHERE key = 'last_position'")
    add_user(primary, "bob")  # this version's next write
    assert state_crc(primary, "last_position") == zlib.crc32(b"last_position\x00[1, 2]")


def test_a_database_from_before_the_state_checksums_gains_them_and_reads_its_values(
    tmp_path: Path,
) -> None:
    path = tmp_path / "chat.db"
    old = Storage(path, migrations=MIGRATIONS)
    add_user(old, "ann")
    old.save_node_state(NodeState(current_epoch=1, voted_epoch=1, voted_for=1))
    for statement in (
        "DROP TRIGGER node_state_crc_forgotten",
        "ALTER TABLE node_state DROP COLUMN crc",
        "ALTER TABLE epochs DROP COLUMN crc",
    ):
        old.db.execute(statement)  # the layout before
    old.close()
    opened_as_is = Storage(path)  # a tool's open changes nothing, and reads the values
    assert opened_as_is.position() == Position(1, 1)
    assert opened_as_is.epoch_history() == [(1, 1)]
    opened_as_is.close()
    again = Storage(path, migrations=MIGRATIONS)
    assert again.node_state() == NodeState(current_epoch=1, voted_epoch=1, voted_for=1)
    assert state_crc(again, "voted_epoch") is None  # from before: not checked
    add_user(again, "bob", epoch=2)
    assert state_crc(again, "last_position") == zlib.crc32(b"last_position\x00[2, 2]")
    assert again.epoch_history() == [(1, 1), (2, 2)]
    assert again.db.value("SELECT crc FROM epochs WHERE epoch = 2") == zlib.crc32(b"2:2")
    again.close()


# ---- rewind ------------------------------------------------------------------------------


def test_rewind_restores_an_earlier_point_and_keeps_a_rollback_file(
    primary: Storage, tmp_path: Path
) -> None:
    add_user(primary, "ann", epoch=1)
    sums_at_1 = primary.checksums()
    removed = [
        add_user(primary, "bob", epoch=2),
        write(primary, "UPDATE users SET name = 'Ann' WHERE id = 1", epoch=2),
        write(primary, "DELETE FROM users WHERE id = 2", epoch=3),
    ]
    rollback = tmp_path / "rollback.jsonl"
    assert primary.rewind(1, rollback) == 3
    assert primary.checksums() == sums_at_1
    assert primary.position() == Position(1, 1)
    assert primary.epoch_history() == [(1, 1)]
    lines = [json.loads(line) for line in rollback.read_text().splitlines()]
    assert [(x["epoch"], x["seq"]) for x in lines] == [(2, 2), (2, 3), (3, 4)]
    assert [base64.b64decode(x["changeset"]) for x in lines] == [r.changeset for r in removed]
    # The log continues from the rewound point.
    assert add_user(primary, "cy", epoch=4).seq == 2


def test_rewind_to_zero_empties_the_node(primary: Storage, tmp_path: Path) -> None:
    empty = primary.checksums()
    add_user(primary, "ann", epoch=2)
    assert primary.rewind(0, tmp_path / "rb") == 1
    assert primary.checksums() == empty
    assert primary.position() == Position.ZERO
    assert primary.epoch_history() == []


def test_rewind_at_or_past_the_position_removes_nothing(primary: Storage, tmp_path: Path) -> None:
    add_user(primary, "ann")
    assert primary.rewind(1, tmp_path / "rb") == 0
    assert primary.rewind(5, tmp_path / "rb") == 0
    assert not (tmp_path / "rb").exists()


def test_rewind_past_a_pruned_log_diverges(primary: Storage, tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        add_user(primary, name)
    primary.prune_log(keep=1)
    assert_rewind_refused(primary, 1, "no longer holds", tmp_path)


# ---- rollback files ----------------------------------------------------------------------


def rewind_into(storage: Storage, path: Path, users: int = 1) -> int:
    """Commit ``users`` users, then rewind them into the rollback file ``path``;
    returns the file's size."""
    start = storage.position().seq
    for i in range(users):
        add_user(storage, f"{path.stem}-{i}")
    assert storage.rewind(start, path) == users
    return path.stat().st_size


def test_rollback_files_are_private(
    primary: Storage, tmp_path: Path, permissive_umask: None
) -> None:
    path = tmp_path / "rollback" / "rewind-1.jsonl"
    rewind_into(primary, path)
    assert mode(path.parent) == 0o700
    assert mode(path) == 0o600


def test_rollback_files_beyond_the_count_are_pruned_oldest_first(
    primary: Storage, tmp_path: Path
) -> None:
    folder = tmp_path / "rollback"
    paths = [folder / f"rewind-{i:03d}.jsonl" for i in range(5)]
    for path in paths:
        rewind_into(primary, path)
    (folder / "notes.txt").write_text("not a rollback file")
    assert prune_rollback_files(folder, max_files=3, max_bytes=10**9) == paths[:2]
    assert sorted(folder.iterdir()) == sorted([*paths[2:], folder / "notes.txt"])
    assert prune_rollback_files(folder, max_files=3, max_bytes=10**9) == []


def test_rollback_files_beyond_the_bytes_are_pruned(primary: Storage, tmp_path: Path) -> None:
    folder = tmp_path / "rollback"
    paths = [folder / f"rewind-{i:03d}.jsonl" for i in range(4)]
    sizes = [rewind_into(primary, path, users=3) for path in paths]
    # Room for the newest two files and not quite a third.
    limit = sizes[3] + sizes[2] + sizes[1] - 1
    assert prune_rollback_files(folder, max_files=100, max_bytes=limit) == paths[:2]
    assert sorted(folder.iterdir()) == paths[2:]


def test_the_newest_rollback_file_is_kept_whatever_its_size(
    primary: Storage, tmp_path: Path
) -> None:
    folder = tmp_path / "rollback"
    paths = [folder / f"rewind-{i:03d}.jsonl" for i in range(3)]
    for path in paths:
        rewind_into(primary, path, users=5)
    assert prune_rollback_files(folder, max_files=20, max_bytes=1) == paths[:2]
    assert list(folder.iterdir()) == [paths[2]]
    assert len(paths[2].read_text().splitlines()) == 5


def test_pruning_a_missing_rollback_folder_does_nothing(tmp_path: Path) -> None:
    assert prune_rollback_files(tmp_path / "rollback", max_files=1, max_bytes=1) == []


def _damaged_database(path: Path, tag: str) -> None:
    """A database and its WAL and shared memory, as a node leaves them when it stops
    (the contents are the test's: what is moved is the files)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").write_text(f"{tag}{suffix}")


def test_databases_moved_aside_in_one_second_keep_a_name_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node restarted at once after a move aside can find its new database
    damaged within the same second: the second copy used to replace the first."""
    monkeypatch.setattr(time, "strftime", lambda _: "20261207T101010")
    db, folder = tmp_path / "chat.db", tmp_path / "damaged"
    moved = []
    for tag in ("first", "second", "third"):
        _damaged_database(db, tag)
        moved.append(move_aside(db, folder))
    assert [p.name for p in moved] == [
        "chat.db.20261207T101010",
        "chat.db.20261207T101010-2",
        "chat.db.20261207T101010-3",
    ]
    for path, tag in zip(moved, ("first", "second", "third"), strict=True):
        assert path.read_text() == tag
        assert Path(f"{path}-wal").read_text() == f"{tag}-wal"
    assert not db.exists()
    assert not Path(f"{db}-wal").exists()


def test_only_the_newest_damaged_copies_are_kept(tmp_path: Path) -> None:
    """Ordered by when they were moved aside (the name), with their WAL and shared
    memory; the copy just moved aside is kept whatever its name says (a clock set
    back), and files not named as a copy are left alone."""
    folder = tmp_path / "damaged"
    folder.mkdir()
    stamps = ["20261207T101011", "20261207T101010-2", "20261206T235959", "20261207T101010"]
    for stamp in stamps:
        _damaged_database(folder / f"chat.db.{stamp}", stamp)
    (folder / "notes.txt").write_text("the operator's")
    (folder / "chat.db.20261201T000000.sql").write_text("an export")
    (folder / "chat.db.20261201T000001").mkdir()  # not a copy: a folder
    just_moved = folder / "chat.db.20261207T101010-2"
    gone = prune_moved_aside(folder, just_moved, keep=2)
    assert [p.name for p in gone] == ["chat.db.20261206T235959", "chat.db.20261207T101010"]
    copies = ("20261207T101010-2", "20261207T101011")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            *(f"chat.db.{stamp}{suffix}" for stamp in copies for suffix in ("", "-wal", "-shm")),
            "notes.txt",
            "chat.db.20261201T000000.sql",
            "chat.db.20261201T000001",
        ]
    )
    assert prune_moved_aside(folder, just_moved, keep=2) == []
    # Moved aside under a clock set back: the oldest name, kept all the same.
    back = folder / "chat.db.20200101T000000"
    _damaged_database(back, "back")
    assert [p.name for p in prune_moved_aside(folder, back, keep=1)] == [
        "chat.db.20261207T101010-2",
        "chat.db.20261207T101011",
    ]
    assert back.exists()
    assert prune_moved_aside(tmp_path / "nowhere", back, keep=1) == []


# ---- the log -----------------------------------------------------------------------------


def test_prune_log_keeps_the_newest_records_and_the_position(primary: Storage) -> None:
    records = [add_user(primary, f"u{i}") for i in range(5)]
    assert primary.prune_log(keep=2) == 3
    assert primary.first_log_seq() == 4
    assert primary.log_range(0, 10) == records[3:]
    assert primary.prune_log(keep=2) == 0
    assert primary.prune_log(keep=0) == 2
    assert primary.first_log_seq() is None
    assert primary.position() == Position(1, 5)
    assert add_user(primary, "next").seq == 6


def add_sized(storage: Storage, size: int) -> LogRecord:
    """A record whose changeset grows with ``size`` (a user with a hash that long)."""
    return write(
        storage,
        "INSERT INTO users(name, name_key, password_hash, created_at) VALUES (?, ?, ?, 1.0)",
        (f"s{size}-{os.urandom(4).hex()}", f"s{size}-{os.urandom(4).hex()}", "h" * size),
    )


def kept_within(records: list[LogRecord], keep_bytes: int) -> list[LogRecord]:
    """The newest records whose changesets add up to ``keep_bytes`` at most (at least one)."""
    kept: list[LogRecord] = []
    for record in reversed(records):
        if kept and sum(len(r.changeset) for r in kept) + len(record.changeset) > keep_bytes:
            break
        kept.insert(0, record)
    return kept


def test_prune_log_keeps_the_newest_records_within_a_size_in_bytes(primary: Storage) -> None:
    records = [add_sized(primary, size) for size in (100, 2000, 50, 6000, 300, 700, 10)]
    budget = sum(len(r.changeset) for r in records[-3:]) + 20
    assert primary.prune_log(keep=100, keep_bytes=budget) == 4
    assert primary.log_range(0, 100) == records[-3:]
    assert primary.log_bytes() == sum(len(r.changeset) for r in records[-3:])
    assert primary.position() == Position(1, 7)
    # The count still bounds the log when it is the smaller bound.
    assert primary.prune_log(keep=2, keep_bytes=budget) == 1
    assert primary.log_range(0, 100) == records[-2:]


def test_prune_log_keeps_the_newest_record_whatever_its_size(primary: Storage) -> None:
    records = [add_sized(primary, size) for size in (10, 5000)]
    assert primary.prune_log(keep=100, keep_bytes=1) == 1
    assert primary.log_range(0, 10) == records[1:]
    assert primary.prune_log(keep=100, keep_bytes=1) == 0


def test_prune_log_step_deletes_a_bounded_part_and_says_more_are_due(primary: Storage) -> None:
    """The node prunes on its event loop, a part a tick (runtime.PRUNE_STEP_BYTES):
    each step about ``step_bytes`` (at least one record), the last one says it is done,
    and the log ends as one whole prune leaves it."""
    records = [add_sized(primary, 3000) for _ in range(10)]
    budget = sum(len(r.changeset) for r in records[-2:])
    step = len(records[0].changeset) * 3
    steps = []
    while True:
        pruned, more = primary.prune_log_step(100, budget, step)
        steps.append(pruned)
        if not more:
            break
    assert steps == [3, 3, 2], steps
    assert primary.log_range(0, 100) == records[-2:]
    # A step smaller than one record still deletes one.
    add_sized(primary, 3000)
    assert primary.prune_log_step(100, budget, 1) == (1, False)
    assert primary.prune_log_step(100, budget, 1) == (0, False)
    # A prune commits without an fsync; the votes after it are synced again (FULL).
    assert primary._control_db.value("PRAGMA synchronous") == 2


def test_prune_log_counts_the_records_appended_since_the_last_prune(
    primary: Storage, backup: Storage
) -> None:
    """The running size: records sealed on a primary and applied on a backup."""
    records: list[LogRecord] = []
    budget = 5000
    for round_sizes in ((100, 2000, 3000), (50, 4000), (10, 10, 10, 2500)):
        new = [add_sized(primary, size) for size in round_sizes]
        records += new
        backup.apply_records(new)
        for storage in (primary, backup):
            storage.prune_log(keep=100, keep_bytes=budget)
            assert storage.log_range(0, 100) == kept_within(records, budget)
            assert storage.log_bytes() <= budget


def test_prune_log_counts_afresh_after_a_rewind_and_a_snapshot(
    primary: Storage, backup: Storage, tmp_path: Path
) -> None:
    """A rewind removes records whose seqs come again with other sizes; a snapshot
    brings another log: neither may leave the running size behind."""
    records = [add_sized(backup, size) for size in (100, 100, 100, 100)]
    backup.prune_log(keep=100, keep_bytes=10_000)
    backup.rewind(2, tmp_path / "rollback" / "r.jsonl")
    records = records[:2] + [add_sized(backup, size) for size in (3000, 3000)]
    budget = sum(len(r.changeset) for r in records[-2:])
    backup.prune_log(keep=100, keep_bytes=budget)
    assert backup.log_range(0, 100) == records[-2:]

    for size in (4000, 4000, 4000):
        add_sized(primary, size)
    primary.make_snapshot(tmp_path / "snap.db")
    backup.install_snapshot(tmp_path / "snap.db")
    newest = primary.log_range(0, 100)
    backup.prune_log(keep=100, keep_bytes=len(newest[-1].changeset) + 10)
    assert backup.log_range(0, 100) == newest[-1:]


# ---- snapshots ---------------------------------------------------------------------------


def test_snapshot_install_converges_and_keeps_own_node_state(
    primary: Storage, backup: Storage, tmp_path: Path
) -> None:
    for name in ("ann", "bob"):
        add_user(primary, name, epoch=2)
    primary.save_node_state(NodeState(current_epoch=2, voted_epoch=2, voted_for=1))
    backup.save_node_state(NodeState(current_epoch=5, voted_epoch=4, voted_for=3))
    add_user(backup, "stale", epoch=1)

    snapshot = tmp_path / "snap.db"
    assert primary.make_snapshot(snapshot) == Position(2, 2)
    assert backup.install_snapshot(snapshot) == Position(2, 2)

    assert backup.checksums() == primary.checksums()
    assert backup.position() == primary.position()
    assert backup.epoch_history() == [(2, 1)]
    assert backup.node_state() == NodeState(current_epoch=5, voted_epoch=4, voted_for=3)
    assert backup.integrity_check() == "ok"
    # Installed where it lay, and used up: no staging copy, no file left behind.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("snap")) == []
    assert not list(tmp_path.glob("*.installing*")) + list(tmp_path.glob("*.partial*"))
    # Catch-up continues from the snapshot's position.
    backup.apply_records([add_user(primary, "cy", epoch=2)])
    assert backup.checksums() == primary.checksums()


def test_install_snapshot_takes_the_higher_current_epoch(
    primary: Storage, backup: Storage, tmp_path: Path
) -> None:
    add_user(primary, "ann", epoch=7)
    primary.save_node_state(NodeState(current_epoch=7, voted_epoch=7, voted_for=1))
    backup.save_node_state(NodeState(current_epoch=3, voted_epoch=3, voted_for=2))
    primary.make_snapshot(tmp_path / "s.db")
    backup.install_snapshot(tmp_path / "s.db")
    assert backup.node_state() == NodeState(current_epoch=7, voted_epoch=3, voted_for=2)


def test_snapshot_leaves_out_an_open_batch(primary: Storage, tmp_path: Path) -> None:
    add_user(primary, "ann")
    batch = primary.begin_batch()
    batch.db.execute("DELETE FROM users")
    assert primary.make_snapshot(tmp_path / "s.db") == Position(1, 1)
    batch.rollback()
    copy = Storage(tmp_path / "s.db", migrations=MIGRATIONS)
    assert names(copy) == ["ann"]
    copy.close()


def test_a_snapshot_without_room_beside_it_is_refused_and_leaves_nothing(
    primary: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy that would leave the data dir less than its spare is not begun: the
    node's own commits need the room."""
    add_user(primary, "ann")
    folder = tmp_path / "out"
    folder.mkdir()
    free = shutil.disk_usage(folder).free
    monkeypatch.setattr(storage_module, "COPY_SPARE_BYTES", free)
    with pytest.raises(StorageFault, match=r"no room for a copy of the database: it needs"):
        primary.make_snapshot(folder / "s.db")
    assert list(folder.iterdir()) == []
    monkeypatch.setattr(storage_module, "COPY_SPARE_BYTES", 0)
    assert primary.make_snapshot(folder / "s.db") == Position(1, 1)
    assert sorted(p.name for p in folder.iterdir()) == ["s.db"]  # no journal, no WAL
    assert check_database_file(folder / "s.db") is None


def test_copy_room_names_what_is_needed_and_what_is_free(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    problem = copy_room(tmp_path, free)
    assert problem is not None
    assert "MiB are free" in problem, problem
    assert "to spare" in problem, problem


def test_snapshot_of_a_pruned_log_keeps_its_position(
    primary: Storage, backup: Storage, tmp_path: Path
) -> None:
    for name in ("a", "b", "c"):
        add_user(primary, name)
    primary.prune_log(keep=0)
    primary.make_snapshot(tmp_path / "s.db")
    assert backup.install_snapshot(tmp_path / "s.db") == Position(1, 3)


# ---- deferred durability: defer_sync / sync ------------------------------------------------


@pytest.fixture
def deferred(tmp_path: Path) -> Iterator[Storage]:
    storage = Storage(tmp_path / "deferred.db", migrations=MIGRATIONS)
    storage.defer_sync()
    yield storage
    storage.close()


BIG = "x" * 100_000
"""A password hash about 25 pages long: a few dozen commits pass the checkpoint threshold."""


def add_big_user(storage: Storage, name: str) -> LogRecord:
    return write(
        storage,
        "INSERT INTO users(name, name_key, password_hash, created_at) VALUES (?, ?, ?, 1.0)",
        (name, name.lower(), BIG),
    )


def fill_wal_until_checkpoint_due(storage: Storage) -> int:
    """Commit big rows until ``sync(checkpoint=False)`` says a checkpoint is due.

    Each commit is synced without checkpointing, as the runtime's inline sync
    does; returns the number of commits it took."""
    for commit in range(1, 200):
        add_big_user(storage, f"big{commit}")
        if storage.sync(checkpoint=False):
            return commit
    raise AssertionError("the WAL never reached the checkpoint threshold")


def test_defer_sync_relaxes_only_the_writer(deferred: Storage) -> None:
    assert deferred.deferred
    assert deferred.db.value("PRAGMA synchronous") == 1  # NORMAL: commits are not synced
    assert deferred.reader.value("PRAGMA synchronous") == 2
    # Votes are written on the control connection, which still commits with FULL: a
    # vote is on disk when save_node_state returns. (There is no public handle on it.)
    control = Db(deferred._control)
    assert control.value("PRAGMA synchronous") == 2
    deferred.save_node_state(NodeState(4, 4, 2))
    assert deferred.node_state() == NodeState(4, 4, 2)
    assert deferred.db.value("PRAGMA synchronous") == 1, "save_node_state reset the writer"


def test_defer_sync_survives_a_reopen_of_its_votes_and_commits(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    storage = Storage(path, migrations=MIGRATIONS)
    storage.defer_sync()
    storage.save_node_state(NodeState(3, 3, 1))
    add_user(storage, "ann")
    assert storage.sync() is False
    storage.close()
    again = Storage(path, migrations=MIGRATIONS)
    assert not again.deferred, "deferring is a choice of the runtime, per open"
    assert again.db.value("PRAGMA synchronous") == 2
    assert (again.node_state(), again.position(), names(again)) == (
        NodeState(3, 3, 1),
        Position(1, 1),
        ["ann"],
    )
    again.close()


def test_deferred_commits_are_readable_before_any_sync(deferred: Storage) -> None:
    record = add_user(deferred, "ann")
    assert deferred.position() == Position(1, 1)  # through the reader connection
    result, seq = deferred.read(lambda db: db.value("SELECT name FROM users"))
    assert (result, seq) == ("ann", 1)
    assert deferred.log_range(0, 10) == [record]
    other = Storage(deferred.path, migrations=MIGRATIONS)  # another process would see the same
    assert names(other) == ["ann"]
    other.close()


def test_sync_on_a_normal_storage_is_a_no_op(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "n.db", synchronous="NORMAL", migrations=MIGRATIONS)
    storage.defer_sync()
    assert not storage.deferred
    add_user(storage, "ann")
    assert storage.sync() is False
    assert storage.sync(checkpoint=False) is False
    storage.close()


def test_sync_without_a_checkpoint_says_when_one_is_due(deferred: Storage) -> None:
    add_user(deferred, "ann")
    assert deferred.sync(checkpoint=False) is False, "a small WAL is not due"
    commits = fill_wal_until_checkpoint_due(deferred)
    assert commits > 1
    # Nothing was checkpointed: the WAL is still due, after one more small commit too.
    assert deferred.sync(checkpoint=False) is True
    add_user(deferred, "bob")
    assert deferred.sync(checkpoint=False) is True


def test_sync_checkpoints_once_the_wal_passed_the_threshold(deferred: Storage) -> None:
    fill_wal_until_checkpoint_due(deferred)
    assert deferred.sync() is False, "sync() ran the checkpoint that was due"
    # The WAL was checkpointed whole: the next commit starts it again from the
    # beginning, so it holds a few pages, far below the threshold.
    add_user(deferred, "after")
    assert deferred.sync(checkpoint=False) is False
    assert deferred.integrity_check() == "ok"
    assert names(deferred)[-1] == "after"


def test_a_wal_grown_behind_a_long_read_is_cut_back_once_checkpointed(
    deferred: Storage,
) -> None:
    """A read that lasts (a snapshot copied for a backup, an ``ops.backup`` stream)
    keeps checkpoints from finishing while commits go on: the WAL grows past its
    usual size. Once a checkpoint copied all of it, the next commit starts it over
    and cuts the file back to WAL_SIZE_LIMIT, rather than keep that disk for good."""
    add_user(deferred, "ann")
    reader = Db(storage_module._connect(deferred.path, "FULL"))
    reader.execute("BEGIN")
    assert reader.value("SELECT count(*) FROM users") == 1  # its snapshot is taken
    grown = 0
    for commit in range(200):
        write(
            deferred,
            "INSERT INTO users(name, name_key, password_hash, created_at) VALUES (?, ?, ?, 1.0)",
            (f"huge{commit}", f"huge{commit}", "y" * 1_000_000),  # about 250 pages
        )
        deferred.sync()  # the checkpoints that fall due cannot pass the reader
        grown = os.stat(deferred.wal_path).st_size
        if grown > 1.2 * storage_module.WAL_SIZE_LIMIT:
            break
    assert grown > 1.2 * storage_module.WAL_SIZE_LIMIT, f"the WAL grew only to {grown} bytes"
    reader.execute("COMMIT")
    assert deferred.sync(checkpoint=False) is True
    assert deferred.sync() is False, "the checkpoint that was due ran"
    add_user(deferred, "after")  # starts the WAL over: the file is cut back
    assert os.stat(deferred.wal_path).st_size <= storage_module.WAL_SIZE_LIMIT
    assert deferred.integrity_check() == "ok"
    assert names(deferred)[-1] == "after"


def test_deferred_writer_leaves_checkpoints_to_sync(deferred: Storage) -> None:
    """SQLite's automatic checkpoint (at 1000 pages) would restart the WAL: the
    deferred writer only counts pages, so without sync() the WAL keeps growing."""
    page_size = int(deferred.db.value("PRAGMA page_size"))
    fill_wal_until_checkpoint_due(deferred)
    for commit in range(40):
        add_big_user(deferred, f"more{commit}")
    assert deferred.wal_path.stat().st_size > 1500 * page_size
    assert deferred.sync(checkpoint=False) is True
    assert deferred.sync() is False
    add_user(deferred, "after")
    assert deferred.sync(checkpoint=False) is False


def test_rewind_after_defer_sync(deferred: Storage, tmp_path: Path) -> None:
    add_user(deferred, "ann", epoch=1)
    sums_at_1 = deferred.checksums()
    add_user(deferred, "bob", epoch=2)
    add_user(deferred, "cy", epoch=2)
    assert deferred.rewind(1, tmp_path / "rollback.jsonl") == 2
    assert deferred.checksums() == sums_at_1
    assert deferred.position() == Position(1, 1)
    assert deferred.epoch_history() == [(1, 1)]
    assert deferred.db.value("PRAGMA synchronous") == 1, "the writer stays deferred"
    assert add_user(deferred, "dan", epoch=3).seq == 2
    assert deferred.sync() is False
    assert names(deferred) == ["ann", "dan"]


def test_apply_records_and_install_snapshot_after_defer_sync(
    primary: Storage, deferred: Storage, tmp_path: Path
) -> None:
    records = [add_user(primary, n) for n in ("ann", "bob")]
    assert deferred.apply_records(records) == Position(1, 2)
    assert deferred.sync() is False
    assert deferred.checksums() == primary.checksums()
    add_user(primary, "cy", epoch=2)
    primary.make_snapshot(tmp_path / "s.db")
    assert deferred.install_snapshot(tmp_path / "s.db") == Position(2, 3)
    assert deferred.checksums() == primary.checksums()
    assert deferred.db.value("PRAGMA synchronous") == 1
    deferred.apply_records([add_user(primary, "dan", epoch=2)])
    assert deferred.sync() is False
    assert deferred.checksums() == primary.checksums()


def test_sync_in_a_thread_beside_the_writer(deferred: Storage) -> None:
    """The runtime calls sync() from its group sync thread while the writer commits."""
    stop = threading.Event()
    errors: list[BaseException] = []
    syncs = 0

    def syncer() -> None:
        nonlocal syncs
        try:
            while not stop.is_set():
                deferred.sync()
                syncs += 1
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=syncer)
    thread.start()
    try:
        for commit in range(120):
            add_big_user(deferred, f"u{commit}")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert errors == []
    assert syncs > 0
    assert deferred.sync() is False
    add_user(deferred, "last")
    assert deferred.sync(checkpoint=False) is False, "the WAL did not restart after sync()"
    assert deferred.position() == Position(1, 121)
    assert deferred.integrity_check() == "ok"


# ---- checks ------------------------------------------------------------------------------


def test_checksums_cover_each_replicated_table(primary: Storage) -> None:
    empty = primary.checksums()
    assert set(empty) == set(REPLICATED_TABLES)
    add_user(primary, "ann")
    after = primary.checksums()
    changed = {table for table in after if after[table] != empty[table]}
    assert changed == {"users"}


def test_checksums_ignore_node_local_tables(primary: Storage) -> None:
    sums = primary.checksums()
    primary.save_node_state(NodeState(1, 1, 1))
    primary.db.execute("INSERT INTO txlog(seq, epoch, changeset) VALUES (99, 1, x'')")
    assert primary.checksums() == sums


def test_integrity_check(primary: Storage) -> None:
    add_user(primary, "ann")
    assert primary.integrity_check() == "ok"
