"""A bound on the bytes clients have not read yet, over all of a node's connections.

Why
---
What a node writes to a client (replies, pushes of a listen stream) waits in the
connection's buffer until the client reads it. One connection may hold up to
``MAX_UNREAD`` (16 MiB: a slow link, a few of the largest ``read`` replies)
before it is dropped, but nothing bounded the sum: one account's 200
connections, each pipelining the largest ``read`` and never reading, grew the
primary by 2.6 GB in 20 s, and at the connection cap (about 3,770 under
supervisord) that is some 60 GB: the kernel's OOM killer, for the primary or
for a neighbour on its host.

How
---
A connection whose buffer holds more than ``HEAVY`` (1 MiB) after a write is
recorded with that size; ``total`` is the sum of the recorded sizes. When it
passes the budget (``max_client_unread``), every recorded size is read again
(clients that have read since shrink, or leave), and while the sum is still
above ``REFILL`` of the budget, the connection holding the most is aborted: its
buffer is dropped at once, where a close would keep it until the client reads.
The largest is the one that has read least of what it asked for: a client on a
slow link with one reply in flight holds far less than one that never reads.

Invariants: ``total`` is the sum of ``sizes``; a connection is in ``sizes`` only
while its last recorded size was above ``HEAVY``; one that ends is forgotten.
"""

from __future__ import annotations

from typing import Protocol

HEAVY = 1024 * 1024
# Abort down to this share of the budget, so that the next writes do not each
# read every recorded size again.
REFILL = 0.75


class Connection(Protocol):
    def unread(self) -> int:
        """Bytes written to the connection that its client has not read yet."""
        ...

    def abort(self, why: str) -> None:
        """Close the connection at once, dropping what the client has not read."""
        ...


class UnreadBudget:
    """The unread bytes of every heavy connection, and the bound on their sum."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.sizes: dict[Connection, int] = {}
        self.total = 0

    def wrote(self, conn: Connection, size: int) -> None:
        """``conn``'s buffer holds ``size`` bytes after a write to it."""
        self._record(conn, size)
        if self.total > self.budget:
            self._shed()

    def forget(self, conn: Connection) -> None:
        """``conn`` has ended."""
        old = self.sizes.pop(conn, None)
        if old is not None:
            self.total -= old

    def _record(self, conn: Connection, size: int) -> None:
        old = self.sizes.pop(conn, 0)
        self.total -= old
        if size > HEAVY:
            self.sizes[conn] = size
            self.total += size

    def _shed(self) -> None:
        for conn in list(self.sizes):
            self._record(conn, conn.unread())
        while self.sizes and self.total > self.budget * REFILL:
            largest = max(self.sizes, key=self.sizes.__getitem__)
            held = self.sizes[largest]
            self.forget(largest)
            largest.abort(
                f"its client has not read {held} bytes, and the clients of this node "
                f"hold more than max_client_unread ({self.budget}) unread"
            )
