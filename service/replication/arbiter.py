"""The arbiter seam: who may lead, and when a sync-set change is in effect.

Everything else in the core (epochs, streams, acks, confirmation of backups,
rewind and catch-up) is the same however these two questions are answered, so
they go through one interface with one implementation per way of answering:

- ``PeerVoting`` (``election.py``, the default, one host): the nodes decide
  among themselves. An electing node probes its peers and wins with R5 (the most
  current confirmed node) or R6 (the newest sync set's most current member, once
  all its members answer), then collects a vote from every node that answered.
  A sync-set change is in effect once every member it names holds its record
  durably. A primary serves until it learns of a higher epoch.
- An etcd arbiter (SPEC section 10, several hosts) answers the same questions
  from a leased leader key and a sync set stored with compare-and-swap (E1 to E6):
  winning is a successful CAS on the leader key that also advances the epoch; a
  change is in effect once its CAS succeeded (a shrink before anything the
  removed node lacks is acknowledged, a grow after the newcomer is counted); the
  primary serves only until its fencing deadline, ``sent + ttl * (1 - drift) -
  margin`` of its last successful renewal. Its I/O is effects out and results
  in (``ReplicaCore.on_arbiter``), like every other input of the core.

An arbiter is part of the core: pure, no I/O, driven with the current time. It
reads the core's state and changes roles only through the core's transitions
(``follow``, ``adopt_epoch``, ``become_electing``, ``become_primary``,
``persist_vote``), so the role invariants stay in ``state.py``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .effects import Effect
from .messages import Message
from .types import Position, SyncSet

if TYPE_CHECKING:
    from .state import ReplicaCore


# ---- what an arbiter that stores its decisions reports back (inputs) -----------------------


@dataclass(frozen=True)
class MemberInfo:
    """What a node publishes about itself under its leased member key."""

    node: int
    position: Position
    database: str
    fault: str | None = None
    unproven: str | None = None


@dataclass(frozen=True)
class ArbiterView:
    """The store as last read. Guidance only (whom to wait for, what to show): a read
    may be stale, so every decision is a write whose conditions the store checks."""

    leader: int | None
    leader_epoch: int
    epoch: int
    sync_set: SyncSet | None
    sync_revision: int
    members: dict[int, MemberInfo] = field(default_factory=dict)
    # Seconds the leader key's lease has left, as the store said (None: unknown).
    leader_ttl: float | None = None


@dataclass(frozen=True)
class ArbiterUnreachable:
    why: str


@dataclass(frozen=True)
class LeaseRenewed:
    """Our lease was renewed by a request sent at ``sent_at`` (our monotonic clock)."""

    sent_at: float


@dataclass(frozen=True)
class LeaseLost:
    """The store no longer knows our lease: every key on it (the leader key) is gone."""

    why: str


@dataclass(frozen=True)
class Claimed:
    epoch: int


@dataclass(frozen=True)
class ClaimRefused:
    why: str


@dataclass(frozen=True)
class SyncSetStored:
    """The change sealed at ``seq`` in ``epoch`` is stored, at ``revision``. The epoch
    tells a late answer to an earlier reign's write (whose seq a later reign may
    reuse after a rewind) from the answer to the write in flight."""

    seq: int
    revision: int
    epoch: int = field(kw_only=True)


@dataclass(frozen=True)
class SyncSetRefused:
    """The write of the change sealed at ``seq`` failed: the store refused its
    compare (``retry`` False: someone else leads), or its outcome is unknown and the
    I/O found the set not stored (``retry`` True: write it again)."""

    seq: int
    why: str
    retry: bool = False
    epoch: int = field(kw_only=True)


ArbiterEvent = (
    ArbiterView
    | ArbiterUnreachable
    | LeaseRenewed
    | LeaseLost
    | Claimed
    | ClaimRefused
    | SyncSetStored
    | SyncSetRefused
)


class Arbiter(abc.ABC):
    """One way of deciding who leads and which sync set counts."""

    core: ReplicaCore

    def bind(self, core: ReplicaCore) -> None:
        self.core = core

    # ---- who may lead -----------------------------------------------------------------

    @abc.abstractmethod
    def enter_electing(self, now: float, previous_primary: int | None) -> None:
        """The node became electing (having followed ``previous_primary``, if any):
        start a fresh election; nothing of an earlier electing spell counts."""

    @abc.abstractmethod
    def leave_electing(self) -> None:
        """The node left the electing role (it follows a primary or became one)."""

    @abc.abstractmethod
    def electing_tick(self, now: float, out: list[Effect]) -> None:
        """Drive the election while the node is electing."""

    @abc.abstractmethod
    def on_message(self, now: float, sender: int, msg: Message, out: list[Effect]) -> bool:
        """An election message (any role may receive one); False if not ours."""

    @abc.abstractmethod
    def on_link(self, now: float, peer: int, up: bool, out: list[Effect]) -> None:
        """A link to ``peer`` came up or went down."""

    @abc.abstractmethod
    def on_gap(self, now: float) -> None:
        """This process was stopped (a clock gap): views gathered before it are stale."""

    @abc.abstractmethod
    def force_promote(self, now: float, out: list[Effect]) -> None:
        """An operator's explicit, warned promotion of this node."""

    def on_storage_fault(self, now: float, out: list[Effect]) -> None:  # noqa: B027
        """The disk refused a write: whatever this node was asking for its own lead
        depends on writes it may not have made (nothing to drop by default)."""

    # ---- is a sync-set change in effect ----------------------------------------------------

    @abc.abstractmethod
    def change_in_effect(
        self, seq: int, members: tuple[int, ...], durable: Callable[[int], int]
    ) -> bool:
        """Primary: the change sealed at ``seq`` to ``members`` now counts alone for
        acks (``durable`` gives each node's durable seq)."""

    @abc.abstractmethod
    def on_change_sealed(self, now: float, seq: int, sync_set: SyncSet, out: list[Effect]) -> None:
        """Primary: a change record was sealed (an arbiter that stores the set acts here)."""

    # ---- a primary's reign ----------------------------------------------------------------

    @abc.abstractmethod
    def primary_tick(self, now: float, out: list[Effect]) -> None:
        """Every tick while primary (an arbiter with leases checks them here)."""

    @abc.abstractmethod
    def leaving_primary(self, out: list[Effect]) -> None:
        """The node stops being primary (it steps down or follows a newer one)."""

    def serving_until(self) -> float:
        """Primary: the monotonic time past which it may acknowledge nothing and
        serve no read (E2); infinite when leadership is not leased."""
        return math.inf

    # ---- the store's answers ---------------------------------------------------------------

    @abc.abstractmethod
    def on_event(self, now: float, event: ArbiterEvent, out: list[Effect]) -> None:
        """What the arbiter's I/O found: a read of the store, a renewal, a write's result."""

    @abc.abstractmethod
    def status(self, now: float) -> dict[str, Any]:
        """What ``status`` shows of the arbiter (empty when there is nothing to add)."""
