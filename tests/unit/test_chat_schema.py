"""The chat schema as storage takes it (``service/chat_schema.py``), on real SQLite files.

The schema moved out of storage without changing a byte, and a migration never
changes once released: a database at v4 holds exactly the schema released as v4,
and a new database and one migrated from any earlier version the one of v5. Since
then storage's log has one column more (each record's checksum), and so have its
node-local ``node_state`` and ``epochs`` (each value's checksum), with a trigger
beside them; every database gains them at its open, whatever its version: the
released schemas are compared with them taken out, and they are checked on their
own.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from pathlib import Path

import pytest

from service.chat_schema import MIGRATIONS, TABLES
from service.errors import Internal
from service.storage import OWN_REPLICATED, Storage, schema_migrations

# sha256 of a new v4 database's sqlite_master (type, name, table, root page, SQL), as
# the code before the move made it: any change to a released statement shows here.
RELEASED_V4_SCHEMA = "67aec5c15402a2afaf790f6ee0850d5b469ffd595c4ee14e14dd974bbe19c517"
# The same of v5 (a send's request in its message row).
RELEASED_V5_SCHEMA = "9de13389bd79d88e065e4555d7cca1d93322bb9b2c350572b21e0da5ad750faa"


# What storage's ALTER TABLEs (``_LOG_CHECKS``, ``_STATE_CHECKS``) append to the CREATE
# statements of the tables that gained a checksum column, and the trigger made with them.
CHECKS = "\n, crc INTEGER)"
CHECKED_TABLES = ("txlog", "node_state", "epochs")
STATE_TRIGGER = "node_state_crc_forgotten"


def schema_rows(storage: Storage) -> list[tuple[object, ...]]:
    """The schema as released: the checksum columns and their trigger taken out (each
    of them checked here on its own)."""
    rows = storage.db.execute(
        "SELECT type, name, tbl_name, rootpage, sql FROM sqlite_master ORDER BY rowid"
    )
    released: list[tuple[object, ...]] = []
    checks = []
    for kind, name, table, root, sql in rows:
        if name in CHECKED_TABLES:
            assert str(sql).endswith(CHECKS), sql
            sql = str(sql).removesuffix(CHECKS) + "\n)"
            checks.append(name)
        if kind == "trigger" and name == STATE_TRIGGER:
            checks.append(name)
            continue
        released.append((kind, name, table, root, sql))
    assert sorted(checks) == sorted([*CHECKED_TABLES, STATE_TRIGGER]), checks
    return released


def digest(rows: list[tuple[object, ...]]) -> str:
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def old_database(path: Path, version: int) -> None:
    """A database as the code of schema ``version`` left it."""
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript("".join(schema_migrations(MIGRATIONS)[:version]))
        old.execute(f"PRAGMA user_version={version}")
        old.commit()


def test_a_new_database_has_the_released_schema(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "new.db", migrations=MIGRATIONS)
    try:
        assert storage.db.value("PRAGMA user_version") == len(MIGRATIONS) == 5
        assert digest(schema_rows(storage)) == RELEASED_V5_SCHEMA
    finally:
        storage.close()


def test_the_first_four_migrations_still_make_the_released_v4_schema(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "v4.db", migrations=MIGRATIONS[:4])
    try:
        assert digest(schema_rows(storage)) == RELEASED_V4_SCHEMA
    finally:
        storage.close()


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_an_old_database_migrates_to_the_released_schema(tmp_path: Path, version: int) -> None:
    path = tmp_path / f"v{version}.db"
    old_database(path, version)
    storage = Storage(path, migrations=MIGRATIONS)
    try:
        assert storage.db.value("PRAGMA user_version") == len(MIGRATIONS)
        assert digest(schema_rows(storage)) == RELEASED_V5_SCHEMA
    finally:
        storage.close()


def test_every_chat_table_and_the_sync_set_are_replicated_in_order(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "t.db", migrations=MIGRATIONS)
    try:
        replicated = storage.replicated_tables
        assert list(replicated.items()) == [*TABLES.items(), *OWN_REPLICATED.items()]
        assert list(storage.checksums()) == list(replicated)
    finally:
        storage.close()


def test_a_table_the_application_adds_is_replicated_without_more(tmp_path: Path) -> None:
    app = (
        *MIGRATIONS,
        "CREATE TABLE notes (owner INTEGER, slot INTEGER, PRIMARY KEY (owner, slot));",
    )
    primary = Storage(tmp_path / "p.db", migrations=app)
    backup = Storage(tmp_path / "b.db", migrations=app)
    try:
        assert primary.replicated_tables["notes"] == "owner, slot"
        batch = primary.begin_batch()
        batch.db.execute("INSERT INTO notes VALUES (1, 2)")
        record = batch.seal(1)
        batch.commit()
        assert record is not None
        backup.apply_records([record])
        assert backup.db.execute("SELECT * FROM notes") == [(1, 2)]
        assert backup.checksums() == primary.checksums()
    finally:
        primary.close()
        backup.close()


def test_a_table_without_a_primary_key_is_refused(tmp_path: Path) -> None:
    app = (*MIGRATIONS, "CREATE TABLE loose (value TEXT);")
    with pytest.raises(Internal, match="loose has no PRIMARY KEY"):
        Storage(tmp_path / "loose.db", migrations=app)


def test_without_a_schema_an_existing_database_opens_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    made = Storage(path, migrations=MIGRATIONS)
    sums, rows = made.checksums(), schema_rows(made)
    made.close()
    again = Storage(path)
    try:
        assert again.checksums() == sums
        assert schema_rows(again) == rows
    finally:
        again.close()


def test_without_a_schema_no_database_is_made(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Storage(tmp_path / "none.db")
    assert not (tmp_path / "none.db").exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(Internal, match="no schema yet"):
        Storage(empty)
    with contextlib.closing(sqlite3.connect(empty)) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
