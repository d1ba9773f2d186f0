"""What the checker reads from one node after healing: its database, rollback files, log.

Theory of operation
-------------------
The database is opened read-only with the standard library's ``sqlite3``
(``mode=ro``): the node may still be running (WAL lets a reader in beside its
writer), and the checker must never take the write lock of a node or create
a database where there is none. Everything is read in one read transaction,
so the rows, the log and the position are one consistent picture.

Per-table checksums use the same definition as ``Storage.checksums`` (sha256
of each row's ``repr`` in primary key order over the replicated tables of
``chat_schema.TABLES`` and storage's ``OWN_REPLICATED``), so they compare with what the tests
and an operator compute.

Only rows of this run are kept (user names and message bodies carry the run's
prefix), except for the log, the checksums and the integrity check, which are
about the whole database.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from service.chat_schema import TABLES
from service.storage import OWN_REPLICATED


@dataclass(frozen=True)
class MessageRow:
    id: int
    sender: str | None
    recipient: str | None
    body: str
    deleted: bool


@dataclass(frozen=True)
class UserRow:
    id: int
    name: str
    name_key: str
    deleted: bool


@dataclass
class NodeData:
    """One node's state after the run."""

    node_id: int
    position: tuple[int, int] = (0, 0)
    sync_set: dict[str, object] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)
    integrity: str = ""
    messages: dict[int, MessageRow] = field(default_factory=dict)
    users: list[UserRow] = field(default_factory=list)
    txlog: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # seq -> (epoch, changeset)
    epochs: list[tuple[int, int]] = field(default_factory=list)  # (epoch, first seq)
    rolled_back: list[tuple[int, int, bytes]] = field(default_factory=list)  # (epoch, seq, cs)
    log: str = ""
    error: str | None = None  # the database could not be read


def read_node(node_id: int, db_path: Path, rollback_dir: Path, log: str, prefix: str) -> NodeData:
    data = NodeData(node_id, log=log)
    if not db_path.exists():
        data.error = f"no database at {db_path}"
        return data
    uri = db_path.resolve().as_uri() + "?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True, timeout=10.0)) as conn:
            conn.execute("BEGIN")
            _read_tables(conn, data, prefix)
            conn.execute("COMMIT")
    except sqlite3.Error as exc:
        data.error = f"cannot read {db_path.name}: {exc}"
    data.rolled_back = _rollback_records(rollback_dir)
    return data


def _read_tables(conn: sqlite3.Connection, data: NodeData, prefix: str) -> None:
    like = prefix + "%"
    rows = conn.execute(
        "SELECT m.id, s.name, r.name, m.body, m.deleted_at IS NOT NULL FROM messages m "
        "LEFT JOIN users s ON s.id = m.sender_id LEFT JOIN users r ON r.id = m.recipient_id "
        "WHERE s.name LIKE ? OR r.name LIKE ? OR m.body LIKE ?",
        (like, like, like),
    )
    data.messages = {
        int(i): MessageRow(int(i), s, r, str(b), bool(d)) for i, s, r, b, d in rows.fetchall()
    }
    users = conn.execute(
        "SELECT id, name, name_key, deleted_at IS NOT NULL FROM users WHERE name_key LIKE ?",
        (like.lower(),),
    )
    data.users = [UserRow(int(i), str(n), str(k), bool(d)) for i, n, k, d in users.fetchall()]
    data.txlog = {
        int(seq): (int(epoch), bytes(cs))
        for seq, epoch, cs in conn.execute("SELECT seq, epoch, changeset FROM txlog")
    }
    data.epochs = [
        (int(e), int(s))
        for e, s in conn.execute("SELECT epoch, start_seq FROM epochs ORDER BY epoch")
    ]
    state = dict(conn.execute("SELECT key, value FROM node_state").fetchall())
    position = json.loads(state.get("last_position", "[0, 0]"))
    data.position = (int(position[0]), int(position[1]))
    cluster = dict(conn.execute("SELECT key, value FROM cluster").fetchall())
    data.sync_set = json.loads(cluster.get("sync_set", "{}"))
    data.checksums = checksums(conn)
    data.integrity = "\n".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))


def checksums(conn: sqlite3.Connection) -> dict[str, str]:
    """``Storage.checksums`` over a plain sqlite3 connection."""
    sums = {}
    for table, key in {**TABLES, **OWN_REPLICATED}.items():
        digest = hashlib.sha256()
        for row in conn.execute(f"SELECT * FROM {table} ORDER BY {key}"):
            digest.update(repr(tuple(row)).encode())
            digest.update(b"\n")
        sums[table] = digest.hexdigest()
    return sums


_ROLLBACK_FILE = re.compile(r"rewind-.*\.jsonl$")


def _rollback_records(folder: Path) -> list[tuple[int, int, bytes]]:
    """Every record a rewind removed from this node (``Storage.rewind`` writes them)."""
    records: list[tuple[int, int, bytes]] = []
    if not folder.is_dir():
        return records
    for path in sorted(folder.iterdir()):
        if not _ROLLBACK_FILE.search(path.name):
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                item = json.loads(line)
                changeset = base64.b64decode(item["changeset"])
                records.append((int(item["epoch"]), int(item["seq"]), changeset))
    return records
