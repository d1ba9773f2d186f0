"""The data dir rules of ``service.datadir`` on real folders and files.

The same rules seen from a real node process (umask, refusal and wait, the log
lines) are in ``tests/integration/test_private_files.py``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import datadir
from service.datadir import NotPrivate


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """The usual umask of a shell: files 0644 and folders 0755 unless made private."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_missing_data_dir_and_its_missing_parents_are_made_0700(tmp_path: Path) -> None:
    data = tmp_path / "var" / "cluster" / "node1"
    assert datadir.prepare(data) == []
    assert [mode(p) for p in (tmp_path / "var", data.parent, data)] == [0o700] * 3


@pytest.mark.parametrize("wide", [0o755, 0o750, 0o705, 0o701, 0o710])
def test_a_data_dir_open_to_group_or_others_is_refused(tmp_path: Path, wide: int) -> None:
    data = tmp_path / "node1"
    data.mkdir()
    data.chmod(wide)
    (data / "chat.db").write_text("")
    with pytest.raises(NotPrivate, match=rf"mode {wide:04o}.*run: chmod 700 {data}$"):
        datadir.prepare(data)
    # Refused means untouched: the owner decides, the node does not overrule.
    assert mode(data) == wide
    assert mode(data / "chat.db") == 0o644


def test_a_data_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "node1"
    data.mkdir(mode=0o700)
    try:
        os.chown(data, os.geteuid() + 4242, -1)
    except PermissionError:
        pytest.skip("only root can give a folder to another user")
    with pytest.raises(NotPrivate, match="belongs to user id"):
        datadir.prepare(data)


def test_a_file_where_the_data_dir_should_be_is_refused(tmp_path: Path) -> None:
    (tmp_path / "node1").write_text("")
    with pytest.raises(NotPrivate, match="not a folder"):
        datadir.prepare(tmp_path / "node1")


def test_files_in_a_private_data_dir_are_tightened(tmp_path: Path) -> None:
    """A data dir from before these rules, after its owner ran chmod 700 on it."""
    data = tmp_path / "node1"
    (data / "rollback").mkdir(parents=True)
    for name in ("chat.db", "chat.db-wal", "chat.db-shm", "rollback/rewind-1.jsonl"):
        (data / name).write_text("x")
    (data / "private.db").write_text("x")
    (data / "private.db").chmod(0o600)
    (data / "script").write_text("x")
    (data / "script").chmod(0o775)
    data.chmod(0o700)
    tightened = datadir.prepare(data)
    assert sorted(p.relative_to(data).as_posix() for p in tightened) == [
        "chat.db",
        "chat.db-shm",
        "chat.db-wal",
        "rollback",
        "rollback/rewind-1.jsonl",
        "script",
    ]
    assert mode(data / "rollback") == 0o700
    assert mode(data / "script") == 0o700
    assert {mode(p) for p in data.rglob("*.*")} == {0o600}
    assert datadir.prepare(data) == []


# ---- one process per data dir: datadir.lock ----------------------------------------------


def test_the_lock_names_the_pid_that_holds_it_and_is_free_once_released(tmp_path: Path) -> None:
    fd = datadir.lock(tmp_path)
    assert fd is not None
    assert (tmp_path / datadir.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert mode(tmp_path / datadir.LOCK_FILE) == 0o600
    # flock belongs to an open file: another open of it, even in this process, is
    # refused as another process would be.
    with pytest.raises(datadir.InUse, match=f"another node process \\(pid {os.getpid()}\\)"):
        datadir.lock(tmp_path)
    os.close(fd)  # as the kernel does when the holder exits
    again = datadir.lock(tmp_path)
    assert again is not None
    os.close(again)


def test_a_lock_file_held_without_a_pid_in_it_says_unknown(tmp_path: Path) -> None:
    fd = datadir.lock(tmp_path)
    assert fd is not None
    os.ftruncate(fd, 0)
    with pytest.raises(datadir.InUse, match=r"pid unknown"):
        datadir.lock(tmp_path)
    os.close(fd)


def test_a_lock_that_cannot_be_taken_is_a_refusal_to_wait_on_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / datadir.LOCK_FILE).mkdir()  # as unopenable as a file of another owner
    with pytest.raises(
        datadir.InUse, match=r"cannot open the lock file .*node\.lock: Is a directory"
    ):
        datadir.lock(tmp_path)
    with pytest.raises(datadir.InUse, match="No such file or directory"):
        datadir.lock(tmp_path / "gone")  # the data dir moved away meanwhile
