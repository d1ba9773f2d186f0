"""Cross-node checksums: finding a node whose data differs from the others' (G4).

Why
---
SQLite keeps no page checksums, so a damaged page can go unnoticed until a
query reads it, and a bug could make one node's rows differ while every record
applied cleanly. The start-up ``quick_check`` and the checks of every snapshot
(before it is sent, before it is installed) catch damaged *structure*; this
module compares *contents* across nodes, as etcd's corruption check compares
the hashes of its members' key spaces at one revision.

Theory of operation
-------------------
Every ``interval`` seconds the primary looks for a quiet moment: every member
of the sync set in effect has made durable exactly the primary's last seq S,
and no write is waiting. It then asks those backups (``verify``) for the
per-table checksums of their replicated tables at S, and computes its own, each
node in a thread over one read transaction of its own database that must be at
S (a node that has moved on answers ``sums: null`` and the round is dropped).
When the answers are in:

* all equal: the round is logged and shown in status;
* some differ and a majority (two of three) agrees: each node outside the
  majority is damaged. A backup is told so (``resync``); the primary marks
  itself. Either way the damaged node exits, moves its database aside at its
  next start and catches up from a healthy member (``Replicator.damaged``), so
  it never leads or ships the differing data;
* two answers that differ with no third to decide: nobody can tell which is
  right; an alarm (log, status) and no action.

A majority must be of independent witnesses. A backup that installed this
primary's snapshot holds whatever the primary read when it made it, damage
SQLite cannot see included (a flipped bit inside a row): until a round in which
all nodes agree, that copy counts together with the primary (``copies``), so
the primary and its copy against the third node are no majority, and the
alarm is raised instead of the third node being resynced from the damage.

A round that cannot complete (a backup gone, a write arriving) is abandoned
after ``ROUND_TIMEOUT`` and tried again at the next quiet moment.

Invariants
----------
* Only a primary starts rounds, and a ``resync`` is obeyed only from the
  backup's current primary in its current epoch.
* Checksums are computed off the event loop, over a read transaction at
  exactly the seq compared: positions differ only in time, never in content.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ChatError, StorageCorrupt
from .messages import Message, Resync, Verify, VerifyReply

log = logging.getLogger("service.replication")

Sums = dict[str, str]
ROUND_TIMEOUT = 30.0
# A quiet moment missed: look again this much later rather than a whole interval.
RETRY_SOON = 1.0


@dataclass
class Round:
    number: int
    epoch: int
    seq: int
    started: float
    asked: tuple[int, ...]
    answers: dict[int, Sums | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """The last comparison that completed, for status."""

    seq: int
    nodes: tuple[int, ...]
    agreed: bool
    damaged: tuple[int, ...]
    at: float

    def to_status(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "nodes": list(self.nodes),
            "agreed": self.agreed,
            "damaged": list(self.damaged),
            "at": self.at,
        }


def judge(
    answers: dict[int, Sums], copies: dict[int, int] | None = None
) -> tuple[bool, tuple[int, ...]]:
    """(all agree, nodes outside a majority). With no majority nobody is named.
    ``copies``: node -> the node whose snapshot it installed; the two agreeing
    count as one witness."""
    distinct = {tuple(sorted(s.items())) for s in answers.values()}
    if len(distinct) <= 1:
        return True, ()
    counts: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for node, sums in answers.items():
        counts.setdefault(tuple(sorted(sums.items())), []).append(node)
    majority = [
        nodes for nodes in counts.values() if 2 * _witnesses(nodes, copies or {}) > len(answers)
    ]
    if not majority:
        return False, ()
    keep = set(majority[0])
    return False, tuple(sorted(n for n in answers if n not in keep))


def _witnesses(nodes: list[int], copies: dict[int, int]) -> int:
    """How many of ``nodes`` (which agree) agree independently: a copy counts with
    its source when both are among them."""
    group = set(nodes)
    return len({copies[n] if copies.get(n) in group else n for n in group})


class Verifier:
    """Runs the rounds of one node (see the module docstring)."""

    def __init__(
        self,
        node_id: int,
        interval: float,
        checksums_at: Callable[[int], Sums | None],
        send: Callable[[int, Message], bool],
        damaged: Callable[[str], None],
        spawn: Callable[[Awaitable[None]], object],
    ) -> None:
        self.node_id = node_id
        self.interval = interval
        self.checksums_at = checksums_at
        self.send = send
        self.damaged = damaged
        self.spawn = spawn
        self.round: Round | None = None
        self.numbers = 0
        self.next_at = time.monotonic() + interval
        self.last: Outcome | None = None
        # Comparisons completed, and those in which some node differed (for metrics).
        self.completed = 0
        self.mismatches = 0
        # Backups that installed this node's snapshot since all last agreed: each
        # is no witness apart from this node (see the module docstring).
        self.copies: dict[int, int] = {}

    def snapshot_sent(self, peer: int) -> None:
        """``peer`` was sent this node's snapshot (and installs it)."""
        self.copies[peer] = self.node_id

    # ---- primary ----------------------------------------------------------------------

    def tick(self, now: float, epoch: int, seq: int, quiet: bool, members: tuple[int, ...]) -> None:
        """Called by the primary's tick; ``quiet``: every member durable at ``seq``."""
        if self.interval <= 0:
            return
        if self.round is not None:
            if now - self.round.started > ROUND_TIMEOUT:
                log.info("checksum round abandoned node=%s seq=%s", self.node_id, self.round.seq)
                self.round = None
            return
        if now < self.next_at:
            return
        if not quiet or seq == 0:
            self.next_at = now + RETRY_SOON
            return
        self.next_at = now + self.interval
        self.numbers += 1
        backups = tuple(m for m in members if m != self.node_id)
        self.round = Round(self.numbers, epoch, seq, now, (self.node_id, *backups))
        for peer in backups:
            self.send(peer, self._request(self.round))
        self.spawn(self._answer_own(self.round))

    def stop(self) -> None:
        """No longer primary: an open round is moot."""
        self.round = None

    @staticmethod
    def _request(current: Round) -> Verify:
        return Verify(current.epoch, current.seq, current.number)

    async def _checksums(self, seq: int) -> Sums | None:
        """This node's checksums at ``seq``; None when they cannot be had now (moved
        on, or the disk fails the reads). A damaged page found on the way is damage."""
        try:
            return await asyncio.to_thread(self.checksums_at, seq)
        except StorageCorrupt as exc:
            self.damaged(str(exc))
        except ChatError as exc:
            log.info("checksums not computed node=%s seq=%s why=%s", self.node_id, seq, exc)
        return None

    async def _answer_own(self, current: Round) -> None:
        sums = await self._checksums(current.seq)
        self._record(current.number, self.node_id, sums)

    def on_reply(self, peer: int, msg: VerifyReply) -> None:
        sums = msg.sums
        valid = isinstance(sums, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in sums.items()
        )
        self._record(msg.round, peer, sums if valid else None)

    def _record(self, number: int, node: int, sums: Sums | None) -> None:
        current = self.round
        if current is None or current.number != number or node not in current.asked:
            return
        if sums is None:
            # That node is no longer at the seq compared (a write slipped in).
            self.round = None
            self.next_at = time.monotonic() + RETRY_SOON
            return
        current.answers[node] = sums
        if set(current.answers) == set(current.asked):
            self.round = None
            self._conclude(current)

    def _conclude(self, current: Round) -> None:
        answers = {n: s for n, s in current.answers.items() if s is not None}
        agreed, odd = judge(answers, self.copies)
        nodes = tuple(sorted(answers))
        self.last = Outcome(current.seq, nodes, agreed, odd, time.time())
        self.completed += 1
        if agreed:
            self.copies.clear()
            log.info(
                "checksums agree node=%s seq=%s nodes=%s",
                self.node_id,
                current.seq,
                ",".join(map(str, nodes)),
            )
            return
        self.mismatches += 1
        log.critical(
            "checksums differ node=%s seq=%s nodes=%s damaged=%s",
            self.node_id,
            current.seq,
            ",".join(map(str, nodes)),
            ",".join(map(str, odd)) or "undecided",
        )
        why = f"its checksums at seq {current.seq} differ from the other nodes'"
        for node in odd:
            if node != self.node_id:
                self.send(node, Resync(current.epoch, why))
        if self.node_id in odd:
            self.damaged(why)

    # ---- backup -----------------------------------------------------------------------

    async def answer(self, primary: int, msg: Verify) -> None:
        sums = await self._checksums(msg.seq)
        self.send(primary, VerifyReply(msg.epoch, msg.seq, msg.round, sums))
