"""The node's files are private to the user that runs it.

The data dir holds every password hash, every session token hash and every
message (``chat.db`` and its ``-wal`` and ``-shm``), plus snapshots in transit
and rollback files; the cluster secret lets a process join the cluster. None of
it is for other users of the machine.

Rules
-----
* The node runs with umask 077 (set first thing by ``python -m service``), so a
  file it creates is 0600 and a folder 0700 whatever umask it was started with.
  ``Storage`` also creates a database file 0600 itself, and SQLite gives the
  ``-wal`` and ``-shm`` files the mode of their database.
* A missing data dir is created 0700, and so is any missing parent.
* An existing data dir must belong to the user running the node and grant
  nothing to group or others, as PostgreSQL requires of its data directory: a
  wider mode was set by someone, and the node does not overrule them. It
  refuses to start with one log line that says what to run, and checks again
  with a growing interval (up to ``MAX_RECHECK`` seconds) rather than exiting:
  under supervisord an exit would be a crash loop. It starts as soon as the
  data dir is private; SIGTERM or SIGINT ends the wait (exit status 0).
* In an accepted data dir, any file or folder of this user that grants group or
  other access is tightened (0644 becomes 0600, 0755 becomes 0700) and each
  change is logged: a data dir written before these rules gets private files
  without a manual step. The cluster secret file is tightened the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import StorageFault

log = logging.getLogger("service.datadir")

PRIVATE_UMASK = 0o077
T = TypeVar("T")
FIRST_RECHECK = 1.0
MAX_RECHECK = 30.0
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


class NotPrivate(Exception):
    """The data dir is not private to this user; the message says how to fix it."""


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and any missing parent, each 0700."""
    missing: list[Path] = []
    folder = path
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)


def check_private(path: Path) -> None:
    """Raise NotPrivate unless ``path`` is owned by this user and closed to others."""
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise NotPrivate(f"the data dir {path} is not a folder")
    if info.st_uid != os.geteuid():
        raise NotPrivate(
            f"the data dir {path} belongs to user id {info.st_uid}, not to the user "
            f"running the node ({os.geteuid()}); run the node as its owner"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise NotPrivate(
            f"the data dir {path} has mode {mode:04o}, open to group or others, and it "
            f"holds password hashes and every message; run: chmod 700 {path}"
        )


def tighten(path: Path) -> bool:
    """Take group and other permissions off ``path`` if this user owns it; log it."""
    info = path.lstat()
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode) or not mode & 0o077 or info.st_uid != os.geteuid():
        return False
    os.chmod(path, mode & ~0o077)
    log.warning("tightened file mode path=%s from=%04o to=%04o", path, mode, mode & ~0o077)
    return True


def prepare(path: Path) -> list[Path]:
    """Create the data dir 0700, or check that it is private (NotPrivate if not);
    then tighten what is inside. Returns the paths it tightened."""
    if not path.exists():
        make_private_dirs(path)
    check_private(path)
    tightened = []
    for folder, folders, files in os.walk(path):
        for name in (*folders, *files):
            entry = Path(folder) / name
            with contextlib.suppress(FileNotFoundError):
                if tighten(entry):
                    tightened.append(entry)
    return tightened


def _until_done(
    attempt: Callable[[], T],
    refusal: type[Exception],
    refused: str,
    done: str,
    stopped: str,
) -> tuple[T] | None:
    """Call ``attempt`` until it stops raising ``refusal``; log each new reason once
    (``refused`` with ``{why}``), then ``done`` if it had been refused. Waits 1, 2,
    4 ... 30 s between tries, never exiting (under supervisord an exit is a crash
    loop that buries the reason). Runs before the event loop: the stop signals are
    blocked and waited for, so the wait needs no handler and no sleep. None when
    SIGTERM or SIGINT arrived first (the node should exit)."""
    delay = FIRST_RECHECK
    said = ""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        while True:
            try:
                result = attempt()
            except refusal as exc:
                if str(exc) != said:
                    said = str(exc)
                    log.error(refused.replace("{why}", said))
            else:
                if said:
                    log.info(done)
                return (result,)
            if signal.sigtimedwait(_STOP_SIGNALS, delay) is not None:
                log.info(stopped)
                return None
            delay = min(delay * 2, MAX_RECHECK)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def retry_until_open(open_it: Callable[[], T], what: str) -> T | None:
    """Call ``open_it`` until its storage opens (a read-only file system, a database
    that cannot be opened: a ``StorageFault``). None when told to stop first."""
    opened = _until_done(
        open_it,
        StorageFault,
        f"cannot open {what}: " + "{why} (trying again with backoff)",
        f"opened {what}",
        f"stopped while {what} could not be opened",
    )
    return None if opened is None else opened[0]


def wait_until_private(path: Path) -> bool:
    """``prepare`` the data dir, waiting for its owner to fix it while it is refused.
    False when told to stop first (the node should exit)."""
    done = _until_done(
        lambda: prepare(path),
        NotPrivate,
        "refusing to start: {why} (checking again until it is)",
        f"data dir is private now path={path}",
        f"stopped while the data dir was refused path={path}",
    )
    return done is not None
