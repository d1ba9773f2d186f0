"""The node's side of ``python -m ops.backup``: a consistent copy of its database, streamed.

Why here, over the peer protocol
--------------------------------
The operator tool connects as node 0 with the cluster secret (like
``ops.promote``) and sends ``{"type": "backup"}``; the node answers with the
file in chunks. So a backup needs no access to the node's files (it works from
another host, and the data dir stays private to the node's user), and the copy
is made the way snapshots for backups are: ``Storage.make_snapshot``, SQLite's
online backup through a connection of its own, in one read transaction. The
copy is therefore one committed state of the database, tagged with the
position it holds, taken while the node goes on committing (WAL: the reader
never blocks the writer).

The copy is made in a worker thread (SQLite releases the GIL while it copies
pages), so a primary keeps serving during it; it needs as much free space in
the data dir as the database, for as long as the stream lasts.

Frames (PROTOCOL.md section 9): one or more
``{"type": "backup", "node", "database", "position": [epoch, seq], "bytes",
"offset", "data": base64, "done"}`` in order, the last with ``done`` true; or
an ``error`` frame (``internal``) when the copy cannot be made.

Invariants
----------
* The temporary copy is removed when the stream ends, whatever ends it; one
  left by a crash is removed when the node starts again (``node.py``), or by
  the next backup.
* Every chunk carries the copy's position and size, so the receiver can check
  that all chunks belong to one copy and that it has all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from . import protocol
from .errors import ChatError, Internal
from .storage import Storage, remove_database_files

log = logging.getLogger("service.backup")

CHUNK = 1024 * 1024  # bytes of the file per frame (base64 makes it 1.4 MiB on the wire)
PREFIX = "backup-out-"

_in_progress: set[Path] = set()


async def frames(storage: Storage, folder: Path, node_id: int) -> AsyncIterator[protocol.Frame]:
    """The backup frames of ``storage``'s database, copied into ``folder`` meanwhile."""
    _remove_leftovers(folder)
    path = folder / f"{PREFIX}{secrets.token_hex(4)}.db"
    _in_progress.add(path)
    try:
        try:
            position = await asyncio.to_thread(storage.make_snapshot, path)
            size = path.stat().st_size
        except (ChatError, OSError) as exc:
            message = exc.message if isinstance(exc, ChatError) else str(exc)
            log.warning("backup failed node=%s error=%s", node_id, message.replace("\n", " "))
            yield protocol.error(None, Internal(f"the backup failed: {message}").to_wire())
            return
        log.info(
            "backup start node=%s epoch=%s seq=%s bytes=%s",
            node_id,
            position.epoch,
            position.seq,
            size,
        )
        header = {
            "type": "backup",
            "node": node_id,
            "database": storage.database_id,
            "position": [position.epoch, position.seq],
            "bytes": size,
        }
        with path.open("rb") as source:
            offset = 0
            while True:
                data = source.read(CHUNK)
                done = offset + len(data) >= size
                yield {**header, "offset": offset, "data": protocol.b64(data), "done": done}
                offset += len(data)
                if done:
                    break
        log.info("backup sent node=%s seq=%s", node_id, position.seq)
    finally:
        _in_progress.discard(path)
        remove_database_files(path)


def _remove_leftovers(folder: Path) -> None:
    """Copies that a crash left behind (never one that a running backup streams)."""
    for path in folder.glob(f"{PREFIX}*.db*"):
        owner = path.with_name(path.name.split(".db")[0] + ".db")  # also its -wal, .partial
        if owner not in _in_progress:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
