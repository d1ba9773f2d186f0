"""Id windows over accounts' messages: a bounded number of rows per query.

An account's inbox may hold millions of messages (anyone may send to anyone, and
tombstones stay), and a read that filters it (its unread messages, those with
one other user, the unread count) made SQLite look at every one of them when few
match: 35 to 120 ms at 300,000 messages here, longer than ``suspect_timeout`` at a
few million, during which the primary's event loop would neither write, nor
answer, nor send a heartbeat. A login counted the unread messages inside the
writer's batch, holding every write as long.

So such a read runs as a scan in windows of message ids, one query per read turn.
What it selects is one or more *terms* (``with``: what the account received from
the other, and what it sent to the other); every message of a term is in each of
the term's *ranges* (received from bob: in the account's inbox, and in what bob
sent), each an index on one account's column. A window ends at the
``SCAN_CHUNK``-th message of one range of every term, the range that reaches
furthest (the sparsest: bob's few sends, not the account's million-message
inbox), and each term's query reads the window through that range's index
(``INDEXED BY``), so no query looks at more than ``SCAN_CHUNK`` messages of any
term. The window's end is found on the index alone, a few hundred microseconds.

Invariants: the windows of a scan are adjacent and do not overlap, so every id
between its start and its stop is in exactly one of them; the last one reaches the
stop; in each window, the range chosen for a term holds at most ``SCAN_CHUNK`` of
its messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .storage import Db

# A window holds at most this many messages of each term's chosen range: a query
# of it takes about a millisecond.
SCAN_CHUNK = 4096

NO_ID = 0  # below every message id
PAST_EVERY_ID = 2**63 - 1  # SQLite's largest integer, above every message id


@dataclass(frozen=True)
class Range:
    """One account's messages by one column, and the index that holds them by id."""

    index: str
    column: str
    account: int

    def where(self) -> tuple[str, list[Any]]:
        return f"m.{self.column} = ?", [self.account]


def inbox(account: int) -> Range:
    return Range("messages_by_recipient", "recipient_id", account)


def sent(account: int) -> Range:
    return Range("messages_by_sender", "sender_id", account)


Term = Sequence[Range]  # the ranges that each hold every message of one term


class Windows:
    """The windows of one scan over ``terms``, newest first unless ``ascending``,
    between the ids ``start`` and ``stop`` (both excluded; by default every id)."""

    def __init__(
        self,
        terms: Sequence[Term],
        ascending: bool,
        start: int | None = None,
        stop: int | None = None,
    ) -> None:
        self.terms = [list(term) for term in terms]
        self.ascending = ascending
        if ascending:
            self.cursor = NO_ID if start is None else start
            self.stop = PAST_EVERY_ID if stop is None else stop
        else:
            self.cursor = PAST_EVERY_ID if start is None else start
            self.stop = NO_ID if stop is None else stop
        self.done = self.cursor >= self.stop if ascending else self.cursor <= self.stop

    def next(self, db: Db) -> tuple[str, list[Any], list[Range]]:
        """The condition on ``m.id`` of the next window, its parameters, and for each
        term the range to read it through."""
        assert not self.done, "the scan has passed its last window"
        ascending, cursor = self.ascending, self.cursor
        ends: list[int] = []
        chosen: list[Range] = []
        for term in self.terms:
            end, through = self._furthest(db, term)
            chosen.append(through)
            if end is not None:
                ends.append(end)
        if ascending:
            end = min(ends, default=self.stop)
            if end >= self.stop:
                end, self.done = self.stop - 1, True
            self.cursor = end
            return "m.id > ? AND m.id <= ?", [cursor, end], chosen
        end = max(ends, default=self.stop)
        if end <= self.stop:
            end, self.done = self.stop + 1, True
        self.cursor = end
        return "m.id < ? AND m.id >= ?", [cursor, end], chosen

    def _furthest(self, db: Db, term: Term) -> tuple[int | None, Range]:
        """The term's range whose ``SCAN_CHUNK``-th message past the cursor is furthest
        (None: it has fewer, so it reaches the stop), and that message's id."""
        best: tuple[int, Range] | None = None
        for candidate in term:
            end = self._end(db, candidate)
            if end is None:
                return None, candidate
            if best is None or (end > best[0] if self.ascending else end < best[0]):
                best = (end, candidate)
        assert best is not None, "a term needs a range"
        return best

    def _end(self, db: Db, of: Range) -> int | None:
        beyond, order = (">", "") if self.ascending else ("<", " DESC")
        row = db.one(
            f"SELECT id FROM messages INDEXED BY {of.index} WHERE {of.column} = ? "
            f"AND id {beyond} ? ORDER BY id{order} LIMIT 1 OFFSET ?",
            (of.account, self.cursor, SCAN_CHUNK - 1),
        )
        return None if row is None else int(row[0])
