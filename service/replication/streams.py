"""The primary's streams to backups: records after a backup's divergence point, live.

A backup that joined gets a ``Stream``: records after its divergence point,
read from the in-memory tail or the log, then live (``broadcast`` sends each new
record to every stream that is caught up). A stream never runs more than
``WINDOW`` records ahead of what the backup acknowledged, so a frozen backup
costs bounded memory. When the log no longer reaches back far enough, a
snapshot (SQLite online backup) is sent first, in chunks, after checking that
the copy is sound: damaged pages are never shipped. Nor is a record of the log
that fails its checksum (``LogDamaged``: the disk changed it): it leaves the log
with the records before it, and the backup, asked to join again, gets a snapshot.
A backup takes a snapshot only when the answer to its join announced one, so a
stream that finds the log no longer reaching back also has it join again. A
snapshot the disk does not let the primary make (no room for the copy beside the
database) waits, its backup linked, and is tried again every ``SNAPSHOT_RETRY``
seconds; ``snapshot_waits`` says why to status and metrics.

Invariants: ``tail`` holds the newest records in seq order, at most
``TAIL_BYTES`` of changesets (at least one record); a stream's ``next_seq`` is
the first record it has not sent; a live stream is sent each record as it is
sealed, and drops out of live mode at any gap (it then reads the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import NodeConfig
from ..errors import StorageCorrupt, StorageFault
from ..logline import format_fields
from ..metrics import Metrics
from ..peer import PeerLinks
from ..storage import LogDamaged, Storage, remove_database_files
from .effects import StartStream
from .messages import Snapshot
from .shell import Shell, log
from .state import ReplicaCore
from .types import LogRecord, Position

WINDOW = 4096
CHUNK_RECORDS = 512
# A catch-up frame stays far below max_frame: a group-committed record can hold
# hundreds of writes, and on a link of peer version 1 base64 adds a third.
CHUNK_BYTES = 1024 * 1024
SNAPSHOT_CHUNK = 1024 * 1024
TAIL_BYTES = 4 * 1024 * 1024
# How often a snapshot that could not be made (no room for the copy, a disk that
# refused it) is tried again, while its backup stays linked and waits.
SNAPSHOT_RETRY = 2.0


@dataclass
class Stream:
    peer: int
    next_seq: int
    snapshot: bool
    live: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Streams:
    """Every stream of this primary, and the tail of records they share."""

    def __init__(
        self,
        shell: Shell,
        config: NodeConfig,
        core: ReplicaCore,
        storage: Storage,
        links: PeerLinks,
        metrics: Metrics,
        snapshot_sent: Callable[[int], None],
    ) -> None:
        self.shell = shell
        self.config = config
        self.core = core
        self.storage = storage
        self.links = links
        self.metrics = metrics
        # Told of each snapshot sent: a backup holding one is no independent witness
        # in the checksum rounds (verify.py).
        self.snapshot_sent = snapshot_sent
        self.streams: dict[int, Stream] = {}
        # The newest records, for streams to live backups without reading the log back.
        # Bounded in bytes: with group commit a record may hold hundreds of writes.
        self.tail: deque[LogRecord] = deque()
        self.tail_bytes = 0
        # Backups whose snapshot waits, and why (status and metrics tell the operator).
        self.snapshot_waits: dict[int, str] = {}

    def acked(self, peer: int) -> None:
        """``peer`` acknowledged: its window may have room again."""
        stream = self.streams.get(peer)
        if stream is not None:
            stream.wake.set()

    def stop_all(self) -> None:
        for peer in list(self.streams):
            self.stop(peer)

    def broadcast(self, record: LogRecord) -> None:
        for stream in self.streams.values():
            if stream.live and stream.next_seq == record.seq and self._in_window(stream):
                self.shell.send(stream.peer, self.core.stream_header(stream.peer, [record]))
                stream.next_seq += 1
            else:
                stream.live = False
                stream.wake.set()

    def _in_window(self, stream: Stream) -> bool:
        durable = self.core.backup_durable(stream.peer)
        return stream.next_seq - max(durable or 0, 0) <= WINDOW

    def start(self, effect: StartStream) -> None:
        self.stop(effect.node)
        stream = Stream(effect.node, effect.after_seq + 1, effect.snapshot)
        self.streams[effect.node] = stream
        stream.task = self.shell.spawn(self._loop(stream))

    def stop(self, peer: int) -> None:
        stream = self.streams.pop(peer, None)
        if stream is not None and stream.task is not None:
            stream.task.cancel()

    def remember(self, record: LogRecord) -> None:
        self.tail.append(record)
        self.tail_bytes += len(record.changeset)
        while self.tail_bytes > TAIL_BYTES and len(self.tail) > 1:
            self.tail_bytes -= len(self.tail.popleft().changeset)

    def forget_tail(self) -> None:
        self.tail.clear()
        self.tail_bytes = 0

    def _records_from(self, seq: int, limit: int) -> list[LogRecord]:
        """Records from ``seq`` on: at most ``limit``, and about CHUNK_BYTES (at least one)."""
        if self.tail and self.tail[0].seq <= seq:
            start = seq - self.tail[0].seq
            records = [self.tail[i] for i in range(start, min(len(self.tail), start + limit))]
        else:
            records = self.storage.log_range(seq - 1, limit, CHUNK_BYTES)
        size = 0
        for count, record in enumerate(records):
            size += len(record.changeset)
            if size > CHUNK_BYTES and count:
                return records[:count]
        return records

    async def _loop(self, stream: Stream) -> None:
        try:
            await self._stream(stream)
        except LogDamaged as exc:
            # The record is useless to anyone and the ones before it are useless
            # without it: they leave the log, so that the core sends a snapshot
            # (made from the tables) to every backup that needed them.
            self.metrics.damaged_log_records.inc()
            log.error(
                format_fields(
                    "log record damaged, dropped from the log",
                    {"node": self.config.node_id, "seq": exc.seq, "why": str(exc)},
                )
            )
            with contextlib.suppress(StorageFault):
                self.storage.drop_log_through(exc.seq)
            first = self.storage.first_log_seq()
            # A disk that refused the delete left the record: the core counts the log
            # from after it all the same, until a later prune says otherwise.
            self.core.on_log_pruned(first if first is None or first > exc.seq else exc.seq + 1)
            self._drop_link(stream, "log record damaged, asking the backup to join again")
        except (StorageFault, StorageCorrupt) as exc:
            # The log could not be read (an I/O error, a damaged page): drop the
            # link, so that it joins again and the stream starts afresh.
            self._drop_link(stream, "stream to backup failed", str(exc))
        except (ConnectionError, OSError) as exc:
            log.info(
                format_fields(
                    "stream to backup ended",
                    {"node": self.config.node_id, "backup": stream.peer, "why": str(exc)},
                )
            )

    async def _stream(self, stream: Stream) -> None:
        if stream.snapshot:
            await self._send_snapshot(stream)
        while True:
            last = self.core.position.seq
            if stream.next_seq > last:
                stream.live = True
                stream.wake.clear()
                await stream.wake.wait()
                continue
            stream.live = False
            if not self._in_window(stream):
                stream.wake.clear()
                await stream.wake.wait()
                continue
            records = self._records_from(stream.next_seq, CHUNK_RECORDS)
            if not records or records[0].seq != stream.next_seq:
                # Pruned since the join, which found the log reaching back far enough.
                # A snapshot now would be ignored (a backup takes one only when its
                # join's answer said so): it joins again and is told.
                self._drop_link(stream, "log pruned past backup, asking it to join again")
                return
            header = self.core.stream_header(stream.peer, records)
            if not self.shell.send(stream.peer, header):
                return
            stream.next_seq = records[-1].seq + 1
            await self.links.drain(stream.peer)
            # drain returns at once while the socket takes more: without this the
            # whole catch-up (tens of MiB of the largest messages) ran in one step of
            # the loop, no heartbeat went out, and the backups in the sync set took
            # the primary for dead.
            await asyncio.sleep(0)

    async def _copy_for(self, peer: int, path: Path) -> Position:
        """A copy of the database in ``path`` for ``peer``'s snapshot, made once the
        disk lets it be made. Until then the backup stays linked and waits: giving
        up dropped the link, the backup joined again at once, and the primary, its
        data dir short of room for the copy, tried again twenty times a second,
        filling its disk each time and flooding its log."""
        while True:
            try:
                # Off the event loop: copying and checking a database of tens of MiB
                # takes longer than ``suspect_timeout``, and the primary must keep
                # sending heartbeats and serving meanwhile (both read through
                # connections of their own; SQLite releases the GIL as it copies).
                return await asyncio.to_thread(self.storage.make_snapshot, path)
            except StorageFault as exc:
                why = str(exc)
            if peer not in self.snapshot_waits:
                log.warning(
                    format_fields(
                        "snapshot waits",
                        {"node": self.config.node_id, "backup": peer, "why": why},
                    )
                )
            self.snapshot_waits[peer] = why
            await asyncio.sleep(SNAPSHOT_RETRY)

    def _drop_link(self, stream: Stream, event: str, why: str | None = None) -> None:
        """Drop the link to this stream's backup: it joins again, and the core's
        answer tells it whether a snapshot comes."""
        fields: dict[str, object] = {"node": self.config.node_id, "backup": stream.peer}
        if why is not None:
            fields["why"] = why
        log.info(format_fields(event, fields))
        link = self.links.links.get(stream.peer)
        if link is not None:
            link.close()

    async def _send_snapshot(self, stream: Stream) -> None:
        path = self.config.snapshot_out_path(stream.peer)
        remove_database_files(path)
        started = time.monotonic()
        try:
            position = await self._copy_for(stream.peer, path)
        finally:
            self.snapshot_waits.pop(stream.peer, None)
        damage = await asyncio.to_thread(self.storage.check_file, path)
        if damage is not None:
            # The copy is of our own pages: never ship them (a backup would install
            # them and the damage would spread to every node).
            self.shell.damaged(f"a snapshot of this database is damaged: {damage}")
        size = path.stat().st_size
        log.info(
            format_fields(
                "snapshot start",
                {
                    "node": self.config.node_id,
                    "backup": stream.peer,
                    "epoch": position.epoch,
                    "seq": position.seq,
                    "bytes": size,
                },
            )
        )
        try:
            with path.open("rb") as source:
                offset = 0
                while True:
                    data = source.read(SNAPSHOT_CHUNK)
                    done = len(data) < SNAPSHOT_CHUNK
                    chunk = Snapshot(self.core.epoch, position, offset, data, done, size)
                    if not self.shell.send(stream.peer, chunk):
                        raise ConnectionError("link lost during the snapshot")
                    offset += len(data)
                    await self.links.drain(stream.peer)
                    await asyncio.sleep(0)  # as in a catch-up: let heartbeats out
                    if done:
                        break
        finally:
            remove_database_files(path)
        stream.next_seq = position.seq + 1
        stream.snapshot = False
        self.snapshot_sent(stream.peer)
        self.metrics.snapshots_sent.inc()
        log.info(
            format_fields(
                "snapshot sent",
                {
                    "node": self.config.node_id,
                    "backup": stream.peer,
                    "seq": position.seq,
                    "seconds": f"{time.monotonic() - started:.3f}",
                },
            )
        )
