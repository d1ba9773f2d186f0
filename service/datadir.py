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
* One node process at a time uses a data dir: ``python -m service`` holds an
  exclusive ``flock`` on its ``node.lock`` (with the holder's pid in it) for as
  long as it runs, as PostgreSQL's ``postmaster.pid`` does, before it opens or
  removes anything there. A second process started on the same data dir (by
  hand, a second supervisord, a copy of the config) would otherwise open the
  same database beside the first, rewrite its identity file and remove the
  snapshot it is receiving. It waits instead, saying which pid holds the lock,
  and starts once that process has exited (the kernel drops the lock of a
  process that dies, so a crash never leaves the data dir locked). A lock that
  cannot be taken for another reason is waited on the same way; only a file
  system where nobody can write, or one that cannot lock, goes on without it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import StorageFault
from .logline import format_fields, os_why

log = logging.getLogger("service.datadir")

PRIVATE_UMASK = 0o077
T = TypeVar("T")
FIRST_RECHECK = 1.0
MAX_RECHECK = 30.0
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


LOCK_FILE = "node.lock"
# The descriptors of the locks this process holds: closing one would release it.
_HELD: list[int] = []


class NotPrivate(Exception):
    """The data dir is not private to this user; the message says how to fix it."""


class InUse(Exception):
    """Another process holds the data dir's lock; the message names it."""


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


def lock(path: Path) -> int | None:
    """Take the data dir's lock (``LOCK_FILE``) for this process, write its pid there,
    and return the descriptor, which must stay open for as long as the process uses
    the data dir. Raises InUse if another process holds it, or if the lock cannot be
    taken for another reason (the lock file unreadable, the data dir gone): the
    caller waits and says why, as for a data dir that is not private.

    Goes on without a lock (None, and a warning) only where no process can change
    the data dir or where the file system cannot lock: a read-only file system
    (opening the database then says why the node cannot start), or one without
    ``flock`` (an NFS mount without its lock service), where refusing would keep
    the node down for good."""
    lock_path = path / LOCK_FILE
    writable = True
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise InUse(f"cannot open the lock file {lock_path}: {os_why(exc)}") from None
        try:
            fd = os.open(lock_path, os.O_RDONLY)  # flock needs no write access
        except OSError:
            _unlocked(lock_path, exc)
            return None
        writable = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = "unknown"
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or holder
        os.close(fd)
        raise InUse(
            f"another node process (pid {holder}) uses the data dir {path}: a data dir "
            "is for one node at a time"
        ) from None
    except OSError as exc:
        os.close(fd)
        _unlocked(lock_path, exc)
        return None
    if writable:
        with contextlib.suppress(OSError):  # the pid only helps the message above
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _unlocked(lock_path: Path, exc: OSError) -> None:
    log.warning(format_fields("data dir not locked", {"path": lock_path, "why": os_why(exc)}))


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


def wait_until_locked(path: Path) -> bool:
    """``lock`` the data dir for the rest of this process's life, waiting while another
    process holds it. False when told to stop first (the node should exit)."""
    done = _until_done(
        lambda: lock(path),
        InUse,
        "refusing to start: {why} (trying again)",
        f"data dir is free now path={path}",
        f"stopped while another process used the data dir path={path}",
    )
    if done is None:
        return False
    if done[0] is not None:
        _HELD.append(done[0])
    return True
