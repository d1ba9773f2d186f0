"""Which commits are on disk: the group fsync's reports, turned into the core's input.

Both the primary's batches and a backup's applied records commit without an
fsync (``synchronous=NORMAL``) and hand durability to the group sync
(``groupsync.py``): a thread that fdatasyncs the WAL, one fsync for every commit
that returned before it started. The core hears ``on_committed`` at once (the
database holds the records: elections and joins use it) and ``on_local_durable``
only when the fsync covering them is done (acks and the watermark count only
that, R2).

Invariant: ``unsynced`` lists commits in order, each with the group-sync ticket
that will cover it; a report for ticket t makes every commit up to t durable. A
rewind or snapshot install replaces the log durably and ``forget``s the list:
its entries describe records that are gone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from .groupsync import GroupSync
from .shell import Shell
from .state import History, ReplicaCore
from .types import Position, SyncSet

Fatal = Callable[[BaseException | None], None]

# A lone commit larger than this goes to the group sync all the same: an fsync of
# the WAL pages of a large record (a full batch of the largest sends, a backup's one
# record of 512 KiB) held the event loop for 10-25 ms.
LONE_BYTES = 64 * 1024


class Durability:
    def __init__(
        self,
        shell: Shell,
        core: ReplicaCore,
        sync: Callable[..., bool],
        deferred: bool,
        fatal: Fatal,
    ) -> None:
        self.shell = shell
        self.core = core
        self._sync = sync
        self._fatal = fatal
        self.closing = False
        # Commits not yet reported durable: (group-sync ticket, position), in order.
        self.unsynced: deque[tuple[int, Position]] = deque()
        self.group_sync = GroupSync(sync, self._on_durable, fatal) if deferred else None

    def start(self) -> None:
        if self.group_sync is not None:
            self.group_sync.start()

    async def close(self) -> None:
        self.closing = True
        if self.group_sync is not None:
            # Its last fsync finishes before storage closes under it.
            await asyncio.to_thread(self.group_sync.close)

    def committed(
        self,
        position: Position,
        sync_set: SyncSet | None = None,
        lone: bool = False,
        history: History | None = None,
    ) -> None:
        """Our database holds ``position``; it counts for acks once it is on disk.

        The fsync goes to the group sync thread, and the loop reads the next
        requests or records meanwhile. Only a ``lone`` commit (one small write,
        nothing else waiting: a lightly loaded node; ``is_lone``) syncs right here,
        when no group fsync is under way: nothing would overlap it, and the hand-off
        to a thread and back would only add latency."""
        self.core.on_committed(position, sync_set, history)
        group = self.group_sync
        if group is not None and (not lone or group.busy):
            self.unsynced.append((group.request(), position))
            return
        if group is not None:
            if self._sync(checkpoint=False):
                group.request()  # the thread checkpoints
            self.unsynced.clear()  # all of them are on disk now
        self.shell.run(self.core.on_local_durable(self.shell.now(), position))

    @staticmethod
    def is_lone(commits: int, changeset_bytes: int, more_waiting: bool) -> bool:
        """Whether a commit may sync inline: one small write, nothing behind it."""
        return commits <= 1 and changeset_bytes <= LONE_BYTES and not more_waiting

    def forget(self) -> None:
        """A rewind or a snapshot install replaced the log, durably: pending
        reports are about records that are gone."""
        self.unsynced.clear()

    def _on_durable(self, ticket: int) -> None:
        """The group sync put every commit up to ``ticket`` on disk."""
        position = None
        while self.unsynced and self.unsynced[0][0] <= ticket:
            position = self.unsynced.popleft()[1]
        if position is None or self.closing:
            return
        try:
            self.shell.run(self.core.on_local_durable(self.shell.now(), position))
        except Exception as exc:
            self._fatal(exc)
