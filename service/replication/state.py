"""The replication core: roles, epochs, the stream of records, acks. No I/O.

The core is a closed machine, after etcd raft's ``RawNode``: the runtime feeds
it inputs (a peer message, a link going up or down, a local commit or fsync, a
fact about the log such as "replaced by a snapshot at position P", the passing
of time), each with the current monotonic time, and gets back a list of
effects to carry out *in order* (``effects.py``): persist before send, seal
before broadcast. Nothing outside writes its state; the runtime and the status
page read it through queries. Nothing here touches a socket, a file or a clock,
so every rule of SPEC section 6 is a unit test over a simulated network
(``tests/unit/sim.py``).

Where each rule lives:

- who may lead (R5, R6, votes) and when a sync-set change is in effect: the
  arbiter (``arbiter.py``; peer voting in ``election.py``);
- the ack rule and watermark (R2, R3): ``acks.py``, built on winning an election
  and dropped on leaving the role;
- the message shapes: ``messages.py``;
- epochs (R1), the stream, joins and rewind (R4), confirmation (R5's input),
  clock gaps and storage faults: here.

Roles. A node is ``electing`` until it knows a primary, ``backup`` while it
follows one, ``primary`` after winning an election. The state a role needs is
built on entering it and dropped on leaving it (``PrimaryState``,
``BackupState``, the arbiter's electing spell), so no field of one role leaks
into the next.

Epochs (R1). ``epoch`` is the highest epoch this node has seen or voted in,
persisted before it is acted on. Frames from a lower epoch are refused with
``reject``; a primary that sees a higher epoch from a primary or a backup of
a higher epoch steps down. A vote request alone does not move the epoch of a
node that refuses it, so a node that wrongly suspected a live primary cannot
depose it.

Sync set (R2, R3, R4). A backup is dropped after ``sync_timeout`` without a
counted ack; acks of a backup that lags more than ``lag_limit`` are not
counted, so a slow backup is dropped too. A backup re-enters once it holds
everything acknowledged.

Confirmation (R5). A backup is *confirmed* until ``t + confirm_window``, where
t is the time (by its own clock) at which it sent the ack that the primary
echoes in a frame naming it a member. The primary sent that frame after it
received the ack, and drops a backup only ``sync_timeout`` after the last ack
it counted, so while a backup believes itself confirmed the primary has not
acknowledged anything without it. A restart or a gap in the node's own clock
(it was frozen) ends confirmation.

Freeze. A tick later than ``clock_gap`` after the previous one means this
process was stopped. A backup then loses its confirmation; a primary may not
drop any member until it has heard from that member again, so a thawed old
primary never shrinks to itself and acknowledges alone in a stale epoch. Heard
means an ack answering a frame sent after the gap (it reports a record sealed
since, or belongs to a join answered since; the primary seals its sync set
again to have such a record at once): acks that waited in its socket while it
was stopped predate whatever the member did since, such as taking over.

Late ticks. A backup's tick later than ``heartbeat_interval`` after the one
before may run before the frames that waited meanwhile are read: a backup
whose loop was held a few tenths of a second (applying the largest records on a
busy machine) took the primary's unread heartbeats for silence. Such a tick
leaves the suspicion to the next one; never twice in a row.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from .acks import AckTracker
from .arbiter import Arbiter, ArbiterEvent
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
    RestoreSettled,
    Resynchronize,
    Rewind,
    Send,
    StartStream,
    StepDown,
    StopStream,
    VerifyAnswered,
)
from .election import PeerVoting
from .messages import (
    Ack,
    Append,
    Join,
    JoinReply,
    Message,
    Reject,
    Resync,
    Snapshot,
    Verify,
    VerifyReply,
    sync_set_to_wire,
)
from .types import LogRecord, NodeState, Position, Role, SyncSet

History = list[tuple[int, int]]


@dataclass(frozen=True)
class Timing:
    heartbeat_interval: float = 0.1
    suspect_timeout: float = 0.6
    election_timeout: float = 0.3
    sync_timeout: float = 1.5
    confirm_window: float = 1.2
    clock_gap: float = 0.5

    @property
    def lag_limit(self) -> float:
        return self.sync_timeout / 2


# ---- pure decisions -------------------------------------------------------------------


def epoch_end(history: History, last_seq: int, epoch: int) -> int | None:
    """The last seq a node holds in ``epoch``, or None if the epoch is not in its history."""
    for index, (e, _start) in enumerate(history):
        if e == epoch:
            if index + 1 < len(history):
                return history[index + 1][1] - 1
            return last_seq
    return None


def divergence_point(
    primary_history: History,
    primary_last: int,
    backup_history: History,
    backup_last: int,
) -> int:
    """The last seq the backup may keep: the end of the newest epoch both share.

    One primary per epoch writes the records of that epoch in order, so within
    a shared epoch the two histories agree up to the shorter one; anything the
    backup holds after that point was never acknowledged and is rewound (R4,
    after Kafka's KIP-101).
    """
    primary_epochs = {e for e, _ in primary_history}
    for epoch, _start in reversed(backup_history):
        if epoch in primary_epochs:
            ends = (
                epoch_end(primary_history, primary_last, epoch),
                epoch_end(backup_history, backup_last, epoch),
            )
            return min(end for end in ends if end is not None)
    return 0


# ---- role state -----------------------------------------------------------------------


@dataclass
class PrimaryState:
    """Built on winning an election, dropped on leaving the role."""

    acks: AckTracker
    last_heartbeat: float = 0.0
    # The watermark clients were told (Acknowledge): the ack set's watermark, held
    # back while the arbiter's fencing deadline has passed (E2).
    released: int = 0
    # Whether this reign told clients anything yet: its first acknowledgement is
    # logged, so that the logs show which node acknowledged in which epoch.
    acknowledging: bool = False
    # A clock gap was found: the sync set is to be sealed again, so that every
    # member can answer a record sealed after it (``_heard_nobody_since_gap``).
    reseal_due: bool = False


@dataclass
class BackupState:
    """Built on following a primary, dropped on leaving it (or following another)."""

    primary: int
    # When the primary was last heard (any frame of it): the suspect timeout runs from here.
    last_primary_frame: float
    # The current join was answered (and its rewind or snapshot done): records of
    # the stream are applied and acknowledged only from then on.
    joined: bool = False
    join_sent: float = 0.0
    # The answer was "take a snapshot": chunks are expected until it is installed.
    awaiting_snapshot: bool = False
    # The last tick found the primary silent but came late, and left it to this one.
    suspicion_deferred: bool = False


# ---- the core -----------------------------------------------------------------------


class ReplicaCore:
    """The replication state of one node. Every input returns effects."""

    def __init__(
        self,
        node_id: int,
        nodes: tuple[int, ...],
        timing: Timing,
        state: NodeState,
        position: Position,
        sync_set: SyncSet,
        now: float,
        history: History | None = None,
        incarnation: int = 0,
        database: str = "",
        unproven: str | None = None,
        first_log_seq: int | None = None,
        arbiter: Arbiter | None = None,
        restored: bool = False,
    ) -> None:
        self.node_id = node_id
        # This node's database id, and the ids it learned of its peers' (probes and
        # joins): a sync set records its members' databases (E4).
        self.database = database
        self._databases: dict[int, str] = {node_id: database} if database else {}
        # Why this node cannot prove its database holds what it committed (it was
        # wiped, replaced or rolled back since the last run: ``identity.py``), or
        # None. Such a node never counts as a sync set member in an election until it
        # has joined a primary and continues its history.
        self.unproven = unproven
        # Made by ops.restore (``Storage.restored``): its sync set of this node alone
        # was written by the restore, not by a primary, and the other nodes may still
        # hold the old cluster's data with newer acknowledged writes in a newer epoch.
        # Such a node leads only with a majority of the nodes empty or following its
        # history (``PeerVoting``), until a sync set with another member is in effect.
        self.restored = restored
        # Backup: the next join asks for a snapshot (``Join.snapshot``): the log could
        # not be rewound, or the same records failed to apply after a fresh join.
        self.want_snapshot = False
        # Why this node's storage refuses to write (disk full, read-only, I/O error),
        # or None. Such a node takes no part in the sync set: a backup stops applying
        # (the primary drops it), a primary steps aside or refuses writes, and no
        # election makes it primary, until the runtime reports the disk writable.
        self.fault: str | None = None
        self.nodes = tuple(sorted(nodes))
        self.peers = tuple(n for n in self.nodes if n != node_id)
        self.timing = timing
        self.state = state
        self.position = position
        # ``position`` is what the database holds (committed); ``durable_seq`` how
        # much of it is known to be on disk. They differ while a group fsync is
        # pending. Acks and the watermark count only what is durable; elections,
        # joins and divergence use the position, which is what a node will serve.
        self.durable_seq = position.seq
        self.history: History = list(history or [])
        # The oldest record the log still holds (None: empty): a join diverging
        # before it gets a snapshot.
        self.first_log_seq = first_log_seq
        self.sync_set = sync_set
        self.role = Role.ELECTING
        self.links: set[int] = set()
        self.last_tick = now  # of the latest input of any kind
        self.previous_tick = now  # of the latest tick
        # Until this time (our clock) a primary's frame named us a member after it
        # counted an ack of ours: we may take over (R5). Kept across roles.
        self.confirmed_until = 0.0
        # Ack numbers of different incarnations of this node must not collide: a stale
        # echo would confirm a restarted backup on its previous life's word.
        self.ack_no = incarnation << 32
        # Joins are numbered the same way; a join reply and every later ack carry the
        # number of the join they belong to, so a reply to an earlier join (resent
        # after a timeout, or made before a rejoin) never rewinds what the current
        # one let us apply, and the primary never counts an ack from an earlier join.
        self.join_no = incarnation << 32
        self.ack_times: deque[tuple[int, float]] = deque(maxlen=256)
        self.waiting_for: tuple[int, ...] = ()
        self.reason = "starting: probing peers"
        self._lead: PrimaryState | None = None
        self._follower: BackupState | None = None
        self.arbiter: Arbiter = arbiter if arbiter is not None else PeerVoting()
        self.arbiter.bind(self)
        self.arbiter.enter_electing(now, None)

    # ---- queries --------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.state.current_epoch

    @property
    def eligible(self) -> bool:
        return (
            self.last_tick < self.confirmed_until and self.unproven is None and self.fault is None
        )

    @property
    def primary(self) -> int | None:
        """The primary this node knows: itself, the one it follows, or None."""
        if self._lead is not None:
            return self.node_id
        return self._follower.primary if self._follower is not None else None

    @property
    def joined(self) -> bool:
        """Backup: the current join is answered; records are applied and acked."""
        return self._follower is not None and self._follower.joined

    @property
    def watermark(self) -> int | None:
        """Primary: every seq up to here is durable on the whole ack set."""
        return self._lead.acks.watermark if self._lead is not None else None

    @property
    def in_sync(self) -> tuple[int, ...]:
        """Primary: the sync set in effect (empty otherwise)."""
        return self._lead.acks.effective if self._lead is not None else ()

    @property
    def ack_set(self) -> set[int]:
        """Primary: every node an acknowledgement waits for, this one included."""
        return self._lead.acks.ack_set() | {self.node_id} if self._lead is not None else set()

    @property
    def pending_changes(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """Primary: sync-set changes sealed and not yet in effect, as (seq, members)."""
        return tuple(self._lead.acks.pending) if self._lead is not None else ()

    def acknowledged(self, seq: int, now: float) -> bool:
        """Primary: ``seq`` is durable on the whole ack set and may be released now
        (a leased primary past its fencing deadline releases nothing, E2)."""
        return (
            self._lead is not None
            and self._lead.released >= seq
            and now < self.arbiter.serving_until()
        )

    def backup_durable(self, peer: int) -> int | None:
        """Primary: how far ``peer`` reported durable (None: not a backup we track)."""
        if self._lead is None:
            return None
        progress = self._lead.acks.progress.get(peer)
        return progress.durable if progress is not None else None

    def primary_live(self, now: float) -> bool:
        """Backup: the primary was heard within the suspect timeout."""
        follower = self._follower
        return (
            follower is not None
            and now - follower.last_primary_frame <= self.timing.suspect_timeout
        )

    def member_databases(self, members: tuple[int, ...]) -> tuple[tuple[int, str], ...]:
        """The database ids of ``members`` that this node knows, for a sync set record."""
        return tuple((m, self._databases[m]) for m in sorted(members) if self._databases.get(m))

    def stream_header(self, peer: int, records: list[LogRecord]) -> Append:
        """The ``append`` frame for ``peer`` (a heartbeat when ``records`` is empty)."""
        lead = self._lead
        echo = -1
        if lead is not None:
            progress = lead.acks.progress.get(peer)
            if progress is not None and lead.acks.may_confirm():
                echo = progress.echo
        return Append(
            epoch=self.epoch,
            seq=self.position.seq,
            watermark=lead.acks.watermark if lead is not None else 0,
            records=records,
            sync_set=self.sync_set,
            in_sync=lead.acks.effective if lead is not None else (),
            echo=echo,
        )

    def statistics(self) -> dict[str, Any]:
        lead = self._lead
        return {
            "role": self.role.value,
            "epoch": self.epoch,
            "primary": self.primary,
            "position": [self.position.epoch, self.position.seq],
            "sync_set": sync_set_to_wire(self.sync_set),
            "in_sync": list(lead.acks.effective) if lead is not None else None,
            "watermark": lead.acks.watermark if lead is not None else None,
            "confirmed": self.eligible,
            "waiting_for": list(self.waiting_for) or None,
            # A storage fault is the first thing an operator must see, whatever the role.
            "reason": (f"cannot write: {self.fault}" if self.fault else self.reason) or None,
            "database": self.database,
            "unproven": self.unproven,
            "fault": self.fault,
            "lag": lead.acks.lag(self.position.seq) if lead is not None else {},
            **self.arbiter.status(self.last_tick),
        }

    # ---- inputs: time and links ---------------------------------------------------------

    def started(self, now: float) -> None:
        """The runtime starts ticking now. Time since the core was made went to
        starting up (opening the database, waiting for the address), not to a
        freeze: it is no clock gap."""
        self.last_tick = max(self.last_tick, now)
        self.previous_tick = max(self.previous_tick, now)
        if self.role is Role.ELECTING:
            self.arbiter.enter_electing(now, None)

    def tick(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        # Measured from the tick before, not from the latest input: after a stall,
        # an input may come first in the same turn (an etcd answer), still before
        # the sockets are read.
        late = now - self.previous_tick > self.timing.heartbeat_interval
        self.previous_tick = max(self.previous_tick, now)
        self._check_gap(now, out)
        if self._lead is not None:
            self._primary_tick(now, self._lead, out)
        elif self._follower is not None:
            follower = self._follower
            silent = now - follower.last_primary_frame > self.timing.suspect_timeout
            # A tick that comes late (this node's loop was held: a long apply, a busy
            # machine) may run before the frames of that time are read from its
            # socket (uvloop runs it first), the primary's heartbeats among them. It
            # leaves the judgement to the next tick, once they are read; only once,
            # so that a node whose every tick comes late still suspects a dead
            # primary, a tick later.
            defer = silent and late and not follower.suspicion_deferred
            follower.suspicion_deferred = defer
            if defer:
                pass
            elif silent:
                self.become_electing(now, "primary silent past the suspect timeout", out)
            elif (
                not follower.joined
                and not follower.awaiting_snapshot
                and self.fault is None
                and now - follower.join_sent > self.timing.election_timeout
            ):
                self._send_join(now, out)
        else:
            self.arbiter.electing_tick(now, out)
        return out

    def on_link(self, now: float, peer: int, up: bool, closed_by_us: bool = False) -> list[Effect]:
        out: list[Effect] = []
        self._check_gap(now, out)
        lead = self._lead
        if up:
            self.links.add(peer)
            if lead is not None and peer in lead.acks.progress:
                lead.acks.progress[peer].lost_by_peer = False
            self.arbiter.on_link(now, peer, True, out)
            return out
        self.links.discard(peer)
        self.arbiter.on_link(now, peer, False, out)
        if closed_by_us:
            # We gave up on a link ourselves: its other end may count us as gone, or
            # believe us unreachable while it decides an election alone. Either way
            # we can no longer vouch for being a current member (R5).
            self.confirmed_until = 0.0
        if self._follower is not None and peer == self._follower.primary:
            self.become_electing(now, "lost the link to the primary", out)
        elif lead is not None and peer in lead.acks.progress:
            progress = lead.acks.progress[peer]
            progress.joined = False
            progress.lost_by_peer = not closed_by_us
            out.append(StopStream(peer))
            latest = self.sync_set.members
            if peer in latest and progress.lost_by_peer and progress.heard_since_gap:
                # The backup closed the connection: it died, an immediate signal.
                self._propose_change(
                    lead,
                    tuple(m for m in latest if m != peer),
                    f"lost the link to node {peer}",
                    out,
                )
        return out

    # ---- inputs: messages ---------------------------------------------------------------

    def on_message(self, now: float, sender: int, msg: Message) -> list[Effect]:
        out: list[Effect] = []
        self._check_gap(now, out)
        if self.arbiter.on_message(now, sender, msg, out):
            return out
        match msg:
            case Append():
                self._on_append(now, sender, msg, out)
            case Ack():
                self._on_ack(now, sender, msg, out)
            case Join():
                self._on_join(now, sender, msg, out)
            case JoinReply():
                self._on_join_reply(now, sender, msg, out)
            case Reject():
                if msg.epoch > self.epoch:
                    self.adopt_epoch(
                        now, msg.epoch, None, f"node {sender} is in a higher epoch", out
                    )
            case Snapshot():
                follower = self._follower
                if (
                    follower is not None
                    and follower.awaiting_snapshot
                    and sender == follower.primary
                    and msg.epoch == self.epoch
                ):
                    out.append(ReceiveSnapshot(msg))
            case Verify() | Resync() if self._from_primary(sender, msg.epoch):
                out.append(AnswerVerify(msg) if isinstance(msg, Verify) else Resynchronize(msg.why))
            case VerifyReply() if self._lead is not None:
                out.append(VerifyAnswered(sender, msg))
        return out

    def _from_primary(self, sender: int, epoch: int) -> bool:
        return (
            self._follower is not None and self._follower.primary == sender and epoch == self.epoch
        )

    # ---- inputs: the local log ------------------------------------------------------------

    def on_committed(
        self, position: Position, sync_set: SyncSet | None = None, history: History | None = None
    ) -> None:
        """The runtime committed records locally, not yet known to be on disk
        (primary: a batch; backup: applied records). Nothing is acknowledged yet.
        ``history`` is the epoch history after them, when they began an epoch."""
        if position.seq > self.position.seq:
            if self.first_log_seq is None:
                # The log holds every record committed after the old position.
                self.first_log_seq = self.position.seq + 1
            self._note_position(position)
        if history is not None:
            self.history = list(history)
        if sync_set is not None and self.role is not Role.PRIMARY:
            self.sync_set = sync_set

    def on_local_durable(
        self, now: float, position: Position, sync_set: SyncSet | None = None
    ) -> list[Effect]:
        """Records up to ``position`` are on disk here (committed and fsync'ed)."""
        out: list[Effect] = []
        self.on_committed(position, sync_set)
        self.durable_seq = max(self.durable_seq, min(position.seq, self.position.seq))
        if self._lead is not None:
            self._advance_watermark(now, self._lead, out)
        elif self._follower is not None and self._follower.joined:
            # Not before the join is answered: the fsync may be of records from the
            # previous primary that this one is about to have us rewind.
            self._send_ack(now, out)
        return out

    def on_arbiter(self, now: float, event: ArbiterEvent) -> list[Effect]:
        """What the arbiter's I/O found (a read, a renewal, the result of a write)."""
        out: list[Effect] = []
        self._check_gap(now, out)
        lead = self._lead
        self.arbiter.on_event(now, event, out)
        if lead is not None and self._lead is lead:
            # A stored sync-set change may have taken effect, or a renewal moved the
            # fencing deadline: acknowledge what waited for either. (Not in a reign
            # this event just began: as after any election, its first acknowledgement
            # comes with its first record, which ``BecomePrimary`` seals.)
            self._advance_watermark(now, lead, out)
        return out

    def on_log_pruned(self, first_log_seq: int | None) -> None:
        """The log was pruned: it now starts at ``first_log_seq``."""
        self.first_log_seq = first_log_seq

    def resend_ack(self, now: float) -> list[Effect]:
        """Backup: records arrived that we already hold; say again how far we are."""
        out: list[Effect] = []
        if self.joined:
            self._send_ack(now, out)
        return out

    def on_sealed(self, now: float, seq: int, sync_set: SyncSet | None) -> list[Effect]:
        """Primary: a record was sealed at ``seq`` (about to be broadcast and committed)."""
        out: list[Effect] = []
        lead = self._lead
        if lead is None:
            return out
        lead.acks.sealed(seq, now, sync_set.members if sync_set is not None else None)
        if sync_set is not None:
            self.sync_set = sync_set
            out.append(
                Log(
                    "sync set changed",
                    {
                        "node": self.node_id,
                        "version": sync_set.version,
                        "members": ",".join(map(str, sync_set.members)),
                        "seq": seq,
                    },
                )
            )
            self.arbiter.on_change_sealed(now, seq, sync_set, out)
        return out

    def on_log_replaced(
        self,
        now: float,
        position: Position,
        sync_set: SyncSet,
        history: History,
        first_log_seq: int | None,
        restored: bool | None = None,
    ) -> list[Effect]:
        """Backup: after a rewind or a snapshot install the local log is at ``position``
        (``restored``: the storage's mark now, which a snapshot install removes)."""
        out: list[Effect] = []
        if restored is not None:
            self.restored = restored
        self.want_snapshot = False
        self.position = position
        self.durable_seq = position.seq
        self.history = list(history)
        self.first_log_seq = first_log_seq
        self.sync_set = sync_set
        follower = self._follower
        if follower is not None:
            follower.awaiting_snapshot = False
            follower.joined = True
            self._proven(out)
            self._send_ack(now, out)
        return out

    def on_log_unusable(self, now: float, why: str) -> list[Effect]:
        """Backup: our log cannot be rewound to where the primary said (it does not
        reach back that far): count it as empty, so the next join gets a snapshot."""
        self.history = []
        self.position = Position.ZERO
        self.durable_seq = 0
        return self.rejoin(now, why, snapshot=True)

    def rejoin(self, now: float, why: str, snapshot: bool = False) -> list[Effect]:
        """Backup: the stream did not fit our log (a gap); ask the primary where to
        resume (``snapshot``: ask it for a snapshot instead)."""
        self.want_snapshot = self.want_snapshot or snapshot
        out: list[Effect] = [Log("rejoin", {"node": self.node_id, "why": why})]
        if self._follower is not None:
            self._send_join(now, out)
        return out

    def _note_position(self, position: Position) -> None:
        if position.epoch != self.position.epoch and (
            not self.history or self.history[-1][0] < position.epoch
        ):
            # The first record of a new epoch: the history gains an entry. (Several
            # epochs may have passed in one batch of records; the runtime passes the
            # history from storage with such a batch, so this is only a fast path.)
            self.history.append((position.epoch, position.seq))
        self.position = position

    # ---- inputs: the disk and the operator ---------------------------------------------------

    def on_storage_fault(self, now: float, why: str) -> list[Effect]:
        """The disk refused a write (it is full, read-only or failing): see ``fault``.

        A backup stops applying and acknowledging; the primary drops it after the
        sync timeout (R3) and goes on. A primary whose sync set holds another
        member it is linked to steps aside for it (that member is confirmed, R5);
        one with nobody to hand over to stays primary, refuses writes and serves
        reads. Nothing here is a divergence: no rewind, no snapshot."""
        out: list[Effect] = []
        if self.fault is None:
            out.append(Log("storage fault", {"node": self.node_id, "why": why}))
        self.fault = why
        self.arbiter.on_storage_fault(now, out)
        if self._lead is not None:
            heirs = [m for m in self._lead.acks.effective if m != self.node_id and m in self.links]
            if heirs:
                self.become_electing(now, f"stepping aside: {why}", out)
        elif self._follower is not None:
            self._follower.joined = False
            self._follower.awaiting_snapshot = False
        return out

    def on_storage_recovered(self, now: float) -> list[Effect]:
        """A write went through again: take part as before (a backup joins afresh)."""
        out: list[Effect] = []
        if self.fault is None:
            return out
        self.fault = None
        out.append(Log("storage recovered", {"node": self.node_id}))
        if self._follower is not None:
            self._send_join(now, out)
        return out

    def force_promote(self, now: float) -> list[Effect]:
        out: list[Effect] = [
            Log("forced promotion requested", {"node": self.node_id, "epoch": self.epoch})
        ]
        if self.role is Role.BACKUP:
            self.become_electing(now, "forced promotion requested", out)
        if self.role is Role.ELECTING:
            self.arbiter.force_promote(now, out)
        return out

    # ---- clock gaps ------------------------------------------------------------------

    def _check_gap(self, now: float, out: list[Effect]) -> None:
        gap = now - self.last_tick
        self.last_tick = max(self.last_tick, now)
        if gap <= self.timing.clock_gap:
            return
        out.append(Log("clock gap", {"node": self.node_id, "seconds": f"{gap:.3f}"}))
        # Confirmation is anchored to the send time of an ack, so it has run out on
        # its own if the stop was long enough for the primary to drop us; a short
        # stall (a busy machine) leaves it. What a thawed node must not do is decide
        # alone on a stale view: it takes over only after a fresh probe round in
        # which some peer answered.
        self.arbiter.on_gap(now)
        if self._lead is not None:
            self._heard_nobody_since_gap(now, self._lead)
        elif self._follower is not None:
            # A live primary's frames are already waiting in our socket: give them two
            # heartbeats to arrive, rather than a whole suspect timeout.
            grace = self.timing.suspect_timeout - 2 * self.timing.heartbeat_interval
            follower = self._follower
            follower.last_primary_frame = max(follower.last_primary_frame, now - grace)

    # ---- primary -------------------------------------------------------------------

    def _heard_nobody_since_gap(self, now: float, lead: PrimaryState) -> None:
        """This primary was stopped: it drops and confirms no member until it has heard
        from it again, and only an ack answering a frame sent from now on counts.

        The acks that waited in our socket while we were stopped are older than what
        a backup may have done since. Seen with a slow link to node 3 and node 2
        down: node 1 is frozen, node 3 acks node 1's last records meanwhile, then
        suspects node 1. Node 1 thaws and reads those acks; node 3, still confirmed
        and not yet reached by node 1's new frames, takes over alone in epoch 2
        (R5), acknowledges a write and dies before telling node 1. Had the old
        acks counted, node 1 would drop node 3 on the closed link and acknowledge
        alone in epoch 1: one epoch's acknowledged writes would be lost (G1).
        Instead node 1 waits for node 3, which brings epoch 2 back with it.

        A record sealed after the gap is what a fresh ack reports: the sync set is
        sealed again (same members) so that live members can answer at once."""
        acks = lead.acks
        acks.gap_mark = acks.last_sealed(self.position.seq)
        for progress in acks.progress.values():
            progress.heard_since_gap = False
            progress.joined_since_gap = False
            progress.last_counted = now
        # Proposed by the next tick, once the input that found the gap has shown
        # whether this node is still primary (it may learn of a newer epoch).
        lead.reseal_due = any(m != self.node_id for m in acks.ack_set())

    def _primary_tick(self, now: float, lead: PrimaryState, out: list[Effect]) -> None:
        self.arbiter.primary_tick(now, out)
        if self._lead is not lead:
            return  # the arbiter deposed this node (its lease ran out)
        if now - lead.last_heartbeat >= self.timing.heartbeat_interval:
            lead.last_heartbeat = now
            for peer in sorted(self.links):
                out.append(Send(peer, self.stream_header(peer, [])))
        if lead.reseal_due:
            lead.reseal_due = False
            self._propose_change(
                lead,
                self.sync_set.members,
                "hearing from every member after a clock gap",
                out,
                again=True,
            )
        latest = self.sync_set.members
        for peer in latest:
            if peer == self.node_id:
                continue
            progress = lead.acks.backup(peer, now)
            if not progress.heard_since_gap:
                continue
            if peer not in self.links and progress.lost_by_peer:
                self._propose_change(
                    lead, tuple(m for m in latest if m != peer), f"node {peer} is unreachable", out
                )
                return
            if now - progress.last_counted > self.timing.sync_timeout:
                self._propose_change(
                    lead,
                    tuple(m for m in latest if m != peer),
                    f"node {peer} silent or lagging past the sync timeout",
                    out,
                )
                return

    def _propose_change(
        self,
        lead: PrimaryState,
        members: tuple[int, ...],
        reason: str,
        out: list[Effect],
        again: bool = False,
    ) -> None:
        """Propose a new sync set (``again``: even with the same members)."""
        unchanged = tuple(sorted(members)) == tuple(sorted(self.sync_set.members))
        if lead.acks.changing or (unchanged and not again):
            return
        lead.acks.changing = True
        out.append(ChangeSyncSet(tuple(sorted(members)), reason))

    def _on_ack(self, now: float, sender: int, msg: Ack, out: list[Effect]) -> None:
        if msg.epoch > self.epoch:
            self.adopt_epoch(now, msg.epoch, None, "an ack from a higher epoch", out)
            return
        lead = self._lead
        if lead is None or msg.epoch < self.epoch:
            return
        acks = lead.acks
        progress = acks.progress.get(sender)
        if progress is None or not progress.joined or msg.join_no != progress.join_no:
            # An ack of an earlier join (or from before this node became primary): the
            # log it describes may since have been rewound or replaced.
            return
        progress.durable = max(progress.durable, msg.seq)
        if acks.fresh(progress, msg.seq):
            progress.heard_since_gap = True
        if not acks.lagging(progress.durable, now, self.timing.lag_limit):
            progress.last_counted = now
            others = acks.ack_set() - {self.node_id, sender}
            if others <= set(msg.links):
                # Confirm (echo) a backup only while it is linked to every other member:
                # two confirmed backups then always hear each other in an election, so
                # they cannot both decide alone (R5, one primary per epoch).
                progress.echo = msg.ack_no
        if (
            progress.joined
            and sender not in self.sync_set.members
            and progress.durable >= max(acks.watermark, acks.epoch_start_seq)
        ):
            if not acks.changing:
                out.append(
                    Log(
                        "catch-up end",
                        {"node": self.node_id, "backup": sender, "seq": progress.durable},
                    )
                )
            self._propose_change(
                lead, (*self.sync_set.members, sender), f"node {sender} caught up", out
            )
        self._advance_watermark(now, lead, out)

    def _advance_watermark(self, now: float, lead: PrimaryState, out: list[Effect]) -> None:
        lead.acks.advance(self.durable_seq, self.arbiter.change_in_effect)
        if self.restored and len(lead.acks.effective) > 1:
            # Another node holds this history on disk, its sync set naming us: the
            # restore is an ordinary cluster now.
            self.restored = False
            members = ",".join(map(str, lead.acks.effective))
            out.append(Log("restore settled", {"node": self.node_id, "members": members}))
            out.append(RestoreSettled())
        self._release(now, lead, out)

    def _release(self, now: float, lead: PrimaryState, out: list[Effect]) -> None:
        """Tell clients the watermark, unless the fencing deadline has passed (E2):
        then it waits for the next renewal."""
        if lead.acks.watermark > lead.released and now < self.arbiter.serving_until():
            lead.released = lead.acks.watermark
            if not lead.acknowledging:
                lead.acknowledging = True
                out.append(
                    Log(
                        "acknowledging",
                        {"node": self.node_id, "epoch": self.epoch, "seq": lead.released},
                    )
                )
            out.append(Acknowledge(lead.released))

    def _on_join(self, now: float, sender: int, msg: Join, out: list[Effect]) -> None:
        """Primary: answer a returning backup's ``join`` (R4)."""
        if msg.epoch > self.epoch:
            self.adopt_epoch(now, msg.epoch, None, "a join from a higher epoch", out)
            return
        lead = self._lead
        if lead is None:
            return
        backup_last = msg.position.seq
        diverge = divergence_point(self.history, self.position.seq, list(msg.history), backup_last)
        diverge = min(diverge, backup_last)
        # The log no longer reaches back to the first record the backup needs.
        snapshot = self.first_log_seq is None or self.first_log_seq > diverge + 1
        if self.position.seq == diverge:
            snapshot = False
        if msg.snapshot:
            snapshot = True  # its database does not continue its position's history
        progress = lead.acks.backup(sender, now)
        progress.joined = True
        # A join starts a new incarnation of the backup: nothing it acked before counts.
        progress.echo = -1
        progress.join_no = msg.join_no
        self._databases[sender] = msg.database
        # Counted only for what it has on disk: records it applied under the
        # previous primary may still wait for their fsync.
        progress.durable = -1 if snapshot else min(diverge, msg.durable)
        # The join itself may have waited in our socket while we were stopped; the
        # acks of it answer our reply (``AckTracker.fresh``).
        progress.joined_since_gap = True
        out.append(Send(sender, JoinReply(self.epoch, diverge, snapshot, msg.join_no)))
        out.append(StartStream(sender, diverge, snapshot))
        out.append(
            Log(
                "catch-up start",
                {
                    "node": self.node_id,
                    "backup": sender,
                    "from": backup_last,
                    "to": self.position.seq,
                    "rewind_to": diverge,
                    "snapshot": str(snapshot).lower(),
                },
            )
        )

    # ---- backup --------------------------------------------------------------------

    def _send_ack(self, now: float, out: list[Effect]) -> None:
        if self._follower is None:
            return
        self.ack_no += 1
        self.ack_times.append((self.ack_no, now))
        out.append(
            Send(
                self._follower.primary,
                Ack(
                    self.epoch,
                    self.durable_seq,
                    self.ack_no,
                    self.join_no,
                    tuple(sorted(self.links)),
                ),
            )
        )

    def _on_append(self, now: float, sender: int, msg: Append, out: list[Effect]) -> None:
        epoch = msg.epoch
        if epoch < self.epoch:
            out.append(Send(sender, Reject(self.epoch)))
            return
        if epoch > self.epoch:
            self.adopt_epoch(now, epoch, sender, "a primary of a higher epoch", out)
        elif self.role is Role.PRIMARY:
            # Two primaries in one epoch cannot happen: votes are one per epoch.
            out.append(
                Log("protocol anomaly", {"node": self.node_id, "from": sender, "epoch": epoch})
            )
            return
        elif self._follower is None or self._follower.primary != sender:
            self.follow(now, sender, out)
        follower = self._follower
        assert follower is not None, "following the sender of an append"
        follower.last_primary_frame = now
        self._confirm(msg)
        if not follower.joined:
            return
        if msg.records:
            out.append(ApplyRecords(msg.records))
        else:
            self._send_ack(now, out)

    def _confirm(self, msg: Append) -> None:
        if self.node_id not in msg.sync_set.members or self.node_id not in msg.in_sync:
            self.confirmed_until = 0.0
            return
        # ack_times holds consecutive ack numbers (one per ack sent, the oldest dropped),
        # so the echoed one is found by its offset, not by a scan of every append.
        times = self.ack_times
        if not times:
            return
        index = msg.echo - times[0][0]
        if 0 <= index < len(times):
            ack_no, sent = times[index]
            assert ack_no == msg.echo, "ack numbers in ack_times are consecutive"
            self.confirmed_until = max(self.confirmed_until, sent + self.timing.confirm_window)

    def _send_join(self, now: float, out: list[Effect]) -> None:
        follower = self._follower
        if follower is None or self.fault is not None:
            # A node that cannot write joins once its disk recovers (on_storage_recovered).
            return
        follower.join_sent = now
        self.join_no += 1
        # Until this join is answered, records of the previous stream are not applied
        # and nothing is acknowledged: the answer may be a rewind or a snapshot.
        follower.joined = False
        follower.awaiting_snapshot = False
        out.append(
            Send(
                follower.primary,
                Join(
                    self.epoch,
                    self.position,
                    self.durable_seq,
                    tuple(self.history),
                    self.join_no,
                    self.database,
                    # A restored database's position may name another cluster's
                    # records (its sync set row, at least, is not theirs): it
                    # follows another primary only by its snapshot.
                    self.want_snapshot or self.restored,
                ),
            )
        )

    def _on_join_reply(self, now: float, sender: int, msg: JoinReply, out: list[Effect]) -> None:
        follower = self._follower
        if (
            follower is None
            or sender != follower.primary
            or msg.epoch != self.epoch
            or msg.join_no != self.join_no
            or self.fault is not None
        ):
            # The answer to an earlier join: its divergence point describes a log we
            # have moved past (rewinding to it would undo acknowledged records).
            return
        if follower.joined or follower.awaiting_snapshot:
            return
        if msg.snapshot:
            follower.awaiting_snapshot = True
            out.append(ExpectSnapshot())
            return
        if self.position.seq > msg.diverge:
            out.append(Rewind(msg.diverge))
            return
        follower.joined = True
        self._proven(out)
        self._send_ack(now, out)

    def _proven(self, out: list[Effect]) -> None:
        if self.unproven is None:
            return
        out.append(Log("database proven", {"node": self.node_id, "primary": self.primary}))
        out.append(DatabaseProven())
        self.unproven = None

    # ---- role transitions (also the arbiter's means of acting) -------------------------------

    def explain(self, reason: str, waiting_for: tuple[int, ...] | None = None) -> None:
        """What this node is waiting for, for ``status`` (``waiting_for``: the nodes)."""
        self.reason = reason
        if waiting_for is not None:
            self.waiting_for = waiting_for

    def learn_database(self, node: int, database: str) -> None:
        self._databases[node] = database

    def persist_vote(self, epoch: int, candidate: int, out: list[Effect]) -> None:
        """Move to ``epoch`` having voted for ``candidate`` (persisted before any send)."""
        self.state = NodeState(epoch, epoch, candidate)
        out.append(Persist(self.state))

    def adopt_epoch(
        self, now: float, epoch: int, primary: int | None, why: str, out: list[Effect]
    ) -> None:
        self.state = NodeState(epoch, self.state.voted_epoch, self.state.voted_for)
        out.append(Persist(self.state))
        out.append(Log("epoch changed", {"node": self.node_id, "epoch": epoch, "why": why}))
        if primary is not None:
            self.follow(now, primary, out)
        else:
            self.become_electing(now, why, out)

    def follow(self, now: float, primary: int, out: list[Effect]) -> None:
        was = self.role
        self._leave_role()
        self.role = Role.BACKUP
        self._follower = BackupState(primary=primary, last_primary_frame=now)
        self.waiting_for = ()
        self.reason = ""
        self.confirmed_until = 0.0
        if was is Role.PRIMARY:
            out.append(StepDown(f"node {primary} is primary in epoch {self.epoch}"))
            self.arbiter.leaving_primary(out)
        out.append(
            Log(
                "became backup",
                {
                    "node": self.node_id,
                    "primary": primary,
                    "epoch": self.epoch,
                    "seq": self.position.seq,
                },
            )
        )
        self._send_join(now, out)

    def become_electing(self, now: float, why: str, out: list[Effect]) -> None:
        if self.role is Role.PRIMARY:
            out.append(StepDown(why))
            self.arbiter.leaving_primary(out)
        if self.role is not Role.ELECTING:
            out.append(
                Log("became electing", {"node": self.node_id, "epoch": self.epoch, "why": why})
            )
        previous = self._follower.primary if self._follower is not None else None
        self._leave_role()
        self.role = Role.ELECTING
        self.reason = why
        self.arbiter.enter_electing(now, previous)

    def become_primary(
        self,
        now: float,
        epoch: int,
        members: tuple[int, ...],
        force: bool,
        out: list[Effect],
        counted: tuple[int, ...] | None = None,
    ) -> None:
        """Won the election of ``epoch``: seal its first record with ``members`` as the
        sync set, then serve (after a forced promotion, what this node holds is
        acknowledged at once: nobody else can vouch for it). Acks wait for
        ``counted`` (default: ``members``) until the first record's change is in
        effect: an arbiter that stores the sync set names the old members there
        until its compare-and-swap lands."""
        self._leave_role()
        self.role = Role.PRIMARY
        self.waiting_for = ()
        self.reason = ""
        self.confirmed_until = 0.0
        acks = AckTracker(
            self.node_id,
            effective=members if counted is None else counted,
            epoch_start_seq=self.position.seq + 1,
            watermark=self.durable_seq if force else 0,
            changing=True,
        )
        for peer in self.peers:
            acks.backup(peer, now)
        self._lead = PrimaryState(acks, released=acks.watermark)
        out.append(
            Log(
                "became primary",
                {
                    "node": self.node_id,
                    "epoch": epoch,
                    "seq": self.position.seq,
                    "force": str(force).lower(),
                },
            )
        )
        out.append(BecomePrimary(epoch, members))

    def _leave_role(self) -> None:
        """Drop the state of the role being left."""
        self._lead = None
        self._follower = None
        self.arbiter.leave_electing()
