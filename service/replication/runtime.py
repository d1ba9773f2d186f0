"""The replication runtime: the asyncio shell that carries out the core's effects.

The core (``state.py``) decides; this module does. It owns the write path of
the primary, the streams to backups, and the apply / rewind / snapshot work of
a backup, and feeds every outcome back into the core.

Write path (R2, R7). Client writes queue up while the previous batch runs;
the writer takes all of them (up to ``max_batch``) into one SQLite transaction,
each in its own savepoint, seals one record (one seq), sends it to every
backup streaming live, then commits without syncing and asks the group sync
(``groupsync.py``) to put it on disk. Replies wait until the core's watermark
(every member of the ack set durable, this node included) reaches that seq.
The writer waits neither for the disk nor for acknowledgements before the next
batch: records are pipelined, made durable in groups, and acknowledged in
order. Reads are served from the primary's database and released, like
writes, only when the watermark covers every seq they could have seen.

A backup applies the records that arrived together in one transaction, also
without syncing, and acknowledges a seq once the group sync reports it on disk.

Everything that touches the database runs on the event loop thread: a batch
is one synchronous stretch from BEGIN to COMMIT, so reads never see a batch
half done and the writer connection is never shared across threads. (The group
sync thread touches only the WAL file and a checkpoint connection of its own.)

Streams. A backup that joined gets a ``Stream``: records after its divergence
point, read from the in-memory tail or the log, then live. A stream never runs
more than ``WINDOW`` records ahead of what the backup acknowledged, so a frozen
backup costs bounded memory. When the log no longer reaches back far enough, a
snapshot (SQLite online backup) is sent first, in chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import heapq
import logging
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .. import backup, protocol
from ..config import NodeConfig
from ..errors import (
    ChatError,
    Internal,
    InvalidInput,
    NotPrimary,
    StorageCorrupt,
    StorageFault,
    Unavailable,
)
from ..metrics import Metrics
from ..peer import OPERATOR_ID, OperatorAnswer, PeerLinks
from ..storage import (
    Batch,
    Db,
    Diverged,
    Storage,
    os_fault,
    prune_rollback_files,
)
from .app import Application
from .effects import (
    Acknowledge,
    AnswerVerify,
    ApplyRecords,
    BecomePrimary,
    ChangeSyncSet,
    DatabaseProven,
    Effect,
    ExpectSnapshot,
    Log,
    Persist,
    ReceiveSnapshot,
    Resynchronize,
    Rewind,
    Send,
    StartStream,
    StepDown,
    StopStream,
    VerifyAnswered,
)
from .groupsync import GroupSync
from .messages import Ack, Message, Snapshot, from_wire
from .state import ReplicaCore, Timing
from .types import LogRecord, Position, Role, SyncSet
from .verify import Verifier

log = logging.getLogger("service.replication")

WINDOW = 4096
CHUNK_RECORDS = 512
# No record's changeset grows past this: the writer ends a batch before an operation
# would take it further (that operation goes first into the next batch), and an
# operation too large alone is refused. With base64 and a catch-up frame's other
# records (CHUNK_BYTES) a frame stays far below the peer frame limit, so a backup
# can always take what the primary sends (a record too large for the stream would
# stop replication for good).
RECORD_BUDGET = 2 * 1024 * 1024
# A node whose disk refused a write tries again after this, doubling up to the max.
RECOVER_FIRST = 0.2
RECOVER_MAX = 10.0
# A catch-up frame stays far below max_frame: a group-committed record can hold
# hundreds of writes, and base64 adds a third.
CHUNK_BYTES = 1024 * 1024
SNAPSHOT_CHUNK = 1024 * 1024
TAIL_BYTES = 4 * 1024 * 1024
TICK = 0.02
YIELDS_BETWEEN_BATCHES = 3
PRUNE_EVERY = 5.0

MessageHook = Callable[[int, dict[str, Any]], None]
# (op, token hash, result) of an acknowledged write that ended sessions.
SessionHook = Callable[[str, str | None, dict[str, Any]], None]
T = TypeVar("T")


class RecordFull(Exception):
    """An operation would take the batch's record past RECORD_BUDGET."""


@dataclass
class PendingWrite:
    op: str
    args: dict[str, Any]
    token_hash: str | None
    request_id: str
    future: asyncio.Future[dict[str, Any]]
    # The client's request, when the server wrote other args for it (Application.apply_write).
    fingerprint: str | None = None


@dataclass
class Stream:
    peer: int
    next_seq: int
    snapshot: bool
    live: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass(order=True)
class Waiter:
    """Something to do once ``seq`` is acknowledged (``None``) or never will be."""

    seq: int
    order: int
    fire: Callable[[ChatError | None], None] = field(compare=False)


def record_to_wire(record: LogRecord) -> list[Any]:
    return [record.epoch, record.seq, protocol.b64(record.changeset)]


def record_from_wire(item: Any) -> LogRecord:
    if (
        not isinstance(item, list)
        or len(item) != 3
        or not isinstance(item[0], int)
        or not isinstance(item[1], int)
    ):
        raise Diverged("malformed record in the stream")
    return LogRecord(item[0], item[1], protocol.unb64(item[2]))


def timing_from(config: NodeConfig) -> Timing:
    return Timing(
        heartbeat_interval=config.heartbeat_interval,
        suspect_timeout=config.suspect_timeout,
        election_timeout=config.election_timeout,
        sync_timeout=config.sync_timeout,
        confirm_window=config.confirm_window,
        clock_gap=config.clock_gap,
    )


def format_fields(event: str, fields: dict[str, Any]) -> str:
    parts = [event]
    for key, value in fields.items():
        text = str(value)
        if " " in text or not text:
            text = '"' + text.replace('"', "'") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


class Replicator:
    """One node's replication: the core plus everything it asks for."""

    def __init__(
        self,
        config: NodeConfig,
        storage: Storage,
        secret: bytes,
        app: Application,
        unproven: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.storage = storage
        # What the client writes mean (the chat): applied in the primary's batches.
        self.app = app
        self.metrics = metrics or Metrics()
        self._sync = self.metrics.timed(storage.sync)
        now = time.monotonic()
        self.core = ReplicaCore(
            config.node_id,
            tuple(p.node_id for p in config.nodes),
            timing_from(config),
            storage.node_state(),
            storage.position(),
            storage.sync_set(),
            now,
            storage.epoch_history(),
            incarnation=random.getrandbits(30),
            database=storage.database_id,
            unproven=unproven,
            first_log_seq=storage.first_log_seq(),
        )
        self.links = PeerLinks(config, secret, self._on_frame, self._on_link, self._on_operator)
        self.queue: deque[PendingWrite] = deque()
        self.work = asyncio.Event()
        self.waiters: list[Waiter] = []  # a heap
        self._order = 0
        self.streams: dict[int, Stream] = {}
        # The newest records, for streams to live backups without reading the log back.
        # Bounded in bytes: with group commit a record may hold hundreds of writes.
        self.tail: deque[LogRecord] = deque()
        self.tail_bytes = 0
        self.message_hooks: list[MessageHook] = []
        self.session_hooks: list[SessionHook] = []
        self.role_hooks: list[Callable[[Role], None]] = []
        self.proven_hooks: list[Callable[[], None]] = []
        self.damage_hooks: list[Callable[[str], None]] = []
        self.incoming_snapshot: tuple[Path, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._apply_buffer: list[LogRecord] = []
        self._apply_scheduled = False
        self._last_prune = now
        self.batches = 0
        self.writes = 0
        self.reads = 0
        self.closing = False
        self.sync_change: tuple[int, ...] | None = None
        # Deleted accounts may still have inbox messages to tombstone: checked once
        # on becoming primary, then after every account deletion.
        self.purge_due = False
        # Commits not yet reported durable: (group-sync ticket, position), in order.
        self.unsynced: deque[tuple[int, Position]] = deque()
        self.group_sync: GroupSync | None = None
        self.verifier = Verifier(
            config.node_id,
            config.verify_interval,
            storage.checksums_at,
            self._send,
            self.damaged,
            self._spawn,
        )
        if storage.deferred:
            self.group_sync = GroupSync(self._sync, self._on_durable, fatal)

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self.core.started(self._now())
        if self.group_sync is not None:
            self.group_sync.start()
        self.links.start()
        self._spawn(self._tick_loop())
        self._spawn(self._writer_loop())

    async def close(self) -> None:
        # Stop reacting first: closing our own links must not look, to the core, like
        # backups dying (a stopping primary would shrink its sync set to itself, then
        # restart believing it was the last to fail).
        self.closing = True
        await self.links.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.group_sync is not None:
            # Its last fsync finishes before storage closes under it.
            await asyncio.to_thread(self.group_sync.close)
        self._fail_all(Unavailable("the node is shutting down; retry"))

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, StorageCorrupt):
                self.damaged(str(exc))
            fatal(exc)

    # ---- what the server asks ---------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.core.role

    def primary_address(self) -> str | None:
        primary = self.core.primary
        for peer in self.config.nodes:
            if peer.node_id == primary:
                return peer.address
        return None

    def require_primary(self) -> None:
        if self.core.role is not Role.PRIMARY:
            if self.core.role is Role.BACKUP:
                raise NotPrimary(
                    f"node {self.config.node_id} is a backup", primary=self.primary_address()
                )
            raise NotPrimary(
                f"node {self.config.node_id} is electing: {self.core.reason}", primary=None
            )

    async def submit(
        self,
        op: str,
        args: dict[str, Any],
        token_hash: str | None,
        request_id: str,
        fingerprint: str | None = None,
    ) -> dict[str, Any]:
        """Run one write on the primary; returns once it is durable on the sync set."""
        self.require_primary()
        if self.core.fault is not None:
            raise StorageFault(
                f"node {self.config.node_id} cannot write: {self.core.fault}; retry later"
            )
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.queue.append(PendingWrite(op, args, token_hash, request_id, future, fingerprint))
        self.work.set()
        return await future

    async def read(self, query: Callable[[Db], T]) -> T:
        """Run a query on the primary and release it once nothing it saw is unacked (R7)."""
        self.require_primary()
        self.reads += 1
        result, seq = self.storage.read(query)
        await self.wait_acked(seq)
        return result

    async def wait_acked(self, seq: int) -> None:
        if self.core.acknowledged(seq, self._now()):
            return
        self.require_primary()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def fire(exc: ChatError | None) -> None:
            if future.done():
                return
            if exc is None:
                future.set_result(None)
            else:
                future.set_exception(exc)

        self._wait(seq, fire)
        await future

    def _wait(self, seq: int, fire: Callable[[ChatError | None], None]) -> None:
        self._order += 1
        heapq.heappush(self.waiters, Waiter(seq, self._order, fire))

    def status(self) -> dict[str, Any]:
        stats = self.core.statistics()
        addresses = {p.node_id: p.address for p in self.config.nodes}
        return {
            "id": self.config.node_id,
            "address": self.config.me.address,
            "role": stats["role"],
            "epoch": stats["epoch"],
            "seq": self.core.position.seq,
            "position": stats["position"],
            "primary": addresses.get(stats["primary"]) if stats["primary"] else None,
            "primary_id": stats["primary"],
            "sync_set": stats["sync_set"],
            "in_sync": stats["in_sync"],
            "watermark": stats["watermark"],
            "confirmed": stats["confirmed"],
            "waiting_for": stats["waiting_for"],
            "reason": stats["reason"],
            "database": stats["database"],
            "unproven": stats["unproven"],
            "lag": {str(k): v for k, v in stats["lag"].items()},
            "links": sorted(self.core.links),
            "checksums": None if self.verifier.last is None else self.verifier.last.to_status(),
            "batches": self.batches,
            "writes": self.writes,
        }

    # ---- the effect loop ---------------------------------------------------------------

    def _now(self) -> float:
        return time.monotonic()

    def _run(self, effects: list[Effect]) -> None:
        pending = deque(effects)
        while pending:
            effect = pending.popleft()
            try:
                more = self._carry_out(effect)
            except StorageFault as exc:
                # Persist failed (a vote, an epoch): what follows it (its sends) must
                # not happen. The core's view is ahead of the disk until it recovers,
                # when the recovery write persists it (_recover).
                self._fault(str(exc))
                return
            except StorageCorrupt as exc:
                self.damaged(str(exc))
            if more:
                pending.extendleft(reversed(more))

    # ---- storage faults ------------------------------------------------------------

    def _fault(self, why: str) -> StorageFault:
        """The disk refused a write: tell the core (it steps aside or stops applying)
        and try again with backoff until a write goes through. Returns the error
        that waiting writes get (retriable)."""
        first = self.core.fault is None
        self._run(self.core.on_storage_fault(self._now(), why))
        refusal = StorageFault(f"node {self.config.node_id} cannot write: {why}; retry later")
        if self.core.role is Role.PRIMARY:
            self._fail_queue(refusal)
        if first:
            self.metrics.storage_faults.inc()
            self._spawn(self._recover())
        return refusal

    def damaged(self, why: str) -> None:
        """SQLite found a damaged page: this node must neither lead nor ship its data.
        Marked for the next start (which moves the database aside and takes a
        snapshot), then out at once: a crash, as far as the others can tell."""
        for hook in self.damage_hooks:
            hook(why)
        log.critical(
            format_fields("database damaged, exiting", {"node": self.config.node_id, "why": why})
        )
        logging.shutdown()
        os._exit(71)

    async def _recover(self) -> None:
        delay, last_log = RECOVER_FIRST, self._now()
        while self.core.fault is not None:
            await asyncio.sleep(delay)
            try:
                # The vote and epoch the core holds, which a failed Persist may not
                # have written: the probe write doubles as their recovery.
                self.storage.probe_write(self.core.state)
            except StorageFault as exc:
                delay = min(delay * 2, RECOVER_MAX)
                if self._now() - last_log >= RECOVER_MAX:
                    last_log = self._now()
                    log.info(
                        format_fields(
                            "storage still failing",
                            {"node": self.config.node_id, "why": str(exc), "retry_in": delay},
                        )
                    )
                continue
            self._run(self.core.on_storage_recovered(self._now()))
            self.work.set()

    def _carry_out(self, effect: Effect) -> list[Effect]:
        if isinstance(effect, Send):
            self._send(effect.to, effect.message)
        elif isinstance(effect, Persist):
            self.storage.save_node_state(effect.state)
        elif isinstance(effect, Log):
            log.info(format_fields(effect.event, effect.fields))
            self.metrics.logged(effect.event)
        elif isinstance(effect, Acknowledge):
            self._release(effect.seq)
        elif isinstance(effect, BecomePrimary):
            return self._become_primary(effect)
        elif isinstance(effect, ChangeSyncSet):
            log.info(
                format_fields(
                    "sync set change proposed",
                    {
                        "node": self.config.node_id,
                        "members": ",".join(map(str, effect.members)),
                        "why": effect.reason,
                    },
                )
            )
            self._change_sync_set(effect.members)
        elif isinstance(effect, StepDown):
            self._step_down(effect.reason)
        elif isinstance(effect, StartStream):
            self._start_stream(effect)
        elif isinstance(effect, StopStream):
            self._stop_stream(effect.node)
        elif isinstance(effect, ApplyRecords):
            self._buffer_apply(effect.records)
        elif isinstance(effect, Rewind):
            return self._rewind(effect.to_seq)
        elif isinstance(effect, ExpectSnapshot):
            self._expect_snapshot()
        elif isinstance(effect, DatabaseProven):
            for hook in self.proven_hooks:
                hook()
        elif isinstance(effect, ReceiveSnapshot):
            return self._receive_snapshot(effect.chunk)
        elif isinstance(effect, AnswerVerify):
            primary = self.core.primary
            if primary is not None:
                self._spawn(self.verifier.answer(primary, effect.request))
        elif isinstance(effect, VerifyAnswered):
            self.verifier.on_reply(effect.node, effect.reply)
        elif isinstance(effect, Resynchronize):
            self.damaged(effect.why)
        return []

    def _send(self, peer: int, message: Message) -> bool:
        return self.links.send(peer, message.to_wire())

    # ---- inputs from peers and time ------------------------------------------------------

    def _on_frame(self, peer: int, frame: protocol.Frame) -> None:
        if self.closing:
            return
        # The edge: a malformed message raises ProtocolViolation here, and the peer
        # link closes (peer.py); the core only ever sees well-formed messages.
        message = from_wire(frame)
        try:
            self._run(self.core.on_message(self._now(), peer, message))
            if isinstance(message, Ack):
                stream = self.streams.get(peer)
                if stream is not None:
                    stream.wake.set()
        except StorageCorrupt as exc:
            self.damaged(str(exc))
        except StorageFault as exc:
            # A read the message needed failed (the log, the snapshot file).
            self._fault(str(exc))
        except Exception as exc:
            fatal(exc)

    def _verify_tick(self, now: float) -> None:
        core = self.core
        if core.role is not Role.PRIMARY:
            self.verifier.stop()
            return
        seq = core.position.seq
        members = core.in_sync
        quiet = (
            not self.queue
            and core.watermark == seq
            and all(core.backup_durable(m) == seq for m in members if m != self.config.node_id)
        )
        self.verifier.tick(now, core.epoch, seq, quiet, members)

    def _on_link(self, peer: int, up: bool, closed_by_us: bool) -> None:
        if peer == OPERATOR_ID or self.closing:
            return
        try:
            self._run(self.core.on_link(self._now(), peer, up, closed_by_us))
            if not up:
                self._stop_stream(peer)
        except Exception as exc:
            fatal(exc)

    def _on_operator(self, frame: protocol.Frame) -> OperatorAnswer:
        if frame.get("type") == "backup":
            return backup.frames(self.storage, self.config.data_dir, self.config.node_id)
        if frame.get("type") == "force_promote":
            self._run(self.core.force_promote(self._now()))
            return {"type": "reply", "request_id": None, "result": self.status()}
        if frame.get("type") == "status":
            return {"type": "reply", "request_id": None, "result": self.status()}
        return {
            "type": "error",
            "request_id": None,
            "code": "protocol",
            "message": "unknown operator command",
            "retriable": False,
        }

    async def _tick_loop(self) -> None:
        while True:
            now = self._now()
            self._run(self.core.tick(now))
            self._verify_tick(now)
            if now - self._last_prune > PRUNE_EVERY:
                self._last_prune = now
                with contextlib.suppress(StorageFault):
                    # A disk that refuses this refuses the write path too, which
                    # reports it; the log is pruned once it recovers.
                    self.storage.prune_log(self.config.log_retention)
                    self.core.on_log_pruned(self.storage.first_log_seq())
            await asyncio.sleep(TICK)

    # ---- primary: write path -----------------------------------------------------------

    def _become_primary(self, effect: BecomePrimary) -> list[Effect]:
        self._forget_tail()
        self.metrics.forget_sealed()
        self.purge_due = True
        for hook in self.role_hooks:
            hook(Role.PRIMARY)
        self._change_sync_set(effect.members)
        return []

    def _change_sync_set(self, members: tuple[int, ...]) -> None:
        """The writer loop seals the change in its next batch: it alone opens
        batches on the writer connection, and an effect may arrive mid-batch."""
        self.sync_change = members
        self.work.set()

    async def _writer_loop(self) -> None:
        while True:
            await self.work.wait()
            self.work.clear()
            while self.queue or self.sync_change is not None or self.purge_due:
                if self.core.role is not Role.PRIMARY:
                    self.sync_change = None
                    self.purge_due = False
                    self._fail_queue(
                        NotPrimary(
                            "this node is no longer the primary", primary=self.primary_address()
                        )
                    )
                    break
                if self.core.fault is not None:
                    # A primary whose disk refuses writes: a sync set change or a purge
                    # waits for the recovery (_recover sets ``work``), rather than
                    # failing again at once, round after round.
                    self._fail_queue(
                        StorageFault(
                            f"node {self.config.node_id} cannot write: {self.core.fault}; "
                            "retry later"
                        )
                    )
                    break
                items = [
                    self.queue.popleft() for _ in range(min(len(self.queue), self.config.max_batch))
                ]
                members, self.sync_change = self.sync_change, None
                self._write_batch(items, members)
                # A request needs a few loop turns from its socket to this queue (read,
                # decode, dispatch): give them, so the next batch groups every request
                # that arrived during this commit (group commit) instead of a few.
                for _ in range(YIELDS_BETWEEN_BATCHES):
                    await asyncio.sleep(0)

    def _write_batch(self, items: list[PendingWrite], members: tuple[int, ...] | None) -> None:
        """One SQLite transaction = one seq: the writes in ``items`` and/or a sync set.

        The record goes to the live backups once the local COMMIT returned (a commit
        without fsync: a write to the OS); the fsync comes later, in a group
        (``_committed``). A COMMIT the disk refuses (full, I/O error) thus never
        leaves a backup holding a record this node does not have: the batch is
        rolled back whole, its writes fail with a retriable error, and the seq
        stays free (``_fault``)."""
        now = self._now()
        epoch = self.core.epoch
        try:
            batch = self.storage.begin_batch()
            try:
                outcomes = self._execute(batch, items)
                self._prune_requests(batch, len(items))
                self._purge_inboxes(batch)
                sync_set = (
                    batch.set_sync_set(members, epoch, self.core.member_databases(members))
                    if members is not None
                    else None
                )
                record = batch.seal(epoch)
                if record is not None:
                    batch.commit()
                else:
                    batch.rollback()
            except BaseException:
                with contextlib.suppress(Exception):
                    batch.rollback()
                raise
        except StorageCorrupt as exc:
            self.damaged(str(exc))
        except StorageFault as exc:
            if members is not None and self.sync_change is None:
                self.sync_change = members  # proposed again once the disk recovers
            refusal = self._fault(str(exc))
            for item in items:
                if not item.future.done():
                    item.future.set_exception(copy.copy(refusal))
            return
        if record is None:
            seq = self.core.position.seq
        else:
            self._run(self.core.on_sealed(now, record.seq, sync_set))
            self.metrics.sealed(record.seq, len(items))
            self._broadcast(record)
            self._remember(record)
            self.batches += 1
            self.writes += len(items)
            seq = record.seq
        for item, outcome in outcomes:
            self._reply_after(seq, item, outcome)
        if record is not None:
            lone = len(items) <= 1 and not self.queue
            self._committed(Position(record.epoch, record.seq), lone=lone)

    def _committed(
        self,
        position: Position,
        sync_set: SyncSet | None = None,
        lone: bool = False,
        history: list[tuple[int, int]] | None = None,
    ) -> None:
        """Our database holds ``position``; it counts for acks once it is on disk.

        The fsync goes to the group sync thread, and the loop reads the next
        requests or records meanwhile. Only a ``lone`` commit (one write, nothing
        else waiting: a lightly loaded node) syncs right here, when no group fsync
        is under way: nothing would overlap it, and the hand-off to a thread and
        back would only add latency."""
        self.core.on_committed(position, sync_set, history)
        group = self.group_sync
        if group is not None and (not lone or group.busy):
            self.unsynced.append((group.request(), position))
            return
        if group is not None:
            if self._sync(checkpoint=False):
                group.request()  # the thread checkpoints
            self.unsynced.clear()  # all of them are on disk now
        self._run(self.core.on_local_durable(self._now(), position))

    def _on_durable(self, ticket: int) -> None:
        """The group sync put every commit up to ``ticket`` on disk."""
        position = None
        while self.unsynced and self.unsynced[0][0] <= ticket:
            position = self.unsynced.popleft()[1]
        if position is None or self.closing:
            return
        try:
            self._run(self.core.on_local_durable(self._now(), position))
        except Exception as exc:
            fatal(exc)

    def _forget_unsynced(self) -> None:
        """A rewind or a snapshot install replaced the log, durably: pending
        reports are about records that are gone."""
        self.unsynced.clear()

    def _execute(
        self, batch: Batch, items: list[PendingWrite]
    ) -> list[tuple[PendingWrite, dict[str, Any] | ChatError]]:
        outcomes: list[tuple[PendingWrite, dict[str, Any] | ChatError]] = []
        for index, item in enumerate(items):
            try:
                with batch.savepoint() as db:
                    result = self.app.apply_write(
                        db,
                        item.op,
                        item.args,
                        item.token_hash,
                        item.request_id,
                        time.time(),
                        item.fingerprint,
                    )
                    if batch.size() > RECORD_BUDGET:
                        raise RecordFull
                outcomes.append((item, result))
                if self.app.starts_purge(item.op):
                    self.purge_due = True
            except (StorageFault, StorageCorrupt):
                # The disk, not this request, failed: the whole batch is abandoned.
                raise
            except RecordFull:
                if index == 0:
                    outcomes.append((item, InvalidInput("this request is too large to replicate")))
                    continue
                # The rest waits for the next batch, first in line, in order.
                self.queue.extendleft(reversed(items[index:]))
                self.work.set()
                break
            except ChatError as exc:
                outcomes.append((item, exc))
            except Exception as exc:
                # A bug in one operation fails that request only; its savepoint
                # was rolled back, the rest of the batch goes on.
                log.exception("write failed op=%s", item.op)
                outcomes.append((item, Internal(f"internal error: {exc}")))
        return outcomes

    def _purge_inboxes(self, batch: Batch) -> None:
        """The work writes left, a bounded part per batch (``Application.purge``: the
        chat tombstones deleted accounts' inboxes)."""
        if not self.purge_due:
            return
        with batch.savepoint() as db:
            self.purge_due = self.app.purge(db, time.time())
        if self.purge_due:
            self.work.set()

    def _prune_requests(self, batch: Batch, writes: int) -> None:
        """Forget expired rows (the chat: request ids and ended sessions), twice as fast
        as this batch adds new ones."""
        with batch.savepoint() as db:
            self.app.prune(db, time.time(), 2 * writes + 1)

    def _reply_after(
        self, seq: int, item: PendingWrite, outcome: dict[str, Any] | ChatError
    ) -> None:
        def fire(exc: ChatError | None) -> None:
            if (
                exc is None
                and item.op == "send"
                and not isinstance(outcome, ChatError)
                and isinstance(outcome.get("message"), dict)
            ):
                # Pushed on acknowledgement even if the sender has gone away (its
                # client timed out): a listener must not miss an acknowledged message.
                for hook in self.message_hooks:
                    hook(int(outcome.get("recipient_id", -1)), outcome["message"])
            if (
                exc is None
                and item.op in protocol.SESSION_ENDING_OPS
                and not isinstance(outcome, ChatError)
            ):
                for session_hook in self.session_hooks:
                    session_hook(item.op, item.token_hash, outcome)
            if item.future.done():
                return
            if exc is not None:
                item.future.set_exception(exc)
            elif isinstance(outcome, ChatError):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)

        if self.core.acknowledged(seq, self._now()):
            fire(None)
        else:
            self._wait(seq, fire)

    def _release(self, watermark: int) -> None:
        self.metrics.acknowledged(watermark)
        while self.waiters and self.waiters[0].seq <= watermark:
            heapq.heappop(self.waiters).fire(None)

    def _fail_queue(self, exc: ChatError) -> None:
        while self.queue:
            item = self.queue.popleft()
            if not item.future.done():
                # A fresh exception per future: one instance raised in several tasks
                # would carry one task's traceback into another's.
                item.future.set_exception(copy.copy(exc))

    def _fail_all(self, exc: ChatError) -> None:
        self._fail_queue(exc)
        waiters, self.waiters = self.waiters, []
        for waiter in sorted(waiters):
            waiter.fire(copy.copy(exc))

    def _step_down(self, reason: str) -> None:
        log.info(
            format_fields(
                "stepped down",
                {"node": self.config.node_id, "epoch": self.core.epoch, "why": reason},
            )
        )
        # Writes not yet acknowledged may or may not survive: the client retries with
        # the same request id, and the new primary answers from what it holds.
        self._fail_all(
            Unavailable(
                "the primary changed before the write was acknowledged; "
                "retry with the same request id"
            )
        )
        for peer in list(self.streams):
            self._stop_stream(peer)
        for hook in self.role_hooks:
            hook(self.core.role)

    # ---- primary: streams to backups -------------------------------------------------------

    def _broadcast(self, record: LogRecord) -> None:
        wire = record_to_wire(record)
        for stream in self.streams.values():
            if stream.live and stream.next_seq == record.seq and self._in_window(stream):
                self._send(stream.peer, self.core.stream_header(stream.peer, [wire]))
                stream.next_seq += 1
            else:
                stream.live = False
                stream.wake.set()

    def _in_window(self, stream: Stream) -> bool:
        durable = self.core.backup_durable(stream.peer)
        return stream.next_seq - max(durable or 0, 0) <= WINDOW

    def _start_stream(self, effect: StartStream) -> None:
        self._stop_stream(effect.node)
        stream = Stream(effect.node, effect.after_seq + 1, effect.snapshot)
        self.streams[effect.node] = stream
        stream.task = self._spawn(self._stream_loop(stream))

    def _stop_stream(self, peer: int) -> None:
        stream = self.streams.pop(peer, None)
        if stream is not None and stream.task is not None:
            stream.task.cancel()

    def _remember(self, record: LogRecord) -> None:
        self.tail.append(record)
        self.tail_bytes += len(record.changeset)
        while self.tail_bytes > TAIL_BYTES and len(self.tail) > 1:
            self.tail_bytes -= len(self.tail.popleft().changeset)

    def _forget_tail(self) -> None:
        self.tail.clear()
        self.tail_bytes = 0

    def _records_from(self, seq: int, limit: int) -> list[LogRecord]:
        """Records from ``seq`` on: at most ``limit``, and about CHUNK_BYTES (at least one)."""
        if self.tail and self.tail[0].seq <= seq:
            start = seq - self.tail[0].seq
            records = [self.tail[i] for i in range(start, min(len(self.tail), start + limit))]
        else:
            records = self.storage.log_range(seq - 1, limit)
        size = 0
        for count, record in enumerate(records):
            size += len(record.changeset)
            if size > CHUNK_BYTES and count:
                return records[:count]
        return records

    async def _stream_loop(self, stream: Stream) -> None:
        try:
            await self._stream(stream)
        except (StorageFault, StorageCorrupt) as exc:
            # No room (or no sound file) for the snapshot this backup needs: drop the
            # link, so that it joins again and the snapshot is tried afresh.
            log.info(
                format_fields(
                    "stream to backup failed",
                    {"node": self.config.node_id, "backup": stream.peer, "why": str(exc)},
                )
            )
            link = self.links.links.get(stream.peer)
            if link is not None:
                link.close()
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
                log.info(
                    format_fields(
                        "log pruned past backup, sending snapshot",
                        {
                            "node": self.config.node_id,
                            "backup": stream.peer,
                            "needed": stream.next_seq,
                        },
                    )
                )
                await self._send_snapshot(stream)
                continue
            header = self.core.stream_header(stream.peer, [record_to_wire(r) for r in records])
            if not self._send(stream.peer, header):
                return
            stream.next_seq = records[-1].seq + 1
            await self.links.drain(stream.peer)

    async def _send_snapshot(self, stream: Stream) -> None:
        path = self.config.data_dir / f"snapshot-out-{stream.peer}.db"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        started = time.monotonic()
        position = self.storage.make_snapshot(path)
        damage = self.storage.check_file(path)
        if damage is not None:
            # The copy is of our own pages: never ship them (a backup would install
            # them and the damage would spread to every node).
            self.damaged(f"a snapshot of this database is damaged: {damage}")
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
                    chunk = Snapshot(self.core.epoch, position, offset, data, done)
                    if not self._send(stream.peer, chunk):
                        raise ConnectionError("link lost during the snapshot")
                    offset += len(data)
                    await self.links.drain(stream.peer)
                    if done:
                        break
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        stream.next_seq = position.seq + 1
        stream.snapshot = False
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

    # ---- backup: apply, rewind, snapshot ------------------------------------------------------

    def _buffer_apply(self, items: list[Any]) -> None:
        try:
            self._apply_buffer.extend(record_from_wire(item) for item in items)
        except (Diverged, ChatError) as exc:
            self._apply_buffer.clear()
            self._run(self.core.rejoin(self._now(), str(exc)))
            return
        if not self._apply_scheduled:
            # Records that arrived together are applied in one transaction: one fsync.
            self._apply_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_apply)

    def _flush_apply(self) -> None:
        try:
            self._apply_buffered()
        except Exception as exc:
            fatal(exc)

    def _apply_buffered(self) -> None:
        self._apply_scheduled = False
        records, self._apply_buffer = self._apply_buffer, []
        if self.core.role is not Role.BACKUP or not self.core.joined:
            return
        position = self.core.position
        records = [r for r in records if r.seq > position.seq]
        if not records:
            self._run(self.core.resend_ack(self._now()))
            return
        was_epoch = position.epoch
        try:
            new_position = self.storage.apply_records(records)
        except Diverged as exc:
            self._run(self.core.rejoin(self._now(), str(exc)))
            return
        except StorageFault as exc:
            # A full or failing disk is never a divergence: stop applying, no rewind.
            self._fault(str(exc))
            return
        except StorageCorrupt as exc:
            self.damaged(str(exc))
        # Records that began an epoch: the core's epoch history is storage's again.
        history = self.storage.epoch_history() if new_position.epoch != was_epoch else None
        self.metrics.applied_records.observe(len(records))
        lone = len(records) <= 1 and not self._apply_buffer
        self._committed(new_position, self.storage.sync_set(), lone=lone, history=history)

    def _rewind(self, to_seq: int) -> list[Effect]:
        position = self.storage.position()
        rollback = self.config.rollback_dir / f"rewind-{int(time.time() * 1000)}.jsonl"
        try:
            removed = self.storage.rewind(to_seq, rollback)
        except StorageFault as exc:
            self._fault(str(exc))
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
        self._forget_unsynced()
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
            self._now(),
            position,
            storage.sync_set(),
            storage.epoch_history(),
            storage.first_log_seq(),
        )

    def _request_snapshot(self) -> list[Effect]:
        self._forget_unsynced()
        return self.core.on_log_unusable(self._now(), "own log too short to rewind")

    def _expect_snapshot(self) -> None:
        path = self.config.data_dir / "snapshot-in.db"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
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

    def _receive_snapshot(self, chunk: Snapshot) -> list[Effect]:
        """One chunk of the snapshot the core expects from the current primary."""
        if self.incoming_snapshot is None:
            return []
        path, expected = self.incoming_snapshot
        if chunk.offset != expected:
            self.incoming_snapshot = None
            return self.core.rejoin(self._now(), "snapshot chunk out of order")
        data = chunk.data
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
                return self.core.rejoin(self._now(), "the snapshot received was damaged")
            position = self.storage.install_snapshot(path)
        except StorageFault as exc:
            self.incoming_snapshot = None
            self._fault(str(exc))
            return []
        finally:
            if self.incoming_snapshot is None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self._forget_tail()
        self._forget_unsynced()
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


def fatal(exc: BaseException | None) -> None:
    """A bug or a storage failure: this node cannot trust its in-memory state.

    It logs the cause and exits at once; supervisord restarts it, and it rejoins
    from what is durable on disk, which is what the replication rules are built on.
    """
    log.critical("fatal error, exiting error=%r", exc, exc_info=exc)
    logging.shutdown()
    os._exit(70)
