"""Disk faults on demand: a SQLite VFS that fails writes or corrupts reads.

This is a test and fault-injection facility, not part of the service's
behaviour, and production never loads it: ``python -m service`` imports this
module only when its environment names a control file in ``CHAT_DISK_FAULTS``
(``install_from_environment``); a unit test installs it itself and opens a
``Storage`` on it (``Storage(path, vfs=faults.name)``). It lets the tests and
``ops/chaos`` make a running node's disk full, fail its I/O or corrupt what it
reads, without mounts or privileges.

Theory of operation
-------------------
``DiskFaults`` registers an apsw VFS that inherits every operation from
SQLite's default VFS (the unix one) and wraps each file it opens: before a
write, a growing truncate, a sync or a read of a file whose name matches the
plan in effect, it asks the plan whether the operation fails. A ``Plan`` is
one of:

* ``off``: nothing fails (also the plan while there is no control file);
* ``full``: the disk has ``after_bytes`` bytes left. Writes go through until
  they have used them up; from then on every write, and every truncate that
  grows a file, fails with ``SQLITE_FULL`` (``apsw.FullError``); with
  ``"sync"`` in ``ops``, syncs fail too (``SQLITE_IOERR_FSYNC``), as on a file
  system that allocates blocks at writeback;
* ``ioerror``: the same budget, then ``SQLITE_IOERR`` (``apsw.IOError``) for
  the operations in ``ops``, among ``write``, ``sync`` and ``read``;
* ``flip_read``: a read that covers one of ``offsets`` of a matching file
  returns that byte inverted: a bad sector under a healthy file system. The
  file itself does not change.

``files`` holds glob patterns of file names (the last path component:
``chat.db``, ``chat.db-wal``, ``*-wal``); empty means every file.

A write that does not fit what is left fails whole and uses up the rest: once
a plan has run out of bytes it fails every later operation it names until a
new plan replaces it, as a full disk stays full until space is freed. A new
plan starts with its full budget again.

Control from outside the process: with a control file (JSON of a plan, as
``Plan.to_json`` writes it), the VFS looks at the file's inode, size and mtime
at most every ``RELOAD_INTERVAL`` seconds, when SQLite touches a file, and
loads the plan when they changed; a missing file is the plan ``off``.
``write_control`` replaces the file atomically, so a node never reads half a
plan. A control file that does not parse leaves the plan in effect and is
logged: a typo in a test must not crash the node under test. Each plan loaded,
and the first failure it injects, are logged at WARNING (``disk faults ...``),
so a node's log reads as the scenario.

Limits
------
* Only what SQLite does goes through a VFS. ``Storage.sync`` fdatasyncs the
  WAL by path with ``os.fdatasync``: a ``sync`` fault hits SQLite's own syncs
  (commits with synchronous=FULL, checkpoints), not that one.
* SQLite maps the ``-shm`` file into memory and never writes it through the
  VFS's files: faults do not reach it.
* Python code runs for every read and write of a wrapped file: fine for tests,
  too slow for a benchmark.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw

ENV_VAR = "CHAT_DISK_FAULTS"
VFS_NAME = "chat-diskfaults"
RELOAD_INTERVAL = 0.05
MODES = ("off", "full", "ioerror", "flip_read")
OPS = ("write", "sync", "read")
_ERROR_CODES = {
    "write": apsw.SQLITE_IOERR_WRITE,
    "truncate": apsw.SQLITE_IOERR_TRUNCATE,
    "sync": apsw.SQLITE_IOERR_FSYNC,
    "read": apsw.SQLITE_IOERR_READ,
}

log = logging.getLogger("service.diskfaults")

_installed: DiskFaults | None = None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _list(document: Mapping[str, Any], key: str, default: tuple[Any, ...]) -> list[Any]:
    value = document.get(key, list(default))
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list, not {value!r}")
    return value


def _strings(document: Mapping[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_list(document, key, default))


@dataclass(frozen=True)
class Plan:
    """What fails, on which files, after how many more bytes; see the module docstring."""

    mode: str = "off"
    after_bytes: int = 0
    files: tuple[str, ...] = ()
    ops: tuple[str, ...] = ("write",)
    offsets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if not _is_count(self.after_bytes):
            raise ValueError(f"after_bytes must be an integer >= 0, not {self.after_bytes!r}")
        if not all(isinstance(p, str) and p for p in self.files):
            raise ValueError(f"files must be non-empty name patterns, not {self.files!r}")
        unknown = [op for op in self.ops if op not in OPS]
        if unknown or not self.ops:
            raise ValueError(f"ops must be some of {OPS}, not {self.ops!r}")
        if self.mode == "full" and "read" in self.ops:
            raise ValueError("a full disk does not fail reads: use mode ioerror")
        if not all(_is_count(offset) for offset in self.offsets):
            raise ValueError(f"offsets must be integers >= 0, not {self.offsets!r}")
        if self.mode == "flip_read" and not self.offsets:
            raise ValueError("flip_read needs at least one offset")

    @classmethod
    def from_json(cls, document: object) -> Plan:
        """A plan from its JSON object; ValueError says what is wrong with it."""
        if not isinstance(document, Mapping):
            raise ValueError(f"a plan is a JSON object, not {type(document).__name__}")
        unknown = set(document) - {"mode", "after_bytes", "files", "ops", "offsets"}
        if unknown:
            raise ValueError(f"unknown plan keys {sorted(unknown)}")
        return cls(
            mode=document.get("mode", "off"),
            after_bytes=document.get("after_bytes", 0),
            files=_strings(document, "files", ()),
            ops=_strings(document, "ops", ("write",)),
            offsets=tuple(_list(document, "offsets", ())),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "after_bytes": self.after_bytes,
            "files": list(self.files),
            "ops": list(self.ops),
            "offsets": list(self.offsets),
        }

    def matches(self, filename: str) -> bool:
        return not self.files or any(fnmatch.fnmatchcase(filename, p) for p in self.files)

    def __str__(self) -> str:
        text = f"mode={self.mode}"
        if self.mode == "off":
            return text
        if self.mode in ("full", "ioerror"):
            text += f" after_bytes={self.after_bytes} ops={','.join(self.ops)}"
        if self.mode == "flip_read":
            text += f" offsets={','.join(map(str, self.offsets))}"
        return text + f" files={','.join(self.files) or '*'}"


OFF = Plan()
_UNREADABLE = (-1, -1, -1)  # the signature of a control file that cannot be looked at


def write_control(path: Path, plan: Plan) -> None:
    """Put ``plan`` in the control file ``path``, atomically (a reader sees the old or the new)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(plan.to_json()) + "\n", encoding="utf-8")
    os.replace(partial, path)


def install_from_environment(environ: Mapping[str, str] = os.environ) -> DiskFaults | None:
    """In a node process: with ``CHAT_DISK_FAULTS=<control file>`` in ``environ``, make the
    fault VFS SQLite's default for this process, driven by that file; else do nothing."""
    global _installed
    control = environ.get(ENV_VAR)
    if not control or _installed is not None:
        return _installed
    _installed = DiskFaults(VFS_NAME, control=Path(control), default=True)
    log.warning("disk faults enabled control=%s", control)
    return _installed


class DiskFaults:
    """The fault VFS and the plan in effect (``set`` it, or let a control file drive it).

    Keep the object while connections use it: the VFS is unregistered with it.
    """

    def __init__(self, name: str = VFS_NAME, control: Path | None = None, default: bool = False):
        self.name = name
        self.control = control
        # Failures injected since the start: tests check a fault really fired.
        self.injected = 0
        self._lock = threading.Lock()
        self._plan = OFF
        self._left = 0
        self._logged_failure = False
        self._signature: tuple[int, int, int] | None = None
        self._checked = -math.inf
        # Resolved now: once this VFS is the default, "" would name itself.
        base = apsw.vfs_names()[0]
        self._vfs = _FaultVFS(self, name, base, default)

    @property
    def plan(self) -> Plan:
        with self._lock:
            return self._current()

    def set(self, plan: Plan) -> None:
        """Put ``plan`` in effect now, with its full byte budget."""
        with self._lock:
            self._load(plan, "set")

    def close(self) -> None:
        """Unregister the VFS (connections still open on it must be closed first)."""
        self._vfs.unregister()

    # ---- called by the files ---------------------------------------------------------------

    def before(self, op: str, filename: str, size: int = 0) -> None:
        """Raise the injected error if ``op`` (``size`` bytes for a write) must fail now."""
        with self._lock:
            plan = self._current()
            if plan.mode not in ("full", "ioerror") or not plan.matches(filename):
                return
            kind = "write" if op == "truncate" else op
            if kind not in plan.ops:
                return
            if kind == "write" and size <= self._left:
                self._left -= size
                return
            if kind != "write" and self._left > 0:
                return
            self._left = 0
            self.injected += 1
            first, self._logged_failure = not self._logged_failure, True
        if first:
            log.warning("disk faults failing op=%s file=%s %s", op, filename or "(temp)", plan)
        raise _error(plan.mode, op, filename)

    def after_read(self, filename: str, offset: int, data: bytes) -> bytes:
        """``data`` as read at ``offset``, with the planned bytes inverted."""
        with self._lock:
            plan = self._current()
            if plan.mode != "flip_read" or not plan.matches(filename):
                return data
            hits = [o - offset for o in plan.offsets if offset <= o < offset + len(data)]
            if not hits:
                return data
            self.injected += len(hits)
        flipped = bytearray(data)
        for index in hits:
            flipped[index] ^= 0xFF
        return bytes(flipped)

    # ---- the plan in effect ----------------------------------------------------------------

    def _current(self) -> Plan:
        """The plan, reloaded first if the control file is due a look (lock held)."""
        if self.control is not None:
            now = time.monotonic()
            if now - self._checked >= RELOAD_INTERVAL:
                self._checked = now
                self._reload()
        return self._plan

    def _reload(self) -> None:
        assert self.control is not None
        try:
            stat = self.control.stat()
        except FileNotFoundError:
            if self._signature is not None:
                self._signature = None
                self._load(OFF, f"{self.control} (removed)")
            return
        except OSError as exc:
            if self._signature != _UNREADABLE:  # logged once, not at every look
                self._signature = _UNREADABLE
                log.warning("disk faults control file ignored path=%s error=%r", self.control, exc)
            return
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            plan = Plan.from_json(json.loads(self.control.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            log.warning("disk faults control file ignored path=%s error=%r", self.control, exc)
            return
        self._load(plan, str(self.control))

    def _load(self, plan: Plan, source: str) -> None:
        self._plan = plan
        self._left = plan.after_bytes
        self._logged_failure = False
        log.warning("disk faults plan %s source=%s", plan, source)


class _FaultVFS(apsw.VFS):
    """The default VFS, opening ``_FaultFile`` objects (the method names are apsw's)."""

    def __init__(self, faults: DiskFaults, name: str, base: str, default: bool) -> None:
        self._faults = faults
        self._base = base
        super().__init__(name, base, makedefault=default)

    def xOpen(  # noqa: N802
        self, name: str | apsw.URIFilename | None, flags: list[int]
    ) -> _FaultFile:
        return _FaultFile(self._faults, self._base, name, flags)


class _FaultFile(apsw.VFSFile):
    """One file of the default VFS, asking ``DiskFaults`` before each operation."""

    def __init__(
        self,
        faults: DiskFaults,
        base: str,
        name: str | apsw.URIFilename | None,
        flags: list[int],
    ) -> None:
        super().__init__(base, name, flags)
        self._faults = faults
        path = name.filename() if isinstance(name, apsw.URIFilename) else name
        self._filename = Path(path).name if path else ""

    def xWrite(self, data: bytes, offset: int) -> None:  # noqa: N802
        self._faults.before("write", self._filename, len(data))
        super().xWrite(data, offset)

    def xTruncate(self, newsize: int) -> None:  # noqa: N802
        growth = newsize - int(self.xFileSize())
        if growth > 0:
            self._faults.before("truncate", self._filename, growth)
        super().xTruncate(newsize)

    def xSync(self, flags: int) -> None:  # noqa: N802
        self._faults.before("sync", self._filename)
        super().xSync(flags)

    def xRead(self, amount: int, offset: int) -> bytes:  # noqa: N802
        self._faults.before("read", self._filename)
        data = super().xRead(amount, offset)
        return self._faults.after_read(self._filename, offset, bytes(data))


def _error(mode: str, op: str, filename: str) -> Exception:
    """The apsw exception SQLite receives: its code is what a real failure would give."""
    if mode == "full" and op != "sync":
        error = apsw.exception_for(apsw.SQLITE_FULL)
        what = "database or disk is full"
    else:
        error = apsw.exception_for(_ERROR_CODES[op])
        what = "disk I/O error"
    error.args = (f"{what} (injected: {op} of {filename or 'a temp file'})",)
    return error
