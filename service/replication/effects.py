"""The core's effects: what the runtime must do, in the order the core lists them.

The core (``state.py``) never touches a socket, a file or a clock. Every input
returns a list of these, and the runtime (``runtime.py``, or the simulator in
the tests) carries them out *in order*: a ``Persist`` before the ``Send`` that
depends on it, a ``ChangeSyncSet`` seal before the records after it. The
outcome of an effect comes back as an input (``on_local_durable`` after
``ApplyRecords``, ``on_log_replaced`` after ``Rewind`` or a snapshot install).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .messages import Message, Snapshot, Verify, VerifyReply
from .types import LogRecord, NodeState, SyncSet


@dataclass(frozen=True)
class Send:
    to: int
    message: Message


@dataclass(frozen=True)
class Persist:
    state: NodeState


@dataclass(frozen=True)
class BecomePrimary:
    """Seal the first record of ``epoch`` with the sync set ``members``, then serve."""

    epoch: int
    members: tuple[int, ...]


@dataclass(frozen=True)
class StepDown:
    reason: str


@dataclass(frozen=True)
class ChangeSyncSet:
    """Seal a record that sets the sync set to ``members`` (R3 shrink, R4 grow)."""

    members: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class Acknowledge:
    """Every seq up to ``seq`` is durable on the whole ack set: reply to clients."""

    seq: int


@dataclass(frozen=True)
class StartStream:
    """Primary: stream records after ``after_seq`` to ``node`` (snapshot first if asked)."""

    node: int
    after_seq: int
    snapshot: bool


@dataclass(frozen=True)
class StopStream:
    node: int


@dataclass(frozen=True)
class ApplyRecords:
    """Backup: durably apply these records, then call ``on_local_durable``."""

    records: list[LogRecord]


@dataclass(frozen=True)
class Rewind:
    """Backup: remove every record after ``to_seq`` (kept in a rollback file)."""

    to_seq: int


@dataclass(frozen=True)
class DatabaseProven:
    """This node's database, suspect since start (see ``ReplicaCore.unproven``), now
    continues a primary's history: forget the suspicion durably."""


@dataclass(frozen=True)
class RestoreSettled:
    """A node made by ``ops.restore`` leads a sync set with another member, in
    effect: forget the restore's mark durably (see ``ReplicaCore.restored``)."""


@dataclass(frozen=True)
class ExpectSnapshot:
    """Backup: the primary will send a snapshot; install it, then ``on_log_replaced``."""


@dataclass(frozen=True)
class Log:
    event: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class ReceiveSnapshot:
    """Backup: a chunk of the snapshot the current primary sends us; write it, and
    install the file once the last chunk is in (then ``on_log_replaced``)."""

    chunk: Snapshot


@dataclass(frozen=True)
class AnswerVerify:
    """Backup: the current primary asks for our checksums (``verify.py``)."""

    request: Verify


@dataclass(frozen=True)
class VerifyAnswered:
    """Primary: a backup's checksums arrived (``verify.py``)."""

    node: int
    reply: VerifyReply


@dataclass(frozen=True)
class Resynchronize:
    """Backup: the current primary found our data differs from the majority's."""

    why: str


# ---- effects of an arbiter that stores its decisions (SPEC section 10) ---------------------


@dataclass(frozen=True)
class ClaimLeader:
    """Take the leader key (absent → ours, on our lease) and advance the stored epoch
    from ``expected_epoch`` to ``epoch``, provided the sync set is still at
    ``sync_revision`` (None: a forced promotion, whatever the sync set). The result
    comes back as ``Claimed`` or ``ClaimRefused``."""

    epoch: int
    expected_epoch: int
    sync_revision: int | None


@dataclass(frozen=True)
class StoreSyncSet:
    """Compare-and-swap the stored sync set (from ``expected_revision``) to the one
    sealed at ``seq``, provided the leader key is still ours. The result comes back as
    ``SyncSetStored`` or ``SyncSetRefused``."""

    seq: int
    sync_set: SyncSet
    expected_revision: int


@dataclass(frozen=True)
class ReleaseLeader:
    """Delete the leader key if it is still ours (a clean step-down or stop)."""


Effect = (
    Send
    | Persist
    | BecomePrimary
    | StepDown
    | ChangeSyncSet
    | Acknowledge
    | StartStream
    | StopStream
    | ApplyRecords
    | Rewind
    | ExpectSnapshot
    | DatabaseProven
    | RestoreSettled
    | ReceiveSnapshot
    | AnswerVerify
    | VerifyAnswered
    | Resynchronize
    | ClaimLeader
    | StoreSyncSet
    | ReleaseLeader
    | Log
)

# Of a list in which a ``Persist`` failed, the effects after it still carried out:
# each only brings this node's own parts (its writer, streams, server, log) in line
# with the role the core has already taken, or gives something up. Every other
# effect of that list tells a peer or the arbiter what the disk has not taken (a
# vote, an epoch: R1), or writes; it is dropped, and the core's fault input makes up
# for it (a campaign is abandoned, a backup joins afresh once the disk takes writes
# again, a primary seals its reign then). Later inputs' messages (heartbeats, probe
# answers) may name the epoch the disk has not taken yet: nothing is sealed in it
# before the recovery writes it (the writer refuses batches while the fault lasts).
IN_STEP_WITH_ROLE = (Log, BecomePrimary, ChangeSyncSet, StepDown, StopStream, ReleaseLeader)
