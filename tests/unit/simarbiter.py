"""The arbiter's I/O against the store, for one node: a model of ``etcd_io.py``.

``LeasedArbiter`` (``service/replication/leased.py``) is pure: it emits
``ClaimLeader``, ``StoreSyncSet`` and ``ReleaseLeader`` and expects the store's
answers back as ``ArbiterEvent`` inputs. ``ArbiterIO`` is what turns one into the
other, over ``SimStore`` (``simstore.py``, etcd's semantics). It is
transport-agnostic: it hands out ``Request`` objects (a store operation each) and
takes their ``Answer`` back; the simulator carries them with delays, partitions
and freezes, so an answer may never come (the outcome is then unknown). Its
clock is the node's own (monotonic, drifting) clock.

Keys, under ``prefix``:

* ``leader``: ``{"node": n, "epoch": e}`` on the leader's lease;
* ``epoch``: the highest epoch taken (``"e"``), advanced by every claim;
* ``sync``: the sync set (version, members, epoch, databases), written with a
  compare-and-swap on its ``mod_revision``;
* ``members/<id>``: on each node's lease, what it publishes (``MemberInfo``).

What it does, and reports:

* One lease per node, granted at start and kept alive every
  ``renew_interval``: ``LeaseRenewed(sent_at)`` with the time the keepalive was
  *sent* (our clock), the only time the fencing deadline may count from. A lease
  the store no longer knows is ``LeaseLost``, reported before a new lease is
  granted (a renewal of the new lease must never move the deadline of a reign
  whose key was on the old one).
* Every ``renew_interval`` it also publishes the member key and reads the prefix
  (and the leader lease's TTL): ``ArbiterView``.
* ``ClaimLeader``: one transaction "leader absent, epoch still the expected one
  (absent when 0: a value compare on a missing key fails in etcd), sync set
  still at the revision checked (absent when 0, unchecked when None) → leader
  on our lease, epoch advanced". ``Claimed`` or ``ClaimRefused``; an unknown
  outcome is settled by reading the leader key back.
* ``StoreSyncSet``: "leader is exactly ours (node and epoch), sync set at the
  expected revision → put". The failure branch reads the set back: if it is
  already ours (an earlier attempt whose answer was lost), it is stored.
  Unknown outcome → read back: ours → ``SyncSetStored``, else
  ``SyncSetRefused(retry=True)``.
* ``ReleaseLeader``: delete the leader key if it is on our lease.
* Any request without an answer within ``request_timeout``: ``ArbiterUnreachable``.

Requests may be answered in any order (the simulator can delay each differently).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from service.replication.arbiter import (
    ArbiterEvent,
    ArbiterUnreachable,
    ArbiterView,
    Claimed,
    ClaimRefused,
    LeaseLost,
    LeaseRenewed,
    MemberInfo,
    SyncSetRefused,
    SyncSetStored,
)
from service.replication.effects import ClaimLeader, Effect, ReleaseLeader, StoreSyncSet
from service.replication.leased import LeaseTiming
from service.replication.types import Position, SyncSet
from tests.unit.simstore import (
    Compare,
    Delete,
    Get,
    KeyValue,
    LeaseNotFound,
    Operation,
    Put,
    SimStore,
    TxnResult,
)

PREFIX = "chat/"


# ---- what travels between a node and the store -------------------------------------------


@dataclass(frozen=True)
class Grant:
    ttl: float


@dataclass(frozen=True)
class KeepAlive:
    lease: int


@dataclass(frozen=True)
class TimeToLive:
    lease: int


@dataclass(frozen=True)
class Txn:
    compares: list[Compare]
    success: list[Operation]
    failure: list[Operation] = field(default_factory=list)


StoreOp = Grant | KeepAlive | TimeToLive | Txn


@dataclass(frozen=True)
class Request:
    id: int
    op: StoreOp


@dataclass(frozen=True)
class Answer:
    id: int
    # Grant: the lease id; KeepAlive / TimeToLive: seconds (0 or less: gone); Txn:
    # its result, or the error it met.
    result: int | float | TxnResult | LeaseNotFound


def serve(store: SimStore, now: float, op: StoreOp) -> int | float | TxnResult | LeaseNotFound:
    """The store carries out one request at ``now`` (its clock)."""
    match op:
        case Grant(ttl=ttl):
            return store.grant(now, ttl)
        case KeepAlive(lease=lease):
            return store.keepalive(now, lease)
        case TimeToLive(lease=lease):
            return store.time_to_live(now, lease)
        case Txn():
            try:
                return store.txn(now, op.compares, op.success, op.failure)
            except LeaseNotFound as error:
                return error


# ---- values --------------------------------------------------------------------------------


def leader_value(node: int, epoch: int) -> str:
    return json.dumps({"node": node, "epoch": epoch}, sort_keys=True, separators=(",", ":"))


def sync_value(sync_set: SyncSet) -> str:
    return json.dumps(
        {
            "version": sync_set.version,
            "members": list(sync_set.members),
            "epoch": sync_set.epoch,
            "databases": [list(pair) for pair in sync_set.databases],
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def parse_sync(value: str) -> SyncSet:
    data = json.loads(value)
    return SyncSet(
        int(data["version"]),
        tuple(int(m) for m in data["members"]),
        int(data["epoch"]),
        tuple((int(n), str(d)) for n, d in data["databases"]),
    )


def member_value(info: MemberInfo) -> str:
    return json.dumps(
        {
            "position": [info.position.epoch, info.position.seq],
            "database": info.database,
            "fault": info.fault,
            "unproven": info.unproven,
        },
        sort_keys=True,
    )


def parse_member(node: int, value: str) -> MemberInfo:
    data = json.loads(value)
    return MemberInfo(
        node, Position(*data["position"]), data["database"], data["fault"], data["unproven"]
    )


def view_of(kvs: list[KeyValue], leader_ttl: float | None, prefix: str = PREFIX) -> ArbiterView:
    """What a read of the prefix says (``leader_ttl``: what the leader's lease has left)."""
    by_key = {kv.key[len(prefix) :]: kv for kv in kvs}
    leader = by_key.get("leader")
    leader_data: dict[str, Any] = json.loads(leader.value) if leader is not None else {}
    epoch = by_key.get("epoch")
    sync = by_key.get("sync")
    members = {}
    for name, kv in by_key.items():
        if name.startswith("members/"):
            node = int(name.removeprefix("members/"))
            members[node] = parse_member(node, kv.value)
    return ArbiterView(
        leader=leader_data.get("node"),
        leader_epoch=int(leader_data.get("epoch", 0)),
        epoch=int(epoch.value) if epoch is not None else 0,
        sync_set=parse_sync(sync.value) if sync is not None else None,
        sync_revision=sync.mod_revision if sync is not None else 0,
        members=members,
        leader_ttl=leader_ttl if leader is not None else None,
    )


# ---- the I/O of one node ---------------------------------------------------------------------

Kind = Literal[
    "grant", "keepalive", "member", "read", "ttl", "claim", "claim-check", "store",
    "store-check", "release",
]  # fmt: skip


@dataclass
class _Pending:
    kind: Kind
    sent_at: float
    deadline: float
    lease: int | None = None
    effect: Effect | None = None
    kvs: list[KeyValue] = field(default_factory=list)


@dataclass
class Step:
    """What one input to the I/O produced: requests to send, events for the core."""

    requests: list[Request] = field(default_factory=list)
    events: list[ArbiterEvent] = field(default_factory=list)


class ArbiterIO:
    """The arbiter I/O of one node (volatile: a restart makes a new one)."""

    _ids = itertools.count(1)

    def __init__(self, node_id: int, timing: LeaseTiming, prefix: str = PREFIX) -> None:
        self.node_id = node_id
        self.timing = timing
        self.prefix = prefix
        self.lease: int | None = None
        self.granting = False
        self.next_cycle = float("-inf")
        self.pending: dict[int, _Pending] = {}

    def key(self, name: str) -> str:
        return self.prefix + name

    # ---- inputs --------------------------------------------------------------------------

    def tick(self, now: float, me: MemberInfo) -> Step:
        step = Step()
        for request_id, pending in sorted(self.pending.items()):
            if pending.deadline <= now:
                del self.pending[request_id]
                self._timed_out(now, pending, step)
        if self.lease is None:
            if not self.granting:
                self.granting = True
                self._send(now, step, "grant", Grant(self.timing.ttl))
            return step
        if now >= self.next_cycle:
            self.next_cycle = now + self.timing.renew_interval
            lease = self.lease
            self._send(now, step, "keepalive", KeepAlive(lease), lease=lease)
            put = Put(self.key(f"members/{self.node_id}"), member_value(me), lease)
            self._send(now, step, "member", Txn([], [put]), lease=lease)
            self._send(now, step, "read", Txn([], [Get(self.prefix, prefix=True)]))
        return step

    def on_effect(self, now: float, effect: Effect) -> Step:
        step = Step()
        match effect:
            case ClaimLeader():
                if self.lease is None:
                    step.events.append(ClaimRefused("this node holds no lease yet"))
                else:
                    self._send(now, step, "claim", self._claim_txn(effect), self.lease, effect)
            case StoreSyncSet():
                self._send(now, step, "store", self._store_txn(effect), effect=effect)
            case ReleaseLeader():
                if self.lease is not None:
                    leader = self.key("leader")
                    release = Txn([Compare(leader, "lease", self.lease)], [Delete(leader)])
                    self._send(now, step, "release", release, self.lease)
        return step

    def on_answer(self, now: float, answer: Answer) -> Step:
        step = Step()
        pending = self.pending.pop(answer.id, None)
        if pending is None:
            return step  # timed out already: its outcome was settled another way
        result = answer.result
        match pending.kind:
            case "grant":
                self.granting = False
                assert isinstance(result, int)
                self.lease = result
                self.next_cycle = now  # publish and read at once
                step.events.append(LeaseRenewed(pending.sent_at))
            case "keepalive":
                if pending.lease != self.lease:
                    pass  # a renewal of a lease already given up
                elif isinstance(result, float) and result > 0:
                    step.events.append(LeaseRenewed(pending.sent_at))
                else:
                    self.lease = None
                    step.events.append(LeaseLost(f"lease {pending.lease:x} expired at the store"))
            case "read":
                self._read(now, pending, result, step)
            case "ttl":
                ttl = result if isinstance(result, float) and result > 0 else None
                step.events.append(view_of(pending.kvs, ttl, self.prefix))
            case "claim" | "claim-check":
                self._claim_answered(now, pending, result, step)
            case "store" | "store-check":
                self._store_answered(now, pending, result, step)
            case "member" | "release":
                pass  # a lost lease shows in the next keepalive
        return step

    # ---- requests --------------------------------------------------------------------------

    def _send(
        self,
        now: float,
        step: Step,
        kind: Kind,
        op: StoreOp,
        lease: int | None = None,
        effect: Effect | None = None,
    ) -> int:
        request_id = next(self._ids)
        deadline = now + self.timing.request_timeout
        self.pending[request_id] = _Pending(kind, now, deadline, lease, effect)
        step.requests.append(Request(request_id, op))
        return request_id

    def _claim_txn(self, claim: ClaimLeader) -> Txn:
        leader, epoch, sync = self.key("leader"), self.key("epoch"), self.key("sync")
        compares = [Compare(leader, "create", 0)]
        if claim.expected_epoch == 0:
            compares.append(Compare(epoch, "create", 0))
        else:
            compares.append(Compare(epoch, "value", str(claim.expected_epoch)))
        if claim.sync_revision is not None:
            compares.append(Compare(sync, "mod", claim.sync_revision))
        assert self.lease is not None
        success: list[Operation] = [
            Put(leader, leader_value(self.node_id, claim.epoch), self.lease),
            Put(epoch, str(claim.epoch)),
        ]
        return Txn(compares, success, [Get(leader), Get(epoch), Get(sync)])

    def _store_txn(self, store: StoreSyncSet) -> Txn:
        leader, sync = self.key("leader"), self.key("sync")
        compares = [
            Compare(leader, "value", leader_value(self.node_id, store.sync_set.epoch)),
            Compare(sync, "mod", store.expected_revision),
        ]
        return Txn(compares, [Put(sync, sync_value(store.sync_set))], [Get(sync), Get(leader)])

    # ---- answers ------------------------------------------------------------------------------

    def _read(self, now: float, pending: _Pending, result: object, step: Step) -> None:
        assert isinstance(result, TxnResult)
        kvs = result.found[0]
        leader = next((kv for kv in kvs if kv.key == self.key("leader")), None)
        if leader is None or not leader.lease:
            step.events.append(view_of(kvs, None, self.prefix))
            return
        request_id = self._send(now, step, "ttl", TimeToLive(leader.lease))
        self.pending[request_id].kvs = kvs

    def _claim_answered(self, now: float, pending: _Pending, result: object, step: Step) -> None:
        claim = pending.effect
        assert isinstance(claim, ClaimLeader)
        if isinstance(result, LeaseNotFound):
            step.events.append(ClaimRefused(str(result)))
            return
        assert isinstance(result, TxnResult)
        mine = leader_value(self.node_id, claim.epoch)
        if pending.kind == "claim-check":
            found = result.found[0]
            if found and found[0].value == mine:
                step.events.append(Claimed(claim.epoch))
            else:
                step.events.append(ClaimRefused("the claim's outcome was unknown: not ours"))
        elif result.succeeded:
            step.events.append(Claimed(claim.epoch))
        else:
            leader, epoch, sync = result.found
            why = []
            if leader:
                why.append(f"leader key held: {leader[0].value}")
            if epoch and epoch[0].value != str(claim.expected_epoch):
                why.append(f"epoch is {epoch[0].value}, not {claim.expected_epoch}")
            if claim.sync_revision is not None and (sync[0].mod_revision if sync else 0) != (
                claim.sync_revision
            ):
                why.append("the sync set changed")
            step.events.append(ClaimRefused("; ".join(why) or "compare failed"))

    def _store_answered(self, now: float, pending: _Pending, result: object, step: Step) -> None:
        store = pending.effect
        assert isinstance(store, StoreSyncSet)
        assert isinstance(result, TxnResult)
        if pending.kind == "store" and result.succeeded:
            step.events.append(
                SyncSetStored(store.seq, result.revision, epoch=store.sync_set.epoch)
            )
            return
        found = result.found[0]
        if found and found[0].value == sync_value(store.sync_set):
            # Ours already: an earlier attempt landed though its answer was lost.
            step.events.append(
                SyncSetStored(store.seq, found[0].mod_revision, epoch=store.sync_set.epoch)
            )
        elif pending.kind == "store-check":
            step.events.append(
                SyncSetRefused(
                    store.seq, "outcome unknown: not stored", True, epoch=store.sync_set.epoch
                )
            )
        else:
            leader = result.found[1]
            holder = leader[0].value if leader else "nobody"
            step.events.append(
                SyncSetRefused(
                    store.seq,
                    f"compare failed (leader key: {holder})",
                    False,
                    epoch=store.sync_set.epoch,
                )
            )

    def _timed_out(self, now: float, pending: _Pending, step: Step) -> None:
        why = f"no answer to a {pending.kind} request within {self.timing.request_timeout:g} s"
        step.events.append(ArbiterUnreachable(why))
        match pending.kind:
            case "grant":
                self.granting = False
            case "ttl":
                step.events.append(view_of(pending.kvs, None, self.prefix))
            case "claim":
                # It may have been applied: read the leader key back.
                self._send(
                    now,
                    step,
                    "claim-check",
                    Txn([], [Get(self.key("leader"))]),
                    effect=pending.effect,
                )
            case "claim-check":
                step.events.append(ClaimRefused("the claim's outcome is unknown"))
            case "store":
                self._send(
                    now,
                    step,
                    "store-check",
                    Txn([], [Get(self.key("sync"))]),
                    effect=pending.effect,
                )
            case "store-check":
                assert isinstance(pending.effect, StoreSyncSet)
                step.events.append(
                    SyncSetRefused(
                        pending.effect.seq,
                        "outcome unknown: no answer",
                        True,
                        epoch=pending.effect.sync_set.epoch,
                    )
                )
