"""A backup's side of the stream: apply records, rewind, install a snapshot.

Records that arrived together are applied in one SQLite transaction (one
fsync, through ``durability.py``), up to ``APPLY_BYTES`` of them in one turn of
the event loop, and only while the core says the backup has joined its primary
(``ApplyRecords`` comes only then). The bound matters under a flood of the
largest writes: the event loop reads a socket for as long as it has data, so
after a stall the records of that time (18 MB seen after a 3 s freeze) arrive in
one turn, and applying 6 MiB in one transaction held the loop for 0.45 s: no
``status`` answered, and the primary's heartbeats left unread past its suspect
timeout. The rest waits for the next turn, after the timers and the sockets.
Past ``PENDING_BYTES`` waiting, the primary's link is not read until an apply
brings them under (TCP pushes back on the primary, as when all that was read in
a turn was applied in the next). Records still waiting when their stream ends
(a rewind or a snapshot answering a join, a lost join, a failed apply, the node
stopping) are dropped, never applied. A record that does not follow the log (a
gap, an older epoch) is never applied: the backup joins again and the primary
says where to resume (R4).

A rewind removes every record after the divergence point, durably, keeping
them in a rollback file; if the log no longer reaches back that far, the
backup counts its log as empty (``on_log_unusable``) so that its next join gets
a snapshot. A snapshot arrives in chunks into ``snapshot-in.db``, is checked
(``quick_check``) before it is installed, and is never installed damaged; the
install uses that file up (``Storage.install_snapshot``), and a node that
crashed with one there removes it at its next start.
After either, the core hears ``on_log_replaced`` with the new log's facts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..config import NodeConfig
from ..errors import StorageCorrupt, StorageFault
from ..logline import format_fields
from ..metrics import Metrics
from ..storage import (
    Diverged,
    SchemaMismatch,
    Storage,
    changes_cluster,
    copy_room,
    os_fault,
    prune_rollback_files,
    remove_database_files,
)
from .durability import Durability
from .effects import Effect
from .messages import Snapshot
from .shell import Shell, log
from .state import ReplicaCore
from .types import LogRecord, Position, Role
from .writer import BATCH_BYTES, RECORD_BUDGET

# The most changeset bytes applied in one transaction, one turn of the event loop:
# one full batch of the primary's (at least one record, whatever its size: a single
# write may still fill RECORD_BUDGET). Records of the usual writes, a few KB each,
# still go a hundred and more to a transaction and its fsync.
APPLY_BYTES = BATCH_BYTES
# Records received and not yet applied, past this many bytes of changesets: the
# primary's link is not read until an apply brings them under again. TCP then pushes
# back on the primary (which cuts a link it has buffered peer.MAX_BUFFERED for), as
# it did when everything read in a turn was applied in the next one. The link is
# read again within a few turns (a read overshoots by at most a record or a catch-up
# frame and what came with it, applied APPLY_BYTES a turn), so the primary's frames
# are still heard far within its suspect timeout.
PENDING_BYTES = 8 * RECORD_BUDGET


class Follower:
    def __init__(
        self,
        shell: Shell,
        config: NodeConfig,
        core: ReplicaCore,
        storage: Storage,
        durability: Durability,
        metrics: Metrics,
        forget_tail: Callable[[], None],
        fatal: Callable[[BaseException | None], None],
        set_reading: Callable[[int, bool], None],
    ) -> None:
        self.shell = shell
        self.config = config
        self.core = core
        self.storage = storage
        self.durability = durability
        self.metrics = metrics
        # A snapshot install replaces the log: the primary-side tail of records (kept
        # for streams should this node lead) describes records that are gone.
        self.forget_tail = forget_tail
        self.fatal = fatal
        # Whether to read the link to a peer (False: leave its frames in the socket).
        self.set_reading = set_reading
        # Records received and not yet applied (APPLY_BYTES of them a transaction),
        # their changesets' bytes, and the peer whose link is not read meanwhile.
        self.pending: list[LogRecord] = []
        self.pending_bytes = 0
        self.unread: int | None = None
        self.scheduled = False
        self.closed = False
        # The snapshot being received: its file and how many bytes are in.
        self.incoming_snapshot: tuple[Path, int] | None = None
        # The first seq of records that did not apply, until records apply again.
        self.failed_at: int | None = None

    def buffer(self, records: list[LogRecord]) -> None:
        """Records of an ``append`` (checked at the edge: ``messages.from_wire``)."""
        if self.closed:
            return
        self.pending.extend(records)
        self.pending_bytes += sum(len(record.changeset) for record in records)
        primary = self.core.primary
        if self.pending_bytes > PENDING_BYTES and self.unread is None and primary is not None:
            self.unread = primary
            self.set_reading(primary, False)
        if not self.scheduled:
            # Records that arrived together are applied together (up to APPLY_BYTES):
            # one transaction, one fsync.
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def close(self) -> None:
        """The node stops: nothing more is applied (the database closes next)."""
        self.closed = True
        self.unread = None  # its links close next: nothing more to read
        self._drop()

    def _flush(self) -> None:
        try:
            self._apply()
        except Exception as exc:
            self.fatal(exc)
        finally:
            self._read_again()

    def _drop(self) -> None:
        self.pending = []
        self.pending_bytes = 0
        self._read_again()

    def _read_again(self) -> None:
        if self.unread is not None and self.pending_bytes <= PENDING_BYTES:
            peer, self.unread = self.unread, None
            self.set_reading(peer, True)

    def _apply(self) -> None:
        self.scheduled = False
        if self.closed or self.core.role is not Role.BACKUP or not self.core.joined:
            self._drop()
            return
        records = self._take()
        if not records:
            return  # dropped since this turn was asked for (a rewind, a snapshot)
        if self.pending:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        position = self.core.position
        records = [r for r in records if r.seq > position.seq]
        if not records:
            self.shell.run(self.core.resend_ack(self.shell.now()))
            return
        was_epoch = position.epoch
        try:
            new_position = self._apply_or_drop(records)
        except Diverged as exc:
            # The same records failing again after the rejoin: our rows are not what
            # the primary's records expect at this position (a history that shares
            # its (epoch, seq) with another one, or rows changed underneath). Asking
            # again would spin; a snapshot replaces them with the primary's.
            again = self.failed_at == records[0].seq
            self.failed_at = records[0].seq
            self.shell.run(self.core.rejoin(self.shell.now(), str(exc), snapshot=again))
            return
        except StorageFault as exc:
            # A full or failing disk is never a divergence: stop applying, no rewind.
            self.shell.fault(str(exc))
            return
        except SchemaMismatch as exc:
            # The primary runs a later schema (an upgrade under way). Neither a rewind
            # nor a snapshot nor a retry makes its records fit: stop applying and
            # acknowledging, say why, and stay so until this node runs the later
            # schema too. The primary drops it from the sync set meanwhile (R3).
            self.shell.fault(str(exc), lasting=True)
            return
        except StorageCorrupt as exc:
            self.shell.damaged(str(exc))
        self.failed_at = None
        # Records that began an epoch: the core's epoch history is storage's again.
        history = self.storage.epoch_history() if new_position.epoch != was_epoch else None
        self.metrics.applied_records.observe(len(records))
        applied = sum(len(record.changeset) for record in records)
        self.metrics.applied_bytes.observe(applied)
        lone = self.durability.is_lone(len(records), applied, bool(self.pending))
        # The sync set is in the replicated ``cluster`` table: read it only after
        # records that may have changed it (the core keeps the one it has otherwise).
        sync_set = self.storage.sync_set() if any(map(changes_cluster, records)) else None
        self.durability.committed(new_position, sync_set, lone=lone, history=history)

    def _apply_or_drop(self, records: list[LogRecord]) -> Position:
        try:
            return self.storage.apply_records(records)
        except BaseException:
            # The records after these cannot follow them: they come again after the
            # next join, or never (a fault, a later schema).
            self._drop()
            raise

    def _take(self) -> list[LogRecord]:
        """The first pending records, up to APPLY_BYTES of changesets (at least one)."""
        size = 0
        for count, record in enumerate(self.pending):
            if size + len(record.changeset) > APPLY_BYTES and count:
                taken, self.pending = self.pending[:count], self.pending[count:]
                self.pending_bytes -= size
                return taken
            size += len(record.changeset)
        taken, self.pending = self.pending, []
        self.pending_bytes = 0
        return taken

    def rewind(self, to_seq: int) -> list[Effect]:
        # A rewind answers a join: records still waiting for their turn came before
        # it, in the stream it replaces.
        self._drop()
        position = self.storage.position()
        rollback = self.config.rollback_dir / f"rewind-{int(time.time() * 1000)}.jsonl"
        try:
            removed = self.storage.rewind(to_seq, rollback)
        except StorageFault as exc:
            self.shell.fault(str(exc))
            return []
        except Diverged as exc:
            log.info(
                format_fields(
                    "rewind impossible, asking for a snapshot",
                    {"node": self.config.node_id, "to": to_seq, "why": str(exc)},
                )
            )
            # Our own log does not reach back to the divergence point: start empty so
            # that the primary sends a snapshot.
            return self._request_snapshot()
        new_position = self.storage.position()
        self.durability.forget()
        self.metrics.rewound(removed)
        pruned = prune_rollback_files(
            rollback.parent, self.config.rollback_max_files, self.config.rollback_max_bytes
        )
        log.info(
            format_fields(
                "rewind",
                {
                    "node": self.config.node_id,
                    "from": position.seq,
                    "to": new_position.seq,
                    "removed": removed,
                    "rollback": rollback.name,
                    "pruned": ",".join(path.name for path in pruned) or "-",
                },
            )
        )
        return self._log_replaced(new_position)

    def _log_replaced(self, position: Position) -> list[Effect]:
        storage = self.storage
        return self.core.on_log_replaced(
            self.shell.now(),
            position,
            storage.sync_set(),
            storage.epoch_history(),
            storage.first_log_seq(),
            storage.restored,
        )

    def _request_snapshot(self) -> list[Effect]:
        self.durability.forget()
        return self.core.on_log_unusable(self.shell.now(), "own log too short to rewind")

    def expect_snapshot(self) -> None:
        self._drop()  # as for a rewind
        path = self.config.snapshot_in_path
        remove_database_files(path)
        self.incoming_snapshot = (path, 0)
        log.info(
            format_fields(
                "snapshot expected", {"node": self.config.node_id, "from": self.core.primary}
            )
        )

    @staticmethod
    def _receive_chunk(path: Path, data: bytes, done: bool) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with open(fd, "ab") as target:
                target.write(data)
                if done:
                    target.flush()
                    os.fsync(target.fileno())
        except OSError as exc:
            raise os_fault(exc, "cannot write the snapshot received") from exc

    def receive_snapshot(self, chunk: Snapshot) -> list[Effect]:
        """One chunk of the snapshot the core expects from the current primary."""
        if self.incoming_snapshot is None:
            return []
        path, expected = self.incoming_snapshot
        if chunk.offset != expected:
            self.incoming_snapshot = None
            return self.core.rejoin(self.shell.now(), "snapshot chunk out of order")
        data = chunk.data
        if chunk.offset == 0 and chunk.size is not None:
            # Say so before taking any of it, and wait for room before joining again:
            # a disk that filled mid-way made the primary copy and send the whole
            # database again every few hundred milliseconds, and never enough.
            needed = self.storage.install_bytes(chunk.size)
            problem = copy_room(path.parent, needed, "the snapshot and the WAL of its install")
            if problem is not None:
                self.incoming_snapshot = None
                self.shell.fault(f"cannot install the snapshot: {problem}", room=needed)
                return []
        try:
            self._receive_chunk(path, data, chunk.done)
            self.incoming_snapshot = (path, expected + len(data))
            if not chunk.done:
                return []
            self.incoming_snapshot = None
            started = time.monotonic()
            damage = self.storage.check_file(path)
            if damage is not None:
                # Damaged in transit or at the sender: never installed. Ask again.
                log.warning(
                    format_fields(
                        "snapshot damaged, not installed",
                        {"node": self.config.node_id, "from": self.core.primary, "why": damage},
                    )
                )
                return self.core.rejoin(self.shell.now(), "the snapshot received was damaged")
            position = self.storage.install_snapshot(path)
        except StorageFault as exc:
            self.incoming_snapshot = None
            self.shell.fault(str(exc))
            return []
        except SchemaMismatch as exc:
            # A snapshot of the primary's later schema: as for its records (``_apply``).
            self.incoming_snapshot = None
            self.shell.fault(str(exc), lasting=True)
            return []
        finally:
            if self.incoming_snapshot is None:
                # A disk that refuses even this: the next start removes it.
                with contextlib.suppress(OSError):
                    remove_database_files(path)
        try:
            self.storage.truncate_wal()
        except StorageFault as exc:
            # Installed all the same: the pages wait in the WAL, durable there.
            log.warning(
                format_fields(
                    "WAL not truncated after the snapshot install",
                    {"node": self.config.node_id, "why": str(exc)},
                )
            )
        self.forget_tail()
        self.durability.forget()
        self.metrics.snapshots_installed.inc()
        log.info(
            format_fields(
                "snapshot installed",
                {
                    "node": self.config.node_id,
                    "epoch": position.epoch,
                    "seq": position.seq,
                    "seconds": f"{time.monotonic() - started:.3f}",
                },
            )
        )
        return self._log_replaced(position)
