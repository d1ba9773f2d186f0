"""The primary's write path (R2, R7): batches, group commit, and the replies' waiters.

Client writes queue up while the previous batch runs, each account's in a line
of its own (``fairqueue.py``); the writer takes them, in turns between the lines
and up to ``max_batch`` (or ``BATCH_BYTES`` of changeset), into one SQLite
transaction, each in its own
savepoint (but the ops that need none: ``Application.unguarded_bound``),
applies each through the ``Application`` (the chat), seals one
record (one seq), commits without syncing, sends the record to every backup
streaming live, and hands durability to the group sync (``durability.py``).
Replies wait until the core releases a watermark (``Acknowledge``: every member
of the ack set durable, this node included) that reaches their seq. The writer
waits neither for the disk nor for acknowledgements before the next batch:
records are pipelined, made durable in groups, and acknowledged in order.
Reads are served from the primary's database and released, like writes, only
when the watermark covers every seq they could have seen.

Everything that touches the database runs on the event loop thread: a batch is
one synchronous stretch from BEGIN to COMMIT, so reads never see a batch half
done and the writer connection is never shared across threads.

Invariants: ``waiters`` is a heap by seq, each fired exactly once (acknowledged,
or failed when the node steps down or stops); a write's outcome is given only by
its batch's waiter (``PendingWrite.finish``, once), so no reply goes out before its
record is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import heapq
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .. import protocol
from ..config import NodeConfig
from ..errors import (
    Busy,
    ChatError,
    Internal,
    InvalidInput,
    NotPrimary,
    StorageCorrupt,
    StorageFault,
)
from ..metrics import Metrics
from ..storage import Batch, Db, Storage
from ..throttle import ThrottledLog
from ..writerate import WriteRate, told
from .app import Application, RateKind
from .durability import Durability
from .fairqueue import FairQueue, QueueFull
from .shell import Shell, log
from .state import ReplicaCore
from .streams import Streams
from .types import Position, Role

# No record's changeset grows past this: the writer ends a batch before an operation
# would take it further (that operation goes first into the next batch), and an
# operation too large alone is refused. Even in base64 (a version 1 peer link) and
# with a catch-up frame's other records (streams.CHUNK_BYTES) a frame stays far
# below the peer frame limit, so a backup can always take what the primary sends
# (a record too large for the stream would stop replication for good).
RECORD_BUDGET = 2 * 1024 * 1024
# A batch ends once its changeset has passed this (the rest of the queue goes into
# the next one). A batch is one stretch of the event loop: 128 of the largest sends
# filled the record budget, and executing them, sending the record to two backups and
# answering them held the primary's loop for 0.12-0.19 s of CPU a turn, twice that
# on a busy machine: heartbeats late by a third of the suspect timeout and more. The
# usual writes (hundreds of bytes each) never come near it: max_batch ends theirs.
BATCH_BYTES = RECORD_BUDGET // 4
YIELDS_BETWEEN_BATCHES = 3
# Writes waiting for a batch, at most this many batches' worth (max_batch each):
# past it a write of the account with the most waiting is refused with busy
# (fairqueue.py), so that clients pipelining writes on many connections (256
# each) cannot hold the primary's memory without bound, nor the queue against
# other users.
QUEUED_BATCHES = 8
QUEUE_FULL_RETRY = 0.1  # seconds: a few batches
# Reads waiting for their turn (one query per turn of the loop), at most this many:
# past it a read of the account with the most waiting is refused with busy. Each
# holds a task: a hundred connections of one account with 256 reads each put
# 25,600 in line.
QUEUED_READS = 4096
PRUNE_INTERVAL = 0.5  # seconds

MessageHook = Callable[[int, dict[str, Any]], None]
# (op, token hash, result) of an acknowledged write that ended sessions.
SessionHook = Callable[[str, str | None, dict[str, Any]], None]
T = TypeVar("T")
# A write as the queue hands it out: with its key (its account's line).
Queued = tuple[Hashable, "PendingWrite"]


class RecordFull(Exception):
    """An operation would take the batch's record past RECORD_BUDGET."""


# What became of one write: its result, or the error its client gets.
Outcome = dict[str, Any] | ChatError
Done = Callable[[Outcome], None]


@dataclass
class PendingWrite:
    op: str
    args: dict[str, Any]
    token_hash: str | None
    request_id: str
    # Called once with the outcome (``finish``): the server's reply to its client, or
    # the future of ``submit``. A callback, not a future: the server answers a write
    # without a task of its own per request.
    done: Done
    # The client's request, when the server wrote other args for it (Application.apply_write).
    fingerprint: str | None = None
    finished: bool = False
    # The account's rate it took a token of, and the account: given back if the
    # write is taken out of the full queue for another account's.
    rate: WriteRate | None = None
    rate_key: Hashable = None

    def finish(self, outcome: Outcome) -> None:
        if self.finished:
            return
        self.finished = True
        try:
            self.done(outcome)
        except Exception:
            # The callback runs inside the writer's release of a whole batch: a reply
            # that cannot be sent must not keep the batch's other writes unanswered.
            log.exception("answering a write failed op=%s", self.op)


@dataclass(order=True)
class Waiter:
    """Something to do once ``seq`` is acknowledged (``None``) or never will be."""

    seq: int
    order: int
    fire: Callable[[ChatError | None], None] = field(compare=False)


class WritePath:
    def __init__(
        self,
        shell: Shell,
        config: NodeConfig,
        core: ReplicaCore,
        storage: Storage,
        app: Application,
        durability: Durability,
        streams: Streams,
        metrics: Metrics,
    ) -> None:
        self.shell = shell
        self.config = config
        self.core = core
        self.storage = storage
        # What the client writes mean (the chat): applied in the primary's batches.
        self.app = app
        self.durability = durability
        self.streams = streams
        self.metrics = metrics
        # Writes waiting for a batch, in turns between accounts (fairqueue.py).
        self.queue: FairQueue[PendingWrite] = FairQueue(QUEUED_BATCHES * config.max_batch)
        self.work = asyncio.Event()
        self.waiters: list[Waiter] = []  # a heap
        self._order = 0
        self.message_hooks: list[MessageHook] = []
        self.session_hooks: list[SessionHook] = []
        self.sync_change: tuple[int, ...] | None = None
        # Deleted accounts may still have inbox messages to tombstone: checked once
        # on becoming primary, then after every account deletion.
        self.purge_due = False
        # Writes since the last prune, and when that was (``_prune_requests``).
        self._unpruned = 0
        self._pruned_at = float("-inf")
        self.batches = 0
        self.writes = 0
        self.reads = 0
        self.reign = 0  # times this node became primary (a scan's steps must share one)
        self.writes_refused_busy = 0  # writes refused because the queue was full
        self.reads_refused_busy = 0  # and reads, because their line was
        # Each account's sends, at most send_rate a second, and its other writes, at
        # most write_rate (writerate.py); a line now and then naming who was slowed.
        self.send_rate = WriteRate(config.send_rate, config.send_burst, time.monotonic)
        self.write_rate = WriteRate(config.write_rate, config.write_burst, time.monotonic)
        self._rates: dict[RateKind, WriteRate] = {
            "send": self.send_rate,
            "write": self.write_rate,
        }
        self._too_fast_log = {
            kind: ThrottledLog(
                log,
                logging.WARNING,
                f"{kind} refused: account past {kind}_rate",
                config.log_interval,
            )
            for kind in ("send", "write")
        }
        # Reads waiting for their turn, one query per turn of the loop (``read``), in
        # turns between accounts; the callback that gives the next turn, if due.
        self.read_line: FairQueue[asyncio.Future[None]] = FairQueue(QUEUED_READS)
        self._read_turn: asyncio.Handle | None = None

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

    def enqueue(
        self,
        op: str,
        args: dict[str, Any],
        token_hash: str | None,
        request_id: str,
        done: Done,
        fingerprint: str | None = None,
        rated: bool = True,
    ) -> None:
        """Queue one write on the primary; ``done`` gets its outcome once it is durable
        on the sync set (or its refusal). Raises at once, calling nothing, if this node
        cannot take writes now. ``rated``: counted against its account's rate (not
        the writes the server makes for a read, bounded by what there is to mark)."""
        self.require_primary()
        if self.core.fault is not None:
            raise StorageFault(
                f"node {self.config.node_id} cannot write: {self.core.fault}; retry later"
            )
        write = PendingWrite(op, args, token_hash, request_id, done, fingerprint)
        key = self.app.share_key(self.storage.reader, token_hash)
        kind = self.app.rate_kind(op, key) if rated else None
        if kind is not None:
            rate = self._rates[kind]
            if (wait := rate.take(key)) > 0:
                raise self._too_fast(kind, op, key, wait)
            write.rate, write.rate_key = rate, key
        try:
            evicted = self.queue.push(key, write)
        except QueueFull:
            if write.rate is not None:
                write.rate.give_back(key)
            raise self._queue_full() from None
        if evicted is not None:
            # Its account did not get that write: it keeps its token.
            if evicted.rate is not None:
                evicted.rate.give_back(evicted.rate_key)
            evicted.finish(self._queue_full())
        self.work.set()

    def _too_fast(self, kind: RateKind, op: str, key: Hashable, wait: float) -> Busy:
        wait = told(wait)
        config = self.config
        if kind == "send":
            self._too_fast_log[kind].note(node=config.node_id, user_id=key)
            does = "sends"
            allowed = f"{config.send_rate:g} messages a second, {config.send_burst} at once"
        else:
            self._too_fast_log[kind].note(node=config.node_id, user_id=key, op=op)
            does = "writes"
            allowed = (
                f"{config.write_rate:g} writes a second besides its sends, "
                f"{config.write_burst} at once"
            )
        return Busy(
            f"this account {does} faster than node {config.node_id} allows ({allowed}: "
            f"{kind}_rate, {kind}_burst); retry in {wait:.2f} s",
            retry_after=wait,
        )

    def _queue_full(self) -> Busy:
        self.writes_refused_busy += 1
        return Busy(
            f"node {self.config.node_id} has {len(self.queue)} writes waiting for a "
            "batch, the most it queues, and this account's are among the most of them; "
            "retry in a moment",
            retry_after=QUEUE_FULL_RETRY,
        )

    async def submit(
        self,
        op: str,
        args: dict[str, Any],
        token_hash: str | None,
        request_id: str,
        fingerprint: str | None = None,
        rated: bool = True,
    ) -> dict[str, Any]:
        """``enqueue`` for a coroutine: returns the result, raises the refusal."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def done(outcome: Outcome) -> None:
            if future.done():
                return
            if isinstance(outcome, ChatError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        self.enqueue(op, args, token_hash, request_id, done, fingerprint, rated)
        return await future

    async def read_seen(
        self, query: Callable[[Db], T], token_hash: str | None, account: Hashable = None
    ) -> tuple[T, int]:
        """Run a query on the primary; its result and the newest seq it may have seen,
        which the caller releases nothing of before it is acknowledged (``wait_acked``,
        R7). A scan of many queries waits once, at its end, for the newest of them.

        One query per turn of the event loop: a read of the largest page (1,000
        messages of 4,000 characters) takes milliseconds of the loop, and fifty
        connections of one user asking for such pages at once ran fifty of them
        in one turn, again and again: the primary sent no heartbeat for longer
        than ``suspect_timeout`` and the backups elected another. Each read waits
        in its account's line (``read_line``) for a turn of its own, after the
        loop turned (timers, heartbeats, acks): the lines take turns, so one
        account's thousands of reads delay another's by one query each.
        ``account``: the line to wait in, when the read has no session of it yet
        (a login's count)."""
        self.require_primary()
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if account is None:
            account = self.app.share_key(self.storage.reader, token_hash)
        try:
            evicted = self.read_line.push(account, turn)
        except QueueFull:
            raise self._reads_full() from None
        if evicted is not None and not evicted.done():
            evicted.set_exception(self._reads_full())
        self._next_read_turn()
        await turn
        self.require_primary()
        self.reads += 1
        return self.storage.read(query)

    def _next_read_turn(self) -> None:
        if self._read_turn is None and self.read_line:
            self._read_turn = asyncio.get_running_loop().call_soon(self._give_read_turn)

    def _give_read_turn(self) -> None:
        """The first read in turn whose client still waits runs its query in the next
        turn of the loop (its task wakes then); the next one, the turn after."""
        self._read_turn = None
        while self.read_line:
            ((_, turn),) = self.read_line.take(1)
            if not turn.done():  # a cancelled one: its connection closed
                turn.set_result(None)
                break
        self._next_read_turn()

    def _reads_full(self) -> Busy:
        self.reads_refused_busy += 1
        return Busy(
            f"node {self.config.node_id} has {len(self.read_line)} reads waiting for their "
            "turn, the most it queues, and this account's are among the most of them; "
            "retry in a moment",
            retry_after=QUEUE_FULL_RETRY,
        )

    async def wait_acked(self, seq: int) -> None:
        if self.core.acknowledged(seq, self.shell.now()):
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

    def become_primary(self, members: tuple[int, ...]) -> None:
        """The first batch of a new reign seals its sync set; writes left behind by
        an earlier reign (deleted accounts' inboxes) are looked for once."""
        self.reign += 1
        self.metrics.forget_sealed()
        self.app.reset()
        self.purge_due = True
        self.change_sync_set(members)

    def change_sync_set(self, members: tuple[int, ...]) -> None:
        """The writer loop seals the change in its next batch: it alone opens
        batches on the writer connection, and an effect may arrive mid-batch."""
        self.sync_change = members
        self.work.set()

    async def run(self) -> None:
        while True:
            await self.work.wait()
            self.work.clear()
            while self.queue or self.sync_change is not None or self.purge_due:
                if self.core.role is not Role.PRIMARY:
                    self.sync_change = None
                    self.purge_due = False
                    self.fail_queue(
                        NotPrimary(
                            "this node is no longer the primary", primary=self.primary_address()
                        )
                    )
                    break
                if self.core.fault is not None:
                    # A primary whose disk refuses writes: a sync set change or a purge
                    # waits for the recovery (_recover sets ``work``), rather than
                    # failing again at once, round after round.
                    self.fail_queue(
                        StorageFault(
                            f"node {self.config.node_id} cannot write: {self.core.fault}; "
                            "retry later"
                        )
                    )
                    break
                items = self.queue.take(self.config.max_batch)
                members, self.sync_change = self.sync_change, None
                self._write_batch(items, members)
                # A request needs a few loop turns from its socket to this queue (read,
                # decode, dispatch): give them, so the next batch groups every request
                # that arrived during this commit (group commit) instead of a few.
                for _ in range(YIELDS_BETWEEN_BATCHES):
                    await asyncio.sleep(0)

    def _write_batch(self, items: list[Queued], members: tuple[int, ...] | None) -> None:
        """One SQLite transaction = one seq: the writes in ``items`` (each with its
        queue key, to be put back by) and/or a sync set.

        The record goes to the live backups once the local COMMIT returned (a commit
        without fsync: a write to the OS); the fsync comes later, in a group
        (``_committed``). A COMMIT the disk refuses (full, I/O error) thus never
        leaves a backup holding a record this node does not have: the batch is
        rolled back whole, its writes fail with a retriable error, and the seq
        stays free (``_fault``)."""
        now = self.shell.now()
        epoch = self.core.epoch
        # The writes this batch holds: those a full batch put back in the queue are
        # the next one's (answered there, never here too).
        taken = [item for _, item in items]
        try:
            batch = self.storage.begin_batch()
            try:
                outcomes = self._execute(batch, items)
                taken = [item for item, _ in outcomes]
                self._prune_requests(batch, len(taken))
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
                    self.app.forget_reads()
                    batch.rollback()
            except BaseException:
                # What the application read in this batch is undone with it, and the
                # purge it did: looked for again once the disk lets it (a batch that
                # ended a purge would otherwise leave its last tombstones undone).
                self.app.reset()
                self.purge_due = True
                with contextlib.suppress(Exception):
                    batch.rollback()
                raise
        except StorageCorrupt as exc:
            self.shell.damaged(str(exc))
        except StorageFault as exc:
            if members is not None and self.sync_change is None:
                self.sync_change = members  # proposed again once the disk recovers
            refusal = self.shell.fault(str(exc))
            for item in taken:
                item.finish(copy.copy(refusal))
            return
        if record is None:
            seq = self.core.position.seq
        else:
            self.shell.run(self.core.on_sealed(now, record.seq, sync_set))
            self.metrics.sealed(record.seq, len(taken))
            self.streams.broadcast(record)
            self.streams.remember(record)
            self.batches += 1
            self.writes += len(taken)
            seq = record.seq
        if outcomes:
            self._reply_after(seq, outcomes)
        if record is not None:
            lone = self.durability.is_lone(len(taken), len(record.changeset), bool(self.queue))
            self.durability.committed(Position(record.epoch, record.seq), lone=lone)

    def _execute(self, batch: Batch, items: list[Queued]) -> list[tuple[PendingWrite, Outcome]]:
        outcomes: list[tuple[PendingWrite, Outcome]] = []
        for index, (_, item) in enumerate(items):
            try:
                bound = self.app.unguarded_bound(item.op)
                if bound is None:
                    with batch.savepoint() as db:
                        result = self._apply(db, item)
                        if batch.size() > RECORD_BUDGET:
                            raise RecordFull
                else:
                    # Nothing to undo if it refuses (app.py): no savepoint, and the
                    # record's budget is checked before, not after.
                    if index and batch.size() + bound > RECORD_BUDGET:
                        raise RecordFull
                    result = self._apply(batch.db, item)
                outcomes.append((item, result))
                if self.app.starts_purge(item.op):
                    self.purge_due = True
                if batch.size() > BATCH_BYTES and index + 1 < len(items):
                    # Full enough: the rest goes back to the front of their lines.
                    self.queue.put_back(items[index + 1 :])
                    self.work.set()
                    break
            except (StorageFault, StorageCorrupt):
                # The disk, not this request, failed: the whole batch is abandoned.
                raise
            except RecordFull:
                if index == 0:
                    outcomes.append((item, InvalidInput("this request is too large to replicate")))
                    continue
                # The rest waits for the next batch, first in their lines, in order.
                self.queue.put_back(items[index:])
                self.work.set()
                break
            except ChatError as exc:
                outcomes.append((item, exc))
            except Exception as exc:
                # A bug in one operation fails that request only; its savepoint
                # was rolled back (an unguarded op's changes stay: app.py), the
                # rest of the batch goes on.
                log.exception("write failed op=%s", item.op)
                outcomes.append((item, Internal(f"internal error: {exc}")))
        return outcomes

    def _apply(self, db: Db, item: PendingWrite) -> dict[str, Any]:
        return self.app.apply_write(
            db,
            item.op,
            item.args,
            item.token_hash,
            item.request_id,
            time.time(),
            item.fingerprint,
        )

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
        as the writes add new ones: every ``PRUNE_INTERVAL``, not in every batch (its
        queries and the pages they touch would cost each small batch as much as a
        write)."""
        self._unpruned += writes
        now = time.monotonic()
        if now - self._pruned_at < PRUNE_INTERVAL:
            return
        with batch.savepoint() as db:
            self.app.prune(db, time.time(), 2 * self._unpruned + 1)
        self._pruned_at, self._unpruned = now, 0

    def _reply_after(self, seq: int, outcomes: list[tuple[PendingWrite, Outcome]]) -> None:
        """The batch's replies, once ``seq`` is acknowledged: one waiter for them all."""

        def fire(exc: ChatError | None) -> None:
            for item, outcome in outcomes:
                if exc is None and not isinstance(outcome, ChatError):
                    self._acknowledged(item, outcome)
                item.finish(outcome if exc is None else copy.copy(exc))

        if self.core.acknowledged(seq, self.shell.now()):
            fire(None)
        else:
            self._wait(seq, fire)

    def _acknowledged(self, item: PendingWrite, result: dict[str, Any]) -> None:
        if item.op == "send" and isinstance(result.get("message"), dict):
            # Pushed on acknowledgement even if the sender has gone away (its
            # client timed out): a listener must not miss an acknowledged message.
            for hook in self.message_hooks:
                hook(int(result.get("recipient_id", -1)), result["message"])
        elif item.op in protocol.SESSION_ENDING_OPS:
            for session_hook in self.session_hooks:
                session_hook(item.op, item.token_hash, result)

    def release(self, watermark: int) -> None:
        self.metrics.acknowledged(watermark)
        while self.waiters and self.waiters[0].seq <= watermark:
            heapq.heappop(self.waiters).fire(None)

    def release_acknowledged(self) -> None:
        """Answer the waiters whose seq is acknowledged already. Scenario: etcd slow,
        the primary's renewals late; its fencing deadline passes with every write
        acknowledged, and a read asked then waits (E2). A renewal lets the node
        serve again, but nothing moves the watermark (``release``) until the next
        write: on a quiet cluster the read would wait for that. Called after each
        arbiter event."""
        now = self.shell.now()
        while self.waiters and self.core.acknowledged(self.waiters[0].seq, now):
            heapq.heappop(self.waiters).fire(None)

    def fail_queue(self, exc: ChatError) -> None:
        for write in self.queue.drain():
            # A fresh exception per write: one instance raised in several tasks
            # would carry one task's traceback into another's.
            write.finish(copy.copy(exc))

    def fail_all(self, exc: ChatError) -> None:
        self.fail_queue(exc)
        waiters, self.waiters = self.waiters, []
        for waiter in sorted(waiters):
            waiter.fire(copy.copy(exc))
