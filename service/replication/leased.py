"""The etcd arbiter's rules (SPEC section 10, E1 to E6), as a pure ``Arbiter``.

Across hosts a partition looks like a crash, so the nodes cannot decide alone
who leads. Like Patroni, they keep two things in etcd, a Raft-replicated store:
a leased *leader key* and the *sync set*. This module holds the rules; the I/O
(``etcd_io.py``) carries out its effects and reports what the store answered.

- E1 Leader key. Leading is a successful transaction "leader key absent → ours,
  on our lease; stored epoch e → e + 1; sync set still at revision r" (the
  revision we checked our membership against). The epoch comes from the store,
  so it is unique across the cluster; it is persisted locally before serving.
- E2 Self-fencing. The deadline is ``sent + ttl * (1 - drift) - margin`` of the
  last successful renewal of our lease; past it the primary releases no
  acknowledgement and serves no read (``serving_until``). Past ``sent + ttl * (1
  + drift)`` the key is surely gone: it steps down. Safety of writes rests on
  epochs: backups refuse frames of a lower epoch (R1).
- E3 The sync set lives in the store. Every change sealed by the primary is
  written with a compare-and-swap on its revision, conditioned on the leader key
  being ours, and is in effect only once that write succeeded: a shrink is
  written at once (acks wait on the old, larger set until then); a grow only once
  every member it names holds its record (so every member the store names holds
  every acknowledged write). One write is in flight at a time, the newest change
  first: it supersedes the older ones.
- E4 Who may lead. Only a member of the stored set, with the very database the
  set recorded, neither unproven nor faulted; members publish their position
  under leased member keys and a member yields to a more current live one, for
  one lease TTL at most (one whose answers are cut keeps its key alive but never
  claims; any member holds every acknowledged write, so waiting is a preference).
- E5 Store unreachable: no renewal (writes and reads stop at the deadline), no
  claim, no shrink. ``status`` says "arbiter unreachable".
- E6 Full restart: a member of the stored set leads as soon as it is back.

A store that holds no sync set yet (a new cluster, or a new prefix) is
bootstrapped only when every configured node has published a member key: the
most current of them claims, as R6 would. Reads (``ArbiterView``) guide whom to
wait for and what to show; every decision is the result of a write.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .arbiter import (
    Arbiter,
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
from .effects import ClaimLeader, Effect, Log, ReleaseLeader, StoreSyncSet
from .election import position_key
from .messages import Message
from .types import Role, SyncSet


@dataclass(frozen=True)
class LeaseTiming:
    """The lease and the clock bounds the deadline is computed with (E2)."""

    ttl: float = 3.0
    # The most two clocks may run apart, as a fraction (0.01: 1%).
    drift: float = 0.01
    # Subtracted from the deadline: a GC pause or a slow syscall between checking
    # the deadline and answering a client.
    margin: float = 0.3
    # How often the I/O renews the lease and reads the store.
    renew_interval: float = 1.0
    # The most the I/O waits for the store per request before reporting it unreachable.
    request_timeout: float = 0.5

    def problems(self) -> list[str]:
        """What makes these settings unsafe, as Patroni refuses
        ``loop_wait + 2 * retry_timeout > ttl`` at start."""
        found = []
        if self.ttl < 2:
            found.append(f"lease ttl {self.ttl} s is below etcd's minimum of 2 s")
        if not 0 <= self.drift < 0.5:
            found.append(f"clock drift {self.drift} must be in [0, 0.5)")
        if self.margin < 0:
            found.append(f"margin {self.margin} must not be negative")
        budget = self.renew_interval + 2 * self.request_timeout
        if budget + self.margin >= self.ttl * (1 - self.drift):
            found.append(
                f"renew_interval + 2 * request_timeout + margin ({budget + self.margin:g} s) "
                f"must be below ttl * (1 - drift) ({self.ttl * (1 - self.drift):g} s): a "
                "primary would pass its deadline between two renewals"
            )
        return found


class LeasedArbiter(Arbiter):
    """E1 to E6 over a store with leases and compare-and-swap (etcd)."""

    def __init__(self, timing: LeaseTiming) -> None:
        self.timing = timing
        self.view: ArbiterView | None = None
        self.unreachable: str | None = "no answer from the arbiter yet"
        # Sent time of the last successful renewal of our lease (None: none yet).
        self.renewed_at: float | None = None
        self.claiming: int | None = None  # the epoch of a claim in flight
        self.next_claim_at = 0.0
        self.leading_epoch: int | None = None
        # The sync set as the store holds it, as far as our own writes tell: its
        # revision, and the seq of the change our last successful write stored.
        self.stored_revision = 0
        self.stored_seqs: set[int] = set()
        # The (seq, epoch) of the sync set write in flight, if any.
        self.storing: tuple[int, int] | None = None
        # Every change sealed in this reign and not yet stored, by seq.
        self.sealed: dict[int, SyncSet] = {}
        # Since when (this electing spell) we yield to each more current member.
        self.yielding_since: dict[int, float] = {}

    # ---- who may lead ------------------------------------------------------------------

    def enter_electing(self, now: float, previous_primary: int | None) -> None:
        self.claiming = None
        self.yielding_since = {}

    def leave_electing(self) -> None:
        self.claiming = None
        self.yielding_since = {}

    def on_link(self, now: float, peer: int, up: bool, out: list[Effect]) -> None:
        """Links say nothing about who may lead here: the store does."""

    def on_gap(self, now: float) -> None:
        """The deadline is on the monotonic clock, which ran on while we were stopped:
        a thawed primary is past it and releases nothing until it renews."""

    def on_message(self, now: float, sender: int, msg: Message, out: list[Effect]) -> bool:
        """No election messages: probes and votes of peer voting are ignored."""
        return False

    def electing_tick(self, now: float, out: list[Effect]) -> None:
        core = self.core
        if self.claiming is not None or now < self.next_claim_at:
            return
        view = self.view
        if view is not None and self.unreachable is None and view.leader == core.node_id:
            # Our own key, from a claim whose answer we never got (or from before a
            # restart): we do not serve on it, so give it back and claim afresh.
            self.next_claim_at = now + self.timing.request_timeout
            core.explain("releasing a leader key this node holds but does not serve on")
            out.append(ReleaseLeader())
            return
        why, waiting_for = self._may_not_lead(now)
        if why is not None:
            core.explain(why, waiting_for=waiting_for)
            return
        assert view is not None
        epoch = max(view.epoch, core.epoch, core.state.voted_epoch) + 1
        self._claim(now, epoch, view.epoch, view.sync_revision, out)

    def _claim(
        self, now: float, epoch: int, expected: int, revision: int | None, out: list[Effect]
    ) -> None:
        self.claiming = epoch
        self.next_claim_at = now + self.timing.request_timeout
        self.core.explain(f"claiming the leader key for epoch {epoch}", waiting_for=())
        out.append(ClaimLeader(epoch, expected, revision))

    def _may_not_lead(self, now: float) -> tuple[str | None, tuple[int, ...]]:
        """Why this node may not claim the leader key now (E4) and whom it waits
        for, or (None, ())."""
        core = self.core
        view = self.view
        if self.unreachable is not None or view is None:
            return f"arbiter unreachable: {self.unreachable or 'no answer yet'}", ()
        if self.renewed_at is None:
            return "waiting for a lease from the arbiter", ()
        if view.leader is not None:
            holder = f"node {view.leader} holds the leader key (epoch {view.leader_epoch})"
            return holder, ()
        if core.fault is not None:
            return f"this node cannot write: {core.fault}", ()
        if core.unproven is not None:
            return f"this node cannot count as a sync set member: {core.unproven}", ()
        me = self._me()
        sync_set = view.sync_set
        if sync_set is None:
            return self._may_not_bootstrap(view, me)
        members = ",".join(map(str, sync_set.members))
        if core.node_id not in sync_set.members:
            return (
                f"not a member of the sync set the arbiter holds (version {sync_set.version}: "
                f"{members}); waiting for node {members} to lead",
                sync_set.members,
            )
        recorded = sync_set.database_of(core.node_id)
        if recorded is not None and recorded != core.database:
            return (
                f"this node's database is not the one sync set version {sync_set.version} "
                "names (wiped or replaced); restore its data, or force a promotion",
                tuple(m for m in sync_set.members if m != core.node_id),
            )
        for member in sync_set.members:
            info = view.members.get(member)
            if member == core.node_id or info is None or not _counts(info, sync_set):
                continue
            if position_key(info.position, member) > position_key(
                me.position, me.node
            ) and self._patient(now, member):
                return f"node {member} is more current: waiting for it to lead", (member,)
        return None, ()

    def _patient(self, now: float, member: int) -> bool:
        """Yield to a more current member for one lease TTL at most. Its member key
        lives as long as its requests reach the store, even when no answer reaches it
        (a one-way cut): then it never claims. Every member of the stored set holds
        every acknowledged write (E3), so the ranking only spares the rewind of
        records nobody acknowledged; it must not stop the cluster."""
        since = self.yielding_since.setdefault(member, now)
        return now - since < self.timing.ttl

    def _may_not_bootstrap(
        self, view: ArbiterView, me: MemberInfo
    ) -> tuple[str | None, tuple[int, ...]]:
        """No sync set stored yet: every configured node must have published, and the
        most current takes it (as R6 for a cluster new to the arbiter)."""
        core = self.core
        missing = tuple(n for n in core.nodes if n != core.node_id and n not in view.members)
        if missing:
            return (
                "the arbiter holds no sync set yet: waiting for node "
                + ", ".join(map(str, missing))
                + " to publish its position",
                missing,
            )
        best = max(
            [me, *(view.members[n] for n in core.nodes if n != core.node_id)],
            key=lambda info: position_key(info.position, info.node),
        )
        if best.node != core.node_id:
            return (
                f"the arbiter holds no sync set yet: node {best.node} is the most current",
                (best.node,),
            )
        return None, ()

    def _me(self) -> MemberInfo:
        core = self.core
        return MemberInfo(core.node_id, core.position, core.database, core.fault, core.unproven)

    def force_promote(self, now: float, out: list[Effect]) -> None:
        view = self.view
        if view is None or self.unreachable is not None:
            out.append(
                Log(
                    "forced promotion impossible",
                    {"node": self.core.node_id, "why": "arbiter unreachable"},
                )
            )
            return
        epoch = max(view.epoch, self.core.epoch, self.core.state.voted_epoch) + 1
        self._claim(now, epoch, view.epoch, None, out)

    # ---- the store's answers -------------------------------------------------------------

    def on_event(self, now: float, event: ArbiterEvent, out: list[Effect]) -> None:
        core = self.core
        match event:
            case ArbiterView():
                if self.unreachable is not None:
                    out.append(Log("arbiter reachable", {"node": core.node_id}))
                self.unreachable = None
                self.view = event
                self._check_leader(now, event, out)
            case ArbiterUnreachable(why=why):
                if self.unreachable is None:
                    out.append(Log("arbiter unreachable", {"node": core.node_id, "why": why}))
                self.unreachable = why
            case LeaseRenewed(sent_at=sent_at):
                self.renewed_at = max(self.renewed_at or sent_at, sent_at)
            case LeaseLost(why=why):
                self.renewed_at = None
                if core.role is Role.PRIMARY:
                    core.become_electing(now, f"lost the leader lease: {why}", out)
            case Claimed(epoch=epoch):
                self._claimed(now, epoch, out)
            case ClaimRefused(why=why):
                self.claiming = None
                core.explain(f"the leader key was not ours to take: {why}")
            case SyncSetStored() | SyncSetRefused() if (event.seq, event.epoch) != self.storing:
                # Not the write in flight: one of an earlier reign, answered late (a
                # later reign may have sealed a change at the same seq after a rewind).
                fields = {"node": core.node_id, "seq": event.seq, "epoch": event.epoch}
                out.append(Log("late sync set answer", fields))
            case SyncSetStored(seq=seq, revision=revision):
                self.storing = None
                self.stored_revision = revision
                self.stored_seqs.add(seq)
            case SyncSetRefused(seq=seq, why=why, retry=retry):
                self.storing = None
                out.append(
                    Log("sync set not stored", {"node": core.node_id, "seq": seq, "why": why})
                )
                if not retry and core.role is Role.PRIMARY:
                    # The store refused the compare: the leader key or the set is no
                    # longer what this reign wrote. Someone else leads.
                    core.become_electing(now, f"the arbiter refused our sync set: {why}", out)

    def _check_leader(self, now: float, view: ArbiterView, out: list[Effect]) -> None:
        """A primary whose key is gone or taken has been replaced: step down."""
        core = self.core
        if core.role is not Role.PRIMARY or self.leading_epoch is None:
            return
        if view.leader == core.node_id and view.leader_epoch == self.leading_epoch:
            return
        if view.epoch < self.leading_epoch:
            # A read the store served before our claim, answered after it (requests on
            # one connection are answered in any order): it says nothing of our key.
            return
        holder = "nobody" if view.leader is None else f"node {view.leader}"
        core.become_electing(now, f"the leader key is held by {holder}", out)

    def _claimed(self, now: float, epoch: int, out: list[Effect]) -> None:
        core = self.core
        self.claiming = None
        if core.role is not Role.ELECTING or epoch <= core.epoch:
            # We follow a primary, or learned of an epoch at least as new while the
            # claim was settled: leading it would take our epoch backwards (R1).
            out.append(ReleaseLeader())
            return
        if core.fault is not None:
            # The disk refused a write since the claim: a node that cannot write is
            # made primary by no election; another member may take the key.
            out.append(Log("claim given back", {"node": core.node_id, "why": core.fault}))
            out.append(ReleaseLeader())
            return
        view = self.view
        stored = view.sync_set if view is not None else None
        self.stored_revision = view.sync_revision if view is not None else 0
        self.stored_seqs = set()
        self.sealed = {}
        self.storing = None
        self.leading_epoch = epoch
        core.persist_vote(epoch, core.node_id, out)
        # The first record names this node and every member known to hold exactly
        # what it holds (its published position); acks wait for the stored set's
        # members until that record's sync set is stored (E3).
        members = [core.node_id]
        counted = set(members)
        if stored is not None:
            counted.update(stored.members)
            for member in stored.members:
                info = view.members.get(member) if view is not None else None
                if (
                    member != core.node_id
                    and info is not None
                    and info.position == core.position
                    and _counts(info, stored)
                ):
                    members.append(member)
                    # The record names it with the database it published: a wiped
                    # disk later is then not this member (E4).
                    core.learn_database(member, info.database)
        core.become_primary(
            now,
            epoch,
            tuple(sorted(members)),
            force=False,
            out=out,
            counted=tuple(sorted(counted)),
        )

    # ---- a primary's reign ---------------------------------------------------------------

    def serving_until(self) -> float:
        if self.renewed_at is None:
            return -math.inf
        t = self.timing
        return self.renewed_at + t.ttl * (1 - t.drift) - t.margin

    def _surely_expired(self, now: float) -> bool:
        if self.renewed_at is None:
            return True
        return now > self.renewed_at + self.timing.ttl * (1 + self.timing.drift)

    def primary_tick(self, now: float, out: list[Effect]) -> None:
        core = self.core
        if self._surely_expired(now):
            core.become_electing(now, "the leader lease ran out without a renewal", out)
            return
        self._store_next(out)

    def _store_next(self, out: list[Effect]) -> None:
        """Write the newest sealed change that may be written (E3), one at a time."""
        core = self.core
        if self.storing is not None:
            return
        for seq, members in reversed(core.pending_changes):
            sync_set = self.sealed.get(seq)
            if seq in self.stored_seqs or sync_set is None:
                return
            grow = not set(members) <= set(core.in_sync)
            if grow and not all(self._durable(m) >= seq for m in members):
                continue
            self.storing = (seq, sync_set.epoch)
            out.append(StoreSyncSet(seq, sync_set, self.stored_revision))
            return

    def _durable(self, node: int) -> int:
        core = self.core
        if node == core.node_id:
            return core.durable_seq
        durable = core.backup_durable(node)
        return -1 if durable is None else durable

    def leaving_primary(self, out: list[Effect]) -> None:
        self.leading_epoch = None
        self.storing = None
        out.append(ReleaseLeader())

    # ---- is a sync-set change in effect ------------------------------------------------------

    def change_in_effect(
        self, seq: int, members: tuple[int, ...], durable: Callable[[int], int]
    ) -> bool:
        return seq in self.stored_seqs

    def on_change_sealed(self, now: float, seq: int, sync_set: SyncSet, out: list[Effect]) -> None:
        self.sealed[seq] = sync_set
        self._store_next(out)

    # ---- status ---------------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        view = self.view
        arbiter: dict[str, Any] = {
            "mode": "etcd",
            "reachable": self.unreachable is None,
            "unreachable": self.unreachable,
            "leader": view.leader if view is not None else None,
            "leader_epoch": view.leader_epoch if view is not None else None,
            "leader_ttl": view.leader_ttl if view is not None else None,
            "sync_set": (
                None
                if view is None or view.sync_set is None
                else {"version": view.sync_set.version, "members": list(view.sync_set.members)}
            ),
        }
        if self.core.role is Role.PRIMARY:
            arbiter["serving_for"] = max(0.0, round(self.serving_until() - now, 3))
        return {"arbiter": arbiter}


def _counts(info: MemberInfo, sync_set: SyncSet) -> bool:
    """The published member is the one ``sync_set`` names and may lead (E4)."""
    recorded = sync_set.database_of(info.node)
    return (
        info.fault is None
        and info.unproven is None
        and (recorded is None or recorded == info.database)
    )
