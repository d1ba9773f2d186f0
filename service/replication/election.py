"""Peer voting: the default arbiter, where the nodes elect a primary among themselves.

This is where the election rule of SPEC section 6 lives (R5, R6, and one vote
per epoch). It is exact on one host, where a closed connection proves a dead
process; across hosts a partition looks the same, which is why SPEC section 10
puts the decision in etcd instead (another ``Arbiter``).

An electing node probes its peers, then decides from what it hears:

1. a peer is primary in an epoch at least ours → follow it;
2. a peer still follows a primary → wait (it will suspect it soon, or it is right);
3. R5: some reachable nodes are confirmed → the most current of them wins (ties:
   lowest id);
4. R6: nobody is confirmed → the newest sync set any reachable node knows is
   examined; once all its members answer (and each is the very member the set
   recorded: ``member_problem``), its most current member wins. A node just
   started waits up to ``election_timeout`` for its links before its first
   round: alone in its set, it would otherwise decide before seeing a primary
   that others elected without it.
5. A node made by ``ops.restore`` wins only with a majority of the nodes empty
   or holding its history behind it (``_restore_backed``): its sync set was
   written by the restore, not by a primary.

The winner takes epoch = highest seen + 1, persists it with its own vote, and
asks every node that answered for its vote. A voter grants once per epoch
(persisted), and only if it is not primary, does not hear from a live primary,
and does not hold a newer position. Any refusal ends the campaign.

A sync-set change is in effect once every member it names holds its record on
disk: the record is then where any future R6 election will find it.

Rounds are numbered across electing spells, so an answer to an earlier round
(or spell) never counts in the current one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .arbiter import Arbiter, ArbiterEvent
from .effects import Effect, Log, Send
from .messages import Message, Probe, ProbeReply, Vote, VoteRequest
from .types import Position, Role, SyncSet


def position_key(position: Position, node: int) -> tuple[int, int, int]:
    """Sort key: higher position first wins, ties broken by the lowest node id."""
    return (position.epoch, position.seq, -node)


def sync_set_key(sync_set: SyncSet) -> tuple[int, int]:
    return (sync_set.epoch, sync_set.version)


@dataclass(frozen=True)
class ProbeView:
    """One node's answer to a probe (or this node's own view)."""

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

    @classmethod
    def of(cls, node: int, reply: ProbeReply) -> ProbeView:
        return cls(
            node,
            reply.epoch,
            reply.role,
            reply.primary,
            reply.position,
            reply.eligible,
            reply.sync_set,
            reply.database,
            reply.unproven,
            reply.fault,
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
class Campaign:
    epoch: int
    asked: set[int]
    granted: set[int] = field(default_factory=set)
    deadline: float = 0.0
    force: bool = False


@dataclass
class Spell:
    """One electing spell: made on becoming electing, dropped on leaving."""

    next_round_at: float
    # When the current probe round began (0: no round open).
    round_started: float = 0.0
    probes: dict[int, ProbeView] = field(default_factory=dict)
    campaign: Campaign | None = None


class PeerVoting(Arbiter):
    """R5/R6 elections by probes and votes among the nodes themselves."""

    def __init__(self) -> None:
        # Probe rounds, numbered across spells (a gap starts a new one too).
        self.round = 0
        # Set by a clock gap: decide nothing alone until some peer answered a probe.
        self.solo_blocked = False
        # The primary this node followed last: not waited for in a round (when it is
        # frozen, that is the failover).
        self.last_primary: int | None = None
        self.logged_waiting: tuple[int, ...] = ()
        self.spell: Spell | None = None
        # Until this time (None: passed) the first round waits for links to every
        # peer (``electing_tick``); set by the first electing spell, at start.
        self.linking_until: float | None = None
        self._started = False

    # ---- entering and leaving -----------------------------------------------------------

    def enter_electing(self, now: float, previous_primary: int | None) -> None:
        self.spell = Spell(next_round_at=now)
        if previous_primary is not None:
            self.last_primary = previous_primary
        if not self._started:
            self._started = True
            self.linking_until = now + self.core.timing.election_timeout

    def leave_electing(self) -> None:
        self.spell = None

    def on_gap(self, now: float) -> None:
        self.solo_blocked = True
        self.round += 1
        if self.spell is not None:
            self.spell.round_started = 0.0
            self.spell.probes = {}

    def on_link(self, now: float, peer: int, up: bool, out: list[Effect]) -> None:
        spell = self.spell
        if spell is None:
            return
        if not up:
            spell.probes.pop(peer, None)
        elif spell.round_started and spell.campaign is None:
            out.append(Send(peer, Probe(self.core.epoch, self.round)))

    # ---- messages -------------------------------------------------------------------------

    def on_message(self, now: float, sender: int, msg: Message, out: list[Effect]) -> bool:
        match msg:
            case Probe():
                self._on_probe(sender, msg, out)
            case ProbeReply():
                self._on_probe_reply(now, sender, msg, out)
            case VoteRequest():
                self._on_vote_request(now, sender, msg, out)
            case Vote():
                self._on_vote(now, sender, msg, out)
            case _:
                return False
        return True

    def probe_reply(self, round_: int) -> ProbeReply:
        core = self.core
        return ProbeReply(
            epoch=core.epoch,
            round=round_,
            role=core.role.value,
            primary=core.primary if core.role is not Role.ELECTING else None,
            position=core.position,
            eligible=core.eligible and core.role is not Role.PRIMARY,
            sync_set=core.sync_set,
            database=core.database,
            unproven=core.unproven,
            fault=core.fault,
        )

    def _on_probe(self, sender: int, msg: Probe, out: list[Effect]) -> None:
        out.append(Send(sender, self.probe_reply(msg.round)))

    def _on_probe_reply(self, now: float, sender: int, msg: ProbeReply, out: list[Effect]) -> None:
        core = self.core
        if msg.epoch > core.epoch and msg.role != Role.ELECTING.value:
            primary = sender if msg.role == Role.PRIMARY.value else msg.primary
            if core.role is not Role.BACKUP:
                core.adopt_epoch(
                    now, msg.epoch, primary, f"node {sender} is in a higher epoch", out
                )
            return
        spell = self.spell
        if spell is None or msg.round != self.round:
            return
        self.solo_blocked = False
        spell.probes[sender] = ProbeView.of(sender, msg)
        if msg.database:
            core.learn_database(sender, msg.database)

    # ---- rounds -------------------------------------------------------------------------

    def electing_tick(self, now: float, out: list[Effect]) -> None:
        spell = self.spell
        assert spell is not None, "electing without a spell"
        timing = self.core.timing
        if spell.campaign is not None:
            if now >= spell.campaign.deadline:
                self._finish_campaign(now, out)
            return
        if spell.round_started and now < spell.round_started + timing.election_timeout:
            if self.peers_answered():
                self._decide(now, out)
            return
        if spell.round_started:
            self._decide(now, out)
            return
        if now >= spell.next_round_at:
            if self.linking_until is not None:
                # Just started: the links to running peers come up within
                # milliseconds. Deciding before them, a node alone in its sync set
                # led at once, though the others may have moved on without it (a
                # forced promotion while it was away: two primaries in one epoch).
                core = self.core
                if now < self.linking_until and not set(core.peers) <= core.links:
                    core.explain("starting: connecting to the other nodes")
                    return
                self.linking_until = None
            self.round += 1
            spell.round_started = now
            spell.probes = {}
            for peer in sorted(self.core.links):
                out.append(Send(peer, Probe(self.core.epoch, self.round)))
            if self.peers_answered():
                self._decide(now, out)

    def peers_answered(self) -> bool:
        # The last primary is not waited for: when it is frozen, that is the failover,
        # and every moment spent waiting eats into the backups' confirmation.
        probes = self.spell.probes if self.spell is not None else {}
        return all(peer in probes for peer in self.core.links if peer != self.last_primary)

    def _my_view(self) -> ProbeView:
        core = self.core
        return ProbeView(
            core.node_id,
            core.epoch,
            core.role.value,
            None,
            core.position,
            core.eligible,
            core.sync_set,
            core.database,
            core.unproven,
            core.fault,
        )

    def _decide(self, now: float, out: list[Effect]) -> None:
        core, spell = self.core, self.spell
        assert spell is not None
        spell.round_started = 0.0
        # Retry soon; stagger by node id so two nodes rarely campaign at once.
        spell.next_round_at = now + core.timing.heartbeat_interval * (1 + 0.2 * core.node_id)
        views = {core.node_id: self._my_view(), **spell.probes}
        for view in spell.probes.values():
            if view.role == Role.PRIMARY.value and view.epoch >= core.epoch:
                if view.epoch > core.epoch:
                    core.adopt_epoch(
                        now, view.epoch, view.node, f"node {view.node} is primary", out
                    )
                else:
                    core.follow(now, view.node, out)
                return
        for view in spell.probes.values():
            if (
                view.role == Role.BACKUP.value
                and view.primary is not None
                and view.epoch >= core.epoch
            ):
                core.explain(f"node {view.node} still follows node {view.primary}")
                return
        winner = self._winner(views)
        self._log_waiting(out)
        if winner != core.node_id:
            return
        if core.fault is not None:
            # G5: this node holds the newest data, but cannot write: wait for its disk.
            core.explain(f"this node holds the newest data but cannot write: {core.fault}")
            return
        if self.solo_blocked and not spell.probes:
            core.explain("heard from no peer since a gap in this node's clock")
            return
        silent = [p for p in core.links if p not in spell.probes and p != self.last_primary]
        if silent:
            # A linked peer that has not answered may be slow, not gone: deciding
            # without it could let it decide alone too. Keep the round open. (The last
            # primary is not waited for: when it is frozen, that is the failover.)
            spell.round_started = now
            core.explain("waiting for node " + ", ".join(map(str, sorted(silent))) + " to answer")
            for peer in sorted(silent):
                out.append(Send(peer, Probe(core.epoch, self.round)))
            return
        if core.restored and not self._restore_backed(views):
            return
        self._campaign(now, force=False, out=out)

    def _restore_backed(self, views: dict[int, ProbeView]) -> bool:
        """A node made by ops.restore (``ReplicaCore.restored``) leads only when a
        majority of the nodes, itself included, answered empty or holding its own
        history (a sync set that names its database). Its sync set of itself alone
        was written by the restore, not by a primary: alone it would lead at once,
        even before its links are up, while nodes left with the old cluster's data
        lead in the same epochs (two primaries, and a backup rewinding acknowledged
        writes to follow the restored one). Says why not, and returns False."""
        core = self.core
        backing = [core.node_id]
        others = []
        for node, view in sorted(views.items()):
            if node == core.node_id:
                continue
            empty = view.position == Position.ZERO and not view.sync_set.members
            if empty or view.sync_set.database_of(core.node_id) == core.database:
                backing.append(node)
            else:
                others.append(view)
        if 2 * len(backing) > len(core.nodes):
            return True
        if others:
            view = others[0]
            position = [view.position.epoch, view.position.seq]
            core.explain(
                f"this node was restored from a backup, and node {view.node} holds other "
                f"data (position {position}, sync set version {view.sync_set.version}): "
                "it leads only once a majority of the nodes are empty or follow it; empty "
                f"node {view.node}'s data dir to make the backup the cluster's data, or move "
                "this node's database aside to keep the other nodes' data",
                waiting_for=tuple(v.node for v in others),
            )
        else:
            missing = tuple(n for n in core.nodes if n not in views)
            core.explain(
                "this node was restored from a backup: it leads only once a majority of the "
                "nodes answer with empty data dirs (or follow it)",
                waiting_for=missing,
            )
        return False

    def _log_waiting(self, out: list[Effect]) -> None:
        core = self.core
        if core.waiting_for == self.logged_waiting:
            return
        self.logged_waiting = core.waiting_for
        if core.waiting_for:
            out.append(
                Log(
                    "waiting for sync set members",
                    {
                        "node": core.node_id,
                        "missing": ",".join(map(str, core.waiting_for)),
                        "version": core.sync_set.version,
                    },
                )
            )

    def _winner(self, views: dict[int, ProbeView]) -> int | None:
        """R5 then R6: the node that should become primary, or None (and why)."""
        core = self.core
        eligible = [v for v in views.values() if v.eligible]
        if eligible:
            best = max(eligible, key=lambda v: position_key(v.position, v.node))
            core.explain(
                f"electing: node {best.node} is the most current confirmed node", waiting_for=()
            )
            return best.node
        newest = max(views.values(), key=lambda v: sync_set_key(v.sync_set)).sync_set
        # A fresh cluster has no sync set yet: all configured nodes form the first one.
        members = newest.members or core.nodes
        missing = tuple(m for m in members if m not in views)
        if missing:
            core.explain(
                f"members of the newest sync set (version {newest.version}) must return "
                "before anyone can prove it is current",
                waiting_for=missing,
            )
            return None
        problems = {m: member_problem(newest, views[m]) for m in members}
        unproven = tuple(m for m in members if problems[m] is not None)
        if unproven:
            # G5: the member may have held acknowledged writes nobody else has (it was
            # alone in the set when it lost them). Wait for it to be restored, or for an
            # operator's forced promotion.
            first = unproven[0]
            core.explain(
                f"node {first} cannot count as a member of sync set version "
                f"{newest.version}: {problems[first]}; restore its data, or force a "
                "promotion (python -m ops.promote) accepting the loss",
                waiting_for=unproven,
            )
            return None
        candidates = [views[m] for m in members]
        best = max(candidates, key=lambda v: position_key(v.position, v.node))
        if best.fault is not None:
            core.explain(
                f"node {best.node} holds the newest data but cannot write: {best.fault}",
                waiting_for=(best.node,),
            )
        else:
            core.explain(
                f"electing: full restart, node {best.node} holds the newest position",
                waiting_for=(),
            )
        return best.node

    # ---- campaigns ----------------------------------------------------------------------

    def force_promote(self, now: float, out: list[Effect]) -> None:
        self._campaign(now, force=True, out=out)

    def on_storage_fault(self, now: float, out: list[Effect]) -> None:
        """A campaign running when the disk refuses a write is given up at once: if
        the write was its own vote, its requests never went out (the runtime sends
        nothing that depends on a refused write), so its peers' silence says nothing
        of them and they may give this epoch to another node. Waiting for the
        deadline is not enough: the disk may take writes again before it, and the
        campaign would then lead alone (two primaries in one epoch)."""
        spell = self.spell
        campaign = spell.campaign if spell is not None else None
        if spell is None or campaign is None:
            return
        core = self.core
        out.append(
            Log(
                "campaign abandoned",
                {"node": core.node_id, "epoch": campaign.epoch, "why": core.fault},
            )
        )
        spell.campaign = None
        spell.next_round_at = now + core.timing.election_timeout

    def _campaign(self, now: float, force: bool, out: list[Effect]) -> None:
        core, spell = self.core, self.spell
        assert spell is not None
        epoch = (
            max(core.epoch, core.state.voted_epoch, *(v.epoch for v in spell.probes.values())) + 1
        )
        core.persist_vote(epoch, core.node_id, out)
        asked = set(spell.probes) & core.links if not force else set(core.links)
        spell.campaign = Campaign(
            epoch, asked, deadline=now + core.timing.election_timeout, force=force
        )
        out.append(
            Log(
                "campaign",
                {
                    "node": core.node_id,
                    "epoch": epoch,
                    "seq": core.position.seq,
                    "force": str(force).lower(),
                },
            )
        )
        for peer in sorted(asked):
            out.append(Send(peer, VoteRequest(epoch, core.position, force)))
        if not asked:
            self._finish_campaign(now, out)

    def _on_vote_request(
        self, now: float, sender: int, msg: VoteRequest, out: list[Effect]
    ) -> None:
        core = self.core
        epoch, candidate = msg.epoch, msg.position
        reason = ""
        if epoch < core.epoch:
            reason = f"stale epoch {epoch}, mine is {core.epoch}"
        elif core.state.voted_epoch == epoch and core.state.voted_for != sender:
            reason = f"already voted for node {core.state.voted_for} in epoch {epoch}"
        elif core.role is Role.PRIMARY and not msg.force:
            reason = "I am the primary"
        elif core.role is Role.BACKUP and not msg.force and core.primary_live(now):
            reason = f"node {core.primary} is a live primary"
        elif not msg.force and (
            (candidate.epoch < core.position.epoch and core.node_id in core.sync_set.members)
            or (candidate < core.position and core.eligible)
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
            core.persist_vote(epoch, sender, out)
            if core.role is not Role.ELECTING:
                core.become_electing(now, f"voted for node {sender} in epoch {epoch}", out)
            assert self.spell is not None
            self.spell.campaign = None
            self.spell.next_round_at = now + core.timing.election_timeout
        out.append(Send(sender, Vote(epoch, granted, reason or "granted")))

    def _on_vote(self, now: float, sender: int, msg: Vote, out: list[Effect]) -> None:
        spell = self.spell
        campaign = spell.campaign if spell is not None else None
        if spell is None or campaign is None or msg.epoch != campaign.epoch:
            return
        if not msg.granted:
            out.append(
                Log(
                    "campaign lost",
                    {
                        "node": self.core.node_id,
                        "epoch": campaign.epoch,
                        "refused_by": sender,
                        "why": msg.reason,
                    },
                )
            )
            spell.campaign = None
            spell.next_round_at = now + self.core.timing.election_timeout * (
                0.5 + 0.3 * self.core.node_id
            )
            return
        campaign.granted.add(sender)
        if campaign.granted >= campaign.asked:
            self._finish_campaign(now, out)

    def _finish_campaign(self, now: float, out: list[Effect]) -> None:
        spell = self.spell
        campaign = spell.campaign if spell is not None else None
        if spell is None or campaign is None:
            return
        core = self.core
        # A peer that answered the probe but not the vote is frozen or died; when it
        # comes back it has a clock gap or a restart, so we proceed without it.
        members = [core.node_id]
        for peer in sorted(campaign.granted):
            view = spell.probes.get(peer)
            if view is not None and view.position == core.position:
                members.append(peer)
        core.become_primary(now, campaign.epoch, tuple(sorted(members)), campaign.force, out)

    # ---- sync sets ----------------------------------------------------------------------

    def change_in_effect(
        self, seq: int, members: tuple[int, ...], durable: Callable[[int], int]
    ) -> bool:
        return all(durable(m) >= seq for m in members)

    def on_change_sealed(self, now: float, seq: int, sync_set: SyncSet, out: list[Effect]) -> None:
        """Nothing to store: the record itself, once durable on the members, is the
        decision (``change_in_effect``)."""

    # ---- nothing stored, nothing leased ----------------------------------------------------

    def primary_tick(self, now: float, out: list[Effect]) -> None:
        """A primary serves until a higher epoch deposes it (R1): no lease to watch."""

    def leaving_primary(self, out: list[Effect]) -> None:
        """Nothing to release."""

    def on_event(self, now: float, event: ArbiterEvent, out: list[Effect]) -> None:
        """Peer voting has no store: no events."""

    def status(self, now: float) -> dict[str, Any]:
        return {}
