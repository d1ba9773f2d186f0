"""Damage one page of a stopped node's database, the way a bad disk would.

Theory of operation
-------------------
``corrupt_page(path, pick, size)`` chooses, from ``pick`` alone among the
candidates, one b-tree page (a leaf or interior page of a table or an index)
in the middle half of the file, and overwrites its first ``size`` bytes with
other bytes: the page's b-tree header and the start of its cell pointer
array. That is damage ``PRAGMA integrity_check`` is sure to report. Bytes
inside a row's payload would often be invisible to SQLite, which keeps no
page checksums: a node could not tell, so such damage would test nothing the
node can be asked to handle.

Candidates come from SQLite's ``dbstat`` table, read through a read-only
``sqlite3`` connection, so freelist pages (which may still hold old b-tree
bytes) are never chosen. Page 1 (the database header and the schema) is never
chosen, nor any page that has a frame in the ``-wal`` file: SQLite would read
that frame instead of the damaged page. A node stopped with SIGTERM has
checkpointed and removed its WAL, so this rarely excludes anything.

What the damage can affect is recorded in the returned ``Damage``: the page,
the table or index it belongs to and, for a table leaf, the range of rowids
stored on it. Those rows are then unreadable on that node only; the other
nodes hold them, so no acknowledged write may be lost because of it, and the
checker's rules stay as they are.

Invariants
----------
* The node must be stopped: the file is written behind SQLite's back.
* The same file and ``pick`` give the same page and the same bytes.

``flip_payload(path, table, needle)`` is the damage SQLite cannot see: one bit
of a row's payload, found by the bytes ``needle`` on a leaf page of ``table``.
Every page stays well formed; only a checksum of the row's own (the log's
records carry one) can tell.
"""

from __future__ import annotations

import os
import random
import sqlite3
import struct
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

WAL_HEADER = 32
WAL_FRAME_HEADER = 24
TABLE_LEAF = 0x0D


@dataclass(frozen=True)
class Damage:
    """What ``corrupt_page`` did, and which rows it may have made unreadable."""

    path: Path
    page: int
    pages: int
    owner: str  # the table or index the page belongs to
    owner_type: str  # table | index
    page_type: str  # leaf | internal
    offset: int  # of the first damaged byte in the file
    size: int
    rowids: tuple[int, int] | None  # first and last rowid on a table leaf

    def describe(self) -> str:
        rows = f", rowids {self.rowids[0]}..{self.rowids[1]}" if self.rowids else ""
        return (
            f"page {self.page} of {self.pages} ({self.page_type} of {self.owner_type} "
            f"{self.owner}{rows}): {self.size} bytes of its b-tree header at offset {self.offset}"
        )


def corrupt_page(path: Path, pick: int, size: int) -> Damage:
    """Damage one b-tree page of the stopped database ``path``; see the module docstring."""
    path = Path(path)
    page_size, pages, candidates = _candidates(path)
    in_wal = _wal_pages(path.with_name(path.name + "-wal"))
    usable = [c for c in candidates if c[0] != 1 and c[0] not in in_wal]
    if not usable:
        raise ValueError(f"{path} has no b-tree page that can be damaged")
    quarter = len(usable) // 4
    middle = usable[quarter : len(usable) - quarter] or usable
    page, owner, owner_type, page_type = middle[pick % len(middle)]
    size = max(1, min(size, page_size))
    offset = (page - 1) * page_size
    with path.open("r+b") as db:
        db.seek(offset)
        original = db.read(page_size)
        rowids = _rowids(original) if original[0] == TABLE_LEAF else None
        rng = random.Random(pick)
        # XOR with a non-zero byte: every damaged byte differs from what was there.
        damaged = bytes(b ^ rng.randrange(1, 256) for b in original[:size])
        db.seek(offset)
        db.write(damaged)
        db.flush()
        os.fsync(db.fileno())
    return Damage(path, page, pages, owner, owner_type, page_type, offset, size, rowids)


def flip_payload(path: Path, table: str, needle: bytes, bit: int = 0x20, at: int = 0) -> int:
    """Flip ``bit`` of byte ``at`` of ``needle`` where it is stored on a leaf page
    of ``table`` in the stopped database ``path`` (0x20: an ASCII letter changes
    case; 0x02: a digit 5 becomes 7; either way the row still parses). ``needle``
    must occur exactly once among that table's leaf pages, on a page with no frame
    in the WAL. Returns the offset of the flipped byte."""
    path = Path(path)
    page_size, _, candidates = _candidates(path)
    in_wal = _wal_pages(path.with_name(path.name + "-wal"))
    found = []
    with path.open("r+b") as db:
        for page, owner, _, kind in candidates:
            if owner != table or kind != "leaf":
                continue
            db.seek((page - 1) * page_size)
            data = db.read(page_size)
            found += [(page, (page - 1) * page_size + i + at) for i in find_all(data, needle)]
        if len(found) != 1:
            raise ValueError(f"{needle!r} is on {len(found)} places of {table}'s leaf pages, not 1")
        page, offset = found[0]
        if page in in_wal:
            raise ValueError(f"page {page} has a frame in the WAL: SQLite would not read it")
        db.seek(offset)
        (byte,) = db.read(1)
        db.seek(offset)
        db.write(bytes([byte ^ bit]))
        db.flush()
        os.fsync(db.fileno())
    return offset


def find_all(data: bytes, needle: bytes) -> list[int]:
    """Every offset of ``needle`` in ``data``, overlapping ones included."""
    found, at = [], data.find(needle)
    while at >= 0:
        found.append(at)
        at = data.find(needle, at + 1)
    return found


def _candidates(path: Path) -> tuple[int, int, list[tuple[int, str, str, str]]]:
    """Page size, page count and (page, owner, owner type, page type) of every b-tree page."""
    if not path.exists():
        raise FileNotFoundError(f"no database at {path}")
    uri = path.resolve().as_uri() + "?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=10.0)) as conn:
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        types = dict(conn.execute("SELECT name, type FROM sqlite_schema"))
        rows = conn.execute(
            "SELECT pageno, name, pagetype FROM dbstat "
            "WHERE pagetype IN ('leaf', 'internal') ORDER BY pageno"
        ).fetchall()
    candidates = [
        (int(page), str(name), _owner_type(str(name), types), str(kind))
        for page, name, kind in rows
    ]
    return page_size, pages, candidates


def _owner_type(name: str, types: dict[str, str]) -> str:
    if name.startswith("sqlite_autoindex_"):
        return "index"
    return types.get(name, "table")


def _wal_pages(wal: Path) -> set[int]:
    """Page numbers of every frame in a WAL file, valid or not (a superset is safe)."""
    if not wal.exists() or wal.stat().st_size <= WAL_HEADER:
        return set()
    data = wal.read_bytes()
    page_size = struct.unpack(">I", data[8:12])[0] or 65536
    frame = WAL_FRAME_HEADER + page_size
    return {
        struct.unpack(">I", data[start : start + 4])[0]
        for start in range(WAL_HEADER, len(data) - frame + 1, frame)
    }


def _rowids(page: bytes) -> tuple[int, int] | None:
    """The first and last rowid of a table leaf page (b-tree header at offset 0)."""
    found = []
    try:
        for k in range(struct.unpack(">H", page[3:5])[0]):
            (pointer,) = struct.unpack(">H", page[8 + 2 * k : 10 + 2 * k])
            _, at = _varint(page, pointer)  # the payload size
            rowid, _ = _varint(page, at)
            found.append(rowid)
    except (IndexError, struct.error):
        return None  # not a page this parser understands: no range to report
    return (min(found), max(found)) if found else None


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """SQLite's big-endian varint at ``at``: (value, offset after it)."""
    value = 0
    for k in range(8):
        byte = data[at + k]
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, at + k + 1
    return (value << 8) | data[at + 8], at + 9
