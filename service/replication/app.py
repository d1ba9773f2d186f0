"""What the replicator asks of the application whose writes it replicates.

The replicator knows batches, records, seqs and acknowledgements; what a client
write means is the application's (the chat, ``chat.ChatApplication``, which
the composition root ``node.py`` hands in). As with the state machine of a Raft
library, the application is a function the primary's writer calls inside its
batch: whatever rows it changes there are the write's whole effect, recorded
in the batch's changeset and applied as-is on every backup, so the application
never runs on a backup and never needs to be deterministic across nodes beyond
the rows it writes.

Every call runs on the event loop thread, inside one savepoint of the open
batch: raising rolls back that call's rows only. A ``ChatError`` refuses the
write (the client gets it); any other exception is a bug in that one write,
answered ``internal``; the batch goes on either way. An op that changes rows only
after every check that can refuse it says so (``unguarded_bound``) and runs
without the savepoint: two statements fewer on the hottest path (the chat's
``send``). Its refusals leave nothing to undo, and SQLite undoes a statement that
fails; a bug raised after its changes leaves them in the batch, answered
``internal`` all the same (a retry under the same request id finds them).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Literal, Protocol

from ..storage import Db

# The two rates of an account (``writerate.py``): its sends, and its other writes.
RateKind = Literal["send", "write"]


class Application(Protocol):
    def apply_write(
        self,
        db: Db,
        op: str,
        args: dict[str, Any],
        token_hash: str | None,
        request_id: str,
        now: float,
        fingerprint: str | None,
    ) -> dict[str, Any]:
        """Apply one client write (``op`` one of ``protocol.WRITE_OPS``); its result."""
        ...

    def share_key(self, db: Db, token_hash: str | None) -> Hashable:
        """Who a queued write counts against, for the writer's queue to share its room
        and its batches out fairly (``fairqueue.py``): the chat says the account.
        Called on the event loop when the write arrives, with the primary's reader
        (outside any batch); it decides nothing but the write's turn, so a stale
        answer costs fairness, never correctness."""
        ...

    def rate_kind(self, op: str, key: Hashable) -> RateKind | None:
        """Which of its account's rates a write of ``op`` counts against
        (``writerate.py``), if any; ``key`` is its ``share_key``. The chat: a
        session's send, its ``send_rate``; the session's other writes but those
        that end it (``logout``, ``delete_account``), its ``write_rate``."""
        ...

    def reset(self) -> None:
        """Forget whatever the application remembers of the database between calls
        (the chat: the sessions it has read, and how far its ``purge`` got): the rows
        may have changed without it, because a batch was rolled back whole or other
        primaries wrote them (called on becoming primary)."""
        ...

    def forget_reads(self) -> None:
        """Forget what the application read in a batch that wrote nothing and is rolled
        back (the chat: the sessions it has read). No row changed, so what it knows
        of work left for ``purge`` stays true."""
        ...

    def unguarded_bound(self, op: str) -> int | None:
        """For an op that changes rows only after every check that can refuse it:
        an upper bound of the bytes it adds to a record, which the writer checks
        against the record's budget before running it without a savepoint. None:
        the op runs in a savepoint."""
        ...

    def starts_purge(self, op: str) -> bool:
        """Whether a successful ``op`` leaves work for ``purge`` (checked once more
        on becoming primary, whatever was written before)."""
        ...

    def purge(self, db: Db, now: float) -> bool:
        """Do a bounded part of the work writes left (so one record stays small);
        whether some is left for the next batch."""
        ...

    def prune(self, db: Db, now: float, limit: int) -> None:
        """Forget up to ``limit`` rows of each kind that have expired by ``now``; run
        by the writer every half second or so, with a limit that lets the tables
        shrink as fast as the writes grow them."""
        ...
