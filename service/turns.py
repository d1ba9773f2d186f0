"""How many client frames a node takes in one turn of its event loop.

Why
---
A node decodes and dispatches a client's frames in the transport's callback
(``peer.FrameFeed``), and the event loop runs the callbacks of every readable
socket in one turn before it looks at its timers: the heartbeats that tell the
backups the primary lives. One account's 200 connections, each with 256 of the
largest ``send`` pipelined, put about a thousand 48 KB frames into each turn:
the primary's loop stood still for 0.7 s and the backups elected another
primary within a second of the first bytes, again and again as the attacker
followed the primary.

How
---
Client connections share ``frames_per_turn`` frames and ``bytes_per_turn`` of
them: what a frame costs is mostly its decoding, which grows with its size, and
256 of the largest ``send`` still held the loop for 50-100 ms a turn, every
turn, while a flood went on (everyone's request waited several such turns to be
read, then several more for its batch and its reply). A frame is taken while
both last; the first of a turn always is, whatever its size. A connection that
finds none left keeps its undecoded bytes, stops reading (TCP pushes back on its
client), and waits in line; one turn later the budget is full again and the
waiting connections hand on one frame each, in turns (one that holds more goes
to the back of the line), for as long as it lasts: a connection that comes in
behind a hundred others holding hundreds of frames each waits for a hundred
frames, not for all of theirs. The budget is refilled only after it ran out (a
callback for the next turn), so a node that never takes more than a turn's
budget pays nothing but a count. Peer links have no budget: replication never
waits behind clients.

Invariants: ``left`` is never negative (``bytes_left`` may be, after a large
frame: the turn is over); a connection is in ``waiting`` at most once, and only
while its reading is paused; whenever a connection waits, a refill is scheduled
(once the refill running now has handed on its turn's frames).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

# Far above what a busy cluster's clients send in one turn (64 clients: 64), far
# below what stood the loop still (about a thousand frames of 48 KB).
FRAMES_PER_TURN = 256
# A few milliseconds of decoding: 22 of the largest sends (48 KB); never reached by
# 256 of the usual frames (a few hundred bytes each).
BYTES_PER_TURN = 1024 * 1024


class Waiter(Protocol):
    def go_on(self) -> None:
        """Hand on one frame it holds, if the budget has one, and wait in line again
        while it holds more; read again once it holds none."""
        ...


class TurnBudget:
    """Frames that client connections may hand on before the loop turns again."""

    def __init__(
        self, frames_per_turn: int = FRAMES_PER_TURN, bytes_per_turn: int = BYTES_PER_TURN
    ) -> None:
        self.per_turn = frames_per_turn
        self.bytes_per_turn = bytes_per_turn
        self.left = frames_per_turn
        self.bytes_left = bytes_per_turn
        self.waiting: deque[Waiter] = deque()
        self._refill: asyncio.Handle | None = None

    def take(self) -> bool:
        """One frame, if any is left this turn (frames and bytes)."""
        if self.left > 0 and self.bytes_left > 0:
            self.left -= 1
            return True
        self._schedule()
        return False

    def spend(self, size: int) -> None:
        """The frame just taken was ``size`` bytes."""
        self.bytes_left -= size

    def give_back(self) -> None:
        """A frame taken and not there after all (the bytes ended mid-frame)."""
        self.left = min(self.left + 1, self.per_turn)

    def wait(self, waiter: Waiter) -> None:
        """``waiter`` holds frames and has stopped reading: it goes on next turn."""
        self.waiting.append(waiter)
        self._schedule()

    def _schedule(self) -> None:
        if self._refill is None:
            self._refill = asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self.left = self.per_turn
        self.bytes_left = self.bytes_per_turn
        # One frame each, in turns: a connection that holds more goes to the back of
        # the line, so a newcomer waits for one frame of each connection ahead of it,
        # not for all they hold. ``_refill`` stays set meanwhile: the next refill is
        # scheduled after this turn's frames were handed on, so that what they
        # scheduled (a request's task, its answer) runs before it.
        while self.waiting and self.left > 0 and self.bytes_left > 0:
            self.waiting.popleft().go_on()
        self._refill = None
        if self.waiting or self.left == 0 or self.bytes_left <= 0:
            self._schedule()
