"""An in-memory fake of the replication runtime: cores, logs, a network and a clock.

Theory of operation
-------------------
``ReplicaCore`` has no I/O: it takes inputs (a tick, a message, a link event, a
local commit) with the current time and returns effects. ``SimNetwork`` plays
the asyncio runtime for several cores at once, entirely in memory and in
simulated time, so a scenario of minutes of faults runs in milliseconds and the
same way every time:

* each ``SimNode`` holds one core, a log of records ``(epoch, seq, payload)``
  (``SimLog``, the stand-in for SQLite's ``txlog`` + ``epochs`` + ``cluster``
  tables) and the persisted ``NodeState``; it carries out the core's effects in
  order, exactly as the runtime does (persist before send, seal before
  broadcast, broadcast before the local commit is reported);
* messages travel through a queue with a per-link delay (1 ms by default) and
  arrive in order per link; every message a core sends must survive the wire
  (a frame of peer version 2, records in binary) and ``messages.from_wire``
  unchanged, and a message's
  epoch may not run ahead of the sender's persisted epoch (R1);
* ``advance(seconds)`` moves the shared clock: messages are delivered at their
  exact time and every running node gets a ``tick`` every ``step`` (10 ms);
* faults: ``kill`` (a crash: peers see the connection close at once, in-flight
  messages are lost, volatile state is gone), ``restart`` (a new core from the
  persisted state and the log), ``freeze``/``thaw`` (SIGSTOP/SIGCONT: nothing
  is signalled, messages wait; on thaw the node sees a jump in its clock),
  ``slow`` (a per-link delay), ``partition``/``heal`` (messages across groups
  are dropped; the product promises nothing under partitions);
* a client write on the primary is ``write(node)``; its acknowledgement
  (an ``Acknowledge`` effect covering its seq) is recorded in ``acked``.

Durability (``fsync_delay``). With the default ``fsync_delay=0`` a commit is on
disk when it returns, as with ``synchronous=FULL``: the core hears
``on_local_durable`` at once. With ``fsync_delay > 0`` the sim plays the
runtime's group fsync (``Durability.committed`` / ``_on_durable``): a commit (the
primary's ``_seal``, a backup's ``_apply``) calls ``on_committed`` only, and the
durability report (``on_local_durable``) comes ``fsync_delay`` simulated
seconds later (``set_fsync_delay`` gives one node a slower disk). Each node
tracks ``disk_seq``, how much of its log is on disk. As the runtime's ticket
deque, reports scheduled before a rewind, a snapshot install, a kill or a
restart of the node are dropped; a rewind and a snapshot install are durable
at once, and so is what a restart finds (``Storage`` syncs the files it
opens). A frozen node's fsync thread is stopped too: its reports wait for the
thaw. ``power_loss`` cuts each node's log back to ``disk_seq`` (a SIGKILL keeps
the committed log: it is in the OS page cache) and keeps its persisted state
(votes are written durably), then restarts it unless ``restart=False``. The
WAL sync that a vote's FULL commit implies is not counted for the log (the core
does not count it either: the sim stays on the pessimistic side); a prune's is,
since a log cut below its pruned start cannot exist. At one instant, messages
are delivered first, then fsync reports, then the tick. R2 is checked against
the disk: whatever a primary acknowledges is on disk on it and on every member
of its ack set, and no core counts as durable more than its disk holds.

Arbiter mode (``arbiter=LeaseTiming(...)``, SPEC section 10). Every core runs
``LeasedArbiter``, and each node has an ``ArbiterIO`` (``simarbiter.py``, a model
of the etcd I/O) that talks to one ``SimStore`` (``simstore.py``: keys with
revisions, leases on the store's clock, transactions with etcd's compares).
Requests and answers take ``store_delay`` each way; ``cut_store(node, requests,
answers)`` loses one direction or both (a lost answer leaves the node without
the outcome of what the store applied); a frozen node's answers wait for the
thaw; a killed node's requests in flight still arrive. Each node's monotonic
clock runs at ``1 + drift[node]`` times the store's (true) time (``clock``), and
every input a core gets carries its own clock. ``wipe`` replaces a node's data
folder (empty log, fresh state, new database id). A partition in this mode
stalls connections, as TCP does (frames wait and arrive in order after the
heal) instead of losing frames on a live link. Checked as it goes: a primary
acknowledges only while the store holds its leader key for its epoch (E2);
every member the stored sync set names, with its recorded database, holds every
acknowledged write on disk (E3); a wiped node never leads before joining a
primary (E4).

``check_invariants`` asserts what SPEC section 6 promises (G1, G3, G4, R1: one
primary and one acknowledging node per epoch) over everything recorded;
``wait_for`` advances time until a predicate holds and raises with what it was
still waiting for, never sleeping.

A sync set change is a record like any other; its payload is
``sync_set_payload(sync_set)``, so the sync set a log holds is the one named by
its newest sync set record (``SimLog.sync_set``), as the replicated ``cluster``
table is in storage.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from service import protocol
from service.errors import ProtocolViolation
from service.replication import messages
from service.replication.arbiter import MemberInfo
from service.replication.effects import (
    Acknowledge,
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
    Rewind,
    Send,
    StartStream,
    StepDown,
    StopStream,
    StoreSyncSet,
)
from service.replication.leased import LeasedArbiter, LeaseTiming
from service.replication.messages import Message, Snapshot
from service.replication.state import ReplicaCore, Timing
from service.replication.types import LogRecord, NodeState, Position, Role, SyncSet
from tests.unit.simarbiter import (
    PREFIX,
    Answer,
    ArbiterIO,
    Request,
    Step,
    leader_value,
    parse_sync,
    serve,
)
from tests.unit.simstore import SimStore

T = TypeVar("T")

Record = tuple[int, int, str]
"""One log record: (epoch, seq, payload). Client writes have unique payloads."""

NO_SYNC_SET = SyncSet(0, (), 0)
SYNC_SET_KEY = "sync_set"
STREAM_CHUNK = 16
"""Records per catch-up ``append`` frame: catch-up of a long tail takes several frames."""


class SimError(AssertionError):
    """The simulated runtime met something the real one would refuse (a core bug)."""


def sync_set_payload(sync_set: SyncSet) -> str:
    databases = [list(pair) for pair in sync_set.databases]
    return json.dumps(
        {SYNC_SET_KEY: [sync_set.version, list(sync_set.members), sync_set.epoch, databases]},
        separators=(",", ":"),
    )


def payload_sync_set(payload: str) -> SyncSet | None:
    """The sync set a record sets, or None for a client write."""
    if not payload.startswith("{"):
        return None
    version, members, epoch, databases = json.loads(payload)[SYNC_SET_KEY]
    return SyncSet(
        int(version),
        tuple(int(m) for m in members),
        int(epoch),
        tuple((int(n), str(d)) for n, d in databases),
    )


# ---- the log of one node ----------------------------------------------------------------


@dataclass
class SimLog:
    """What storage holds for replication: the records, the epochs, the sync set.

    ``records`` are contiguous; after pruning they start at ``first_seq`` and
    ``base_sync_set`` is the sync set as of the last pruned record. ``position``
    survives pruning, as ``node_state['last_position']`` does in storage.
    """

    records: list[Record] = field(default_factory=list)
    epochs: list[tuple[int, int]] = field(default_factory=list)
    position: Position = Position.ZERO
    base_sync_set: SyncSet = NO_SYNC_SET

    @property
    def first_seq(self) -> int | None:
        return self.records[0][1] if self.records else None

    @property
    def sync_set(self) -> SyncSet:
        for _epoch, _seq, payload in reversed(self.records):
            sync_set = payload_sync_set(payload)
            if sync_set is not None:
                return sync_set
        return self.base_sync_set

    def get(self, seq: int) -> Record | None:
        first = self.first_seq
        if first is None or not first <= seq <= self.position.seq:
            return None
        return self.records[seq - first]

    def after(self, seq: int) -> list[Record]:
        first = self.first_seq
        if first is None:
            return []
        return self.records[max(seq + 1 - first, 0) :]

    def append(self, record: Record) -> None:
        epoch, seq, _payload = record
        if seq != self.position.seq + 1 or epoch < self.position.epoch:
            raise SimError(f"record {record[:2]} does not follow position {self.position}")
        if epoch > self.position.epoch:
            self.epochs.append((epoch, seq))
        self.records.append(record)
        self.position = Position(epoch, seq)

    def truncate(self, to_seq: int) -> list[Record]:
        """Rewind: remove every record after ``to_seq`` and return them."""
        if to_seq >= self.position.seq:
            return []
        first = self.first_seq
        if first is None or to_seq + 1 < first:
            raise SimError(f"cannot rewind to seq {to_seq}: the log starts at {first}")
        removed = self.records[to_seq + 1 - first :]
        del self.records[to_seq + 1 - first :]
        self.epochs = [(e, s) for e, s in self.epochs if s <= to_seq]
        self.position = Position(self.epochs[-1][0] if self.epochs else 0, to_seq)
        return removed

    def prune(self, keep: int) -> None:
        """Drop all but the newest ``keep`` records (the primary's log retention)."""
        cut = max(len(self.records) - keep, 0)
        if cut:
            pruned = SimLog(self.records[:cut], base_sync_set=self.base_sync_set)
            self.base_sync_set = pruned.sync_set
            del self.records[:cut]

    def to_json(self) -> str:
        return json.dumps(
            {
                "records": [list(r) for r in self.records],
                "epochs": [list(e) for e in self.epochs],
                "position": [self.position.epoch, self.position.seq],
                "base": sync_set_payload(self.base_sync_set),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SimLog:
        data = json.loads(text)
        return cls(
            [(int(e), int(s), str(p)) for e, s, p in data["records"]],
            [(int(e), int(s)) for e, s in data["epochs"]],
            Position(*data["position"]),
            payload_sync_set(data["base"]) or NO_SYNC_SET,
        )


# ---- what the simulation records ----------------------------------------------------------


@dataclass(frozen=True)
class LogEvent:
    time: float
    node: int
    event: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Election:
    """A node carried out ``BecomePrimary``."""

    time: float
    node: int
    epoch: int
    force: bool


@dataclass(frozen=True)
class AckEvent:
    """A node carried out ``Acknowledge(seq)`` while in ``epoch``."""

    time: float
    node: int
    epoch: int
    seq: int


@dataclass(frozen=True)
class ClientWrite:
    """A client write a primary sealed (acknowledged or not)."""

    time: float
    node: int
    epoch: int
    seq: int
    payload: str


@dataclass(frozen=True)
class AckedWrite:
    """A client write that was acknowledged: it must never be lost (G1)."""

    time: float
    node: int
    epoch: int
    seq: int
    payload: str


@dataclass(frozen=True)
class PowerLoss:
    """A node lost power: ``lost`` are the committed records that were not on disk."""

    time: float
    node: int
    lost: list[Record]


@dataclass(order=True)
class _Fsync:
    """A pending durability report: everything up to ``position`` reaches the disk."""

    due: float
    order: int
    node: int = field(compare=False)
    generation: int = field(compare=False)
    position: Position = field(compare=False)


@dataclass(order=True)
class _StoreTraffic:
    """A request on its way to the store, or an answer on its way back to ``node``."""

    at: float
    order: int
    node: int = field(compare=False)
    # The incarnation of the node's I/O that sent the request: an answer to an
    # earlier one (before a kill) is dropped.
    generation: int = field(compare=False)
    item: Request | Answer = field(compare=False)


@dataclass(order=True)
class _InFlight:
    deliver_at: float
    order: int
    src: int = field(compare=False)
    dst: int = field(compare=False)
    message: Message = field(compare=False)


# ---- one node -------------------------------------------------------------------------------


class SimNode:
    """One node: a core (None while down), its log and its persisted state."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.core: ReplicaCore | None = None
        self.log = SimLog()
        self.state = NodeState()
        self.status = "down"  # "up", "frozen" or "down"
        self.streams: dict[int, int] = {}  # primary: peer -> last seq sent to it
        self.expecting_snapshot = False
        self.pending_writes: dict[int, str] = {}  # seq -> payload awaiting Acknowledge
        self.acked_upto = 0
        self.rolled_back: list[Record] = []
        self.held: list[_InFlight] = []  # messages that arrived while frozen
        self.held_link_down: list[int] = []  # peers whose connection closed while frozen
        self.disk_seq = 0  # the log is on disk up to here (fsynced); the rest is in the cache
        # Bumped when pending durability reports stop applying (rewind, snapshot,
        # kill, restart), as the runtime clears its ``unsynced`` deque.
        self.sync_generation = 0
        self.held_syncs: list[_Fsync] = []  # reports due while frozen
        # This node's database id: a wipe makes a new one (E4).
        self.database = f"db-{node_id}"
        # Arbiter mode: the I/O to the store (None while down), its incarnation, and
        # the store's answers that arrived while the node was frozen.
        self.io: ArbiterIO | None = None
        self.io_generation = 0
        self.held_answers: list[_StoreTraffic] = []

    @property
    def running(self) -> bool:
        return self.status == "up"

    @property
    def role(self) -> Role | None:
        return None if self.core is None else self.core.role

    def __repr__(self) -> str:
        role = self.role.value if self.role is not None else "-"
        epoch, position = self.state.current_epoch, self.log.position
        return (
            f"<node {self.node_id} {self.status} {role} epoch={epoch} log={position} "
            f"disk={self.disk_seq}>"
        )


# ---- the network, the clock, and the runtime ------------------------------------------------


class SimNetwork:
    """Several nodes over an in-memory network in simulated time.

    Construction starts every node (``started=False`` leaves them down). Time
    starts at ``start`` (a monotonic clock is never zero). ``fsync_delay`` (0:
    commits are durable on return) is how long a commit takes to reach the disk.

    Faults: ``kill``, ``power_loss``, ``restart``, ``freeze``, ``thaw``, ``slow``,
    ``set_delay``, ``set_fsync_delay``, ``partition``, ``heal``. Time: ``advance``,
    ``wait_for``, ``wait_primary``, ``wait_converged``. Clients and operators:
    ``write``, ``force_promote``, ``prune``. Queries: ``core``, ``statistics``,
    ``primary``, ``primaries``, ``converged``, ``holds``, ``is_acked``, ``acked_at``,
    ``logged``, ``describe``.
    Records: ``events`` (every Log effect), ``elections``, ``acks``, ``acked``,
    ``writes``, ``sent`` (every message, as decoded from the wire), ``durable_at``
    (first commit), ``synced_at`` (first on disk), ``power_losses``, ``anomalies``
    (rule breaches noticed while carrying out effects).
    """

    def __init__(
        self,
        nodes: int = 3,
        timing: Timing | None = None,
        *,
        delay: float = 0.001,
        step: float = 0.01,
        jitter: float = 0.0,
        seed: int = 0,
        start: float = 100.0,
        started: bool = True,
        fsync_delay: float = 0.0,
        arbiter: LeaseTiming | None = None,
        drift: dict[int, float] | None = None,
        store_delay: float = 0.002,
    ) -> None:
        self.ids = tuple(range(1, nodes + 1))
        # Arbiter mode (SPEC section 10): every core runs ``LeasedArbiter`` and reaches
        # ``store`` through its own ``ArbiterIO``; a request or an answer takes
        # ``store_delay``. ``drift`` (node -> d) makes each node's monotonic clock
        # run at ``1 + d`` times the store's (true) time.
        self.lease_timing = arbiter
        self.drift = dict(drift or {})
        self.store = SimStore()
        self.store_delay = store_delay
        # Up to this much more per request or answer: they may overtake each other,
        # as requests multiplexed on one connection to etcd do.
        self.store_jitter = 0.0
        self._store_queue: list[_StoreTraffic] = []
        # node -> (its requests are lost, answers to it are lost)
        self._store_cut: dict[int, tuple[bool, bool]] = {}
        # In arbiter mode a partition stalls a connection, as TCP does: frames
        # across it wait (in order) and arrive once it heals. Otherwise they are lost.
        self.stall_partitions = arbiter is not None
        self._stalled: list[_InFlight] = []
        # Nodes whose database was wiped and that have not joined a primary since (E4).
        self.wiped: set[int] = set()
        self._wipes = 0
        self.timing = timing or Timing()
        self.delay = delay
        self.step = step
        self.jitter = jitter
        self.fsync_delay = fsync_delay
        self._fsync_delays: dict[int, float] = {}
        self._fsyncs: list[_Fsync] = []
        self._fsync_order = 0
        self.random = random.Random(seed)
        self.now = start
        self._start = start
        self._ticks = 0
        self.nodes = {n: SimNode(n) for n in self.ids}
        self._queue: list[_InFlight] = []
        self._order = 0
        self._link_delay: dict[tuple[int, int], float] = {}
        self._link_last: dict[tuple[int, int], float] = {}
        self._connected: set[frozenset[int]] = set()
        self._groups: dict[int, int] = {}
        self._held_links: set[frozenset[int]] = set()
        self.events: list[LogEvent] = []
        self.elections: list[Election] = []
        self.acks: list[AckEvent] = []
        self.acked: list[AckedWrite] = []
        self.writes: list[ClientWrite] = []
        self.durable_at: dict[tuple[int, int], float] = {}  # (node, seq) -> first commit
        self.synced_at: dict[tuple[int, int], float] = {}  # (node, seq) -> first on disk
        self.power_losses: list[PowerLoss] = []
        self.sent: list[tuple[float, int, int, dict[str, Any]]] = []
        self.anomalies: list[str] = []
        self.forced_at: float | None = None
        self._writes = 0
        if started:
            for n in self.ids:
                self.restart(n)

    # ---- faults -----------------------------------------------------------------------

    def kill(self, node_id: int) -> None:
        """SIGKILL: volatile state is lost, peers see the connection close at once."""
        node = self.nodes[node_id]
        node.status = "down"
        node.core = None
        node.streams.clear()
        node.pending_writes.clear()
        node.expecting_snapshot = False
        node.held.clear()
        node.held_link_down.clear()
        node.held_syncs.clear()
        node.sync_generation += 1  # its group fsync thread died with it
        node.io = None  # its requests in flight still reach the store; answers are lost
        node.io_generation += 1
        node.held_answers.clear()
        self._queue = [m for m in self._queue if node_id not in (m.src, m.dst)]
        heapq.heapify(self._queue)
        self._stalled = [m for m in self._stalled if node_id not in (m.src, m.dst)]
        for other in self.nodes.values():
            other.held = [m for m in other.held if m.src != node_id]
        for peer in self.ids:
            pair = frozenset((node_id, peer))
            if pair not in self._connected:
                continue
            self._connected.discard(pair)
            other = self.nodes[peer]
            if other.status == "frozen":
                other.held_link_down.append(node_id)
            elif other.running:
                self._link_down(other, node_id)

    def restart(self, node_id: int) -> None:
        """Start a (down) node: a brand-new core from the persisted state and the log."""
        node = self.nodes[node_id]
        if node.status != "down":
            raise SimError(f"node {node_id} is {node.status}, not down")
        node.core = ReplicaCore(
            node_id,
            self.ids,
            self.timing,
            node.state,
            node.log.position,
            node.log.sync_set,
            self.clock(node_id),
            history=list(node.log.epochs),
            first_log_seq=node.log.first_seq,
            database=node.database,
            arbiter=LeasedArbiter(self.lease_timing) if self.lease_timing is not None else None,
        )
        node.sync_generation += 1
        # Storage syncs the files it opens: what a crash left in the cache is on disk.
        self._on_disk(node, node.log.position.seq)
        node.status = "up"
        if self.lease_timing is not None:
            node.io = ArbiterIO(node_id, self.lease_timing)
        self._connect_links()

    def freeze(self, node_id: int) -> None:
        """SIGSTOP: nothing is signalled; the node gets no ticks and its messages wait."""
        node = self.nodes[node_id]
        if not node.running:
            raise SimError(f"node {node_id} is {node.status}, not up")
        node.status = "frozen"

    def thaw(self, node_id: int) -> None:
        """SIGCONT: the node resumes and sees the jump in its clock."""
        node = self.nodes[node_id]
        if node.status != "frozen":
            raise SimError(f"node {node_id} is {node.status}, not frozen")
        node.status = "up"
        for message in node.held:
            message.deliver_at = max(message.deliver_at, self.now)
            heapq.heappush(self._queue, message)
        node.held.clear()
        for fsync in node.held_syncs:
            fsync.due = max(fsync.due, self.now)
            heapq.heappush(self._fsyncs, fsync)
        node.held_syncs.clear()
        for answer in node.held_answers:
            answer.at = max(answer.at, self.now)
            heapq.heappush(self._store_queue, answer)
        node.held_answers.clear()
        closed, node.held_link_down = node.held_link_down, []
        for peer in closed:
            if node.running:
                self._link_down(node, peer)

    def slow(self, node_id: int, seconds: float) -> None:
        """Every message to and from ``node_id`` takes ``seconds``."""
        for peer in self.ids:
            if peer != node_id:
                self.set_delay(node_id, peer, seconds)
                self.set_delay(peer, node_id, seconds)

    def set_delay(self, src: int, dst: int, seconds: float) -> None:
        self._link_delay[(src, dst)] = seconds

    def set_fsync_delay(self, node_id: int, seconds: float) -> None:
        """Commits on ``node_id`` from now on take ``seconds`` to reach its disk.

        Only with a deferred-durability sim (``fsync_delay > 0``): with
        ``fsync_delay=0`` every commit is durable on return."""
        if not self.fsync_delay:
            raise SimError("set_fsync_delay needs SimNetwork(fsync_delay=...) > 0")
        if seconds <= 0:
            raise SimError("an fsync takes some time")
        self._fsync_delays[node_id] = seconds

    def power_loss(self, *node_ids: int, restart: bool = True) -> list[PowerLoss]:
        """The power fails on ``node_ids`` at one instant (up, frozen or down).

        Each loses its volatile state, as with ``kill``, and every committed
        record that was not on disk: its log is cut back to ``disk_seq``. The
        persisted node state (votes, epochs) survives: it is written durably.
        With ``restart`` (the default) the nodes then start again, as ``restart``.
        """
        for node_id in node_ids:
            self.kill(node_id)
        losses = []
        for node_id in node_ids:
            node = self.nodes[node_id]
            loss = PowerLoss(self.now, node_id, node.log.truncate(node.disk_seq))
            losses.append(loss)
            self.power_losses.append(loss)
        if restart:
            for node_id in node_ids:
                self.restart(node_id)
        return losses

    def partition(self, *groups: Iterable[int]) -> None:
        """Cut the network between the groups (nodes not named form one more group):
        messages across are dropped, or held until the heal (``stall_partitions``)."""
        self._groups = {n: len(groups) for n in self.ids}
        for index, group in enumerate(groups):
            for n in group:
                self._groups[n] = index
        self._release_stalled()

    def heal(self) -> None:
        self._groups = {}
        self._release_stalled()

    def _release_stalled(self) -> None:
        """Frames held on a stalled connection that now reaches its end go on, in the
        order they were sent."""
        stalled, self._stalled = sorted(self._stalled, key=lambda m: m.order), []
        for message in stalled:
            if not self.reachable(message.src, message.dst):
                self._stalled.append(message)
                continue
            pair = (message.src, message.dst)
            message.deliver_at = max(self.now + self.delay, self._link_last.get(pair, 0.0))
            self._link_last[pair] = message.deliver_at
            heapq.heappush(self._queue, message)

    def hold_link(self, a: int, b: int) -> None:
        """Keep the link between ``a`` and ``b`` from coming up (a dialer in backoff).

        An existing link stays; only a new connection is held back."""
        self._held_links.add(frozenset((a, b)))

    def release_link(self, a: int, b: int) -> None:
        self._held_links.discard(frozenset((a, b)))
        self._connect_links()

    def reachable(self, a: int, b: int) -> bool:
        return self._groups.get(a, 0) == self._groups.get(b, 0)

    def cut_store(self, node_id: int, requests: bool = True, answers: bool = True) -> None:
        """Arbiter mode: the node's ``requests`` to the store are lost, and/or the
        store's ``answers`` to it (then the store applies what it never hears back
        about: the node cannot know the outcome)."""
        self._store_cut[node_id] = (requests, answers)

    def heal_store(self, *node_ids: int) -> None:
        """The store is reachable again from ``node_ids`` (default: every node)."""
        for node_id in node_ids or self.ids:
            self._store_cut.pop(node_id, None)

    def wipe(self, node_id: int, restart: bool = True) -> None:
        """The node's data folder is lost (a replaced disk): it comes back with an
        empty log, a fresh node state and a new database id (``identity.py``)."""
        node = self.nodes[node_id]
        if node.status != "down":
            self.kill(node_id)
        self._wipes += 1
        node.log = SimLog()
        node.state = NodeState()
        node.disk_seq = 0
        node.rolled_back = []
        node.database = f"db-{node_id}-wiped-{self._wipes}"
        self.wiped.add(node_id)
        if restart:
            self.restart(node_id)

    # ---- client and operator actions ----------------------------------------------------

    def write(self, node_id: int, payload: str | None = None) -> ClientWrite | None:
        """A client write on ``node_id``; None if the node is not a running primary."""
        node = self.nodes[node_id]
        core = node.core
        if not node.running or core is None or core.role is not Role.PRIMARY:
            return None
        self._writes += 1
        payload = payload if payload is not None else f"write-{self._writes}"
        if payload.startswith("{"):
            raise ValueError("client payloads must not look like sync set records")
        write = ClientWrite(self.now, node_id, core.epoch, node.log.position.seq + 1, payload)
        self.writes.append(write)
        node.pending_writes[write.seq] = payload  # the client waits from the seal on
        self._seal(node, core.epoch, payload, None)
        return write

    def is_acked(self, write: ClientWrite) -> bool:
        return self.acked_at(write) is not None

    def acked_at(self, write: ClientWrite) -> float | None:
        """When ``write`` was acknowledged, or None."""
        return next((a.time for a in self.acked if a.payload == write.payload), None)

    def holds(self, node_id: int, write: ClientWrite) -> bool:
        """Whether ``node_id``'s log holds ``write`` at its seq."""
        return self.nodes[node_id].log.get(write.seq) == (write.epoch, write.seq, write.payload)

    def force_promote(self, node_id: int) -> None:
        """The operator's explicit, warned command (G5)."""
        node = self.nodes[node_id]
        self.forced_at = self.now
        self._run(node, self._core(node).force_promote(self.clock(node_id)))

    def prune(self, node_id: int, keep: int) -> None:
        node = self.nodes[node_id]
        node.log.prune(keep)
        if node.core is not None:
            node.core.on_log_pruned(node.log.first_seq)
        # ``prune_log`` commits with synchronous=FULL (the control connection): that
        # fsyncs the WAL, so every earlier commit is on disk too.
        self._on_disk(node, node.log.position.seq)

    # ---- time ---------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the clock; deliver messages at their time and tick every ``step``."""
        end = self.now + seconds
        while True:
            next_tick = self._start + (self._ticks + 1) * self.step
            next_message = self._queue[0].deliver_at if self._queue else float("inf")
            next_fsync = self._fsyncs[0].due if self._fsyncs else float("inf")
            next_store = self._store_queue[0].at if self._store_queue else float("inf")
            at = min(next_tick, next_message, next_fsync, next_store)
            if at > end + 1e-9:
                break
            self.now = max(self.now, at)
            # At one instant: messages first, then fsync reports, then the store's
            # traffic, then the tick.
            if next_message <= min(next_tick, next_fsync, next_store):
                self._deliver(heapq.heappop(self._queue))
            elif next_fsync <= min(next_tick, next_store):
                self._fsync_done(heapq.heappop(self._fsyncs))
            elif next_store <= next_tick:
                self._store_traffic(heapq.heappop(self._store_queue))
            else:
                self._ticks += 1
                self._connect_links()
                for node in self.nodes.values():
                    if node.running:
                        self._tick(node)
        self.now = end

    def wait_for(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        """Advance time until ``predicate`` is truthy; return its value.

        Raises AssertionError naming what was awaited and the state of every node.
        """
        __tracebackhide__ = True
        deadline = self.now + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self.now >= deadline - 1e-9:
                raise AssertionError(
                    f"simulated {timeout}s passed waiting for {what}\n{self.describe()}"
                )
            self.advance(min(self.step, deadline - self.now))

    def clock(self, node_id: int) -> float:
        """``node_id``'s monotonic clock: it runs at ``1 + drift`` times true time."""
        return self._start + (self.now - self._start) * (1 + self.drift.get(node_id, 0.0))

    def _tick(self, node: SimNode) -> None:
        local = self.clock(node.node_id)
        if node.io is not None:
            core = self._core(node)
            me = MemberInfo(core.node_id, core.position, core.database, core.fault, core.unproven)
            self._io_step(node, node.io.tick(local, me))
        if node.running:
            self._run(node, self._core(node).tick(local))

    # ---- the arbiter's store and the way to it ----------------------------------------------

    def _io_step(self, node: SimNode, step: Step) -> None:
        """Send what the node's arbiter I/O asks, and hand its events to the core."""
        for request in step.requests:
            self._store_send(node.node_id, node.io_generation, request, self._store_due())
        for event in step.events:
            if node.core is None or not node.running:
                return
            self._run(node, node.core.on_arbiter(self.clock(node.node_id), event))

    def store_requests_in_flight(self, node_id: int) -> int:
        """Requests of ``node_id`` on their way to the store (they arrive even if it died)."""
        return sum(
            1 for t in self._store_queue if t.node == node_id and isinstance(t.item, Request)
        )

    def _store_due(self) -> float:
        jitter = self.random.uniform(0, self.store_jitter) if self.store_jitter else 0.0
        return self.now + self.store_delay + jitter

    def _store_send(self, node_id: int, generation: int, item: Request | Answer, at: float) -> None:
        self._order += 1
        heapq.heappush(self._store_queue, _StoreTraffic(at, self._order, node_id, generation, item))

    def _store_traffic(self, traffic: _StoreTraffic) -> None:
        requests_cut, answers_cut = self._store_cut.get(traffic.node, (False, False))
        item = traffic.item
        if isinstance(item, Request):
            if requests_cut:
                return
            sync_before = self.store.keys.get(PREFIX + "sync")
            result = serve(self.store, self.now, item.op)
            if self.store.keys.get(PREFIX + "sync") is not sync_before:
                self.anomalies += self._e3_problems("the store's sync set changed")
            answer = Answer(item.id, result)
            self._store_send(traffic.node, traffic.generation, answer, self._store_due())
            return
        node = self.nodes[traffic.node]
        if answers_cut or node.io is None or traffic.generation != node.io_generation:
            return
        if node.status == "frozen":
            node.held_answers.append(traffic)
            return
        self._io_step(node, node.io.on_answer(self.clock(node.node_id), item))

    def _check_fenced(self, node: SimNode, epoch: int, seq: int) -> None:
        """E2: a primary acknowledges (or serves a read) only while the store still
        holds its leader key, for its epoch, on a live lease."""
        self.store.expire(self.now)
        leader = self.store.keys.get(PREFIX + "leader")
        if leader is None or leader.value != leader_value(node.node_id, epoch):
            held = leader.value if leader is not None else "nobody"
            self.anomalies.append(
                f"E2: node {node.node_id} acknowledged seq {seq} in epoch {epoch} while the "
                f"store's leader key is {held}"
            )

    def _e3_problems(self, when: str) -> list[str]:
        """E3: every member the stored sync set names (with its recorded database)
        holds every acknowledged write on disk."""
        stored = self.store.keys.get(PREFIX + "sync")
        if stored is None:
            return []
        sync_set = parse_sync(stored.value)
        problems = []
        for member in sync_set.members:
            node = self.nodes[member]
            recorded = sync_set.database_of(member)
            if recorded is not None and recorded != node.database:
                continue  # not that member any more: E4 keeps it from leading
            for write in self.acked:
                if self.forced_at is not None and write.time < self.forced_at:
                    continue
                first = node.log.first_seq
                if first is not None and write.seq < first:
                    continue
                if not self.holds_on_disk(member, write):
                    problems.append(
                        f"E3: {when}: stored sync set {sync_set.members} (v{sync_set.version}) "
                        f"names node {member}, which lacks acknowledged {write}"
                    )
                    break
        return problems

    def holds_on_disk(self, node_id: int, write: ClientWrite | AckedWrite) -> bool:
        node = self.nodes[node_id]
        record = node.log.get(write.seq)
        return record == (write.epoch, write.seq, write.payload) and node.disk_seq >= write.seq

    # ---- queries ------------------------------------------------------------------------

    def core(self, node_id: int) -> ReplicaCore:
        return self._core(self.nodes[node_id])

    def statistics(self, node_id: int) -> dict[str, Any]:
        return self.core(node_id).statistics()

    def primaries(self) -> list[int]:
        """Running nodes whose core is primary (a thawed stale one may still think so)."""
        return [n.node_id for n in self.nodes.values() if n.running and n.role is Role.PRIMARY]

    def primary(self) -> int | None:
        """The primary of the highest epoch among running nodes, if any."""
        primaries = self.primaries()
        if not primaries:
            return None
        return max(primaries, key=lambda n: self.nodes[n].state.current_epoch)

    def wait_primary(self, timeout: float = 5.0, among: Iterable[int] | None = None) -> int:
        """Wait until one running node is the only primary; return it."""
        allowed = set(among) if among is not None else set(self.ids)

        def single() -> int | None:
            primaries = self.primaries()
            if len(primaries) == 1 and primaries[0] in allowed:
                return primaries[0]
            return None

        return self.wait_for(single, timeout, "exactly one primary")

    def converged(self) -> bool:
        """One primary; every other running node follows it, holds its log, is in sync."""
        running = [n for n in self.nodes.values() if n.running]
        primaries = self.primaries()
        if len(primaries) != 1:
            return False
        primary = self.nodes[primaries[0]]
        core = self._core(primary)
        if core.pending_changes or primary.pending_writes:
            return False
        if set(core.in_sync) != {n.node_id for n in running}:
            return False
        if core.watermark != primary.log.position.seq:
            return False
        for node in running:
            if node is primary:
                continue
            other = self._core(node)
            if other.role is not Role.BACKUP or other.primary != primary.node_id:
                return False
            if node.log.position != primary.log.position or not other.joined:
                return False
        return True

    def wait_converged(self, timeout: float = 10.0) -> int:
        """Wait until ``converged()``, check every invariant, return the primary."""
        self.wait_for(self.converged, timeout, "the running nodes to converge")
        self.check_invariants(converged=True)
        primary = self.primary()
        assert primary is not None
        return primary

    def logged(self, event: str, node: int | None = None) -> list[LogEvent]:
        return [e for e in self.events if e.event == event and node in (None, e.node)]

    def describe(self) -> str:
        lines = [f"t={self.now - self._start:.3f}"]
        for node in self.nodes.values():
            stats = node.core.statistics() if node.core is not None else {}
            lines.append(f"  {node!r} {stats}")
        lines.extend(f"  anomaly: {a}" for a in self.anomalies)
        return "\n".join(lines)

    # ---- invariants ---------------------------------------------------------------------

    def check_invariants(self, converged: bool = False) -> None:
        """Assert R1, G1, G3 (and G4 when ``converged``) over everything recorded.

        A forced promotion may lose acknowledged writes by design (G5): G1 is
        checked only for writes acknowledged after the last one.
        """
        problems = list(self.anomalies)
        problems += self._epoch_problems()
        for node in self.nodes.values():
            if node.core is not None and node.core.durable_seq > node.disk_seq:
                problems.append(
                    f"node {node.node_id} counts seq {node.core.durable_seq} as durable but "
                    f"has only up to seq {node.disk_seq} on disk"
                )
        primary = self.primary()
        holders = [n for n in self.nodes.values() if n.running] if converged else []
        newest = max((e.epoch for e in self.elections), default=0)
        if primary is not None and self.nodes[primary].state.current_epoch >= newest:
            # The primary of the newest epoch (a thawed stale one may not know yet).
            holders.append(self.nodes[primary])
        for write in self.acked:
            if self.forced_at is not None and write.time < self.forced_at:
                continue
            for node in holders:
                record = node.log.get(write.seq)
                first = node.log.first_seq
                if first is not None and write.seq < first:
                    continue  # pruned: no longer in the log, still in the data
                if record != (write.epoch, write.seq, write.payload):
                    problems.append(
                        f"G1: acked write {write} is not in node {node.node_id}'s log "
                        f"(holds {record})"
                    )
        for node in self.nodes.values():
            payloads = [p for _e, _s, p in node.log.records if not p.startswith("{")]
            if len(payloads) != len(set(payloads)):
                problems.append(f"G3: node {node.node_id}'s log holds a write twice")
        if converged:
            logs = {n.node_id: n.log for n in self.nodes.values() if n.running}
            reference = next(iter(logs.values()))
            for node_id, log in logs.items():
                if log.position != reference.position or log.epochs != reference.epochs:
                    problems.append(f"G4: node {node_id} at {log.position} {log.epochs}")
                for record in log.records:
                    other = reference.get(record[1])
                    if other is not None and other != record:
                        problems.append(
                            f"G4: seq {record[1]} is {record} on node {node_id}, {other} elsewhere"
                        )
        if problems:
            raise AssertionError("\n".join(problems) + "\n" + self.describe())

    def _epoch_problems(self) -> list[str]:
        problems = []
        by_epoch: dict[int, set[int]] = {}
        for election in self.elections:
            by_epoch.setdefault(election.epoch, set()).add(election.node)
        for epoch, winners in by_epoch.items():
            if len(winners) > 1 or sum(e.epoch == epoch for e in self.elections) > 1:
                problems.append(f"R1: epoch {epoch} had several primaries: {sorted(winners)}")
        ackers: dict[int, set[int]] = {}
        for ack in self.acks:
            ackers.setdefault(ack.epoch, set()).add(ack.node)
        for epoch, nodes in ackers.items():
            if len(nodes) > 1:
                problems.append(f"R1: several nodes acknowledged in epoch {epoch}: {sorted(nodes)}")
        epochs = [e.epoch for e in self.elections]
        if any(b <= a for a, b in itertools.pairwise(epochs)):
            problems.append(f"R1: epochs of successive primaries do not increase: {epochs}")
        return problems

    # ---- the network underneath ---------------------------------------------------------

    def _core(self, node: SimNode) -> ReplicaCore:
        if node.core is None or node.status == "down":
            raise SimError(f"node {node.node_id} is down")
        return node.core

    def _connect_links(self) -> None:
        """A connection comes up between two running nodes that can reach each other."""
        for a in self.ids:
            for b in self.ids:
                pair = frozenset((a, b))
                if (
                    a >= b
                    or pair in self._connected
                    or pair in self._held_links
                    or not self.reachable(a, b)
                ):
                    continue
                if self.nodes[a].running and self.nodes[b].running:
                    self._connected.add(pair)
                    for here, there in ((a, b), (b, a)):
                        node = self.nodes[here]
                        self._run(node, self._core(node).on_link(self.clock(here), there, up=True))

    def _link_down(self, node: SimNode, peer: int) -> None:
        self._run(node, self._core(node).on_link(self.clock(node.node_id), peer, up=False))
        node.streams.pop(peer, None)

    def _send(self, src: int, dst: int, message: Message) -> None:
        try:
            # As nodes of peer version 2 do: the bulk of records in binary frames.
            wire = message.to_wire(binary=True)
            [frame] = protocol.FrameDecoder(binary=True).feed(protocol.encode_frame(wire))
            decoded = messages.from_wire(frame)
        except (TypeError, ValueError, ProtocolViolation) as error:
            raise SimError(f"node {src} sent a bad message {message!r}: {error}") from error
        if decoded != message:
            raise SimError(f"node {src} sent {message!r}, which arrives as {decoded!r}")
        self._check_epoch_persisted(src, wire)
        self.sent.append((self.now, src, dst, wire))
        if frozenset((src, dst)) not in self._connected:
            return
        delay = self._link_delay.get((src, dst), self.delay)
        if self.jitter:
            delay += self.random.uniform(0, self.jitter)
        at = max(self.now + delay, self._link_last.get((src, dst), 0.0))
        self._order += 1
        in_flight = _InFlight(at, self._order, src, dst, decoded)
        if not self.reachable(src, dst):
            if self.stall_partitions:
                self._stalled.append(in_flight)
            return
        self._link_last[(src, dst)] = at
        heapq.heappush(self._queue, in_flight)

    def _check_epoch_persisted(self, src: int, message: dict[str, Any]) -> None:
        """R1: an epoch is persisted before anything is sent in it."""
        if message["type"] == "vote" and not message["granted"]:
            return  # a refusal names the candidate's epoch, not ours
        persisted = self.nodes[src].state.current_epoch
        if message.get("epoch", 0) > persisted:
            self.anomalies.append(
                f"R1: node {src} sent {message['type']} in epoch {message['epoch']} "
                f"but persisted only epoch {persisted}"
            )

    def _deliver(self, message: _InFlight) -> None:
        node = self.nodes[message.dst]
        if node.status == "down":
            return
        if not self.reachable(message.src, message.dst):
            if self.stall_partitions and frozenset((message.src, message.dst)) in self._connected:
                self._stalled.append(message)
            return
        if node.status == "frozen":
            node.held.append(message)
            return
        self._run(
            node,
            self._core(node).on_message(self.clock(node.node_id), message.src, message.message),
        )

    # ---- carrying out effects, as the runtime does ----------------------------------------

    def _run(self, node: SimNode, effects: list[Effect]) -> None:
        for effect in effects:
            self._carry_out(node, effect)
        if node.node_id in self.wiped and node.core is not None and node.core.joined:
            self.wiped.discard(node.node_id)  # it continues a primary's history now

    def _carry_out(self, node: SimNode, effect: Effect) -> None:
        core = self._core(node)
        if isinstance(effect, Send):
            self._send(node.node_id, effect.to, effect.message)
        elif isinstance(effect, Persist):
            node.state = effect.state
        elif isinstance(effect, BecomePrimary):
            if node.state.current_epoch < effect.epoch:
                self.anomalies.append(
                    f"R1: node {node.node_id} serves epoch {effect.epoch} before persisting it"
                )
            announced = [
                e for e in self.events if e.node == node.node_id and e.event == "became primary"
            ]
            force = bool(announced) and announced[-1].fields.get("force") == "true"
            self.elections.append(Election(self.now, node.node_id, effect.epoch, force))
            if node.node_id in self.wiped and not force:
                self.anomalies.append(
                    f"E4: node {node.node_id} leads epoch {effect.epoch} on a wiped database "
                    "before joining any primary"
                )
            node.pending_writes.clear()
            node.acked_upto = 0
            self._change_sync_set(node, effect.epoch, effect.members)
        elif isinstance(effect, ChangeSyncSet):
            self._change_sync_set(node, core.epoch, effect.members)
        elif isinstance(effect, StepDown):
            node.streams.clear()
            node.pending_writes.clear()  # their clients get an error and retry
        elif isinstance(effect, Acknowledge):
            self._acknowledge(node, core.epoch, effect.seq)
        elif isinstance(effect, StartStream):
            self._start_stream(node, effect)
        elif isinstance(effect, StopStream):
            node.streams.pop(effect.node, None)
        elif isinstance(effect, ApplyRecords):
            self._apply(node, effect.records)
        elif isinstance(effect, Rewind):
            self._rewind(node, effect.to_seq)
        elif isinstance(effect, ExpectSnapshot):
            node.expecting_snapshot = True
        elif isinstance(effect, ReceiveSnapshot):
            self._run(node, self._install_snapshot(node, effect.chunk))
        elif isinstance(effect, Log):
            self.events.append(LogEvent(self.now, node.node_id, effect.event, dict(effect.fields)))
        elif isinstance(effect, ClaimLeader | StoreSyncSet | ReleaseLeader):
            if node.io is None:
                raise SimError(f"node {node.node_id} has no arbiter I/O for {effect!r}")
            self._io_step(node, node.io.on_effect(self.clock(node.node_id), effect))
        elif isinstance(effect, DatabaseProven):
            pass  # the identity file: nothing the simulation reads
        else:  # pragma: no cover - a new effect type the simulator does not know
            raise SimError(f"unknown effect {effect!r}")

    def _seal(self, node: SimNode, epoch: int, payload: str, sync_set: SyncSet | None) -> int:
        """One batch on the primary: seal, broadcast, commit, report (``WritePath``)."""
        core = self._core(node)
        seq = node.log.position.seq + 1
        node.log.append((epoch, seq, payload))
        self.durable_at.setdefault((node.node_id, seq), self.now)
        effects = list(core.on_sealed(self.clock(node.node_id), seq, sync_set))
        for peer in sorted(node.streams):
            self._flush_stream(node, peer)
        effects += self._committed(node, None)
        self._run(node, effects)
        return seq

    def _committed(
        self,
        node: SimNode,
        sync_set: SyncSet | None,
        history: list[tuple[int, int]] | None = None,
    ) -> list[Effect]:
        """The node committed its log up to its position (``Durability.committed``).

        Without an fsync delay the commit is on disk at once. With one, the core
        hears ``on_committed`` now and ``on_local_durable`` when the fsync is done."""
        core = self._core(node)
        position = node.log.position
        delay = self._fsync_delays.get(node.node_id, self.fsync_delay)
        core.on_committed(position, sync_set, history)
        if not delay:
            self._on_disk(node, position.seq)
            return core.on_local_durable(self.clock(node.node_id), position, sync_set)
        self._fsync_order += 1
        fsync = _Fsync(
            self.now + delay, self._fsync_order, node.node_id, node.sync_generation, position
        )
        heapq.heappush(self._fsyncs, fsync)
        return []

    def _fsync_done(self, fsync: _Fsync) -> None:
        """A group fsync finished: report it to the core (``Durability._on_durable``)."""
        node = self.nodes[fsync.node]
        if node.status == "down" or fsync.generation != node.sync_generation:
            return  # the process died, or a rewind / snapshot made the report moot
        if node.status == "frozen":
            node.held_syncs.append(fsync)  # the fsync thread is stopped too
            return
        if fsync.position.seq > node.log.position.seq:
            raise SimError(f"node {node.node_id}: fsync of {fsync.position} past its log")
        self._on_disk(node, fsync.position.seq)
        self._run(node, self._core(node).on_local_durable(self.clock(node.node_id), fsync.position))

    def _on_disk(self, node: SimNode, seq: int) -> None:
        """The node's log up to ``seq`` is on disk (it may have been already)."""
        for on_disk in range(node.disk_seq + 1, seq + 1):
            self.synced_at.setdefault((node.node_id, on_disk), self.now)
        node.disk_seq = max(node.disk_seq, seq)

    def _replaced_log(self, node: SimNode) -> None:
        """A rewind or a snapshot install replaced the log, durably: pending
        durability reports are about records that may be gone (``Durability.forget``)."""
        node.sync_generation += 1
        node.disk_seq = min(node.disk_seq, node.log.position.seq)
        self._on_disk(node, node.log.position.seq)

    def _change_sync_set(self, node: SimNode, epoch: int, members: tuple[int, ...]) -> None:
        old = node.log.sync_set
        members = tuple(sorted(set(members)))
        databases = self._core(node).member_databases(members)
        sync_set = SyncSet(old.version + 1, members, epoch, databases)
        self._seal(node, epoch, sync_set_payload(sync_set), sync_set)

    def _acknowledge(self, node: SimNode, epoch: int, seq: int) -> None:
        if seq <= node.acked_upto:
            self.anomalies.append(f"node {node.node_id} acknowledged {seq} after {node.acked_upto}")
        if seq > node.log.position.seq:
            self.anomalies.append(f"node {node.node_id} acknowledged {seq} beyond its log")
        elif seq > node.disk_seq:
            self.anomalies.append(
                f"R2: node {node.node_id} acknowledged seq {seq} but has only up to seq "
                f"{node.disk_seq} on disk"
            )
        node.acked_upto = seq
        self.acks.append(AckEvent(self.now, node.node_id, epoch, seq))
        self._check_ack_set_holds(node, seq)
        if self.lease_timing is not None:
            self._check_fenced(node, epoch, seq)
        for write_seq in sorted(s for s in node.pending_writes if s <= seq):
            payload = node.pending_writes.pop(write_seq)
            record = node.log.get(write_seq)
            if record is None or record[2] != payload:
                raise SimError(f"node {node.node_id} acknowledged seq {write_seq}: not its write")
            self.acked.append(AckedWrite(self.now, node.node_id, record[0], write_seq, payload))
        if self.lease_timing is not None:
            self.anomalies += self._e3_problems(f"node {node.node_id} acknowledged seq {seq}")

    def _check_ack_set_holds(self, node: SimNode, seq: int) -> None:
        """R2: every member of the ack set holds what the primary acknowledges, on disk."""
        core = self._core(node)
        members = core.ack_set
        expected = node.log.get(seq)
        for member in sorted(members - {node.node_id}):
            other = self.nodes[member]
            held = other.log.get(seq)
            if held != expected:
                self.anomalies.append(
                    f"R2: node {node.node_id} acknowledged seq {seq} ({expected}) but "
                    f"ack set member {member} holds {held}"
                )
            elif other.disk_seq < seq:
                self.anomalies.append(
                    f"R2: node {node.node_id} acknowledged seq {seq} but ack set member "
                    f"{member} has only up to seq {other.disk_seq} on disk"
                )

    def _start_stream(self, node: SimNode, effect: StartStream) -> None:
        if effect.snapshot:
            log = node.log
            snapshot = Snapshot(
                self._core(node).epoch, log.position, 0, log.to_json().encode(), True
            )
            self._send(node.node_id, effect.node, snapshot)
            node.streams[effect.node] = log.position.seq
        else:
            first = node.log.first_seq
            if first is not None and effect.after_seq + 1 < first:
                self.anomalies.append(
                    f"node {node.node_id} streams after seq {effect.after_seq} to node "
                    f"{effect.node} but its log starts at {first}: a snapshot was needed"
                )
            node.streams[effect.node] = effect.after_seq
        self._flush_stream(node, effect.node)

    def _flush_stream(self, node: SimNode, peer: int) -> None:
        """Send ``peer`` every record after the last one it was sent."""
        core = self._core(node)
        records = node.log.after(node.streams[peer])
        for start in range(0, len(records), STREAM_CHUNK):
            chunk = [
                LogRecord(e, s, p.encode()) for e, s, p in records[start : start + STREAM_CHUNK]
            ]
            self._send(node.node_id, peer, core.stream_header(peer, chunk))
        node.streams[peer] = node.log.position.seq

    def _apply(self, node: SimNode, wire_records: list[LogRecord]) -> None:
        """A backup applies a frame's records in one transaction (``Follower._apply``)."""
        core = self._core(node)
        if core.role is not Role.BACKUP or not core.joined:
            return
        log = node.log
        records = [(r.epoch, r.seq, r.changeset.decode()) for r in wire_records]
        for record in records:
            held = log.get(record[1])
            if held is not None and held != record:
                self.anomalies.append(
                    f"G4: node {node.node_id} holds {held} and was sent {record} by "
                    f"node {core.primary}"
                )
        fresh = [r for r in records if r[1] > log.position.seq]
        if not fresh:
            # Nothing new to commit: say again how far we are (on disk), as the runtime.
            self._run(node, core.resend_ack(self.clock(node.node_id)))
            return
        position = log.position
        for epoch, seq, _payload in fresh:
            if seq != position.seq + 1 or epoch < position.epoch:
                # storage.apply_records refuses the whole frame (Diverged).
                why = f"record seq {seq} does not follow position seq {position.seq}"
                self._run(node, core.rejoin(self.clock(node.node_id), why))
                return
            position = Position(epoch, seq)
        was_epoch = log.position.epoch
        for record in fresh:
            log.append(record)
            self.durable_at.setdefault((node.node_id, record[1]), self.now)
        # As the runtime does: records that began an epoch come with storage's history.
        history = list(log.epochs) if log.position.epoch != was_epoch else None
        self._run(node, self._committed(node, log.sync_set, history))

    def _rewind(self, node: SimNode, to_seq: int) -> None:
        core = self._core(node)
        log = node.log
        first = log.first_seq
        if to_seq < log.position.seq and (first is None or to_seq + 1 < first):
            # Our own log was pruned past the point: forget the position, get a snapshot.
            node.sync_generation += 1
            local = self.clock(node.node_id)
            self._run(node, core.on_log_unusable(local, "own log too short to rewind"))
            return
        node.rolled_back += log.truncate(to_seq)
        self._replaced_log(node)
        self._run(node, self._log_replaced(node))

    def _log_replaced(self, node: SimNode) -> list[Effect]:
        log = node.log
        return self._core(node).on_log_replaced(
            self.clock(node.node_id), log.position, log.sync_set, list(log.epochs), log.first_seq
        )

    def _install_snapshot(self, node: SimNode, chunk: Snapshot) -> list[Effect]:
        if not node.expecting_snapshot:
            return []
        node.expecting_snapshot = False
        node.log = SimLog.from_json(chunk.data.decode())
        self._replaced_log(node)
        return self._log_replaced(node)
