"""The replication runtime: the asyncio shell that carries out the core's effects.

The core (``state.py``) decides; the runtime does, and feeds every outcome back
into the core as an input. This module is the dispatcher: it builds the core
and the parts that each do one job, turns peer frames, link changes, operator
commands and the passing of time into the core's inputs, and carries out the
effects the core returns, *in order* (persist before send, seal before
broadcast):

- ``writer.py``: the primary's write path (batches, group commit) and the
  waiters that release replies and reads once acknowledged (R2, R7);
- ``streams.py``: the primary's streams to backups, catch-up and snapshots sent;
- ``follower.py``: a backup's apply, rewind and snapshot install (R4);
- ``durability.py``: the group fsync's reports, which make commits count;
- ``verify.py``: the cross-node checksum rounds.

Storage failures have one path each: a disk that refuses a write (full,
read-only, I/O error) is a *fault*, reported to the core and retried with
backoff until a write goes through; a damaged page is *damage*: the node marks
its database and exits, as a crash would look to the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

from .. import backup, protocol
from ..config import NodeConfig
from ..errors import StorageCorrupt, StorageFault, Unavailable
from ..logline import format_fields
from ..metrics import Metrics
from ..peer import OPERATOR_ID, OperatorAnswer, PeerLinks
from ..storage import Db, Storage, copy_room
from .app import Application
from .arbiter import ArbiterEvent
from .durability import Durability
from .effects import (
    IN_STEP_WITH_ROLE,
    Acknowledge,
    AnswerVerify,
    ApplyRecords,
    BecomePrimary,
    ChangeSyncSet,
    ClaimLeader,
    DatabaseProven,
    Effect,
    ExpectSnapshot,
    Log,
    Persist,
    ReceiveSnapshot,
    ReleaseLeader,
    RestoreSettled,
    Resynchronize,
    Rewind,
    Send,
    StartStream,
    StepDown,
    StopStream,
    StoreSyncSet,
    VerifyAnswered,
)
from .follower import Follower
from .leased import LeasedArbiter
from .messages import Ack, Message, from_wire
from .shell import log, log_event
from .state import ReplicaCore, Timing
from .streams import Streams
from .types import Role
from .verify import Verifier
from .writer import Done, MessageHook, SessionHook, WritePath

if TYPE_CHECKING:
    from .etcd_io import EtcdIO

# A node whose disk refused a write tries again after this, doubling up to the max.
RECOVER_FIRST = 0.2
RECOVER_MAX = 10.0
# Waiting for room (a snapshot this node has no room for) polls the free space,
# a system call: often enough that the snapshot comes soon after room is made.
ROOM_RETRY = 2.0
TICK = 0.02
PRUNE_EVERY = 5.0
# The most changeset bytes one tick prunes from the log (some 12 ms of deletes):
# what is left goes in the ticks after.
PRUNE_STEP_BYTES = 4 * 1024 * 1024
T = TypeVar("T")


def timing_from(config: NodeConfig) -> Timing:
    return Timing(
        heartbeat_interval=config.heartbeat_interval,
        suspect_timeout=config.suspect_timeout,
        election_timeout=config.election_timeout,
        sync_timeout=config.sync_timeout,
        confirm_window=config.confirm_window,
        clock_gap=config.clock_gap,
    )


def _etcd_io(
    config: NodeConfig, core: ReplicaCore, on_result: Callable[[ArbiterEvent], None]
) -> EtcdIO:
    """The etcd arbiter's I/O. Its client (etcd3gw over requests) is a sixth of what a
    node imports at start (80 of 510 ms here): it is loaded only by nodes that use it."""
    from .etcd_io import EtcdIO, EtcdSettings

    settings = EtcdSettings(
        config.etcd_addresses,
        config.etcd_prefix,
        config.etcd_ca or None,
        config.etcd_cert or None,
        config.etcd_key or None,
        config.me.host,
    )
    return EtcdIO(settings, config.lease_timing, core, on_result)


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
        self.metrics = metrics or Metrics()
        now = time.monotonic()
        arbiter = LeasedArbiter(config.lease_timing) if config.arbiter == "etcd" else None
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
            arbiter=arbiter,
            restored=storage.restored,
        )
        # SPEC section 10: the leader key and the sync set live in etcd.
        self.etcd = None if arbiter is None else _etcd_io(config, self.core, self._on_arbiter)
        self.links = PeerLinks(config, secret, self._on_frame, self._on_link, self._on_operator)
        self.durability = Durability(
            self, self.core, self.metrics.timed(storage.sync), storage.deferred, fatal
        )
        self.verifier = Verifier(
            config.node_id,
            config.verify_interval,
            storage.checksums_at,
            self.send,
            self.damaged,
            self.spawn,
        )
        self.streams = Streams(
            self,
            config,
            self.core,
            storage,
            self.links,
            self.metrics,
            self.verifier.snapshot_sent,
        )
        self.writer = WritePath(
            self, config, self.core, storage, app, self.durability, self.streams, self.metrics
        )
        self.follower = Follower(
            self,
            config,
            self.core,
            storage,
            self.durability,
            self.metrics,
            self.streams.forget_tail,
            fatal,
            self.links.set_reading,
        )
        # Told of acknowledged sends and of writes that ended sessions (the server's
        # pushes and stream closes): the write path's lists, shared.
        self.message_hooks: list[MessageHook] = self.writer.message_hooks
        self.session_hooks: list[SessionHook] = self.writer.session_hooks
        self.role_hooks: list[Callable[[Role], None]] = []
        self.proven_hooks: list[Callable[[], None]] = []
        self.damage_hooks: list[Callable[[str], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_prune = now
        self._prune_more = False  # the last prune was a part: the next tick prunes on
        self.closing = False

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self.core.started(self.now())
        self.durability.start()
        self.links.start()
        self.spawn(self._tick_loop())
        self.spawn(self.writer.run())
        if self.etcd is not None:
            self.spawn(self.etcd.run_lease())
            self.spawn(self.etcd.run_view())

    async def close(self) -> None:
        # Stop reacting first: closing our own links must not look, to the core, like
        # backups dying (a stopping primary would shrink its sync set to itself, then
        # restart believing it was the last to fail).
        self.closing = True
        self.follower.close()
        await self.links.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.etcd is not None:
            # Our lease goes, and the leader key with it: another member takes over
            # at once rather than after the lease's TTL.
            await self.etcd.close()
        await self.durability.close()
        self.writer.fail_all(Unavailable("the node is shutting down; retry"))

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
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

    @property
    def batches(self) -> int:
        return self.writer.batches

    @property
    def writes(self) -> int:
        return self.writer.writes

    @property
    def reads(self) -> int:
        return self.writer.reads

    def primary_address(self) -> str | None:
        return self.writer.primary_address()

    def require_primary(self) -> None:
        self.writer.require_primary()

    def enqueue(
        self,
        op: str,
        args: dict[str, Any],
        token_hash: str | None,
        request_id: str,
        done: Done,
        fingerprint: str | None = None,
    ) -> None:
        """Queue one write on the primary; ``done`` gets its result or refusal once it
        is durable on the sync set."""
        self.writer.enqueue(op, args, token_hash, request_id, done, fingerprint)

    async def submit(
        self,
        op: str,
        args: dict[str, Any],
        token_hash: str | None,
        request_id: str,
        fingerprint: str | None = None,
        rated: bool = True,
    ) -> dict[str, Any]:
        """Run one write on the primary; returns once it is durable on the sync set.
        ``rated``: counted against its account's rate (``WritePath.enqueue``)."""
        return await self.writer.submit(op, args, token_hash, request_id, fingerprint, rated)

    async def read_seen(
        self, query: Callable[[Db], T], token_hash: str | None, account: Hashable = None
    ) -> tuple[T, int]:
        """Run a query on the primary: the result and the newest seq it may have seen,
        which the caller must see acknowledged (``wait_acked``, R7) before it shows
        it. ``token_hash``'s account (or ``account``) waits in a line of its own for
        the query's turn."""
        return await self.writer.read_seen(query, token_hash, account)

    def reign(self) -> int:
        """How many times this node has become primary: a read of several turns that
        sees it change has lost what it saw (``WritePath.reign``)."""
        return self.writer.reign

    async def wait_acked(self, seq: int) -> None:
        await self.writer.wait_acked(seq)

    def status(self) -> dict[str, Any]:
        stats = self.core.statistics()
        addresses = {p.node_id: p.address for p in self.config.nodes}
        status = {
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
            "snapshot_waits": {str(k): v for k, v in sorted(self.streams.snapshot_waits.items())},
            "links": sorted(self.core.links),
            "checksums": None if self.verifier.last is None else self.verifier.last.to_status(),
            "batches": self.writer.batches,
            "writes": self.writer.writes,
        }
        if "arbiter" in stats:
            status["arbiter"] = stats["arbiter"]
        return status

    # ---- the effect loop ---------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic()

    def run(self, effects: list[Effect]) -> None:
        pending = deque(effects)
        refused: StorageFault | None = None
        while pending:
            effect = pending.popleft()
            if refused is not None and not isinstance(effect, IN_STEP_WITH_ROLE):
                continue
            try:
                more = self._carry_out(effect)
            except StorageFault as exc:
                # Persist failed (a vote, an epoch): what follows it and tells the
                # world (its sends, a claim, a stream) must not happen, but the
                # writer and server must still follow the role the core took (a
                # promotion, a step-down) or they disagree with it for good. The
                # core's view is ahead of the disk until it recovers, when the
                # recovery write persists it (_recover), before any batch.
                refused = refused or exc
                continue
            except StorageCorrupt as exc:
                self.damaged(str(exc))
            if more:
                pending.extendleft(reversed(more))
        if refused is not None:
            self.fault(str(refused))

    def _carry_out(self, effect: Effect) -> list[Effect]:
        match effect:
            case Send(to=peer, message=message):
                self.send(peer, message)
            case Persist(state=state):
                self.storage.save_node_state(state)
            case Log(event=event, fields=fields):
                log_event(event, fields)
                self.metrics.logged(event)
            case Acknowledge(seq=seq):
                self.writer.release(seq)
            case BecomePrimary(members=members):
                self.streams.forget_tail()
                self.writer.become_primary(members)
                for hook in self.role_hooks:
                    hook(Role.PRIMARY)
            case ChangeSyncSet(members=members, reason=reason):
                log_event(
                    "sync set change proposed",
                    {
                        "node": self.config.node_id,
                        "members": ",".join(map(str, members)),
                        "why": reason,
                    },
                )
                self.writer.change_sync_set(members)
            case StepDown(reason=reason):
                self._step_down(reason)
            case StartStream():
                self.streams.start(effect)
            case StopStream(node=peer):
                self.streams.stop(peer)
            case ApplyRecords(records=records):
                self.follower.buffer(records)
            case Rewind(to_seq=to_seq):
                return self.follower.rewind(to_seq)
            case ExpectSnapshot():
                self.follower.expect_snapshot()
            case ReceiveSnapshot(chunk=chunk):
                return self.follower.receive_snapshot(chunk)
            case DatabaseProven():
                for proven in self.proven_hooks:
                    proven()
            case RestoreSettled():
                try:
                    self.storage.clear_restored()
                except StorageFault as exc:
                    # The mark stays on disk: after a restart the node waits for a
                    # majority once more before it leads alone, nothing worse.
                    log.warning("could not clear the restore mark: %s", exc.message)
            case AnswerVerify(request=request):
                primary = self.core.primary
                if primary is not None:
                    self.spawn(self.verifier.answer(primary, request))
            case VerifyAnswered(node=node, reply=reply):
                self.verifier.on_reply(node, reply)
            case Resynchronize(why=why):
                self.damaged(why)
            case ClaimLeader() | StoreSyncSet() | ReleaseLeader() if self.etcd is not None:
                self.spawn(self.etcd.carry_out(effect))
        return []

    def send(self, peer: int, message: Message) -> bool:
        link = self.links.links.get(peer)
        if link is None:
            return False
        # Records and snapshot chunks go raw where the link speaks binary frames.
        return link.send(message.to_wire(binary=link.binary))

    def _step_down(self, reason: str) -> None:
        log_event(
            "stepped down", {"node": self.config.node_id, "epoch": self.core.epoch, "why": reason}
        )
        # Writes not yet acknowledged may or may not survive: the client retries with
        # the same request id, and the new primary answers from what it holds.
        self.writer.fail_all(
            Unavailable(
                "the primary changed before the write was acknowledged; "
                "retry with the same request id"
            )
        )
        self.streams.stop_all()
        for hook in self.role_hooks:
            hook(self.core.role)

    # ---- storage faults and damage ---------------------------------------------------------

    def fault(self, why: str, lasting: bool = False, room: int | None = None) -> StorageFault:
        """The disk refused a write: tell the core (it steps aside or stops applying)
        and try again with backoff until a write goes through. Returns the error
        that waiting writes get (retriable). ``lasting``: a write going through
        would not end it (a backup whose schema cannot hold the primary's records):
        no retries; the node stays out, saying why, until it restarts upgraded.
        ``room``: no retry until the data dir has that many bytes free (and the
        spare ``copy_room`` keeps): a snapshot this node has no room for."""
        first = self.core.fault is None
        self.run(self.core.on_storage_fault(self.now(), why))
        refusal = StorageFault(f"node {self.config.node_id} cannot write: {why}; retry later")
        if self.core.role is Role.PRIMARY:
            self.writer.fail_queue(refusal)
        if first:
            self.metrics.storage_faults.inc()
            if not lasting:
                self.spawn(self._recover(room))
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

    async def _recover(self, room: int | None = None) -> None:
        delay, last_log = RECOVER_FIRST, self.now()
        while self.core.fault is not None:
            await asyncio.sleep(delay)
            try:
                # A probe write would go through, and the primary would send the
                # whole snapshot again only for it to find no room again.
                problem = (
                    None
                    if room is None
                    else copy_room(self.config.data_dir, room, "the snapshot it waits for")
                )
                if problem is not None:
                    raise StorageFault(problem)
                # The vote and epoch the core holds, which a failed Persist may not
                # have written: the probe write doubles as their recovery.
                self.storage.probe_write(self.core.state)
            except StorageFault as exc:
                delay = min(delay * 2, RECOVER_MAX if room is None else ROOM_RETRY)
                if self.now() - last_log >= RECOVER_MAX:
                    last_log = self.now()
                    log_event(
                        "storage still failing",
                        {"node": self.config.node_id, "why": str(exc), "retry_in": delay},
                    )
                continue
            self.run(self.core.on_storage_recovered(self.now()))
            self.writer.work.set()

    # ---- inputs from peers, operators and time ----------------------------------------------

    def _on_frame(self, peer: int, frame: protocol.Frame) -> None:
        if self.closing:
            return
        # The edge: a malformed message raises ProtocolViolation here, and the peer
        # link closes (peer.py); the core only ever sees well-formed messages.
        message = from_wire(frame)
        try:
            self.run(self.core.on_message(self.now(), peer, message))
            if isinstance(message, Ack):
                self.streams.acked(peer)
        except StorageCorrupt as exc:
            self.damaged(str(exc))
        except StorageFault as exc:
            # A read the message needed failed (the log, the snapshot file).
            self.fault(str(exc))
        except Exception as exc:
            fatal(exc)

    def _on_arbiter(self, event: ArbiterEvent) -> None:
        if self.closing:
            return
        try:
            self.run(self.core.on_arbiter(self.now(), event))
            self.writer.release_acknowledged()  # a renewal may let it serve again
        except Exception as exc:
            fatal(exc)

    def _on_link(self, peer: int, up: bool, closed_by_us: bool) -> None:
        if peer == OPERATOR_ID or self.closing:
            return
        try:
            self.run(self.core.on_link(self.now(), peer, up, closed_by_us))
            if not up:
                self.streams.stop(peer)
        except Exception as exc:
            fatal(exc)

    def _on_operator(self, frame: protocol.Frame) -> OperatorAnswer:
        if frame.get("type") == "backup":
            return backup.frames(self.storage, self.config.data_dir, self.config.node_id)
        if frame.get("type") == "force_promote":
            if self.core.fault is not None:
                # Its campaign would be abandoned at once (no election makes a node
                # that cannot write primary): say so rather than seem to go ahead.
                return {
                    "type": "error",
                    "request_id": None,
                    "code": "storage_fault",
                    "message": f"node {self.config.node_id} cannot write: {self.core.fault}; "
                    "it can be promoted once its disk takes writes again",
                    "retriable": True,
                }
            self.run(self.core.force_promote(self.now()))
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
        due: float | None = None
        while True:
            now = self.now()
            if due is not None:
                self.metrics.loop_delay.observe(max(0.0, now - due))
            self.run(self.core.tick(now))
            self._verify_tick(now)
            if self._prune_more or now - self._last_prune > PRUNE_EVERY:
                self._last_prune = now
                self._prune_more = False
                with contextlib.suppress(StorageFault):
                    # A disk that refuses this refuses the write path too, which
                    # reports it; the log is pruned once it recovers. A part at a
                    # time (PRUNE_STEP_BYTES), the rest in the next ticks.
                    _, self._prune_more = self.storage.prune_log_step(
                        self.config.log_retention,
                        self.config.log_retention_bytes,
                        PRUNE_STEP_BYTES,
                    )
                    self.core.on_log_pruned(self.storage.first_log_seq())
            # Counted from this tick's start: its own work (a prune) holds the loop too.
            due = now + TICK
            await asyncio.sleep(TICK)

    def _verify_tick(self, now: float) -> None:
        core = self.core
        if core.role is not Role.PRIMARY:
            self.verifier.stop()
            return
        seq = core.position.seq
        members = core.in_sync
        quiet = (
            not self.writer.queue
            and core.watermark == seq
            and all(core.backup_durable(m) == seq for m in members if m != self.config.node_id)
        )
        self.verifier.tick(now, core.epoch, seq, quiet, members)


def fatal(exc: BaseException | None) -> None:
    """A bug or a storage failure: this node cannot trust its in-memory state.

    It logs the cause and exits at once; supervisord restarts it, and it rejoins
    from what is durable on disk, which is what the replication rules are built on.
    """
    log.critical("fatal error, exiting error=%r", exc, exc_info=exc)
    logging.shutdown()
    os._exit(70)
