"""The primary's acknowledgement bookkeeping: who counts, how far each is, the watermark.

This is the ack rule of SPEC section 6 (R2, R3, R4) in one place. The primary
acknowledges seq s only when every member of the *ack set* has durably committed
s. The ack set is the sync set in effect plus the members of every change not
yet in effect: growing counts the newcomer at once (it must have everything from
then on), shrinking only once the change is in effect (until then the old,
larger set still counts). When a change is in effect is the arbiter's decision
(``arbiter.py``): with peer voting, once every remaining member holds the change
record durably; with etcd, once the compare-and-swap that stores it succeeded.

A backup's acks count only while it does not lag: one whose durable seq is
behind a record sealed more than ``lag_limit`` ago is treated as silent, so a
slow backup is dropped like a dead one (R3).

The tracker lives only while its node is primary: it is built on winning an
election and dropped on leaving the role, so nothing of one epoch's counting
survives into the next.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class BackupProgress:
    """What the primary knows of one backup."""

    # The highest seq the backup reported durable in an ack of its current join
    # (-1: none yet, or it takes a snapshot). Never above what the primary sealed.
    durable: int = -1
    # The backup's current join was answered: its acks describe the log we stream to.
    joined: bool = False
    # When an ack of it was last counted (not lagging): the sync timeout runs from here.
    last_counted: float = 0.0
    # The ``ack_no`` to echo in our frames (-1: none). Set only while the backup is
    # linked to every other member of the ack set, so two confirmed backups always
    # hear each other in an election (R5).
    echo: int = -1
    # The join this backup last made (its ``join_no``): acks of an earlier join
    # describe a log that the join's rewind or snapshot may have replaced.
    join_no: int = -1
    # False from a clock gap of ours until the backup is heard again: a thawed
    # primary drops nobody on the strength of a silence it slept through. Heard
    # means an ack that answers a frame we sent after the gap (``AckTracker.fresh``),
    # not one that waited in our socket while we were stopped.
    heard_since_gap: bool = True
    # The backup's current join was answered after our latest clock gap: every ack
    # of it was sent after our reply, so it is fresh.
    joined_since_gap: bool = True
    # The backup closed our link (it died): an immediate signal. A link we closed
    # ourselves is not, since the backup may still believe it is confirmed.
    lost_by_peer: bool = False


# (seq of the change record, the members it sets)
PendingChange = tuple[int, tuple[int, ...]]
# Decides whether a sealed change is in effect, given each node's durable seq.
InEffect = Callable[[int, tuple[int, ...], Callable[[int], int]], bool]


@dataclass
class AckTracker:
    """The ack set, each backup's progress and the watermark of one primary's reign."""

    node_id: int
    # The sync set in effect: every acknowledged record is durable on all of them.
    effective: tuple[int, ...]
    # Where counting may start: the first seq of this primary's epoch. A backup
    # catches up (R4) only once it holds that record, which sets the sync set.
    epoch_start_seq: int
    # Every seq up to here is durable on the whole ack set (never decreases).
    watermark: int = 0
    progress: dict[int, BackupProgress] = field(default_factory=dict)
    # Changes sealed but not in effect, oldest first; their members count for acks.
    pending: list[PendingChange] = field(default_factory=list)
    # A change was proposed and not yet sealed: propose no other until it is.
    changing: bool = False
    # (seq, time sealed) of records not yet under the watermark, for the lag rule.
    sealed_at: deque[tuple[int, float]] = field(default_factory=deque)
    # The last seq sealed before our latest clock gap (-1: no gap): a backup that
    # reports a later one durable received a frame we sent after the gap.
    gap_mark: int = -1

    def ack_set(self) -> set[int]:
        members = set(self.effective)
        for _seq, pending in self.pending:
            members.update(pending)
        return members

    def backup(self, peer: int, now: float) -> BackupProgress:
        return self.progress.setdefault(peer, BackupProgress(last_counted=now))

    def durable(self, node: int, own: int) -> int:
        """``node``'s durable seq as far as counting goes (``own`` for this node)."""
        if node == self.node_id:
            return own
        progress = self.progress.get(node)
        return progress.durable if progress is not None else -1

    def sealed(self, seq: int, now: float, members: tuple[int, ...] | None) -> None:
        """A record was sealed at ``seq``; ``members`` if it changes the sync set."""
        self.sealed_at.append((seq, now))
        if members is not None:
            self.pending.append((seq, members))
            self.changing = False

    def lagging(self, durable: int, now: float, lag_limit: float) -> bool:
        """A backup durable only up to ``durable`` misses a record sealed too long ago."""
        for seq, sealed in self.sealed_at:
            if seq > durable:
                return now - sealed > lag_limit
        return False

    def last_sealed(self, position_seq: int) -> int:
        """The newest seq this primary sealed (records above ``position_seq`` may be
        sealed and broadcast but not yet reported committed)."""
        return max(position_seq, self.sealed_at[-1][0] if self.sealed_at else 0)

    def fresh(self, progress: BackupProgress, durable: int) -> bool:
        """An ack of ``progress``'s current join reporting ``durable`` answers a frame
        we sent after our latest clock gap (a record sealed since, or our reply to
        a join made since). An ack sent while we were stopped does not: the backup
        may have taken over since (R5) and died before telling us."""
        return progress.joined_since_gap or durable > self.gap_mark

    def may_confirm(self) -> bool:
        """After a clock gap the primary confirms nobody until it has heard from its
        whole ack set again: it may be a stale primary that a newer epoch replaced."""
        return all(
            self.progress[m].heard_since_gap
            for m in self.ack_set()
            if m != self.node_id and m in self.progress
        )

    def advance(self, own_durable: int, in_effect: InEffect) -> int | None:
        """Put changes into effect and raise the watermark; the new watermark, or None."""

        def durable(node: int) -> int:
            return self.durable(node, own_durable)

        # The newest change in effect supersedes the ones before it: "drop 3"
        # waiting on a frozen 2 must not block "drop 2".
        for index in range(len(self.pending) - 1, -1, -1):
            seq, members = self.pending[index]
            if in_effect(seq, members, durable):
                self.effective = members
                del self.pending[: index + 1]
                break
        watermark = min(durable(m) for m in self.ack_set() | {self.node_id})
        if watermark <= self.watermark:
            return None
        self.watermark = watermark
        while self.sealed_at and self.sealed_at[0][0] <= watermark:
            self.sealed_at.popleft()
        return watermark

    def lag(self, position_seq: int) -> dict[int, int]:
        return {
            peer: position_seq - progress.durable
            for peer, progress in self.progress.items()
            if progress.durable >= 0
        }
