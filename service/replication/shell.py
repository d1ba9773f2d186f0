"""What the runtime's parts share: the node's shell, and one way to log an event.

The runtime (``runtime.py``) composes four parts, each with one job: the
primary's write path and its waiters (``writer.py``), the streams to backups
(``streams.py``), a backup's apply, rewind and snapshot install
(``follower.py``), and the durability reports of the group fsync
(``durability.py``). They never call the core's inputs behind each other's
back: every effect list the core returns goes through ``Shell.run``, which
carries effects out in order, and every storage failure through
``Shell.fault`` (the disk refused a write: retriable) or ``Shell.damaged``
(a damaged page: the node exits).

Every replication event is logged the same way, as ``event key=value ...``
(``log_event``): one line per event, greppable by its first words.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, Protocol

from ..errors import StorageFault
from ..logline import format_fields
from .effects import Effect
from .messages import Message

log = logging.getLogger("service.replication")


class Shell(Protocol):
    """The runtime as its parts see it."""

    def run(self, effects: list[Effect]) -> None:
        """Carry out the core's effects, in order."""
        ...

    def fault(self, why: str, lasting: bool = False, room: int | None = None) -> StorageFault:
        """The disk refused a write: tell the core, retry until it recovers; the
        error for the writes that waited. ``lasting``: no retry will do (records
        this node's schema cannot hold): it stays so until the node restarts.
        ``room``: bytes the data dir must have free (and its spare) before a retry."""
        ...

    def damaged(self, why: str) -> None:
        """A damaged page: mark the database and exit at once."""
        ...

    def now(self) -> float: ...

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]: ...

    def send(self, peer: int, message: Message) -> bool: ...


def log_event(event: str, fields: dict[str, Any], level: int = logging.INFO) -> None:
    log.log(level, format_fields(event, fields))
