"""The replication vocabulary as plain values: role, position, log record, node state,
sync set.

These are what the replication core (``state.py``) reasons about and what
storage persists. They live here, apart from both, so that the core can be
loaded, tested and simulated without apsw or the chat schema: storage imports
them, never the other way round.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar


class Role(enum.Enum):
    """A node is electing until it knows a primary, backup while it follows one,
    primary after winning an election."""

    ELECTING = "electing"
    PRIMARY = "primary"
    BACKUP = "backup"


@dataclass(frozen=True, order=True)
class Position:
    epoch: int
    seq: int

    ZERO: ClassVar[Position]


Position.ZERO = Position(0, 0)


@dataclass(frozen=True)
class LogRecord:
    epoch: int
    seq: int
    changeset: bytes


@dataclass(frozen=True)
class NodeState:
    current_epoch: int = 0
    voted_epoch: int = 0
    voted_for: int | None = None


@dataclass(frozen=True)
class SyncSet:
    version: int
    members: tuple[int, ...]
    epoch: int
    # (member, database id) for each member whose database was known when the set
    # was written: a node whose database is another one (its disk was wiped or
    # replaced since) is not that member. Empty in sets written before ids existed.
    databases: tuple[tuple[int, str], ...] = ()

    def database_of(self, member: int) -> str | None:
        for node, database in self.databases:
            if node == member:
                return database
        return None


NO_SYNC_SET = SyncSet(0, (), 0)
