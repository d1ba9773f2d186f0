"""The chaos tool's disk faults offline: choosing them (``--faults``) and damaging a page.

The damage must be what a node can be asked to detect: a b-tree page of a
table or index, not the file's header, and reported by ``PRAGMA
integrity_check``; the same pick must damage the same bytes, so a run replays.
"""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from ops.chaos import schedule
from ops.chaos.__main__ import parse_args
from ops.chaos.corrupt import corrupt_page, flip_payload
from service.chat_schema import MIGRATIONS
from service.storage import Storage


def make_database(path: Path, messages: int = 600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = Storage(path, migrations=MIGRATIONS)
    try:
        for n in range(messages):
            batch = storage.begin_batch()
            batch.db.execute(
                "INSERT INTO messages(sender_id, recipient_id, body, sent_at) "
                "VALUES (1, 2, ?, 1.0)",
                (f"message {n} " + "x" * 60,),
            )
            batch.seal(1)
            batch.commit()
    finally:
        storage.close()  # the last connection checkpoints and removes the WAL
    return path


def bodies(path: Path, table: str) -> list[bytes]:
    column = "changeset" if table == "txlog" else "body"
    with closing(sqlite3.connect(path)) as conn:
        return [
            bytes(row[0], "utf-8") if isinstance(row[0], str) else row[0]
            for row in conn.execute(f"SELECT {column} FROM {table} ORDER BY rowid")
        ]


def integrity(path: Path) -> str:
    with closing(sqlite3.connect(path)) as conn:
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        except sqlite3.DatabaseError as error:
            return str(error)
    return "\n".join(str(row[0]) for row in rows)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_database(tmp_path_factory.mktemp("pristine") / "chat.db")


def copy_of(pristine: Path, folder: Path) -> Path:
    folder.mkdir()
    return Path(shutil.copy(pristine, folder / "chat.db"))


# ---- corrupting a page ---------------------------------------------------------------------


@pytest.mark.parametrize("pick", [0, 1, 7, 12345])
def test_a_damaged_page_fails_the_integrity_check(
    pristine: Path, tmp_path: Path, pick: int
) -> None:
    path = copy_of(pristine, tmp_path / "node")
    assert integrity(path) == "ok"
    damage = corrupt_page(path, pick, size=24)
    assert damage.page != 1
    assert damage.pages // 8 <= damage.page, "a page from the start of the file"
    assert damage.offset == (damage.page - 1) * 4096
    assert damage.owner_type in ("table", "index")
    assert integrity(path) != "ok"


def test_a_table_leaf_names_its_rows(pristine: Path, tmp_path: Path) -> None:
    described = []
    for pick in range(40):
        path = copy_of(pristine, tmp_path / f"node{pick}")
        damage = corrupt_page(path, pick, size=16)
        if damage.owner == "messages" and damage.page_type == "leaf":
            assert damage.rowids is not None
            first, last = damage.rowids
            assert 1 <= first <= last <= 600
            described.append(damage.describe())
    assert described, "no pick hit a leaf of messages"
    assert "rowids" in described[0]


def test_the_same_pick_damages_the_same_bytes(pristine: Path, tmp_path: Path) -> None:
    one = copy_of(pristine, tmp_path / "one")
    two = copy_of(pristine, tmp_path / "two")
    assert corrupt_page(one, 99, 32).page == corrupt_page(two, 99, 32).page
    assert one.read_bytes() == two.read_bytes()
    assert one.read_bytes() != pristine.read_bytes()


def test_no_page_with_a_wal_frame_is_damaged(tmp_path: Path) -> None:
    """A page in the WAL would be read from there: damaging the file's copy proves nothing."""
    live = make_database(tmp_path / "live" / "chat.db", messages=200)
    storage = Storage(live, migrations=MIGRATIONS)
    try:
        storage.db.execute("PRAGMA wal_autocheckpoint=0")
        batch = storage.begin_batch()
        batch.db.execute("UPDATE messages SET read_at = 2.0")
        batch.seal(1)
        batch.commit()
        copy = tmp_path / "copy"
        copy.mkdir()
        for suffix in ("", "-wal"):
            shutil.copy(f"{live}{suffix}", copy / f"chat.db{suffix}")
    finally:
        storage.close()
    in_wal = wal_frame_pages(copy / "chat.db-wal")
    assert in_wal
    for pick in range(30):
        target = tmp_path / f"node{pick}"
        shutil.copytree(copy, target)
        assert corrupt_page(target / "chat.db", pick, 16).page not in in_wal


def wal_frame_pages(wal: Path) -> set[int]:
    """Page numbers of the WAL's frames, read independently of the code under test."""
    data = wal.read_bytes()
    page_size = int.from_bytes(data[8:12], "big")
    return {
        int.from_bytes(data[at : at + 4], "big")
        for at in range(32, len(data) - 24 - page_size + 1, 24 + page_size)
    }


def test_a_missing_database_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        corrupt_page(tmp_path / "chat.db", 0, 8)
    assert not (tmp_path / "chat.db").exists()


# ---- choosing the faults -------------------------------------------------------------------


def test_fault_specs_name_kinds_and_groups() -> None:
    assert schedule.kinds_from_spec("process") == schedule.KINDS
    assert schedule.kinds_from_spec("disk") == schedule.DISK_KINDS
    assert schedule.kinds_from_spec("all") == schedule.KINDS + schedule.DISK_KINDS
    assert schedule.kinds_from_spec("disk-full, kill-primary") == ("kill-primary", "disk-full")
    for bad in ("", "disk,floods", "kill"):
        with pytest.raises(ValueError, match="fault kind"):
            schedule.kinds_from_spec(bad)


def test_disk_faults_are_drawn_only_when_asked_for() -> None:
    default = {fault.kind for seed in range(10) for fault in schedule.generate(seed, 300)}
    assert not default & set(schedule.DISK_KINDS)
    every = schedule.kinds_from_spec("all")
    drawn = {f.kind for seed in range(10) for f in schedule.generate(seed, 300, kinds=every)}
    assert drawn == set(every)
    disk = schedule.generate(4, 120, kinds=schedule.DISK_KINDS)
    assert disk == schedule.generate(4, 120, kinds=schedule.DISK_KINDS)
    assert all(fault.kind in schedule.DISK_KINDS for fault in disk)
    assert all(f.ops in ("write", "write,sync") for f in disk if f.kind == "io-error")


def test_the_faults_option_is_checked_and_replayed() -> None:
    options = parse_args(["--duration", "30", "--seed", "5", "--faults", "process, disk"])
    assert options.faults == "process,disk"
    assert "--faults process,disk" in options.replay()
    assert "--faults" not in parse_args(["--duration", "30", "--seed", "5"]).replay()
    with pytest.raises(SystemExit):
        parse_args(["--faults", "floods"])
    with pytest.raises(SystemExit):
        parse_args(["--faults", "disk-full", "--supervisord", "supervisord.conf"])


# ---- flipping a bit of a row -----------------------------------------------------------------


def test_a_flipped_payload_bit_changes_one_row_of_one_table_and_no_page(
    pristine: Path, tmp_path: Path
) -> None:
    path = copy_of(pristine, tmp_path / "node")
    log_before, messages_before = bodies(path, "txlog"), bodies(path, "messages")
    offset = flip_payload(path, "txlog", b"message 321 ")
    assert offset > 0
    assert integrity(path) == "ok"  # SQLite cannot see it
    assert bodies(path, "messages") == messages_before  # the same text elsewhere: untouched
    changed = [
        (old, new) for old, new in zip(log_before, bodies(path, "txlog"), strict=True) if old != new
    ]
    assert len(changed) == 1
    old, new = changed[0]
    assert b"message 321 " in old
    assert new == old.replace(b"message 321 ", b"Message 321 ")


def test_a_payload_that_is_not_there_once_is_refused(pristine: Path, tmp_path: Path) -> None:
    path = copy_of(pristine, tmp_path / "node")
    with pytest.raises(ValueError, match="on 0 places"):
        flip_payload(path, "txlog", b"no such text")
    with pytest.raises(ValueError, match="places of txlog"):
        flip_payload(path, "txlog", b"xxxxxxxxxx")  # in every record
