"""The replication core: who is primary, epochs, the sync set, elections. No I/O.

The core is a plain object. The runtime feeds it what happened (a peer message,
a link going up or down, a local commit, the passing of time) together with the
current monotonic time, and gets back a list of effects to carry out *in order*:
persist before send, seal before broadcast. Nothing here touches a socket, a
file or a clock, so every rule of SPEC section 6 is a unit test over a
simulated network (``tests/unit/test_replication_state.py``).

Roles. A node is ``electing`` until it knows a primary, ``backup`` while it
follows one, ``primary`` after winning an election.

Epochs (R1). ``epoch`` is the highest epoch this node has seen or voted in,
persisted before it is acted on. Frames from a lower epoch are refused with
``reject``; a primary that sees a higher epoch from a primary or a backup of
a higher epoch steps down. A vote request alone does not move the epoch of a
node that refuses it, so a node that wrongly suspected a live primary cannot
depose it.

Sync set (R2, R3, R4). The primary acknowledges seq s only when every member
of the *ack set* has durably committed s. The ack set is the effective sync
set plus the members of every change not yet effective: growing takes effect
at once (the newcomer must have everything from then on), shrinking only once
the remaining members hold the change record (until then the old, larger set
still counts). A backup is dropped after ``sync_timeout`` without a counted
ack; acks of a backup that lags more than ``lag_limit`` are not counted, so a
slow backup is dropped too. A backup re-enters once it holds everything
acknowledged.

Confirmation (R5). A backup is *confirmed* until ``t + confirm_window``, where
t is the time (by its own clock) at which it sent the ack that the primary
echoes in a frame naming it a member. The primary sent that frame after it
received the ack, and drops a backup only ``sync_timeout`` after the last ack
it counted, so while a backup believes itself confirmed the primary has not
acknowledged anything without it. A restart or a gap in the node's own clock
(it was frozen) ends confirmation.

Elections (R5, R6). An electing node probes its peers, then decides from what
it hears: follow a live primary; or, among confirmed nodes, the highest
position wins (ties: lowest id); or, if nobody reachable is confirmed, the
newest sync set any reachable node knows is examined: once all its members
answer, its member with the highest position wins. The winner asks every node
that answered for its vote in a new epoch (one vote per epoch, persisted) and
becomes primary unless one refuses.

Size. This is the project's one large module, on purpose: every rule that
decides who may act reads and writes the same few fields (role, epoch,
confirmation, progress, pending sync sets), and keeping them in one class with
no I/O is what lets the simulator check the rules together.

Freeze. A tick later than ``clock_gap`` after the previous one means this
process was stopped. A backup then loses its confirmation; a primary may not
drop any member until it has heard from that member again, so a thawed old
primary never shrinks to itself and acknowledges alone in a stale epoch.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .types import NodeState, Position, SyncSet


class Role(enum.Enum):
    ELECTING = "electing"
    PRIMARY = "primary"
    BACKUP = "backup"


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


# ---- effects ------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    to: int
    message: dict[str, Any]


@dataclass(frozen=True)
class Persist:
    state: NodeState


@dataclass(frozen=True)
class BecomePrimary:
    """Seal the first record of ``epoch`` with the sync set ``members``, then serve."""

    epoch: int
    members: tuple[int, ...]


@dataclass(frozen=True)
class StepDown:
    reason: str


@dataclass(frozen=True)
class ChangeSyncSet:
    """Seal a record that sets the sync set to ``members`` (R3 shrink, R4 grow)."""

    members: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class Acknowledge:
    """Every seq up to ``seq`` is durable on the whole ack set: reply to clients."""

    seq: int


@dataclass(frozen=True)
class StartStream:
    """Primary: stream records after ``after_seq`` to ``node`` (snapshot first if asked)."""

    node: int
    after_seq: int
    snapshot: bool


@dataclass(frozen=True)
class StopStream:
    node: int


@dataclass(frozen=True)
class ApplyRecords:
    """Backup: durably apply these records, then call ``on_local_durable``."""

    records: list[list[Any]]


@dataclass(frozen=True)
class Rewind:
    """Backup: remove every record after ``to_seq`` (kept in a rollback file)."""

    to_seq: int


@dataclass(frozen=True)
class DatabaseProven:
    """This node's database, suspect since start (see ``ReplicaCore.unproven``), now
    continues a primary's history: forget the suspicion durably."""


@dataclass(frozen=True)
class ExpectSnapshot:
    """Backup: the primary will send a snapshot; install it, then ``reset_log``."""


@dataclass(frozen=True)
class Log:
    event: str
    fields: dict[str, Any]


Effect = (
    Send
    | Persist
    | BecomePrimary
    | StepDown
    | ChangeSyncSet
    | Acknowledge
    | StartStream
    | StopStream
    | ApplyRecords
    | Rewind
    | ExpectSnapshot
    | DatabaseProven
    | Log
)


# ---- pure decisions -------------------------------------------------------------------


def epoch_end(history: list[tuple[int, int]], last_seq: int, epoch: int) -> int | None:
    """The last seq a node holds in ``epoch``, or None if the epoch is not in its history."""
    for index, (e, _start) in enumerate(history):
        if e == epoch:
            if index + 1 < len(history):
                return history[index + 1][1] - 1
            return last_seq
    return None


def divergence_point(
    primary_history: list[tuple[int, int]],
    primary_last: int,
    backup_history: list[tuple[int, int]],
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


def position_key(position: Position, node: int) -> tuple[int, int, int]:
    """Sort key: higher position first wins, ties broken by the lowest node id."""
    return (position.epoch, position.seq, -node)


def sync_set_key(sync_set: SyncSet) -> tuple[int, int]:
    return (sync_set.epoch, sync_set.version)


def sync_set_to_wire(sync_set: SyncSet) -> dict[str, Any]:
    return {
        "version": sync_set.version,
        "members": list(sync_set.members),
        "epoch": sync_set.epoch,
        "databases": [list(pair) for pair in sync_set.databases],
    }


def sync_set_from_wire(data: dict[str, Any]) -> SyncSet:
    members = data.get("members", [])
    version, epoch = data.get("version", 0), data.get("epoch", 0)
    if not isinstance(members, list) or not all(isinstance(m, int) for m in members):
        members = []
    databases = data.get("databases", [])
    if not isinstance(databases, list) or not all(
        isinstance(pair, list)
        and len(pair) == 2
        and isinstance(pair[0], int)
        and isinstance(pair[1], str)
        for pair in databases
    ):
        databases = []
    return SyncSet(
        version if isinstance(version, int) else 0,
        tuple(members),
        epoch if isinstance(epoch, int) else 0,
        tuple((int(node), str(db)) for node, db in databases),
    )


def member_problem(sync_set: SyncSet, view: ProbeView) -> str | None:
    """Why the node of ``view`` cannot count as the member ``sync_set`` names (E4/G5),
    or None. A node whose database is not the one the set recorded (wiped, replaced)
    or that itself found its database rolled back is not that member: counting it
    could elect a node that lost acknowledged writes."""
    if view.unproven is not None:
        return view.unproven
    recorded = sync_set.database_of(view.node)
    if recorded is not None and view.database and view.database != recorded:
        return (
            f"its database is not the one sync set version {sync_set.version} names "
            "(wiped or replaced)"
        )
    return None


@dataclass
class BackupProgress:
    """What the primary knows of one backup."""

    durable: int = -1
    joined: bool = False
    last_counted: float = 0.0
    echo: int = -1
    # The join this backup last made (its ``join_no``): acks of an earlier join
    # describe a log that the join's rewind or snapshot may have replaced.
    join_no: int = -1
    heard_since_gap: bool = True
    # The backup closed our link (it died): an immediate signal. A link we closed
    # ourselves is not, since the backup may still believe it is confirmed.
    lost_by_peer: bool = False


@dataclass
class ProbeView:
    """One peer's answer to this node's probe."""

    node: int
    epoch: int
    role: str
    primary: int | None
    position: Position
    eligible: bool
    sync_set: SyncSet
    database: str = ""
    unproven: str | None = None
    fault: str | None = None


@dataclass
class Campaign:
    epoch: int
    asked: set[int]
    granted: set[int] = field(default_factory=set)
    deadline: float = 0.0
    force: bool = False


# ---- the core -----------------------------------------------------------------------


class ReplicaCore:
    """The replication state of one node. Every public method returns effects."""

    def __init__(
        self,
        node_id: int,
        nodes: tuple[int, ...],
        timing: Timing,
        state: NodeState,
        position: Position,
        sync_set: SyncSet,
        now: float,
        history: list[tuple[int, int]] | None = None,
        incarnation: int = 0,
        database: str = "",
        unproven: str | None = None,
    ) -> None:
        self.node_id = node_id
        # This node's database id, and the ids it learned of its peers' (probes and
        # joins): a sync set records its members' databases (E4).
        self.database = database
        self.databases: dict[int, str] = {node_id: database} if database else {}
        # Why this node cannot prove its database holds what it committed (it was
        # wiped, replaced or rolled back since the last run: ``identity.py``), or
        # None. Such a node never counts as a sync set member in an election until it
        # has joined a primary and continues its history.
        self.unproven = unproven
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
        self.history = list(history or [])
        self.sync_set = sync_set
        self.role = Role.ELECTING
        self.primary: int | None = None
        self.links: set[int] = set()
        self.last_tick = now
        # backup side
        self.confirmed_until = 0.0
        self.last_primary_frame = 0.0
        self.joined = False
        self.join_sent = 0.0
        self.awaiting_snapshot = False
        # Ack numbers of different incarnations of this node must not collide: a stale
        # echo would confirm a restarted backup on its previous life's word.
        self.ack_no = incarnation << 32
        # Joins are numbered the same way; a join reply and every later ack carry the
        # number of the join they belong to, so a reply to an earlier join (resent
        # after a timeout, or made before a rejoin) never rewinds what the current
        # one let us apply, and the primary never counts an ack from an earlier join.
        self.join_no = incarnation << 32
        self.ack_times: deque[tuple[int, float]] = deque(maxlen=256)
        # primary side
        self.progress: dict[int, BackupProgress] = {}
        self.effective: tuple[int, ...] = ()
        self.pending_sets: list[tuple[int, tuple[int, ...]]] = []
        self.changing = False
        self.watermark = 0
        self.epoch_start_seq = 0
        self.sealed_at: deque[tuple[int, float]] = deque()
        self.last_heartbeat = 0.0
        # electing side
        self.round = 0
        self.round_started = 0.0
        self.next_round_at = now
        self.probes: dict[int, ProbeView] = {}
        self.last_primary: int | None = None
        self.solo_blocked = False
        self.logged_waiting: tuple[int, ...] = ()
        self.campaign: Campaign | None = None
        self.waiting_for: tuple[int, ...] = ()
        self.reason = "starting: probing peers"

    # ---- inputs --------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.state.current_epoch

    @property
    def eligible(self) -> bool:
        return (
            self.last_tick < self.confirmed_until and self.unproven is None and self.fault is None
        )

    def started(self, now: float) -> None:
        """The runtime starts ticking now. Time since the core was made went to
        starting up (opening the database, waiting for the address), not to a
        freeze: it is no clock gap."""
        self.last_tick = max(self.last_tick, now)
        self.next_round_at = max(self.next_round_at, now)

    def tick(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        self._check_gap(now, out)
        if self.role is Role.PRIMARY:
            self._primary_tick(now, out)
        elif self.role is Role.BACKUP:
            if now - self.last_primary_frame > self.timing.suspect_timeout:
                self._become_electing(now, "primary silent past the suspect timeout", out)
            elif (
                not self.joined
                and not self.awaiting_snapshot
                and self.fault is None
                and now - self.join_sent > self.timing.election_timeout
            ):
                self._send_join(now, out)
        else:
            self._electing_tick(now, out)
        return out

    def on_link(self, now: float, peer: int, up: bool, closed_by_us: bool = False) -> list[Effect]:
        out: list[Effect] = []
        self._check_gap(now, out)
        if up:
            self.links.add(peer)
            if peer in self.progress:
                self.progress[peer].lost_by_peer = False
            if self.role is Role.ELECTING and self.round_started and self.campaign is None:
                out.append(Send(peer, {"type": "probe", "epoch": self.epoch, "round": self.round}))
            return out
        self.links.discard(peer)
        self.probes.pop(peer, None)
        if closed_by_us:
            # We gave up on a link ourselves: its other end may count us as gone, or
            # believe us unreachable while it decides an election alone. Either way
            # we can no longer vouch for being a current member (R5).
            self.confirmed_until = 0.0
        if self.role is Role.BACKUP and peer == self.primary:
            self._become_electing(now, "lost the link to the primary", out)
        elif self.role is Role.PRIMARY and peer in self.progress:
            progress = self.progress[peer]
            progress.joined = False
            progress.lost_by_peer = not closed_by_us
            out.append(StopStream(peer))
            if (
                peer in self._latest_members()
                and progress.lost_by_peer
                and progress.heard_since_gap
            ):
                # The backup closed the connection: it died, an immediate signal.
                self._propose_change(
                    tuple(m for m in self._latest_members() if m != peer),
                    f"lost the link to node {peer}",
                    out,
                )
        return out

    def on_message(self, now: float, sender: int, msg: dict[str, Any]) -> list[Effect]:
        out: list[Effect] = []
        self._check_gap(now, out)
        handler = getattr(self, "_on_" + msg["type"], None)
        if handler is not None:
            handler(now, sender, msg, out)
        return out

    def on_committed(self, position: Position, sync_set: SyncSet | None = None) -> None:
        """The runtime committed records locally, not yet known to be on disk
        (primary: a batch; backup: applied records). Nothing is acknowledged yet."""
        if position.seq > self.position.seq:
            self._note_position(position)
        if sync_set is not None and self.role is not Role.PRIMARY:
            self.sync_set = sync_set

    def on_local_durable(
        self, now: float, position: Position, sync_set: SyncSet | None = None
    ) -> list[Effect]:
        """Records up to ``position`` are on disk here (committed and fsync'ed)."""
        out: list[Effect] = []
        self.on_committed(position, sync_set)
        self.durable_seq = max(self.durable_seq, min(position.seq, self.position.seq))
        if self.role is Role.PRIMARY:
            self._advance_watermark(now, out)
        elif self.role is Role.BACKUP and self.primary is not None and self.joined:
            # Not before the join is answered: the fsync may be of records from the
            # previous primary that this one is about to have us rewind.
            self._send_ack(now, out)
        return out

    def resend_ack(self, now: float) -> list[Effect]:
        """Backup: records arrived that we already hold; say again how far we are."""
        out: list[Effect] = []
        if self.role is Role.BACKUP and self.joined:
            self._send_ack(now, out)
        return out

    def on_sealed(self, now: float, seq: int, sync_set: SyncSet | None) -> list[Effect]:
        """Primary: a record was sealed at ``seq`` (about to be broadcast and committed)."""
        out: list[Effect] = []
        self.sealed_at.append((seq, now))
        if sync_set is not None:
            self.sync_set = sync_set
            self.pending_sets.append((seq, sync_set.members))
            self.changing = False
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
        return out

    def reset_log(
        self,
        now: float,
        position: Position,
        sync_set: SyncSet,
        history: list[tuple[int, int]],
    ) -> list[Effect]:
        """Backup: after a rewind or a snapshot install the local log is at ``position``."""
        out: list[Effect] = []
        self.position = position
        self.durable_seq = position.seq
        self.history = list(history)
        self.sync_set = sync_set
        self.awaiting_snapshot = False
        if self.role is Role.BACKUP and self.primary is not None:
            self.joined = True
            self._proven(out)
            self._send_ack(now, out)
        return out

    def rejoin(self, now: float, why: str) -> list[Effect]:
        """Backup: the stream did not fit our log (a gap); ask the primary where to resume."""
        out: list[Effect] = [Log("rejoin", {"node": self.node_id, "why": why})]
        if self.role is Role.BACKUP:
            self._send_join(now, out)
        return out

    def _note_position(self, position: Position) -> None:
        if position.epoch != self.position.epoch and (
            not self.history or self.history[-1][0] < position.epoch
        ):
            # The first record of a new epoch: the history gains an entry. (Several
            # epochs may have passed in one batch of records; the runtime resets the
            # history from storage after every apply, so this is only a fast path.)
            self.history.append((position.epoch, position.seq))
        self.position = position

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
        if self.role is Role.PRIMARY:
            heirs = [m for m in self.effective if m != self.node_id and m in self.links]
            if heirs:
                self._become_electing(now, f"stepping aside: {why}", out)
        elif self.role is Role.BACKUP:
            self.joined = False
            self.awaiting_snapshot = False
        return out

    def on_storage_recovered(self, now: float) -> list[Effect]:
        """A write went through again: take part as before (a backup joins afresh)."""
        out: list[Effect] = []
        if self.fault is None:
            return out
        self.fault = None
        out.append(Log("storage recovered", {"node": self.node_id}))
        if self.role is Role.BACKUP:
            self._send_join(now, out)
        return out

    def force_promote(self, now: float) -> list[Effect]:
        out: list[Effect] = [
            Log("forced promotion requested", {"node": self.node_id, "epoch": self.epoch})
        ]
        if self.role is not Role.PRIMARY:
            self._campaign(now, force=True, out=out)
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
        self.solo_blocked = True
        self.round += 1
        self.round_started = 0.0
        self.probes = {}
        if self.role is Role.PRIMARY:
            for progress in self.progress.values():
                progress.heard_since_gap = False
                progress.last_counted = now
        elif self.role is Role.BACKUP:
            # A live primary's frames are already waiting in our socket: give them two
            # heartbeats to arrive, rather than a whole suspect timeout.
            grace = self.timing.suspect_timeout - 2 * self.timing.heartbeat_interval
            self.last_primary_frame = max(self.last_primary_frame, now - grace)

    # ---- primary -------------------------------------------------------------------

    def _latest_members(self) -> tuple[int, ...]:
        return self.sync_set.members

    def _ack_set(self) -> set[int]:
        members = set(self.effective)
        for _seq, pending in self.pending_sets:
            members.update(pending)
        return members

    def _primary_tick(self, now: float, out: list[Effect]) -> None:
        if now - self.last_heartbeat >= self.timing.heartbeat_interval:
            self.last_heartbeat = now
            for peer in sorted(self.links):
                out.append(Send(peer, self.stream_header(peer, [])))
        latest = self._latest_members()
        for peer in latest:
            if peer == self.node_id:
                continue
            progress = self.progress.setdefault(peer, BackupProgress(last_counted=now))
            if not progress.heard_since_gap:
                continue
            if peer not in self.links and progress.lost_by_peer:
                self._propose_change(
                    tuple(m for m in latest if m != peer), f"node {peer} is unreachable", out
                )
                return
            if now - progress.last_counted > self.timing.sync_timeout:
                self._propose_change(
                    tuple(m for m in latest if m != peer),
                    f"node {peer} silent or lagging past the sync timeout",
                    out,
                )
                return

    def stream_header(self, peer: int, records: list[list[Any]]) -> dict[str, Any]:
        """The ``append`` frame for ``peer`` (a heartbeat when ``records`` is empty)."""
        progress = self.progress.get(peer)
        return {
            "type": "append",
            "epoch": self.epoch,
            "seq": self.position.seq,
            "watermark": self.watermark,
            "records": records,
            "sync_set": sync_set_to_wire(self.sync_set),
            "in_sync": list(self.effective),
            "echo": progress.echo if progress is not None and self._may_confirm() else -1,
        }

    def _may_confirm(self) -> bool:
        """After a clock gap the primary confirms nobody until it has heard from its
        whole ack set again: it may be a stale primary that a newer epoch replaced."""
        return all(
            self.progress[m].heard_since_gap
            for m in self._ack_set()
            if m != self.node_id and m in self.progress
        )

    def _propose_change(self, members: tuple[int, ...], reason: str, out: list[Effect]) -> None:
        if self.changing or tuple(sorted(members)) == tuple(sorted(self._latest_members())):
            return
        self.changing = True
        out.append(ChangeSyncSet(tuple(sorted(members)), reason))

    def _lagging(self, durable: int, now: float) -> bool:
        for seq, sealed in self.sealed_at:
            if seq > durable:
                return now - sealed > self.timing.lag_limit
        return False

    def _on_ack(self, now: float, sender: int, msg: dict[str, Any], out: list[Effect]) -> None:
        if msg["epoch"] > self.epoch:
            self._adopt_epoch(now, msg["epoch"], None, "an ack from a higher epoch", out)
            return
        if self.role is not Role.PRIMARY or msg["epoch"] < self.epoch:
            return
        progress = self.progress.get(sender)
        if progress is None or not progress.joined or msg["join_no"] != progress.join_no:
            # An ack of an earlier join (or from before this node became primary): the
            # log it describes may since have been rewound or replaced.
            return
        progress.durable = max(progress.durable, msg["seq"])
        progress.heard_since_gap = True
        if not self._lagging(progress.durable, now):
            progress.last_counted = now
            others = self._ack_set() - {self.node_id, sender}
            if others <= set(msg["links"]):
                # Confirm (echo) a backup only while it is linked to every other member:
                # two confirmed backups then always hear each other in an election, so
                # they cannot both decide alone (R5, one primary per epoch).
                progress.echo = msg["ack_no"]
        if (
            progress.joined
            and sender not in self._latest_members()
            and progress.durable >= max(self.watermark, self.epoch_start_seq)
        ):
            if not self.changing:
                out.append(
                    Log(
                        "catch-up end",
                        {"node": self.node_id, "backup": sender, "seq": progress.durable},
                    )
                )
            self._propose_change((*self._latest_members(), sender), f"node {sender} caught up", out)
        self._advance_watermark(now, out)

    def _advance_watermark(self, now: float, out: list[Effect]) -> None:
        def durable(node: int) -> int:
            if node == self.node_id:
                return self.durable_seq
            progress = self.progress.get(node)
            return progress.durable if progress is not None else -1

        # The newest change whose members all hold it takes effect and supersedes the
        # ones before it: "drop 3" waiting on a frozen 2 must not block "drop 2".
        for index in range(len(self.pending_sets) - 1, -1, -1):
            seq, members = self.pending_sets[index]
            if all(durable(m) >= seq for m in members):
                self.effective = members
                del self.pending_sets[: index + 1]
                break
        ack_set = self._ack_set() | {self.node_id}
        watermark = min(durable(m) for m in ack_set)
        if watermark > self.watermark:
            self.watermark = watermark
            while self.sealed_at and self.sealed_at[0][0] <= watermark:
                self.sealed_at.popleft()
            out.append(Acknowledge(watermark))

    def join_decision(
        self,
        sender: int,
        msg: dict[str, Any],
        history: list[tuple[int, int]],
        first_log_seq: int | None,
        now: float,
    ) -> list[Effect]:
        """Primary: answer a returning backup's ``join`` (R4)."""
        out: list[Effect] = []
        if msg["epoch"] > self.epoch:
            self._adopt_epoch(now, msg["epoch"], None, "a join from a higher epoch", out)
            return out
        if self.role is not Role.PRIMARY:
            return out
        backup_history = [
            (int(e), int(s)) for e, s in msg["history"] if isinstance(e, int) and isinstance(s, int)
        ]
        backup_last = msg["position"][1]
        diverge = divergence_point(history, self.position.seq, backup_history, backup_last)
        diverge = min(diverge, backup_last)
        # The log no longer reaches back to the first record the backup needs.
        snapshot = first_log_seq is None or first_log_seq > diverge + 1
        if self.position.seq == diverge:
            snapshot = False
        progress = self.progress.setdefault(sender, BackupProgress(last_counted=now))
        progress.joined = True
        # A join starts a new incarnation of the backup: nothing it acked before counts.
        progress.echo = -1
        progress.join_no = msg["join_no"]
        self.databases[sender] = msg["database"]
        # Counted only for what it has on disk: records it applied under the
        # previous primary may still wait for their fsync.
        progress.durable = -1 if snapshot else min(diverge, msg["durable"])
        progress.heard_since_gap = True
        out.append(
            Send(
                sender,
                {
                    "type": "join_reply",
                    "epoch": self.epoch,
                    "diverge": diverge,
                    "snapshot": snapshot,
                    "join_no": msg["join_no"],
                },
            )
        )
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
        return out

    def _on_reject(self, now: float, sender: int, msg: dict[str, Any], out: list[Effect]) -> None:
        if msg["epoch"] > self.epoch:
            self._adopt_epoch(now, msg["epoch"], None, f"node {sender} is in a higher epoch", out)

    # ---- backup --------------------------------------------------------------------

    def _send_ack(self, now: float, out: list[Effect]) -> None:
        if self.primary is None:
            return
        self.ack_no += 1
        self.ack_times.append((self.ack_no, now))
        out.append(
            Send(
                self.primary,
                {
                    "type": "ack",
                    "epoch": self.epoch,
                    "seq": self.durable_seq,
                    "ack_no": self.ack_no,
                    "join_no": self.join_no,
                    "links": sorted(self.links),
                },
            )
        )

    def _on_append(self, now: float, sender: int, msg: dict[str, Any], out: list[Effect]) -> None:
        epoch = msg["epoch"]
        if epoch < self.epoch:
            out.append(Send(sender, {"type": "reject", "epoch": self.epoch}))
            return
        if epoch > self.epoch:
            self._adopt_epoch(now, epoch, sender, "a primary of a higher epoch", out)
        elif self.role is Role.PRIMARY:
            # Two primaries in one epoch cannot happen: votes are one per epoch.
            out.append(
                Log("protocol anomaly", {"node": self.node_id, "from": sender, "epoch": epoch})
            )
            return
        elif self.role is Role.ELECTING or self.primary != sender:
            self._follow(now, sender, out)
        self.last_primary_frame = now
        self._confirm(now, msg)
        if not self.joined:
            return
        if msg["records"]:
            out.append(ApplyRecords(msg["records"]))
        else:
            self._send_ack(now, out)

    def _confirm(self, now: float, msg: dict[str, Any]) -> None:
        members = sync_set_from_wire(msg["sync_set"]).members
        if self.node_id not in members or self.node_id not in msg["in_sync"]:
            self.confirmed_until = 0.0
            return
        for ack_no, sent in self.ack_times:
            if ack_no == msg["echo"]:
                self.confirmed_until = max(self.confirmed_until, sent + self.timing.confirm_window)
                return

    def _follow(self, now: float, primary: int, out: list[Effect]) -> None:
        was = self.role
        self.role = Role.BACKUP
        self.primary = primary
        self.joined = False
        self.awaiting_snapshot = False
        self.campaign = None
        self.waiting_for = ()
        self.reason = ""
        self.last_primary_frame = now
        self.confirmed_until = 0.0
        if was is Role.PRIMARY:
            out.append(StepDown(f"node {primary} is primary in epoch {self.epoch}"))
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

    def _send_join(self, now: float, out: list[Effect]) -> None:
        if self.primary is None or self.fault is not None:
            # A node that cannot write joins once its disk recovers (on_storage_recovered).
            return
        self.join_sent = now
        self.join_no += 1
        # Until this join is answered, records of the previous stream are not applied
        # and nothing is acknowledged: the answer may be a rewind or a snapshot.
        self.joined = False
        self.awaiting_snapshot = False
        out.append(
            Send(
                self.primary,
                {
                    "type": "join",
                    "epoch": self.epoch,
                    "position": [self.position.epoch, self.position.seq],
                    "durable": self.durable_seq,
                    "history": [list(entry) for entry in self.history],
                    "join_no": self.join_no,
                    "database": self.database,
                },
            )
        )

    def _on_join_reply(
        self, now: float, sender: int, msg: dict[str, Any], out: list[Effect]
    ) -> None:
        if (
            sender != self.primary
            or msg["epoch"] != self.epoch
            or msg["join_no"] != self.join_no
            or self.fault is not None
        ):
            # The answer to an earlier join: its divergence point describes a log we
            # have moved past (rewinding to it would undo acknowledged records).
            return
        if self.joined or self.awaiting_snapshot:
            return
        if msg["snapshot"]:
            self.awaiting_snapshot = True
            out.append(ExpectSnapshot())
            return
        if self.position.seq > msg["diverge"]:
            out.append(Rewind(msg["diverge"]))
            return
        self.joined = True
        self._proven(out)
        self._send_ack(now, out)

    def _proven(self, out: list[Effect]) -> None:
        if self.unproven is None:
            return
        out.append(Log("database proven", {"node": self.node_id, "primary": self.primary}))
        out.append(DatabaseProven())
        self.unproven = None

    # ---- elections -----------------------------------------------------------------

    def _adopt_epoch(
        self, now: float, epoch: int, primary: int | None, why: str, out: list[Effect]
    ) -> None:
        self.state = NodeState(epoch, self.state.voted_epoch, self.state.voted_for)
        out.append(Persist(self.state))
        out.append(Log("epoch changed", {"node": self.node_id, "epoch": epoch, "why": why}))
        if primary is not None:
            self._follow(now, primary, out)
        else:
            self._become_electing(now, why, out)

    def _become_electing(self, now: float, why: str, out: list[Effect]) -> None:
        if self.role is Role.PRIMARY:
            out.append(StepDown(why))
            self.progress.clear()
            self.pending_sets.clear()
            self.effective = ()
            self.changing = False
        if self.role is not Role.ELECTING:
            out.append(
                Log("became electing", {"node": self.node_id, "epoch": self.epoch, "why": why})
            )
        if self.primary is not None and self.primary != self.node_id:
            self.last_primary = self.primary
        self.role = Role.ELECTING
        self.primary = None
        self.joined = False
        self.campaign = None
        self.reason = why
        self.next_round_at = now
        # A round begun in an earlier electing spell (or answers to it) says nothing
        # about now: start afresh.
        self.round_started = 0.0
        self.probes = {}

    def _electing_tick(self, now: float, out: list[Effect]) -> None:
        if self.campaign is not None:
            if now >= self.campaign.deadline:
                self._finish_campaign(now, out)
            return
        if self.round_started and now < self.round_started + self.timing.election_timeout:
            if self.peers_answered():
                self._decide(now, out)
            return
        if self.round_started:
            self._decide(now, out)
            return
        if now >= self.next_round_at:
            self.round += 1
            self.round_started = now
            self.probes = {}
            for peer in sorted(self.links):
                out.append(Send(peer, {"type": "probe", "epoch": self.epoch, "round": self.round}))
            if self.peers_answered():
                self._decide(now, out)

    def peers_answered(self) -> bool:
        # The last primary is not waited for: when it is frozen, that is the failover,
        # and every moment spent waiting eats into the backups' confirmation.
        return all(peer in self.probes for peer in self.links if peer != self.last_primary)

    def probe_reply(self) -> dict[str, Any]:
        return {
            "type": "probe_reply",
            "epoch": self.epoch,
            "round": 0,
            "role": self.role.value,
            "primary": self.primary if self.role is not Role.ELECTING else None,
            "position": [self.position.epoch, self.position.seq],
            "eligible": self.eligible and self.role is not Role.PRIMARY,
            "sync_set": sync_set_to_wire(self.sync_set),
            "database": self.database,
            "unproven": self.unproven,
            "fault": self.fault,
        }

    def _on_probe(self, now: float, sender: int, msg: dict[str, Any], out: list[Effect]) -> None:
        reply = self.probe_reply()
        reply["round"] = msg["round"]
        out.append(Send(sender, reply))

    def _on_probe_reply(
        self, now: float, sender: int, msg: dict[str, Any], out: list[Effect]
    ) -> None:
        if msg["epoch"] > self.epoch and msg["role"] != Role.ELECTING.value:
            primary = sender if msg["role"] == Role.PRIMARY.value else msg["primary"]
            if self.role is Role.PRIMARY or self.role is Role.ELECTING:
                self._adopt_epoch(
                    now, msg["epoch"], primary, f"node {sender} is in a higher epoch", out
                )
            return
        if self.role is not Role.ELECTING or msg["round"] != self.round:
            return
        self.solo_blocked = False
        self.probes[sender] = ProbeView(
            sender,
            msg["epoch"],
            msg["role"],
            msg["primary"],
            Position(msg["position"][0], msg["position"][1]),
            msg["eligible"],
            sync_set_from_wire(msg["sync_set"]),
            msg["database"],
            msg["unproven"],
            msg["fault"],
        )
        if msg["database"]:
            self.databases[sender] = msg["database"]

    def _my_view(self) -> ProbeView:
        return ProbeView(
            self.node_id,
            self.epoch,
            self.role.value,
            None,
            self.position,
            self.eligible,
            self.sync_set,
            self.database,
            self.unproven,
            self.fault,
        )

    def _decide(self, now: float, out: list[Effect]) -> None:
        self.round_started = 0.0
        # Retry soon; stagger by node id so two nodes rarely campaign at once.
        self.next_round_at = now + self.timing.heartbeat_interval * (1 + 0.2 * self.node_id)
        views = {self.node_id: self._my_view(), **self.probes}
        for view in self.probes.values():
            if view.role == Role.PRIMARY.value and view.epoch >= self.epoch:
                self._adopt_or_follow(now, view.epoch, view.node, out)
                return
        for view in self.probes.values():
            if (
                view.role == Role.BACKUP.value
                and view.primary is not None
                and view.epoch >= self.epoch
            ):
                self.reason = f"node {view.node} still follows node {view.primary}"
                return
        winner = self._winner(views)
        self._log_waiting(out)
        if winner != self.node_id:
            return
        if self.fault is not None:
            # G5: this node holds the newest data, but cannot write: wait for its disk.
            self.reason = f"this node holds the newest data but cannot write: {self.fault}"
            return
        if self.solo_blocked and not self.probes:
            self.reason = "heard from no peer since a gap in this node's clock"
            return
        silent = [p for p in self.links if p not in self.probes and p != self.last_primary]
        if silent:
            # A linked peer that has not answered may be slow, not gone: deciding
            # without it could let it decide alone too. Keep the round open. (The last
            # primary is not waited for: when it is frozen, that is the failover.)
            self.round_started = now
            self.reason = "waiting for node " + ", ".join(map(str, sorted(silent))) + " to answer"
            for peer in sorted(silent):
                out.append(Send(peer, {"type": "probe", "epoch": self.epoch, "round": self.round}))
            return
        self._campaign(now, force=False, out=out)

    def _log_waiting(self, out: list[Effect]) -> None:
        if self.waiting_for == self.logged_waiting:
            return
        self.logged_waiting = self.waiting_for
        if self.waiting_for:
            out.append(
                Log(
                    "waiting for sync set members",
                    {
                        "node": self.node_id,
                        "missing": ",".join(map(str, self.waiting_for)),
                        "version": self.sync_set.version,
                    },
                )
            )

    def _adopt_or_follow(self, now: float, epoch: int, primary: int, out: list[Effect]) -> None:
        if epoch > self.epoch:
            self._adopt_epoch(now, epoch, primary, f"node {primary} is primary", out)
        else:
            self._follow(now, primary, out)

    def _winner(self, views: dict[int, ProbeView]) -> int | None:
        """R5 then R6: the node that should become primary, or None (and why)."""
        eligible = [v for v in views.values() if v.eligible]
        if eligible:
            best = max(eligible, key=lambda v: position_key(v.position, v.node))
            self.waiting_for = ()
            self.reason = f"electing: node {best.node} is the most current confirmed node"
            return best.node
        newest = max(views.values(), key=lambda v: sync_set_key(v.sync_set)).sync_set
        # A fresh cluster has no sync set yet: all configured nodes form the first one.
        members = newest.members or self.nodes
        missing = tuple(m for m in members if m not in views)
        if missing:
            self.waiting_for = missing
            self.reason = (
                f"members of the newest sync set (version {newest.version}) must return "
                "before anyone can prove it is current"
            )
            return None
        problems = {m: member_problem(newest, views[m]) for m in members}
        unproven = tuple(m for m in members if problems[m] is not None)
        if unproven:
            # G5: the member may have held acknowledged writes nobody else has (it was
            # alone in the set when it lost them). Wait for it to be restored, or for an
            # operator's forced promotion.
            self.waiting_for = unproven
            first = unproven[0]
            self.reason = (
                f"node {first} cannot count as a member of sync set version "
                f"{newest.version}: {problems[first]}; restore its data, or force a "
                "promotion (python -m ops.promote) accepting the loss"
            )
            return None
        candidates = [views[m] for m in members]
        best = max(candidates, key=lambda v: position_key(v.position, v.node))
        self.waiting_for = ()
        self.reason = f"electing: full restart, node {best.node} holds the newest position"
        if best.fault is not None:
            self.waiting_for = (best.node,)
            self.reason = f"node {best.node} holds the newest data but cannot write: {best.fault}"
        return best.node

    def _campaign(self, now: float, force: bool, out: list[Effect]) -> None:
        epoch = (
            max(self.epoch, self.state.voted_epoch, *(v.epoch for v in self.probes.values())) + 1
        )
        self.state = NodeState(epoch, epoch, self.node_id)
        out.append(Persist(self.state))
        asked = set(self.probes) & self.links if not force else set(self.links)
        self.campaign = Campaign(
            epoch, asked, deadline=now + self.timing.election_timeout, force=force
        )
        out.append(
            Log(
                "campaign",
                {
                    "node": self.node_id,
                    "epoch": epoch,
                    "seq": self.position.seq,
                    "force": str(force).lower(),
                },
            )
        )
        for peer in sorted(asked):
            out.append(
                Send(
                    peer,
                    {
                        "type": "vote_request",
                        "epoch": epoch,
                        "position": [self.position.epoch, self.position.seq],
                        "force": force,
                    },
                )
            )
        if not asked:
            self._finish_campaign(now, out)

    def _on_vote_request(
        self, now: float, sender: int, msg: dict[str, Any], out: list[Effect]
    ) -> None:
        epoch = msg["epoch"]
        candidate = Position(msg["position"][0], msg["position"][1])
        reason = ""
        if epoch < self.epoch:
            reason = f"stale epoch {epoch}, mine is {self.epoch}"
        elif self.state.voted_epoch == epoch and self.state.voted_for != sender:
            reason = f"already voted for node {self.state.voted_for} in epoch {epoch}"
        elif self.role is Role.PRIMARY and not msg["force"]:
            reason = "I am the primary"
        elif (
            self.role is Role.BACKUP
            and not msg["force"]
            and now - self.last_primary_frame <= self.timing.suspect_timeout
        ):
            reason = f"node {self.primary} is a live primary"
        elif not msg["force"] and (
            (candidate.epoch < self.position.epoch and self.node_id in self.sync_set.members)
            or (candidate < self.position and self.eligible)
        ):
            # An unconfirmed node's extra records were never acknowledged (the
            # confirmed candidate holds every acknowledged one): they do not block R5.
            # Nor do a non-member's: a record is acknowledged only once every member
            # holds it, and the R6 winner is the most current member. (A catching-up
            # node may hold the first record of an epoch that its primary, alone in
            # the sync set, lost in a power failure before its fsync: refusing that
            # primary would leave the cluster without one for good.)
            reason = "my position is newer"
        granted = not reason
        if granted:
            was_primary = self.role is Role.PRIMARY
            self.state = NodeState(epoch, epoch, sender)
            out.append(Persist(self.state))
            if was_primary or self.role is Role.BACKUP:
                self._become_electing(now, f"voted for node {sender} in epoch {epoch}", out)
            self.campaign = None
            self.next_round_at = now + self.timing.election_timeout
        out.append(
            Send(
                sender,
                {"type": "vote", "epoch": epoch, "granted": granted, "reason": reason or "granted"},
            )
        )

    def _on_vote(self, now: float, sender: int, msg: dict[str, Any], out: list[Effect]) -> None:
        campaign = self.campaign
        if campaign is None or msg["epoch"] != campaign.epoch:
            return
        if not msg["granted"]:
            out.append(
                Log(
                    "campaign lost",
                    {
                        "node": self.node_id,
                        "epoch": campaign.epoch,
                        "refused_by": sender,
                        "why": msg["reason"],
                    },
                )
            )
            self.campaign = None
            self.next_round_at = now + self.timing.election_timeout * (0.5 + 0.3 * self.node_id)
            return
        campaign.granted.add(sender)
        if campaign.granted >= campaign.asked:
            self._finish_campaign(now, out)

    def member_databases(self, members: tuple[int, ...]) -> tuple[tuple[int, str], ...]:
        """The database ids of ``members`` that this node knows, for a sync set record."""
        return tuple((m, self.databases[m]) for m in sorted(members) if self.databases.get(m))

    def _finish_campaign(self, now: float, out: list[Effect]) -> None:
        campaign = self.campaign
        if campaign is None:
            return
        self.campaign = None
        # A peer that answered the probe but not the vote is frozen or died; when it
        # comes back it has a clock gap or a restart, so we proceed without it.
        self.role = Role.PRIMARY
        self.primary = self.node_id
        self.waiting_for = ()
        self.reason = ""
        self.confirmed_until = 0.0
        self.progress = {}
        self.watermark = self.durable_seq if campaign.force else 0
        self.sealed_at.clear()
        members = [self.node_id]
        for peer in sorted(campaign.granted):
            view = self.probes.get(peer)
            if view is not None and view.position == self.position:
                members.append(peer)
        for peer in self.peers:
            self.progress[peer] = BackupProgress(last_counted=now)
        self.effective = tuple(sorted(members))
        self.pending_sets = []
        self.changing = True
        self.epoch_start_seq = self.position.seq + 1
        out.append(
            Log(
                "became primary",
                {
                    "node": self.node_id,
                    "epoch": campaign.epoch,
                    "seq": self.position.seq,
                    "force": str(campaign.force).lower(),
                },
            )
        )
        out.append(BecomePrimary(campaign.epoch, tuple(sorted(members))))

    # ---- introspection -------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        lag = {}
        if self.role is Role.PRIMARY:
            for peer, progress in self.progress.items():
                if progress.durable >= 0:
                    lag[peer] = self.position.seq - progress.durable
        return {
            "role": self.role.value,
            "epoch": self.epoch,
            "primary": self.primary,
            "position": [self.position.epoch, self.position.seq],
            "sync_set": sync_set_to_wire(self.sync_set),
            "in_sync": list(self.effective) if self.role is Role.PRIMARY else None,
            "watermark": self.watermark if self.role is Role.PRIMARY else None,
            "confirmed": self.eligible,
            "waiting_for": list(self.waiting_for) or None,
            # A storage fault is the first thing an operator must see, whatever the role.
            "reason": (f"cannot write: {self.fault}" if self.fault else self.reason) or None,
            "database": self.database,
            "unproven": self.unproven,
            "fault": self.fault,
            "lag": lag,
        }
