"""The node's identity file: which database this node ran on, and how its last run ended.

Why
---
A sync set names its members *and their databases* (``SyncSet.databases``), so a
node whose data folder was wiped comes back with a new database id and is not
the member the set names (E4). Two faults leave the database id intact and still
lose committed transactions, and SQLite cannot see them from inside the file:

* the ``-wal`` file is deleted after a crash: the database silently falls back
  to its last checkpoint;
* ``chat.db`` is replaced by another file (an old copy, another node's).

This file, ``identity.json`` beside the database, catches both. It records the
database id and whether the node stopped cleanly. At start, before the
database is opened, the node notes whether a WAL is present; then:

* the file names another database id → the database was replaced;
* the last run did not stop cleanly and there is no WAL → the WAL was lost
  (after a crash SQLite always leaves it: only a clean close deletes it);
* the file still carries the suspicion of an earlier run → it stands.

A suspect node (``unproven``) serves nothing as a member: it never counts as
a member of its sync set in an election (G5), so if it was the last member,
the cluster waits, says why, and an operator's forced promotion is the way
out. The suspicion ends once the node has joined a primary and continues its
history (``DatabaseProven``), and is kept in this file until then, so a
restart does not forget it.

Invariants
----------
* The file is replaced atomically (temporary file, fsync, rename, fsync of the
  folder) and is readable by the service alone (0600).
* ``clean`` is written true only after the node stopped writing, just before
  the database is closed: a crash in between leaves the WAL in place.
* A missing file (a data folder from before it existed) proves nothing and
  suspects nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "identity.json"


@dataclass(frozen=True)
class Identity:
    database_id: str
    clean: bool
    suspect: str | None
    # SQLite found a damaged page while the node ran: the next start moves the
    # database aside (it never leads or ships those pages) and takes a snapshot.
    damaged: bool = False


@dataclass(frozen=True)
class Before:
    """What the data folder held before the database was opened."""

    database_existed: bool
    wal_existed: bool


def observe(db_path: Path) -> Before:
    wal = db_path.with_name(db_path.name + "-wal")
    return Before(database_existed=db_path.exists(), wal_existed=wal.exists())


def read(path: Path) -> Identity | None:
    """The recorded identity, or None when there is none or it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("database_id"), str):
        return None
    suspect = data.get("suspect")
    return Identity(
        data["database_id"],
        data.get("clean") is True,
        suspect if isinstance(suspect, str) else None,
        data.get("damaged") is True,
    )


def verdict(recorded: Identity | None, database_id: str, before: Before) -> str | None:
    """Why this node cannot vouch for its database (see the module docstring), or None."""
    if recorded is None:
        return None
    if recorded.suspect is not None:
        return recorded.suspect
    if not before.database_existed:
        return "its database is gone (the data folder was wiped or the file deleted)"
    if not recorded.clean and not before.wal_existed:
        # Checked before the id: a lost WAL may take the id's own first commit with it.
        return (
            "its write-ahead log is gone after a crash: commits since the last "
            "checkpoint may be lost"
        )
    if recorded.database_id != database_id:
        return "its database is not the one it ran on before (the file was replaced)"
    return None


def write(path: Path, identity: Identity) -> None:
    """Replace the file atomically and durably (mode 0600)."""
    data = {
        "database_id": identity.database_id,
        "clean": identity.clean,
        "suspect": identity.suspect,
        "damaged": identity.damaged,
    }
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (json.dumps(data) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
