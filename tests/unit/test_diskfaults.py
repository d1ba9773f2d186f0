"""The disk fault VFS (service/diskfaults.py) under a real Storage on real SQLite files.

A fault must reach the node as the real one would (the apsw error SQLite
gives for a full disk or an I/O error, wrapped as a storage error by
Storage), must leave the database as SQLite leaves it after such a failure
(intact, the failed transaction absent), and must go away when the plan is
``off``. Flipped read bytes must look like on-disk corruption to SQLite.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from ops.cluster.waiting import wait_for
from service import diskfaults
from service.chat_schema import MIGRATIONS
from service.diskfaults import DiskFaults, Plan, write_control
from service.errors import Internal, StorageFault
from service.replication.types import Position
from service.storage import Storage

# The names of the VFSes made here with a control file (the fixture names its own).
_names = itertools.count(1)


@pytest.fixture
def storage(tmp_path: Path, faults: DiskFaults) -> Iterator[Storage]:
    opened = Storage(tmp_path / "chat.db", vfs=faults.name, migrations=MIGRATIONS)
    yield opened
    opened.close()


def send(storage: Storage, body: str, epoch: int = 1) -> None:
    """One committed batch that stores a message."""
    batch = storage.begin_batch()
    try:
        batch.db.execute(
            "INSERT INTO messages(sender_id, recipient_id, body, sent_at) VALUES (1, 2, ?, 1.0)",
            (body,),
        )
        batch.seal(epoch)
        batch.commit()
    except BaseException:
        batch.rollback()
        raise


def bodies(storage: Storage) -> list[str]:
    return [row[0] for row in storage.db.execute("SELECT body FROM messages ORDER BY id")]


def reopened(path: Path) -> Storage:
    """The same files on SQLite's default VFS: what is really on disk."""
    return Storage(path, migrations=MIGRATIONS)


# ---- full disk ---------------------------------------------------------------------------


def test_a_full_disk_fails_the_commit_and_leaves_the_database_intact(
    storage: Storage, faults: DiskFaults
) -> None:
    send(storage, "before")
    faults.set(Plan("full"))
    with pytest.raises(StorageFault, match="database or disk is full") as failure:
        send(storage, "refused")
    assert isinstance(failure.value.__cause__, apsw.FullError)
    assert faults.injected >= 1
    assert storage.integrity_check() == "ok"
    assert bodies(storage) == ["before"]
    assert storage.position() == Position(1, 1)

    faults.set(Plan("off"))
    send(storage, "after")
    assert bodies(storage) == ["before", "after"]
    storage.close()
    again = reopened(storage.path)
    try:
        assert again.integrity_check() == "ok"
        assert bodies(again) == ["before", "after"]
        assert again.position() == Position(1, 2)
    finally:
        again.close()


def test_writes_go_through_until_the_space_left_is_used_up(
    storage: Storage, faults: DiskFaults
) -> None:
    faults.set(Plan("full", after_bytes=100_000))
    sent: list[str] = []
    refusal = ""
    for n in range(1000):
        try:
            send(storage, f"m{n}")
        except StorageFault as error:
            refusal = str(error)
            break
        sent.append(f"m{n}")
    assert "database or disk is full" in refusal, f"no refusal after {len(sent)} writes"
    assert len(sent) >= 3, "the budget let too few writes through"
    # Full stays full: a smaller write fails as well, until a new plan.
    with pytest.raises(StorageFault, match="database or disk is full"):
        send(storage, "x")
    assert bodies(storage) == sent
    assert storage.integrity_check() == "ok"
    faults.set(Plan("full", after_bytes=100_000))
    send(storage, "room again")
    assert bodies(storage)[-1] == "room again"


def test_a_full_disk_fails_a_snapshot_and_keeps_the_source(
    storage: Storage, faults: DiskFaults, tmp_path: Path
) -> None:
    send(storage, "kept")
    faults.set(Plan("full", after_bytes=20_000, files=("*.partial",)))
    with pytest.raises(StorageFault, match="database or disk is full"):
        storage.make_snapshot(tmp_path / "snapshot.db")
    # Nothing of the copy stays: pages of a half-made copy would keep the disk full.
    assert sorted(p.name for p in tmp_path.iterdir() if "snapshot" in p.name) == []
    send(storage, "still writable")  # the node's own files are not the full ones
    assert bodies(storage) == ["kept", "still writable"]


def test_only_the_named_files_fail(storage: Storage, faults: DiskFaults) -> None:
    faults.set(Plan("full", files=("other.db*",)))
    send(storage, "not ours")
    faults.set(Plan("full", files=("*-wal",)))
    with pytest.raises(StorageFault, match="full"):
        send(storage, "refused")
    assert bodies(storage) == ["not ours"]


def test_a_checkpoint_the_disk_refuses_is_counted_and_told_once(
    storage: Storage, faults: DiskFaults, caplog: pytest.LogCaptureFixture
) -> None:
    """The database file fails its writes while the WAL's still go through (a bad
    region of a failing disk): commits go on and checkpoints fail, at every sync.
    The WAL grows meanwhile; the node must say so (a warning, once; the counter
    behind ``chat_checkpoint_failures_total``), and say when it recovers."""
    storage.defer_sync()
    big = "x" * 1_000_000  # about 250 pages
    send(storage, "first")
    storage.sync()
    faults.set(Plan("ioerror", files=("chat.db",), ops=("write",)))
    caplog.set_level(logging.INFO, logger="service.storage")
    grown = storage.wal_bytes()
    for n in range(40):  # past CHECKPOINT_WAL_PAGES: each sync then tries a checkpoint
        send(storage, f"{n}{big}")
        assert storage.sync() is False
    assert storage.checkpoint_failures >= 2, "no checkpoint was tried, or none failed"
    failed = [r for r in caplog.records if r.getMessage().startswith("checkpoint failed")]
    assert len(failed) == 1, [r.getMessage() for r in failed]
    assert failed[0].levelno == logging.WARNING
    assert 'wal="keeps every commit' in failed[0].getMessage()
    assert 'why="a disk I/O error' in failed[0].getMessage()
    wal = storage.wal_bytes()
    assert grown is not None
    assert wal is not None
    assert wal > grown + 40 * len(big), "the WAL kept fewer bytes than the commits wrote"
    faults.set(Plan("off"))
    count = storage.checkpoint_failures
    send(storage, "after")
    assert storage.sync() is False
    assert storage.checkpoint_failures == count, "the checkpoint failed with no fault"
    told = [r.getMessage() for r in caplog.records if "checkpoint succeeded" in r.getMessage()]
    assert told == [f"checkpoint succeeded again failures={count}"]
    assert len(bodies(storage)) == 42
    assert storage.integrity_check() == "ok"
    # A second run of failures is told as its own: one more warning, its own count.
    faults.set(Plan("ioerror", files=("chat.db",), ops=("write",)))
    for n in range(40):
        send(storage, f"again {n}{big}")
        storage.sync()
    faults.set(Plan("off"))
    storage.sync()
    again = storage.checkpoint_failures - count
    assert again >= 2, "the second run made no failed checkpoint"
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if m.startswith("checkpoint failed")]) == 2
    told = [m for m in messages if "checkpoint succeeded" in m]
    assert told[1:] == [f"checkpoint succeeded again failures={again}"]


# ---- I/O errors --------------------------------------------------------------------------


def test_an_io_error_on_write_fails_the_commit_and_goes_away(
    storage: Storage, faults: DiskFaults
) -> None:
    send(storage, "before")
    faults.set(Plan("ioerror"))
    with pytest.raises(StorageFault, match="disk I/O error") as failure:
        send(storage, "refused")
    cause = failure.value.__cause__
    assert isinstance(cause, apsw.IOError)
    assert getattr(cause, "extendedresult", None) == apsw.SQLITE_IOERR_WRITE
    assert storage.integrity_check() == "ok"
    assert bodies(storage) == ["before"]
    faults.set(Plan("off"))
    send(storage, "after")
    assert bodies(storage) == ["before", "after"]


def test_a_failed_fsync_fails_a_synced_commit(storage: Storage, faults: DiskFaults) -> None:
    send(storage, "before")
    faults.set(Plan("ioerror", ops=("sync",)))
    with pytest.raises(StorageFault, match="disk I/O error") as failure:
        send(storage, "unsynced")
    cause = failure.value.__cause__
    assert isinstance(cause, apsw.IOError)
    assert getattr(cause, "extendedresult", None) == apsw.SQLITE_IOERR_FSYNC
    faults.set(Plan("off"))
    assert storage.integrity_check() == "ok"
    assert storage.position() == Position(1, 1)


def test_an_io_error_on_read_fails_a_query(tmp_path: Path, faults: DiskFaults) -> None:
    path = tmp_path / "chat.db"
    first = Storage(path, migrations=MIGRATIONS)
    send(first, "on disk")
    first.close()
    faults.set(Plan("ioerror", ops=("read",), files=("chat.db",)))
    with pytest.raises(StorageFault, match="disk I/O error"):
        Storage(path, vfs=faults.name, migrations=MIGRATIONS).close()


# ---- corruption --------------------------------------------------------------------------


def test_flipped_read_bytes_are_seen_as_corruption(tmp_path: Path, faults: DiskFaults) -> None:
    path = tmp_path / "chat.db"
    first = Storage(path, migrations=MIGRATIONS)
    for n in range(400):
        send(first, f"message {n} " + "x" * 80)
    page_size = int(first.db.value("PRAGMA page_size"))
    pages = [
        int(row[0])
        for row in first.db.execute(
            "SELECT pageno FROM dbstat WHERE name = 'messages' AND pagetype = 'leaf' "
            "ORDER BY pageno"
        )
    ]
    first.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    first.close()
    assert len(pages) > 2
    page = pages[len(pages) // 2]
    # The b-tree page header: its type byte, free block start and cell count.
    start = (page - 1) * page_size
    faults.set(Plan("flip_read", offsets=tuple(range(start, start + 5)), files=("chat.db",)))

    seen = Storage(path, vfs=faults.name, migrations=MIGRATIONS)
    try:
        try:
            verdict = seen.integrity_check()
        except Internal as error:  # SQLITE_CORRUPT on the way
            verdict = str(error)
        assert verdict != "ok"
        assert faults.injected > 0
    finally:
        seen.close()
    again = reopened(path)  # the file itself was never changed
    try:
        assert again.integrity_check() == "ok"
    finally:
        again.close()


# ---- the control file ----------------------------------------------------------------------


def test_a_control_file_drives_the_plan(tmp_path: Path) -> None:
    control = tmp_path / "faults.json"
    faults = DiskFaults(f"test-diskfaults-control-{next(_names)}", control=control)
    storage = Storage(tmp_path / "chat.db", vfs=faults.name, migrations=MIGRATIONS)
    try:
        send(storage, "no file yet")
        write_control(control, Plan("full"))
        wait_for(lambda: _refused(storage), 5.0, "a write refused after the control file said full")
        write_control(control, Plan("off"))
        wait_for(lambda: not _refused(storage), 5.0, "writes again after the file said off")
        write_control(control, Plan("ioerror"))
        wait_for(lambda: faults.plan.mode == "ioerror", 5.0, "the ioerror plan")
        control.unlink()
        wait_for(lambda: faults.plan == diskfaults.OFF, 5.0, "off once the file is removed")
        assert storage.integrity_check() == "ok"
    finally:
        storage.close()
        faults.close()


def test_a_bad_control_file_keeps_the_plan_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    control = tmp_path / "faults.json"
    write_control(control, Plan("full", after_bytes=7))
    faults = DiskFaults(f"test-diskfaults-control-{next(_names)}", control=control)
    try:
        assert faults.plan == Plan("full", after_bytes=7)

        def bad_file_logged() -> bool:
            assert faults.plan == Plan("full", after_bytes=7)  # looks at the file when due
            return "control file ignored" in caplog.text

        with caplog.at_level(logging.WARNING, logger="service.diskfaults"):
            control.write_text('{"mode": "fuller"}')
            wait_for(bad_file_logged, 5.0, "the bad file to be logged")
    finally:
        faults.close()


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"mode": "fuller"}, "mode must be one of"),
        ({"mode": "full", "after_bytes": -1}, "after_bytes"),
        ({"mode": "full", "after_bytes": "10"}, "after_bytes"),
        ({"mode": "full", "ops": ["read"]}, "does not fail reads"),
        ({"mode": "ioerror", "ops": ["erase"]}, "ops must be"),
        ({"mode": "ioerror", "ops": []}, "ops must be"),
        ({"mode": "flip_read"}, "at least one offset"),
        ({"mode": "full", "files": "chat.db"}, "files must be a list"),
        ({"mode": "full", "size": 1}, "unknown plan keys"),
        (["full"], "a JSON object"),
    ],
)
def test_a_bad_plan_is_refused_with_one_clear_error(document: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Plan.from_json(document)


def test_a_plan_round_trips_through_json() -> None:
    plan = Plan("ioerror", after_bytes=4096, files=("chat.db-wal",), ops=("write", "sync"))
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_nothing_is_installed_without_the_variable() -> None:
    before = apsw.vfs_names()
    assert diskfaults.install_from_environment({}) is None
    assert apsw.vfs_names() == before


def _refused(storage: Storage) -> bool:
    try:
        send(storage, "probe")
    except StorageFault as error:
        if "database or disk is full" in str(error):
            return True
        raise
    return False
