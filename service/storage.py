"""Storage: the only module that imports apsw (besides diskfaults.py, a test facility).

Theory of operation
-------------------
Each node keeps one SQLite database in WAL mode. Its tables come in two kinds:

* *replicated* tables hold the application's state (the chat's tables, whose
  schema the composition root passes in as ``migrations``: this module knows
  none of them) and the sync set (``cluster``). They change only inside a
  ``Batch`` on the primary, or through ``apply_records`` / ``rewind`` /
  ``install_snapshot`` on a backup, so every node holds the same rows;
* *node-local* tables (``txlog``, ``epochs``, ``node_state``) describe this
  node's copy: its log of transactions, the epoch in which each run of seqs
  began, its votes and its position. They are never part of a changeset.

Every table that is not node-local is replicated (``replicated_tables`` reads
them from the database), so an application table cannot be left out by
mistake. The application's migrations are numbered by ``PRAGMA user_version``;
this module's own tables are made with the first of them (``schema_migrations``).

A write transaction on the primary is a ``Batch``: ``BEGIN IMMEDIATE`` and an
SQLite session (the session extension) recording the replicated tables. The
chat layer runs any number of operations in it, each in a savepoint, then
``seal`` turns the recorded rows into a changeset and appends it to ``txlog``
with the next seq, in the same SQLite transaction as the data change (R2), and
``commit`` makes both durable together. A backup applies the same changesets
with ``apply_records``; a conflict means its rows are not the primary's and the
whole call is refused (``Diverged``) without changing anything. So is a record
that changes a table this node holds in another shape, with more columns or
another key (``SchemaMismatch``: the primary runs a later schema), which
SQLite's apply would otherwise skip without a word.

Durability. By default every COMMIT is synced (``synchronous=FULL``). The
replication runtime instead calls ``defer_sync()``: the writer then commits
with ``synchronous=NORMAL`` (the WAL is written to the OS, not synced) and
``sync()``, called from a thread of its own, fdatasyncs the WAL: every commit
that returned before ``sync()`` started is then on disk, as if committed with
FULL. The writer can run the next batch while the previous one reaches the
disk. Checkpoints move with it: the writer no longer checkpoints inside its
COMMIT; ``sync()`` runs a passive checkpoint on a connection of its own once
the WAL has grown. Rare writes that must be durable on return (votes, a
rewind, an installed snapshot) still are.

The log is bounded. ``txlog`` keeps the newest records for backups that catch
up from it (a backup further behind gets a snapshot); ``prune_log`` deletes the
oldest beyond a count of records and beyond a size in bytes of changesets (the
runtime passes ``log_retention`` and ``log_retention_bytes``). Bytes are what
bound the disk: a record is a batch, from one write to hundreds. A prune reads
only the records it deletes; the size of the rest is a running count in memory
(counted from the log's leaf pages once at start and after a rewind or a snapshot
install, which forget it), so the log's table needs no column for it. Deleted
pages go to SQLite's free list and new pages reuse them: the file stays as large
as the database was at its largest, which the bound keeps small. Hence no
``auto_vacuum``: it cannot be turned on in an existing database without a VACUUM,
and a file it shrank would only grow again with the next records.

A session per batch costs about half a microsecond to create, attach and
close; recording the rows is the real cost, and any other mechanism would pay
it too, so a fresh session per batch is kept for its simplicity.

Invariants
----------
* seqs in ``txlog`` are gapless and +1 each; the data change, the txlog row,
  the epochs row of a new epoch and ``node_state['last_position']`` commit in
  one SQLite transaction. ``position()`` reads ``last_position``, so pruning
  the log, rewinding past its start or installing a snapshot never loses it.
  The writer's ``committed_position()`` is the same, kept in memory from its
  own commits; a rewind and a snapshot install make it read again.
* Every record appended to ``txlog`` carries ``crc``, the CRC-32 of its changeset
  as it was in memory, and every read of the log for another node (``log_range``,
  so catch-up and rewinds) checks it: a record the disk changed is never sent or
  undone (``LogDamaged``).
* ``epochs`` holds, for each epoch that wrote at least one record here, the
  seq of its first record; epochs grow with seqs.
* Every ``node_state`` value and ``epochs`` row this version writes carries a
  ``crc``, checked whenever it is read (at open too): a value the disk changed
  but that still parses stops the node as a damaged page does (``StorageCorrupt``),
  never becomes its position, its vote or its history.
* Every PRIMARY KEY is explicit (the session extension ignores tables without
  one; a replicated table without one is refused at open) and no table uses
  AUTOINCREMENT: ids are ``max + 1`` of replicated rows, and rows are never
  deleted where reuse would matter (tombstones stay).
* Every file this module creates (the database, snapshots, rollback files) is
  mode 0600; SQLite gives ``-wal`` and ``-shm`` their database's mode.
* While a ``Storage`` is open, no descriptor of its database file is closed in
  its process: it fsyncs the file through one it keeps (``_file``) and closes
  that after its connections. Closing any descriptor would drop SQLite's locks
  on the file (POSIX locks are per process), and another process's connection
  (a ``sqlite3`` shell) would then, on closing, checkpoint and delete the WAL
  under the node.
* apsw errors never leave this module: a constraint failure becomes
  ``ConstraintViolation`` (the chat layer maps it to a user error), anything
  else ``errors.Internal``.

Public API (the replication runtime and the chat layer depend on exactly this;
the values it speaks in, ``Position``, ``LogRecord``, ``NodeState`` and
``SyncSet``, are ``replication.types``'):

    Diverged(Exception)                       apply_records found a gap or a conflict
    SchemaMismatch(Exception)                 records change a table this node's schema
                                              has not in their shape (an older schema)
    ConstraintViolation(Exception)            a UNIQUE or NOT NULL constraint failed
    changes_cluster(record) -> bool           whether a record may change the sync set

    Storage(path, synchronous="FULL", vfs=None, *, migrations=None)
                                              vfs: a test VFS (service.diskfaults);
                                              migrations: the application's schema
                                              (None: an existing database as it is)
        .database_id -> str                                 made when the database is created
        .replicated_tables -> dict[str, str]                table -> primary key, in creation order
        .position() -> Position
        .committed_position() -> Position                  the writer's, kept in memory
        .epoch_history() -> list[tuple[int, int]]          (epoch, first seq), ascending
        .node_state() / .save_node_state(state)             durable on return
        .restored -> bool / .clear_restored()               made by prepare_restore, not settled
        .sync_set() -> SyncSet
        .begin_batch() -> Batch
        .apply_records(records) -> Position                 backup: one transaction
        .log_range(after_seq, limit, max_bytes=None) -> list[LogRecord]   each checked
        .first_log_seq() -> int | None
        .prune_log(keep, keep_bytes=None) -> int           the oldest records go
        .prune_log_step(keep, keep_bytes, step_bytes) -> (int, bool)   a bounded part
        .drop_log_through(seq) -> int                       a damaged record and older
        .log_bytes() -> int                                 bytes of changesets in the log
        .rewind(to_seq, rollback_path) -> int
        .make_snapshot(dest) -> Position                   StorageFault: no room (copy_room)
        .install_bytes(size) -> int                         room an install of a snapshot takes
        .database_bytes() -> int                            what a copy of the database takes
        .install_snapshot(src) -> Position                  src used up
        .truncate_wal()                                     checkpoint all, empty the WAL
        .checksums() -> dict[str, str]
        .integrity_check() -> str
        .db -> Db                                           queries outside a batch
        .defer_sync() / .sync()                             group fsync (see Durability)
        .close()

    prune_rollback_files(folder, max_files, max_bytes) -> list[Path]   the oldest go
    copy_room(folder, size, what) -> str | None     why a copy of size bytes does not fit
    remove_database_files(path)                     a copy with its -wal, -shm, -journal
    prepare_restore(path, node_id, migrations=None) -> (Position, database_id)
                                              a backup made node-local
    schema_migrations(app_migrations) -> tuple[str, ...]    what user_version counts

    Batch
        .db -> Db
        .savepoint() -> context manager (rolls back one op's changes if it raises)
        .size() -> int                                      upper bound of the changeset so far
        .set_sync_set(members, epoch, databases)            writes the replicated row
        .seal(epoch) -> LogRecord | None                    None: nothing changed
        .commit() / .rollback()
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import apsw
import orjson

from .errors import Internal, StorageCorrupt, StorageFault
from .logline import format_fields
from .replication.types import NO_SYNC_SET, LogRecord, NodeState, Position, SyncSet

log = logging.getLogger("service.storage")

Params = Sequence[Any] | Mapping[str, Any]

BUSY_TIMEOUT_MS = 5000
# With deferred sync, sync() checkpoints once the WAL holds this many pages.
# SQLite's own default is 1000; a longer WAL writes a page that many commits
# touch (an index leaf) back to the database once instead of several times,
# for a WAL of at most ~32 MiB to scan at start-up.
CHECKPOINT_WAL_PAGES = 8000
# The WAL file is cut back to this size whenever SQLite starts it over (after a
# checkpoint that copied all of it). A read that lasts (a snapshot copied for a
# backup, an ``ops.backup`` stream, a checksum round over a large database) keeps
# checkpoints from finishing, so every commit meanwhile grows the WAL: 440 MB
# after 20,000 small commits in a test. SQLite reuses such a file but never
# shrinks it, so the node kept that much disk for good. Twice the WAL of the
# usual checkpoint interval: never cut in steady operation.
WAL_SIZE_LIMIT = 64 * 1024 * 1024
# What a refused checkpoint means, in its log line (``Storage.sync``).
_WAL_WHILE_REFUSED = "keeps every commit and grows until a checkpoint succeeds, tried at each sync"
# prune_log reads the sizes of the oldest records this many at a time.
PRUNE_CHUNK = 1000
# A copy of the database (a snapshot, a backup) is made only if the data dir keeps
# this much free beside it (a tenth of the database when that is more), so that
# the node's own commits go on while the copy exists.
COPY_SPARE_BYTES = 16 * 1024 * 1024
T = TypeVar("T")
SYNCHRONOUS_LEVELS = ("FULL", "EXTRA", "NORMAL")

# This module's own tables, made together with the application's first migration
# (after its tables, as they always were: a database made now is the same, byte for
# byte, as one made before the chat schema moved to ``chat_schema.py``). One change
# since, the log's checksums (``_LOG_CHECKS``), is made by ``_migrate`` wherever it
# is missing; another would need a version count of its own, apart from
# ``user_version``, which counts the application's migrations.
_OWN_TABLES = """
CREATE TABLE cluster (
    key TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE txlog (
    seq INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    changeset BLOB NOT NULL
);
CREATE TABLE epochs (
    epoch INTEGER PRIMARY KEY,
    start_seq INTEGER NOT NULL
);
CREATE TABLE node_state (
    key TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL                     -- JSON
);
"""
# Each record's checksum (``crc``, zlib's CRC-32 of its changeset), made as it is
# appended and checked whenever the log is read back: SQLite checks the structure of
# its pages but keeps no checksum of a row's payload, so without it a bit the disk
# flipped inside a record would be sent to backups as the primary's history (see
# ``LogDamaged``). Added to ``txlog`` rather than made with it: databases from before
# gain the column at their next open, and their records (crc NULL) are not checked.
# Whether the column is there is this change's version: no counter is needed for it.
_LOG_CHECKS = "ALTER TABLE txlog ADD COLUMN crc INTEGER"
# The node's own values get a checksum for the same reason, made as they are written
# and checked whenever they are read: a digit the disk changed in ``last_position``
# or ``voted_epoch`` still parses, and a node that believed it would claim a history
# no node has (only the sync set keeps it from leading with it) or vote twice in one
# epoch.
# ``node_state.crc`` is the CRC-32 of the key, a NUL and the value's text;
# ``epochs.crc`` of the epoch and start seq as text ("3:120"). Rows written before
# the columns (crc NULL) are not checked. A version of this service from before them
# updates a value and keeps its crc (an older backup installs a newer primary's
# snapshot; a downgrade): the trigger then forgets the crc, which would otherwise
# no longer match a value nobody damaged; the row is checked again from its next write.
_STATE_CHECKS = {
    "node_state": "ALTER TABLE node_state ADD COLUMN crc INTEGER",
    "epochs": "ALTER TABLE epochs ADD COLUMN crc INTEGER",
}
_STATE_TRIGGER = "node_state_crc_forgotten"
_STATE_TRIGGER_SQL = (
    f"CREATE TRIGGER {_STATE_TRIGGER} AFTER UPDATE OF value ON node_state "
    "WHEN NEW.crc IS OLD.crc AND NEW.value IS NOT OLD.value "
    "BEGIN UPDATE node_state SET crc = NULL WHERE key = NEW.key; END"
)
# Replicated although storage's: the sync set record (``Batch.set_sync_set``).
OWN_REPLICATED: dict[str, str] = {"cluster": "key"}
# Never in a changeset: they describe this node's copy, not the chat state.
NODE_LOCAL_TABLES = frozenset({"txlog", "epochs", "node_state"})
# How a changeset names a table it changes: its table header is 'T', the column
# count, a primary-key flag per column, then the name, NUL-terminated.
_CLUSTER_HEADER = b"cluster\x00"


def changes_cluster(record: LogRecord) -> bool:
    """Whether ``record`` may change the ``cluster`` table (the sync set). Never a
    wrong "no": a record that changes the table holds its header. A message body
    that happens to hold those bytes only costs its reader a query."""
    return _CLUSTER_HEADER in record.changeset


def schema_migrations(app: Sequence[str]) -> tuple[str, ...]:
    """The migrations a database of the application whose migrations are ``app`` runs:
    migration i takes ``user_version`` from i to i + 1, and the first also makes
    this module's tables."""
    if not app:
        raise ValueError("an application schema needs at least one migration")
    return (app[0] + _OWN_TABLES, *app[1:])


class Diverged(Exception):
    """Records do not continue this node's history: a gap, a stale epoch, a conflict,
    or a rewind that needs records already pruned. Nothing was changed."""


class LogDamaged(Exception):
    """A record of this node's log no longer matches the checksum made when it was
    appended: the disk changed its bytes (SQLite cannot see damage inside a row).
    It is neither sent nor undone; a backup that needs it gets a snapshot, which is
    made from the tables, not from the log. Nothing was changed."""

    def __init__(self, seq: int) -> None:
        super().__init__(
            f"the log's record of seq {seq} does not match its checksum: "
            "the disk changed it since it was written"
        )
        self.seq = seq


class SchemaMismatch(Exception):
    """Records change a table that this node's schema does not hold in their shape:
    more columns than it has, another primary key, or a table it lacks. The primary
    runs a later schema (a cluster upgraded one node at a time, this one not yet).

    Not a divergence: the records are the primary's history, and a rewind or a
    snapshot would not make them fit. SQLite's changeset apply would skip such a
    table's changes without a word, and the node would acknowledge rows it does not
    hold. Nothing was changed; only an upgrade of this node lets it apply them."""


class ConstraintViolation(Exception):
    """A UNIQUE, NOT NULL or PRIMARY KEY constraint refused a write."""


# apsw errors that say the disk, not the data, is at fault: a write may succeed
# again once it recovers. Never a divergence from the primary (R4).
_FAULTS: dict[type[apsw.Error], str] = {
    apsw.FullError: "the disk is full",
    apsw.IOError: "a disk I/O error",
    apsw.ReadOnlyError: "the database or its file system is read-only",
    apsw.CantOpenError: "the database file cannot be opened",
}


def storage_fault(exc: apsw.Error) -> StorageFault | None:
    """The StorageFault an apsw error stands for, or None if it is not a disk fault."""
    for kind, what in _FAULTS.items():
        if isinstance(exc, kind):
            # SQLite's online backup reports a full destination with the message of
            # code 0 ("not an error"): the kind says it all then.
            detail = str(exc)
            return StorageFault(f"{what} ({detail})" if detail != "not an error" else what)
    return None


def _internal(exc: apsw.Error) -> Internal | StorageFault:
    fault = storage_fault(exc)
    if fault is not None:
        return fault
    if isinstance(exc, (apsw.CorruptError, apsw.NotADBError)):
        return StorageCorrupt(f"the database is damaged: {exc}")
    return Internal(f"storage error: {exc}")


def os_fault(exc: OSError, doing: str) -> StorageFault:
    """A failed file write of ours (rollback file, snapshot) as a StorageFault."""
    return StorageFault(f"{doing}: {exc.strerror or exc}")


def _undecodable(exc: UnicodeDecodeError) -> StorageCorrupt:
    """A text value that is not UTF-8. This service writes only str, which SQLite
    stores as UTF-8, so such bytes were changed on the disk, inside a row, where
    SQLite's page checks cannot see them: damage like a malformed page."""
    return StorageCorrupt(f"the database is damaged: a text value is not UTF-8 ({exc.reason})")


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Map apsw errors into this module's and the service's error tree."""
    try:
        yield
    except apsw.ConstraintError as exc:
        raise ConstraintViolation(str(exc)) from None
    except apsw.Error as exc:
        raise _internal(exc) from exc
    except UnicodeDecodeError as exc:
        raise _undecodable(exc) from exc


class Db:
    """Typed queries on one connection; the chat layer sees only this."""

    def __init__(self, conn: apsw.Connection) -> None:
        self._conn = conn
        self._state_checked: bool | None = None

    def execute(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        # _translated() inlined: this is the hot path of every write and read.
        try:
            return self._conn.execute(sql, params).fetchall()
        except apsw.ConstraintError as exc:
            raise ConstraintViolation(str(exc)) from None
        except apsw.Error as exc:
            raise _internal(exc) from exc
        except UnicodeDecodeError as exc:
            raise _undecodable(exc) from exc

    def one(self, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
        rows = self.execute(sql, params)
        return rows[0] if rows else None

    def value(self, sql: str, params: Params = (), default: Any = None) -> Any:
        """The first column of the first row; ``default`` when there is no row or it is NULL."""
        row = self.one(sql, params)
        return default if row is None or row[0] is None else row[0]

    def changes(self) -> int:
        """Rows changed by the last INSERT, UPDATE or DELETE."""
        return int(self._conn.changes())

    def state_checked(self) -> bool:
        """Whether ``node_state`` and ``epochs`` have their ``crc`` columns (made
        together, in one transaction): a database opened as it is, without the
        application's migrations, may be from before them. Asked once."""
        if self._state_checked is None:
            columns = self.execute("PRAGMA table_info(node_state)")
            self._state_checked = any(row[1] == "crc" for row in columns)
        return self._state_checked


def _create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists.

    SQLite opens an empty file as a new database and gives its ``-wal`` and
    ``-shm`` files the database file's mode, so all three hold the chat data
    readable by this user only, whatever the process umask."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _connect(
    path: Path, synchronous: str, vfs: str | None = None, journal: str = "WAL"
) -> apsw.Connection:
    """Open a connection with every PRAGMA this project relies on; ``vfs`` None is
    SQLite's default VFS (another one only in tests: ``service.diskfaults``);
    ``journal`` other than WAL only for a file that is thrown away if cut short (a
    new copy, a snapshot received and used up by its install)."""
    _create_private(path)
    with _translated():
        conn = apsw.Connection(str(path), vfs=vfs)
        # Two connections in this process (snapshots read beside the writer) wait
        # for each other briefly instead of failing at once with SQLITE_BUSY.
        conn.set_busy_timeout(BUSY_TIMEOUT_MS)
        # WAL: readers never block the single writer, and a commit is one append.
        conn.execute(f"PRAGMA journal_mode={journal}").fetchall()
        # FULL: a commit is on disk before it is acknowledged, even if the power
        # fails (G1). NORMAL (opt-in) keeps the database consistent but may lose
        # the last commits on power loss.
        conn.execute(f"PRAGMA synchronous={synchronous}")
        # Off: changesets are applied row by row in any order; the schema has no
        # foreign keys and the chat layer checks references itself.
        conn.execute("PRAGMA foreign_keys=OFF")
        # FAST: deleted rows (message bodies) are overwritten with zeros in pages
        # SQLite writes anyway, at no extra I/O, so less deleted content lingers.
        conn.execute("PRAGMA secure_delete=FAST")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}").fetchall()
        return conn


def _migrate(conn: apsw.Connection, app: Sequence[str] | None) -> None:
    """Bring the schema up to the application's migrations ``app``; writes nothing
    when it already is, so a node whose disk is full or read-only still starts and
    reports it. ``app`` None: the database is taken as it is, but it must be one
    (a database no node has made yet has no tables to take)."""
    with _translated():
        version = int(Db(conn).value("PRAGMA user_version", default=0))
        if app is None:
            if version == 0:
                raise Internal("the database has no schema yet: open it with the application's")
            return
        if version == len(app) and not _missing_checks(conn):
            return
        migrations = schema_migrations(app)
        if version > len(migrations):
            # Made (or sent as a snapshot) by a later version of the service. Setting
            # user_version back would make that version run its migrations again.
            raise SchemaMismatch(
                f"the database has schema version {version}, made by a later version of "
                f"this service (this one knows {len(migrations)}): run that version"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(Db(conn).value("PRAGMA user_version", default=0))
            for number in range(version, len(migrations)):
                conn.execute(migrations[number])
            for change in _missing_checks(conn):
                conn.execute(change)
            conn.execute(f"PRAGMA user_version={len(migrations)}")
            conn.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (disk full) has already rolled the transaction back.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _missing_checks(conn: apsw.Connection) -> list[str]:
    """What makes the checksums of the log and of the node's own values, where missing."""

    def has_crc(table: str) -> bool:
        return any(row[1] == "crc" for row in conn.execute(f"PRAGMA table_info({table})"))

    missing = [] if has_crc("txlog") else [_LOG_CHECKS]
    missing += [change for table, change in _STATE_CHECKS.items() if not has_crc(table)]
    trigger = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?", (_STATE_TRIGGER,)
    ).fetchall()
    return missing if trigger else [*missing, _STATE_TRIGGER_SQL]


def _replicated_tables(db: Db) -> dict[str, str]:
    """Every table but the node-local ones, in the order they were made, each with
    its primary key (``checksums`` orders rows by it): the application's tables and
    ``cluster``. Read from the database itself, so a table the application adds is
    replicated without being declared anywhere else, and a database opened without
    its schema (a tool, a test) still knows them."""
    tables: dict[str, str] = {}
    rows = db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' "
        "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY rowid"
    )
    for (name,) in rows:
        if name in NODE_LOCAL_TABLES:
            continue
        key = [
            str(column)
            for (column,) in db.execute(
                "SELECT name FROM pragma_table_info(?) WHERE pk > 0 ORDER BY pk", (name,)
            )
        ]
        if not key:
            # The session extension ignores it: its rows would never reach a backup.
            raise Internal(f"table {name} has no PRIMARY KEY, so it cannot be replicated")
        tables[str(name)] = ", ".join(key)
    return tables


# What a value this module wrote itself raises when its bytes were changed on the
# disk inside the row (SQLite cannot see it): it no longer parses, or not as its type.
_UNPARSABLE = (ValueError, TypeError, KeyError, IndexError)


def _unparsable(what: str, exc: Exception) -> StorageCorrupt:
    """A node-local value or the sync set that does not parse: the disk changed it.
    Damage like a malformed page, not a crash at every start."""
    return StorageCorrupt(f"the database is damaged: {what} does not parse ({exc})")


def _read_json(db: Db, table: str, key: str) -> Any:
    if table == "node_state" and db.state_checked():
        row = db.one("SELECT value, crc FROM node_state WHERE key = ?", (key,))
        text, crc = (None, None) if row is None else row
        if crc is not None and text is not None and crc != _state_crc(key, text):
            raise StorageCorrupt(
                f"the database is damaged: node_state {key} fails its checksum ({text!r})"
            )
    else:
        text = db.value(f"SELECT value FROM {table} WHERE key = ?", (key,))
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _unparsable(f"{table} {key}", exc) from None


def _write_json(db: Db, table: str, key: str, value: Any) -> None:
    text = json.dumps(value)
    if table == "node_state" and db.state_checked():
        db.execute(
            "INSERT INTO node_state(key, value, crc) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, crc = excluded.crc",
            (key, text, _state_crc(key, text)),
        )
        return
    db.execute(
        f"INSERT INTO {table}(key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, text),
    )


def _state_crc(key: str, text: str) -> int:
    return zlib.crc32(f"{key}\x00{text}".encode())


def _epoch_crc(epoch: int, start_seq: int) -> int:
    return zlib.crc32(f"{epoch}:{start_seq}".encode())


def _read_epochs(db: Db) -> list[tuple[int, int]]:
    """The epochs table, each row checked against its checksum."""
    if not db.state_checked():
        rows = db.execute("SELECT epoch, start_seq FROM epochs ORDER BY epoch")
        return [(int(epoch), int(start)) for epoch, start in rows]
    history = []
    for epoch, start, crc in db.execute("SELECT epoch, start_seq, crc FROM epochs ORDER BY epoch"):
        if crc is not None and crc != _epoch_crc(int(epoch), int(start)):
            raise StorageCorrupt(
                f"the database is damaged: the epochs row {epoch}:{start} fails its checksum"
            )
        history.append((int(epoch), int(start)))
    return history


def _read_position(db: Db) -> Position:
    stored = _read_json(db, "node_state", "last_position")
    if stored is None:
        return Position.ZERO
    try:
        return Position(int(stored[0]), int(stored[1]))
    except _UNPARSABLE as exc:
        raise _unparsable("node_state last_position", exc) from None


def _read_node_state(db: Db) -> NodeState:
    voted_for = _read_json(db, "node_state", "voted_for")
    current = _read_json(db, "node_state", "current_epoch")
    voted = _read_json(db, "node_state", "voted_epoch")
    try:
        return NodeState(
            current_epoch=int(current or 0),
            voted_epoch=int(voted or 0),
            voted_for=None if voted_for is None else int(voted_for),
        )
    except _UNPARSABLE as exc:
        raise _unparsable("node_state's votes", exc) from None


def _read_sync_set(db: Db) -> SyncSet:
    # The text is parsed only when it changed (a backup reads it after each record
    # that may change it, the primary in each batch that changes it).
    text = db.value("SELECT value FROM cluster WHERE key = 'sync_set'")
    try:
        return _parse_sync_set(text)
    except _UNPARSABLE as exc:
        raise _unparsable("the sync set", exc) from None


@functools.lru_cache(maxsize=4)
def _parse_sync_set(text: str | None) -> SyncSet:
    stored = None if text is None else orjson.loads(text)
    if stored is None:
        return NO_SYNC_SET
    members = tuple(int(m) for m in stored["members"])
    databases = tuple((int(node), str(db)) for node, db in stored.get("databases", []))
    return SyncSet(int(stored["version"]), members, int(stored["epoch"]), databases)


def _read_database_id(db: Db) -> str | None:
    value = _read_json(db, "node_state", "database_id")
    return None if value is None else str(value)


def _read_restored(db: Db) -> bool:
    """Whether ``prepare_restore`` made this database and it leads no sync set with
    another member yet (``Storage.restored``)."""
    value = _read_json(db, "node_state", "restored")
    if value is None or isinstance(value, bool):
        return bool(value)
    raise _unparsable("node_state restored", TypeError(f"not a boolean: {value!r}"))


def _write_node_state(db: Db, state: NodeState) -> None:
    _write_json(db, "node_state", "current_epoch", state.current_epoch)
    _write_json(db, "node_state", "voted_epoch", state.voted_epoch)
    _write_json(db, "node_state", "voted_for", state.voted_for)


def _append_record(
    db: Db, record: LogRecord, position: Position, save_position: bool = True
) -> Position:
    """Add one record after ``position`` (same transaction as its data change).

    ``save_position=False`` defers writing ``last_position`` to the caller, which
    must write it before its transaction commits (many records, one write)."""
    if record.epoch > position.epoch:
        if db.state_checked():
            db.execute(
                "INSERT INTO epochs(epoch, start_seq, crc) VALUES (?, ?, ?)",
                (record.epoch, record.seq, _epoch_crc(record.epoch, record.seq)),
            )
        else:
            db.execute("INSERT INTO epochs VALUES (?, ?)", (record.epoch, record.seq))
    db.execute(
        "INSERT INTO txlog(seq, epoch, changeset, crc) VALUES (?, ?, ?, ?)",
        (record.seq, record.epoch, record.changeset, zlib.crc32(record.changeset)),
    )
    new = Position(record.epoch, record.seq)
    if save_position:
        _write_json(db, "node_state", "last_position", [new.epoch, new.seq])
    return new


def _abort_on_conflict(reason: int, change: Any) -> int:
    return int(apsw.SQLITE_CHANGESET_ABORT)


# Records applied together with at most this many changes in all, every one a new
# row, are applied as plain INSERTs (``_plain_inserts``); more, or any update or
# delete among them, go through SQLite's changeset apply. Measured alone, the plain
# INSERTs cost less up to a record of 20 sends and about the same at 100.
PLAIN_INSERTS_MAX = 64


@dataclass(frozen=True)
class _InsertTarget:
    """How a new row of one replicated table is inserted by hand: the statement, and
    the shape (column count, primary key columns) a changeset of the table must have
    for it to fit."""

    sql: str
    columns: int
    key: frozenset[int]


def _insert_targets(db: Db, tables: Mapping[str, str]) -> dict[str, _InsertTarget]:
    """The INSERT of each replicated table that has only plain columns (a table with
    a hidden or generated one is left to SQLite's own apply)."""
    targets = {}
    for table in tables:
        info = db.execute(
            "SELECT name, pk, hidden FROM pragma_table_xinfo(?) ORDER BY cid", (table,)
        )
        if any(hidden for _, _, hidden in info):
            continue
        names = ", ".join(_quoted(str(name)) for name, _, _ in info)
        marks = ", ".join("?" * len(info))
        targets[table] = _InsertTarget(
            f"INSERT INTO {_quoted(table)} ({names}) VALUES ({marks})",
            len(info),
            frozenset(index for index, (_, pk, _) in enumerate(info) if pk),
        )
    return targets


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _apply_changesets(
    conn: apsw.Connection, records: list[LogRecord], targets: Mapping[str, _InsertTarget]
) -> None:
    """Apply the changesets of consecutive ``records``, as if one by one in order.

    Small records of new rows only (``_plain_inserts``) are inserted through the
    connection's statement cache. SQLite's apply looks each table up and prepares
    its statements again at every call: four times the cost of a one-row record's
    INSERT, more in a backup's cold cache. A lightly loaded primary sends one
    small record per write, and the backup applies it before it can acknowledge
    it. The plain INSERTs are SQLite's apply with every conflict aborting: its
    INSERT fails exactly where theirs does (a row with the same key, any other
    constraint), foreign keys are off, and they put the changeset's values column
    for column into a table of the changeset's shape.

    The rest (more rows, updates, deletes) go to SQLite as the combination of
    their changesets (a changegroup, which ``_combined`` also checks against this
    node's tables), which holds each table's changes together: applied records one
    by one spent more time preparing than inserting, and the combination applies
    half again as fast. Its final state is the records' applied in order; it
    checks every row they leave changed against this node's rows, but not a row
    that they create and delete again (that one, if it were here already, the
    records one by one would have found in conflict; the verify rounds compare
    the tables). Records the changegroup cannot read (a damaged changeset) are
    applied one by one, where SQLite refuses them."""
    rows = _plain_inserts(records, targets)
    if rows is not None:
        for sql, values, seq in rows:
            try:
                conn.execute(sql, values)
            except apsw.Error as exc:
                _refuse(exc, seq)
        return
    combined = _combined(conn, records)
    if combined is not None:
        _apply_changeset(conn, combined, f"{records[0].seq} to {records[-1].seq}")
        return
    for record in records:
        _apply_changeset(conn, record.changeset, record.seq)


def _combined(conn: apsw.Connection, records: list[LogRecord]) -> bytes | None:
    """The records' changesets as one, checked against this node's tables; None if
    SQLite cannot combine them (a damaged changeset).

    The check is why even a single record goes through a changegroup. SQLite's
    apply skips, silently, every change of a table with fewer columns than the
    changeset or another primary key, or missing: a node on an older schema would
    commit and acknowledge the record without its rows. A changegroup given the
    schema (``sqlite3changegroup_schema``) refuses those instead, and pads a
    changeset with fewer columns than the table (an older primary's) with the
    columns' defaults, as the apply does."""
    group = apsw.ChangesetBuilder()  # type: ignore[no-untyped-call]
    try:
        group.schema(conn, "main")
        for record in records:
            if not record.changeset:
                continue
            try:
                group.add(record.changeset)
            except (apsw.SchemaChangeError, apsw.SQLError) as exc:
                # SchemaChange: more columns or another key; SQLError: no such table.
                raise SchemaMismatch(
                    f"the record of seq {record.seq} changes a table that this node's "
                    f"schema does not hold as the primary does ({exc}): the primary runs "
                    "a later schema; upgrade this node"
                ) from None
        return group.output()
    except apsw.Error:
        return None
    finally:
        group.close()


def _plain_inserts(
    records: list[LogRecord], targets: Mapping[str, _InsertTarget]
) -> list[tuple[str, tuple[Any, ...], int]] | None:
    """(statement, values, seq) of each change of ``records`` in order, if there are
    at most PLAIN_INSERTS_MAX and each is a new row of a table of the changeset's
    shape; None otherwise (SQLite applies them)."""
    rows: list[tuple[str, tuple[Any, ...], int]] = []
    try:
        for record in records:
            if not record.changeset:
                continue
            for change in apsw.Changeset.iter(record.changeset):
                target = targets.get(change.name)
                if (
                    change.opcode != apsw.SQLITE_INSERT
                    or target is None
                    or change.column_count != target.columns
                    or change.pk_columns != target.key
                    or len(rows) == PLAIN_INSERTS_MAX
                ):
                    return None
                new = change.new
                assert new is not None
                rows.append((target.sql, tuple(new), record.seq))
    except apsw.Error:
        return None  # a changeset SQLite cannot read: its apply says so
    return rows


def _apply_changeset(conn: apsw.Connection, changeset: bytes, seq: int | str) -> None:
    if not changeset:
        return
    try:
        # Every apply runs inside a transaction of ours that a conflict rolls back
        # whole, so SQLite's own savepoint per changeset is redundant (and costs a
        # third of the apply time).
        apsw.Changeset.apply(
            changeset,
            conn,
            conflict=_abort_on_conflict,
            flags=apsw.SQLITE_CHANGESETAPPLY_NOSAVEPOINT,
        )
    except apsw.Error as exc:
        _refuse(exc, seq)


def _refuse(exc: apsw.Error, seq: int | str) -> NoReturn:
    """A changeset of seq ``seq`` failed to apply with ``exc``."""
    problem = _internal(exc)
    if not isinstance(problem, Internal) or isinstance(problem, StorageCorrupt):
        # The disk, not the history, is at fault: never a reason to rewind (R4).
        raise problem from exc
    raise Diverged(f"the changeset of seq {seq} does not apply here: {exc}") from None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise os_fault(exc, "cannot sync a copy of the database") from exc
    finally:
        os.close(fd)


def _database_bytes(conn: apsw.Connection) -> int:
    """The size of a copy of ``conn``'s database: every page, free ones too."""
    with _translated():
        db = Db(conn)
        return int(db.value("PRAGMA page_count", default=0)) * int(
            db.value("PRAGMA page_size", default=4096)
        )


def copy_room(folder: Path, size: int, what: str = "a copy of the database") -> str | None:
    """Why ``folder`` has no room for ``what`` (``size`` bytes) beside the spare a node
    keeps for its own commits, or None when it has."""
    spare = max(COPY_SPARE_BYTES, size // 10)
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        return f"cannot tell the free space in {folder.name}: {exc.strerror or exc}"
    if free >= size + spare:
        return None
    return (
        f"no room for {what}: it needs {_mib(size + spare)} free in the "
        f"data dir ({_mib(size)} and {_mib(spare)} to spare), {_mib(free)} are free"
    )


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


def remove_database_files(path: Path) -> None:
    """Remove the database file ``path`` and its -wal, -shm and -journal, if any: a
    copy that SQLite opened (to check it, to read it) leaves the first two."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _copy_database(src: apsw.Connection, dest: apsw.Connection) -> None:
    """Online backup of all of ``src`` into ``dest`` in one step (one read snapshot)."""
    with _translated(), dest.backup("main", src, "main") as backup:
        backup.step(-1)


@dataclass(frozen=True)
class _LogSize:
    """The bytes of changesets of the records ``first`` to ``last``, as last counted."""

    first: int
    last: int
    bytes: int


def _count_log_bytes(db: Db) -> int:
    """The bytes of changesets in the log, counted from its leaf pages (``length``
    of a blob reads no overflow page)."""
    return int(db.value("SELECT sum(length(changeset)) FROM txlog", default=0))


def _log_cut(
    db: Db,
    first: int,
    count_cut: int,
    last: int,
    total: int,
    keep_bytes: int | None,
    step_bytes: int | None = None,
) -> tuple[int, int, bool]:
    """The last seq ``prune_log`` deletes, the bytes of the records up to it, and
    whether more were due: every record up to ``count_cut``, then the oldest while
    the records left (``total`` bytes in all) exceed ``keep_bytes``, never ``last``;
    with ``step_bytes``, at most one chunk of records and about that many bytes (at
    least one record). Reads the log oldest first, a chunk at a time, and stops at
    the first record that stays."""
    cut, dropped = first - 1, 0
    while True:
        rows = db.execute(
            "SELECT seq, length(changeset) FROM txlog WHERE seq > ? ORDER BY seq LIMIT ?",
            (cut, PRUNE_CHUNK),
        )
        for seq, size in rows:
            over_bytes = keep_bytes is not None and seq < last and total - dropped > keep_bytes
            if seq > count_cut and not over_bytes:
                return cut, dropped, False
            if step_bytes is not None and dropped + size > step_bytes and cut >= first:
                return cut, dropped, True
            cut, dropped = int(seq), dropped + int(size)
        if len(rows) < PRUNE_CHUNK:
            return cut, dropped, False
        if step_bytes is not None:
            return cut, dropped, True


class Batch:
    """One write transaction on the primary; see the module docstring."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._conn = storage._conn
        self._db = storage._db
        self._sealed = False
        # The position of the record sealed, the storage's once committed.
        self._sealed_at: Position | None = None
        self._open = True
        with _translated():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._session: apsw.Session | None = apsw.Session(self._conn, "main")
                # Keep an upper bound of the changeset's size as rows are recorded, so
                # the writer can end a batch before its record outgrows the stream.
                self._session.config(apsw.SQLITE_SESSION_OBJCONFIG_SIZE, 1)
                for table in storage.replicated_tables:
                    self._session.attach(table)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    @property
    def db(self) -> Db:
        self._check_writable()
        return self._db

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[Db]:
        """Undo only the body's changes if it raises (one chat operation that failed).

        Every savepoint has the same name: SQLite's RELEASE and ROLLBACK TO act on
        the innermost savepoint of that name, which is this one. A name of its own
        per savepoint would make three new statement texts per write, and those
        push the chat's statements out of the connection's statement cache, so
        every query of every write would be compiled again."""
        self._check_writable()
        self._db.execute("SAVEPOINT op")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK TO op")
            self._db.execute("RELEASE op")
            raise
        self._db.execute("RELEASE op")

    def size(self) -> int:
        """An upper bound of the size of the changeset recorded so far (a rolled-back
        savepoint's rows still count: it errs on the large side)."""
        self._check_writable()
        assert self._session is not None
        return int(self._session.changeset_size)

    def set_sync_set(
        self,
        members: tuple[int, ...],
        epoch: int,
        databases: tuple[tuple[int, str], ...] = (),
    ) -> SyncSet:
        self._check_writable()
        old = _read_sync_set(self._db)
        members = tuple(sorted(set(members)))
        known = tuple(sorted((node, db) for node, db in databases if node in members))
        new = SyncSet(old.version + 1, members, epoch, known)
        value = {
            "version": new.version,
            "members": list(new.members),
            "epoch": new.epoch,
            "databases": [list(pair) for pair in new.databases],
        }
        _write_json(self._db, "cluster", "sync_set", value)
        return new

    def seal(self, epoch: int) -> LogRecord | None:
        """Append the batch's changeset to the log as the next seq (still uncommitted)."""
        self._check_writable()
        assert self._session is not None
        with _translated():
            changeset = self._session.changeset()
        self._close_session()
        self._sealed = True
        if not changeset:
            return None
        position = self._storage.committed_position()
        if epoch < position.epoch:
            raise Internal(f"cannot seal in epoch {epoch}: the log is at epoch {position.epoch}")
        record = LogRecord(epoch, position.seq + 1, changeset)
        _append_record(self._db, record, position)
        self._sealed_at = Position(record.epoch, record.seq)
        return record

    def commit(self) -> None:
        """Make the batch durable (with synchronous=FULL, on disk on return)."""
        if not self._open:
            raise Internal("the batch is already finished")
        self._close_session()
        try:
            with _translated():
                self._conn.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise
        self._open = False
        if self._sealed_at is not None:
            self._storage._committed = self._sealed_at

    def rollback(self) -> None:
        self._close_session()
        if self._open:
            self._open = False
            with _translated():
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")

    def _check_writable(self) -> None:
        if not self._open or self._sealed:
            raise Internal("the batch is sealed or finished")

    def _close_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


class Storage:
    """One node's database, through three connections with one job each.

    * the **writer** runs batches, applies records, rewinds and installs
      snapshots, on the event loop's thread only;
    * the **reader** answers queries (chat reads, the log for streams, the
      epoch history) from the last committed state; in WAL mode it never waits
      for the writer;
    * the **control** connection writes the node's own state (votes, epochs),
      synced on commit whatever the writer does, and prunes the log (not
      synced: a prune lost in a crash leaves older records, all sound).

    After ``defer_sync()`` a fourth connection, the checkpointer, is used only
    by ``sync()`` in the group sync thread.
    """

    def __init__(
        self,
        path: Path,
        synchronous: str = "FULL",
        vfs: str | None = None,
        *,
        migrations: Sequence[str] | None = None,
    ) -> None:
        """``migrations``: the application's (see ``schema_migrations``), run on a
        database that has not had them all; None takes an existing database as it
        is (tools and tests that read a node's database) and never creates one."""
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_LEVELS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_LEVELS}")
        self.path = Path(path)
        if migrations is None and not self.path.exists():
            raise FileNotFoundError(f"no database at {self.path}")
        self._synchronous = synchronous
        # Checkpoints the disk refused (``sync``), counted and told by its thread; the
        # count before the run of failures going on, if one is.
        self.checkpoint_failures = 0
        self._failing_since: int | None = None
        self._migrations = None if migrations is None else tuple(migrations)
        # Every connection of this node's files opens on it (snapshots too).
        self._vfs = vfs
        self._conn = _connect(self.path, synchronous, self._vfs)
        self._db = Db(self._conn)
        try:
            _migrate(self._conn, self._migrations)
        except SchemaMismatch as exc:
            # Nothing this node can do but wait for its operator: at start a
            # StorageFault, which the node retries with backoff, saying why.
            self._conn.close()
            raise StorageFault(str(exc)) from None
        # The position the writer connection last committed (None: read it again).
        # Only this object writes the log, so it need not ask SQLite before each batch
        # or applied frame; a rewind and a snapshot install forget it.
        self._committed: Position | None = None
        self._read_schema()
        self._reader = _connect(self.path, synchronous, self._vfs)
        self._reader_db = Db(self._reader)
        self._control = _connect(self.path, synchronous, self._vfs)
        self._control_db = Db(self._control)
        self.wal_path = self.path.with_name(self.path.name + "-wal")
        self._checkpointer: apsw.Connection | None = None
        self._wal_pages = 0
        # The log's size as prune_log last counted it; None: to count afresh.
        self._log_size: _LogSize | None = None
        # One descriptor of the database file, for its fsyncs, open as long as the
        # connections are. Never one opened and closed meanwhile: closing any
        # descriptor of a file drops every POSIX lock this process holds on it,
        # SQLite's included (each connection keeps a shared lock on the file). Then
        # a connection of another process that closes (an operator's sqlite3 shell,
        # even one that only read) takes itself for the file's last one: it
        # checkpoints and deletes the WAL, and this node's next commits go to a file
        # nobody else can see, which a crash loses, while ``sync()`` finds no WAL
        # to sync and reports them durable.
        self._file = os.open(self.path, os.O_RDONLY)
        try:
            # What a crash left in the OS page cache is put on disk before this node
            # reports any of it as durable.
            self._sync_files()
            self.database_id = self._ensure_database_id()
            # This node's own state, read once now: a value the disk changed is found
            # at start (and the node moves the database aside), not at some later read.
            _read_node_state(self._db)
            _read_position(self._db)
            _read_epochs(self._db)
            _read_sync_set(self._db)
            # Made by ops.restore: its sync set of this node alone was written by the
            # restore, not by a primary, so it proves nothing about the other nodes
            # (election.py: a restored node leads only with a majority behind it).
            self.restored = _read_restored(self._db)
        except BaseException:
            os.close(self._file)
            raise

    def _read_schema(self) -> None:
        """What the writer knows of the tables: which are replicated, and how a new row
        of each is inserted by hand (``_plain_inserts``). At open, and after a snapshot
        install replaced them."""
        self.replicated_tables = _replicated_tables(self._db)
        self._insert_targets = _insert_targets(self._db, self.replicated_tables)

    def _ensure_database_id(self) -> str:
        """This database's id, made once when it is created (E4, after Kafka's rule
        that an unclean shutdown loses eligibility): a sync set names its members'
        databases, and a node whose disk was wiped or replaced is not that member.
        Node-local (never replicated); a snapshot install keeps it."""
        existing = _read_database_id(self._db)
        if existing is not None:
            return existing
        made = secrets.token_hex(16)
        with self._transaction(durable=True):
            _write_json(self._db, "node_state", "database_id", made)
        return made

    def defer_sync(self) -> None:
        """Commits on the writer return before they are on disk; ``sync()`` puts
        them there (see Durability). With synchronous=NORMAL there is nothing to
        defer: commits are never synced."""
        if self._synchronous == "NORMAL":
            return
        with _translated():
            self._checkpointer = _connect(self.path, self._synchronous, self._vfs)
            # A WAL hook replaces SQLite's automatic checkpoint (which is one): the
            # writers only count the WAL's pages, sync() checkpoints.
            for conn in (self._conn, self._control):
                conn.set_wal_hook(self._count_wal_pages)
            self._conn.execute("PRAGMA synchronous=NORMAL")

    @property
    def deferred(self) -> bool:
        return self._checkpointer is not None

    @property
    def _writer_synchronous(self) -> str:
        return "NORMAL" if self.deferred else self._synchronous

    def sync(self, checkpoint: bool = True) -> bool:
        """Make every commit that returned before this call durable. Safe in a
        thread beside the writer: it touches only the WAL file and, to checkpoint,
        a connection of its own. Returns whether the WAL is due for a checkpoint
        (one was not run)."""
        if self._synchronous == "NORMAL":
            return False
        self._fdatasync(self.wal_path)
        due = self._wal_pages >= CHECKPOINT_WAL_PAGES
        if due and checkpoint and self._checkpointer is not None:
            try:
                with _translated():
                    self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except StorageFault as exc:
                # The database file cannot grow (disk full) or be written (a failing
                # disk): the WAL keeps the commits, which are durable all the same, and
                # grows; a later sync checkpoints. Commits go on meanwhile, so this is
                # said here, once per run of failures (a sync per batch retries it).
                self.checkpoint_failures += 1
                if self._failing_since is None:
                    self._failing_since = self.checkpoint_failures - 1
                    fields = {"why": exc.message, "wal": _WAL_WHILE_REFUSED}
                    log.warning(format_fields("checkpoint failed", fields))
                return False
            if self._failing_since is not None:
                failed = self.checkpoint_failures - self._failing_since
                self._failing_since = None
                log.info(format_fields("checkpoint succeeded again", {"failures": failed}))
            return False
        return due

    def wal_bytes(self) -> int | None:
        """The WAL file's size (None: none, or unreadable). About
        ``CHECKPOINT_WAL_PAGES`` pages at most while checkpoints keep up; more while
        a long read holds them back (``WAL_SIZE_LIMIT`` cuts it back after) or the
        disk refuses them."""
        try:
            return self.wal_path.stat().st_size
        except OSError:
            return None

    def _count_wal_pages(self, _conn: apsw.Connection, _name: str, pages: int) -> int:
        # After each commit, on the committing thread; read by sync() in its thread
        # (a stale count only moves a checkpoint by one sync).
        self._wal_pages = pages
        return apsw.SQLITE_OK

    def _sync_files(self) -> None:
        self._fdatasync(self.wal_path)
        os.fdatasync(self._file)

    @staticmethod
    def _fdatasync(path: Path) -> None:
        """fdatasync the WAL, ``path``, if it exists. (By path each time: SQLite
        deletes it when the node's last connection closes and makes it again. Its
        descriptor may be closed while connections are open: SQLite's locks are on
        the database and ``-shm`` files, never on the WAL. Not for the database
        file: see ``_file``.)"""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    @property
    def db(self) -> Db:
        """The writer's connection (the write path and tests)."""
        return self._db

    @property
    def reader(self) -> Db:
        return self._reader_db

    def database_bytes(self) -> int:
        """The size of a copy of the database (every page): what a snapshot or a
        backup needs room for."""
        return _database_bytes(self._reader)

    def read(self, query: Callable[[Db], T]) -> tuple[T, int]:
        """Run ``query`` on one consistent committed state; also return its seq.

        The seq is read in the same read transaction, so a caller can hold the
        answer back until that seq is acknowledged (R7)."""
        with _translated():
            self._reader.execute("BEGIN")
            try:
                result = query(self._reader_db)
                seq = _read_position(self._reader_db).seq
            finally:
                self._reader.execute("COMMIT")
        return result, seq

    def close(self) -> None:
        connections = [self._control, self._reader, self._conn]
        if self._checkpointer is not None:
            connections.insert(0, self._checkpointer)
        for conn in connections:
            try:
                with _translated():
                    conn.close()
            except StorageFault:
                # The last connection's checkpoint found the disk full: the WAL keeps
                # every commit, and the next open replays it.
                with contextlib.suppress(apsw.Error):
                    conn.close(True)
        # Only now: closing it drops the process's locks on the file (``_file``).
        if self._file >= 0:
            os.close(self._file)
            self._file = -1

    # ---- position, epochs, node state ----------------------------------------------

    def position(self) -> Position:
        return _read_position(self._reader_db)

    def committed_position(self) -> Position:
        """The position as the writer connection sees it: the last record it
        committed (in a transaction of its own, the position before it)."""
        if self._committed is None:
            self._committed = _read_position(self._db)
        return self._committed

    def epoch_history(self) -> list[tuple[int, int]]:
        return _read_epochs(self._reader_db)

    def node_state(self) -> NodeState:
        return _read_node_state(self._reader_db)

    def save_node_state(self, state: NodeState) -> None:
        """Durable on return even with synchronous=NORMAL: a vote must survive power loss."""
        with self._transaction(durable=True, conn=self._control):
            _write_node_state(self._control_db, state)

    def clear_restored(self) -> None:
        """The restore is settled (a sync set with another member is in effect):
        from now on this database is an ordinary member's. Durable on return."""
        with self._transaction(durable=True, conn=self._control):
            self._control_db.execute("DELETE FROM node_state WHERE key = 'restored'")
        self.restored = False

    def probe_write(self, state: NodeState) -> None:
        """A small durable write that changes a page (and the node state, which a
        failed Persist may have left behind): it goes through once the disk takes
        writes again after a fault."""
        with self._transaction(durable=True, conn=self._control):
            _write_node_state(self._control_db, state)
            _write_json(self._control_db, "node_state", "probed_at", secrets.token_hex(8))

    def sync_set(self) -> SyncSet:
        return _read_sync_set(self._reader_db)

    # ---- writing ---------------------------------------------------------------------

    def begin_batch(self) -> Batch:
        if self._conn.in_transaction:
            raise Internal("a batch is already open")
        return Batch(self)

    def apply_records(self, records: list[LogRecord]) -> Position:
        """Backup path: apply the primary's records after our position, all or nothing.

        The records' changesets are applied as one (``_apply_changesets``)."""
        with self._transaction():
            position = self.committed_position()
            for record in records:
                if record.seq != position.seq + 1:
                    raise Diverged(
                        f"record seq {record.seq} does not follow position seq {position.seq}"
                    )
                if record.epoch < position.epoch:
                    raise Diverged(
                        f"record epoch {record.epoch} is older than position epoch {position.epoch}"
                    )
                position = _append_record(self._db, record, position, save_position=False)
            _apply_changesets(self._conn, records, self._insert_targets)
            _write_json(self._db, "node_state", "last_position", [position.epoch, position.seq])
        self._committed = position
        return position

    def rewind(self, to_seq: int, rollback_path: Path) -> int:
        """Undo every record after ``to_seq``; keep them in ``rollback_path`` (JSON lines).

        Durable on return: what the node acknowledges next builds on it."""
        self._committed = None
        with self._transaction(durable=True):
            position = _read_position(self._db)
            if to_seq >= position.seq:
                return 0
            try:
                removed = self.log_range(to_seq, position.seq - to_seq) if to_seq >= 0 else []
            except LogDamaged as exc:
                # Undoing it would apply the damage's inverse: a snapshot instead.
                raise Diverged(str(exc)) from None
            if len(removed) != position.seq - to_seq:
                raise Diverged(f"the log no longer holds the records after seq {to_seq}")
            for record in reversed(removed):
                _apply_changeset(self._conn, apsw.Changeset.invert(record.changeset), record.seq)
            self._db.execute("DELETE FROM txlog WHERE seq > ?", (to_seq,))
            # The seqs removed may be written again, with other sizes.
            self._log_size = None
            self._db.execute("DELETE FROM epochs WHERE start_seq > ?", (to_seq,))
            epoch = self._db.value(
                "SELECT max(epoch) FROM epochs WHERE start_seq <= ?", (to_seq,), default=0
            )
            _write_json(self._db, "node_state", "last_position", [int(epoch), to_seq])
            # The rollback file is on disk before the rows disappear from the database.
            try:
                _append_rollback_file(rollback_path, removed)
            except OSError as exc:
                raise os_fault(exc, "cannot write the rollback file") from exc
            return len(removed)

    # ---- the log ---------------------------------------------------------------------

    def log_range(
        self, after_seq: int, limit: int, max_bytes: int | None = None
    ) -> list[LogRecord]:
        """At most ``limit`` records after ``after_seq``, and with ``max_bytes`` only
        as many as fit in it (at least one), each checked against its checksum:
        ``LogDamaged`` names the first that fails (records of a version before the
        checksums have none, and pass)."""
        if max_bytes is not None:
            # The sizes first (``length`` of a blob reads no overflow page): a catch-up
            # reads what it sends, not the whole log behind it at every chunk.
            sizes = self._reader_db.execute(
                "SELECT seq, length(changeset) FROM txlog WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            )
            total, fitting = 0, 0
            for _seq, size in sizes:
                total += int(size or 0)
                if total > max_bytes and fitting:
                    break
                fitting += 1
            limit = fitting
        rows = self._reader_db.execute(
            "SELECT epoch, seq, changeset, crc FROM txlog WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        records = []
        for epoch, seq, changeset, crc in rows:
            if crc is not None and zlib.crc32(changeset) != crc:
                raise LogDamaged(int(seq))
            records.append(LogRecord(int(epoch), int(seq), bytes(changeset)))
        return records

    def first_log_seq(self) -> int | None:
        value = self._reader_db.value("SELECT min(seq) FROM txlog")
        return None if value is None else int(value)

    def prune_log(self, keep: int, keep_bytes: int | None = None) -> int:
        """Delete the oldest records, so that at most the newest ``keep`` remain and
        their changesets add up to at most ``keep_bytes`` (None: no bound in bytes);
        the newest record stays whatever its size unless ``keep`` is 0. Returns how
        many went; the position is kept regardless.

        Reads only the records it deletes (and one more): the size of the rest is
        this object's running count (``_LogSize``), topped up with the records
        appended since the last prune."""
        return self.prune_log_step(keep, keep_bytes)[0]

    def prune_log_step(
        self, keep: int, keep_bytes: int | None, step_bytes: int | None = None
    ) -> tuple[int, bool]:
        """``prune_log``, deleting at most about ``step_bytes`` of changesets and
        ``PRUNE_CHUNK`` records (at least one record); returns how many went and
        whether more are due. The node prunes on its event loop: a flood of the
        largest sends puts some 24 MB a second into the log, and five seconds' worth
        deleted at once (some 120 MB, at about 3 ms a MiB) held it for tenths of a
        second."""
        db = self._control_db
        # Each step's commit would fsync on the event loop, some thirty in a row to
        # catch up on a flood: a prune need not be durable (the next synced commit
        # or group sync covers it; lost in a crash, the log is longer, and counted
        # again at start).
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            return self._prune_log_step(db, keep, keep_bytes, step_bytes)
        finally:
            db.execute(f"PRAGMA synchronous={self._synchronous}")

    def _prune_log_step(
        self, db: Db, keep: int, keep_bytes: int | None, step_bytes: int | None
    ) -> tuple[int, bool]:
        with self._transaction(conn=self._control):
            bounds = db.one("SELECT min(seq), max(seq) FROM txlog")
            if bounds is None or bounds[0] is None:
                self._log_size = None
                return 0, False
            first, last = int(bounds[0]), int(bounds[1])
            total = self._log_bytes(db, first, last)
            cut, dropped, more = _log_cut(
                db, first, last - max(keep, 0), last, total, keep_bytes, step_bytes
            )
            if cut >= first:
                db.execute("DELETE FROM txlog WHERE seq <= ?", (cut,))
            self._log_size = _LogSize(cut + 1, last, total - dropped)
            return max(cut - first + 1, 0), more

    def drop_log_through(self, seq: int) -> int:
        """Delete every record up to ``seq``, one of them damaged (``LogDamaged``): a
        backup that needs any of them gets a snapshot instead. The position is kept.
        Returns how many went."""
        db = self._control_db
        with self._transaction(conn=self._control):
            db.execute("DELETE FROM txlog WHERE seq <= ?", (seq,))
            count = db.changes()
        self._log_size = None
        return count

    def log_bytes(self) -> int:
        """The bytes of changesets the log holds (what ``keep_bytes`` bounds)."""
        return _count_log_bytes(self._reader_db)

    def _log_bytes(self, db: Db, first: int, last: int) -> int:
        """The log's bytes of changesets, ``first`` to ``last``: the running count plus
        the records appended since, or (at start, after a rewind or a snapshot, which
        forget the count) ``_count_log_bytes``."""
        known = self._log_size
        if known is None or known.first != first or known.last > last:
            return _count_log_bytes(db)
        added = db.value(
            "SELECT sum(length(changeset)) FROM txlog WHERE seq > ?", (known.last,), default=0
        )
        return known.bytes + int(added)

    # ---- snapshots -------------------------------------------------------------------

    def make_snapshot(self, dest: Path) -> Position:
        """Copy the committed database into the new file ``dest``; return its position.

        Reads through a connection of its own, so a batch open on the writer is not
        copied and the call may run in a thread while the writer keeps committing.
        ``StorageFault`` (nothing left behind) when ``dest``'s folder has no room for
        the copy and ``COPY_SPARE_BYTES`` besides (``copy_room``): a copy that filled
        the disk would make the node's own commits fail.
        """
        dest = Path(dest)
        partial = dest.with_name(dest.name + ".partial")
        remove_database_files(partial)
        source = _connect(self.path, self._synchronous, self._vfs)
        try:
            problem = copy_room(dest.parent, _database_bytes(source))
            if problem is not None:
                raise StorageFault(problem)
            # No journal: a copy cut short is thrown away, never used. In WAL mode
            # every page would be written twice, and need room twice.
            copy = _connect(partial, "OFF", self._vfs, journal="OFF")
            try:
                _copy_database(source, copy)
                position = _read_position(Db(copy))
            finally:
                copy.close()
            _fsync_file(partial)
            os.replace(partial, dest)
            _fsync_dir(dest.parent)
        except BaseException:
            remove_database_files(partial)
            raise
        finally:
            source.close()
        return position

    @staticmethod
    def install_bytes(size: int) -> int:
        """The most room an install of a snapshot of ``size`` bytes takes in the data
        dir beside what the node holds, the received file included: that file and
        the WAL that takes every page of it (the file is gone before the checkpoint
        grows the database to the snapshot's size)."""
        return 2 * size

    def install_snapshot(self, src: Path) -> Position:
        """Replace all of this database with the snapshot file ``src``, keeping this
        node's own votes. ``src`` is used up: changed, then removed.

        ``src`` is first given this node's node_state, so the copy into the live
        database is one transaction: a crash leaves either the old database or the
        new one, never the sender's votes in ours. It is changed where it lies, not
        in a staging copy: a copy took one more snapshot's worth of disk at the peak
        and a fifth of the time (with its checkpoint, 0.79-0.91 s against 0.63-0.75
        for 106-127 MB). A snapshot of an earlier schema is migrated to ours; one of
        a later schema is refused (``SchemaMismatch``), nothing in this database
        changed. The WAL keeps every page of it until ``truncate_wal``.
        """
        if self._conn.in_transaction:
            raise Internal("cannot install a snapshot while a batch is open")
        src = Path(src)
        if not src.is_file():
            # Opening it would make an empty database, and installing that, empty ours.
            raise StorageFault(f"the snapshot received is gone: {src.name}")
        self._committed = None
        own = self.node_state()
        try:
            # No journal: a snapshot cut short by a crash is thrown away, never
            # installed (the follower removes it and asks for another).
            source = _connect(src, "OFF", self._vfs, journal="OFF")
            try:
                _migrate(source, self._migrations)
                source_db = Db(source)
                theirs = _read_node_state(source_db)
                merged = NodeState(
                    max(own.current_epoch, theirs.current_epoch), own.voted_epoch, own.voted_for
                )
                _write_node_state(source_db, merged)
                # The snapshot holds the sender's database id: this database stays ours.
                _write_json(source_db, "node_state", "database_id", self.database_id)
                # A restored sender's mark is its own: this node now follows a history
                # that a primary sent it, and its sync set is that primary's.
                source_db.execute("DELETE FROM node_state WHERE key = 'restored'")
                _copy_database(source, self._conn)
            finally:
                source.close()
        finally:
            # Before the checkpoint grows the database: the peak is two snapshots' worth.
            # What the install did or raised stands; the follower removes it again.
            with contextlib.suppress(OSError):
                remove_database_files(src)
        if self._writer_synchronous == "NORMAL":
            self._sync_files()
        self._read_schema()
        self._log_size = None
        self.restored = False
        return self.position()

    def truncate_wal(self) -> None:
        """Checkpoint the whole WAL into the database and empty the file: after a
        snapshot install, whose WAL took every page of the snapshot, its room comes
        back now rather than a second database's worth of disk kept until the WAL
        starts over. ``StorageFault`` when the disk refuses (the database cannot
        grow): the pages stay in the WAL, durable there, for a later checkpoint."""
        with _translated():
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    # ---- checks ----------------------------------------------------------------------

    def checksums(self) -> dict[str, str]:
        """sha256 of each replicated table's rows in primary key order."""
        return _table_checksums(self._db, self.replicated_tables)

    def checksums_at(self, seq: int) -> dict[str, str] | None:
        """``checksums()`` of the committed state at exactly ``seq``, or None when the
        database is elsewhere. Through a connection of its own: safe in a thread."""
        conn = _connect(self.path, self._synchronous, self._vfs)
        try:
            db = Db(conn)
            with _translated():
                conn.execute("BEGIN")
                try:
                    if _read_position(db).seq != seq:
                        return None
                    return _table_checksums(db, self.replicated_tables)
                finally:
                    conn.execute("COMMIT")
        finally:
            conn.close()

    def quick_check(self) -> str | None:
        """What is wrong with this database (``PRAGMA quick_check``), or None."""
        try:
            with _translated():
                rows = self._reader.execute("PRAGMA quick_check(5)").fetchall()
        except StorageCorrupt as exc:
            return str(exc)
        problems = [str(row[0]) for row in rows]
        return None if problems == ["ok"] else _one_line(problems)

    def check_file(self, path: Path) -> str | None:
        """What is wrong with the database file ``path`` (a snapshot about to be sent
        or installed), or None: SQLite's ``quick_check`` reads every page and checks
        its structure, so a damaged page is never shipped or installed."""
        return check_database_file(Path(path), self._vfs)

    def integrity_check(self) -> str:
        rows = self._db.execute("PRAGMA integrity_check")
        return "\n".join(str(row[0]) for row in rows)

    # ---- helpers ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(
        self, durable: bool = False, conn: apsw.Connection | None = None
    ) -> Iterator[None]:
        """One write transaction (on the writer unless ``conn``); ``durable``: on disk
        when this returns, whatever the connection's synchronous setting."""
        conn = self._conn if conn is None else conn
        db = Db(conn)
        if conn.in_transaction:
            raise Internal("a batch is open")
        level = self._writer_synchronous if conn is self._conn else self._synchronous
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                db.execute("ROLLBACK")
            raise
        if durable and level == "NORMAL":
            # The WAL holds the commit; syncing it is what FULL would have done.
            self._sync_files()


def _table_checksums(db: Db, tables: Mapping[str, str]) -> dict[str, str]:
    sums = {}
    for table, key in tables.items():
        digest = hashlib.sha256()
        for row in db.execute(f"SELECT * FROM {table} ORDER BY {key}"):
            digest.update(repr(row).encode())
            digest.update(b"\n")
        sums[table] = digest.hexdigest()
    return sums


# The files of one copy moved aside: the database, its WAL and its shared memory.
_COPY_SUFFIXES = ("-wal", "-shm", "")


def move_aside(path: Path, folder: Path) -> Path:
    """Move the database ``path`` and its WAL into ``folder`` (made 0700), under a
    name with the time, for an operator to inspect; the node starts afresh. A copy
    moved aside in the same second before keeps its name: this one gets a number."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = folder / f"{path.name}.{stamp}"
    again = 1
    while any(Path(f"{target}{suffix}").exists() for suffix in _COPY_SUFFIXES):
        again += 1
        target = folder / f"{path.name}.{stamp}-{again}"
    for suffix in _COPY_SUFFIXES:
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, f"{target}{suffix}")
    _fsync_dir(path.parent)
    return target


# The name ``move_aside`` gives a copy, after the database's name and a dot.
_MOVED_STAMP = re.compile(r"\d{8}T\d{6}(-\d+)?")


def prune_moved_aside(folder: Path, moved: Path, keep: int) -> list[Path]:
    """Delete the copies moved aside into ``folder`` (``move_aside``) of the database
    ``moved`` is the newest copy of, but the newest ``keep``, each with its WAL and
    shared memory; returns the deleted copies' paths, oldest first. Newest by the
    time in the name, the order they were moved aside in (not the files' times: a
    move keeps the time the database was last written); ``moved`` itself is always
    kept (a clock set back would sort it oldest). Files not named as a copy are
    left alone: an operator's notes or exports may live there."""
    name = moved.name.rsplit(".", 1)[0]
    try:
        copies = [
            path
            for path in folder.glob(f"{name}.*")
            if _MOVED_STAMP.fullmatch(path.name[len(name) + 1 :])
            and path != moved
            and path.is_file()
        ]
    except FileNotFoundError:
        return []
    # "chat.db.20261207T101010" before "chat.db.20261207T101010-2" before "...T101011".
    copies.sort(key=lambda p: _moved_at(p.name[len(name) + 1 :]))
    doomed = copies[: max(0, len(copies) - (keep - 1))]
    for copy in doomed:
        for suffix in _COPY_SUFFIXES:
            Path(f"{copy}{suffix}").unlink(missing_ok=True)
    if doomed:
        _fsync_dir(folder)
    return doomed


def _moved_at(stamp: str) -> tuple[str, int]:
    base, _, again = stamp.partition("-")
    return base, int(again) if again.isdigit() else 1


def check_database_file(path: Path, vfs: str | None = None) -> str | None:
    """``PRAGMA quick_check`` of ``path`` through a read-only connection of its own:
    None when it is sound, else the first problems SQLite names (one line). A disk
    that fails the reads is a StorageFault, not damage of the file."""

    def unless_fault(exc: apsw.Error) -> None:
        fault = storage_fault(exc)
        if fault is not None:
            raise fault from exc

    try:
        flags = apsw.SQLITE_OPEN_READONLY
        conn = (
            apsw.Connection(str(path), flags=flags, vfs=vfs)
            if vfs
            else apsw.Connection(str(path), flags=flags)
        )
    except apsw.Error as exc:
        unless_fault(exc)
        return f"cannot open it: {exc}"
    try:
        rows = conn.execute("PRAGMA quick_check(5)").fetchall()
    except apsw.Error as exc:
        unless_fault(exc)
        return f"unreadable: {exc}"
    finally:
        with contextlib.suppress(apsw.Error):
            conn.close()
    problems = [str(row[0]) for row in rows]
    if problems == ["ok"]:
        return None
    return _one_line(problems)


def _one_line(problems: list[str]) -> str:
    """SQLite's findings as one line of a log (they hold newlines), at most 500 chars."""
    return " ".join("; ".join(problems).split())[:500]


def _append_rollback_file(path: Path, records: list[LogRecord]) -> None:
    """Append ``records`` to the rollback file ``path`` (0600, in a 0700 folder)."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with open(fd, "a", encoding="utf-8") as out:
        for record in records:
            line = {
                "epoch": record.epoch,
                "seq": record.seq,
                "changeset": base64.b64encode(record.changeset).decode("ascii"),
            }
            out.write(json.dumps(line) + "\n")
        out.flush()
        os.fsync(out.fileno())
    if created:
        _fsync_dir(path.parent)


def prune_rollback_files(folder: Path, max_files: int, max_bytes: int) -> list[Path]:
    """Delete the oldest rollback files (``*.jsonl`` in ``folder``) beyond the newest
    ``max_files`` or ``max_bytes`` in all; the newest file is always kept, whatever
    its size. Returns the deleted paths, oldest first.

    Rollback files hold removed records, deleted message bodies included, so the
    bounds are also how long such content may outlive its deletion on disk."""
    try:
        entries = [(p.stat(), p) for p in Path(folder).glob("*.jsonl") if p.is_file()]
    except FileNotFoundError:
        return []
    entries.sort(key=lambda entry: (entry[0].st_mtime_ns, entry[1].name), reverse=True)
    kept_bytes = 0
    doomed: list[Path] = []
    for count, (info, path) in enumerate(entries, 1):
        kept_bytes += info.st_size
        if count > 1 and (count > max_files or kept_bytes > max_bytes):
            doomed.append(path)
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed[::-1]


def prepare_restore(
    path: Path, node_id: int, migrations: Sequence[str] | None = None
) -> tuple[Position, str]:
    """Turn ``path``, a copy of a backup (``python -m ops.backup``), into the database
    of node ``node_id`` of a new cluster; return its position and new database id.

    The replicated tables stay as the backup has them; what described the node it
    was taken from goes (one transaction, durable on return):

    * a new database id: the copy is not the database it came from (E4);
    * no votes, the current epoch kept (never below the position's);
    * an empty log: the new cluster's other nodes catch up by snapshot, and no
      record of the old cluster is sent to anyone;
    * the sync set becomes this node alone, naming its new database, and the
      node is marked ``restored``: that set was written here, not by a primary,
      and nodes left with the old cluster's data may hold newer acknowledged
      writes in a newer epoch. So the node leads only once a majority of the
      nodes are empty or already follow it (``election.py``), and takes the
      others in as they catch up; the mark goes once a sync set with another
      member is in effect.

    ``migrations``: the application's, run first (as ``Storage`` does); None leaves
    that to the node's first start.

    Raises ``Internal`` when the file is not a sound database of this schema."""
    conn = _connect(path, "FULL")
    try:
        db = Db(conn)
        with _translated():
            problems = "\n".join(str(row[0]) for row in db.execute("PRAGMA integrity_check"))
        if problems != "ok":
            raise Internal(f"the backup fails its integrity check: {problems}")
        _migrate(conn, migrations)
        made = secrets.token_hex(16)
        with _translated():
            conn.execute("BEGIN IMMEDIATE")
            try:
                position = _read_position(db)
                if position == Position.ZERO:
                    raise Internal("the file holds no position: not a backup of a node")
                state = _read_node_state(db)
                old = _read_sync_set(db)
                db.execute("DELETE FROM node_state")
                db.execute("DELETE FROM txlog")
                _write_json(db, "node_state", "last_position", [position.epoch, position.seq])
                _write_node_state(db, NodeState(max(state.current_epoch, position.epoch), 0, None))
                _write_json(db, "node_state", "database_id", made)
                _write_json(db, "node_state", "restored", True)
                sync_set = {
                    "version": old.version + 1,
                    "members": [node_id],
                    "epoch": old.epoch,
                    "databases": [[node_id, made]],
                }
                _write_json(db, "cluster", "sync_set", sync_set)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    finally:
        conn.close()
    return position, made
