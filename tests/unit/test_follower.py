"""A backup's follower (service/replication/follower.py) on real storage, beside a
real core that has joined its primary (it decides whether records still apply).
Records are handed to the follower as the runtime does with ``ApplyRecords``.

Records that arrive together are applied together, but at most ``APPLY_BYTES`` a
transaction, one transaction a turn of the event loop: after a stall a backup's
loop reads everything that waited in its socket in one turn, and applying all of
it at once held the loop for tenths of a second. Past ``PENDING_BYTES`` waiting,
the primary's link is not read until an apply brings them under. Records still
waiting when their stream ends (a rewind, a snapshot, a lost join, the node
stopping) are never applied.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from service.chat import ChatApplication
from service.chat_schema import MIGRATIONS
from service.config import NodeConfig, Peer
from service.replication.follower import APPLY_BYTES, PENDING_BYTES
from service.replication.messages import Append, JoinReply
from service.replication.runtime import Replicator
from service.replication.types import LogRecord, Role, SyncSet
from service.storage import Storage

# Records of 384 KiB of message bodies: one a transaction (two exceed APPLY_BYTES).
RECORD_BODY = APPLY_BYTES * 3 // 4
# How many of them are more than PENDING_BYTES.
OVER = PENDING_BYTES // RECORD_BODY + 1


def primary_records(folder: Path, count: int, body: int = RECORD_BODY) -> list[LogRecord]:
    """``count`` records of epoch 1 sealed by a primary's storage, one message each."""
    storage = Storage(folder / "chat.db", migrations=MIGRATIONS)
    try:
        records = []
        for n in range(count):
            batch = storage.begin_batch()
            batch.db.execute(
                "INSERT INTO messages(sender_id, recipient_id, body, sent_at) VALUES (1, 1, ?, 0)",
                (str(n % 10) * body,),
            )
            record = batch.seal(1)
            assert record is not None
            batch.commit()
            records.append(record)
        return records
    finally:
        storage.close()


class Backup:
    """Node 2's replicator, not started, made a joined backup of node 1 in epoch 1."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.storage = Storage(folder / "chat.db", migrations=MIGRATIONS)
        nodes = tuple(Peer(n, "127.0.0.1", 1) for n in (1, 2, 3))
        config = NodeConfig(2, folder, nodes, folder / "secret")
        self.replicator = Replicator(
            config, self.storage, b"s" * 32, ChatApplication(config.request_retention)
        )
        self.follower = self.replicator.follower
        # What the follower asked of the link to the primary (no link runs here).
        self.reading: list[tuple[int, bool]] = []
        self.follower.set_reading = lambda peer, on: self.reading.append((peer, on))
        self.failures: list[BaseException | None] = []
        self.follower.fatal = self.failures.append
        core = self.replicator.core
        now = self.replicator.now()
        heartbeat = Append(1, 0, 0, [], SyncSet(1, (1, 2, 3), 1), (1, 2, 3), -1)
        self.replicator.run(core.on_message(now, 1, heartbeat))
        self.replicator.run(core.on_message(now, 1, JoinReply(1, 0, False, core.join_no)))
        assert (core.role, core.primary, core.joined) == (Role.BACKUP, 1, True)

    @property
    def seq(self) -> int:
        return self.storage.position().seq

    async def turns(self, count: int) -> list[int]:
        """The position after each of ``count`` turns of the loop."""
        seen = []
        for _ in range(count):
            await asyncio.sleep(0)
            seen.append(self.seq)
        return seen


def run_backup(tmp_path: Path, scenario: Callable[[Backup], Awaitable[None]]) -> None:
    async def main() -> None:
        backup = Backup(tmp_path / "backup")
        try:
            await scenario(backup)
            assert backup.failures == []
        finally:
            await backup.replicator.close()
            backup.storage.close()

    asyncio.run(main())


def test_records_that_arrived_together_are_applied_one_full_record_a_turn(
    tmp_path: Path,
) -> None:
    records = primary_records(tmp_path, 4)

    async def scenario(backup: Backup) -> None:
        backup.follower.buffer(records)
        assert await backup.turns(5) == [1, 2, 3, 4, 4]
        assert backup.storage.log_range(0, 10) == records

    run_backup(tmp_path, scenario)


def test_the_primary_is_not_read_while_more_than_pending_bytes_wait(tmp_path: Path) -> None:
    records = primary_records(tmp_path, OVER + 1)

    async def scenario(backup: Backup) -> None:
        backup.follower.buffer(records[:OVER])
        assert backup.reading == [(1, False)], "the primary read on past PENDING_BYTES"
        await backup.turns(1)
        assert backup.reading == [(1, False), (1, True)]
        backup.follower.buffer(records[OVER:])
        assert (await backup.turns(OVER + 1))[-1] == OVER + 1
        assert backup.follower.pending == []
        assert backup.reading[-1] == (1, True), "the primary's link left unread"

    run_backup(tmp_path, scenario)


@pytest.mark.parametrize("end", ["rewind", "snapshot", "stop"])
def test_records_dropped_while_the_primary_is_not_read_let_it_be_read_at_once(
    tmp_path: Path, end: str
) -> None:
    records = primary_records(tmp_path, OVER)

    async def scenario(backup: Backup) -> None:
        backup.follower.buffer(records)
        assert backup.reading == [(1, False)]
        if end == "rewind":
            backup.replicator.run(backup.follower.rewind(0))
        elif end == "snapshot":
            backup.follower.expect_snapshot()
        else:
            backup.follower.close()
        # A stopping node's links close next: reading one again would be no use.
        assert backup.reading == ([(1, False)] if end == "stop" else [(1, False), (1, True)])
        assert (backup.follower.pending, backup.follower.unread) == ([], None)
        assert await backup.turns(2) == [0, 0]

    run_backup(tmp_path, scenario)


@pytest.mark.parametrize("end", ["rewind", "join lost"])
def test_records_waiting_when_their_stream_ends_are_never_applied(tmp_path: Path, end: str) -> None:
    """A rewind answering a join, or a join lost (a gap): what was still waiting came
    in the stream before."""
    records = primary_records(tmp_path, 3)

    async def scenario(backup: Backup) -> None:
        backup.follower.buffer(records)
        assert await backup.turns(1) == [1]
        if end == "rewind":
            backup.replicator.run(backup.follower.rewind(1))
        else:
            core = backup.replicator.core
            backup.replicator.run(core.rejoin(backup.replicator.now(), "a gap in the stream"))
        assert await backup.turns(3) == [1, 1, 1], "records of the stream before applied"
        assert backup.follower.pending == []

    run_backup(tmp_path, scenario)


def test_a_stopping_backup_applies_nothing_more_once_its_database_closes(
    tmp_path: Path,
) -> None:
    """A backup stopped with records waiting went on applying them in the loop's
    last turns, on a closed database: a fatal error, exit status 70."""
    records = primary_records(tmp_path, 3)

    async def scenario(backup: Backup) -> None:
        backup.follower.buffer(records)
        assert await backup.turns(1) == [1]
        await backup.replicator.close()
        backup.storage.close()
        for _ in range(3):
            await asyncio.sleep(0)
        assert backup.follower.pending == []

    run_backup(tmp_path, scenario)
