"""A deleted account's inbox, tombstoned by the primary's purge a bounded part per batch.

Through the writer's application (``ChatApplication``) on a real database file, as
the primary's batches run it. Finding an inbox's next live message from its start
walked past every tombstone made before: purging took time growing with the
square of the inbox, and each batch looked through every deleted inbox again.
SQLite's count of the steps of each statement (``SQLITE_STMTSTATUS_VM_STEP``, from
a profile trace on every connection through ``apsw.connection_hooks``) shows that
no batch looks at more than a window of it now.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

from service import chat
from service.chat_schema import MIGRATIONS
from service.storage import Storage
from tests.unit.test_chat import Service

INBOX = 1500
SCAN = 64
# Tombstoning PURGE_CHUNK messages takes about 55 steps each (3,486 measured), a
# window of SCAN messages a few per message; walking past the tombstones of a purged
# inbox took several steps per message of it, in every batch.
MOST_STEPS = 60 * chat.PURGE_CHUNK + 20 * SCAN


@pytest.fixture
def traced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Service, list[int]]]:
    """A Service whose connections report each statement's steps into the list."""
    steps: list[int] = []

    def profiled(event: dict[str, Any]) -> None:
        steps.append(int(event["stmt_status"]["SQLITE_STMTSTATUS_VM_STEP"]))

    def hook(connection: apsw.Connection) -> None:
        connection.trace_v2(apsw.SQLITE_TRACE_PROFILE, profiled)

    monkeypatch.setattr(apsw, "connection_hooks", [*apsw.connection_hooks, hook])
    monkeypatch.setattr(chat, "PURGE_SCAN", SCAN)
    storage = Storage(tmp_path / "chat.db", migrations=MIGRATIONS)
    yield Service(storage), steps
    storage.close()


def purge_all(svc: Service, steps: list[int]) -> tuple[int, int]:
    """Run the purge a batch at a time, as the writer does (a batch that changed
    nothing is rolled back, the application told so), until it says nothing is left:
    the batches it took and the most steps of any statement in them."""
    batches, most = 0, 0
    while True:
        batches += 1
        assert batches < 10 * INBOX, "the purge never ended"
        steps.clear()
        batch = svc.storage.begin_batch()
        more = svc.app.purge(batch.db, svc.now)
        if batch.seal(1) is None:
            svc.app.forget_reads()
            batch.rollback()
        else:
            batch.commit()
        most = max(most, *steps)
        if not more:
            return batches, most


def live_inbox(svc: Service, user_id: int) -> int:
    return int(
        svc.db.value(
            "SELECT count(*) FROM messages WHERE recipient_id = ? AND deleted_at IS NULL",
            (user_id,),
        )
    )


def test_a_deleted_inbox_is_purged_a_window_per_batch(traced: tuple[Service, list[int]]) -> None:
    svc, steps = traced
    ann, bob = svc.user("ann"), svc.user("bob")
    svc.app.purging.sweep = None  # no earlier reign: what the deletion leaves, alone
    ids = [svc.send(bob, "ann", f"m{n}") for n in range(INBOX)]
    svc.write("delete_messages", {"ids": ids[:100]}, ann)  # tombstones at its start
    svc.write("delete_account", {}, ann)
    assert svc.app.purging.inboxes == {1: 0}
    batches, most = purge_all(svc, steps)
    assert live_inbox(svc, 1) == 0
    assert svc.db.value("SELECT count(*) FROM messages WHERE body != ''") == 0
    # Tombstones of PURGE_CHUNK messages per batch, in windows of SCAN.
    assert batches <= (INBOX - 100) // chat.PURGE_CHUNK + 2 * INBOX // SCAN
    assert most <= MOST_STEPS, f"a purge statement took {most} steps"
    # bob's own inbox is untouched.
    svc.send(bob, "bob", "note")
    assert live_inbox(svc, 2) == 1


def test_a_new_reign_sweeps_for_inboxes_an_earlier_one_left(
    traced: tuple[Service, list[int]],
) -> None:
    svc, steps = traced
    carol, dave = svc.user("carol"), svc.user("dave")
    for n in range(300):
        svc.send(dave, "carol", f"m{n}")
    svc.write("delete_account", {}, carol)
    assert live_inbox(svc, 1) == 300 - chat.PURGE_CHUNK
    # Primary again (or a batch undone whole): what was left to do is forgotten.
    svc.app.reset()
    assert svc.app.purging.inboxes == {}
    for n in range(3 * SCAN):  # more accounts than one step of the sweep looks at
        svc.register(f"user{n}")
    _, most = purge_all(svc, steps)
    assert live_inbox(svc, 1) == 0
    assert most <= MOST_STEPS, f"a purge statement took {most} steps"


def test_a_sweep_over_many_accounts_and_purged_inboxes_ends(
    traced: tuple[Service, list[int]],
) -> None:
    """Batches that find nothing to tombstone change nothing and are rolled back; the
    work goes on from where they got, and the sweep ends."""
    svc, steps = traced
    erin, frank = svc.user("erin"), svc.user("frank")
    for n in range(3 * SCAN):  # more than one window of her inbox
        svc.send(frank, "erin", f"m{n}")
    svc.write("delete_account", {}, erin)
    purge_all(svc, steps)
    assert live_inbox(svc, 1) == 0
    for n in range(3 * SCAN):  # more accounts than a step of the sweep looks at
        svc.register(f"user{n}")
    svc.app.reset()  # a new reign: the purged inbox and every account looked at again
    batches, _ = purge_all(svc, steps)
    assert batches <= 4 * 3 * SCAN // SCAN + 2


def test_an_account_noted_for_purge_but_not_deleted_keeps_its_inbox(
    traced: tuple[Service, list[int]],
) -> None:
    """A delete_account whose savepoint was rolled back after it was noted (the record
    full): the account lives, and the purge leaves its inbox alone."""
    svc, steps = traced
    svc.user("gina")
    hal = svc.user("hal")
    for n in range(10):
        svc.send(hal, "gina", f"m{n}")
    svc.app.purging.inboxes[1] = 0
    purge_all(svc, steps)
    assert live_inbox(svc, 1) == 10
    assert svc.app.purging.inboxes == {}
